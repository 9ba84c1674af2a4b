//! The SQLite adapter: capture by triggers into a change table, apply of
//! visible rows in one transaction without echo.
//!
//! # Capture
//!
//! [`SqliteAdapter::install_capture`] creates (idempotently, in one
//! transaction):
//!
//! - `_syncmesh_changes(id INTEGER PRIMARY KEY AUTOINCREMENT, tbl, op,
//!   old_row, new_row)`: one row per captured row change. `AUTOINCREMENT`
//!   guarantees ids are never reused after [`SqliteAdapter::delete_changes_through`],
//!   and since SQLite admits one writer at a time, ids are assigned in commit
//!   order, so a reader that remembers the highest id it consumed never misses
//!   a change.
//! - `_syncmesh_reals(change_id, side, col, val)`: see *Encoding* below.
//! - `_syncmesh_applying(flag)`: the echo-suppression flag. It is empty except
//!   inside an apply transaction, which inserts a row first and deletes it
//!   before `COMMIT`; other connections only ever see committed state, so
//!   they never see the flag.
//! - `AFTER INSERT/UPDATE/DELETE` triggers `_syncmesh_{ins,upd,del}_<table>`
//!   on every synced table, each guarded by
//!   `WHEN NOT EXISTS (SELECT 1 FROM _syncmesh_applying)`. Every install drops
//!   all triggers whose name starts with `_syncmesh_` and recreates them from
//!   the given schemas, so added columns and removed tables are picked up.
//!   The `_syncmesh_` prefix is reserved.
//!
//! # Encoding of captured rows
//!
//! `old_row` / `new_row` are JSON objects `{"column": [storage_class, value]}`
//! built by the trigger with
//! `json_array(typeof(c), CASE typeof(c) WHEN 'blob' THEN hex(c) WHEN 'real'
//! THEN printf('%!.17g', c) ELSE c END)`:
//!
//! | `typeof(c)` | JSON value                      | decoded as        |
//! |-------------|---------------------------------|-------------------|
//! | `null`      | `null`                          | `Value::Null`     |
//! | `integer`   | JSON integer (exact, 64 bit)    | `Value::Int`      |
//! | `real`      | string (approximate, see below) | `Value::Float`    |
//! | `text`      | JSON string                     | `Value::Text`     |
//! | `blob`      | string of hex digits            | `Value::Bytes`    |
//!
//! REAL values cannot be captured exactly as text: SQLite's float-to-decimal
//! conversion (used by `printf`, `CAST`, `quote` and the JSON functions)
//! works in double-double arithmetic and is off by one unit in the last
//! place for some values far from 1 (`1e300` comes out as the neighbouring
//! double `9.999999999999999e299`, whatever the precision asked for), it
//! prints `-0.0` as `0.0`, and no SQL function exposes a REAL's bits. So
//! the trigger also copies every REAL value of the row into
//! `_syncmesh_reals`, whose `val` column has no declared type (BLOB
//! affinity) and so stores the 8-byte double as-is;
//! [`SqliteAdapter::read_changes`] replaces the text with it. The text in
//! the JSON stays for people reading the table (and is the fallback, with a
//! warning, if a side row was removed by hand). Columns with TEXT affinity
//! never hold REALs and get no side rows.
//!
//! Columns with REAL, INTEGER or NUMERIC affinity cannot hold `-0.0` at all:
//! SQLite stores a REAL that equals an integer as that integer, so `-0.0` is
//! stored (and read back) as `0.0` (REAL affinity) or `0` (INTEGER and
//! NUMERIC affinity). Only untyped / `BLOB` / STRICT `ANY` columns keep it.
//!
//! # Type mapping
//!
//! Reading (capture and [`SqliteAdapter::dump_table`]) follows the value's
//! storage class, not the declared type:
//!
//! | SQLite storage class | [`Value`]        |
//! |----------------------|------------------|
//! | NULL                 | `Null`           |
//! | INTEGER              | `Int`            |
//! | REAL                 | `Float`          |
//! | TEXT                 | `Text`           |
//! | BLOB                 | `Bytes`          |
//!
//! Writing ([`SqliteAdapter::apply`]) binds:
//!
//! | [`Value`]      | bound as                          |
//! |----------------|-----------------------------------|
//! | `Null`         | NULL                              |
//! | `Bool`         | INTEGER 0 / 1                     |
//! | `Int`          | INTEGER                           |
//! | `Float`        | REAL                              |
//! | `Decimal`      | TEXT                              |
//! | `Text`         | TEXT                              |
//! | `Bytes`        | BLOB                              |
//! | `Json`         | TEXT                              |
//! | `Timestamp`    | INTEGER (microseconds since epoch)|
//!
//! after which the column's affinity applies as for any other write (e.g.
//! a `Decimal` written to a NUMERIC column becomes a number).
//!
//! # Apply
//!
//! [`SqliteAdapter::apply`] runs `BEGIN IMMEDIATE`, inserts the flag row,
//! defers foreign-key checks to `COMMIT` (so parent and child rows may come
//! in any order), upserts or deletes every row, deletes the flag and
//! commits. A user write from another connection waits for the write lock
//! (busy timeout 5 s) and then runs without the flag, so it is captured.
//! [`SqliteAdapter::apply`] returns the change-table watermark at its
//! commit, so the caller can tell which captured changes came before it.
//!
//! # SQLite behaviour the caller must know
//!
//! - `INSERT OR REPLACE` (and `REPLACE`) deletes conflicting rows *without*
//!   firing delete triggers unless the writing connection turned on
//!   `PRAGMA recursive_triggers`. A replace on the primary key is captured
//!   as an `Insert` of a key that already exists (no old row): treat it as
//!   an upsert. A replace that removes a *different* row through another
//!   UNIQUE constraint is not captured at all.
//! - `ALTER TABLE ... DROP COLUMN` fails while the capture triggers refer to
//!   the column; `RENAME COLUMN` rewrites the triggers' `NEW."old"` but not
//!   the JSON key, so captured rows keep the old name. Both are fixed by
//!   introspecting and installing capture again (at node start); stop the
//!   node, or call [`SqliteAdapter::install_capture`] without the table,
//!   before dropping a synced column.
//! - `ON DELETE CASCADE` / `SET NULL` actions run by an apply are not
//!   captured either (the flag is set); every replica runs them itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Decode, Row, Sqlite, TypeInfo, ValueRef};
use syncmesh_resolver::Value;

