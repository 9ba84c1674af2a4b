//! Field merges per second on a realistic mix.
//!
//! 2,000 rows of 10 fields (a mix of strategies: last-write-wins, `sum`,
//! `max`, `min`, `priority_order`, `source_priority`); every row gets 10
//! upserts from 4 origins, each writing all 10 fields. 80 % of the writes
//! are sequential (their `pred` names the live writes they replace), 20 %
//! are concurrent (their `pred` names an older state, so two writes stay
//! live and the strategy picks). One iteration merges every op of every row
//! into a fresh `RowState` and reads the visible row once per row; the
//! throughput is reported in field writes merged (200,000 per iteration).
//!
//! ```text
//! cargo bench -p syncmesh-resolver --bench merge
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Op, OpId, RowState, Strategy, TableRules, Value};

const ROWS: usize = 2_000;
const OPS_PER_ROW: usize = 10;
const FIELDS: usize = 10;
const CONCURRENT_PERCENT: u64 = 20;

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

/// The ops of every row, in the order one replica receives them.
fn workload(nodes: &[NodeId]) -> Vec<Vec<Op>> {
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut seq = vec![0u64; nodes.len()];
    let mut rows = Vec::with_capacity(ROWS);
    for r in 0..ROWS {
        let key = vec![Value::Int(r as i64)];
        let mut state = RowState::default();
        let mut older = RowState::default();
        let mut ops = Vec::with_capacity(OPS_PER_ROW);
        for n in 0..OPS_PER_ROW {
            let o = g.below(nodes.len() as u64) as usize;
            seq[o] += 1;
            let id = OpId::new(nodes[o].clone(), seq[o]);
            let hlc = Hlc {
                time: (r * OPS_PER_ROW + n) as u64 * 16,
                id: o as u128 + 1,
            };
            // A concurrent write saw only the older state.
            let seen = if n > 0 && g.below(100) < CONCURRENT_PERCENT {
                &older
            } else {
                &state
            };
            let writes: Vec<FieldWrite> = (0..FIELDS)
                .map(|f| {
                    let name = field(f);
                    FieldWrite {
                        pred: seen.field_pred(&name),
                        value: value(&mut g, f),
                        delta: (f == 1).then(|| Value::Int(g.below(10) as i64 + 1)),
                        name,
                    }
                })
                .collect();
            let op = Op::upsert(id, hlc, "t", key.clone(), writes);
            older = state.clone();
            state.apply(&op);
            ops.push(op);
        }
        rows.push(ops);
    }
    rows
}

fn merges(c: &mut Criterion) {
    let nodes: Vec<NodeId> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| NodeId::new(*n).unwrap())
        .collect();
    let rules = rules(&nodes);
    let rows = workload(&nodes);
    let field_writes = (ROWS * OPS_PER_ROW * FIELDS) as u64;
    let mut group = c.benchmark_group("resolver");
    group.throughput(Throughput::Elements(field_writes));
    group.bench_function("merge_10_fields_20pct_concurrent", |b| {
        b.iter(|| {
            let mut visible = 0usize;
            for ops in &rows {
                let mut state = RowState::default();
                for op in ops {
                    state.apply(black_box(op));
                }
                visible += state.visible(&rules).map_or(0, |r| r.len());
            }
            black_box(visible)
        })
    });
    group.finish();
}

criterion_group!(benches, merges);
criterion_main!(benches);
