//! The stored form of a [`RowState`]: a compact binary encoding written by
//! hand (no serde data model in between), used by its `Serialize` and
//! `Deserialize` impls as one byte string, so `postcard::to_allocvec(&row)`
//! in the node and hub cores stores exactly these bytes (behind a length).
//!
//! Layout (integers are LEB128 varints, signed ones zigzag first):
//!
//! ```text
//! version 1 (one byte)
//! origins   n, then n names (len, bytes), strictly increasing
//! fields    n, then per field (strictly increasing names):
//!             name, live n × (id, hlc, value), counters n × (id, value),
//!             gone n × (id, killers, 0 | 1 hlc value killers),
//!             pred_sets n × (k, k × id)
//! tombstones n × (id, hlc)
//! row_dead  n × (id, killers)
//! id      = origin index, seq        killers = n × (origin index, seq)
//! hlc     = time, id length (0-16), id bytes little endian
//! value   = tag (0 null .. 8 timestamp), payload
//! ```
//!
//! Decoding checks everything the merge relies on (indices in range,
//! every container sorted and canonical, valid node names, UTF-8 text), so
//! garbage gives [`Error::CorruptRowState`], never a panic or a state that
//! breaks the merge's invariants. Older formats are not read (pre-1.0).

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;
use std::fmt;

use crate::ids::{IdMap, Killers, Lid};
use crate::row::{Dead, FieldState, Gone, Live};
use crate::stored::{Bytes, Stored};
use crate::{Error, Hlc, NodeId, OpId, Result, RowState, Value};

/// The format version written first.
pub(crate) const VERSION: u8 = 1;

struct Writer(Vec<u8>);

impl Writer {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }
    fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn len(&mut self, n: usize) {
        self.uint(n as u64);
    }
    fn int(&mut self, v: i64) {
        self.uint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn id(&mut self, id: Lid) {
        self.uint(u64::from(id.o));
        self.uint(id.seq);
    }
    fn hlc(&mut self, h: &Hlc) {
        self.uint(h.time);
        let b = h.id.to_le_bytes();
        let n = 16 - (h.id.leading_zeros() / 8) as usize;
        self.byte(n as u8);
        self.0.extend_from_slice(&b[..n]);
    }
    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.byte(0),
            Value::Bool(b) => {
                self.byte(1);
                self.byte(u8::from(*b));
            }
            Value::Int(i) => {
                self.byte(2);
                self.int(*i);
            }
            Value::Float(x) => {
                self.byte(3);
                self.0.extend_from_slice(&x.to_bits().to_le_bytes());
            }
            Value::Decimal(s) => {
                self.byte(4);
                self.bytes(s.as_bytes());
            }
            Value::Text(s) => {
                self.byte(5);
                self.bytes(s.as_bytes());
            }
            Value::Bytes(b) => {
                self.byte(6);
                self.bytes(b);
            }
            Value::Json(s) => {
                self.byte(7);
                self.bytes(s.as_bytes());
            }
            Value::Timestamp(t) => {
                self.byte(8);
                self.int(*t);
            }
        }
    }
    fn stored(&mut self, v: &Stored) {
        match v {
            Stored::Null => self.byte(0),
            Stored::Bool(b) => {
                self.byte(1);
                self.byte(u8::from(*b));
            }
            Stored::Int(i) => {
                self.byte(2);
                self.int(*i);
            }
            Stored::Float(x) => {
                self.byte(3);
                self.0.extend_from_slice(&x.to_le_bytes());
            }
            Stored::Decimal(s) => {
                self.byte(4);
                self.bytes(s.as_slice());
            }
            Stored::Text(s) => {
                self.byte(5);
                self.bytes(s.as_slice());
            }
            Stored::Bytes(b) => {
                self.byte(6);
                self.bytes(b.as_slice());
            }
            Stored::Json(s) => {
                self.byte(7);
                self.bytes(s.as_slice());
            }
            Stored::Timestamp(t) => {
                self.byte(8);
                self.int(*t);
            }
        }
    }
    fn killers(&mut self, k: &Killers) {
        self.len(k.len());
        k.for_each(|o, s| {
            self.uint(u64::from(o));
            self.uint(s);
        });
    }
    fn map<V>(&mut self, m: &IdMap<V>, mut f: impl FnMut(&mut Self, &V)) {
        self.len(m.len());
        m.for_each(|id, v| {
            self.id(id);
            f(self, v);
        });
    }
}

