//! PostgreSQL as a peer: real PostgreSQL 15 clusters (throwaway, on
//! 127.0.0.1, see `syncmesh_tests::pg`), a real hub and real nodes on gRPC.
//! Two PostgreSQL databases and one SQLite file sync bi-directionally.

#![allow(clippy::unwrap_used, clippy::needless_range_loop, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use syncmesh::mesh::{hub_status, start_hub_from};
use syncmesh_hub::server::HubHandle;
use syncmesh_node::adapter::{Db, TableSchema};
use syncmesh_node::config::Config;
use syncmesh_node::shell::{NodeHandle, start_node};
use syncmesh_resolver::Value;
use syncmesh_tests::pg::PgCluster;
use syncmesh_tests::{Proc, free_port, run_syncmesh, wait_until};

const LONG: Duration = Duration::from_secs(90);
const NODES: [&str; 3] = ["pg-a", "pg-b", "lite"];

type Rows = Vec<BTreeMap<String, Value>>;

/// A hub, nodes `pg-a` and `pg-b` (two databases of one cluster) and
/// `lite` (a SQLite file).
struct PgMesh {
    hub: Option<HubHandle>,
    hub_url: String,
    nodes: Vec<NodeHandle>,
    dbs: Vec<Db>,
    schemas: Vec<TableSchema>,
    pg: PgCluster,
    _dir: tempfile::TempDir,
}

fn mesh_yaml(dir: &Path, pg: &PgCluster, port: u16, tables: &str, batch: usize) -> String {
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n");
    for n in ["pg-a", "pg-b"] {
        let db = n.replace('-', "_");
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{n}\n    database: {{ type: postgresql, url: \"{}\", slot: sm_{db}, publication: syncmesh }}\n",
            pg.url(&db)
        ));
    }
    yaml.push_str(&format!(
        "  - name: lite\n    hub: http://127.0.0.1:{port}\n    data_dir: ./lite\n    database: {{ type: sqlite, url: \"sqlite://{}\" }}\n",
        dir.join("lite.db").display()
    ));
    yaml.push_str(tables);
    yaml.push_str(&format!("sync:\n  batch_size: {batch}\n"));
    yaml
}

impl PgMesh {
    /// `pg_ddl` runs on both PostgreSQL databases, `lite_ddl` on SQLite.
    async fn start(pg_ddl: &str, lite_ddl: &str, tables: &str) -> Result<PgMesh> {
        let (pg, dir) = Self::prepare(pg_ddl, lite_ddl).await?;
        Self::launch(pg, dir, tables).await
    }

    /// The cluster with both databases and the SQLite file, no processes.
    async fn prepare(pg_ddl: &str, lite_ddl: &str) -> Result<(PgCluster, tempfile::TempDir)> {
        let pg = PgCluster::start()?;
        let dir = tempfile::tempdir()?;
        for db in ["pg_a", "pg_b"] {
            pg.create_db(db).await?;
            pg.exec(db, pg_ddl).await?;
        }
        syncmesh_tests::create_db(&dir.path().join("lite.db"), lite_ddl).await?;
        Ok((pg, dir))
    }

    /// Starts the hub and the nodes.
    async fn launch(pg: PgCluster, dir: tempfile::TempDir, tables: &str) -> Result<PgMesh> {
        Self::launch_batch(pg, dir, tables, 500).await
    }

    /// Starts the hub and the nodes, with `batch` rows per batch (and per
    /// initial snapshot chunk).
    async fn launch_batch(
        pg: PgCluster,
        dir: tempfile::TempDir,
        tables: &str,
        batch: usize,
    ) -> Result<PgMesh> {
        let port = free_port();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, mesh_yaml(dir.path(), &pg, port, tables, batch))?;
        let cfg = Config::load(&path)?;
        let hub = start_hub_from(&cfg, cfg.hub()?).await?;
        let mut nodes = Vec::new();
        let mut dbs = Vec::new();
        let wanted: Vec<_> = cfg
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.key.clone()))
            .collect();
        let mut schemas = Vec::new();
        for n in NODES {
            nodes.push(
                start_node(&cfg, n)
                    .await
                    .with_context(|| format!("starting {n}"))?,
            );
            let mut db = Db::open(&cfg.node(n)?.database).await?;
            schemas = db.introspect(&wanted).await?;
            dbs.push(db);
        }
        Ok(PgMesh {
            hub_url: hub.url(),
            hub: Some(hub),
            nodes,
            dbs,
            schemas,
            pg,
            _dir: dir,
        })
    }

    async fn exec(&self, node: usize, sql: &str) -> Result<()> {
        match &self.dbs[node] {
            Db::Postgres(d) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(d.pool())
                    .await
                    .with_context(|| format!("{}: {sql}", NODES[node]))?;
            }
            Db::Sqlite(d) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(d.pool())
                    .await
                    .with_context(|| format!("{}: {sql}", NODES[node]))?;
            }
            Db::Redis(_) | Db::Mysql(_) | Db::Mongo(_) => {
                anyhow::bail!("{}: not a PostgreSQL or SQLite node", NODES[node])
            }
        }
        Ok(())
    }

    async fn rows(&self, node: usize, table: usize) -> Result<Rows> {
        Ok(self.dbs[node].dump_table(&self.schemas[table]).await?)
    }

    /// Waits until every node's table `table` equals `expected` and
    /// nothing is in flight.
    async fn wait_rows(&self, table: usize, expected: &Rows) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let mut same = true;
            for n in 0..self.dbs.len() {
                same &= &self.rows(n, table).await? == expected;
            }
            let status = hub_status(&self.hub_url).await?;
            let behind: u64 = status.nodes.iter().map(|n| n.pending_ops).sum();
            let busy = self.nodes.iter().any(|n| {
                let s = n.stats();
                s.own_acked < s.own_ops || s.dirty_rows > 0
            });
            if same && behind == 0 && !busy {
                return Ok(());
            }
            if start.elapsed() > LONG {
                let mut msg = String::new();
                for n in 0..self.dbs.len() {
                    msg.push_str(&format!("\n{}: {:?}", NODES[n], self.rows(n, table).await?));
                }
                bail!(
                    "no convergence within {LONG:?} (behind {behind}, busy {busy});\nexpected {expected:?}{msg}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn total_ops(&self) -> Result<u64> {
        Ok(hub_status(&self.hub_url).await?.total_ops)
    }

    async fn stop(self) -> Result<()> {
        for n in self.nodes {
            n.shutdown().await?;
        }
        for db in &self.dbs {
            db.close().await;
        }
        if let Some(h) = self.hub {
            h.shutdown().await?;
        }
        drop(self.pg);
        Ok(())
    }
}

const ORDERS_PG: &str = "CREATE TABLE orders (id integer PRIMARY KEY, item text NOT NULL, qty integer NOT NULL DEFAULT 0, status text)";
const ORDERS_TABLES: &str = "tables:\n  - name: orders\n    key: [id]\n";

fn order(id: i64, item: &str, qty: i64, status: Option<&str>) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("id".to_owned(), Value::Int(id)),
        ("item".to_owned(), Value::Text(item.to_owned())),
        ("qty".to_owned(), Value::Int(qty)),
        (
            "status".to_owned(),
            status.map_or(Value::Null, |s| Value::Text(s.to_owned())),
        ),
    ])
}

