//! `syncmesh check`: validate a config, reach every database and the hub,
//! and report what will be captured.

use std::path::Path;

use anyhow::Result;
use syncmesh_node::config::{Config, DatabaseKind, Mode, NodeConfig};
use syncmesh_node::mongodb::MongoAdapter;
use syncmesh_node::mysql::MysqlAdapter;
use syncmesh_node::postgres::{PostgresAdapter, RETAINED_WAL_WARN_BYTES};
use syncmesh_node::sqlite::SqliteAdapter;

use crate::mesh;

/// Prints one line per check; true when all passed.
pub async fn run(path: &Path, only: Option<&str>) -> Result<bool> {
    let cfg = Config::load(path)?;
    println!(
        "config {}: ok ({} nodes, {} tables)",
        cfg.source,
        cfg.nodes.len(),
        cfg.tables.len()
    );
    let mut ok = true;
    let nodes: Vec<_> = match only {
        Some(n) => vec![cfg.node(n)?],
        None => cfg.nodes.iter().collect(),
    };
    for n in nodes {
        let db = n.database.url.redacted();
        if n.database.kind == DatabaseKind::Postgresql {
            ok &= check_postgres(&cfg, n).await;
        } else if n.database.kind == DatabaseKind::Mysql {
            ok &= check_mysql(&cfg, n).await;
        } else if n.database.kind == DatabaseKind::Mongodb {
            ok &= check_mongo(&cfg, n).await;
        } else if n.database.kind != DatabaseKind::Sqlite {
            println!(
                "FAIL node {}: database type {:?} ({db}) is not supported by this version yet; use type: sqlite, postgresql, mysql or mongodb",
                n.name, n.database.kind
            );
            ok = false;
            continue;
        } else {
            match SqliteAdapter::open(n.database.url.expose(), false).await {
                Err(e) => {
                    println!("FAIL node {}: {e}", n.name);
                    ok = false;
                }
                Ok(adapter) => {
                    let wanted: Vec<_> = cfg
                        .tables
                        .iter()
                        .map(|t| (t.name.clone(), t.key.clone()))
                        .collect();
                    match adapter.introspect(&wanted).await {
                        Err(e) => {
                            println!("FAIL node {}: {e}", n.name);
                            ok = false;
                        }
                        Ok(schemas) => {
                            for s in schemas {
                                let how = match n.mode {
                                    Mode::Subscribe => "not captured (subscribe mode), applied",
                                    Mode::Publish => {
                                        "captured by triggers, not applied (publish mode)"
                                    }
                                    Mode::Bidirectional => "captured by triggers and applied",
                                };
                                println!(
                                    "ok   node {}: {db} table {} key [{}], {} columns: {how}",
                                    n.name,
                                    s.name,
                                    s.key.join(", "),
                                    s.columns.len()
                                );
                            }
                        }
                    }
                    adapter.close().await;
                }
            }
        }
        match mesh::hub_status_at(&mesh::HubTarget::of_node(n)).await {
            Ok(s) => println!(
                "ok   node {}: hub {} reachable (hub {}, {} ops held)",
                n.name, n.hub, s.hub, s.total_ops
            ),
            Err(e) => {
                println!("FAIL node {}: {e:#}", n.name);
                ok = false;
            }
        }
    }
    if let Some(m) = cfg.conflicts.mirror.as_ref().filter(|_| only.is_none()) {
        match syncmesh_hub::mirror::probe(m).await {
            Ok(line) => println!("ok   conflict mirror: {line}"),
            Err(e) => {
                println!("FAIL conflict mirror: {e}");
                ok = false;
            }
        }
    }
    if !ok {
        println!("check failed: fix the lines marked FAIL and run `syncmesh check` again");
    }
    Ok(ok)
}

