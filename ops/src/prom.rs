//! The Prometheus registry of one hub or node, rendered as Prometheus text.
//!
//! Each hub and node owns its own [`Metrics`] (no global recorder: tests run
//! a hub and several nodes in one process). The cores keep cumulative
//! counters; the shells copy them in with the `set_*` methods.

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Gauge: seconds from an op's capture (its HLC) until it was durable on `node`.
pub const SYNC_LAG_SECONDS: &str = "sync_lag_seconds";
/// Counter: ops made durable, by table and operation (`upsert`, `delete`).
pub const RECORDS_SYNCED_TOTAL: &str = "records_synced_total";
/// Counter: sync errors, by table and error type.
pub const SYNC_ERRORS_TOTAL: &str = "sync_errors_total";
/// Counter: conflict records, by table and resolution strategy.
pub const CONFLICT_COUNT: &str = "conflict_count";
/// Gauge: bytes of WAL a PostgreSQL node's replication slot retains.
pub const SLOT_RETAINED_WAL_BYTES: &str = "syncmesh_slot_retained_wal_bytes";

/// One process's metrics (a hub's or a node's).
pub struct Metrics {
    recorder: PrometheusRecorder,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn meta() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

fn key(name: &'static str, labels: [(&'static str, &str); 2]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect::<Vec<_>>(),
    )
}

impl Metrics {
    /// An empty registry with the four syncmesh metrics described.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        recorder.describe_gauge(
            SYNC_LAG_SECONDS.into(),
            None,
            "Seconds from an op's capture (its HLC) until it was durable (flushed) on the node, for the newest batch".into(),
        );
        recorder.describe_counter(
            RECORDS_SYNCED_TOTAL.into(),
            None,
            "Ops made durable here, by table and operation".into(),
        );
        recorder.describe_counter(
            SYNC_ERRORS_TOTAL.into(),
            None,
            "Sync errors, by table (empty when not table-specific) and error type".into(),
        );
        recorder.describe_counter(
            CONFLICT_COUNT.into(),
            None,
            "Conflict records (sets of concurrent writes of one field), by table and resolution strategy".into(),
        );
        recorder.describe_gauge(
            SLOT_RETAINED_WAL_BYTES.into(),
            None,
            "Bytes of WAL the PostgreSQL replication slot of the node retains (PostgreSQL keeps it until capture consumes it)".into(),
        );
        Metrics { recorder }
    }

    /// Sets `records_synced_total{table,operation}` to `total` (counters
    /// never go down: a smaller value is ignored).
    pub fn set_records_synced_total(&self, table: &str, operation: &str, total: u64) {
        self.recorder
            .register_counter(
                &key(
                    RECORDS_SYNCED_TOTAL,
                    [("table", table), ("operation", operation)],
                ),
                &meta(),
            )
            .absolute(total);
    }

    /// Sets `sync_errors_total{table,error_type}` to `total`.
    pub fn set_sync_errors_total(&self, table: &str, error_type: &str, total: u64) {
        self.recorder
            .register_counter(
                &key(
                    SYNC_ERRORS_TOTAL,
                    [("table", table), ("error_type", error_type)],
                ),
                &meta(),
            )
            .absolute(total);
    }

    /// Sets `conflict_count{table,resolution_strategy}` to `total`.
    pub fn set_conflict_count(&self, table: &str, strategy: &str, total: u64) {
        self.recorder
            .register_counter(
                &key(
                    CONFLICT_COUNT,
                    [("table", table), ("resolution_strategy", strategy)],
                ),
                &meta(),
            )
            .absolute(total);
    }

    /// Sets `sync_lag_seconds{table,node}`.
    pub fn set_sync_lag_seconds(&self, table: &str, node: &str, seconds: f64) {
        self.recorder
            .register_gauge(
                &key(SYNC_LAG_SECONDS, [("table", table), ("node", node)]),
                &meta(),
            )
            .set(seconds);
    }

    /// Sets `syncmesh_slot_retained_wal_bytes{node,slot}`.
    pub fn set_slot_retained_wal_bytes(&self, node: &str, slot: &str, bytes: i64) {
        self.recorder
            .register_gauge(
                &key(SLOT_RETAINED_WAL_BYTES, [("node", node), ("slot", slot)]),
                &meta(),
            )
            .set(bytes as f64);
    }

    /// Prometheus text (exposition format 0.0.4): the syncmesh metrics, then
    /// the process basics.
    pub fn render(&self) -> String {
        let mut out = self.recorder.handle().render();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&process_metrics());
        out
    }
}

