//! Counters the hub core keeps for `/metrics` and the status dashboard.
//! Pure data: the core counts, the shell ([`crate::server`]) publishes.

use std::collections::BTreeMap;

use syncmesh_resolver::{NodeId, VersionVector};

/// `(table, label)`: label is the operation, error type or strategy.
pub type TableLabel = (String, String);

/// An op batch became durable somewhere: the oldest capture HLC in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableSample {
    /// The ops' table.
    pub table: String,
    /// Where they are durable now: the hub's own name, or a node that
    /// acknowledged them.
    pub node: String,
    /// NTP64 time of the oldest HLC among them.
    pub oldest_hlc_time: u64,
}

/// Cumulative counters since the hub started.
#[derive(Clone, Debug, Default)]
pub struct HubMetrics {
    /// Ops made durable at the hub, by (table, operation: upsert | delete).
    pub records_synced: BTreeMap<TableLabel, u64>,
    /// Rejected input, by (table, error code); table is empty when the
    /// error is not about one op.
    pub errors: BTreeMap<TableLabel, u64>,
    /// New conflict records, by (table, resolution strategy).
    pub conflicts: BTreeMap<TableLabel, u64>,
    /// Per table, the highest seq per origin of an op of that table: a node
    /// whose acknowledged version vector is below it lacks some of the table.
    pub table_heads: BTreeMap<String, VersionVector>,
    /// The database engine each node reported in its hello.
    pub engines: BTreeMap<NodeId, String>,
    /// Durable batches not yet taken by the shell: (table, node) → oldest HLC.
    durable: BTreeMap<(String, String), u64>,
    /// The table of the op being checked (for error labels).
    pub(crate) current_table: String,
}

impl HubMetrics {
    /// Counts one rejected message under the current table.
    pub(crate) fn error(&mut self, code: &str) {
        *self
            .errors
            .entry((self.current_table.clone(), code.to_owned()))
            .or_insert(0) += 1;
    }

    /// Notes that ops of `table` with capture HLC ≥ `hlc_time` are durable
    /// at `node` (keeps the oldest until taken).
    pub(crate) fn durable(&mut self, table: &str, node: &str, hlc_time: u64) {
        let slot = self
            .durable
            .entry((table.to_owned(), node.to_owned()))
            .or_insert(hlc_time);
        *slot = (*slot).min(hlc_time);
    }

    /// The durable batches noted since the last call. The shell stamps them
    /// with its clock right after the call that flushed (or learned of the
    /// flush), so lag runs from capture to durable.
    pub fn take_durable(&mut self) -> Vec<DurableSample> {
        std::mem::take(&mut self.durable)
            .into_iter()
            .map(|((table, node), oldest_hlc_time)| DurableSample {
                table,
                node,
                oldest_hlc_time,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use syncmesh_node::store::MemStore;
    use syncmesh_node::wire;
    use syncmesh_proto::v1 as pb;
    use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Ntp64, Op, OpId, Value};

    use crate::core::{HubCore, HubSettings, SessionId};

    use super::*;

    fn now() -> Ntp64 {
        Ntp64::from_unix_millis(1_000_000)
    }

    fn hello(node: &str) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Hello(pb::Hello {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                node: node.into(),
                version_vector: None,
                mode: "bidirectional".into(),
                engine: "sqlite".into(),
                seen: None,
                resnap: false,
                snapshot: None,
            })),
        }
    }

    fn op(origin: &str, seq: u64, table: &str, at_ms: u64, delete: bool) -> pb::Op {
        let o = NodeId::new(origin).unwrap();
        let hlc = Hlc {
            time: Ntp64::from_unix_millis(at_ms).0,
            id: o.hlc_id(),
        };
        let id = OpId::new(o, seq);
        let key = vec![Value::Int(seq as i64)];
        wire::op_to_proto(&if delete {
            Op::delete(id, hlc, table, key, vec![])
        } else {
            Op::upsert(
                id,
                hlc,
                table,
                key,
                vec![FieldWrite::new("v", Value::Int(1))],
            )
        })
    }

    fn drain(h: &mut HubCore<MemStore>, sid: SessionId) -> Vec<pb::HubMessage> {
        let mut out = Vec::new();
        while let Some(m) = h.poll_transmit(sid).unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn counts_durable_ops_and_notes_lag_at_the_hub_and_at_acking_nodes() {
        let settings = HubSettings {
            name: NodeId::new("hub").unwrap(),
            batch_size: 100,
            max_clock_drift_ms: 500,
        };
        let mut h = HubCore::open(settings, MemStore::default()).unwrap();
        let a = h.handle_open();
        h.handle_message(now(), a, hello("a")).unwrap();
        let b = h.handle_open();
        h.handle_message(now(), b, hello("b")).unwrap();
        drain(&mut h, a);
        drain(&mut h, b);
        let ops = vec![
            op("a", 1, "t", 999_000, false),
            op("a", 2, "t", 999_500, true),
            op("a", 3, "u", 999_900, false),
        ];
        h.handle_message(
            now(),
            a,
            pb::NodeMessage {
                body: Some(pb::node_message::Body::Ops(pb::OpBatch { ops })),
            },
        )
        .unwrap();
        let m = h.metrics().clone();
        assert_eq!(m.records_synced[&("t".into(), "upsert".into())], 1);
        assert_eq!(m.records_synced[&("t".into(), "delete".into())], 1);
        assert_eq!(m.records_synced[&("u".into(), "upsert".into())], 1);
        assert_eq!(m.table_heads["t"].get(&NodeId::new("a").unwrap()), 2);
        assert_eq!(m.table_heads["u"].get(&NodeId::new("a").unwrap()), 3);
        assert_eq!(m.engines[&NodeId::new("b").unwrap()], "sqlite");
        let durable = h.metrics_mut().take_durable();
        assert_eq!(
            durable,
            vec![
                DurableSample {
                    table: "t".into(),
                    node: "hub".into(),
                    oldest_hlc_time: Ntp64::from_unix_millis(999_000).0,
                },
                DurableSample {
                    table: "u".into(),
                    node: "hub".into(),
                    oldest_hlc_time: Ntp64::from_unix_millis(999_900).0,
                },
            ]
        );
        assert!(h.metrics_mut().take_durable().is_empty(), "taken once");
        // b gets the batch; its ack makes the ops durable at b.
        assert_eq!(drain(&mut h, b).len(), 1);
        let mut vv = VersionVector::default();
        vv.set(NodeId::new("a").unwrap(), 3);
        h.handle_message(
            now(),
            b,
            pb::NodeMessage {
                body: Some(pb::node_message::Body::Ack(pb::Ack {
                    version_vector: Some(wire::vv_to_proto(&vv)),
                })),
            },
        )
        .unwrap();
        let at_b: Vec<_> = h.metrics_mut().take_durable();
        assert_eq!(at_b.len(), 2);
        assert!(at_b.iter().all(|s| s.node == "b"));
        assert_eq!(at_b[0].oldest_hlc_time, Ntp64::from_unix_millis(999_000).0);
        // Refused input is counted by code (no table: not configured).
        h.handle_message(
            now(),
            b,
            pb::NodeMessage {
                body: Some(pb::node_message::Body::Ops(pb::OpBatch {
                    ops: vec![op("a", 4, "t", 999_000, false)],
                })),
            },
        )
        .unwrap();
        assert_eq!(
            h.metrics().errors[&(String::new(), "origin_mismatch".into())],
            1
        );
    }
}
