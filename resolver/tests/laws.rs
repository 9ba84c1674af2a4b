//! Property laws of the resolver, for every strategy:
//!
//! - any order and any duplication of a set of ops gives byte-identical row
//!   state (postcard), hence identical visible rows and conflict records
//!   under every rule set, which read nothing but the state: both are pure
//!   functions of the op set;
//! - merging split sets is associative;
//! - the state agrees with an independent causal oracle: live writes,
//!   tombstones, `sum` totals (the sum of the deltas no delete or insert had
//!   seen) and conflict candidate sets;
//! - garbage collection at a stable cut changes no visible row, now or after
//!   the remaining ops, and loses exactly the settled conflicts; replicas that
//!   collect garbage while they write converge to the union of all ops.
//!
//! Histories come from three simulated replicas that write one row with
//! causal preds (what their replica had seen) and gossip.

#![allow(clippy::unwrap_used, missing_docs)]

use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use std::collections::{BTreeMap, BTreeSet};
use syncmesh_resolver::{
    Conflict, DeletePolicy, FieldWrite, Granularity, Hlc, NodeId, Op, OpId, OpKind, RowState,
    Strategy, TableRules, Value, VersionVector, VisibleRow,
};

const NODES: [&str; 3] = ["a", "b", "c"];
/// Register fields.
const REGS: [&str; 3] = ["x", "y", "z"];
/// Counter fields: an int, a float and a decimal counter.
const COUNTERS: [&str; 3] = ["n", "f", "m"];
const WORDS: [&str; 4] = ["active", "pending", "inactive", "zzz"];

/// One step: (node, action, value, gossip source, extra).
type Step = (usize, u8, i64, u8, u8);

/// How a history is made.
#[derive(Clone, Copy, Debug)]
struct Mode {
    /// Every upsert writes every column (granularity: row).
    full_row: bool,
    /// The policy the origins' databases show rows under (decides whether
    /// an upsert is an insert or an update, and whether a delete is possible).
    policy: DeletePolicy,
    /// Inserts carry only the live tombstones (the node's behaviour before
    /// `insert_pred`) instead of `insert_pred`.
    legacy_insert: bool,
    /// Replicas collect garbage at valid stable cuts while they write.
    gc: bool,
}

/// An op and what its origin had seen when it wrote it.
#[derive(Clone, Debug)]
struct Made {
    op: Op,
    /// The origin's version vector just before it wrote the op.
    seen: VersionVector,
    /// A delete or an `insert_pred` insert: it supersedes everything of the
    /// row its origin had seen.
    kills_seen: bool,
}

struct Sim {
    mode: Mode,
    replicas: Vec<RowState>,
    vv: Vec<VersionVector>,
    made: Vec<Made>,
    index: BTreeMap<OpId, usize>,
    t: u64,
    /// Tombstones dropped by garbage collection so far.
    dropped: usize,
    /// A publish-only replica: it never receives others' ops.
    publish_only: Option<usize>,
    /// The publish-only replica is away: nobody receives its new ops and
    /// the others' stable cuts leave it out (it was excluded).
    away: bool,
}

fn node(i: usize) -> NodeId {
    NodeId::new(NODES[i]).unwrap()
}

fn decimal(units: i64, scale: u32) -> String {
    let sign = if units < 0 { "-" } else { "" };
    let abs = units.unsigned_abs();
    if scale == 0 {
        return format!("{sign}{abs}");
    }
    let p = 10u64.pow(scale);
    format!(
        "{sign}{}.{:0width$}",
        abs / p,
        abs % p,
        width = scale as usize
    )
}

fn reg_value(value: i64, extra: u8) -> Value {
    match extra % 8 {
        0 => Value::Text(WORDS[value.rem_euclid(4) as usize].into()),
        1 => Value::Null,
        2 => Value::Float(if value == 0 {
            f64::NAN
        } else {
            value as f64 / 4.0
        }),
        3 => Value::Decimal(decimal(value, 1)),
        _ => Value::Int(value % 5),
    }
}

