//! The MySQL / MariaDB adapter: capture by triggers into a change table,
//! apply of visible rows in one transaction without echo. Tested against
//! MariaDB 10.11 (Debian's `mariadb-server`).
//!
//! # Capture
//!
//! [`MysqlAdapter::install_capture`] creates (idempotently):
//!
//! - `_syncmesh_changes(id BIGINT PRIMARY KEY, tbl, op, old_row, new_row)`
//!   (InnoDB): one row per captured row change, the rows as JSON.
//! - `_syncmesh_seq(id = 1, v)`: the last change id handed out. Every
//!   capture trigger first runs `UPDATE _syncmesh_seq SET v = v + 1`, which
//!   takes that row's lock until the writing transaction ends, then inserts
//!   its change with id `v`. So change ids are handed out **in commit
//!   order**: a transaction that captured a change holds the lock until it
//!   commits or rolls back (a rollback also takes its ids back), and the
//!   next one waits for it. A reader that remembers the highest id it
//!   consumed therefore never misses a change — `AUTO_INCREMENT` would not
//!   guarantee that (ids are assigned at insert, not at commit). The price:
//!   writing transactions on synced tables serialise from their first
//!   captured row change to their commit (and two transactions that also
//!   lock user rows in opposite orders may see a deadlock, which InnoDB
//!   resolves by rolling one back).
//! - `AFTER INSERT/UPDATE/DELETE` triggers `_syncmesh_{ins,upd,del}_<table>`
//!   on every synced table, guarded by `IF @syncmesh_applying IS NULL`.
//!   Triggers starting with `_syncmesh_` on tables no longer given are
//!   dropped; the others are replaced (`CREATE OR REPLACE TRIGGER` on
//!   MariaDB, drop and create on MySQL). The `_syncmesh_` prefix and the
//!   session variable `@syncmesh_applying` are reserved.
//!
//! MySQL fires no triggers for `TRUNCATE` or for rows changed by foreign
//! key actions (`ON DELETE CASCADE`, `SET NULL`): those changes are not
//! captured. Delete rows with `DELETE` on synced tables, and let every
//! replica run its own cascades.
//!
//! # Encoding of captured rows
//!
//! `old_row` / `new_row` are `JSON_OBJECT('col', JSON_ARRAY(tag, text))`,
//! the text built in the trigger so that nothing goes through a lossy
//! conversion (`JSON_OBJECT` prints a `FLOAT` with 6 digits, and a
//! `DECIMAL` as a JSON number that JSON parsers read as a double):
//!
//! | column type                                   | tag | text in the trigger                | [`Value`]                                   |
//! |-----------------------------------------------|-----|------------------------------------|---------------------------------------------|
//! | `tinyint`..`bigint`, `year` (signed/unsigned) | `i` | `CAST(c AS CHAR)`                  | `Int`; an unsigned above `i64::MAX`: `Decimal` |
//! | `decimal`/`numeric`                           | `n` | `CAST(c AS CHAR)`                  | `Decimal` (exact text, never a float)       |
//! | `float`                                       | `f` | `CAST(CAST(c AS DOUBLE) AS CHAR)`  | `Float` (the float's exact double)          |
//! | `double`                                      | `f` | `CAST(c AS CHAR)` (shortest exact) | `Float`                                     |
//! | `char`, `varchar`, `*text`, `enum`, `set`     | `t` | `c`                                | `Text`                                      |
//! | `binary`, `varbinary`, `*blob`                | `x` | `HEX(c)`                           | `Bytes`                                     |
//! | `date`, `time`                                | `t` | `CAST(c AS CHAR)`                  | `Text` (`YYYY-MM-DD`, `HH:MM:SS[.f]`)       |
//! | `datetime`                                    | `d` | `CAST(c AS CHAR)`                  | `Timestamp` (µs, read as UTC); a zero date stays `Text` |
//! | `timestamp`                                   | `s` | `CAST(UNIX_TIMESTAMP(c) AS CHAR)`  | `Timestamp` (µs since the epoch, independent of the session time zone) |
//! | `json` (MariaDB: `longtext` with `JSON_VALID`) | `j` | `CAST(c AS CHAR)`                  | `Json` (the text as stored)                 |
//! | `bit(1)`                                      | `b` | `CAST(c + 0 AS CHAR)`              | `Bool`                                      |
//!
//! Any other type (e.g. `bit(n > 1)`, spatial types) is refused by
//! [`MysqlAdapter::introspect`] with an error naming table and column.
//! [`MysqlAdapter::dump_table`] reads rows through the same expressions,
//! so captured and dumped values are identical.
//!
//! Writing binds per column type: integers as `BIGINT` (a `Decimal` into
//! an integer column as text, exact for an unsigned above `i64::MAX`),
//! `Float` as `DOUBLE` (exact; MySQL rounds it for a `FLOAT` column, which
//! gives back the captured float), `Decimal` as text, `Timestamp` as
//! `YYYY-MM-DD HH:MM:SS.ffffff` (UTC: the adapter's sessions use
//! `time_zone = '+00:00'`), `Bytes` as bytes, `Bool` as 0/1. A value a
//! column cannot hold is an error naming table and column, and nothing of
//! the batch is written.
//!
//! # Initial snapshot
//!
//! A capturing node publishes the rows already in its tables before it
//! streams ([`InitialSnapshot`]), chunk by chunk in primary-key order
//! (keyset pagination, `batch_size` rows per chunk), resumable: the cursor
//! (table, last key, rows done) is the node's log-store record
//! [`SNAPSHOT_META`], written in the same flushed batch as the chunk's ops.
//! After a crash the next start goes on after the last chunk made durable;
//! a finished snapshot is recorded and never runs again.
//!
//! The capture triggers are installed before the first chunk is read, and
//! each chunk is read in one `REPEATABLE READ` transaction started `WITH
//! CONSISTENT SNAPSHOT` together with the change-id watermark `P` of
//! `_syncmesh_seq` (see [`MysqlAdapter::snapshot_chunk`]). Because change
//! ids are handed out in commit order, the chunk shows exactly the changes
//! with ids `≤ P`. Before the chunk's rows go to the core, every captured
//! change `≤ P` is: so the chunk's inserts (which supersede what the node
//! had of their keys) come after the changes they include and before every
//! change they do not. Concurrent writes are neither lost nor counted twice
//! (a `sum` total is the chunk's value plus the deltas after `P`).
//! Writers are not blocked, unlike the PostgreSQL snapshot.
//!
//! # Apply and the race with local writes
//!
//! [`MysqlAdapter::apply`] writes a batch in one transaction on a
//! dedicated connection whose session has `@syncmesh_applying = 1` (so
//! the triggers skip its writes: no echo) with multi-row
//! `INSERT … ON DUPLICATE KEY UPDATE` and `DELETE`. Last, it reads
//! `_syncmesh_seq` with `FOR UPDATE` and commits; that value is the
//! watermark it returns. A local change with an id at or below it
//! committed before the apply (row locks order the two on a shared row),
//! so the core writes it back once captured; one above it came after.
//! `ON DUPLICATE KEY UPDATE` also fires on a conflict with any other
//! UNIQUE index of the table: synced tables should have no UNIQUE index
//! besides the key that other replicas may violate.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{
    MySqlArguments, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions,
};
use sqlx::{AssertSqlSafe, MySql, Row};
use syncmesh_resolver::Value;

use crate::adapter::{
    CapturedChange, ChangeKind, ColumnInfo, RowWrite, TableSchema, civil_from_days,
    days_from_civil, now_ms,
};
use crate::{Error, Result};

/// The node's log-store record holding the snapshot cursor (see the
/// module docs).
pub const SNAPSHOT_META: &str = "mysql.snapshot";

/// Where the initial snapshot is (the [`SNAPSHOT_META`] record).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotCursor {
    /// Table `table` is next, after key `after` (from its start when
    /// `None`); `done` rows were published so far.
    Running {
        /// The table being read.
        table: String,
        /// The key of the last row published.
        after: Option<Vec<Value>>,
        /// Rows published so far (all tables).
        done: u64,
    },
    /// Every table was published.
    Done,
}

