//! The hub shell's view of its core's counters over time: lag gauges
//! stamped when ops become durable, throughput and 24-hour totals, the
//! per-table status and overall health shown by `syncmesh status` and the
//! web page, the Prometheus registry, and conflict alerts.
//! Pure apart from the webhook task: every call takes `now`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;
use syncmesh_node::config::AlertConfig;
use syncmesh_ops::alert::{ConflictAlert, Webhook};
use syncmesh_ops::prom::Metrics;
use syncmesh_ops::series::Series;
use syncmesh_proto::v1 as pb;
use syncmesh_resolver::Ntp64;

use crate::stats::HubMetrics;

/// A table with an error this recent is in state `error`.
pub const ERROR_STATE_MS: u64 = 15 * 60_000;

/// See the module docs.
pub struct Telemetry {
    hub: String,
    metrics: Arc<Metrics>,
    series: Series,
    started_ms: u64,
    /// Current lag per (table, node), seconds.
    lag: BTreeMap<(String, String), f64>,
    seen_records: u64,
    seen_errors: BTreeMap<String, u64>,
    seen_conflicts: BTreeMap<String, u64>,
    last_error_ms: BTreeMap<String, u64>,
    alert: Option<ConflictAlert>,
    webhook: Option<Webhook>,
}

fn sum_by_table(m: &BTreeMap<(String, String), u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for ((t, _), v) in m {
        *out.entry(t.clone()).or_insert(0) += v;
    }
    out
}

/// `2026-11-24T10:00:00Z (12 s ago)`.
pub fn when(at_ms: u64, now_ms: u64) -> String {
    if at_ms == 0 {
        return "never seen".to_owned();
    }
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at_ms));
    let ago_s = now_ms.saturating_sub(at_ms) / 1000;
    let ago = if ago_s < 120 {
        format!("{ago_s} s ago")
    } else if ago_s < 7200 {
        format!("{} min ago", ago_s / 60)
    } else {
        format!("{} h ago", ago_s / 3600)
    };
    format!("{at} ({ago})")
}

impl Telemetry {
    /// Starts counting at `now_ms`. With `alert`, conflicts past its
    /// threshold log a warning and (with a webhook) are posted; needs a
    /// tokio runtime for the webhook task.
    pub fn new(hub: &str, now_ms: u64, alert: Option<&AlertConfig>) -> Telemetry {
        let webhook = alert.and_then(|a| a.webhook.as_deref()).and_then(|url| {
            Webhook::spawn(url)
                .map_err(|e| tracing::warn!(hub, "{e}; alerts are only logged"))
                .ok()
        });
        Telemetry {
            hub: hub.to_owned(),
            metrics: Arc::new(Metrics::new()),
            series: Series::new(now_ms),
            started_ms: now_ms,
            lag: BTreeMap::new(),
            seen_records: 0,
            seen_errors: BTreeMap::new(),
            seen_conflicts: BTreeMap::new(),
            last_error_ms: BTreeMap::new(),
            alert: alert.map(|a| ConflictAlert::new(a.per_hour)),
            webhook,
        }
    }

    /// The Prometheus registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Takes what the core counted since the last call (call it right after
    /// every core call that may have flushed: lag ends at `now_ms`).
    pub fn update(&mut self, now_ms: u64, m: &mut HubMetrics) {
        for s in m.take_durable() {
            let captured_ms = Ntp64(s.oldest_hlc_time).as_unix_millis();
            let seconds = now_ms.saturating_sub(captured_ms) as f64 / 1000.0;
            self.series.lag(now_ms, seconds);
            self.metrics
                .set_sync_lag_seconds(&s.table, &s.node, seconds);
            self.lag.insert((s.table, s.node), seconds);
        }
        let records: u64 = m.records_synced.values().sum();
        let new_records = records.saturating_sub(self.seen_records);
        self.seen_records = records;
        let mut new_errors = 0;
        for (table, total) in sum_by_table(&m.errors) {
            let seen = self.seen_errors.entry(table.clone()).or_insert(0);
            if total > *seen {
                new_errors += total - *seen;
                *seen = total;
                self.last_error_ms.insert(table, now_ms);
            }
        }
        let mut new_conflicts = 0;
        for (table, total) in sum_by_table(&m.conflicts) {
            let seen = self.seen_conflicts.entry(table.clone()).or_insert(0);
            if total > *seen {
                let n = total - *seen;
                new_conflicts += n;
                *seen = total;
                self.alert_on(now_ms, &table, n);
            }
        }
        self.series
            .add(now_ms, new_records, new_errors, new_conflicts);
        if new_records > 0 || new_errors > 0 || new_conflicts > 0 {
            for ((t, op), v) in &m.records_synced {
                self.metrics.set_records_synced_total(t, op, *v);
            }
            for ((t, code), v) in &m.errors {
                self.metrics.set_sync_errors_total(t, code, *v);
            }
            for ((t, strategy), v) in &m.conflicts {
                self.metrics.set_conflict_count(t, strategy, *v);
            }
        }
    }

