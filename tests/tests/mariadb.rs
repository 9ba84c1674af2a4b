//! MariaDB as a peer: a real MariaDB server (throwaway, on 127.0.0.1, see
//! `syncmesh_tests::mariadb`), a real hub and real nodes on gRPC. Two
//! MariaDB databases and one SQLite file sync bi-directionally.

#![allow(clippy::unwrap_used, clippy::needless_range_loop, missing_docs)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use syncmesh::mesh::{hub_status, start_hub_from};
use syncmesh_hub::server::HubHandle;
use syncmesh_node::adapter::{Db, TableSchema};
use syncmesh_node::config::Config;
use syncmesh_node::mysql::TriggerState;
use syncmesh_node::shell::{NodeHandle, start_node};
use syncmesh_resolver::Value;
use syncmesh_tests::mariadb::MariaDb;
use syncmesh_tests::{Proc, free_port, run_syncmesh, wait_until};

const LONG: Duration = Duration::from_secs(90);
const NODES: [&str; 3] = ["maria-a", "maria-b", "lite"];

type Row = BTreeMap<String, Value>;
type Rows = Vec<Row>;

/// A hub, nodes `maria-a` and `maria-b` (two databases of one server) and
/// `lite` (a SQLite file).
struct Mesh {
    hub: Option<HubHandle>,
    hub_url: String,
    nodes: Vec<NodeHandle>,
    dbs: Vec<Db>,
    schemas: Vec<TableSchema>,
    server: MariaDb,
    _dir: tempfile::TempDir,
}

