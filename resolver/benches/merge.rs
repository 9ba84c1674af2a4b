//! Field merges per second: a realistic mix, a hot row and a counter row.
//!
//! - `merge_10_fields_20pct_concurrent`: 2,000 rows of 10 fields (a mix of
//!   strategies: last-write-wins, `sum`, `max`, `min`, `priority_order`,
//!   `source_priority`); every row gets 10 upserts from 4 origins, each
//!   writing all 10 fields. 80 % of the writes are sequential (their `pred`
//!   names the live writes they replace), 20 % are concurrent (their `pred`
//!   names an older state, so two writes stay live and the strategy picks).
//!   200,000 field merges per iteration.
//! - `merge_10_fields_20pct_concurrent_warm_100_rows`: the first 100 rows
//!   of the same mix (the same ops), 10,000 field merges per iteration.
//!   Decoded ops take roughly 2.5 KB each: 2.5 MB here, which with the
//!   states stays in the caches, against 50 MB for the whole mix, fetched
//!   from memory again every iteration. So this one isolates the merge
//!   itself, as a node merging a batch it has just decoded sees it.
//! - `hot_row_1000_sequential_overwrites`: one row of 10 fields, 1,000
//!   sequential upserts from 4 origins (each names the live writes it
//!   replaces), so the row's superseded-write memory grows to 9,990
//!   entries. 10,000 field merges per iteration.
//! - `sum_counter_1000_increments`: one row with one `sum` field, 1,000
//!   increments from 4 origins, 20 % concurrent; every increment's
//!   contribution stays live. 1,000 field merges per iteration.
//!
//! Every iteration merges the ops into fresh `RowState`s with
//! [`RowState::apply`] (the entry point node and hub use), reads each
//! visible row once and drops the states; all of that is timed, building
//! the ops is not. The ops are round-tripped through postcard first, so
//! every write's name, text and `pred` list is its own allocation, as in
//! ops decoded from the wire (node names of up to 8 bytes, like these, are
//! held inline in their ids). The throughput is field merges: ops × fields
//! written per op.
//!
//! The bench runs on mimalloc, the allocator of the `syncmesh` binary that
//! node and hub run in (the glibc allocator costs the big mix about a
//! third of its throughput: 3.6 against 5.2 M field merges/s here).
//!
//! ```text
//! cargo bench -p syncmesh-resolver --bench merge
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Op, OpId, RowState, Strategy, TableRules, Value};

/// As in the `syncmesh` binary, which node and hub run in.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS: usize = 2_000;
const OPS_PER_ROW: usize = 10;
const FIELDS: usize = 10;
const CONCURRENT_PERCENT: u64 = 20;
const HOT_OPS: usize = 1_000;
const WARM_ROWS: usize = 100;

/// A small deterministic generator (xorshift), so every run merges the
/// same ops.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn field(i: usize) -> String {
    format!("f{i}")
}

fn rules(nodes: &[NodeId]) -> TableRules {
    let mut fields = BTreeMap::new();
    fields.insert(field(1), Strategy::Sum);
    fields.insert(field(2), Strategy::Max);
    fields.insert(field(3), Strategy::Min);
    fields.insert(
        field(4),
        Strategy::PriorityOrder(vec!["active".into(), "pending".into(), "inactive".into()]),
    );
    fields.insert(field(5), Strategy::SourcePriority);
    TableRules {
        fields,
        priorities: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i as i64))
            .collect(),
        ..TableRules::default()
    }
}

fn value(g: &mut Gen, f: usize) -> Value {
    match f {
        1..=3 => Value::Int(g.below(1_000) as i64),
        4 => Value::Text(["active", "pending", "inactive", "other"][g.below(4) as usize].into()),
        6 => Value::Float(g.below(10_000) as f64 / 7.0),
        _ => Value::Text(format!("v{}", g.below(100_000))),
    }
}

