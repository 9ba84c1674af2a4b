//! The sans-IO hub core. See the crate docs.

use std::collections::{BTreeMap, VecDeque};

use prost::Message;
use serde::{Deserialize, Serialize};
use syncmesh_node::core::{BatchTally, row_key};
use syncmesh_node::store::{LogStore, WriteBatch, prefix_end};
use syncmesh_node::wire::{self, StableCut};
use syncmesh_proto::v1 as pb;
use syncmesh_resolver::{
    HlcClock, NodeId, Ntp64, Op, OpId, RowState, TableRules, Value, VersionVector,
};

use crate::Result;
use crate::stats::HubMetrics;

/// Ops one per key (`o/<origin>\0<seq>`): written by earlier versions,
/// still served.
const P_OPS: &[u8] = b"o/";
/// Ops packed: `p/<origin>\0<last seq>` → a protobuf `OpBatch` of the
/// origin's ops up to `last seq` since its previous key (at most
/// [`OPS_PER_KEY`]): one key per chunk of an incoming batch.
const P_OPS_PACKED: &[u8] = b"p/";
/// Most ops under one packed op-log key.
const OPS_PER_KEY: usize = 256;
const P_VV: &[u8] = b"v/";
const P_NODE: &[u8] = b"n/";
const P_CONFLICT: &[u8] = b"c/";
const P_ROW: &[u8] = b"r/";
const P_ROW_CONFLICTS: &[u8] = b"x/";
/// The conflict mirror's queue (only while `conflicts.mirror` is set):
/// `q/<n: u64 BE>` → the key of a conflict record that was added or
/// removed, written in the same batch as the record. The mirror
/// ([`crate::mirror`]) copies the record's current state (or its absence)
/// into the mirror table and then removes the entry.
pub const P_MIRROR_QUEUE: &[u8] = b"q/";
/// The mirror target (redacted url and table) whose full copy of `c/`
/// completed; absent: the next mirror start copies every record.
pub const K_MIRROR: &[u8] = b"g/mirror";
/// The conflict mirror queue's generation (u64 BE, absent: 0): bumped when
/// the queue overflowed [`MIRROR_QUEUE_MAX`] and was dropped, so a full
/// copy (whose marker names the generation it started at) is due again.
pub const K_MIRROR_GEN: &[u8] = b"g/mirror-gen";
/// Most entries the conflict mirror's queue (`q/`) holds while the mirror
/// database is unreachable or slower than the conflicts (each entry is a
/// record's key, under 100 bytes: ~10 MB). Past it the queue is dropped
/// and the mirror copies every record again once it can: no record is
/// lost (they stay in `c/`), the queue's disk use stays bounded.
pub const MIRROR_QUEUE_MAX: u64 = 100_000;
/// The prefix of conflict records (`c/<hlc time: u64 BE><table>\0…`).
pub const P_CONFLICT_RECORDS: &[u8] = P_CONFLICT;
/// Tombstone GC: the collected cut.
const K_GC_CUT: &[u8] = b"g/cut";
/// Tombstone GC: per node, its last seen report and the cut it joined at.
const P_GC_NODE: &[u8] = b"g/n/";
/// Op-log compaction: per origin, the highest seq dropped from `o/`.
const K_GC_COMPACTED: &[u8] = b"g/compacted";
/// Set once the hub stored an op of a table it does not merge: such ops
/// exist only in the op log, so it is never compacted.
const K_GC_UNMERGED: &[u8] = b"g/unmerged";

/// Most row states in one re-snapshot chunk.
pub const SNAPSHOT_ROWS_PER_CHUNK: usize = 512;
/// Most op keys one compaction step removes (one flushed batch).
pub const COMPACT_OPS_PER_STEP: usize = 512;

/// Default of `hub.tombstone_grace_hours`: a writer silent for longer no
/// longer holds back tombstone collection (7 days).
pub const DEFAULT_TOMBSTONE_GRACE_HOURS: u64 = 168;
/// Most row states one [`HubCore::handle_gc`] call examines.
pub const GC_ROWS_PER_STEP: usize = 512;

/// Conflict records returned by one query when the caller sets no limit.
pub const DEFAULT_CONFLICT_LIMIT: usize = 1000;
/// Default retention of conflict records.
pub const DEFAULT_CONFLICT_RETENTION_DAYS: u32 = 90;

/// Most op batches in flight (sent, not acknowledged) per session.
pub const MAX_INFLIGHT_BATCHES: u64 = 4;
/// Largest encoded batch the hub sends (bytes).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A session: one `Sync` stream.
pub type SessionId = u64;

/// Static settings of a hub core.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// The hub's name.
    pub name: NodeId,
    /// Most ops per batch sent to a node.
    pub batch_size: usize,
    /// Ops whose HLC is further ahead of the hub's clock are refused.
    pub max_clock_drift_ms: u64,
}

/// What the shell should do with a session after a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep the stream.
    Continue,
    /// Close the stream (after sending what is queued), for this reason.
    Close(String),
}

/// What the hub remembers about a node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    /// Ops the node acknowledged as durable.
    pub acked: VersionVector,
    /// Unix ms of its last message.
    pub last_seen_ms: u64,
    /// publish / subscribe / bidirectional.
    pub mode: String,
}

#[derive(Debug, Default)]
struct Session {
    node: Option<NodeId>,
    /// The node takes part in tombstone GC (its hello carried `seen`).
    gc: bool,
    publish_only: bool,
    subscribe_only: bool,
    sent: VersionVector,
    inflight: u64,
    /// Which origin the next batch starts with: rotates per batch so a
    /// lagging node gets every origin's backlog interleaved, not one
    /// origin's whole backlog before the next origin's first op.
    next_origin: usize,
    outbox: VecDeque<pb::HubMessage>,
    /// Batches sent and not yet acknowledged (for lag at the node).
    sent_batches: VecDeque<SentBatch>,
    /// The node can take a re-snapshot (its hello set `resnap`).
    resnap: bool,
    /// A re-snapshot being served: no ops are sent until it is installed.
    snap: Option<SnapServe>,
}

/// A re-snapshot being served to one session.
#[derive(Debug, Clone)]
struct SnapServe {
    id: u64,
    cut: StableCut,
    /// The hub's version vector when the first chunk was read (every row
    /// read then or later reflects at least these ops).
    vv: VersionVector,
    /// A chunk of this snapshot went out (to this node, in this session or
    /// one it resumes): `vv` is fixed.
    sent_any: bool,
    /// Next row key (`r/…`) to send.
    cursor: Vec<u8>,
    /// A chunk is sent and not yet acknowledged.
    inflight: bool,
    /// The last chunk is sent.
    sent_last: bool,
}

/// What the hub remembers of a sent batch until the node acknowledges it.
#[derive(Debug, Default)]
struct SentBatch {
    /// Highest seq per origin in the batch.
    upto: Vec<(NodeId, u64)>,
    /// Oldest capture HLC (NTP64 time) per table in the batch.
    oldest: BTreeMap<String, u64>,
}

/// Whether a hello needs a re-snapshot.
enum Resnap {
    No,
    /// The node installed a re-snapshot at the current cut: trust it.
    Trusted,
    /// Why it needs one.
    Needed(String),
}