use crate::adapter::{CapturedChange, ChangeKind, ColumnInfo, RowWrite, TableSchema};
use crate::{Error, Result};

/// Name of the change table the capture triggers write to.
pub const CHANGES_TABLE: &str = "_syncmesh_changes";
/// Name of the echo-suppression flag table.
pub const APPLYING_TABLE: &str = "_syncmesh_applying";
/// Name of the side table holding the exact REAL values of captured rows.
pub const REALS_TABLE: &str = "_syncmesh_reals";
/// Prefix reserved for syncmesh's own tables and triggers.
pub const RESERVED_PREFIX: &str = "_syncmesh_";

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The printf format of the (approximate, human-readable) REAL text in the
/// JSON rows; the exact value is in [`REALS_TABLE`].
const REAL_FORMAT: &str = "%!.17g";
/// Columns per compound SELECT copying REALs into the side table (SQLite
/// allows 500 terms).
const REALS_CHUNK: usize = 400;
/// Columns per `json_object(...)` call (SQLite allows 1000 arguments).
const JSON_OBJECT_CHUNK: usize = 200;

/// A SQLite database with syncmesh's capture and apply machinery.
#[derive(Debug, Clone)]
pub struct SqliteAdapter {
    pool: SqlitePool,
    /// The URL or path as configured, for messages (SQLite URLs hold no
    /// secrets).
    url: String,
}