/// PG ↔ hub ↔ PG ↔ SQLite: inserts, updates and deletes on every side
/// converge to the exact expected rows, and the hub holds exactly one op
/// per local row change (no echo of applies, no duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_pg_sqlite_converge_on_inserts_updates_deletes_without_echo() -> Result<()> {
    let mesh = PgMesh::start(ORDERS_PG, syncmesh_tests::ORDERS, ORDERS_TABLES).await?;
    let mut writes = 0u64;
    for node in 0..3 {
        let base = node as i64 * 100;
        // One multi-row transaction and some single-row ones.
        let values: Vec<String> = (1..=5)
            .map(|k| format!("({}, 'i{}', {k}, 'new')", base + k, base + k))
            .collect();
        mesh.exec(
            node,
            &format!("INSERT INTO orders VALUES {}", values.join(", ")),
        )
        .await?;
        for k in 6..=10 {
            mesh.exec(
                node,
                &format!(
                    "INSERT INTO orders VALUES ({}, 'i{}', {k}, NULL)",
                    base + k,
                    base + k
                ),
            )
            .await?;
        }
        writes += 10;
    }
    let mut expected: Rows = Vec::new();
    for node in 0..3i64 {
        for k in 1..=10i64 {
            let id = node * 100 + k;
            let status = (k <= 5).then_some("new");
            expected.push(order(id, &format!("i{id}"), k, status));
        }
    }
    mesh.wait_rows(0, &expected).await?;
    // Every side updates and deletes rows another side inserted.
    for node in 0..3usize {
        let other = ((node + 1) % 3) as i64 * 100;
        mesh.exec(
            node,
            &format!(
                "UPDATE orders SET qty = qty + 1000, status = 'upd' WHERE id BETWEEN {} AND {}",
                other + 1,
                other + 3
            ),
        )
        .await?;
        mesh.exec(
            node,
            &format!(
                "DELETE FROM orders WHERE id IN ({}, {})",
                other + 9,
                other + 10
            ),
        )
        .await?;
        writes += 5;
    }
    expected.retain(|r| !matches!(r["id"], Value::Int(i) if i % 100 >= 9 || i % 100 == 0));
    for r in expected.iter_mut() {
        if let Value::Int(i) = r["id"]
            && (1..=3).contains(&(i % 100))
        {
            r.insert("qty".into(), Value::Int(i % 100 + 1000));
            r.insert("status".into(), Value::Text("upd".into()));
        }
    }
    mesh.wait_rows(0, &expected).await?;
    // A primary-key change on PostgreSQL: a delete and an insert.
    mesh.exec(0, "UPDATE orders SET id = 150 WHERE id = 104")
        .await?;
    writes += 2;
    let moved = expected
        .iter()
        .position(|r| r["id"] == Value::Int(104))
        .unwrap();
    let mut row = expected.remove(moved);
    row.insert("id".into(), Value::Int(150));
    expected.push(row);
    expected.sort_by(|a, b| a["id"].cmp(&b["id"]));
    mesh.wait_rows(0, &expected).await?;
    assert_eq!(
        mesh.total_ops().await?,
        writes,
        "one op per local row change: applies are not captured again"
    );
    mesh.stop().await
}

const TYPES_PG: &str = "CREATE TABLE typed (
    id integer PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric, num_s numeric(12, 4),
    f4 real, f8 double precision,
    t text, vc varchar(20), ch char(5),
    b boolean, d date, ts timestamp, tstz timestamptz,
    u uuid, j json, jb jsonb, bin bytea,
    ai integer[], at text[], an numeric[],
    big text)";
/// The SQLite side: no declared types (no affinity), so every value is
/// stored exactly as it arrives.
const TYPES_LITE: &str = "CREATE TABLE typed (id INTEGER PRIMARY KEY, i2, i4, i8, num, num_s, f4, f8, t, vc, ch, b, d, ts, tstz, u, j, jb, bin, ai, at, an, big)";
const TYPES_TABLES: &str = "tables:\n  - name: typed\n    key: [id]\n";
const ALL_COLS: &str =
    "i2, i4, i8, num, num_s, f4, f8, t, vc, ch, b, d, ts, tstz, u, j, jb, bin, ai, at, an, big";

/// The rows of `typed` as PostgreSQL prints them (exact text per column).
async fn typed_text(mesh: &PgMesh, node: usize) -> Result<Vec<(i32, String)>> {
    let Db::Postgres(d) = &mesh.dbs[node] else {
        bail!("not a PostgreSQL node")
    };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, ROW({ALL_COLS})::text FROM typed ORDER BY id"
    )))
    .fetch_all(d.pool())
    .await?)
}

/// Every supported type round-trips exactly PG → mesh → PG, and PG →
/// SQLite → PG; an update leaving a TOASTed value unchanged never nulls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_pg_to_pg_and_through_sqlite() -> Result<()> {
    let mesh = PgMesh::start(TYPES_PG, TYPES_LITE, TYPES_TABLES).await?;
    // A large value that PostgreSQL stores out of line (TOAST): incompressible.
    let big = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g)";
    mesh.exec(
        0,
        &format!(
            "INSERT INTO typed VALUES
            (1, -32768, 2147483647, -9223372036854775808,
             '12345678901234567890.123456789012345', '-12.3400',
             0.1, 1e300,
             E'h\u{e9}llo ''quoted'' \"x\" \\\\ back', 'varchar', 'ab',
             true, '2024-02-29', '2024-01-02 03:04:05.123456', '1999-12-31 23:59:59.999999+05',
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"b\": 1,  \"a\": [1, 2]}}', '{{\"b\": 1, \"a\": [1, 2.50]}}',
             '\\x00ff10',
             '{{1,NULL,3}}', '{{\"a b\",\"c,d\",NULL,\"\"}}', '{{1.10,-2}}', {big}),
            (2, 0, 0, 0, 'NaN', 0, '-0', '-Infinity', '', '', '', false,
             '0001-01-01 BC', '99999-12-31 23:59:59.999999', '-infinity',
             '00000000-0000-0000-0000-000000000000', 'null', '[]', '\\x', '{{}}', '{{}}', '{{}}', 'small'),
            (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
             NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"
        ),
    )
    .await?;
    let source = typed_text(&mesh, 0).await?;
    assert_eq!(source.len(), 3);
    wait_until("pg-b to hold the typed rows", LONG, || async {
        Ok(typed_text(&mesh, 1).await? == source)
    })
    .await?;
    // PG -> SQLite -> PG: SQLite copies the rows under new keys; they come
    // back to both PostgreSQL databases with exactly the same text.
    wait_until("lite to hold the typed rows", LONG, || async {
        Ok(mesh.rows(2, 0).await?.len() == 3)
    })
    .await?;
    mesh.exec(
        2,
        &format!("INSERT INTO typed SELECT id + 100, {ALL_COLS} FROM typed WHERE id <= 3"),
    )
    .await?;
    let copies: Vec<(i32, String)> = source.iter().map(|(id, t)| (id + 100, t.clone())).collect();
    for node in [0, 1] {
        wait_until("the SQLite copies to reach PostgreSQL", LONG, || async {
            let rows = typed_text(&mesh, node).await?;
            Ok(rows.len() == 6 && rows[3..] == copies[..])
        })
        .await?;
    }
    // An update that leaves the TOASTed column unchanged: pgoutput sends it
    // as 'u'; it must stay intact everywhere.
    mesh.exec(0, "UPDATE typed SET i4 = 7 WHERE id = 1").await?;
    let big_len = 400 * 32;
    wait_until("the update to reach pg-b", LONG, || async {
        let rows = typed_text(&mesh, 1).await?;
        Ok(rows[0].1.contains(",7,"))
    })
    .await?;
    for node in 0..3 {
        wait_until("the update to reach every node", LONG, || async {
            let rows = mesh.rows(node, 0).await?;
            Ok(rows
                .iter()
                .any(|r| r["id"] == Value::Int(1) && r["i4"] == Value::Int(7)))
        })
        .await?;
        let rows = mesh.rows(node, 0).await?;
        let first = rows.iter().find(|r| r["id"] == Value::Int(1)).unwrap();
        match &first["big"] {
            Value::Text(t) => assert_eq!(t.len(), big_len, "{}", NODES[node]),
            other => panic!("{}: big became {other:?}", NODES[node]),
        }
    }
    assert_eq!(typed_text(&mesh, 0).await?, typed_text(&mesh, 1).await?);
    mesh.stop().await
}

