//! MongoDB as a peer, against a real replica set: runs only when
//! `SYNCMESH_TEST_MONGODB_URL` names one on 127.0.0.1 (MongoDB 6.0+, e.g.
//! `mongodb://127.0.0.1:27017/?replicaSet=rs0`); otherwise it prints one
//! line saying it was not run and why. No MongoDB server can be installed
//! on this project's machines, so CI does not run it; the document ↔ row
//! mapping is unit-tested in `node/src/mongodb.rs` on every run.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use mongodb::bson::{Document, doc};
use syncmesh::mesh::{hub_status, start_hub_from};
use syncmesh_node::adapter::Db;
use syncmesh_node::config::Config;
use syncmesh_node::shell::start_node;
use syncmesh_resolver::Value;
use syncmesh_tests::{free_port, wait_until};

const LONG: Duration = Duration::from_secs(60);

/// `base` with its database replaced by `db`.
fn url_with_db(base: &str, db: &str) -> Result<String> {
    let (scheme, rest) = base
        .split_once("://")
        .context("SYNCMESH_TEST_MONGODB_URL is not a mongodb:// URL")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let hosts = rest.split('/').next().unwrap_or(rest);
    Ok(format!("{scheme}://{hosts}/{db}{query}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_replica_set_syncs_with_sqlite_both_ways_without_echo() -> Result<()> {
    let Ok(base) = std::env::var("SYNCMESH_TEST_MONGODB_URL") else {
        println!(
            "mongodb tests: NOT RUN: SYNCMESH_TEST_MONGODB_URL is not set (no MongoDB server can be installed here; set it to a MongoDB 6.0+ replica set on 127.0.0.1, e.g. mongodb://127.0.0.1:27017/?replicaSet=rs0)"
        );
        return Ok(());
    };
    let hosts = base
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    if !hosts.split(',').all(|h| {
        h.rsplit('@')
            .next()
            .is_some_and(|h| h.starts_with("127.0.0.1") || h.starts_with("localhost"))
    }) {
        bail!(
            "SYNCMESH_TEST_MONGODB_URL must point at 127.0.0.1 (tests use loopback only), got hosts {hosts}"
        );
    }
    let db_name = format!("syncmesh_test_{}", std::process::id());
    let mongo_url = url_with_db(&base, &db_name)?;
    let client = mongodb::Client::with_uri_str(&mongo_url).await?;
    let mdb = client.database(&db_name);
    mdb.drop().await?;
    mdb.create_collection("orders").await?;
    let orders = mdb.collection::<Document>("orders");
    // The fields are read from the collection at start: a seed document
    // (also in SQLite, as neither side publishes existing rows).
    orders
        .insert_one(doc! { "_id": 0_i64, "item": "seed", "qty": 0_i64 })
        .await?;
    let dir = tempfile::tempdir()?;
    let lite_url = syncmesh_tests::create_db(
        &dir.path().join("lite.db"),
        "CREATE TABLE orders (_id INTEGER PRIMARY KEY, item TEXT, qty INTEGER)",
    )
    .await?;
    let mut lite_db = Db::open(&syncmesh_node::config::DatabaseConfig {
        kind: syncmesh_node::config::DatabaseKind::Sqlite,
        url: syncmesh_node::config::Secret::new(lite_url.clone()),
        slot: None,
        publication: None,
        capture: Default::default(),
        key_prefix: None,
        ttl_seconds: None,
    })
    .await?;
    let Db::Sqlite(lite) = &lite_db else {
        bail!("not sqlite")
    };
    sqlx::raw_sql("INSERT INTO orders VALUES (0, 'seed', 0)")
        .execute(lite.pool())
        .await?;
    let port = free_port();
    let yaml = format!(
        r#"
hub: {{ listen: "127.0.0.1:{port}", data_dir: ./hub }}
nodes:
  - {{ name: mongo, hub: "http://127.0.0.1:{port}", data_dir: ./mongo, database: {{ type: mongodb, url: "{mongo_url}" }} }}
  - {{ name: lite, hub: "http://127.0.0.1:{port}", data_dir: ./lite, database: {{ type: sqlite, url: "{lite_url}" }} }}
tables:
  - name: orders
    key: [_id]
    resolve: {{ fields: {{ qty: sum }} }}
"#
    );
    let cfg = Config::parse(&yaml, "<test>", dir.path())?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let hub_url = hub.url();
    let mongo_node = start_node(&cfg, "mongo").await.context("starting mongo")?;
    let lite_node = start_node(&cfg, "lite").await.context("starting lite")?;
    let schema = lite_db
        .introspect(&[("orders".to_owned(), vec!["_id".to_owned()])])
        .await?
        .remove(0);
    let row = |id: i64, item: &str, qty: i64| {
        BTreeMap::from([
            ("_id".to_owned(), Value::Int(id)),
            ("item".to_owned(), Value::Text(item.to_owned())),
            ("qty".to_owned(), Value::Int(qty)),
        ])
    };
    // MongoDB -> SQLite.
    orders
        .insert_one(doc! { "_id": 1_i64, "item": "from-mongo", "qty": 5_i64 })
        .await?;
    wait_until("the MongoDB insert to reach SQLite", LONG, || async {
        Ok(lite_db.dump_table(&schema).await? == vec![row(0, "seed", 0), row(1, "from-mongo", 5)])
    })
    .await?;
    // SQLite -> MongoDB, and increments on both sides all count.
    let Db::Sqlite(lite) = &lite_db else {
        bail!("not sqlite")
    };
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 'from-lite', 1); UPDATE orders SET qty = qty + 10 WHERE _id = 1")
        .execute(lite.pool())
        .await?;
    orders
        .update_one(doc! { "_id": 1_i64 }, doc! { "$inc": { "qty": 100_i64 } })
        .await?;
    let want = vec![
        row(0, "seed", 0),
        row(1, "from-mongo", 115),
        row(2, "from-lite", 1),
    ];
    wait_until("both sides to converge", LONG, || async {
        let mut got = Vec::new();
        let mut cursor = orders.find(doc! {}).sort(doc! { "_id": 1 }).await?;
        while cursor.advance().await? {
            let d = cursor.deserialize_current()?;
            got.push(syncmesh_node::mongodb::doc_to_row(&d).map_err(anyhow::Error::msg)?);
        }
        Ok(got == want && lite_db.dump_table(&schema).await? == want)
    })
    .await?;
    // Delete on MongoDB.
    orders.delete_one(doc! { "_id": 2_i64 }).await?;
    wait_until("the delete to reach SQLite", LONG, || async {
        Ok(lite_db.dump_table(&schema).await?.len() == 2)
    })
    .await?;
    // No echo: exactly one op per local write (mongo: insert, $inc,
    // delete; lite: insert, update).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hub_status(&hub_url).await?.total_ops,
        5,
        "one op per local write"
    );
    mongo_node.shutdown().await?;
    lite_node.shutdown().await?;
    hub.shutdown().await?;
    mdb.drop().await?;
    Ok(())
}
