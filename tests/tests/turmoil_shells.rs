//! The real tonic shells of hub and nodes over turmoil's simulated network:
//! three SQLite nodes and a hub, writes on every node while links are
//! partitioned, held and released and a node host is bounced (its process
//! restarts on the same sled log and database). After the network heals no
//! stream stays stuck: every database converges to the same rows, which
//! are exactly the rows the writes make.
//!
//! Each seed drives turmoil's RNG (message latency, host order); the
//! default run sweeps [`SEEDS`] seeds, `SYNCMESH_TURMOIL_SEEDS=N` more, and
//! `SYNCMESH_TURMOIL_SEED=S` replays one. What is real: tonic, hyper, the
//! shells, sled and SQLite files. What is simulated: TCP and tokio's time
//! (timeouts, keepalives, reconnect backoff); HLCs read the wall clock.
//! SQLite and sled work on real threads while simulated time runs on, so a
//! seed does not replay exactly and the liveness bounds (120 s to converge
//! before the faults, 300 s after the heal, simulated) are generous.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use futures::FutureExt;
use syncmesh_node::config::Config;
use syncmesh_node::shell::{Dialer, start_node_with_dialer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::Endpoint;

/// Seeds in the default run.
const SEEDS: u64 = 50;
const NODES: [&str; 3] = ["a", "b", "c"];
const HUB_PORT: u16 = 7700;

/// A simulated TCP connection as the hub's tonic server takes it.
struct SimConn(turmoil::net::TcpStream);

impl AsyncRead for SimConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for SimConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// Dials the hub over turmoil's network (the node shell's [`Dialer`]).
fn dialer() -> Dialer {
    Arc::new(|endpoint: Endpoint| {
        async move {
            let connector = tower::service_fn(|uri: tonic::transport::Uri| async move {
                let authority = uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default();
                let s = turmoil::net::TcpStream::connect(authority).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            });
            endpoint.connect_with_connector(connector).await
        }
        .boxed()
    })
}

fn config(dir: &Path) -> Result<Config> {
    let mut yaml = format!(
        "hub: {{ listen: \"0.0.0.0:{HUB_PORT}\", data_dir: ./hub }}\nsync: {{ batch_size: 50 }}\nnodes:\n"
    );
    for n in NODES {
        yaml.push_str(&format!(
            "  - {{ name: {n}, hub: \"http://hub:{HUB_PORT}\", data_dir: ./{n}, database: {{ type: sqlite, url: \"sqlite://{}\" }} }}\n",
            dir.join(format!("{n}.db")).display()
        ));
    }
    yaml.push_str("tables:\n  - name: orders\n    resolve: { fields: { qty: sum } }\n");
    Ok(Config::parse(&yaml, "<turmoil>", dir)?)
}

fn db_url(dir: &Path, node: &str) -> String {
    format!("sqlite://{}", dir.join(format!("{node}.db")).display())
}

async fn exec(pool: &sqlx::SqlitePool, sql: String) -> Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    Ok(())
}

type Rows = Vec<(i64, String, i64)>;

async fn rows(pool: &sqlx::SqlitePool) -> Result<Rows> {
    Ok(
        sqlx::query_as("SELECT id, item, qty FROM orders ORDER BY id")
            .fetch_all(pool)
            .await?,
    )
}

/// What the driver's writes must leave in every database.
fn expected() -> Rows {
    let mut want: BTreeMap<i64, (String, i64)> = BTreeMap::new();
    for (i, n) in NODES.iter().enumerate() {
        for k in 1..=10 {
            let id = i as i64 * 100 + k;
            want.insert(id, (format!("{n}{k}"), k));
        }
    }
    // During the faults: every node adds 1 to each of a's first five
    // counters (concurrent increments all count), b renames row 101, c
    // deletes row 210.
    for k in 1..=5 {
        want.get_mut(&k).unwrap().1 += NODES.len() as i64;
    }
    want.get_mut(&101).unwrap().0 = "renamed".into();
    want.remove(&210);
    want.into_iter()
        .map(|(id, (item, qty))| (id, item, qty))
        .collect()
}

