//! Helpers shared by the subcommands: starting a hub from config, asking a
//! hub for its status, printing it, and waiting for convergence.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use syncmesh_hub::core::HubSettings;
use syncmesh_hub::server::{HubHandle, HubOptions, start_hub};
use syncmesh_node::adapter::TableSchema;

use syncmesh_node::config::{Config, HubConfig, NodeConfig};
use syncmesh_node::shell::NodeHandle;
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_node::tls::{ClientTls, Hints};
use syncmesh_proto::v1 as pb;
use syncmesh_proto::v1::sync_client::SyncClient;
use syncmesh_resolver::{NodeId, Value};

/// Starts the hub described by `hub` in `cfg`.
pub async fn start_hub_from(cfg: &Config, hub: &HubConfig) -> Result<HubHandle> {
    let (settings, options) = hub_settings_from(cfg, hub)?;
    Ok(start_hub(settings, options, &hub.data_dir, hub.listen).await?)
}

/// The core settings and options of the hub described by `hub` in `cfg`.
pub fn hub_settings_from(cfg: &Config, hub: &HubConfig) -> Result<(HubSettings, HubOptions)> {
    let settings = HubSettings {
        name: NodeId::new(hub.name.clone())
            .with_context(|| format!("config {}: hub.name", cfg.source))?,
        batch_size: cfg.sync.batch_size,
        max_clock_drift_ms: cfg.sync.max_clock_drift_ms,
    };
    let priorities = cfg.priorities();
    let options = HubOptions {
        tables: cfg
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.rules(&priorities)))
            .collect(),
        conflict_retention_days: cfg.conflicts.retention_days,
        metrics: hub.metrics,
        alert: cfg.conflicts.alert.clone(),
        mirror: cfg.conflicts.mirror.clone(),
        tombstone_grace_ms: hub.tombstone_grace_hours.saturating_mul(3_600_000),
        nodes: cfg
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.mode.as_str().to_owned()))
            .collect(),
        tls: hub.tls.clone(),
    };
    Ok((settings, options))
}

/// How a command-line client reaches a hub: its URL and, for `https://`,
/// the TLS settings (`--ca`, `--cert`, `--key`, or a node's `tls` map).
#[derive(Clone, Debug)]
pub struct HubTarget {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// TLS settings for an `https://` hub (`None`: the webpki roots).
    pub tls: Option<ClientTls>,
    /// Which settings error messages name.
    pub hints: Hints,
}

impl HubTarget {
    /// A plaintext or webpki-roots target, as the flags name it.
    pub fn plain(url: &str) -> HubTarget {
        HubTarget {
            url: url.to_owned(),
            tls: None,
            hints: Hints::cli(),
        }
    }

    /// The target the flags describe: `--ca`, `--cert`, `--key` and
    /// `--tls-server-name` (files read and checked now).
    pub fn from_flags(
        url: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        server_name: Option<String>,
    ) -> Result<HubTarget> {
        let hints = Hints::cli();
        let tls = if ca.is_none() && cert.is_none() && key.is_none() && server_name.is_none() {
            None
        } else {
            Some(
                ClientTls::load(ca, cert, key, server_name, &hints)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )
        };
        Ok(HubTarget {
            url: url.to_owned(),
            tls,
            hints,
        })
    }

    /// The hub of the node `n` of a config file.
    pub fn of_node(n: &NodeConfig) -> HubTarget {
        HubTarget {
            url: n.hub.clone(),
            tls: n.tls.clone(),
            hints: Hints::node(&n.at),
        }
    }

    /// Opens a channel (3 s to connect, `timeout` per call); a TLS failure
    /// is one line that says what to change.
    pub async fn channel(&self, timeout: Duration) -> Result<tonic::transport::Channel> {
        let url = self.url.as_str();
        let endpoint = syncmesh_node::tls::endpoint(url, self.tls.as_ref(), &self.hints)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(timeout);
        match endpoint.connect().await {
            Ok(c) => Ok(c),
            Err(e) => Err(anyhow::anyhow!("{}", self.failure(&e).await.unwrap_or_else(|| format!(
                "cannot reach the hub at {url} ({}): is `syncmesh hub` running and is the URL right?",
                syncmesh_node::tls::chain_text(&e)
            )))),
        }
    }

