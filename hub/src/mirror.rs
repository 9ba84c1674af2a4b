//! The optional `sync_conflicts` mirror (`conflicts.mirror` in the
//! config): every conflict record the hub stores is copied into a table of
//! a SQLite, PostgreSQL or MySQL/MariaDB database, so people can query
//! conflicts with SQL.
//!
//! Durability order: sled first. [`crate::core::HubCore`] writes each added
//! or removed record's key under `q/<n>` in the same batch as the record
//! (only while the mirror is on). The mirror runs in its own tokio task,
//! woken through a bounded channel of capacity 1 that the hub actor fills
//! with `try_send` (so sync never waits for it); it flushes sled, reads at
//! most [`MIRROR_BATCH_RECORDS`] queue entries, writes the records' current
//! state in one database transaction (a record still in sled is inserted,
//! one no longer there is deleted) and only after the commit removes those
//! entries. A crash or a retry writes the same rows again: the primary key
//! is the record's stable id ([`record_id`]) and inserts ignore an existing
//! id, so nothing is ever duplicated.
//!
//! A mirror that has never completed a full copy for its target (redacted
//! url and table, kept under `g/mirror`) first copies every record in
//! `c/`, in pages of [`MIRROR_BATCH_RECORDS`], and deletes the rows whose
//! id no record has (records replaced while the mirror was off). While
//! the database is unreachable or refuses the writes the queue stays in
//! sled (nothing is lost; the queue is bounded by
//! [`crate::core::MIRROR_QUEUE_MAX`]: past it the hub drops the queue and
//! bumps a generation under `g/mirror-gen`, which makes a full copy due
//! again, so the mirror catches up from `c/` itself); the task logs one
//! warning line per outage, counts every failed attempt in
//! `sync_errors_total{table="",error_type="conflict_mirror"}` and retries
//! with backoff from [`RETRY_INITIAL`] to [`RETRY_MAX`]. Rows older than
//! `retention_days` are deleted from the table as they are from sled.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, Connection};
use syncmesh_node::adapter::redact_password;
use syncmesh_node::config::{DatabaseKind, MirrorConfig};
use syncmesh_node::store::{LogStore, SledStore, WriteBatch, next_cursor, prefix_end};
use syncmesh_node::wire;
use syncmesh_proto::v1 as pb;
use syncmesh_resolver::{Ntp64, Value};
use tokio::sync::mpsc;

use crate::core::{K_MIRROR, P_CONFLICT_RECORDS, P_MIRROR_QUEUE, mirror_generation};
use crate::{Error, Result};

/// Most records written in one database transaction (and queue entries
/// read per step).
pub const MIRROR_BATCH_RECORDS: usize = 500;
/// First retry delay after the database failed.
pub const RETRY_INITIAL: Duration = Duration::from_millis(200);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often rows past retention are deleted from the table.
const RETENTION_EVERY: Duration = Duration::from_secs(60);
/// How long the task sleeps when nothing woke it (it also polls the queue).
const IDLE: Duration = Duration::from_secs(1);
/// Waiting for a connection or a statement.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Waiting for one transaction of at most [`MIRROR_BATCH_RECORDS`] writes.
const TX_TIMEOUT: Duration = Duration::from_secs(60);
/// The `error_type` label of mirror failures in `sync_errors_total`.
pub const ERROR_TYPE: &str = "conflict_mirror";

/// The value as `syncmesh conflicts` shows it.
fn shown(v: &Option<pb::Value>) -> String {
    v.clone()
        .and_then(|v| wire::value_from_proto(v).ok())
        .unwrap_or(Value::Null)
        .to_string()
}