    fn alert_on(&mut self, now_ms: u64, table: &str, n: u64) {
        let Some(alert) = self.alert.as_mut() else {
            return;
        };
        let Some(fired) = alert.observe(now_ms, table, n) else {
            return;
        };
        tracing::warn!(
            hub = %self.hub,
            conflicts_last_hour = fired.conflicts_last_hour,
            threshold_per_hour = fired.per_hour,
            tables = ?fired.tables,
            "conflict alert: {} conflicts in the last hour reached conflicts.alert.per_hour = {}; inspect them with `syncmesh conflicts --since 1h`",
            fired.conflicts_last_hour,
            fired.per_hour
        );
        if let Some(w) = &self.webhook {
            w.send(fired.to_json(&self.hub).to_string());
        }
    }

    /// Adds lag, per-table status, throughput, totals and health to the
    /// core's `reply`. `tables` are the configured tables.
    pub fn fill_status(
        &self,
        reply: &mut pb::StatusReply,
        m: &HubMetrics,
        tables: &[String],
        now_ms: u64,
    ) {
        for n in &mut reply.nodes {
            n.lag_seconds = self
                .lag
                .iter()
                .filter(|((_, node), _)| *node == n.node)
                .map(|(_, s)| *s)
                .fold(0.0, f64::max);
        }
        let mut names: Vec<String> = tables.to_vec();
        for (t, _) in m.records_synced.keys().chain(m.errors.keys()) {
            if !t.is_empty() && !names.contains(t) {
                names.push(t.clone());
            }
        }
        let records = sum_by_table(&m.records_synced);
        let errors = sum_by_table(&m.errors);
        let conflicts = sum_by_table(&m.conflicts);
        reply.tables = names
            .into_iter()
            .map(|t| {
                let lag_seconds = self
                    .lag
                    .iter()
                    .filter(|((table, _), _)| *table == t)
                    .map(|(_, s)| *s)
                    .fold(0.0, f64::max);
                let behind: Vec<String> = match m.table_heads.get(&t) {
                    None => Vec::new(),
                    Some(head) => reply
                        .nodes
                        .iter()
                        .filter(|n| n.mode != "publish")
                        .filter(|n| {
                            let acked = n.acked.as_ref();
                            head.0.iter().any(|(o, q)| {
                                o.as_str() != n.node
                                    && acked
                                        .and_then(|a| a.entries.get(o.as_str()))
                                        .copied()
                                        .unwrap_or(0)
                                        < *q
                            })
                        })
                        .map(|n| {
                            if n.connected {
                                n.node.clone()
                            } else {
                                format!("{} (down)", n.node)
                            }
                        })
                        .collect(),
                };
                let recent_error = self
                    .last_error_ms
                    .get(&t)
                    .filter(|at| now_ms.saturating_sub(**at) < ERROR_STATE_MS);
                let (state, detail) = if let Some(at) = recent_error {
                    (
                        "error",
                        format!(
                            "{} errors, the last {}: see the hub log",
                            errors.get(&t).copied().unwrap_or(0),
                            when(*at, now_ms)
                        ),
                    )
                } else if !behind.is_empty() {
                    ("behind", format!("not yet at {}", behind.join(", ")))
                } else {
                    ("synced", String::new())
                };
                pb::TableStatus {
                    records_total: records.get(&t).copied().unwrap_or(0),
                    errors_total: errors.get(&t).copied().unwrap_or(0),
                    conflicts_total: conflicts.get(&t).copied().unwrap_or(0),
                    table: t,
                    state: state.to_owned(),
                    detail,
                    lag_seconds,
                }
            })
            .collect();
        let tp = self.series.throughput(now_ms);
        reply.throughput = Some(pb::Throughput {
            now_records_per_second: tp.now_records_per_second,
            average_records_per_second: tp.average_records_per_second,
            peak_records_per_second: tp.peak_records_per_second,
        });
        let day = self.series.last_24h(now_ms);
        reply.last_24h = Some(pb::Last24h {
            records: day.records,
            errors: day.errors,
            conflicts: day.conflicts,
        });
        reply.started_unix_ms = self.started_ms;
        reply.now_unix_ms = now_ms;
        let (health, reason) = health(reply, now_ms);
        reply.health = health.to_owned();
        reply.health_reason = reason;
    }