impl SqliteAdapter {
    /// Opens (creating the file if missing when `create_if_missing`) the
    /// database at a `sqlite://` / `sqlite:` URL or a plain path, in WAL mode
    /// with a 5 s busy timeout, foreign keys on and `synchronous = FULL`.
    pub async fn open(url: &str, create_if_missing: bool) -> Result<Self> {
        let database = url.to_string();
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(|e| Error::Database {
                database: database.clone(),
                message: format!(
                    "invalid SQLite URL: {e}; use `sqlite://PATH` or a plain file path"
                ),
            })?
        } else {
            SqliteConnectOptions::new().filename(url)
        };
        let options = options
            .create_if_missing(create_if_missing)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .synchronous(SqliteSynchronous::Full);
        let path = options.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|e| Error::Database {
                database: database.clone(),
                message: open_failure_message(&path, create_if_missing, &e),
            })?;
        Ok(Self {
            pool,
            url: database,
        })
    }

    /// The underlying pool (tests and the demo write through it like a user
    /// would).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes every connection of the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn db_err(&self, what: &str, e: &sqlx::Error) -> Error {
        Error::Database {
            database: self.url.clone(),
            message: format!("{what}: {e}{}", hint_for(e)),
        }
    }

    /// Introspects the configured tables: `(name, configured key columns)`,
    /// an empty key meaning "use the declared primary key".
    ///
    /// Fails with [`Error::Schema`] when a table does not exist (the message
    /// lists those that do), is a view or virtual table, has no primary key
    /// and no configured key, names a key column that does not exist, has a
    /// configured key that is neither the primary key nor a UNIQUE index, or
    /// has a name syncmesh does not support (empty, control characters, the
    /// reserved `_syncmesh_` / `sqlite_` prefixes).
    pub async fn introspect(&self, tables: &[(String, Vec<String>)]) -> Result<Vec<TableSchema>> {
        let mut out = Vec::with_capacity(tables.len());
        for (name, key) in tables {
            out.push(self.introspect_one(name, key).await?);
        }
        Ok(out)
    }

    async fn introspect_one(&self, name: &str, configured_key: &[String]) -> Result<TableSchema> {
        check_name(name, name, "table")?;
        let lower = name.to_ascii_lowercase();
        if lower.starts_with(RESERVED_PREFIX) || lower.starts_with("sqlite_") {
            return Err(schema_err(
                name,
                "names starting with `_syncmesh_` or `sqlite_` are reserved; sync a user table",
            ));
        }
        let found = sqlx::query(
            "SELECT name, type, sql FROM sqlite_schema \
             WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.db_err("reading the schema", &e))?;
        let Some(found) = found else {
            let existing = self.user_tables().await?;
            let list = if existing.is_empty() {
                "the database has no tables".to_string()
            } else {
                format!("existing tables: {}", existing.join(", "))
            };
            return Err(schema_err(
                name,
                &format!("does not exist ({list}); create it or fix `tables:` in the config"),
            ));
        };
        let actual: String =
            get(&found, "name").map_err(|e| self.db_err("reading the schema", &e))?;
        let kind: String =
            get(&found, "type").map_err(|e| self.db_err("reading the schema", &e))?;
        let sql: Option<String> =
            get(&found, "sql").map_err(|e| self.db_err("reading the schema", &e))?;
        if kind == "view" {
            return Err(schema_err(
                name,
                "is a view; capture needs a real table, sync the underlying table instead",
            ));
        }
        if sql.as_deref().is_some_and(|s| {
            s.trim_start()
                .to_ascii_uppercase()
                .starts_with("CREATE VIRTUAL")
        }) {
            return Err(schema_err(
                name,
                "is a virtual table, which cannot have triggers; sync a regular table instead",
            ));
        }

        let rows = sqlx::query(
            "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid",
        )
        .bind(&actual)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading table columns", &e))?;
        let mut columns = Vec::with_capacity(rows.len());
        let mut pk: Vec<(i64, String)> = Vec::new();
        for row in &rows {
            let col: String = get(row, "name").map_err(|e| self.db_err("reading columns", &e))?;
            let decl: Option<String> =
                get(row, "type").map_err(|e| self.db_err("reading columns", &e))?;
            let not_null: i64 =
                get(row, "notnull").map_err(|e| self.db_err("reading columns", &e))?;
            let pk_pos: i64 = get(row, "pk").map_err(|e| self.db_err("reading columns", &e))?;
            check_name(name, &col, "column")?;
            if pk_pos > 0 {
                pk.push((pk_pos, col.clone()));
            }
            columns.push(ColumnInfo {
                name: col,
                decl_type: decl.unwrap_or_default(),
                not_null: not_null != 0,
            });
        }
        if columns.is_empty() {
            return Err(schema_err(
                name,
                "has no columns; check the table definition",
            ));
        }
        pk.sort();
        let pk: Vec<String> = pk.into_iter().map(|(_, c)| c).collect();

        let key = if configured_key.is_empty() {
            if pk.is_empty() {
                return Err(schema_err(
                    name,
                    "has no primary key; add a PRIMARY KEY or set `key:` in the config",
                ));
            }
            pk
        } else {
            let mut key = Vec::with_capacity(configured_key.len());
            for k in configured_key {
                let Some(col) = find_column(&columns, k) else {
                    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    return Err(schema_err(
                        name,
                        &format!(
                            "key column `{k}` does not exist (columns: {}); fix `key:` in the config",
                            names.join(", ")
                        ),
                    ));
                };
                if key.contains(&col.name) {
                    return Err(schema_err(
                        name,
                        &format!("key column `{k}` is listed twice; fix `key:` in the config"),
                    ));
                }
                key.push(col.name.clone());
            }
            if !same_set(&key, &pk) && !self.has_unique_index(&actual, &key).await? {
                return Err(schema_err(
                    name,
                    &format!(
                        "configured key ({}) is neither the primary key nor a UNIQUE index; \
                         add a UNIQUE index on exactly these columns or fix `key:` in the config",
                        key.join(", ")
                    ),
                ));
            }
            key
        };
        Ok(TableSchema {
            name: name.to_string(),
            columns,
            key,
        })
    }

    /// User tables (not SQLite's, not syncmesh's), for error messages.
    async fn user_tables(&self) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT name FROM sqlite_schema WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND name NOT LIKE '\\_syncmesh\\_%' ESCAPE '\\' ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("listing tables", &e))?;
        rows.iter()
            .map(|r| get::<String>(r, "name").map_err(|e| self.db_err("listing tables", &e)))
            .collect()
    }

    /// True if a non-partial UNIQUE index covers exactly `key` (as a set).
    async fn has_unique_index(&self, table: &str, key: &[String]) -> Result<bool> {
        let indexes = sqlx::query(
            "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND partial = 0",
        )
        .bind(table)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.db_err("reading indexes", &e))?;
        for index in &indexes {
            let index_name: String =
                get(index, "name").map_err(|e| self.db_err("reading indexes", &e))?;
            let cols = sqlx::query("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .bind(&index_name)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| self.db_err("reading indexes", &e))?;
            let mut names = Vec::with_capacity(cols.len());
            let mut has_expression = false;
            for c in &cols {
                match get::<Option<String>>(c, "name")
                    .map_err(|e| self.db_err("reading indexes", &e))?
                {
                    Some(n) => names.push(n),
                    None => has_expression = true,
                }
            }
            if !has_expression && same_set(&names, key) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Idempotently installs the capture machinery (see the module docs):
    /// the change table, the REALs side table, the flag table and the
    /// triggers of every given table, all in one transaction. Triggers are
    /// always dropped and recreated, so a changed schema is picked up and
    /// tables no longer given stop being captured.
    pub async fn install_capture(&self, schemas: &[TableSchema]) -> Result<()> {
        for s in schemas {
            check_schema_names(s)?;
        }
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.db_err("starting the capture install transaction", &e))?;
        let result = install_in(&mut tx, schemas).await;
        match result {
            Ok(stale_flags) => {
                tx.commit()
                    .await
                    .map_err(|e| self.db_err("committing the capture install", &e))?;
                if stale_flags > 0 {
                    tracing::warn!(
                        database = %self.url,
                        rows = stale_flags,
                        "removed committed rows from {APPLYING_TABLE}; they suppressed capture"
                    );
                }
                Ok(())
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(self.db_err("installing capture triggers", &e))
            }
        }
    }

    /// Reads up to `limit` change rows with `id > after_id`, in id order,
    /// decoded into [`CapturedChange`]s.
    pub async fn read_changes(&self, after_id: i64, limit: usize) -> Result<Vec<CapturedChange>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // One read transaction, so the REAL side rows match the change rows.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| self.db_err("reading captured changes", &e))?;
        let rows = sqlx::query(
            "SELECT id, tbl, op, old_row, new_row FROM \"_syncmesh_changes\" \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.db_err("reading captured changes", &e))?;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            changes.push(self.decode_change(row)?);
        }
        if let Some(last) = changes.last() {
            let reals = sqlx::query(
                "SELECT change_id, side, col, val FROM \"_syncmesh_reals\" \
                 WHERE change_id > ?1 AND change_id <= ?2",
            )
            .bind(after_id)
            .bind(last.change_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.db_err("reading captured changes", &e))?;
            let mut by_id: HashMap<i64, usize> = HashMap::with_capacity(changes.len());
            for (i, c) in changes.iter().enumerate() {
                by_id.insert(c.change_id, i);
            }
            let mut patched = 0usize;
            for r in &reals {
                patched += usize::from(self.patch_real(r, &by_id, &mut changes)?);
            }
            let in_json = changes
                .iter()
                .flat_map(|c| c.old.iter().chain(c.new.iter()))
                .flat_map(|row| row.values())
                .filter(|v| matches!(v, Value::Float(_)))
                .count();
            if patched < in_json {
                tracing::warn!(
                    database = %self.url,
                    missing = in_json - patched,
                    "{REALS_TABLE} lacks rows for captured REAL values; using their text, \
                     which may differ in the last digit"
                );
            }
        }
        let _ = tx.rollback().await;
        Ok(changes)
    }

    fn decode_change(&self, row: &SqliteRow) -> Result<CapturedChange> {
        let bad = |id: Option<i64>, msg: String| Error::Database {
            database: self.url.clone(),
            message: format!(
                "{CHANGES_TABLE} row {}: {msg}; the change table was modified by hand, \
                 delete the row or reinstall capture",
                id.map_or_else(|| "?".to_string(), |i| i.to_string())
            ),
        };
        let id: i64 = get(row, "id").map_err(|e| bad(None, e.to_string()))?;
        let table: String = get(row, "tbl").map_err(|e| bad(Some(id), e.to_string()))?;
        let op: String = get(row, "op").map_err(|e| bad(Some(id), e.to_string()))?;
        let old: Option<String> = get(row, "old_row").map_err(|e| bad(Some(id), e.to_string()))?;
        let new: Option<String> = get(row, "new_row").map_err(|e| bad(Some(id), e.to_string()))?;
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

    /// Puts the exact value of one side row into its change; true if it
    /// replaced a captured REAL.
    fn patch_real(
        &self,
        z: &SqliteRow,
        by_id: &HashMap<i64, usize>,
        changes: &mut [CapturedChange],
    ) -> Result<bool> {
        let bad = |msg: String| Error::Database {
            database: self.url.clone(),
            message: format!("{REALS_TABLE}: {msg}; delete the row or reinstall capture"),
        };
        let change_id: i64 = get(z, "change_id").map_err(|e| bad(e.to_string()))?;
        let side: String = get(z, "side").map_err(|e| bad(e.to_string()))?;
        let col: String = get(z, "col").map_err(|e| bad(e.to_string()))?;
        let val = decode_column(z, 3).map_err(bad)?;
        let Value::Float(x) = val else {
            return Err(bad(format!("change {change_id} column {col}: not a REAL")));
        };
        let Some(change) = by_id.get(&change_id).and_then(|&i| changes.get_mut(i)) else {
            return Ok(false);
        };
        let row = match side.as_str() {
            "old" => change.old.as_mut(),
            "new" => change.new.as_mut(),
            _ => return Err(bad(format!("change {change_id}: unknown side {side:?}"))),
        };
        match row.and_then(|r| r.get_mut(&col)) {
            Some(slot @ Value::Float(_)) => {
                *slot = Value::Float(x);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Deletes change rows with `id <= through_id` (call only after the ops
    /// made from them are durable).
    pub async fn delete_changes_through(&self, through_id: i64) -> Result<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.db_err("deleting consumed changes", &e))?;
        let result = async {
            sqlx::query("DELETE FROM \"_syncmesh_reals\" WHERE change_id <= ?1")
                .bind(through_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM \"_syncmesh_changes\" WHERE id <= ?1")
                .bind(through_id)
                .execute(&mut *tx)
                .await?;
            Ok::<(), sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) => tx
                .commit()
                .await
                .map_err(|e| self.db_err("deleting consumed changes", &e)),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(self.db_err("deleting consumed changes", &e))
            }
        }
    }

    /// The highest change id assigned so far (0 if none): every change
    /// captured from now on gets a higher id, even after
    /// [`SqliteAdapter::delete_changes_through`].
    pub async fn change_watermark(&self) -> Result<i64> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| self.db_err("reading the change-table watermark", &e))?;
        watermark_in(&mut conn)
            .await
            .map_err(|e| self.db_err("reading the change-table watermark", &e))
    }

    /// Number of change rows waiting to be read and deleted.
    pub async fn pending_changes(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM \"_syncmesh_changes\"")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.db_err("counting captured changes", &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Writes the visible rows in one transaction, without capturing them,
    /// and returns the change-table watermark at its commit (see
    /// [`SqliteAdapter::change_watermark`]): a captured change with an id at
    /// or below it was committed before the apply and may have been
    /// overwritten by it; one above it came after.
    ///
    /// `row: Some(map)` upserts (`INSERT ... ON CONFLICT (key) DO UPDATE`):
    /// columns absent from the map are written NULL and key columns come
    /// from `key`. `row: None` deletes by key. Every write is checked
    /// before the transaction starts: an unknown table or column, or a key
    /// of the wrong length, is an [`Error::Schema`] and nothing is written.
    /// Works without [`SqliteAdapter::install_capture`] too (a replica
    /// that never captures); it then creates only the flag table.
    pub async fn apply(&self, schemas: &[TableSchema], writes: &[RowWrite]) -> Result<i64> {
        if writes.is_empty() {
            return self.change_watermark().await;
        }
        let mut planned: Vec<(String, Vec<&Value>)> = Vec::with_capacity(writes.len());
        let mut sql_cache: HashMap<(&str, bool), String> = HashMap::new();
        // Consecutive upserts of one table go out as multi-row statements:
        // one round trip to the SQLite worker per chunk, not per row.
        let mut chunk: UpsertChunk = None;
        let mut checked: Vec<&str> = Vec::new();
        for w in writes {
            let Some(schema) = schemas.iter().find(|s| s.name == w.table) else {
                return Err(schema_err(
                    &w.table,
                    "is not a synced table of this database; add it to `tables:` or check the \
                     sender",
                ));
            };
            if !checked.contains(&schema.name.as_str()) {
                check_schema_names(schema)?;
                checked.push(&schema.name);
            }
            crate::adapter::check_key_arity(w, schema)?;
            match &w.row {
                None => {
                    flush_upserts(&mut chunk, &mut planned);
                    let sql = sql_cache
                        .entry((schema.name.as_str(), false))
                        .or_insert_with(|| delete_sql(schema))
                        .clone();
                    planned.push((sql, w.key.iter().collect()));
                }
                Some(row) => {
                    if let Some(unknown) = row
                        .keys()
                        .find(|c| !schema.columns.iter().any(|col| &col.name == *c))
                    {
                        return Err(schema_err(
                            &w.table,
                            &format!(
                                "write names column `{unknown}`, which the table does not have; \
                                 add the column or check the sender"
                            ),
                        ));
                    }
                    let same_table = chunk
                        .as_ref()
                        .is_some_and(|(s, _, _)| s.name == schema.name);
                    let full = chunk
                        .as_ref()
                        .is_some_and(|(s, rows, _)| *rows >= rows_per_statement(s));
                    if !same_table || full {
                        flush_upserts(&mut chunk, &mut planned);
                    }
                    let (_, rows, params) = chunk.get_or_insert_with(|| (schema, 0, Vec::new()));
                    *rows += 1;
                    params.extend(schema.columns.iter().map(|col| {
                        match schema.key.iter().position(|k| k == &col.name) {
                            Some(i) => w.key.get(i).unwrap_or(&Value::Null),
                            None => row.get(&col.name).unwrap_or(&Value::Null),
                        }
                    }));
                }
            }
        }
        flush_upserts(&mut chunk, &mut planned);

        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.db_err("starting the apply transaction", &e))?;
        let result = apply_in(&mut tx, &planned).await;
        match result {
            Ok(watermark) => {
                tx.commit()
                    .await
                    .map_err(|e| self.db_err("committing applied rows", &e))?;
                Ok(watermark)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(self.db_err("applying rows (rolled back)", &e))
            }
        }
    }

    /// All rows of a table ordered by its key, as maps of every column.
    pub async fn dump_table(&self, schema: &TableSchema) -> Result<Vec<BTreeMap<String, Value>>> {
        check_schema_names(schema)?;
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let order: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
        let mut sql = format!(
            "SELECT {} FROM {}",
            cols.join(", "),
            quote_ident(&schema.name)
        );
        if !order.is_empty() {
            sql.push_str(" ORDER BY ");
            sql.push_str(&order.join(", "));
        }
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db_err(&format!("reading table {}", schema.name), &e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut map = BTreeMap::new();
            for (i, col) in schema.columns.iter().enumerate() {
                let v = decode_column(row, i).map_err(|m| Error::Database {
                    database: self.url.clone(),
                    message: format!("table {} column {}: {m}", schema.name, col.name),
                })?;
                map.insert(col.name.clone(), v);
            }
            out.push(map);
        }
        Ok(out)
    }
}

