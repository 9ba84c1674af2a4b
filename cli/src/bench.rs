//! `syncmesh bench`: end-to-end throughput of the embedded default.
//!
//! Each run starts a fresh hub and three SQLite nodes on 127.0.0.1, inserts
//! `rows` rows on edge-a in transactions of `batch` rows, and measures the
//! time from the first insert until edge-b and edge-c both hold every row.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::demo::Mesh;

async fn count(mesh: &Mesh, node: usize) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders")
        .fetch_one(mesh.dbs[node].1.pool())
        .await?)
}

/// Runs the benchmark and prints per-run and median figures.
pub async fn run(rows: u64, batch: u64, runs: usize, dir: Option<PathBuf>) -> Result<()> {
    if rows == 0 || batch == 0 || runs == 0 {
        bail!("--rows, --batch and --runs must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "bench: {rows} rows inserted on edge-a in transactions of {batch}; time until edge-b and edge-c hold all ({runs} runs)"
    );
    let mut rates = Vec::new();
    for run in 0..runs {
        let dir = base.join(format!("run-{run}"));
        let mesh = Mesh::start(&dir, 10_000).await?;
        let start = Instant::now();
        let mut id = 0u64;
        while id < rows {
            let n = batch.min(rows - id);
            let mut tx = mesh.dbs[0].1.pool().begin().await?;
            for _ in 0..n {
                id += 1;
                sqlx::query("INSERT INTO orders (id, item, qty, status) VALUES (?, ?, ?, 'new')")
                    .bind(id as i64)
                    .bind(format!("item-{id}"))
                    .bind((id % 100) as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        let inserted = start.elapsed();
        let deadline = Duration::from_secs(600);
        loop {
            if count(&mesh, 1).await? == rows as i64 && count(&mesh, 2).await? == rows as i64 {
                break;
            }
            if start.elapsed() > deadline {
                bail!("run {run}: replicas did not receive all {rows} rows within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let total = start.elapsed();
        let rate = rows as f64 / total.as_secs_f64();
        println!(
            "run {}: inserts took {:.2?}, all replicas complete after {:.2?} -> {:.0} rows/s end to end",
            run + 1,
            inserted,
            total,
            rate
        );
        rates.push(rate);
        mesh.stop().await?;
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    let median = rates[rates.len() / 2];
    println!(
        "median: {median:.0} rows/s end to end ({rows} rows, {runs} runs, min {:.0}, max {:.0})",
        rates[0],
        rates[rates.len() - 1]
    );
    Ok(())
}
