//! The golden table of strategy cases, `resolver/testdata/strategies.txt`
//! (its header documents the format): every check must hold after applying
//! the case's ops in every order, and with every op applied twice.

#![allow(clippy::unwrap_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use syncmesh_resolver::{
    Conflict, DeletePolicy, FieldWrite, Granularity, Hlc, NodeId, Op, OpId, RowState, Strategy,
    TableRules, Value, VisibleRow,
};

const DATA: &str = include_str!("../testdata/strategies.txt");

/// Expected conflict: field, candidates (`None` = unknown), winner.
type ExpectedConflict = (String, Vec<(OpId, Option<Value>)>, Option<OpId>);

struct Check {
    line: usize,
    rules: TableRules,
    row: Option<Option<VisibleRow>>,
    conflicts: Vec<ExpectedConflict>,
}

struct Case {
    title: String,
    ops: Vec<Op>,
    checks: Vec<Check>,
}

fn id(text: &str) -> OpId {
    let split = text
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or_else(|| panic!("op id {text:?}: letters then digits, e.g. a1"));
    let (origin, seq) = text.split_at(split);
    OpId::new(NodeId::new(origin).unwrap(), seq.parse().unwrap())
}

fn ids(text: &str) -> Vec<OpId> {
    text.split(',').map(id).collect()
}

fn value(text: &str) -> Value {
    match text {
        "null" => Value::Null,
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "nan" => Value::Float(f64::NAN),
        _ if text.len() >= 2 && text.starts_with('\'') && text.ends_with('\'') => {
            Value::Text(text[1..text.len() - 1].to_owned())
        }
        _ if text.ends_with('d') => Value::Decimal(text[..text.len() - 1].to_owned()),
        _ if text.contains('.') => Value::Float(text.parse().unwrap()),
        _ => Value::Int(
            text.parse()
                .unwrap_or_else(|e| panic!("value {text:?}: {e}")),
        ),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(x) if x.is_nan() => "nan".into(),
        Value::Float(x) => format!("{x:?}"),
        Value::Decimal(d) => format!("{d}d"),
        Value::Text(t) => format!("'{t}'"),
        other => format!("{other}"),
    }
}

fn strategy(text: &str) -> Strategy {
    match text {
        "last_write_wins" => Strategy::LastWriteWins,
        "source_priority" => Strategy::SourcePriority,
        "merge" => Strategy::Merge,
        "max" => Strategy::Max,
        "min" => Strategy::Min,
        "sum" => Strategy::Sum,
        _ => match text.strip_prefix("order:") {
            Some(list) => Strategy::PriorityOrder(list.split('/').map(str::to_owned).collect()),
            None => panic!("unknown strategy {text:?}"),
        },
    }
}

fn op(words: &[&str]) -> Op {
    let op_id = id(words[0]);
    let origin = op_id.origin.clone();
    let time: u64 = words[1]
        .strip_prefix('@')
        .expect("@<time> after the op id")
        .parse()
        .unwrap();
    let hlc = Hlc {
        time,
        id: origin.hlc_id(),
    };
    let mut row_pred = Vec::new();
    let mut fields = Vec::new();
    for w in &words[3..] {
        if let Some(list) = w.strip_prefix("row<-") {
            row_pred = ids(list);
            continue;
        }
        let (name, rest) = w.split_once('=').expect("field=value");
        let (rest, delta) = match rest.rsplit_once("+=") {
            Some((r, d)) => (r, Some(value(d))),
            None => (rest, None),
        };
        let (v, pred) = match rest.split_once("<-") {
            Some((v, p)) => (v, ids(p)),
            None => (rest, Vec::new()),
        };
        fields.push(FieldWrite {
            name: name.to_owned(),
            value: value(v),
            pred,
            delta,
        });
    }
    let key = vec![Value::Int(1)];
    let mut op = match words[2] {
        "set" => Op::upsert(op_id, hlc, "t", key, fields),
        "del" => Op::delete(op_id, hlc, "t", key, Vec::new()),
        other => panic!("op kind {other:?}: set or del"),
    };
    op.row_pred = row_pred;
    op
}

