//! The MongoDB adapter: capture with a change stream, apply by `_id` with
//! upserts and deletes in one transaction without echo. Written against
//! the official `mongodb` driver (rustls with ring). **Not run against a
//! server in this project's CI** (no MongoDB server can be installed on its
//! machines): the document ↔ row mapping is unit-tested here, and
//! `tests/tests/mongodb.rs` runs against a real replica set only when
//! `SYNCMESH_TEST_MONGODB_URL` is set.
//!
//! # Requirements
//!
//! A replica set (or sharded cluster) running MongoDB 6.0 or later: change
//! streams and transactions need a replica set, and the before and after
//! images of every change (needed for `sum` deltas and for updates of
//! whole rows) need `changeStreamPreAndPostImages`, which
//! [`MongoAdapter::install_capture`] enables on every synced collection
//! (`collMod`). `syncmesh check` reports each of these.
//!
//! # Documents and rows
//!
//! A collection is a table, keyed by `_id`; top-level fields are the
//! fields (field-level strategies apply to them); nested documents and
//! arrays are [`Value::Json`] values (relaxed Extended JSON). The fields
//! of a collection are read when the node starts (every top-level name in
//! the collection, plus those `resolve.fields` names): a document captured
//! later with a field the node does not know is an error naming
//! collection, document and field (restart the node to pick it up),
//! never a silently dropped field. See [`bson_to_value`] and
//! [`value_to_bson`] for each type.
//!
//! # Capture and the resume token
//!
//! One change stream on the database (`fullDocument` and
//! `fullDocumentBeforeChange` both `required`), filtered to the synced
//! collections and the marker collection. Each captured change's
//! `change_id` is its cluster time (`seconds << 32 | increment`). The
//! resume token after the last change handed out (with the apply
//! transactions still to skip) is the node's log-store record
//! [`RESUME_META`], written in the same flushed batch as the ops made from
//! those changes ([`crate::core::NodeCore::handle_captured_with_meta`]), so
//! a crash resumes exactly after the last durable change: nothing lost,
//! nothing twice.
//!
//! # Apply without echo
//!
//! [`MongoAdapter::apply`] runs one transaction whose first write is an
//! `$inc` of the marker document in `_syncmesh_applied`, then
//! `replaceOne(upsert)` / `deleteOne` by `_id`. Every event of a
//! transaction carries the transaction's `lsid` and `txnNumber`; the
//! capture side sees the marker's event first and skips every event of
//! that transaction. This needs no field in the user's documents and no
//! session state that a restart would lose (a marker field in each
//! document would show in the users' data; filtering on the node's own
//! session ids would not survive a restart). The watermark it returns is
//! the transaction's commit cluster time.
//!
//! Not yet: an initial snapshot of the documents a collection holds before
//! the node's first start (they are published when they next change), and
//! a run against a real server in CI.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use mongodb::bson::{self, Bson, Document, doc, spec::BinarySubtype};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use syncmesh_resolver::Value;

use crate::adapter::{CapturedChange, ChangeKind, ColumnInfo, RowWrite, TableSchema};
use crate::{Error, Result};

/// The node's log-store record holding the resume token.
pub const RESUME_META: &str = "mongodb.resume";
/// The collection whose marker document every apply transaction updates.
pub const MARKER_COLLECTION: &str = "_syncmesh_applied";
/// Most apply transactions remembered while their events are skipped.
const MAX_SKIPPED_TXNS: usize = 64;
/// How long one poll of the change stream waits for new events.
const AWAIT_MS: u64 = 20;

/// The key field of every collection.
pub const ID: &str = "_id";

/// A MongoDB database with syncmesh's capture and apply.
#[derive(Debug)]
pub struct MongoAdapter {
    client: mongodb::Client,
    db: mongodb::Database,
    /// The URL with the password redacted, for messages.
    url: String,
    collections: Vec<String>,
    /// The open change stream (in a mutex only to make the adapter `Sync`:
    /// it is used through `&mut self` alone).
    stream: std::sync::Mutex<Option<ChangeStream<ChangeStreamEvent<Document>>>>,
    /// Where the stream resumes (the last durable position).
    resume: Option<ResumeToken>,
    /// The position after the last change handed out by `read_changes`.
    pending: Option<Resume>,
    /// Apply transactions whose events are skipped: (lsid, txnNumber).
    skip: VecDeque<(Document, i64)>,
    /// The fields of each captured collection (set by `install_capture`).
    known: std::sync::Mutex<BTreeMap<String, TableSchema>>,
}