/// `q/<n>`.
pub fn mirror_queue_key(n: u64) -> Vec<u8> {
    let mut k = P_MIRROR_QUEUE.to_vec();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The conflict mirror queue's generation (`g/mirror-gen`; absent: 0).
pub fn mirror_generation(store: &impl LogStore) -> Result<u64> {
    Ok(store
        .get(K_MIRROR_GEN)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// The number of a `q/<n>` key.
pub fn mirror_queue_number(key: &[u8]) -> Option<u64> {
    let n: [u8; 8] = key.strip_prefix(P_MIRROR_QUEUE)?.try_into().ok()?;
    Some(u64::from_be_bytes(n))
}

fn fmt_vv(v: &VersionVector) -> String {
    v.0.iter()
        .map(|(o, s)| format!("{o}:{s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The hub state machine.
pub struct HubCore<S: LogStore> {
    settings: HubSettings,
    store: S,
    clock: HlcClock,
    vv: VersionVector,
    sessions: BTreeMap<SessionId, Session>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    next_session: SessionId,
    to_close: VecDeque<(SessionId, String)>,
    errors_total: u64,
    conflict_retention_days: u32,
    tables: BTreeMap<String, TableRules>,
    /// Conflict keys per row written in the batch being built.
    row_conflicts: BTreeMap<Vec<u8>, Vec<Vec<u8>>>,
    metrics: HubMetrics,
    gc: Gc,
    /// The next `q/` number while the conflict mirror is on.
    mirror_next: Option<u64>,
    /// A lower bound of the first `q/` number in the store (the mirror
    /// removes entries from the front): re-read when the queue looks full.
    mirror_first: u64,
    /// The queue's limit ([`MIRROR_QUEUE_MAX`]; smaller in tests).
    mirror_queue_max: u64,
}

/// What the hub remembers about a node for tombstone GC.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcNode {
    /// Its latest seen report (`None`: it never sent one).
    pub seen: Option<VersionVector>,
    /// The stable vector of the cut it took part in (or caught up with)
    /// last: it is *trusted* while this dominates the collected cut.
    pub joined: VersionVector,
}

/// Counters of tombstone GC at the hub.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Cuts adopted since the hub started.
    pub cuts: u64,
    /// Row states rewritten smaller.
    pub rows_collected: u64,
    /// Row states dropped entirely (deleted rows with every op covered).
    pub rows_dropped: u64,
    /// Sessions refused because the node missed collected tombstones.
    pub refused: u64,
    /// Unix ms when the cut last advanced (0: not since start).
    pub cut_advanced_ms: u64,
    /// Re-snapshots installed by a node (served to the end).
    pub snapshots_served: u64,
    /// Ops dropped from the op log (below the stable cut).
    pub ops_compacted: u64,
    /// Writes of returning publish-only nodes dropped under `delete_wins`
    /// (writes of rows deleted by deletes they never saw).
    pub writes_dropped: u64,
}

#[derive(Debug, Default)]
struct Gc {
    grace_ms: u64,
    /// Nodes from the configuration (name to mode): a configured writer
    /// that never connected holds collection back like a silent one.
    configured: BTreeMap<NodeId, String>,
    /// First `now` this core saw (stands in for the last-seen time of
    /// configured nodes that never connected).
    started_ms: Option<u64>,
    cut: StableCut,
    /// Next row key to collect at `cut` (`None`: the pass is done).
    cursor: Option<Vec<u8>>,
    nodes: BTreeMap<NodeId, GcNode>,
    stats: GcStats,
    /// Per origin, the highest seq dropped from the op log.
    compacted: VersionVector,
    /// An op of a table the hub does not merge was stored: no compaction.
    unmerged: bool,
    /// Lines for the shell to log (re-snapshots started and installed).
    notices: VecDeque<String>,
}

/// Encodes a stored record.
fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    Ok(
        postcard::to_allocvec(v).map_err(|e| syncmesh_node::Error::Store {
            path: "<hub>".into(),
            message: format!("cannot encode state: {e}"),
        })?,
    )
}

/// Decodes a stored record; `what` names it in the error.
fn dec<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    Ok(
        postcard::from_bytes(bytes).map_err(|e| syncmesh_node::Error::Store {
            path: "<hub>".into(),
            message: format!("corrupt {what} in the hub store: {e}; restore the hub data_dir"),
        })?,
    )
}

fn op_key(origin: &NodeId, seq: u64) -> Vec<u8> {
    op_key_in(P_OPS, origin, seq)
}

fn packed_key(origin: &NodeId, seq: u64) -> Vec<u8> {
    op_key_in(P_OPS_PACKED, origin, seq)
}

/// Puts `ops` (consecutive ops of `origin`) under one packed key.
/// Ops of one incoming batch on their way to one packed key: the bytes of
/// an encoded `OpBatch` holding them (each op as field 1, the whole
/// message's encoding), built one op at a time.
#[derive(Default)]
struct PackedChunk {
    bytes: Vec<u8>,
    ops: usize,
    last_seq: u64,
}

impl PackedChunk {
    /// `op` as it goes into an `OpBatch`: tag, length, message.
    fn encode(op: &pb::Op) -> Vec<u8> {
        let mut one = Vec::with_capacity(op.encoded_len() + 6);
        prost::encoding::message::encode(1, op, &mut one);
        one
    }

    /// Appends an op encoded by [`PackedChunk::encode`].
    fn push(&mut self, encoded: &[u8], seq: u64) {
        self.bytes.extend_from_slice(encoded);
        self.ops += 1;
        self.last_seq = seq;
    }

    /// Puts the chunk under the key of its last op, if it holds any, and
    /// empties it.
    fn put(&mut self, batch: &mut WriteBatch, origin: &NodeId) {
        if self.ops > 0 {
            batch.put(
                packed_key(origin, self.last_seq),
                std::mem::take(&mut self.bytes),
            );
        }
        self.ops = 0;
    }
}

fn corrupt_op(e: prost::DecodeError) -> syncmesh_node::Error {
    syncmesh_node::Error::Store {
        path: "<hub>".into(),
        message: format!("corrupt op in the hub store: {e}; restore the hub data_dir"),
    }
}

fn op_key_in(prefix: &[u8], origin: &NodeId, seq: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(origin.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn error_msg(code: &str, message: String, op: Option<pb::OpId>) -> pb::HubMessage {
    pb::HubMessage {
        body: Some(pb::hub_message::Body::Error(pb::Error {
            code: code.into(),
            message,
            op,
        })),
    }
}

impl<S: LogStore> HubCore<S> {
    /// Restores a hub from its store.
    pub fn open(settings: HubSettings, store: S) -> Result<Self> {
        let mut vv = VersionVector::default();
        for (k, v) in store.range(P_VV, &prefix_end(P_VV), usize::MAX)? {
            let node = NodeId::new(String::from_utf8_lossy(&k[P_VV.len()..]).into_owned())
                .map_err(syncmesh_node::Error::from)?;
            vv.set(node, u64::from_be_bytes(v.try_into().unwrap_or([0; 8])));
        }
        let mut nodes = BTreeMap::new();
        for (k, v) in store.range(P_NODE, &prefix_end(P_NODE), usize::MAX)? {
            let node = NodeId::new(String::from_utf8_lossy(&k[P_NODE.len()..]).into_owned())
                .map_err(syncmesh_node::Error::from)?;
            if let Ok(rec) = postcard::from_bytes::<NodeRecord>(&v) {
                nodes.insert(node, rec);
            }
        }
        let clock = HlcClock::new(&settings.name, settings.max_clock_drift_ms);
        let mut gc = Gc {
            grace_ms: DEFAULT_TOMBSTONE_GRACE_HOURS * 3_600_000,
            ..Gc::default()
        };
        if let Some(b) = store.get(K_GC_CUT)? {
            gc.cut = dec(&b, "stable cut")?;
            // Collection restarts from the first row after a restart.
            gc.cursor = (!gc.cut.is_empty()).then(|| P_ROW.to_vec());
        }
        if let Some(b) = store.get(K_GC_COMPACTED)? {
            gc.compacted = dec(&b, "compaction record")?;
        }
        gc.unmerged = store.get(K_GC_UNMERGED)?.is_some();
        for (k, v) in store.range(P_GC_NODE, &prefix_end(P_GC_NODE), usize::MAX)? {
            let node = NodeId::new(String::from_utf8_lossy(&k[P_GC_NODE.len()..]).into_owned())
                .map_err(syncmesh_node::Error::from)?;
            let rec = dec::<GcNode>(&v, &format!("GC record of node {node}"))?;
            gc.nodes.insert(node, rec);
        }
        Ok(HubCore {
            settings,
            store,
            clock,
            vv,
            sessions: BTreeMap::new(),
            nodes,
            next_session: 1,
            to_close: VecDeque::new(),
            errors_total: 0,
            conflict_retention_days: DEFAULT_CONFLICT_RETENTION_DAYS,
            tables: BTreeMap::new(),
            row_conflicts: BTreeMap::new(),
            mirror_next: None,
            mirror_first: 0,
            mirror_queue_max: MIRROR_QUEUE_MAX,
            metrics: HubMetrics::default(),
            gc,
        })
    }

    /// Counters for `/metrics` and the status dashboard.
    pub fn metrics(&self) -> &HubMetrics {
        &self.metrics
    }

    /// Mutable counters, for [`HubMetrics::take_durable`].
    pub fn metrics_mut(&mut self) -> &mut HubMetrics {
        &mut self.metrics
    }

    /// The tables whose ops the hub merges into its own row state to find
    /// conflicts (ops of other tables are stored and relayed only).
    pub fn set_tables(&mut self, tables: BTreeMap<String, TableRules>) {
        self.tables = tables;
    }

    /// The row state `op` merges into, read into `rows` (the batch's
    /// working set) on first use.
    fn load_row<'r>(
        &self,
        op: &Op,
        rows: &'r mut BTreeMap<Vec<u8>, RowState>,
    ) -> Result<&'r mut RowState> {
        let rk = row_key(P_ROW, &op.table, &op.key)?;
        Ok(match rows.entry(rk) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let state = match self.store.get(e.key())? {
                    Some(b) => dec(&b, "row state")?,
                    None => RowState::default(),
                };
                e.insert(state)
            }
        })
    }

    /// Whether `op` of a publish-only node that missed collected deletes
    /// writes a row deleted concurrently, on the hub's merged state: an
    /// update of a row whose deletes were collected here
    /// ([`RowState::loses_update`]), or any write a tombstone the hub still
    /// holds would hide ([`RowState::loses_to_delete`]; the hub keeps every
    /// tombstone such a node did not see, [`HubCore::gc_collect_cut`]).
    /// Then `delete_wins` drops its writes.
    fn loses_to_delete(&self, op: &Op, rows: &mut BTreeMap<Vec<u8>, RowState>) -> Result<bool> {
        let Some(rules) = self.tables.get(&op.table) else {
            return Ok(false);
        };
        Ok(self.load_row(op, rows)?.loses_to_unseen_deletes(rules, op))
    }

    /// Merges `op` into the hub's row state (in `rows`, flushed with the
    /// batch) and records every complete conflict of that row.
    fn merge(
        &mut self,
        op: &Op,
        rows: &mut BTreeMap<Vec<u8>, RowState>,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        let Some(rules) = self.tables.get(&op.table).cloned() else {
            return Ok(());
        };
        let row = self.load_row(op, rows)?;
        row.apply(op);
        let conflicts = row.conflicts(&rules);
        // The row's records are exactly its current conflicts: a set that
        // grew (a third concurrent write arrived) replaces the smaller one.
        let xk = row_key(P_ROW_CONFLICTS, &op.table, &op.key)?;
        let before = match self.row_conflicts.remove(&xk) {
            Some(keys) => keys,
            None => match self.store.get(&xk)? {
                Some(b) => postcard::from_bytes::<Vec<Vec<u8>>>(&b).unwrap_or_default(),
                None => Vec::new(),
            },
        };
        let mut now_keys = Vec::new();
        let mut strategies = Vec::new();
        for c in conflicts.into_iter().filter(|c| c.is_complete()) {
            strategies.push(c.strategy.clone());
            let record = pb::ConflictRecord {
                hlc: c.hlc.map(|h| pb::Hlc {
                    time: h.time,
                    id: h.id_bytes(),
                }),
                table: op.table.clone(),
                key: op.key.iter().map(wire::value_to_proto).collect(),
                field: c.field.clone(),
                candidates: c
                    .candidates
                    .iter()
                    .map(|x| pb::ConflictCandidate {
                        op: Some(pb::OpId {
                            origin: x.op.origin.as_str().to_owned(),
                            seq: x.op.seq,
                        }),
                        hlc: x.hlc.map(|h| pb::Hlc {
                            time: h.time,
                            id: h.id_bytes(),
                        }),
                        value: x.value.as_ref().map(wire::value_to_proto),
                    })
                    .collect(),
                strategy: c.strategy.clone(),
                result: c.value.as_ref().map(wire::value_to_proto),
            };
            now_keys.push(self.record_conflict(batch, &record));
        }
        // New records, less those they replace (a set that grew).
        let replaced = before.iter().filter(|k| !now_keys.contains(k)).count();
        let added: Vec<&String> = now_keys
            .iter()
            .zip(&strategies)
            .filter(|(k, _)| !before.contains(k))
            .map(|(_, s)| s)
            .collect();
        for strategy in added.into_iter().skip(replaced) {
            *self
                .metrics
                .conflicts
                .entry((op.table.clone(), strategy.clone()))
                .or_insert(0) += 1;
        }
        for k in before.iter().filter(|k| !now_keys.contains(k)) {
            batch.remove(k.clone());
            self.queue_mirror(batch, k)?;
        }
        for k in now_keys.iter().filter(|k| !before.contains(k)) {
            self.queue_mirror(batch, k)?;
        }
        if now_keys != before {
            batch.put(xk.clone(), enc(&now_keys)?);
        }
        self.row_conflicts.insert(xk, now_keys);
        Ok(())
    }

    /// Turns the conflict mirror's queue (`q/`) on or off. Off also forgets
    /// that a mirror ever completed a full copy (`g/mirror`), so turning it
    /// on again copies every record once more (the copy is idempotent).
    pub fn set_conflict_mirror(&mut self, on: bool) -> Result<()> {
        if on {
            let end = prefix_end(P_MIRROR_QUEUE);
            let next = match self.store.last_in(P_MIRROR_QUEUE, &end)? {
                Some((k, _)) => mirror_queue_number(&k).map_or(0, |n| n.saturating_add(1)),
                None => 0,
            };
            self.mirror_next = Some(next);
            self.mirror_first = self.mirror_queue_first()?.unwrap_or(next);
            return Ok(());
        }
        self.mirror_next = None;
        let mut batch = WriteBatch::default();
        if self.store.get(K_MIRROR)?.is_some() {
            batch.remove(K_MIRROR.to_vec());
        }
        // Stale queue entries: the next full copy covers them.
        let end = prefix_end(P_MIRROR_QUEUE);
        for (k, _) in self.store.range(P_MIRROR_QUEUE, &end, 100_000)? {
            batch.remove(k);
        }
        if !batch.is_empty() {
            self.store.write(batch)?;
            self.store.flush()?;
        }
        Ok(())
    }

    /// The number of the first `q/` entry in the store.
    fn mirror_queue_first(&self) -> Result<Option<u64>> {
        let end = prefix_end(P_MIRROR_QUEUE);
        Ok(self
            .store
            .range(P_MIRROR_QUEUE, &end, 1)?
            .first()
            .and_then(|(k, _)| mirror_queue_number(k)))
    }

    /// Sets the mirror queue's limit (tests; the default is
    /// [`MIRROR_QUEUE_MAX`]).
    pub fn set_mirror_queue_max(&mut self, max: u64) {
        self.mirror_queue_max = max.max(1);
    }

    /// Queues the record under `key` for the mirror (if it is on). A queue
    /// at its limit is dropped instead (in `batch`) and the generation
    /// bumped: the mirror then copies every record, `key`'s included.
    fn queue_mirror(&mut self, batch: &mut WriteBatch, key: &[u8]) -> Result<()> {
        let Some(n) = self.mirror_next else {
            return Ok(());
        };
        if n.saturating_sub(self.mirror_first) >= self.mirror_queue_max {
            // Entries of the batch being built are not in the store yet:
            // without any there, count from `n`.
            self.mirror_first = self.mirror_queue_first()?.unwrap_or(n);
            if n.saturating_sub(self.mirror_first) >= self.mirror_queue_max {
                for m in self.mirror_first..n {
                    batch.remove(mirror_queue_key(m));
                }
                let generation = mirror_generation(&self.store)?;
                batch.put(
                    K_MIRROR_GEN.to_vec(),
                    generation.wrapping_add(1).to_be_bytes().to_vec(),
                );
                self.gc.notices.push_back(format!(
                    "conflict mirror: {} conflict records are waiting for the mirror database, \
                     its queue's limit; dropped the queue: the mirror copies every record again \
                     once the database keeps up (no record is lost: the hub keeps them, \
                     `syncmesh conflicts` shows them)",
                    n - self.mirror_first
                ));
                self.mirror_first = n;
                return Ok(());
            }
        }
        batch.put(mirror_queue_key(n), key.to_vec());
        self.mirror_next = Some(n.saturating_add(1));
        Ok(())
    }

    /// Keeps conflict records for `days` (at least 1).
    pub fn set_conflict_retention_days(&mut self, days: u32) {
        self.conflict_retention_days = days.max(1);
    }

    /// Stores a conflict record. Its key is derived from its content, so the
    /// same conflict stored twice is one record.
    pub fn record_conflict(&mut self, batch: &mut WriteBatch, c: &pb::ConflictRecord) -> Vec<u8> {
        let mut k = P_CONFLICT.to_vec();
        let hlc = c.hlc.as_ref().map(|h| h.time).unwrap_or(0);
        k.extend_from_slice(&hlc.to_be_bytes());
        k.extend_from_slice(c.table.as_bytes());
        k.push(0);
        let ident = pb::ConflictRecord {
            hlc: None,
            table: String::new(),
            key: c.key.clone(),
            field: c.field.clone(),
            candidates: c
                .candidates
                .iter()
                .map(|x| pb::ConflictCandidate {
                    op: x.op.clone(),
                    hlc: None,
                    value: None,
                })
                .collect(),
            strategy: String::new(),
            result: None,
        };
        k.extend_from_slice(&ident.encode_to_vec());
        batch.put(k.clone(), c.encode_to_vec());
        k
    }

    /// Conflict records, newest first, filtered as the request asks.
    pub fn conflicts(&self, req: &pb::ConflictsRequest) -> Result<pb::ConflictsReply> {
        let mut start = P_CONFLICT.to_vec();
        start.extend_from_slice(&Ntp64::from_unix_millis(req.since_unix_ms).0.to_be_bytes());
        let all = self
            .store
            .range(&start, &prefix_end(P_CONFLICT), usize::MAX)?;
        let total = all.len() as u64;
        let limit = if req.limit == 0 {
            DEFAULT_CONFLICT_LIMIT
        } else {
            req.limit as usize
        };
        let conflicts = all
            .iter()
            .rev()
            .filter_map(|(_, v)| pb::ConflictRecord::decode(v.as_slice()).ok())
            .filter(|c| req.table.is_empty() || c.table == req.table)
            .take(limit)
            .collect();
        Ok(pb::ConflictsReply { conflicts, total })
    }

    /// Periodic housekeeping: drops conflict records past their retention.
    pub fn handle_tick(&mut self, now: Ntp64) -> Result<()> {
        let keep_ms = u64::from(self.conflict_retention_days) * 86_400_000;
        let cutoff = Ntp64::from_unix_millis(now.as_unix_millis().saturating_sub(keep_ms));
        let mut end = P_CONFLICT.to_vec();
        end.extend_from_slice(&cutoff.0.to_be_bytes());
        let old = self.store.range(P_CONFLICT, &end, 10_000)?;
        if !old.is_empty() {
            let mut batch = WriteBatch::default();
            for (k, _) in old {
                batch.remove(k);
            }
            self.store.write(batch)?;
        }
        Ok(())
    }

    /// The mesh's version vector as held by this hub.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    /// A new stream opened.
    pub fn handle_open(&mut self) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(id, Session::default());
        id
    }

    /// A stream closed.
    pub fn handle_close(&mut self, sid: SessionId) {
        self.sessions.remove(&sid);
    }

    /// Sessions the core wants closed (e.g. replaced by a newer stream of
    /// the same node), with the reason.
    pub fn poll_close(&mut self) -> Option<(SessionId, String)> {
        self.to_close.pop_front()
    }

    fn reject(
        &mut self,
        sid: SessionId,
        code: &str,
        message: String,
        op: Option<pb::OpId>,
    ) -> Control {
        self.errors_total += 1;
        self.metrics.error(code);
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.outbox.push_back(error_msg(code, message.clone(), op));
        }
        Control::Close(message)
    }

    /// Handles one message of session `sid`. `now` is the hub's wall clock.
    pub fn handle_message(
        &mut self,
        now: Ntp64,
        sid: SessionId,
        msg: pb::NodeMessage,
    ) -> Result<Control> {
        use pb::node_message::Body;
        if !self.sessions.contains_key(&sid) {
            return Ok(Control::Close("unknown session".into()));
        }
        let now_ms = now.as_unix_millis();
        let node = self.sessions.get(&sid).and_then(|s| s.node.clone());
        if let Some(n) = &node {
            self.nodes.entry(n.clone()).or_default().last_seen_ms = now_ms;
        }
        match (msg.body, node) {
            (None, _) => {
                Ok(self.reject(sid, "empty_message", "message without a body".into(), None))
            }
            (Some(Body::Hello(h)), None) => self.hello(sid, now_ms, h),
            (Some(Body::Hello(_)), Some(n)) => Ok(self.reject(
                sid,
                "duplicate_hello",
                format!("node {n} sent a second hello on one stream"),
                None,
            )),
            (Some(_), None) => Ok(self.reject(
                sid,
                "no_hello",
                "the first message of a stream must be a hello".into(),
                None,
            )),
            (Some(Body::Ack(a)), Some(n)) => {
                let acked = wire::vv_from_proto(a.version_vector)?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
                if let Some(s) = self.sessions.get_mut(&sid) {
                    while s
                        .sent_batches
                        .front()
                        .is_some_and(|b| b.upto.iter().all(|(o, q)| acked.get(o) >= *q))
                    {
                        if let Some(b) = s.sent_batches.pop_front() {
                            for (table, hlc) in b.oldest {
                                self.metrics.durable(&table, n.as_str(), hlc);
                            }
                        }
                    }
                }
                let rec = self.nodes.entry(n.clone()).or_default();
                for (o, v) in acked.0 {
                    rec.acked.advance(&o, v);
                }
                let rec = rec.clone();
                self.save_node(&n, &rec)?;
                Ok(Control::Continue)
            }
            (Some(Body::Ops(b)), Some(n)) => self.ops(now, sid, n, b),
            (Some(Body::Seen(r)), Some(n)) => match wire::seen_from_proto(r.seen) {
                Ok(seen) => {
                    self.note_seen(&n, seen)?;
                    Ok(Control::Continue)
                }
                Err(e) => Ok(self.reject(sid, "bad_seen_report", e.to_string(), None)),
            },
            (Some(Body::SnapshotAck(a)), Some(n)) => self.snapshot_ack(sid, &n, a),
        }
    }

    fn save_node(&mut self, n: &NodeId, rec: &NodeRecord) -> Result<()> {
        let mut k = P_NODE.to_vec();
        k.extend_from_slice(n.as_str().as_bytes());
        let mut b = WriteBatch::default();
        b.put(k, enc(rec)?);
        self.store.write(b)?;
        Ok(())
    }

    fn hello(&mut self, sid: SessionId, now_ms: u64, h: pb::Hello) -> Result<Control> {
        if h.protocol_version != syncmesh_proto::PROTOCOL_VERSION {
            return Ok(self.reject(
                sid,
                "protocol_version",
                format!(
                    "node speaks protocol {} but this hub speaks {}: upgrade the older side",
                    h.protocol_version,
                    syncmesh_proto::PROTOCOL_VERSION
                ),
                None,
            ));
        }
        let node = match NodeId::new(h.node) {
            Ok(n) => n,
            Err(e) => return Ok(self.reject(sid, "bad_node_name", e.to_string(), None)),
        };
        let node_vv = match wire::vv_from_proto(h.version_vector) {
            Ok(v) => v,
            Err(e) => return Ok(self.reject(sid, "bad_version_vector", e.to_string(), None)),
        };
        let seen = match h.seen.map(|v| wire::seen_from_proto(Some(v))).transpose() {
            Ok(v) => v,
            Err(e) => return Ok(self.reject(sid, "bad_seen_report", e.to_string(), None)),
        };
        let (publish_only, subscribe_only) = match h.mode.as_str() {
            "publish" => (true, false),
            "subscribe" => (false, true),
            "bidirectional" | "" => (false, false),
            other => {
                return Ok(self.reject(
                    sid,
                    "bad_mode",
                    format!("unknown mode {other:?}: use bidirectional, publish or subscribe"),
                    None,
                ));
            }
        };
        // A node has one stream: a newer one replaces the old.
        let old: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(id, s)| **id != sid && s.node.as_ref() == Some(&node))
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.sessions.remove(&id);
            self.to_close
                .push_back((id, format!("node {node} opened a newer stream")));
        }
        let gc = seen.is_some();
        let progress = match h
            .snapshot
            .map(wire::snapshot_progress_from_proto)
            .transpose()
        {
            Ok(p) => p,
            Err(e) => return Ok(self.reject(sid, "bad_snapshot_progress", e.to_string(), None)),
        };
        let mut snap = None;
        if !publish_only {
            match self.gc_resnap_needed(&node, &node_vv, subscribe_only, progress.as_ref()) {
                Resnap::No => {}
                Resnap::Trusted => self.trust(&node)?,
                Resnap::Needed(why) if self.gc.unmerged => {
                    // Rows of tables the hub does not merge exist only in
                    // its op log: a snapshot of its row states would miss them.
                    self.gc.stats.refused += 1;
                    let msg = format!(
                        "{why}; the hub cannot re-snapshot it because it relays tables it does \
                         not merge (add every synced table to the hub's config)"
                    );
                    return Ok(self.reject(sid, "missed_collected_tombstones", msg, None));
                }
                Resnap::Needed(why) if h.resnap && (gc || subscribe_only) => {
                    snap = Some(self.start_snapshot(now_ms, sid, &node, why, progress.as_ref())?);
                }
                Resnap::Needed(why) => {
                    self.gc.stats.refused += 1;
                    let msg = format!(
                        "{why}; this node cannot take a re-snapshot from the hub: upgrade it"
                    );
                    return Ok(self.reject(sid, "missed_collected_tombstones", msg, None));
                }
            }
        } else if let Some(why) = self.gc_refusal(&node, &node_vv) {
            if self.gc.unmerged {
                self.gc.stats.refused += 1;
                let msg = format!(
                    "{why}; the hub cannot judge them because it relays tables it does not \
                     merge (add every synced table to the hub's config)"
                );
                return Ok(self.reject(sid, "missed_collected_tombstones", msg, None));
            }
            // Publish-only: its writes are judged on arrival instead.
            self.gc.notices.push_back(format!(
                "publish-only node {node} returns having written while deletes were \
                 garbage-collected without it: the hub merges its writes against its own row \
                 states; under delete_wins an update of a row deleted meanwhile is dropped \
                 (nothing resurrects), under update_wins the row comes back with its fields"
            ));
        }
        if let Some(seen) = seen {
            self.note_seen(&node, seen)?;
        }
        let rec = self.nodes.entry(node.clone()).or_default();
        rec.last_seen_ms = now_ms;
        rec.mode = if h.mode.is_empty() {
            "bidirectional".into()
        } else {
            h.mode
        };
        for (o, v) in &node_vv.0 {
            rec.acked.advance(o, *v);
        }
        let rec = rec.clone();
        self.save_node(&node, &rec)?;
        if !h.engine.is_empty() {
            self.metrics.engines.insert(node.clone(), h.engine.clone());
        }
        let reply = pb::HubMessage {
            body: Some(pb::hub_message::Body::Hello(pb::HelloReply {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                hub: self.settings.name.as_str().to_owned(),
                version_vector: Some(wire::vv_to_proto(&self.vv)),
                cut: gc.then(|| wire::cut_to_proto(&self.gc.cut)),
                snapshot: snap.is_some(),
            })),
        };
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.resnap = h.resnap;
            s.snap = snap;
            s.gc = gc;
            s.node = Some(node);
            s.publish_only = publish_only;
            s.subscribe_only = subscribe_only;
            s.sent = node_vv;
            s.inflight = 0;
            s.sent_batches.clear();
            s.outbox.push_back(reply);
        }
        Ok(Control::Continue)
    }

    fn ops(&mut self, now: Ntp64, sid: SessionId, node: NodeId, b: pb::OpBatch) -> Result<Control> {
        if self.sessions.get(&sid).is_some_and(|s| s.subscribe_only) {
            return Ok(self.reject(
                sid,
                "subscribe_only",
                format!("node {node} is in subscribe mode and may not publish ops: set mode: bidirectional or publish"),
                None,
            ));
        }
        if b.ops.len() > syncmesh_proto::MAX_BATCH_OPS {
            return Ok(self.reject(
                sid,
                "batch_too_large",
                format!(
                    "{} ops in one batch exceed the limit of {}",
                    b.ops.len(),
                    syncmesh_proto::MAX_BATCH_OPS
                ),
                None,
            ));
        }
        let mut batch = WriteBatch::default();
        let mut rows: BTreeMap<Vec<u8>, RowState> = BTreeMap::new();
        self.row_conflicts.clear();
        let mut have = self.vv.get(&node);
        let start = have;
        let mut control = Control::Continue;
        let mut stored = BatchTally::default();
        let mut chunk = PackedChunk::default();
        let publish_only = self.sessions.get(&sid).is_some_and(|s| s.publish_only);
        // Trust does not change within a batch.
        let untrusted = self.gc_untrusted(&node);
        // Writes of an untrusted publish-only node dropped here (the
        // first one's id, table and key for the log line, and how many).
        let mut dropped: Option<(OpId, String, Vec<Value>)> = None;
        let mut dropped_n = 0u64;
        for raw in b.ops {
            // Only configured tables label errors: hostile input must not
            // grow the metrics with made-up table names.
            if self.metrics.current_table != raw.table {
                if self.tables.contains_key(&raw.table) {
                    self.metrics.current_table.clone_from(&raw.table);
                } else {
                    self.metrics.current_table.clear();
                }
            }
            let raw_id = raw.id.clone();
            // What the log keeps, unless the op is changed below.
            let mut kept = PackedChunk::encode(&raw);
            let mut op = match wire::op_from_proto(raw) {
                Ok(op) => op,
                Err(e) => {
                    control = self.reject(sid, "malformed_op", e.to_string(), raw_id);
                    break;
                }
            };
            if op.id.origin != node {
                control = self.reject(
                    sid,
                    "origin_mismatch",
                    format!("node {node} sent op {} whose origin is another node; a node may only publish its own ops", op.id),
                    raw_id,
                );
                break;
            }
            if op.id.seq <= have {
                continue; // a retry of something already durable
            }
            // A publish-only node that missed collected deletes cannot be
            // re-snapshotted (it applies nothing): the hub judges its writes
            // against its own merged state instead ([`RowState::loses_update`]).
            if let Some(why) = &untrusted
                && !(publish_only && self.tables.contains_key(&op.table))
            {
                self.gc.stats.refused += 1;
                control = self.reject(sid, "missed_collected_tombstones", why.clone(), raw_id);
                break;
            }
            if op.id.seq != have + 1 {
                control = self.reject(
                    sid,
                    "seq_gap",
                    format!("op {} arrived but the hub holds {node} only up to seq {have}: resend from {}", op.id, have + 1),
                    raw_id,
                );
                break;
            }
            if let Err(e) = self.clock.observe(&op.id, op.hlc, now) {
                control = self.reject(sid, "clock_drift", e.to_string(), raw_id);
                break;
            }
            if !self.gc.unmerged && !self.tables.contains_key(&op.table) {
                // Only the op log holds this table's rows: never compact it.
                self.gc.unmerged = true;
                batch.put(K_GC_UNMERGED.to_vec(), vec![1]);
            }
            if untrusted.is_some() && self.loses_to_delete(&op, &mut rows)? {
                op.fields.clear();
                kept = PackedChunk::encode(&wire::op_to_proto(&op));
                dropped_n += 1;
                if dropped.is_none() {
                    dropped = Some((op.id.clone(), op.table.clone(), op.key.clone()));
                }
            }
            self.merge(&op, &mut rows, &mut batch)?;
            if chunk.ops == OPS_PER_KEY {
                chunk.put(&mut batch, &node);
            }
            chunk.push(&kept, op.id.seq);
            have = op.id.seq;
            stored.note(&op);
        }
        self.metrics.current_table.clear();
        chunk.put(&mut batch, &node);
        if have > start {
            for (k, row) in rows {
                batch.put(k, enc(&row)?);
            }
            let mut k = P_VV.to_vec();
            k.extend_from_slice(node.as_str().as_bytes());
            batch.put(k, have.to_be_bytes().to_vec());
            self.store.write(batch)?;
            self.store.flush()?;
            for t in stored.into_tallies() {
                *self
                    .metrics
                    .records_synced
                    .entry((t.table.clone(), t.kind.to_owned()))
                    .or_insert(0) += t.ops;
                self.metrics
                    .durable(&t.table, self.settings.name.as_str(), t.oldest_hlc);
                self.metrics
                    .table_heads
                    .entry(t.table)
                    .or_default()
                    .advance(&node, t.last_seq);
            }
            self.vv.set(node.clone(), have);
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.sent.advance(&node, have);
            }
            if let Some((id, table, key)) = dropped {
                self.gc.stats.writes_dropped += dropped_n;
                self.gc.notices.push_back(format!(
                    "publish-only node {node}: {dropped_n} write(s) (first: {id} to table \
                     {table} key {key:?}) write rows deleted elsewhere, by deletes the node never \
                     saw, while it was away; delete_wins: the hub drops them and the rows stay \
                     deleted everywhere else (the node's own database keeps its copy)"
                ));
            }
            self.nodes
                .entry(node.clone())
                .or_default()
                .acked
                .advance(&node, have);
        }
        // Acknowledge what is durable (also after a partial batch).
        let mut ack_vv = VersionVector::default();
        ack_vv.set(node, have);
        if let Some(s) = self.sessions.get_mut(&sid) {
            // The error, if any, was queued first; put the ack before it.
            let ack = pb::HubMessage {
                body: Some(pb::hub_message::Body::Ack(pb::Ack {
                    version_vector: Some(wire::vv_to_proto(&ack_vv)),
                })),
            };
            if control == Control::Continue {
                s.outbox.push_back(ack);
            } else {
                let at = s.outbox.len().saturating_sub(1);
                s.outbox.insert(at, ack);
            }
        }
        Ok(control)
    }

    /// The next message for session `sid`.
    pub fn poll_transmit(&mut self, sid: SessionId) -> Result<Option<pb::HubMessage>> {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Ok(None);
        };
        if let Some(m) = s.outbox.pop_front() {
            return Ok(Some(m));
        }
        let Some(node) = s.node.clone() else {
            return Ok(None);
        };
        if s.snap.is_some() {
            return self.snapshot_chunk(sid);
        }
        if s.publish_only || s.inflight >= MAX_INFLIGHT_BATCHES {
            return Ok(None);
        }
        let budget = self.settings.batch_size.max(1);
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        let mut sent = s.sent.clone();
        let mut record = SentBatch::default();
        let lagging: Vec<(&NodeId, u64)> = self
            .vv
            .0
            .iter()
            .filter(|(origin, held)| **origin != node && sent.get(origin) < **held)
            .map(|(origin, held)| (origin, *held))
            .collect();
        if lagging.is_empty() {
            return Ok(None);
        }
        let start = s.next_origin % lagging.len();
        s.next_origin = s.next_origin.wrapping_add(1);
        let rotated = lagging[start..].iter().chain(&lagging[..start]);
        'origins: for &(origin, held) in rotated {
            let from = sent.get(origin);
            // Old single-op keys first (they hold the lower seqs), then the
            // packed chunks: the first chunk named at or above `from + 1`
            // holds it.
            let mut found: Vec<pb::Op> = Vec::new();
            for (_, v) in self.store.range(
                &op_key(origin, from + 1),
                &op_key(origin, held + 1),
                budget - ops.len(),
            )? {
                found.push(pb::Op::decode(v.as_slice()).map_err(corrupt_op)?);
            }
            let mut cursor = packed_key(origin, from + 1);
            let end = packed_key(origin, u64::MAX);
            let mut next = from + 1 + found.len() as u64;
            'chunks: while next <= held && ops.len() + found.len() < budget {
                let Some((k, v)) = self.store.range(&cursor, &end, 1)?.pop() else {
                    break;
                };
                for op in pb::OpBatch::decode(v.as_slice()).map_err(corrupt_op)?.ops {
                    let seq = op.id.as_ref().map(|i| i.seq).unwrap_or(0);
                    if seq < next {
                        continue;
                    }
                    if seq > held || ops.len() + found.len() >= budget {
                        break 'chunks;
                    }
                    next = seq + 1;
                    found.push(op);
                }
                cursor = k;
                cursor.push(0);
            }
            for op in found {
                bytes += op.encoded_len();
                let seq = op.id.as_ref().map(|i| i.seq).unwrap_or(0);
                let hlc = op.hlc.as_ref().map(|h| h.time).unwrap_or(0);
                let oldest = record.oldest.entry(op.table.clone()).or_insert(hlc);
                *oldest = (*oldest).min(hlc);
                match record.upto.last_mut() {
                    Some((o, q)) if o == origin => *q = seq,
                    _ => record.upto.push((origin.clone(), seq)),
                }
                ops.push(op);
                sent.advance(origin, seq);
                if ops.len() >= budget || bytes >= MAX_BATCH_BYTES {
                    break 'origins;
                }
            }
        }
        if ops.is_empty() {
            return Ok(None);
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.sent = sent;
            s.inflight += 1;
            // Bounded: the node acks every batch; a lost ack only loses a sample.
            if s.sent_batches.len() as u64 >= 2 * MAX_INFLIGHT_BATCHES {
                s.sent_batches.pop_front();
            }
            s.sent_batches.push_back(record);
        }
        Ok(Some(pb::HubMessage {
            body: Some(pb::hub_message::Body::Ops(pb::OpBatch { ops })),
        }))
    }

    /// The node a session belongs to (after its hello).
    pub fn session_node(&self, sid: SessionId) -> Option<&NodeId> {
        self.sessions.get(&sid).and_then(|s| s.node.as_ref())
    }

    /// Every open session.
    pub fn sessions(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// The status shown by `syncmesh status` and the Status RPC.
    pub fn status(&self) -> pb::StatusReply {
        let connected: Vec<&NodeId> = self
            .sessions
            .values()
            .filter_map(|s| s.node.as_ref())
            .collect();
        let nodes = self
            .nodes
            .iter()
            .map(|(n, rec)| {
                let pending: u64 = if rec.mode == "publish" {
                    0
                } else {
                    self.vv
                        .0
                        .iter()
                        .filter(|(o, _)| *o != n)
                        .map(|(o, v)| v.saturating_sub(rec.acked.get(o)))
                        .sum()
                };
                pb::NodeStatus {
                    node: n.as_str().to_owned(),
                    connected: connected.contains(&n),
                    acked: Some(wire::vv_to_proto(&rec.acked)),
                    pending_ops: pending,
                    last_seen_unix_ms: rec.last_seen_ms,
                    mode: rec.mode.clone(),
                    engine: self.metrics.engines.get(n).cloned().unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect();
        pb::StatusReply {
            hub: self.settings.name.as_str().to_owned(),
            version_vector: Some(wire::vv_to_proto(&self.vv)),
            total_ops: self.vv.total(),
            nodes,
            errors_total: self.errors_total,
            gc_cut: Some(wire::cut_to_proto(&self.gc.cut)),
            gc_cuts: self.gc.stats.cuts,
            gc_rows_collected: self.gc.stats.rows_collected,
            gc_rows_dropped: self.gc.stats.rows_dropped,
            gc_refused: self.gc.stats.refused,
            gc_cut_advanced_unix_ms: self.gc.stats.cut_advanced_ms,
            gc_snapshots_served: self.gc.stats.snapshots_served,
            gc_ops_compacted: self.gc.stats.ops_compacted,
            gc_writes_dropped: self.gc.stats.writes_dropped,
            ..Default::default()
        }
    }
}

/// Tombstone garbage collection (see ARCHITECTURE.md, invariant 6).
impl<S: LogStore> HubCore<S> {
    /// A writer silent for longer than this no longer holds back
    /// collection (it must then catch up before it may publish again).
    pub fn set_tombstone_grace_hours(&mut self, hours: u64) {
        self.set_tombstone_grace_ms(hours.max(1).saturating_mul(3_600_000));
    }

    /// Like [`HubCore::set_tombstone_grace_hours`], in milliseconds (tests).
    pub fn set_tombstone_grace_ms(&mut self, ms: u64) {
        self.gc.grace_ms = ms.max(1);
    }

    /// The configured nodes (name to mode): a configured writer that never
    /// connected holds collection back until the grace has passed since
    /// this core started.
    pub fn set_gc_nodes(&mut self, nodes: BTreeMap<NodeId, String>) {
        self.gc.configured = nodes;
    }

    /// The cut the hub collected at (empty before the first).
    pub fn gc_cut(&self) -> &StableCut {
        &self.gc.cut
    }

    /// GC counters.
    pub fn gc_stats(&self) -> &GcStats {
        &self.gc.stats
    }

    /// What the hub remembers of `node` for GC.
    pub fn gc_node(&self, node: &NodeId) -> Option<&GcNode> {
        self.gc.nodes.get(node)
    }

    /// How many row states the hub stores (for tests and status).
    pub fn row_state_count(&self) -> Result<usize> {
        Ok(self
            .store
            .range(P_ROW, &prefix_end(P_ROW), usize::MAX)?
            .len())
    }

    /// Adopts a new stable cut when the current pass is done and the nodes'
    /// reports allow a larger one, then collects at most `max_rows` row
    /// states (one flushed batch). Returns the rows examined.
    pub fn handle_gc(&mut self, now: Ntp64, max_rows: usize) -> Result<usize> {
        let now_ms = now.as_unix_millis();
        let started = *self.gc.started_ms.get_or_insert(now_ms);
        if self.gc.cursor.is_none()
            && let Some((cut, participants)) = self.compute_cut(now_ms, started)
            && cut.stable != self.gc.cut.stable
            && cut.stable.dominates(&self.gc.cut.stable)
        {
            self.adopt(cut, participants)?;
            self.gc.stats.cut_advanced_ms = now_ms;
        }
        let n = self.gc_step(max_rows.max(1))?;
        if self.gc.cursor.is_none() {
            self.compact_step(COMPACT_OPS_PER_STEP.min(max_rows.max(1)))?;
        }
        Ok(n)
    }

    /// The componentwise minimum of the seen reports of every writer that
    /// takes part (not subscribe-only, heard from within the grace or
    /// connected), with the hub's version vector as horizon. `None` while
    /// a participant has not reported, or reported own ops the hub does
    /// not hold yet (the cut would not be valid here, P1/P2).
    fn compute_cut(&self, now_ms: u64, started_ms: u64) -> Option<(StableCut, Vec<NodeId>)> {
        let connected: Vec<&NodeId> = self
            .sessions
            .values()
            .filter_map(|s| s.node.as_ref())
            .collect();
        let writers = self.node_modes(started_ms);
        let mut stable: Option<VersionVector> = None;
        let mut participants = Vec::new();
        for (n, (mode, last_ms)) in writers {
            if mode == "subscribe" {
                continue; // never writes: cannot violate P2
            }
            if !connected.contains(&n) && now_ms.saturating_sub(last_ms) > self.gc.grace_ms {
                continue; // silent beyond the grace: excluded (gated on return)
            }
            let report = self.gc.nodes.get(n)?.seen.as_ref()?;
            let held = self.vv.get(n);
            if report.get(n) > held {
                return None;
            }
            let mut v = VersionVector::default();
            for (origin, have) in &self.vv.0 {
                // Own ops the hub holds beyond the report were written
                // after it; never beyond what the hub holds (P1 here).
                let seen = if origin == n {
                    held
                } else {
                    report.get(origin).min(*have)
                };
                let s = match &stable {
                    None => seen,
                    Some(st) => st.get(origin).min(seen),
                };
                v.set(origin.clone(), s);
            }
            stable = Some(v);
            participants.push(n.clone());
        }
        let mut stable = stable?;
        stable.0.retain(|_, s| *s > 0);
        let cut = StableCut {
            stable,
            horizon: self.vv.clone(),
        };
        (!cut.is_empty()).then_some((cut, participants))
    }

    fn gc_node_key(node: &NodeId) -> Vec<u8> {
        let mut k = P_GC_NODE.to_vec();
        k.extend_from_slice(node.as_str().as_bytes());
        k
    }

    /// Persists (flushed) the cut and the participants' trust, then tells
    /// every GC-speaking session.
    fn adopt(&mut self, cut: StableCut, participants: Vec<NodeId>) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(K_GC_CUT.to_vec(), enc(&cut)?);
        for n in participants {
            let rec = self.gc.nodes.entry(n.clone()).or_default();
            rec.joined = cut.stable.clone();
            batch.put(Self::gc_node_key(&n), enc(rec)?);
        }
        self.store.write(batch)?;
        self.store.flush()?;
        let msg = pb::HubMessage {
            body: Some(pb::hub_message::Body::Cut(wire::cut_to_proto(&cut))),
        };
        for s in self.sessions.values_mut() {
            if s.gc && s.node.is_some() {
                s.outbox.push_back(msg.clone());
            }
        }
        self.gc.cut = cut;
        self.gc.cursor = Some(P_ROW.to_vec());
        self.gc.stats.cuts += 1;
        Ok(())
    }

    /// Every known node with its mode and when it was last heard from: the
    /// config's (heard from at `started_ms`), overridden by what each node's
    /// own hello said.
    fn node_modes(&self, started_ms: u64) -> BTreeMap<&NodeId, (&str, u64)> {
        let mut modes: BTreeMap<&NodeId, (&str, u64)> = self
            .gc
            .configured
            .iter()
            .map(|(n, mode)| (n, (mode.as_str(), started_ms)))
            .collect();
        for (n, rec) in &self.nodes {
            modes.insert(n, (rec.mode.as_str(), rec.last_seen_ms));
        }
        modes
    }

    /// The cut the hub collects its own row states at: the stable cut,
    /// lowered, for every publish-only writer excluded from it, to what that
    /// writer had seen of the other origins (its last seen report; nothing
    /// without one). Such a writer never sees another origin's op, so each
    /// of its later writes is concurrent with every delete it did not see:
    /// the hub judges them against those tombstones
    /// ([`RowState::loses_to_delete`]), so it keeps them while replicas
    /// collect theirs. Its own ops are ordered, so its own component stays.
    pub fn gc_collect_cut(&self) -> VersionVector {
        let mut cut = self.gc.cut.stable.clone();
        for (n, (mode, _)) in self.node_modes(0) {
            if mode != "publish" || !self.gc_excluded(n) {
                continue;
            }
            let seen = self.gc.nodes.get(n).and_then(|g| g.seen.as_ref());
            for (origin, stable) in cut.0.iter_mut() {
                if origin != n {
                    *stable = (*stable).min(seen.map_or(0, |s| s.get(origin)));
                }
            }
        }
        cut.0.retain(|_, s| *s > 0);
        cut
    }

    /// Collects up to `max_rows` row states at the current cut.
    fn gc_step(&mut self, max_rows: usize) -> Result<usize> {
        let Some(from) = self.gc.cursor.clone() else {
            return Ok(0);
        };
        let rows = self.store.range(&from, &prefix_end(P_ROW), max_rows)?;
        let cut = self.gc_collect_cut();
        let mut batch = WriteBatch::default();
        for (k, v) in &rows {
            let mut row: RowState = dec(v, "row state")?;
            if row.is_compact() {
                continue; // nothing a cut can collect
            }
            let before = row.clone();
            let mut xk = P_ROW_CONFLICTS.to_vec();
            xk.extend_from_slice(&k[P_ROW.len()..]);
            if row.collect_garbage(&cut) {
                // Nothing left: no candidate set can grow any more, so the
                // row's conflict list goes too (the records stay).
                batch.remove(k.clone());
                batch.remove(xk);
                self.gc.stats.rows_dropped += 1;
            } else if row != before {
                self.forget_settled_conflicts(&xk, &row, &mut batch)?;
                batch.put(k.clone(), enc(&row)?);
                self.gc.stats.rows_collected += 1;
            }
        }
        self.gc.cursor = syncmesh_node::store::next_cursor(&rows, max_rows);
        if !batch.is_empty() {
            self.store.write(batch)?;
            self.store.flush()?;
        }
        Ok(rows.len())
    }

    /// Drops from a row's conflict list (`x/`) the records whose candidate
    /// set the collection settled, so a later merge does not delete them
    /// as "replaced": they stay until their retention ends.
    fn forget_settled_conflicts(
        &self,
        xk: &[u8],
        row: &RowState,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        let Some(b) = self.store.get(xk)? else {
            return Ok(());
        };
        let keys = postcard::from_bytes::<Vec<Vec<u8>>>(&b).unwrap_or_default();
        let mut kept = Vec::with_capacity(keys.len());
        for key in &keys {
            let record = self
                .store
                .get(key)?
                .and_then(|v| pb::ConflictRecord::decode(v.as_slice()).ok());
            let Some(record) = record else {
                kept.push(key.clone()); // expired: merge handles it as before
                continue;
            };
            let Some(rules) = self.tables.get(&record.table) else {
                kept.push(key.clone());
                continue;
            };
            let mut ids: Vec<(String, u64)> = record
                .candidates
                .iter()
                .filter_map(|c| c.op.as_ref().map(|o| (o.origin.clone(), o.seq)))
                .collect();
            ids.sort();
            let live = row.conflicts(rules).iter().any(|c| {
                let mut cids: Vec<(String, u64)> = c
                    .candidates
                    .iter()
                    .map(|x| (x.op.origin.as_str().to_owned(), x.op.seq))
                    .collect();
                cids.sort();
                c.field == record.field && cids == ids
            });
            if live {
                kept.push(key.clone());
            }
        }
        if kept != keys {
            batch.put(xk.to_vec(), enc(&kept)?);
        }
        Ok(())
    }

    /// Records a node's seen report; a node that missed a collected cut
    /// is trusted again once it reports having seen it with every own op
    /// written before the report already at the hub.
    fn note_seen(&mut self, node: &NodeId, seen: VersionVector) -> Result<()> {
        let held = self.vv.get(node);
        let cut = self.gc.cut.stable.clone();
        let rec = self.gc.nodes.entry(node.clone()).or_default();
        let trusted_now =
            !rec.joined.dominates(&cut) && seen.dominates(&cut) && seen.get(node) <= held;
        if trusted_now {
            rec.joined = cut;
        }
        rec.seen = Some(seen);
        let mut batch = WriteBatch::default();
        batch.put(Self::gc_node_key(node), enc(rec)?);
        self.store.write(batch)?;
        if trusted_now {
            // Its ops are accepted from now on: that must survive a crash.
            self.store.flush()?;
        }
        Ok(())
    }

    /// Why `node` may not publish now, if it may not: it did not take part
    /// in the collected cut and has not shown it saw it since.
    fn gc_untrusted(&self, node: &NodeId) -> Option<String> {
        if !self.gc_excluded(node) {
            return None;
        }
        Some(format!(
            "node {node} wrote ops before it saw deletes the mesh has already garbage-collected \
             (it was silent longer than tombstone_grace_hours = {} h, or joined after collection \
             began); merging them could bring deleted rows back, so the hub refuses them. They \
             stay in the node's log: a bidirectional node is re-snapshotted from the hub on its \
             next connection and then sends them; a publish-only node's writes are judged by \
             the hub against its merged row states, which it holds only for the tables in its \
             config: add the table to the hub's tables",
            self.gc.grace_ms / 3_600_000
        ))
    }

    /// Whether `node` missed deletes the mesh has collected and has not
    /// been brought back since (its writes are judged or refused).
    pub fn gc_excluded(&self, node: &NodeId) -> bool {
        !self.gc.cut.is_empty()
            && !self
                .gc
                .nodes
                .get(node)
                .is_some_and(|g| g.joined.dominates(&self.gc.cut.stable))
    }

    /// Lines the shell should log (a re-snapshot started or installed).
    pub fn poll_notice(&mut self) -> Option<String> {
        self.gc.notices.pop_front()
    }

    /// Per origin, the highest seq dropped from the op log by compaction.
    pub fn gc_compacted(&self) -> &VersionVector {
        &self.gc.compacted
    }

    /// Ops the hub's op log holds, compacted ones in a chunk that reaches
    /// above the compacted point included (for tests: it reads the whole
    /// log).
    pub fn stored_op_count(&self) -> Result<usize> {
        let mut n = self
            .store
            .range(P_OPS, &prefix_end(P_OPS), usize::MAX)?
            .len();
        for (_, v) in self
            .store
            .range(P_OPS_PACKED, &prefix_end(P_OPS_PACKED), usize::MAX)?
        {
            n += pb::OpBatch::decode(v.as_slice())
                .map_err(corrupt_op)?
                .ops
                .len();
        }
        Ok(n)
    }

    /// Whether the node of a hello must be re-snapshotted: it is not
    /// trusted (missed the collected cut) and holds own ops the hub lacks
    /// (written before it saw collected deletes), or it lacks ops the hub
    /// compacted away. A node that installed a re-snapshot at the current
    /// cut is trusted again.
    fn gc_resnap_needed(
        &self,
        node: &NodeId,
        node_vv: &VersionVector,
        subscribe_only: bool,
        progress: Option<&wire::SnapshotProgress>,
    ) -> Resnap {
        let compacted = self
            .gc
            .compacted
            .0
            .iter()
            .find(|(o, c)| *o != node && node_vv.get(o) < **c)
            .map(|(o, c)| format!("it lacks ops of {o} up to #{c} that the hub compacted away"));
        let untrusted = if subscribe_only {
            None
        } else {
            self.gc_untrusted(node)
        };
        let held = self.vv.get(node);
        let has = node_vv.get(node);
        if untrusted.is_some()
            && compacted.is_none()
            && progress
                .is_some_and(|p| p.installed && p.cut.stable == self.gc.cut.stable && has >= held)
        {
            return Resnap::Trusted;
        }
        let unsent = (untrusted.is_some() && has > held).then(|| {
            format!(
                "it missed deletes the mesh has garbage-collected (away longer than \
                 tombstone_grace_hours = {} h, or new) and holds unsent ops {node}#{}..={node}#{has} \
                 written before it saw them",
                self.gc.grace_ms / 3_600_000,
                held + 1
            )
        });
        // Publish-only until now: the hub may have dropped writes of it
        // that its own row states still hold (or a re-snapshot started
        // for that reason is not installed yet).
        let unsent = unsent.or_else(|| {
            let was_publish = self.nodes.get(node).is_some_and(|r| r.mode == "publish");
            let resuming = progress.is_some_and(|p| !p.installed && p.id != 0);
            (untrusted.is_some() && (was_publish || resuming)).then(|| {
                format!(
                    "it missed deletes the mesh has garbage-collected (away longer than \
                     tombstone_grace_hours = {} h) while it was publish-only, so its row \
                     states may hold writes the hub dropped",
                    self.gc.grace_ms / 3_600_000
                )
            })
        });
        match (unsent, compacted) {
            (Some(a), Some(b)) => Resnap::Needed(format!("{a}, and {b}")),
            (Some(a), None) | (None, Some(a)) => Resnap::Needed(a),
            (None, None) => Resnap::No,
        }
    }

    /// Marks `node` as having seen the collected cut (its ops are accepted).
    fn set_joined(&mut self, node: &NodeId, joined: VersionVector) -> Result<()> {
        let rec = self.gc.nodes.entry(node.clone()).or_default();
        rec.joined = joined;
        let mut batch = WriteBatch::default();
        batch.put(Self::gc_node_key(node), enc(rec)?);
        self.store.write(batch)?;
        self.store.flush()?;
        Ok(())
    }

    fn trust(&mut self, node: &NodeId) -> Result<()> {
        let cut = self.gc.cut.stable.clone();
        self.set_joined(node, cut)
    }

    /// Starts (or resumes, when the node's progress is for the current cut
    /// and every op above its vector is still here) a re-snapshot.
    fn start_snapshot(
        &mut self,
        now_ms: u64,
        sid: SessionId,
        node: &NodeId,
        why: String,
        progress: Option<&wire::SnapshotProgress>,
    ) -> Result<SnapServe> {
        let resume = progress.filter(|p| {
            !p.installed
                && p.id != 0
                && p.cut.stable == self.gc.cut.stable
                && self.vv.dominates(&p.vv)
                && p.vv.dominates(&self.gc.compacted)
        });
        let snap = match resume {
            Some(p) => {
                let mut cursor = P_ROW.to_vec();
                cursor.extend_from_slice(&p.after_key);
                if !p.after_key.is_empty() {
                    cursor.push(0);
                }
                SnapServe {
                    id: p.id,
                    cut: self.gc.cut.clone(),
                    vv: p.vv.clone(),
                    sent_any: true,
                    cursor,
                    inflight: false,
                    sent_last: false,
                }
            }
            None => SnapServe {
                id: (now_ms << 16) | (sid & 0xffff),
                cut: self.gc.cut.clone(),
                vv: self.vv.clone(),
                sent_any: false,
                cursor: P_ROW.to_vec(),
                inflight: false,
                sent_last: false,
            },
        };
        self.gc.notices.push_back(format!(
            "re-snapshot of node {node}: {why}; the hub {} snapshot {} of its row states at stable \
             cut [{}]: the node replaces its row states with them (rows deleted meanwhile are \
             deleted from its database), then its unsent writes are merged (under delete_wins, \
             updates to rows deleted and collected meanwhile are dropped)",
            if resume.is_some() { "resumes" } else { "sends" },
            snap.id,
            fmt_vv(&snap.cut.stable),
        ));
        Ok(snap)
    }

    /// The next chunk of the session's re-snapshot, if one may go now.
    fn snapshot_chunk(&mut self, sid: SessionId) -> Result<Option<pb::HubMessage>> {
        let Some(snap) = self.sessions.get(&sid).and_then(|s| s.snap.clone()) else {
            return Ok(None);
        };
        if snap.inflight || snap.sent_last {
            return Ok(None);
        }
        // Rows go out only once collected at the snapshot's cut: while the
        // pass at that cut is still running, a row ahead of it may hold a
        // tombstone below the cut, and the node would keep an update it
        // made meanwhile to that row (see `lost_update` in the node core)
        // that a replica collecting first would show: they would diverge.
        if self.gc.cursor.is_some() && self.gc.cut.stable == snap.cut.stable {
            return Ok(None);
        }
        // The rows read now reflect every op the hub holds now: a fresh
        // snapshot that waited takes the version vector of this moment, so
        // the node neither lacks ops its rows hold nor misses any.
        let vv = if snap.sent_any {
            snap.vv.clone()
        } else {
            self.vv.clone()
        };
        let rows = self
            .store
            .range(&snap.cursor, &prefix_end(P_ROW), SNAPSHOT_ROWS_PER_CHUNK)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        let mut last_key: Option<&Vec<u8>> = None;
        let mut complete = rows.len() < SNAPSHOT_ROWS_PER_CHUNK;
        for (i, (k, v)) in rows.iter().enumerate() {
            let (table, key) = syncmesh_node::core::split_row_key(k, P_ROW.len())?;
            let row = pb::SnapshotRow {
                table,
                key: key.iter().map(wire::value_to_proto).collect(),
                state: v.clone(),
            };
            bytes += row.encoded_len();
            out.push(row);
            last_key = Some(k);
            if bytes >= MAX_BATCH_BYTES && i + 1 < rows.len() {
                complete = false;
                break;
            }
        }
        let after_key = last_key
            .map(|k| k[P_ROW.len()..].to_vec())
            .unwrap_or_default();
        let cursor = match last_key {
            Some(k) => {
                let mut c = k.clone();
                c.push(0);
                c
            }
            None => snap.cursor.clone(),
        };
        let msg = pb::SnapshotChunk {
            id: snap.id,
            cut: Some(wire::cut_to_proto(&snap.cut)),
            version_vector: Some(wire::vv_to_proto(&vv)),
            tables: self.tables.keys().cloned().collect(),
            rows: out,
            after_key,
            last: complete,
            state_format: syncmesh_proto::SNAPSHOT_STATE_FORMAT,
        };
        if let Some(s) = self.sessions.get_mut(&sid).and_then(|s| s.snap.as_mut()) {
            s.inflight = true;
            s.sent_last = complete;
            s.cursor = cursor;
            s.vv = vv;
            s.sent_any = true;
        }
        Ok(Some(pb::HubMessage {
            body: Some(pb::hub_message::Body::Snapshot(msg)),
        }))
    }

    fn snapshot_ack(
        &mut self,
        sid: SessionId,
        node: &NodeId,
        a: pb::SnapshotAck,
    ) -> Result<Control> {
        let Some(snap) = self.sessions.get(&sid).and_then(|s| s.snap.clone()) else {
            return Ok(self.reject(
                sid,
                "unexpected_snapshot_ack",
                format!(
                    "node {node} acknowledged a snapshot chunk but no re-snapshot is being served"
                ),
                None,
            ));
        };
        if a.id != snap.id || (a.installed && !snap.sent_last) {
            return Ok(self.reject(
                sid,
                "bad_snapshot_ack",
                format!(
                    "node {node} acknowledged snapshot {} (installed: {}) but the hub serves snapshot {} (last chunk sent: {})",
                    a.id, a.installed, snap.id, snap.sent_last
                ),
                None,
            ));
        }
        if !a.installed {
            if let Some(s) = self.sessions.get_mut(&sid).and_then(|s| s.snap.as_mut()) {
                s.inflight = false;
            }
            return Ok(Control::Continue);
        }
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.snap = None;
            s.sent = snap.vv.clone();
            s.inflight = 0;
            s.sent_batches.clear();
        }
        let rec = self.nodes.entry(node.clone()).or_default();
        for (o, v) in &snap.vv.0 {
            rec.acked.advance(o, *v);
        }
        let rec = rec.clone();
        self.save_node(node, &rec)?;
        self.set_joined(node, snap.cut.stable.clone())?;
        self.gc.stats.snapshots_served += 1;
        self.gc.notices.push_back(format!(
            "re-snapshot of node {node}: snapshot {} installed; it holds the hub's row states at \
             [{}] and publishes again",
            snap.id,
            fmt_vv(&snap.vv)
        ));
        Ok(Control::Continue)
    }

    /// Drops ops from the op log that every writer has seen (below the
    /// stable cut) and every connected node was sent: at most `max` keys in
    /// one flushed batch. A node that needs them later gets a re-snapshot.
    fn compact_step(&mut self, max: usize) -> Result<usize> {
        if self.gc.unmerged || self.gc.cut.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        let mut n = 0usize;
        let mut compacted = self.gc.compacted.clone();
        for (origin, stable) in &self.gc.cut.stable.0 {
            if n >= max {
                break;
            }
            let mut upto = (*stable).min(self.vv.get(origin));
            for s in self.sessions.values() {
                if s.node.as_ref().is_some_and(|x| x != origin) && !s.publish_only {
                    upto = upto.min(s.sent.get(origin));
                }
            }
            let from = compacted.get(origin);
            if upto <= from {
                continue;
            }
            // Old single-op keys (the lower seqs) first, then the packed
            // chunks whose last seq is at most `upto` (a chunk reaching
            // above it stays; its lower ops count as compacted).
            let mut last = from;
            let mut done = true;
            for key in [op_key, packed_key] {
                let room = max - n;
                if room == 0 {
                    done = false;
                    break;
                }
                let keys =
                    self.store
                        .range(&key(origin, from + 1), &key(origin, upto + 1), room)?;
                let full = keys.len() >= room;
                for (k, _) in keys {
                    last = k
                        .len()
                        .checked_sub(8)
                        .and_then(|i| k[i..].try_into().ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(last)
                        .max(last);
                    batch.remove(k);
                    n += 1;
                }
                if full {
                    done = false;
                    break;
                }
            }
            compacted.set(origin.clone(), if done { upto } else { last });
        }
        if compacted != self.gc.compacted {
            batch.put(K_GC_COMPACTED.to_vec(), enc(&compacted)?);
            self.store.write(batch)?;
            self.store.flush()?;
            // Ops, not keys: a packed key holds up to OPS_PER_KEY ops.
            let dropped: u64 = compacted
                .0
                .iter()
                .map(|(o, upto)| upto.saturating_sub(self.gc.compacted.get(o)))
                .sum();
            self.gc.compacted = compacted;
            self.gc.stats.ops_compacted += dropped;
        }
        Ok(n)
    }

    /// Why a hello must be refused: the node is not trusted and holds own
    /// ops the hub lacks (written before it could have seen the cut).
    fn gc_refusal(&self, node: &NodeId, hello_vv: &VersionVector) -> Option<String> {
        let held = self.vv.get(node);
        let has = hello_vv.get(node);
        if has <= held {
            return None;
        }
        self.gc_untrusted(node)
            .map(|why| format!("{why} (unsent ops {node}#{}..={node}#{has})", held + 1))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use syncmesh_node::store::MemStore;
    use syncmesh_resolver::{FieldWrite, Hlc, Op, OpId, Value};

    fn hub() -> HubCore<MemStore> {
        let settings = HubSettings {
            name: NodeId::new("hub").unwrap(),
            batch_size: 2,
            max_clock_drift_ms: 500,
        };
        HubCore::open(settings, MemStore::default()).unwrap()
    }

    fn now() -> Ntp64 {
        Ntp64::from_unix_millis(1_000_000)
    }

    fn op(origin: &str, seq: u64, ahead_ms: u64) -> pb::Op {
        let o = NodeId::new(origin).unwrap();
        let hlc = Hlc {
            time: Ntp64::from_unix_millis(1_000_000 + ahead_ms).0,
            id: o.hlc_id(),
        };
        wire::op_to_proto(&Op::upsert(
            OpId::new(o, seq),
            hlc,
            "t",
            vec![Value::Int(seq as i64)],
            vec![FieldWrite::new("v", Value::Int(1))],
        ))
    }

    fn hello(node: &str, mode: &str) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Hello(pb::Hello {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                node: node.into(),
                version_vector: None,
                mode: mode.into(),
                engine: "sqlite".into(),
                seen: None,
                resnap: false,
                snapshot: None,
            })),
        }
    }

    fn batch(ops: Vec<pb::Op>) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Ops(pb::OpBatch { ops })),
        }
    }

    fn drain(h: &mut HubCore<MemStore>, sid: SessionId) -> Vec<pb::HubMessage> {
        let mut out = Vec::new();
        while let Some(m) = h.poll_transmit(sid).unwrap() {
            out.push(m);
        }
        out
    }

    fn session(h: &mut HubCore<MemStore>, node: &str, mode: &str) -> SessionId {
        let sid = h.handle_open();
        assert_eq!(
            h.handle_message(now(), sid, hello(node, mode)).unwrap(),
            Control::Continue
        );
        let msgs = drain(h, sid);
        assert!(matches!(
            msgs[0].body,
            Some(pb::hub_message::Body::Hello(_))
        ));
        sid
    }

    fn error_code(msgs: &[pb::HubMessage]) -> Option<String> {
        msgs.iter().find_map(|m| match &m.body {
            Some(pb::hub_message::Body::Error(e)) => Some(e.code.clone()),
            _ => None,
        })
    }

    #[test]
    fn stores_flushes_then_acks_and_fans_out_in_bounded_batches() {
        let mut h = hub();
        let a = session(&mut h, "a", "bidirectional");
        let b = session(&mut h, "b", "bidirectional");
        let flushes = h.store.flushes;
        let ctl = h
            .handle_message(now(), a, batch((1..=5).map(|s| op("a", s, 0)).collect()))
            .unwrap();
        assert_eq!(ctl, Control::Continue);
        assert_eq!(h.store.flushes, flushes + 1);
        let to_a = drain(&mut h, a);
        assert!(
            matches!(&to_a[0].body, Some(pb::hub_message::Body::Ack(ack))
            if ack.version_vector.as_ref().unwrap().entries["a"] == 5)
        );
        assert_eq!(to_a.len(), 1, "a is not sent its own ops");
        let to_b = drain(&mut h, b);
        let sizes: Vec<usize> = to_b
            .iter()
            .map(|m| match &m.body {
                Some(pb::hub_message::Body::Ops(o)) => o.ops.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![2, 2, 1], "batches of at most batch_size");
        // Survives a crash: it was flushed before the ack.
        let mut store = std::mem::take(&mut h.store);
        store.crash();
        let h = HubCore::open(h.settings.clone(), store).unwrap();
        assert_eq!(h.version_vector().get(&NodeId::new("a").unwrap()), 5);
    }

    /// The mirror queue names every record added or removed, in the
    /// flushed batch that stores it; off clears it.
    #[test]
    fn conflict_mirror_queue_follows_added_and_replaced_records() {
        let queue = |h: &HubCore<MemStore>| -> Vec<Vec<u8>> {
            h.store
                .range(P_MIRROR_QUEUE, &prefix_end(P_MIRROR_QUEUE), usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(k, v)| {
                    assert!(mirror_queue_number(&k).is_some());
                    v
                })
                .collect()
        };
        let write = |origin: &str, v: i64| {
            let o = NodeId::new(origin).unwrap();
            let hlc = Hlc {
                time: Ntp64::from_unix_millis(1_000_000 + v as u64).0,
                id: o.hlc_id(),
            };
            batch(vec![wire::op_to_proto(&Op::upsert(
                OpId::new(o, 1),
                hlc,
                "t",
                vec![Value::Int(7)],
                vec![FieldWrite::new("v", Value::Int(v))],
            ))])
        };
        let mut h = hub();
        h.set_tables(BTreeMap::from([("t".to_owned(), TableRules::default())]));
        h.set_conflict_mirror(true).unwrap();
        let sids: Vec<SessionId> = ["a", "b", "c"]
            .iter()
            .map(|n| session(&mut h, n, "bidirectional"))
            .collect();
        h.handle_message(now(), sids[0], write("a", 1)).unwrap();
        assert!(queue(&h).is_empty(), "one write is no conflict");
        h.handle_message(now(), sids[1], write("b", 2)).unwrap();
        let q = queue(&h);
        assert_eq!(q.len(), 1, "the record of two writes");
        h.handle_message(now(), sids[2], write("c", 3)).unwrap();
        // Flushed with the records: a crash keeps them.
        h.store.crash();
        let q = queue(&h);
        assert_eq!(q.len(), 3, "two-write record removed, three-write added");
        assert_eq!(q[0], q[1]);
        assert!(h.store.get(&q[0]).unwrap().is_none(), "replaced");
        let three = pb::ConflictRecord::decode(h.store.get(&q[2]).unwrap().unwrap().as_slice());
        assert_eq!(three.unwrap().candidates.len(), 3);
        // Reopened with the mirror on: numbering continues.
        let store = std::mem::take(&mut h.store);
        let mut h = HubCore::open(h.settings.clone(), store).unwrap();
        h.set_conflict_mirror(true).unwrap();
        assert_eq!(h.mirror_next, Some(3));
        // Off: the queue and the full-copy marker go.
        let mut b = WriteBatch::default();
        b.put(K_MIRROR.to_vec(), b"x".to_vec());
        h.store.write(b).unwrap();
        h.set_conflict_mirror(false).unwrap();
        assert!(queue(&h).is_empty());
        assert!(h.store.get(K_MIRROR).unwrap().is_none());
    }

    /// A queue at its limit is dropped and its generation bumped (a full
    /// copy is due); no entry is ever queued past the limit, and queueing
    /// goes on after the drop.
    #[test]
    fn conflict_mirror_queue_is_bounded_and_an_overflow_bumps_the_generation() {
        let queued = |h: &HubCore<MemStore>| -> Vec<u64> {
            h.store
                .range(P_MIRROR_QUEUE, &prefix_end(P_MIRROR_QUEUE), usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(k, _)| mirror_queue_number(&k).unwrap())
                .collect()
        };
        // Two concurrent writes of row `key`: one conflict record.
        let write = |origin: &str, seq: u64, key: i64| {
            let o = NodeId::new(origin).unwrap();
            let hlc = Hlc {
                time: Ntp64::from_unix_millis(1_000_000 + seq).0,
                id: o.hlc_id(),
            };
            batch(vec![wire::op_to_proto(&Op::upsert(
                OpId::new(o, seq),
                hlc,
                "t",
                vec![Value::Int(key)],
                vec![FieldWrite::new("v", Value::Int(key))],
            ))])
        };
        let mut h = hub();
        h.set_tables(BTreeMap::from([("t".to_owned(), TableRules::default())]));
        h.set_conflict_mirror(true).unwrap();
        h.set_mirror_queue_max(3);
        let a = session(&mut h, "a", "bidirectional");
        let b = session(&mut h, "b", "bidirectional");
        let conflict = |h: &mut HubCore<MemStore>, key: i64| {
            h.handle_message(now(), a, write("a", key as u64, key))
                .unwrap();
            h.handle_message(now(), b, write("b", key as u64, key))
                .unwrap();
        };
        let mut max_len = 0;
        for key in 1..=3 {
            conflict(&mut h, key);
            max_len = max_len.max(queued(&h).len());
        }
        assert_eq!(
            queued(&h),
            vec![0, 1, 2],
            "one entry per record, at the limit"
        );
        assert_eq!(mirror_generation(&h.store).unwrap(), 0);
        // The fourth record finds the queue full: it is dropped.
        conflict(&mut h, 4);
        assert!(queued(&h).is_empty(), "{:?}", queued(&h));
        assert_eq!(
            mirror_generation(&h.store).unwrap(),
            1,
            "a full copy is due"
        );
        let notice = h.poll_notice().unwrap();
        assert!(
            notice.contains("3 conflict records") && notice.contains("copies every record"),
            "{notice}"
        );
        // Queueing goes on; the mirror consuming the front makes room.
        for key in 5..=7 {
            conflict(&mut h, key);
            max_len = max_len.max(queued(&h).len());
        }
        assert_eq!(queued(&h), vec![3, 4, 5]);
        let mut consumed = WriteBatch::default();
        consumed.remove(mirror_queue_key(3));
        h.store.write(consumed).unwrap();
        conflict(&mut h, 8);
        assert_eq!(queued(&h), vec![4, 5, 6]);
        assert_eq!(mirror_generation(&h.store).unwrap(), 1);
        assert!(max_len <= 3, "the queue held {max_len} entries");
        // Every record is still in the hub's store.
        let records = h
            .store
            .range(
                P_CONFLICT_RECORDS,
                &prefix_end(P_CONFLICT_RECORDS),
                usize::MAX,
            )
            .unwrap();
        assert_eq!(records.len(), 8);
    }

    #[test]
    fn a_packed_chunk_is_the_encoded_op_batch_of_its_ops() {
        let ops: Vec<pb::Op> = (1..=3).map(|seq| op("a", seq, 0)).collect();
        let mut chunk = PackedChunk::default();
        for o in &ops {
            chunk.push(&PackedChunk::encode(o), o.id.as_ref().unwrap().seq);
        }
        let mut batch = WriteBatch::default();
        chunk.put(&mut batch, &NodeId::new("a").unwrap());
        let want = pb::OpBatch { ops: ops.clone() }.encode_to_vec();
        assert_eq!(chunk.ops, 0);
        let mut store = MemStore::default();
        store.write(batch).unwrap();
        let key = packed_key(&NodeId::new("a").unwrap(), 3);
        assert_eq!(store.get(&key).unwrap(), Some(want));
        assert_eq!(
            pb::OpBatch::decode(store.get(&key).unwrap().unwrap().as_slice())
                .unwrap()
                .ops,
            ops
        );
    }

    #[test]
    fn replays_old_single_op_keys_then_packed_chunks_in_order() {
        let settings = HubSettings {
            name: NodeId::new("hub").unwrap(),
            batch_size: 1000,
            max_clock_drift_ms: 500,
        };
        let mut h = HubCore::open(settings.clone(), MemStore::default()).unwrap();
        let a = session(&mut h, "a", "bidirectional");
        h.handle_message(now(), a, batch((1..=3).map(|s| op("a", s, 0)).collect()))
            .unwrap();
        // Rewrite those three as an older version stored them.
        let origin = NodeId::new("a").unwrap();
        let mut old = WriteBatch::default();
        for s in 1..=3 {
            old.put(op_key(&origin, s), op("a", s, 0).encode_to_vec());
        }
        old.remove(packed_key(&origin, 3));
        let mut store = std::mem::take(&mut h.store);
        store.write(old).unwrap();
        store.flush().unwrap();
        let mut h = HubCore::open(settings, store).unwrap();
        let a = session(&mut h, "a", "bidirectional");
        // 300 more in one batch: packed chunks of 256 and 44.
        h.handle_message(now(), a, batch((4..=303).map(|s| op("a", s, 0)).collect()))
            .unwrap();
        // (`session` would drain the replay with the hello reply.)
        let b = h.handle_open();
        h.handle_message(now(), b, hello("b", "bidirectional"))
            .unwrap();
        let seqs: Vec<u64> = drain(&mut h, b)
            .iter()
            .flat_map(|m| match &m.body {
                Some(pb::hub_message::Body::Ops(o)) => o.ops.clone(),
                _ => Vec::new(),
            })
            .map(|o| o.id.unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=303).collect::<Vec<_>>());
    }

    #[test]
    fn op_from_another_origin_is_refused_and_not_stored() {
        let mut h = hub();
        let a = session(&mut h, "a", "bidirectional");
        let ctl = h
            .handle_message(now(), a, batch(vec![op("b", 1, 0)]))
            .unwrap();
        assert!(matches!(ctl, Control::Close(r) if r.contains("origin")));
        assert_eq!(
            error_code(&drain(&mut h, a)).as_deref(),
            Some("origin_mismatch")
        );
        assert_eq!(h.version_vector().total(), 0);
    }

    #[test]
    fn gaps_duplicates_drift_and_protocol_misuse() {
        let mut h = hub();
        let a = session(&mut h, "a", "bidirectional");
        h.handle_message(now(), a, batch(vec![op("a", 1, 0), op("a", 2, 0)]))
            .unwrap();
        drain(&mut h, a);
        // A retry of durable ops is acknowledged again, not stored twice.
        assert_eq!(
            h.handle_message(now(), a, batch(vec![op("a", 2, 0)]))
                .unwrap(),
            Control::Continue
        );
        assert_eq!(h.version_vector().total(), 2);
        // A gap: ops before it are kept, the rest refused.
        let ctl = h
            .handle_message(now(), a, batch(vec![op("a", 3, 0), op("a", 5, 0)]))
            .unwrap();
        assert!(matches!(ctl, Control::Close(_)));
        let msgs = drain(&mut h, a);
        assert!(matches!(
            msgs[msgs.len() - 2].body,
            Some(pb::hub_message::Body::Ack(_))
        ));
        assert_eq!(error_code(&msgs).as_deref(), Some("seq_gap"));
        assert_eq!(h.version_vector().total(), 3);
        // Clock drift beyond the limit is refused with the numbers.
        let b = session(&mut h, "b", "bidirectional");
        let ctl = h
            .handle_message(now(), b, batch(vec![op("b", 1, 60_000)]))
            .unwrap();
        assert!(matches!(ctl, Control::Close(r) if r.contains("max_clock_drift")));
        let c = session(&mut h, "c", "bidirectional");
        assert_eq!(
            h.handle_message(now(), c, batch(vec![op("c", 1, 400)]))
                .unwrap(),
            Control::Continue
        );
        // Ops before hello, a second hello, and an empty message.
        let s = h.handle_open();
        assert!(matches!(
            h.handle_message(now(), s, batch(vec![])).unwrap(),
            Control::Close(_)
        ));
        assert_eq!(error_code(&drain(&mut h, s)).as_deref(), Some("no_hello"));
        assert!(matches!(
            h.handle_message(now(), c, hello("c", "")).unwrap(),
            Control::Close(_)
        ));
        let s = h.handle_open();
        let empty = pb::NodeMessage { body: None };
        assert!(matches!(
            h.handle_message(now(), s, empty).unwrap(),
            Control::Close(_)
        ));
    }

    fn conflict(table: &str, at_ms: u64, ids: &[u64]) -> pb::ConflictRecord {
        let hlc = |ms: u64| {
            Some(pb::Hlc {
                time: Ntp64::from_unix_millis(ms).0,
                id: vec![1],
            })
        };
        pb::ConflictRecord {
            hlc: hlc(at_ms),
            table: table.into(),
            key: vec![wire::value_to_proto(&Value::Int(1))],
            field: "status".into(),
            candidates: ids
                .iter()
                .map(|s| pb::ConflictCandidate {
                    op: Some(pb::OpId {
                        origin: "a".into(),
                        seq: *s,
                    }),
                    hlc: hlc(at_ms),
                    value: Some(wire::value_to_proto(&Value::Int(*s as i64))),
                })
                .collect(),
            strategy: "last_write_wins".into(),
            result: Some(wire::value_to_proto(&Value::Int(1))),
        }
    }

    #[test]
    fn conflict_records_are_deduplicated_filtered_and_expire() {
        let mut h = hub();
        h.set_conflict_retention_days(1);
        let mut b = WriteBatch::default();
        h.record_conflict(&mut b, &conflict("orders", 1_000, &[1, 2]));
        h.record_conflict(&mut b, &conflict("orders", 1_000, &[1, 2]));
        h.record_conflict(&mut b, &conflict("orders", 5_000, &[3, 4]));
        h.record_conflict(&mut b, &conflict("items", 90_000_000, &[5, 6]));
        h.store.write(b).unwrap();
        let all = h.conflicts(&pb::ConflictsRequest::default()).unwrap();
        assert_eq!(all.total, 3, "the same conflict twice is one record");
        assert_eq!(all.conflicts[0].table, "items", "newest first");
        let orders = h
            .conflicts(&pb::ConflictsRequest {
                table: "orders".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(orders.conflicts.len(), 2);
        let recent = h
            .conflicts(&pb::ConflictsRequest {
                since_unix_ms: 2_000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(recent.conflicts.len(), 2);
        // A day and a bit later, only the newest survives retention.
        h.handle_tick(Ntp64::from_unix_millis(86_400_000 + 10_000))
            .unwrap();
        assert_eq!(
            h.conflicts(&pb::ConflictsRequest::default()).unwrap().total,
            1
        );
    }

    #[test]
    fn modes_and_stream_replacement() {
        let mut h = hub();
        let publ = session(&mut h, "p", "publish");
        let sub = session(&mut h, "s", "subscribe");
        let ctl = h
            .handle_message(now(), sub, batch(vec![op("s", 1, 0)]))
            .unwrap();
        assert!(matches!(ctl, Control::Close(_)));
        h.handle_close(sub);
        let sub = session(&mut h, "s", "subscribe");
        h.handle_message(now(), publ, batch(vec![op("p", 1, 0)]))
            .unwrap();
        let to_pub = drain(&mut h, publ);
        assert_eq!(to_pub.len(), 1, "a publish-only node gets only its ack");
        assert_eq!(drain(&mut h, sub).len(), 1, "a subscriber gets the op");
        // A newer stream of the same node replaces the old one.
        let again = session(&mut h, "s", "subscribe");
        assert_eq!(h.poll_close().map(|(id, _)| id), Some(sub));
        assert!(h.sessions().contains(&again));
        let status = h.status();
        assert_eq!(status.total_ops, 1);
        assert_eq!(status.nodes.len(), 2);
    }

    fn vv(entries: &[(&str, u64)]) -> VersionVector {
        let mut v = VersionVector::default();
        for (n, s) in entries {
            v.set(NodeId::new(*n).unwrap(), *s);
        }
        v
    }

    fn gc_hello(
        node: &str,
        mode: &str,
        have: &VersionVector,
        seen: &VersionVector,
    ) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Hello(pb::Hello {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                node: node.into(),
                version_vector: Some(wire::vv_to_proto(have)),
                mode: mode.into(),
                engine: "sqlite".into(),
                seen: Some(wire::vv_to_proto(seen)),
                resnap: true,
                snapshot: None,
            })),
        }
    }

    fn seen(v: &VersionVector) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Seen(pb::SeenReport {
                seen: Some(wire::vv_to_proto(v)),
            })),
        }
    }

    fn gc_hub() -> HubCore<MemStore> {
        let mut h = hub();
        h.set_tables(BTreeMap::from([("t".to_owned(), TableRules::default())]));
        h
    }

    fn gc_session(h: &mut HubCore<MemStore>, node: &str, mode: &str) -> SessionId {
        let sid = h.handle_open();
        let empty = VersionVector::default();
        let ctl = h
            .handle_message(now(), sid, gc_hello(node, mode, &empty, &empty))
            .unwrap();
        assert_eq!(ctl, Control::Continue);
        let msgs = drain(h, sid);
        assert!(
            matches!(&msgs[0].body, Some(pb::hub_message::Body::Hello(r)) if r.cut.is_some()),
            "a GC-speaking hub answers with its cut"
        );
        sid
    }

    /// Upserts of keys 1..=3 by `a`, then a delete of key 1 (seq 4).
    fn three_rows_one_deleted() -> Vec<pb::Op> {
        let a = NodeId::new("a").unwrap();
        let mut ops: Vec<pb::Op> = (1..=3).map(|s| op("a", s, 0)).collect();
        let hlc = Hlc {
            time: Ntp64::from_unix_millis(1_000_000).0,
            id: a.hlc_id(),
        };
        ops.push(wire::op_to_proto(&Op::delete(
            OpId::new(a.clone(), 4),
            hlc,
            "t",
            vec![Value::Int(1)],
            vec![OpId::new(a, 1)],
        )));
        ops
    }

    fn cuts(msgs: &[pb::HubMessage]) -> Vec<StableCut> {
        msgs.iter()
            .filter_map(|m| match &m.body {
                Some(pb::hub_message::Body::Cut(c)) => {
                    Some(wire::cut_from_proto(c.clone()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    fn later(ms: u64) -> Ntp64 {
        Ntp64::from_unix_millis(1_000_000 + ms)
    }

    #[test]
    fn the_cut_is_the_minimum_of_every_writers_report_and_collects_deleted_rows() {
        let mut h = gc_hub();
        let a = gc_session(&mut h, "a", "bidirectional");
        let b = gc_session(&mut h, "b", "bidirectional");
        let r = gc_session(&mut h, "r", "subscribe");
        h.handle_message(now(), a, batch(three_rows_one_deleted()))
            .unwrap();
        drain(&mut h, a);
        assert_eq!(h.row_state_count().unwrap(), 3);
        // Only a reported: b, a writer, holds the cut back.
        h.handle_message(now(), a, seen(&vv(&[("a", 4)]))).unwrap();
        h.handle_gc(later(10), 100).unwrap();
        assert!(h.gc_cut().is_empty());
        // b saw a's ops up to 3 only: the cut is the minimum. The
        // subscriber r never reports and does not hold it back.
        h.handle_message(now(), b, seen(&vv(&[("a", 3)]))).unwrap();
        h.handle_gc(later(20), 100).unwrap();
        assert_eq!(h.gc_cut().stable, vv(&[("a", 3)]));
        assert_eq!(h.gc_cut().horizon, vv(&[("a", 4)]));
        assert_eq!(cuts(&drain(&mut h, b)), vec![h.gc_cut().clone()]);
        assert_eq!(cuts(&drain(&mut h, r)).len(), 1, "subscribers collect too");
        // The delete (a#4) is not covered yet: nothing dropped.
        assert_eq!(h.row_state_count().unwrap(), 3);
        h.handle_message(now(), b, seen(&vv(&[("a", 4)]))).unwrap();
        h.handle_gc(later(30), 100).unwrap();
        assert_eq!(h.gc_cut().stable, vv(&[("a", 4)]));
        assert_eq!(h.row_state_count().unwrap(), 2, "the deleted row is gone");
        assert_eq!(h.gc_stats().rows_dropped, 1);
        assert_eq!(h.gc_stats().cuts, 2);
        // Persisted: a restarted hub keeps the cut (and so its gating).
        let settings = h.settings.clone();
        let mut store = std::mem::take(&mut h.store);
        store.crash();
        let h = HubCore::open(settings, store).unwrap();
        assert_eq!(h.gc_cut().stable, vv(&[("a", 4)]));
    }

    #[test]
    fn collection_is_bounded_per_call() {
        let mut h = gc_hub();
        let a = gc_session(&mut h, "a", "bidirectional");
        let a_id = NodeId::new("a").unwrap();
        let mut ops: Vec<pb::Op> = (1..=5).map(|s| op("a", s, 0)).collect();
        for k in 1..=5u64 {
            let hlc = Hlc {
                time: Ntp64::from_unix_millis(1_000_000).0,
                id: a_id.hlc_id(),
            };
            ops.push(wire::op_to_proto(&Op::delete(
                OpId::new(a_id.clone(), 5 + k),
                hlc,
                "t",
                vec![Value::Int(k as i64)],
                vec![OpId::new(a_id.clone(), k)],
            )));
        }
        h.handle_message(now(), a, batch(ops)).unwrap();
        h.handle_message(now(), a, seen(&vv(&[("a", 10)]))).unwrap();
        assert_eq!(h.handle_gc(later(1), 2).unwrap(), 2);
        assert_eq!(h.row_state_count().unwrap(), 3);
        assert_eq!(h.handle_gc(later(2), 2).unwrap(), 2);
        assert_eq!(h.handle_gc(later(3), 2).unwrap(), 1);
        assert_eq!(h.row_state_count().unwrap(), 0);
        assert_eq!(
            h.handle_gc(later(4), 2).unwrap(),
            0,
            "pass done, no new cut"
        );
    }

    #[test]
    fn a_writer_silent_beyond_the_grace_is_excluded_and_gated_on_return() {
        let mut h = gc_hub();
        h.set_tombstone_grace_ms(1_000);
        let a = gc_session(&mut h, "a", "bidirectional");
        let c = gc_session(&mut h, "c", "bidirectional");
        h.handle_close(c);
        h.handle_message(now(), a, batch(three_rows_one_deleted()))
            .unwrap();
        h.handle_message(now(), a, seen(&vv(&[("a", 4)]))).unwrap();
        // Within the grace c (reported nothing) holds the cut at zero.
        h.handle_gc(later(500), 100).unwrap();
        assert!(h.gc_cut().is_empty());
        // Beyond it, c is excluded and the delete is collected.
        h.handle_gc(later(1_500), 100).unwrap();
        assert_eq!(h.gc_cut().stable, vv(&[("a", 4)]));
        assert_eq!(h.row_state_count().unwrap(), 2);
        // c comes back with an op the hub lacks, written before it could
        // see the collected delete; a node that cannot take a re-snapshot
        // is refused, and the op is not stored.
        let sid = h.handle_open();
        let mut old_node = gc_hello("c", "bidirectional", &vv(&[("c", 1)]), &vv(&[("c", 1)]));
        if let Some(pb::node_message::Body::Hello(hello)) = &mut old_node.body {
            hello.resnap = false;
        }
        let ctl = h.handle_message(later(1_600), sid, old_node).unwrap();
        assert!(
            matches!(ctl, Control::Close(ref m) if m.contains("tombstone_grace_hours")),
            "{ctl:?}"
        );
        assert_eq!(
            error_code(&drain(&mut h, sid)).as_deref(),
            Some("missed_collected_tombstones")
        );
        assert_eq!(h.gc_stats().refused, 1);
        assert_eq!(h.version_vector().get(&NodeId::new("c").unwrap()), 0);
        // Back with no unsent op: the ops it lacks were compacted away
        // (every writer saw them), so it gets a re-snapshot of the two
        // surviving rows instead of a replay, and may not publish yet.
        for step in 0..4 {
            h.handle_gc(later(1_650 + step), 100).unwrap();
        }
        assert_eq!(h.gc_compacted().get(&NodeId::new("a").unwrap()), 4);
        let sid = h.handle_open();
        let empty = VersionVector::default();
        h.handle_message(
            later(1_700),
            sid,
            gc_hello("c", "bidirectional", &empty, &empty),
        )
        .unwrap();
        let msgs = drain(&mut h, sid);
        assert!(
            matches!(&msgs[0].body, Some(pb::hub_message::Body::Hello(r)) if r.snapshot),
            "{msgs:?}"
        );
        let rows: usize = msgs
            .iter()
            .map(|m| match &m.body {
                Some(pb::hub_message::Body::Snapshot(c)) => c.rows.len(),
                Some(pb::hub_message::Body::Ops(_)) => panic!("no ops during a snapshot"),
                _ => 0,
            })
            .sum();
        assert_eq!(rows, 2, "the surviving rows, not the log");
        let ctl = h
            .handle_message(now(), sid, batch(vec![op("c", 1, 0)]))
            .unwrap();
        assert!(matches!(ctl, Control::Close(_)));
        assert_eq!(h.version_vector().get(&NodeId::new("c").unwrap()), 0);
        // Reporting the cut as seen (with no unsent op) makes it a writer.
        let sid = h.handle_open();
        let have = vv(&[("a", 4)]);
        h.handle_message(
            later(1_800),
            sid,
            gc_hello("c", "bidirectional", &have, &have),
        )
        .unwrap();
        drain(&mut h, sid);
        let ctl = h
            .handle_message(now(), sid, batch(vec![op("c", 1, 0)]))
            .unwrap();
        assert_eq!(ctl, Control::Continue);
        assert_eq!(h.version_vector().get(&NodeId::new("c").unwrap()), 1);
    }

    #[test]
    fn a_hub_relaying_unmerged_tables_neither_compacts_nor_serves_partial_snapshots() {
        let mut h = gc_hub();
        h.set_tombstone_grace_ms(1_000);
        let a = gc_session(&mut h, "a", "bidirectional");
        let mut ops = three_rows_one_deleted();
        let mut relayed = op("a", 5, 0);
        relayed.table = "u".into();
        ops.push(relayed);
        h.handle_message(now(), a, batch(ops)).unwrap();
        h.handle_message(now(), a, seen(&vv(&[("a", 5)]))).unwrap();
        for step in 0..4 {
            h.handle_gc(later(1_500 + step), 100).unwrap();
        }
        assert_eq!(h.gc_cut().stable, vv(&[("a", 5)]));
        assert_eq!(
            h.gc_stats().ops_compacted,
            0,
            "the log is all there is of u"
        );
        let sid = h.handle_open();
        let ctl = h
            .handle_message(
                later(1_700),
                sid,
                gc_hello("c", "bidirectional", &vv(&[("c", 1)]), &vv(&[("c", 1)])),
            )
            .unwrap();
        assert!(
            matches!(ctl, Control::Close(ref m) if m.contains("does not merge")),
            "{ctl:?}"
        );
    }

    #[test]
    fn a_report_of_own_ops_the_hub_lacks_holds_the_cut_back() {
        let mut h = gc_hub();
        let a = gc_session(&mut h, "a", "bidirectional");
        h.handle_message(now(), a, batch(three_rows_one_deleted()))
            .unwrap();
        // a claims seq 5 (still in flight): the cut would not be valid here.
        h.handle_message(now(), a, seen(&vv(&[("a", 5)]))).unwrap();
        h.handle_gc(later(10), 100).unwrap();
        assert!(h.gc_cut().is_empty());
        let bad = pb::NodeMessage {
            body: Some(pb::node_message::Body::Seen(pb::SeenReport {
                seen: Some(pb::VersionVector {
                    entries: [(String::new(), 1)].into_iter().collect(),
                }),
            })),
        };
        let ctl = h.handle_message(now(), a, bad).unwrap();
        assert!(matches!(ctl, Control::Close(_)));
        assert_eq!(
            error_code(&drain(&mut h, a)).as_deref(),
            Some("bad_seen_report")
        );
    }

    mod resnap {
        use super::*;
        use std::collections::BTreeMap as Map;
        use syncmesh_node::adapter::{CapturedChange, ChangeKind, ColumnInfo, TableSchema};
        use syncmesh_node::config::Mode;
        use syncmesh_node::core::{
            Control as NodeControl, Event, NodeCore, NodeSettings, TableInfo,
        };
        use syncmesh_resolver::DeletePolicy;

        type Node = NodeCore<MemStore>;

        fn info(deletes: DeletePolicy) -> TableInfo {
            let col = |n: &str| ColumnInfo {
                name: n.into(),
                decl_type: "TEXT".into(),
                not_null: false,
            };
            TableInfo {
                schema: TableSchema {
                    name: "t".into(),
                    columns: vec![col("id"), col("a")],
                    key: vec!["id".into()],
                },
                rules: TableRules {
                    deletes,
                    ..TableRules::default()
                },
            }
        }

        fn node(name: &str, deletes: DeletePolicy) -> Node {
            let settings = NodeSettings {
                name: NodeId::new(name).unwrap(),
                mode: Mode::Bidirectional,
                batch_size: 100,
                max_clock_drift_ms: 500,
            };
            NodeCore::open(settings, vec![info(deletes)], MemStore::default(), 0).unwrap()
        }

        fn row(id: i64, a: &str) -> Option<Map<String, Value>> {
            Some(Map::from([
                ("id".into(), Value::Int(id)),
                ("a".into(), Value::Text(a.into())),
            ]))
        }

        fn change(
            id: i64,
            kind: ChangeKind,
            old: Option<Map<String, Value>>,
            new: Option<Map<String, Value>>,
        ) -> CapturedChange {
            CapturedChange {
                change_id: id,
                table: "t".into(),
                kind,
                old,
                new,
            }
        }

        fn connect(h: &mut HubCore<MemStore>, n: &mut Node) -> SessionId {
            let sid = h.handle_open();
            assert!(n.poll_connect(u64::MAX / 2));
            n.handle_connected(0);
            sid
        }

        /// Passes messages both ways and lets the node apply (at change
        /// id `watermark`) and collect/install, for a few rounds.
        fn pump(
            h: &mut HubCore<MemStore>,
            sid: SessionId,
            n: &mut Node,
            now: Ntp64,
            watermark: i64,
        ) {
            for _ in 0..64 {
                while let Some(m) = n.poll_transmit().unwrap() {
                    assert_eq!(h.handle_message(now, sid, m).unwrap(), Control::Continue);
                }
                while let Some(m) = h.poll_transmit(sid).unwrap() {
                    assert_eq!(n.handle_message(now, m).unwrap(), NodeControl::Continue);
                }
                let p = n.poll_apply(100).unwrap();
                if !p.is_empty() {
                    n.handle_applied(&p, watermark).unwrap();
                }
                n.poll_gc(2).unwrap();
            }
        }

        fn state(h: &HubCore<MemStore>, id: i64) -> RowState {
            let k = row_key(P_ROW, "t", &[Value::Int(id)]).unwrap();
            match h.store.get(&k).unwrap() {
                Some(b) => postcard::from_bytes(&b).unwrap(),
                None => RowState::default(),
            }
        }

        fn visible(
            h: &HubCore<MemStore>,
            rules: &TableRules,
            id: i64,
        ) -> Option<Map<String, Value>> {
            state(h, id).visible(rules)
        }

        /// A hub merging table `t` with a tombstone grace of 1 s.
        fn grace_hub(deletes: DeletePolicy) -> HubCore<MemStore> {
            let mut h = gc_hub();
            h.set_tables(BTreeMap::from([(
                "t".to_owned(),
                info(deletes).rules.clone(),
            )]));
            h.set_tombstone_grace_ms(1_000);
            h
        }

        /// Inserts of rows 1..=3 with `a = "v"`.
        fn inserts() -> Vec<CapturedChange> {
            (1..=3)
                .map(|i| change(i, ChangeKind::Insert, None, row(i, "v")))
                .collect()
        }

        /// `other` goes away; a deletes row 1; beyond the grace the cut
        /// excludes `other` and covers the delete: the hub collects it, or
        /// keeps its tombstone when `other` is publish-only (it will judge
        /// that node's writes against it).
        fn away_while_a_deletes_row_1(
            h: &mut HubCore<MemStore>,
            a: &mut Node,
            sa: SessionId,
            other: &mut Node,
            so: SessionId,
            publish_only: bool,
        ) {
            h.handle_close(so);
            other.handle_disconnected(0, 0);
            a.handle_captured(
                later(100),
                &[change(11, ChangeKind::Delete, row(1, "v"), None)],
            )
            .unwrap();
            pump(h, sa, a, later(100), 20);
            for step in 0..4 {
                h.handle_gc(later(2_000 + step), 100).unwrap();
            }
            let an = NodeId::new("a").unwrap();
            let deleted = a.version_vector().get(&an);
            assert!(
                deleted > 0 && h.gc_cut().stable.get(&an) >= deleted,
                "the cut covers a's delete"
            );
            if publish_only {
                assert_eq!(h.gc_collect_cut().get(&an), 0, "a's ops stay uncollected");
                assert_eq!(h.row_state_count().unwrap(), 3, "row 1's tombstone stays");
                assert!(state(h, 1).has_tombstone(), "{:?}", state(h, 1));
            } else {
                assert_eq!(h.gc_collect_cut(), h.gc_cut().stable);
                assert_eq!(h.row_state_count().unwrap(), 2, "row 1 is collected");
            }
        }

        /// a and c hold rows 1..=3; c goes away beyond the grace; a deletes
        /// row 1 and the hub collects it; offline, c updates rows 1 and 2
        /// (captured), and row 1 again (captured only after the snapshot is
        /// installed, before its apply). Returns hub, a, c, c's session and
        /// c's events.
        fn scenario(
            deletes: DeletePolicy,
        ) -> (HubCore<MemStore>, Node, Node, SessionId, Vec<Event>) {
            let mut h = grace_hub(deletes);
            let mut a = node("a", deletes);
            let mut c = node("c", deletes);
            let sa = connect(&mut h, &mut a);
            let sc = connect(&mut h, &mut c);
            let inserts = inserts();
            a.handle_captured(later(0), &inserts).unwrap();
            pump(&mut h, sa, &mut a, later(0), 10);
            pump(&mut h, sc, &mut c, later(0), 10);
            pump(&mut h, sa, &mut a, later(0), 10);
            assert_eq!(c.version_vector().get(&NodeId::new("a").unwrap()), 3);
            away_while_a_deletes_row_1(&mut h, &mut a, sa, &mut c, sc, false);
            assert_eq!(h.gc_cut().stable, vv(&[("a", 4)]));
            // c's user writes while its node is away.
            c.handle_captured(
                later(200),
                &[
                    change(11, ChangeKind::Update, row(1, "v"), row(1, "c1")),
                    change(12, ChangeKind::Update, row(2, "v"), row(2, "c2")),
                ],
            )
            .unwrap();
            // c comes back: re-snapshot instead of a refusal.
            let sc = connect(&mut h, &mut c);
            let now = later(2_100);
            for _ in 0..64 {
                while let Some(m) = c.poll_transmit().unwrap() {
                    assert_eq!(h.handle_message(now, sc, m).unwrap(), Control::Continue);
                }
                while let Some(m) = h.poll_transmit(sc).unwrap() {
                    assert_eq!(c.handle_message(now, m).unwrap(), NodeControl::Continue);
                }
                c.poll_gc(1).unwrap();
            }
            assert_eq!(c.resnap_progress().map(|p| p.1), Some(true));
            // A change made before the apply of the snapshot, captured now.
            c.handle_captured(
                later(2_200),
                &[change(13, ChangeKind::Update, row(1, "c1"), row(1, "c3"))],
            )
            .unwrap();
            pump(&mut h, sc, &mut c, later(2_300), 30);
            pump(&mut h, sa, &mut a, later(2_300), 30);
            let mut events = Vec::new();
            while let Some(e) = c.poll_event() {
                events.push(e);
            }
            (h, a, c, sc, events)
        }

        #[test]
        fn a_node_that_wrote_while_away_is_resnapshotted_and_nothing_resurrects() {
            let (mut h, a, c, _, events) = scenario(DeletePolicy::DeleteWins);
            let rules = info(DeletePolicy::DeleteWins).rules;
            let notice = h.poll_notice().unwrap();
            assert!(
                notice.contains("re-snapshot of node c") && notice.contains("a:4"),
                "{notice}"
            );
            assert_eq!(h.gc_stats().refused, 0, "re-snapshotted, not refused");
            assert_eq!(h.gc_stats().snapshots_served, 1);
            let lines: Vec<&String> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Resnapshot(l) => Some(l),
                    _ => None,
                })
                .collect();
            assert!(lines.iter().any(|l| l.contains("installed")), "{lines:?}");
            // Every write of c reached the hub (the two to row 1 emptied).
            assert_eq!(h.version_vector().get(&NodeId::new("c").unwrap()), 3);
            let c_ops = c.own_ops(1, 10).unwrap();
            assert!(c_ops[0].fields.is_empty() && c_ops[2].fields.is_empty());
            assert_eq!(c_ops[1].fields.len(), 1);
            // Row 1 stays deleted everywhere; c's write to row 2 is kept.
            assert_eq!(visible(&h, &rules, 1), None);
            assert_eq!(visible(&h, &rules, 2), row(2, "c2"));
            assert_eq!(visible(&h, &rules, 3), row(3, "v"));
            for n in [&a, &c] {
                for id in 1..=3 {
                    assert_eq!(
                        n.row_state("t", &[Value::Int(id)]).unwrap().visible(&rules),
                        visible(&h, &rules, id),
                        "{} row {id}",
                        n.name()
                    );
                }
            }
            // c adopted the hub's vector and is trusted again.
            assert_eq!(c.version_vector().get(&NodeId::new("a").unwrap()), 4);
            assert!(h.gc_untrusted(&NodeId::new("c").unwrap()).is_none());
        }

        fn node_as(name: &str, deletes: DeletePolicy, mode: Mode, store: MemStore) -> Node {
            let settings = NodeSettings {
                name: NodeId::new(name).unwrap(),
                mode,
                batch_size: 100,
                max_clock_drift_ms: 500,
            };
            NodeCore::open(settings, vec![info(deletes)], store, 0).unwrap()
        }

        /// Publish-only p writes rows 1..=3, a applies them; p goes away
        /// beyond the grace; a deletes row 1, the hub collects it; offline,
        /// p updates rows 1 and 3; p comes back. Returns hub, a, p.
        fn publish_scenario(deletes: DeletePolicy) -> (HubCore<MemStore>, Node, Node) {
            publish_scenario_with(
                deletes,
                &[
                    change(4, ChangeKind::Update, row(1, "v"), row(1, "p1")),
                    change(5, ChangeKind::Update, row(3, "v"), row(3, "p3")),
                ],
            )
        }

        /// As [`publish_scenario`], with `offline` as p's changes while away.
        fn publish_scenario_with(
            deletes: DeletePolicy,
            offline: &[CapturedChange],
        ) -> (HubCore<MemStore>, Node, Node) {
            let mut h = grace_hub(deletes);
            let mut a = node("a", deletes);
            let mut p = node_as("p", deletes, Mode::Publish, MemStore::default());
            let sa = connect(&mut h, &mut a);
            let sp = connect(&mut h, &mut p);
            let inserts = inserts();
            p.handle_captured(later(0), &inserts).unwrap();
            pump(&mut h, sp, &mut p, later(0), 10);
            pump(&mut h, sa, &mut a, later(0), 10);
            assert_eq!(a.version_vector().get(&NodeId::new("p").unwrap()), 3);
            away_while_a_deletes_row_1(&mut h, &mut a, sa, &mut p, sp, true);
            assert!(h.gc_untrusted(&NodeId::new("p").unwrap()).is_some());
            p.handle_captured(later(200), offline).unwrap();
            let sp = connect(&mut h, &mut p);
            pump(&mut h, sp, &mut p, later(2_100), 10);
            pump(&mut h, sa, &mut a, later(2_100), 20);
            (h, a, p)
        }

        #[test]
        fn a_publish_only_node_that_wrote_while_away_is_judged_by_the_hub() {
            let (mut h, a, p) = publish_scenario(DeletePolicy::DeleteWins);
            let rules = info(DeletePolicy::DeleteWins).rules;
            let pn = NodeId::new("p").unwrap();
            assert_eq!(h.gc_stats().refused, 0, "accepted, not refused");
            assert_eq!(h.version_vector().get(&pn), 5, "both writes are held");
            assert_eq!(h.gc_stats().writes_dropped, 1);
            let mut notices = Vec::new();
            while let Some(n) = h.poll_notice() {
                notices.push(n);
            }
            assert!(
                notices
                    .iter()
                    .any(|n| n.contains("publish-only node p returns")),
                "{notices:?}"
            );
            assert!(
                notices
                    .iter()
                    .any(|n| n.contains("1 write(s) (first: p#4 to table t")),
                "{notices:?}"
            );
            assert_eq!(a.version_vector().get(&pn), 5, "a got both");
            // Row 1 stays deleted; p's update of live row 3 is kept.
            assert_eq!(visible(&h, &rules, 1), None);
            assert_eq!(visible(&h, &rules, 3), row(3, "p3"));
            for id in 1..=3 {
                assert_eq!(
                    a.row_state("t", &[Value::Int(id)]).unwrap().visible(&rules),
                    visible(&h, &rules, id),
                    "a row {id}"
                );
            }
            // Its own state still has row 1: turned bidirectional, it is
            // re-snapshotted and drops it too.
            let mut h2 = h;
            let mut b = node_as(
                "p",
                DeletePolicy::DeleteWins,
                Mode::Bidirectional,
                p.into_store(),
            );
            assert_eq!(
                b.row_state("t", &[Value::Int(1)]).unwrap().visible(&rules),
                row(1, "p1")
            );
            let sb = connect(&mut h2, &mut b);
            pump(&mut h2, sb, &mut b, later(2_300), 10);
            assert_eq!(b.resnap_progress().map(|p| p.1), Some(true));
            pump(&mut h2, sb, &mut b, later(2_400), 10);
            for id in 1..=3 {
                assert_eq!(
                    b.row_state("t", &[Value::Int(id)]).unwrap().visible(&rules),
                    visible(&h2, &rules, id),
                    "p row {id} after its re-snapshot"
                );
            }
            assert!(h2.gc_untrusted(&pn).is_none());
        }

        /// Away, p deletes row 1 (which a deleted too, and the mesh
        /// collected) and inserts it again: the re-insert supersedes only
        /// p's own delete, so a's delete still wins. The hub kept a's
        /// tombstone for p and drops the re-insert's fields; nobody shows
        /// the row, whether or not it collected a's delete.
        #[test]
        fn a_publish_only_nodes_reinsert_of_a_row_deleted_meanwhile_is_dropped() {
            let (h, a, p) = publish_scenario_with(
                DeletePolicy::DeleteWins,
                &[
                    change(4, ChangeKind::Delete, row(1, "v"), None),
                    change(5, ChangeKind::Insert, None, row(1, "p9")),
                ],
            );
            let rules = info(DeletePolicy::DeleteWins).rules;
            let pn = NodeId::new("p").unwrap();
            assert_eq!(h.version_vector().get(&pn), 5, "both ops are held");
            assert_eq!(h.gc_stats().writes_dropped, 1, "the re-insert");
            assert!(state(&h, 1).has_tombstone(), "a's delete is still held");
            assert_eq!(visible(&h, &rules, 1), None);
            assert_eq!(a.version_vector().get(&pn), 5);
            assert_eq!(
                a.row_state("t", &[Value::Int(1)]).unwrap().visible(&rules),
                None
            );
            // p's own database is a source: it keeps its row.
            assert_eq!(
                p.row_state("t", &[Value::Int(1)]).unwrap().visible(&rules),
                row(1, "p9")
            );
        }

        #[test]
        fn under_update_wins_a_publish_only_nodes_update_brings_the_row_back() {
            let (h, a, _) = publish_scenario(DeletePolicy::UpdateWins);
            let rules = info(DeletePolicy::UpdateWins).rules;
            assert_eq!(h.gc_stats().writes_dropped, 0);
            let p1 = Some(Map::from([("a".to_owned(), Value::Text("p1".into()))]));
            assert_eq!(visible(&h, &rules, 1), p1);
            assert_eq!(
                a.row_state("t", &[Value::Int(1)]).unwrap().visible(&rules),
                p1
            );
        }

        #[test]
        fn under_update_wins_the_concurrently_updated_row_comes_back() {
            let (h, a, c, _, _) = scenario(DeletePolicy::UpdateWins);
            let rules = info(DeletePolicy::UpdateWins).rules;
            let c3 = Some(Map::from([("a".to_owned(), Value::Text("c3".into()))]));
            assert_eq!(visible(&h, &rules, 1), c3, "fields written concurrently");
            assert_eq!(visible(&h, &rules, 2), row(2, "c2"));
            for n in [&a, &c] {
                assert_eq!(
                    n.row_state("t", &[Value::Int(1)]).unwrap().visible(&rules),
                    c3
                );
            }
        }

        #[test]
        fn the_op_log_is_compacted_below_the_cut_and_a_new_node_gets_a_snapshot() {
            let (mut h, _, _, _, _) = scenario(DeletePolicy::DeleteWins);
            let rules = info(DeletePolicy::DeleteWins).rules;
            for step in 0..8 {
                h.handle_gc(later(3_000 + step), 2).unwrap();
            }
            assert!(h.gc_stats().ops_compacted >= 4, "{:?}", h.gc_stats());
            assert_eq!(h.gc_compacted().get(&NodeId::new("a").unwrap()), 4);
            assert_eq!(
                h.stored_op_count().unwrap() as u64,
                7 - h.gc_stats().ops_compacted
            );
            // A brand-new node with an empty database needs ops the hub
            // dropped: it gets the snapshot, then the rest of the log.
            let mut d = node("d", DeletePolicy::DeleteWins);
            let sd = connect(&mut h, &mut d);
            pump(&mut h, sd, &mut d, later(3_100), 40);
            assert_eq!(d.resnap_progress().map(|p| p.1), Some(true));
            assert_eq!(d.version_vector(), &{
                let mut v = h.version_vector().clone();
                v.0.retain(|_, s| *s > 0);
                v
            });
            for id in 1..=3 {
                assert_eq!(
                    d.row_state("t", &[Value::Int(id)]).unwrap().visible(&rules),
                    visible(&h, &rules, id),
                    "row {id}"
                );
            }
        }
    }
}