/// Name of the change table the capture triggers write to.
pub const CHANGES_TABLE: &str = "_syncmesh_changes";
/// Name of the one-row table handing out change ids in commit order.
pub const SEQ_TABLE: &str = "_syncmesh_seq";
/// Prefix reserved for syncmesh's own tables and triggers.
pub const RESERVED_PREFIX: &str = "_syncmesh_";
/// Most rows per multi-row upsert statement.
const ROWS_PER_STATEMENT: usize = 500;
/// MySQL's limit of bound parameters per statement.
const MAX_PARAMS: usize = 65_535;
/// MySQL's limit on identifier length.
const MAX_IDENT: usize = 64;

/// How a column's values are captured, read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MyKind {
    /// Integer types and `year`.
    Int,
    /// `decimal` / `numeric`.
    Decimal,
    /// `float` (single precision).
    Float,
    /// `double`.
    Double,
    /// Character types, `enum`, `set`.
    Text,
    /// Binary string types.
    Bytes,
    /// `date` and `time` (text).
    DateText,
    /// `datetime`.
    Datetime,
    /// `timestamp`.
    Timestamp,
    /// `json`.
    Json,
    /// `bit(1)`.
    Bit1,
}

/// The kind of a column from `information_schema.COLUMNS` (`DATA_TYPE`,
/// `COLUMN_TYPE`, and whether a `JSON_VALID` check marks it as JSON), or
/// `None` when not supported yet.
pub fn kind_of(data_type: &str, column_type: &str) -> Option<MyKind> {
    let dt = data_type.to_ascii_lowercase();
    Some(match dt.as_str() {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" => MyKind::Int,
        "decimal" | "numeric" => MyKind::Decimal,
        "float" => MyKind::Float,
        "double" | "real" => MyKind::Double,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set" => {
            MyKind::Text
        }
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => MyKind::Bytes,
        "date" | "time" => MyKind::DateText,
        "datetime" => MyKind::Datetime,
        "timestamp" => MyKind::Timestamp,
        "json" => MyKind::Json,
        "bit" if column_type.eq_ignore_ascii_case("bit(1)") => MyKind::Bit1,
        _ => return None,
    })
}

/// A MySQL / MariaDB database with syncmesh's capture and apply machinery.
#[derive(Debug, Clone)]
pub struct MysqlAdapter {
    pool: MySqlPool,
    /// One connection whose session has `@syncmesh_applying = 1`.
    apply_pool: MySqlPool,
    /// The URL with the password redacted, for messages.
    url: String,
    mariadb: bool,
}

