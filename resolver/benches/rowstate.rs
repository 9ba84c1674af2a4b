//! Row-state encode and decode: what the node and hub cores do with every
//! row an op touches (read the stored state, merge, write it back).
//!
//! - `encode_10_fields_1_op` / `decode_10_fields_1_op`: a row one insert
//!   wrote (10 fields, one live write each, no history) — the streaming
//!   insert case of the PostgreSQL pipeline.
//! - `encode_10_fields_10_ops` / `decode_10_fields_10_ops`: a row after 10
//!   upserts of all 10 fields from 4 origins, 20 % concurrent (the merge
//!   bench's mix): live writes plus the superseded writes kept for
//!   conflict records until garbage collection.
//!
//! Each iteration encodes (or decodes) 200 such rows with postcard, as the
//! cores do (`postcard::to_allocvec(&row)`, `postcard::from_bytes`); the
//! throughput is rows, so the time per row is one over it.
//!
//! ```text
//! cargo bench -p syncmesh-resolver --bench rowstate
//! ```
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use syncmesh_resolver::{FieldWrite, Hlc, NodeId, Op, OpId, RowState, Value};

const ROWS: usize = 200;
const FIELDS: usize = 10;
const CONCURRENT_PERCENT: u64 = 20;

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

fn value(g: &mut Gen, f: usize) -> Value {
    match f {
        1..=3 => Value::Int(g.below(1_000) as i64),
        4 => Value::Text(["active", "pending", "inactive", "other"][g.below(4) as usize].into()),
        6 => Value::Float(g.below(10_000) as f64 / 7.0),
        _ => Value::Text(format!("v{}", g.below(100_000))),
    }
}

/// The state of one row after `ops` upserts of all fields (field 1 a
/// counter), `CONCURRENT_PERCENT` of them concurrent.
fn row_state(g: &mut Gen, nodes: &[NodeId], seq: &mut [u64], key: u64, ops: usize) -> RowState {
    let mut state = RowState::default();
    let mut older: Vec<Vec<OpId>> = vec![Vec::new(); FIELDS];
    for n in 0..ops {
        let o = g.below(nodes.len() as u64) as usize;
        seq[o] += 1;
        let current: Vec<Vec<OpId>> = (0..FIELDS).map(|f| state.field_pred(&field(f))).collect();
        let seen = if n > 0 && g.below(100) < CONCURRENT_PERCENT {
            &older
        } else {
            &current
        };
        let writes: Vec<FieldWrite> = (0..FIELDS)
            .zip(seen)
            .map(|(f, pred)| FieldWrite {
                pred: pred.clone(),
                value: value(g, f),
                delta: (f == 1).then(|| Value::Int(g.below(10) as i64 + 1)),
                name: field(f),
            })
            .collect();
        let hlc = Hlc {
            time: (key * ops as u64 + n as u64) * 16,
            id: o as u128 + 1,
        };
        let op = Op::upsert(
            OpId::new(nodes[o].clone(), seq[o]),
            hlc,
            "t",
            vec![Value::Int(key as i64)],
            writes,
        );
        older = current;
        state.apply(&op);
    }
    state
}

fn bench_codec(c: &mut Criterion, name: &str, rows: &[RowState]) {
    let bytes: Vec<Vec<u8>> = rows
        .iter()
        .map(|r| postcard::to_allocvec(r).unwrap())
        .collect();
    for (r, b) in rows.iter().zip(&bytes) {
        assert_eq!(&postcard::from_bytes::<RowState>(b).unwrap(), r);
    }
    let mut group = c.benchmark_group("rowstate");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function(format!("encode_{name}"), |b| {
        b.iter(|| {
            let mut n = 0;
            for r in rows {
                n += black_box(postcard::to_allocvec(black_box(r)).unwrap()).len();
            }
            n
        })
    });
    group.bench_function(format!("decode_{name}"), |b| {
        b.iter(|| {
            for x in &bytes {
                black_box(postcard::from_bytes::<RowState>(black_box(x)).unwrap());
            }
        })
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    let nodes: Vec<NodeId> = ["edge-a", "edge-b", "edge-c", "main"]
        .iter()
        .map(|n| NodeId::new(*n).unwrap())
        .collect();
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut seq = vec![0u64; nodes.len()];
    let one: Vec<RowState> = (0..ROWS)
        .map(|k| row_state(&mut g, &nodes, &mut seq, k as u64, 1))
        .collect();
    bench_codec(c, "10_fields_1_op", &one);
    let ten: Vec<RowState> = (0..ROWS)
        .map(|k| row_state(&mut g, &nodes, &mut seq, k as u64, 10))
        .collect();
    bench_codec(c, "10_fields_10_ops", &ten);
}

criterion_group!(benches, codec);
criterion_main!(benches);
