//! Integration tests of the SQLite adapter against real database files.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use syncmesh_node::Error;
use syncmesh_node::adapter::{ChangeKind, RowWrite, TableSchema};
use syncmesh_node::sqlite::SqliteAdapter;
use syncmesh_resolver::Value;

async fn adapter(dir: &Path) -> SqliteAdapter {
    let path = dir.join("db.sqlite");
    SqliteAdapter::open(&format!("sqlite://{}", path.display()), true)
        .await
        .unwrap()
}

/// A separate connection, as another process of the user would have.
async fn user(dir: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(dir.join("db.sqlite"))
                .busy_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap()
}

async fn exec(pool: &SqlitePool, sql: &str) {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(pool)
        .await
        .unwrap();
}

async fn setup(
    dir: &Path,
    ddl: &[&str],
    tables: &[(&str, &[&str])],
) -> (SqliteAdapter, SqlitePool, Vec<TableSchema>) {
    let a = adapter(dir).await;
    let u = user(dir).await;
    for d in ddl {
        exec(&u, d).await;
    }
    let cfg: Vec<(String, Vec<String>)> = tables
        .iter()
        .map(|(t, k)| (t.to_string(), k.iter().map(|s| s.to_string()).collect()))
        .collect();
    let schemas = a.introspect(&cfg).await.unwrap();
    a.install_capture(&schemas).await.unwrap();
    (a, u, schemas)
}

fn row(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn bind_value<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    v: &Value,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    match v {
        Value::Null => q.bind(None::<i64>),
        Value::Int(i) => q.bind(*i),
        Value::Float(x) => q.bind(*x),
        Value::Text(s) => q.bind(s.clone()),
        Value::Bytes(b) => q.bind(b.clone()),
        other => panic!("not a storage class: {other:?}"),
    }
}

/// Every value of the brief's list, as SQLite storage classes.
fn tricky_values() -> Vec<Value> {
    let mut v = vec![
        Value::Null,
        Value::Int(0),
        Value::Int(-1),
        Value::Int(i64::MIN),
        Value::Int(i64::MAX),
        Value::Float(0.1),
        Value::Float(1e300),
        Value::Float(-1e300),
        Value::Float(-0.0),
        Value::Float(0.0),
        Value::Float(f64::MIN_POSITIVE),
        Value::Float(5e-324),
        Value::Float(f64::MAX),
        Value::Float(f64::MIN),
        Value::Float(f64::EPSILON),
        Value::Float(1.0 / 3.0),
        Value::Float(0.30000000000000004),
        Value::Float(123456789.12345679),
        Value::Float(9007199254740993.0),
        Value::Float(2f64.powi(63)),
        Value::Float(-2f64.powi(63)),
        Value::Float(1e22),
        Value::Float(1e23),
        Value::Float(5.0),
        Value::Float(f64::INFINITY),
        Value::Float(f64::NEG_INFINITY),
        Value::Text(String::new()),
        Value::Text("it's \"quoted\" \\ back\\slash".into()),
        Value::Text("unicode: é ü 漢字 🦀 \u{200b} \u{fffd}".into()),
        Value::Text("new\nline\r\ttab \u{1} \u{7f}".into()),
        Value::Text("embedded \0 nul".into()),
        Value::Text("{\"looks\": [\"like json\"]}".into()),
        Value::Text("123".into()),
        Value::Text("1.5".into()),
        Value::Bytes(vec![]),
        Value::Bytes(vec![0]),
        Value::Bytes((0..=255).collect()),
        Value::Bytes(b"text-like blob".to_vec()),
    ];
    // Floats needing 17 significant digits.
    v.push(Value::Float(0.1 + 0.2));
    v.push(Value::Float(f64::from_bits(0x3FF0_0000_0000_0001)));
    v.push(Value::Float(f64::from_bits(0x7FEF_FFFF_FFFF_FFFF)));
    v.push(Value::Float(f64::from_bits(0x000F_FFFF_FFFF_FFFF)));
    v.push(Value::Float(f64::from_bits(0x0000_0000_0000_0001)));
    v
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

#[tokio::test]
async fn captures_insert_update_delete_with_old_and_new() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE orders (id INTEGER PRIMARY KEY, status TEXT NOT NULL, qty INTEGER, price REAL)"],
        &[("orders", &[])],
    )
    .await;
    assert_eq!(schemas[0].key, vec!["id".to_string()]);
    assert_eq!(schemas[0].columns.len(), 4);
    assert_eq!(schemas[0].columns[1].decl_type, "TEXT");
    assert!(schemas[0].columns[1].not_null);

    exec(&u, "INSERT INTO orders VALUES (1, 'new', 2, 9.5)").await;
    exec(
        &u,
        "UPDATE orders SET status = 'paid', qty = qty + 1 WHERE id = 1",
    )
    .await;
    exec(&u, "DELETE FROM orders WHERE id = 1").await;

    let changes = a.read_changes(0, 100).await.unwrap();
    assert_eq!(changes.len(), 3);
    let r1 = row(&[
        ("id", Value::Int(1)),
        ("status", Value::Text("new".into())),
        ("qty", Value::Int(2)),
        ("price", Value::Float(9.5)),
    ]);
    let r2 = row(&[
        ("id", Value::Int(1)),
        ("status", Value::Text("paid".into())),
        ("qty", Value::Int(3)),
        ("price", Value::Float(9.5)),
    ]);
    assert_eq!(changes[0].kind, ChangeKind::Insert);
    assert_eq!(changes[0].table, "orders");
    assert_eq!(changes[0].old, None);
    assert_eq!(changes[0].new.as_ref(), Some(&r1));
    assert_eq!(changes[1].kind, ChangeKind::Update);
    assert_eq!(changes[1].old.as_ref(), Some(&r1));
    assert_eq!(changes[1].new.as_ref(), Some(&r2));
    assert_eq!(changes[2].kind, ChangeKind::Delete);
    assert_eq!(changes[2].old.as_ref(), Some(&r2));
    assert_eq!(changes[2].new, None);
    assert!(changes[0].change_id < changes[1].change_id);
    assert!(changes[1].change_id < changes[2].change_id);

    // Paging by id and limit.
    let page = a.read_changes(changes[0].change_id, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].change_id, changes[1].change_id);
    assert!(a.read_changes(0, 0).await.unwrap().is_empty());
    a.close().await;
}

