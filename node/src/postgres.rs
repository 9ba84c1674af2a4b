//! The PostgreSQL adapter: capture by logical decoding (`pgoutput`,
//! streamed over a replication connection, or read with
//! `pg_logical_slot_peek_binary_changes` where streaming is unavailable),
//! apply of visible rows in one transaction under a replication origin, so
//! the node never captures its own writes.
//!
//! # Capture
//!
//! [`PostgresAdapter::install_capture`] (idempotent) checks `wal_level`,
//! sets `REPLICA IDENTITY FULL` on every synced table that does not have it
//! (logged: updates then carry the whole old row, which `sum` deltas and
//! field-level merges need, and unchanged TOASTed values can be taken from
//! it), creates or re-targets the publication (`FOR TABLE` exactly the
//! synced tables), creates the logical slot (`pgoutput`) and the
//! replication origin `syncmesh_<slot>` when missing, and refuses a slot
//! that another consumer holds.
//!
//! [`PostgresAdapter::read_changes`] reads decoded transactions and turns
//! every row change into a [`CapturedChange`] whose `change_id` is the
//! transaction's **end LSN** (all changes of one transaction share it;
//! pgoutput sends whole transactions, in commit order). By default the
//! slot is streamed ([`crate::pgstream`]: `START_REPLICATION SLOT …
//! LOGICAL` from the core's checkpoint on a `replication=database`
//! connection); the walsender decodes each WAL record once for the life of
//! the connection. A read hands out what has arrived (a window of whole
//! transactions that goes on while more follow within a millisecond, for
//! at most 20 ms), so an empty read does not mean nothing is committed.
//! Where streaming is unavailable (an authentication method other than
//! SCRAM-SHA-256 / md5 / cleartext / trust, pg_hba refusing replication
//! connections; logged once) or after
//! [`PostgresAdapter::use_peek`], capture peeks (never consumes) with
//! `pg_logical_slot_peek_binary_changes` instead.
//!
//! Transactions whose end LSN is at or below the caller's checkpoint were
//! captured already (the slot moves only after the ops are flushed, so a
//! crash in between re-reads them) and are skipped, as are transactions
//! carrying our own origin (the `O` message after `B`): those are this
//! node's applies. [`PostgresAdapter::delete_changes_through`] lets the
//! slot move to the checkpoint the core returned, i.e. only after the ops
//! are flushed in sled: a standby status update on the stream (also the
//! answer to every keepalive: never more than that checkpoint), or
//! `pg_replication_slot_advance` when peeking. A read that found only
//! skipped transactions moves past them at once. A window is handed to the
//! core in `batch_size` pieces of whole transactions. One peek reads up to
//! [`PEEK_CHANGES_PER_CALL`] changes and the slot is advanced once the
//! window is used up (each peek and advance re-decodes the WAL from the
//! slot's `restart_lsn`, so fewer, larger calls cost less); a stream
//! confirms every checkpoint. A stream that fails is dropped and started
//! again from the checkpoint at the next read (the same when the core
//! kept a checkpoint below what it was handed).
//!
//! `TRUNCATE` of a synced table cannot be expressed as row ops: it is an
//! error that stops capture with what to do. An update whose new tuple says
//! a TOASTed column is unchanged (`u`) takes the value from the old tuple
//! (present with `REPLICA IDENTITY FULL`); without an old tuple it is an
//! error, never a NULL.
//!
//! # Initial snapshot
//!
//! A capturing node without a checkpoint (first start) publishes the rows
//! already in the tables before streaming: [`InitialSnapshot`] (see
//! [`PostgresAdapter::begin_snapshot`] for why it has neither gap nor double
//! count). The node publishes it chunk by chunk while it sends the chunks
//! already logged to the hub; a crash during it resumes after the last
//! durable chunk at the next start.
//!
//! # Type mapping
//!
//! Values travel in PostgreSQL's text format (the adapter's sessions use
//! `TimeZone=UTC`, `DateStyle=ISO`, `extra_float_digits=1`,
//! `bytea_output=hex`, so the text is exact and stable):
//!
//! | PostgreSQL                                 | [`Value`]                               |
//! |--------------------------------------------|-----------------------------------------|
//! | `boolean`                                  | `Bool`                                  |
//! | `smallint`, `integer`, `bigint`            | `Int`                                   |
//! | `real`, `double precision`                 | `Float` (shortest exact text)           |
//! | `numeric`                                  | `Decimal` (the text, never a float)     |
//! | `text`, `varchar`, `char(n)`, `name`       | `Text` (`char(n)` with its padding)     |
//! | `bytea`                                    | `Bytes`                                 |
//! | `timestamp`, `timestamptz`                 | `Timestamp` (µs since the epoch, UTC; `timestamp` read as UTC; `±infinity` as `i64::MAX/MIN`) |
//! | `date`, `time`, `interval`, `uuid`, enums  | `Text` (ISO text)                       |
//! | `json`, `jsonb`                            | `Json` (the text as PostgreSQL prints it) |
//! | arrays of any of these                     | `Text`: the array literal, e.g. `{1,NULL,3}` |
//!
//! Any other type is refused by [`PostgresAdapter::introspect`] with an
//! error naming the column. Writing binds every value as text with an
//! explicit cast to the column's declared type (`$1::numeric(10,2)`), so
//! PostgreSQL's own input functions parse it: exact for every type above,
//! also for values that went through another engine (a `Timestamp` or an
//! integer of microseconds into `timestamptz`, `0`/`1` into `boolean`).
//!
//! # Apply and the race with local writes
//!
//! [`PostgresAdapter::apply`] writes a batch in one transaction on a
//! dedicated connection that ran `pg_replication_origin_session_setup`, with
//! one `INSERT … SELECT … FROM unnest(…) ON CONFLICT (key) DO UPDATE` or
//! `DELETE … USING unnest(…)` per run of writes of one table and kind (each
//! column travels as one text array, so a batch is a few prepared
//! statements whatever its size; a batch holds each row once). It returns
//! `pg_current_wal_insert_lsn()` read right after `COMMIT` as the
//! watermark: every local transaction that committed before the apply (and
//! so may have been overwritten by it, row locks serialise the two) has an
//! end LSN below it, so the core writes such a change back once captured.
//! A local transaction committing just after the apply may also fall below
//! it; it is then written back once more, which is harmless.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Executor, Row};
use syncmesh_resolver::Value;

use crate::adapter::{
    CapturedChange, ChangeKind, ColumnInfo, RowWrite, TableSchema, civil_from_days, days_from_civil,
};
use crate::pgstream::{Addr, ConnParams, ReplStream, StreamError, TlsParams, TlsVerify};
use crate::{Error, Result};
use std::path::PathBuf;

/// Prefix of the replication origin's name (followed by the slot name).
pub const ORIGIN_PREFIX: &str = "syncmesh_";
/// Most rows per apply statement (each column travels as one text array).
const ROWS_PER_STATEMENT: usize = 10_000;
/// Most changes one peek asks for (`upto_nchanges`; PostgreSQL finishes
/// the transaction it is in). A peek, and the advance after it, decode the
/// WAL from the slot's `restart_lsn`, which PostgreSQL moves on only at its
/// running-transactions records (about every 15 s): each call re-decodes up
/// to 15 s of WAL. So capture peeks a large window once, hands it to the
/// core in `batch_size` pieces (whole transactions) and advances once the
/// window is used up, instead of peeking and advancing per batch.
pub const PEEK_CHANGES_PER_CALL: usize = 50_000;
/// How often (100 ms apart) starting a stream is tried again while the
/// slot is still held (SQLSTATE 55006) by the walsender of the last one.
const SLOT_BUSY_RETRIES: usize = 50;
/// Above this much WAL retained by the slot, the node (and `syncmesh
/// check`) warns: a slot that is not consumed keeps WAL forever.
pub const RETAINED_WAL_WARN_BYTES: i64 = 1 << 30;
/// How often capture looks at the slot's retained WAL (the metric's
/// resolution).
const WAL_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two retained-WAL warnings.
const WAL_WARN_INTERVAL: Duration = Duration::from_secs(300);

/// How a column's text is read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgKind {
    /// `boolean`.
    Bool,
    /// `smallint`, `integer`, `bigint`.
    Int,
    /// `real`.
    Float4,
    /// `double precision`.
    Float8,
    /// `numeric`.
    Numeric,
    /// Text-like and ISO-text types (`text`, `date`, `uuid`, arrays, ...).
    Text,
    /// `bytea`.
    Bytea,
    /// `timestamp without time zone`.
    Timestamp,
    /// `timestamp with time zone`.
    Timestamptz,
    /// `date` (text, but accepts a `Timestamp`).
    Date,
    /// `json`, `jsonb`.
    Json,
}

/// The kind of a type OID (with its category and element type for
/// arrays), or `None` when syncmesh does not support it yet.
fn kind_of(oid: u32, category: &str, elem: u32) -> Option<PgKind> {
    Some(match oid {
        16 => PgKind::Bool,
        20 | 21 | 23 => PgKind::Int,
        700 => PgKind::Float4,
        701 => PgKind::Float8,
        1700 => PgKind::Numeric,
        17 => PgKind::Bytea,
        1114 => PgKind::Timestamp,
        1184 => PgKind::Timestamptz,
        1082 => PgKind::Date,
        114 | 3802 => PgKind::Json,
        // text, varchar, bpchar, name, time, timetz, interval, uuid
        25 | 1043 | 1042 | 19 | 1083 | 1266 | 1186 | 2950 => PgKind::Text,
        _ if category == "E" => PgKind::Text,
        _ if category == "A" && elem != 0 => {
            kind_of(elem, "", 0)?;
            PgKind::Text
        }
        _ => return None,
    })
}

/// One column of a relation as pgoutput describes it.
#[derive(Clone, Debug)]
struct RelColumn {
    name: String,
    type_oid: u32,
}

/// A relation announced by a pgoutput `R` message.
#[derive(Clone, Debug)]
struct Relation {
    name: String,
    columns: Vec<RelColumn>,
}

