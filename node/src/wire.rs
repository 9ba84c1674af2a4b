//! Conversion between resolver types and protocol v1 messages.
//!
//! Decoding never trusts the peer: every name, list and id is checked
//! against the limits in [`syncmesh_proto`] and turned into an
//! [`Error::Protocol`] naming the offending op, never a panic.

use std::collections::BTreeMap;

use syncmesh_proto::v1 as pb;
use syncmesh_proto::{
    MAX_FIELDS_PER_OP, MAX_KEY_VALUES, MAX_NAME_BYTES, MAX_PRED_IDS, MAX_VV_ENTRIES,
};
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Op, OpId, OpKind, Value, VersionVector};

use crate::{Error, Result};

fn bad(what: impl Into<String>) -> Error {
    Error::Protocol(what.into())
}

/// Encodes a value.
pub fn value_to_proto(v: &Value) -> pb::Value {
    use pb::value::Kind;
    let kind = match v {
        Value::Null => Kind::Null(true),
        Value::Bool(b) => Kind::Boolean(*b),
        Value::Int(i) => Kind::Int(*i),
        Value::Float(f) => Kind::Float(*f),
        Value::Decimal(d) => Kind::Decimal(d.clone()),
        Value::Text(t) => Kind::Text(t.clone()),
        Value::Bytes(b) => Kind::Bytes(b.clone()),
        Value::Json(j) => Kind::Json(j.clone()),
        Value::Timestamp(t) => Kind::TimestampMicros(*t),
    };
    pb::Value { kind: Some(kind) }
}

/// Decodes a value (a missing kind is an error, not a silent NULL).
pub fn value_from_proto(v: pb::Value) -> Result<Value> {
    use pb::value::Kind;
    Ok(match v.kind.ok_or_else(|| bad("value without a kind"))? {
        Kind::Null(_) => Value::Null,
        Kind::Boolean(b) => Value::Bool(b),
        Kind::Int(i) => Value::Int(i),
        Kind::Float(f) => Value::Float(f),
        Kind::Decimal(d) => Value::Decimal(d),
        Kind::Text(t) => Value::Text(t),
        Kind::Bytes(b) => Value::Bytes(b),
        Kind::Json(j) => Value::Json(j),
        Kind::TimestampMicros(t) => Value::Timestamp(t),
    })
}

fn op_id_to_proto(id: &OpId) -> pb::OpId {
    pb::OpId {
        origin: id.origin.as_str().to_owned(),
        seq: id.seq,
    }
}

fn op_id_from_proto(id: pb::OpId) -> Result<OpId> {
    let origin = NodeId::new(id.origin).map_err(|e| bad(e.to_string()))?;
    if id.seq == 0 {
        return Err(bad(format!(
            "op id {origin}#0: sequence numbers start at 1"
        )));
    }
    Ok(OpId::new(origin, id.seq))
}

fn ids_from_proto(ids: Vec<pb::OpId>, at: &OpId) -> Result<Vec<OpId>> {
    if ids.len() > MAX_PRED_IDS {
        return Err(bad(format!(
            "op {at}: {} predecessor ids exceed the limit of {MAX_PRED_IDS}",
            ids.len()
        )));
    }
    ids.into_iter().map(op_id_from_proto).collect()
}

fn check_name(kind: &str, name: &str, at: &OpId) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains('\0') {
        return Err(bad(format!(
            "op {at}: {kind} name of {} bytes is empty, longer than {MAX_NAME_BYTES} bytes or contains NUL",
            name.len()
        )));
    }
    Ok(())
}

/// Encodes an op.
pub fn op_to_proto(op: &Op) -> pb::Op {
    pb::Op {
        id: Some(op_id_to_proto(&op.id)),
        hlc: Some(pb::Hlc {
            time: op.hlc.time,
            id: op.hlc.id_bytes(),
        }),
        table: op.table.clone(),
        key: op.key.iter().map(value_to_proto).collect(),
        kind: match op.kind {
            OpKind::Upsert => pb::OpKind::Upsert as i32,
            OpKind::Delete => pb::OpKind::Delete as i32,
        },
        fields: op
            .fields
            .iter()
            .map(|f| pb::FieldWrite {
                name: f.name.clone(),
                value: Some(value_to_proto(&f.value)),
                pred: f.pred.iter().map(op_id_to_proto).collect(),
                delta: f.delta.as_ref().map(value_to_proto),
            })
            .collect(),
        row_pred: op.row_pred.iter().map(op_id_to_proto).collect(),
    }
}