impl MysqlAdapter {
    /// Connects to a `mysql://` (or `mariadb://`) URL. Sessions use
    /// `time_zone = '+00:00'` and `utf8mb4`.
    pub async fn open(url: &str) -> Result<Self> {
        let shown = crate::config::Secret::new(url).redacted();
        let err = |message: String| Error::Database {
            database: shown.clone(),
            message,
        };
        let normalized = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_owned(),
        };
        let options = MySqlConnectOptions::from_str(&normalized).map_err(|e| {
            err(format!(
                "invalid URL: {}; use mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                crate::adapter::redact_password(&e.to_string(), url)
            ))
        })?;
        let options = options.timezone(Some("+00:00".to_owned()));
        if options.get_database().is_none_or(str::is_empty) {
            return Err(err(
                "the URL names no database; use mysql://USER:PASSWORD@HOST:PORT/DATABASE".into(),
            ));
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(|e| err(connect_failure(&e, url)))?;
        let apply_pool = MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql("SET @syncmesh_applying = 1")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| err(connect_failure(&e, url)))?;
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&pool)
            .await
            .map_err(|e| err(format!("reading the server version: {e}")))?;
        Ok(Self {
            pool,
            apply_pool,
            url: shown,
            mariadb: version.to_ascii_lowercase().contains("mariadb"),
        })
    }

    /// The underlying pool (tests and `check` use it like a user would).
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.apply_pool.close().await;
        self.pool.close().await;
    }

    fn db_err(&self, what: &str, e: &sqlx::Error) -> Error {
        Error::Database {
            database: self.url.clone(),
            message: format!("{what}: {e}{}", hint_for(e)),
        }
    }

    /// The privileges of the connected user as `SHOW GRANTS` prints them.
    pub async fn grants(&self) -> Result<Vec<String>> {
        let rows = sqlx::raw_sql("SHOW GRANTS")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err("reading the user's privileges", &e))?;
        rows.iter()
            .map(|r| {
                r.try_get::<String, _>(0)
                    .map_err(|e| self.db_err("reading the user's privileges", &e))
            })
            .collect()
    }

    /// Introspects the configured tables: `(name, configured key columns)`,
    /// an empty key meaning "use the declared primary key". Fails with
    /// [`Error::Schema`] naming the table (and column) when a table is
    /// missing, is a view, has no primary key, or has a column of a type
    /// syncmesh does not support yet.
    pub async fn introspect(&self, tables: &[(String, Vec<String>)]) -> Result<Vec<TableSchema>> {
        let mut out = Vec::with_capacity(tables.len());
        for (name, key) in tables {
            out.push(self.introspect_one(name, key).await?);
        }
        Ok(out)
    }

    async fn introspect_one(&self, name: &str, configured: &[String]) -> Result<TableSchema> {
        check_name(name, name, "table")?;
        if name.to_ascii_lowercase().starts_with(RESERVED_PREFIX) {
            return Err(schema_err(
                name,
                "names starting with `_syncmesh_` are reserved; sync a user table",
            ));
        }
        let found: Option<String> = sqlx::query_scalar(
            "SELECT CAST(TABLE_TYPE AS CHAR) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the schema", &e))?;
        let Some(kind) = found else {
            let existing: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_TYPE = 'BASE TABLE' \
                 AND TABLE_NAME NOT LIKE '\\_syncmesh\\_%' ORDER BY TABLE_NAME",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err("listing tables", &e))?;
            let list = if existing.is_empty() {
                "the database has no tables".to_owned()
            } else {
                format!("existing tables: {}", existing.join(", "))
            };
            return Err(schema_err(
                name,
                &format!("does not exist ({list}); create it or fix `tables:` in the config"),
            ));
        };
        if kind != "BASE TABLE" {
            return Err(schema_err(
                name,
                &format!(
                    "is a {kind}, not a table; capture needs triggers, sync the underlying table instead"
                ),
            ));
        }
        let rows = sqlx::query(
            "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), \
             CAST(COLUMN_TYPE AS CHAR), CAST(IS_NULLABLE AS CHAR) \
             FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading table columns", &e))?;
        // MariaDB's JSON is LONGTEXT with a JSON_VALID check constraint.
        let json_cols: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(CONSTRAINT_NAME AS CHAR) FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = DATABASE() AND TABLE_NAME = ? \
             AND CHECK_CLAUSE LIKE 'json\\_valid(%'",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let mut columns = Vec::with_capacity(rows.len());
        for row in &rows {
            let read = |i: usize| -> Result<String> {
                row.try_get::<String, _>(i)
                    .map_err(|e| self.db_err("reading table columns", &e))
            };
            let col = read(0)?;
            let data_type = read(1)?;
            let column_type = read(2)?;
            let nullable = read(3)?;
            check_name(name, &col, "column")?;
            let is_json = json_cols.iter().any(|c| c == &col);
            let decl = if is_json && data_type.eq_ignore_ascii_case("longtext") {
                "json".to_owned()
            } else {
                column_type.clone()
            };
            let data_type = if is_json {
                "json".to_owned()
            } else {
                data_type
            };
            if kind_of(&data_type, &column_type).is_none() {
                return Err(schema_err(
                    name,
                    &format!(
                        "column `{col}` has type {column_type}, which syncmesh does not support yet; \
                         change its type or leave the table out of `tables:`"
                    ),
                ));
            }
            columns.push(ColumnInfo {
                name: col,
                decl_type: decl,
                not_null: nullable == "NO",
            });
        }
        if columns.is_empty() {
            return Err(schema_err(
                name,
                "has no columns; check the table definition",
            ));
        }
        let pk: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the primary key", &e))?;
        let key = if configured.is_empty() || same_set(configured, &pk) {
            if pk.is_empty() {
                return Err(schema_err(
                    name,
                    "has no primary key; add a PRIMARY KEY (apply needs it for INSERT … ON DUPLICATE KEY UPDATE)",
                ));
            }
            pk
        } else {
            for k in configured {
                if !columns.iter().any(|c| &c.name == k) {
                    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    return Err(schema_err(
                        name,
                        &format!(
                            "key column `{k}` does not exist (columns: {}); fix `key:` in the config",
                            names.join(", ")
                        ),
                    ));
                }
            }
            return Err(schema_err(
                name,
                &format!(
                    "configured key ({}) is not the primary key ({}); on MySQL/MariaDB the key must be the PRIMARY KEY, fix `key:` in the config",
                    configured.join(", "),
                    if pk.is_empty() {
                        "none".to_owned()
                    } else {
                        pk.join(", ")
                    }
                ),
            ));
        };
        Ok(TableSchema {
            name: name.to_owned(),
            columns,
            key,
        })
    }

    /// Idempotently installs the capture machinery (see the module docs).
    /// A deadlock or lock wait timeout with concurrent writers (a node
    /// restarting under load) is retried a few times.
    pub async fn install_capture(&self, schemas: &[TableSchema]) -> Result<()> {
        for s in schemas {
            check_schema(s)?;
        }
        let mut attempt = 0u32;
        loop {
            match self.install_once(schemas).await {
                Err(Error::Database { message, .. })
                    if attempt < 10
                        && (message.contains("1213 (40001)")
                            || message.contains("1205 (HY000)")) =>
                {
                    attempt += 1;
                    tracing::warn!(database = %self.url, attempt, "installing capture: {message}; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }

    async fn install_once(&self, schemas: &[TableSchema]) -> Result<()> {
        let err = |e: sqlx::Error| self.db_err("installing capture", &e);
        let mut conn = self.pool.acquire().await.map_err(err)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS `_syncmesh_changes` (\
               id BIGINT NOT NULL PRIMARY KEY, \
               tbl VARCHAR(64) NOT NULL, \
               op VARCHAR(6) NOT NULL, \
               old_row LONGTEXT, \
               new_row LONGTEXT) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        )
        .execute(&mut *conn)
        .await
        .map_err(err)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS `_syncmesh_seq` (\
               id TINYINT NOT NULL PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB",
        )
        .execute(&mut *conn)
        .await
        .map_err(err)?;
        // A plain read first: `INSERT … SELECT` locks what it reads and
        // would deadlock with capturing writers when the row exists.
        let have: Option<i64> = sqlx::query_scalar("SELECT v FROM `_syncmesh_seq` WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(err)?;
        if have.is_none() {
            // After a reinstall the sequence must not restart below ids
            // that are still in the change table.
            sqlx::query(
                "INSERT IGNORE INTO `_syncmesh_seq` (id, v) \
                 SELECT 1, COALESCE(MAX(id), 0) FROM `_syncmesh_changes`",
            )
            .execute(&mut *conn)
            .await
            .map_err(err)?;
        }
        let existing = installed_triggers(&mut conn).await.map_err(err)?;
        let triggers: Vec<(String, String)> = schemas.iter().flat_map(trigger_sql).collect();
        // Triggers already as wanted stay: a restart changes nothing, so
        // no write goes uncaptured between a DROP and a CREATE (MySQL) and
        // no application statement has to re-prepare. (Checked on MariaDB,
        // which returns the body as written; a server that normalises it
        // makes every trigger look stale, and they are replaced as before.)
        let stale: Vec<&(String, String)> = triggers
            .iter()
            .filter(|(name, sql)| existing.get(name) != Some(sql))
            .collect();
        if !stale.is_empty() {
            if self.mariadb {
                // Every stale trigger is replaced, then once more. MariaDB (10.11
                // here; MDEV-26048) can leave a session that was open before
                // `_syncmesh_seq` existed with a cached statement of the table
                // that, re-prepared against the new triggers, fails with 1146
                // "_syncmesh_seq doesn't exist" on every run until the table's
                // triggers change again. The second pass makes such sessions
                // re-prepare with the tables in place: at most a statement
                // running during the install fails (test
                // `installing_capture_leaves_live_prepared_statements_working`).
                for _ in 0..2 {
                    for (_, sql) in &stale {
                        let sql = sql.replacen("CREATE TRIGGER", "CREATE OR REPLACE TRIGGER", 1);
                        sqlx::raw_sql(AssertSqlSafe(sql))
                            .execute(&mut *conn)
                            .await
                            .map_err(err)?;
                    }
                }
            } else {
                // MySQL has no CREATE OR REPLACE TRIGGER: a write between the
                // two statements is not captured (only when a trigger's
                // definition changed, i.e. the table's columns did).
                for (name, sql) in &stale {
                    sqlx::raw_sql(AssertSqlSafe(format!(
                        "DROP TRIGGER IF EXISTS {}",
                        quote_ident(name)
                    )))
                    .execute(&mut *conn)
                    .await
                    .map_err(err)?;
                    sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                        .execute(&mut *conn)
                        .await
                        .map_err(err)?;
                }
            }
        }
        let wanted: Vec<&String> = triggers.iter().map(|(name, _)| name).collect();
        for name in existing.keys().filter(|n| !wanted.contains(n)) {
            sqlx::raw_sql(AssertSqlSafe(format!(
                "DROP TRIGGER IF EXISTS {}",
                quote_ident(name)
            )))
            .execute(&mut *conn)
            .await
            .map_err(err)?;
        }
        Ok(())
    }

    /// Whether the server is MariaDB (else MySQL).
    pub fn is_mariadb(&self) -> bool {
        self.mariadb
    }

    /// Each table's capture triggers against the ones
    /// [`MysqlAdapter::install_capture`] would install.
    pub async fn trigger_states(
        &self,
        schemas: &[TableSchema],
    ) -> Result<Vec<(String, TriggerState)>> {
        let err = |e: sqlx::Error| self.db_err("reading the capture triggers", &e);
        let mut conn = self.pool.acquire().await.map_err(err)?;
        let existing = installed_triggers(&mut conn).await.map_err(err)?;
        Ok(schemas
            .iter()
            .map(|s| {
                let wanted = trigger_sql(s);
                let state = if wanted.iter().all(|(n, sql)| existing.get(n) == Some(sql)) {
                    TriggerState::Current
                } else if wanted.iter().all(|(n, _)| !existing.contains_key(n)) {
                    TriggerState::Missing
                } else {
                    TriggerState::Stale
                };
                (s.name.clone(), state)
            })
            .collect())
    }

    /// The highest change id handed out and committed (0 if none or
    /// without capture): every change captured from now on gets a higher
    /// id.
    pub async fn change_watermark(&self) -> Result<i64> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.db_err("reading the change-table watermark", &e))?;
        watermark_in(&mut conn, false)
            .await
            .map_err(|e| self.db_err("reading the change-table watermark", &e))
    }

    /// Reads up to `limit` change rows with `id > after_id`, in id order.
    pub async fn read_changes(&self, after_id: i64, limit: usize) -> Result<Vec<CapturedChange>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT id, CAST(tbl AS CHAR), CAST(op AS CHAR), old_row, new_row \
             FROM `_syncmesh_changes` WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading captured changes", &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.decode_change(row)?);
        }
        Ok(out)
    }

    fn decode_change(&self, row: &sqlx::mysql::MySqlRow) -> Result<CapturedChange> {
        let bad = |id: Option<i64>, msg: String| Error::Database {
            database: self.url.clone(),
            message: format!(
                "{CHANGES_TABLE} row {}: {msg}; the change table was modified by hand, delete the row or reinstall capture",
                id.map_or_else(|| "?".to_owned(), |i| i.to_string())
            ),
        };
        let id: i64 = row.try_get(0).map_err(|e| bad(None, e.to_string()))?;
        let table: String = row.try_get(1).map_err(|e| bad(Some(id), e.to_string()))?;
        let op: String = row.try_get(2).map_err(|e| bad(Some(id), e.to_string()))?;
        let old: Option<String> = row.try_get(3).map_err(|e| bad(Some(id), e.to_string()))?;
        let new: Option<String> = row.try_get(4).map_err(|e| bad(Some(id), e.to_string()))?;
        let kind = match op.as_str() {
            "INSERT" => ChangeKind::Insert,
            "UPDATE" => ChangeKind::Update,
            "DELETE" => ChangeKind::Delete,
            other => return Err(bad(Some(id), format!("unknown op {other:?}"))),
        };
        let old = old
            .map(|s| decode_row_json(&s))
            .transpose()
            .map_err(|m| bad(Some(id), format!("old_row: {m}")))?;
        let new = new
            .map(|s| decode_row_json(&s))
            .transpose()
            .map_err(|m| bad(Some(id), format!("new_row: {m}")))?;
        let consistent = match kind {
            ChangeKind::Insert => new.is_some(),
            ChangeKind::Update => old.is_some() && new.is_some(),
            ChangeKind::Delete => old.is_some(),
        };
        if !consistent {
            return Err(bad(Some(id), format!("{op} without the rows it needs")));
        }
        Ok(CapturedChange {
            change_id: id,
            table,
            kind,
            old,
            new,
        })
    }

    /// Deletes change rows with `id <= through_id` (call only after the ops
    /// made from them are durable).
    pub async fn delete_changes_through(&self, through_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM `_syncmesh_changes` WHERE id <= ?")
            .bind(through_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.db_err("deleting consumed changes", &e))?;
        Ok(())
    }

    /// Writes the visible rows in one transaction, without capturing them,
    /// and returns the change-table watermark at its commit (see the
    /// module docs). Every value is converted before the transaction
    /// starts: an unknown table or column, a key of the wrong length or a
    /// value the column cannot hold is an error and nothing is written.
    pub async fn apply(&self, schemas: &[TableSchema], writes: &[RowWrite]) -> Result<i64> {
        if writes.is_empty() {
            return self.change_watermark().await;
        }
        let mut planned: Vec<(String, Vec<Param>)> = Vec::new();
        let mut chunk: UpsertChunk = None;
        for w in writes {
            let Some(schema) = schemas.iter().find(|s| s.name == w.table) else {
                return Err(schema_err(
                    &w.table,
                    "is not a synced table of this database; add it to `tables:` or check the sender",
                ));
            };
            check_schema(schema)?;
            crate::adapter::check_key_arity(w, schema)?;
            match &w.row {
                None => {
                    flush_upserts(&mut chunk, &mut planned);
                    let mut params = Vec::with_capacity(w.key.len());
                    for (k, v) in schema.key.iter().zip(&w.key) {
                        params.push(encode_for(schema, k, v)?);
                    }
                    planned.push((delete_sql(schema), params));
                }
                Some(row) => {
                    if let Some(unknown) = row
                        .keys()
                        .find(|c| !schema.columns.iter().any(|col| &col.name == *c))
                    {
                        return Err(schema_err(
                            &w.table,
                            &format!(
                                "write names column `{unknown}`, which the table does not have; add the column or check the sender"
                            ),
                        ));
                    }
                    let per = rows_per_statement(schema);
                    let restart = chunk
                        .as_ref()
                        .is_some_and(|(s, rows, _)| s.name != schema.name || *rows >= per);
                    if restart {
                        flush_upserts(&mut chunk, &mut planned);
                    }
                    let (_, rows, params) = chunk.get_or_insert_with(|| (schema, 0, Vec::new()));
                    *rows += 1;
                    for col in &schema.columns {
                        let v = match schema.key.iter().position(|k| k == &col.name) {
                            Some(i) => w.key.get(i).unwrap_or(&Value::Null),
                            None => row.get(&col.name).unwrap_or(&Value::Null),
                        };
                        params.push(encode_for(schema, &col.name, v)?);
                    }
                }
            }
        }
        flush_upserts(&mut chunk, &mut planned);

        let mut conn = self
            .apply_pool
            .acquire()
            .await
            .map_err(|e| self.db_err("starting the apply transaction", &e))?;
        sqlx::raw_sql("START TRANSACTION")
            .execute(&mut *conn)
            .await
            .map_err(|e| self.db_err("starting the apply transaction", &e))?;
        match apply_in(&mut conn, &planned).await {
            Ok(watermark) => {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.db_err("committing applied rows", &e))?;
                Ok(watermark)
            }
            Err(e) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                Err(self.db_err("applying rows (rolled back)", &e))
            }
        }
    }

    /// Rows of a table now (for progress).
    pub async fn count_rows(&self, schema: &TableSchema) -> Result<u64> {
        check_schema(schema)?;
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            quote_ident(&schema.name)
        )))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.db_err(&format!("counting the rows of {}", schema.name), &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One chunk of the initial snapshot: up to `limit` rows of `schema`
    /// with a key above `after` (from the start when `None`), in key
    /// order, read in one consistent snapshot together with the change-id
    /// watermark `P` (returned first): the rows show exactly the changes
    /// with ids `≤ P` (ids are handed out in commit order, see the module
    /// docs). Writers are not blocked.
    pub async fn snapshot_chunk(
        &self,
        schema: &TableSchema,
        after: Option<&[Value]>,
        limit: usize,
    ) -> Result<(i64, Vec<BTreeMap<String, Value>>)> {
        check_schema(schema)?;
        let what = format!("snapshot of table {}", schema.name);
        let mut params = Vec::new();
        let mut cond = String::new();
        if let Some(after) = after {
            if after.len() != schema.key.len() {
                return Err(schema_err(
                    &schema.name,
                    "the snapshot cursor does not match the table's key (the key changed during the snapshot); delete the node's data_dir to snapshot again",
                ));
            }
            // (k1 > a1) OR (k1 = a1 AND k2 > a2) OR …, the same order as
            // ORDER BY k1, k2, ….
            let mut ors = Vec::new();
            for i in 0..schema.key.len() {
                let mut ands = Vec::new();
                for (j, k) in schema.key.iter().enumerate().take(i + 1) {
                    let p = encode_for(schema, k, &after[j])?;
                    let ph = placeholder(schema, k, &p);
                    let op = if j == i { ">" } else { "=" };
                    ands.push(format!("{} {op} {ph}", quote_ident(k)));
                    params.push(p);
                }
                ors.push(format!("({})", ands.join(" AND ")));
            }
            cond = format!(" WHERE {}", ors.join(" OR "));
        }
        let order: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
        let sql = format!(
            "SELECT {} FROM {}{cond} ORDER BY {} LIMIT {}",
            encode_row("", &schema.columns),
            quote_ident(&schema.name),
            order.join(", "),
            limit.max(1)
        );
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.db_err(&what, &e))?;
        let res: sqlx::Result<(i64, Vec<String>)> = async {
            sqlx::raw_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *conn)
                .await?;
            sqlx::raw_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                .execute(&mut *conn)
                .await?;
            let p = watermark_in(&mut conn, false).await?;
            let mut q = sqlx::query::<MySql>(AssertSqlSafe(sql.as_str()));
            for param in &params {
                q = bind_param(q, param);
            }
            let rows = q.fetch_all(&mut *conn).await?;
            let texts = rows
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<sqlx::Result<Vec<_>>>()?;
            sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
            Ok((p, texts))
        }
        .await;
        let (p, texts) = match res {
            Ok(r) => r,
            Err(e) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                return Err(self.db_err(&what, &e));
            }
        };
        let mut out = Vec::with_capacity(texts.len());
        for text in &texts {
            out.push(decode_row_json(text).map_err(|m| Error::Database {
                database: self.url.clone(),
                message: format!("table {}: {m}", schema.name),
            })?);
        }
        Ok((p, out))
    }

    /// All rows of a table ordered by its key, read through the capture
    /// encoding (see the module docs).
    pub async fn dump_table(&self, schema: &TableSchema) -> Result<Vec<BTreeMap<String, Value>>> {
        check_schema(schema)?;
        let order: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            encode_row("", &schema.columns),
            quote_ident(&schema.name),
            order.join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err(&format!("reading table {}", schema.name), &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let text: String = row
                .try_get(0)
                .map_err(|e| self.db_err(&format!("reading table {}", schema.name), &e))?;
            out.push(decode_row_json(&text).map_err(|m| Error::Database {
                database: self.url.clone(),
                message: format!("table {}: {m}", schema.name),
            })?);
        }
        Ok(out)
    }
}