fn delta(field: &str, value: i64, extra: u8) -> Value {
    match field {
        "n" if extra.is_multiple_of(11) => Value::Int(value.signum() * (i64::MAX / 3)),
        "n" => Value::Int(value),
        "f" => Value::Float(value as f64 * 0.1),
        _ => Value::Decimal(decimal(value, u32::from(extra % 3))),
    }
}

/// The rules the origins' databases use to show the row.
fn origin_rules(policy: DeletePolicy) -> TableRules {
    let mut r = TableRules {
        deletes: policy,
        ..TableRules::default()
    };
    for c in COUNTERS {
        r.fields.insert(c.into(), Strategy::Sum);
    }
    r
}

impl Sim {
    fn new(mode: Mode) -> Self {
        Sim {
            mode,
            replicas: vec![RowState::default(); 3],
            vv: vec![VersionVector::default(); 3],
            made: Vec::new(),
            index: BTreeMap::new(),
            t: 0,
            dropped: 0,
            publish_only: None,
            away: false,
        }
    }

    /// Replica `to` receives every op replica `from` holds and `to` lacks,
    /// gap-free per origin (as the node does).
    fn pull(&mut self, to: usize, from: usize) {
        if self.publish_only == Some(to) || (self.away && self.publish_only == Some(from)) {
            return;
        }
        for origin in 0..3 {
            let o = node(origin);
            let have = self.vv[to].get(&o);
            let there = self.vv[from].get(&o);
            for seq in have + 1..=there {
                let i = self.index[&OpId::new(o.clone(), seq)];
                self.replicas[to].apply(&self.made[i].op);
                self.vv[to].set(o.clone(), seq);
            }
        }
    }

    /// Everyone receives everything.
    fn gossip_all(&mut self) {
        for _ in 0..2 {
            for to in 0..3 {
                for from in 0..3 {
                    if to != from {
                        self.pull(to, from);
                    }
                }
            }
        }
    }

    /// The largest cut that is stable for replica `r` now: covered ops are
    /// all applied at `r`, and every op `r` has not applied yet — made or
    /// still to be made — was written by an origin that had seen the cut.
    fn stable_cut(&self, r: usize) -> VersionVector {
        let mut cut = self.vv[r].clone();
        for (n, vv_n) in self.vv.iter().enumerate() {
            if self.away && self.publish_only == Some(n) {
                continue; // excluded: its later ops are judged instead
            }
            let o = node(n);
            let next = OpId::new(o.clone(), self.vv[r].get(&o) + 1);
            let bound = match self.index.get(&next) {
                Some(i) => &self.made[*i].seen,
                None => vv_n,
            };
            for (k, v) in cut.0.iter_mut() {
                *v = (*v).min(bound.get(k));
            }
        }
        cut
    }

