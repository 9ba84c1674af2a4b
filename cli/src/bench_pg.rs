//! `syncmesh bench --scenario postgres`: PostgreSQL → PostgreSQL streaming
//! through syncmesh, against PostgreSQL's native logical replication
//! (publication + subscription) as the baseline, in the same run.
//!
//! Two throwaway clusters A and B ([`crate::pg::PgCluster`]) hold one
//! database per contestant. Each run inserts `rows` rows on A in
//! transactions of `batch` rows and measures the time from the first
//! insert until B holds them all: once through a hub and two syncmesh
//! nodes (in this process), once through a subscription on B.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use syncmesh_node::config::Config;
use syncmesh_node::shell::start_node;

use crate::mesh;
use crate::pg::{PASSWORD, PgCluster};

const DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, item text NOT NULL, qty integer NOT NULL, price numeric(12, 2))";
const DEADLINE: Duration = Duration::from_secs(1800);

async fn count(pool: &sqlx::PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(pool)
        .await?)
}

/// Inserts `rows` rows in transactions of `batch`, then waits until
/// `target` holds them all; returns (insert time, total time).
async fn load_and_wait(
    source: &sqlx::PgPool,
    target: &sqlx::PgPool,
    rows: u64,
    batch: u64,
) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut id = 0u64;
    while id < rows {
        let n = batch.min(rows - id);
        sqlx::query(
            "INSERT INTO items SELECT g, 'item-' || g, (g % 100)::int, (g % 10000) / 100.0 \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind((id + 1) as i64)
        .bind((id + n) as i64)
        .execute(source)
        .await?;
        id += n;
    }
    let inserted = start.elapsed();
    loop {
        if count(target).await? == rows as i64 {
            return Ok((inserted, start.elapsed()));
        }
        if start.elapsed() > DEADLINE {
            bail!("the target did not receive all {rows} rows within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn native_run(
    a: &PgCluster,
    b: &PgCluster,
    run: usize,
    rows: u64,
    batch: u64,
) -> Result<f64> {
    let db = format!("native_{run}");
    a.create_db(&db).await?;
    b.create_db(&db).await?;
    a.exec(&db, DDL).await?;
    b.exec(&db, DDL).await?;
    a.exec(&db, "CREATE PUBLICATION bench FOR TABLE items")
        .await?;
    b.exec(
        &db,
        &format!(
            "CREATE SUBSCRIPTION bench_{run} CONNECTION 'host=127.0.0.1 port={} dbname={db} user=postgres password={PASSWORD}' PUBLICATION bench",
            a.port
        ),
    )
    .await?;
    let src = a.pool(&db).await?;
    let dst = b.pool(&db).await?;
    // Wait until the (empty) initial table copy is done and streaming.
    let start = Instant::now();
    loop {
        let ready: bool = sqlx::query_scalar(
            "SELECT coalesce(bool_and(srsubstate = 'r'), false) FROM pg_subscription_rel",
        )
        .fetch_one(&dst)
        .await?;
        if ready {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the native subscription did not become ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (inserted, total) = load_and_wait(&src, &dst, rows, batch).await?;
    let rate = rows as f64 / total.as_secs_f64();
    println!(
        "run {run}: native logical replication: inserts {inserted:.2?}, complete after {total:.2?} -> {rate:.0} rows/s"
    );
    b.exec(&db, &format!("DROP SUBSCRIPTION bench_{run}"))
        .await?;
    Ok(rate)
}

async fn syncmesh_run(
    a: &PgCluster,
    b: &PgCluster,
    base: &Path,
    run: usize,
    rows: u64,
    batch: u64,
) -> Result<f64> {
    let db = format!("mesh_{run}");
    a.create_db(&db).await?;
    b.create_db(&db).await?;
    a.exec(&db, DDL).await?;
    b.exec(&db, DDL).await?;
    let dir = base.join(format!("run-{run}"));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let yaml = format!(
        "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n\
         \x20 - name: pg-a\n    hub: http://127.0.0.1:{port}\n    data_dir: ./pg-a\n    mode: publish\n    database: {{ type: postgresql, url: \"{}\", slot: bench_a_{run} }}\n\
         \x20 - name: pg-b\n    hub: http://127.0.0.1:{port}\n    data_dir: ./pg-b\n    mode: subscribe\n    database: {{ type: postgresql, url: \"{}\", slot: bench_b_{run} }}\n\
         tables:\n  - name: items\n    key: [id]\nsync:\n  batch_size: 10000\n",
        a.url(&db),
        b.url(&db)
    );
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml)?;
    let cfg = Config::load(&path)?;
    let hub = mesh::start_hub_from(&cfg, cfg.hub()?).await?;
    let node_a = start_node(&cfg, "pg-a").await.context("starting pg-a")?;
    let node_b = start_node(&cfg, "pg-b").await.context("starting pg-b")?;
    let start = Instant::now();
    while !(node_a.stats().connected && node_b.stats().connected) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the nodes did not connect to the hub within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let src = a.pool(&db).await?;
    let dst = b.pool(&db).await?;
    let (inserted, total) = load_and_wait(&src, &dst, rows, batch).await?;
    let rate = rows as f64 / total.as_secs_f64();
    println!(
        "run {run}: syncmesh (PG A -> node -> hub -> node -> PG B): inserts {inserted:.2?}, complete after {total:.2?} -> {rate:.0} rows/s"
    );
    node_a.shutdown().await?;
    node_b.shutdown().await?;
    hub.shutdown().await?;
    Ok(rate)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the PostgreSQL benchmark and prints per-run figures, medians and
/// the ratio syncmesh / native.
pub async fn run(
    rows: u64,
    batch: u64,
    runs: usize,
    dir: Option<std::path::PathBuf>,
) -> Result<()> {
    if rows == 0 || batch == 0 || runs == 0 {
        bail!("--rows, --batch and --runs must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "bench postgres: {rows} rows inserted on PG A in transactions of {batch}; time until PG B holds all; syncmesh vs native logical replication ({runs} runs each)"
    );
    let settings = [("synchronous_commit", "on"), ("fsync", "on")];
    let a = PgCluster::start_with(&settings)?;
    let b = PgCluster::start_with(&settings)?;
    let mut native = Vec::new();
    let mut ours = Vec::new();
    for run in 1..=runs {
        native.push(native_run(&a, &b, run, rows, batch).await?);
        ours.push(syncmesh_run(&a, &b, &base, run, rows, batch).await?);
    }
    let (n, s) = (median(&mut native), median(&mut ours));
    println!(
        "median: syncmesh {s:.0} rows/s, native logical replication {n:.0} rows/s, ratio {:.2}x",
        s / n
    );
    Ok(())
}