/// A PostgreSQL database with syncmesh's capture and apply machinery.
#[derive(Debug)]
pub struct PostgresAdapter {
    pool: PgPool,
    apply_pool: PgPool,
    /// The redacted URL, for messages.
    url: String,
    slot: String,
    publication: String,
    origin: String,
    /// Relations seen in the decoded stream, by OID.
    relations: HashMap<u32, Relation>,
    /// Column kinds of the synced tables (`table` → `column` → kind), from
    /// introspection; decoding uses the relation's type OIDs.
    kinds: HashMap<String, HashMap<String, PgKind>>,
    /// After a peek: (end LSN of its last captured change, end LSN of the
    /// last transaction it decoded). Once the first is checkpointed the slot
    /// may move to the second.
    tail: Option<(i64, i64)>,
    /// Changes of the last peek not yet handed out (whole transactions, in
    /// commit order), and that peek's tail (see `tail`), which applies
    /// once they are all handed out.
    peeked: std::collections::VecDeque<CapturedChange>,
    peeked_tail: Option<(i64, i64)>,
    /// The changes the last `read_changes` returned, until a checkpoint
    /// covers them (so a failed capture call loses none of them).
    handed_out: Vec<CapturedChange>,
    /// When the retained WAL was last looked at.
    wal_checked: Option<std::time::Instant>,
    /// When the retained-WAL warning was last logged.
    wal_warned: Option<std::time::Instant>,
    /// The slot's retained WAL at the last check (bytes).
    retained_wal: Option<i64>,
    /// The synced tables as introspected, by name.
    schemas: HashMap<String, TableSchema>,
    /// The resumed initial snapshot's windows, while capture may still
    /// read transactions inside one (see [`SnapshotProgress`]).
    resume: Option<SnapshotProgress>,
    /// The replication connection capture reads the slot through, once
    /// started (behind a mutex only so that `close(&self)` can end it).
    stream: std::sync::Mutex<Option<ReplStream>>,
    /// How to open it, or why streaming is unavailable (capture then
    /// peeks; see [`crate::pgstream`]).
    stream_params: std::result::Result<ConnParams, String>,
}

/// The replication connection's parameters from the adapter's URL, or why
/// streaming cannot be used with it.
fn stream_params(url: &str, options: &PgConnectOptions) -> std::result::Result<ConnParams, String> {
    use sqlx::postgres::PgSslMode;
    let port = options.get_port();
    let addr = match options.get_socket() {
        Some(p) if p.is_dir() => Addr::Unix(p.join(format!(".s.PGSQL.{port}"))),
        Some(p) => Addr::Unix(p.clone()),
        None => Addr::Tcp(options.get_host().to_owned(), port),
    };
    let parsed = url::Url::parse(url).ok();
    let decode = |p: &str| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    };
    let password = parsed
        .as_ref()
        .and_then(|u| u.password().map(decode))
        .or_else(|| {
            parsed.as_ref().and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "password")
                    .map(|(_, v)| v.into_owned())
            })
        })
        .or_else(|| std::env::var("PGPASSWORD").ok());
    let user = options.get_username().to_owned();
    // TLS as the URL's sslmode says (TCP only: a unix socket has none, as
    // with libpq).
    let verify = match options.get_ssl_mode() {
        PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer => None,
        PgSslMode::Require => Some(TlsVerify::None),
        PgSslMode::VerifyCa => Some(TlsVerify::Chain),
        PgSslMode::VerifyFull => Some(TlsVerify::Full),
    };
    let root_cert = parsed
        .as_ref()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "sslrootcert")
                .map(|(_, v)| v.into_owned())
        })
        .or_else(|| std::env::var("PGSSLROOTCERT").ok())
        .map(PathBuf::from);
    let tls = match (&addr, verify) {
        (Addr::Tcp(host, _), Some(v)) => Some(TlsParams::new(host, v, root_cert.as_deref())?),
        _ => None,
    };
    Ok(ConnParams {
        tls,
        addr,
        database: options
            .get_database()
            .map(str::to_owned)
            .unwrap_or_else(|| user.clone()),
        user,
        password,
        settings: SESSION_SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    })
}

/// Session settings that make the text format exact and stable (on every
/// connection, the replication connection included: its walsender prints
/// the values pgoutput sends).
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
];

/// The session settings that make the text format exact and stable.
fn session_options(options: PgConnectOptions) -> PgConnectOptions {
    use sqlx::ConnectOptions;
    // No statement logging: statements carry row values, and a slow batch
    // would flood the log with them.
    options
        .disable_statement_logging()
        .application_name("syncmesh")
        .options(SESSION_SETTINGS)
}