fn rules(words: &[&str]) -> TableRules {
    let mut r = TableRules::default();
    for w in words {
        let (k, v) = w.split_once('=').expect("setting=value");
        match k {
            "default" => r.default_strategy = strategy(v),
            "deletes" => {
                r.deletes = match v {
                    "delete_wins" => DeletePolicy::DeleteWins,
                    "update_wins" => DeletePolicy::UpdateWins,
                    _ => panic!("deletes={v}"),
                }
            }
            "granularity" => {
                r.granularity = match v {
                    "field" => Granularity::Field,
                    "row" => Granularity::Row,
                    _ => panic!("granularity={v}"),
                }
            }
            "priority" => {
                for p in v.split(',') {
                    let (n, rank) = p.split_once(':').expect("node:rank");
                    r.priorities
                        .insert(NodeId::new(n).unwrap(), rank.parse().unwrap());
                }
            }
            field => {
                r.fields.insert(field.to_owned(), strategy(v));
            }
        }
    }
    r
}

fn parse() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (n, raw) in DATA.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(title) = line.strip_prefix("case ") {
            cases.push(Case {
                title: title.to_owned(),
                ops: Vec::new(),
                checks: Vec::new(),
            });
            continue;
        }
        let case = cases.last_mut().expect("a case line first");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "rules" => case.checks.push(Check {
                line: n + 1,
                rules: rules(&words[1..]),
                row: None,
                conflicts: Vec::new(),
            }),
            "row" => {
                let check = case.checks.last_mut().expect("rules before row");
                check.row = Some(if words[1..] == ["none"] {
                    None
                } else {
                    Some(
                        words[1..]
                            .iter()
                            .map(|w| {
                                let (k, v) = w.split_once('=').unwrap();
                                (k.to_owned(), value(v))
                            })
                            .collect(),
                    )
                });
            }
            "conflict" => {
                let check = case.checks.last_mut().expect("rules before conflict");
                let arrow = words.iter().position(|w| *w == "->").expect("-> winner");
                let cands = words[2..arrow]
                    .iter()
                    .map(|w| {
                        let (i, v) = w.split_once('=').unwrap();
                        (id(i), (v != "?").then(|| value(v)))
                    })
                    .collect();
                let winner = (words[arrow + 1] != "?").then(|| id(words[arrow + 1]));
                check.conflicts.push((words[1].to_owned(), cands, winner));
            }
            _ => case.ops.push(op(&words)),
        }
    }
    cases
}