/// The PostgreSQL checks of one node: connection, wal_level, privileges,
/// tables and their REPLICA IDENTITY, the slot (in use? retained WAL) and
/// orphan syncmesh slots. Prints one line each; true when all passed.
async fn check_postgres(cfg: &Config, n: &NodeConfig) -> bool {
    let db = n.database.url.redacted();
    let fail = |m: String| {
        println!("FAIL node {}: {m}", n.name);
        false
    };
    let mut adapter = match PostgresAdapter::open(
        n.database.url.expose(),
        n.database.slot.as_deref(),
        n.database.publication.as_deref(),
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let mut ok = true;
    if n.mode.captures() {
        match adapter.check_wal_level().await {
            Ok(()) => println!("ok   node {}: {db} wal_level = logical", n.name),
            Err(e) => ok = fail(e.to_string()),
        }
    }
    let privileges: Result<(bool, bool), _> = sqlx::query_as(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(adapter.pool())
    .await;
    match privileges {
        Ok((sup, repl)) if sup || repl => println!(
            "ok   node {}: {db} user may decode the WAL ({})",
            n.name,
            if sup { "superuser" } else { "REPLICATION" }
        ),
        Ok(_) => {
            ok = fail(format!(
                "{db}: the user has neither REPLICATION nor superuser; run `ALTER ROLE <user> REPLICATION` and grant EXECUTE on the pg_replication_origin_* functions"
            ))
        }
        Err(e) => ok = fail(format!("{db}: reading the user's privileges: {e}")),
    }
    if n.mode.captures() && n.database.capture == syncmesh_node::config::PgCapture::Peek {
        println!(
            "ok   node {}: {db} capture reads the slot with pg_logical_slot_peek_binary_changes (capture: peek)",
            n.name
        );
    } else if n.mode.captures() {
        match adapter.probe_streaming().await {
            Ok(()) => println!(
                "ok   node {}: {db} capture streams the slot over a replication connection",
                n.name
            ),
            Err(why) => println!(
                "warn node {}: {db} capture cannot stream ({why}); it reads the slot with pg_logical_slot_peek_binary_changes, which is slower under load: allow replication connections in pg_hba.conf (`host replication USER ADDRESS scram-sha-256`)",
                n.name
            ),
        }
    }
    let wanted: Vec<_> = cfg
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    match adapter.introspect(&wanted).await {
        Err(e) => ok = fail(e.to_string()),
        Ok(schemas) => {
            let not_full = adapter
                .tables_without_full_identity(&schemas)
                .await
                .unwrap_or_default();
            for s in &schemas {
                let how = match n.mode {
                    Mode::Subscribe => "not captured (subscribe mode), applied".to_owned(),
                    m => {
                        let ident = if not_full.contains(&s.name) {
                            "REPLICA IDENTITY will be set to FULL at node start"
                        } else {
                            "REPLICA IDENTITY FULL"
                        };
                        let apply = if m == Mode::Publish {
                            "not applied (publish mode)"
                        } else {
                            "applied"
                        };
                        format!("captured by logical decoding ({ident}), {apply}")
                    }
                };
                println!(
                    "ok   node {}: {db} table {} key [{}], {} columns: {how}",
                    n.name,
                    s.name,
                    s.key.join(", "),
                    s.columns.len()
                );
            }
        }
    }
    if n.mode.captures() {
        match adapter.slot_holder().await {
            Err(e) => ok = fail(e.to_string()),
            Ok(None) => println!(
                "ok   node {}: {db} slot {} does not exist yet; the node creates it",
                n.name,
                adapter.slot()
            ),
            Ok(Some(Some(pid)))
                if adapter
                    .backend_application(pid)
                    .await
                    .ok()
                    .flatten()
                    .as_deref()
                    == Some("syncmesh") =>
            {
                let retained = adapter.retained_wal_bytes().await.unwrap_or(0);
                println!(
                    "ok   node {}: {db} slot {} is streamed by a running syncmesh node (walsender PID {pid}), retains {} KiB of WAL",
                    n.name,
                    adapter.slot(),
                    retained >> 10
                );
            }
            Ok(Some(Some(pid))) => {
                ok = fail(format!(
                    "{db}: replication slot {} is in use by another consumer (backend PID {pid}); stop that consumer or give this node its own `slot:`",
                    adapter.slot()
                ))
            }
            Ok(Some(None)) => {
                let retained = adapter.retained_wal_bytes().await.unwrap_or(0);
                if retained > RETAINED_WAL_WARN_BYTES {
                    println!(
                        "warn node {}: {db} slot {} retains {} MiB of WAL; is the node running? a stopped node keeps WAL forever: start it or drop the slot",
                        n.name,
                        adapter.slot(),
                        retained >> 20
                    );
                } else {
                    println!(
                        "ok   node {}: {db} slot {} free, retains {} KiB of WAL",
                        n.name,
                        adapter.slot(),
                        retained >> 10
                    );
                }
            }
        }
        let configured: Vec<String> = cfg
            .nodes
            .iter()
            .filter(|m| m.database.kind == DatabaseKind::Postgresql)
            .map(|m| m.database.slot.clone().unwrap_or_else(|| "syncmesh".into()))
            .collect();
        let others: Result<Vec<(String, Option<i64>)>, _> = sqlx::query_as(
            "SELECT slot_name::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE plugin = 'pgoutput' AND database = current_database() \
             AND active_pid IS NULL",
        )
        .fetch_all(adapter.pool())
        .await;
        if let Ok(others) = others {
            for (slot, retained) in others {
                if !configured.contains(&slot) {
                    println!(
                        "warn node {}: {db} orphan slot {slot} (no configured node uses it) retains {} KiB of WAL; drop it with SELECT pg_drop_replication_slot('{slot}') if nothing else needs it",
                        n.name,
                        retained.unwrap_or(0) >> 10
                    );
                }
            }
        }
    }
    adapter.close().await;
    ok
}

/// The MySQL / MariaDB checks of one node: connection, the privileges
/// capture and apply need (TRIGGER, CREATE for the change tables, DML; no
/// binary log is needed), and the tables. Prints one line each; true when
/// all passed.
async fn check_mysql(cfg: &Config, n: &NodeConfig) -> bool {
    let db = n.database.url.redacted();
    let fail = |m: String| {
        println!("FAIL node {}: {m}", n.name);
        false
    };
    let adapter = match MysqlAdapter::open(n.database.url.expose()).await {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let mut ok = true;
    match adapter.grants().await {
        Err(e) => ok = fail(e.to_string()),
        Ok(grants) => {
            let upper: Vec<String> = grants.iter().map(|g| g.to_ascii_uppercase()).collect();
            let has = |p: &str| {
                upper
                    .iter()
                    .any(|g| g.contains("ALL PRIVILEGES") || g.contains(p))
            };
            let mut needed = vec!["SELECT", "INSERT", "UPDATE", "DELETE"];
            if n.mode.captures() {
                needed.extend(["CREATE", "TRIGGER"]);
            }
            let missing: Vec<&str> = needed.iter().copied().filter(|p| !has(p)).collect();
            if missing.is_empty() {
                println!(
                    "ok   node {}: {db} user has {} (capture by triggers; no binary log needed)",
                    n.name,
                    needed.join(", ")
                );
            } else {
                ok = fail(format!(
                    "{db}: the user lacks {} (SHOW GRANTS); run GRANT {} ON <database>.* TO <user>",
                    missing.join(", "),
                    needed.join(", ")
                ));
            }
        }
    }
    let wanted: Vec<_> = cfg
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    match adapter.introspect(&wanted).await {
        Err(e) => ok = fail(e.to_string()),
        Ok(schemas) => {
            for s in &schemas {
                let how = match n.mode {
                    Mode::Subscribe => "not captured (subscribe mode), applied",
                    Mode::Publish => "captured by triggers, not applied (publish mode)",
                    Mode::Bidirectional => "captured by triggers and applied",
                };
                println!(
                    "ok   node {}: {db} table {} key [{}], {} columns: {how}",
                    n.name,
                    s.name,
                    s.key.join(", "),
                    s.columns.len()
                );
            }
            if n.mode.captures() {
                ok &= check_triggers(&adapter, n, &db, &schemas).await;
            }
        }
    }
    adapter.close().await;
    ok
}

/// One line per table on its capture triggers: current, not installed
/// yet, or due to be replaced at the node's next start.
async fn check_triggers(
    adapter: &MysqlAdapter,
    n: &NodeConfig,
    db: &str,
    schemas: &[syncmesh_node::adapter::TableSchema],
) -> bool {
    use syncmesh_node::mysql::TriggerState;
    let states = match adapter.trigger_states(schemas).await {
        Ok(s) => s,
        Err(e) => {
            println!("FAIL node {}: {e}", n.name);
            return false;
        }
    };
    for (table, state) in states {
        match state {
            TriggerState::Current => println!(
                "ok   node {}: {db} table {table}: capture triggers installed and current",
                n.name
            ),
            TriggerState::Missing => println!(
                "ok   node {}: {db} table {table}: capture triggers not installed yet; the node installs them when it starts",
                n.name
            ),
            TriggerState::Stale => {
                let mysql = if adapter.is_mariadb() {
                    String::new()
                } else {
                    format!(
                        ", and MySQL has no CREATE OR REPLACE TRIGGER: pause writes to {table} while it starts, a write between the DROP and the CREATE is not captured"
                    )
                };
                println!(
                    "warn node {}: {db} table {table}: capture triggers differ from this version's (did the table's columns change?); the node replaces them when it starts{mysql}",
                    n.name
                );
            }
        }
    }
    true
}

/// A MongoDB node: reachable, a replica set on 6.0+ (change streams,
/// transactions, pre- and post-images), and the collections.
async fn check_mongo(cfg: &Config, n: &NodeConfig) -> bool {
    let db = n.database.url.redacted();
    let fail = |m: String| {
        println!("FAIL node {}: {m}", n.name);
        false
    };
    let mut adapter = match MongoAdapter::open(n.database.url.expose()).await {
        Ok(a) => a,
        Err(e) => return fail(e.to_string()),
    };
    let mut ok = true;
    match adapter.prerequisites().await {
        Err(e) => ok = fail(e.to_string()),
        Ok(missing) if missing.is_empty() => println!(
            "ok   node {}: {db} is a replica set on MongoDB 6.0+ (change streams, transactions, pre- and post-images)",
            n.name
        ),
        Ok(missing) => {
            for m in missing {
                ok = fail(format!("{db}: {m}"));
            }
        }
    }
    let wanted: Vec<_> = cfg
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.key.clone()))
        .collect();
    match adapter.introspect(&wanted).await {
        Err(e) => ok = fail(e.to_string()),
        Ok(schemas) => {
            for s in &schemas {
                let how = match n.mode {
                    Mode::Subscribe => "not captured (subscribe mode), applied",
                    Mode::Publish => "captured by a change stream, not applied (publish mode)",
                    Mode::Bidirectional => "captured by a change stream and applied",
                };
                println!(
                    "ok   node {}: {db} collection {} key [_id], {} fields found: {how}",
                    n.name,
                    s.name,
                    s.columns.len()
                );
            }
        }
    }
    ok
}