#[tokio::test]
async fn values_round_trip_exactly_through_capture() {
    let dir = tempfile::tempdir().unwrap();
    // `v` has no declared type: every storage class is kept as-is.
    let (a, u, _) = setup(
        dir.path(),
        &["CREATE TABLE vals (id INTEGER PRIMARY KEY, v, b BLOB)"],
        &[("vals", &[])],
    )
    .await;
    let values = tricky_values();
    for (i, v) in values.iter().enumerate() {
        let q = sqlx::query("INSERT INTO vals (id, v, b) VALUES (?1, ?2, ?3)").bind(i as i64);
        let q = bind_value(q, v);
        bind_value(q, v).execute(&u).await.unwrap();
    }
    // And an update that changes every value into the next one, to check old
    // rows too (including the -0.0 side table for the OLD side).
    exec(&u, "UPDATE vals SET v = v, b = b").await;
    let changes = a.read_changes(0, 10_000).await.unwrap();
    assert_eq!(changes.len(), values.len() * 2);
    for (i, v) in values.iter().enumerate() {
        let new = changes[i].new.as_ref().unwrap();
        assert_eq!(new["id"], Value::Int(i as i64));
        assert!(same(&new["v"], v), "value {v:?} captured as {:?}", new["v"]);
        assert!(same(&new["b"], v), "value {v:?} captured as {:?}", new["b"]);
        let upd = &changes[values.len() + i];
        assert_eq!(upd.kind, ChangeKind::Update);
        let old = upd.old.as_ref().unwrap();
        assert!(
            same(&old["v"], v),
            "old value {v:?} captured as {:?}",
            old["v"]
        );
        assert!(same(&upd.new.as_ref().unwrap()["v"], v));
    }
    // Deleting captures the old rows exactly as well.
    exec(&u, "DELETE FROM vals").await;
    let last = changes.last().unwrap().change_id;
    let deletes = a.read_changes(last, 10_000).await.unwrap();
    assert_eq!(deletes.len(), values.len());
    for d in &deletes {
        let old = d.old.as_ref().unwrap();
        let Value::Int(i) = old["id"] else { panic!() };
        assert!(
            same(&old["v"], &values[i as usize]),
            "deleted {:?}",
            old["v"]
        );
    }
}

#[tokio::test]
async fn values_round_trip_exactly_through_apply_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE vals (id INTEGER PRIMARY KEY, v)"],
        &[("vals", &[])],
    )
    .await;
    let values = tricky_values();
    let writes: Vec<RowWrite> = values
        .iter()
        .enumerate()
        .map(|(i, v)| RowWrite {
            table: "vals".into(),
            key: vec![Value::Int(i as i64)],
            row: Some(row(&[("v", v.clone())])),
        })
        .collect();
    a.apply(&schemas, &writes).await.unwrap();
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(dump.len(), values.len());
    for (i, v) in values.iter().enumerate() {
        assert_eq!(dump[i]["id"], Value::Int(i as i64));
        assert!(
            same(&dump[i]["v"], v),
            "value {v:?} dumped as {:?}",
            dump[i]["v"]
        );
    }
    // Not captured.
    assert_eq!(a.pending_changes().await.unwrap(), 0);
}

