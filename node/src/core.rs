//! The sans-IO node core.
//!
//! [`NodeCore`] owns the node's replication state: its op sequence, its
//! version vector, the merged row state of every synced row, and the hub
//! session. It performs no IO of its own besides the [`LogStore`] it is given
//! (sled in production, [`crate::store::MemStore`] in tests and the
//! simulator), and it reads no clock: every call that needs time takes `now`.
//!
//! Input: [`NodeCore::handle_captured`] (local changes from the capture
//! table), [`NodeCore::handle_connected`], [`NodeCore::handle_message`] (from
//! the hub), [`NodeCore::handle_disconnected`], [`NodeCore::handle_applied`].
//! Output: [`NodeCore::poll_transmit`] (messages for the hub),
//! [`NodeCore::poll_apply`] (rows to write into the database),
//! [`NodeCore::poll_connect`] (whether to dial the hub now).
//!
//! Durability order: every handle that changes state writes one atomic batch
//! and flushes it *before* it returns, so an ack produced by it, or a capture
//! checkpoint the shell acts on, only ever refers to flushed state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use syncmesh_proto::v1 as pb;
use syncmesh_resolver::{
    FieldWrite, Granularity, HlcClock, NodeId, Ntp64, Op, OpId, RowState, Strategy, TableRules,
    Value, VersionVector, VisibleRow,
};

use crate::adapter::{CapturedChange, ChangeKind, RowWrite, TableSchema};
use crate::config::Mode;
use crate::store::{LogStore, WriteBatch, prefix_end};
use crate::wire;
use crate::{Error, Result};

const K_SEQ: &[u8] = b"m/seq";
const K_CHECKPOINT: &[u8] = b"m/checkpoint";
const K_HLC: &[u8] = b"m/hlc";
const P_VV: &[u8] = b"v/";
/// Own ops, one per key (`l/<seq>`): written by earlier versions, still read.
const P_LOG: &[u8] = b"l/";
/// Own ops packed: `p/<last seq>` → the ops up to it since the previous key
/// (at most [`LOG_OPS_PER_KEY`]), one key per capture call and chunk
/// instead of one per op.
const P_LOG_PACKED: &[u8] = b"p/";
/// Most ops under one packed log key.
const LOG_OPS_PER_KEY: usize = 256;
const P_ROW: &[u8] = b"r/";
const P_DIRTY: &[u8] = b"d/";
const P_VIEW: &[u8] = b"w/";
/// Adapters' own durable records (`m/x/<name>`): a snapshot cursor, a
/// change-stream resume token.
const P_META: &[u8] = b"m/x/";
/// Re-snapshot: its progress and phase.
const K_RESNAP: &[u8] = b"s/meta";
/// Re-snapshot: staged row states, `s/r/<id: u64 BE><table>\0<key>`.
const P_RESNAP_ROW: &[u8] = b"s/r/";

/// An adapter record to write with a batch: name and value (`None`
/// removes it).
pub type MetaWrite = (String, Option<Vec<u8>>);

/// Most row states one [`NodeCore::poll_gc`] call examines.
pub const GC_ROWS_PER_POLL: usize = 512;

/// Most op batches sent to the hub and not yet acknowledged.
pub const MAX_INFLIGHT_BATCHES: u64 = 4;
/// Largest encoded op batch the node sends (bytes), below the decode limit.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// First reconnect delay.
pub const RECONNECT_MIN_MS: u64 = 100;
/// Longest reconnect delay.
pub const RECONNECT_MAX_MS: u64 = 5_000;

/// A synced table as the core needs it.
#[derive(Clone, Debug)]
pub struct TableInfo {
    /// Columns and key.
    pub schema: TableSchema,
    /// Merge rules.
    pub rules: TableRules,
}

impl TableInfo {
    /// Checks that `rules` fit the table's columns: every configured field
    /// exists, and `sum` fields are numeric columns.
    pub fn new(schema: TableSchema, rules: TableRules, source: &str) -> Result<Self> {
        let err = |message: String| Error::Config {
            path: source.to_owned(),
            message,
        };
        for (field, strategy) in &rules.fields {
            let Some(col) = schema.columns.iter().find(|c| &c.name == field) else {
                return Err(err(format!(
                    "table {}: resolve.fields names `{field}`, which is not a column of the table; columns are {}",
                    schema.name,
                    schema
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            if *strategy == Strategy::Sum && !numeric_decl_type(&col.decl_type) {
                return Err(err(format!(
                    "table {}, field {field}: strategy `sum` needs a numeric column (INTEGER, REAL, NUMERIC, DECIMAL) but it is declared {:?}; change the column type or use last_write_wins",
                    schema.name, col.decl_type
                )));
            }
        }
        let untyped_counter = schema.columns.iter().find(|c| {
            rules.default_strategy == Strategy::Sum
                && !schema.key.contains(&c.name)
                && !rules.fields.contains_key(&c.name)
                && !numeric_decl_type(&c.decl_type)
        });
        if let Some(col) = untyped_counter {
            return Err(err(format!(
                "table {}: resolve.default is `sum` but column {} is declared {:?}; give it its own strategy or change its type",
                schema.name, col.name, col.decl_type
            )));
        }
        Ok(TableInfo { schema, rules })
    }

    fn is_sum(&self, field: &str) -> bool {
        !self.schema.key.iter().any(|k| k == field) && *self.rules.strategy(field) == Strategy::Sum
    }
}

/// SQLite-style affinity: is a declared type numeric (INTEGER, REAL or
/// NUMERIC affinity)?
fn numeric_decl_type(decl: &str) -> bool {
    let d = decl.to_ascii_uppercase();
    if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") || d.contains("BLOB") {
        return false;
    }
    !d.trim().is_empty()
}

/// Static settings of a node core.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// This node's identity (the origin of its ops).
    pub name: NodeId,
    /// Publish, subscribe or both.
    pub mode: Mode,
    /// Most ops per batch.
    pub batch_size: usize,
    /// Remote HLCs further ahead than this are reported.
    pub max_clock_drift_ms: u64,
}

/// Something worth logging or counting that the core noticed.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The hub accepted the handshake.
    Connected {
        /// Own ops the hub already held.
        hub_has_own: u64,
    },
    /// A problem with input from the hub; the core carried on.
    Warning(String),
    /// A re-snapshot from the hub started, was installed, or changed a
    /// write (one line for the log).
    Resnapshot(String),
    /// The hub reported an error.
    HubError {
        /// Stable code.
        code: String,
        /// One-line message.
        message: String,
    },
}

/// Whether the shell should keep the hub stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep going.
    Continue,
    /// Drop the stream and reconnect after backoff, for the given reason.
    Reconnect(String),
}

#[derive(Debug)]
enum Conn {
    Disconnected { retry_at_ms: u64, backoff_ms: u64 },
    Connecting,
    Handshaking,
    Connected { hub_acked_own: u64, sent_own: u64 },
}

/// A row the shell must write, with the token to hand back once written.
#[derive(Clone, Debug)]
pub struct PendingApply {
    /// The write.
    pub write: RowWrite,
    token: (Vec<u8>, u64),
}

/// The ops of one batch counted per table and kind for the metrics, so
/// a batch of thousands of ops updates them once per table, not per op
/// (used by the node's merge and the hub's store).
#[derive(Debug, Default)]
pub struct BatchTally(Vec<Tally>);

/// One table and kind in a [`BatchTally`].
#[derive(Debug)]
pub struct Tally {
    /// Table name.
    pub table: String,
    /// `"upsert"` or `"delete"` (the metrics' label).
    pub kind: &'static str,
    /// Ops counted.
    pub ops: u64,
    /// Oldest capture HLC (NTP64 time) among them.
    pub oldest_hlc: u64,
    /// Seq of the last one counted.
    pub last_seq: u64,
}

impl BatchTally {
    /// Counts `op`.
    pub fn note(&mut self, op: &Op) {
        let kind = if op.kind == syncmesh_resolver::OpKind::Delete {
            "delete"
        } else {
            "upsert"
        };
        match self
            .0
            .iter_mut()
            .find(|t| t.kind == kind && t.table == op.table)
        {
            Some(t) => {
                t.ops += 1;
                t.oldest_hlc = t.oldest_hlc.min(op.hlc.time);
                t.last_seq = op.id.seq;
            }
            None => self.0.push(Tally {
                table: op.table.clone(),
                kind,
                ops: 1,
                oldest_hlc: op.hlc.time,
                last_seq: op.id.seq,
            }),
        }
    }

    /// The tallies, in first-seen order.
    pub fn into_tallies(self) -> Vec<Tally> {
        self.0
    }
}

/// Counters the shell exports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Ops this node originated.
    pub own_ops: u64,
    /// Own ops the hub acknowledged as durable.
    pub own_acked: u64,
    /// Remote ops merged.
    pub remote_ops: u64,
    /// True while the hub session is up.
    pub connected: bool,
    /// Rows waiting to be written to the database.
    pub dirty_rows: u64,
    /// Warnings raised.
    pub warnings: u64,
    /// Remote ops made durable here, by (table, operation: upsert | delete).
    pub records_synced: BTreeMap<(String, String), u64>,
    /// Remote ops the hub held at the last handshake (catch-up target).
    pub remote_ops_at_hub: u64,
    /// Tombstone GC: cuts started, row states dropped here.
    pub gc_cuts: u64,
    /// Tombstone GC: row states dropped here (deleted rows fully collected).
    pub gc_rows_dropped: u64,
}

/// The node state machine. See the module docs.
pub struct NodeCore<S: LogStore> {
    settings: NodeSettings,
    tables: BTreeMap<String, std::sync::Arc<TableInfo>>,
    store: S,
    clock: HlcClock,
    seq: u64,
    vv: VersionVector,
    checkpoint: i64,
    /// Rows (`table\0key`) whose visible state must be written to the
    /// database, with a generation to detect re-dirtying. Persisted as a
    /// journal: one `d/<n>` record per committed batch that dirtied rows.
    dirty: BTreeMap<Vec<u8>, u64>,
    /// Row states just made durable by `commit` for rows waiting to be
    /// applied (full row key → state as stored), so `poll_apply` need not
    /// read them back; at most [`RECENT_ROWS_MAX`]. Cleared whenever rows
    /// are written any other way (collection, re-snapshot).
    recent: HashMap<Vec<u8>, RowState>,
    dirty_gen: u64,
    journal_next: u64,
    conn: Conn,
    outbox: VecDeque<pb::NodeMessage>,
    events: VecDeque<Event>,
    /// Rows written by an apply, with the change-table watermark at its
    /// commit: a captured change at or below it was overwritten.
    applied_marks: HashMap<Vec<u8>, i64>,
    restart_mark: i64,
    /// What the database shows of rows that have remote merges it may not
    /// reflect yet (bidirectional nodes only), oldest first. A captured
    /// change computes its `pred` from the newest view older than it, so
    /// it supersedes only what its user could have seen. See
    /// [`DbView`].
    db_views: HashMap<Vec<u8>, Vec<DbView>>,
    /// Rows with more than one view (waiting for capture to pass them).
    lingering: BTreeSet<Vec<u8>>,
    /// The state each row handed out by `poll_apply` was taken from,
    /// becoming a view once its apply commits.
    apply_snaps: HashMap<Vec<u8>, DbView>,
    stats: NodeStats,
    /// The database engine named in the hello (for the hub's status).
    engine: String,
    /// Remote ops made durable by the last call, per table: the oldest
    /// capture HLC (NTP64 time); taken by the shell to measure lag.
    durable: BTreeMap<String, u64>,
    /// Tombstone garbage collection.
    gc: NodeGc,
    /// A re-snapshot in progress, or the last one installed.
    resnap: Option<Resnap>,
    /// The hub said snapshot chunks follow on this stream: own ops wait.
    resnap_expected: bool,
    /// The hello is built when it is sent (not while a re-snapshot installs).
    hello_due: bool,
}

/// A re-snapshot from the hub (persisted under `s/meta`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Resnap {
    progress: wire::SnapshotProgress,
    tables: Vec<String>,
    phase: ResnapPhase,
    /// Counters for the log line.
    replaced: u64,
    removed: u64,
    dropped_writes: u64,
}

/// Where a re-snapshot is. Staging: chunks arrive into `s/r/`. Rows: the
/// staged states replace `r/` (cursor: next row key). Own: own ops the
/// hub lacks are merged again (next seq, last seq). Cleanup: `s/r/` is
/// removed. Done: installed (kept: the hello tells the hub).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum ResnapPhase {
    Staging,
    Rows(Vec<u8>),
    Own(u64, u64),
    Cleanup,
    Done,
}