    /// Why a call failed, when it is a TLS problem: `hub URL: what to do`.
    async fn failure(&self, err: &(dyn std::error::Error + 'static)) -> Option<String> {
        let d = syncmesh_node::tls::diagnose(err, &self.url, self.tls.as_ref(), &self.hints);
        let why = d.resolve(&self.url, &self.hints).await?;
        Some(format!("hub {}: {why}", self.url))
    }

    /// An error for a refused call `what`.
    pub async fn call_error(&self, what: &str, s: tonic::Status) -> anyhow::Error {
        if let Some(why) = self.failure(&s).await {
            return anyhow::anyhow!("{why}");
        }
        anyhow::anyhow!(
            "hub at {} refused the {what} call: {}",
            self.url,
            s.message()
        )
    }
}

/// Asks the hub at `url` for its status (5 s timeout).
pub async fn hub_status(url: &str) -> Result<pb::StatusReply> {
    hub_status_at(&HubTarget::plain(url)).await
}

/// Asks the hub `target` names for its status (5 s timeout).
pub async fn hub_status_at(target: &HubTarget) -> Result<pb::StatusReply> {
    let channel = target.channel(Duration::from_secs(5)).await?;
    match SyncClient::new(channel).status(pb::StatusRequest {}).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(s) => Err(target.call_error("status", s).await),
    }
}

/// The status as JSON (the same document the hub's web page renders).
pub fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    let mut s = s.clone();
    fill_health(&mut s);
    syncmesh_hub::telemetry::status_json(&s)
}

