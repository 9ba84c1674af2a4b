//! The sync path without databases: what each stage costs per op, on sled.
//!
//! One round: node A captures `ROWS` inserts of a 4-column table in calls
//! of `BATCH` changes (`NodeCore::handle_captured`: ops, row states and the
//! checkpoint in one flushed sled batch), the hub takes A's batches
//! (`HubCore::handle_message`: validate, store, merge, flush, ack), node B
//! takes the hub's batches (`NodeCore::handle_message`: merge, flush, ack)
//! and hands the visible rows out and back (`poll_apply` + `handle_applied`,
//! no database). Each stage's messages are produced by the stage before it
//! before the stage is timed, so the stages are measured one at a time,
//! each on a real `SledStore` in a temp dir. Prints the median over the
//! rounds of µs per op for every stage and the sum. It allocates with
//! mimalloc, as the `syncmesh` binary does.
//!
//! ```text
//! cargo bench -p syncmesh-hub --bench pipeline            # 5 rounds of 50,000 rows
//! PIPELINE_ROWS=100000 PIPELINE_ROUNDS=3 cargo bench -p syncmesh-hub --bench pipeline
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use syncmesh_hub::core::{HubCore, HubSettings};
use syncmesh_node::adapter::{CapturedChange, ChangeKind, ColumnInfo, TableSchema};
use syncmesh_node::config::Mode;
use syncmesh_node::core::{NodeCore, NodeSettings, TableInfo};
use syncmesh_node::store::SledStore;
use syncmesh_resolver::{NodeId, Ntp64, TableRules, Value};

/// As in the `syncmesh` binary.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 10_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn table() -> TableInfo {
    let col = |n: &str, t: &str| ColumnInfo {
        name: n.into(),
        decl_type: t.into(),
        not_null: true,
    };
    TableInfo {
        schema: TableSchema {
            name: "items".into(),
            columns: vec![
                col("id", "bigint"),
                col("item", "text"),
                col("qty", "integer"),
                col("price", "numeric"),
            ],
            key: vec!["id".into()],
        },
        rules: TableRules::default(),
    }
}

fn node(dir: &std::path::Path, name: &str) -> NodeCore<SledStore> {
    let settings = NodeSettings {
        name: NodeId::new(name).unwrap(),
        mode: Mode::Bidirectional,
        batch_size: BATCH,
        max_clock_drift_ms: 60_000,
    };
    let store = SledStore::open(&dir.join(name)).unwrap();
    let mut n = NodeCore::open(settings, vec![table()], store, 0).unwrap();
    assert!(n.poll_connect(u64::MAX / 2));
    n.handle_connected(0);
    n
}

fn inserts(from: usize, n: usize) -> Vec<CapturedChange> {
    (from..from + n)
        .map(|i| CapturedChange {
            change_id: i as i64 + 1,
            table: "items".into(),
            kind: ChangeKind::Insert,
            old: None,
            new: Some(BTreeMap::from([
                ("id".into(), Value::Int(i as i64 + 1)),
                ("item".into(), Value::Text(format!("item-{i}"))),
                ("qty".into(), Value::Int((i % 100) as i64)),
                (
                    "price".into(),
                    Value::Decimal(format!("{}.{:02}", i % 1000, i % 100)),
                ),
            ])),
        })
        .collect()
}

fn now() -> Ntp64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Ntp64::from_unix_millis(ms)
}