/// Decodes and validates an op from a peer.
pub fn op_from_proto(op: pb::Op) -> Result<Op> {
    let id = op_id_from_proto(op.id.ok_or_else(|| bad("op without an id"))?)?;
    let hlc = op.hlc.ok_or_else(|| bad(format!("op {id}: missing HLC")))?;
    let hlc_id = Hlc::id_from_bytes(&hlc.id)
        .ok_or_else(|| bad(format!("op {id}: HLC id must be 1-16 bytes and not zero")))?;
    if hlc_id != id.origin.hlc_id() {
        return Err(bad(format!(
            "op {id}: HLC id does not belong to origin {}",
            id.origin
        )));
    }
    check_name("table", &op.table, &id)?;
    if op.key.is_empty() || op.key.len() > MAX_KEY_VALUES {
        return Err(bad(format!(
            "op {id}: key has {} values; 1 to {MAX_KEY_VALUES} are allowed",
            op.key.len()
        )));
    }
    if op.fields.len() > MAX_FIELDS_PER_OP {
        return Err(bad(format!(
            "op {id}: {} fields exceed the limit of {MAX_FIELDS_PER_OP}",
            op.fields.len()
        )));
    }
    let kind = match pb::OpKind::try_from(op.kind) {
        Ok(pb::OpKind::Upsert) => OpKind::Upsert,
        Ok(pb::OpKind::Delete) => OpKind::Delete,
        _ => return Err(bad(format!("op {id}: unknown op kind {}", op.kind))),
    };
    let key = op
        .key
        .into_iter()
        .map(value_from_proto)
        .collect::<Result<Vec<_>>>()?;
    let mut fields = Vec::with_capacity(op.fields.len());
    for f in op.fields {
        check_name("field", &f.name, &id)?;
        let value = value_from_proto(
            f.value
                .ok_or_else(|| bad(format!("op {id}: field {} has no value", f.name)))?,
        )?;
        let delta = f.delta.map(value_from_proto).transpose()?;
        if let Some(d) = &delta
            && !matches!(d, Value::Int(_) | Value::Float(_) | Value::Decimal(_))
        {
            return Err(bad(format!(
                "op {id}: field {} has a {} delta; counter deltas are int, float or decimal",
                f.name,
                d.kind_name()
            )));
        }
        fields.push(FieldWrite {
            pred: ids_from_proto(f.pred, &id)?,
            delta,
            name: f.name,
            value,
        });
    }
    if kind == OpKind::Delete && !fields.is_empty() {
        return Err(bad(format!("op {id}: a delete carries no fields")));
    }
    Ok(Op {
        row_pred: ids_from_proto(op.row_pred, &id)?,
        hlc: Hlc {
            time: hlc.time,
            id: hlc_id,
        },
        id,
        table: op.table,
        key,
        kind,
        fields,
    })
}

/// Encodes a version vector.
pub fn vv_to_proto(vv: &VersionVector) -> pb::VersionVector {
    pb::VersionVector {
        entries: vv
            .0
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), *v))
            .collect(),
    }
}

/// Decodes a version vector (an absent one is empty).
pub fn vv_from_proto(vv: Option<pb::VersionVector>) -> Result<VersionVector> {
    let mut out = BTreeMap::new();
    for (k, v) in vv.map(|v| v.entries).unwrap_or_default() {
        out.insert(NodeId::new(k).map_err(|e| bad(e.to_string()))?, v);
    }
    Ok(VersionVector(out))
}

/// A stable cut for tombstone garbage collection (see
/// [`syncmesh_resolver::RowState::collect_garbage`]): a replica may collect
/// at `stable` once its version vector dominates `horizon`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StableCut {
    /// Ops covered by it are seen by every node taking part in the cut.
    pub stable: VersionVector,
    /// The hub's version vector when it adopted the cut.
    pub horizon: VersionVector,
}

impl StableCut {
    /// Whether the cut covers nothing (no collection possible).
    pub fn is_empty(&self) -> bool {
        self.stable.0.values().all(|s| *s == 0)
    }
}

fn bounded_vv(what: &str, vv: Option<pb::VersionVector>) -> Result<VersionVector> {
    let n = vv.as_ref().map_or(0, |v| v.entries.len());
    if n > MAX_VV_ENTRIES {
        return Err(bad(format!(
            "{what}: {n} version-vector entries exceed the limit of {MAX_VV_ENTRIES}"
        )));
    }
    vv_from_proto(vv).map_err(|e| bad(format!("{what}: {e}")))
}

/// Encodes a stable cut.
pub fn cut_to_proto(cut: &StableCut) -> pb::StableCut {
    pb::StableCut {
        stable: Some(vv_to_proto(&cut.stable)),
        horizon: Some(vv_to_proto(&cut.horizon)),
    }
}