/// The body of [`SqliteAdapter::install_capture`]; returns the number of
/// stale flag rows it removed.
async fn install_in(conn: &mut SqliteConnection, schemas: &[TableSchema]) -> sqlx::Result<u64> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS \"_syncmesh_changes\" (\
           id INTEGER PRIMARY KEY AUTOINCREMENT, \
           tbl TEXT NOT NULL, \
           op TEXT NOT NULL, \
           old_row TEXT, \
           new_row TEXT)",
    )
    .execute(&mut *conn)
    .await?;
    // `val` has no declared type: BLOB affinity, stores a REAL bit for bit.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS \"_syncmesh_reals\" (\
           change_id INTEGER NOT NULL, \
           side TEXT NOT NULL, \
           col TEXT NOT NULL, \
           val, \
           PRIMARY KEY (change_id, side, col)) WITHOUT ROWID",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS \"_syncmesh_applying\" (flag INTEGER)")
        .execute(&mut *conn)
        .await?;
    // The flag is never committed by an apply; a committed row would
    // silently switch capture off, so clear it.
    let stale = sqlx::query("DELETE FROM \"_syncmesh_applying\"")
        .execute(&mut *conn)
        .await?
        .rows_affected();

    let ours: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type = 'trigger' \
         AND name LIKE '\\_syncmesh\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut *conn)
    .await?;
    for name in ours {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TRIGGER IF EXISTS {}",
            quote_ident(&name)
        )))
        .execute(&mut *conn)
        .await?;
    }
    for schema in schemas {
        for sql in trigger_sql(schema) {
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
        }
    }
    Ok(stale)
}

