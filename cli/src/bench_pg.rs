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
use syncmesh_node::config::{Config, PgCapture};
use syncmesh_node::shell::start_node;

use crate::mesh;
use crate::pg::{PASSWORD, PgCluster};

const DDL: &str = "CREATE TABLE items (id bigint PRIMARY KEY, item text NOT NULL, qty integer NOT NULL, price numeric(12, 2))";
/// The lag part's table; B's copy stamps each row's arrival.
const TICKS_DDL: &str = "CREATE TABLE ticks (id bigint PRIMARY KEY, written_at timestamptz NOT NULL, arrived_at timestamptz)";
const TICKS_ARRIVAL: &str = "CREATE FUNCTION stamp_arrival() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.arrived_at := clock_timestamp(); RETURN NEW; END $$; \
     CREATE TRIGGER stamp_arrival BEFORE INSERT ON ticks FOR EACH ROW EXECUTE FUNCTION stamp_arrival(); \
     ALTER TABLE ticks ENABLE ALWAYS TRIGGER stamp_arrival";
const DEADLINE: Duration = Duration::from_secs(1800);

/// How many rows `items` holds once its last row (id `rows`, written
/// last by every loader here) has arrived; 0 before. The index lookup keeps
/// the polling from scanning the table every few ms on a 2-core machine,
/// which would slow down whichever contestant takes longer.
async fn count(pool: &sqlx::PgPool, rows: u64) -> Result<i64> {
    let last: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM items WHERE id = $1)")
        .bind(rows as i64)
        .fetch_one(pool)
        .await?;
    if !last {
        return Ok(0);
    }
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
    insert_items(source, rows, batch).await?;
    let inserted = start.elapsed();
    let total = wait_count(target, rows, start, Duration::from_millis(20)).await?;
    Ok((inserted, total))
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
    let cpu = CpuMeter::start();
    let (inserted, total) = load_and_wait(&src, &dst, rows, batch).await?;
    let rate = rows as f64 / total.as_secs_f64();
    println!(
        "run {run}: native logical replication: inserts {inserted:.2?}, complete after {total:.2?} -> {rate:.0} rows/s{}",
        cpu.per_row(rows, false)
    );
    b.exec(&db, &format!("DROP SUBSCRIPTION bench_{run}"))
        .await?;
    Ok(rate)
}

/// A hub and two PostgreSQL nodes (A publishes, B subscribes) in this
/// process, on database `db` of clusters `a` and `b`.
struct Mesh {
    hub: syncmesh_hub::server::HubHandle,
    a: syncmesh_node::shell::NodeHandle,
    b: syncmesh_node::shell::NodeHandle,
}