impl RowState {
    /// The stored form (format in `resolver/src/codec.rs`): equal states
    /// give equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        let guess: usize = self
            .fields
            .iter()
            .map(|f| 40 + 40 * f.gone.len() + 8 * f.counters.len())
            .sum();
        let mut w = Writer(Vec::with_capacity(64 + guess));
        w.byte(VERSION);
        w.len(self.origins.len());
        for o in &self.origins {
            w.bytes(o.as_str().as_bytes());
        }
        w.len(self.fields.len());
        for f in &self.fields {
            w.bytes(f.name.as_slice());
            w.len(f.live.len());
            for l in &f.live {
                w.id(l.id);
                w.hlc(&l.hlc.get());
                w.stored(&l.value);
            }
            w.map(&f.counters, |w, v| w.value(v));
            w.map(&f.gone, |w, g| {
                w.killers(&g.pred_by);
                match &g.dead {
                    None => w.byte(0),
                    Some(d) => {
                        w.byte(1);
                        w.hlc(&d.hlc.get());
                        w.stored(&d.value);
                        w.killers(&d.by);
                    }
                }
            });
            w.len(f.pred_sets.len());
            for set in &f.pred_sets {
                w.len(set.len());
                for id in set {
                    w.id(*id);
                }
            }
        }
        w.len(self.tombstones.len());
        for (id, h) in &self.tombstones {
            w.id(*id);
            w.hlc(h);
        }
        w.map(&self.row_dead, |w, k| w.killers(k));
        w.0
    }

    /// Reads the stored form written by [`RowState::encode`]; anything else
    /// (another version, truncated or corrupt bytes) is an error.
    pub fn decode(bytes: &[u8]) -> Result<RowState> {
        let mut r = Reader { b: bytes, pos: 0 };
        let state = r.row().map_err(|what| Error::CorruptRowState {
            message: format!("{what} at byte {}", r.pos),
        })?;
        Ok(state)
    }
}

type R<T> = std::result::Result<T, &'static str>;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