impl PostgresAdapter {
    /// Connects to the database at `url` (`postgres://` / `postgresql://`)
    /// and checks that logical decoding is possible. `slot` and
    /// `publication` default to `syncmesh`. Creates the replication origin
    /// if it is missing.
    pub async fn open(url: &str, slot: Option<&str>, publication: Option<&str>) -> Result<Self> {
        let redacted = crate::config::Secret::new(url).redacted();
        let slot = slot.unwrap_or("syncmesh").to_owned();
        let publication = publication.unwrap_or("syncmesh").to_owned();
        let origin = format!("{ORIGIN_PREFIX}{slot}");
        let options = PgConnectOptions::from_str(url).map_err(|e| Error::Database {
            database: redacted.clone(),
            message: format!(
                "invalid PostgreSQL URL ({}); use postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                crate::adapter::redact_password(&e.to_string(), url)
            ),
        })?;
        let stream_params = stream_params(url, &options);
        let options = session_options(options);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(|e| Error::Database {
                database: redacted.clone(),
                message: connect_failure(&e, url),
            })?;
        let adapter_origin = origin.clone();
        let apply_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                let origin = adapter_origin.clone();
                Box::pin(async move {
                    sqlx::query("SELECT pg_replication_origin_session_setup($1)")
                        .bind(origin)
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        let adapter = PostgresAdapter {
            pool,
            apply_pool,
            url: redacted,
            slot,
            publication,
            origin,
            relations: HashMap::new(),
            kinds: HashMap::new(),
            tail: None,
            peeked: std::collections::VecDeque::new(),
            peeked_tail: None,
            handed_out: Vec::new(),
            wal_checked: None,
            wal_warned: None,
            retained_wal: None,
            schemas: HashMap::new(),
            resume: None,
            stream: std::sync::Mutex::new(None),
            stream_params,
        };
        adapter.ensure_origin().await?;
        Ok(adapter)
    }

    /// The general-purpose pool (tests write through it like a user would).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The replication slot's name.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Reads the slot with `pg_logical_slot_peek_binary_changes` from now
    /// on, never over a replication connection (for connections through
    /// a pooler that does not pass replication connections on).
    pub fn use_peek(&mut self) {
        self.stream_params = Err("peek asked for".into());
        *self.stream.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether capture reads the slot over a replication connection (an
    /// open one, or one it will open at the next read).
    pub fn streams(&self) -> bool {
        self.stream_params.is_ok()
    }

    /// Opens and closes a replication connection (no slot touched):
    /// `Ok` if capture can stream, else why it will peek instead.
    pub async fn probe_streaming(&self) -> std::result::Result<(), String> {
        match &self.stream_params {
            Err(why) => Err(why.clone()),
            Ok(p) => ReplStream::probe(p).await.map_err(|e| e.to_string()),
        }
    }

    /// Resolves once the open replication stream has a whole message to
    /// read (or failed); never without an open stream. Cancel-safe.
    pub async fn changes_ready(&mut self) {
        match self.stream_mut() {
            Some(s) => s.readable().await,
            None => std::future::pending().await,
        }
    }

    fn stream_mut(&mut self) -> &mut Option<ReplStream> {
        self.stream.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        let stream = self
            .stream
            .lock()
            .map(|mut s| s.take())
            .unwrap_or_else(|mut p| p.get_mut().take());
        drop(stream);
        self.apply_pool.close().await;
        self.pool.close().await;
    }

    fn db_err(&self, what: &str, e: &sqlx::Error) -> Error {
        Error::Database {
            database: self.url.clone(),
            message: format!("{what}: {}{}", e, hint_for(e)),
        }
    }

    async fn ensure_origin(&self) -> Result<()> {
        sqlx::query(
            "SELECT pg_replication_origin_create($1) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
        )
        .bind(&self.origin)
        .execute(&self.pool)
        .await
        .map_err(|e| self.db_err(&format!("creating replication origin {}", self.origin), &e))?;
        Ok(())
    }

    /// `wal_level`, or an error saying how to enable logical decoding.
    pub async fn check_wal_level(&self) -> Result<()> {
        let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("reading wal_level", &e))?;
        if level != "logical" {
            return Err(Error::Database {
                database: self.url.clone(),
                message: format!(
                    "wal_level is {level} but capture needs logical decoding: run `ALTER SYSTEM SET wal_level = logical` (or set it in postgresql.conf) and restart PostgreSQL"
                ),
            });
        }
        Ok(())
    }

    /// Introspects the configured tables: `(name, configured key columns)`,
    /// an empty key meaning "use the primary key". Fails with
    /// [`Error::Schema`] naming the table (missing, a view, no primary key,
    /// a key that is not unique) or the column (an unsupported type).
    pub async fn introspect(
        &mut self,
        tables: &[(String, Vec<String>)],
    ) -> Result<Vec<TableSchema>> {
        let mut out = Vec::with_capacity(tables.len());
        for (name, key) in tables {
            out.push(self.introspect_one(name, key).await?);
        }
        Ok(out)
    }

    async fn introspect_one(&mut self, name: &str, configured: &[String]) -> Result<TableSchema> {
        let schema_err = |message: String| Error::Schema {
            table: name.to_owned(),
            message,
        };
        let found: Option<(i64, String)> = sqlx::query_as(
            "SELECT c.oid::int8, c.relkind::text FROM pg_class c \
             WHERE c.relname = $1 AND pg_table_is_visible(c.oid) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the schema", &e))?;
        let Some((oid, relkind)) = found else {
            return Err(schema_err(
                "does not exist in the search_path of this database; create it or fix `tables:` in the config".into(),
            ));
        };
        if relkind != "r" && relkind != "p" {
            return Err(schema_err(format!(
                "is not a plain table (relkind {relkind}); capture needs a real table, sync the underlying table instead"
            )));
        }
        let cols = sqlx::query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS decl, \
                    a.attnotnull AS not_null, a.atttypid::int8 AS oid, t.typcategory::text AS cat, \
                    t.typelem::int8 AS elem \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attgenerated = '' ORDER BY a.attnum",
        )
        .bind(oid)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the columns", &e))?;
        let mut columns = Vec::with_capacity(cols.len());
        let mut kinds = HashMap::new();
        for c in &cols {
            let get_s = |k: &str| -> Result<String> {
                c.try_get::<String, _>(k)
                    .map_err(|e| self.db_err("reading the columns", &e))
            };
            let col_name = get_s("name")?;
            let decl = get_s("decl")?;
            let cat = get_s("cat")?;
            let not_null: bool = c
                .try_get("not_null")
                .map_err(|e| self.db_err("reading the columns", &e))?;
            let toid: i64 = c
                .try_get("oid")
                .map_err(|e| self.db_err("reading the columns", &e))?;
            let elem: i64 = c
                .try_get("elem")
                .map_err(|e| self.db_err("reading the columns", &e))?;
            let Some(kind) = kind_of(toid as u32, &cat, elem as u32) else {
                return Err(schema_err(format!(
                    "column {col_name} has type {decl}, which syncmesh does not support yet; supported: boolean, smallint, integer, bigint, real, double precision, numeric, text, varchar, char, bytea, date, time, timestamp, timestamptz, interval, uuid, json, jsonb, enums and arrays of these"
                )));
            };
            kinds.insert(col_name.clone(), kind);
            columns.push(ColumnInfo {
                name: col_name,
                decl_type: decl,
                not_null,
            });
        }
        let pk: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1::int8::oid AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
        )
        .bind(oid)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the primary key", &e))?;
        let key = if configured.is_empty() {
            if pk.is_empty() {
                return Err(schema_err(
                    "has no primary key; add one (ALTER TABLE ... ADD PRIMARY KEY) or configure `key:` naming a unique index's columns".into(),
                ));
            }
            pk
        } else {
            for k in configured {
                if !columns.iter().any(|c| &c.name == k) {
                    return Err(schema_err(format!(
                        "key column {k} does not exist; fix `key:` in the config"
                    )));
                }
            }
            let mut wanted = configured.to_vec();
            wanted.sort();
            let uniques: Vec<Vec<String>> = sqlx::query_scalar(
                "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1::int8::oid AND i.indisunique AND i.indpred IS NULL \
                 GROUP BY i.indexrelid",
            )
            .bind(oid)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err("reading the unique indexes", &e))?;
            if !uniques.contains(&wanted) {
                return Err(schema_err(format!(
                    "configured key [{}] is neither the primary key nor a unique index; add a unique index on it or fix `key:`",
                    configured.join(", ")
                )));
            }
            configured.to_vec()
        };
        self.kinds.insert(name.to_owned(), kinds);
        let schema = TableSchema {
            name: name.to_owned(),
            columns,
            key,
        };
        self.schemas.insert(name.to_owned(), schema.clone());
        Ok(schema)
    }

    /// Tables among `schemas` whose REPLICA IDENTITY is not FULL.
    pub async fn tables_without_full_identity(
        &self,
        schemas: &[TableSchema],
    ) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for s in schemas {
            let ident: String = sqlx::query_scalar(
                "SELECT relreplident::text FROM pg_class WHERE relname = $1 AND pg_table_is_visible(oid)",
            )
            .bind(&s.name)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("reading REPLICA IDENTITY", &e))?;
            if ident != "f" {
                out.push(s.name.clone());
            }
        }
        Ok(out)
    }

    /// Who holds the slot: `None` if it does not exist, `Some(None)` if it
    /// is free, `Some(Some(pid))` if a consumer is attached.
    pub async fn slot_holder(&self) -> Result<Option<Option<i32>>> {
        let row: Option<(Option<i32>, String, Option<String>)> = sqlx::query_as(
            "SELECT active_pid, plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading pg_replication_slots", &e))?;
        let Some((pid, plugin, database)) = row else {
            return Ok(None);
        };
        let current: String = sqlx::query_scalar("SELECT current_database()::text")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("reading the database name", &e))?;
        if plugin != "pgoutput" || database.as_deref() != Some(current.as_str()) {
            return Err(Error::Database {
                database: self.url.clone(),
                message: format!(
                    "replication slot {} exists but is not a pgoutput slot of database {current} (plugin {plugin}, database {}); configure another `slot:` or drop it with pg_drop_replication_slot",
                    self.slot,
                    database.unwrap_or_else(|| "none (physical)".into())
                ),
            });
        }
        Ok(Some(pid))
    }

    /// The `application_name` of backend `pid` (the holder of a slot), if
    /// it still runs.
    pub async fn backend_application(&self, pid: i32) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT application_name::text FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db_err("reading pg_stat_activity", &e))
    }

    /// Installs capture (see the module docs): wal_level check, REPLICA
    /// IDENTITY FULL, publication, slot and origin.
    pub async fn install_capture(&self, schemas: &[TableSchema]) -> Result<()> {
        tracing::debug!(database = %self.url, "install_capture: wal_level");
        self.check_wal_level().await?;
        for t in self.tables_without_full_identity(schemas).await? {
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {} REPLICA IDENTITY FULL",
                quote_ident(&t)
            )))
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(&format!("setting REPLICA IDENTITY FULL on {t}"), &e))?;
            tracing::info!(database = %self.url, table = %t, "set REPLICA IDENTITY FULL (updates carry the old row: needed for sum deltas, field merges and unchanged TOAST values)");
        }
        tracing::debug!(database = %self.url, "install_capture: publication");
        let list: Vec<String> = schemas.iter().map(|s| quote_ident(&s.name)).collect();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&self.publication)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.db_err("reading pg_publication", &e))?;
        let sql = if exists {
            format!(
                "ALTER PUBLICATION {} SET TABLE {}",
                quote_ident(&self.publication),
                list.join(", ")
            )
        } else {
            format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&self.publication),
                list.join(", ")
            )
        };
        sqlx::query(AssertSqlSafe(sql))
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err(&format!("creating publication {}", self.publication), &e))?;
        tracing::debug!(database = %self.url, "install_capture: slot");
        // A consumer killed a moment ago may still hold the slot briefly.
        let mut holder = self.slot_holder().await?;
        for _ in 0..20 {
            match holder {
                Some(Some(_)) => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    holder = self.slot_holder().await?;
                }
                _ => break,
            }
        }
        match holder {
            None => {
                sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                    .bind(&self.slot)
                    .execute(&self.pool)
                    .await
                    .map_err(|e| {
                        self.db_err(&format!("creating replication slot {}", self.slot), &e)
                    })?;
                tracing::info!(database = %self.url, slot = %self.slot, "created logical replication slot (pgoutput)");
            }
            Some(Some(pid)) => {
                return Err(Error::Database {
                    database: self.url.clone(),
                    message: format!(
                        "replication slot {} is in use by another consumer (backend PID {pid}); stop that consumer or give this node its own `slot:`",
                        self.slot
                    ),
                });
            }
            Some(None) => {}
        }
        tracing::debug!(database = %self.url, "install_capture: origin");
        self.ensure_origin().await
    }

    /// The current WAL insert position: changes at or below it committed
    /// before now.
    pub async fn change_watermark(&self) -> Result<i64> {
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("reading the WAL position", &e))?;
        parse_lsn(&lsn).ok_or_else(|| Error::Database {
            database: self.url.clone(),
            message: format!("unparsable LSN {lsn:?}"),
        })
    }

    /// The slot's retained WAL as capture last measured it (bytes; `None`
    /// before the first capture step): exported as the
    /// `syncmesh_slot_retained_wal_bytes` gauge.
    pub fn last_retained_wal_bytes(&self) -> Option<i64> {
        self.retained_wal
    }

    /// Bytes of WAL the slot retains (0 if the slot does not exist).
    pub async fn retained_wal_bytes(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the slot's retained WAL", &e))?
        .flatten();
        Ok(v.unwrap_or(0))
    }

    /// Decoded changes committed after `after_lsn` (an end LSN), whole
    /// transactions, about `limit` messages at a time. Skips this node's
    /// own applies. See the module docs.
    pub async fn read_changes(
        &mut self,
        after_lsn: i64,
        limit: usize,
    ) -> Result<Vec<CapturedChange>> {
        // Handed out before but not captured (the core failed or refused
        // them): hand them out again.
        for c in std::mem::take(&mut self.handed_out).into_iter().rev() {
            if c.change_id > after_lsn {
                self.peeked.push_front(c);
            }
        }
        // Already captured.
        while self
            .peeked
            .front()
            .is_some_and(|c| c.change_id <= after_lsn)
        {
            self.peeked.pop_front();
        }
        if self.peeked.is_empty() {
            let fresh = self.peek(after_lsn).await?;
            self.peeked = fresh.into();
            self.peeked_tail = self.tail.take();
        }
        // Whole transactions, at least one, up to `limit` changes.
        let mut out: Vec<CapturedChange> = Vec::new();
        while let Some(c) = self.peeked.front() {
            let same_tx = out.last().is_some_and(|l| l.change_id == c.change_id);
            if out.len() >= limit.max(1) && !same_tx {
                break;
            }
            if let Some(c) = self.peeked.pop_front() {
                out.push(c);
            }
        }
        self.handed_out = out.clone();
        // The slot may move past the window's trailing skipped
        // transactions once its last change is handed out and checkpointed.
        self.tail = if self.peeked.is_empty() {
            self.peeked_tail.take()
        } else {
            None
        };
        Ok(out)
    }

    /// One peek of up to [`PEEK_CHANGES_PER_CALL`] changes after
    /// `after_lsn`, decoded and filtered (own applies, captured already,
    /// resume windows).
    async fn peek(&mut self, after_lsn: i64) -> Result<Vec<CapturedChange>> {
        if self
            .wal_checked
            .is_none_or(|t| t.elapsed() >= WAL_CHECK_INTERVAL)
        {
            self.wal_checked = Some(std::time::Instant::now());
            let retained = self.retained_wal_bytes().await?;
            self.retained_wal = Some(retained);
            if retained > RETAINED_WAL_WARN_BYTES
                && self
                    .wal_warned
                    .is_none_or(|t| t.elapsed() >= WAL_WARN_INTERVAL)
            {
                self.wal_warned = Some(std::time::Instant::now());
                tracing::warn!(database = %self.url, slot = %self.slot, retained_mib = retained >> 20, "the replication slot retains more than {} MiB of WAL: capture is behind (or was stopped); PostgreSQL keeps that WAL until the node catches up", RETAINED_WAL_WARN_BYTES >> 20);
            }
        }
        let messages = match self.stream_window(after_lsn).await? {
            Some(m) => m,
            None => self.peek_sql(after_lsn).await?,
        };
        let mut out = Vec::new();
        let mut tx: Option<Tx> = None;
        let mut last_end = 0;
        let mut last_captured = after_lsn;
        for data in &messages {
            let msg = parse_message(data).map_err(|m| Error::Database {
                database: self.url.clone(),
                message: format!(
                    "malformed pgoutput message from slot {}: {m}; this is a bug, please report it",
                    self.slot
                ),
            })?;
            match msg {
                Message::Begin => {
                    tx = Some(Tx::default());
                }
                Message::Origin(name) => {
                    if let Some(t) = tx.as_mut() {
                        t.ours |= name == self.origin;
                    }
                }
                Message::Relation(oid, rel) => {
                    self.relations.insert(oid, rel);
                }
                Message::Commit { end_lsn } => {
                    let end = end_lsn as i64;
                    if let Some(t) = tx.take() {
                        last_end = last_end.max(end);
                        if t.ours || end <= after_lsn {
                            continue;
                        }
                        if let Some(e) = t.error {
                            return Err(e);
                        }
                        let changes = self.outside_resume_windows(end, t.changes).await?;
                        for mut c in changes {
                            c.change_id = end;
                            out.push(c);
                        }
                        last_captured = end;
                    }
                }
                Message::Change(change) => {
                    let Some(t) = tx.as_mut() else { continue };
                    if t.ours || t.error.is_some() {
                        continue;
                    }
                    match self.decode_change(change) {
                        Ok(c) => t.changes.push(c),
                        Err(e) => t.error = Some(e),
                    }
                }
                Message::Truncate(oids) => {
                    let Some(t) = tx.as_mut() else { continue };
                    if t.ours || t.error.is_some() {
                        continue;
                    }
                    let names: Vec<String> = oids
                        .iter()
                        .filter_map(|o| self.relations.get(o).map(|r| r.name.clone()))
                        .collect();
                    t.error = Some(Error::Schema {
                        table: names.join(", "),
                        message: format!(
                            "was truncated; syncmesh cannot sync TRUNCATE (it carries no row changes): use DELETE instead. To go on, re-create the rows and move the slot past it with `SELECT pg_replication_slot_advance('{}', pg_current_wal_lsn())` while the node is stopped",
                            self.slot
                        ),
                    });
                }
                Message::Other => {}
            }
        }
        if out.is_empty() {
            // Only own applies or transactions captured already (the slot
            // lags the checkpoint after a crash between the sled flush and
            // the advance): consume them, or the next peek returns them again.
            if last_end > 0 {
                self.advance_slot(last_end).await?;
            }
            self.tail = None;
        } else {
            self.tail = Some((last_captured, last_end));
        }
        Ok(out)
    }

    /// Up to [`PEEK_CHANGES_PER_CALL`] changes (whole transactions) from
    /// the slot with `pg_logical_slot_peek_binary_changes`.
    async fn peek_sql(&self, after_lsn: i64) -> Result<Vec<bytes::Bytes>> {
        let limit = i32::try_from(PEEK_CHANGES_PER_CALL).unwrap_or(i32::MAX);
        tracing::trace!(slot = %self.slot, after = %format_lsn(after_lsn), "peeking");
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT lsn::text AS lsn, data FROM pg_logical_slot_peek_binary_changes(\
             $1, NULL, $2, 'proto_version', '1', 'publication_names', $3)",
        )
        .bind(&self.slot)
        .bind(limit)
        .bind(&self.publication)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.peek_err(&e))?;
        tracing::trace!(slot = %self.slot, messages = rows.len(), "peeked");
        rows.iter()
            .map(|row| {
                row.try_get::<Vec<u8>, _>("data")
                    .map(bytes::Bytes::from)
                    .map_err(|e| self.db_err("reading decoded changes", &e))
            })
            .collect()
    }

    /// What the replication stream has (whole transactions, up to
    /// [`PEEK_CHANGES_PER_CALL`] changes; starting it from `after_lsn` if
    /// it is not open), or `None` when streaming is unavailable (then the
    /// caller peeks). A failed stream is dropped: the next call starts it
    /// again from the checkpoint, so nothing it held is lost.
    async fn stream_window(&mut self, after_lsn: i64) -> Result<Option<Vec<bytes::Bytes>>> {
        if self.stream_params.is_err() {
            return Ok(None);
        }
        // A stream that was open before this call and breaks (the server
        // restarted, or dropped it after `wal_sender_timeout` while capture
        // waited for a re-snapshot install) is started again at once; a
        // fresh one that breaks is an error (retried with backoff).
        loop {
            let fresh = self.stream_mut().is_none();
            if fresh && !self.start_stream(after_lsn).await? {
                return Ok(None);
            }
            let Some(stream) = self.stream_mut().as_mut() else {
                return Ok(None);
            };
            match stream.window(PEEK_CHANGES_PER_CALL, Duration::ZERO).await {
                Ok(messages) => {
                    return Ok(Some(messages.into_iter().map(|m| m.freeze()).collect()));
                }
                Err(e) => {
                    *self.stream_mut() = None;
                    if fresh {
                        return Err(self.stream_err(&e));
                    }
                    tracing::info!(database = %self.url, slot = %self.slot, "the replication stream broke ({e}); starting it again from the checkpoint");
                }
            }
        }
    }

    /// Starts the stream from `after_lsn`; false when streaming turned out
    /// to be unavailable (capture peeks from now on, said once).
    async fn start_stream(&mut self, after_lsn: i64) -> Result<bool> {
        let Ok(owned) = self.stream_params.clone() else {
            return Ok(false);
        };
        let params = &owned;
        // The walsender of a stream dropped a moment ago may still hold the
        // slot: wait for it to go, as install_capture does.
        let mut started = ReplStream::start(params, &self.slot, &self.publication, after_lsn).await;
        for _ in 0..SLOT_BUSY_RETRIES {
            match &started {
                Err(StreamError::Server { code, .. }) if code == "55006" => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    started =
                        ReplStream::start(params, &self.slot, &self.publication, after_lsn).await;
                }
                _ => break,
            }
        }
        match started {
            Ok(s) => {
                tracing::debug!(database = %self.url, slot = %self.slot, from = %format_lsn(after_lsn), "capture: streaming the slot over a replication connection");
                *self.stream_mut() = Some(s);
                Ok(true)
            }
            Err(StreamError::Unavailable(why)) => {
                tracing::warn!(database = %self.url, slot = %self.slot, "streaming replication is unavailable ({why}); capture reads the slot with pg_logical_slot_peek_binary_changes instead, which is slower under load");
                self.stream_params = Err(why);
                Ok(false)
            }
            Err(e) => Err(self.stream_err(&e)),
        }
    }

    fn stream_err(&self, e: &StreamError) -> Error {
        self.slot_err(&format!("replication stream: {e}"))
    }

    fn peek_err(&self, e: &sqlx::Error) -> Error {
        self.slot_err(&e.to_string())
    }

    fn slot_err(&self, text: &str) -> Error {
        let message = if text.contains("is active for PID") {
            format!(
                "replication slot {} is in use by another consumer ({text}); stop that consumer or give this node its own `slot:`",
                self.slot
            )
        } else if text.contains("does not exist") && text.contains("slot") {
            format!(
                "replication slot {} does not exist ({text}); restart the node to re-create it (changes made meanwhile are not captured)",
                self.slot
            )
        } else {
            format!("reading decoded changes from slot {}: {text}", self.slot)
        };
        Error::Database {
            database: self.url.clone(),
            message,
        }
    }

    fn decode_change(&self, change: RawChange) -> Result<CapturedChange> {
        let oid = change.rel;
        let Some(rel) = self.relations.get(&oid) else {
            return Err(Error::Database {
                database: self.url.clone(),
                message: format!(
                    "pgoutput sent a change of relation {oid} before describing it; this is a bug, please report it"
                ),
            });
        };
        let to_row = |tuple: &[Cell], base: Option<&BTreeMap<String, Value>>| {
            decode_tuple(rel, tuple, base).map_err(|m| Error::Schema {
                table: rel.name.clone(),
                message: m,
            })
        };
        let old = match &change.old {
            Some((_, t)) => Some(to_row(t, None)?),
            None => None,
        };
        let full_old = matches!(change.old, Some((b'O', _)));
        let new = match &change.new {
            Some(t) => Some(to_row(t, if full_old { old.as_ref() } else { None })?),
            None => None,
        };
        if change.kind == ChangeKind::Update && !full_old {
            return Err(Error::Schema {
                table: rel.name.clone(),
                message: "an update was captured without its old row: REPLICA IDENTITY is not FULL; run `ALTER TABLE ... REPLICA IDENTITY FULL` (the node sets it at start, someone changed it) — this update cannot be merged correctly".into(),
            });
        }
        Ok(CapturedChange {
            change_id: 0,
            table: rel.name.clone(),
            kind: change.kind,
            old,
            new,
        })
    }

    /// Lets the slot move to `to` (everything at or below it is flushed):
    /// a standby status update on the replication stream, or
    /// `pg_replication_slot_advance` when capture peeks.
    async fn advance_slot(&mut self, to: i64) -> Result<()> {
        if let Some(stream) = self.stream_mut().as_mut() {
            let res = stream.confirm(to).await;
            if let Err(e) = res {
                *self.stream_mut() = None;
                return Err(self.stream_err(&e));
            }
            return Ok(());
        }
        if self.stream_params.is_ok() {
            // Between two streams: the next one starts at the checkpoint
            // and confirms it (the walsender of the last may still hold
            // the slot, so no SQL advance).
            return Ok(());
        }
        let confirmed: Option<String> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the slot position", &e))?
        .flatten();
        let current = confirmed.as_deref().and_then(parse_lsn).unwrap_or(0);
        if to <= current {
            return Ok(());
        }
        tracing::trace!(slot = %self.slot, to = %format_lsn(to), "advancing");
        sqlx::query("SELECT pg_replication_slot_advance($1, $2::pg_lsn)")
            .bind(&self.slot)
            .bind(format_lsn(to))
            .execute(&self.pool)
            .await
            .map_err(|e| self.peek_err(&e))?;
        Ok(())
    }

    /// Consumes the slot through `through_lsn`, the checkpoint the core
    /// returned after flushing the ops (plus own applies right after it).
    pub async fn delete_changes_through(&mut self, through_lsn: i64) -> Result<()> {
        self.handed_out.retain(|c| c.change_id > through_lsn);
        if !self.handed_out.is_empty() {
            // The core kept an earlier checkpoint than what it was handed:
            // read again from the slot (which never moved past it); a
            // stream starts over from the checkpoint.
            self.handed_out.clear();
            self.peeked.clear();
            self.peeked_tail = None;
            self.tail = None;
            *self.stream_mut() = None;
        }
        if !self.peeked.is_empty() {
            // More of this window to hand out. A peek advances once it is
            // used up (one decode instead of one per batch). Nothing is
            // lost meanwhile: a restart re-reads from the slot and skips
            // what is at or below the core's checkpoint. A stream
            // confirms every checkpoint (a status message, no decoding).
            if self.stream_mut().is_some() {
                return self.advance_slot(through_lsn).await;
            }
            return Ok(());
        }
        let to = match self.tail.take() {
            Some((captured, end)) if through_lsn >= captured => end.max(through_lsn),
            _ => through_lsn,
        };
        // Capture is past every resume window: stop checking them.
        let resume = self.resume.take();
        self.set_resume(resume, through_lsn);
        self.advance_slot(to).await
    }

    /// Writes `writes` in one transaction under the replication origin and
    /// returns the watermark (see the module docs).
    pub async fn apply(&self, schemas: &[TableSchema], writes: &[RowWrite]) -> Result<i64> {
        if writes.is_empty() {
            return self.change_watermark().await;
        }
        // Consecutive writes of one table and kind become one statement
        // whose parameters are one text array per column (`unnest`): one
        // prepared statement per table and kind, whatever the row count.
        let mut statements: Vec<(String, Vec<Vec<Option<String>>>)> = Vec::new();
        let mut i = 0;
        while i < writes.len() {
            let w = &writes[i];
            let Some(schema) = schemas.iter().find(|s| s.name == w.table) else {
                return Err(Error::Schema {
                    table: w.table.clone(),
                    message: "is not a synced table of this database; add it to `tables:` or check the sender".into(),
                });
            };
            let delete = w.row.is_none();
            let width = if delete {
                schema.key.len()
            } else {
                schema.columns.len()
            };
            let mut columns: Vec<Vec<Option<String>>> = vec![Vec::new(); width];
            let mut rows = 0;
            while i < writes.len() && rows < ROWS_PER_STATEMENT {
                let w = &writes[i];
                if w.table != schema.name || w.row.is_none() != delete {
                    break;
                }
                crate::adapter::check_key_arity(w, schema)?;
                match &w.row {
                    None => {
                        for ((k, v), col) in schema.key.iter().zip(&w.key).zip(&mut columns) {
                            col.push(self.encode(schema, k, v)?);
                        }
                    }
                    Some(row) => {
                        if let Some(unknown) = row
                            .keys()
                            .find(|c| !schema.columns.iter().any(|col| &col.name == *c))
                        {
                            return Err(Error::Schema {
                                table: w.table.clone(),
                                message: format!(
                                    "write names column `{unknown}`, which the table does not have; add the column or check the sender"
                                ),
                            });
                        }
                        for (c, out) in schema.columns.iter().zip(&mut columns) {
                            let v = match schema.key.iter().position(|k| k == &c.name) {
                                Some(p) => w.key.get(p).unwrap_or(&Value::Null),
                                None => row.get(&c.name).unwrap_or(&Value::Null),
                            };
                            out.push(self.encode(schema, &c.name, v)?);
                        }
                    }
                }
                rows += 1;
                i += 1;
            }
            let sql = if delete {
                delete_sql(schema)
            } else {
                upsert_sql(schema)
            };
            statements.push((sql, columns));
        }
        tracing::trace!(rows = writes.len(), "apply: acquiring the apply session");
        let mut conn = self
            .apply_pool
            .acquire()
            .await
            .map_err(|e| self.db_err("opening the apply session", &e))?;
        tracing::trace!("apply: session acquired");
        let result: std::result::Result<i64, sqlx::Error> = async {
            conn.execute("BEGIN").await?;
            for (sql, columns) in statements {
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for column in columns {
                    q = q.bind(column);
                }
                q.execute(&mut *conn).await?;
            }
            conn.execute("COMMIT").await?;
            let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
                .fetch_one(&mut *conn)
                .await?;
            Ok(parse_lsn(&lsn).unwrap_or(i64::MAX))
        }
        .await;
        match result {
            Ok(mark) => Ok(mark),
            Err(e) => {
                let _ = conn.execute("ROLLBACK").await;
                Err(self.db_err("applying rows (rolled back)", &e))
            }
        }
    }

    fn encode(&self, schema: &TableSchema, column: &str, v: &Value) -> Result<Option<String>> {
        let kind = self
            .kinds
            .get(&schema.name)
            .and_then(|k| k.get(column))
            .copied()
            .unwrap_or(PgKind::Text);
        if kind == PgKind::Int
            && let Some(c) = schema.columns.iter().find(|c| c.name == column)
        {
            crate::typemap::check_int_column(column, &c.decl_type, v).map_err(|message| {
                Error::Schema {
                    table: schema.name.clone(),
                    message,
                }
            })?;
        }
        encode_value(kind, v).map_err(|m| Error::Schema {
            table: schema.name.clone(),
            message: format!("column {column}: {m}"),
        })
    }

    /// Starts (or resumes) an initial snapshot: one `REPEATABLE READ`
    /// transaction that imports the snapshot a temporary logical slot
    /// exports (`CREATE_REPLICATION_SLOT … TEMPORARY LOGICAL pgoutput
    /// EXPORT_SNAPSHOT` on a replication connection, dropped once
    /// imported), at that slot's consistent point; writers go on. Without a
    /// replication connection it takes `SHARE` locks on every synced table
    /// instead (waiting for running writers, blocking new ones until
    /// [`PostgresAdapter::finish_snapshot`]) and reads the WAL insert
    /// position. Either way, every transaction that committed changes to
    /// these tables before the snapshot is in it and ends at or below that
    /// position; every later one ends above it.
    ///
    /// With `resume` (the progress the core stored with the last durable
    /// chunk of an interrupted snapshot of the same tables), the snapshot
    /// goes on after that chunk's key, consistent with the new position,
    /// and records a resume window (see [`SnapshotProgress`]).
    pub async fn begin_snapshot(
        &self,
        schemas: &[TableSchema],
        resume: Option<SnapshotProgress>,
    ) -> Result<Snapshot> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.db_err("opening the snapshot session", &e))?;
        let list: Vec<String> = schemas.iter().map(|s| quote_ident(&s.name)).collect();
        // A snapshot exported by a temporary slot: consistent with its
        // consistent point, and writers go on meanwhile.
        let exported = match &self.stream_params {
            Ok(params) => {
                let temp = format!("syncmesh_snap_{:08x}", rand::random::<u32>());
                match ReplStream::export_snapshot(params, &temp).await {
                    Ok(e) => Some(e),
                    Err(e) => {
                        tracing::warn!(database = %self.url, "cannot export a snapshot over a replication connection ({e}); the initial snapshot locks the synced tables in SHARE mode instead (writers wait until it ends)");
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let locked = exported.is_none();
        let res: std::result::Result<(String, Vec<i64>), sqlx::Error> = async {
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await?;
            let lsn = match &exported {
                Some((_, lsn, name)) => {
                    conn.execute(AssertSqlSafe(format!(
                        "SET TRANSACTION SNAPSHOT '{}'",
                        name.replace('\'', "''")
                    )))
                    .await?;
                    format_lsn(*lsn)
                }
                None => {
                    conn.execute(AssertSqlSafe(format!(
                        "LOCK TABLE {} IN SHARE MODE",
                        list.join(", ")
                    )))
                    .await?;
                    sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
                        .fetch_one(&mut *conn)
                        .await?
                }
            };
            let mut estimates = Vec::new();
            for s in schemas {
                let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT count(*) FROM {}",
                    quote_ident(&s.name)
                )))
                .fetch_one(&mut *conn)
                .await?;
                estimates.push(n);
            }
            Ok((lsn, estimates))
        }
        .await;
        // Imported (or failed): the temporary slot may go.
        drop(exported);
        let (lsn, rows) = res.map_err(|e| self.db_err("starting the initial snapshot", &e))?;
        let lsn = parse_lsn(&lsn).unwrap_or(0);
        let tables: Vec<String> = schemas.iter().map(|s| s.name.clone()).collect();
        let fresh = SnapshotProgress {
            version: SnapshotProgress::VERSION,
            first_lsn: lsn,
            lsn,
            tables: tables.clone(),
            ..SnapshotProgress::default()
        };
        let progress = match resume {
            Some(mut p)
                if p.version == SnapshotProgress::VERSION
                    && p.tables == tables
                    && !p.complete
                    && p.windows.len() < MAX_RESUME_WINDOWS =>
            {
                p.windows.push(ResumeWindow {
                    from_lsn: p.lsn,
                    to_lsn: lsn,
                    table: p.table,
                    after_key: p.after_key.clone(),
                });
                p.lsn = lsn;
                tracing::info!(database = %self.url, rows_done = p.done_rows, table = p.tables.get(p.table).map(String::as_str).unwrap_or("-"), "initial snapshot: resuming after the last durable chunk");
                p
            }
            Some(p) => {
                tracing::warn!(database = %self.url, done = p.done_rows, "initial snapshot: the stored progress does not match the configured tables (or was resumed too often); starting the snapshot over");
                fresh
            }
            None => fresh,
        };
        Ok(Snapshot {
            conn,
            lsn,
            rows,
            progress,
            locked,
        })
    }

    /// The next chunk of at most `limit` rows of the snapshot, in primary
    /// key order (keyset pagination inside the snapshot transaction),
    /// table by table, as inserts, with the progress record to store with
    /// it; `None` when every table is done.
    pub async fn snapshot_chunk(
        &self,
        snap: &mut Snapshot,
        schemas: &[TableSchema],
        limit: usize,
    ) -> Result<Option<(String, Vec<CapturedChange>, Vec<u8>)>> {
        let limit = limit.max(1);
        loop {
            let Some(schema) = schemas.get(snap.progress.table) else {
                return Ok(None);
            };
            let cols: Vec<String> = schema
                .columns
                .iter()
                .map(|c| format!("t.{}::text", quote_ident(&c.name)))
                .collect();
            let key_cols: Vec<String> = schema
                .key
                .iter()
                .map(|k| format!("t.{}", quote_ident(k)))
                .collect();
            let mut sql = format!(
                "SELECT {} FROM {} AS t",
                cols.join(", "),
                quote_ident(&schema.name)
            );
            let mut params = Vec::new();
            if let Some(after) = &snap.progress.after_key {
                let mut marks = Vec::new();
                for (i, (k, v)) in schema.key.iter().zip(after).enumerate() {
                    marks.push(format!("${}::{}", i + 1, casts(schema, k)));
                    params.push(self.encode(schema, k, v)?);
                }
                sql.push_str(&format!(
                    " WHERE ({}) > ({})",
                    key_cols.join(", "),
                    marks.join(", ")
                ));
            }
            sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", key_cols.join(", ")));
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for p in params {
                q = q.bind(p);
            }
            let rows = q
                .fetch_all(&mut *snap.conn)
                .await
                .map_err(|e| self.db_err(&format!("snapshot of {}", schema.name), &e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                out.push(CapturedChange {
                    change_id: snap.lsn,
                    table: schema.name.clone(),
                    kind: ChangeKind::Insert,
                    old: None,
                    new: Some(self.decode_row(schema, row)?),
                });
            }
            let last_key = out
                .last()
                .and_then(|c| c.new.as_ref())
                .and_then(|r| schema.key_of(r));
            if rows.len() < limit {
                snap.progress.table += 1;
                snap.progress.after_key = None;
            } else {
                snap.progress.after_key = last_key;
            }
            if out.is_empty() {
                continue;
            }
            snap.progress.done_rows += out.len() as i64;
            return Ok(Some((schema.name.clone(), out, snap.progress.encode()?)));
        }
    }

    /// Loads the windows of a resumed snapshot (from the progress record
    /// the core stored) so capture drops what the resumed part already
    /// published. Forgets them once `checkpoint` is past every window.
    pub fn set_resume(&mut self, progress: Option<SnapshotProgress>, checkpoint: i64) {
        self.resume = progress.filter(|p| p.windows.iter().any(|w| w.to_lsn > checkpoint));
    }

    /// Drops, from a transaction that committed at `end`, the changes of
    /// rows a resumed snapshot published as of a later point (they are in
    /// that snapshot already); an update that moves a row's key across the
    /// boundary keeps the half that is outside.
    async fn outside_resume_windows(
        &self,
        end: i64,
        changes: Vec<CapturedChange>,
    ) -> Result<Vec<CapturedChange>> {
        let Some(p) = &self.resume else {
            return Ok(changes);
        };
        let windows: Vec<&ResumeWindow> = p
            .windows
            .iter()
            .filter(|w| end > w.from_lsn && end <= w.to_lsn)
            .collect();
        if windows.is_empty() {
            return Ok(changes);
        }
        let mut out = Vec::with_capacity(changes.len());
        for c in changes {
            let Some(schema) = self.schemas.get(&c.table) else {
                out.push(c);
                continue;
            };
            let mut old_in = false;
            let mut new_in = false;
            for w in &windows {
                if let Some(k) = c.old.as_ref().and_then(|r| schema.key_of(r)) {
                    old_in |= self.in_resumed_range(w, &p.tables, schema, &k).await?;
                }
                if let Some(k) = c.new.as_ref().and_then(|r| schema.key_of(r)) {
                    new_in |= self.in_resumed_range(w, &p.tables, schema, &k).await?;
                }
            }
            match c.kind {
                ChangeKind::Insert if new_in => {}
                ChangeKind::Delete if old_in => {}
                ChangeKind::Update if old_in && new_in => {}
                ChangeKind::Update if old_in => out.push(CapturedChange {
                    kind: ChangeKind::Insert,
                    old: None,
                    ..c
                }),
                ChangeKind::Update if new_in => out.push(CapturedChange {
                    kind: ChangeKind::Delete,
                    new: None,
                    ..c
                }),
                _ => out.push(c),
            }
        }
        Ok(out)
    }

    /// Whether `key` of table `schema` lies in the part of the snapshot
    /// window `w` resumed (after the boundary), in PostgreSQL's key order.
    async fn in_resumed_range(
        &self,
        w: &ResumeWindow,
        tables: &[String],
        schema: &TableSchema,
        key: &[Value],
    ) -> Result<bool> {
        let Some(idx) = tables.iter().position(|t| t == &schema.name) else {
            return Ok(false);
        };
        if idx != w.table {
            return Ok(idx > w.table);
        }
        let Some(after) = &w.after_key else {
            return Ok(true);
        };
        let kinds = self.kinds.get(&schema.name);
        let rust_order = schema.key.iter().all(|k| {
            matches!(
                kinds.and_then(|m| m.get(k)),
                Some(PgKind::Int | PgKind::Bytea | PgKind::Timestamp | PgKind::Timestamptz)
            )
        });
        if rust_order {
            return Ok(key > after.as_slice());
        }
        // Text keys sort by the column's collation, numeric ones by value:
        // let PostgreSQL compare.
        let n = schema.key.len();
        let mine: Vec<String> = (0..n)
            .map(|i| format!("${}::{}", i + 1, casts(schema, &schema.key[i])))
            .collect();
        let theirs: Vec<String> = (0..n)
            .map(|i| format!("${}::{}", n + i + 1, casts(schema, &schema.key[i])))
            .collect();
        let mut q = sqlx::query_scalar::<_, bool>(AssertSqlSafe(format!(
            "SELECT ROW({}) > ROW({})",
            mine.join(", "),
            theirs.join(", ")
        )));
        for (k, v) in schema.key.iter().zip(key) {
            q = q.bind(self.encode(schema, k, v)?);
        }
        for (k, v) in schema.key.iter().zip(after) {
            q = q.bind(self.encode(schema, k, v)?);
        }
        q.fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("comparing keys of a resumed snapshot", &e))
    }

    /// Ends the snapshot transaction (releasing the table locks).
    pub async fn finish_snapshot(&self, mut snap: Snapshot) -> Result<()> {
        snap.conn
            .execute("COMMIT")
            .await
            .map_err(|e| self.db_err("ending the initial snapshot", &e))?;
        Ok(())
    }

    fn decode_row(&self, schema: &TableSchema, row: &PgRow) -> Result<BTreeMap<String, Value>> {
        let kinds = self.kinds.get(&schema.name);
        let mut map = BTreeMap::new();
        for (i, col) in schema.columns.iter().enumerate() {
            let text: Option<String> = row
                .try_get(i)
                .map_err(|e| self.db_err(&format!("reading table {}", schema.name), &e))?;
            let kind = kinds
                .and_then(|k| k.get(&col.name))
                .copied()
                .unwrap_or(PgKind::Text);
            let v = match text {
                None => Value::Null,
                Some(t) => decode_text(kind, &t).map_err(|m| Error::Schema {
                    table: schema.name.clone(),
                    message: format!("column {}: {m}", col.name),
                })?,
            };
            map.insert(col.name.clone(), v);
        }
        Ok(map)
    }

    /// Every row of a table, ordered by key, decoded like captured rows.
    pub async fn dump_table(&self, schema: &TableSchema) -> Result<Vec<BTreeMap<String, Value>>> {
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| format!("t.{}::text", quote_ident(&c.name)))
            .collect();
        // Qualified: a bare name would sort by the text output column.
        let order: Vec<String> = schema
            .key
            .iter()
            .map(|k| format!("t.{}", quote_ident(k)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} AS t ORDER BY {}",
            cols.join(", "),
            quote_ident(&schema.name),
            order.join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err(&format!("reading table {}", schema.name), &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.decode_row(schema, row)?);
        }
        Ok(out)
    }
}

