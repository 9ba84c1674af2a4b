//! Node ids, op ids, ops and version vectors.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::{Error, Hlc, Result, Value};

/// The name of a node (or hub), unique in the mesh: 1-64 characters from
/// `[A-Za-z0-9_.-]`.
///
/// A name of up to 8 bytes is held inline (a clone is a copy, no reference
/// count); a longer one is shared (`Arc<str>`: a clone is a reference-count
/// increment). The first 8 bytes are kept inline in both cases, so names
/// compare as big-endian integers first, without reading a string: names
/// of up to 8 bytes always, longer ones mostly. Ordered (by bytes), hashed
/// and serialized exactly as its name (a plain string).
#[derive(Clone)]
pub struct NodeId {
    /// The first 8 bytes of the name, zero-padded: as a big-endian integer
    /// ordered as the names are, up to ties.
    head: [u8; KEY_BYTES],
    /// The rest: the length of a short name, or the whole long name.
    tail: Tail,
}

/// A [`NodeId`]'s name beyond its first bytes.
#[derive(Clone)]
enum Tail {
    /// The name is `head[..len]`.
    Short(u8),
    /// The whole name (longer than [`KEY_BYTES`]).
    Long(Arc<str>),
}

/// Bytes of a name held in [`NodeId`]'s head.
const KEY_BYTES: usize = 8;

impl NodeId {
    /// Wraps a name (not validated).
    #[cfg(test)]
    fn from_arc(name: Arc<str>) -> Self {
        NodeId::from_str_unchecked(&name, Some(&name))
    }

    /// Wraps a name (not validated); `shared` is the same name already
    /// shared, if the caller has it.
    fn from_str_unchecked(name: &str, shared: Option<&Arc<str>>) -> Self {
        let mut head = [0u8; KEY_BYTES];
        let n = name.len().min(KEY_BYTES);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        let tail = if name.len() <= KEY_BYTES {
            Tail::Short(name.len() as u8)
        } else {
            Tail::Long(shared.cloned().unwrap_or_else(|| Arc::from(name)))
        };
        NodeId { head, tail }
    }

    /// The head as an integer: names order as their keys unless they tie.
    fn key(&self) -> u64 {
        u64::from_be_bytes(self.head)
    }

    /// The name's length in bytes.
    fn len(&self) -> usize {
        match &self.tail {
            Tail::Short(n) => usize::from(*n),
            Tail::Long(name) => name.len(),
        }
    }
}

impl NodeId {
    /// Longest accepted name, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates a node name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        NodeId::parse(&name).ok_or(Error::InvalidNodeId { name })
    }

    /// Validates a borrowed node name (at most one allocation, none for
    /// the error).
    pub(crate) fn parse(name: &str) -> Option<Self> {
        let ok = !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        ok.then(|| NodeId::from_str_unchecked(name, None))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        match &self.tail {
            // A whole string's bytes: always UTF-8.
            Tail::Short(n) => {
                std::str::from_utf8(&self.head[..usize::from(*n)]).unwrap_or_default()
            }
            Tail::Long(name) => name,
        }
    }

    /// The 128-bit HLC id of this node: FNV-1a of the name, never zero.
    pub fn hlc_id(&self) -> u128 {
        const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
        const PRIME: u128 = 0x0000000001000000000000000000013B;
        let mut h = OFFSET;
        for b in self.as_str().bytes() {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
        if h == 0 { 1 } else { h }
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NodeId").field(&self.as_str()).finish()
    }
}

impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        // Equal heads and lengths up to KEY_BYTES mean equal names.
        self.head == other.head
            && match (&self.tail, &other.tail) {
                (Tail::Short(a), Tail::Short(b)) => a == b,
                (Tail::Long(a), Tail::Long(b)) => Arc::ptr_eq(a, b) || **a == **b,
                _ => false,
            }
    }
}

impl Eq for NodeId {}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> Ordering {
        // Different keys: the first differing byte is within the key (a
        // shorter name reads as zero-padded, and a zero byte is the least).
        self.key()
            .cmp(&other.key())
            .then_with(|| match (&self.tail, &other.tail) {
                // Same bytes as far as the shorter goes: it is a prefix.
                (Tail::Short(_), _) | (_, Tail::Short(_)) => self.len().cmp(&other.len()),
                (Tail::Long(a), Tail::Long(b)) if Arc::ptr_eq(a, b) => Ordering::Equal,
                (Tail::Long(a), Tail::Long(b)) => a.cmp(b),
            })
    }
}

impl Hash for NodeId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_newtype_struct("NodeId", self.as_str())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "NodeId")]
        struct Name(String);
        let Name(name) = Name::deserialize(deserializer)?;
        Ok(NodeId::from_str_unchecked(&name, None))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The id of an op: its origin node and a sequence number that is gap-free
/// per origin, starting at 1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId {
    /// The node that captured the change.
    pub origin: NodeId,
    /// Position in the origin's log (1, 2, 3, ...).
    pub seq: u64,
}

impl OpId {
    /// Makes an op id.
    pub fn new(origin: NodeId, seq: u64) -> Self {
        OpId { origin, seq }
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.origin, self.seq)
    }
}

/// Upsert or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    /// Insert or update of the named fields.
    Upsert,
    /// Delete of the row.
    Delete,
}