/// Whether `op`, an own write made before this node saw the collected cut,
/// writes a row deleted by deletes it did not see: an update of a row the
/// collected deletes removed ([`RowState::loses_update`]), or a write a
/// tombstone of the installed state still hides once merged
/// ([`RowState::loses_to_delete`]: the hub keeps the tombstones a returning
/// publish-only node did not see, so its snapshots can carry them, and a
/// replica that collected one would show the write). Shared with the hub.
fn lost_update(info: &TableInfo, state: &RowState, op: &Op) -> bool {
    state.loses_to_unseen_deletes(&info.rules, op)
}

/// Tombstone GC state of a node (in memory: the hub sends its cut again in
/// every hello reply).
#[derive(Debug, Default)]
struct NodeGc {
    /// The hub's hello reply carried a cut: it takes seen reports.
    hub_speaks: bool,
    /// The newest cut from the hub, not yet valid or not yet started here.
    pending: Option<wire::StableCut>,
    /// The cut being (or last) collected at.
    active: wire::StableCut,
    /// Next row key to collect at `active` (`None`: the pass is done).
    cursor: Option<Vec<u8>>,
    /// Something that can move the seen vector happened.
    report_due: bool,
    /// The last seen report sent in this session.
    reported: Option<VersionVector>,
    stats: NodeGcStats,
}

/// Counters of tombstone GC at a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeGcStats {
    /// Cuts started here.
    pub cuts: u64,
    /// Row states rewritten smaller.
    pub rows_collected: u64,
    /// Row states dropped entirely.
    pub rows_dropped: u64,
}

/// A state of one row as the database showed it from change-table id
/// `from` (exclusive) on: local writes with a higher change id were made
/// by a user looking at it.
///
/// Without it a captured write would compute its `pred` from the merged
/// row state at *capture* time, which may hold remote ops merged after the
/// user wrote (between two capture ticks, or while an apply was pending),
/// and so claim to supersede writes it never saw.
///
/// A view holds remote ops only: this node's own ops are always seen by
/// its later writes. The first view of a row (made by the remote merge
/// that dirtied it) is persisted in that merge's dirty-journal record, so
/// it survives a crash before the apply. A row whose apply committed while
/// older local changes still wait in the change table keeps several views;
/// those are written under `w/<table>\0<key>` in the apply's batch, before
/// the journal is cleared, so a crash keeps either both or the journal.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct DbView {
    from: i64,
    state: RowState,
    seen: VersionVector,
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| Error::Store {
        path: "<encode>".into(),
        message: format!("cannot encode state: {e}"),
    })
}

fn dec<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::Store {
        path: "<decode>".into(),
        message: format!("corrupt {what} in the log store: {e}; restore the data_dir from a backup or re-create it to re-snapshot"),
    })
}

fn put_meta(batch: &mut WriteBatch, meta: &[MetaWrite]) {
    for (name, value) in meta {
        let mut k = P_META.to_vec();
        k.extend_from_slice(name.as_bytes());
        match value {
            Some(v) => batch.put(k, v.clone()),
            None => batch.remove(k),
        }
    }
}

/// Puts `ops` (consecutive own ops) under one packed log key.
fn put_packed(batch: &mut WriteBatch, ops: &[Op]) -> Result<()> {
    let Some(last) = ops.last() else {
        return Ok(());
    };
    let mut k = P_LOG_PACKED.to_vec();
    k.extend_from_slice(&last.id.seq.to_be_bytes());
    batch.put(k, enc(&ops)?);
    Ok(())
}

fn u64_at(store: &impl LogStore, key: &[u8]) -> Result<u64> {
    Ok(match store.get(key)? {
        Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
        _ => 0,
    })
}

/// Most just-merged row states kept for `poll_apply` (see `NodeCore`).
pub const RECENT_ROWS_MAX: usize = 65_536;

/// Consecutive integer keys that share a row page in [`crate::store::SledStore`]:
/// 2^`ROW_PAGE_BITS`.
pub const ROW_PAGE_BITS: u32 = 5;

/// The store key of a row: prefix, table, NUL, a group, encoded key
/// values. The group is [`crate::store::PAGE_TAG`] and 8 bytes (the key
/// shifted right by [`ROW_PAGE_BITS`], sign flipped so it sorts) for a
/// key of one integer, so under `r/` 32 consecutive ids share one sled
/// value; `0` for every other key (one value per row).
pub fn row_key(prefix: &[u8], table: &str, key: &[Value]) -> Result<Vec<u8>> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    match key {
        [Value::Int(i)] => {
            k.push(crate::store::PAGE_TAG);
            let group = ((*i as u64) ^ (1 << 63)) >> ROW_PAGE_BITS;
            k.extend_from_slice(&group.to_be_bytes());
        }
        _ => k.push(0),
    }
    k.extend_from_slice(&enc(&key)?);
    Ok(k)
}

/// Splits a key made by [`row_key`] (after `prefix_len` prefix bytes) into
/// table and key values.
pub fn split_row_key(k: &[u8], prefix_len: usize) -> Result<(String, Vec<Value>)> {
    let corrupt = || Error::Store {
        path: "<decode>".into(),
        message: "corrupt row key in the log store".into(),
    };
    let rest = &k[prefix_len.min(k.len())..];
    let nul = rest.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
    let table = String::from_utf8_lossy(&rest[..nul]).into_owned();
    let skip = match rest.get(nul + 1) {
        Some(&crate::store::PAGE_TAG) => 1 + crate::store::PAGE_GROUP_BYTES,
        Some(0) => 1,
        _ => return Err(corrupt()),
    };
    let key = rest.get(nul + 1 + skip..).ok_or_else(corrupt)?;
    Ok((table, dec(key, "row key")?))
}

/// Rows read and written during one handle call, written as one batch.
#[derive(Default)]
struct Overlay {
    rows: HashMap<Vec<u8>, RowState>,
    dirty: BTreeSet<Vec<u8>>,
    /// Views made by remote merges in this batch (journaled with the row).
    views: BTreeMap<Vec<u8>, DbView>,
    batch: WriteBatch,
}

impl<S: LogStore> NodeCore<S> {
    /// Restores a core from `store` (empty for a new node).
    pub fn open(
        settings: NodeSettings,
        tables: Vec<TableInfo>,
        store: S,
        restart_mark: i64,
    ) -> Result<Self> {
        let mut clock = HlcClock::new(&settings.name, settings.max_clock_drift_ms);
        clock.restore(u64_at(&store, K_HLC)?);
        let seq = u64_at(&store, K_SEQ)?;
        let checkpoint = u64_at(&store, K_CHECKPOINT)? as i64;
        let mut vv = VersionVector::default();
        for (k, v) in store.range(P_VV, &prefix_end(P_VV), usize::MAX)? {
            let name = String::from_utf8_lossy(&k[P_VV.len()..]).into_owned();
            let node = NodeId::new(name)?;
            vv.set(node, u64::from_be_bytes(v.try_into().unwrap_or([0; 8])));
        }
        let mut dirty = BTreeMap::new();
        let mut db_views = HashMap::new();
        let mut journal_next = 0;
        for (k, v) in store.range(P_DIRTY, &prefix_end(P_DIRTY), usize::MAX)? {
            let rows: Vec<(Vec<u8>, Option<DbView>)> = match postcard::from_bytes(&v) {
                Ok(rows) => rows,
                // A journal written before views existed.
                Err(_) => dec::<Vec<Vec<u8>>>(&v, "dirty journal")?
                    .into_iter()
                    .map(|r| (r, None))
                    .collect(),
            };
            for (r, view) in rows {
                if let Some(view) = view {
                    let mut rk = P_ROW.to_vec();
                    rk.extend_from_slice(&r);
                    db_views.insert(rk, vec![view]);
                }
                dirty.insert(r, 1);
            }
            let n = k[P_DIRTY.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            journal_next = journal_next.max(n + 1);
        }
        let stats = NodeStats {
            own_ops: seq,
            remote_ops: vv.total() - vv.get(&settings.name),
            dirty_rows: dirty.len() as u64,
            ..NodeStats::default()
        };
        for (k, v) in store.range(P_VIEW, &prefix_end(P_VIEW), usize::MAX)? {
            let views: Vec<DbView> = dec(&v, "database views")?;
            let mut rk = P_ROW.to_vec();
            rk.extend_from_slice(&k[P_VIEW.len()..]);
            db_views.insert(rk, views);
        }
        let mut core = NodeCore {
            tables: tables
                .into_iter()
                .map(|t| (t.schema.name.clone(), std::sync::Arc::new(t)))
                .collect(),
            settings,
            store,
            clock,
            seq,
            vv,
            checkpoint,
            dirty,
            recent: HashMap::new(),
            dirty_gen: 1,
            journal_next,
            conn: Conn::Disconnected {
                retry_at_ms: 0,
                backoff_ms: RECONNECT_MIN_MS,
            },
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            applied_marks: HashMap::new(),
            restart_mark,
            db_views,
            lingering: BTreeSet::new(),
            apply_snaps: HashMap::new(),
            stats,
            engine: String::new(),
            durable: BTreeMap::new(),
            gc: NodeGc::default(),
            resnap: None,
            resnap_expected: false,
            hello_due: false,
        };
        if let Some(b) = core.store.get(K_RESNAP)? {
            core.resnap = Some(dec(&b, "re-snapshot progress")?);
        }
        let mut batch = WriteBatch::default();
        let loaded: Vec<Vec<u8>> = core.db_views.keys().cloned().collect();
        for rk in loaded {
            let persisted = core.db_views.get(&rk).is_some_and(|v| v.len() > 1);
            if persisted {
                core.lingering.insert(rk.clone());
            }
            core.prune_view(&rk, &mut batch)?;
        }
        core.store.write(batch)?;
        Ok(core)
    }

    /// Names the database engine in the hello (shown by the hub's status).
    pub fn set_engine(&mut self, engine: &str) {
        self.engine = engine.to_owned();
    }

    /// Per table, the oldest capture HLC (NTP64 time) of the remote ops made
    /// durable since the last call. The shell stamps them with its clock
    /// right after the flushing call: lag from capture to durable here.
    pub fn take_durable(&mut self) -> BTreeMap<String, u64> {
        std::mem::take(&mut self.durable)
    }

    /// This node's name.
    pub fn name(&self) -> &NodeId {
        &self.settings.name
    }

    /// The capture position: change-table rows up to here are in the log.
    pub fn capture_checkpoint(&self) -> i64 {
        self.checkpoint
    }

    /// The version vector of ops this node holds.
    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    /// Counters.
    pub fn stats(&self) -> NodeStats {
        let mut s = self.stats.clone();
        s.connected = matches!(self.conn, Conn::Connected { .. });
        s.dirty_rows = self.dirty.len() as u64;
        s.gc_cuts = self.gc.stats.cuts;
        s.gc_rows_dropped = self.gc.stats.rows_dropped;
        s
    }

    /// The store (tests and the simulator inspect or crash it).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back (to reopen after a simulated crash).
    pub fn into_store(self) -> S {
        self.store
    }

    /// The merged state of one row.
    pub fn row_state(&self, table: &str, key: &[Value]) -> Result<RowState> {
        match self.store.get(&row_key(P_ROW, table, key)?)? {
            Some(b) => dec(&b, "row state"),
            None => Ok(RowState::default()),
        }
    }

    /// Own ops from `seq` `from` on, in order (at most `limit`). An op
    /// under a single-op key (`l/<seq>`: written by earlier versions, or
    /// rewritten by a re-snapshot install) replaces the op of that seq in
    /// a packed chunk.
    pub fn own_ops(&self, from: u64, limit: usize) -> Result<Vec<Op>> {
        let mut ops: BTreeMap<u64, Op> = BTreeMap::new();
        // Packed keys are named by their last seq: the first key at or
        // above `from` holds it.
        let mut start = P_LOG_PACKED.to_vec();
        start.extend_from_slice(&from.to_be_bytes());
        let end = prefix_end(P_LOG_PACKED);
        let mut packed = 0;
        while packed < limit {
            let Some((k, v)) = self.store.range(&start, &end, 1)?.pop() else {
                break;
            };
            let chunk: Vec<Op> = dec(&v, "packed ops")?;
            for op in chunk.into_iter().filter(|op| op.id.seq >= from) {
                if packed == limit {
                    break;
                }
                packed += 1;
                ops.insert(op.id.seq, op);
            }
            start = k;
            start.push(0);
        }
        let mut start = P_LOG.to_vec();
        start.extend_from_slice(&from.to_be_bytes());
        for (_, v) in self.store.range(&start, &prefix_end(P_LOG), limit)? {
            let op: Op = dec(&v, "op")?;
            ops.insert(op.id.seq, op);
        }
        Ok(ops.into_values().take(limit).collect())
    }

    /// Next event to log or count.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn warn(&mut self, msg: String) {
        self.stats.warnings += 1;
        self.events.push_back(Event::Warning(msg));
    }

    fn load_row(&self, ov: &mut Overlay, rk: &[u8]) -> Result<RowState> {
        if let Some(r) = ov.rows.get(rk) {
            return Ok(r.clone());
        }
        Ok(match self.store.get(rk)? {
            Some(b) => dec(&b, "row state")?,
            None => RowState::default(),
        })
    }