const COUNTERS_PG: &str =
    "CREATE TABLE counters (id integer PRIMARY KEY, n bigint NOT NULL DEFAULT 0, label text)";
const COUNTERS_LITE: &str =
    "CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0, label TEXT)";
const COUNTERS_TABLES: &str =
    "tables:\n  - name: counters\n    key: [id]\n    resolve:\n      fields:\n        n: sum\n";

/// Concurrent increments of the same rows on two PostgreSQL databases
/// while both are cut off the hub: after the heal every increment counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_on_two_partitioned_pg_databases_all_count() -> Result<()> {
    let mesh = PgMesh::start(COUNTERS_PG, COUNTERS_LITE, COUNTERS_TABLES).await?;
    mesh.exec(0, "INSERT INTO counters VALUES (1, 0, 'x'), (2, 10, 'y')")
        .await?;
    let row = |id: i64, n: i64, label: &str| {
        BTreeMap::from([
            ("id".to_owned(), Value::Int(id)),
            ("n".to_owned(), Value::Int(n)),
            ("label".to_owned(), Value::Text(label.to_owned())),
        ])
    };
    mesh.wait_rows(0, &vec![row(1, 0, "x"), row(2, 10, "y")])
        .await?;
    mesh.nodes[0].set_online(false).await;
    mesh.nodes[1].set_online(false).await;
    for i in 0..40 {
        mesh.exec(0, "UPDATE counters SET n = n + 1 WHERE id = 1")
            .await?;
        if i % 2 == 0 {
            mesh.exec(1, "UPDATE counters SET n = n + 2 WHERE id = 1")
                .await?;
        }
        mesh.exec(1, "UPDATE counters SET n = n - 1 WHERE id = 2")
            .await?;
    }
    // One multi-row increment in one transaction on each side.
    mesh.exec(0, "UPDATE counters SET n = n + 100").await?;
    mesh.exec(1, "UPDATE counters SET n = n + 1000").await?;
    mesh.exec(2, "UPDATE counters SET n = n + 5 WHERE id = 2")
        .await?;
    // Both partitioned nodes captured everything locally.
    wait_until("both nodes to capture while offline", LONG, || async {
        Ok(mesh.nodes[0].stats().own_ops >= 44 && mesh.nodes[1].stats().own_ops >= 62)
    })
    .await?;
    mesh.nodes[0].set_online(true).await;
    mesh.nodes[1].set_online(true).await;
    let n1 = 40 + 20 * 2 + 100 + 1000;
    let n2 = 10 - 40 + 100 + 1000 + 5;
    mesh.wait_rows(0, &vec![row(1, n1, "x"), row(2, n2, "y")])
        .await?;
    mesh.stop().await
}

/// `sum` on a `numeric(12,2)` column: concurrent fractional increments on
/// two partitioned PostgreSQL databases add up exactly (no float rounding:
/// 0.10 + 0.20 stays 0.30, a million-cent total stays exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_sum_is_exact_across_partitioned_pg_databases() -> Result<()> {
    let mesh = PgMesh::start(
        "CREATE TABLE wallets (id integer PRIMARY KEY, balance numeric(12, 2) NOT NULL DEFAULT 0)",
        "CREATE TABLE wallets (id INTEGER PRIMARY KEY, balance NUMERIC NOT NULL DEFAULT 0)",
        "tables:\n  - name: wallets\n    key: [id]\n    resolve:\n      fields:\n        balance: sum\n",
    )
    .await?;
    let wallet = |id: i64, balance: &str| {
        BTreeMap::from([
            ("id".to_owned(), Value::Int(id)),
            ("balance".to_owned(), Value::Decimal(balance.to_owned())),
        ])
    };
    // Only the PostgreSQL databases are compared: SQLite's NUMERIC affinity
    // stores these values as floats (see node/src/sqlite.rs).
    let wait_pg = |expected: Vec<BTreeMap<String, Value>>| {
        let mesh = &mesh;
        async move {
            wait_until("both PostgreSQL databases to show the totals", LONG, || {
                let expected = expected.clone();
                async move {
                    Ok(mesh.rows(0, 0).await? == expected && mesh.rows(1, 0).await? == expected)
                }
            })
            .await
        }
    };
    mesh.exec(0, "INSERT INTO wallets VALUES (1, 9999.99)")
        .await?;
    wait_pg(vec![wallet(1, "9999.99")]).await?;
    mesh.nodes[0].set_online(false).await;
    mesh.nodes[1].set_online(false).await;
    for _ in 0..30 {
        mesh.exec(
            0,
            "UPDATE wallets SET balance = balance + 0.10 WHERE id = 1",
        )
        .await?;
        mesh.exec(
            1,
            "UPDATE wallets SET balance = balance + 0.20 WHERE id = 1",
        )
        .await?;
    }
    mesh.exec(
        1,
        "UPDATE wallets SET balance = balance - 0.07 WHERE id = 1",
    )
    .await?;
    wait_until("both nodes to capture while offline", LONG, || async {
        Ok(mesh.nodes[0].stats().own_ops >= 31 && mesh.nodes[1].stats().own_ops >= 31)
    })
    .await?;
    mesh.nodes[0].set_online(true).await;
    mesh.nodes[1].set_online(true).await;
    // 9999.99 + 30 × 0.10 + 30 × 0.20 − 0.07
    wait_pg(vec![wallet(1, "10008.92")]).await?;
    mesh.stop().await
}

/// Writes `mesh.yaml` for a hub on `port` and nodes pg-a and pg-b (the
/// databases pg_a and pg_b of `pg`, batches of 200) as run by the process
/// tests; returns its path.
fn two_pg_nodes_config(dir: &Path, pg: &PgCluster, port: u16, tables: &str) -> Result<String> {
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n");
    for n in ["pg-a", "pg-b"] {
        let db = n.replace('-', "_");
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{n}\n    database: {{ type: postgresql, url: \"{}\", slot: sm_{db} }}\n",
            pg.url(&db)
        ));
    }
    yaml.push_str(tables);
    yaml.push_str("sync:\n  batch_size: 200\n");
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, yaml)?;
    Ok(cfg.display().to_string())
}

fn assert_one_line_error(what: &str, ok: bool, stdout: &str, stderr: &str, needle: &str) {
    assert!(!ok, "{what}: must exit non-zero");
    let all = format!("{stdout}{stderr}");
    assert!(!all.contains("panicked"), "{what}: panicked:\n{all}");
    let errors: Vec<&str> = all
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("FAIL"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{what}: exactly one error line expected:\n{all}"
    );
    assert!(
        errors[0].contains(needle),
        "{what}: error should mention {needle:?}: {}",
        errors[0]
    );
    assert!(
        !all.contains(syncmesh_tests::pg::PASSWORD),
        "{what}: the password leaked:\n{all}"
    );
}