/// A `?` for a key comparison: an unsigned above `i64::MAX` travels as
/// text and is compared as an integer (a text compared with an integer
/// column would be compared as a double).
fn placeholder(schema: &TableSchema, column: &str, p: &Param) -> &'static str {
    let int = schema
        .columns
        .iter()
        .find(|c| c.name == column)
        .and_then(|c| kind_of_decl(&c.decl_type))
        == Some(MyKind::Int);
    if int && matches!(p, Param::Text(_)) {
        "CAST(? AS UNSIGNED)"
    } else {
        "?"
    }
}

/// Captures every change with an id `≤ through` (the shell's capture
/// step, bounded by the position of a snapshot chunk).
async fn capture_through<S: crate::store::LogStore>(
    db: &MysqlAdapter,
    core: &mut crate::core::NodeCore<S>,
    through: i64,
    batch: usize,
) -> Result<()> {
    loop {
        let changes: Vec<CapturedChange> = db
            .read_changes(core.capture_checkpoint(), batch.max(1))
            .await?
            .into_iter()
            .take_while(|c| c.change_id <= through)
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let now = syncmesh_resolver::Ntp64::from_unix_millis(now_ms());
        let cp = core.handle_captured(now, &changes)?;
        // The ops are flushed: only now may the change rows go.
        db.delete_changes_through(cp).await?;
    }
}