    fn mark_dirty(&mut self, ov: &mut Overlay, table: &str, key: &[Value]) -> Result<()> {
        ov.dirty.insert(row_key(b"", table, key)?);
        Ok(())
    }

    fn commit(&mut self, ov: Overlay) -> Result<()> {
        let mut batch = ov.batch;
        for (k, r) in &ov.rows {
            batch.put(k.clone(), enc(r)?);
        }
        batch.put(K_HLC.to_vec(), self.clock.last().to_be_bytes().to_vec());
        if !ov.dirty.is_empty() {
            let mut jk = P_DIRTY.to_vec();
            jk.extend_from_slice(&self.journal_next.to_be_bytes());
            let record: Vec<(&Vec<u8>, Option<&DbView>)> =
                ov.dirty.iter().map(|k| (k, ov.views.get(k))).collect();
            batch.put(jk, enc(&record)?);
            self.journal_next += 1;
        }
        self.store.write(batch)?;
        self.store.flush()?;
        if self.resnap.is_some() {
            // Rows may have been written outside `ov.rows`.
            self.recent.clear();
        } else {
            for (k, r) in ov.rows {
                let waiting = ov.dirty.contains(&k[P_ROW.len().min(k.len())..]);
                if (waiting && self.recent.len() < RECENT_ROWS_MAX) || self.recent.contains_key(&k)
                {
                    self.recent.insert(k, r);
                }
            }
        }
        for k in ov.dirty {
            self.dirty_gen += 1;
            self.dirty.insert(k, self.dirty_gen);
        }
        Ok(())
    }

    /// Turns captured local changes into ops, merges them, and makes ops,
    /// row state and the new capture checkpoint durable in one flushed batch.
    /// Returns the checkpoint: the shell may now delete change rows up to it.
    pub fn handle_captured(&mut self, now: Ntp64, changes: &[CapturedChange]) -> Result<i64> {
        self.handle_captured_with_meta(now, changes, &[])
    }

    /// Like [`NodeCore::handle_captured`], also writing the adapter
    /// records `meta` in the same flushed batch (so, e.g., a change
    /// stream's resume token is durable exactly when the ops made from the
    /// changes before it are). With no changes only `meta` is written.
    pub fn handle_captured_with_meta(
        &mut self,
        now: Ntp64,
        changes: &[CapturedChange],
        meta: &[MetaWrite],
    ) -> Result<i64> {
        if self.resnap_installing() {
            // Captured after the re-snapshot is installed (the change rows
            // stay in the change table until then).
            return Ok(self.checkpoint);
        }
        let Some(last) = changes.last() else {
            self.handle_meta(meta)?;
            return Ok(self.checkpoint);
        };
        self.capture(now, changes, last.change_id, meta)
    }

