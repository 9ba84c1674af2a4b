//! `syncmesh demo`: a hub and three SQLite edge databases in one process,
//! talking real gRPC on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use syncmesh_node::adapter::TableSchema;
use syncmesh_node::config::Config;
use syncmesh_node::shell::{NodeHandle, start_node};
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_resolver::Value;

use crate::mesh;

pub const NODES: [&str; 3] = ["edge-a", "edge-b", "edge-c"];
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    item TEXT NOT NULL,
    qty INTEGER NOT NULL DEFAULT 0,
    status TEXT)";
/// The demo's `tables:` section.
pub const TABLES_YAML: &str = "tables:\n  - name: orders\n    key: [id]\n    deletes: delete_wins\n    resolve:\n      default: last_write_wins\n";

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the demo's config (hub on `port`) into `dir`.
pub fn write_config(
    dir: &Path,
    port: u16,
    batch_size: usize,
    tables_yaml: &str,
) -> Result<PathBuf> {
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./data/hub\nnodes:\n");
    for (i, n) in NODES.iter().enumerate() {
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./data/{n}\n    priority: {}\n    database: {{ type: sqlite, url: \"sqlite://./{n}.db\" }}\n",
            i + 1
        ));
    }
    yaml.push_str(tables_yaml);
    yaml.push_str(&format!(
        "sync:\n  batch_size: {batch_size}\n  max_clock_drift: 500ms\n"
    ));
    let path = dir.join("syncmesh.yaml");
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A running in-process mesh: hub, nodes, and a user connection per database.
pub struct Mesh {
    pub hub: Option<syncmesh_hub::server::HubHandle>,
    pub hub_url: String,
    pub cfg: Config,
    pub nodes: Vec<NodeHandle>,
    pub dbs: Vec<(String, SqliteAdapter)>,
    pub schemas: Vec<TableSchema>,
}

impl Mesh {
    /// Creates the databases and starts hub and nodes under `dir`.
    pub async fn start(dir: &Path, batch_size: usize) -> Result<Mesh> {
        Self::start_with(dir, batch_size, &[SCHEMA], TABLES_YAML).await
    }

    /// Like [`Mesh::start`] with your own DDL (run on every database) and
    /// `tables:` section; `schemas` holds the configured tables in order.
    pub async fn start_with(
        dir: &Path,
        batch_size: usize,
        ddl: &[&str],
        tables_yaml: &str,
    ) -> Result<Mesh> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        for n in NODES {
            let db = SqliteAdapter::open(
                &format!("sqlite://{}", dir.join(format!("{n}.db")).display()),
                true,
            )
            .await?;
            for d in ddl {
                sqlx::query(sqlx::AssertSqlSafe(d.to_string()))
                    .execute(db.pool())
                    .await?;
            }
            db.close().await;
        }
        // Bind the hub first on a free port, then write the config with it.
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = probe.local_addr()?.port();
        drop(probe);
        let cfg = Config::load(&write_config(&dir, port, batch_size, tables_yaml)?)?;
        let hub = mesh::start_hub_from(&cfg, cfg.hub()?).await?;
        let mut nodes = Vec::new();
        let mut dbs = Vec::new();
        for n in NODES {
            let node_cfg = cfg.node(n)?;
            nodes.push(start_node(&cfg, n).await?);
            dbs.push((
                n.to_owned(),
                SqliteAdapter::open(node_cfg.database.url.expose(), false).await?,
            ));
        }
        let wanted: Vec<_> = cfg
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.key.clone()))
            .collect();
        let schemas = dbs[0].1.introspect(&wanted).await?;
        Ok(Mesh {
            hub_url: hub.url(),
            hub: Some(hub),
            cfg,
            nodes,
            dbs,
            schemas,
        })
    }

    /// Stops the hub (nodes keep capturing and retry the connection).
    pub async fn stop_hub(&mut self) -> Result<()> {
        if let Some(h) = self.hub.take() {
            h.shutdown().await?;
        }
        Ok(())
    }

    /// Starts the hub again on the same address and data directory.
    pub async fn start_hub(&mut self) -> Result<()> {
        if self.hub.is_none() {
            self.hub = Some(mesh::start_hub_from(&self.cfg, self.cfg.hub()?).await?);
        }
        Ok(())
    }

    pub async fn exec(&self, node: usize, sql: &str) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(self.dbs[node].1.pool())
            .await
            .with_context(|| format!("{}: {sql}", self.dbs[node].0))?;
        Ok(())
    }

    /// Waits until `node` captured every local write (its change table is
    /// empty), so the HLC order of writes on different nodes follows the
    /// order they were made in.
    pub async fn wait_captured(&self, node: usize) -> Result<()> {
        let start = std::time::Instant::now();
        while self.dbs[node].1.pending_changes().await? > 0 {
            if start.elapsed() > CONVERGE_TIMEOUT {
                anyhow::bail!(
                    "{} did not capture its writes within {CONVERGE_TIMEOUT:?}",
                    self.dbs[node].0
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub async fn wait_converged(&self) -> Result<Duration> {
        let nodes: Vec<&NodeHandle> = self.nodes.iter().collect();
        mesh::wait_converged(
            &self.hub_url,
            &self.dbs,
            &nodes,
            &self.schemas,
            CONVERGE_TIMEOUT,
        )
        .await
    }

    pub async fn stop(self) -> Result<()> {
        for n in self.nodes {
            n.shutdown().await?;
        }
        for (_, db) in &self.dbs {
            db.close().await;
        }
        if let Some(h) = self.hub {
            h.shutdown().await?;
        }
        Ok(())
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

async fn print_replicas(mesh: &Mesh) -> Result<bool> {
    let dumps = mesh::dump_all(&mesh.dbs, &mesh.schemas).await?;
    let converged = dumps.windows(2).all(|w| w[0] == w[1]);
    let cols = ["id", "item", "qty", "status"];
    for ((name, _), tables) in mesh.dbs.iter().zip(&dumps) {
        println!("\n  {name}: orders ({} rows)", tables[0].len());
        println!(
            "    {:>4}  {:<16} {:>5}  {:<10}",
            cols[0], cols[1], cols[2], cols[3]
        );
        for row in &tables[0] {
            let cell = |c: &str| row.get(c).map(show).unwrap_or_else(|| "NULL".into());
            println!(
                "    {:>4}  {:<16} {:>5}  {:<10}",
                cell("id"),
                cell("item"),
                cell("qty"),
                cell("status")
            );
        }
    }
    Ok(converged)
}

/// Runs the demo; true when every replica converged.
pub async fn run(dir: Option<PathBuf>) -> Result<bool> {
    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "syncmesh demo: a hub and 3 SQLite edge databases on 127.0.0.1 (work dir {})",
        dir.display()
    );
    let mesh = Mesh::start(&dir, 1000).await?;
    println!(
        "hub listening on {}; nodes {}",
        mesh.hub_url,
        NODES.join(", ")
    );

    println!("\n1. each edge inserts its own orders");
    for (i, base) in [0, 10, 20].into_iter().enumerate() {
        for k in 1..=3 {
            mesh.exec(
                i,
                &format!(
                    "INSERT INTO orders (id, item, qty, status) VALUES ({}, 'item-{}', {k}, 'new')",
                    base + k,
                    base + k
                ),
            )
            .await?;
        }
    }
    let t = mesh.wait_converged().await?;
    println!("   converged in {t:.2?}");

    println!("\n2. concurrent edits to order 1 while every edge is offline");
    for n in &mesh.nodes {
        n.set_online(false).await;
    }
    mesh.exec(0, "UPDATE orders SET qty = 10 WHERE id = 1")
        .await?;
    mesh.wait_captured(0).await?;
    mesh.exec(1, "UPDATE orders SET status = 'paid' WHERE id = 1")
        .await?;
    mesh.wait_captured(1).await?;
    mesh.exec(
        2,
        "UPDATE orders SET qty = 30, item = 'item-1-renamed' WHERE id = 1",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in &mesh.nodes {
        n.set_online(true).await;
    }
    let t = mesh.wait_converged().await?;
    println!(
        "   converged in {t:.2?}: field-level merge keeps b's status and c's later qty and item"
    );

    println!("\n3. edge-c is cut off; edits on both sides of the partition");
    mesh.nodes[2].set_online(false).await;
    mesh.exec(0, "DELETE FROM orders WHERE id = 2").await?;
    mesh.exec(1, "UPDATE orders SET status = 'shipped' WHERE id = 11")
        .await?;
    mesh.exec(2, "UPDATE orders SET qty = 99 WHERE id = 2")
        .await?;
    mesh.exec(
        2,
        "INSERT INTO orders (id, item, qty, status) VALUES (24, 'offline-order', 1, 'new')",
    )
    .await?;
    mesh.exec(2, "UPDATE orders SET status = 'cancelled' WHERE id = 21")
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("   status while partitioned:");
    mesh::print_status(&mesh::hub_status(&mesh.hub_url).await?);
    println!("\n4. the partition heals");
    mesh.nodes[2].set_online(true).await;
    let t = mesh.wait_converged().await;
    match &t {
        Ok(t) => println!(
            "   converged in {t:.2?}: order 2 stays deleted (delete_wins), c's offline order arrives"
        ),
        Err(e) => println!("   NOT converged: {e:#}"),
    }
    let converged = print_replicas(&mesh).await? && t.is_ok();
    println!();
    mesh::print_status(&mesh::hub_status(&mesh.hub_url).await?);
    println!(
        "\nreplicas converged: {}",
        if converged { "yes" } else { "NO" }
    );
    mesh.stop().await?;
    Ok(converged)
}