fn node_yaml(dir: &Path, port: u16, url: &str, slot: &str, table: &str) -> Result<String> {
    let yaml = format!(
        "nodes:\n  - name: pg\n    hub: http://127.0.0.1:{port}\n    data_dir: ./pg\n    database: {{ type: postgresql, url: \"{url}\", slot: {slot} }}\ntables:\n  - name: {table}\n"
    );
    let path = dir.join(format!("{slot}-{table}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

/// Wrong password, wal_level not logical, a table without a primary key, a
/// slot held by another consumer: each a single clear line, non-zero exit,
/// from `syncmesh node` and `syncmesh check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_postgres_input_gives_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pg = PgCluster::start()?;
    pg.create_db("app").await?;
    pg.exec(
        "app",
        &format!("{ORDERS_PG}; CREATE TABLE nopk (a text, b text)"),
    )
    .await?;
    let good = pg.url("app");
    // A hub, so `check` has only the database problem to report.
    let port = free_port();
    let hub_cfg = dir.path().join("hub.yaml");
    std::fs::write(
        &hub_cfg,
        format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\ntables:\n  - name: orders\n"),
    )?;
    let hub_cfg = hub_cfg.display().to_string();
    let _hub = Proc::spawn(dir.path(), "hub", &["hub", "--config", &hub_cfg])?;
    let hub_url = format!("http://127.0.0.1:{port}");
    wait_until("the hub to listen", LONG, || async {
        Ok(hub_status(&hub_url).await.is_ok())
    })
    .await?;

    // A good config passes, and check says capture can stream the slot.
    let cfg = node_yaml(dir.path(), port, &good, "s0", "orders")?;
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert!(ok, "check of a good config:\n{out}{err}");
    assert!(
        out.contains("capture streams the slot over a replication connection"),
        "{out}"
    );

    let wrong = good.replace(syncmesh_tests::pg::PASSWORD, "not-the-password");
    let cfg = node_yaml(dir.path(), port, &wrong, "s1", "orders")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "pg"])?;
    assert_one_line_error(
        "wrong password (node)",
        ok,
        &out,
        &err,
        "password authentication failed",
    );
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert_one_line_error("wrong password (check)", ok, &out, &err, "password");

    let cfg = node_yaml(dir.path(), port, &good, "s2", "nopk")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "pg"])?;
    assert_one_line_error("no primary key", ok, &out, &err, "primary key");

    let cfg = node_yaml(dir.path(), port, &good, "s3", "nosuch")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "pg"])?;
    assert_one_line_error("missing table", ok, &out, &err, "nosuch");

    // A slot held by another consumer (pg_recvlogical streaming from it).
    pg.exec(
        "app",
        "SELECT pg_create_logical_replication_slot('taken', 'pgoutput'); CREATE PUBLICATION holder FOR TABLE orders",
    )
    .await?;
    let mut holder =
        std::process::Command::new(Path::new(syncmesh_tests::pg::PG_BIN).join("pg_recvlogical"))
            .args([
                "-d",
                &good,
                "-S",
                "taken",
                "--start",
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=holder",
                "-f",
                "/dev/null",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
    let Db::Postgres(probe) = Db::open(
        &Config::load(Path::new(&node_yaml(
            dir.path(),
            port,
            &good,
            "taken",
            "orders",
        )?))?
        .node("pg")?
        .database,
    )
    .await?
    else {
        bail!("expected PostgreSQL");
    };
    wait_until("pg_recvlogical to hold the slot", LONG, || async {
        Ok(matches!(probe.slot_holder().await?, Some(Some(_))))
    })
    .await?;
    let cfg = node_yaml(dir.path(), port, &good, "taken", "orders")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "pg"])?;
    assert_one_line_error(
        "slot taken (node)",
        ok,
        &out,
        &err,
        "in use by another consumer",
    );
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert_one_line_error(
        "slot taken (check)",
        ok,
        &out,
        &err,
        "in use by another consumer",
    );
    let _ = holder.kill();
    let _ = holder.wait();
    probe.close().await;

    // wal_level = replica: capture is impossible, said so with the fix.
    let replica = PgCluster::start_with(&[("wal_level", "replica")])?;
    replica.create_db("app").await?;
    replica.exec("app", ORDERS_PG).await?;
    let cfg = node_yaml(dir.path(), port, &replica.url("app"), "s4", "orders")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "pg"])?;
    assert_one_line_error("wal_level replica", ok, &out, &err, "wal_level is replica");
    Ok(())
}

/// A PostgreSQL node process is SIGKILLed twice while it streams a write
/// load to another PostgreSQL database: nothing is lost, nothing is
/// duplicated (the hub holds exactly one op per inserted row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_pg_node_during_streaming_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pg = PgCluster::start()?;
    for db in ["pg_a", "pg_b"] {
        pg.create_db(db).await?;
        pg.exec(db, ORDERS_PG).await?;
    }
    let port = free_port();
    let cfg = two_pg_nodes_config(dir, &pg, port, ORDERS_TABLES)?;
    let hub_url = format!("http://127.0.0.1:{port}");
    let a_args = ["node", "--config", &cfg, "--name", "pg-a"];
    let _hub = Proc::spawn(dir, "hub", &["hub", "--config", &cfg])?;
    let mut a = Proc::spawn(dir, "pg-a", &a_args)?;
    let _b = Proc::spawn(dir, "pg-b", &["node", "--config", &cfg, "--name", "pg-b"])?;
    wait_until("both nodes connected", LONG, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.nodes.iter().filter(|n| n.connected).count() == 2))
    })
    .await?;
    let pool_a = pg.pool("pg_a").await?;
    let pool_b = pg.pool("pg_b").await?;
    // Both nodes stream their slots over replication connections.
    wait_until("both nodes to stream their slots", LONG, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'syncmesh'",
        )
        .fetch_one(&pool_a)
        .await?;
        Ok(n == 2)
    })
    .await?;
    // `check` on the running mesh: the slots are held by the nodes'
    // streams, which is no problem.
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert!(ok, "check of the running mesh:\n{out}{err}");
    assert_eq!(
        out.matches("is streamed by a running syncmesh node")
            .count(),
        2,
        "{out}"
    );
    let count = |pool: sqlx::PgPool| async move {
        anyhow::Ok(
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders")
                .fetch_one(&pool)
                .await?,
        )
    };
    let total = 3000i64;
    let writer = {
        let pool = pool_a.clone();
        tokio::spawn(async move {
            for start in (1..=total).step_by(20) {
                sqlx::query(
                    "INSERT INTO orders SELECT g, 'item-' || g, g % 7, 'new' FROM generate_series($1::int, $2::int) g",
                )
                .bind(start as i32)
                .bind((start + 19).min(total) as i32)
                .execute(&pool)
                .await?;
            }
            anyhow::Ok(())
        })
    };
    for _ in 0..2 {
        let before = count(pool_b.clone()).await?;
        wait_until("pg-b to make progress", LONG, || {
            let pool_b = pool_b.clone();
            async move {
                let n = count(pool_b).await?;
                Ok(n > before + 100 || n == total)
            }
        })
        .await?;
        a.assert_running(dir)?;
        a.kill9();
        a = Proc::spawn(dir, "pg-a", &a_args)?;
    }
    writer.await??;
    let logs = || {
        ["hub", "pg-a", "pg-b"]
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
                format!("--- {n}.log\n{log}")
            })
            .collect::<String>()
    };
    let waited = wait_until("pg-b to hold every row", LONG, || async {
        Ok(count(pool_b.clone()).await? == total)
    })
    .await;
    if let Err(e) = waited {
        let a_rows = count(pool_a.clone()).await?;
        let b_rows = count(pool_b.clone()).await?;
        let hub_ops = hub_status(&hub_url).await.map(|s| s.total_ops).ok();
        let slots: Vec<(String, Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT slot_name::text, confirmed_flush_lsn::text, active_pid FROM pg_replication_slots",
        )
        .fetch_all(&pool_a)
        .await?;
        let activity: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT datname::text, state || ' ' || coalesce(wait_event_type, '') || ':' || coalesce(wait_event, '') || ' pid ' || pid, left(query, 160) FROM pg_stat_activity",
        )
        .fetch_all(&pool_a)
        .await?;
        let locks: Vec<(Option<i32>, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT pid, mode, coalesce(relation::regclass::text, locktype) FROM pg_locks WHERE NOT granted",
        )
        .fetch_all(&pool_a)
        .await?;
        let ps = std::process::Command::new("ps")
            .args(["-eo", "pid,stat,etime,wchan:20,args"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains("syncmesh") || l.contains("postgres:"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        bail!(
            "{e}: pg_a {a_rows} rows, pg_b {b_rows} rows, hub ops {hub_ops:?}\nslots {slots:?}\nactivity {activity:#?}\nwaiting locks {locks:?}\nps:\n{ps}\n{}",
            logs()
        );
    }
    wait_until("the hub to hold every op", LONG, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.total_ops >= total as u64))
    })
    .await?;
    // Let a late duplicate show up if there were one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        hub_status(&hub_url).await?.total_ops,
        total as u64,
        "exactly one op per inserted row"
    );
    let rows = |pool: sqlx::PgPool| async move {
        anyhow::Ok(
            sqlx::query_as::<_, (i32, String, i32)>("SELECT id, item, qty FROM orders ORDER BY id")
                .fetch_all(&pool)
                .await?,
        )
    };
    let expected: Vec<(i32, String, i32)> = (1..=total as i32)
        .map(|i| (i, format!("item-{i}"), i % 7))
        .collect();
    assert_eq!(rows(pool_b.clone()).await?, expected);
    assert_eq!(rows(pool_a.clone()).await?, expected);
    a.assert_running(dir)?;
    Ok(())
}