#[tokio::test]
async fn logical_values_are_written_with_the_documented_mapping() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE t (id TEXT PRIMARY KEY, v)"],
        &[("t", &[])],
    )
    .await;
    let cases = [
        (Value::Bool(true), Value::Int(1)),
        (Value::Bool(false), Value::Int(0)),
        (Value::Decimal("12.50".into()), Value::Text("12.50".into())),
        (
            Value::Json("{\"a\":1}".into()),
            Value::Text("{\"a\":1}".into()),
        ),
        (
            Value::Timestamp(1_700_000_000_123_456),
            Value::Int(1_700_000_000_123_456),
        ),
    ];
    let writes: Vec<RowWrite> = cases
        .iter()
        .enumerate()
        .map(|(i, (v, _))| RowWrite {
            table: "t".into(),
            key: vec![Value::Text(format!("k{i}"))],
            row: Some(row(&[("v", v.clone())])),
        })
        .collect();
    a.apply(&schemas, &writes).await.unwrap();
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    for (i, (_, expected)) in cases.iter().enumerate() {
        assert_eq!(dump[i]["id"], Value::Text(format!("k{i}")));
        assert_eq!(&dump[i]["v"], expected);
    }
}

#[tokio::test]
async fn real_columns_store_negative_zero_as_zero() {
    // Documents SQLite's behaviour: a REAL equal to an integer is stored as
    // that integer in REAL/INTEGER/NUMERIC columns, so -0.0 comes back 0.0.
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, r REAL, n NUMERIC, x)"],
        &[("t", &[])],
    )
    .await;
    sqlx::query("INSERT INTO t VALUES (1, ?1, ?1, ?1)")
        .bind(-0.0f64)
        .execute(&u)
        .await
        .unwrap();
    let new = a.read_changes(0, 10).await.unwrap()[0].new.clone().unwrap();
    assert!(same(&new["r"], &Value::Float(0.0)), "{:?}", new["r"]);
    assert_eq!(new["n"], Value::Int(0));
    assert!(same(&new["x"], &Value::Float(-0.0)), "{:?}", new["x"]);
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert!(same(&dump[0]["r"], &Value::Float(0.0)));
    assert!(same(&dump[0]["x"], &Value::Float(-0.0)));
}

/// A small deterministic generator (splitmix64) for float bit patterns.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_doubles(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let bits = splitmix(&mut s);
        let x = match out.len() % 3 {
            // Any bit pattern.
            0 => f64::from_bits(bits),
            // "Ordinary" magnitudes.
            1 => f64::from_bits(bits) % 1e6,
            // Short decimals, as users type them.
            _ => (bits % 1_000_000) as f64 / 1000.0,
        };
        if x.is_finite() {
            out.push(x);
        }
    }
    out
}

#[tokio::test]
async fn random_reals_round_trip_through_capture() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, _) = setup(
        dir.path(),
        &["CREATE TABLE f (id INTEGER PRIMARY KEY, x REAL, y)"],
        &[("f", &[])],
    )
    .await;
    let xs = random_doubles(30_000, 7);
    let mut tx = u.begin().await.unwrap();
    for (i, x) in xs.iter().enumerate() {
        sqlx::query("INSERT INTO f VALUES (?1, ?2, ?2)")
            .bind(i as i64)
            .bind(*x)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let changes = a.read_changes(0, 100_000).await.unwrap();
    assert_eq!(changes.len(), xs.len());
    for (c, x) in changes.iter().zip(&xs) {
        let new = c.new.as_ref().unwrap();
        // REAL affinity: integral values are still REAL when read.
        let expected = if *x == 0.0 { 0.0 } else { *x };
        assert!(
            same(&new["x"], &Value::Float(expected)),
            "{x:e} -> {:?}",
            new["x"]
        );
        assert!(
            same(&new["y"], &Value::Float(*x)),
            "{x:e} -> {:?}",
            new["y"]
        );
    }
}