/// What [`RESUME_META`] holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Resume {
    /// The resume token (as BSON bytes of `{t: token}`).
    token: Vec<u8>,
    /// Apply transactions being skipped at that position (lsid as BSON bytes).
    skip: Vec<(Vec<u8>, i64)>,
}

impl MongoAdapter {
    /// Connects to a `mongodb://` or `mongodb+srv://` URL naming the
    /// database (`mongodb://HOST/DB?replicaSet=rs0`).
    pub async fn open(url: &str) -> Result<Self> {
        let shown = crate::config::Secret::new(url).redacted();
        let err = |message: String| Error::Database {
            database: shown.clone(),
            message,
        };
        let mut options = mongodb::options::ClientOptions::parse(url)
            .await
            .map_err(|e| err(format!("invalid URL: {}; use mongodb://USER:PASSWORD@HOST:PORT/DATABASE?replicaSet=NAME", crate::adapter::redact_password(&e.to_string(), url))))?;
        options.app_name = Some("syncmesh".into());
        options.server_selection_timeout = Some(Duration::from_secs(10));
        let Some(db_name) = options.default_database.clone().filter(|d| !d.is_empty()) else {
            return Err(err(
                "the URL names no database; use mongodb://USER:PASSWORD@HOST:PORT/DATABASE?replicaSet=NAME".into(),
            ));
        };
        let client = mongodb::Client::with_options(options).map_err(|e| {
            err(format!(
                "cannot create the client: {}",
                crate::adapter::redact_password(&e.to_string(), url)
            ))
        })?;
        let db = client.database(&db_name);
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| {
            err(format!(
                "cannot connect ({}); is mongod running and reachable at that host and port?",
                crate::adapter::redact_password(&e.to_string(), url)
            ))
        })?;
        Ok(Self {
            client,
            db,
            url: shown,
            collections: Vec::new(),
            stream: std::sync::Mutex::new(None),
            resume: None,
            pending: None,
            skip: VecDeque::new(),
            known: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn db_err(&self, what: &str, e: &mongodb::error::Error) -> Error {
        Error::Database {
            database: self.url.clone(),
            message: format!("{what}: {}", e.to_string().replace('\n', " ")),
        }
    }

    /// The server's `hello` reply (replica set name, etc.).
    pub async fn hello(&self) -> Result<Document> {
        self.db
            .run_command(doc! { "hello": 1 })
            .await
            .map_err(|e| self.db_err("asking the server who it is", &e))
    }

    /// The server version (`buildInfo`).
    pub async fn version(&self) -> Result<String> {
        let info = self
            .db
            .run_command(doc! { "buildInfo": 1 })
            .await
            .map_err(|e| self.db_err("reading the server version", &e))?;
        Ok(info.get_str("version").unwrap_or("unknown").to_owned())
    }

    /// What is missing for syncmesh on this server, one line each (empty
    /// when everything is there): a replica set, MongoDB 6.0+.
    pub async fn prerequisites(&self) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        let hello = self.hello().await?;
        let replica_set = hello.get_str("setName").is_ok();
        let sharded = hello.get_str("msg").is_ok_and(|m| m == "isdbgrid");
        if !replica_set && !sharded {
            missing.push(
                "the server is not a replica set member: change streams and transactions need one; start mongod with --replSet NAME and run rs.initiate() (a one-member replica set is enough)"
                    .to_owned(),
            );
        }
        let version = self.version().await?;
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 6 {
            missing.push(format!(
                "MongoDB {version}: syncmesh needs 6.0 or later (change stream pre- and post-images)"
            ));
        }
        Ok(missing)
    }

    /// The collections: `_id` is the key (a configured key must be
    /// `[_id]`), the fields every top-level field name found in the
    /// collection, sorted (the shell adds the fields `resolve.fields`
    /// names). A field whose values are all numbers is declared `NUMERIC`
    /// (so it may be a `sum`), others `BSON`.
    pub async fn introspect(
        &mut self,
        tables: &[(String, Vec<String>)],
    ) -> Result<Vec<TableSchema>> {
        let existing = self
            .db
            .list_collection_names()
            .await
            .map_err(|e| self.db_err("listing collections", &e))?;
        let mut out = Vec::new();
        for (name, key) in tables {
            if name.starts_with("_syncmesh_") || name.is_empty() || name.contains('$') {
                return Err(Error::Schema {
                    table: name.clone(),
                    message: "is not a usable collection name (names starting with `_syncmesh_` are reserved, `$` is not allowed)".into(),
                });
            }
            if !key.is_empty() && key.as_slice() != [ID.to_owned()] {
                return Err(Error::Schema {
                    table: name.clone(),
                    message: format!(
                        "configured key [{}]: a MongoDB collection is keyed by _id; set `key: [_id]` or leave it out",
                        key.join(", ")
                    ),
                });
            }
            if !existing.contains(name) {
                return Err(Error::Schema {
                    table: name.clone(),
                    message: format!(
                        "collection does not exist in database {} (collections: {}); create it or fix `tables:` in the config",
                        self.db.name(),
                        existing.join(", ")
                    ),
                });
            }
            let coll = self.db.collection::<Document>(name);
            let mut cursor = coll
                .aggregate(vec![
                    doc! { "$project": { "f": { "$objectToArray": "$$ROOT" } } },
                    doc! { "$unwind": "$f" },
                    doc! { "$group": {
                        "_id": "$f.k",
                        "nonnumeric": { "$sum": { "$cond": [
                            { "$in": [ { "$type": "$f.v" }, ["int", "long", "double", "decimal", "null"] ] }, 0, 1
                        ] } }
                    } },
                ])
                .await
                .map_err(|e| self.db_err(&format!("reading the fields of {name}"), &e))?;
            let mut fields: BTreeMap<String, bool> = BTreeMap::new();
            while cursor
                .advance()
                .await
                .map_err(|e| self.db_err(&format!("reading the fields of {name}"), &e))?
            {
                let d = cursor
                    .deserialize_current()
                    .map_err(|e| self.db_err(&format!("reading the fields of {name}"), &e))?;
                if let Ok(f) = d.get_str("_id") {
                    let numeric = match d.get("nonnumeric") {
                        Some(Bson::Int32(n)) => *n == 0,
                        Some(Bson::Int64(n)) => *n == 0,
                        _ => false,
                    };
                    fields.insert(f.to_owned(), numeric);
                }
            }
            fields.remove(ID);
            let mut columns = vec![ColumnInfo {
                name: ID.into(),
                decl_type: "BSON".into(),
                not_null: true,
            }];
            for (f, numeric) in fields {
                columns.push(ColumnInfo {
                    name: f,
                    decl_type: if numeric { "NUMERIC" } else { "BSON" }.into(),
                    not_null: false,
                });
            }
            out.push(TableSchema {
                name: name.clone(),
                columns,
                key: vec![ID.into()],
            });
        }
        self.collections = tables.iter().map(|(n, _)| n.clone()).collect();
        Ok(out)
    }

    /// Turns on pre- and post-images for every synced collection and
    /// creates the marker collection (idempotent).
    pub async fn install_capture(&self, schemas: &[TableSchema]) -> Result<()> {
        if let Ok(mut known) = self.known.lock() {
            *known = schemas
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect();
        }
        for s in schemas {
            self.db
                .run_command(doc! {
                    "collMod": s.name.as_str(),
                    "changeStreamPreAndPostImages": { "enabled": true },
                })
                .await
                .map_err(|e| {
                    self.db_err(
                        &format!("enabling changeStreamPreAndPostImages on {} (needs MongoDB 6.0+ and the collMod privilege)", s.name),
                        &e,
                    )
                })?;
        }
        let names = self
            .db
            .list_collection_names()
            .await
            .map_err(|e| self.db_err("listing collections", &e))?;
        if !names.iter().any(|n| n == MARKER_COLLECTION) {
            // A concurrent creation is fine (NamespaceExists).
            let _ = self.db.create_collection(MARKER_COLLECTION).await;
        }
        Ok(())
    }

    /// Restores the durable stream position (the [`RESUME_META`] record).
    pub fn restore(&mut self, record: Option<&[u8]>) -> Result<()> {
        let Some(bytes) = record else {
            return Ok(());
        };
        let corrupt = |m: String| Error::Store {
            path: RESUME_META.into(),
            message: format!(
                "corrupt MongoDB resume record: {m}; delete the node's data_dir to start over"
            ),
        };
        let r: Resume = postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
        self.resume = Some(token_from_bytes(&r.token).map_err(corrupt)?);
        self.skip = r
            .skip
            .iter()
            .map(|(l, t)| {
                Document::from_reader(&mut l.as_slice())
                    .map(|d| (d, *t))
                    .map_err(|e| corrupt(e.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The record to write with the ops of the changes `read_changes`
    /// handed out last (see the module docs).
    pub fn capture_meta(&self) -> Vec<crate::core::MetaWrite> {
        match &self.pending {
            Some(r) => postcard::to_allocvec(r)
                .map(|b| vec![(RESUME_META.to_owned(), Some(b))])
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// The cluster time now (0 when the server does not report one).
    pub async fn change_watermark(&self) -> Result<i64> {
        let hello = self.hello().await?;
        Ok(match hello.get("operationTime") {
            Some(Bson::Timestamp(t)) => pack(*t),
            _ => 0,
        })
    }

    async fn open_stream(&self) -> Result<ChangeStream<ChangeStreamEvent<Document>>> {
        let mut colls: Vec<Bson> = self
            .collections
            .iter()
            .map(|c| Bson::String(c.clone()))
            .collect();
        colls.push(Bson::String(MARKER_COLLECTION.into()));
        let mut watch = self
            .db
            .watch()
            .pipeline(vec![doc! { "$match": { "ns.coll": { "$in": colls } } }])
            .full_document(FullDocumentType::Required)
            .full_document_before_change(FullDocumentBeforeChangeType::Required)
            .max_await_time(Duration::from_millis(AWAIT_MS));
        if let Some(t) = &self.resume {
            watch = watch.resume_after(t.clone());
        }
        watch
            .await
            .map_err(|e| self.db_err("opening the change stream (needs a replica set, MongoDB 6.0+, and the changeStream privilege)", &e))
    }

    /// Up to `limit` captured changes after the durable position (the
    /// `after` checkpoint is the core's; the stream's own position is the
    /// resume token). Apply transactions are skipped.
    pub async fn read_changes(&mut self, _after: i64, limit: usize) -> Result<Vec<CapturedChange>> {
        // The shell reads again only after the changes handed out last
        // (and their resume record) are durable.
        if let Some(p) = self.pending.take() {
            self.resume = Some(token_from_bytes(&p.token).map_err(|m| Error::Store {
                path: RESUME_META.into(),
                message: format!("resume token: {m}"),
            })?);
        }
        let open = self.stream.get_mut().ok().and_then(Option::take);
        let mut stream = match open {
            Some(s) => s,
            None => self.open_stream().await?,
        };
        let mut out = Vec::new();
        while out.len() < limit {
            let ev = match stream.next_if_any().await {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    // Reopened from the durable position on the next poll.
                    self.pending = None;
                    return Err(self.db_err("reading the change stream", &e));
                }
            };
            let txn = match (&ev.lsid, ev.txn_number) {
                (Some(l), Some(n)) => Some((l.clone(), n)),
                _ => None,
            };
            let coll = ev
                .ns
                .as_ref()
                .and_then(|ns| ns.coll.clone())
                .unwrap_or_default();
            let change = if coll == MARKER_COLLECTION {
                if let Some(t) = txn {
                    self.skip.push_back(t);
                    while self.skip.len() > MAX_SKIPPED_TXNS {
                        self.skip.pop_front();
                    }
                }
                None
            } else if txn.as_ref().is_some_and(|t| self.skip.contains(t)) {
                None
            } else {
                self.to_change(&coll, &ev)?
            };
            self.pending = Some(Resume {
                token: token_to_bytes(&ev.id)?,
                skip: self
                    .skip
                    .iter()
                    .map(|(l, n)| Ok((bson_bytes(l)?, *n)))
                    .collect::<Result<_>>()?,
            });
            if let Some(c) = change {
                out.push(c);
            }
        }
        if let Ok(slot) = self.stream.get_mut() {
            *slot = Some(stream);
        }
        Ok(out)
    }

    fn to_change(
        &self,
        coll: &str,
        ev: &ChangeStreamEvent<Document>,
    ) -> Result<Option<CapturedChange>> {
        let bad = |m: String| Error::Schema {
            table: coll.to_owned(),
            message: m,
        };
        let kind = match ev.operation_type {
            OperationType::Insert => ChangeKind::Insert,
            OperationType::Update | OperationType::Replace => ChangeKind::Update,
            OperationType::Delete => ChangeKind::Delete,
            ref other => {
                return Err(bad(format!(
                    "change stream event {other:?}: dropping, renaming or invalidating a synced collection cannot be synced; recreate the collection and restart the node"
                )));
            }
        };
        let change_id = ev.cluster_time.map(pack).unwrap_or(0);
        let row = |d: Option<&Document>, what: &str| -> Result<Option<BTreeMap<String, Value>>> {
            match d {
                None => Err(bad(format!(
                    "a {what} image is missing from a change stream event; enable changeStreamPreAndPostImages (the node does on start) and keep the pre-images until the node has read them"
                ))),
                Some(d) => {
                    let r =
                        doc_to_row(d).map_err(|m| bad(format!("document {}: {m}", id_text(d))))?;
                    let known = self.known.lock().ok().and_then(|k| k.get(coll).cloned());
                    if let Some(schema) = known {
                        check_fields(&schema, &r)
                            .map_err(|m| bad(format!("document {}: {m}", id_text(d))))?;
                    }
                    Ok(Some(r))
                }
            }
        };
        let (old, new) = match kind {
            ChangeKind::Insert => (None, row(ev.full_document.as_ref(), "post")?),
            ChangeKind::Update => (
                row(ev.full_document_before_change.as_ref(), "pre")?,
                row(ev.full_document.as_ref(), "post")?,
            ),
            ChangeKind::Delete => (row(ev.full_document_before_change.as_ref(), "pre")?, None),
        };
        Ok(Some(CapturedChange {
            change_id,
            table: coll.to_owned(),
            kind,
            old,
            new,
        }))
    }

    /// Writes the visible rows in one transaction (marker first, see the
    /// module docs) and returns its commit cluster time. Every document is
    /// converted before the transaction starts: a value MongoDB cannot hold
    /// exactly is an error naming collection, field and value, and nothing
    /// is written.
    pub async fn apply(&self, schemas: &[TableSchema], writes: &[RowWrite]) -> Result<i64> {
        if writes.is_empty() {
            return self.change_watermark().await;
        }
        let mut planned = Vec::with_capacity(writes.len());
        for w in writes {
            if !schemas.iter().any(|s| s.name == w.table) {
                return Err(Error::Schema {
                    table: w.table.clone(),
                    message: "is not a synced collection of this database; add it to `tables:` or check the sender".into(),
                });
            }
            let [key] = w.key.as_slice() else {
                return Err(Error::Schema {
                    table: w.table.clone(),
                    message: format!(
                        "write has {} key values; a collection is keyed by _id alone",
                        w.key.len()
                    ),
                });
            };
            let id = key_to_bson(key).map_err(|m| Error::Schema {
                table: w.table.clone(),
                message: format!("_id: {m}"),
            })?;
            let doc = match &w.row {
                None => None,
                Some(row) => Some(row_to_doc(&id, row).map_err(|m| Error::Schema {
                    table: w.table.clone(),
                    message: m,
                })?),
            };
            planned.push((w.table.as_str(), id, doc));
        }
        let err = |e: mongodb::error::Error| self.db_err("applying rows (aborted)", &e);
        let mut session = self.client.start_session().await.map_err(err)?;
        session.start_transaction().await.map_err(err)?;
        let res: mongodb::error::Result<()> = async {
            self.db
                .collection::<Document>(MARKER_COLLECTION)
                .update_one(doc! { "_id": "apply" }, doc! { "$inc": { "n": 1_i64 } })
                .upsert(true)
                .session(&mut session)
                .await?;
            for (table, id, doc) in &planned {
                let coll = self.db.collection::<Document>(table);
                match doc {
                    Some(d) => {
                        coll.replace_one(doc! { "_id": id.clone() }, d.clone())
                            .upsert(true)
                            .session(&mut session)
                            .await?;
                    }
                    None => {
                        coll.delete_one(doc! { "_id": id.clone() })
                            .session(&mut session)
                            .await?;
                    }
                }
            }
            session.commit_transaction().await
        }
        .await;
        if let Err(e) = res {
            let _ = session.abort_transaction().await;
            return Err(err(e));
        }
        Ok(session.operation_time().map(pack).unwrap_or(0))
    }

    /// Every document of a collection as rows, ordered by `_id`.
    pub async fn dump_table(&self, schema: &TableSchema) -> Result<Vec<BTreeMap<String, Value>>> {
        let coll = self.db.collection::<Document>(&schema.name);
        let mut cursor = coll
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .await
            .map_err(|e| self.db_err(&format!("reading {}", schema.name), &e))?;
        let mut out = Vec::new();
        while cursor
            .advance()
            .await
            .map_err(|e| self.db_err(&format!("reading {}", schema.name), &e))?
        {
            let d = cursor
                .deserialize_current()
                .map_err(|e| self.db_err(&format!("reading {}", schema.name), &e))?;
            out.push(doc_to_row(&d).map_err(|m| Error::Schema {
                table: schema.name.clone(),
                message: format!("document {}: {m}", id_text(&d)),
            })?);
        }
        Ok(out)
    }

    /// The database handle (tests and `check` use it like a user would).
    pub fn database(&self) -> &mongodb::Database {
        &self.db
    }

    /// Closes the change stream (the client closes when dropped).
    pub async fn close(&self) {}
}

/// Checks that every top-level field of a captured row is a known column
/// of `schema` (see the module docs): a field the node does not know is an
/// error naming it, never dropped.
pub fn check_fields(
    schema: &TableSchema,
    row: &BTreeMap<String, Value>,
) -> std::result::Result<(), String> {
    let known: BTreeSet<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
    match row.keys().find(|k| !known.contains(k.as_str())) {
        Some(f) => Err(format!(
            "has field `{f}`, which the node did not find in the collection when it started; restart the node to pick it up"
        )),
        None => Ok(()),
    }
}

/// Cluster time as an ordered i64: seconds in the high 32 bits.
fn pack(t: bson::Timestamp) -> i64 {
    (i64::from(t.time) << 32) | i64::from(t.increment)
}

fn bson_bytes(d: &Document) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    d.to_writer(&mut out).map_err(|e| Error::Store {
        path: RESUME_META.into(),
        message: format!("cannot encode the resume record: {e}"),
    })?;
    Ok(out)
}

fn token_to_bytes(t: &ResumeToken) -> Result<Vec<u8>> {
    let b = bson::to_bson(t).map_err(|e| Error::Store {
        path: RESUME_META.into(),
        message: format!("cannot encode the resume token: {e}"),
    })?;
    bson_bytes(&doc! { "t": b })
}

fn token_from_bytes(bytes: &[u8]) -> std::result::Result<ResumeToken, String> {
    let d = Document::from_reader(&mut &bytes[..]).map_err(|e| e.to_string())?;
    let t = d.get("t").cloned().ok_or("no token")?;
    bson::from_bson(t).map_err(|e| e.to_string())
}

fn id_text(d: &Document) -> String {
    d.get(ID)
        .map_or_else(|| "without _id".to_owned(), |v| format!("_id {v}"))
}

/// A document as a row: `_id` and every top-level field, each through
/// [`bson_to_value`] (`_id` an ObjectId: its hex text).
pub fn doc_to_row(d: &Document) -> std::result::Result<BTreeMap<String, Value>, String> {
    let mut row = BTreeMap::new();
    for (k, v) in d {
        let value = if k == ID {
            match v {
                Bson::ObjectId(o) => Value::Text(o.to_hex()),
                Bson::Document(_) | Bson::Array(_) => {
                    return Err(
                        "_id is a document or array, which syncmesh does not support as a key"
                            .into(),
                    );
                }
                other => bson_to_value(other),
            }
        } else {
            bson_to_value(v)
        };
        row.insert(k.clone(), value);
    }
    if !row.contains_key(ID) {
        return Err("has no _id".into());
    }
    Ok(row)
}

/// One BSON value as a mesh value (see the README's type-mapping table):
/// null/undefined → `Null`, boolean → `Bool`, int32/int64 → `Int`, double →
/// `Float`, decimal128 → `Decimal`, string → `Text`, generic binary →
/// `Bytes`, date → `Timestamp` (µs), documents and arrays → `Json`
/// (relaxed Extended JSON), anything else (ObjectId, timestamps, regular
/// expressions, other binary subtypes, …) → `Json` as canonical Extended
/// JSON, so it is written back as the same BSON value.
pub fn bson_to_value(v: &Bson) -> Value {
    match v {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Int32(i) => Value::Int(i64::from(*i)),
        Bson::Int64(i) => Value::Int(*i),
        Bson::Double(f) => Value::Float(*f),
        Bson::Decimal128(d) => Value::Decimal(d.to_string()),
        Bson::String(s) => Value::Text(s.clone()),
        Bson::Binary(b) if b.subtype == BinarySubtype::Generic => Value::Bytes(b.bytes.clone()),
        Bson::DateTime(t) => Value::Timestamp(t.timestamp_millis().saturating_mul(1000)),
        Bson::Document(_) | Bson::Array(_) => {
            Value::Json(v.clone().into_relaxed_extjson().to_string())
        }
        other => Value::Json(other.clone().into_canonical_extjson().to_string()),
    }
}

/// A mesh value as BSON for a non-key field; `Err` when MongoDB cannot
/// hold it exactly.
pub fn value_to_bson(v: &Value) -> std::result::Result<Bson, String> {
    Ok(match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Int(i) => Bson::Int64(*i),
        Value::Float(f) => Bson::Double(*f),
        Value::Decimal(s) => {
            let d: bson::Decimal128 = s
                .parse()
                .map_err(|_| format!("the decimal {s} does not fit a decimal128 (34 digits)"))?;
            // Exact when the coefficient has at most 34 digits.
            let digits = s
                .bytes()
                .filter(u8::is_ascii_digit)
                .skip_while(|b| *b == b'0')
                .count();
            if digits > 34 {
                return Err(format!(
                    "the decimal {s} has more than the 34 digits a decimal128 holds"
                ));
            }
            Bson::Decimal128(d)
        }
        Value::Text(s) => Bson::String(s.clone()),
        Value::Bytes(b) => Bson::Binary(bson::Binary {
            subtype: BinarySubtype::Generic,
            bytes: b.clone(),
        }),
        Value::Timestamp(us) => {
            if us % 1000 != 0 {
                return Err(format!(
                    "the timestamp {us} µs has sub-millisecond digits, which a BSON date cannot hold"
                ));
            }
            Bson::DateTime(bson::DateTime::from_millis(us / 1000))
        }
        Value::Json(s) => {
            let j: serde_json::Value =
                serde_json::from_str(s).map_err(|e| format!("invalid JSON ({e})"))?;
            Bson::try_from(j).map_err(|e| format!("invalid Extended JSON ({e})"))?
        }
    })
}

/// A key value as `_id`: a 24-digit lowercase hex text is an ObjectId
/// (that is how ObjectIds are captured), other values as [`value_to_bson`].
pub fn key_to_bson(v: &Value) -> std::result::Result<Bson, String> {
    match v {
        Value::Text(s)
            if s.len() == 24 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
        {
            bson::oid::ObjectId::parse_str(s)
                .map(Bson::ObjectId)
                .map_err(|e| e.to_string())
        }
        Value::Null => Err("a null key".into()),
        Value::Json(_) => {
            Err("a JSON key (document or array), which syncmesh does not support as _id".into())
        }
        other => value_to_bson(other),
    }
}

/// The document for a visible row: `_id` first, then every field (a
/// NULL as null).
pub fn row_to_doc(
    id: &Bson,
    row: &BTreeMap<String, Value>,
) -> std::result::Result<Document, String> {
    let mut d = Document::new();
    d.insert(ID, id.clone());
    for (k, v) in row {
        if k == ID {
            continue;
        }
        if k.starts_with('$') || k.contains('\0') {
            return Err(format!("field `{k}` is not a valid MongoDB field name"));
        }
        let b = value_to_bson(v).map_err(|m| format!("field {k}: {m}"))?;
        d.insert(k.clone(), b);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn documents_map_to_rows_and_back_exactly() {
        let oid = bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        let d = doc! {
            "_id": oid,
            "n": 7_i32,
            "big": i64::MAX,
            "f": 0.1_f64,
            "dec": "12.345".parse::<bson::Decimal128>().unwrap(),
            "s": "text",
            "b": true,
            "nil": Bson::Null,
            "bin": bson::Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 255] },
            "when": bson::DateTime::from_millis(1_704_164_645_123),
            "nested": { "a": 1_i32, "list": [1_i32, "x"] },
            "arr": [1.5_f64, { "k": "v" }],
            "ref": bson::oid::ObjectId::parse_str("65a1b2c3d4e5f60718293a4c").unwrap(),
        };
        let row = doc_to_row(&d).unwrap();
        assert_eq!(row["_id"], Value::Text("65a1b2c3d4e5f60718293a4b".into()));
        assert_eq!(row["n"], Value::Int(7));
        assert_eq!(row["big"], Value::Int(i64::MAX));
        assert_eq!(row["f"], Value::Float(0.1));
        assert_eq!(row["s"], Value::Text("text".into()));
        assert_eq!(row["b"], Value::Bool(true));
        assert_eq!(row["nil"], Value::Null);
        assert_eq!(row["bin"], Value::Bytes(vec![0, 255]));
        assert_eq!(row["when"], Value::Timestamp(1_704_164_645_123_000));
        assert!(matches!(&row["nested"], Value::Json(j) if j.contains("\"list\"")));
        assert!(matches!(&row["ref"], Value::Json(j) if j.contains("$oid")));
        // And back: the same BSON (int32 comes back as int64, the same number).
        let id = key_to_bson(&row["_id"]).unwrap();
        assert_eq!(id, Bson::ObjectId(oid));
        let back = row_to_doc(&id, &row).unwrap();
        for (k, v) in &d {
            let got = back.get(k).unwrap();
            match (v, got) {
                (Bson::Int32(a), Bson::Int64(b)) => assert_eq!(i64::from(*a), *b),
                (Bson::Document(_) | Bson::Array(_), _) => {
                    assert_eq!(
                        v.clone().into_relaxed_extjson(),
                        got.clone().into_relaxed_extjson(),
                        "{k}"
                    )
                }
                _ => assert_eq!(v, got, "{k}"),
            }
        }
        assert_eq!(
            doc_to_row(&back).unwrap(),
            row,
            "row -> document -> row is exact"
        );
    }

    #[test]
    fn values_mongodb_cannot_hold_are_refused_by_name() {
        let e = value_to_bson(&Value::Timestamp(1_000_001)).unwrap_err();
        assert!(
            e.contains("1000001") && e.contains("sub-millisecond"),
            "{e}"
        );
        assert!(value_to_bson(&Value::Json("{".into())).is_err());
        assert!(value_to_bson(&Value::Decimal("1".repeat(40))).is_err());
        assert_eq!(
            value_to_bson(&Value::Decimal("-12.50".into())).unwrap(),
            Bson::Decimal128("-12.50".parse().unwrap())
        );
        let id = Bson::Int64(1);
        let e = row_to_doc(&id, &BTreeMap::from([("q".into(), Value::Timestamp(1))])).unwrap_err();
        assert!(e.contains("field q"), "{e}");
        assert!(row_to_doc(&id, &BTreeMap::from([("$x".into(), Value::Int(1))])).is_err());
        assert!(key_to_bson(&Value::Null).is_err());
        assert_eq!(key_to_bson(&Value::Int(5)).unwrap(), Bson::Int64(5));
        assert_eq!(
            key_to_bson(&Value::Text("abc".into())).unwrap(),
            Bson::String("abc".into())
        );
        assert!(
            doc_to_row(&doc! { "a": 1_i32 }).is_err(),
            "a document without _id"
        );
        assert!(doc_to_row(&doc! { "_id": { "a": 1_i32 } }).is_err());
    }

    #[test]
    fn unknown_fields_are_named_not_dropped() {
        let schema = TableSchema {
            name: "c".into(),
            columns: vec![ColumnInfo {
                name: ID.into(),
                decl_type: "BSON".into(),
                not_null: true,
            }],
            key: vec![ID.into()],
        };
        let row = BTreeMap::from([(ID.into(), Value::Int(1)), ("new".into(), Value::Int(2))]);
        let e = check_fields(&schema, &row).unwrap_err();
        assert!(e.contains("`new`") && e.contains("restart"), "{e}");
    }

    #[test]
    fn cluster_times_keep_their_order_and_passwords_stay_out_of_errors() {
        let t = |time, increment| pack(bson::Timestamp { time, increment });
        assert!(t(1, 5) < t(2, 0));
        assert!(t(2, 0) < t(2, 1));
        assert_eq!(
            crate::adapter::redact_password("auth failed for s3cret", "mongodb://u:s3cret@h/db"),
            "auth failed for ***"
        );
    }
}
