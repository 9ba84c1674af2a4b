//! In-process meshes: a real hub and three real nodes on 127.0.0.1 gRPC,
//! each with its own SQLite file.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use syncmesh::demo::Mesh;
use syncmesh::mesh::{dump_all, hub_status};
use syncmesh_resolver::Value;
use syncmesh_tests::wait_until;

async fn total_ops(mesh: &Mesh) -> Result<u64> {
    Ok(hub_status(&mesh.hub_url).await?.total_ops)
}

async fn rows(mesh: &Mesh, node: usize) -> Result<Vec<BTreeMap<String, Value>>> {
    Ok(mesh.dbs[node].1.dump_table(&mesh.schemas[0]).await?)
}

fn row(id: i64, item: &str, qty: i64, status: &str) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("id".to_owned(), Value::Int(id)),
        ("item".to_owned(), Value::Text(item.to_owned())),
        ("qty".to_owned(), Value::Int(qty)),
        ("status".to_owned(), Value::Text(status.to_owned())),
    ])
}

/// Three nodes insert, update and delete; every replica ends identical and
/// equal to the expected rows, and the hub holds exactly one op per local
/// write (no echo, no duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_on_inserts_updates_and_deletes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(dir.path(), 500).await?;
    let mut writes = 0u64;
    // Round 1: every node inserts its own rows, all at once.
    for node in 0..3 {
        for k in 1..=20 {
            let id = node as i64 * 100 + k;
            mesh.exec(
                node,
                &format!("INSERT INTO orders VALUES ({id}, 'i{id}', {k}, 'new')"),
            )
            .await?;
            writes += 1;
        }
    }
    mesh.wait_converged().await?;
    // Round 2: each node updates and deletes rows another node inserted.
    for node in 0..3 {
        let other = ((node + 1) % 3) as i64 * 100;
        for k in 1..=5 {
            mesh.exec(
                node,
                &format!(
                    "UPDATE orders SET qty = qty + 1000 WHERE id = {}",
                    other + k
                ),
            )
            .await?;
            writes += 1;
        }
        for k in 6..=8 {
            mesh.exec(
                node,
                &format!("DELETE FROM orders WHERE id = {}", other + k),
            )
            .await?;
            writes += 1;
        }
        // A multi-row statement: one op per row.
        mesh.exec(
            node,
            &format!(
                "UPDATE orders SET status = 'bulk' WHERE id BETWEEN {} AND {}",
                other + 9,
                other + 12
            ),
        )
        .await?;
        writes += 4;
    }
    mesh.wait_converged().await?;
    // Round 3: a re-insert of a deleted key, and an insert-then-delete.
    mesh.exec(0, "INSERT INTO orders VALUES (106, 'back', 1, 'again')")
        .await?;
    mesh.exec(1, "INSERT INTO orders VALUES (999, 'tmp', 1, 'x')")
        .await?;
    mesh.exec(1, "DELETE FROM orders WHERE id = 999").await?;
    writes += 3;
    mesh.wait_converged().await?;

    let mut expected = Vec::new();
    for node in 0..3i64 {
        for k in 1..=20i64 {
            let id = node * 100 + k;
            let item = if id == 106 {
                "back".to_owned()
            } else {
                format!("i{id}")
            };
            match k {
                1..=5 => expected.push(row(id, &item, k + 1000, "new")),
                6 if node == 1 => expected.push(row(id, "back", 1, "again")),
                6..=8 => {}
                9..=12 => expected.push(row(id, &item, k, "bulk")),
                _ => expected.push(row(id, &item, k, "new")),
            }
        }
    }
    for node in 0..3 {
        assert_eq!(rows(&mesh, node).await?, expected, "replica {node}");
    }
    assert_eq!(
        total_ops(&mesh).await?,
        writes,
        "one op per local write: no echo, no duplicate"
    );
    mesh.stop().await
}