fn strictly_increasing<T: Ord>(items: &[T]) -> bool {
    items.windows(2).all(|w| w[0] < w[1])
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> R<u8> {
        let b = *self.b.get(self.pos).ok_or("unexpected end")?;
        self.pos += 1;
        Ok(b)
    }
    fn uint(&mut self) -> R<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if shift == 63 && b > 1 {
                    return Err("varint overflow");
                }
                if shift > 0 && b == 0 {
                    return Err("varint not in shortest form");
                }
                return Ok(v);
            }
        }
        Err("varint too long")
    }
    /// A count of items that take at least one byte each.
    fn len(&mut self) -> R<usize> {
        let n = self.uint()?;
        if n > (self.b.len() - self.pos) as u64 {
            return Err("length beyond the end");
        }
        Ok(n as usize)
    }
    fn int(&mut self) -> R<i64> {
        let v = self.uint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }
    fn raw(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or("length overflow")?;
        let s = self.b.get(self.pos..end).ok_or("unexpected end")?;
        self.pos = end;
        Ok(s)
    }
    fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.len()?;
        self.raw(n)
    }
    fn id(&mut self, origins: usize) -> R<Lid> {
        let o = self.uint()?;
        if o >= origins as u64 {
            return Err("origin index out of range");
        }
        Ok(Lid::new(o as u32, self.uint()?))
    }
    fn hlc(&mut self) -> R<Hlc> {
        let time = self.uint()?;
        let n = self.byte()? as usize;
        if n > 16 {
            return Err("HLC id longer than 16 bytes");
        }
        let mut b = [0u8; 16];
        b[..n].copy_from_slice(self.raw(n)?);
        if n > 0 && b[n - 1] == 0 {
            return Err("HLC id not in shortest form");
        }
        Ok(Hlc {
            time,
            id: u128::from_le_bytes(b),
        })
    }
    /// Checked UTF-8, stored.
    fn utf8(&mut self) -> R<Bytes> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map_err(|_| "text is not UTF-8")?;
        Ok(Bytes::new(b))
    }
    fn stored(&mut self) -> R<Stored> {
        Ok(match self.byte()? {
            0 => Stored::Null,
            1 => match self.byte()? {
                0 => Stored::Bool(false),
                1 => Stored::Bool(true),
                _ => return Err("bad bool"),
            },
            2 => Stored::Int(self.int()?),
            3 => {
                let b: [u8; 8] = self.raw(8)?.try_into().map_err(|_| "unexpected end")?;
                Stored::Float(u64::from_le_bytes(b))
            }
            4 => Stored::Decimal(self.utf8()?),
            5 => Stored::Text(self.utf8()?),
            6 => Stored::Bytes(Bytes::new(self.bytes()?)),
            7 => Stored::Json(self.utf8()?),
            8 => Stored::Timestamp(self.int()?),
            _ => return Err("unknown value tag"),
        })
    }
    fn value(&mut self) -> R<Value> {
        Ok(self.stored()?.to_value())
    }
    fn killers(&mut self, origins: usize) -> R<Killers> {
        let n = self.len()?;
        let mut k = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.id(origins)?;
            k.push((id.o, id.seq));
        }
        if !k.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err("killers not sorted by origin");
        }
        Ok(Killers::from_sorted(k))
    }
    fn map<V>(&mut self, origins: usize, mut f: impl FnMut(&mut Self) -> R<V>) -> R<IdMap<V>> {
        let n = self.len()?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.id(origins)?;
            entries.push((id, f(self)?));
        }
        if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err("ids not sorted");
        }
        Ok(IdMap::from_sorted(entries))
    }
    fn row(&mut self) -> R<RowState> {
        match self.byte() {
            Ok(VERSION) => {}
            Ok(_) => return Err("unknown row-state format version"),
            Err(e) => return Err(e),
        }
        let n = self.len()?;
        let mut origins = Vec::with_capacity(n);
        for _ in 0..n {
            let name = std::str::from_utf8(self.bytes()?).map_err(|_| "node name not UTF-8")?;
            origins.push(NodeId::parse(name).ok_or("invalid node name")?);
        }
        if !strictly_increasing(&origins) {
            return Err("origins not sorted");
        }
        let no = origins.len();
        let n = self.len()?;
        let mut fields: Vec<FieldState> = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.utf8()?;
            let nl = self.len()?;
            let mut live = SmallVec::with_capacity(nl);
            for _ in 0..nl {
                let id = self.id(no)?;
                let hlc = self.hlc()?;
                let value = self.stored()?;
                live.push(Live {
                    id,
                    op: OpId::new(origins[id.o as usize].clone(), id.seq),
                    hlc: hlc.into(),
                    value,
                });
            }
            if !live.windows(2).all(|w: &[Live]| w[0].id < w[1].id) {
                return Err("live writes not sorted");
            }
            let counters = self.map(no, |r| r.value())?;
            let gone = self.map(no, |r| {
                let pred_by = r.killers(no)?;
                let dead = match r.byte()? {
                    0 => None,
                    1 => Some(Dead {
                        hlc: r.hlc()?.into(),
                        value: r.stored()?,
                        by: r.killers(no)?,
                    }),
                    _ => return Err("bad flag"),
                };
                if pred_by.is_empty() && dead.is_none() {
                    return Err("empty superseded entry");
                }
                Ok(Gone { pred_by, dead })
            })?;
            let ns = self.len()?;
            let mut pred_sets: Vec<Vec<Lid>> = Vec::with_capacity(ns);
            for _ in 0..ns {
                let k = self.len()?;
                let mut set = Vec::with_capacity(k);
                for _ in 0..k {
                    set.push(self.id(no)?);
                }
                if set.len() < 2 || !strictly_increasing(&set) {
                    return Err("bad candidate set");
                }
                pred_sets.push(set);
            }
            if !strictly_increasing(&pred_sets) {
                return Err("candidate sets not sorted");
            }
            let f = FieldState {
                name,
                live,
                counters,
                gone,
                pred_sets,
            };
            if f.is_empty() {
                return Err("empty field");
            }
            if let Some(prev) = fields.last()
                && prev.name >= f.name
            {
                return Err("fields not sorted");
            }
            fields.push(f);
        }
        let n = self.len()?;
        let mut tombstones = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.id(no)?;
            tombstones.push((id, self.hlc()?));
        }
        if !tombstones.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err("tombstones not sorted");
        }
        let row_dead = self.map(no, |r| {
            let k = r.killers(no)?;
            if k.is_empty() {
                return Err("empty killers");
            }
            Ok(k)
        })?;
        if self.pos != self.b.len() {
            return Err("trailing bytes");
        }
        let state = RowState {
            origins,
            fields,
            tombstones,
            row_dead,
        };
        if !state.names_every_origin() {
            return Err("unnamed origin");
        }
        Ok(state)
    }
}