    fn step(&mut self, &(n, action, value, sync_from, extra): &Step) {
        // Gossip: from one replica, from both others, or none.
        match usize::from(sync_from % 8) {
            from @ 0..3 if from != n => self.pull(n, from),
            3 | 4 => {
                for from in 0..3 {
                    if from != n {
                        self.pull(n, from);
                    }
                }
            }
            _ => {}
        }
        if self.mode.gc && extra.is_multiple_of(4) {
            let cut = self.stable_cut(n);
            let had = self.replicas[n].tombstone_pred().len();
            if self.replicas[n].collect_garbage(&cut) {
                self.replicas[n] = RowState::default();
            }
            self.dropped += had - self.replicas[n].tombstone_pred().len();
        }
        if action % 8 == 7 {
            return; // only gossip (and garbage collection) this step
        }
        self.t += 1;
        let origin = node(n);
        let seq = self.vv[n].get(&origin) + 1;
        let id = OpId::new(origin.clone(), seq);
        // HLCs mostly follow creation order, but not always.
        let hlc = Hlc {
            time: self.t * 16 + u64::from(extra % 4) * 40,
            id: origin.hlc_id(),
        };
        let r = &self.replicas[n];
        // Whether the origin's database shows the row: `visible(..)` is
        // `Some` (checked once against it), computed without summing
        // counters: a replica's state is causally complete, so a live
        // contribution implies a live write.
        let shown = REGS
            .iter()
            .chain(COUNTERS.iter())
            .any(|f| r.entries(f).next().is_some())
            && !(self.mode.policy == DeletePolicy::DeleteWins && r.has_tombstone());
        let seen = self.vv[n].clone();
        let delete = if self.mode.gc {
            action.is_multiple_of(3)
        } else {
            action.is_multiple_of(6)
        };
        let (op, kills_seen) = if shown && delete {
            let op = Op::delete(id, hlc, "t", vec![Value::Int(1)], r.delete_pred());
            (op, true)
        } else {
            let insert = !shown;
            let mut names: Vec<&str> = Vec::new();
            for (bit, f) in REGS.iter().chain(COUNTERS.iter()).enumerate() {
                if insert || self.mode.full_row || action & (1 << (bit + 1)) != 0 {
                    names.push(f);
                }
            }
            if names.is_empty() {
                names.push(REGS[usize::from(action) % 3]);
            }
            let mut fields = Vec::new();
            for (k, f) in names.into_iter().enumerate() {
                let v = value.wrapping_mul(k as i64 + 1) % 50;
                let e = extra.wrapping_add(k as u8);
                let mut w = FieldWrite {
                    name: f.into(),
                    value: reg_value(v, e),
                    pred: r.field_pred(f),
                    delta: None,
                };
                if COUNTERS.contains(&f) {
                    let d = delta(f, v, e);
                    w.value = d.clone();
                    w.delta = Some(d);
                }
                fields.push(w);
            }
            let mut op = Op::upsert(id, hlc, "t", vec![Value::Int(1)], fields);
            let kills = insert && !self.mode.legacy_insert;
            op.row_pred = if kills {
                r.insert_pred(&seen)
            } else {
                r.tombstone_pred()
            };
            (op, kills)
        };
        self.replicas[n].apply(&op);
        self.vv[n].set(origin, seq);
        self.index.insert(op.id.clone(), self.made.len());
        self.made.push(Made {
            op,
            seen,
            kills_seen,
        });
    }
}

fn history(script: &[Step], mode: Mode) -> Vec<Made> {
    let mut sim = Sim::new(mode);
    for s in script {
        sim.step(s);
    }
    sim.made
}

fn ops(made: &[Made]) -> Vec<Op> {
    made.iter().map(|m| m.op.clone()).collect()
}