fn mesh_yaml(dir: &Path, server: &MariaDb, port: u16, tables: &str, batch: usize) -> String {
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n");
    for n in ["maria-a", "maria-b"] {
        let db = n.replace('-', "_");
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{n}\n    database: {{ type: mariadb, url: \"{}\" }}\n",
            server.url(&db)
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

impl Mesh {
    /// `my_ddl` runs on both MariaDB databases, `lite_ddl` on SQLite.
    async fn start(my_ddl: &str, lite_ddl: &str, tables: &str) -> Result<Mesh> {
        Self::start_seeded(my_ddl, lite_ddl, tables, &[], 500).await
    }

    /// Like [`Mesh::start`], with `seed` (database, SQL) run before the
    /// nodes start (rows their initial snapshots publish) and the given
    /// `sync.batch_size`.
    async fn start_seeded(
        my_ddl: &str,
        lite_ddl: &str,
        tables: &str,
        seed: &[(&str, &str)],
        batch: usize,
    ) -> Result<Mesh> {
        let server = MariaDb::start()?;
        let dir = tempfile::tempdir()?;
        for db in ["maria_a", "maria_b"] {
            server.create_db(db).await?;
            server.exec(db, my_ddl).await?;
        }
        for (db, sql) in seed {
            server.exec(db, sql).await?;
        }
        syncmesh_tests::create_db(&dir.path().join("lite.db"), lite_ddl).await?;
        let port = free_port();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, mesh_yaml(dir.path(), &server, port, tables, batch))?;
        let cfg = Config::load(&path)?;
        let hub = start_hub_from(&cfg, cfg.hub()?).await?;
        let wanted: Vec<_> = cfg
            .tables
            .iter()
            .map(|t| (t.name.clone(), t.key.clone()))
            .collect();
        let mut nodes = Vec::new();
        let mut dbs = Vec::new();
        let mut schemas = Vec::new();
        for n in NODES {
            nodes.push(
                start_node(&cfg, n)
                    .await
                    .with_context(|| format!("starting {n}"))?,
            );
            let mut db = Db::open(&cfg.node(n)?.database).await?;
            let s = db.introspect(&wanted).await?;
            if n == "maria-a" {
                schemas = s;
            }
            dbs.push(db);
        }
        Ok(Mesh {
            hub_url: hub.url(),
            hub: Some(hub),
            nodes,
            dbs,
            schemas,
            server,
            _dir: dir,
        })
    }

    async fn exec(&self, node: usize, sql: &str) -> Result<()> {
        match &self.dbs[node] {
            Db::Mysql(d) => {
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
            _ => bail!("{}: not a MariaDB or SQLite node", NODES[node]),
        }
        Ok(())
    }

    async fn rows(&self, node: usize, table: usize) -> Result<Rows> {
        Ok(self.dbs[node].dump_table(&self.schemas[table]).await?)
    }

    /// True when nothing is in flight anywhere.
    async fn idle(&self) -> Result<bool> {
        let status = hub_status(&self.hub_url).await?;
        let behind: u64 = status.nodes.iter().map(|n| n.pending_ops).sum();
        let busy = self.nodes.iter().any(|n| {
            let s = n.stats();
            s.own_acked < s.own_ops || s.dirty_rows > 0
        });
        Ok(behind == 0 && !busy)
    }

    /// Waits until node `node`'s table `table` equals `expected` and
    /// nothing is in flight.
    async fn wait_node_rows(&self, node: usize, table: usize, expected: &Rows) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            if &self.rows(node, table).await? == expected && self.idle().await? {
                return Ok(());
            }
            if start.elapsed() > LONG {
                bail!(
                    "{}: no convergence within {LONG:?};\nexpected {expected:?}\ngot      {:?}",
                    NODES[node],
                    self.rows(node, table).await?
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every node's table `table` equals `expected`.
    async fn wait_rows(&self, table: usize, expected: &Rows) -> Result<()> {
        for n in 0..self.dbs.len() {
            self.wait_node_rows(n, table, expected).await?;
        }
        // All three at once, nothing in flight.
        for n in 0..self.dbs.len() {
            self.wait_node_rows(n, table, expected).await?;
        }
        Ok(())
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
        drop(self.server);
        Ok(())
    }
}

const ORDERS_MY: &str = "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(100) NOT NULL, qty INT NOT NULL DEFAULT 0, status VARCHAR(20))";
const ORDERS_TABLES: &str = "tables:\n  - name: orders\n    key: [id]\n";

fn order(id: i64, item: &str, qty: i64, status: Option<&str>) -> Row {
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

/// MariaDB ↔ hub ↔ MariaDB ↔ SQLite: inserts, updates and deletes on every
/// side converge to the exact expected rows, and the hub holds exactly one
/// op per local row change (applies are not captured again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_mariadb_sqlite_converge_on_inserts_updates_deletes_without_echo() -> Result<()> {
    let mesh = Mesh::start(ORDERS_MY, syncmesh_tests::ORDERS, ORDERS_TABLES).await?;
    let mut writes = 0u64;
    for node in 0..3 {
        let base = node as i64 * 100;
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
            expected.push(order(id, &format!("i{id}"), k, (k <= 5).then_some("new")));
        }
    }
    mesh.wait_rows(0, &expected).await?;
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
    // A primary-key change on MariaDB: a delete and an insert.
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

const TYPES_MY: &str = "CREATE TABLE typed (
    id INT PRIMARY KEY,
    ti TINYINT, si SMALLINT UNSIGNED, mi MEDIUMINT, i INT UNSIGNED, bi BIGINT, ub BIGINT UNSIGNED,
    dec1 DECIMAL(30, 10), f FLOAT, d DOUBLE,
    vc VARCHAR(40), tx TEXT, bin VARBINARY(16), bl BLOB,
    dt DATE, dtm DATETIME(6), ts TIMESTAMP(6) NULL, j JSON, e ENUM('a', 'b', 'c'), b BIT(1), bo BOOL)";
/// The SQLite side: no declared types, so every value is stored exactly as
/// it arrives.
const TYPES_LITE: &str = "CREATE TABLE typed (id INTEGER PRIMARY KEY, ti, si, mi, i, bi, ub, dec1, f, d, vc, tx, bin, bl, dt, dtm, ts, j, e, b, bo)";
const TYPES_TABLES: &str = "tables:\n  - name: typed\n    key: [id]\n";

/// What SQLite stores for a value that came from MariaDB.
fn as_sqlite(v: &Value) -> Value {
    match v {
        Value::Decimal(s) | Value::Json(s) => Value::Text(s.clone()),
        Value::Timestamp(us) => Value::Int(*us),
        Value::Bool(b) => Value::Int(i64::from(*b)),
        other => other.clone(),
    }
}

/// Every supported type round-trips exactly MariaDB → mesh → MariaDB and
/// arrives in SQLite as the mapped value; values written on SQLite arrive
/// in MariaDB's column types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_mariadb_to_mariadb_and_to_sqlite() -> Result<()> {
    let mesh = Mesh::start(TYPES_MY, TYPES_LITE, TYPES_TABLES).await?;
    mesh.exec(
        0,
        r#"INSERT INTO typed VALUES
        (1, -128, 65535, -8388608, 4294967295, -9223372036854775808, 18446744073709551615,
         '12345678901234567890.0123456789', 0.1, 1e300,
         'héllo ''q'' "x" \\ back', REPEAT('long text ', 500), 0x00ff10, 0xdeadbeef,
         '2024-02-29', '2024-01-02 03:04:05.123456', '1999-12-31 23:59:59.999999',
         '{"b": 1,  "a": [1, 2.50]}', 'b', b'1', TRUE),
        (2, 127, 0, 0, 0, 9223372036854775807, 9223372036854775808,
         '-0.0000000001', 16777217, 2.2250738585072014e-308,
         '', '', '', NULL,
         '1000-01-01', '9999-12-31 23:59:59.999999', '1970-01-01 00:00:01',
         '[]', 'a', b'0', FALSE),
        (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#,
    )
    .await?;
    let source = mesh.rows(0, 0).await?;
    assert_eq!(source.len(), 3);
    // Spot checks of the capture mapping on the source itself.
    let r1 = &source[0];
    assert_eq!(r1["ub"], Value::Decimal("18446744073709551615".into()));
    assert_eq!(r1["bi"], Value::Int(i64::MIN));
    assert_eq!(
        r1["dec1"],
        Value::Decimal("12345678901234567890.0123456789".into())
    );
    assert_eq!(r1["f"], Value::Float(f64::from(0.1f32)));
    assert_eq!(r1["d"], Value::Float(1e300));
    assert_eq!(r1["vc"], Value::Text("h\u{e9}llo 'q' \"x\" \\ back".into()));
    assert_eq!(r1["bin"], Value::Bytes(vec![0, 255, 16]));
    assert_eq!(r1["dt"], Value::Text("2024-02-29".into()));
    assert_eq!(r1["dtm"], Value::Timestamp(1_704_164_645_123_456));
    assert_eq!(r1["ts"], Value::Timestamp(946_684_799_999_999));
    assert_eq!(r1["j"], Value::Json("{\"b\": 1,  \"a\": [1, 2.50]}".into()));
    assert_eq!(r1["e"], Value::Text("b".into()));
    assert_eq!(r1["b"], Value::Bool(true));
    assert_eq!(r1["bo"], Value::Int(1));
    let r2 = &source[1];
    assert_eq!(r2["ub"], Value::Decimal("9223372036854775808".into()));
    assert_eq!(r2["f"], Value::Float(16_777_216.0));
    assert_eq!(r2["d"], Value::Float(2.2250738585072014e-308));
    assert_eq!(r2["bin"], Value::Bytes(vec![]));
    assert_eq!(r2["ts"], Value::Timestamp(1_000_000));
    assert!(
        source[2]
            .iter()
            .all(|(k, v)| k == "id" || *v == Value::Null)
    );

    mesh.wait_node_rows(1, 0, &source).await?;
    let lite: Rows = source
        .iter()
        .map(|r| r.iter().map(|(k, v)| (k.clone(), as_sqlite(v))).collect())
        .collect();
    mesh.wait_node_rows(2, 0, &lite).await?;

    // SQLite → MariaDB: SQLite's storage classes into MariaDB's types.
    mesh.exec(
        2,
        "UPDATE typed SET ub = '18446744073709551615', dec1 = '1.5', f = 0.5, d = 0.1, \
         vc = 'from lite', bin = x'0102', dt = '2000-01-01', dtm = 1704164645123456, \
         ts = 1704164645500000, j = '{\"k\":1}', e = 'c', b = 1, bo = 0 WHERE id = 3",
    )
    .await?;
    let mut expected = source.clone();
    for (k, v) in [
        ("ub", Value::Decimal("18446744073709551615".into())),
        ("dec1", Value::Decimal("1.5000000000".into())),
        ("f", Value::Float(0.5)),
        ("d", Value::Float(0.1)),
        ("vc", Value::Text("from lite".into())),
        ("bin", Value::Bytes(vec![1, 2])),
        ("dt", Value::Text("2000-01-01".into())),
        ("dtm", Value::Timestamp(1_704_164_645_123_456)),
        ("ts", Value::Timestamp(1_704_164_645_500_000)),
        ("j", Value::Json("{\"k\":1}".into())),
        ("e", Value::Text("c".into())),
        ("b", Value::Bool(true)),
        ("bo", Value::Int(0)),
    ] {
        expected[2].insert(k.into(), v);
    }
    mesh.wait_node_rows(0, 0, &expected).await?;
    mesh.wait_node_rows(1, 0, &expected).await?;
    mesh.stop().await
}

const COUNTERS_MY: &str =
    "CREATE TABLE counters (id INT PRIMARY KEY, n BIGINT NOT NULL DEFAULT 0, label VARCHAR(20))";
const COUNTERS_LITE: &str =
    "CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0, label TEXT)";
const COUNTERS_TABLES: &str =
    "tables:\n  - name: counters\n    key: [id]\n    resolve:\n      fields:\n        n: sum\n";

/// Both MariaDB databases hold rows when the mesh starts: maria-a keys
/// 1-6000 with `n = 1`, maria-b keys 3001-6000 with `n = 2`, under a `max`
/// field, in chunks of 25 rows. Each node publishes its snapshot from its
/// loop while connected, so maria-b's ops of keys maria-a has not read yet
/// reach maria-a during its snapshot; they wait for its end. Every
/// replica, SQLite too, ends with the larger values, and each row is
/// published once per database that held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_on_both_mariadb_sides_snapshot_concurrently_and_converge() -> Result<()> {
    let seed = |n: i64, from: i64| {
        let digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 \
                      UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 \
                      UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
        format!(
            "INSERT INTO counters SELECT i, {n}, CONCAT('seed-', i) FROM \
             (SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d AS i \
              FROM {digits} a, {digits} b, {digits} c, {digits} e) g \
             WHERE i BETWEEN {from} AND 6000"
        )
    };
    let (a, b) = (seed(1, 1), seed(2, 3001));
    let tables =
        "tables:\n  - name: counters\n    key: [id]\n    resolve:\n      fields:\n        n: max\n";
    let mesh = Mesh::start_seeded(
        COUNTERS_MY,
        COUNTERS_LITE,
        tables,
        &[("maria_a", &a), ("maria_b", &b)],
        25,
    )
    .await?;
    let expected: Rows = syncmesh_tests::seeded_counters();
    mesh.wait_rows(0, &expected).await?;
    assert_eq!(
        mesh.total_ops().await?,
        9000,
        "each database published each of its rows once"
    );
    // The snapshots ended: both nodes capture again.
    mesh.exec(0, "UPDATE counters SET n = 7 WHERE id = 1")
        .await?;
    mesh.exec(1, "INSERT INTO counters VALUES (6001, 3, 'after')")
        .await?;
    let mut expected = expected;
    expected[0].insert("n".to_owned(), Value::Int(7));
    expected.push(syncmesh_tests::counter(6001, 3, "after"));
    mesh.wait_rows(0, &expected).await?;
    assert_eq!(mesh.total_ops().await?, 9002, "one op per write, no echo");
    mesh.stop().await
}

/// Concurrent increments of the same rows on MariaDB and SQLite while both
/// are cut off the hub: after the heal every increment counts everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_on_partitioned_mariadb_and_sqlite_all_count() -> Result<()> {
    let mesh = Mesh::start(COUNTERS_MY, COUNTERS_LITE, COUNTERS_TABLES).await?;
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
    mesh.nodes[2].set_online(false).await;
    for i in 0..40 {
        mesh.exec(0, "UPDATE counters SET n = n + 1 WHERE id = 1")
            .await?;
        if i % 2 == 0 {
            mesh.exec(2, "UPDATE counters SET n = n + 2 WHERE id = 1")
                .await?;
        }
        mesh.exec(2, "UPDATE counters SET n = n - 1 WHERE id = 2")
            .await?;
    }
    // One multi-row increment in one transaction on each side, and one on
    // the MariaDB node that stayed online.
    mesh.exec(0, "UPDATE counters SET n = n + 100").await?;
    mesh.exec(2, "UPDATE counters SET n = n + 1000").await?;
    mesh.exec(1, "UPDATE counters SET n = n + 5 WHERE id = 2")
        .await?;
    wait_until("both nodes to capture while offline", LONG, || async {
        Ok(mesh.nodes[0].stats().own_ops >= 44 && mesh.nodes[2].stats().own_ops >= 62)
    })
    .await?;
    mesh.nodes[0].set_online(true).await;
    mesh.nodes[2].set_online(true).await;
    let n1 = 40 + 20 * 2 + 100 + 1000;
    let n2 = 10 - 40 + 100 + 1000 + 5;
    mesh.wait_rows(0, &vec![row(1, n1, "x"), row(2, n2, "y")])
        .await?;
    mesh.stop().await
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
        !all.contains(syncmesh_tests::mariadb::PASSWORD),
        "{what}: the password leaked:\n{all}"
    );
}

fn node_yaml(dir: &Path, port: u16, url: &str, name: &str, table: &str) -> Result<String> {
    let yaml = format!(
        "nodes:\n  - name: my\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{name}\n    database: {{ type: mysql, url: \"{url}\" }}\ntables:\n  - name: {table}\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok(path.display().to_string())
}

/// Wrong password, a table without a primary key, a missing table and an
/// unsupported column type: each a single clear line, non-zero exit, from
/// `syncmesh node` and `syncmesh check`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mariadb_input_gives_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = MariaDb::start()?;
    server.create_db("app").await?;
    server
        .exec(
            "app",
            &format!(
                "{ORDERS_MY}; CREATE TABLE nopk (a TEXT, b TEXT); CREATE TABLE geo (id INT PRIMARY KEY, p POINT)"
            ),
        )
        .await?;
    let good = server.url("app");
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

    let wrong = good.replace(syncmesh_tests::mariadb::PASSWORD, "not-the-password");
    let cfg = node_yaml(dir.path(), port, &wrong, "wrong", "orders")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "my"])?;
    assert_one_line_error("wrong password (node)", ok, &out, &err, "Access denied");
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert_one_line_error(
        "wrong password (check)",
        ok,
        &out,
        &err,
        "check the user and password",
    );

    let cfg = node_yaml(dir.path(), port, &good, "nopk", "nopk")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "my"])?;
    assert_one_line_error(
        "no primary key (node)",
        ok,
        &out,
        &err,
        "table nopk: has no primary key",
    );
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert_one_line_error(
        "no primary key (check)",
        ok,
        &out,
        &err,
        "table nopk: has no primary key",
    );

    let cfg = node_yaml(dir.path(), port, &good, "nosuch", "nosuch")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "my"])?;
    assert_one_line_error(
        "missing table",
        ok,
        &out,
        &err,
        "existing tables: geo, nopk, orders",
    );

    let cfg = node_yaml(dir.path(), port, &good, "geo", "geo")?;
    let (ok, out, err) = run_syncmesh(&["node", "--config", &cfg, "--name", "my"])?;
    assert_one_line_error(
        "unsupported type",
        ok,
        &out,
        &err,
        "table geo: column `p` has type point",
    );

    // The good config passes `check`.
    let cfg = node_yaml(dir.path(), port, &good, "good", "orders")?;
    let (ok, out, err) = run_syncmesh(&["check", "--config", &cfg])?;
    assert!(ok, "check of a good config failed:\n{out}{err}");
    assert!(
        out.contains("TRIGGER"),
        "check names the trigger privilege:\n{out}"
    );
    assert!(
        out.contains("table orders: capture triggers not installed yet"),
        "check says the node will install the triggers:\n{out}"
    );
    Ok(())
}