/// An initial snapshot in progress (see
/// [`PostgresAdapter::begin_snapshot`]).
pub struct Snapshot {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// The WAL position this attempt is consistent with.
    pub lsn: i64,
    /// Rows per table when the snapshot started (for progress).
    pub rows: Vec<i64>,
    /// Where the snapshot stands (stored with every chunk).
    pub progress: SnapshotProgress,
    /// The synced tables are locked in SHARE mode until it ends (no
    /// exported snapshot could be had): writers wait.
    pub locked: bool,
}

/// Most resume windows one snapshot keeps; beyond, it starts over.
const MAX_RESUME_WINDOWS: usize = 64;

/// Where a resumable initial snapshot stands. The core stores it (an
/// adapter record, bytes it does not read) in the same flushed batch as
/// each chunk's ops.
///
/// The rows published by an attempt are consistent with its WAL position
/// `lsn`. An attempt interrupted by a crash left the tables unlocked, so
/// writes may have committed before the next attempt locks them again at
/// a later position L'. The next attempt goes on after the last durable
/// key, consistent with L', and records a [`ResumeWindow`] (lsn, L']:
/// capture later drops the changes committed inside the window to rows of
/// the resumed part (the new attempt read them as of L'), and keeps those
/// to rows published before (they reflect `lsn` only). Once done, the
/// capture checkpoint becomes `first_lsn`: nothing committed before the
/// first attempt is streamed, everything after it is, exactly once.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotProgress {
    /// Format of this record ([`SnapshotProgress::VERSION`]).
    pub version: u32,
    /// The first attempt's WAL position: the checkpoint once done.
    pub first_lsn: i64,
    /// The current attempt's WAL position.
    pub lsn: i64,
    /// The synced tables, in snapshot order.
    pub tables: Vec<String>,
    /// Index (in `tables`) of the table in progress.
    pub table: usize,
    /// Last key published of that table (`None`: none of it yet).
    pub after_key: Option<Vec<Value>>,
    /// Rows published so far, over every attempt.
    pub done_rows: i64,
    /// Every row is published and the checkpoint is set.
    pub complete: bool,
    /// One window per resumed attempt.
    pub windows: Vec<ResumeWindow>,
}