fn decode_cursor(bytes: &[u8]) -> Result<SnapshotCursor> {
    postcard::from_bytes(bytes).map_err(|e| Error::Store {
        path: SNAPSHOT_META.into(),
        message: format!(
            "corrupt snapshot cursor in the log store: {e}; delete the node's data_dir to snapshot again"
        ),
    })
}

fn encode_cursor(c: &SnapshotCursor) -> Result<Vec<u8>> {
    postcard::to_allocvec(c).map_err(|e| Error::Store {
        path: SNAPSHOT_META.into(),
        message: format!("cannot encode the snapshot cursor: {e}"),
    })
}

/// The snapshot cursor a node has (`None`: it never started one).
pub fn snapshot_cursor<S: crate::store::LogStore>(
    core: &crate::core::NodeCore<S>,
) -> Result<Option<SnapshotCursor>> {
    core.meta(SNAPSHOT_META)?
        .map(|b| decode_cursor(&b))
        .transpose()
}

/// The initial snapshot of `schemas` (see the module docs) while it is
/// being published: begun on a node's first start (no snapshot record and
/// capture checkpoint 0) or after a crash during one, which resumes after
/// the last durable chunk; a node whose snapshot is done, or that captured
/// before snapshots existed, has none. Progress (rows, rate, ETA) is shown
/// per chunk: a bar on a terminal, log lines otherwise. The node's shell
/// drives it, one chunk per loop turn, so the chunks already logged go to
/// the hub meanwhile.
pub struct InitialSnapshot {
    /// Index in `schemas` of the table being read.
    table: usize,
    /// The key of the last row published of that table.
    after: Option<Vec<Value>>,
    /// Rows published so far (earlier attempts' too).
    done: u64,
    /// Rows of the tables when it began (plus earlier attempts').
    total: u64,
    /// Rows earlier attempts published.
    already: u64,
    started: std::time::Instant,
    bar: syncmesh_ops::progress::Progress,
}

impl InitialSnapshot {
    /// Starts the snapshot, or resumes the one the core's stored cursor
    /// names; `None` when there is none to publish. The cursor is stored
    /// before it returns: a crash from here on resumes.
    pub async fn begin<S: crate::store::LogStore>(
        db: &MysqlAdapter,
        core: &mut crate::core::NodeCore<S>,
        schemas: &[TableSchema],
        who: &str,
    ) -> Result<Option<Self>> {
        let (table, after, done) = match snapshot_cursor(core)? {
            Some(SnapshotCursor::Done) => return Ok(None),
            None if core.capture_checkpoint() != 0 => return Ok(None),
            None => (0, None, 0),
            Some(SnapshotCursor::Running { table, after, done }) => {
                match schemas.iter().position(|s| s.name == table) {
                    Some(i) => {
                        tracing::info!(database = %db.url, table = %table, rows = done, "initial snapshot: resuming after {done} rows");
                        (i, after, done)
                    }
                    None => {
                        tracing::warn!(database = %db.url, table = %table, "initial snapshot: the table it stopped at is no longer synced; starting the snapshot over");
                        (0, None, 0)
                    }
                }
            }
        };
        let mut snap = InitialSnapshot {
            table,
            after,
            done,
            total: done,
            already: done,
            started: std::time::Instant::now(),
            bar: syncmesh_ops::progress::Progress::new(who, "initial snapshot"),
        };
        core.handle_meta(&[(SNAPSHOT_META.to_owned(), Some(snap.cursor(schemas)?))])?;
        for s in &schemas[table.min(schemas.len())..] {
            snap.total += db.count_rows(s).await?;
        }
        tracing::info!(database = %db.url, rows = snap.total.saturating_sub(done), "initial snapshot: publishing the existing rows (writers are not blocked)");
        snap.bar.observe(now_ms(), done, snap.total);
        Ok(Some(snap))
    }

    /// The stored form of where it is.
    fn cursor(&self, schemas: &[TableSchema]) -> Result<Vec<u8>> {
        encode_cursor(&match schemas.get(self.table) {
            Some(s) => SnapshotCursor::Running {
                table: s.name.clone(),
                after: self.after.clone(),
                done: self.done,
            },
            None => SnapshotCursor::Done,
        })
    }

    /// Publishes the next chunk of at most `batch` rows, after every
    /// captured change the chunk includes (flushed with the cursor before
    /// it returns); true once every table is published: then call
    /// [`InitialSnapshot::finish`].
    pub async fn step<S: crate::store::LogStore>(
        &mut self,
        db: &MysqlAdapter,
        core: &mut crate::core::NodeCore<S>,
        schemas: &[TableSchema],
        batch: usize,
    ) -> Result<bool> {
        let batch = batch.max(1);
        let Some(schema) = schemas.get(self.table) else {
            return Ok(true);
        };
        let (p, rows) = db
            .snapshot_chunk(schema, self.after.as_deref(), batch)
            .await?;
        // Every change the chunk includes goes first (see the module docs).
        capture_through(db, core, p, batch).await?;
        let n = rows.len() as u64;
        let last_key = rows.last().and_then(|r| schema.key_of(r));
        let changes: Vec<CapturedChange> = rows
            .into_iter()
            .map(|r| CapturedChange {
                change_id: p,
                table: schema.name.clone(),
                kind: ChangeKind::Insert,
                old: None,
                new: Some(r),
            })
            .collect();
        self.done += n;
        if (n as usize) < batch {
            self.table += 1;
            self.after = None;
        } else {
            self.after = last_key;
        }
        let next = self.cursor(schemas)?;
        let now = syncmesh_resolver::Ntp64::from_unix_millis(now_ms());
        core.handle_snapshot_with_meta(now, &changes, &[(SNAPSHOT_META.to_owned(), Some(next))])?;
        self.total = self.total.max(self.done);
        self.bar.observe(now_ms(), self.done, self.total);
        Ok(self.table >= schemas.len())
    }

    /// Ends the progress display and logs the snapshot's end (the cursor
    /// already says done); capture goes on from the change table.
    pub fn finish(mut self, db: &MysqlAdapter) {
        self.bar.observe(now_ms(), self.total, self.total);
        tracing::info!(database = %db.url, rows = self.done - self.already, secs = self.started.elapsed().as_secs_f64(), "initial snapshot done; capturing from the change table");
    }
}