impl Mesh {
    async fn start(
        a: &PgCluster,
        b: &PgCluster,
        base: &Path,
        db: &str,
        capture: PgCapture,
    ) -> Result<Mesh> {
        let capture = match capture {
            PgCapture::Stream => "stream",
            PgCapture::Peek => "peek",
        };
        let dir = base.join(db);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let yaml = format!(
            "hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n\
             \x20 - name: pg-a\n    hub: http://127.0.0.1:{port}\n    data_dir: ./pg-a\n    mode: publish\n    database: {{ type: postgresql, url: \"{}\", slot: bench_a_{db}, capture: {capture} }}\n\
             \x20 - name: pg-b\n    hub: http://127.0.0.1:{port}\n    data_dir: ./pg-b\n    mode: subscribe\n    database: {{ type: postgresql, url: \"{}\", slot: bench_b_{db} }}\n\
             tables:\n  - name: items\n    key: [id]\n  - name: ticks\n    key: [id]\nsync:\n  batch_size: 10000\n",
            a.url(db),
            b.url(db)
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
        Ok(Mesh {
            hub,
            a: node_a,
            b: node_b,
        })
    }

    async fn stop(self) -> Result<()> {
        self.a.shutdown().await?;
        self.b.shutdown().await?;
        self.hub.shutdown().await?;
        Ok(())
    }
}

/// Creates database `db` with the bench tables on both clusters.
async fn create_both(a: &PgCluster, b: &PgCluster, db: &str) -> Result<()> {
    for c in [a, b] {
        c.create_db(db).await?;
        c.exec(db, DDL).await?;
        c.exec(db, TICKS_DDL).await?;
    }
    // On B, a trigger stamps when each tick arrived (ALWAYS: it fires for
    // the native subscription's apply worker too).
    b.exec(db, TICKS_ARRIVAL).await?;
    Ok(())
}

async fn syncmesh_run(
    a: &PgCluster,
    b: &PgCluster,
    base: &Path,
    run: usize,
    rows: u64,
    batch: u64,
    capture: PgCapture,
) -> Result<f64> {
    let db = format!("mesh_{run}");
    create_both(a, b, &db).await?;
    let mesh = Mesh::start(a, b, base, &db, capture).await?;
    let src = a.pool(&db).await?;
    let dst = b.pool(&db).await?;
    let cpu = CpuMeter::start();
    let (inserted, total) = load_and_wait(&src, &dst, rows, batch).await?;
    let rate = rows as f64 / total.as_secs_f64();
    println!(
        "run {run}: syncmesh (PG A -> node -> hub -> node -> PG B): inserts {inserted:.2?}, complete after {total:.2?} -> {rate:.0} rows/s{}",
        cpu.per_row(rows, true)
    );
    mesh.stop().await?;
    Ok(rate)
}

/// The CPU time used over a part of the bench, per row: this process's
/// (hub, both nodes and the bench's own clients; not PostgreSQL) and the
/// whole machine's (every core busy, PostgreSQL included: the figure to
/// compare between syncmesh and native replication, which runs inside
/// PostgreSQL). Both move less with other load than the wall-clock rate.
struct CpuMeter {
    process_s: Option<f64>,
    machine_s: Option<f64>,
}

/// Busy CPU seconds of every core from the first line of `/proc/stat`
/// (`cpu user nice system idle iowait irq softirq steal …`, in ticks of
/// `ticks_per_s`): all but idle and iowait. `None` for another format.
fn machine_busy_seconds(proc_stat: &str, ticks_per_s: f64) -> Option<f64> {
    let line = proc_stat.lines().next()?;
    let mut it = line.split_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = it.map(|t| t.parse().ok()).collect::<Option<_>>()?;
    if ticks.len() < 8 {
        return None;
    }
    // user, nice, system, irq, softirq, steal (guest time is in user).
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    Some(busy as f64 / ticks_per_s)
}

fn machine_now() -> Option<f64> {
    // USER_HZ is 100 on every Linux ABI the project builds for.
    machine_busy_seconds(&std::fs::read_to_string("/proc/stat").ok()?, 100.0)
}

impl CpuMeter {
    fn start() -> Self {
        Self {
            process_s: syncmesh_ops::prom::process_cpu_seconds(),
            machine_s: machine_now(),
        }
    }

