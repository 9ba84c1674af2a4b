//! The `sync_conflicts` mirror table (`conflicts.mirror`) end to end: three
//! SQLite nodes write the same rows while partitioned, the hub records the
//! conflicts and copies each record into a real SQLite, PostgreSQL 15 or
//! MariaDB table exactly once, with the content `syncmesh conflicts --json`
//! shows; a restart that copies everything again duplicates nothing, and a
//! mirror database that is unreachable at start is caught up once it is
//! there, without holding sync back.

#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::mysql::MySqlPool;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use syncmesh::conflicts::{fetch, to_json};
use syncmesh::demo::Mesh;
use syncmesh_hub::core::K_MIRROR;
use syncmesh_node::store::{LogStore, SledStore, WriteBatch};
use syncmesh_tests::mariadb::MariaDb;
use syncmesh_tests::pg::PgCluster;
use syncmesh_tests::wait_until;

const LONG: Duration = Duration::from_secs(60);

const DDL: [&str; 1] = ["CREATE TABLE accounts (id INTEGER PRIMARY KEY, note TEXT, status TEXT)"];

/// `tables:` plus the `conflicts:` section with the mirror at `url`.
fn tables(url: &str) -> String {
    format!(
        "tables:\n  - name: accounts\n    resolve:\n      default: last_write_wins\n      fields:\n        status: {{ priority_order: [active, pending, inactive] }}\nconflicts:\n  retention_days: 30\n  mirror:\n    url: \"{url}\"\n"
    )
}

/// One mirror row without its id: detected_at, table_name, row_key, field,
/// strategy, result_value, competing_values.
type Content = (String, String, String, String, String, String, String);

/// The mirror table as (id, content), read with the engine's own client.
enum MirrorDb {
    Sqlite(std::path::PathBuf),
    Postgres(PgPool),
    Mysql(MySqlPool),
}

type Raw = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
);

impl MirrorDb {
    async fn insert_stale(&self) -> Result<()> {
        let sql = "INSERT INTO sync_conflicts (id, detected_at, detected_at_unix_ms, table_name, row_key, field, strategy, result_value, competing_values) VALUES ('0stale', '2100-01-01 00:00:00', 4102444800000, 'accounts', '[]', 'note', 'last_write_wins', 'x', '[]')";
        match self {
            MirrorDb::Sqlite(path) => {
                let pool =
                    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path)).await?;
                sqlx::query(sql).execute(&pool).await?;
                pool.close().await;
            }
            MirrorDb::Postgres(pool) => {
                sqlx::query(sql).execute(pool).await?;
            }
            MirrorDb::Mysql(pool) => {
                sqlx::query(sql).execute(pool).await?;
            }
        }
        Ok(())
    }

    async fn rows(&self) -> Result<Option<Vec<(String, Content)>>> {
        let cols = "table_name, row_key, field, strategy, result_value, competing_values FROM sync_conflicts ORDER BY id";
        let raw: Vec<Raw> = match self {
            MirrorDb::Sqlite(path) => {
                if !path.exists() {
                    return Ok(None);
                }
                let pool =
                    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path)).await?;
                let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, detected_at, {cols}"
                )))
                .fetch_all(&pool)
                .await;
                pool.close().await;
                match r {
                    Ok(r) => r,
                    Err(e) if e.to_string().contains("no such table") => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            MirrorDb::Postgres(pool) => {
                let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, to_char(detected_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), {cols}"
                )))
                .fetch_all(pool)
                .await;
                match r {
                    Ok(r) => r,
                    Err(e) if e.to_string().contains("does not exist") => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
            MirrorDb::Mysql(pool) => {
                let r = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id, CONCAT(DATE_FORMAT(detected_at, '%Y-%m-%dT%H:%i:%s.'), LPAD(FLOOR(MICROSECOND(detected_at) / 1000), 3, '0'), 'Z'), {cols}"
                )))
                .fetch_all(pool)
                .await;
                match r {
                    Ok(r) => r,
                    Err(e) if e.to_string().contains("doesn't exist") => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
        };
        Ok(Some(
            raw.into_iter()
                .map(|(id, at, t, k, f, s, r, c)| (id, (at, t, k, f, s, r, c)))
                .collect(),
        ))
    }
}

