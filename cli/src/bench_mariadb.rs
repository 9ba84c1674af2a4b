//! `syncmesh bench --scenario mariadb`: rows inserted on MariaDB reach a
//! PostgreSQL peer and a Redis cache through syncmesh.
//!
//! One throwaway MariaDB server ([`crate::mariadb::MariaDb`]), one
//! PostgreSQL 15 cluster ([`crate::pg::PgCluster`], fsync on) and one
//! `redis-server` ([`crate::redis_server::RedisServer`]), all on
//! 127.0.0.1. Each run uses fresh databases and a fresh mesh in this
//! process: a hub, a MariaDB node and a PostgreSQL node (both
//! bi-directional) and a Redis node (`mode: subscribe`). It inserts `rows`
//! rows on MariaDB in transactions of `batch` rows and measures the time
//! from the first insert until PostgreSQL holds every row and Redis holds a
//! hash for every row.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use syncmesh_node::config::Config;
use syncmesh_node::shell::start_node;

use crate::mariadb::MariaDb;
use crate::mesh;
use crate::pg::PgCluster;
use crate::redis_server::RedisServer;

const MY_DDL: &str = "CREATE TABLE items (id BIGINT PRIMARY KEY, item VARCHAR(100) NOT NULL, qty INT NOT NULL, price DECIMAL(12, 2))";
const PG_DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, item text NOT NULL, qty integer NOT NULL, price numeric(12, 2))";
const DEADLINE: Duration = Duration::from_secs(1800);

struct Servers {
    maria: MariaDb,
    pg: PgCluster,
    redis: RedisServer,
}

/// One run: (insert time, time until PostgreSQL has all, until both have all).
async fn one_run(
    s: &Servers,
    base: &Path,
    run: usize,
    rows: u64,
    batch: u64,
) -> Result<(Duration, Duration, Duration)> {
    let db = format!("bench_{run}");
    let my_url = s.maria.create_db(&db).await?;
    s.maria.exec(&db, MY_DDL).await?;
    let pg_url = s.pg.create_db(&db).await?;
    s.pg.exec(&db, PG_DDL).await?;
    let mut redis = s.redis.conn().await?;
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut redis)
        .await
        .context("emptying redis")?;
    let dir = base.join(format!("run-{run}"));
    std::fs::create_dir_all(&dir)?;
    let port = crate::free_port()?;
    let yaml = format!(
        r#"
hub: {{ listen: "127.0.0.1:{port}", data_dir: ./hub }}
nodes:
  - {{ name: maria, hub: "http://127.0.0.1:{port}", data_dir: ./maria, database: {{ type: mariadb, url: "{my_url}" }} }}
  - {{ name: pg, hub: "http://127.0.0.1:{port}", data_dir: ./pg, database: {{ type: postgresql, url: "{pg_url}", slot: bench_{run} }} }}
  - name: cache
    hub: "http://127.0.0.1:{port}"
    data_dir: ./cache
    mode: subscribe
    database: {{ type: redis, url: "{redis_url}", key_prefix: "sm" }}
tables:
  - name: items
    key: [id]
sync:
  batch_size: 10000
"#,
        redis_url = s.redis.url
    );
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, yaml)?;
    let cfg = Config::load(&path)?;
    let hub = mesh::start_hub_from(&cfg, cfg.hub()?).await?;
    let mut nodes = Vec::new();
    for n in ["maria", "pg", "cache"] {
        nodes.push(
            start_node(&cfg, n)
                .await
                .with_context(|| format!("starting {n}"))?,
        );
    }
    let start = Instant::now();
    while !nodes.iter().all(|n| n.stats().connected) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the nodes did not connect to the hub within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let src = s.maria.pool(&db).await?;
    let dst = s.pg.pool(&db).await?;
    let start = Instant::now();
    let mut id = 0u64;
    while id < rows {
        let n = batch.min(rows - id);
        let values: Vec<String> = (id + 1..=id + n)
            .map(|g| {
                format!(
                    "({g}, 'item-{g}', {}, {}.{:02})",
                    g % 100,
                    g % 10_000 / 100,
                    g % 100
                )
            })
            .collect();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO items VALUES {}",
            values.join(", ")
        )))
        .execute(&src)
        .await?;
        id += n;
    }
    let inserted = start.elapsed();
    let (mut pg_done, mut redis_done) = (None, None);
    loop {
        if pg_done.is_none() {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
                .fetch_one(&dst)
                .await?;
            if n == rows as i64 {
                pg_done = Some(start.elapsed());
            }
        }
        if redis_done.is_none() {
            // A busy server may time a query out: asked again next round.
            let n: Option<u64> = redis::cmd("DBSIZE").query_async(&mut redis).await.ok();
            if n == Some(rows) {
                redis_done = Some(start.elapsed());
            }
        }
        if let (Some(p), Some(r)) = (pg_done, redis_done) {
            for n in nodes {
                n.shutdown().await?;
            }
            hub.shutdown().await?;
            src.close().await;
            dst.close().await;
            return Ok((inserted, p, p.max(r)));
        }
        if start.elapsed() > DEADLINE {
            bail!(
                "PostgreSQL or Redis did not receive all {rows} rows within {DEADLINE:?} (PostgreSQL done: {pg_done:?}, Redis done: {redis_done:?})"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The median (upper middle for an even count) of non-empty `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the MariaDB benchmark and prints per-run figures and the median.
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
        "bench mariadb: {rows} rows inserted on MariaDB in transactions of {batch}; time until PostgreSQL and Redis hold all ({runs} runs)"
    );
    let servers = Servers {
        maria: MariaDb::start()?,
        pg: PgCluster::start_with(&[("synchronous_commit", "on"), ("fsync", "on")])?,
        redis: RedisServer::start().await?,
    };
    let mut rates = Vec::new();
    for run in 1..=runs {
        let (inserted, pg, all) = one_run(&servers, &base, run, rows, batch).await?;
        let rate = rows as f64 / all.as_secs_f64();
        println!(
            "run {run}: inserts {inserted:.2?}, PostgreSQL complete after {pg:.2?}, PostgreSQL and Redis after {all:.2?} -> {rate:.0} rows/s"
        );
        rates.push(rate);
    }
    let m = median(&mut rates);
    println!("median: {m:.0} rows/s (MariaDB -> hub -> PostgreSQL and Redis)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_runs() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [5.0]), 5.0);
        assert_eq!(median(&mut [4.0, 1.0]), 4.0);
    }
}