const RACE_MY: &str = "CREATE TABLE race (id INT PRIMARY KEY, a INT, b INT)";
const RACE_LITE: &str = "CREATE TABLE race (id INTEGER PRIMARY KEY, a INTEGER, b INTEGER)";
const RACE_TABLES: &str = "tables:\n  - name: race\n    key: [id]\n";

/// Local writes on MariaDB race the applies of SQLite's writes to the same
/// row (each side owns one field): no local write is lost to an apply that
/// overwrote it, and every replica ends with both sides' last values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mariadb_writes_racing_applies_are_not_lost() -> Result<()> {
    let mesh = Mesh::start(RACE_MY, RACE_LITE, RACE_TABLES).await?;
    mesh.exec(0, "INSERT INTO race VALUES (1, 0, 0)").await?;
    let row = |a: i64, b: i64| {
        BTreeMap::from([
            ("id".to_owned(), Value::Int(1)),
            ("a".to_owned(), Value::Int(a)),
            ("b".to_owned(), Value::Int(b)),
        ])
    };
    mesh.wait_rows(0, &vec![row(0, 0)]).await?;
    let (Db::Sqlite(lite), Db::Mysql(maria)) = (&mesh.dbs[2], &mesh.dbs[0]) else {
        bail!("unexpected engines");
    };
    let lite = lite.pool().clone();
    let maria = maria.pool().clone();
    const N: i64 = 150;
    let lite_writer = tokio::spawn(async move {
        for i in 1..=N {
            sqlx::query("UPDATE race SET a = ?1 WHERE id = 1")
                .bind(i)
                .execute(&lite)
                .await?;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        anyhow::Ok(())
    });
    for i in 1..=N {
        sqlx::query("UPDATE race SET b = ? WHERE id = 1")
            .bind(i)
            .execute(&maria)
            .await?;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    lite_writer.await??;
    mesh.wait_rows(0, &vec![row(N, N)]).await?;
    mesh.stop().await
}

/// PostgreSQL ↔ MariaDB ↔ SQLite, bi-directional, with `sum`, `max` and
/// `last_write_wins` fields and deletes (`delete_wins`), PostgreSQL and
/// MariaDB partitioned while all three write, then healed: all three
/// converge to the exact expected rows, and a Redis subscriber holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_mariadb_sqlite_and_redis_converge_through_a_partition() -> Result<()> {
    use std::collections::HashMap;
    let pg = syncmesh_tests::pg::PgCluster::start()?;
    let maria = MariaDb::start()?;
    let redis = syncmesh_tests::redis::RedisServer::start().await?;
    let dir = tempfile::tempdir()?;
    let pg_url = pg.create_db("app").await?;
    pg.exec(
        "app",
        "CREATE TABLE items (id integer PRIMARY KEY, qty bigint NOT NULL DEFAULT 0, peak bigint, name text)",
    )
    .await?;
    let my_url = maria.create_db("app").await?;
    maria
        .exec(
            "app",
            "CREATE TABLE items (id INT PRIMARY KEY, qty BIGINT NOT NULL DEFAULT 0, peak BIGINT, name VARCHAR(50))",
        )
        .await?;
    let lite_url = syncmesh_tests::create_db(
        &dir.path().join("lite.db"),
        "CREATE TABLE items (id INTEGER PRIMARY KEY, qty INTEGER NOT NULL DEFAULT 0, peak INTEGER, name TEXT)",
    )
    .await?;
    let port = free_port();
    let yaml = format!(
        r#"
hub: {{ listen: "127.0.0.1:{port}", data_dir: ./hub }}
nodes:
  - {{ name: pg, hub: "http://127.0.0.1:{port}", data_dir: ./pg, database: {{ type: postgresql, url: "{pg_url}", slot: sm_pg }} }}
  - {{ name: maria, hub: "http://127.0.0.1:{port}", data_dir: ./maria, database: {{ type: mariadb, url: "{my_url}" }} }}
  - {{ name: lite, hub: "http://127.0.0.1:{port}", data_dir: ./lite, database: {{ type: sqlite, url: "{lite_url}" }} }}
  - name: cache
    hub: "http://127.0.0.1:{port}"
    data_dir: ./cache
    mode: subscribe
    database: {{ type: redis, url: "{redis_url}", key_prefix: "sm" }}
tables:
  - name: items
    key: [id]
    deletes: delete_wins
    resolve: {{ default: last_write_wins, fields: {{ qty: sum, peak: max }} }}
"#,
        redis_url = redis.url
    );
    let cfg = Config::parse(&yaml, "<test>", dir.path())?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let hub_url = hub.url();
    let names = ["pg", "maria", "lite"];
    let mut nodes = Vec::new();
    let mut dbs = Vec::new();
    for n in names {
        nodes.push(
            start_node(&cfg, n)
                .await
                .with_context(|| format!("starting {n}"))?,
        );
        let mut db = Db::open(&cfg.node(n)?.database).await?;
        let schema = db
            .introspect(&[("items".to_owned(), vec!["id".to_owned()])])
            .await?;
        dbs.push((db, schema[0].clone()));
    }
    let cache = start_node(&cfg, "cache").await?;
    let exec = |node: usize, sql: String| {
        let db = &dbs[node].0;
        async move {
            let q = sqlx::AssertSqlSafe(sql.clone());
            match db {
                Db::Postgres(d) => sqlx::raw_sql(q).execute(d.pool()).await.map(|_| ()),
                Db::Mysql(d) => sqlx::raw_sql(q).execute(d.pool()).await.map(|_| ()),
                Db::Sqlite(d) => sqlx::raw_sql(q).execute(d.pool()).await.map(|_| ()),
                Db::Redis(_) | Db::Mongo(_) => Ok(()),
            }
            .with_context(|| format!("{}: {sql}", names[node]))
        }
    };
    let item = |id: i64, qty: i64, peak: i64, name: &str| -> Row {
        BTreeMap::from([
            ("id".to_owned(), Value::Int(id)),
            ("qty".to_owned(), Value::Int(qty)),
            ("peak".to_owned(), Value::Int(peak)),
            ("name".to_owned(), Value::Text(name.to_owned())),
        ])
    };
    let converged = |expected: Rows| {
        let dbs = &dbs;
        let nodes = &nodes;
        let hub_url = hub_url.clone();
        async move {
            let start = std::time::Instant::now();
            loop {
                let mut same = true;
                let mut got = Vec::new();
                for (db, schema) in dbs {
                    let rows = db.dump_table(schema).await?;
                    same &= rows == expected;
                    got.push(rows);
                }
                let status = hub_status(&hub_url).await?;
                let behind: u64 = status.nodes.iter().map(|n| n.pending_ops).sum();
                let busy = nodes.iter().any(|n: &NodeHandle| {
                    let s = n.stats();
                    s.own_acked < s.own_ops || s.dirty_rows > 0
                });
                if same && behind == 0 && !busy {
                    return anyhow::Ok(());
                }
                if start.elapsed() > LONG {
                    bail!("no convergence within {LONG:?};\nexpected {expected:?}\ngot {got:#?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for (node, ids) in [(0, 1..=3), (1, 4..=6), (2, 7..=9)] {
        for id in ids {
            exec(
                node,
                format!("INSERT INTO items VALUES ({id}, {id}, {id}, 'n{id}')"),
            )
            .await?;
        }
    }
    converged(
        (1..=9)
            .map(|id| item(id, id, id, &format!("n{id}")))
            .collect(),
    )
    .await?;

    nodes[0].set_online(false).await;
    nodes[1].set_online(false).await;
    exec(0, "UPDATE items SET qty = qty + 10".into()).await?;
    exec(0, "UPDATE items SET peak = 50 WHERE id = 1".into()).await?;
    exec(0, "DELETE FROM items WHERE id = 8".into()).await?;
    exec(1, "UPDATE items SET qty = qty + 5".into()).await?;
    exec(1, "UPDATE items SET peak = 70 WHERE id = 1".into()).await?;
    exec(1, "UPDATE items SET name = 'm' WHERE id = 2".into()).await?;
    exec(2, "UPDATE items SET qty = qty + 1".into()).await?;
    exec(2, "UPDATE items SET peak = 60 WHERE id = 1".into()).await?;
    exec(2, "DELETE FROM items WHERE id = 9".into()).await?;
    wait_until("the partitioned nodes to capture", LONG, || async {
        // 3 inserts, 9 increments, 1 peak, 1 delete / 1 rename each.
        Ok(nodes[0].stats().own_ops >= 14 && nodes[1].stats().own_ops >= 14)
    })
    .await?;
    nodes[0].set_online(true).await;
    nodes[1].set_online(true).await;
    let expected: Rows = (1..=7)
        .map(|id| {
            let peak = if id == 1 { 70 } else { id };
            let name = if id == 2 {
                "m".to_owned()
            } else {
                format!("n{id}")
            };
            item(id, id + 16, peak, &name)
        })
        .collect();
    converged(expected.clone()).await?;

    let want: BTreeMap<String, HashMap<String, String>> = expected
        .iter()
        .map(|r| {
            let id = match r["id"] {
                Value::Int(i) => i,
                _ => 0,
            };
            let h = r
                .iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::Int(i) => i.to_string(),
                        Value::Text(t) => t.clone(),
                        other => format!("{other:?}"),
                    };
                    (k.clone(), s)
                })
                .collect();
            (format!("sm:items:{id}"), h)
        })
        .collect();
    let c = redis.conn().await?;
    let read = |mut c: redis::aio::MultiplexedConnection| async move {
        let keys: Vec<String> = redis::cmd("KEYS").arg("sm:*").query_async(&mut c).await?;
        let mut got = BTreeMap::new();
        for k in keys {
            let h: HashMap<String, String> =
                redis::cmd("HGETALL").arg(&k).query_async(&mut c).await?;
            got.insert(k, h);
        }
        anyhow::Ok(got)
    };
    let res = wait_until("the cache holds the visible rows", LONG, || {
        let c = c.clone();
        let want = &want;
        async move { Ok(&read(c).await? == want) }
    })
    .await;
    if res.is_err() {
        assert_eq!(read(c.clone()).await?, want, "{res:?}");
    }
    cache.shutdown().await?;
    for n in nodes {
        n.shutdown().await?;
    }
    for (db, _) in &dbs {
        db.close().await;
    }
    hub.shutdown().await?;
    Ok(())
}

/// A MariaDB node process is SIGKILLed twice while it streams a write load
/// to another MariaDB database: nothing is lost, nothing is duplicated
/// (the hub holds exactly one op per inserted row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_mariadb_node_during_streaming_loses_and_duplicates_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let server = MariaDb::start()?;
    for db in ["maria_a", "maria_b"] {
        server.create_db(db).await?;
        server.exec(db, ORDERS_MY).await?;
    }
    let port = free_port();
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n");
    for n in ["maria-a", "maria-b"] {
        let db = n.replace('-', "_");
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{n}\n    database: {{ type: mariadb, url: \"{}\" }}\n",
            server.url(&db)
        ));
    }
    yaml.push_str(ORDERS_TABLES);
    yaml.push_str("sync:\n  batch_size: 200\n");
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, yaml)?;
    let cfg = cfg.display().to_string();
    let hub_url = format!("http://127.0.0.1:{port}");
    let a_args = ["node", "--config", &cfg, "--name", "maria-a"];
    let _hub = Proc::spawn(dir, "hub", &["hub", "--config", &cfg])?;
    let mut a = Proc::spawn(dir, "maria-a", &a_args)?;
    let _b = Proc::spawn(
        dir,
        "maria-b",
        &["node", "--config", &cfg, "--name", "maria-b"],
    )?;
    wait_until("both nodes connected", LONG, || async {
        Ok(hub_status(&hub_url)
            .await
            .is_ok_and(|s| s.nodes.iter().filter(|n| n.connected).count() == 2))
    })
    .await?;
    let pool_a = server.pool("maria_a").await?;
    let pool_b = server.pool("maria_b").await?;
    let count = |pool: sqlx::MySqlPool| async move {
        anyhow::Ok(
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM orders")
                .fetch_one(&pool)
                .await?,
        )
    };
    let total = 3000i64;
    let writer = {
        let pool = pool_a.clone();
        tokio::spawn(async move {
            for start in (1..=total).step_by(20) {
                let values: Vec<String> = (start..=(start + 19).min(total))
                    .map(|g| format!("({g}, 'item-{g}', {}, 'new')", g % 7))
                    .collect();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO orders VALUES {}",
                    values.join(", ")
                )))
                .execute(&pool)
                .await?;
            }
            anyhow::Ok(())
        })
    };
    for _ in 0..2 {
        let before = count(pool_b.clone()).await?;
        wait_until("maria-b to make progress", LONG, || {
            let pool_b = pool_b.clone();
            async move {
                let n = count(pool_b).await?;
                Ok(n > before + 100 || n == total)
            }
        })
        .await?;
        a.assert_running(dir)?;
        a.kill9();
        a = Proc::spawn(dir, "maria-a", &a_args)?;
    }
    writer.await??;
    let caught_up = wait_until("maria-b to hold every row", LONG, || async {
        Ok(count(pool_b.clone()).await? == total)
    })
    .await;
    if let Err(e) = caught_up {
        let tail = |name: &str| {
            let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        bail!(
            "{e}: maria-b holds {} rows, maria-a {}, the hub {:?} ops, {} changes not consumed;\nmaria-a log:\n{}\nmaria-b log:\n{}",
            count(pool_b.clone()).await?,
            count(pool_a.clone()).await?,
            hub_status(&hub_url).await.map(|s| s.total_ops).ok(),
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _syncmesh_changes")
                .fetch_one(&pool_a)
                .await?,
            tail("maria-a"),
            tail("maria-b")
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
    let rows = |pool: sqlx::MySqlPool| async move {
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

/// Rows already in a MariaDB database before its node first starts are
/// published by the chunked initial snapshot, while a writer keeps
/// incrementing a `sum` column, inserting and deleting; the node is
/// SIGKILLed during the snapshot and resumes after the last durable chunk
/// (its log says so). The peer ends with exactly the source's rows, every
/// increment counted once, and the source keeps exactly what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_mariadb_rows_snapshot_resumes_after_sigkill_and_ends_exact() -> Result<()> {
    // 20,000 rows through a snapshot and an apply on a shared 2-core
    // machine: a generous deadline (never a timing assertion).
    const SLOW: Duration = Duration::from_secs(300);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let server = MariaDb::start()?;
    for db in ["maria_a", "maria_b"] {
        server.create_db(db).await?;
        server.exec(db, ORDERS_MY).await?;
    }
    let pool_a = server.pool("maria_a").await?;
    let pool_b = server.pool("maria_b").await?;
    let existing = 20_000i64;
    for start in (1..=existing).step_by(1000) {
        let values: Vec<String> = (start..start + 1000)
            .map(|g| format!("({g}, 'item-{g}', {}, 'old')", g % 10))
            .collect();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO orders VALUES {}",
            values.join(", ")
        )))
        .execute(&pool_a)
        .await?;
    }
    let port = free_port();
    let mut yaml = format!("hub:\n  listen: 127.0.0.1:{port}\n  data_dir: ./hub\nnodes:\n");
    for n in ["maria-a", "maria-b"] {
        let db = n.replace('-', "_");
        yaml.push_str(&format!(
            "  - name: {n}\n    hub: http://127.0.0.1:{port}\n    data_dir: ./{n}\n    database: {{ type: mariadb, url: \"{}\" }}\n",
            server.url(&db)
        ));
    }
    yaml.push_str(
        "tables:\n  - name: orders\n    key: [id]\n    resolve:\n      fields:\n        qty: sum\n",
    );
    yaml.push_str("sync:\n  batch_size: 50\n");
    let cfg = dir.join("mesh.yaml");
    std::fs::write(&cfg, yaml)?;
    let cfg = cfg.display().to_string();
    let a_args = ["node", "--config", &cfg, "--name", "maria-a"];
    let _hub = Proc::spawn(dir, "hub", &["hub", "--config", &cfg])?;
    let _b = Proc::spawn(
        dir,
        "maria-b",
        &["node", "--config", &cfg, "--name", "maria-b"],
    )?;
    // The expected table, kept by the writer: qty starts at id % 10.
    let mut expected: BTreeMap<i64, (String, i64)> = (1..=existing)
        .map(|g| (g, (format!("item-{g}"), g % 10)))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let pool = pool_a.clone();
        let stop = stop.clone();
        let mut expected = expected.clone();
        tokio::spawn(async move {
            let mut i = 0i64;
            // A statement running while the node installs its triggers may
            // fail once with "_syncmesh_seq doesn't exist" (MDEV-26048, see
            // `installing_capture_leaves_live_prepared_statements_working`);
            // a failed statement changed nothing, so it only does not count.
            let mut failed = 0u32;
            let mut ok = |r: Result<sqlx::mysql::MySqlQueryResult, sqlx::Error>| match r {
                Ok(_) => Ok(true),
                Err(e) if failed < 20 => {
                    failed += 1;
                    eprintln!("writer: statement failed ({e}); not counted");
                    Ok(false)
                }
                Err(e) => Err(e),
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                // Spread over the key range: some rows before the cursor,
                // some after it.
                let id = (i * 7919) % existing + 1;
                let r = sqlx::query("UPDATE orders SET qty = qty + 3 WHERE id = ?")
                    .bind(id)
                    .execute(&pool)
                    .await;
                if ok(r)?
                    && let Some(e) = expected.get_mut(&id)
                {
                    e.1 += 3;
                }
                if i % 10 == 0 {
                    let new = existing + i;
                    let r = sqlx::query("INSERT INTO orders VALUES (?, ?, 1, 'new')")
                        .bind(new)
                        .bind(format!("item-{new}"))
                        .execute(&pool)
                        .await;
                    if ok(r)? {
                        expected.insert(new, (format!("item-{new}"), 1));
                    }
                }
                if i % 25 == 0 {
                    let gone = (i * 104_729) % existing + 1;
                    let r = sqlx::query("DELETE FROM orders WHERE id = ?")
                        .bind(gone)
                        .execute(&pool)
                        .await;
                    if ok(r)? {
                        expected.remove(&gone);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok(expected)
        })
    };
    let log_a = dir.join("maria-a.log");
    let log = || std::fs::read_to_string(&log_a).unwrap_or_default();
    let mut a = Proc::spawn(dir, "maria-a", &a_args)?;
    wait_until("maria-a to start its snapshot", SLOW, || async {
        Ok(log().contains("initial snapshot: publishing"))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.assert_running(dir)?;
    a.kill9();
    assert!(
        !log().contains("initial snapshot done"),
        "the snapshot finished before the kill; the test needs more rows:\n{}",
        log()
    );
    let mut a = Proc::spawn(dir, "maria-a", &a_args)?;
    if let Err(e) = wait_until("maria-a to finish its snapshot", SLOW, || async {
        Ok(log().contains("initial snapshot done"))
    })
    .await
    {
        // Seen once in CI (with a writer's error 1146 just before): the
        // node's log is what tells why.
        let text = log();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        bail!(
            "{e}; maria-a's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        log().contains("initial snapshot: resuming after"),
        "the second start must resume the snapshot:\n{}",
        log()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    expected = writer.await??;
    let want: Vec<(i32, String, i32)> = expected
        .iter()
        .map(|(id, (item, qty))| (*id as i32, item.clone(), *qty as i32))
        .collect();
    let rows = |pool: sqlx::MySqlPool| async move {
        anyhow::Ok(
            sqlx::query_as::<_, (i32, String, i32)>("SELECT id, item, qty FROM orders ORDER BY id")
                .fetch_all(&pool)
                .await?,
        )
    };
    let converged = wait_until("maria-b to hold exactly maria-a's rows", SLOW, || async {
        Ok(rows(pool_b.clone()).await? == want)
    })
    .await;
    if let Err(e) = converged {
        let got = rows(pool_b.clone()).await?;
        let diff: Vec<_> = want.iter().filter(|w| !got.contains(w)).take(5).collect();
        bail!(
            "{e}: maria-b has {} rows, {} expected; first missing or different: {diff:?}",
            got.len(),
            want.len()
        );
    }
    assert_eq!(
        rows(pool_a.clone()).await?,
        want,
        "the source keeps exactly what was written"
    );
    a.assert_running(dir)?;
    // A third start does not snapshot again.
    a.kill9();
    let before = log().matches("initial snapshot: publishing").count();
    let mut a = Proc::spawn(dir, "maria-a", &a_args)?;
    wait_until("maria-a to reconnect", SLOW, || async {
        Ok(log().matches("connected to hub").count() >= 2)
    })
    .await?;
    assert_eq!(
        log().matches("initial snapshot: publishing").count(),
        before
    );
    assert_eq!(rows(pool_b.clone()).await?, want);
    a.assert_running(dir)?;
    Ok(())
}

/// A MariaDB `BIGINT UNSIGNED` value above `i64::MAX` cannot go into a
/// PostgreSQL `bigint`: the PostgreSQL node stops with one error naming
/// table, column and value (nothing of that batch is written), after
/// values that fit went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_bigint_above_i64_into_postgres_bigint_is_a_clear_error() -> Result<()> {
    let pg = syncmesh_tests::pg::PgCluster::start()?;
    let maria = MariaDb::start()?;
    let dir = tempfile::tempdir()?;
    let pg_url = pg.create_db("app").await?;
    pg.exec("app", "CREATE TABLE big (id integer PRIMARY KEY, n bigint)")
        .await?;
    let my_url = maria.create_db("app").await?;
    maria
        .exec(
            "app",
            "CREATE TABLE big (id INT PRIMARY KEY, n BIGINT UNSIGNED)",
        )
        .await?;
    let port = free_port();
    let yaml = format!(
        r#"
hub: {{ listen: "127.0.0.1:{port}", data_dir: ./hub }}
nodes:
  - {{ name: pg, hub: "http://127.0.0.1:{port}", data_dir: ./pg, database: {{ type: postgresql, url: "{pg_url}", slot: sm_big }} }}
  - {{ name: maria, hub: "http://127.0.0.1:{port}", data_dir: ./maria, database: {{ type: mariadb, url: "{my_url}" }} }}
tables:
  - name: big
    key: [id]
"#
    );
    let cfg = Config::parse(&yaml, "<test>", dir.path())?;
    let hub = start_hub_from(&cfg, cfg.hub()?).await?;
    let mut pg_node = start_node(&cfg, "pg").await?;
    let maria_node = start_node(&cfg, "maria").await?;
    let my_pool = maria.pool("app").await?;
    let pg_pool = pg.pool("app").await?;
    sqlx::raw_sql("INSERT INTO big VALUES (1, 9223372036854775807)")
        .execute(&my_pool)
        .await?;
    wait_until("the fitting value to reach PostgreSQL", LONG, || async {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT n FROM big WHERE id = 1")
                .fetch_optional(&pg_pool)
                .await?
                == Some(i64::MAX),
        )
    })
    .await?;
    sqlx::raw_sql("INSERT INTO big VALUES (2, 18446744073709551615)")
        .execute(&my_pool)
        .await?;
    let res = tokio::time::timeout(LONG, pg_node.wait())
        .await
        .context("the PostgreSQL node did not stop")?;
    let err = res
        .expect_err("the PostgreSQL node must refuse the value")
        .to_string();
    for needle in [
        "table big",
        "column n",
        "18446744073709551615",
        "numeric(20,0)",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    assert!(!err.contains('\n'), "one line: {err}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM big")
        .fetch_one(&pg_pool)
        .await?;
    assert_eq!(rows, 1, "nothing of the refused batch is written");
    maria_node.shutdown().await?;
    hub.shutdown().await?;
    Ok(())
}

/// An application writes with prepared statements (sqlx caches them per
/// connection) while a node installs capture on its table. MariaDB
/// 10.11 (MDEV-26048) can leave such a session re-preparing a cached
/// statement against the new triggers and failing it with 1146
/// "_syncmesh_seq doesn't exist" on every run, until the triggers change
/// again; seen in up to 5 of 12 rounds before the install replaced its
/// triggers a second time. Now no statement started after the install
/// returned fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_capture_leaves_live_prepared_statements_working() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let server = MariaDb::start()?;
    for round in 0..30 {
        let db = format!("live_{round}");
        server.create_db(&db).await?;
        server.exec(&db, ORDERS_MY).await?;
        server
            .exec(&db, "INSERT INTO orders VALUES (1, 'a', 0, 'x')")
            .await?;
        let pool = server.pool(&db).await?;
        let stop = Arc::new(AtomicBool::new(false));
        // Each statement's start and outcome.
        let writer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut runs: Vec<(Instant, Option<String>)> = Vec::new();
                let mut id = 10i64;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    let t = Instant::now();
                    let r = sqlx::query("UPDATE orders SET qty = qty + 3 WHERE id = 1")
                        .execute(&pool)
                        .await;
                    runs.push((t, r.err().map(|e| format!("UPDATE: {e}"))));
                    let t = Instant::now();
                    let r = sqlx::query("INSERT INTO orders VALUES (?, 'n', 1, 'new')")
                        .bind(id)
                        .execute(&pool)
                        .await;
                    runs.push((t, r.err().map(|e| format!("INSERT: {e}"))));
                    let t = Instant::now();
                    let r = sqlx::query("DELETE FROM orders WHERE id = ?")
                        .bind(id - 5)
                        .execute(&pool)
                        .await;
                    runs.push((t, r.err().map(|e| format!("DELETE: {e}"))));
                }
                pool.close().await;
                runs
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let node = syncmesh_node::mysql::MysqlAdapter::open(&server.url(&db)).await?;
        let schemas = node
            .introspect(&[("orders".to_owned(), vec!["id".to_owned()])])
            .await?;
        node.install_capture(&schemas).await?;
        let installed = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let runs = writer.await?;
        let after: Vec<&(Instant, Option<String>)> =
            runs.iter().filter(|(t, _)| *t > installed).collect();
        assert!(
            after.len() > 30,
            "round {round}: the writer ran only {} statements after the install",
            after.len()
        );
        let failed: Vec<&String> = after.iter().filter_map(|(_, e)| e.as_ref()).collect();
        assert!(
            failed.is_empty(),
            "round {round}: {} of {} statements started after the install failed, first: {}",
            failed.len(),
            after.len(),
            failed[0]
        );
    }
    Ok(())
}

/// A node start installs capture again: triggers already as wanted are
/// left alone (no window without capture, nothing for applications to
/// re-prepare); a trigger whose table changed is replaced, and capture
/// sees the new column. `trigger_states` (what `syncmesh check` prints)
/// follows: missing, current, stale after the change, current again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinstalling_capture_replaces_only_changed_triggers() -> Result<()> {
    let server = MariaDb::start()?;
    server.create_db("again").await?;
    server.exec("again", ORDERS_MY).await?;
    let pool = server.pool("again").await?;
    let created = || async {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT CAST(TRIGGER_NAME AS CHAR), CAST(CREATED AS CHAR) \
             FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = DATABASE() \
             ORDER BY TRIGGER_NAME",
        )
        .fetch_all(&pool)
        .await?;
        anyhow::Ok(rows)
    };
    let wanted = [("orders".to_owned(), vec!["id".to_owned()])];
    let node = syncmesh_node::mysql::MysqlAdapter::open(&server.url("again")).await?;
    let state = |s: TriggerState| vec![("orders".to_owned(), s)];
    let schemas = node.introspect(&wanted).await?;
    assert_eq!(
        node.trigger_states(&schemas).await?,
        state(TriggerState::Missing)
    );
    node.install_capture(&schemas).await?;
    assert_eq!(
        node.trigger_states(&schemas).await?,
        state(TriggerState::Current)
    );
    let first = created().await?;
    assert_eq!(first.len(), 3, "one trigger per event: {first:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let node = syncmesh_node::mysql::MysqlAdapter::open(&server.url("again")).await?;
    node.install_capture(&node.introspect(&wanted).await?)
        .await?;
    assert_eq!(created().await?, first, "unchanged triggers are kept");
    server
        .exec("again", "ALTER TABLE orders ADD COLUMN note VARCHAR(10)")
        .await?;
    let schemas = node.introspect(&wanted).await?;
    assert_eq!(
        node.trigger_states(&schemas).await?,
        state(TriggerState::Stale),
        "a new column: the triggers are due to be replaced"
    );
    node.install_capture(&schemas).await?;
    assert_eq!(
        node.trigger_states(&schemas).await?,
        state(TriggerState::Current)
    );
    let second = created().await?;
    assert_eq!(second.len(), 3);
    assert!(
        second
            .iter()
            .zip(&first)
            .all(|(s, f)| s.0 == f.0 && s.1 != f.1),
        "every trigger of the changed table is replaced: {first:?} -> {second:?}"
    );
    server
        .exec(
            "again",
            "INSERT INTO orders VALUES (1, 'a', 1, 'x', 'noted')",
        )
        .await?;
    let changes = node.read_changes(0, 10).await?;
    let new = changes
        .first()
        .and_then(|c| c.new.as_ref())
        .context("the insert is captured")?;
    assert_eq!(new.get("note"), Some(&Value::Text("noted".to_owned())));
    Ok(())
}