    /// The adapter record `name` as last written (flushed or not; every
    /// write of it is flushed before its call returns).
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut k = P_META.to_vec();
        k.extend_from_slice(name.as_bytes());
        self.store.get(&k)
    }

    /// Writes adapter records alone, flushed before it returns.
    pub fn handle_meta(&mut self, meta: &[MetaWrite]) -> Result<()> {
        if meta.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        put_meta(&mut batch, meta);
        self.store.write(batch)?;
        self.store.flush()
    }

    /// Like [`NodeCore::handle_captured`] for rows of an initial snapshot
    /// (inserts of the rows as they are): the capture checkpoint stays
    /// where it is, so a crash before [`NodeCore::handle_checkpoint`] makes
    /// the shell start the snapshot again. The rows are not written back
    /// to the database unless the merged row differs from them.
    pub fn handle_snapshot(&mut self, now: Ntp64, rows: &[CapturedChange]) -> Result<()> {
        self.handle_snapshot_with_meta(now, rows, &[])
    }

    /// Like [`NodeCore::handle_snapshot`], also writing the adapter records
    /// `meta` (e.g. the snapshot's cursor) in the same flushed batch.
    pub fn handle_snapshot_with_meta(
        &mut self,
        now: Ntp64,
        rows: &[CapturedChange],
        meta: &[MetaWrite],
    ) -> Result<()> {
        if self.resnap_installing() {
            return Err(Error::Database {
                database: self.settings.name.to_string(),
                message: "a re-snapshot from the hub is being installed; the initial snapshot \
                          continues once it is"
                    .into(),
            });
        }
        if rows.is_empty() {
            return self.handle_meta(meta);
        }
        let rows: Vec<CapturedChange> = rows
            .iter()
            .map(|r| CapturedChange {
                change_id: i64::MAX,
                ..r.clone()
            })
            .collect();
        self.capture(now, &rows, self.checkpoint, meta)?;
        Ok(())
    }

    fn capture(
        &mut self,
        now: Ntp64,
        changes: &[CapturedChange],
        checkpoint: i64,
        meta: &[MetaWrite],
    ) -> Result<i64> {
        let mut ov = Overlay::default();
        let mut logged: Vec<Op> = Vec::with_capacity(changes.len());
        put_meta(&mut ov.batch, meta);
        for ch in changes {
            let Some(info) = self.tables.get(&ch.table).cloned() else {
                self.warn(format!(
                    "captured a change of table {} which is not configured; it is skipped: remove its trigger or add the table to the config",
                    ch.table
                ));
                continue;
            };
            for split in split_change(&info, ch)? {
                let SplitOp {
                    key,
                    fields,
                    insert,
                    expected,
                } = split;
                let rk = row_key(P_ROW, &info.schema.name, &key)?;
                let mut row = self.load_row(&mut ov, &rk)?;
                self.seq += 1;
                let id = OpId::new(self.settings.name.clone(), self.seq);
                let hlc = self.clock.tick(now);
                // What the user saw: the newest database view older than
                // the change, or the merged state when the database shows
                // every merged op of the row.
                let view = self.db_views.get(&rk).map(|vs| {
                    let v = vs
                        .iter()
                        .rev()
                        .find(|v| v.from < ch.change_id)
                        .unwrap_or(&vs[0]);
                    let mut seen = v.seen.clone();
                    seen.set(self.settings.name.clone(), self.seq - 1);
                    (v.state.clone(), seen)
                });
                let me = self.settings.name.clone();
                // Remote ids from the view, own ids (always seen) from the
                // merged state.
                let seen = |of: &dyn Fn(&RowState) -> Vec<OpId>| match &view {
                    None => of(&row),
                    Some((state, _)) => {
                        let mut ids: BTreeSet<OpId> = of(state).into_iter().collect();
                        ids.extend(of(&row).into_iter().filter(|i| i.origin == me));
                        ids.into_iter().collect::<Vec<_>>()
                    }
                };
                let mut op = match fields {
                    None => Op::delete(
                        id,
                        hlc,
                        &info.schema.name,
                        key.clone(),
                        seen(&|r| r.delete_pred()),
                    ),
                    Some(fields) => {
                        let mut writes = Vec::with_capacity(fields.len());
                        for (name, value, delta) in fields {
                            if delta.is_none() && info.is_sum(&name) {
                                self.warn(format!(
                                    "table {}, field {name}: a sum field got the non-numeric value {value}; it is stored but does not count toward the total: write numbers only",
                                    info.schema.name
                                ));
                            }
                            writes.push(FieldWrite {
                                pred: seen(&|r| r.field_pred(&name)),
                                name,
                                value,
                                delta,
                            });
                        }
                        let mut op = Op::upsert(id, hlc, &info.schema.name, key.clone(), writes);
                        // An insert means the row was absent here: it
                        // supersedes everything this node saw of the key.
                        op.row_pred = if insert {
                            match &view {
                                // `vv` holds every own op: prefixes cover them.
                                Some((state, vv)) => state.insert_pred(vv),
                                None => row.insert_pred(&self.vv),
                            }
                        } else {
                            seen(&|r| r.tombstone_pred())
                        };
                        op
                    }
                };
                // Written from a database view older than a re-snapshot
                // that removed the row (a collected delete it never saw).
                if let Some(floor) = self.resnap_floor()
                    && view
                        .as_ref()
                        .is_some_and(|(_, seen)| !seen.dominates(floor))
                    && lost_update(&info, &row, &op)
                {
                    op.fields.clear();
                    self.stats.warnings += 1;
                    self.events.push_back(Event::Resnapshot(format!(
                        "write {} to table {} key {:?} was made before this node saw a delete \
                         of the row that the mesh has garbage-collected; delete_wins: the \
                         write is dropped and the row deleted here too",
                        op.id, op.table, op.key
                    )));
                }
                // A field's `pred` from a view keeps only the writes the
                // merged state still holds live: not the view's own writes
                // a later own write replaced, nor remote ones a later own
                // (which its user saw) or remote write superseded. Such a
                // write may be settled by the stable cut already (own
                // writes count as seen at once), so naming it again would
                // break the collection's premise: the hub could have
                // dropped its value and miss the conflict it is a
                // candidate of (simulator seeds 243, 1056). `lost_update`
                // above still judged the write by everything its user saw.
                if view.is_some() {
                    for w in &mut op.fields {
                        if w.pred.is_empty() {
                            continue;
                        }
                        let live = row.field_pred(&w.name);
                        w.pred.retain(|i| live.contains(i));
                    }
                }
                row.apply(&op);
                self.vv.set(self.settings.name.clone(), self.seq);

                if logged.len() == LOG_OPS_PER_KEY {
                    put_packed(&mut ov.batch, &logged)?;
                    logged.clear();
                }
                logged.push(op);
                let visible = row.visible(&info.rules);
                let overwritten = ch.change_id
                    <= self
                        .applied_marks
                        .get(&rk)
                        .copied()
                        .unwrap_or(0)
                        .max(self.restart_mark);
                if overwritten || !same_row(&info.schema, visible.as_ref(), expected.as_ref()) {
                    self.mark_dirty(&mut ov, &info.schema.name, &key)?;
                }
                ov.rows.insert(rk, row);
            }
        }
        put_packed(&mut ov.batch, &logged)?;
        self.checkpoint = checkpoint;
        self.vv.set(self.settings.name.clone(), self.seq);
        self.stats.own_ops = self.seq;
        ov.batch
            .put(K_SEQ.to_vec(), self.seq.to_be_bytes().to_vec());
        ov.batch.put(
            K_CHECKPOINT.to_vec(),
            (self.checkpoint as u64).to_be_bytes().to_vec(),
        );
        let mut vk = P_VV.to_vec();
        vk.extend_from_slice(self.settings.name.as_str().as_bytes());
        ov.batch.put(vk, self.seq.to_be_bytes().to_vec());
        self.commit(ov)?;
        self.gc.report_due = true;
        let cp = self.checkpoint;
        self.applied_marks.retain(|_, mark| *mark > cp);
        let mut batch = WriteBatch::default();
        for rk in self.lingering.clone() {
            self.prune_view(&rk, &mut batch)?;
        }
        // Not flushed: a lost update keeps views that `open` prunes again.
        self.store.write(batch)?;
        Ok(cp)
    }

    /// Records the capture position `checkpoint` without captured changes
    /// (an initial snapshot ended there), flushed before it returns.
    pub fn handle_checkpoint(&mut self, checkpoint: i64) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(
            K_CHECKPOINT.to_vec(),
            (checkpoint as u64).to_be_bytes().to_vec(),
        );
        self.store.write(batch)?;
        self.store.flush()?;
        self.checkpoint = checkpoint;
        Ok(())
    }

    /// Whether the shell should dial the hub now.
    pub fn poll_connect(&mut self, now_ms: u64) -> bool {
        match self.conn {
            Conn::Disconnected { retry_at_ms, .. } if now_ms >= retry_at_ms => {
                self.conn = Conn::Connecting;
                true
            }
            _ => false,
        }
    }

    /// When the next reconnect is due (if disconnected).
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.conn {
            Conn::Disconnected { retry_at_ms, .. } => Some(retry_at_ms),
            _ => None,
        }
    }

    /// The stream to the hub is open: queues the hello.
    pub fn handle_connected(&mut self, _now_ms: u64) {
        self.conn = Conn::Handshaking;
        self.outbox.clear();
        self.hello_due = true;
        self.resnap_expected = false;
        self.gc.hub_speaks = false;
        self.gc.reported = None;
        self.gc.report_due = false;
    }

    /// The hello, built when it is sent (a re-snapshot being installed
    /// holds it back, so it carries the installed state).
    fn hello(&self) -> pb::NodeMessage {
        pb::NodeMessage {
            body: Some(pb::node_message::Body::Hello(pb::Hello {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                node: self.settings.name.as_str().to_owned(),
                version_vector: Some(wire::vv_to_proto(&self.vv)),
                mode: self.settings.mode.as_str().to_owned(),
                engine: self.engine.clone(),
                // GC offered with the weakest true report: the real one
                // follows as a `SeenReport` after a flush (see
                // `poll_seen_report`).
                seen: Some(pb::VersionVector::default()),
                resnap: true,
                snapshot: self
                    .resnap
                    .as_ref()
                    .map(|r| wire::snapshot_progress_to_proto(&r.progress)),
            })),
        }
    }

    /// The stream closed or could not be opened; `jitter_ms` (from the
    /// shell's RNG) spreads reconnects of many nodes.
    pub fn handle_disconnected(&mut self, now_ms: u64, jitter_ms: u64) {
        let prev = match self.conn {
            Conn::Disconnected { backoff_ms, .. } => backoff_ms,
            Conn::Connected { .. } => RECONNECT_MIN_MS / 2,
            _ => RECONNECT_MIN_MS,
        };
        let backoff_ms = (prev * 2).clamp(RECONNECT_MIN_MS, RECONNECT_MAX_MS);
        self.outbox.clear();
        self.conn = Conn::Disconnected {
            retry_at_ms: now_ms + backoff_ms + jitter_ms % (backoff_ms / 2 + 1),
            backoff_ms,
        };
    }

    /// Handles one message from the hub.
    pub fn handle_message(&mut self, now: Ntp64, msg: pb::HubMessage) -> Result<Control> {
        use pb::hub_message::Body;
        match msg.body {
            None => Ok(Control::Reconnect("empty message from the hub".into())),
            Some(Body::Hello(h)) => {
                if h.protocol_version != syncmesh_proto::PROTOCOL_VERSION {
                    return Ok(Control::Reconnect(format!(
                        "hub speaks protocol {} but this node speaks {}: upgrade the older side",
                        h.protocol_version,
                        syncmesh_proto::PROTOCOL_VERSION
                    )));
                }
                let hub_vv = wire::vv_from_proto(h.version_vector)?;
                let hub_has = hub_vv.get(&self.settings.name);
                if hub_has > self.seq {
                    // New ops would reuse sequence numbers the hub already
                    // holds and be dropped as retries: refuse to go on.
                    return Err(Error::Store {
                        path: self.settings.name.to_string(),
                        message: format!(
                            "the hub holds {hub_has} ops from node {} but this node's log has only {}: its data_dir was reset or restored from an old backup; restore the latest data_dir, or give the database a new node name",
                            self.settings.name, self.seq
                        ),
                    });
                }
                let has = hub_has;
                self.stats.own_acked = has;
                self.stats.remote_ops_at_hub = hub_vv.total().saturating_sub(hub_has);
                self.conn = Conn::Connected {
                    hub_acked_own: has,
                    sent_own: has,
                };
                self.events.push_back(Event::Connected { hub_has_own: has });
                self.resnap_expected = h.snapshot;
                if !h.snapshot
                    && let Some(r) = &mut self.resnap
                    && r.phase == ResnapPhase::Staging
                {
                    // The hub no longer serves it: drop what was staged.
                    r.phase = ResnapPhase::Cleanup;
                    let r = r.clone();
                    self.save_resnap(&r)?;
                }
                if let Some(cut) = h.cut {
                    self.gc.hub_speaks = true;
                    self.gc.report_due = true;
                    return self.handle_cut(cut);
                }
                Ok(Control::Continue)
            }
            Some(Body::Ack(a)) => {
                let vv = wire::vv_from_proto(a.version_vector)?;
                let acked = vv.get(&self.settings.name);
                if let Conn::Connected { hub_acked_own, .. } = &mut self.conn {
                    *hub_acked_own = (*hub_acked_own).max(acked.min(self.seq));
                    self.stats.own_acked = *hub_acked_own;
                }
                Ok(Control::Continue)
            }
            Some(Body::Error(e)) => {
                self.events.push_back(Event::HubError {
                    code: e.code.clone(),
                    message: e.message.clone(),
                });
                Ok(Control::Reconnect(format!(
                    "hub rejected input ({}): {}",
                    e.code, e.message
                )))
            }
            Some(Body::Ops(_)) if self.resnap_expected => Ok(Control::Reconnect(
                "the hub sent ops during a re-snapshot; reconnecting".into(),
            )),
            Some(Body::Ops(batch)) => self.handle_remote_ops(now, batch),
            Some(Body::Cut(cut)) => self.handle_cut(cut),
            Some(Body::Snapshot(chunk)) => self.handle_snapshot_chunk(chunk),
        }
    }

    fn handle_remote_ops(&mut self, now: Ntp64, batch: pb::OpBatch) -> Result<Control> {
        if batch.ops.len() > syncmesh_proto::MAX_BATCH_OPS {
            return Ok(Control::Reconnect(format!(
                "hub sent {} ops in one batch, above the limit of {}",
                batch.ops.len(),
                syncmesh_proto::MAX_BATCH_OPS
            )));
        }
        let mut ov = Overlay::default();
        let mut changed_vv: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut control = Control::Continue;
        let mut merged = BatchTally::default();
        for raw in batch.ops {
            let op = match wire::op_from_proto(raw) {
                Ok(op) => op,
                Err(e) => {
                    control = Control::Reconnect(format!("malformed op from the hub: {e}"));
                    break;
                }
            };
            let have = changed_vv
                .get(&op.id.origin)
                .copied()
                .unwrap_or(self.vv.get(&op.id.origin));
            if op.id.seq <= have {
                continue; // duplicate: already merged
            }
            if op.id.seq != have + 1 {
                control = Control::Reconnect(format!(
                    "hub sent op {} but this node holds {} only up to seq {have}: gap in the stream",
                    op.id, op.id.origin
                ));
                break;
            }
            if op.id.origin == self.settings.name {
                control = Control::Reconnect(format!(
                    "hub sent op {} which this node never made: its log is ahead of this node's (was data_dir reset?)",
                    op.id
                ));
                break;
            }
            if let Err(e) = self.clock.observe(&op.id, op.hlc, now) {
                self.warn(format!(
                    "{e}; the op is merged, this clock is not advanced to it"
                ));
            }
            changed_vv.insert(op.id.origin.clone(), op.id.seq);
            self.stats.remote_ops += 1;
            let Some(info) = self.tables.get(&op.table).cloned() else {
                self.warn(format!(
                    "op {} is for table {} which this node does not sync; skipped: add the table to this node's config",
                    op.id, op.table
                ));
                continue;
            };
            if op.key.len() != info.schema.key.len() {
                self.warn(format!(
                    "op {} for table {} has {} key values but the table key has {} columns; skipped: make the table keys match on every node",
                    op.id,
                    op.table,
                    op.key.len(),
                    info.schema.key.len()
                ));
                continue;
            }
            let rk = row_key(P_ROW, &op.table, &op.key)?;
            let mut row = self.load_row(&mut ov, &rk)?;
            // Only a subscribe-only node skips rows whose visible state
            // stays the same.
            let subscribe = self.settings.mode == Mode::Subscribe;
            let before = subscribe.then(|| row.visible(&info.rules));
            if self.settings.mode == Mode::Bidirectional && !self.db_views.contains_key(&rk) {
                // The database shows this row as merged so far; keep that
                // view until an apply makes the new op visible there.
                let mut seen = self.vv.clone();
                for (o, s) in &changed_vv {
                    if *o != op.id.origin {
                        seen.set(o.clone(), *s);
                    } else {
                        seen.set(o.clone(), s.saturating_sub(1));
                    }
                }
                let views = vec![DbView {
                    from: i64::MIN,
                    state: row.clone(),
                    seen,
                }];
                ov.views
                    .insert(rk[P_ROW.len()..].to_vec(), views[0].clone());
                self.db_views.insert(rk.clone(), views);
            }
            row.apply(&op);
            merged.note(&op);
            // A bidirectional node rewrites the row even when its visible
            // state did not change: the apply's watermark tells later
            // local writes that they saw the op.
            let changed = before.is_some_and(|b| row.visible(&info.rules) != b);
            if changed || self.settings.mode == Mode::Bidirectional {
                self.mark_dirty(&mut ov, &op.table, &op.key)?;
            }
            ov.rows.insert(rk, row);
        }
        for (origin, seq) in &changed_vv {
            let mut vk = P_VV.to_vec();
            vk.extend_from_slice(origin.as_str().as_bytes());
            ov.batch.put(vk, seq.to_be_bytes().to_vec());
            self.vv.set(origin.clone(), *seq);
        }
        self.commit(ov)?;
        for t in merged.into_tallies() {
            *self
                .stats
                .records_synced
                .entry((t.table.clone(), t.kind.to_owned()))
                .or_insert(0) += t.ops;
            let oldest = self.durable.entry(t.table).or_insert(t.oldest_hlc);
            *oldest = (*oldest).min(t.oldest_hlc);
        }
        self.gc.report_due = true;
        // Durable now: acknowledge.
        self.outbox.push_back(pb::NodeMessage {
            body: Some(pb::node_message::Body::Ack(pb::Ack {
                version_vector: Some(wire::vv_to_proto(&self.vv)),
            })),
        });
        Ok(control)
    }

    /// The next message for the hub, if any.
    pub fn poll_transmit(&mut self) -> Result<Option<pb::NodeMessage>> {
        if self.resnap_installing() {
            return Ok(None);
        }
        if self.hello_due && !matches!(self.conn, Conn::Disconnected { .. }) {
            self.hello_due = false;
            return Ok(Some(self.hello()));
        }
        if let Some(m) = self.outbox.pop_front() {
            return Ok(Some(m));
        }
        if let Some(m) = self.poll_seen_report()? {
            return Ok(Some(m));
        }
        if self.settings.mode == Mode::Subscribe || self.resnap_expected {
            return Ok(None);
        }
        let Conn::Connected {
            hub_acked_own,
            sent_own,
        } = self.conn
        else {
            return Ok(None);
        };
        let batch = self.settings.batch_size.max(1) as u64;
        if sent_own >= self.seq
            || sent_own.saturating_sub(hub_acked_own) >= batch * MAX_INFLIGHT_BATCHES
        {
            return Ok(None);
        }
        let ops = self.own_ops(sent_own + 1, batch as usize)?;
        let mut out = Vec::with_capacity(ops.len());
        let mut bytes = 0usize;
        let mut last = sent_own;
        for op in &ops {
            let p = wire::op_to_proto(op);
            bytes += prost::Message::encoded_len(&p);
            if bytes > MAX_BATCH_BYTES && !out.is_empty() {
                break;
            }
            last = op.id.seq;
            out.push(p);
        }
        if out.is_empty() {
            return Ok(None);
        }
        if let Conn::Connected { sent_own, .. } = &mut self.conn {
            *sent_own = last;
        }
        Ok(Some(pb::NodeMessage {
            body: Some(pb::node_message::Body::Ops(pb::OpBatch { ops: out })),
        }))
    }

    /// Drops the views of `rk` no future capture can need: a view is needed
    /// while a change older than the next view may still be captured, and
    /// the last one while remote merges wait to be applied.
    /// Views of rows in `lingering` are persisted; `batch` gets the puts
    /// and removals that keep it so.
    fn prune_view(&mut self, rk: &[u8], batch: &mut WriteBatch) -> Result<()> {
        let was_persisted = self.lingering.remove(rk);
        let mut vkey = P_VIEW.to_vec();
        vkey.extend_from_slice(&rk[P_ROW.len().min(rk.len())..]);
        let Some(vs) = self.db_views.get_mut(rk) else {
            if was_persisted {
                batch.remove(vkey);
            }
            return Ok(());
        };
        while vs.len() > 1 && vs[1].from <= self.checkpoint {
            vs.remove(0);
        }
        if vs.len() > 1 {
            batch.put(vkey, enc(&*vs)?);
            self.lingering.insert(rk.to_vec());
            return Ok(());
        }
        if was_persisted {
            batch.remove(vkey);
        }
        if !self.dirty.contains_key(&rk[P_ROW.len()..]) {
            // Nothing waits to be applied: the database shows every merged
            // remote op of the row.
            self.db_views.remove(rk);
            self.apply_snaps.remove(rk);
        }
        Ok(())
    }

    /// Up to `limit` rows whose visible state must be written to the database.
    pub fn poll_apply(&mut self, limit: usize) -> Result<Vec<PendingApply>> {
        let mut out = Vec::new();
        if self.resnap_installing() {
            // Rows are written once the whole snapshot is installed.
            return Ok(out);
        }
        for (k, generation) in self.dirty.iter().take(limit) {
            let (table, key) = split_row_key(k, 0)?;
            let Some(info) = self.tables.get(&table) else {
                continue;
            };
            let mut rk = P_ROW.to_vec();
            rk.extend_from_slice(k);
            let state = match self.recent.remove(&rk) {
                Some(state) => state,
                None => self.row_state(&table, &key)?,
            };
            let row = state.visible(&info.rules).map(|mut r| {
                for (col, val) in info.schema.key.iter().zip(&key) {
                    r.insert(col.clone(), val.clone());
                }
                r
            });
            if self.db_views.contains_key(&rk) {
                self.apply_snaps.insert(
                    rk,
                    DbView {
                        from: 0,
                        state,
                        seen: self.vv.clone(),
                    },
                );
            }
            out.push(PendingApply {
                write: RowWrite { table, key, row },
                token: (k.clone(), *generation),
            });
        }
        Ok(out)
    }

    /// The shell wrote `done` in one transaction that committed with the
    /// change table at `watermark` (its highest id so far).
    pub fn handle_applied(&mut self, done: &[PendingApply], watermark: i64) -> Result<()> {
        let mut views = WriteBatch::default();
        for p in done {
            let (k, generation) = &p.token;
            if self.dirty.get(k) == Some(generation) {
                self.dirty.remove(k);
            }
            let mut rk = P_ROW.to_vec();
            rk.extend_from_slice(k);
            if let Some(mut snap) = self.apply_snaps.remove(&rk)
                && let Some(vs) = self.db_views.get_mut(&rk)
            {
                snap.from = watermark;
                vs.push(snap);
            }
            self.prune_view(&rk, &mut views)?;
            self.applied_marks.insert(rk, watermark);
        }
        self.gc.report_due = true;
        self.store.write(views)?;
        if self.dirty.is_empty() && self.journal_next > 0 {
            // Everything journaled is in the database now. Not flushed on
            // purpose: losing this only re-applies rows (idempotent).
            let mut batch = WriteBatch::default();
            for (k, _) in self
                .store
                .range(P_DIRTY, &prefix_end(P_DIRTY), usize::MAX)?
            {
                batch.remove(k);
            }
            self.store.write(batch)?;
        }
        Ok(())
    }
}