    /// The lag/throughput chart of the last hour.
    pub fn chart_json(&self, now_ms: u64) -> serde_json::Value {
        self.series.chart_json(now_ms)
    }
}

/// Overall health and why: `down` when no known node is connected,
/// `degraded` when some node is down or a table has recent errors,
/// `healthy` otherwise (possibly catching up).
pub fn health(s: &pb::StatusReply, now_ms: u64) -> (&'static str, String) {
    let down: Vec<String> = s
        .nodes
        .iter()
        .filter(|n| !n.connected)
        .map(|n| {
            format!(
                "{} down since {}",
                n.node,
                when(n.last_seen_unix_ms, now_ms)
            )
        })
        .collect();
    let errors: Vec<&str> = s
        .tables
        .iter()
        .filter(|t| t.state == "error")
        .map(|t| t.table.as_str())
        .collect();
    let behind: Vec<String> = s
        .tables
        .iter()
        .filter(|t| t.state == "behind")
        .map(|t| format!("{} {}", t.table, t.detail))
        .collect();
    if s.nodes.is_empty() {
        ("degraded", "no node has connected yet".into())
    } else if down.len() == s.nodes.len() {
        ("down", format!("no node is connected: {}", down.join("; ")))
    } else if !down.is_empty() {
        ("degraded", down.join("; "))
    } else if !errors.is_empty() {
        (
            "degraded",
            format!("recent sync errors on table {}", errors.join(", ")),
        )
    } else if !behind.is_empty() {
        ("healthy", format!("catching up: {}", behind.join("; ")))
    } else {
        (
            "healthy",
            format!("all {} nodes connected and in sync", s.nodes.len()),
        )
    }
}

fn vv_map(vv: &Option<pb::VersionVector>) -> BTreeMap<String, u64> {
    vv.as_ref()
        .map(|v| v.entries.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default()
}

/// The status as JSON: what `syncmesh status --json` prints and the web
/// page renders.
pub fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    let tp = s.throughput.unwrap_or_default();
    let day = s.last_24h.unwrap_or_default();
    json!({
        "hub": s.hub,
        "health": s.health,
        "reason": s.health_reason,
        "now_unix_ms": s.now_unix_ms,
        "started_unix_ms": s.started_unix_ms,
        "total_ops": s.total_ops,
        "errors_total": s.errors_total,
        "version_vector": vv_map(&s.version_vector),
        "throughput": {
            "now_records_per_second": tp.now_records_per_second,
            "average_records_per_second": tp.average_records_per_second,
            "peak_records_per_second": tp.peak_records_per_second,
        },
        "last_24h": {
            "records": day.records,
            "errors": day.errors,
            "conflicts": day.conflicts,
        },
        "tables": s.tables.iter().map(|t| json!({
            "table": t.table,
            "state": t.state,
            "detail": t.detail,
            "lag_seconds": t.lag_seconds,
            "records_total": t.records_total,
            "errors_total": t.errors_total,
            "conflicts_total": t.conflicts_total,
        })).collect::<Vec<_>>(),
        "gc": {
            "stable_cut": vv_map(&s.gc_cut.as_ref().and_then(|c| c.stable.clone())),
            "cut_horizon": vv_map(&s.gc_cut.as_ref().and_then(|c| c.horizon.clone())),
            "cut_advanced_unix_ms": s.gc_cut_advanced_unix_ms,
            "cuts": s.gc_cuts,
            "rows_collected": s.gc_rows_collected,
            "rows_dropped": s.gc_rows_dropped,
            "ops_compacted": s.gc_ops_compacted,
            "snapshots_served": s.gc_snapshots_served,
            "refused": s.gc_refused,
            "writes_dropped": s.gc_writes_dropped,
        },
        "nodes": s.nodes.iter().map(|n| json!({
            "node": n.node,
            "connected": n.connected,
            "engine": n.engine,
            "mode": n.mode,
            "lag_seconds": n.lag_seconds,
            "pending_ops": n.pending_ops,
            "last_seen_unix_ms": n.last_seen_unix_ms,
            "acked": vv_map(&n.acked),
        })).collect::<Vec<_>>(),
    })
}
