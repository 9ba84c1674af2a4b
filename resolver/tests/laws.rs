//! Property laws of the resolver: any order and any duplication of a set of
//! ops gives byte-identical row state, and the visible row is a pure function
//! of the op set.

#![allow(clippy::unwrap_used, missing_docs)]

use proptest::prelude::*;
use syncmesh_resolver::{
    DeletePolicy, FieldWrite, Hlc, NodeId, Op, OpId, RowState, TableRules, Value,
};

const NODES: [&str; 3] = ["a", "b", "c"];
const FIELDS: [&str; 3] = ["x", "y", "z"];

/// Simulates three replicas writing to one row causally: each op's preds are
/// what its origin's replica had seen when it wrote. Returns all ops made.
fn history(script: &[(usize, u8, i64, u8)]) -> Vec<Op> {
    let mut replicas: Vec<RowState> = vec![RowState::default(); 3];
    let mut seqs = [0u64; 3];
    let mut ops: Vec<Op> = Vec::new();
    let mut t = 0u64;
    for &(node, action, value, sync_from) in script {
        // Sometimes receive everything another replica made so far (gossip).
        let from = usize::from(sync_from % 4);
        if from < 3 && from != node {
            let seen: Vec<Op> = ops
                .iter()
                .filter(|o| o.id.origin.as_str() == NODES[from])
                .cloned()
                .collect();
            for op in seen {
                replicas[node].apply(&op);
            }
        }
        t += 1;
        seqs[node] += 1;
        let origin = NodeId::new(NODES[node]).unwrap();
        let id = OpId::new(origin.clone(), seqs[node]);
        let hlc = Hlc {
            time: t * 16,
            id: origin.hlc_id(),
        };
        let r = &replicas[node];
        let op = if action % 5 == 0 {
            Op::delete(id, hlc, "t", vec![Value::Int(1)], r.delete_pred())
        } else {
            let field = FIELDS[usize::from(action) % 3];
            let mut fields = vec![FieldWrite {
                name: field.into(),
                value: Value::Int(value),
                pred: r.field_pred(field),
                delta: None,
            }];
            if action % 2 == 0 {
                let other = FIELDS[(usize::from(action) + 1) % 3];
                fields.push(FieldWrite {
                    name: other.into(),
                    value: Value::Int(value + 1),
                    pred: r.field_pred(other),
                    delta: None,
                });
            }
            let mut op = Op::upsert(id, hlc, "t", vec![Value::Int(1)], fields);
            op.row_pred = r.tombstone_pred();
            op
        };
        replicas[node].apply(&op);
        ops.push(op);
    }
    ops
}

/// 2,000 cases per law by default; `SYNCMESH_PROPTEST_CASES=100000` for a sweep.
fn cases() -> u32 {
    std::env::var("SYNCMESH_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn merge(ops: &[Op]) -> RowState {
    let mut r = RowState::default();
    for op in ops {
        r.apply(op);
    }
    r
}

fn script() -> impl Strategy<Value = Vec<(usize, u8, i64, u8)>> {
    proptest::collection::vec((0usize..3, any::<u8>(), -50i64..50, any::<u8>()), 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_permutation_gives_identical_bytes(s in script(), perm_seed in any::<u64>()) {
        let ops = history(&s);
        let base = merge(&ops);
        let mut shuffled = ops.clone();
        // Deterministic Fisher-Yates from the seed.
        let mut x = perm_seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let other = merge(&shuffled);
        prop_assert_eq!(postcard::to_allocvec(&base).unwrap(), postcard::to_allocvec(&other).unwrap());
        for deletes in [DeletePolicy::DeleteWins, DeletePolicy::UpdateWins] {
            let rules = TableRules { deletes, ..TableRules::default() };
            prop_assert_eq!(base.visible(&rules), other.visible(&rules));
        }
    }

    #[test]
    fn duplicates_change_nothing(s in script(), dup in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
        let ops = history(&s);
        let base = merge(&ops);
        let mut with_dups = ops.clone();
        for d in dup {
            with_dups.push(ops[d.index(ops.len())].clone());
        }
        prop_assert_eq!(merge(&with_dups), base);
    }

    #[test]
    fn merge_is_associative_over_split_sets(s in script(), cut in any::<prop::sample::Index>()) {
        let ops = history(&s);
        let k = cut.index(ops.len() + 1);
        // (A then B) applied to one state equals B then A on a fresh state.
        let mut left = merge(&ops[..k]);
        for op in &ops[k..] { left.apply(op); }
        let mut right = merge(&ops[k..]);
        for op in &ops[..k] { right.apply(op); }
        prop_assert_eq!(left, right);
    }
}