#[tokio::test]
async fn apply_is_not_captured_but_concurrent_user_writes_are() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &[
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
            "CREATE TABLE u (id INTEGER PRIMARY KEY, v TEXT)",
        ],
        &[("t", &[]), ("u", &[])],
    )
    .await;
    // Writes, upserts of existing rows and deletes: none captured.
    let writes = |n: i64, tag: &str| -> Vec<RowWrite> {
        (0..n)
            .map(|i| RowWrite {
                table: "t".into(),
                key: vec![Value::Int(i)],
                row: Some(row(&[("v", Value::Text(format!("{tag}{i}")))])),
            })
            .collect()
    };
    a.apply(&schemas, &writes(10, "a")).await.unwrap();
    a.apply(&schemas, &writes(10, "b")).await.unwrap();
    a.apply(
        &schemas,
        &[RowWrite {
            table: "t".into(),
            key: vec![Value::Int(3)],
            row: None,
        }],
    )
    .await
    .unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 0);
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(dump.len(), 9);
    assert_eq!(dump[0]["v"], Value::Text("b0".into()));

    // A big apply racing user writes on another connection.
    let big = writes(20_000, "c");
    let applier = {
        let a = a.clone();
        let schemas = schemas.clone();
        tokio::spawn(async move { a.apply(&schemas, &big).await })
    };
    let mut user_writes = 0i64;
    while !applier.is_finished() || user_writes < 20 {
        sqlx::query("INSERT INTO u (id, v) VALUES (?1, 'user')")
            .bind(user_writes)
            .execute(&u)
            .await
            .unwrap();
        user_writes += 1;
    }
    applier.await.unwrap().unwrap();
    // And a user write to a row the apply wrote, after it.
    exec(&u, "UPDATE t SET v = 'mine' WHERE id = 5").await;

    let changes = a.read_changes(0, 1_000_000).await.unwrap();
    let on_u = changes.iter().filter(|c| c.table == "u").count() as i64;
    let on_t: Vec<_> = changes.iter().filter(|c| c.table == "t").collect();
    assert_eq!(on_u, user_writes);
    assert_eq!(on_t.len(), 1, "apply writes were captured");
    assert_eq!(
        on_t[0].new.as_ref().unwrap()["v"],
        Value::Text("mine".into())
    );
    assert_eq!(on_t[0].old.as_ref().unwrap()["v"], Value::Text("c5".into()));
    // The flag is never left behind.
    let flags: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _syncmesh_applying")
        .fetch_one(&u)
        .await
        .unwrap();
    assert_eq!(flags, 0);
}

#[tokio::test]
async fn apply_waits_for_a_user_transaction_and_both_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"],
        &[("t", &[])],
    )
    .await;
    let mut tx = u.begin().await.unwrap();
    sqlx::query("INSERT INTO t VALUES (1, 'user')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let applier = {
        let a = a.clone();
        let schemas = schemas.clone();
        tokio::spawn(async move {
            a.apply(
                &schemas,
                &[RowWrite {
                    table: "t".into(),
                    key: vec![Value::Int(2)],
                    row: Some(row(&[("v", Value::Text("remote".into()))])),
                }],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !applier.is_finished(),
        "apply did not wait for the write lock"
    );
    tx.commit().await.unwrap();
    applier.await.unwrap().unwrap();
    let changes = a.read_changes(0, 100).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        changes[0].new.as_ref().unwrap()["v"],
        Value::Text("user".into())
    );
    assert_eq!(a.dump_table(&schemas[0]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn failed_apply_rolls_back_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"],
        &[("t", &[])],
    )
    .await;
    let good = RowWrite {
        table: "t".into(),
        key: vec![Value::Int(1)],
        row: Some(row(&[("v", Value::Text("x".into()))])),
    };
    // NOT NULL violation (the column is absent → NULL).
    let bad = RowWrite {
        table: "t".into(),
        key: vec![Value::Int(2)],
        row: Some(BTreeMap::new()),
    };
    let err = a.apply(&schemas, &[good.clone(), bad]).await.unwrap_err();
    assert!(matches!(err, Error::Database { .. }), "{err}");
    assert!(err.to_string().contains("NOT NULL"), "{err}");
    assert!(a.dump_table(&schemas[0]).await.unwrap().is_empty());
    // Capture still works afterwards (no flag left behind) and apply too.
    exec(&u, "INSERT INTO t VALUES (9, 'user')").await;
    assert_eq!(a.pending_changes().await.unwrap(), 1);
    a.apply(&schemas, &[good]).await.unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 1);

    // Unknown table / column / wrong key length: Schema errors, nothing written.
    let unknown_table = RowWrite {
        table: "nope".into(),
        key: vec![Value::Int(1)],
        row: None,
    };
    let err = a.apply(&schemas, &[unknown_table]).await.unwrap_err();
    assert!(
        matches!(err, Error::Schema { ref table, .. } if table == "nope"),
        "{err}"
    );
    let unknown_col = RowWrite {
        table: "t".into(),
        key: vec![Value::Int(5)],
        row: Some(row(&[
            ("v", Value::Text("x".into())),
            ("zzz", Value::Int(1)),
        ])),
    };
    let err = a.apply(&schemas, &[unknown_col]).await.unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("zzz"), "{err}");
    let short_key = RowWrite {
        table: "t".into(),
        key: vec![],
        row: None,
    };
    assert!(matches!(
        a.apply(&schemas, &[short_key]).await.unwrap_err(),
        Error::Schema { .. }
    ));
    assert_eq!(a.dump_table(&schemas[0]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn install_capture_is_idempotent_and_follows_schema_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"],
        &[("t", &[])],
    )
    .await;
    a.install_capture(&schemas).await.unwrap();
    a.install_capture(&schemas).await.unwrap();
    let triggers: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'trigger' ORDER BY name")
            .fetch_all(&u)
            .await
            .unwrap();
    assert_eq!(
        triggers,
        vec!["_syncmesh_del_t", "_syncmesh_ins_t", "_syncmesh_upd_t"]
    );
    exec(&u, "INSERT INTO t VALUES (1, 'a')").await;
    assert_eq!(a.pending_changes().await.unwrap(), 1);

    // A column added later is captured after a new introspect + install.
    exec(&u, "ALTER TABLE t ADD COLUMN extra INTEGER").await;
    let schemas = a.introspect(&[("t".to_string(), vec![])]).await.unwrap();
    a.install_capture(&schemas).await.unwrap();
    exec(&u, "UPDATE t SET extra = 7 WHERE id = 1").await;
    let changes = a.read_changes(0, 10).await.unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[1].new.as_ref().unwrap()["extra"], Value::Int(7));
    assert_eq!(changes[1].old.as_ref().unwrap()["extra"], Value::Null);

    // Tables no longer given stop being captured.
    a.install_capture(&[]).await.unwrap();
    exec(&u, "INSERT INTO t VALUES (2, 'b', 0)").await;
    assert_eq!(a.pending_changes().await.unwrap(), 2);
    let triggers: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_schema WHERE type = 'trigger'")
            .fetch_one(&u)
            .await
            .unwrap();
    assert_eq!(triggers, 0);
    // The change table survives reinstalling.
    a.install_capture(&schemas).await.unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 2);
}