/// 10,000 cases per law by default; `SYNCMESH_PROPTEST_CASES=100000` for a sweep.
fn cases() -> u32 {
    std::env::var("SYNCMESH_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn merge(ops: &[Op]) -> RowState {
    let mut r = RowState::default();
    for op in ops {
        r.apply(op);
    }
    r
}

fn bytes(r: &RowState) -> Vec<u8> {
    postcard::to_allocvec(r).unwrap()
}

/// Every strategy as the default of x, y, z (counters are `sum`), plus one
/// where the counters are plain last-write-wins registers.
fn rule_sets(granularity: Granularity) -> Vec<TableRules> {
    let mut priorities = BTreeMap::new();
    priorities.insert(node(0), 2);
    priorities.insert(node(1), 7);
    priorities.insert(node(2), 2);
    let strategies = [
        Strategy::LastWriteWins,
        Strategy::SourcePriority,
        Strategy::Merge,
        Strategy::Max,
        Strategy::Min,
        Strategy::PriorityOrder(vec![
            "2".into(),
            "active".into(),
            "-1".into(),
            "pending".into(),
            "1.5".into(),
        ]),
        Strategy::Sum,
    ];
    let mut out: Vec<TableRules> = strategies
        .into_iter()
        .map(|s| {
            let mut r = TableRules {
                default_strategy: s,
                granularity,
                priorities: priorities.clone(),
                ..TableRules::default()
            };
            for c in COUNTERS {
                r.fields.insert(c.into(), Strategy::Sum);
            }
            r
        })
        .collect();
    out.push(TableRules {
        granularity,
        ..TableRules::default()
    });
    out
}

fn granularity(mode: Mode) -> Granularity {
    if mode.full_row {
        Granularity::Row
    } else {
        Granularity::Field
    }
}

/// What a replica shows: visible rows under every rule set and both delete
/// policies, and conflict records under every rule set.
#[derive(Debug, PartialEq)]
struct Observed {
    rows: Vec<Option<VisibleRow>>,
    conflicts: Vec<Vec<Conflict>>,
}

fn visible_all(r: &RowState, sets: &[TableRules]) -> Vec<Option<VisibleRow>> {
    let mut out = Vec::with_capacity(sets.len() * 2);
    for rules in sets {
        let mut rules = rules.clone();
        for deletes in [DeletePolicy::DeleteWins, DeletePolicy::UpdateWins] {
            rules.deletes = deletes;
            out.push(r.visible(&rules));
        }
    }
    out
}

fn observe(r: &RowState, sets: &[TableRules]) -> Observed {
    Observed {
        rows: visible_all(r, sets),
        conflicts: sets.iter().map(|rules| r.conflicts(rules)).collect(),
    }
}

/// The live writes of every field and the rows under both delete policies
/// (counters summed): cheap to compare after every op.
fn live_view(r: &RowState) -> (Vec<Vec<OpId>>, Vec<Option<VisibleRow>>) {
    let live = REGS
        .iter()
        .chain(COUNTERS.iter())
        .map(|f| r.entries(f).map(|(id, _)| id.clone()).collect())
        .collect();
    (
        live,
        visible_all(r, &[origin_rules(DeletePolicy::DeleteWins)]),
    )
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn field_write<'a>(op: &'a Op, field: &str) -> Option<&'a FieldWrite> {
    op.fields.iter().rev().find(|w| w.name == field)
}

/// The causal oracle, computed from the ops and what their origins had seen,
/// without the resolver.
struct Oracle<'a> {
    made: &'a [Made],
}