fn run_seed(seed: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path: PathBuf = dir.path().canonicalize()?;
    // The databases exist before the nodes start (a real tokio runtime).
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            for n in NODES {
                syncmesh_tests::create_db(
                    &path.join(format!("{n}.db")),
                    "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL, qty INTEGER NOT NULL DEFAULT 0)",
                )
                .await?;
            }
            anyhow::Ok(())
        })?;
    let cfg = Arc::new(config(&path)?);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(1200))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(30))
        .rng_seed(seed)
        .build();

    {
        let cfg = cfg.clone();
        sim.host("hub", move || {
            let cfg = cfg.clone();
            async move {
                let hub = cfg.hub().map_err(|e| e.to_string())?;
                let (settings, options) =
                    syncmesh::mesh::hub_settings_from(&cfg, hub).map_err(|e| e.to_string())?;
                let listener = turmoil::net::TcpListener::bind((
                    IpAddr::from(Ipv4Addr::UNSPECIFIED),
                    HUB_PORT,
                ))
                .await?;
                let incoming = futures::stream::unfold(listener, |l| async move {
                    let conn = l.accept().await.map(|(s, _)| SimConn(s));
                    Some((conn, l))
                });
                let addr = SocketAddr::from(([0, 0, 0, 0], HUB_PORT));
                let mut h = syncmesh_hub::server::start_hub_with_incoming(
                    settings,
                    options,
                    &hub.data_dir,
                    incoming,
                    addr,
                )
                .await?;
                h.wait().await?;
                Ok(())
            }
        });
    }
    for n in NODES {
        let cfg = cfg.clone();
        sim.host(n, move || {
            let cfg = cfg.clone();
            async move {
                let mut node = start_node_with_dialer(&cfg, n, Some(dialer())).await?;
                node.wait().await?;
                Ok(())
            }
        });
    }

    let p = path.clone();
    let faults_on = std::rc::Rc::new(std::cell::Cell::new(false));
    let faults = faults_on.clone();
    sim.client("driver", async move {
        let mut pools = Vec::new();
        for n in NODES {
            pools.push(sqlx::SqlitePool::connect(&db_url(&p, n)).await?);
        }
        let sleep = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
        // Capture starts when a node runs: write only once all are
        // connected (rows written before would need an initial snapshot).
        let mut up = false;
        for _ in 0..600 {
            if let Ok(s) = hub_status().await
                && s.nodes.iter().filter(|n| n.connected).count() == NODES.len()
            {
                up = true;
                break;
            }
            sleep(100).await;
        }
        if !up {
            return Err("the nodes did not all connect to the hub within 60 simulated s".into());
        }
        // Round 1: every node inserts its rows; wait until all have all.
        for (i, (n, pool)) in NODES.iter().zip(&pools).enumerate() {
            for k in 1..=10 {
                let id = i as i64 * 100 + k;
                exec(
                    pool,
                    format!("INSERT INTO orders VALUES ({id}, '{n}{k}', {k})"),
                )
                .await?;
            }
        }
        converge(&pools, 120, |_| true)
            .await
            .map_err(|e| format!("round 1: {e}"))?;
        // Faults: a is cut off, b's link is held (messages wait), c keeps
        // going; everyone writes meanwhile.
        turmoil::partition("a", "hub");
        turmoil::hold("b", "hub");
        faults.set(true);
        for pool in &pools {
            exec(pool, "UPDATE orders SET qty = qty + 1 WHERE id <= 5".into()).await?;
            sleep(200).await;
        }
        exec(
            &pools[1],
            "UPDATE orders SET item = 'renamed' WHERE id = 101".into(),
        )
        .await?;
        exec(&pools[2], "DELETE FROM orders WHERE id = 210".into()).await?;
        sleep(3_000).await;
        turmoil::release("b", "hub");
        sleep(2_000).await;
        // b and c (bounced meanwhile) agree, without a's writes: the
        // partition really cut a off.
        let b_and_c = |r: &Rows| r.iter().any(|x| x.0 == 1 && x.2 == 1 + 2);
        converge(&pools[1..], 120, b_and_c)
            .await
            .map_err(|e| format!("b and c during the partition (row 1 must show qty 1 + b's and c's increments, none of a's): {e}"))?;
        // Heal.
        turmoil::repair("a", "hub");
        let want = expected();
        converge(&pools, 300, |r| *r == want)
            .await
            .map_err(|e| format!("after the heal, to {want:?}: {e}"))?;
        // Exactly one op per changed row: 30 inserts, 15 increments, a
        // rename and a delete; retries and the restart added none.
        let status = hub_status().await?;
        if status.total_ops != 47 {
            return Err(
                format!("the hub holds {} ops, the writes made 47", status.total_ops).into(),
            );
        }
        Ok(())
    });

    // Drive the simulation, bouncing c (process restart on the same files)
    // while the faults are on.
    let mut bounce_at = None;
    loop {
        if bounce_at.is_none() && faults_on.get() {
            bounce_at = Some(sim.elapsed() + Duration::from_millis(700));
        }
        if bounce_at.is_some_and(|t| sim.elapsed() >= t) {
            sim.bounce("c");
            bounce_at = Some(Duration::MAX);
        }
        match sim.step() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => anyhow::bail!(
                "seed {seed} failed after {:?} simulated: {e}\n  replay: SYNCMESH_TURMOIL_SEED={seed} cargo test -p syncmesh-tests --test turmoil_shells",
                sim.elapsed()
            ),
        }
    }
}

