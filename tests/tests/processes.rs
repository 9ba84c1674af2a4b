//! Hub and nodes as separate `syncmesh` processes: SIGKILL at bad moments
//! loses nothing and duplicates nothing; bad input exits non-zero with one
//! clear line and never panics.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use syncmesh::mesh::hub_status;
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_tests::{ORDERS, Proc, create_db, free_port, run_syncmesh, wait_until};

const LONG: Duration = Duration::from_secs(90);

fn write_config(dir: &Path, port: u16, body_extra: &str) -> Result<String> {
    let yaml = format!(
        "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\n\
         nodes:\n\
         \x20 - name: node-a\n    hub: http://127.0.0.1:{port}\n    data_dir: ./node-a\n    database: {{ type: sqlite, url: \"sqlite://./a.db\" }}\n\
         \x20 - name: node-b\n    hub: http://127.0.0.1:{port}\n    data_dir: ./node-b\n    database: {{ type: sqlite, url: \"sqlite://./b.db\" }}\n\
         tables:\n  - name: orders\n    key: [id]\n{body_extra}\
         sync:\n  batch_size: 200\n"
    );
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

async fn count(db: &SqliteAdapter) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(db.pool())
        .await?)
}

async fn insert_range(db: &SqliteAdapter, from: i64, to: i64, per_tx: i64) -> Result<()> {
    let mut id = from;
    while id <= to {
        let mut tx = db.pool().begin().await?;
        for _ in 0..per_tx {
            if id > to {
                break;
            }
            sqlx::query("INSERT INTO orders VALUES (?, ?, ?, 'new')")
                .bind(id)
                .bind(format!("item-{id}"))
                .bind(id % 7)
                .execute(&mut *tx)
                .await?;
            id += 1;
        }
        tx.commit().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_node_and_hub_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let port = free_port();
    let cfg = write_config(dir, port, "")?;
    let url_a = create_db(&dir.join("a.db"), ORDERS).await?;
    let url_b = create_db(&dir.join("b.db"), ORDERS).await?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let hub_args = ["hub", "--config", &cfg];
    let a_args = ["node", "--config", &cfg, "--name", "node-a"];
    let b_args = ["node", "--config", &cfg, "--name", "node-b"];
    let mut hub = Proc::spawn(dir, "hub", &hub_args)?;
    let mut a = Proc::spawn(dir, "node-a", &a_args)?;
    let _b = Proc::spawn(dir, "node-b", &b_args)?;
    wait_until("both nodes connected", LONG, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.nodes.iter().filter(|n| n.connected).count() == 2))
    })
    .await?;
    let db_a = SqliteAdapter::open(&url_a, false).await?;
    let db_b = SqliteAdapter::open(&url_b, false).await?;

    // 1. The hub dies (SIGKILL); node-a captures 500 rows it cannot send,
    //    then dies too while holding them unsynced.
    hub.kill9();
    insert_range(&db_a, 1, 500, 50).await?;
    wait_until("node-a to capture everything", LONG, || async {
        Ok(db_a.pending_changes().await? == 0)
    })
    .await?;
    a.assert_running(dir)?;
    a.kill9();
    // Rows written while node-a is down stay in the change table.
    insert_range(&db_a, 501, 600, 25).await?;
    assert_eq!(db_a.pending_changes().await?, 100);
    let mut hub = Proc::spawn(dir, "hub", &hub_args)?;
    let mut a = Proc::spawn(dir, "node-a", &a_args)?;
    wait_until("node-b to hold 600 rows", LONG, || async {
        Ok(count(&db_b).await? == 600)
    })
    .await?;

    // 2. node-a is SIGKILLed twice in the middle of streaming a write load.
    let writer = {
        let db = SqliteAdapter::open(&url_a, false).await?;
        tokio::spawn(async move {
            insert_range(&db, 601, 3000, 20).await?;
            db.close().await;
            anyhow::Ok(())
        })
    };
    for _ in 0..2 {
        wait_until("node-b to make progress", LONG, {
            let before = count(&db_b).await?;
            let db_b = &db_b;
            move || async move { Ok(count(db_b).await? > before + 100 || count(db_b).await? == 3000) }
        })
        .await?;
        a.assert_running(dir)?;
        a.kill9();
        a = Proc::spawn(dir, "node-a", &a_args)?;
    }
    // And the hub once, mid-stream.
    hub.kill9();
    hub = Proc::spawn(dir, "hub", &hub_args)?;
    writer.await??;
    wait_until("node-b to hold all 3000 rows", LONG, || async {
        Ok(count(&db_b).await? == 3000)
    })
    .await?;
    wait_until("node-a to drain its change table", LONG, || async {
        Ok(db_a.pending_changes().await? == 0)
    })
    .await?;
    wait_until("the hub to hold every op", LONG, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.total_ops >= 3000))
    })
    .await?;
    let status = hub_status(&hub_url).await?;
    assert_eq!(
        status.total_ops, 3000,
        "exactly one op per inserted row: nothing duplicated"
    );
    let rows_a: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT id, item, qty FROM orders ORDER BY id")
            .fetch_all(db_a.pool())
            .await?;
    let rows_b: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT id, item, qty FROM orders ORDER BY id")
            .fetch_all(db_b.pool())
            .await?;
    assert_eq!(rows_a, rows_b);
    let expected: Vec<(i64, String, i64)> = (1..=3000)
        .map(|i| (i, format!("item-{i}"), i % 7))
        .collect();
    assert_eq!(rows_b, expected);
    hub.assert_running(dir)?;
    a.assert_running(dir)?;
    db_a.close().await;
    db_b.close().await;
    Ok(())
}