/// One field written by an op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldWrite {
    /// Column name.
    pub name: String,
    /// The new value.
    pub value: Value,
    /// The writes of this field the origin saw, which this write supersedes.
    pub pred: Vec<OpId>,
    /// For `sum` (counter) fields, on every write: new minus old as the
    /// origin saw it (an insert's delta is its value), as `Int`, `Float` or
    /// `Decimal`. A write with a delta is a counted write: its delta counts
    /// until a `row_pred` supersedes it, whatever later writes' `pred` say.
    /// `None` for every other field.
    pub delta: Option<Value>,
}

impl FieldWrite {
    /// A write with no predecessors and no delta.
    pub fn new(name: impl Into<String>, value: Value) -> Self {
        FieldWrite {
            name: name.into(),
            value,
            pred: Vec::new(),
            delta: None,
        }
    }
}

/// One captured change to one row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// `(origin, seq)`.
    pub id: OpId,
    /// When the origin captured it.
    pub hlc: Hlc,
    /// Table name.
    pub table: String,
    /// Primary-key values in key-column order.
    pub key: Vec<Value>,
    /// Upsert or delete.
    pub kind: OpKind,
    /// Fields written (upserts only).
    pub fields: Vec<FieldWrite>,
    /// Row-wide predecessors. Each id `(O, s)` supersedes every write,
    /// counter contribution and tombstone of this row from origin `O` with
    /// `seq <= s` (ops arrive gap-free per origin, so the origin had seen
    /// them all). Delete: [`RowState::delete_pred`](crate::RowState::delete_pred).
    /// Update: the live tombstones it supersedes. Insert (the row was absent
    /// at the origin): [`RowState::insert_pred`](crate::RowState::insert_pred).
    pub row_pred: Vec<OpId>,
}

impl Op {
    /// An upsert with no row predecessors.
    pub fn upsert(
        id: OpId,
        hlc: Hlc,
        table: impl Into<String>,
        key: Vec<Value>,
        fields: Vec<FieldWrite>,
    ) -> Self {
        Op {
            id,
            hlc,
            table: table.into(),
            key,
            kind: OpKind::Upsert,
            fields,
            row_pred: Vec::new(),
        }
    }

    /// A delete superseding `row_pred`.
    pub fn delete(
        id: OpId,
        hlc: Hlc,
        table: impl Into<String>,
        key: Vec<Value>,
        row_pred: Vec<OpId>,
    ) -> Self {
        Op {
            id,
            hlc,
            table: table.into(),
            key,
            kind: OpKind::Delete,
            fields: Vec::new(),
            row_pred,
        }
    }
}

/// Per origin, the highest sequence number held with no gap below it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<NodeId, u64>);

impl VersionVector {
    /// The highest contiguous seq held for `origin` (0 = none).
    pub fn get(&self, origin: &NodeId) -> u64 {
        self.0.get(origin).copied().unwrap_or(0)
    }

    /// Sets the entry for `origin`.
    pub fn set(&mut self, origin: NodeId, seq: u64) {
        self.0.insert(origin, seq);
    }

    /// Raises the entry for `origin` to at least `seq`.
    pub fn advance(&mut self, origin: &NodeId, seq: u64) {
        let e = self.0.entry(origin.clone()).or_insert(0);
        *e = (*e).max(seq);
    }

    /// True when this vector holds everything `other` holds.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(k, v)| self.get(k) >= *v)
    }

    /// Total number of ops covered.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn short_node_ids_are_inline_and_long_ones_shared() {
        assert_eq!(std::mem::size_of::<NodeId>(), 24);
        let short = NodeId::new("edge-a").unwrap();
        assert!(matches!(short.tail, Tail::Short(6)));
        let long = NodeId::new("edge-eu-west-1").unwrap();
        let copy = long.clone();
        assert!(
            matches!((&long.tail, &copy.tail), (Tail::Long(a), Tail::Long(b)) if Arc::ptr_eq(a, b))
        );
        assert_eq!(copy.as_str(), "edge-eu-west-1");
        assert_eq!(short.as_str(), "edge-a");
        let back: NodeId = postcard::from_bytes(&postcard::to_allocvec(&long).unwrap()).unwrap();
        assert_eq!(back, long);
        assert_eq!(back.cmp(&long), Ordering::Equal);
    }

    #[test]
    fn node_ids_order_and_compare_as_their_names() {
        let names = [
            "",
            "\0",
            "a",
            "a\0",
            "a\0\0",
            "ab",
            "b",
            "edge-a",
            "edge-b",
            "edge-aa",
            "12345678",
            "12345678\0",
            "123456789",
            "12345678a",
            "12345678b",
            "123456789-long",
            "zzzzzzzzzzzzzzzz",
            "A",
            "_",
            "-",
            ".",
        ];
        let ids: Vec<NodeId> = names
            .iter()
            .map(|n| NodeId::from_arc(Arc::from(*n)))
            .collect();
        for (a, x) in names.iter().zip(&ids) {
            for (b, y) in names.iter().zip(&ids) {
                assert_eq!(x.cmp(y), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(x == y, a == b, "{a:?} vs {b:?}");
            }
            // A separate allocation of the same name is the same id.
            assert_eq!(*x, NodeId::from_arc(Arc::from(*a)));
        }
        let id = NodeId::new("edge-a").unwrap();
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bytes, postcard::to_allocvec("edge-a").unwrap());
        assert_eq!(postcard::from_bytes::<NodeId>(&bytes).unwrap(), id);
        assert_eq!(format!("{id:?}"), "NodeId(\"edge-a\")");
    }
}