/// Tombstone garbage collection (see ARCHITECTURE.md, invariant 6).
impl<S: LogStore> NodeCore<S> {
    /// What every op this node writes from now on has seen: its version
    /// vector, lowered per remote origin to the oldest database view a
    /// future capture may still take its `pred` from, with its own seq.
    pub fn gc_seen(&self) -> VersionVector {
        let me = &self.settings.name;
        let mut seen = self.vv.clone();
        let views = self
            .db_views
            .values()
            .flatten()
            .chain(self.apply_snaps.values());
        for v in views {
            for (origin, have) in seen.0.iter_mut() {
                if origin != me {
                    *have = (*have).min(v.seen.get(origin));
                }
            }
        }
        seen.set(me.clone(), self.seq);
        seen.0.retain(|_, s| *s > 0);
        seen
    }

    /// A seen report, when the seen vector moved. The store is flushed
    /// first: views are dropped with unflushed writes (journal clearing,
    /// `w/`), and a crash that brought an older view back would let a later
    /// capture see less than this report claims.
    fn poll_seen_report(&mut self) -> Result<Option<pb::NodeMessage>> {
        if !self.gc.hub_speaks
            || !self.gc.report_due
            || !matches!(self.conn, Conn::Connected { .. })
        {
            return Ok(None);
        }
        self.gc.report_due = false;
        let seen = self.gc_seen();
        if self.gc.reported.as_ref() == Some(&seen) {
            return Ok(None);
        }
        self.store.flush()?;
        let msg = pb::NodeMessage {
            body: Some(pb::node_message::Body::Seen(pb::SeenReport {
                seen: Some(wire::vv_to_proto(&seen)),
            })),
        };
        self.gc.reported = Some(seen);
        Ok(Some(msg))
    }

    fn handle_cut(&mut self, cut: pb::StableCut) -> Result<Control> {
        let cut = match wire::cut_from_proto(cut) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Control::Reconnect(format!(
                    "bad stable cut from the hub: {e}"
                )));
            }
        };
        let newer = |c: &wire::StableCut, than: &wire::StableCut| {
            c.stable != than.stable && c.stable.dominates(&than.stable)
        };
        let base = self.gc.pending.as_ref().unwrap_or(&self.gc.active);
        if !cut.is_empty() && newer(&cut, base) {
            self.gc.pending = Some(cut);
        }
        Ok(Control::Continue)
    }

    /// The cut collected at, or being collected at.
    pub fn gc_cut(&self) -> &wire::StableCut {
        &self.gc.active
    }

    /// GC counters.
    pub fn gc_stats(&self) -> &NodeGcStats {
        &self.gc.stats
    }

    /// How many row states the node stores.
    pub fn row_state_count(&self) -> Result<usize> {
        Ok(self
            .store
            .range(P_ROW, &prefix_end(P_ROW), usize::MAX)?
            .len())
    }

    /// Collects at most `max_rows` row states (one flushed batch): starts
    /// the hub's newest cut once it is valid here — this node's version
    /// vector dominates its horizon (P1: every covered op is merged here,
    /// every op of the cut's writers up to their reports too) and what its
    /// future captures have seen dominates its stable vector (P2 for its
    /// own ops). Returns the rows examined.
    pub fn poll_gc(&mut self, max_rows: usize) -> Result<usize> {
        if self.resnap.as_ref().is_some_and(|r| {
            matches!(
                r.phase,
                ResnapPhase::Rows(_) | ResnapPhase::Own(..) | ResnapPhase::Cleanup
            )
        }) {
            self.recent.clear();
            return self.resnap_step(max_rows.max(1));
        }
        if self.gc.cursor.is_none()
            && let Some(cut) = &self.gc.pending
            && self.vv.dominates(&cut.horizon)
            && self.gc_seen().dominates(&cut.stable)
        {
            self.gc.active = self.gc.pending.take().unwrap_or_default();
            self.gc.cursor = Some(P_ROW.to_vec());
            self.gc.stats.cuts += 1;
        }
        let Some(from) = self.gc.cursor.clone() else {
            return Ok(0);
        };
        let max_rows = max_rows.max(1);
        let rows = self.store.range(&from, &prefix_end(P_ROW), max_rows)?;
        let mut batch = WriteBatch::default();
        for (k, v) in &rows {
            let mut row: RowState = dec(v, "row state")?;
            if row.is_compact() {
                continue; // nothing a cut can collect
            }
            let before = row.clone();
            if row.collect_garbage(&self.gc.active.stable) {
                batch.remove(k.clone());
                self.gc.stats.rows_dropped += 1;
            } else if row != before {
                batch.put(k.clone(), enc(&row)?);
                self.gc.stats.rows_collected += 1;
            }
        }
        self.gc.cursor = crate::store::next_cursor(&rows, max_rows);
        if !batch.is_empty() {
            self.recent.clear();
            self.store.write(batch)?;
            self.store.flush()?;
        }
        Ok(rows.len())
    }
}

/// A row's current and staged state bytes during a re-snapshot install.
type OldNew<'a> = (Option<&'a Vec<u8>>, Option<&'a Vec<u8>>);

/// Re-snapshot from the hub (see ARCHITECTURE.md, invariant 6).
impl<S: LogStore> NodeCore<S> {
    /// True while a re-snapshot replaces the row states (capture, apply
    /// and the hub stream wait).
    pub fn resnap_installing(&self) -> bool {
        self.resnap
            .as_ref()
            .is_some_and(|r| matches!(r.phase, ResnapPhase::Rows(_) | ResnapPhase::Own(..)))
    }

    /// Re-snapshots installed or being installed: the snapshot's id and
    /// whether it is installed (for tests and status).
    pub fn resnap_progress(&self) -> Option<(u64, bool)> {
        self.resnap
            .as_ref()
            .map(|r| (r.progress.id, r.progress.installed))
    }

    /// The stable cut of the installed re-snapshot: a write from a database
    /// view that had not seen it may hit a row its collected deletes
    /// removed.
    fn resnap_floor(&self) -> Option<&VersionVector> {
        self.resnap
            .as_ref()
            .filter(|r| r.progress.installed)
            .map(|r| &r.progress.cut.stable)
    }