/// A database with existing rows joins: its rows are published by the
/// initial snapshot while a writer keeps incrementing counters (before,
/// during and after the snapshot); the empty PostgreSQL database and the
/// SQLite file receive everything, and every `sum` total is exact: no
/// increment lost at the switch from snapshot to stream, none counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_then_stream_without_gap_or_double_count() -> Result<()> {
    let (pg, dir) = PgMesh::prepare(COUNTERS_PG, COUNTERS_LITE).await?;
    pg.exec(
        "pg_a",
        "INSERT INTO counters SELECT g, g, 'seed-' || g FROM generate_series(1, 2000) g",
    )
    .await?;
    let pool = pg.pool("pg_a").await?;
    let increments = 300i64;
    let writer = tokio::spawn(async move {
        for i in 0..increments {
            sqlx::query("UPDATE counters SET n = n + 1 WHERE id = $1")
                .bind((i % 50 + 1) as i32)
                .execute(&pool)
                .await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(())
    });
    let mesh = PgMesh::launch(pg, dir, COUNTERS_TABLES).await?;
    writer.await??;
    let expected: Rows = (1..=2000i64)
        .map(|id| {
            let extra = if id <= 50 { increments / 50 } else { 0 };
            BTreeMap::from([
                ("id".to_owned(), Value::Int(id)),
                ("n".to_owned(), Value::Int(id + extra)),
                ("label".to_owned(), Value::Text(format!("seed-{id}"))),
            ])
        })
        .collect();
    mesh.wait_rows(0, &expected).await?;
    // The snapshot published each row once (with the increments committed
    // before it), then one op per later increment: never more.
    let ops = mesh.total_ops().await?;
    assert!(
        (2000..=2000 + increments as u64).contains(&ops),
        "{ops} ops for 2000 rows and {increments} increments"
    );
    mesh.stop().await
}

/// Both PostgreSQL databases hold keys 3001-6000 when they join (pg-a also
/// 1-3000, published first), so pg-b's snapshot ops of those keys reach
/// pg-a while pg-a still publishes its own, chunk by chunk, before it
/// reads them. They are not applied to pg-a before its snapshot is done:
/// applied first, they would be in the database view its snapshot's
/// inserts claim to have seen, though its rows were read as of the older
/// snapshot point, and the inserts would supersede them (under `max`
/// pg-a's smaller value would win; this fails with apply running during
/// the snapshot). Merged after, the two inserts of a key are concurrent
/// and `max` keeps the larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_ops_arriving_during_an_initial_snapshot_wait_for_its_end() -> Result<()> {
    let (pg, dir) = PgMesh::prepare(COUNTERS_PG, COUNTERS_LITE).await?;
    for (db, n, from) in [("pg_a", 1, 1), ("pg_b", 2, 3001)] {
        pg.exec(
            db,
            &format!(
                "INSERT INTO counters SELECT g, {n}, 'seed-' || g FROM generate_series({from}, 6000) g"
            ),
        )
        .await?;
    }
    let tables =
        "tables:\n  - name: counters\n    key: [id]\n    resolve:\n      fields:\n        n: max\n";
    let mesh = PgMesh::launch_batch(pg, dir, tables, 25).await?;
    let expected: Rows = syncmesh_tests::seeded_counters();
    mesh.wait_rows(0, &expected).await?;
    assert_eq!(
        mesh.total_ops().await?,
        9000,
        "each node published each row once"
    );
    mesh.stop().await
}

/// pg-b hammers one field of a row while pg-a's user writes another field
/// of the same row: pg-a's writes land while pg-a applies pg-b's changes
/// (row locks serialise them, the apply watermark tells the core which
/// local writes it may have overwritten), and none of them is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_pg_write_racing_remote_apply_is_not_lost() -> Result<()> {
    let mesh = PgMesh::start(ORDERS_PG, syncmesh_tests::ORDERS, ORDERS_TABLES).await?;
    mesh.exec(
        0,
        "INSERT INTO orders VALUES (1, 'contended', 0, 'a-start')",
    )
    .await?;
    mesh.wait_rows(0, &vec![order(1, "contended", 0, Some("a-start"))])
        .await?;
    let Db::Postgres(b) = &mesh.dbs[1] else {
        bail!("pg-b is PostgreSQL")
    };
    let b_pool = b.pool().clone();
    let remote = tokio::spawn(async move {
        for q in 1..=300 {
            sqlx::query("UPDATE orders SET qty = $1 WHERE id = 1")
                .bind(q)
                .execute(&b_pool)
                .await?;
        }
        anyhow::Ok(())
    });
    for i in 0..150 {
        mesh.exec(
            0,
            &format!("UPDATE orders SET status = 'a-{i}' WHERE id = 1"),
        )
        .await?;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    remote.await??;
    mesh.wait_rows(0, &vec![order(1, "contended", 300, Some("a-149"))])
        .await?;
    assert_eq!(
        mesh.total_ops().await?,
        1 + 300 + 150,
        "no echo: ops equal local writes"
    );
    mesh.stop().await
}