/// µs per op of each stage, in the order of [`STAGES`].
fn round(rows: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let mut a = node(dir.path(), "a");
    let mut b = node(dir.path(), "b");
    let mut hub = HubCore::open(
        HubSettings {
            name: NodeId::new("hub").unwrap(),
            batch_size: BATCH,
            max_clock_drift_ms: 60_000,
        },
        SledStore::open(&dir.path().join("hub")).unwrap(),
    )
    .unwrap();
    hub.set_tables(BTreeMap::from([("items".to_owned(), table().rules)]));
    let sa = hub.handle_open();
    let sb = hub.handle_open();
    // Handshakes.
    for _ in 0..4 {
        while let Some(m) = a.poll_transmit().unwrap() {
            hub.handle_message(now(), sa, m).unwrap();
        }
        while let Some(m) = b.poll_transmit().unwrap() {
            hub.handle_message(now(), sb, m).unwrap();
        }
        while let Some(m) = hub.poll_transmit(sa).unwrap() {
            a.handle_message(now(), m).unwrap();
        }
        while let Some(m) = hub.poll_transmit(sb).unwrap() {
            b.handle_message(now(), m).unwrap();
        }
    }
    let changes: Vec<Vec<CapturedChange>> = (0..rows.div_ceil(BATCH))
        .map(|i| inserts(i * BATCH, BATCH.min(rows - i * BATCH)))
        .collect();

    let mut capture = Duration::ZERO;
    let mut to_hub = Vec::new();
    let mut a_tx = Duration::ZERO;
    for c in &changes {
        let t = Instant::now();
        a.handle_captured(now(), c).unwrap();
        capture += t.elapsed();
        let t = Instant::now();
        while let Some(m) = a.poll_transmit().unwrap() {
            to_hub.push(m);
        }
        a_tx += t.elapsed();
    }
    let mut hub_in = Duration::ZERO;
    let mut hub_tx = Duration::ZERO;
    let mut to_b = Vec::new();
    // A keeps at most a few batches unacked: it sends more after the acks.
    while !to_hub.is_empty() {
        for m in std::mem::take(&mut to_hub) {
            let t = Instant::now();
            hub.handle_message(now(), sa, m).unwrap();
            hub_in += t.elapsed();
            // A's acks (not timed), then what B gets.
            while let Some(m) = hub.poll_transmit(sa).unwrap() {
                a.handle_message(now(), m).unwrap();
            }
            let t = Instant::now();
            while let Some(m) = hub.poll_transmit(sb).unwrap() {
                to_b.push(m);
            }
            hub_tx += t.elapsed();
        }
        let t = Instant::now();
        while let Some(m) = a.poll_transmit().unwrap() {
            to_hub.push(m);
        }
        a_tx += t.elapsed();
    }
    let mut b_in = Duration::ZERO;
    let mut b_apply = Duration::ZERO;
    let mut applied = 0;
    let mut pending_to_b = to_b;
    while !pending_to_b.is_empty() {
        for m in std::mem::take(&mut pending_to_b) {
            let t = Instant::now();
            b.handle_message(now(), m).unwrap();
            b_in += t.elapsed();
            while let Some(m) = b.poll_transmit().unwrap() {
                hub.handle_message(now(), sb, m).unwrap();
            }
            let t = Instant::now();
            loop {
                let p = b.poll_apply(BATCH).unwrap();
                if p.is_empty() {
                    break;
                }
                applied += p.len();
                b.handle_applied(&p, 0).unwrap();
            }
            b_apply += t.elapsed();
        }
        // The hub sends more once B acked (≤ 4 batches in flight).
        while let Some(m) = hub.poll_transmit(sb).unwrap() {
            pending_to_b.push(m);
        }
    }
    assert_eq!(applied, rows, "node B applied every row");
    let per_op = |d: Duration| d.as_secs_f64() * 1e6 / rows as f64;
    vec![
        per_op(capture),
        per_op(a_tx),
        per_op(hub_in),
        per_op(hub_tx),
        per_op(b_in),
        per_op(b_apply),
    ]
}

const STAGES: [&str; 6] = [
    "node A handle_captured",
    "node A poll_transmit",
    "hub handle_message",
    "hub poll_transmit",
    "node B handle_message",
    "node B poll_apply+handle_applied",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and gets one small round (it checks the bench still runs).
    let benching = std::env::args().any(|a| a == "--bench");
    let rows = if benching {
        env("PIPELINE_ROWS", 50_000)
    } else {
        2_000
    };
    let rounds = if benching {
        env("PIPELINE_ROUNDS", 5)
    } else {
        1
    };
    let results: Vec<Vec<f64>> = (0..rounds).map(|_| round(rows)).collect();
    println!("pipeline: {rows} inserts, {rounds} rounds, median µs per op (min-max)");
    let mut total = Vec::new();
    for (i, name) in STAGES.iter().enumerate() {
        let v: Vec<f64> = results.iter().map(|r| r[i]).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        println!("  {name:<34} {:>7.2}  ({lo:.2}-{hi:.2})", median(v));
    }
    for r in &results {
        total.push(r.iter().sum::<f64>());
    }
    let t = median(total);
    println!(
        "  {:<34} {t:>7.2}  -> {:.0} ops/s on one core",
        "sum",
        1e6 / t
    );
}
