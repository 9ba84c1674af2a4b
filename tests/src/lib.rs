//! Helpers for the end-to-end tests: locating the `syncmesh` binary,
//! running it as a child process, free loopback ports, SQLite fixtures and
//! polling with a deadline (never asserting on wall-clock time), and
//! throwaway PostgreSQL clusters ([`pg`]).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use syncmesh_resolver::Value;

pub use syncmesh::mariadb;
pub use syncmesh::pg;
pub use syncmesh::redis_server as redis;

/// Path of the `syncmesh` binary: `$SYNCMESH_BIN`, or the one built next to
/// this test binary (`scripts/test.sh` builds it first).
pub fn syncmesh_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SYNCMESH_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/syncmesh
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("syncmesh"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} does not exist: build it first with `cargo build -p syncmesh` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The `orders` table every test uses.
pub const ORDERS: &str = "CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL,
    qty INTEGER NOT NULL DEFAULT 0,
    status TEXT)";

/// Creates a SQLite database file with `ddl` and returns its `sqlite://` URL.
pub async fn create_db(path: &Path, ddl: &str) -> Result<String> {
    let url = format!("sqlite://{}", path.display());
    let db = syncmesh_node::sqlite::SqliteAdapter::open(&url, true).await?;
    sqlx::query(sqlx::AssertSqlSafe(ddl.to_owned()))
        .execute(db.pool())
        .await?;
    db.close().await;
    Ok(url)
}

/// Polls `check` every 50 ms until it returns true, failing after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `syncmesh` child process, killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Starts `syncmesh <args>` with its output in `<dir>/<name>.log`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))?;
        let child = Command::new(syncmesh_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning syncmesh {args:?}"))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
        })
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails if the process already exited (with its log).
    pub fn assert_running(&mut self, dir: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", self.name))).unwrap_or_default();
            bail!("{} exited early with {status}:\n{log}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `syncmesh <args>` to completion: (exit success, stdout, stderr).
pub fn run_syncmesh(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(syncmesh_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Log lines (WARN and above) of every test in this test binary: the node
/// and hub shells log on the runtime's threads, so only a global
/// subscriber sees them. The first call installs it.
pub fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `counters` row (`id`, `n`, `label`) as a dump shows it.
pub fn counter(id: i64, n: i64, label: &str) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("id".to_owned(), Value::Int(id)),
        ("n".to_owned(), Value::Int(n)),
        ("label".to_owned(), Value::Text(label.to_owned())),
    ])
}

/// The `counters` rows of the two-sided snapshot tests: keys 1-6000
/// labelled `seed-ID`, `n` 2 above 3000 (both sides held those, the
/// larger `max` wins) and 1 below.
pub fn seeded_counters() -> Vec<BTreeMap<String, Value>> {
    (1..=6000i64)
        .map(|id| counter(id, if id > 3000 { 2 } else { 1 }, &format!("seed-{id}")))
        .collect()
}