/// Clock ticks per second of `/proc` CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Field `n` (numbered as in proc(5), from 3 on) of a `/proc/<pid>/stat`
/// line: the fields after the command name, which is in parentheses and
/// may hold spaces.
fn stat_field(stat: &str) -> impl Fn(usize) -> Option<f64> + '_ {
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    move |n: usize| {
        n.checked_sub(3)
            .and_then(|i| fields.get(i))
            .and_then(|v| v.parse::<f64>().ok())
    }
}

/// User plus system CPU time (utime, field 14, and stime, 15) of a
/// `/proc/<pid>/stat` line read by [`stat_field`], in seconds.
fn cpu_seconds(field: impl Fn(usize) -> Option<f64>) -> Option<f64> {
    Some((field(14)? + field(15)?) / USER_HZ)
}

/// CPU seconds (user plus system, every thread) this process has used so
/// far, from `/proc/self/stat` (10 ms resolution); `None` without `/proc`.
/// Benchmarks report it per row: it moves less with other load on the
/// machine than wall-clock rates do.
pub fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds(stat_field(
        &std::fs::read_to_string("/proc/self/stat").ok()?,
    ))
}

/// `process_*` metrics in the usual names, read from `/proc/self` (empty
/// where there is no `/proc`).
pub fn process_metrics() -> String {
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let field = stat_field(&stat);
    if let Some(cpu) = cpu_seconds(&field) {
        line(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            cpu,
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        line(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss * 1024.0,
        );
    }
    if let Some(vm) = kib("VmSize:") {
        line(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vm * 1024.0,
        );
    }
    if let Some(threads) = kib("Threads:") {
        line(
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            threads,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        line(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count() as f64,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("btime "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        line(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / USER_HZ,
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_reads_utime_and_stime_after_a_command_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime …
        let stat = "42 (tokio rt) worker) S 1 42 42 0 -1 4194560 10 0 0 0 250 125 0 0 20 0 3 0 99";
        assert_eq!(cpu_seconds(stat_field(stat)), Some(3.75));
        assert_eq!(cpu_seconds(stat_field("42 (short) S 1")), None);
        assert_eq!(cpu_seconds(stat_field("")), None);
        assert!(process_cpu_seconds().is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn renders_exact_names_labels_and_process_basics() {
        let m = Metrics::new();
        m.set_records_synced_total("orders", "upsert", 7);
        m.set_records_synced_total("orders", "upsert", 5); // never goes down
        m.set_sync_errors_total("", "seq_gap", 1);
        m.set_conflict_count("orders", "last_write_wins", 2);
        m.set_sync_lag_seconds("orders", "edge-a", 0.25);
        m.set_slot_retained_wal_bytes("pg-a", "sm_pg_a", 16_777_216);
        let text = m.render();
        assert!(
            text.contains(
                "syncmesh_slot_retained_wal_bytes{node=\"pg-a\",slot=\"sm_pg_a\"} 16777216"
            ),
            "{text}"
        );
        assert!(
            text.contains("records_synced_total{table=\"orders\",operation=\"upsert\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE records_synced_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                "conflict_count{table=\"orders\",resolution_strategy=\"last_write_wins\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE sync_lag_seconds gauge"), "{text}");
        assert!(
            text.contains("sync_lag_seconds{table=\"orders\",node=\"edge-a\"} 0.25"),
            "{text}"
        );
        assert!(text.contains("sync_errors_total{table=\"\",error_type=\"seq_gap\"} 1"));
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(text.contains("process_resident_memory_bytes "), "{text}");
            assert!(text.contains("process_cpu_seconds_total "), "{text}");
        }
    }
}