/// TRUNCATE carries no row changes: the node stops with one clear error
/// naming the table and what to do, instead of silently diverging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_stops_capture_with_a_clear_error() -> Result<()> {
    let mut mesh = PgMesh::start(ORDERS_PG, syncmesh_tests::ORDERS, ORDERS_TABLES).await?;
    mesh.exec(0, "INSERT INTO orders VALUES (1, 'x', 1, NULL)")
        .await?;
    mesh.wait_rows(0, &vec![order(1, "x", 1, None)]).await?;
    mesh.exec(0, "TRUNCATE orders").await?;
    let err = tokio::time::timeout(LONG, mesh.nodes[0].wait())
        .await
        .context("pg-a kept running after a TRUNCATE")?
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("table orders") && err.contains("TRUNCATE") && err.contains("DELETE"),
        "{err}"
    );
    // The other replicas keep the row: nothing was applied from it.
    assert_eq!(mesh.rows(1, 0).await?, vec![order(1, "x", 1, None)]);
    mesh.nodes.remove(0);
    mesh.stop().await
}

/// After a crash between the sled flush and the slot advance, the slot lags
/// the checkpoint by a whole batch or more: capture must consume the
/// transactions it already has and go on (a regression: it used to peek
/// the same captured transactions forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_catches_up_when_the_slot_lags_the_checkpoint() -> Result<()> {
    use syncmesh_node::postgres::PostgresAdapter;
    let (pg, mut db, _) = capture_on_orders("lagging").await?;
    for tx in 0..30 {
        pg.exec(
            "app",
            &format!(
                "INSERT INTO orders SELECT g, 'x', 0, NULL FROM generate_series({}, {}) g",
                tx * 10 + 1,
                tx * 10 + 10
            ),
        )
        .await?;
    }
    // Decoding sees only flushed WAL (the test clusters commit
    // asynchronously): wait for all 30 inserts to be.
    pg.wait_wal_flushed("app").await?;
    // Capture the first changes (up to ~100) but never advance the slot
    // (the "crash"), as a restarted node with that checkpoint would see it.
    let first = read_some(&mut db, 0, 100).await?;
    assert!(!first.is_empty() && first.len() < 300, "{}", first.len());
    // Capture streams the slot over a replication connection.
    assert!(db.streams());
    let pool = pg.pool("app").await?;
    let walsenders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'syncmesh'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(walsenders, 1, "one replication connection");
    // The slot was never advanced: it holds the WAL of all 30 inserts,
    // and capture measured that (the `syncmesh_slot_retained_wal_bytes`
    // gauge).
    let retained = db.last_retained_wal_bytes();
    assert!(retained.is_some_and(|b| b > 0), "{retained:?}");
    let checkpoint = first.last().unwrap().change_id;
    // The node dies: its replication connection goes with it.
    db.close().await;
    drop(db);
    let mut db = PostgresAdapter::open(&pg.url("app"), Some("lagging"), None).await?;
    db.introspect(&[("orders".into(), vec![])]).await?;
    let mut rest = Vec::new();
    let mut after = checkpoint;
    for _ in 0..40 {
        let batch = read_some(&mut db, after, 50).await?;
        if let Some(last) = batch.last() {
            after = last.change_id;
            db.delete_changes_through(after).await?;
        }
        rest.extend(batch);
        if first.len() + rest.len() >= 300 {
            break;
        }
    }
    assert_eq!(
        first.len() + rest.len(),
        300,
        "every row captured exactly once"
    );
    let mut ids: Vec<Value> = first
        .iter()
        .chain(&rest)
        .map(|c| c.new.as_ref().unwrap()["id"].clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 300);
    db.close().await;
    Ok(())
}

/// SIGKILL of a PostgreSQL node twice during its initial snapshot of
/// 30,000 existing rows, with increments, inserts and deletes committed
/// while it is down (to rows it published already and to rows it has not
/// reached), and more after it finished: each restart resumes after the
/// last durable chunk (it says so), and the empty peer ends with exactly
/// the source's rows — every `sum` total exact, nothing lost, nothing
/// counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_initial_snapshot_resumes_without_loss_or_double_count() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pg = PgCluster::start()?;
    for db in ["pg_a", "pg_b"] {
        pg.create_db(db).await?;
        pg.exec(db, COUNTERS_PG).await?;
    }
    let rows_before = 30_000;
    pg.exec(
        "pg_a",
        &format!(
            "INSERT INTO counters SELECT g, g % 100, 'seed-' || g FROM generate_series(1, {rows_before}) g"
        ),
    )
    .await?;
    let port = free_port();
    let cfg = two_pg_nodes_config(dir, &pg, port, COUNTERS_TABLES)?;
    let a_args = ["node", "--config", &cfg, "--name", "pg-a"];
    let _hub = Proc::spawn(dir, "hub", &["hub", "--config", &cfg])?;
    let _b = Proc::spawn(dir, "pg-b", &["node", "--config", &cfg, "--name", "pg-b"])?;
    let log_a = || std::fs::read_to_string(dir.join("pg-a.log")).unwrap_or_default();
    let pool_a = pg.pool("pg_a").await?;
    // Writes while pg-a is down: every 997th row gets +5 (rows from the
    // whole key range, so some are published already and some not), 20
    // new rows, 20 deletes.
    let mut next_id = rows_before + 1;
    let mut a = Proc::spawn(dir, "pg-a", &a_args)?;
    for round in 1..=2 {
        // The progress line comes after the attempt's first durable chunk.
        wait_until("pg-a to be inside its initial snapshot", LONG, || async {
            Ok(log_a()
                .lines()
                .filter(|l| l.contains("initial snapshot: ") && l.contains("ops to go"))
                .count()
                >= round)
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.assert_running(dir)?;
        a.kill9();
        assert!(
            !log_a().contains("initial snapshot done"),
            "the snapshot finished before the kill; the test needs more rows:\n{}",
            log_a()
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "UPDATE counters SET n = n + 5 WHERE id % 997 = {round}; \
             INSERT INTO counters SELECT g, 7, 'late' FROM generate_series({next_id}, {}) g; \
             DELETE FROM counters WHERE id % 1499 = {round}",
            next_id + 19
        )))
        .execute(&pool_a)
        .await?;
        next_id += 20;
        a = Proc::spawn(dir, "pg-a", &a_args)?;
    }
    wait_until("pg-a to finish its snapshot", LONG, || async {
        Ok(log_a().contains("initial snapshot done"))
    })
    .await?;
    let log = log_a();
    assert_eq!(
        log.matches("resuming after the last durable chunk").count(),
        2,
        "each restart resumes the snapshot:\n{log}"
    );
    // And streaming goes on after it.
    pg.exec("pg_a", "UPDATE counters SET n = n + 1 WHERE id % 1009 = 3")
        .await?;
    let dump = |pool: sqlx::PgPool| async move {
        anyhow::Ok(
            sqlx::query_as::<_, (i32, i64, Option<String>)>(
                "SELECT id, n, label FROM counters ORDER BY id",
            )
            .fetch_all(&pool)
            .await?,
        )
    };
    let expected = dump(pool_a.clone()).await?;
    let pool_b = pg.pool("pg_b").await?;
    let waited = wait_until("pg-b to hold exactly pg-a's rows", LONG, || async {
        Ok(dump(pool_b.clone()).await? == expected)
    })
    .await;
    if let Err(e) = waited {
        let got = dump(pool_b.clone()).await?;
        let diff: Vec<_> = expected
            .iter()
            .filter(|r| !got.contains(r))
            .take(10)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|r| !expected.contains(r))
            .take(10)
            .collect();
        bail!(
            "{e}: pg_b has {} rows, pg_a {}; missing or different on pg_b {diff:?}; only on pg_b {extra:?}\n{}",
            got.len(),
            expected.len(),
            log_a()
        );
    }
    a.assert_running(dir)?;
    Ok(())
}