/// The ops of one row: `ops` upserts of fields `fields` (field 1 is a
/// counter), `concurrent` percent of them concurrent.
fn row_ops(
    g: &mut Gen,
    nodes: &[NodeId],
    seq: &mut [u64],
    key: i64,
    ops: usize,
    fields: &[usize],
    concurrent: u64,
) -> Vec<Op> {
    let mut state = RowState::default();
    // What each field's `pred` was before the previous op.
    let mut older: Vec<Vec<OpId>> = vec![Vec::new(); fields.len()];
    let mut out = Vec::with_capacity(ops);
    for n in 0..ops {
        let o = g.below(nodes.len() as u64) as usize;
        seq[o] += 1;
        let id = OpId::new(nodes[o].clone(), seq[o]);
        let hlc = Hlc {
            time: (key as u64 * ops as u64 + n as u64) * 16,
            id: o as u128 + 1,
        };
        let current: Vec<Vec<OpId>> = fields
            .iter()
            .map(|&f| state.field_pred(&field(f)))
            .collect();
        // A concurrent write saw only the older state.
        let seen = if n > 0 && g.below(100) < concurrent {
            &older
        } else {
            &current
        };
        let writes: Vec<FieldWrite> = fields
            .iter()
            .zip(seen)
            .map(|(&f, pred)| FieldWrite {
                pred: pred.clone(),
                value: value(g, f),
                delta: (f == 1).then(|| Value::Int(g.below(10) as i64 + 1)),
                name: field(f),
            })
            .collect();
        let op = Op::upsert(id, hlc, "t", vec![Value::Int(key)], writes);
        older = current;
        state.apply(&op);
        out.push(op);
    }
    // As decoded from the wire: every id its own allocation.
    out.iter()
        .map(|op| postcard::from_bytes(&postcard::to_allocvec(op).unwrap()).unwrap())
        .collect()
}

/// Merges every row's ops into a fresh state and reads it; returns the
/// number of visible fields.
fn merge_all(rows: &[Vec<Op>], rules: &TableRules, states: Vec<RowState>) -> usize {
    let mut visible = 0usize;
    for (mut state, ops) in states.into_iter().zip(rows) {
        for op in ops {
            state.apply(black_box(op));
        }
        visible += state.visible(rules).map_or(0, |r| r.len());
    }
    visible
}

fn bench_rows(c: &mut Criterion, name: &str, rows: &[Vec<Op>], rules: &TableRules) {
    let field_merges: usize = rows.iter().flatten().map(|op| op.fields.len()).sum();
    let mut group = c.benchmark_group("resolver");
    group.throughput(Throughput::Elements(field_merges as u64));
    group.bench_function(name, |b| {
        b.iter_batched(
            || vec![RowState::default(); rows.len()],
            |states| black_box(merge_all(rows, rules, states)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn merges(c: &mut Criterion) {
    let nodes: Vec<NodeId> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| NodeId::new(*n).unwrap())
        .collect();
    let rules = rules(&nodes);
    let all: Vec<usize> = (0..FIELDS).collect();

    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut seq = vec![0u64; nodes.len()];
    let mix: Vec<Vec<Op>> = (0..ROWS)
        .map(|r| {
            row_ops(
                &mut g,
                &nodes,
                &mut seq,
                r as i64,
                OPS_PER_ROW,
                &all,
                CONCURRENT_PERCENT,
            )
        })
        .collect();
    bench_rows(c, "merge_10_fields_20pct_concurrent", &mix, &rules);
    bench_rows(
        c,
        "merge_10_fields_20pct_concurrent_warm_100_rows",
        &mix[..WARM_ROWS],
        &rules,
    );

    let mut seq = vec![0u64; nodes.len()];
    let hot = vec![row_ops(&mut g, &nodes, &mut seq, 0, HOT_OPS, &all, 0)];
    bench_rows(c, "hot_row_1000_sequential_overwrites", &hot, &rules);

    let mut seq = vec![0u64; nodes.len()];
    let counter = vec![row_ops(
        &mut g,
        &nodes,
        &mut seq,
        0,
        HOT_OPS,
        &[1],
        CONCURRENT_PERCENT,
    )];
    bench_rows(c, "sum_counter_1000_increments", &counter, &rules);
}

criterion_group!(benches, merges);
criterion_main!(benches);