impl Oracle<'_> {
    fn seen_by_killer(&self, id: &OpId) -> bool {
        self.made
            .iter()
            .any(|m| m.kills_seen && m.seen.get(&id.origin) >= id.seq)
    }

    /// Writes of `field` that no `pred` names and no delete or insert saw.
    fn live(&self, field: &str) -> BTreeSet<OpId> {
        let named: BTreeSet<&OpId> = self
            .made
            .iter()
            .filter_map(|m| field_write(&m.op, field))
            .flat_map(|w| w.pred.iter())
            .collect();
        self.made
            .iter()
            .filter(|m| field_write(&m.op, field).is_some())
            .map(|m| &m.op.id)
            .filter(|id| !named.contains(id) && !self.seen_by_killer(id))
            .cloned()
            .collect()
    }

    /// Every op lists the live tombstones its origin saw, so a tombstone is
    /// live exactly when no op's origin had seen it.
    fn tombstones(&self) -> BTreeSet<OpId> {
        self.made
            .iter()
            .filter(|m| m.op.kind == OpKind::Delete)
            .map(|m| &m.op.id)
            .filter(|id| !self.made.iter().any(|z| z.seen.get(&id.origin) >= id.seq))
            .cloned()
            .collect()
    }

    /// The counted deltas of `field`, in op-id order.
    fn deltas(&self, field: &str) -> Vec<(OpId, Value)> {
        let mut out: Vec<(OpId, Value)> = self
            .made
            .iter()
            .filter_map(|m| {
                let d = field_write(&m.op, field)?.delta.clone()?;
                (!self.seen_by_killer(&m.op.id)).then(|| (m.op.id.clone(), d))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The expected `sum`, computed independently of the resolver's adder.
    fn sum(&self, field: &str) -> Option<Value> {
        let d = self.deltas(field);
        if d.is_empty() {
            return None;
        }
        Some(match field {
            "n" => {
                let total: i128 = d
                    .iter()
                    .map(|(_, v)| match v {
                        Value::Int(i) => i128::from(*i),
                        _ => unreachable!(),
                    })
                    .sum();
                Value::Int(total.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
            }
            "f" => Value::Float(d.iter().fold(-0.0, |acc, (_, v)| match v {
                Value::Float(x) => acc + x,
                _ => unreachable!(),
            })),
            _ => {
                // Scaled integers at scale 3, printed at the largest scale.
                let mut total = 0i128;
                let mut scale = 0u32;
                for (_, v) in &d {
                    let Value::Decimal(s) = v else { unreachable!() };
                    let sc = s.split_once('.').map_or(0, |(_, f)| f.len() as u32);
                    scale = scale.max(sc);
                    let digits: i128 = s.replace('.', "").parse().unwrap();
                    total += digits * 10i128.pow(3 - sc);
                }
                let units = total / 10i128.pow(3 - scale);
                Value::Decimal(decimal(units as i64, scale))
            }
        })
    }

    /// Conflict candidate sets of a non-sum `field`.
    fn conflict_sets(&self, field: &str) -> BTreeSet<Vec<OpId>> {
        let mut sets = BTreeSet::new();
        let live = self.live(field);
        if live.len() >= 2 {
            sets.insert(live.into_iter().collect());
        }
        for m in self.made {
            if let Some(w) = field_write(&m.op, field)
                && w.delta.is_none()
            {
                let s: BTreeSet<&OpId> = w.pred.iter().collect();
                if s.len() >= 2 {
                    sets.insert(s.into_iter().cloned().collect());
                }
            }
        }
        sets
    }

    /// True when the op set holds `id`'s write of `field` and it is not
    /// counted or still live (counted writes are not remembered once
    /// superseded).
    fn known(&self, field: &str, id: &OpId, live: &BTreeSet<OpId>) -> bool {
        self.made.iter().any(|m| {
            m.op.id == *id
                && field_write(&m.op, field).is_some_and(|w| w.delta.is_none() || live.contains(id))
        })
    }

    /// `id`'s write of `field` is covered and superseded by a covered op.
    fn settled(&self, field: &str, id: &OpId, cut: &VersionVector) -> bool {
        let cov = |i: &OpId| i.seq <= cut.get(&i.origin);
        cov(id)
            && self.made.iter().any(|z| {
                cov(&z.op.id)
                    && (field_write(&z.op, field).is_some_and(|w| w.pred.contains(id))
                        || z.op
                            .row_pred
                            .iter()
                            .any(|p| p.origin == id.origin && p.seq >= id.seq))
            })
    }
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    (0usize..3, any::<u8>(), -50i64..50, any::<u8>(), any::<u8>())
}

fn mode() -> impl proptest::strategy::Strategy<Value = Mode> {
    (any::<bool>(), any::<bool>(), any::<u8>()).prop_map(|(full_row, update_wins, k)| Mode {
        full_row: full_row && k.is_multiple_of(4),
        policy: if update_wins {
            DeletePolicy::UpdateWins
        } else {
            DeletePolicy::DeleteWins
        },
        legacy_insert: k.is_multiple_of(3),
        gc: false,
    })
}

fn script() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    proptest::collection::vec(step(), 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_order_and_duplication_gives_identical_bytes_rows_and_conflicts(
        s in script(), m in mode(),
        dup in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        perm_seed in any::<u64>(),
    ) {
        let ops = ops(&history(&s, m));
        let base = merge(&ops);
        let mut shuffled = ops.clone();
        if !ops.is_empty() {
            for d in dup {
                shuffled.push(ops[d.index(ops.len())].clone());
            }
        }
        shuffle(&mut shuffled, perm_seed);
        let other = merge(&shuffled);
        prop_assert_eq!(bytes(&base), bytes(&other));
        // Byte-identical states give identical rows and conflicts: `visible`
        // and `conflicts` read nothing but the state. Computing them checks
        // that they are total (no panic) under every strategy.
        let sets = rule_sets(granularity(m));
        let seen = observe(&other, &sets);
        prop_assert_eq!(seen.rows.len(), sets.len() * 2);
        prop_assert_eq!(seen.conflicts.len(), sets.len());
    }

    #[test]
    fn merge_is_associative_over_split_sets(
        s in script(), m in mode(),
        cut1 in any::<prop::sample::Index>(), cut2 in any::<prop::sample::Index>(),
    ) {
        let ops = ops(&history(&s, m));
        let i = cut1.index(ops.len() + 1);
        let j = i + cut2.index(ops.len() - i + 1);
        let (a, b, c) = (&ops[..i], &ops[i..j], &ops[j..]);
        // ((A then B) then C) equals (C then (B then A)) on fresh states.
        let mut left = merge(a);
        for op in b.iter().chain(c) { left.apply(op); }
        let mut right = merge(c);
        for op in b.iter().chain(a) { right.apply(op); }
        prop_assert_eq!(bytes(&left), bytes(&right));
    }

    #[test]
    fn state_matches_the_causal_oracle(s in script(), m in mode()) {
        let made = history(&s, m);
        let state = merge(&ops(&made));
        let oracle = Oracle { made: &made };
        for f in REGS.iter().chain(COUNTERS.iter()) {
            let live: BTreeSet<OpId> = state.entries(f).map(|(id, _)| id.clone()).collect();
            prop_assert_eq!(live, oracle.live(f), "live writes of {}", f);
        }
        let tombs: BTreeSet<OpId> = state.tombstone_pred().into_iter().collect();
        prop_assert_eq!(tombs, oracle.tombstones());
        let rules = TableRules { deletes: DeletePolicy::UpdateWins, ..origin_rules(m.policy) };
        let row = state.visible(&rules);
        for c in COUNTERS {
            prop_assert_eq!(row.as_ref().and_then(|r| r.get(c)).cloned(), oracle.sum(c), "sum {}", c);
        }
        // Per field: the expected candidate sets and which candidates are known.
        let mut expected: BTreeMap<&str, (BTreeSet<Vec<OpId>>, BTreeSet<OpId>)> = BTreeMap::new();
        for f in REGS.iter().chain(COUNTERS.iter()) {
            let sets = oracle.conflict_sets(f);
            let live = oracle.live(f);
            let known = sets
                .iter()
                .flatten()
                .filter(|id| oracle.known(f, id, &live))
                .cloned()
                .collect();
            expected.insert(f, (sets, known));
        }
        for rules in rule_sets(granularity(m)) {
            let conflicts = state.conflicts(&rules);
            let mut expect = Vec::new();
            for (f, (sets, _)) in &expected {
                if *rules.strategy(f) != Strategy::Sum {
                    for ids in sets {
                        expect.push((f.to_string(), ids.clone()));
                    }
                }
            }
            let got: Vec<(String, Vec<OpId>)> = conflicts
                .iter()
                .map(|c| (c.field.clone(), c.candidates.iter().map(|x| x.op.clone()).collect()))
                .collect();
            prop_assert_eq!(&got, &expect);
            let shown = TableRules { deletes: DeletePolicy::UpdateWins, ..rules.clone() };
            let row = state.visible(&shown);
            for c in &conflicts {
                let known = &expected[c.field.as_str()].1;
                for cand in &c.candidates {
                    prop_assert_eq!(cand.value.is_some(), known.contains(&cand.op));
                }
                // The record of a live conflict resolves as the visible row does.
                if c.ids().into_iter().eq(state.entries(&c.field).map(|(id, _)| id)) {
                    prop_assert_eq!(
                        row.as_ref().and_then(|r| r.get(&c.field).cloned()),
                        c.value.clone()
                    );
                }
            }
        }
    }

    #[test]
    fn gc_at_a_stable_cut_keeps_visible_rows_and_settled_conflicts_go(
        s in script(), m in mode(),
        k in any::<prop::sample::Index>(),
        early in proptest::collection::vec(any::<bool>(), 20),
        perm_seed in any::<u64>(),
    ) {
        let m = Mode { legacy_insert: false, ..m };
        let made = history(&s, m);
        let k = k.index(made.len() + 1);
        // Applied: ops[..k] and some later ones; the cut: what every op not
        // applied yet had seen, within ops[..k].
        let mut applied: Vec<usize> = (0..k).collect();
        let mut rest: Vec<usize> = Vec::new();
        for i in k..made.len() {
            if early[i % early.len()] { applied.push(i) } else { rest.push(i) }
        }
        let mut cut = VersionVector::default();
        for m in &made[..k] {
            cut.advance(&m.op.id.origin, m.op.id.seq);
        }
        for &i in &rest {
            for (o, v) in cut.0.iter_mut() {
                *v = (*v).min(made[i].seen.get(o));
            }
        }
        let mut gc = RowState::default();
        for &i in &applied { gc.apply(&made[i].op); }
        let mut plain = gc.clone();
        // A compact row holds nothing any cut can collect (the cores skip it).
        if gc.is_compact() {
            let mut c = gc.clone();
            let emptied = c.collect_garbage(&cut);
            prop_assert!(!emptied);
            prop_assert_eq!(&c, &gc);
        }
        if gc.collect_garbage(&cut) {
            prop_assert!(gc.is_empty());
            gc = RowState::default();
        }
        // Garbage collection never touches live writes, so equal live sets and
        // equal rows under both policies mean equal rows under every strategy.
        prop_assert_eq!(live_view(&gc), live_view(&plain));
        // The rest in creation order (causal): equal after every op.
        let mut gc_step = gc.clone();
        for &i in &rest {
            gc_step.apply(&made[i].op);
            plain.apply(&made[i].op);
            prop_assert_eq!(live_view(&gc_step), live_view(&plain));
        }
        // The rest in any order: equal at the end.
        let mut shuffled = rest.clone();
        shuffle(&mut shuffled, perm_seed);
        for &i in &shuffled { gc.apply(&made[i].op); }
        prop_assert_eq!(live_view(&gc), live_view(&plain));
        // Conflicts: all but the records whose candidates are all settled (the
        // strategy only changes winners, so counters as sum or not suffice).
        let oracle = Oracle { made: &made };
        for rules in [origin_rules(m.policy), TableRules::default()] {
            let expect: Vec<_> = plain
                .conflicts(&rules)
                .into_iter()
                .filter(|c| !c.candidates.iter().all(|x| oracle.settled(&c.field, &x.op, &cut)))
                .collect();
            prop_assert_eq!(gc.conflicts(&rules), expect);
        }
    }

    #[test]
    fn replicas_collecting_garbage_while_writing_converge_to_the_union(
        s1 in proptest::collection::vec(step(), 0..9),
        s2 in proptest::collection::vec(step(), 1..9),
        m in mode(), who in 0usize..3, delete in any::<bool>(),
    ) {
        let m = Mode { legacy_insert: false, gc: true, ..m };
        let mut sim = Sim::new(m);
        for st in &s1 { sim.step(st); }
        // Sometimes `who` deletes the row, everyone hears of everything, and
        // only `who` collects garbage: it may drop tombstones the others keep.
        if delete {
            sim.step(&(who, 0, 0, 3, 1));
        }
        sim.gossip_all();
        let cut = sim.stable_cut(who);
        if sim.replicas[who].collect_garbage(&cut) {
            sim.replicas[who] = RowState::default();
        }
        for st in &s2 { sim.step(st); }
        sim.gossip_all();
        // Garbage collection never touches live writes, so equal live sets
        // and equal rows under both policies mean equal rows under every
        // strategy.
        let union = merge(&ops(&sim.made));
        let expect = live_view(&union);
        for r in &sim.replicas {
            prop_assert_eq!(&live_view(r), &expect);
        }
    }

    /// A publish-only origin (replica 2) never sees another origin's op.
    /// While it is away the others collect garbage without it; when it
    /// returns, a judge that kept every tombstone it did not see (the hub,
    /// `HubCore::gc_collect_cut`) drops the fields of each of its writes
    /// that `RowState::loses_update` or `RowState::loses_to_delete` says a
    /// delete hides, and the others merge the judged ops while they keep
    /// collecting at any moment: all agree with the judge and with the
    /// union of the judged ops (simulator seeds 1094 and 1112 with
    /// `--publish-first`: a re-insert after its own delete diverged).
    #[test]
    fn a_returning_publish_only_origin_judged_by_a_hub_keeping_its_missed_tombstones_converges(
        s1 in proptest::collection::vec(step(), 0..8),
        s2 in proptest::collection::vec(step(), 1..14),
        m in mode(),
        passes in proptest::collection::vec(any::<bool>(), 32),
    ) {
        let m = Mode { legacy_insert: false, gc: true, ..m };
        let rules = origin_rules(m.policy);
        let mut sim = Sim::new(m);
        sim.publish_only = Some(2);
        // Connected: it pins the cut, the others may receive its ops.
        for st in &s1 { sim.step(st); }
        // Away: it writes alone, the others write, gossip and collect.
        sim.away = true;
        for st in &s2 { sim.step(st); }
        for _ in 0..2 {
            sim.pull(0, 1);
            sim.pull(1, 0);
        }
        let c = node(2);
        let held = sim.vv[0].get(&c);
        prop_assert_eq!(held, sim.vv[1].get(&c));
        // The judge holds everything the others hold, and collected only
        // the publish-only origin's own covered ops.
        let mut judge = RowState::default();
        for made in &sim.made {
            if sim.vv[0].get(&made.op.id.origin) >= made.op.id.seq {
                judge.apply(&made.op);
            }
        }
        let mut keep = VersionVector::default();
        keep.set(c.clone(), held);
        if judge.collect_garbage(&keep) {
            judge = RowState::default();
        }
        let returning: Vec<Op> = sim
            .made
            .iter()
            .filter(|x| x.op.id.origin == c && x.op.id.seq > held)
            .map(|x| x.op.clone())
            .collect();
        let mut judged = Vec::new();
        let mut pass = passes.iter().cycle();
        for mut op in returning {
            if judge.loses_to_unseen_deletes(&rules, &op) {
                prop_assert_eq!(m.policy, DeletePolicy::DeleteWins);
                op.fields.clear();
            }
            judge.apply(&op);
            for r in 0..2 {
                if *pass.next().unwrap() {
                    let cut = sim.stable_cut(r);
                    if sim.replicas[r].collect_garbage(&cut) {
                        sim.replicas[r] = RowState::default();
                    }
                }
                sim.replicas[r].apply(&op);
                sim.vv[r].set(c.clone(), op.id.seq);
            }
            judged.push(op);
        }
        for r in 0..2 {
            if *pass.next().unwrap() {
                let cut = sim.stable_cut(r);
                if sim.replicas[r].collect_garbage(&cut) {
                    sim.replicas[r] = RowState::default();
                }
            }
        }
        // The union of what everyone merged: the others' ops and the
        // judged ones of the publish-only origin.
        let union: Vec<Op> = sim
            .made
            .iter()
            .filter(|x| x.op.id.origin != c || x.op.id.seq <= held)
            .map(|x| x.op.clone())
            .chain(judged)
            .collect();
        let union = merge(&union);
        let plain = TableRules { deletes: m.policy, ..TableRules::default() };
        for rs in [&rules, &plain] {
            let want = union.visible(rs);
            prop_assert_eq!(&judge.visible(rs), &want, "judge");
            for r in 0..2 {
                prop_assert_eq!(&sim.replicas[r].visible(rs), &want, "replica {}", r);
            }
        }
    }
}
