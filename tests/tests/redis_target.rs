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
    let mut target = RedisTarget::open(&server.url, Some("sm"), Some(300)).await?;
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
        .err()
        .expect("no server listens there");
    let msg = err.to_string();
    assert!(msg.contains("cannot connect"), "{msg}");
    assert!(
        !msg.contains("secret"),
        "the password is never shown: {msg}"
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    Ok(())
}