async fn hub_status() -> Result<syncmesh_proto::v1::StatusReply, Box<dyn std::error::Error>> {
    let ch = dialer()(Endpoint::from_static("http://hub:7700")).await?;
    Ok(syncmesh_proto::v1::sync_client::SyncClient::new(ch)
        .status(syncmesh_proto::v1::StatusRequest {})
        .await?
        .into_inner())
}

/// Waits (simulated time) until every database shows the same rows, and
/// those rows satisfy `done`.
async fn converge(
    pools: &[sqlx::SqlitePool],
    limit_s: u64,
    done: impl Fn(&Rows) -> bool,
) -> Result<(), String> {
    let names = &NODES[NODES.len() - pools.len()..];
    let mut last = Vec::new();
    for _ in 0..limit_s * 10 {
        let mut all = Vec::new();
        for p in pools {
            all.push(rows(p).await.map_err(|e| e.to_string())?);
        }
        if all.windows(2).all(|w| w[0] == w[1]) && !all[0].is_empty() && done(&all[0]) {
            return Ok(());
        }
        last = all;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary: Vec<String> = names
        .iter()
        .zip(&last)
        .map(|(n, r)| {
            let ids: Vec<i64> = r.iter().map(|x| x.0).collect();
            format!("{n}: {} rows {ids:?}", r.len())
        })
        .collect();
    Err(format!(
        "no convergence within {limit_s} simulated s: {}",
        summary.join("; ")
    ))
}

#[test]
fn shells_converge_over_a_faulty_simulated_network() -> Result<()> {
    // `RUST_LOG=debug` shows the shells' logs, stamped with simulated time.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(SimTime)
            .try_init();
    }
    let seeds: Vec<u64> = match std::env::var("SYNCMESH_TURMOIL_SEED") {
        Ok(s) => vec![s.parse()?],
        Err(_) => {
            let n = std::env::var("SYNCMESH_TURMOIL_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(SEEDS);
            (0..n).collect()
        }
    };
    let mut failures = Vec::new();
    for seed in &seeds {
        if let Err(e) = run_seed(*seed) {
            failures.push(format!("{e:#}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    Ok(())
}

struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:?}", turmoil::sim_elapsed().unwrap_or_default())
    }
}