impl Serialize for RowState {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.encode())
    }
}

impl<'de> Deserialize<'de> for RowState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = RowState;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an encoded row state")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> std::result::Result<RowState, E> {
                RowState::decode(v).map_err(E::custom)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<RowState, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                RowState::decode(&v).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{FieldWrite, Op, OpKind, VersionVector};

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
    }

    /// A state with every container filled: concurrent writes, a counter,
    /// history, a resolved candidate set, a tombstone and a row-wide kill.
    fn busy_state() -> RowState {
        let h = |t: u64| Hlc {
            time: t,
            id: u128::from(t) << 100 | 7,
        };
        let w = |name: &str, v: Value, pred: Vec<OpId>| FieldWrite {
            pred,
            ..FieldWrite::new(name, v)
        };
        let long = "long text ".repeat(5);
        let mut ops = vec![
            Op::upsert(
                id("edge-a", 1),
                h(1),
                "t",
                vec![],
                vec![
                    w("x", Value::Text("a".into()), vec![]),
                    w("y", Value::Bytes(vec![1, 2, 3]), vec![]),
                    FieldWrite {
                        delta: Some(Value::Int(-5)),
                        ..w("n", Value::Int(-5), vec![])
                    },
                ],
            ),
            Op::upsert(
                id("edge-b", 1),
                h(2),
                "t",
                vec![],
                vec![
                    w("x", Value::Text(long.clone()), vec![]),
                    w("z", Value::Decimal("1.50".into()), vec![]),
                    w("j", Value::Json("{}".into()), vec![]),
                ],
            ),
            Op::upsert(
                id("main", 1),
                h(3),
                "t",
                vec![],
                vec![w(
                    "x",
                    Value::Float(-0.5),
                    vec![id("edge-a", 1), id("edge-b", 1)],
                )],
            ),
            Op::delete(id("edge-c", 1), h(4), "t", vec![], vec![id("edge-a", 1)]),
            Op::upsert(
                id("edge-c", 2),
                h(5),
                "t",
                vec![],
                vec![
                    w("b", Value::Bool(true), vec![]),
                    w("ts", Value::Timestamp(-1), vec![]),
                    w("nul", Value::Null, vec![]),
                ],
            ),
        ];
        ops[4].kind = OpKind::Upsert;
        let mut r = RowState::default();
        for op in &ops {
            r.apply(op);
        }
        r
    }

    #[test]
    fn encoding_round_trips_and_serde_carries_it() {
        let r = busy_state();
        assert!(r.has_tombstone());
        let bytes = r.encode();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(RowState::decode(&bytes).unwrap(), r);
        let via_postcard: RowState =
            postcard::from_bytes(&postcard::to_allocvec(&r).unwrap()).unwrap();
        assert_eq!(via_postcard, r);
        assert_eq!(
            RowState::decode(&RowState::default().encode()).unwrap(),
            RowState::default()
        );
        let mut cut = VersionVector::default();
        cut.set(NodeId::new("edge-a").unwrap(), 1);
        let mut gc = r.clone();
        gc.collect_garbage(&cut);
        assert_eq!(RowState::decode(&gc.encode()).unwrap(), gc);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let bytes = busy_state().encode();
        // Another version.
        let mut other = bytes.clone();
        other[0] = VERSION + 1;
        assert!(RowState::decode(&other).is_err());
        assert!(RowState::decode(&[]).is_err());
        // Every truncation and every trailing byte.
        for n in 0..bytes.len() {
            assert!(RowState::decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(RowState::decode(&longer).is_err());
        // Every single-byte change: an error or a state that encodes back
        // to exactly those bytes (the decoder only accepts canonical input).
        for i in 0..bytes.len() {
            for v in [
                0u8,
                1,
                2,
                0x7f,
                0x80,
                0xff,
                bytes[i] ^ 1,
                bytes[i].wrapping_add(1),
            ] {
                let mut b = bytes.clone();
                b[i] = v;
                if let Ok(r) = RowState::decode(&b) {
                    assert_eq!(r.encode(), b, "byte {i} = {v}");
                }
            }
        }
        // Random garbage.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for len in 0..2000usize {
            let b: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut b = b;
            if len % 2 == 0 && !b.is_empty() {
                b[0] = VERSION;
            }
            let _ = RowState::decode(&b);
        }
    }
}