fn show_row(row: &Option<VisibleRow>) -> String {
    match row {
        None => "none".into(),
        Some(r) => r
            .iter()
            .map(|(k, v)| format!("{k}={}", show(v)))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn show_conflict(c: &Conflict) -> String {
    let cands: Vec<String> = c
        .candidates
        .iter()
        .map(|x| {
            let v = x.value.as_ref().map_or("?".into(), show);
            format!("{}{}={v}", x.op.origin, x.op.seq)
        })
        .collect();
    let winner = c
        .winner
        .as_ref()
        .map_or("?".into(), |w| format!("{}{}", w.origin, w.seq));
    format!("{} {} -> {winner}", c.field, cands.join(" "))
}

fn show_expected(c: &ExpectedConflict) -> String {
    let cands: Vec<String> =
        c.1.iter()
            .map(|(i, v)| {
                let v = v.as_ref().map_or("?".into(), show);
                format!("{}{}={v}", i.origin, i.seq)
            })
            .collect();
    let winner =
        c.2.as_ref()
            .map_or("?".into(), |w| format!("{}{}", w.origin, w.seq));
    format!("{} {} -> {winner}", c.0, cands.join(" "))
}

/// Every permutation of `0..n` (Heap's algorithm).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut a: Vec<usize> = (0..n).collect();
    let mut c = vec![0usize; n];
    out.push(a.clone());
    let mut i = 0;
    while i < n {
        if c[i] < i {
            if i.is_multiple_of(2) {
                a.swap(0, i);
            } else {
                a.swap(c[i], i);
            }
            out.push(a.clone());
            c[i] += 1;
            i = 0;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
    out
}

fn verify(case: &Case, state: &RowState, order: &str) {
    for check in &case.checks {
        let at = format!(
            "testdata/strategies.txt line {} (case {:?}, ops applied {order})",
            check.line, case.title
        );
        if let Some(row) = &check.row {
            let got = state.visible(&check.rules);
            assert!(
                got == *row,
                "{at}:\n  expected row {}\n  got      row {}",
                show_row(row),
                show_row(&got)
            );
        }
        let got = state.conflicts(&check.rules);
        let got_text: Vec<String> = got.iter().map(show_conflict).collect();
        let want_text: Vec<String> = check.conflicts.iter().map(show_expected).collect();
        assert!(
            got_text == want_text
                && got.iter().zip(&check.conflicts).all(|(g, w)| {
                    g.candidates
                        .iter()
                        .zip(&w.1)
                        .all(|(a, b)| a.op == b.0 && a.value == b.1)
                }),
            "{at}:\n  expected conflicts {want_text:#?}\n  got {got_text:#?}"
        );
        for c in &got {
            assert_eq!(c.strategy, check.rules.strategy(&c.field).name(), "{at}");
            let known_max = c.candidates.iter().filter_map(|x| x.hlc).max();
            assert_eq!(c.hlc, known_max, "{at}: the record's hlc");
            if let Some(w) = &c.winner {
                let v = c.candidates.iter().find(|x| x.op == *w).unwrap();
                assert_eq!(c.value, v.value, "{at}: the winner's value");
            }
        }
    }
}

#[test]
fn golden_strategy_cases_hold_in_every_order() {
    let cases = parse();
    assert!(cases.len() >= 20, "the table lost cases: {}", cases.len());
    let mut orders = 0usize;
    for case in &cases {
        assert!(!case.ops.is_empty(), "case {:?} has no ops", case.title);
        assert!(
            !case.checks.is_empty(),
            "case {:?} checks nothing",
            case.title
        );
        let n = case.ops.len();
        assert!(
            n <= 7,
            "case {:?}: at most 7 ops (all orders are tried)",
            case.title
        );
        let mut reference: Option<RowState> = None;
        for perm in permutations(n) {
            let mut state = RowState::default();
            for &i in &perm {
                state.apply(&case.ops[i]);
            }
            verify(case, &state, &format!("in order {perm:?}"));
            match &reference {
                None => reference = Some(state),
                Some(r) => assert_eq!(*r, state, "case {:?}: order {perm:?}", case.title),
            }
            orders += 1;
        }
        // Each op twice, interleaved.
        let mut state = RowState::default();
        for op in case.ops.iter().chain(case.ops.iter().rev()) {
            state.apply(op);
        }
        verify(case, &state, "twice");
    }
    assert!(orders > cases.len());
}

#[test]
fn every_strategy_and_policy_is_covered() {
    let cases = parse();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        for check in &case.checks {
            for s in
                std::iter::once(&check.rules.default_strategy).chain(check.rules.fields.values())
            {
                *seen.entry(s.name()).or_default() += 1;
            }
            let d = match check.rules.deletes {
                DeletePolicy::DeleteWins => "delete_wins",
                DeletePolicy::UpdateWins => "update_wins",
            };
            *seen.entry(d).or_default() += 1;
            if check.rules.granularity == Granularity::Row {
                *seen.entry("row").or_default() += 1;
            }
        }
    }
    for name in [
        "last_write_wins",
        "source_priority",
        "merge",
        "max",
        "min",
        "priority_order",
        "sum",
        "delete_wins",
        "update_wins",
        "row",
    ] {
        assert!(seen.contains_key(name), "no golden case uses {name}");
    }
}