/// Consecutive upserts of one table waiting to go out as one statement:
/// the schema, the number of rows, and their parameters.
type UpsertChunk<'a> = Option<(&'a TableSchema, usize, Vec<Param>)>;

fn flush_upserts(chunk: &mut UpsertChunk<'_>, planned: &mut Vec<(String, Vec<Param>)>) {
    if let Some((schema, rows, params)) = chunk.take() {
        planned.push((upsert_sql(schema, rows), params));
    }
}

/// The body of [`MysqlAdapter::apply`] inside its transaction.
async fn apply_in(
    conn: &mut MySqlConnection,
    planned: &[(String, Vec<Param>)],
) -> sqlx::Result<i64> {
    for (sql, params) in planned {
        let mut q = sqlx::query::<MySql>(AssertSqlSafe(sql.as_str()));
        for p in params {
            q = bind_param(q, p);
        }
        q.execute(&mut *conn).await?;
    }
    watermark_in(conn, true).await
}

/// `v` of `_syncmesh_seq` (0 when the table does not exist: no capture
/// installed). `lock`: read it `FOR UPDATE`, waiting for any transaction
/// that holds change ids and has not committed yet.
async fn watermark_in(conn: &mut MySqlConnection, lock: bool) -> sqlx::Result<i64> {
    let sql = if lock {
        "SELECT v FROM `_syncmesh_seq` WHERE id = 1 FOR UPDATE"
    } else {
        "SELECT v FROM `_syncmesh_seq` WHERE id = 1"
    };
    match sqlx::query_scalar::<_, i64>(sql)
        .fetch_optional(&mut *conn)
        .await
    {
        Ok(v) => Ok(v.unwrap_or(0)),
        Err(e) if error_number(&e) == Some(1146) => Ok(0),
        Err(e) => Err(e),
    }
}

/// The server's error number (e.g. 1146 table doesn't exist).
fn error_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .map(|d| d.number())
}

/// A value ready to bind.
#[derive(Clone, Debug, PartialEq)]
enum Param {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

type MyQuery<'q> = sqlx::query::Query<'q, MySql, MySqlArguments>;

fn bind_param<'q>(q: MyQuery<'q>, p: &Param) -> MyQuery<'q> {
    match p {
        Param::Null => q.bind(None::<String>),
        Param::Int(i) => q.bind(*i),
        Param::Float(f) => q.bind(*f),
        Param::Text(s) => q.bind(s.clone()),
        Param::Bytes(b) => q.bind(b.clone()),
    }
}

fn encode_for(schema: &TableSchema, column: &str, v: &Value) -> Result<Param> {
    let decl = schema
        .columns
        .iter()
        .find(|c| c.name == column)
        .map_or("", |c| c.decl_type.as_str());
    let kind = kind_of_decl(decl).ok_or_else(|| {
        schema_err(
            &schema.name,
            &format!("column `{column}` has type {decl}, which syncmesh does not support yet"),
        )
    })?;
    if kind == MyKind::Int {
        crate::typemap::check_int_column(column, decl, v)
            .map_err(|m| schema_err(&schema.name, &m))?;
    }
    encode_value(kind, v).map_err(|m| {
        schema_err(
            &schema.name,
            &format!("column `{column}` ({decl}) cannot hold {}: {m}", short(v)),
        )
    })
}

/// A value for an error message (long texts cut).
fn short(v: &Value) -> String {
    let s = format!("{v:?}");
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// The kind from a [`ColumnInfo::decl_type`] (`COLUMN_TYPE`, or `json`).
pub fn kind_of_decl(decl: &str) -> Option<MyKind> {
    let lower = decl.to_ascii_lowercase();
    let base: String = lower
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    kind_of(&base, &lower.replace(' ', ""))
}

/// Converts a mesh value into what the column takes (see the module docs).
fn encode_value(kind: MyKind, v: &Value) -> std::result::Result<Param, String> {
    Ok(match (kind, v) {
        (_, Value::Null) => Param::Null,
        (MyKind::Bytes, Value::Bytes(b)) => Param::Bytes(b.clone()),
        (MyKind::Bytes, Value::Text(s) | Value::Json(s) | Value::Decimal(s)) => {
            Param::Bytes(s.as_bytes().to_vec())
        }
        (_, Value::Bytes(b)) => match String::from_utf8(b.clone()) {
            Ok(s) => Param::Text(s),
            Err(_) => return Err("bytes that are not UTF-8 text".into()),
        },
        (_, Value::Bool(b)) => Param::Int(i64::from(*b)),
        (MyKind::Datetime | MyKind::Timestamp, Value::Timestamp(us) | Value::Int(us)) => {
            Param::Text(format_datetime(*us))
        }
        (MyKind::DateText, Value::Timestamp(us)) => {
            let mut t = format_datetime(*us);
            t.truncate(10);
            Param::Text(t)
        }
        (MyKind::Json, Value::Int(i)) => Param::Text(i.to_string()),
        (MyKind::Json, Value::Float(f)) => Param::Text(float_text(*f)?),
        (MyKind::Json, Value::Decimal(s)) => Param::Text(s.clone()),
        (MyKind::Json, Value::Text(s)) if serde_json::from_str::<serde_json::Value>(s).is_err() => {
            Param::Text(serde_json::Value::String(s.clone()).to_string())
        }
        (_, Value::Int(i) | Value::Timestamp(i)) => Param::Int(*i),
        (MyKind::Float | MyKind::Double | MyKind::Int | MyKind::Bit1, Value::Float(f)) => {
            if !f.is_finite() {
                return Err("MySQL has no NaN or infinity".into());
            }
            Param::Float(*f)
        }
        (_, Value::Float(f)) => Param::Text(float_text(*f)?),
        (_, Value::Decimal(s) | Value::Text(s) | Value::Json(s)) => Param::Text(s.clone()),
    })
}

fn float_text(f: f64) -> std::result::Result<String, String> {
    if f.is_finite() {
        Ok(format!("{f:?}"))
    } else {
        Err("MySQL has no NaN or infinity".into())
    }
}

/// Rows per multi-row upsert for this table.
fn rows_per_statement(schema: &TableSchema) -> usize {
    (MAX_PARAMS / schema.columns.len().max(1)).clamp(1, ROWS_PER_STATEMENT)
}

/// `INSERT … VALUES (…), … ON DUPLICATE KEY UPDATE c = VALUES(c), …`.
fn upsert_sql(schema: &TableSchema, rows: usize) -> String {
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let one = format!("({})", vec!["?"; cols.len()].join(", "));
    let values = vec![one; rows.max(1)].join(", ");
    let mut updates: Vec<String> = schema
        .columns
        .iter()
        .filter(|c| !schema.key.contains(&c.name))
        .map(|c| {
            let q = quote_ident(&c.name);
            format!("{q} = VALUES({q})")
        })
        .collect();
    if updates.is_empty() {
        let k = quote_ident(&schema.key[0]);
        updates.push(format!("{k} = {k}"));
    }
    format!(
        "INSERT INTO {} ({}) VALUES {values} ON DUPLICATE KEY UPDATE {}",
        quote_ident(&schema.name),
        cols.join(", "),
        updates.join(", ")
    )
}

fn delete_sql(schema: &TableSchema) -> String {
    let conds: Vec<String> = schema
        .key
        .iter()
        .map(|k| format!("{} <=> ?", quote_ident(k)))
        .collect();
    format!(
        "DELETE FROM {} WHERE {}",
        quote_ident(&schema.name),
        conds.join(" AND ")
    )
}

/// The capture expression of one column: `JSON_ARRAY(tag, text)`.
fn encode_column(alias: &str, column: &ColumnInfo) -> String {
    let c = if alias.is_empty() {
        quote_ident(&column.name)
    } else {
        format!("{alias}.{}", quote_ident(&column.name))
    };
    let (tag, text) = match kind_of_decl(&column.decl_type) {
        Some(MyKind::Int) => ("i", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Decimal) => ("n", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Float) => ("f", format!("CAST(CAST({c} AS DOUBLE) AS CHAR)")),
        Some(MyKind::Double) => ("f", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Bytes) => ("x", format!("HEX({c})")),
        Some(MyKind::DateText) => ("t", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Datetime) => ("d", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Timestamp) => ("s", format!("CAST(UNIX_TIMESTAMP({c}) AS CHAR)")),
        Some(MyKind::Json) => ("j", format!("CAST({c} AS CHAR)")),
        Some(MyKind::Bit1) => ("b", format!("CAST({c} + 0 AS CHAR)")),
        Some(MyKind::Text) | None => ("t", c),
    };
    format!("JSON_ARRAY('{tag}', {text})")
}

/// `JSON_OBJECT('col', JSON_ARRAY(tag, text), …)` of every column.
fn encode_row(alias: &str, columns: &[ColumnInfo]) -> String {
    let args: Vec<String> = columns
        .iter()
        .map(|c| format!("{}, {}", quote_literal(&c.name), encode_column(alias, c)))
        .collect();
    format!("JSON_OBJECT({})", args.join(", "))
}

/// syncmesh's triggers in the connection's database as they are, each as
/// the statement that would make it (comparable with [`trigger_sql`]).
async fn installed_triggers(conn: &mut MySqlConnection) -> sqlx::Result<BTreeMap<String, String>> {
    let rows: Vec<(String, String, String, String, String)> = sqlx::query_as(
        "SELECT CAST(TRIGGER_NAME AS CHAR), CAST(ACTION_TIMING AS CHAR), \
         CAST(EVENT_MANIPULATION AS CHAR), CAST(EVENT_OBJECT_TABLE AS CHAR), \
         CAST(ACTION_STATEMENT AS CHAR) FROM information_schema.TRIGGERS \
         WHERE TRIGGER_SCHEMA = DATABASE() AND TRIGGER_NAME LIKE '\\_syncmesh\\_%'",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, timing, event, table, body)| {
            let sql = format!(
                "CREATE TRIGGER {} {timing} {event} ON {} FOR EACH ROW {body}",
                quote_ident(&name),
                quote_ident(&table)
            );
            (name, sql)
        })
        .collect())
}