/// What the hub's conflicts query (`syncmesh conflicts --json`) shows, as
/// mirror contents, sorted.
async fn expected(hub_url: &str) -> Result<Vec<Content>> {
    let json = to_json(&fetch(hub_url, None, 0).await?);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let mut out: Vec<Content> = json["conflicts"]
        .as_array()
        .context("conflicts array")?
        .iter()
        .map(|c| {
            (
                s(&c["time"]),
                s(&c["table"]),
                c["key"].to_string(),
                s(&c["field"]),
                s(&c["strategy"]),
                s(&c["result"]),
                c["candidates"].to_string(),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Waits until the mirror holds exactly the hub's records, once each;
/// returns the ids.
async fn wait_mirrored(mesh: &Mesh, db: &MirrorDb) -> Result<Vec<String>> {
    let start = std::time::Instant::now();
    loop {
        let want = expected(&mesh.hub_url).await?;
        let last = match db.rows().await? {
            None => "no mirror table yet".to_owned(),
            Some(rows) => {
                let mut got: Vec<Content> = rows.iter().map(|(_, c)| c.clone()).collect();
                got.sort();
                if !want.is_empty() && got == want {
                    return Ok(rows.into_iter().map(|(id, _)| id).collect());
                }
                format!("mirror {got:#?}")
            }
        };
        if start.elapsed() > LONG {
            anyhow::bail!(
                "timed out after {LONG:?} waiting for the mirror table to equal the hub's records:\n{last}\nhub {want:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Row `id` written on every node while all are partitioned: `note` by
/// all three (one record of three candidates, after one of two if the hub
/// merged two first), `status` by two.
async fn make_conflicts(mesh: &Mesh, id: i64) -> Result<()> {
    mesh.exec(
        0,
        &format!("INSERT INTO accounts VALUES ({id}, 'n0', 'pending')"),
    )
    .await?;
    mesh.wait_converged().await?;
    for n in &mesh.nodes {
        n.set_online(false).await;
    }
    let writes = [
        format!("UPDATE accounts SET note = 'from-a', status = 'inactive' WHERE id = {id}"),
        format!("UPDATE accounts SET note = 'from-b', status = 'active' WHERE id = {id}"),
        format!("UPDATE accounts SET note = 'from-c' WHERE id = {id}"),
    ];
    for (i, w) in writes.iter().enumerate() {
        mesh.exec(i, w).await?;
        mesh.wait_captured(i).await?;
    }
    for n in &mesh.nodes {
        n.set_online(true).await;
    }
    mesh.wait_converged().await?;
    Ok(())
}

/// Stops the hub, forgets that the mirror completed its full copy (so the
/// next start copies every record again, as after the mirror was turned
/// off and on) and starts it; `stale` runs on the mirror database while the
/// hub is down.
async fn restart_hub_forgetting_the_copy(
    mesh: &mut Mesh,
    stale: impl Future<Output = Result<()>>,
) -> Result<()> {
    mesh.stop_hub().await?;
    stale.await?;
    let hub_dir = mesh.cfg.hub()?.data_dir.clone();
    {
        let mut store = SledStore::open(&hub_dir)?;
        assert!(store.get(K_MIRROR)?.is_some(), "the full copy completed");
        let mut b = WriteBatch::default();
        b.remove(K_MIRROR.to_vec());
        store.write(b)?;
        store.flush()?;
    }
    mesh.start_hub().await
}

/// The whole story against one mirror database.
async fn mirror_story(dir: &Path, url: &str, db: MirrorDb) -> Result<()> {
    let mut mesh = Mesh::start_with(dir, 500, &DDL, &tables(url)).await?;
    let config = dir.canonicalize()?.join("syncmesh.yaml");
    assert!(
        syncmesh::check::run(&config, None).await?,
        "check reaches the mirror"
    );
    make_conflicts(&mesh, 1).await?;
    let ids = wait_mirrored(&mesh, &db).await?;
    assert_eq!(
        fetch(&mesh.hub_url, None, 0).await?.total as usize,
        ids.len(),
        "one row per record"
    );
    assert!(ids.len() >= 2, "note and status conflicts: {ids:?}");

    // A restart that copies every record again adds nothing, and the
    // ids are stable.
    // A row of a record the hub no longer holds (replaced while the mirror
    // was off): the full copy deletes it.
    restart_hub_forgetting_the_copy(&mut mesh, db.insert_stale()).await?;
    make_conflicts(&mesh, 2).await?;
    let after = wait_mirrored(&mesh, &db).await?;
    assert!(
        ids.iter().all(|id| after.contains(id)),
        "ids are stable: {ids:?} vs {after:?}"
    );
    assert_eq!(
        fetch(&mesh.hub_url, None, 0).await?.total as usize,
        after.len()
    );
    assert_eq!(mesh.hub.as_ref().unwrap().mirror_errors(), 0);
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_mirror_holds_each_record_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().canonicalize()?.join("conflicts.db");
    let url = format!("sqlite://{}", path.display());
    mirror_story(&dir.path().join("mesh"), &url, MirrorDb::Sqlite(path)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_mirror_holds_each_record_once() -> Result<()> {
    let pg = PgCluster::start()?;
    let url = pg.create_db("mirror").await?;
    let dir = tempfile::tempdir()?;
    let pool = pg.pool("mirror").await?;
    mirror_story(dir.path(), &url, MirrorDb::Postgres(pool)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_mirror_holds_each_record_once() -> Result<()> {
    let my = MariaDb::start()?;
    let url = my.create_db("mirror").await?;
    let dir = tempfile::tempdir()?;
    let pool = my.pool("mirror").await?;
    mirror_story(dir.path(), &url, MirrorDb::Mysql(pool)).await
}

/// The mirror's database cannot be opened at start (its directory does
/// not exist): sync goes on, failures are counted, and once the directory
/// is there every record is copied. Later it refuses writes: the records
/// made meanwhile are copied from the hub's queue once it is fixed, and a
/// row past retention is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mirror_never_blocks_sync_and_catches_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let later = dir.path().canonicalize()?.join("later");
    let path = later.join("conflicts.db");
    let url = format!("sqlite://{}", path.display());
    let mesh = Mesh::start_with(&dir.path().join("mesh"), 500, &DDL, &tables(&url)).await?;
    let config = dir.path().canonicalize()?.join("mesh/syncmesh.yaml");
    assert!(
        !syncmesh::check::run(&config, None).await?,
        "check reports the missing directory"
    );
    make_conflicts(&mesh, 1).await?;
    make_conflicts(&mesh, 2).await?;
    assert!(fetch(&mesh.hub_url, None, 0).await?.total >= 4);
    let hub = mesh.hub.as_ref().unwrap();
    wait_until("mirror failures to be counted", LONG, || async {
        Ok(hub.mirror_errors() > 0)
    })
    .await?;
    assert!(!path.exists());
    std::fs::create_dir(&later)?;
    let db = MirrorDb::Sqlite(path.clone());
    let ids = wait_mirrored(&mesh, &db).await?;
    assert_eq!(
        fetch(&mesh.hub_url, None, 0).await?.total as usize,
        ids.len()
    );

    // Later the database refuses the writes (the table lost its columns):
    // new records wait in the hub's queue and are copied once it is fixed
    // (no full copy this time: that one completed).
    let fix = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path)).await?;
    sqlx::raw_sql(
        "ALTER TABLE sync_conflicts RENAME TO saved; CREATE TABLE sync_conflicts (id TEXT PRIMARY KEY)",
    )
    .execute(&fix)
    .await?;
    let failed = hub.mirror_errors();
    make_conflicts(&mesh, 3).await?;
    wait_until("the refused writes to be counted", LONG, || async {
        Ok(hub.mirror_errors() > failed)
    })
    .await?;
    // A row past retention_days (30): deleted once the mirror is back.
    sqlx::raw_sql(
        "INSERT INTO saved VALUES ('old', '1970-01-01T00:00:01.000Z', 1000, 'accounts', '[]', 'note', 'last_write_wins', 'x', '[]')",
    )
    .execute(&fix)
    .await?;
    sqlx::raw_sql("DROP TABLE sync_conflicts; ALTER TABLE saved RENAME TO sync_conflicts")
        .execute(&fix)
        .await?;
    fix.close().await;
    let after = wait_mirrored(&mesh, &db).await?;
    assert!(after.len() > ids.len(), "{ids:?} then {after:?}");
    assert!(!after.contains(&"old".to_owned()), "expired");
    mesh.stop().await
}