/// Decodes a stable cut: bounded vectors, and `horizon` must dominate
/// `stable` (a cut covering ops its own horizon lacks is malformed).
pub fn cut_from_proto(cut: pb::StableCut) -> Result<StableCut> {
    let stable = bounded_vv("stable cut", cut.stable)?;
    let horizon = bounded_vv("stable cut horizon", cut.horizon)?;
    if !horizon.dominates(&stable) {
        return Err(bad(
            "stable cut: its stable vector is not covered by its horizon; the hub is faulty or \
             from another build: upgrade it"
                .to_owned(),
        ));
    }
    Ok(StableCut { stable, horizon })
}

/// Decodes a seen report (bounded).
pub fn seen_from_proto(seen: Option<pb::VersionVector>) -> Result<VersionVector> {
    bounded_vv("seen report", seen)
}

/// Longest row-key resume point accepted in a snapshot message (bytes).
pub const MAX_SNAPSHOT_KEY_BYTES: usize = 64 * 1024;

/// Where a node is in a re-snapshot (see `SnapshotChunk` in the proto).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotProgress {
    /// The snapshot's id.
    pub id: u64,
    /// The cut the hub had collected at when it began.
    pub cut: StableCut,
    /// The hub's version vector when it began.
    pub vv: VersionVector,
    /// The row key (`table\0key`) of the last row flushed here.
    pub after_key: Vec<u8>,
    /// Every chunk arrived and was installed.
    pub installed: bool,
}

/// Encodes re-snapshot progress.
pub fn snapshot_progress_to_proto(p: &SnapshotProgress) -> pb::SnapshotProgress {
    pb::SnapshotProgress {
        id: p.id,
        cut: Some(cut_to_proto(&p.cut)),
        version_vector: Some(vv_to_proto(&p.vv)),
        after_key: p.after_key.clone(),
        installed: p.installed,
    }
}

/// Decodes re-snapshot progress from a node (bounded).
pub fn snapshot_progress_from_proto(p: pb::SnapshotProgress) -> Result<SnapshotProgress> {
    if p.after_key.len() > MAX_SNAPSHOT_KEY_BYTES {
        return Err(bad(format!(
            "snapshot progress: resume key of {} bytes exceeds the limit of {MAX_SNAPSHOT_KEY_BYTES}",
            p.after_key.len()
        )));
    }
    Ok(SnapshotProgress {
        id: p.id,
        cut: cut_from_proto(p.cut.unwrap_or_default())?,
        vv: bounded_vv("snapshot progress", p.version_vector)?,
        after_key: p.after_key,
        installed: p.installed,
    })
}

/// One decoded re-snapshot chunk.
#[derive(Clone, Debug)]
pub struct SnapshotChunk {
    /// Progress after this chunk (`installed` false).
    pub progress: SnapshotProgress,
    /// Tables the snapshot covers.
    pub tables: Vec<String>,
    /// Rows: table, key values, the hub's row state.
    pub rows: Vec<(String, Vec<Value>, syncmesh_resolver::RowState)>,
    /// No row follows.
    pub last: bool,
}

