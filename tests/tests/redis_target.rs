//! The Redis cache target against a real `redis-server` on 127.0.0.1.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use syncmesh_node::adapter::RowWrite;
use syncmesh_node::redis::RedisTarget;
use syncmesh_resolver::Value;
use syncmesh_tests::redis::RedisServer;

fn write(table: &str, id: i64, row: Option<&[(&str, Value)]>) -> RowWrite {
    RowWrite {
        table: table.into(),
        key: vec![Value::Int(id)],
        row: row.map(|r| {
            r.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        }),
    }
}

#[tokio::test]
async fn rows_become_hashes_deletes_remove_keys_and_ttl_is_set() -> Result<()> {
    let server = RedisServer::start().await?;
    let target = RedisTarget::open(&server.url, Some("sm"), Some(300)).await?;
    let mut c = server.conn().await?;
    let a = [
        ("id", Value::Int(1)),
        ("item", Value::Text("apple".into())),
        ("price", Value::Float(0.1)),
        ("note", Value::Null),
        ("at", Value::Timestamp(0)),
    ];
    let b = [("id", Value::Int(2)), ("item", Value::Text("pear".into()))];
    target
        .apply(&[write("orders", 1, Some(&a)), write("orders", 2, Some(&b))])
        .await?;
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("sm:orders:1")
        .query_async(&mut c)
        .await?;
    assert_eq!(
        h,
        HashMap::from([
            ("id".to_owned(), "1".to_owned()),
            ("item".to_owned(), "apple".to_owned()),
            ("price".to_owned(), "0.1".to_owned()),
            ("at".to_owned(), "1970-01-01T00:00:00.000000Z".to_owned()),
        ]),
        "a NULL field is absent from the hash"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg("sm:orders:1")
        .query_async(&mut c)
        .await?;
    assert!((1..=300).contains(&ttl), "ttl {ttl}");

    // An update replaces the hash (a field that became NULL disappears);
    // a delete removes the key.
    let a2 = [
        ("id", Value::Int(1)),
        ("item", Value::Null),
        ("price", Value::Float(2.5)),
    ];
    target
        .apply(&[write("orders", 1, Some(&a2)), write("orders", 2, None)])
        .await?;
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("sm:orders:1")
        .query_async(&mut c)
        .await?;
    assert_eq!(
        h,
        HashMap::from([
            ("id".to_owned(), "1".to_owned()),
            ("price".to_owned(), "2.5".to_owned()),
        ])
    );
    let exists: i64 = redis::cmd("EXISTS")
        .arg("sm:orders:2")
        .query_async(&mut c)
        .await?;
    assert_eq!(exists, 0, "the deleted row's key is gone");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_server_is_one_clear_error() -> Result<()> {
    let port = syncmesh_tests::free_port();
    let err = RedisTarget::open(&format!("redis://:secret@127.0.0.1:{port}/0"), None, None)
        .await
        .expect_err("no server listens there");
    let msg = err.to_string();
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(
        !msg.contains("secret"),
        "the password is never shown: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    Ok(())
}

/// Two SQLite nodes write (inserts, counter increments, an update, a
/// delete); a subscribe-only node keeps a Redis cache: it ends holding
/// exactly the visible rows, with the counter totals, and nothing is
/// captured from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_subscriber_holds_the_mesh_rows() -> Result<()> {
    use std::time::Duration;
    use syncmesh_node::config::Config;
    use syncmesh_tests::{create_db, free_port, wait_until};

    let server = RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let ddl = "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER NOT NULL DEFAULT 0)";
    let url_a = create_db(&dir.path().join("a.db"), ddl).await?;
    let url_b = create_db(&dir.path().join("b.db"), ddl).await?;
    let port = free_port();
    let yaml = format!(
        r#"
hub: {{ listen: "127.0.0.1:{port}", data_dir: ./hub }}
nodes:
  - {{ name: a, hub: "http://127.0.0.1:{port}", data_dir: ./a, database: {{ type: sqlite, url: "{url_a}" }} }}
  - {{ name: b, hub: "http://127.0.0.1:{port}", data_dir: ./b, database: {{ type: sqlite, url: "{url_b}" }} }}
  - name: cache
    hub: "http://127.0.0.1:{port}"
    data_dir: ./cache
    mode: subscribe
    database: {{ type: redis, url: "{redis}", key_prefix: "sm", ttl: 1h }}
tables:
  - name: orders
    key: [id]
    resolve: {{ fields: {{ qty: sum }} }}
"#,
        redis = server.url
    );
    let cfg = Config::parse(&yaml, "<test>", dir.path())?;
    let _hub = syncmesh::mesh::start_hub_from(&cfg, cfg.hub()?).await?;
    let _a = syncmesh_node::shell::start_node(&cfg, "a").await?;
    let _b = syncmesh_node::shell::start_node(&cfg, "b").await?;
    let _cache = syncmesh_node::shell::start_node(&cfg, "cache").await?;
    let pool_a = sqlx::SqlitePool::connect(&url_a).await?;
    let pool_b = sqlx::SqlitePool::connect(&url_b).await?;
    for id in 1..=10 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO orders VALUES ({id}, 'item{id}', {id})"
        )))
        .execute(&pool_a)
        .await?;
    }
    // b sees a's rows, then increments some counters and renames one; a
    // deletes row 10 and increments row 1 too.
    wait_until("b holds a's rows", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool_b)
            .await?;
        Ok(n == 10)
    })
    .await?;
    sqlx::query("UPDATE orders SET qty = qty + 100 WHERE id <= 3")
        .execute(&pool_b)
        .await?;
    sqlx::query("UPDATE orders SET item = 'renamed' WHERE id = 5")
        .execute(&pool_b)
        .await?;
    sqlx::query("UPDATE orders SET qty = qty + 1000 WHERE id = 1")
        .execute(&pool_a)
        .await?;
    sqlx::query("DELETE FROM orders WHERE id = 10")
        .execute(&pool_a)
        .await?;
    let mut want: BTreeMap<String, HashMap<String, String>> = BTreeMap::new();
    for id in 1..=9i64 {
        let qty = id + if id <= 3 { 100 } else { 0 } + if id == 1 { 1000 } else { 0 };
        let item = if id == 5 {
            "renamed".to_owned()
        } else {
            format!("item{id}")
        };
        want.insert(
            format!("sm:orders:{id}"),
            HashMap::from([
                ("id".to_owned(), id.to_string()),
                ("item".to_owned(), item),
                ("qty".to_owned(), qty.to_string()),
            ]),
        );
    }
    let c = server.conn().await?;
    let res = wait_until(
        "the cache holds the visible rows",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let want = &want;
            async move { Ok(&cache(c).await? == want) }
        },
    )
    .await;
    if res.is_err() {
        assert_eq!(cache(c.clone()).await?, want, "{res:?}");
    }
    let mut c = c;
    let ttl: i64 = redis::cmd("TTL")
        .arg("sm:orders:1")
        .query_async(&mut c)
        .await?;
    assert!((1..=3600).contains(&ttl), "ttl {ttl}");
    let status = syncmesh::mesh::hub_status(&format!("http://127.0.0.1:{port}")).await?;
    assert_eq!(
        status.total_ops, 16,
        "one op per changed row: 10 inserts, 3 + 1 + 1 updates, 1 delete; the cache made none"
    );
    Ok(())
}

async fn cache(
    mut c: redis::aio::MultiplexedConnection,
) -> Result<BTreeMap<String, HashMap<String, String>>> {
    let keys: Vec<String> = redis::cmd("KEYS").arg("sm:*").query_async(&mut c).await?;
    let mut got = BTreeMap::new();
    for k in keys {
        let h: HashMap<String, String> = redis::cmd("HGETALL").arg(&k).query_async(&mut c).await?;
        got.insert(k, h);
    }
    Ok(got)
}