#[tokio::test]
async fn delete_changes_through_removes_only_consumed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, _) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, v)"],
        &[("t", &[])],
    )
    .await;
    for i in 0..5 {
        sqlx::query("INSERT INTO t VALUES (?1, ?2)")
            .bind(i)
            .bind(-0.0f64)
            .execute(&u)
            .await
            .unwrap();
    }
    let changes = a.read_changes(0, 100).await.unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 5);
    a.delete_changes_through(changes[2].change_id)
        .await
        .unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 2);
    let rest = a.read_changes(0, 100).await.unwrap();
    assert_eq!(rest, changes[3..].to_vec());
    let zeros: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _syncmesh_reals")
        .fetch_one(&u)
        .await
        .unwrap();
    assert_eq!(zeros, 2);
    // Ids are never reused after deletion.
    a.delete_changes_through(i64::MAX).await.unwrap();
    assert_eq!(a.pending_changes().await.unwrap(), 0);
    exec(&u, "INSERT INTO t VALUES (100, 1)").await;
    let next = a.read_changes(0, 100).await.unwrap();
    assert!(next[0].change_id > changes[4].change_id);
}

#[tokio::test]
async fn composite_keys_capture_apply_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &[
            "CREATE TABLE lines (qty INTEGER, order_id TEXT, line INTEGER, note TEXT, \
           PRIMARY KEY (order_id, line)) WITHOUT ROWID",
        ],
        &[("lines", &[])],
    )
    .await;
    // Key in primary-key order, not column order.
    assert_eq!(
        schemas[0].key,
        vec!["order_id".to_string(), "line".to_string()]
    );
    exec(&u, "INSERT INTO lines VALUES (1, 'o1', 1, 'a')").await;
    let c = a.read_changes(0, 10).await.unwrap();
    assert_eq!(
        schemas[0].key_of(c[0].new.as_ref().unwrap()),
        Some(vec![Value::Text("o1".into()), Value::Int(1)])
    );
    let key = |o: &str, l: i64| vec![Value::Text(o.into()), Value::Int(l)];
    a.apply(
        &schemas,
        &[
            RowWrite {
                table: "lines".into(),
                key: key("o1", 1),
                row: Some(row(&[("qty", Value::Int(5))])),
            },
            RowWrite {
                table: "lines".into(),
                key: key("o1", 2),
                row: Some(row(&[
                    ("qty", Value::Int(2)),
                    ("note", Value::Text("b".into())),
                ])),
            },
            RowWrite {
                table: "lines".into(),
                key: key("o2", 1),
                row: Some(row(&[("qty", Value::Int(3))])),
            },
        ],
    )
    .await
    .unwrap();
    a.apply(
        &schemas,
        &[RowWrite {
            table: "lines".into(),
            key: key("o2", 1),
            row: None,
        }],
    )
    .await
    .unwrap();
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(
        dump,
        vec![
            row(&[
                ("qty", Value::Int(5)),
                ("order_id", Value::Text("o1".into())),
                ("line", Value::Int(1)),
                ("note", Value::Null),
            ]),
            row(&[
                ("qty", Value::Int(2)),
                ("order_id", Value::Text("o1".into())),
                ("line", Value::Int(2)),
                ("note", Value::Text("b".into())),
            ]),
        ]
    );
    assert_eq!(a.pending_changes().await.unwrap(), 1);
}

