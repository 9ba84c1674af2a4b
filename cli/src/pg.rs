//! Throwaway PostgreSQL 15 clusters for the end-to-end tests and
//! `syncmesh bench --scenario postgres`.
//!
//! [`PgCluster::start`] runs `initdb` in a fresh temporary directory and
//! starts `postgres` on 127.0.0.1 and a free port with `wal_level=logical`,
//! its unix socket inside that directory. Password authentication
//! (`scram-sha-256`) is required on TCP; the superuser is `postgres` with
//! password [`PASSWORD`].
//!
//! PostgreSQL refuses to run as root. When the tests run as root (CI, the
//! development machines), the data directory is handed to the `postgres`
//! system user (created by the Debian package; `scripts/test.sh` installs
//! `postgresql-15` when it is missing) and `initdb` / `postgres` run under
//! it through `setpriv`, which `exec`s in place, so the child we hold is the
//! postmaster itself. As any other user they run as that user.
//!
//! The server gets a fast shutdown (SIGINT) on drop, then SIGKILL if it has
//! not exited after 10 s. A cluster that cannot start is an error with the
//! server log, never a skipped test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The password of the `postgres` superuser of every test cluster.
pub const PASSWORD: &str = "syncmesh-test";

/// Where Debian installs the PostgreSQL 15 server binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running throwaway cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

fn bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command running `program` as the `postgres` user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PgCluster {
    /// Starts a cluster with `extra` server settings (`-c key=value` pairs,
    /// e.g. `("wal_level", "replica")` to override the default `logical`).
    pub fn start_with(extra: &[(&str, &str)]) -> Result<PgCluster> {
        if !bin("postgres").exists() {
            bail!(
                "{} not found: install PostgreSQL 15 (`apt-get install -y postgresql-15`; scripts/test.sh does it)",
                bin("postgres").display()
            );
        }
        let dir = tempfile::Builder::new().prefix("syncmesh-pg-").tempdir()?;
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PASSWORD)?;
        if running_as_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .context("chown of the cluster directory")?;
            if !st.success() {
                bail!(
                    "cannot hand {} to the postgres user (is there a `postgres` system user? the postgresql-15 package creates it)",
                    dir.path().display()
                );
            }
        }
        let out = as_pg_user(&bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = dir.path().join("postgres.log");
        let logf = std::fs::File::create(&log)?;
        if running_as_root() {
            let _ = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&log)
                .status();
        }
        let mut settings: Vec<(String, String)> = [
            ("listen_addresses", "127.0.0.1"),
            ("wal_level", "logical"),
            ("max_replication_slots", "16"),
            ("max_wal_senders", "16"),
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("shared_buffers", "32MB"),
            ("max_connections", "60"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            settings.retain(|(sk, _)| sk != k);
            settings.push((k.to_string(), v.to_string()));
        }
        let mut cmd = as_pg_user(&bin("postgres"));
        cmd.arg("-D").arg(&data).arg("-p").arg(port.to_string());
        cmd.arg("-k").arg(dir.path());
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawning postgres")?;
        let mut cluster = PgCluster {
            dir,
            port,
            child: Some(child),
        };
        cluster.wait_ready(&log)?;
        Ok(cluster)
    }

    /// Starts a cluster with the default settings (`wal_level=logical`).
    pub fn start() -> Result<PgCluster> {
        Self::start_with(&[])
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "postgres exited with {status} before accepting connections:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            let ok = Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "postgres did not accept connections within 60 s:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// The cluster's directory (data directory and server log inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_db(&self, name: &str) -> Result<String> {
        self.exec("postgres", &format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(self.url(name))
    }

    /// Runs `sql` (one or more statements) in database `db`.
    pub async fn exec(&self, db: &str, sql: &str) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.url(db))
            .await
            .with_context(|| format!("connecting to {db} on port {}", self.port))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .with_context(|| format!("running {sql:?}"))?;
        conn.close().await?;
        Ok(())
    }

    /// Waits until every WAL record written so far in database `db` is
    /// flushed. Logical decoding reads only flushed WAL, and the throwaway
    /// clusters commit asynchronously (`synchronous_commit=off`), so a
    /// test that reads a slot right after its writes must wait for this.
    pub async fn wait_wal_flushed(&self, db: &str) -> Result<()> {
        let pool = self.pool(db).await?;
        let inserted: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&pool)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sqlx::query_scalar::<_, bool>("SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn")
            .bind(&inserted)
            .fetch_one(&pool)
            .await?
        {
            if Instant::now() > deadline {
                bail!("WAL up to {inserted} in database {db} was not flushed within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.close().await;
        Ok(())
    }

    /// A pool of connections to database `db`.
    pub async fn pool(&self, db: &str) -> Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url(db))
            .await?)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_server(child, "-INT");
        }
    }
}

/// Stops a throwaway server: `signal` (its clean shutdown), then a kill if
/// it is still running after 10 s.
pub(crate) fn stop_server(mut child: std::process::Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
