//! `syncmesh check`: validate a config, reach every database and the hub,
//! and report what will be captured.

use std::path::Path;

use anyhow::Result;
use syncmesh_node::config::{Config, DatabaseKind, Mode};
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
        if n.database.kind != DatabaseKind::Sqlite {
            println!(
                "FAIL node {}: database type {:?} ({db}) is not supported by this version yet; use type: sqlite",
                n.name, n.database.kind
            );
            ok = false;
            continue;
        }
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
                    }
                }
                adapter.close().await;
            }
        }
        match mesh::hub_status(&n.hub).await {
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
    if !ok {
        println!("check failed: fix the lines marked FAIL and run `syncmesh check` again");
    }
    Ok(ok)
}
