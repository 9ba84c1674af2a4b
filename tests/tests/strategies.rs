//! Field strategies end to end: three SQLite nodes edit the same rows while
//! partitioned; after the heal every replica shows exactly what the rules
//! say, and the hub lists each conflict once.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use anyhow::Result;
use syncmesh::conflicts::fetch;
use syncmesh::demo::Mesh;
use syncmesh::mesh::hub_status;
use syncmesh_node::wire::value_from_proto;
use syncmesh_resolver::Value;

const DDL: [&str; 2] = [
    "CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        balance INTEGER NOT NULL DEFAULT 0,
        last_login INTEGER,
        status TEXT,
        owner TEXT,
        note TEXT)",
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)",
];

const TABLES: &str = "tables:
  - name: accounts
    deletes: delete_wins
    resolve:
      default: last_write_wins
      fields:
        balance: sum
        last_login: max
        status: { priority_order: [active, pending, inactive] }
        owner: source_priority
  - name: items
    deletes: delete_wins
";

fn account(
    balance: i64,
    last_login: i64,
    status: &str,
    owner: &str,
    note: &str,
) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("id".to_owned(), Value::Int(1)),
        ("balance".to_owned(), Value::Int(balance)),
        ("last_login".to_owned(), Value::Int(last_login)),
        ("status".to_owned(), Value::Text(status.into())),
        ("owner".to_owned(), Value::Text(owner.into())),
        ("note".to_owned(), Value::Text(note.into())),
    ])
}

async fn offline_all(mesh: &Mesh, online: bool) {
    for n in &mesh.nodes {
        n.set_online(online).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_resolves_a_partition_as_configured() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Node priorities from the demo config: edge-a 1, edge-b 2, edge-c 3.
    let mesh = Mesh::start_with(dir.path(), 500, &DDL, TABLES).await?;
    mesh.exec(
        0,
        "INSERT INTO accounts VALUES (1, 100, 10, 'pending', 'a', 'n0')",
    )
    .await?;
    mesh.exec(0, "INSERT INTO items VALUES (1, 'x')").await?;
    mesh.wait_converged().await?;

    offline_all(&mesh, false).await;
    mesh.exec(0, "UPDATE accounts SET balance = balance + 5, last_login = 50, status = 'inactive', owner = 'from-a', note = 'note-a' WHERE id = 1").await?;
    // Capture stamps the HLC: let each node capture before the next writes,
    // so "later" in wall time is later in HLC order too.
    mesh.wait_captured(0).await?;
    mesh.exec(1, "UPDATE accounts SET balance = balance + 7, last_login = 40, status = 'active', owner = 'from-b', note = 'note-b' WHERE id = 1").await?;
    mesh.exec(1, "DELETE FROM items WHERE id = 1").await?;
    mesh.wait_captured(1).await?;
    mesh.exec(2, "UPDATE accounts SET balance = balance - 2, last_login = 30, owner = 'from-c', note = 'note-c' WHERE id = 1").await?;
    mesh.exec(2, "UPDATE items SET name = 'y' WHERE id = 1")
        .await?;
    mesh.exec(2, "UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    offline_all(&mesh, true).await;
    mesh.wait_converged().await?;

    let expected = account(100 + 5 + 7 - 2 + 1, 50, "active", "from-c", "note-c");
    for (i, (name, db)) in mesh.dbs.iter().enumerate() {
        let accounts = db.dump_table(&mesh.schemas[0]).await?;
        assert_eq!(accounts, vec![expected.clone()], "accounts at {name}");
        let items = db.dump_table(&mesh.schemas[1]).await?;
        assert!(
            items.is_empty(),
            "delete_wins: item stays deleted at {name} ({i})"
        );
    }

    // Conflicts: one record each for last_login, status, owner and note;
    // never for the counter.
    let reply = fetch(&mesh.hub_url, Some("accounts"), 0).await?;
    let mut by_field: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for c in &reply.conflicts {
        by_field.entry(c.field.clone()).or_default().push(c.clone());
    }
    assert!(
        !by_field.contains_key("balance"),
        "sum never conflicts: {by_field:?}"
    );
    let expect = [
        ("last_login", "max", 3, Value::Int(50)),
        ("status", "priority_order", 2, Value::Text("active".into())),
        ("owner", "source_priority", 3, Value::Text("from-c".into())),
        ("note", "last_write_wins", 3, Value::Text("note-c".into())),
    ];
    for (field, strategy, n, result) in expect {
        let records = by_field
            .get(field)
            .unwrap_or_else(|| panic!("no conflict for {field}: {reply:?}"));
        assert_eq!(records.len(), 1, "exactly one record for {field}");
        let r = &records[0];
        assert_eq!(r.strategy, strategy);
        assert_eq!(r.candidates.len(), n, "{field}");
        assert_eq!(
            value_from_proto(r.result.clone().unwrap())?,
            result,
            "{field}"
        );
    }
    assert_eq!(by_field.len(), 4, "{by_field:?}");

    // A later sequential write replaces the winner, whatever the strategy,
    // and is not a conflict.
    mesh.exec(
        0,
        "UPDATE accounts SET status = 'inactive', last_login = 1 WHERE id = 1",
    )
    .await?;
    mesh.wait_converged().await?;
    for (name, db) in &mesh.dbs {
        let row = &db.dump_table(&mesh.schemas[0]).await?[0];
        assert_eq!(row["status"], Value::Text("inactive".into()), "{name}");
        assert_eq!(row["last_login"], Value::Int(1), "{name}");
    }
    assert_eq!(
        fetch(&mesh.hub_url, Some("accounts"), 0).await?.total,
        reply.total
    );
    // One op per local write: 2 inserts + 5 updates/deletes + 1 sequential.
    assert_eq!(hub_status(&mesh.hub_url).await?.total_ops, 2 + 6 + 1);
    mesh.stop().await
}