/// The body of [`SqliteAdapter::apply`] inside its transaction; returns
/// the change-table watermark (exact: the transaction holds the write lock).
async fn apply_in(
    conn: &mut SqliteConnection,
    planned: &[(String, Vec<&Value>)],
) -> sqlx::Result<i64> {
    sqlx::query("CREATE TABLE IF NOT EXISTS \"_syncmesh_applying\" (flag INTEGER)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("INSERT INTO \"_syncmesh_applying\" (flag) VALUES (1)")
        .execute(&mut *conn)
        .await?;
    sqlx::query("PRAGMA defer_foreign_keys = ON")
        .execute(&mut *conn)
        .await?;
    for (sql, params) in planned {
        let mut q = sqlx::query::<Sqlite>(AssertSqlSafe(sql.as_str()));
        for v in params {
            q = bind_value(q, v);
        }
        q.execute(&mut *conn).await?;
    }
    sqlx::query("DELETE FROM \"_syncmesh_applying\"")
        .execute(&mut *conn)
        .await?;
    watermark_in(conn).await
}

/// The highest id ever assigned in the change table (`AUTOINCREMENT` keeps
/// it in `sqlite_sequence`, so deleting consumed rows does not lower it);
/// 0 before the first capture or without capture installed.
async fn watermark_in(conn: &mut SqliteConnection) -> sqlx::Result<i64> {
    let has_sequence: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name = 'sqlite_sequence'",
    )
    .fetch_one(&mut *conn)
    .await?;
    if has_sequence == 0 {
        return Ok(0);
    }
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = '_syncmesh_changes'")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(seq.unwrap_or(0))
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments>;

