//! Tombstone garbage collection end to end: a real hub and three real
//! SQLite nodes on 127.0.0.1 gRPC. Deletes are collected at the hub and at
//! every node once every writer saw them (the stored row states of deleted
//! rows go away); a node that was away beyond the grace comes back without
//! resurrecting deleted rows, and one that wrote while away is
//! re-snapshotted from the hub (its writes to deleted rows are dropped
//! under delete_wins, the others kept) rather than merged unsafely.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use syncmesh::demo::Mesh;
use syncmesh::mesh::{hub_settings_from, hub_status};
use syncmesh_hub::server::start_hub;
use syncmesh_node::shell::start_node;
use syncmesh_node::store::{LogStore, SledStore, prefix_end};
use syncmesh_resolver::Value;
use syncmesh_tests::{captured_logs, wait_until};

const LIMIT: Duration = Duration::from_secs(60);

/// Replaces the mesh's hub by one on the same address and data directory
/// with a tombstone grace of `grace_ms` (the YAML key is in hours).
async fn restart_hub_with_grace(mesh: &mut Mesh, grace_ms: u64) -> Result<()> {
    mesh.stop_hub().await?;
    let hub_cfg = mesh.cfg.hub()?.clone();
    let (settings, mut options) = hub_settings_from(&mesh.cfg, &hub_cfg)?;
    options.tombstone_grace_ms = grace_ms;
    mesh.hub = Some(start_hub(settings, options, &hub_cfg.data_dir, hub_cfg.listen).await?);
    Ok(())
}

/// Row states stored in the sled store at `dir` (the process must be
/// stopped).
fn stored_row_states(dir: &Path) -> Result<usize> {
    let store = SledStore::open(dir)?;
    Ok(store.range(b"r/", &prefix_end(b"r/"), usize::MAX)?.len())
}

async fn ids(mesh: &Mesh, node: usize) -> Result<Vec<i64>> {
    let rows: Vec<BTreeMap<String, Value>> = mesh.dbs[node].1.dump_table(&mesh.schemas[0]).await?;
    Ok(rows
        .iter()
        .filter_map(|r| match r.get("id") {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        })
        .collect())
}

async fn insert_rows(mesh: &Mesh, node: usize, ids: std::ops::RangeInclusive<i64>) -> Result<()> {
    for id in ids {
        mesh.exec(
            node,
            &format!("INSERT INTO orders VALUES ({id}, 'i{id}', {id}, 'new')"),
        )
        .await?;
    }
    Ok(())
}

/// Deletes made on two nodes are collected everywhere: the hub adopts a
/// stable cut, the hub and all three nodes drop the row states of the
/// deleted rows, and after the processes stop their sled stores hold
/// exactly one row state per surviving row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_are_collected_at_the_hub_and_every_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = Mesh::start(dir.path(), 100).await?;
    insert_rows(&mesh, 0, 1..=30).await?;
    mesh.wait_converged().await?;
    mesh.exec(1, "DELETE FROM orders WHERE id BETWEEN 1 AND 10")
        .await?;
    mesh.exec(2, "DELETE FROM orders WHERE id BETWEEN 11 AND 20")
        .await?;
    // A concurrent-looking update of a surviving row keeps history GC can
    // trim but must not change what is visible.
    mesh.exec(0, "UPDATE orders SET status = 'kept' WHERE id = 21")
        .await?;
    mesh.wait_converged().await?;
    let url = mesh.hub_url.clone();
    wait_until("the hub collects the 20 deleted rows", LIMIT, || {
        let url = url.clone();
        async move { Ok(hub_status(&url).await?.gc_rows_dropped >= 20) }
    })
    .await?;
    for (i, n) in mesh.nodes.iter().enumerate() {
        wait_until(
            &format!("node {i} collects the deleted rows"),
            LIMIT,
            || async { Ok(n.stats().gc_rows_dropped >= 20) },
        )
        .await?;
    }
    let status = hub_status(&mesh.hub_url).await?;
    assert!(status.gc_cuts >= 1);
    assert_eq!(status.gc_refused, 0, "nobody was refused");
    let cut = status.gc_cut.unwrap().stable.unwrap().entries;
    assert!(cut.get("edge-b").copied().unwrap_or(0) >= 10, "{cut:?}");
    assert!(cut.get("edge-c").copied().unwrap_or(0) >= 10, "{cut:?}");
    let survivors: Vec<i64> = (21..=30).collect();
    for node in 0..3 {
        assert_eq!(ids(&mesh, node).await?, survivors, "replica {node}");
    }
    let data = dir.path().canonicalize()?.join("data");
    mesh.stop().await?;
    // 30 rows were stored everywhere; the 20 deleted ones are gone.
    for store in ["hub", "edge-a", "edge-b", "edge-c"] {
        assert_eq!(
            stored_row_states(&data.join(store))?,
            10,
            "{store}: one row state per surviving row"
        );
    }
    Ok(())
}

