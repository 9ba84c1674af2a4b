//! `syncmesh`: the one user-facing binary (hub, node, check, status, demo, bench).

use syncmesh::{bench, bench_mariadb, bench_pg, check, conflicts, demo, mesh};

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use syncmesh_node::config::Config;

/// mimalloc instead of glibc malloc: the cores allocate many small,
/// short-lived rows and ops, where glibc spent a third of the CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "syncmesh",
    version,
    about = "Multi-master, bi-directional database sync mesh"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// How to speak TLS to an `https://` hub.
#[derive(Args, Clone, Debug, Default)]
struct TlsFlags {
    /// PEM file of the CA that signed the hub's certificate (default: the
    /// public webpki roots).
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for a hub with hub.tls.client_ca (with --key).
    #[arg(long, value_name = "PATH")]
    cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
    /// The name the hub's certificate must carry (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
}

impl TlsFlags {
    fn target(self, hub: &str) -> anyhow::Result<mesh::HubTarget> {
        mesh::HubTarget::from_flags(hub, self.ca, self.cert, self.key, self.tls_server_name)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo: a hub and three SQLite edge databases in one
    /// process; concurrent edits, a partition and its heal. Exits 0 only if
    /// every replica converged.
    Demo {
        /// Keep the databases, logs and config here (default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the hub of a config file.
    Hub {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run one node of a config file.
    Node {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
        /// Which node of the config to run.
        #[arg(long)]
        name: String,
    },
    /// Validate a config, reach every database and the hub, report what will
    /// be captured. Exits non-zero on any problem.
    Check {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
        /// Check only this node.
        #[arg(long)]
        name: Option<String>,
    },
    /// The dashboard: health, nodes, per-table status, lag, throughput and
    /// the last 24 hours, as the hub sees them. Exits non-zero if the hub
    /// cannot be reached.
    Status {
        /// Hub URL, e.g. http://127.0.0.1:7700 (https:// for a TLS hub)
        #[arg(long)]
        hub: String,
        #[command(flatten)]
        tls: TlsFlags,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// Refresh in place every two seconds until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// List the conflict records a hub holds, newest first.
    Conflicts {
        /// Hub URL, e.g. http://127.0.0.1:7700 (https:// for a TLS hub)
        #[arg(long)]
        hub: String,
        #[command(flatten)]
        tls: TlsFlags,
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
        /// Only since this time: 90m, 24h, 7d, an RFC 3339 time, or Unix ms.
        #[arg(long)]
        since: Option<String>,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end throughput: rows inserted on one SQLite node until both
    /// other nodes hold them all (median of several runs).
    Bench {
        /// `sqlite` (hub + three SQLite nodes), `postgres` (PostgreSQL to
        /// PostgreSQL through syncmesh vs native logical replication) or
        /// `mariadb` (MariaDB to PostgreSQL and a Redis cache).
        #[arg(long, default_value = "sqlite")]
        scenario: String,
        /// Rows per run.
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        /// Rows per insert transaction.
        #[arg(long, default_value_t = 1_000)]
        batch: u64,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Work directory (default: a temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// postgres: existing rows the initial-snapshot part copies (0 skips it).
        #[arg(long, default_value_t = 1_000_000)]
        snapshot_rows: u64,
        /// postgres: inserts per second of the lag part (0 skips it).
        #[arg(long, default_value_t = 10_000)]
        lag_rate: u64,
        /// postgres: seconds the lag part writes for.
        #[arg(long, default_value_t = 20)]
        lag_seconds: u64,
        /// postgres: how node A reads its slot, `stream` (the default) or
        /// `peek` (the fallback), to compare the two.
        #[arg(long, default_value = "stream", value_parser = ["stream", "peek"])]
        pg_capture: String,
    },
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SYNCMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Demo { dir } => {
            init_logs(cli.log_format, "warn");
            demo::run(dir).await
        }
        Command::Bench {
            scenario,
            rows,
            batch,
            runs,
            dir,
            snapshot_rows,
            lag_rate,
            lag_seconds,
            pg_capture,
        } => {
            init_logs(cli.log_format, "warn");
            match scenario.as_str() {
                "sqlite" => bench::run(rows, batch, runs, dir).await.map(|_| true),
                "postgres" => bench_pg::run(
                    bench_pg::PgBench {
                        rows,
                        batch,
                        runs,
                        snapshot_rows,
                        lag_rate,
                        lag_seconds,
                        capture: if pg_capture == "peek" {
                            syncmesh_node::config::PgCapture::Peek
                        } else {
                            syncmesh_node::config::PgCapture::Stream
                        },
                    },
                    dir,
                )
                .await
                .map(|_| true),
                "mariadb" => bench_mariadb::run(rows, batch, runs, dir)
                    .await
                    .map(|_| true),
                other => Err(anyhow::anyhow!(
                    "unknown bench scenario `{other}`: use sqlite, postgres or mariadb"
                )),
            }
        }
        Command::Hub { config } => {
            init_logs(cli.log_format, "info");
            let cfg = Config::load(&config)?;
            let hub_cfg = cfg.hub()?;
            let mut hub = mesh::start_hub_from(&cfg, hub_cfg).await?;
            tracing::info!(url = %hub.url(), "hub running; Ctrl-C to stop");
            tokio::select! {
                r = hub.wait() => r?,
                _ = shutdown_signal() => {
                    tracing::info!("stopping hub");
                    hub.shutdown().await?;
                }
            }
            Ok(true)
        }
        Command::Node { config, name } => {
            init_logs(cli.log_format, "info");
            let cfg = Config::load(&config)?;
            let node_cfg = cfg.node(&name)?;
            let mut node = syncmesh_node::shell::start_node(&cfg, &name).await?;
            tracing::info!(node = %name, hub = %node_cfg.hub, "node running; Ctrl-C to stop");
            tokio::select! {
                r = node.wait() => r?,
                _ = shutdown_signal() => node.shutdown().await?,
            }
            Ok(true)
        }
        Command::Check { config, name } => {
            init_logs(cli.log_format, "warn");
            check::run(&config, name.as_deref()).await
        }
        Command::Conflicts {
            hub,
            tls,
            table,
            since,
            json,
        } => {
            init_logs(cli.log_format, "warn");
            let since_ms = match since {
                Some(s) => conflicts::parse_since(&s, std::time::SystemTime::now())?,
                None => 0,
            };
            let target = tls.target(&hub)?;
            let reply = conflicts::fetch_at(&target, table.as_deref(), since_ms).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&conflicts::to_json(&reply))
                        .context("encoding conflicts")?
                );
            } else {
                conflicts::print(&reply);
            }
            Ok(true)
        }
        Command::Status {
            hub,
            tls,
            json,
            watch: true,
        } => {
            init_logs(cli.log_format, "warn");
            let target = tls.target(&hub)?;
            mesh::watch_status(&target, json, shutdown_signal()).await?;
            Ok(true)
        }
        Command::Status {
            hub,
            tls,
            json,
            watch: false,
        } => {
            init_logs(cli.log_format, "warn");
            let target = tls.target(&hub)?;
            let status = mesh::hub_status_at(&target).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&mesh::status_json(&status))
                        .context("encoding status")?
                );
            } else {
                mesh::print_status(&status);
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    // One crypto provider for every TLS user in the process (gRPC links,
    // database connections): ring.
    syncmesh_node::tls::install_ring_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