    fn save_resnap(&mut self, r: &Resnap) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put(K_RESNAP.to_vec(), enc(r)?);
        self.store.write(batch)?;
        self.store.flush()
    }

    fn staged_prefix(id: u64) -> Vec<u8> {
        let mut k = P_RESNAP_ROW.to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    /// Stages one chunk (flushed with the progress record), then
    /// acknowledges it; the last one starts the install.
    fn handle_snapshot_chunk(&mut self, chunk: pb::SnapshotChunk) -> Result<Control> {
        if !self.resnap_expected {
            return Ok(Control::Reconnect(
                "the hub sent a snapshot chunk it had not announced; reconnecting".into(),
            ));
        }
        let chunk = match wire::snapshot_chunk_from_proto(chunk) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Control::Reconnect(format!(
                    "bad snapshot chunk from the hub: {e}"
                )));
            }
        };
        let same = self.resnap.as_ref().is_some_and(|r| {
            r.phase == ResnapPhase::Staging
                && r.progress.id == chunk.progress.id
                && r.progress.cut == chunk.progress.cut
                && r.progress.vv == chunk.progress.vv
        });
        let mut r = match (&self.resnap, same) {
            (Some(r), true) => r.clone(),
            _ => {
                self.events.push_back(Event::Resnapshot(format!(
                    "re-snapshot {} from the hub: this node missed deletes the mesh has \
                     garbage-collected (stable cut {:?}); its row states are replaced by the \
                     hub's, rows deleted meanwhile are deleted from the database, then its \
                     unsent writes are merged and sent",
                    chunk.progress.id, chunk.progress.cut.stable.0
                )));
                Resnap {
                    progress: wire::SnapshotProgress {
                        after_key: Vec::new(),
                        ..chunk.progress.clone()
                    },
                    tables: chunk.tables.clone(),
                    phase: ResnapPhase::Staging,
                    replaced: 0,
                    removed: 0,
                    dropped_writes: 0,
                }
            }
        };
        let prefix = Self::staged_prefix(r.progress.id);
        let mut batch = WriteBatch::default();
        for (table, key, state) in &chunk.rows {
            let mut k = prefix.clone();
            k.extend_from_slice(&row_key(b"", table, key)?);
            batch.put(k, enc(state)?);
        }
        if !chunk.rows.is_empty() {
            r.progress.after_key = chunk.progress.after_key.clone();
        }
        if chunk.last {
            r.phase = ResnapPhase::Rows(Vec::new());
        }
        batch.put(K_RESNAP.to_vec(), enc(&r)?);
        self.store.write(batch)?;
        self.store.flush()?;
        if !chunk.last {
            self.outbox.push_back(pb::NodeMessage {
                body: Some(pb::node_message::Body::SnapshotAck(pb::SnapshotAck {
                    id: r.progress.id,
                    after_key: r.progress.after_key.clone(),
                    installed: false,
                })),
            });
        }
        self.resnap = Some(r);
        Ok(Control::Continue)
    }

    /// One bounded step of installing a re-snapshot (at most `max` keys,
    /// one flushed batch).
    fn resnap_step(&mut self, max: usize) -> Result<usize> {
        let Some(mut r) = self.resnap.clone() else {
            return Ok(0);
        };
        match r.phase.clone() {
            ResnapPhase::Rows(cursor) => self.resnap_rows(&mut r, &cursor, max),
            ResnapPhase::Own(next, upto) => self.resnap_own(&mut r, next, upto, max),
            ResnapPhase::Cleanup => {
                let keys = self
                    .store
                    .range(P_RESNAP_ROW, &prefix_end(P_RESNAP_ROW), max)?;
                let n = keys.len();
                let mut batch = WriteBatch::default();
                for (k, _) in keys {
                    batch.remove(k);
                }
                if n < max {
                    if r.progress.installed {
                        r.phase = ResnapPhase::Done;
                        batch.put(K_RESNAP.to_vec(), enc(&r)?);
                        self.resnap = Some(r);
                    } else {
                        batch.remove(K_RESNAP.to_vec());
                        self.resnap = None;
                    }
                }
                self.store.write(batch)?;
                self.store.flush()?;
                Ok(n)
            }
            ResnapPhase::Staging | ResnapPhase::Done => Ok(0),
        }
    }

    /// Replaces the row states from `cursor` on with the staged ones (rows
    /// the hub does not have go: their deletes were collected). A changed
    /// row keeps a view of what the database shows until it is applied,
    /// and is journaled dirty.
    fn resnap_rows(&mut self, r: &mut Resnap, cursor: &[u8], max: usize) -> Result<usize> {
        let prefix = Self::staged_prefix(r.progress.id);
        let mut from_rows = P_ROW.to_vec();
        from_rows.extend_from_slice(cursor);
        let mut from_staged = prefix.clone();
        from_staged.extend_from_slice(cursor);
        let current = self.store.range(&from_rows, &prefix_end(P_ROW), max)?;
        let staged = self.store.range(&from_staged, &prefix_end(&prefix), max)?;
        // Keys beyond the end of a full range may be missing from it.
        let mut bound: Option<Vec<u8>> = None;
        for (rows, plen) in [(&current, P_ROW.len()), (&staged, prefix.len())] {
            if rows.len() >= max
                && let Some((k, _)) = rows.last()
            {
                let k = k[plen..].to_vec();
                bound = Some(match bound {
                    Some(b) if b < k => b,
                    _ => k,
                });
            }
        }
        let mut keys: BTreeMap<Vec<u8>, OldNew<'_>> = BTreeMap::new();
        for (k, v) in &current {
            keys.entry(k[P_ROW.len()..].to_vec()).or_default().0 = Some(v);
        }
        for (k, v) in &staged {
            keys.entry(k[prefix.len()..].to_vec()).or_default().1 = Some(v);
        }
        let mut ov = Overlay::default();
        let mut n = 0;
        let mut last: Option<Vec<u8>> = None;
        for (k, (old, new)) in keys {
            if bound.as_ref().is_some_and(|b| k > *b) {
                break;
            }
            n += 1;
            last = Some(k.clone());
            let (table, _) = split_row_key(&k, 0)?;
            if !r.tables.contains(&table) {
                continue; // a table the hub does not merge: kept as it is
            }
            let old: RowState = match old {
                Some(b) => dec(b, "row state")?,
                None => RowState::default(),
            };
            let new: RowState = match new {
                Some(b) => dec(b, "staged row state")?,
                None => RowState::default(),
            };
            if old == new {
                continue;
            }
            let mut rk = P_ROW.to_vec();
            rk.extend_from_slice(&k);
            if self.settings.mode == Mode::Bidirectional && !self.db_views.contains_key(&rk) {
                let view = DbView {
                    from: i64::MIN,
                    state: old,
                    seen: self.vv.clone(),
                };
                ov.views.insert(k.clone(), view.clone());
                self.db_views.insert(rk.clone(), vec![view]);
            }
            if new.is_empty() {
                ov.batch.remove(rk);
                r.removed += 1;
            } else {
                ov.batch.put(rk, enc(&new)?);
                r.replaced += 1;
            }
            ov.dirty.insert(k);
        }
        let more = bound.is_some();
        r.phase = match (more, last) {
            (true, Some(mut k)) => {
                k.push(0);
                ResnapPhase::Rows(k)
            }
            _ => ResnapPhase::Own(r.progress.vv.get(&self.settings.name) + 1, self.seq),
        };
        ov.batch.put(K_RESNAP.to_vec(), enc(&*r)?);
        self.commit(ov)?;
        self.resnap = Some(r.clone());
        Ok(n)
    }

    /// Merges own ops `next..=upto` (the hub lacks them) into the installed
    /// states, dropping updates of rows collected deletes removed
    /// ([`lost_update`]; the op is rewritten in the log before it is ever
    /// sent). The last step adopts the snapshot's version vector.
    fn resnap_own(&mut self, r: &mut Resnap, next: u64, upto: u64, max: usize) -> Result<usize> {
        let ops = if next <= upto {
            self.own_ops(next, max.min((upto - next + 1) as usize))?
        } else {
            Vec::new()
        };
        let mut ov = Overlay::default();
        let mut last = next.saturating_sub(1);
        for mut op in ops {
            if op.id.seq > upto {
                break;
            }
            last = op.id.seq;
            let Some(info) = self.tables.get(&op.table).cloned() else {
                continue;
            };
            if !r.tables.contains(&op.table) {
                continue;
            }
            let rk = row_key(P_ROW, &op.table, &op.key)?;
            let mut row = self.load_row(&mut ov, &rk)?;
            if lost_update(&info, &row, &op) {
                op.fields.clear();
                r.dropped_writes += 1;
                self.stats.warnings += 1;
                self.events.push_back(Event::Resnapshot(format!(
                    "unsent write {} to table {} key {:?} was made before this node saw a delete \
                     of the row that the mesh has garbage-collected; delete_wins: the write is \
                     dropped and the row stays deleted",
                    op.id, op.table, op.key
                )));
                let mut lk = P_LOG.to_vec();
                lk.extend_from_slice(&op.id.seq.to_be_bytes());
                ov.batch.put(lk, enc(&op)?);
            }
            row.apply(&op);
            ov.rows.insert(rk, row);
            ov.dirty.insert(row_key(b"", &op.table, &op.key)?);
        }
        let done = last >= upto;
        if done {
            // Installed: adopt the hub's version vector (own ops stay).
            let me = self.settings.name.clone();
            let old: Vec<NodeId> = self.vv.0.keys().cloned().collect();
            for o in old {
                if o != me && r.progress.vv.get(&o) == 0 {
                    let mut vk = P_VV.to_vec();
                    vk.extend_from_slice(o.as_str().as_bytes());
                    ov.batch.remove(vk);
                    self.vv.0.remove(&o);
                }
            }
            for (o, s) in &r.progress.vv.0 {
                if *o != me {
                    let mut vk = P_VV.to_vec();
                    vk.extend_from_slice(o.as_str().as_bytes());
                    ov.batch.put(vk, s.to_be_bytes().to_vec());
                    self.vv.set(o.clone(), *s);
                }
            }
            self.stats.remote_ops = self.vv.total() - self.vv.get(&me);
            r.progress.installed = true;
            r.phase = ResnapPhase::Cleanup;
        } else {
            r.phase = ResnapPhase::Own(last + 1, upto);
        }
        ov.batch.put(K_RESNAP.to_vec(), enc(&*r)?);
        self.commit(ov)?;
        self.resnap = Some(r.clone());
        if done {
            let cut = r.progress.cut.clone();
            let newer = cut.stable != self.gc.active.stable
                && cut.stable.dominates(&self.gc.active.stable)
                && self
                    .gc
                    .pending
                    .as_ref()
                    .is_none_or(|p| cut.stable.dominates(&p.stable));
            if newer {
                self.gc.pending = Some(cut);
            }
            self.gc.report_due = true;
            self.events.push_back(Event::Resnapshot(format!(
                "re-snapshot {} installed: {} row states replaced, {} removed (their rows are \
                 deleted from the database), {} unsent writes dropped under delete_wins; the \
                 node's unsent ops follow",
                r.progress.id, r.replaced, r.removed, r.dropped_writes
            )));
            if self.resnap_expected && matches!(self.conn, Conn::Connected { .. }) {
                self.outbox.push_back(pb::NodeMessage {
                    body: Some(pb::node_message::Body::SnapshotAck(pb::SnapshotAck {
                        id: r.progress.id,
                        after_key: r.progress.after_key.clone(),
                        installed: true,
                    })),
                });
            }
            self.resnap_expected = false;
        }
        Ok((last + 1).saturating_sub(next) as usize)
    }
}

/// One field of an op to make: name, new value, and for `sum` fields the
/// delta (new − old as this node saw it).
type FieldChange = (String, Value, Option<Value>);

/// One op to make from a captured change.
struct SplitOp {
    key: Vec<Value>,
    /// `None` for a delete.
    fields: Option<Vec<FieldChange>>,
    /// True when the row did not exist before (an insert supersedes
    /// everything this node had seen of the key).
    insert: bool,
    /// The row the database holds afterwards.
    expected: Option<VisibleRow>,
}

/// `new − old` for counter fields: see [`syncmesh_resolver::counter_delta`].
fn delta(old: &Value, new: &Value) -> Option<Value> {
    syncmesh_resolver::counter_delta(old, new)
}

/// Splits one captured change into per-key ops.
fn split_change(info: &TableInfo, ch: &CapturedChange) -> Result<Vec<SplitOp>> {
    let schema = &info.schema;
    let missing = |what: &str| Error::Schema {
        table: schema.name.clone(),
        message: format!(
            "captured change {} has no {what} row or lacks a key column; re-run `syncmesh check` to reinstall the capture triggers",
            ch.change_id
        ),
    };
    let get = |row: Option<&VisibleRow>, c: &str| {
        row.and_then(|r| r.get(c)).cloned().unwrap_or(Value::Null)
    };
    // Every column (or only changed ones), with deltas for counters.
    let fields = |old: Option<&VisibleRow>, new: &VisibleRow, only_changed: bool| {
        schema
            .columns
            .iter()
            .filter_map(|c| {
                let (before, after) = (get(old, &c.name), get(Some(new), &c.name));
                if only_changed && before == after {
                    return None;
                }
                let d = info
                    .is_sum(&c.name)
                    .then(|| delta(&before, &after))
                    .flatten();
                Some((c.name.clone(), after, d))
            })
            .collect::<Vec<_>>()
    };
    let insert = |key: Vec<Value>, new: &VisibleRow| SplitOp {
        key,
        fields: Some(fields(None, new, false)),
        insert: true,
        expected: Some(new.clone()),
    };
    let delete = |key: Vec<Value>| SplitOp {
        key,
        fields: None,
        insert: false,
        expected: None,
    };
    Ok(match ch.kind {
        ChangeKind::Insert => {
            let new = ch.new.as_ref().ok_or_else(|| missing("new"))?;
            vec![insert(
                schema.key_of(new).ok_or_else(|| missing("new"))?,
                new,
            )]
        }
        ChangeKind::Delete => {
            let old = ch.old.as_ref().ok_or_else(|| missing("old"))?;
            vec![delete(schema.key_of(old).ok_or_else(|| missing("old"))?)]
        }
        ChangeKind::Update => {
            let old = ch.old.as_ref().ok_or_else(|| missing("old"))?;
            let new = ch.new.as_ref().ok_or_else(|| missing("new"))?;
            let old_key = schema.key_of(old).ok_or_else(|| missing("old"))?;
            let new_key = schema.key_of(new).ok_or_else(|| missing("new"))?;
            if old_key != new_key {
                vec![delete(old_key), insert(new_key, new)]
            } else {
                let row_level = info.rules.granularity == Granularity::Row;
                let changed = fields(Some(old), new, !row_level);
                if changed.is_empty() {
                    Vec::new()
                } else {
                    vec![SplitOp {
                        key: new_key,
                        fields: Some(changed),
                        insert: false,
                        expected: Some(new.clone()),
                    }]
                }
            }
        }
    })
}

