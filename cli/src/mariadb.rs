//! Throwaway MariaDB servers for the end-to-end tests and `syncmesh bench
//! --scenario mariadb`.
//!
//! [`MariaDb::start`] runs `mariadb-install-db` in a fresh temporary
//! directory and starts `mariadbd` on 127.0.0.1 and a free port, its unix
//! socket inside that directory, without reading any option file
//! (`--no-defaults`) and without a binary log. Once it accepts connections,
//! a user [`USER`] with password [`PASSWORD`] is created (all privileges)
//! and the tests connect over TCP with real password authentication.
//!
//! `scripts/test.sh` installs `mariadb-server` (Debian) when it is missing.
//! When the tests run as root, `mariadbd` is started with `--user=root`
//! (it refuses to run as root otherwise).
//!
//! The server gets SIGTERM on drop, then SIGKILL if it has not exited after
//! 10 s. A server that cannot start is an error with the server log, never
//! a skipped test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The user every test connects as.
pub const USER: &str = "syncmesh";
/// The password of [`USER`].
pub const PASSWORD: &str = "syncmesh-test";

/// Serialises `mariadb-install-db` runs of this test process.
static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running throwaway server.
pub struct MariaDb {
    dir: tempfile::TempDir,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

fn find(names: &[&str]) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        for n in names {
            let p = Path::new(dir).join(n);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl MariaDb {
    /// Initialises a data directory and starts a server on it.
    pub fn start() -> Result<MariaDb> {
        let missing = || {
            anyhow::anyhow!(
                "mariadbd / mariadb-install-db not found: install MariaDB (`apt-get install -y mariadb-server`; scripts/test.sh does it)"
            )
        };
        let server = find(&["mariadbd", "mysqld"]).ok_or_else(missing)?;
        let install = find(&["mariadb-install-db", "mysql_install_db"]).ok_or_else(missing)?;
        let dir = tempfile::Builder::new()
            .prefix("syncmesh-mariadb-")
            .tempdir()?;
        let data = dir.path().join("data");
        // Its own temporary directory: a starting server deletes every
        // `#sql*` file in its tmpdir, so servers sharing /tmp removed each
        // other's live temporary tables (error 6, "Error on delete of
        // '/tmp/#sql-temptable-…'").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let root = running_as_root();
        let mut cmd = Command::new(&install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ]);
        if root {
            cmd.arg("--user=root");
        }
        // Bootstraps running at the same time were seen to fail here:
        // one at a time in this process, and one retry on a fresh directory.
        let out = {
            let _one = INSTALL
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut out = cmd
                .stdin(Stdio::null())
                .output()
                .context("running mariadb-install-db")?;
            if !out.status.success() {
                let _ = std::fs::remove_dir_all(&data);
                out = cmd
                    .stdin(Stdio::null())
                    .output()
                    .context("running mariadb-install-db")?;
            }
            out
        };
        if !out.status.success() {
            bail!(
                "mariadb-install-db failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = crate::free_port()?;
        let log = dir.path().join("server.log");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = Command::new(&server);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--socket={}", dir.path().join("s.sock").display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("server.pid").display()
            ))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=2",
                "--max-connections=100",
            ]);
        if root {
            cmd.arg("--user=root");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("spawning mariadbd")?;
        let mut server = MariaDb {
            dir,
            port,
            child: Some(child),
        };
        server.wait_ready(&log)?;
        server.client(&format!(
            "CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}'; \
             GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'127.0.0.1' WITH GRANT OPTION; \
             CREATE USER '{USER}'@'localhost' IDENTIFIED BY '{PASSWORD}'; \
             GRANT ALL PRIVILEGES ON *.* TO '{USER}'@'localhost' WITH GRANT OPTION;"
        ))?;
        Ok(server)
    }

    /// Runs `sql` as root through the unix socket with the `mariadb` client.
    fn client(&self, sql: &str) -> Result<()> {
        let client = find(&["mariadb", "mysql"]).ok_or_else(|| {
            anyhow::anyhow!("the mariadb client is missing (package mariadb-client)")
        })?;
        let out = Command::new(client)
            .arg("--no-defaults")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("s.sock").display()
            ))
            .args(["-uroot", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .context("running the mariadb client")?;
        if !out.status.success() {
            bail!(
                "mariadb client failed on {sql:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self, log: &Path) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "mariadbd exited with {status} before accepting connections:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if self.client("SELECT 1").is_ok() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "mariadbd did not accept connections within 60 s:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL of database `db` as [`USER`] over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's directory (data directory and server log inside).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates database `name` and returns its URL.
    pub async fn create_db(&self, name: &str) -> Result<String> {
        self.client(&format!("CREATE DATABASE `{name}`"))?;
        Ok(self.url(name))
    }

    /// Runs `sql` (one or more statements) in database `db`.
    pub async fn exec(&self, db: &str, sql: &str) -> Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::MySqlConnection::connect(&self.url(db))
            .await
            .with_context(|| format!("connecting to {db} on port {}", self.port))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .with_context(|| format!("running {sql:?}"))?;
        conn.close().await?;
        Ok(())
    }

    /// A pool of connections to database `db`.
    pub async fn pool(&self, db: &str) -> Result<sqlx::MySqlPool> {
        Ok(sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&self.url(db))
            .await?)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::pg::stop_server(child, "-TERM");
        }
    }
}