    /// `"; machine CPU 20.1 s = 40.2 µs per row; syncmesh process CPU
    /// 12.3 s = 24.6 µs per row"` (the parts it can read; nothing without
    /// `/proc`). With `process` false only the machine's.
    fn per_row(&self, rows: u64, process: bool) -> String {
        let mut out = String::new();
        if rows == 0 {
            return out;
        }
        let mut part = |what: &str, start: Option<f64>, end: Option<f64>| {
            if let (Some(start), Some(end)) = (start, end) {
                let s = end - start;
                out.push_str(&format!(
                    "; {what} CPU {s:.2} s = {:.1} µs per row",
                    s * 1e6 / rows as f64
                ));
            }
        };
        part("machine", self.machine_s, machine_now());
        if process {
            part(
                "syncmesh process",
                self.process_s,
                syncmesh_ops::prom::process_cpu_seconds(),
            );
        }
        out
    }
}

/// Inserts `rows` rows on A before anything replicates.
/// Inserts `rows` items with ids 1..=rows on `src`, `batch` rows per
/// transaction.
async fn insert_items(src: &sqlx::PgPool, rows: u64, batch: u64) -> Result<()> {
    let mut id = 0;
    while id < rows {
        let n = batch.min(rows - id);
        sqlx::query(
            "INSERT INTO items SELECT g, 'item-' || g, (g % 100)::int, (g % 10000) / 100.0 \
             FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind((id + 1) as i64)
        .bind((id + n) as i64)
        .execute(src)
        .await?;
        id += n;
    }
    Ok(())
}

/// Waits (polling every `poll`) until `target` holds `rows` items; returns
/// the time since `start`.
async fn wait_count(
    target: &sqlx::PgPool,
    rows: u64,
    start: Instant,
    poll: Duration,
) -> Result<Duration> {
    loop {
        if count(target, rows).await? >= rows as i64 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > DEADLINE {
            bail!("the target did not receive all {rows} rows within {DEADLINE:?}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// Initial copy of `rows` existing rows into an empty B: native
/// subscription (copy_data) and syncmesh (the node's initial snapshot).
async fn snapshot_runs(
    a: &PgCluster,
    b: &PgCluster,
    base: &Path,
    run: usize,
    rows: u64,
    capture: PgCapture,
) -> Result<(f64, f64)> {
    let db = format!("native_snap_{run}");
    create_both(a, b, &db).await?;
    let src = a.pool(&db).await?;
    insert_items(&src, rows, 100_000).await?;
    a.exec(&db, "CREATE PUBLICATION bench FOR TABLE items")
        .await?;
    let dst = b.pool(&db).await?;
    let start = Instant::now();
    let cpu = CpuMeter::start();
    b.exec(
        &db,
        &format!(
            "CREATE SUBSCRIPTION bench_snap_{run} CONNECTION 'host=127.0.0.1 port={} dbname={db} user=postgres password={PASSWORD}' PUBLICATION bench",
            a.port
        ),
    )
    .await?;
    let took = wait_count(&dst, rows, start, Duration::from_millis(100)).await?;
    let native = rows as f64 / took.as_secs_f64();
    println!(
        "run {run}: native initial table copy of {rows} rows: {took:.2?} -> {native:.0} rows/s{}",
        cpu.per_row(rows, false)
    );
    b.exec(&db, &format!("DROP SUBSCRIPTION bench_snap_{run}"))
        .await?;

    let db = format!("mesh_snap_{run}");
    create_both(a, b, &db).await?;
    let src = a.pool(&db).await?;
    insert_items(&src, rows, 100_000).await?;
    let dst = b.pool(&db).await?;
    let start = Instant::now();
    let cpu = CpuMeter::start();
    let mesh = Mesh::start(a, b, base, &db, capture).await?;
    let took = wait_count(&dst, rows, start, Duration::from_millis(100)).await?;
    let ours = rows as f64 / took.as_secs_f64();
    println!(
        "run {run}: syncmesh initial snapshot of {rows} rows (node start to all on PG B): {took:.2?} -> {ours:.0} rows/s{}",
        cpu.per_row(rows, true)
    );
    mesh.stop().await?;
    Ok((native, ours))
}

/// Writes ticks on A at `rate` rows/s for `secs` seconds (100
/// transactions a second), waits until B holds them all, and returns the
/// lag percentiles (p50, p99) in ms plus the write rate achieved.
async fn lag_load(
    src: &sqlx::PgPool,
    dst: &sqlx::PgPool,
    rate: u64,
    secs: u64,
) -> Result<(f64, f64, f64)> {
    let per_tx = (rate / 100).max(1);
    let total = per_tx * 100 * secs;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut id = 0u64;
    while id < total {
        tick.tick().await;
        sqlx::query(
            "INSERT INTO ticks (id, written_at) \
             SELECT g, clock_timestamp() FROM generate_series($1::bigint, $2::bigint) g",
        )
        .bind((id + 1) as i64)
        .bind((id + per_tx) as i64)
        .execute(src)
        .await?;
        id += per_tx;
    }
    let wrote = total as f64 / start.elapsed().as_secs_f64();
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ticks WHERE arrived_at IS NOT NULL")
            .fetch_one(dst)
            .await?;
        if n >= total as i64 {
            break;
        }
        if start.elapsed() > DEADLINE {
            bail!("B did not receive all {total} ticks within {DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY lag))::float8, \
                (percentile_cont(0.99) WITHIN GROUP (ORDER BY lag))::float8 \
         FROM (SELECT extract(epoch FROM arrived_at - written_at) * 1000 AS lag FROM ticks) l",
    )
    .fetch_one(dst)
    .await?;
    Ok((p50, p99, wrote))
}

/// Replication lag under a steady `rate` of inserts, native and syncmesh.
async fn lag_runs(
    a: &PgCluster,
    b: &PgCluster,
    base: &Path,
    run: usize,
    rate: u64,
    secs: u64,
    capture: PgCapture,
) -> Result<(f64, f64)> {
    let db = format!("native_lag_{run}");
    create_both(a, b, &db).await?;
    a.exec(&db, "CREATE PUBLICATION bench FOR TABLE ticks")
        .await?;
    b.exec(
        &db,
        &format!(
            "CREATE SUBSCRIPTION bench_lag_{run} CONNECTION 'host=127.0.0.1 port={} dbname={db} user=postgres password={PASSWORD}' PUBLICATION bench",
            a.port
        ),
    )
    .await?;
    let (src, dst) = (a.pool(&db).await?, b.pool(&db).await?);
    let (p50, p99, wrote) = lag_load(&src, &dst, rate, secs).await?;
    println!(
        "run {run}: native lag at {wrote:.0} rows/s for {secs} s: p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    b.exec(&db, &format!("DROP SUBSCRIPTION bench_lag_{run}"))
        .await?;
    let native_p99 = p99;

    let db = format!("mesh_lag_{run}");
    create_both(a, b, &db).await?;
    let mesh = Mesh::start(a, b, base, &db, capture).await?;
    let (src, dst) = (a.pool(&db).await?, b.pool(&db).await?);
    let (p50, p99, wrote) = lag_load(&src, &dst, rate, secs).await?;
    println!(
        "run {run}: syncmesh lag at {wrote:.0} rows/s for {secs} s: p50 {p50:.1} ms, p99 {p99:.1} ms"
    );
    mesh.stop().await?;
    Ok((native_p99, p99))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// What the PostgreSQL benchmark measures.
#[derive(Clone, Copy, Debug)]
pub struct PgBench {
    /// Rows streamed per run (inserted in transactions of `batch`).
    pub rows: u64,
    /// Rows per insert transaction of the streaming part.
    pub batch: u64,
    /// Runs of each part (medians are reported).
    pub runs: usize,
    /// Existing rows copied by the initial-snapshot part (0 skips it).
    pub snapshot_rows: u64,
    /// Inserts per second of the lag part (0 skips it).
    pub lag_rate: u64,
    /// Seconds the lag part writes for.
    pub lag_seconds: u64,
    /// How node A reads its slot.
    pub capture: PgCapture,
}

/// Runs the PostgreSQL benchmark and prints per-run figures, medians and
/// the ratios syncmesh / native: streaming, initial snapshot, lag.
pub async fn run(bench: PgBench, dir: Option<std::path::PathBuf>) -> Result<()> {
    let PgBench {
        rows,
        batch,
        runs,
        snapshot_rows,
        lag_rate,
        lag_seconds,
        capture,
    } = bench;
    if rows == 0 || batch == 0 || runs == 0 {
        bail!("--rows, --batch and --runs must be at least 1");
    }
    let tmp = tempfile::tempdir()?;
    let base = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "bench postgres ({runs} runs each, syncmesh vs native logical replication on the same two clusters):\n\
         1. streaming: {rows} rows inserted on PG A in transactions of {batch}; time until PG B holds all\n\
         2. initial snapshot: {snapshot_rows} existing rows into an empty PG B\n\
         3. lag: {lag_rate} inserts/s on PG A for {lag_seconds} s; per-row lag until committed on PG B\n         syncmesh node A reads its slot by: {capture:?}"
    );
    let settings = [("synchronous_commit", "on"), ("fsync", "on")];
    let a = PgCluster::start_with(&settings)?;
    let b = PgCluster::start_with(&settings)?;
    let mut native = Vec::new();
    let mut ours = Vec::new();
    for run in 1..=runs {
        native.push(native_run(&a, &b, run, rows, batch).await?);
        ours.push(syncmesh_run(&a, &b, &base, run, rows, batch, capture).await?);
    }
    let (n, s) = (median(&mut native), median(&mut ours));
    println!(
        "median streaming: syncmesh {s:.0} rows/s, native logical replication {n:.0} rows/s, ratio {:.2}x",
        s / n
    );
    if snapshot_rows > 0 {
        let (mut native, mut ours) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let (n, s) = snapshot_runs(&a, &b, &base, run, snapshot_rows, capture).await?;
            native.push(n);
            ours.push(s);
        }
        let (n, s) = (median(&mut native), median(&mut ours));
        println!(
            "median initial snapshot: syncmesh {s:.0} rows/s, native table copy {n:.0} rows/s, ratio {:.2}x",
            s / n
        );
    }
    if lag_rate > 0 && lag_seconds > 0 {
        let (mut native, mut ours) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let (n, s) = lag_runs(&a, &b, &base, run, lag_rate, lag_seconds, capture).await?;
            native.push(n);
            ours.push(s);
        }
        let (n, s) = (median(&mut native), median(&mut ours));
        println!("median lag p99: syncmesh {s:.1} ms, native {n:.1} ms (aim: syncmesh < 100 ms)");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::machine_busy_seconds;

    #[test]
    fn machine_busy_time_counts_all_but_idle_and_iowait() {
        let stat = "cpu  100 20 30 5000 70 4 6 8 0 0\ncpu0 50 10 15 2500 35 2 3 4 0 0\nintr 1\n";
        // user + nice + system + irq + softirq + steal = 168 ticks.
        assert_eq!(machine_busy_seconds(stat, 100.0), Some(1.68));
        assert_eq!(machine_busy_seconds("cpu0 1 2 3 4 5 6 7 8\n", 100.0), None);
        assert_eq!(machine_busy_seconds("cpu 1 2 x 4 5 6 7 8\n", 100.0), None);
        assert_eq!(machine_busy_seconds("cpu 1 2 3\n", 100.0), None);
        assert_eq!(machine_busy_seconds("", 100.0), None);
    }
}