/// Binds a value following the write mapping of the module docs.
fn bind_value<'q>(q: SqliteQuery<'q>, v: &Value) -> SqliteQuery<'q> {
    match v {
        Value::Null => q.bind(None::<i64>),
        Value::Bool(b) => q.bind(i64::from(*b)),
        Value::Int(i) | Value::Timestamp(i) => q.bind(*i),
        Value::Float(x) => q.bind(*x),
        Value::Decimal(s) | Value::Text(s) | Value::Json(s) => q.bind(s.clone()),
        Value::Bytes(b) => q.bind(b.clone()),
    }
}

/// `"name"` with embedded double quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded single quotes doubled.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn schema_err(table: &str, message: &str) -> Error {
    Error::Schema {
        table: table.to_string(),
        message: message.to_string(),
    }
}

/// Rejects names that cannot be written safely into SQL text: empty ones
/// and those with control characters (NUL ends an SQL string).
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
                "{what} name {name:?} contains control characters, which syncmesh does not \
                 support; rename it"
            ),
        ));
    }
    Ok(())
}

fn check_schema_names(schema: &TableSchema) -> Result<()> {
    check_name(&schema.name, &schema.name, "table")?;
    for c in &schema.columns {
        check_name(&schema.name, &c.name, "column")?;
    }
    if schema.columns.is_empty() {
        return Err(schema_err(
            &schema.name,
            "has no columns; introspect it first",
        ));
    }
    for k in &schema.key {
        if !schema.columns.iter().any(|c| &c.name == k) {
            return Err(schema_err(
                &schema.name,
                &format!("key column `{k}` is not a column of the table; introspect it again"),
            ));
        }
    }
    if schema.key.is_empty() {
        return Err(schema_err(
            &schema.name,
            "has no key; add a PRIMARY KEY or set `key:` in the config",
        ));
    }
    Ok(())
}

fn find_column<'a>(columns: &'a [ColumnInfo], name: &str) -> Option<&'a ColumnInfo> {
    columns
        .iter()
        .find(|c| c.name == name)
        .or_else(|| columns.iter().find(|c| c.name.eq_ignore_ascii_case(name)))
}

/// Same columns, ignoring order and ASCII case (SQLite identifiers are
/// case-insensitive).
fn same_set(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|x| b.iter().any(|y| x.eq_ignore_ascii_case(y)))
        && b.iter()
            .all(|y| a.iter().any(|x| x.eq_ignore_ascii_case(y)))
}

/// False only for TEXT affinity (SQLite's rules, section 3.1 of "Datatypes
/// in SQLite"), which turns every REAL into text.
fn may_hold_real(decl_type: &str) -> bool {
    let t = decl_type.to_ascii_uppercase();
    t.contains("INT") || !(t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT"))
}

/// `json_array(typeof(x), ...)`: one column as a tagged pair.
fn encode_column(alias: &str, column: &str) -> String {
    let c = format!("{alias}.{}", quote_ident(column));
    format!(
        "json_array(typeof({c}), CASE typeof({c}) WHEN 'blob' THEN hex({c}) \
         WHEN 'real' THEN printf('{REAL_FORMAT}', {c}) ELSE {c} END)"
    )
}

/// A JSON object of all columns (chunked: `json_object` takes at most 1000
/// arguments; chunks are merged with `json_patch`, safe here because no
/// value is a JSON null or object).
fn encode_row(alias: &str, columns: &[ColumnInfo]) -> String {
    let mut expr: Option<String> = None;
    for chunk in columns.chunks(JSON_OBJECT_CHUNK) {
        let args: Vec<String> = chunk
            .iter()
            .map(|c| {
                format!(
                    "{}, {}",
                    quote_literal(&c.name),
                    encode_column(alias, &c.name)
                )
            })
            .collect();
        let obj = format!("json_object({})", args.join(", "));
        expr = Some(match expr {
            None => obj,
            Some(prev) => format!("json_patch({prev}, {obj})"),
        });
    }
    expr.unwrap_or_else(|| "json_object()".to_string())
}

/// Trigger statements copying the row's REAL values (bit for bit) into the
/// side table. The change row was just inserted by the same trigger, in the
/// same write transaction, so it has the highest id.
fn real_statements(alias: &str, side: &str, columns: &[ColumnInfo]) -> String {
    let candidates: Vec<&ColumnInfo> = columns
        .iter()
        .filter(|c| may_hold_real(&c.decl_type))
        .collect();
    let mut out = String::new();
    for chunk in candidates.chunks(REALS_CHUNK) {
        let selects: Vec<String> = chunk
            .iter()
            .map(|c| {
                format!(
                    "SELECT {} AS col, {alias}.{} AS val",
                    quote_literal(&c.name),
                    quote_ident(&c.name)
                )
            })
            .collect();
        out.push_str(&format!(
            " INSERT INTO \"_syncmesh_reals\" (change_id, side, col, val) \
             SELECT (SELECT max(id) FROM \"_syncmesh_changes\"), '{side}', col, val \
             FROM ({}) WHERE typeof(val) = 'real';",
            selects.join(" UNION ALL ")
        ));
    }
    out
}

/// The three `CREATE TRIGGER` statements of a table.
fn trigger_sql(schema: &TableSchema) -> Vec<String> {
    let table = quote_ident(&schema.name);
    let tbl = quote_literal(&schema.name);
    let guard = "WHEN NOT EXISTS (SELECT 1 FROM \"_syncmesh_applying\")";
    let new_row = encode_row("NEW", &schema.columns);
    let old_row = encode_row("OLD", &schema.columns);
    let trigger = |suffix: &str| quote_ident(&format!("{RESERVED_PREFIX}{suffix}_{}", schema.name));
    vec![
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {table} FOR EACH ROW {guard} BEGIN \
             INSERT INTO \"_syncmesh_changes\" (tbl, op, old_row, new_row) \
             VALUES ({tbl}, 'INSERT', NULL, {new_row});{} END",
            trigger("ins"),
            real_statements("NEW", "new", &schema.columns),
        ),
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {table} FOR EACH ROW {guard} BEGIN \
             INSERT INTO \"_syncmesh_changes\" (tbl, op, old_row, new_row) \
             VALUES ({tbl}, 'UPDATE', {old_row}, {new_row});{}{} END",
            trigger("upd"),
            real_statements("OLD", "old", &schema.columns),
            real_statements("NEW", "new", &schema.columns),
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {table} FOR EACH ROW {guard} BEGIN \
             INSERT INTO \"_syncmesh_changes\" (tbl, op, old_row, new_row) \
             VALUES ({tbl}, 'DELETE', {old_row}, NULL);{} END",
            trigger("del"),
            real_statements("OLD", "old", &schema.columns),
        ),
    ]
}

