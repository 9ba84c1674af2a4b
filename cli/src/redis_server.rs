//! A throwaway `redis-server` on 127.0.0.1 for one test or bench run: no persistence,
//! its working directory in a temp dir, killed when dropped. Fails loudly
//! when the server is not installed (`scripts/test.sh` installs it).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:PORT/0`.
    pub url: String,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING` (10 s at most).
    pub async fn start() -> Result<RedisServer> {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .context(
                "redis-server is not installed: run `bash scripts/test.sh` (it installs the Debian package redis-server) or `apt-get install redis-server`",
            )?;
        let dir = tempfile::tempdir()?;
        let port = crate::free_port()?;
        let log = std::fs::File::create(dir.path().join("redis.log"))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let mut server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Ok(mut c) = server.conn().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let log = std::fs::read_to_string(server.dir.path().join("redis.log"))
                    .unwrap_or_default();
                bail!("redis-server exited with {status} before answering:\n{log}");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("redis-server on port {port} did not answer PING within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new connection to the server.
    pub async fn conn(&self) -> Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