fn unix_ms(h: &Option<pb::Hlc>) -> u64 {
    h.as_ref()
        .map(|h| Ntp64(h.time).as_unix_millis())
        .unwrap_or(0)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A conflict record as JSON: one entry of `syncmesh conflicts --json`.
/// Each candidate is its value with the op that wrote it (`op` =
/// `origin#seq`, also split into `origin` and `seq`) and its HLC (`time`
/// as RFC 3339, `hlc` as NTP64 time and node id in hex).
pub fn record_json(c: &pb::ConflictRecord) -> serde_json::Value {
    json!({
        "time": rfc3339(unix_ms(&c.hlc)),
        "table": c.table,
        "key": c.key.iter().map(|k| shown(&Some(k.clone()))).collect::<Vec<_>>(),
        "field": c.field,
        "strategy": c.strategy,
        "result": shown(&c.result),
        "candidates": c.candidates.iter().map(|x| {
            let (origin, seq) = x.op.as_ref().map_or((String::new(), 0), |o| (o.origin.clone(), o.seq));
            json!({
                "op": format!("{origin}#{seq}"),
                "origin": origin,
                "seq": seq,
                "time": rfc3339(unix_ms(&x.hlc)),
                "hlc": x.hlc.as_ref().map(|h| json!({"time": h.time, "id": hex(&h.id)})),
                "value": shown(&x.value),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The stable id of the record stored under `key` (`c/…`): the first 16
/// bytes of its SHA-256 in hex. The key is a function of the record's
/// HLC time, table, row key, field and competing op ids, so every replica
/// and every retry derives the same id.
pub fn record_id(key: &[u8]) -> String {
    hex(&Sha256::digest(key)[..16])
}

/// One row of the mirror table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRow {
    /// [`record_id`].
    pub id: String,
    /// When the conflict became complete (the record's HLC), RFC 3339.
    pub detected_at: String,
    /// The same in Unix milliseconds (retention uses it).
    pub detected_at_unix_ms: i64,
    /// The synced table.
    pub table_name: String,
    /// The row's key values as a JSON array of strings.
    pub row_key: String,
    /// The field.
    pub field: String,
    /// The resolution strategy.
    pub strategy: String,
    /// The visible value the strategy chose, as `syncmesh conflicts`
    /// shows values (text quoted, `NULL`, numbers as written).
    pub result_value: String,
    /// The candidates as a JSON array (see [`record_json`]).
    pub competing_values: String,
}

impl MirrorRow {
    /// The row for the record `c` stored under `key`.
    pub fn of(key: &[u8], c: &pb::ConflictRecord) -> MirrorRow {
        let j = record_json(c);
        MirrorRow {
            id: record_id(key),
            detected_at: rfc3339(unix_ms(&c.hlc)),
            detected_at_unix_ms: i64::try_from(unix_ms(&c.hlc)).unwrap_or(i64::MAX),
            table_name: c.table.clone(),
            row_key: j["key"].to_string(),
            field: c.field.clone(),
            strategy: c.strategy.clone(),
            result_value: shown(&c.result),
            competing_values: j["candidates"].to_string(),
        }
    }
}

/// What the mirror writes for one queue entry.
enum Write {
    Insert(MirrorRow),
    Delete(String),
}

/// The mirror database: one connection.
enum Db {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
    Mysql(MySqlConnection),
}

/// The SQL of one engine and table.
struct Sql {
    create: Vec<String>,
    insert: String,
    delete: String,
    expire: String,
    /// The next page of ids after `$1`, in id order.
    ids_after: String,
}

const COLUMNS: &str = "id, detected_at, detected_at_unix_ms, table_name, row_key, field, strategy, result_value, competing_values";

impl Sql {
    fn new(kind: DatabaseKind, t: &str) -> Sql {
        match kind {
            DatabaseKind::Postgresql => Sql {
                create: vec![
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, detected_at TIMESTAMPTZ NOT NULL, detected_at_unix_ms BIGINT NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, field TEXT NOT NULL, strategy TEXT NOT NULL, result_value TEXT NOT NULL, competing_values TEXT NOT NULL)"
                    ),
                    format!(
                        "CREATE INDEX IF NOT EXISTS {t}_detected_at ON {t} (detected_at_unix_ms)"
                    ),
                ],
                insert: format!(
                    "INSERT INTO {t} ({COLUMNS}) VALUES ($1, $2::timestamptz, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING"
                ),
                delete: format!("DELETE FROM {t} WHERE id = $1"),
                expire: format!("DELETE FROM {t} WHERE detected_at_unix_ms < $1"),
                ids_after: format!(
                    "SELECT id FROM {t} WHERE id > $1 ORDER BY id LIMIT {MIRROR_BATCH_RECORDS}"
                ),
            },
            DatabaseKind::Mysql => Sql {
                create: vec![format!(
                    "CREATE TABLE IF NOT EXISTS {t} (id VARCHAR(32) NOT NULL PRIMARY KEY, detected_at DATETIME(3) NOT NULL, detected_at_unix_ms BIGINT NOT NULL, table_name VARCHAR(255) NOT NULL, row_key LONGTEXT NOT NULL, field VARCHAR(255) NOT NULL, strategy VARCHAR(64) NOT NULL, result_value LONGTEXT NOT NULL, competing_values LONGTEXT NOT NULL, INDEX {t}_detected_at (detected_at_unix_ms)) DEFAULT CHARSET = utf8mb4"
                )],
                insert: format!(
                    "INSERT INTO {t} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE id = id"
                ),
                delete: format!("DELETE FROM {t} WHERE id = ?"),
                expire: format!("DELETE FROM {t} WHERE detected_at_unix_ms < ?"),
                ids_after: format!(
                    "SELECT id FROM {t} WHERE id > ? ORDER BY id LIMIT {MIRROR_BATCH_RECORDS}"
                ),
            },
            _ => Sql {
                create: vec![
                    format!(
                        "CREATE TABLE IF NOT EXISTS {t} (id TEXT PRIMARY KEY, detected_at TEXT NOT NULL, detected_at_unix_ms INTEGER NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, field TEXT NOT NULL, strategy TEXT NOT NULL, result_value TEXT NOT NULL, competing_values TEXT NOT NULL)"
                    ),
                    format!(
                        "CREATE INDEX IF NOT EXISTS {t}_detected_at ON {t} (detected_at_unix_ms)"
                    ),
                ],
                insert: format!(
                    "INSERT INTO {t} ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
                ),
                delete: format!("DELETE FROM {t} WHERE id = ?"),
                expire: format!("DELETE FROM {t} WHERE detected_at_unix_ms < ?"),
                ids_after: format!(
                    "SELECT id FROM {t} WHERE id > ? ORDER BY id LIMIT {MIRROR_BATCH_RECORDS}"
                ),
            },
        }
    }
}

/// `detected_at` as the engine's time literal.
fn time_literal(kind: DatabaseKind, rfc: &str) -> String {
    match kind {
        // DATETIME(3): `YYYY-MM-DD HH:MM:SS.fff`, UTC.
        DatabaseKind::Mysql => rfc.replace('T', " ").trim_end_matches('Z').to_owned(),
        _ => rfc.to_owned(),
    }
}

/// Writes `writes` in one transaction on connection `$conn`.
macro_rules! write_all {
    ($conn:expr, $sql:expr, $kind:expr, $writes:expr) => {{
        let mut tx = sqlx::Connection::begin($conn).await?;
        for w in $writes {
            match w {
                Write::Insert(r) => {
                    sqlx::query(AssertSqlSafe($sql.insert.clone()))
                        .bind(&r.id)
                        .bind(time_literal($kind, &r.detected_at))
                        .bind(r.detected_at_unix_ms)
                        .bind(&r.table_name)
                        .bind(&r.row_key)
                        .bind(&r.field)
                        .bind(&r.strategy)
                        .bind(&r.result_value)
                        .bind(&r.competing_values)
                        .execute(&mut *tx)
                        .await?;
                }
                Write::Delete(id) => {
                    sqlx::query(AssertSqlSafe($sql.delete.clone()))
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
    }};
}

/// `fut`, or a timeout error after `limit` (a database that stopped
/// answering must not stall the mirror forever).
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
) -> std::result::Result<T, sqlx::Error> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", limit.as_secs()),
        )))
    })
}

impl Db {
    async fn connect(kind: DatabaseKind, url: &str) -> std::result::Result<Db, sqlx::Error> {
        within(DB_TIMEOUT, async {
            Ok(match kind {
                DatabaseKind::Postgresql => Db::Postgres(
                    PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?,
                ),
                DatabaseKind::Mysql => {
                    let url = match url.strip_prefix("mariadb://") {
                        Some(rest) => format!("mysql://{rest}"),
                        None => url.to_owned(),
                    };
                    Db::Mysql(
                        MySqlConnection::connect_with(&MySqlConnectOptions::from_str(&url)?)
                            .await?,
                    )
                }
                _ => Db::Sqlite(
                    SqliteConnection::connect_with(
                        &SqliteConnectOptions::from_str(url)?
                            .create_if_missing(true)
                            .busy_timeout(DB_TIMEOUT),
                    )
                    .await?,
                ),
            })
        })
        .await
    }

    async fn execute(&mut self, sql: &str) -> std::result::Result<(), sqlx::Error> {
        let q = AssertSqlSafe(sql.to_owned());
        within(DB_TIMEOUT, async {
            match self {
                Db::Sqlite(c) => sqlx::query(q).execute(c).await.map(drop),
                Db::Postgres(c) => sqlx::query(q).execute(c).await.map(drop),
                Db::Mysql(c) => sqlx::query(q).execute(c).await.map(drop),
            }
        })
        .await
    }

    async fn expire(&mut self, sql: &Sql, before_ms: i64) -> std::result::Result<u64, sqlx::Error> {
        let q = AssertSqlSafe(sql.expire.clone());
        within(TX_TIMEOUT, async {
            Ok(match self {
                Db::Sqlite(c) => sqlx::query(q)
                    .bind(before_ms)
                    .execute(c)
                    .await?
                    .rows_affected(),
                Db::Postgres(c) => sqlx::query(q)
                    .bind(before_ms)
                    .execute(c)
                    .await?
                    .rows_affected(),
                Db::Mysql(c) => sqlx::query(q)
                    .bind(before_ms)
                    .execute(c)
                    .await?
                    .rows_affected(),
            })
        })
        .await
    }

    async fn ids_after(
        &mut self,
        sql: &Sql,
        after: &str,
    ) -> std::result::Result<Vec<String>, sqlx::Error> {
        let q = AssertSqlSafe(sql.ids_after.clone());
        within(DB_TIMEOUT, async {
            match self {
                Db::Sqlite(c) => sqlx::query_scalar(q).bind(after).fetch_all(c).await,
                Db::Postgres(c) => sqlx::query_scalar(q).bind(after).fetch_all(c).await,
                Db::Mysql(c) => sqlx::query_scalar(q).bind(after).fetch_all(c).await,
            }
        })
        .await
    }

    async fn write(
        &mut self,
        sql: &Sql,
        kind: DatabaseKind,
        writes: &[Write],
    ) -> std::result::Result<(), sqlx::Error> {
        within(TX_TIMEOUT, async {
            match self {
                Db::Sqlite(c) => write_all!(c, sql, kind, writes),
                Db::Postgres(c) => write_all!(c, sql, kind, writes),
                Db::Mysql(c) => write_all!(c, sql, kind, writes),
            }
            Ok(())
        })
        .await
    }

    async fn close(self) {
        let _ = match self {
            Db::Sqlite(c) => c.close().await,
            Db::Postgres(c) => c.close().await,
            Db::Mysql(c) => c.close().await,
        };
    }
}

/// The running mirror task. Dropping it aborts the task; [`Mirror::stop`]
/// also waits until it let go of the store.
pub struct Mirror {
    waker: Waker,
    task: tokio::task::JoinHandle<()>,
}

/// Wakes the mirror task and reads its failure count; cheap to clone.
#[derive(Clone)]
pub struct Waker {
    tx: mpsc::Sender<()>,
    errors: Arc<AtomicU64>,
}

impl Waker {
    /// Tells the task there may be new queue entries; never waits (a full
    /// channel already holds a wake-up).
    pub fn wake(&self) {
        let _ = self.tx.try_send(());
    }

    /// Failed attempts so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Mirror {
    /// Starts mirroring the records of `store` into `cfg`'s table, keeping
    /// rows for `retention_days`.
    pub fn start(store: SledStore, cfg: MirrorConfig, retention_days: u32) -> Mirror {
        let (tx, rx) = mpsc::channel(1);
        let errors = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(store, cfg, retention_days.max(1), errors.clone(), rx));
        Mirror {
            waker: Waker { tx, errors },
            task,
        }
    }

    /// A waker for the hub actor.
    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Failed attempts so far.
    pub fn errors(&self) -> u64 {
        self.waker.errors()
    }

    /// Stops the task and waits until it let go of the store.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What `g/mirror` holds once a full copy for `cfg`'s target completed:
/// the target and the queue generation the copy started at.
fn full_copy_marker(cfg: &MirrorConfig, store: &SledStore) -> Result<Vec<u8>> {
    let generation = mirror_generation(store)?;
    let mut marker = target_name(cfg).into_bytes();
    if generation > 0 {
        marker.extend_from_slice(format!("\0generation {generation}").as_bytes());
    }
    Ok(marker)
}

/// The target in one line (`table T at URL`), without the password.
fn target_name(cfg: &MirrorConfig) -> String {
    format!("table {} at {}", cfg.table, cfg.url.redacted())
}

async fn run(
    mut store: SledStore,
    cfg: MirrorConfig,
    retention_days: u32,
    errors: Arc<AtomicU64>,
    mut wake: mpsc::Receiver<()>,
) {
    let mut delay = RETRY_INITIAL;
    let mut health = Health::default();
    loop {
        health.progressed = false;
        let res = session(&mut store, &cfg, retention_days, &mut wake, &mut health).await;
        if health.progressed {
            delay = RETRY_INITIAL;
        }
        match res {
            Ok(()) => return,
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                if !health.failing {
                    tracing::warn!(
                        "conflict mirror: cannot write to {e}; the hub keeps syncing and holds the records in its store, and copies them once the database is reachable (retrying every {}s at most); check conflicts.mirror.url and that the database is up",
                        RETRY_MAX.as_secs()
                    );
                    health.failing = true;
                } else {
                    tracing::debug!("conflict mirror: still failing: {e}");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// For `syncmesh check`: connects to the mirror database (SQLite: its
/// directory must exist; the hub creates the file) and checks that the
/// table can be created or exists. Returns a one-line description.
pub async fn probe(cfg: &MirrorConfig) -> Result<String> {
    let kind = cfg.kind();
    if kind == DatabaseKind::Sqlite {
        let opts =
            SqliteConnectOptions::from_str(cfg.url.expose()).map_err(|e| db_error(cfg, &e))?;
        let file = opts.get_filename();
        if !file.exists() {
            return match file.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(d) if !d.is_dir() => Err(Error::Mirror {
                    target: target_name(cfg),
                    message: format!(
                        "directory {} does not exist: create it (the hub creates the file)",
                        d.display()
                    ),
                }),
                _ => Ok(format!(
                    "{}: the hub will create the file",
                    target_name(cfg)
                )),
            };
        }
    }
    let mut db = Db::connect(kind, cfg.url.expose())
        .await
        .map_err(|e| db_error(cfg, &e))?;
    let mut res = Ok(format!("{}: reachable", target_name(cfg)));
    for stmt in &Sql::new(kind, &cfg.table).create {
        if let Err(e) = db.execute(stmt).await {
            res = Err(db_error(cfg, &e));
            break;
        }
    }
    db.close().await;
    res
}

fn db_error(cfg: &MirrorConfig, e: &sqlx::Error) -> Error {
    Error::Mirror {
        target: target_name(cfg),
        message: redact_password(&e.to_string(), cfg.url.expose()),
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How the mirror is doing, across sessions.
#[derive(Default)]
struct Health {
    /// An outage was logged and the queue has not been drained since.
    failing: bool,
    /// This session committed a transaction or found nothing to copy.
    progressed: bool,
}

/// Connects, then mirrors until the wake channel closes (`Ok`) or the
/// database fails (`Err`).
async fn session(
    store: &mut SledStore,
    cfg: &MirrorConfig,
    retention_days: u32,
    wake: &mut mpsc::Receiver<()>,
    health: &mut Health,
) -> Result<()> {
    let kind = cfg.kind();
    let sql = Sql::new(kind, &cfg.table);
    let mut db = Db::connect(kind, cfg.url.expose())
        .await
        .map_err(|e| db_error(cfg, &e))?;
    let res = mirror_on(store, cfg, retention_days, wake, health, &mut db, &sql).await;
    db.close().await;
    res
}

async fn mirror_on(
    store: &mut SledStore,
    cfg: &MirrorConfig,
    retention_days: u32,
    wake: &mut mpsc::Receiver<()>,
    health: &mut Health,
    db: &mut Db,
    sql: &Sql,
) -> Result<()> {
    let kind = cfg.kind();
    for stmt in &sql.create {
        db.execute(stmt).await.map_err(|e| db_error(cfg, &e))?;
    }
    let mut copied_since = 0u64;
    let mut last_expire: Option<tokio::time::Instant> = None;
    loop {
        // A full copy is due for a new target, and again after the hub
        // dropped an overflowing queue (a new generation); the marker names
        // the generation the copy started at, so an overflow during the
        // copy makes another one due.
        let marker = full_copy_marker(cfg, store)?;
        if store.get(K_MIRROR)?.as_deref() != Some(marker.as_slice()) {
            let copied = full_copy(store, cfg, db, sql).await?;
            let mut batch = WriteBatch::default();
            batch.put(K_MIRROR.to_vec(), marker);
            store.write(batch)?;
            store.flush()?;
            tracing::info!(
                records = copied,
                "conflict mirror: copied every conflict record into {}",
                target_name(cfg)
            );
            health.progressed = true;
        }
        let entries = store.range(
            P_MIRROR_QUEUE,
            &prefix_end(P_MIRROR_QUEUE),
            MIRROR_BATCH_RECORDS,
        )?;
        if !entries.is_empty() {
            // Only what sled holds durably goes to the database: the
            // entries, and the records read below.
            store.flush()?;
            let mut seen = BTreeSet::new();
            let mut writes = Vec::with_capacity(entries.len());
            for (_, record_key) in &entries {
                if !seen.insert(record_key.clone()) {
                    continue;
                }
                writes.push(match store.get(record_key)? {
                    Some(v) => match pb::ConflictRecord::decode(v.as_slice()) {
                        Ok(c) => Write::Insert(MirrorRow::of(record_key, &c)),
                        // The core wrote it; undecodable means a bug or a
                        // damaged store: skip it rather than stall.
                        Err(e) => {
                            tracing::warn!("conflict mirror: skipping an unreadable conflict record ({e}); the hub's store may be damaged");
                            continue;
                        }
                    },
                    None => Write::Delete(record_id(record_key)),
                });
            }
            db.write(sql, kind, &writes)
                .await
                .map_err(|e| db_error(cfg, &e))?;
            let mut batch = WriteBatch::default();
            for (k, _) in entries {
                batch.remove(k);
            }
            store.write(batch)?;
            copied_since += writes.len() as u64;
            health.progressed = true;
            continue;
        }
        health.progressed = true;
        if health.failing {
            tracing::info!(
                records = copied_since,
                "conflict mirror: {} is reachable again; caught up",
                target_name(cfg)
            );
            health.failing = false;
        }
        if last_expire.is_none_or(|t| t.elapsed() >= RETENTION_EVERY) {
            let keep_ms = u64::from(retention_days) * 86_400_000;
            let before = i64::try_from(wall_ms().saturating_sub(keep_ms)).unwrap_or(i64::MAX);
            let n = db
                .expire(sql, before)
                .await
                .map_err(|e| db_error(cfg, &e))?;
            if n > 0 {
                tracing::debug!(rows = n, "conflict mirror: deleted rows past retention");
            }
            last_expire = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            w = wake.recv() => if w.is_none() { return Ok(()) },
            _ = tokio::time::sleep(IDLE) => {}
        }
    }
}

/// Copies every record in `c/` (pages of [`MIRROR_BATCH_RECORDS`], one
/// transaction each), then deletes the rows of records the hub no longer
/// holds (replaced while the mirror was off); returns how many were copied.
async fn full_copy(
    store: &mut SledStore,
    cfg: &MirrorConfig,
    db: &mut Db,
    sql: &Sql,
) -> Result<u64> {
    store.flush()?;
    let end = prefix_end(P_CONFLICT_RECORDS);
    let mut start = P_CONFLICT_RECORDS.to_vec();
    let mut copied = 0u64;
    // The ids of every record (16 bytes each, bounded by what sled holds).
    let mut held: BTreeSet<String> = BTreeSet::new();
    loop {
        let page = store.range(&start, &end, MIRROR_BATCH_RECORDS)?;
        let writes: Vec<Write> = page
            .iter()
            .filter_map(|(k, v)| {
                pb::ConflictRecord::decode(v.as_slice())
                    .ok()
                    .map(|c| Write::Insert(MirrorRow::of(k, &c)))
            })
            .collect();
        db.write(sql, cfg.kind(), &writes)
            .await
            .map_err(|e| db_error(cfg, &e))?;
        copied += writes.len() as u64;
        held.extend(page.iter().map(|(k, _)| record_id(k)));
        match next_cursor(&page, MIRROR_BATCH_RECORDS) {
            Some(next) => start = next,
            None => break,
        }
    }
    let mut after = String::new();
    loop {
        let ids = db
            .ids_after(sql, &after)
            .await
            .map_err(|e| db_error(cfg, &e))?;
        let Some(last) = ids.last().cloned() else {
            return Ok(copied);
        };
        let stale: Vec<Write> = ids
            .into_iter()
            .filter(|id| !held.contains(id))
            .map(Write::Delete)
            .collect();
        if !stale.is_empty() {
            db.write(sql, cfg.kind(), &stale)
                .await
                .map_err(|e| db_error(cfg, &e))?;
        }
        after = last;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record() -> pb::ConflictRecord {
        let hlc = |ms: u64| {
            Some(pb::Hlc {
                time: Ntp64::from_unix_millis(ms).0,
                id: vec![1, 2],
            })
        };
        pb::ConflictRecord {
            hlc: hlc(2_000),
            table: "orders".into(),
            key: vec![wire::value_to_proto(&Value::Int(7))],
            field: "note".into(),
            candidates: ["a", "b"]
                .iter()
                .enumerate()
                .map(|(i, o)| pb::ConflictCandidate {
                    op: Some(pb::OpId {
                        origin: (*o).into(),
                        seq: i as u64 + 1,
                    }),
                    hlc: hlc(1_000 + i as u64 * 1_000),
                    value: Some(wire::value_to_proto(&Value::Text(format!("from-{o}")))),
                })
                .collect(),
            strategy: "last_write_wins".into(),
            result: Some(wire::value_to_proto(&Value::Text("from-b".into()))),
        }
    }

    #[test]
    fn rows_carry_the_record_and_a_stable_id() {
        let r = MirrorRow::of(b"c/key-1", &record());
        assert_eq!(r.id, record_id(b"c/key-1"));
        assert_eq!(r.id.len(), 32);
        assert_ne!(r.id, record_id(b"c/key-2"));
        assert_eq!(r.detected_at, "1970-01-01T00:00:02.000Z");
        assert_eq!(r.detected_at_unix_ms, 2_000);
        assert_eq!(r.row_key, "[\"7\"]");
        // Values as `syncmesh conflicts` shows them: text quoted.
        assert_eq!(r.result_value, "\"from-b\"");
        let cands: serde_json::Value = serde_json::from_str(&r.competing_values).unwrap();
        assert_eq!(cands[1]["origin"], "b");
        assert_eq!(cands[1]["seq"], 2);
        assert_eq!(cands[1]["op"], "b#2");
        assert_eq!(cands[1]["value"], "\"from-b\"");
        assert_eq!(cands[0]["hlc"]["id"], "0102");
        assert_eq!(record_json(&record())["candidates"], cands);
        assert_eq!(
            time_literal(DatabaseKind::Mysql, &r.detected_at),
            "1970-01-01 00:00:02.000"
        );
    }
}