/// Consecutive upserts of one table waiting to go out as one statement:
/// the schema, the number of rows, and their parameters.
type UpsertChunk<'a> = Option<(&'a TableSchema, usize, Vec<&'a Value>)>;

fn flush_upserts<'a>(chunk: &mut UpsertChunk<'a>, planned: &mut Vec<(String, Vec<&'a Value>)>) {
    if let Some((schema, rows, params)) = chunk.take() {
        planned.push((upsert_rows_sql(schema, rows), params));
    }
}

/// Rows per multi-row upsert: at most 200, and within SQLite's limit of
/// 32,766 bound parameters per statement.
fn rows_per_statement(schema: &TableSchema) -> usize {
    (32_766 / schema.columns.len().max(1)).clamp(1, 200)
}

/// `INSERT … VALUES (…), (…) … ON CONFLICT (key) DO UPDATE` for `rows` rows.
fn upsert_rows_sql(schema: &TableSchema, rows: usize) -> String {
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let one = format!("({})", vec!["?"; cols.len()].join(", "));
    let params = vec![one; rows.max(1)].join(", ");
    let key: Vec<String> = schema.key.iter().map(|k| quote_ident(k)).collect();
    let updates: Vec<String> = schema
        .columns
        .iter()
        .filter(|c| !schema.key.contains(&c.name))
        .map(|c| {
            let q = quote_ident(&c.name);
            format!("{q} = excluded.{q}")
        })
        .collect();
    let action = if updates.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", updates.join(", "))
    };
    format!(
        "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO {action}",
        quote_ident(&schema.name),
        cols.join(", "),
        params,
        key.join(", "),
    )
}

fn delete_sql(schema: &TableSchema) -> String {
    let conds: Vec<String> = schema
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} IS ?{}", quote_ident(k), i + 1))
        .collect();
    format!(
        "DELETE FROM {} WHERE {}",
        quote_ident(&schema.name),
        conds.join(" AND ")
    )
}

/// `row.try_get` by column name.
fn get<'r, T>(row: &'r SqliteRow, column: &str) -> sqlx::Result<T>
where
    T: Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(column)
}

/// Decodes one column by its storage class (the value's, not the declared
/// type).
fn decode_column(row: &SqliteRow, index: usize) -> std::result::Result<Value, String> {
    let raw = row.try_get_raw(index).map_err(|e| e.to_string())?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let class = raw.type_info().name().to_string();
    match class.as_str() {
        "INTEGER" => <i64 as Decode<Sqlite>>::decode(raw)
            .map(Value::Int)
            .map_err(|e| e.to_string()),
        "REAL" => <f64 as Decode<Sqlite>>::decode(raw)
            .map(Value::Float)
            .map_err(|e| e.to_string()),
        "TEXT" => <String as Decode<Sqlite>>::decode(raw)
            .map(Value::Text)
            .map_err(|e| format!("TEXT that is not valid UTF-8 ({e})")),
        "BLOB" => <Vec<u8> as Decode<Sqlite>>::decode(raw)
            .map(Value::Bytes)
            .map_err(|e| e.to_string()),
        other => Err(format!("unexpected storage class {other}")),
    }
}

/// Decodes a captured row (`{"col": [typeof, value]}`), see the module docs.
fn decode_row_json(text: &str) -> std::result::Result<BTreeMap<String, Value>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let serde_json::Value::Object(obj) = json else {
        return Err("not a JSON object".to_string());
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
        _ => return Err(format!("expected [storage_class, value], got {pair}")),
    };
    match (tag, v) {
        ("null", J::Null) => Ok(Value::Null),
        ("integer", J::Number(n)) => n
            .as_i64()
            .map(Value::Int)
            .ok_or_else(|| format!("integer {n} out of range")),
        ("real", J::String(s)) => parse_real(s)
            .map(Value::Float)
            .ok_or_else(|| format!("unparsable real {s:?}")),
        ("text", J::String(s)) => Ok(Value::Text(s.clone())),
        ("blob", J::String(s)) => decode_hex(s)
            .map(Value::Bytes)
            .ok_or_else(|| "invalid hex in blob".to_string()),
        _ => Err(format!("unexpected value {v} for storage class {tag:?}")),
    }
}

