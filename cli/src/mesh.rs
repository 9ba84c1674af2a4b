//! Helpers shared by the subcommands: starting a hub from config, asking a
//! hub for its status, printing it, and waiting for convergence.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use syncmesh_hub::core::HubSettings;
use syncmesh_hub::server::{HubHandle, HubOptions, start_hub};
use syncmesh_node::adapter::TableSchema;
use syncmesh_node::config::{Config, HubConfig};
use syncmesh_node::shell::NodeHandle;
use syncmesh_node::sqlite::SqliteAdapter;
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
    };
    Ok((settings, options))
}

/// Asks the hub at `url` for its status (5 s timeout).
pub async fn hub_status(url: &str) -> Result<pb::StatusReply> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("hub URL {url:?} is not a valid URL: use http://HOST:PORT"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the hub at {url} ({e}): is `syncmesh hub` running and is the URL right?"
        )
    })?;
    let reply = SyncClient::new(channel)
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("hub at {url} refused the status call: {}", s.message()))?;
    Ok(reply.into_inner())
}

fn vv_map(vv: &Option<pb::VersionVector>) -> BTreeMap<String, u64> {
    vv.as_ref()
        .map(|v| v.entries.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default()
}

/// The status as JSON.
pub fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "hub": s.hub,
        "health": health(s).0,
        "reason": health(s).1,
        "total_ops": s.total_ops,
        "errors_total": s.errors_total,
        "version_vector": vv_map(&s.version_vector),
        "nodes": s.nodes.iter().map(|n| json!({
            "node": n.node,
            "connected": n.connected,
            "mode": n.mode,
            "pending_ops": n.pending_ops,
            "last_seen_unix_ms": n.last_seen_unix_ms,
            "acked": vv_map(&n.acked),
        })).collect::<Vec<_>>(),
    })
}

fn health(s: &pb::StatusReply) -> (&'static str, String) {
    let down: Vec<&str> = s
        .nodes
        .iter()
        .filter(|n| !n.connected)
        .map(|n| n.node.as_str())
        .collect();
    if s.nodes.is_empty() {
        ("degraded", "no node has connected yet".into())
    } else if !down.is_empty() {
        ("degraded", format!("not connected: {}", down.join(", ")))
    } else if s.nodes.iter().any(|n| n.pending_ops > 0) {
        ("healthy", "catching up".into())
    } else {
        ("healthy", "all nodes connected and in sync".into())
    }
}

/// Prints the status as a small dashboard.
pub fn print_status(s: &pb::StatusReply) {
    let (h, reason) = health(s);
    println!("hub {}: {h} ({reason})", s.hub);
    println!("ops held: {}   errors: {}", s.total_ops, s.errors_total);
    println!(
        "{:<16} {:<10} {:<14} {:>12}  last seen",
        "node", "state", "mode", "pending ops"
    );
    for n in &s.nodes {
        let ago = if n.last_seen_unix_ms == 0 {
            "never".to_owned()
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            format!(
                "{:.1}s ago",
                now.saturating_sub(n.last_seen_unix_ms) as f64 / 1000.0
            )
        };
        println!(
            "{:<16} {:<10} {:<14} {:>12}  {ago}",
            n.node,
            if n.connected { "connected" } else { "down" },
            n.mode,
            n.pending_ops
        );
    }
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