/// Changes committed in (`from_lsn`, `to_lsn`] to rows after
/// (`table`, `after_key`) in snapshot order are in the snapshot already.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResumeWindow {
    /// Position the rows before the boundary are consistent with.
    pub from_lsn: i64,
    /// Position the resumed attempt is consistent with.
    pub to_lsn: i64,
    /// Table index of the boundary.
    pub table: usize,
    /// Last key published before the boundary (`None`: the whole table
    /// is after it).
    pub after_key: Option<Vec<Value>>,
}

impl SnapshotProgress {
    /// The record format.
    pub const VERSION: u32 = 1;
    /// Name of the core's adapter record (`NodeCore::meta`) holding it.
    pub const META: &'static str = "pg_snapshot";

    /// The stored form.
    pub fn encode(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|e| Error::Store {
            path: "m/snapshot".into(),
            message: format!("cannot encode the snapshot progress: {e}"),
        })
    }

    /// Reads a stored record; `None` if it is not one this version wrote
    /// (the snapshot then starts over).
    pub fn decode(bytes: &[u8]) -> Option<SnapshotProgress> {
        postcard::from_bytes::<SnapshotProgress>(bytes)
            .ok()
            .filter(|p| p.version == SnapshotProgress::VERSION)
    }
}

/// An initial snapshot in progress: every row of the synced tables as of
/// one consistent point (see [`PostgresAdapter::begin_snapshot`] and
/// [`SnapshotProgress`]), published chunk by chunk, after which the
/// capture checkpoint is set at that point. Runs when a capturing node
/// starts with no checkpoint yet: its first start, or a restart after a
/// crash during its snapshot, which resumes after the last durable chunk.
/// Shows progress (rows, rate, ETA) per chunk: a bar on a terminal, log
/// lines otherwise. The node's shell drives it, one chunk per loop turn,
/// so the chunks already logged go to the hub meanwhile.
pub struct InitialSnapshot {
    snap: Snapshot,
    started: std::time::Instant,
    /// Rows of the tables when it began (rows of earlier attempts too).
    total: i64,
    /// Rows earlier attempts published.
    already: i64,
    bar: syncmesh_ops::progress::Progress,
    last_log: std::time::Instant,
}

