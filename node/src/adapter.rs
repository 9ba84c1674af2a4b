//! Engine-neutral types shared by every database adapter.

use std::collections::BTreeMap;

use syncmesh_resolver::Value;

/// A column of a synced table, as introspected from the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Declared type as the database reports it (e.g. `INTEGER`, `TEXT`).
    pub decl_type: String,
    /// Declared NOT NULL.
    pub not_null: bool,
}

/// A synced table: its columns (in table order) and its primary key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// Table name.
    pub name: String,
    /// All columns in declaration order (key columns included).
    pub columns: Vec<ColumnInfo>,
    /// Primary-key column names, in key order.
    pub key: Vec<String>,
}

impl TableSchema {
    /// Extracts the key values from a full row, in key order (`None` if a
    /// key column is missing).
    pub fn key_of(&self, row: &BTreeMap<String, Value>) -> Option<Vec<Value>> {
        self.key.iter().map(|k| row.get(k).cloned()).collect()
    }
}

/// Removes the password of a database `url` (`scheme://user:pw@host/...`)
/// from an error text, for messages and logs.
pub fn redact_password(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|auth| auth.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw)
        .filter(|pw| !pw.is_empty());
    match password {
        Some(pw) => text.replace(pw, "***"),
        None => text.to_owned(),
    }
}

/// The kind of a captured change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
}

/// One row of the capture change table: a local write as the database saw
/// it, with the full row before and after.
#[derive(Clone, Debug, PartialEq)]
pub struct CapturedChange {
    /// Position in the change table (strictly increasing).
    pub change_id: i64,
    /// Table name.
    pub table: String,
    /// Insert, update or delete.
    pub kind: ChangeKind,
    /// The full row before the change (update, delete).
    pub old: Option<BTreeMap<String, Value>>,
    /// The full row after the change (insert, update).
    pub new: Option<BTreeMap<String, Value>>,
}

/// A row to make visible in the database: the resolver's visible row, or
/// `None` to delete it.
#[derive(Clone, Debug, PartialEq)]
pub struct RowWrite {
    /// Table name.
    pub table: String,
    /// Primary-key values in key order.
    pub key: Vec<Value>,
    /// The visible row (columns absent from it are written as NULL), or
    /// `None` when the row must not exist.
    pub row: Option<BTreeMap<String, Value>>,
}

/// The database of a node, whichever engine it is: the shell drives capture
/// and apply through this.
#[derive(Debug)]
pub enum Db {
    /// A SQLite file.
    Sqlite(crate::sqlite::SqliteAdapter),
    /// A PostgreSQL database.
    Postgres(Box<crate::postgres::PostgresAdapter>),
    /// A Redis cache (a target only: nothing is captured).
    Redis(crate::redis::RedisTarget),
    /// A MySQL or MariaDB database.
    Mysql(Box<crate::mysql::MysqlAdapter>),
    /// A MongoDB database (a replica set).
    Mongo(Box<crate::mongodb::MongoAdapter>),
}

impl Db {
    /// Opens the database a node is configured with (the file must exist
    /// for SQLite).
    pub async fn open(db: &crate::config::DatabaseConfig) -> crate::Result<Db> {
        use crate::config::DatabaseKind;
        match db.kind {
            DatabaseKind::Sqlite => Ok(Db::Sqlite(
                crate::sqlite::SqliteAdapter::open(db.url.expose(), false).await?,
            )),
            DatabaseKind::Postgresql => {
                let mut pg = crate::postgres::PostgresAdapter::open(
                    db.url.expose(),
                    db.slot.as_deref(),
                    db.publication.as_deref(),
                )
                .await?;
                if db.capture == crate::config::PgCapture::Peek {
                    pg.use_peek();
                }
                Ok(Db::Postgres(Box::new(pg)))
            }
            DatabaseKind::Redis => Ok(Db::Redis(
                crate::redis::RedisTarget::open(
                    db.url.expose(),
                    db.key_prefix.as_deref(),
                    db.ttl_seconds,
                )
                .await?,
            )),
            DatabaseKind::Mysql => Ok(Db::Mysql(Box::new(
                crate::mysql::MysqlAdapter::open(db.url.expose()).await?,
            ))),
            DatabaseKind::Mongodb => Ok(Db::Mongo(Box::new(
                crate::mongodb::MongoAdapter::open(db.url.expose()).await?,
            ))),
        }
    }

    /// See [`crate::sqlite::SqliteAdapter::introspect`].
    pub async fn introspect(
        &mut self,
        tables: &[(String, Vec<String>)],
    ) -> crate::Result<Vec<TableSchema>> {
        match self {
            Db::Sqlite(d) => d.introspect(tables).await,
            Db::Postgres(d) => d.introspect(tables).await,
            Db::Mysql(d) => d.introspect(tables).await,
            Db::Mongo(d) => d.introspect(tables).await,
            // Redis has no schema: the key comes from the config, and the
            // shell adds the configured fields.
            Db::Redis(_) => tables
                .iter()
                .map(|(name, key)| {
                    if key.is_empty() {
                        return Err(crate::Error::Schema {
                            table: name.clone(),
                            message: "a redis node has no schema to read the primary key from: set `key: [..]` on the table in the config".into(),
                        });
                    }
                    Ok(TableSchema {
                        name: name.clone(),
                        columns: key
                            .iter()
                            .map(|k| ColumnInfo {
                                name: k.clone(),
                                decl_type: "TEXT".into(),
                                not_null: true,
                            })
                            .collect(),
                        key: key.clone(),
                    })
                })
                .collect(),
        }
    }