/// Compares a visible row with a database row column by column (absent = NULL).
fn same_row(schema: &TableSchema, visible: Option<&VisibleRow>, db: Option<&VisibleRow>) -> bool {
    match (visible, db) {
        (None, None) => true,
        (Some(v), Some(d)) => schema.columns.iter().all(|c| {
            let is_key = schema.key.contains(&c.name);
            is_key
                || v.get(&c.name).unwrap_or(&Value::Null) == d.get(&c.name).unwrap_or(&Value::Null)
        }),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::adapter::ColumnInfo;
    use crate::store::MemStore;

    fn schema() -> TableInfo {
        let col = |n: &str| ColumnInfo {
            name: n.into(),
            decl_type: "TEXT".into(),
            not_null: false,
        };
        TableInfo {
            schema: TableSchema {
                name: "t".into(),
                columns: vec![col("id"), col("a"), col("b")],
                key: vec!["id".into()],
            },
            rules: TableRules::default(),
        }
    }

    fn settings(name: &str) -> NodeSettings {
        NodeSettings {
            name: NodeId::new(name).unwrap(),
            mode: Mode::Bidirectional,
            batch_size: 100,
            max_clock_drift_ms: 500,
        }
    }

    fn core(name: &str) -> NodeCore<MemStore> {
        NodeCore::open(settings(name), vec![schema()], MemStore::default(), 0).unwrap()
    }

    fn row(id: i64, a: &str, b: &str) -> Option<VisibleRow> {
        Some(BTreeMap::from([
            ("id".into(), Value::Int(id)),
            ("a".into(), Value::Text(a.into())),
            ("b".into(), Value::Text(b.into())),
        ]))
    }

    fn change(
        id: i64,
        kind: ChangeKind,
        old: Option<VisibleRow>,
        new: Option<VisibleRow>,
    ) -> CapturedChange {
        CapturedChange {
            change_id: id,
            table: "t".into(),
            kind,
            old,
            new,
        }
    }

    fn t(ms: u64) -> Ntp64 {
        Ntp64::from_unix_millis(ms)
    }

    fn drain(c: &mut NodeCore<MemStore>) -> Vec<pb::NodeMessage> {
        let mut out = Vec::new();
        while let Some(m) = c.poll_transmit().unwrap() {
            out.push(m);
        }
        out
    }

    fn hello_reply() -> pb::HubMessage {
        pb::HubMessage {
            body: Some(pb::hub_message::Body::Hello(pb::HelloReply {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                hub: "hub".into(),
                version_vector: None,
                cut: None,
                snapshot: false,
            })),
        }
    }

    fn ops_of(msgs: &[pb::NodeMessage]) -> Vec<pb::Op> {
        msgs.iter()
            .filter_map(|m| match &m.body {
                Some(pb::node_message::Body::Ops(b)) => Some(b.ops.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn remote_batch(ops: Vec<pb::Op>) -> pb::HubMessage {
        pb::HubMessage {
            body: Some(pb::hub_message::Body::Ops(pb::OpBatch { ops })),
        }
    }

    /// The ops node `b` makes from `changes`, as the hub would relay them.
    fn ops_from_b(changes: &[CapturedChange]) -> Vec<pb::Op> {
        let mut b = core("b");
        b.handle_captured(t(1000), changes).unwrap();
        b.own_ops(1, 100)
            .unwrap()
            .iter()
            .map(wire::op_to_proto)
            .collect()
    }

    fn connected(name: &str) -> NodeCore<MemStore> {
        let mut c = core(name);
        assert!(c.poll_connect(0));
        c.handle_connected(0);
        c.handle_message(t(1000), hello_reply()).unwrap();
        drain(&mut c);
        c
    }

    #[test]
    fn capture_makes_gap_free_ops_with_causal_preds_and_flushes_first() {
        let mut a = core("a");
        let cp = a
            .handle_captured(
                t(1000),
                &[
                    change(1, ChangeKind::Insert, None, row(1, "x", "y")),
                    change(2, ChangeKind::Update, row(1, "x", "y"), row(1, "x2", "y")),
                    change(3, ChangeKind::Delete, row(1, "x2", "y"), None),
                ],
            )
            .unwrap();
        assert_eq!(cp, 3);
        assert_eq!(
            a.store().flushes,
            1,
            "one flushed batch before the checkpoint is returned"
        );
        let ops = a.own_ops(1, 10).unwrap();
        assert_eq!(
            ops.iter().map(|o| o.id.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            ops[1].fields.len(),
            1,
            "an update carries only changed columns"
        );
        assert_eq!(ops[1].fields[0].pred, vec![ops[0].id.clone()]);
        assert!(ops[2].row_pred.contains(&ops[0].id) && ops[2].row_pred.contains(&ops[1].id));
        assert!(ops[0].hlc < ops[1].hlc && ops[1].hlc < ops[2].hlc);
        // A crash after the flush loses nothing; the checkpoint survives.
        let mut store = a.into_store();
        store.crash();
        let a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        assert_eq!(a.capture_checkpoint(), 3);
        assert_eq!(a.version_vector().get(&NodeId::new("a").unwrap()), 3);
    }

    #[test]
    fn own_ops_read_across_packed_chunks_and_old_single_op_keys() {
        let mut a = core("a");
        // Three ops as an older version stored them: one key per op.
        a.handle_captured(
            t(1000),
            &(1..=3)
                .map(|i| change(i, ChangeKind::Insert, None, row(i, "x", "y")))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let old = a.own_ops(1, 10).unwrap();
        let mut batch = WriteBatch::default();
        for op in &old {
            let mut k = P_LOG.to_vec();
            k.extend_from_slice(&op.id.seq.to_be_bytes());
            batch.put(k, enc(op).unwrap());
        }
        let mut k = P_LOG_PACKED.to_vec();
        k.extend_from_slice(&3u64.to_be_bytes());
        batch.remove(k);
        let mut store = a.into_store();
        store.write(batch).unwrap();
        store.flush().unwrap();
        let mut a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        // 600 more in one call: packed chunks of 256, 256 and 88.
        a.handle_captured(
            t(2000),
            &(4..=603)
                .map(|i| change(i, ChangeKind::Insert, None, row(i, "x", "y")))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let seqs = |from, limit| -> Vec<u64> {
            a.own_ops(from, limit)
                .unwrap()
                .iter()
                .map(|o| o.id.seq)
                .collect()
        };
        assert_eq!(seqs(1, 1000), (1..=603).collect::<Vec<_>>());
        assert_eq!(seqs(2, 5), vec![2, 3, 4, 5, 6], "old keys, then packed");
        assert_eq!(
            seqs(250, 20),
            (250..270).collect::<Vec<_>>(),
            "across a chunk boundary"
        );
        assert_eq!(seqs(603, 10), vec![603]);
        assert!(seqs(604, 10).is_empty());
        assert_eq!(a.own_ops(300, 1).unwrap()[0].key, vec![Value::Int(300)]);
        // A single-op key replaces the packed op of its seq (as a
        // re-snapshot install rewrites an unsent write).
        let mut rewritten = a.own_ops(300, 1).unwrap().remove(0);
        rewritten.fields.clear();
        let mut k = P_LOG.to_vec();
        k.extend_from_slice(&300u64.to_be_bytes());
        let mut batch = WriteBatch::default();
        batch.put(k, enc(&rewritten).unwrap());
        let mut store = a.into_store();
        store.write(batch).unwrap();
        let a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        let got = a.own_ops(299, 3).unwrap();
        assert_eq!(
            got.iter().map(|o| o.id.seq).collect::<Vec<_>>(),
            vec![299, 300, 301]
        );
        assert!(got[1].fields.is_empty() && !got[0].fields.is_empty());
        assert_eq!(a.own_ops(1, 1000).unwrap().len(), 603);
    }

    #[test]
    fn adapter_records_are_durable_with_the_batch_they_came_with() {
        let mut a = core("a");
        assert_eq!(a.meta("tok").unwrap(), None);
        let meta = |v: &[u8]| vec![("tok".to_owned(), Some(v.to_vec()))];
        let cp = a
            .handle_captured_with_meta(
                t(1000),
                &[change(7, ChangeKind::Insert, None, row(1, "x", "y"))],
                &meta(b"r1"),
            )
            .unwrap();
        assert_eq!(
            (cp, a.store().flushes),
            (7, 1),
            "ops, checkpoint and record: one flush"
        );
        a.handle_snapshot_with_meta(
            t(1001),
            &[change(0, ChangeKind::Insert, None, row(2, "s", "s"))],
            &meta(b"c1"),
        )
        .unwrap();
        assert_eq!(a.store().flushes, 2);
        // Records alone (no changes) are flushed too.
        a.handle_captured_with_meta(t(1002), &[], &meta(b"r2"))
            .unwrap();
        assert_eq!(a.store().flushes, 3);
        let mut store = a.into_store();
        store.crash();
        let mut a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        assert_eq!(a.meta("tok").unwrap(), Some(b"r2".to_vec()));
        assert_eq!(
            a.capture_checkpoint(),
            7,
            "a snapshot leaves the checkpoint"
        );
        assert_eq!(a.own_ops(1, 10).unwrap().len(), 2);
        a.handle_meta(&[("tok".to_owned(), None)]).unwrap();
        let mut store = a.into_store();
        store.crash();
        let a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        assert_eq!(a.meta("tok").unwrap(), None, "a removal is durable");
    }

    #[test]
    fn sends_only_after_hello_in_bounded_batches_and_resends_unacked_after_reconnect() {
        let mut a = core("a");
        let changes: Vec<_> = (1..=250)
            .map(|i| change(i, ChangeKind::Insert, None, row(i, "x", "y")))
            .collect();
        a.handle_captured(t(1000), &changes).unwrap();
        assert!(a.poll_connect(0));
        a.handle_connected(0);
        assert_eq!(
            drain(&mut a).len(),
            1,
            "only the hello before the hub answers"
        );
        a.handle_message(t(1000), hello_reply()).unwrap();
        let sent = drain(&mut a);
        assert_eq!(sent.len(), 3, "250 ops in batches of at most 100");
        assert_eq!(ops_of(&sent).len(), 250);
        a.handle_disconnected(10, 0);
        assert!(!a.poll_connect(10), "backoff before the next attempt");
        assert!(a.poll_connect(10_000));
        a.handle_connected(10_000);
        drain(&mut a);
        a.handle_message(t(1000), hello_reply()).unwrap();
        assert_eq!(
            ops_of(&drain(&mut a)).len(),
            250,
            "nothing acked: everything is sent again"
        );
    }

    #[test]
    fn remote_ops_are_merged_once_acked_after_flush_and_gaps_are_refused() {
        let ops = ops_from_b(&[
            change(1, ChangeKind::Insert, None, row(1, "x", "y")),
            change(2, ChangeKind::Update, row(1, "x", "y"), row(1, "bx", "y")),
        ]);
        let mut a = connected("a");
        let flushes = a.store().flushes;
        assert_eq!(
            a.handle_message(t(1000), remote_batch(ops.clone()))
                .unwrap(),
            Control::Continue
        );
        assert_eq!(a.store().flushes, flushes + 1, "flushed before the ack");
        let acks = drain(&mut a);
        assert!(matches!(acks[0].body, Some(pb::node_message::Body::Ack(_))));
        let applies = a.poll_apply(10).unwrap();
        assert_eq!(applies.len(), 1);
        assert_eq!(applies[0].write.row, row(1, "bx", "y"));
        a.handle_applied(&applies, 0).unwrap();
        // Duplicates change nothing.
        a.handle_message(t(1000), remote_batch(ops.clone()))
            .unwrap();
        assert!(a.poll_apply(10).unwrap().is_empty());
        // A gap is refused with a reason, not merged.
        let mut gap = ops[1].clone();
        gap.id.as_mut().unwrap().seq = 7;
        let ctl = a.handle_message(t(1000), remote_batch(vec![gap])).unwrap();
        assert!(matches!(ctl, Control::Reconnect(r) if r.contains("gap")));
    }

    #[test]
    fn rows_merged_but_not_yet_applied_survive_a_crash() {
        let ops = ops_from_b(&[change(1, ChangeKind::Insert, None, row(1, "x", "y"))]);
        let mut a = connected("a");
        a.handle_message(t(1000), remote_batch(ops)).unwrap();
        // Acked (flushed) but the database write never happened: crash.
        let mut store = a.into_store();
        store.crash();
        let mut a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        let pending = a.poll_apply(10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].write.row, row(1, "x", "y"));
        a.handle_applied(&pending, 0).unwrap();
        assert!(a.poll_apply(10).unwrap().is_empty());
        let store = a.into_store();
        let mut a = NodeCore::open(settings("a"), vec![schema()], store, 0).unwrap();
        assert!(
            a.poll_apply(10).unwrap().is_empty(),
            "the journal was cleared"
        );
    }

    #[test]
    fn a_node_whose_log_is_behind_the_hub_refuses_to_reuse_sequence_numbers() {
        let mut a = core("a");
        a.poll_connect(0);
        a.handle_connected(0);
        let mut vv = VersionVector::default();
        vv.set(NodeId::new("a").unwrap(), 5);
        let reply = pb::HubMessage {
            body: Some(pb::hub_message::Body::Hello(pb::HelloReply {
                protocol_version: syncmesh_proto::PROTOCOL_VERSION,
                hub: "hub".into(),
                version_vector: Some(wire::vv_to_proto(&vv)),
                cut: None,
                snapshot: false,
            })),
        };
        let err = a.handle_message(t(1000), reply).unwrap_err().to_string();
        assert!(
            err.contains("holds 5 ops") && err.contains("data_dir"),
            "{err}"
        );
    }

    #[test]
    fn local_change_overwritten_by_an_apply_is_written_back() {
        let ops = ops_from_b(&[change(1, ChangeKind::Insert, None, row(1, "remote", "y"))]);
        let mut a = connected("a");
        a.handle_message(t(1000), remote_batch(ops)).unwrap();
        let applies = a.poll_apply(10).unwrap();
        // The user's insert (change 5) committed just before the apply
        // transaction, which committed at change-table watermark 5 and so
        // overwrote it in the database.
        a.handle_applied(&applies, 5).unwrap();
        a.handle_captured(
            t(2000),
            &[change(5, ChangeKind::Insert, None, row(1, "local", "y"))],
        )
        .unwrap();
        let again = a.poll_apply(10).unwrap();
        assert_eq!(
            again.len(),
            1,
            "the overwritten local write must be written back"
        );
        assert_eq!(again[0].write.row, row(1, "local", "y"));
        a.handle_applied(&again, 6).unwrap();
        // A change after the apply's watermark was not overwritten.
        a.handle_captured(
            t(3000),
            &[change(
                7,
                ChangeKind::Update,
                row(1, "local", "y"),
                row(1, "l2", "y"),
            )],
        )
        .unwrap();
        assert!(a.poll_apply(10).unwrap().is_empty());
    }

    fn cut_msg(stable: &[(&str, u64)], horizon: &[(&str, u64)]) -> pb::HubMessage {
        let vv = |e: &[(&str, u64)]| {
            let mut v = VersionVector::default();
            for (n, s) in e {
                v.set(NodeId::new(*n).unwrap(), *s);
            }
            v
        };
        pb::HubMessage {
            body: Some(pb::hub_message::Body::Cut(wire::cut_to_proto(
                &wire::StableCut {
                    stable: vv(stable),
                    horizon: vv(horizon),
                },
            ))),
        }
    }

    fn seen_reports(msgs: &[pb::NodeMessage]) -> Vec<VersionVector> {
        msgs.iter()
            .filter_map(|m| match &m.body {
                Some(pb::node_message::Body::Seen(r)) => {
                    Some(wire::seen_from_proto(r.seen.clone()).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_batch_tally_counts_per_table_and_kind_with_the_oldest_hlc_and_last_seq() {
        let a = NodeId::new("a").unwrap();
        let up = |seq: u64, table: &str, time: u64| {
            Op::upsert(
                OpId::new(a.clone(), seq),
                syncmesh_resolver::Hlc {
                    time,
                    id: a.hlc_id(),
                },
                table,
                vec![Value::Int(1)],
                vec![],
            )
        };
        let mut t = BatchTally::default();
        t.note(&up(1, "x", 30));
        t.note(&up(2, "y", 10));
        t.note(&up(3, "x", 20));
        t.note(&Op::delete(
            OpId::new(a.clone(), 4),
            syncmesh_resolver::Hlc {
                time: 5,
                id: a.hlc_id(),
            },
            "x",
            vec![Value::Int(1)],
            vec![],
        ));
        let got: Vec<_> = t
            .into_tallies()
            .into_iter()
            .map(|t| (t.table, t.kind, t.ops, t.oldest_hlc, t.last_seq))
            .collect();
        assert_eq!(
            got,
            vec![
                ("x".to_owned(), "upsert", 2, 20, 3),
                ("y".to_owned(), "upsert", 1, 10, 2),
                ("x".to_owned(), "delete", 1, 5, 4),
            ]
        );
    }

    #[test]
    fn collects_a_deleted_row_only_once_the_database_showed_the_delete() {
        let mut a = core("a");
        assert!(a.poll_connect(0));
        a.handle_connected(0);
        let hello = drain(&mut a);
        assert!(
            matches!(&hello[0].body, Some(pb::node_message::Body::Hello(h)) if h.seen.is_some()),
            "the hello offers GC"
        );
        let mut reply = hello_reply();
        if let Some(pb::hub_message::Body::Hello(h)) = &mut reply.body {
            h.cut = Some(pb::StableCut::default());
        }
        a.handle_message(t(1000), reply).unwrap();
        // b inserts row 1 and deletes it; a merges both.
        let ops = ops_from_b(&[
            change(1, ChangeKind::Insert, None, row(1, "x", "y")),
            change(2, ChangeKind::Delete, row(1, "x", "y"), None),
        ]);
        a.handle_message(t(1000), remote_batch(ops)).unwrap();
        assert_eq!(a.row_state_count().unwrap(), 1);
        // The database does not show the merge yet: a write captured now
        // could still come from the older view, so a has not "seen" b#2.
        let b = NodeId::new("b").unwrap();
        assert_eq!(a.gc_seen().get(&b), 0);
        let reports = seen_reports(&drain(&mut a));
        assert!(reports.iter().all(|r| r.get(&b) == 0), "{reports:?}");
        a.handle_message(t(1000), cut_msg(&[("b", 2)], &[("b", 2)]))
            .unwrap();
        a.poll_gc(10).unwrap();
        assert_eq!(a.row_state_count().unwrap(), 1, "not valid here yet");
        assert!(a.gc_cut().is_empty());
        // The apply commits: the view goes, the report moves, GC runs.
        let pending = a.poll_apply(10).unwrap();
        assert_eq!(pending.len(), 1);
        a.handle_applied(&pending, 0).unwrap();
        assert_eq!(a.gc_seen().get(&b), 2);
        assert_eq!(
            seen_reports(&drain(&mut a)).last().map(|r| r.get(&b)),
            Some(2)
        );
        assert_eq!(a.poll_gc(10).unwrap(), 1);
        assert_eq!(a.row_state_count().unwrap(), 0);
        assert_eq!(a.stats().gc_rows_dropped, 1);
        assert_eq!(
            a.row_state("t", &[Value::Int(1)]).unwrap(),
            RowState::default()
        );
        // An older or equal cut changes nothing; a malformed one is refused.
        a.handle_message(t(1000), cut_msg(&[("b", 1)], &[("b", 2)]))
            .unwrap();
        assert_eq!(a.poll_gc(10).unwrap(), 0);
        let ctl = a
            .handle_message(t(1000), cut_msg(&[("b", 3)], &[("b", 2)]))
            .unwrap();
        assert!(
            matches!(ctl, Control::Reconnect(ref m) if m.contains("horizon")),
            "{ctl:?}"
        );
    }

    #[test]
    fn a_cut_waits_for_the_horizon_and_old_hubs_get_no_reports() {
        // A hub without GC (no cut in its hello reply): no seen reports.
        let mut a = connected("a");
        let ops = ops_from_b(&[change(1, ChangeKind::Insert, None, row(1, "x", "y"))]);
        a.handle_message(t(1000), remote_batch(ops)).unwrap();
        let pending = a.poll_apply(10).unwrap();
        a.handle_applied(&pending, 0).unwrap();
        assert!(seen_reports(&drain(&mut a)).is_empty());
        // A cut whose horizon a does not hold yet is not started.
        a.handle_message(t(1000), cut_msg(&[("b", 1)], &[("b", 5)]))
            .unwrap();
        assert_eq!(a.poll_gc(10).unwrap(), 0);
        assert!(a.gc_cut().is_empty());
    }

    fn snapshot_reply() -> pb::HubMessage {
        let mut reply = hello_reply();
        if let Some(pb::hub_message::Body::Hello(h)) = &mut reply.body {
            h.cut = Some(pb::StableCut::default());
            h.snapshot = true;
        }
        reply
    }

    fn chunk(rows: &[(i64, &RowState)], last: bool) -> pb::HubMessage {
        let mut vv = VersionVector::default();
        vv.set(NodeId::new("b").unwrap(), 4);
        let cut = wire::StableCut {
            stable: vv.clone(),
            horizon: vv.clone(),
        };
        pb::HubMessage {
            body: Some(pb::hub_message::Body::Snapshot(pb::SnapshotChunk {
                id: 7,
                cut: Some(wire::cut_to_proto(&cut)),
                version_vector: Some(wire::vv_to_proto(&vv)),
                tables: vec!["t".into()],
                rows: rows
                    .iter()
                    .map(|(id, st)| pb::SnapshotRow {
                        table: "t".into(),
                        key: vec![wire::value_to_proto(&Value::Int(*id))],
                        state: postcard::to_allocvec(st).unwrap(),
                    })
                    .collect(),
                after_key: rows
                    .last()
                    .map(|(id, _)| row_key(b"", "t", &[Value::Int(*id)]).unwrap())
                    .unwrap_or_default(),
                last,
                state_format: syncmesh_proto::SNAPSHOT_STATE_FORMAT,
            })),
        }
    }

    fn reopen(c: NodeCore<MemStore>) -> NodeCore<MemStore> {
        let mut store = c.into_store();
        store.crash();
        NodeCore::open(settings("c"), vec![schema()], store, 0).unwrap()
    }

    fn snapshot_acks(msgs: &[pb::NodeMessage]) -> Vec<pb::SnapshotAck> {
        msgs.iter()
            .filter_map(|m| match &m.body {
                Some(pb::node_message::Body::SnapshotAck(a)) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    /// c holds rows 1 and 2 of b; the hub's snapshot has rows 2 and 3 (b
    /// deleted row 1 and it was collected). Crashes after the first chunk
    /// and in the middle of the install resume; the half-installed state
    /// is never applied, sent or acknowledged as installed.
    #[test]
    fn a_crash_mid_snapshot_resumes_and_never_uses_a_half_installed_state() {
        let ops = ops_from_b(&[
            change(1, ChangeKind::Insert, None, row(1, "x", "y")),
            change(2, ChangeKind::Insert, None, row(2, "x", "y")),
            change(3, ChangeKind::Insert, None, row(3, "x", "y")),
            change(4, ChangeKind::Delete, row(1, "x", "y"), None),
        ]);
        let state = |i: usize| {
            let mut st = RowState::default();
            st.apply(&wire::op_from_proto(ops[i].clone()).unwrap());
            st
        };
        let (row2, row3) = (state(1), state(2));
        let mut c = connected("c");
        c.handle_message(t(1000), remote_batch(ops[..2].to_vec()))
            .unwrap();
        let p = c.poll_apply(10).unwrap();
        c.handle_applied(&p, 0).unwrap();
        drain(&mut c);
        // The snapshot starts; the first chunk is flushed and acknowledged.
        c.handle_connected(0);
        drain(&mut c);
        c.handle_message(t(1000), snapshot_reply()).unwrap();
        c.handle_message(t(1000), chunk(&[(2, &row2)], false))
            .unwrap();
        let acks = snapshot_acks(&drain(&mut c));
        assert_eq!(acks.len(), 1);
        assert!(!acks[0].installed);
        // Crash: the staged chunk survives, and the hello says where it is.
        let mut c = reopen(c);
        assert_eq!(c.resnap_progress(), Some((7, false)));
        assert!(!c.resnap_installing());
        c.poll_connect(u64::MAX / 2);
        c.handle_connected(0);
        let hello = drain(&mut c);
        let Some(pb::node_message::Body::Hello(h)) = &hello[0].body else {
            panic!("{hello:?}")
        };
        let progress = h.snapshot.clone().unwrap();
        assert!(h.resnap && !progress.installed);
        assert_eq!(
            progress.after_key,
            row_key(b"", "t", &[Value::Int(2)]).unwrap()
        );
        c.handle_message(t(1000), snapshot_reply()).unwrap();
        c.handle_message(t(1000), chunk(&[(3, &row3)], true))
            .unwrap();
        assert!(c.resnap_installing());
        // One key installed, then a crash: still installing after restart.
        assert_eq!(c.poll_gc(1).unwrap(), 1);
        let mut c = reopen(c);
        assert!(c.resnap_installing());
        assert!(
            c.poll_apply(10).unwrap().is_empty(),
            "nothing half-installed is applied"
        );
        assert_eq!(
            c.handle_captured(
                t(2000),
                &[change(
                    5,
                    ChangeKind::Update,
                    row(2, "x", "y"),
                    row(2, "z", "y")
                )]
            )
            .unwrap(),
            c.capture_checkpoint(),
            "capture waits"
        );
        assert_eq!(c.stats().own_ops, 0);
        c.poll_connect(u64::MAX / 2);
        c.handle_connected(0);
        assert!(drain(&mut c).is_empty(), "the hello waits for the install");
        for _ in 0..20 {
            c.poll_gc(1).unwrap();
        }
        assert!(!c.resnap_installing());
        assert_eq!(c.resnap_progress(), Some((7, true)));
        let b = NodeId::new("b").unwrap();
        assert_eq!(c.version_vector().get(&b), 4);
        assert_eq!(
            c.row_state("t", &[Value::Int(1)]).unwrap(),
            RowState::default()
        );
        assert_eq!(c.row_state("t", &[Value::Int(2)]).unwrap(), row2);
        assert_eq!(c.row_state("t", &[Value::Int(3)]).unwrap(), row3);
        let hello = drain(&mut c);
        assert!(
            matches!(&hello[0].body, Some(pb::node_message::Body::Hello(h))
                if h.snapshot.as_ref().is_some_and(|p| p.installed)),
            "{hello:?}"
        );
        // Row 1 is deleted from the database, row 3 written (row 2 is
        // unchanged).
        let mut writes: Vec<(Vec<Value>, bool)> = c
            .poll_apply(10)
            .unwrap()
            .iter()
            .map(|p| (p.write.key.clone(), p.write.row.is_some()))
            .collect();
        writes.sort_by_key(|w| format!("{:?}", w.0));
        assert_eq!(
            writes,
            vec![(vec![Value::Int(1)], false), (vec![Value::Int(3)], true)]
        );
    }

    /// A node whose first op ever inserts a key nobody else wrote (the
    /// insert names no predecessor, row or field) and which is then
    /// re-snapshotted keeps the insert: only an update of a row its
    /// database showed can be a write to a row collected deletes removed.
    #[test]
    fn a_fresh_insert_made_before_a_resnapshot_is_kept() {
        let mut c = core("c");
        c.handle_captured(
            t(1000),
            &[change(1, ChangeKind::Insert, None, row(9, "new", "row"))],
        )
        .unwrap();
        let logged = c.own_ops(1, 1).unwrap();
        assert!(
            logged[0].row_pred.is_empty() && logged[0].fields.iter().all(|f| f.pred.is_empty())
        );
        assert!(c.poll_connect(0));
        c.handle_connected(0);
        drain(&mut c);
        c.handle_message(t(1000), snapshot_reply()).unwrap();
        c.handle_message(t(1000), chunk(&[], true)).unwrap();
        for _ in 0..20 {
            c.poll_gc(1).unwrap();
        }
        assert!(!c.resnap_installing());
        assert_eq!(c.resnap_progress(), Some((7, true)));
        let visible = c
            .row_state("t", &[Value::Int(9)])
            .unwrap()
            .visible(&TableRules::default());
        let visible = visible.expect("the inserted row is visible");
        assert_eq!(visible.get("a"), Some(&Value::Text("new".into())));
        assert_eq!(visible.get("b"), Some(&Value::Text("row".into())));
        assert_eq!(
            c.own_ops(1, 1).unwrap()[0].fields,
            logged[0].fields,
            "the logged op keeps its writes"
        );
    }
}