impl InitialSnapshot {
    /// Starts the snapshot, or resumes the one the core's stored progress
    /// names; `None` when there is nothing to publish (a crash came
    /// between storing "complete" and the checkpoint: it is set now).
    pub async fn begin<S: crate::store::LogStore>(
        db: &mut PostgresAdapter,
        core: &mut crate::core::NodeCore<S>,
        schemas: &[TableSchema],
    ) -> Result<Option<Self>> {
        let stored = core
            .meta(SnapshotProgress::META)?
            .and_then(|b| SnapshotProgress::decode(&b));
        if let Some(p) = stored.as_ref().filter(|p| p.complete) {
            core.handle_checkpoint(p.first_lsn)?;
            db.set_resume(stored.clone(), p.first_lsn);
            return Ok(None);
        }
        let snap = db.begin_snapshot(schemas, stored).await?;
        let total: i64 = snap.rows.iter().sum();
        if snap.locked {
            tracing::info!(database = %db.url, rows = total, lsn = %format_lsn(snap.lsn), "initial snapshot: publishing the existing rows (writes to the synced tables wait until it ends)");
        } else {
            tracing::info!(database = %db.url, rows = total, lsn = %format_lsn(snap.lsn), "initial snapshot: publishing the existing rows from an exported snapshot (writers are not blocked)");
        }
        Ok(Some(Self {
            already: snap.progress.done_rows,
            snap,
            started: std::time::Instant::now(),
            total,
            bar: syncmesh_ops::progress::Progress::new(&db.slot, "initial snapshot"),
            last_log: std::time::Instant::now(),
        }))
    }