/// Parses SQLite's printf output of a REAL (`Inf`, `-Inf`, digits).
fn parse_real(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok()
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

/// A one-line explanation of why the database could not be opened.
fn open_failure_message(path: &Path, create_if_missing: bool, e: &sqlx::Error) -> String {
    let shown = path.display();
    let parent: Option<PathBuf> = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf);
    if let Some(dir) = parent.as_ref().filter(|d| !d.is_dir()) {
        return format!(
            "cannot open SQLite database {shown}: directory {} does not exist; create it first ({e})",
            dir.display()
        );
    }
    if !create_if_missing && !path.exists() {
        return format!(
            "cannot open SQLite database {shown}: the file does not exist; create it or allow \
             creating it ({e})"
        );
    }
    format!(
        "cannot open SQLite database {shown}: {e}; check that the file is a SQLite database and \
         that the file and its directory are readable and writable (WAL needs both)"
    )
}

/// What to do about common database errors.
fn hint_for(e: &sqlx::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("database is locked") || text.contains("database is busy") {
        "; another connection held the write lock longer than the 5 s busy timeout, retry later"
    } else if text.contains("no such table: _syncmesh_") {
        "; the capture tables are missing, install capture first (start the node)"
    } else if text.contains("readonly") || text.contains("read-only") {
        "; the database file or its directory is read-only, fix the permissions"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex("00FFa0"), Some(vec![0, 255, 160]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é0"), None);
    }

    #[test]
    fn reals_parse_sqlite_forms() {
        assert_eq!(parse_real("Inf"), Some(f64::INFINITY));
        assert_eq!(parse_real("-Inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_real("9.0e+999"), Some(f64::INFINITY));
        assert_eq!(parse_real("0.10000000000000000555"), Some(0.1));
        assert_eq!(parse_real("1.0e+300"), Some(1e300));
        assert_eq!(parse_real("x"), None);
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        for bad in [
            "",
            "[]",
            "{\"a\": 1}",
            "{\"a\": []}",
            "{\"a\": [\"integer\"]}",
            "{\"a\": [\"integer\", \"1\"]}",
            "{\"a\": [\"integer\", 1.5]}",
            "{\"a\": [\"integer\", 18446744073709551615]}",
            "{\"a\": [\"real\", 1.5]}",
            "{\"a\": [\"real\", \"abc\"]}",
            "{\"a\": [\"blob\", \"abc\"]}",
            "{\"a\": [\"text\", null]}",
            "{\"a\": [\"weird\", 1]}",
            "{\"a\": [\"null\", 1]}",
        ] {
            assert!(decode_row_json(bad).is_err(), "{bad:?} accepted");
        }
        let ok = decode_row_json(
            "{\"a\":[\"null\",null],\"b\":[\"integer\",-9223372036854775808],\
             \"c\":[\"real\",\"-0.5\"],\"d\":[\"text\",\"x\\n\\u0000\"],\"e\":[\"blob\",\"00ff\"]}",
        )
        .unwrap();
        assert_eq!(ok["a"], Value::Null);
        assert_eq!(ok["b"], Value::Int(i64::MIN));
        assert_eq!(ok["c"], Value::Float(-0.5));
        assert_eq!(ok["d"], Value::Text("x\n\0".into()));
        assert_eq!(ok["e"], Value::Bytes(vec![0, 255]));
    }

    #[test]
    fn affinity_rules_for_reals() {
        for t in [
            "",
            "BLOB",
            "any",
            "REAL",
            "DOUBLE PRECISION",
            "INTEGER",
            "NUMERIC",
            "POINT",
        ] {
            assert!(may_hold_real(t), "{t}");
        }
        for t in ["TEXT", "VARCHAR(10)", "clob", "NCHAR"] {
            assert!(!may_hold_real(t), "{t}");
        }
        // INT wins over CHAR: "CHARINT" has INTEGER affinity.
        assert!(may_hold_real("CHARINT"));
    }

    #[test]
    fn statements_quote_odd_names() {
        let schema = TableSchema {
            name: "we\"ird 'tbl'".into(),
            columns: vec![
                ColumnInfo {
                    name: "i\"d".into(),
                    decl_type: "INTEGER".into(),
                    not_null: true,
                },
                ColumnInfo {
                    name: "v'al".into(),
                    decl_type: String::new(),
                    not_null: false,
                },
            ],
            key: vec!["i\"d".into()],
        };
        let up = upsert_rows_sql(&schema, 2);
        assert!(up.starts_with(
            "INSERT INTO \"we\"\"ird 'tbl'\" (\"i\"\"d\", \"v'al\") VALUES (?, ?), (?, ?) ON"
        ));
        assert!(
            up.ends_with("ON CONFLICT (\"i\"\"d\") DO UPDATE SET \"v'al\" = excluded.\"v'al\"")
        );
        assert_eq!(
            delete_sql(&schema),
            "DELETE FROM \"we\"\"ird 'tbl'\" WHERE \"i\"\"d\" IS ?1"
        );
        let triggers = trigger_sql(&schema);
        assert_eq!(triggers.len(), 3);
        assert!(triggers[0].contains("'we\"ird ''tbl'''"));
        assert!(triggers[0].contains("'v''al'"));
    }
}