/// How a table's capture triggers stand against the ones this version
/// installs ([`MysqlAdapter::trigger_states`], for `syncmesh check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerState {
    /// All installed as wanted: a node start leaves them.
    Current,
    /// None installed: the node's next start installs them.
    Missing,
    /// Some missing or different (e.g. the table's columns changed): the
    /// node's next start replaces them.
    Stale,
}

/// The three triggers of a table: `(name, CREATE TRIGGER …)`.
fn trigger_sql(schema: &TableSchema) -> Vec<(String, String)> {
    let table = quote_ident(&schema.name);
    let tbl = quote_literal(&schema.name);
    let new_row = encode_row("NEW", &schema.columns);
    let old_row = encode_row("OLD", &schema.columns);
    let body = |op: &str, old: &str, new: &str| {
        format!(
            "BEGIN IF @syncmesh_applying IS NULL THEN \
             UPDATE `_syncmesh_seq` SET v = v + 1 WHERE id = 1; \
             INSERT INTO `_syncmesh_changes` (id, tbl, op, old_row, new_row) \
             SELECT v, {tbl}, '{op}', {old}, {new} FROM `_syncmesh_seq` WHERE id = 1; \
             END IF; END"
        )
    };
    let name = |suffix: &str| format!("{RESERVED_PREFIX}{suffix}_{}", schema.name);
    [
        ("ins", "INSERT", body("INSERT", "NULL", &new_row)),
        ("upd", "UPDATE", body("UPDATE", &old_row, &new_row)),
        ("del", "DELETE", body("DELETE", &old_row, "NULL")),
    ]
    .into_iter()
    .map(|(suffix, event, body)| {
        let n = name(suffix);
        let sql = format!(
            "CREATE TRIGGER {} AFTER {event} ON {table} FOR EACH ROW {body}",
            quote_ident(&n)
        );
        (n, sql)
    })
    .collect()
}

/// Decodes a captured (or dumped) row, see the module docs.
fn decode_row_json(text: &str) -> std::result::Result<BTreeMap<String, Value>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let serde_json::Value::Object(obj) = json else {
        return Err("not a JSON object".to_owned());
    };
    let mut row = BTreeMap::new();
    for (col, pair) in obj {
        let value = decode_pair(&pair).map_err(|m| format!("column {col}: {m}"))?;
        row.insert(col, value);
    }
    Ok(row)
}

fn decode_pair(pair: &serde_json::Value) -> std::result::Result<Value, String> {
    use serde_json::Value as J;
    let (tag, v) = match pair.as_array().map(Vec::as_slice) {
        Some([J::String(tag), v]) => (tag.as_str(), v),
        _ => return Err(format!("expected [tag, text], got {pair}")),
    };
    let s = match v {
        J::Null => return Ok(Value::Null),
        J::String(s) => s.as_str(),
        other => return Err(format!("expected text, got {other}")),
    };
    match tag {
        "i" => {
            if let Ok(i) = s.parse::<i64>() {
                Ok(Value::Int(i))
            } else if s.parse::<u64>().is_ok() {
                Ok(Value::Decimal(s.to_owned()))
            } else {
                Err(format!("unparsable integer {s:?}"))
            }
        }
        "n" => {
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                Ok(Value::Decimal(s.to_owned()))
            } else {
                Err(format!("unparsable decimal {s:?}"))
            }
        }
        "f" => s
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("unparsable float {s:?}")),
        "t" => Ok(Value::Text(s.to_owned())),
        "x" => decode_hex(s)
            .map(Value::Bytes)
            .ok_or_else(|| "invalid hex in binary value".to_owned()),
        "d" => Ok(parse_datetime(s).map_or_else(|| Value::Text(s.to_owned()), Value::Timestamp)),
        "s" => parse_epoch_seconds(s)
            .map(Value::Timestamp)
            .ok_or_else(|| format!("unparsable timestamp {s:?}")),
        "j" => Ok(Value::Json(s.to_owned())),
        "b" => match s {
            "0" => Ok(Value::Bool(false)),
            "1" => Ok(Value::Bool(true)),
            _ => Err(format!("unexpected bit value {s:?}")),
        },
        other => Err(format!("unknown tag {other:?}")),
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    bytes
        .chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

