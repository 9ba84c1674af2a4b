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