/// The hub goes away under writes: nodes keep capturing into their logs,
/// and everything converges when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_outage_under_writes_then_converges() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut mesh = Mesh::start(dir.path(), 200).await?;
    for node in 0..3 {
        mesh.exec(
            node,
            &format!("INSERT INTO orders VALUES ({node}, 'seed', 0, 'new')"),
        )
        .await?;
    }
    mesh.wait_converged().await?;
    let before: Vec<u64> = mesh.nodes.iter().map(|n| n.stats().own_ops).collect();
    mesh.stop_hub().await?;
    for node in 0..3 {
        for k in 1..=300 {
            let id = 1000 * (node as i64 + 1) + k;
            mesh.exec(
                node,
                &format!("INSERT INTO orders VALUES ({id}, 'offline', {k}, 'new')"),
            )
            .await?;
        }
        mesh.exec(
            node,
            &format!(
                "UPDATE orders SET qty = qty + 1 WHERE id = {}",
                (node + 1) % 3
            ),
        )
        .await?;
    }
    // Capture goes on without the hub: every change lands in the node logs.
    wait_until(
        "nodes to capture while the hub is down",
        Duration::from_secs(30),
        || async {
            let mut pending = 0;
            for (_, db) in &mesh.dbs {
                pending += db.pending_changes().await?;
            }
            Ok(pending == 0)
        },
    )
    .await?;
    for (i, n) in mesh.nodes.iter().enumerate() {
        assert_eq!(
            n.stats().own_ops,
            before[i] + 301,
            "node {i} captured while the hub was down"
        );
        assert!(!n.stats().connected);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    mesh.start_hub().await?;
    mesh.wait_converged().await?;
    let dumps = dump_all(&mesh.dbs, &mesh.schemas).await?;
    assert_eq!(dumps[0][0].len(), 3 + 900);
    for node in 0..3i64 {
        let seeded = dumps[0][0]
            .iter()
            .find(|r| r["id"] == Value::Int(node))
            .unwrap();
        assert_eq!(
            seeded["qty"],
            Value::Int(1),
            "the single increment of row {node} survived"
        );
    }
    assert_eq!(total_ops(&mesh).await?, 3 + 3 * 301);
    mesh.stop().await
}

/// Node B hammers one field of a row while node A's user writes another
/// field of the same row: A's writes land while A applies B's changes, and
/// none of them is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_write_racing_remote_apply_is_not_lost() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(dir.path(), 100).await?;
    mesh.exec(
        0,
        "INSERT INTO orders VALUES (1, 'contended', 0, 'a-start')",
    )
    .await?;
    mesh.wait_converged().await?;
    let b_pool = mesh.dbs[1].1.pool().clone();
    let remote = tokio::spawn(async move {
        for q in 1..=400 {
            sqlx::query("UPDATE orders SET qty = ? WHERE id = 1")
                .bind(q)
                .execute(&b_pool)
                .await?;
        }
        anyhow::Ok(())
    });
    for i in 0..150 {
        mesh.exec(
            0,
            &format!("UPDATE orders SET status = 'a-{i}' WHERE id = 1"),
        )
        .await?;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    remote.await??;
    mesh.wait_converged().await?;
    for node in 0..3 {
        assert_eq!(
            rows(&mesh, node).await?,
            vec![row(1, "contended", 400, "a-149")],
            "replica {node}"
        );
    }
    assert_eq!(
        total_ops(&mesh).await?,
        1 + 400 + 150,
        "no echo: ops equal local writes"
    );
    mesh.stop().await
}

/// A user holds edge-a's database locked for longer than the busy timeout
/// while remote changes arrive: the apply fails, the node keeps running and
/// retries, and everything lands once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_delays_but_does_not_stop_the_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(dir.path(), 100).await?;
    let mut conn = mesh.dbs[0].1.pool().acquire().await?;
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut *conn).await?;
    sqlx::query("UPDATE orders SET qty = 0 WHERE id = -1")
        .execute(&mut *conn)
        .await?;
    mesh.exec(1, "INSERT INTO orders VALUES (1, 'while-locked', 1, 'new')")
        .await?;
    // Longer than the adapter's 5 s busy timeout.
    tokio::time::sleep(Duration::from_millis(6_500)).await;
    assert!(
        rows(&mesh, 0).await?.is_empty(),
        "edge-a could not apply while locked"
    );
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    drop(conn);
    mesh.wait_converged().await?;
    assert_eq!(
        rows(&mesh, 0).await?,
        vec![row(1, "while-locked", 1, "new")]
    );
    mesh.stop().await
}