/// Decodes and validates a re-snapshot chunk from the hub.
pub fn snapshot_chunk_from_proto(c: pb::SnapshotChunk) -> Result<SnapshotChunk> {
    use syncmesh_proto::{MAX_SNAPSHOT_ROWS, SNAPSHOT_STATE_FORMAT};
    if c.state_format != SNAPSHOT_STATE_FORMAT {
        return Err(bad(format!(
            "snapshot chunk: row-state format {} is not known to this node (it reads {SNAPSHOT_STATE_FORMAT}): upgrade the node",
            c.state_format
        )));
    }
    if c.rows.len() > MAX_SNAPSHOT_ROWS || c.tables.len() > MAX_VV_ENTRIES {
        return Err(bad(format!(
            "snapshot chunk: {} rows and {} tables exceed the limits of {MAX_SNAPSHOT_ROWS} and {MAX_VV_ENTRIES}",
            c.rows.len(),
            c.tables.len()
        )));
    }
    if c.after_key.len() > MAX_SNAPSHOT_KEY_BYTES {
        return Err(bad(format!(
            "snapshot chunk: resume key of {} bytes exceeds the limit of {MAX_SNAPSHOT_KEY_BYTES}",
            c.after_key.len()
        )));
    }
    let name_ok = |n: &str| !n.is_empty() && n.len() <= MAX_NAME_BYTES && !n.contains('\0');
    if let Some(t) = c.tables.iter().find(|t| !name_ok(t)) {
        return Err(bad(format!(
            "snapshot chunk: table name of {} bytes is empty, too long or contains NUL",
            t.len()
        )));
    }
    let mut rows = Vec::with_capacity(c.rows.len());
    for r in c.rows {
        if !name_ok(&r.table) || !c.tables.contains(&r.table) {
            return Err(bad(format!(
                "snapshot chunk: a row of table {:?}, which the snapshot does not list or is not a valid name",
                r.table.chars().take(64).collect::<String>()
            )));
        }
        if r.key.is_empty() || r.key.len() > MAX_KEY_VALUES {
            return Err(bad(format!(
                "snapshot chunk: a row of table {} has {} key values; 1 to {MAX_KEY_VALUES} are allowed",
                r.table,
                r.key.len()
            )));
        }
        let key = r
            .key
            .into_iter()
            .map(value_from_proto)
            .collect::<Result<Vec<_>>>()?;
        let state = postcard::from_bytes(&r.state).map_err(|e| {
            bad(format!(
                "snapshot chunk: undecodable row state of table {}: {e}",
                r.table
            ))
        })?;
        rows.push((r.table, key, state));
    }
    Ok(SnapshotChunk {
        progress: SnapshotProgress {
            id: c.id,
            cut: cut_from_proto(c.cut.unwrap_or_default())?,
            vv: bounded_vv("snapshot version vector", c.version_vector)?,
            after_key: c.after_key,
            installed: false,
        },
        tables: c.tables,
        rows,
        last: c.last,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use syncmesh_resolver::{HlcClock, Ntp64};

    fn sample() -> Op {
        let a = NodeId::new("edge-a").unwrap();
        let hlc = HlcClock::new(&a, 500).tick(Ntp64::from_unix_millis(5));
        let mut op = Op::upsert(
            OpId::new(a.clone(), 3),
            hlc,
            "orders",
            vec![Value::Int(1), Value::Text("k".into())],
            vec![FieldWrite {
                name: "qty".into(),
                value: Value::Float(0.1),
                pred: vec![OpId::new(a.clone(), 2)],
                delta: Some(Value::Int(4)),
            }],
        );
        op.row_pred = vec![OpId::new(a, 1)];
        op
    }

    #[test]
    fn op_round_trips() {
        let op = sample();
        assert_eq!(op_from_proto(op_to_proto(&op)).unwrap(), op);
    }

    #[test]
    fn hostile_ops_are_rejected_with_a_message() {
        let mut p = op_to_proto(&sample());
        p.kind = 77;
        assert!(
            op_from_proto(p)
                .unwrap_err()
                .to_string()
                .contains("unknown op kind 77")
        );
        let mut p = op_to_proto(&sample());
        p.hlc.as_mut().unwrap().id = vec![1, 2, 3];
        assert!(
            op_from_proto(p)
                .unwrap_err()
                .to_string()
                .contains("does not belong")
        );
        let mut p = op_to_proto(&sample());
        p.table = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(op_from_proto(p).is_err());
        let mut p = op_to_proto(&sample());
        p.fields[0].pred = vec![
            pb::OpId {
                origin: "a".into(),
                seq: 1
            };
            MAX_PRED_IDS + 1
        ];
        assert!(op_from_proto(p).unwrap_err().to_string().contains("limit"));
        let mut p = op_to_proto(&sample());
        p.key.clear();
        assert!(op_from_proto(p).is_err());
        let mut p = op_to_proto(&sample());
        p.fields[0].value = None;
        assert!(
            op_from_proto(p)
                .unwrap_err()
                .to_string()
                .contains("has no value")
        );
    }

    #[test]
    fn stable_cuts_round_trip_and_bad_ones_are_refused() {
        let a = NodeId::new("edge-a").unwrap();
        let mut cut = StableCut::default();
        assert!(cut.is_empty());
        cut.stable.set(a.clone(), 3);
        cut.horizon.set(a.clone(), 5);
        assert!(!cut.is_empty());
        assert_eq!(cut_from_proto(cut_to_proto(&cut)).unwrap(), cut);
        // A cut covering more than its horizon is malformed.
        let mut bad_cut = cut.clone();
        bad_cut.horizon.set(a, 2);
        let e = cut_from_proto(cut_to_proto(&bad_cut)).unwrap_err();
        assert!(e.to_string().contains("horizon"), "{e}");
        // Too many origins.
        let entries = (0..=MAX_VV_ENTRIES).map(|i| (format!("n{i}"), 1)).collect();
        let e = seen_from_proto(Some(pb::VersionVector { entries })).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        let e = seen_from_proto(Some(pb::VersionVector {
            entries: [(String::new(), 1)].into_iter().collect(),
        }))
        .unwrap_err();
        assert!(e.to_string().contains("seen report"), "{e}");
    }
}