/// A server that authenticates with md5 (pg_hba `md5` and a password
/// stored as md5, as older installations have): capture still streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_streams_with_md5_authentication() -> Result<()> {
    let hba = tempfile::Builder::new().suffix(".conf").tempfile()?;
    std::fs::write(
        hba.path(),
        "local all all trust\nhost all all 127.0.0.1/32 md5\nhost replication all 127.0.0.1/32 md5\n",
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(hba.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    let hba_path = hba.path().display().to_string();
    let pg = PgCluster::start_with(&[("hba_file", hba_path.as_str())])?;
    pg.exec(
        "postgres",
        &format!(
            "SET password_encryption = 'md5'; ALTER ROLE postgres PASSWORD '{}'",
            syncmesh_tests::pg::PASSWORD
        ),
    )
    .await?;
    pg.create_db("app").await?;
    pg.exec("app", ORDERS_PG).await?;
    let pool = pg.pool("app").await?;
    let stored: String =
        sqlx::query_scalar("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'postgres'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(stored, "md5", "the password is stored as md5");
    let db = streams_five_inserts(&pg, &pg.url("app"), "md5slot").await?;
    let walsenders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'syncmesh'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(walsenders, 1);
    db.close().await;
    Ok(())
}

/// The initial snapshot reads a snapshot exported by a temporary slot: a
/// writer commits while it is open (under the SHARE locks of the fallback
/// it would wait), the snapshot shows the rows as of its point, and
/// streaming from that point brings exactly the later write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_snapshot_does_not_block_writers_and_the_stream_takes_over_at_its_point()
-> Result<()> {
    use syncmesh_node::adapter::ChangeKind;
    use syncmesh_node::postgres::PostgresAdapter;
    let pg = PgCluster::start()?;
    pg.create_db("app").await?;
    pg.exec("app", ORDERS_PG).await?;
    pg.exec(
        "app",
        "INSERT INTO orders SELECT g, 'x', 0, NULL FROM generate_series(1, 10) g",
    )
    .await?;
    let mut db = PostgresAdapter::open(&pg.url("app"), Some("snapx"), None).await?;
    let schemas = db.introspect(&[("orders".into(), vec![])]).await?;
    db.install_capture(&schemas).await?;
    let mut snap = db.begin_snapshot(&schemas, None).await?;
    assert!(!snap.locked, "an exported snapshot, no table locks");
    let pool = pg.pool("app").await?;
    tokio::time::timeout(
        Duration::from_secs(20),
        sqlx::query("UPDATE orders SET qty = 7 WHERE id = 3").execute(&pool),
    )
    .await
    .context("a writer waited for the snapshot")??;
    let mut rows = Vec::new();
    while let Some((_, chunk, _)) = db.snapshot_chunk(&mut snap, &schemas, 4).await? {
        rows.extend(chunk);
    }
    assert_eq!(rows.len(), 10);
    let row3 = rows
        .iter()
        .find(|c| c.new.as_ref().unwrap()["id"] == Value::Int(3))
        .unwrap();
    assert_eq!(
        row3.new.as_ref().unwrap()["qty"],
        Value::Int(0),
        "as of the snapshot"
    );
    let lsn = snap.lsn;
    db.finish_snapshot(snap).await?;
    pg.wait_wal_flushed("app").await?;
    let changes = read_some(&mut db, lsn, 100).await?;
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].kind, ChangeKind::Update);
    assert_eq!(changes[0].new.as_ref().unwrap()["qty"], Value::Int(7));
    // The temporary slot goes with its connection (its walsender exits
    // on its own time).
    let start = std::time::Instant::now();
    loop {
        let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
            .fetch_one(&pool)
            .await?;
        if slots == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{slots} slots: the temporary one stayed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.close().await;
    Ok(())
}

/// The server ends the stream (its walsender terminated, as after
/// `wal_sender_timeout` or a server restart): the next read starts it
/// again from the checkpoint, with no error and nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_is_started_again_from_the_checkpoint() -> Result<()> {
    let (pg, mut db, _) = capture_on_orders("broken").await?;
    let insert = |from: i64, to: i64| {
        format!("INSERT INTO orders SELECT g, 'x', 0, NULL FROM generate_series({from}, {to}) g")
    };
    pg.exec("app", &insert(1, 5)).await?;
    pg.wait_wal_flushed("app").await?;
    let first = read_some(&mut db, 0, 100).await?;
    assert_eq!(first.len(), 5);
    let cp = first.last().unwrap().change_id;
    db.delete_changes_through(cp).await?;
    let pool = pg.pool("app").await?;
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_replication \
         WHERE application_name = 'syncmesh') t",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(ended, 1, "the node's walsender was terminated");
    pg.exec("app", &insert(6, 10)).await?;
    pg.wait_wal_flushed("app").await?;
    let next = read_some(&mut db, cp, 100).await?;
    let ids: Vec<Value> = next
        .iter()
        .map(|c| c.new.as_ref().unwrap()["id"].clone())
        .collect();
    assert_eq!(ids, (6..=10).map(Value::Int).collect::<Vec<_>>());
    assert!(db.streams());
    db.close().await;
    Ok(())
}

/// A throwaway cluster with database `app` holding `orders`, and an
/// adapter on it whose capture (slot `slot`) is installed.
async fn capture_on_orders(
    slot: &str,
) -> Result<(
    PgCluster,
    syncmesh_node::postgres::PostgresAdapter,
    Vec<TableSchema>,
)> {
    let pg = PgCluster::start()?;
    pg.create_db("app").await?;
    pg.exec("app", ORDERS_PG).await?;
    let mut db =
        syncmesh_node::postgres::PostgresAdapter::open(&pg.url("app"), Some(slot), None).await?;
    let schemas = db.introspect(&[("orders".into(), vec![])]).await?;
    db.install_capture(&schemas).await?;
    Ok((pg, db, schemas))
}

/// `read_changes` until it returns something (a stream hands out what has
/// arrived, which right after a start may be nothing yet), for at most
/// 20 s.
/// Opens the adapter on `url` (database `app` with [`ORDERS_PG`]), installs
/// capture on `slot`, inserts five rows and reads them from the stream
/// (never from the peek fallback).
async fn streams_five_inserts(
    pg: &PgCluster,
    url: &str,
    slot: &str,
) -> Result<syncmesh_node::postgres::PostgresAdapter> {
    let mut db = syncmesh_node::postgres::PostgresAdapter::open(url, Some(slot), None).await?;
    let schemas = db.introspect(&[("orders".into(), vec![])]).await?;
    db.install_capture(&schemas).await?;
    assert_eq!(db.probe_streaming().await, Ok(()), "{url}");
    pg.exec(
        "app",
        "INSERT INTO orders SELECT g, 'x', 0, NULL FROM generate_series(1, 5) g",
    )
    .await?;
    let got = read_some(&mut db, 0, 100).await?;
    assert_eq!(got.len(), 5, "{url}");
    assert!(db.streams(), "still streaming, no fallback to peek: {url}");
    Ok(db)
}