    /// Installs (or refreshes) capture of `schemas`.
    pub async fn install_capture(&self, schemas: &[TableSchema]) -> crate::Result<()> {
        match self {
            Db::Sqlite(d) => d.install_capture(schemas).await,
            Db::Postgres(d) => d.install_capture(schemas).await,
            Db::Mysql(d) => d.install_capture(schemas).await,
            Db::Mongo(d) => d.install_capture(schemas).await,
            Db::Redis(_) => Ok(()),
        }
    }

    /// The capture position now (change-table id or WAL position).
    pub async fn change_watermark(&self) -> crate::Result<i64> {
        match self {
            Db::Sqlite(d) => d.change_watermark().await,
            Db::Postgres(d) => d.change_watermark().await,
            Db::Mysql(d) => d.change_watermark().await,
            Db::Mongo(d) => d.change_watermark().await,
            Db::Redis(_) => Ok(0),
        }
    }

    /// Captured changes after checkpoint `after`, about `limit` at a time.
    pub async fn read_changes(
        &mut self,
        after: i64,
        limit: usize,
    ) -> crate::Result<Vec<CapturedChange>> {
        match self {
            Db::Sqlite(d) => d.read_changes(after, limit).await,
            Db::Postgres(d) => d.read_changes(after, limit).await,
            Db::Mysql(d) => d.read_changes(after, limit).await,
            Db::Mongo(d) => d.read_changes(after, limit).await,
            Db::Redis(_) => Ok(Vec::new()),
        }
    }

    /// Lets the database forget changes through `checkpoint` (call only
    /// after the ops are flushed).
    pub async fn delete_changes_through(&mut self, checkpoint: i64) -> crate::Result<()> {
        match self {
            Db::Sqlite(d) => d.delete_changes_through(checkpoint).await,
            Db::Postgres(d) => d.delete_changes_through(checkpoint).await,
            Db::Mysql(d) => d.delete_changes_through(checkpoint).await,
            // The change stream's position is the resume token, made
            // durable with the ops (`capture_meta`).
            Db::Mongo(_) | Db::Redis(_) => Ok(()),
        }
    }

    /// Writes rows in one transaction without echo; returns the watermark.
    pub async fn apply(&self, schemas: &[TableSchema], writes: &[RowWrite]) -> crate::Result<i64> {
        match self {
            Db::Sqlite(d) => d.apply(schemas, writes).await,
            Db::Postgres(d) => d.apply(schemas, writes).await,
            Db::Mysql(d) => d.apply(schemas, writes).await,
            Db::Mongo(d) => d.apply(schemas, writes).await,
            Db::Redis(d) => d.apply(writes).await.map(|()| 0),
        }
    }

    /// Every row of a table, ordered by key.
    pub async fn dump_table(
        &self,
        schema: &TableSchema,
    ) -> crate::Result<Vec<BTreeMap<String, Value>>> {
        match self {
            Db::Sqlite(d) => d.dump_table(schema).await,
            Db::Postgres(d) => d.dump_table(schema).await,
            Db::Mysql(d) => d.dump_table(schema).await,
            Db::Mongo(d) => d.dump_table(schema).await,
            Db::Redis(d) => d.dump_table(&schema.name).await,
        }
    }

    /// A PostgreSQL node's replication slot and the WAL it retained at the
    /// last capture step (bytes); `None` for other engines.
    pub fn slot_retained_wal(&self) -> Option<(&str, i64)> {
        match self {
            Db::Postgres(d) => d.last_retained_wal_bytes().map(|b| (d.slot(), b)),
            _ => None,
        }
    }

    /// Closes the connections.
    pub async fn close(&self) {
        match self {
            Db::Sqlite(d) => d.close().await,
            Db::Postgres(d) => d.close().await,
            Db::Mysql(d) => d.close().await,
            Db::Mongo(d) => d.close().await,
            Db::Redis(_) => {}
        }
    }

    /// Resolves when capture has something to read before its next poll
    /// (every [`crate::shell::CAPTURE_INTERVAL_MS`] while idle): an open
    /// PostgreSQL replication stream holds a whole message. Never for the
    /// sources capture polls with a statement. Cancel-safe.
    pub async fn changes_ready(&mut self) {
        match self {
            Db::Postgres(d) => d.changes_ready().await,
            _ => std::future::pending().await,
        }
    }

    /// Adapter records to make durable with the ops of the changes the
    /// last [`Db::read_changes`] returned (MongoDB: the resume token).
    pub fn capture_meta(&self) -> Vec<crate::core::MetaWrite> {
        match self {
            Db::Mongo(d) => d.capture_meta(),
            _ => Vec::new(),
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// Calendar arithmetic shared by the adapters' date and timestamp codecs
// (H. Hinnant's civil-date algorithms).

/// Days since 1970-01-01 of a proleptic Gregorian date (year 0 = 1 BC).
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Refuses a write whose key values do not match the table's key columns
/// (every SQL apply checks this before building statements).
pub fn check_key_arity(w: &RowWrite, schema: &TableSchema) -> crate::Result<()> {
    if w.key.len() == schema.key.len() {
        return Ok(());
    }
    Err(crate::Error::Schema {
        table: w.table.clone(),
        message: format!(
            "write has {} key values but the key ({}) has {} columns",
            w.key.len(),
            schema.key.join(", "),
            schema.key.len()
        ),
    })
}