/// A hub older than the dashboard sends no health: derive it here.
fn fill_health(s: &mut pb::StatusReply) {
    if s.health.is_empty() {
        let (h, reason) = syncmesh_hub::telemetry::health(s, unix_ms());
        s.health = h.to_owned();
        s.health_reason = reason;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn lag(seconds: f64, known: bool) -> String {
    if known && seconds.is_finite() {
        format!("{seconds:.3}")
    } else {
        "-".to_owned()
    }
}

/// The dashboard as text: health, throughput, last 24 hours, nodes, tables.
pub fn render_status(s: &pb::StatusReply) -> String {
    use std::fmt::Write;
    let mut s = s.clone();
    fill_health(&mut s);
    let now = if s.now_unix_ms > 0 {
        s.now_unix_ms
    } else {
        unix_ms()
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "hub {}: {} - {}",
        s.hub,
        s.health.to_uppercase(),
        s.health_reason
    );
    let tp = s.throughput.unwrap_or_default();
    let day = s.last_24h.unwrap_or_default();
    let _ = writeln!(
        o,
        "throughput  now {:.1} rec/s   average {:.1} rec/s   peak {:.1} rec/s",
        tp.now_records_per_second, tp.average_records_per_second, tp.peak_records_per_second
    );
    let _ = writeln!(
        o,
        "last 24 h   records {}   errors {}   conflicts {}   (ops held {}, errors since start {})",
        day.records, day.errors, day.conflicts, s.total_ops, s.errors_total
    );
    let cut = s
        .gc_cut
        .as_ref()
        .and_then(|c| c.stable.as_ref())
        .map(|v| {
            v.entries
                .iter()
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .map(|(n, q)| format!("{n}:{q}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let advanced = if s.gc_cut_advanced_unix_ms == 0 {
        "not since start".to_owned()
    } else {
        syncmesh_hub::telemetry::when(s.gc_cut_advanced_unix_ms, now)
    };
    let _ = writeln!(
        o,
        "tombstone GC  stable cut [{cut}] (advanced {advanced})   row states collected {} dropped {}   ops compacted {}   re-snapshots served {}   refused {}   publish-only writes dropped {}",
        s.gc_rows_collected,
        s.gc_rows_dropped,
        s.gc_ops_compacted,
        s.gc_snapshots_served,
        s.gc_refused,
        s.gc_writes_dropped
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<16} {:<5} {:<10} {:<14} {:>9} {:>9}  LAST SEEN",
        "NODE", "STATE", "ENGINE", "MODE", "LAG (s)", "PENDING"
    );
    for n in &s.nodes {
        let seen = syncmesh_hub::telemetry::when(n.last_seen_unix_ms, now);
        let seen = if n.connected {
            seen
        } else {
            format!("down since {seen}")
        };
        let _ = writeln!(
            o,
            "{:<16} {:<5} {:<10} {:<14} {:>9} {:>9}  {seen}",
            n.node,
            if n.connected { "up" } else { "down" },
            if n.engine.is_empty() { "?" } else { &n.engine },
            n.mode,
            lag(n.lag_seconds, n.lag_seconds > 0.0),
            n.pending_ops,
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<20} {:<7} {:>9} {:>10} {:>7} {:>9}  DETAIL",
        "TABLE", "STATUS", "LAG (s)", "RECORDS", "ERRORS", "CONFLICTS"
    );
    for t in &s.tables {
        let _ = writeln!(
            o,
            "{:<20} {:<7} {:>9} {:>10} {:>7} {:>9}  {}",
            t.table,
            t.state,
            lag(t.lag_seconds, t.records_total > 0),
            t.records_total,
            t.errors_total,
            t.conflicts_total,
            t.detail
        );
    }
    o
}

/// `status --watch`: redraws the dashboard (or prints a JSON line) every
/// two seconds until `stop` completes; an unreachable hub is shown as down
/// and retried.
pub async fn watch_status(
    target: &HubTarget,
    json: bool,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use std::io::Write;
    tokio::pin!(stop);
    if !json {
        print!("\x1b[2J");
    }
    loop {
        let text = match hub_status_at(target).await {
            Ok(s) if json => format!("{}\n", status_json(&s)),
            Ok(s) => render_status(&s),
            Err(e) if json => format!(
                "{}\n",
                serde_json::json!({"health": "down", "reason": format!("{e:#}")})
            ),
            Err(e) => format!("DOWN - {e:#}\n"),
        };
        let mut out = std::io::stdout().lock();
        if json {
            out.write_all(text.as_bytes())?;
        } else {
            // Home, draw, clear what is left of the previous frame.
            write!(out, "\x1b[H{}\x1b[J", text.replace('\n', "\x1b[K\n"))?;
        }
        out.flush()?;
        drop(out);
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Prints the dashboard.
pub fn print_status(s: &pb::StatusReply) {
    print!("{}", render_status(s));
}

/// Dumps every table of every replica.
pub async fn dump_all(
    dbs: &[(String, SqliteAdapter)],
    schemas: &[TableSchema],
) -> Result<Vec<Vec<Vec<BTreeMap<String, Value>>>>> {
    let mut out = Vec::new();
    for (_, db) in dbs {
        let mut tables = Vec::new();
        for s in schemas {
            tables.push(db.dump_table(s).await?);
        }
        out.push(tables);
    }
    Ok(out)
}

/// Waits until every replica holds identical rows, nothing is pending in
/// any change table, and the hub reports no node behind. Returns the time it
/// took, or an error naming what still differs after `timeout`.
pub async fn wait_converged(
    hub_url: &str,
    dbs: &[(String, SqliteAdapter)],
    nodes: &[&NodeHandle],
    schemas: &[TableSchema],
    timeout: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let dumps = dump_all(dbs, schemas).await?;
        let same = dumps.windows(2).all(|w| w[0] == w[1]);
        let mut pending = 0;
        for (_, db) in dbs {
            pending += db.pending_changes().await?;
        }
        let status = hub_status(hub_url).await?;
        let behind: u64 = status.nodes.iter().map(|n| n.pending_ops).sum();
        let unsent = nodes.iter().any(|n| {
            let st = n.stats();
            st.own_acked < st.own_ops || st.dirty_rows > 0
        });
        if same && pending == 0 && behind == 0 && !unsent {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "replicas did not converge within {:?}: rows identical: {same}, uncaptured changes: {pending}, ops not yet acknowledged by nodes: {behind}, a node with unsent ops or unapplied rows: {unsent}",
                timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