    /// Publishes the next chunk of at most `batch` rows (flushed with its
    /// progress record before it returns); true once every row is
    /// published: then call [`InitialSnapshot::finish`].
    pub async fn step<S: crate::store::LogStore>(
        &mut self,
        db: &mut PostgresAdapter,
        core: &mut crate::core::NodeCore<S>,
        schemas: &[TableSchema],
        batch: usize,
    ) -> Result<bool> {
        let Some((table, rows, progress)) =
            db.snapshot_chunk(&mut self.snap, schemas, batch).await?
        else {
            return Ok(true);
        };
        let now_ms = crate::adapter::now_ms;
        core.handle_snapshot_with_meta(
            syncmesh_resolver::Ntp64::from_unix_millis(now_ms()),
            &rows,
            &[(SnapshotProgress::META.to_owned(), Some(progress))],
        )?;
        let done = self.snap.progress.done_rows;
        // `total` counts whole tables: rows published by earlier attempts
        // are in it too.
        let target = self.total.max(done) as u64;
        self.bar.observe(now_ms(), done as u64, target);
        if self.last_log.elapsed() >= Duration::from_secs(1) {
            self.last_log = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = (done - self.already) as f64 / secs;
            let eta = if rate > 0.0 {
                (target as i64 - done).max(0) as f64 / rate
            } else {
                0.0
            };
            tracing::debug!(database = %db.url, table = %table, "initial snapshot: {done}/{target} rows, {rate:.0} rows/s, ETA {eta:.0} s");
        }
        Ok(false)
    }

    /// Marks the snapshot complete and sets the capture checkpoint at its
    /// point (every chunk is flushed: only now does the checkpoint move),
    /// then ends its transaction; capture streams from there.
    pub async fn finish<S: crate::store::LogStore>(
        mut self,
        db: &mut PostgresAdapter,
        core: &mut crate::core::NodeCore<S>,
    ) -> Result<()> {
        self.snap.progress.complete = true;
        core.handle_meta(&[(
            SnapshotProgress::META.to_owned(),
            Some(self.snap.progress.encode()?),
        )])?;
        core.handle_checkpoint(self.snap.progress.first_lsn)?;
        let progress = self.snap.progress.clone();
        db.finish_snapshot(self.snap).await?;
        db.set_resume(Some(progress.clone()), progress.first_lsn);
        tracing::info!(database = %db.url, rows = progress.done_rows, resumed = progress.windows.len(), secs = self.started.elapsed().as_secs_f64(), "initial snapshot done; streaming from the slot");
        Ok(())
    }
}

#[derive(Default)]
struct Tx {
    ours: bool,
    changes: Vec<CapturedChange>,
    error: Option<Error>,
}

/// A cell of a pgoutput tuple.
#[derive(Debug, PartialEq)]
enum Cell {
    Null,
    Unchanged,
    Text(Vec<u8>),
}

/// An insert, update or delete before decoding its values.
#[derive(Debug)]
struct RawChange {
    rel: u32,
    kind: ChangeKind,
    /// `K` (key only) or `O` (full old row), with the tuple.
    old: Option<(u8, Vec<Cell>)>,
    new: Option<Vec<Cell>>,
}

#[derive(Debug)]
enum Message {
    Begin,
    Commit { end_lsn: u64 },
    Origin(String),
    Relation(u32, Relation),
    Change(RawChange),
    Truncate(Vec<u32>),
    Other,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let Some(end) = end else {
            return Err(format!(
                "message truncated at byte {} (needed {n} more)",
                self.pos
            ));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> std::result::Result<i16, String> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self) -> std::result::Result<String, String> {
        let rest = &self.buf[self.pos..];
        let Some(nul) = rest.iter().position(|b| *b == 0) else {
            return Err("unterminated string".into());
        };
        let s = String::from_utf8(rest[..nul].to_vec()).map_err(|_| "string is not UTF-8")?;
        self.pos += nul + 1;
        Ok(s)
    }
    fn tuple(&mut self) -> std::result::Result<Vec<Cell>, String> {
        let n = self.i16()?;
        let mut cells = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            cells.push(match self.u8()? {
                b'n' => Cell::Null,
                b'u' => Cell::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Cell::Text(self.take(len)?.to_vec())
                }
                other => return Err(format!("unknown tuple cell kind {:?}", other as char)),
            });
        }
        Ok(cells)
    }
}

/// Parses one pgoutput (protocol version 1) message.
fn parse_message(buf: &[u8]) -> std::result::Result<Message, String> {
    let mut r = Reader { buf, pos: 0 };
    Ok(match r.u8()? {
        b'B' => {
            r.take(20)?;
            Message::Begin
        }
        b'C' => {
            r.u8()?;
            r.u64()?;
            let end_lsn = r.u64()?;
            r.u64()?;
            Message::Commit { end_lsn }
        }
        b'O' => {
            r.u64()?;
            Message::Origin(r.cstr()?)
        }
        b'R' => {
            let oid = r.u32()?;
            let _namespace = r.cstr()?;
            let name = r.cstr()?;
            let _ident = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(RelColumn { name, type_oid });
            }
            Message::Relation(oid, Relation { name, columns })
        }
        b'I' => {
            let rel = r.u32()?;
            if r.u8()? != b'N' {
                return Err("insert without a new tuple".into());
            }
            Message::Change(RawChange {
                rel,
                kind: ChangeKind::Insert,
                old: None,
                new: Some(r.tuple()?),
            })
        }
        b'U' => {
            let rel = r.u32()?;
            let mut tag = r.u8()?;
            let mut old = None;
            if tag == b'K' || tag == b'O' {
                old = Some((tag, r.tuple()?));
                tag = r.u8()?;
            }
            if tag != b'N' {
                return Err(format!("update with unexpected part {:?}", tag as char));
            }
            Message::Change(RawChange {
                rel,
                kind: ChangeKind::Update,
                old,
                new: Some(r.tuple()?),
            })
        }
        b'D' => {
            let rel = r.u32()?;
            let tag = r.u8()?;
            if tag != b'K' && tag != b'O' {
                return Err(format!("delete with unexpected part {:?}", tag as char));
            }
            Message::Change(RawChange {
                rel,
                kind: ChangeKind::Delete,
                old: Some((tag, r.tuple()?)),
                new: None,
            })
        }
        b'T' => {
            let n = r.u32()?;
            r.u8()?;
            let mut oids = Vec::new();
            for _ in 0..n {
                oids.push(r.u32()?);
            }
            Message::Truncate(oids)
        }
        _ => Message::Other,
    })
}

/// Decodes a tuple by the relation's column types; an unchanged (TOASTed)
/// cell takes its value from `base` (the old row) and is an error without.
fn decode_tuple(
    rel: &Relation,
    cells: &[Cell],
    base: Option<&BTreeMap<String, Value>>,
) -> std::result::Result<BTreeMap<String, Value>, String> {
    if cells.len() != rel.columns.len() {
        return Err(format!(
            "decoded tuple has {} columns but the relation has {}",
            cells.len(),
            rel.columns.len()
        ));
    }
    let mut row = BTreeMap::new();
    for (col, cell) in rel.columns.iter().zip(cells) {
        let v = match cell {
            Cell::Null => Value::Null,
            Cell::Unchanged => match base.and_then(|b| b.get(&col.name)) {
                Some(v) => v.clone(),
                None => {
                    return Err(format!(
                        "column {}: an update left this TOASTed value unchanged and no old row was sent (REPLICA IDENTITY is not FULL); run `ALTER TABLE ... REPLICA IDENTITY FULL`",
                        col.name
                    ));
                }
            },
            Cell::Text(bytes) => {
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| format!("column {}: text is not UTF-8", col.name))?;
                let kind = kind_of(col.type_oid, "", 0).unwrap_or(PgKind::Text);
                decode_text(kind, text).map_err(|m| format!("column {}: {m}", col.name))?
            }
        };
        row.insert(col.name.clone(), v);
    }
    Ok(row)
}

/// Parses PostgreSQL's text output of a value of `kind`.
pub fn decode_text(kind: PgKind, text: &str) -> std::result::Result<Value, String> {
    Ok(match kind {
        PgKind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(format!("unexpected boolean text {text:?}")),
        },
        PgKind::Int => Value::Int(
            text.parse()
                .map_err(|_| format!("unexpected integer text {text:?}"))?,
        ),
        PgKind::Float4 => Value::Float(f64::from(
            text.parse::<f32>()
                .map_err(|_| format!("unexpected real text {text:?}"))?,
        )),
        PgKind::Float8 => Value::Float(
            text.parse()
                .map_err(|_| format!("unexpected double text {text:?}"))?,
        ),
        PgKind::Numeric => Value::Decimal(text.to_owned()),
        PgKind::Text | PgKind::Date => Value::Text(text.to_owned()),
        PgKind::Json => Value::Json(text.to_owned()),
        PgKind::Bytea => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| format!("bytea text is not hex: {text:?}"))?;
            Value::Bytes(decode_hex(hex).ok_or("bytea text has invalid hex digits")?)
        }
        PgKind::Timestamp | PgKind::Timestamptz => Value::Timestamp(
            parse_timestamp(text).ok_or_else(|| format!("unexpected timestamp text {text:?}"))?,
        ),
    })
}