async fn read_some(
    db: &mut syncmesh_node::postgres::PostgresAdapter,
    after: i64,
    limit: usize,
) -> Result<Vec<syncmesh_node::adapter::CapturedChange>> {
    let start = std::time::Instant::now();
    loop {
        let got = db.read_changes(after, limit).await?;
        if !got.is_empty() || start.elapsed() > Duration::from_secs(20) {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A window read from the slot is handed to the core in whole
/// transactions of about `limit` changes; what was handed out comes back
/// until a checkpoint covers it (a failed capture call loses nothing); a
/// checkpoint below what was handed out makes capture read from the slot
/// again. A peek window moves the slot only once it is used up; a stream
/// confirms every checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_window_is_handed_out_in_whole_transactions_until_checkpointed() -> Result<()> {
    window_story(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_window_is_handed_out_in_whole_transactions_until_checkpointed() -> Result<()> {
    window_story(true).await
}

async fn window_story(stream: bool) -> Result<()> {
    let (pg, mut db, _) = capture_on_orders("peekwin").await?;
    if !stream {
        db.use_peek();
    }
    assert_eq!(db.streams(), stream);
    for (from, to) in [(1, 10), (11, 35), (36, 45)] {
        pg.exec(
            "app",
            &format!(
                "INSERT INTO orders SELECT g, 'x', 0, NULL FROM generate_series({from}, {to}) g"
            ),
        )
        .await?;
    }
    // Decoding sees only flushed WAL (the test clusters commit
    // asynchronously): wait until all three are, so one peek holds them.
    pg.wait_wal_flushed("app").await?;
    let pool = pg.pool("app").await?;
    let confirmed = || async {
        let lsn: String = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'peekwin'",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(lsn)
    };
    let at_start = confirmed().await?;
    let ids = |cs: &[syncmesh_node::adapter::CapturedChange]| -> Vec<Value> {
        cs.iter()
            .map(|c| c.new.as_ref().unwrap()["id"].clone())
            .collect()
    };
    let lsn = |s: &str| {
        let (hi, lo) = s.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    // The server applies a stream's status update when it reads it.
    let confirmed_reaches = |at: i64| async move {
        let start = std::time::Instant::now();
        loop {
            let now = confirmed().await?;
            if lsn(&now) >= at as u64 || start.elapsed() > Duration::from_secs(20) {
                return anyhow::Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // A transaction is never split, even above the limit.
    let t1 = read_some(&mut db, 0, 5).await?;
    assert_eq!(t1.len(), 10);
    // Not checkpointed (the core failed): the same changes again.
    assert_eq!(ids(&db.read_changes(0, 5).await?), ids(&t1));
    let cp1 = t1.last().unwrap().change_id;
    let t2 = read_some(&mut db, cp1, 20).await?;
    assert_eq!(t2.len(), 25);
    assert_eq!(ids(&t2)[0], Value::Int(11));
    // The core kept cp1 (below what it was handed): t2 is read again,
    // from the slot.
    db.delete_changes_through(cp1).await?;
    let again = read_some(&mut db, cp1, 20).await?;
    assert_eq!(ids(&again), ids(&t2));
    let cp2 = again.last().unwrap().change_id;
    db.delete_changes_through(cp2).await?;
    let moved = if stream {
        // Every checkpoint is confirmed.
        confirmed_reaches(cp2).await?
    } else {
        confirmed().await?
    };
    let t3 = read_some(&mut db, cp2, 20).await?;
    assert_eq!(t3.len(), 10);
    assert_eq!(ids(&t3)[0], Value::Int(36));
    let cp3 = t3.last().unwrap().change_id;
    db.delete_changes_through(cp3).await?;
    let end = confirmed_reaches(cp3).await?;
    assert!(db.read_changes(cp3, 20).await?.is_empty());
    if stream {
        assert!(lsn(&moved) >= cp2 as u64, "{moved} is below cp2");
    } else {
        // The window still held t3: the slot did not move past cp1's peek.
        assert!(
            lsn(&moved) <= lsn(&at_start).max(cp1 as u64),
            "{moved} moved past cp1 before the window was used up"
        );
    }
    assert!(
        lsn(&end) >= cp3 as u64,
        "{end} is below the last checkpoint"
    );
    db.close().await;
    Ok(())
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (the openssl package)")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A CA and a server certificate for 127.0.0.1 it signed (`openssl`
/// CLI), in `dir`: `(CA certificate, server certificate, server key)`,
/// readable by the cluster's user.
fn test_certs(dir: &Path, name: &str) -> Result<(String, String, String)> {
    let p = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    let (ca_crt, ca_key, crt, key, csr, ext) = (
        p("ca.crt"),
        p("ca.key"),
        p("server.crt"),
        p("server.key"),
        p("server.csr"),
        p("ext.cnf"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=syncmesh test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ])?;
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &ext,
        "-out",
        &crt,
    ])?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&crt, std::fs::Permissions::from_mode(0o644))?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    // The server refuses a key another user owns; as root it runs as the
    // postgres user.
    let uid = std::process::Command::new("id").arg("-u").output()?;
    if String::from_utf8_lossy(&uid.stdout).trim() == "0" {
        let st = std::process::Command::new("chown")
            .arg("postgres:postgres")
            .arg(&key)
            .status()?;
        if !st.success() {
            bail!("chown of {key} to postgres failed");
        }
    }
    Ok((ca_crt, crt, key))
}

/// `sslmode=verify-full` with the server's CA: every connection of the
/// adapter uses TLS (pg_stat_ssl), the replication stream included, and
/// capture streams; a wrong CA is refused with an error naming the
/// certificate problem and what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_use_tls_with_sslmode_verify_full() -> Result<()> {
    use syncmesh_node::postgres::PostgresAdapter;
    let certs = tempfile::tempdir()?;
    let (ca, crt, key) = test_certs(certs.path(), "a")?;
    let (other, _, _) = test_certs(certs.path(), "b")?;
    let pg = PgCluster::start_with(&[
        ("ssl", "on"),
        ("ssl_cert_file", crt.as_str()),
        ("ssl_key_file", key.as_str()),
    ])?;
    pg.create_db("app").await?;
    pg.exec("app", ORDERS_PG).await?;
    let url = format!("{}?sslmode=verify-full&sslrootcert={ca}", pg.url("app"));
    let db = streams_five_inserts(&pg, &url, "tlsslot").await?;
    let pool = pg.pool("app").await?;
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'syncmesh'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(
        tls >= 2,
        "the adapter's connections and its walsender use TLS ({tls})"
    );
    assert_eq!(plain, 0, "none of the adapter's connections is plaintext");
    let walsender_tls: bool = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) \
         WHERE r.application_name = 'syncmesh'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(walsender_tls, "the replication stream uses TLS");
    db.close().await;
    // sslmode=require encrypts without checking the certificate (no
    // sslrootcert: the CA is in no root store), as libpq does.
    let require = format!("{}?sslmode=require", pg.url("app"));
    let db = PostgresAdapter::open(&require, Some("tlsslot2"), None).await?;
    assert_eq!(db.probe_streaming().await, Ok(()));
    db.close().await;
    let wrong = format!("{}?sslmode=verify-full&sslrootcert={other}", pg.url("app"));
    let err = match PostgresAdapter::open(&wrong, Some("tlsslot"), None).await {
        Ok(_) => bail!("a server certificate the CA did not sign was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("invalid peer certificate") && err.contains("sslrootcert"),
        "the error names the certificate and what to set: {err}"
    );
    Ok(())
}