const US_PER_DAY: i64 = 86_400_000_000;

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff]` (as UTC) into µs since the epoch;
/// `None` for zero dates and anything else.
fn parse_datetime(text: &str) -> Option<i64> {
    let (date, time) = text.split_once(' ')?;
    let mut dp = date.splitn(3, '-');
    let year: i64 = dp.next()?.parse().ok()?;
    let month: i64 = dp.next()?.parse().ok()?;
    let day: i64 = dp.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let mut cp = time.splitn(3, ':');
    let h: i64 = cp.next()?.parse().ok()?;
    let mi: i64 = cp.next()?.parse().ok()?;
    let sec = cp.next()?;
    let (s, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let s: i64 = s.parse().ok()?;
    let frac_us = parse_fraction(frac)?;
    let days = days_from_civil(year, month, day);
    days.checked_mul(US_PER_DAY)?
        .checked_add((h * 3600 + mi * 60 + s).checked_mul(1_000_000)?)?
        .checked_add(frac_us)
}

/// Up to 6 digits of a second's fraction as µs.
fn parse_fraction(frac: &str) -> Option<i64> {
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.is_empty() {
        return Some(0);
    }
    format!("{frac:0<6}").parse().ok()
}

/// Parses `UNIX_TIMESTAMP()` output (`1704164645.500000`) into µs.
fn parse_epoch_seconds(text: &str) -> Option<i64> {
    let (s, frac) = text.split_once('.').unwrap_or((text, ""));
    let s: i64 = s.parse().ok()?;
    s.checked_mul(1_000_000)?.checked_add(parse_fraction(frac)?)
}

/// µs since the epoch as `YYYY-MM-DD HH:MM:SS.ffffff` (UTC).
fn format_datetime(us: i64) -> String {
    let days = us.div_euclid(US_PER_DAY);
    let rem = us.rem_euclid(US_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3_600_000_000,
        rem / 60_000_000 % 60,
        rem / 1_000_000 % 60,
        rem % 1_000_000
    )
}

/// `` `name` `` with embedded backticks doubled.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `'text'` with quotes and backslashes escaped (the server may not run
/// with `NO_BACKSLASH_ESCAPES`).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn schema_err(table: &str, message: &str) -> Error {
    Error::Schema {
        table: table.to_owned(),
        message: message.to_owned(),
    }
}

fn check_name(table: &str, name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        return Err(schema_err(
            table,
            &format!("has an empty {what} name, which syncmesh does not support"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(schema_err(
            table,
            &format!(
                "{what} name {name:?} contains control characters, which syncmesh does not support; rename it"
            ),
        ));
    }
    if what == "table" && name.len() + RESERVED_PREFIX.len() + 4 > MAX_IDENT {
        return Err(schema_err(
            table,
            &format!(
                "the name is too long for the capture triggers (`{RESERVED_PREFIX}ins_<table>` must fit in {MAX_IDENT} characters); shorten it"
            ),
        ));
    }
    Ok(())
}

fn check_schema(schema: &TableSchema) -> Result<()> {
    check_name(&schema.name, &schema.name, "table")?;
    for c in &schema.columns {
        check_name(&schema.name, &c.name, "column")?;
        if kind_of_decl(&c.decl_type).is_none() {
            return Err(schema_err(
                &schema.name,
                &format!(
                    "column `{}` has type {}, which syncmesh does not support yet",
                    c.name, c.decl_type
                ),
            ));
        }
    }
    if schema.key.is_empty() {
        return Err(schema_err(&schema.name, "has no key; add a PRIMARY KEY"));
    }
    for k in &schema.key {
        if !schema.columns.iter().any(|c| &c.name == k) {
            return Err(schema_err(
                &schema.name,
                &format!("key column `{k}` is not a column of the table; introspect it again"),
            ));
        }
    }
    Ok(())
}

fn same_set(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|x| b.iter().any(|y| x.eq_ignore_ascii_case(y)))
        && b.iter()
            .all(|y| a.iter().any(|x| x.eq_ignore_ascii_case(y)))
}

/// A one-line explanation of a failed connection.
fn connect_failure(e: &sqlx::Error, url: &str) -> String {
    let text = crate::adapter::redact_password(&e.to_string(), url).replace('\n', " ");
    match error_number(e) {
        Some(1045) => format!("cannot connect: {text}; check the user and password in the URL"),
        Some(1049) => format!("cannot connect: {text}; create the database or fix the URL"),
        Some(1044) => format!("cannot connect: {text}; grant the user access to the database"),
        _ if text.contains("refused") => format!(
            "cannot connect ({text}); is MySQL/MariaDB running and listening on that host and port?"
        ),
        _ => format!("cannot connect: {text}; check the URL and that the server is reachable"),
    }
}

/// What to do about common errors.
fn hint_for(e: &sqlx::Error) -> &'static str {
    match error_number(e) {
        Some(1142 | 1227 | 1419) => {
            "; the user needs SELECT, INSERT, UPDATE, DELETE, CREATE and TRIGGER on the database (with binary logging on, also SUPER or log_bin_trust_function_creators = 1)"
        }
        Some(1213 | 1205) => "; a lock conflict with another transaction (transient, try again)",
        Some(1146) => "; the capture tables are missing, install capture first (start the node)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kinds_from_declared_types() {
        assert_eq!(kind_of_decl("bigint(20) unsigned"), Some(MyKind::Int));
        assert_eq!(kind_of_decl("decimal(12,4)"), Some(MyKind::Decimal));
        assert_eq!(kind_of_decl("enum('a','b')"), Some(MyKind::Text));
        assert_eq!(kind_of_decl("bit(1)"), Some(MyKind::Bit1));
        assert_eq!(kind_of_decl("json"), Some(MyKind::Json));
        assert_eq!(kind_of_decl("bit(8)"), None);
        assert_eq!(kind_of_decl("point"), None);
    }

    #[test]
    fn captured_pairs_decode_exactly() {
        let row = decode_row_json(
            r#"{"a":["i","-9223372036854775808"],"b":["i","18446744073709551615"],
                "c":["n","-0.5000"],"d":["f","0.30000000000000004"],"e":["x","00ff"],
                "f":["d","2024-01-02 03:04:05.123456"],"g":["d","0000-00-00 00:00:00"],
                "h":["s","1704164645.500000"],"j":["j","{\"a\": 1}"],"k":["b","1"],"l":["t",null]}"#,
        )
        .unwrap();
        assert_eq!(row["a"], Value::Int(i64::MIN));
        assert_eq!(row["b"], Value::Decimal("18446744073709551615".into()));
        assert_eq!(row["c"], Value::Decimal("-0.5000".into()));
        assert_eq!(row["d"], Value::Float(0.30000000000000004));
        assert_eq!(row["e"], Value::Bytes(vec![0, 255]));
        assert_eq!(row["f"], Value::Timestamp(1_704_164_645_123_456));
        assert_eq!(row["g"], Value::Text("0000-00-00 00:00:00".into()));
        assert_eq!(row["h"], Value::Timestamp(1_704_164_645_500_000));
        assert_eq!(row["j"], Value::Json("{\"a\": 1}".into()));
        assert_eq!(row["k"], Value::Bool(true));
        assert_eq!(row["l"], Value::Null);
        for bad in [
            "",
            "[]",
            r#"{"a":1}"#,
            r#"{"a":["i",1]}"#,
            r#"{"a":["i","x"]}"#,
            r#"{"a":["x","0"]}"#,
            r#"{"a":["q","0"]}"#,
            r#"{"a":["b","2"]}"#,
            r#"{"a":["n","1e5"]}"#,
        ] {
            assert!(decode_row_json(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn datetimes_round_trip() {
        for us in [0, 1_704_164_645_123_456, -1, 253_402_300_799_999_999] {
            assert_eq!(parse_datetime(&format_datetime(us)), Some(us));
        }
    }

    #[test]
    fn values_encode_per_kind() {
        assert_eq!(
            encode_value(MyKind::Datetime, &Value::Timestamp(0)).unwrap(),
            Param::Text("1970-01-01 00:00:00.000000".into())
        );
        assert_eq!(
            encode_value(MyKind::Int, &Value::Decimal("18446744073709551615".into())).unwrap(),
            Param::Text("18446744073709551615".into())
        );
        assert_eq!(
            encode_value(MyKind::Bit1, &Value::Bool(true)).unwrap(),
            Param::Int(1)
        );
        assert!(encode_value(MyKind::Double, &Value::Float(f64::NAN)).is_err());
        assert!(encode_value(MyKind::Text, &Value::Bytes(vec![0xff])).is_err());
        assert_eq!(
            encode_value(MyKind::Json, &Value::Text("plain".into())).unwrap(),
            Param::Text("\"plain\"".into())
        );
    }

    #[test]
    fn statements_quote_odd_names() {
        let schema = TableSchema {
            name: "we`ird".into(),
            columns: vec![
                ColumnInfo {
                    name: "i`d".into(),
                    decl_type: "int(11)".into(),
                    not_null: true,
                },
                ColumnInfo {
                    name: "v'al\\".into(),
                    decl_type: "varchar(10)".into(),
                    not_null: false,
                },
            ],
            key: vec!["i`d".into()],
        };
        assert_eq!(
            upsert_sql(&schema, 1),
            "INSERT INTO `we``ird` (`i``d`, `v'al\\`) VALUES (?, ?) ON DUPLICATE KEY UPDATE `v'al\\` = VALUES(`v'al\\`)"
        );
        assert_eq!(
            delete_sql(&schema),
            "DELETE FROM `we``ird` WHERE `i``d` <=> ?"
        );
        let triggers = trigger_sql(&schema);
        assert_eq!(triggers.len(), 3);
        assert!(triggers[0].1.contains("'v''al\\\\'"));
    }
}