#[tokio::test]
async fn introspect_reports_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let a = adapter(dir.path()).await;
    let u = user(dir.path()).await;
    let cfg =
        |t: &str, k: &[&str]| vec![(t.to_string(), k.iter().map(|s| s.to_string()).collect())];

    let err = a.introspect(&cfg("orders", &[])).await.unwrap_err();
    assert!(matches!(err, Error::Schema { .. }));
    assert!(err.to_string().contains("no tables"), "{err}");

    exec(&u, "CREATE TABLE alpha (id INTEGER PRIMARY KEY)").await;
    exec(&u, "CREATE TABLE beta (a TEXT, b TEXT)").await;
    exec(&u, "CREATE UNIQUE INDEX beta_b ON beta (b)").await;
    exec(&u, "CREATE VIEW gamma AS SELECT * FROM alpha").await;

    let err = a.introspect(&cfg("orders", &[])).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("orders") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(msg.contains("alpha, beta"), "{msg}");
    assert!(!msg.contains('\n'));

    let msg = a
        .introspect(&cfg("beta", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no primary key") && msg.contains("key:"),
        "{msg}"
    );

    let msg = a
        .introspect(&cfg("beta", &["c"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("key column `c` does not exist") && msg.contains("a, b"),
        "{msg}"
    );

    let msg = a
        .introspect(&cfg("beta", &["a"]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("UNIQUE"), "{msg}");

    let ok = a.introspect(&cfg("beta", &["b"])).await.unwrap();
    assert_eq!(ok[0].key, vec!["b".to_string()]);

    let msg = a
        .introspect(&cfg("gamma", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("view"), "{msg}");

    let msg = a
        .introspect(&cfg("_syncmesh_changes", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("reserved"), "{msg}");

    let msg = a
        .introspect(&cfg("bad\nname", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(msg.contains("control characters"), "{msg}");

    // Table names are case-insensitive in SQLite; the configured name is kept.
    let ok = a.introspect(&cfg("ALPHA", &[])).await.unwrap();
    assert_eq!(ok[0].name, "ALPHA");
    assert_eq!(ok[0].key, vec!["id".to_string()]);

    // A configured key on a table without a PRIMARY KEY works through apply.
    a.install_capture(&a.introspect(&cfg("beta", &["b"])).await.unwrap())
        .await
        .unwrap();
    let schemas = a.introspect(&cfg("beta", &["b"])).await.unwrap();
    for v in ["one", "two"] {
        a.apply(
            &schemas,
            &[RowWrite {
                table: "beta".into(),
                key: vec![Value::Text("k".into())],
                row: Some(row(&[("a", Value::Text(v.into()))])),
            }],
        )
        .await
        .unwrap();
    }
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(
        dump,
        vec![row(&[
            ("a", Value::Text("two".into())),
            ("b", Value::Text("k".into()))
        ])]
    );
}

#[tokio::test]
async fn odd_identifiers_and_wide_tables_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut wide = String::from("CREATE TABLE wide (id INTEGER PRIMARY KEY");
    for i in 0..600 {
        wide.push_str(&format!(", c{i} INTEGER"));
    }
    wide.push(')');
    let (a, u, schemas) = setup(
        dir.path(),
        &[
            "CREATE TABLE \"we\"\"ird 'tbl'\" (\"i\"\"d\" TEXT PRIMARY KEY, \"v'al ue\" TEXT, \"ünï\" BLOB)",
            &wide,
        ],
        &[("we\"ird 'tbl'", &[]), ("wide", &[])],
    )
    .await;
    exec(
        &u,
        "INSERT INTO \"we\"\"ird 'tbl'\" VALUES ('k''1', 'x\"y', x'00')",
    )
    .await;
    exec(&u, "INSERT INTO wide (id, c0, c599) VALUES (1, 10, 599)").await;
    let changes = a.read_changes(0, 10).await.unwrap();
    assert_eq!(changes[0].table, "we\"ird 'tbl'");
    let new = changes[0].new.as_ref().unwrap();
    assert_eq!(new["i\"d"], Value::Text("k'1".into()));
    assert_eq!(new["v'al ue"], Value::Text("x\"y".into()));
    assert_eq!(new["ünï"], Value::Bytes(vec![0]));
    let wide_row = changes[1].new.as_ref().unwrap();
    assert_eq!(wide_row.len(), 601);
    assert_eq!(wide_row["c599"], Value::Int(599));
    assert_eq!(wide_row["c300"], Value::Null);

    a.apply(
        &schemas,
        &[RowWrite {
            table: "we\"ird 'tbl'".into(),
            key: vec![Value::Text("k'1".into())],
            row: Some(row(&[("v'al ue", Value::Text("applied".into()))])),
        }],
    )
    .await
    .unwrap();
    let dump = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(dump[0]["v'al ue"], Value::Text("applied".into()));
    assert_eq!(dump[0]["ünï"], Value::Null);
    assert_eq!(a.pending_changes().await.unwrap(), 2);
}

#[tokio::test]
async fn open_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("nope").join("db.sqlite");
    let err = SqliteAdapter::open(missing_dir.to_str().unwrap(), true)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Database { .. }));
    assert!(
        msg.contains("does not exist") && msg.contains("nope"),
        "{msg}"
    );

    let missing_file = dir.path().join("absent.sqlite");
    let msg = SqliteAdapter::open(missing_file.to_str().unwrap(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("absent.sqlite") && msg.contains("does not exist"),
        "{msg}"
    );

    let not_db = dir.path().join("text.sqlite");
    std::fs::write(
        &not_db,
        "this is not a database, just some text that is long enough",
    )
    .unwrap();
    let res = SqliteAdapter::open(not_db.to_str().unwrap(), false).await;
    let msg = match res {
        Err(e) => e.to_string(),
        // Some SQLite versions only notice on first read.
        Ok(a) => a
            .introspect(&[("t".into(), vec![])])
            .await
            .unwrap_err()
            .to_string(),
    };
    assert!(
        msg.contains("text.sqlite") || msg.contains("not a database"),
        "{msg}"
    );

    // Plain paths and sqlite: URLs both work.
    let plain = dir.path().join("plain.sqlite");
    let a = SqliteAdapter::open(plain.to_str().unwrap(), true)
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(a.pool())
        .await
        .unwrap();
    assert_eq!(fk, 1);
    a.close().await;
    SqliteAdapter::open(&format!("sqlite:{}", plain.display()), false)
        .await
        .unwrap();
}

#[tokio::test]
async fn apply_defers_foreign_keys_to_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _u, schemas) = setup(
        dir.path(),
        &[
            "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL REFERENCES parent(id))",
        ],
        &[("parent", &[]), ("child", &[])],
    )
    .await;
    // Child before parent in one apply: fine.
    a.apply(
        &schemas,
        &[
            RowWrite {
                table: "child".into(),
                key: vec![Value::Int(1)],
                row: Some(row(&[("parent_id", Value::Int(7))])),
            },
            RowWrite {
                table: "parent".into(),
                key: vec![Value::Int(7)],
                row: Some(BTreeMap::new()),
            },
        ],
    )
    .await
    .unwrap();
    // A dangling child is refused at commit and nothing is written.
    let err = a
        .apply(
            &schemas,
            &[RowWrite {
                table: "child".into(),
                key: vec![Value::Int(2)],
                row: Some(row(&[("parent_id", Value::Int(99))])),
            }],
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("FOREIGN KEY"), "{err}");
    assert_eq!(a.dump_table(&schemas[1]).await.unwrap().len(), 1);
    // And the adapter still works (the failed COMMIT was rolled back).
    a.apply(
        &schemas,
        &[RowWrite {
            table: "child".into(),
            key: vec![Value::Int(3)],
            row: Some(row(&[("parent_id", Value::Int(7))])),
        }],
    )
    .await
    .unwrap();
    assert_eq!(a.dump_table(&schemas[1]).await.unwrap().len(), 2);
    assert_eq!(a.pending_changes().await.unwrap(), 0);
}

#[tokio::test]
async fn replace_on_the_key_is_captured_as_an_insert_of_an_existing_key() {
    // Documents SQLite: REPLACE's implicit delete fires no delete trigger
    // (recursive_triggers is off by default on the user's connection).
    let dir = tempfile::tempdir().unwrap();
    let (a, u, _) = setup(
        dir.path(),
        &["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"],
        &[("t", &[])],
    )
    .await;
    exec(&u, "INSERT INTO t VALUES (1, 'a')").await;
    exec(&u, "INSERT OR REPLACE INTO t VALUES (1, 'b')").await;
    exec(
        &u,
        "INSERT INTO t VALUES (1, 'c') ON CONFLICT (id) DO UPDATE SET v = excluded.v",
    )
    .await;
    let changes = a.read_changes(0, 10).await.unwrap();
    let kinds: Vec<ChangeKind> = changes.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        vec![ChangeKind::Insert, ChangeKind::Insert, ChangeKind::Update]
    );
    assert_eq!(changes[1].old, None);
    assert_eq!(
        changes[1].new.as_ref().unwrap()["v"],
        Value::Text("b".into())
    );
    assert_eq!(
        changes[2].old.as_ref().unwrap()["v"],
        Value::Text("b".into())
    );
}

#[tokio::test]
async fn apply_returns_the_change_watermark_and_works_without_capture() {
    let dir = tempfile::tempdir().unwrap();
    let a = adapter(dir.path()).await;
    let u = user(dir.path()).await;
    exec(&u, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)").await;
    let schemas = a.introspect(&[("t".into(), vec![])]).await.unwrap();
    let w = |id: i64| RowWrite {
        table: "t".into(),
        key: vec![Value::Int(id)],
        row: Some(row(&[("v", Value::Text("r".into()))])),
    };
    // A replica that never installed capture can still apply.
    assert_eq!(a.change_watermark().await.unwrap(), 0);
    assert_eq!(a.apply(&schemas, &[w(1)]).await.unwrap(), 0);

    a.install_capture(&schemas).await.unwrap();
    exec(&u, "INSERT INTO t VALUES (2, 'x')").await;
    exec(&u, "INSERT INTO t VALUES (3, 'x')").await;
    let ids: Vec<i64> = a
        .read_changes(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.change_id)
        .collect();
    assert_eq!(a.apply(&schemas, &[w(4)]).await.unwrap(), ids[1]);
    // Deleting consumed rows does not lower it.
    a.delete_changes_through(ids[1]).await.unwrap();
    assert_eq!(a.change_watermark().await.unwrap(), ids[1]);
    assert_eq!(a.apply(&schemas, &[]).await.unwrap(), ids[1]);
    exec(&u, "UPDATE t SET v = 'y' WHERE id = 4").await;
    let next = a.read_changes(ids[1], 10).await.unwrap();
    assert!(next[0].change_id > ids[1]);
    assert_eq!(a.change_watermark().await.unwrap(), next[0].change_id);
}

/// Many upserts across two tables, interleaved with deletes, go out as
/// multi-row statements in order: the result is exactly the writes applied
/// one by one, and none of them is captured.
#[tokio::test]
async fn large_mixed_apply_is_chunked_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, u, schemas) = setup(
        dir.path(),
        &[
            "CREATE TABLE t1 (id INTEGER PRIMARY KEY, v TEXT)",
            "CREATE TABLE t2 (a INTEGER, b TEXT, w REAL, PRIMARY KEY (a, b))",
            "INSERT INTO t1 VALUES (5, 'old'), (7, 'gone')",
        ],
        &[("t1", &[]), ("t2", &[])],
    )
    .await;
    exec(&u, "DELETE FROM _syncmesh_changes").await;
    let mut writes = Vec::new();
    for i in 0..450i64 {
        writes.push(RowWrite {
            table: "t1".into(),
            key: vec![Value::Int(i)],
            row: Some(row(&[
                ("id", Value::Int(i)),
                ("v", Value::Text(format!("v{i}"))),
            ])),
        });
        if i % 3 == 0 {
            writes.push(RowWrite {
                table: "t2".into(),
                key: vec![Value::Int(i), Value::Text("k".into())],
                row: Some(row(&[("w", Value::Float(i as f64 / 4.0))])),
            });
        }
        if i == 100 {
            writes.push(RowWrite {
                table: "t1".into(),
                key: vec![Value::Int(7)],
                row: None,
            });
        }
    }
    // Row 7 is upserted (i = 7) before it is deleted (at i = 100): the
    // delete must come out after the chunk holding the upsert.
    a.apply(&schemas, &writes).await.unwrap();
    let t1 = a.dump_table(&schemas[0]).await.unwrap();
    assert_eq!(
        t1.len(),
        449,
        "450 upserted, row 7 deleted after its upsert"
    );
    assert!(t1.iter().all(|r| r["id"] != Value::Int(7)));
    assert_eq!(
        t1[5]["v"],
        Value::Text("v5".into()),
        "upsert replaced the old row"
    );
    let t2 = a.dump_table(&schemas[1]).await.unwrap();
    assert_eq!(t2.len(), 150);
    assert_eq!(t2[2]["w"], Value::Float(1.5));
    assert_eq!(t2[2]["b"], Value::Text("k".into()));
    assert_eq!(
        a.pending_changes().await.unwrap(),
        0,
        "applies are not captured"
    );
}