/// Starts a mesh whose hub has a 1.5 s grace, seeds rows 1..=20, stops
/// edge-c, waits past the grace and deletes rows 1..=10 on edge-a; returns
/// once the hub and edge-a collected them without edge-c.
async fn away_node_misses_collected_deletes(dir: &Path) -> Result<Mesh> {
    let mut mesh = Mesh::start(dir, 100).await?;
    restart_hub_with_grace(&mut mesh, 1_500).await?;
    insert_rows(&mesh, 0, 1..=20).await?;
    mesh.wait_converged().await?;
    let c = mesh.nodes.remove(2);
    c.shutdown().await?;
    // edge-c is silent past the grace: the cut no longer waits for it.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    mesh.exec(0, "DELETE FROM orders WHERE id <= 10").await?;
    let url = mesh.hub_url.clone();
    wait_until("the hub collects the deletes edge-c missed", LIMIT, || {
        let url = url.clone();
        async move { Ok(hub_status(&url).await?.gc_rows_dropped >= 10) }
    })
    .await?;
    let a = &mesh.nodes[0];
    wait_until("edge-a collects them too", LIMIT, || async {
        Ok(a.stats().gc_rows_dropped >= 10)
    })
    .await?;
    Ok(mesh)
}

/// edge-c was away beyond the grace while rows were deleted and collected;
/// it made no writes meanwhile, so it is served by replay, deletes the rows
/// too (nothing resurrects), becomes a full writer again and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_away_beyond_the_grace_returns_without_resurrecting() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut mesh = away_node_misses_collected_deletes(dir.path()).await?;
    assert_eq!(ids(&mesh, 2).await?, (1..=20).collect::<Vec<_>>());
    mesh.nodes.push(start_node(&mesh.cfg, "edge-c").await?);
    mesh.wait_converged().await?;
    let survivors: Vec<i64> = (11..=20).collect();
    for node in 0..3 {
        assert_eq!(ids(&mesh, node).await?, survivors, "replica {node}");
    }
    // It may write again: its ops are accepted and reach everyone.
    mesh.exec(2, "UPDATE orders SET status = 'back' WHERE id = 11")
        .await?;
    mesh.exec(2, "INSERT INTO orders VALUES (5, 'again', 5, 'new')")
        .await?;
    mesh.wait_converged().await?;
    let mut want = vec![5];
    want.extend(11..=20);
    for node in 0..3 {
        assert_eq!(ids(&mesh, node).await?, want, "replica {node}");
    }
    let status = hub_status(&mesh.hub_url).await?;
    assert_eq!(status.gc_refused, 0);
    mesh.stop().await
}

async fn status_of(mesh: &Mesh, node: usize, id: i64) -> Result<Option<Value>> {
    let rows: Vec<BTreeMap<String, Value>> = mesh.dbs[node].1.dump_table(&mesh.schemas[0]).await?;
    Ok(rows
        .into_iter()
        .find(|r| r.get("id") == Some(&Value::Int(id)))
        .and_then(|r| r.get("status").cloned()))
}

/// edge-c wrote to rows while away beyond the grace: to row 3, which was
/// deleted and collected meanwhile, and to row 15, which lives. On return
/// the hub re-snapshots it (one log line at the hub, lines at the node):
/// its row states become the hub's, row 3 stays deleted (delete_wins: its
/// update was concurrent with a delete whose tombstone is gone, so it is
/// dropped), its write to row 15 is kept and reaches everyone, and all
/// databases converge. Without the re-snapshot edge-c is refused and
/// never converges, or resurrects row 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_that_wrote_while_away_is_resnapshotted_and_nothing_resurrects() -> Result<()> {
    let logs = captured_logs();
    let dir = tempfile::tempdir()?;
    let mut mesh = away_node_misses_collected_deletes(dir.path()).await?;
    // The user of edge-c's database writes while its node is down.
    mesh.exec(2, "UPDATE orders SET status = 'offline' WHERE id = 3")
        .await?;
    mesh.exec(2, "UPDATE orders SET status = 'offline' WHERE id = 15")
        .await?;
    mesh.nodes.push(start_node(&mesh.cfg, "edge-c").await?);
    mesh.wait_converged().await?;
    let status = hub_status(&mesh.hub_url).await?;
    assert!(status.gc_snapshots_served >= 1, "{status:?}");
    // `syncmesh status` and `status --json` show it.
    let json = syncmesh::mesh::status_json(&status);
    assert!(json["gc"]["snapshots_served"].as_u64() >= Some(1), "{json}");
    assert!(
        json["gc"]["stable_cut"]["edge-a"].as_u64() >= Some(20),
        "{json}"
    );
    assert!(
        json["gc"]["cut_advanced_unix_ms"].as_u64() > Some(0),
        "{json}"
    );
    let text = syncmesh::mesh::render_status(&status);
    assert!(
        text.contains("tombstone GC  stable cut [edge-a:") && text.contains("re-snapshots served"),
        "{text}"
    );
    let survivors: Vec<i64> = (11..=20).collect();
    for node in 0..3 {
        assert_eq!(ids(&mesh, node).await?, survivors, "replica {node}");
        assert_eq!(
            status_of(&mesh, node, 15).await?,
            Some(Value::Text("offline".into())),
            "replica {node} has edge-c's write to the live row"
        );
    }
    // Both writes reached the hub (the one to row 3 emptied).
    let c = mesh.nodes[2].stats();
    assert!(c.own_ops >= 2 && c.own_acked == c.own_ops, "{c:?}");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("re-snapshot of node edge-c") && l.contains("stable cut")),
        "the hub logs the re-snapshot:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("edge-c") && l.contains("installed")),
        "the node logs the install:\n{text}"
    );
    // It writes on as a full member.
    mesh.exec(2, "UPDATE orders SET status = 'back' WHERE id = 11")
        .await?;
    mesh.wait_converged().await?;
    for node in 0..3 {
        assert_eq!(
            status_of(&mesh, node, 11).await?,
            Some(Value::Text("back".into()))
        );
    }
    mesh.stop().await
}