/// The text to bind for `v` into a column of `kind` (`None` for NULL).
pub fn encode_value(kind: PgKind, v: &Value) -> std::result::Result<Option<String>, String> {
    Ok(Some(match (kind, v) {
        (_, Value::Null) => return Ok(None),
        (PgKind::Bool, Value::Bool(b)) => if *b { "t" } else { "f" }.to_owned(),
        (PgKind::Int | PgKind::Numeric | PgKind::Float4 | PgKind::Float8, Value::Bool(b)) => {
            if *b { "1" } else { "0" }.to_owned()
        }
        (PgKind::Timestamp, Value::Timestamp(us) | Value::Int(us)) => format_timestamp(*us, false),
        (PgKind::Timestamptz, Value::Timestamp(us) | Value::Int(us)) => format_timestamp(*us, true),
        (PgKind::Date, Value::Timestamp(us)) => {
            let ts = format_timestamp(*us, false);
            ts.split(' ').next().unwrap_or(&ts).to_owned()
        }
        (PgKind::Bytea, Value::Bytes(b)) => {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            for byte in b {
                s.push_str(&format!("{byte:02x}"));
            }
            s
        }
        (_, Value::Bytes(b)) => String::from_utf8(b.clone()).map_err(|_| {
            "bytes that are not UTF-8 cannot be written to a non-bytea column; use bytea".to_owned()
        })?,
        (_, Value::Bool(b)) => b.to_string(),
        (_, Value::Int(i)) => i.to_string(),
        (_, Value::Float(f)) => float_text(*f),
        (_, Value::Timestamp(us)) => format_timestamp(*us, true),
        (_, Value::Decimal(s) | Value::Text(s) | Value::Json(s)) => s.clone(),
    }))
}

/// A double as text PostgreSQL parses back to the same bits.
fn float_text(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f == f64::INFINITY {
        "Infinity".into()
    } else if f == f64::NEG_INFINITY {
        "-Infinity".into()
    } else {
        format!("{f:?}")
    }
}

const US_PER_DAY: i64 = 86_400_000_000;

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]`, `infinity`
/// and `-infinity` into microseconds since the epoch (UTC).
fn parse_timestamp(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    };
    let (date, time) = text.split_once(' ')?;
    let mut dp = date.splitn(3, '-');
    let year: i64 = dp.next()?.parse().ok()?;
    let month: i64 = dp.next()?.parse().ok()?;
    let day: i64 = dp.next()?.parse().ok()?;
    let year = if bc { 1 - year } else { year };
    // Offset: a sign after the seconds.
    let off_at = time.find(['+', '-']);
    let (clock, offset) = match off_at {
        Some(i) => (&time[..i], Some(&time[i..])),
        None => (time, None),
    };
    let mut cp = clock.splitn(3, ':');
    let h: i64 = cp.next()?.parse().ok()?;
    let mi: i64 = cp.next()?.parse().ok()?;
    let sec = cp.next()?;
    let (s, frac) = match sec.split_once('.') {
        Some((s, f)) => (s, f),
        None => (sec, ""),
    };
    let s: i64 = s.parse().ok()?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let us_frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    let mut off_s = 0i64;
    if let Some(o) = offset {
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let mut parts = o[1..].split(':');
        let oh: i64 = parts.next()?.parse().ok()?;
        let om: i64 = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
        let os: i64 = parts.next().map(str::parse).transpose().ok()?.unwrap_or(0);
        off_s = sign * (oh * 3600 + om * 60 + os);
    }
    let days = days_from_civil(year, month, day);
    let secs = h * 3600 + mi * 60 + s - off_s;
    days.checked_mul(US_PER_DAY)?
        .checked_add(secs.checked_mul(1_000_000)?)?
        .checked_add(us_frac)
}

/// Formats microseconds since the epoch as PostgreSQL input text (UTC).
fn format_timestamp(us: i64, with_zone: bool) -> String {
    match us {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let days = us.div_euclid(US_PER_DAY);
    let rem = us.rem_euclid(US_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, f) = (
        rem / 3_600_000_000,
        rem / 60_000_000 % 60,
        rem / 1_000_000 % 60,
        rem % 1_000_000,
    );
    let (year, bc) = if y <= 0 { (1 - y, " BC") } else { (y, "") };
    let zone = if with_zone { "+00" } else { "" };
    format!("{year:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{f:06}{zone}{bc}")
}

/// Parses `X/Y` (hex) into a 64-bit position.
pub fn parse_lsn(text: &str) -> Option<i64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    i64::try_from((hi << 32) | lo).ok()
}

/// Formats a 64-bit position as `X/Y`.
pub fn format_lsn(lsn: i64) -> String {
    let v = lsn as u64;
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    b.chunks_exact(2)
        .map(|p| Some((nib(p[0])? << 4) | nib(p[1])?))
        .collect()
}

/// Quotes an identifier for PostgreSQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn casts(schema: &TableSchema, col: &str) -> String {
    schema
        .columns
        .iter()
        .find(|c| c.name == col)
        .map(|c| c.decl_type.clone())
        .unwrap_or_else(|| "text".into())
}

/// `INSERT … SELECT … FROM unnest($1::text[], …) ON CONFLICT (key) DO
/// UPDATE`: parameter i is the text array of column i, each element cast
/// to the column's declared type.
fn upsert_sql(schema: &TableSchema) -> String {
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let arrays: Vec<String> = (1..=schema.columns.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let names: Vec<String> = (0..schema.columns.len()).map(|i| format!("c{i}")).collect();
    let select: Vec<String> = schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("u.c{i}::{}", c.decl_type))
        .collect();
    let key: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
    let updates: Vec<String> = schema
        .columns
        .iter()
        .filter(|c| !schema.key.contains(&c.name))
        .map(|c| {
            let q = quote_ident(&c.name);
            format!("{q} = EXCLUDED.{q}")
        })
        .collect();
    let action = if updates.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!("UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM unnest({}) AS u({}) ON CONFLICT ({}) DO {action}",
        quote_ident(&schema.name),
        cols.join(", "),
        select.join(", "),
        arrays.join(", "),
        names.join(", "),
        key.join(", ")
    )
}

/// `DELETE … USING unnest($1::text[], …)`: parameter i is the text array
/// of key column i.
fn delete_sql(schema: &TableSchema) -> String {
    let table = quote_ident(&schema.name);
    let arrays: Vec<String> = (1..=schema.key.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let names: Vec<String> = (0..schema.key.len()).map(|i| format!("k{i}")).collect();
    let conds: Vec<String> = schema
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{table}.{} = u.k{i}::{}", quote_ident(k), casts(schema, k)))
        .collect();
    format!(
        "DELETE FROM {table} USING unnest({}) AS u({}) WHERE {}",
        arrays.join(", "),
        names.join(", "),
        conds.join(" AND ")
    )
}

/// A one-line explanation of a failed connection.
fn connect_failure(e: &sqlx::Error, url: &str) -> String {
    let text = crate::adapter::redact_password(&e.to_string(), url);
    if text.contains("password authentication failed") {
        format!("cannot connect: {text}; check the user and password in the URL")
    } else if text.contains("does not exist") {
        format!("cannot connect: {text}; create the database or role, or fix the URL")
    } else if text.contains("Connection refused") || text.contains("connection refused") {
        format!(
            "cannot connect ({text}); is PostgreSQL running and listening on that host and port?"
        )
    } else if text.contains("no pg_hba.conf entry") {
        format!("cannot connect: {text}; allow this host and user in pg_hba.conf")
    } else if text.contains("certificate") {
        format!(
            "cannot connect: {text}; TLS: set sslrootcert in the URL to the CA that signed the \
             server's certificate, and connect by a host name or IP address the certificate names \
             (or use sslmode=require to encrypt without verifying)"
        )
    } else {
        format!("cannot connect: {text}; check the URL and that PostgreSQL is reachable")
    }
}

/// What to do about common errors.
fn hint_for(e: &sqlx::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("permission denied")
        || text.contains("must be superuser")
        || text.contains("must be owner")
    {
        "; the user needs the REPLICATION attribute (or superuser), ownership of the synced tables and EXECUTE on the pg_replication_origin_* functions"
    } else if text.contains("is already active for PID") {
        "; another syncmesh node uses the same slot's replication origin: give each node its own `slot:`"
    } else if text.contains("wal_level") {
        "; set wal_level = logical and restart PostgreSQL"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x"), None);
    }

    #[test]
    fn timestamps_round_trip_through_text() {
        for us in [
            0i64,
            1,
            -1,
            1_700_000_000_123_456,
            -62_135_596_800_000_000,
            -62_167_219_200_000_000,
            253_402_300_799_999_999,
            i64::MAX,
            i64::MIN,
        ] {
            let t = format_timestamp(us, true);
            assert_eq!(parse_timestamp(&t), Some(us), "{t}");
        }
        assert_eq!(
            parse_timestamp("2024-02-29 12:00:00+02"),
            parse_timestamp("2024-02-29 10:00:00+00")
        );
        assert_eq!(parse_timestamp("1970-01-01 00:00:00.5"), Some(500_000));
        assert_eq!(
            format_timestamp(-62_167_219_200_000_000, false),
            "0001-01-01 00:00:00.000000 BC"
        );
        assert_eq!(parse_timestamp("nonsense"), None);
    }

    #[test]
    fn values_encode_per_column_kind() {
        assert_eq!(
            encode_value(PgKind::Bool, &Value::Int(1)).unwrap(),
            Some("1".into())
        );
        assert_eq!(
            encode_value(PgKind::Timestamptz, &Value::Int(0)).unwrap(),
            Some("1970-01-01 00:00:00.000000+00".into())
        );
        assert_eq!(
            encode_value(PgKind::Bytea, &Value::Bytes(vec![0, 255])).unwrap(),
            Some("\\x00ff".into())
        );
        assert_eq!(
            encode_value(PgKind::Float8, &Value::Float(-0.0)).unwrap(),
            Some("-0.0".into())
        );
        assert_eq!(encode_value(PgKind::Int, &Value::Null).unwrap(), None);
        assert!(encode_value(PgKind::Text, &Value::Bytes(vec![0xff])).is_err());
        assert_eq!(
            decode_text(PgKind::Float4, "0.1").unwrap(),
            Value::Float(f64::from(0.1f32))
        );
        assert_eq!(
            decode_text(PgKind::Bytea, "\\x00ff").unwrap(),
            Value::Bytes(vec![0, 255])
        );
        assert!(decode_text(PgKind::Int, "1.5").is_err());
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            &b""[..],
            b"C",
            b"R\0\0\0\x01",
            b"I\0\0\0\x01X",
            b"U\0\0\0\x01N\0\x01z",
        ] {
            assert!(parse_message(bad).is_err(), "{bad:?}");
        }
        let mut ins = b"I\0\0\0\x07N\0\x02n".to_vec();
        ins.extend_from_slice(b"t\0\0\0\x0212");
        match parse_message(&ins).unwrap() {
            Message::Change(c) => {
                assert_eq!(c.rel, 7);
                assert_eq!(c.new.unwrap(), vec![Cell::Null, Cell::Text(b"12".to_vec())]);
            }
            other => panic!("{other:?}"),
        }
    }
}