fn assert_one_line_error(what: &str, ok: bool, stdout: &str, stderr: &str, needle: &str) {
    assert!(!ok, "{what}: must exit non-zero");
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("panicked"), "{what}: panicked:\n{all}");
    let errors: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("FAIL"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: exactly one error line expected:\n{all}"
    );
    assert!(
        errors[0].contains(needle),
        "{what}: error should mention {needle:?}: {}",
        errors[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_one_clear_line_and_non_zero_exit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // Nothing listens on this port: the hub is unreachable.
    let port = free_port();
    create_db(&dir.join("a.db"), ORDERS).await?;
    create_db(
        &dir.join("b.db"),
        &format!("{ORDERS}; CREATE TABLE nopk (a TEXT, b TEXT)"),
    )
    .await?;

    // Missing file.
    let missing = dir.join("nope.yaml").display().to_string();
    let (ok, out, err) = run_syncmesh(&["check", "--config", &missing])?;
    assert_one_line_error("missing file", ok, &out, &err, "nope.yaml");

    // Unknown key.
    let cfg = write_config(dir, port, "    colour: blue\n")?;
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert_one_line_error("unknown key", ok, &out, &err, "colour");
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-a"])?;
    assert_one_line_error("unknown key (node)", ok, &out, &err, "colour");

    // A table without a primary key.
    let cfg = write_config(dir, port, "  - name: nopk\n")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-b"])?;
    assert_one_line_error("no primary key", ok, &out, &err, "primary key");

    // Unreachable hub: `check` and `status` fail clearly.
    let cfg = write_config(dir, port, "")?;
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg, "--name", "node-a"])?;
    assert_one_line_error("unreachable hub (check)", ok, &out, &err, "hub");
    let (ok, out, err) = run_syncmesh(&["status", "--hub", &format!("http://127.0.0.1:{port}")])?;
    assert_one_line_error(
        "unreachable hub (status)",
        ok,
        &out,
        &err,
        "cannot reach the hub",
    );

    // Strategies: an unknown name, `sum` on a text column, and
    // `priority_order` without a list.
    let cfg = write_config(dir, port, "    resolve: { default: newest_wins }\n")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-a"])?;
    assert_one_line_error("unknown strategy", ok, &out, &err, "newest_wins");
    let cfg = write_config(dir, port, "    resolve: { fields: { item: sum } }\n")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-a"])?;
    assert_one_line_error("sum on text", ok, &out, &err, "numeric column");
    let cfg = write_config(
        dir,
        port,
        "    resolve: { fields: { status: { priority_order: [] } } }\n",
    )?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-a"])?;
    assert_one_line_error("empty priority_order", ok, &out, &err, "priority_order");

    // Unknown node name.
    let cfg = write_config(dir, port, "")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "node-z"])?;
    assert_one_line_error("unknown node", ok, &out, &err, "node-z");
    Ok(())
}
