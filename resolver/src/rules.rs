//! Per-table merge rules: field strategies, delete policy, granularity, and
//! the pure functions that pick a winner among concurrent writes or sum a
//! counter. The semantics are documented on [`Strategy`].

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::decimal::Decimal;
use crate::{Hlc, NodeId, OpId, Value};

/// How concurrent writes of a field are resolved.
///
/// # How each strategy picks among concurrent writes
///
/// Strategies only ever choose among writes that are *concurrent* — the live
/// entries of a field's multi-value register (see [`RowState`]). A write that
/// lists the others in its `pred` has replaced them before any strategy
/// runs, so sequential writes never conflict, whatever the strategy: a later
/// `pending` replaces `active` even under `priority_order: [active, pending]`.
///
/// Every strategy is a total order on candidates, so the pick never depends
/// on the order ops arrived in. The final tie-breaker is always the highest
/// `(HLC, op id)`.
///
/// | strategy | the winner is the write with |
/// |---|---|
/// | [`Strategy::LastWriteWins`] | the highest `(HLC, op id)` |
/// | [`Strategy::SourcePriority`] | the highest [`TableRules::priority`] of its origin, then the highest `(HLC, op id)` |
/// | [`Strategy::Merge`] | as `SourcePriority`; "only one side changed the field" needs no rule: with per-field registers that write is the only live one |
/// | [`Strategy::Max`] | the greatest value, then the highest `(HLC, op id)` |
/// | [`Strategy::Min`] | the least non-NULL value (NULL only if all are NULL), then the highest `(HLC, op id)` |
/// | [`Strategy::PriorityOrder`] | the value listed earliest (unlisted values rank after every listed one), then the highest `(HLC, op id)` |
/// | [`Strategy::Sum`] | no winner: the field is the exact sum of every counted delta ([`RowState`] docs) |
///
/// **Value order for `max`/`min`.** [`Value`]'s total order, except that two
/// decimals compare numerically (`9 < 10`, and `1.5` ties with `1.50`; the
/// text then breaks the tie so the order stays total; malformed decimal text
/// sorts after every well-formed decimal). Values of different kinds compare
/// by kind (`null < bool < int < float < decimal < text < bytes < json <
/// timestamp`) — a column normally holds one kind. NULL is the least value,
/// so `max` never picks NULL over a value, and `min` deliberately skips NULL
/// too (as SQL's `MIN()` does). Floats use IEEE total order: `+NaN` is greater
/// than `+inf` (so `max` picks NaN over every number and `min` never does;
/// PostgreSQL also sorts NaN above all numbers), `-NaN` below `-inf`, and
/// `-0.0 < +0.0`. Text compares by bytes (code points), not by a collation.
///
/// **`priority_order` matching.** The list holds text, as written in the
/// config. A value matches an entry when its canonical text equals the entry
/// exactly: [`Value::Text`] by its content, [`Value::Int`] by its decimal
/// digits (`-3`), [`Value::Bool`] as `true`/`false`, [`Value::Decimal`] by its
/// text as stored (`1.50` does not match `1.5`). NULL, floats (their text is
/// not canonical), bytes, JSON and timestamps never match and rank last with
/// every other unlisted value.
///
/// `merge` and `source_priority` pick the same write; they differ in name
/// only (conflict records and metrics say which one was configured).
///
/// [`RowState`]: crate::RowState
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// The write with the highest `(HLC, op id)` wins.
    #[default]
    LastWriteWins,
    /// The write from the node with the highest [`TableRules::priorities`]
    /// rank wins, then the highest `(HLC, op id)`.
    SourcePriority,
    /// Field-level merge: a field only one concurrent side wrote takes that
    /// write (per-field registers do this by themselves); when several
    /// concurrent writes exist, as [`Strategy::SourcePriority`].
    Merge,
    /// The greatest value wins, then the highest `(HLC, op id)`.
    Max,
    /// The least non-NULL value wins, then the highest `(HLC, op id)`.
    Min,
    /// The value listed earliest wins; unlisted values rank last; then the
    /// highest `(HLC, op id)`.
    PriorityOrder(Vec<String>),
    /// A counter: the exact sum of the deltas of every counted write (see
    /// [`RowState`](crate::RowState) for which writes count). Never a
    /// conflict. Deltas are summed in op-id order (the canonical order):
    ///
    /// - Only `Int`, `Float` and well-formed `Decimal` deltas count
    ///   (`[+-]?(D+(.D*)?|.D+)`, no exponent); any other delta (NULL, text, a
    ///   malformed decimal) is ignored. With nothing counted the field falls
    ///   back to last-write-wins over its writes.
    /// - All `Int`: summed exactly in `i128` (no intermediate overflow is
    ///   possible), then the total **saturates** to `i64::MIN..=i64::MAX`. The
    ///   clamp applies once, to the exact total, so it does not depend on the
    ///   order, and a total that leaves the range and comes back is exact.
    /// - Any `Decimal` (and no `Float`): the exact decimal sum of the decimal
    ///   and integer deltas, with the largest scale among the decimal terms
    ///   (`-12.340` + `0.005` + `2` = `-10.335`); it never rounds and never
    ///   overflows.
    /// - Any `Float`: every counted delta converted to `f64` (a decimal to the
    ///   nearest double) and added left to right from `-0.0` in op-id order.
    ///   Float addition is not associative; the fixed order is what makes
    ///   every replica compute the same bits.
    Sum,
}

impl Strategy {
    /// The config name: `last_write_wins`, `source_priority`, `merge`, `max`,
    /// `min`, `priority_order` or `sum`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::LastWriteWins => "last_write_wins",
            Strategy::SourcePriority => "source_priority",
            Strategy::Merge => "merge",
            Strategy::Max => "max",
            Strategy::Min => "min",
            Strategy::PriorityOrder(_) => "priority_order",
            Strategy::Sum => "sum",
        }
    }
}

/// What an update concurrent with a delete does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeletePolicy {
    /// The row stays deleted.
    #[default]
    DeleteWins,
    /// The concurrently updated row comes back with the fields written
    /// concurrently with the delete; the others read as NULL.
    UpdateWins,
}

/// Whether fields or whole rows are the unit of conflict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    /// Each field is its own register.
    #[default]
    Field,
    /// The whole row is one register: capture writes every column in every
    /// upsert, so all fields share one set of concurrent writes. Each field
    /// still resolves with its own strategy; with the strategies that rank
    /// writes rather than values (`last_write_wins`, `source_priority`,
    /// `merge`) every field picks the same write, i.e. one whole row.
    Row,
}

/// Per-table merge rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRules {
    /// Delete policy.
    pub deletes: DeletePolicy,
    /// Field or row granularity.
    pub granularity: Granularity,
    /// Strategy of fields not listed in `fields`.
    pub default_strategy: Strategy,
    /// Per-field strategies.
    pub fields: BTreeMap<String, Strategy>,
    /// Node ranks for `source_priority` and `merge`: higher wins. Nodes not
    /// listed rank 0.
    pub priorities: BTreeMap<NodeId, i64>,
}

impl TableRules {
    /// The strategy of `field`.
    pub fn strategy(&self, field: &str) -> &Strategy {
        self.fields.get(field).unwrap_or(&self.default_strategy)
    }

    /// The rank of `node` (0 when not listed).
    pub fn priority(&self, node: &NodeId) -> i64 {
        self.priorities.get(node).copied().unwrap_or(0)
    }
}

/// One concurrent write as the strategies see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand<'a> {
    pub(crate) op: &'a OpId,
    pub(crate) hlc: &'a Hlc,
    pub(crate) value: &'a Value,
}

/// `Greater` when `a` beats `b` under `strategy`. A total order: equal only
/// for the same op id.
pub(crate) fn compare(strategy: &Strategy, rules: &TableRules, a: Cand, b: Cand) -> Ordering {
    let by_time = || (a.hlc, a.op).cmp(&(b.hlc, b.op));
    match strategy {
        Strategy::LastWriteWins | Strategy::Sum => by_time(),
        Strategy::SourcePriority | Strategy::Merge => rules
            .priority(&a.op.origin)
            .cmp(&rules.priority(&b.op.origin))
            .then_with(by_time),
        Strategy::Max => value_order(a.value, b.value).then_with(by_time),
        Strategy::Min => (!a.value.is_null())
            .cmp(&!b.value.is_null())
            .then_with(|| value_order(b.value, a.value))
            .then_with(by_time),
        Strategy::PriorityOrder(list) => list_rank(list, b.value)
            .cmp(&list_rank(list, a.value))
            .then_with(by_time),
    }
}

/// The winner among `cands` (none when empty).
pub(crate) fn pick<'a>(
    strategy: &Strategy,
    rules: &TableRules,
    cands: impl IntoIterator<Item = Cand<'a>>,
) -> Option<Cand<'a>> {
    cands
        .into_iter()
        .max_by(|a, b| compare(strategy, rules, *a, *b))
}

/// [`Value`]'s order with decimals compared numerically (see [`Strategy`]).
pub(crate) fn value_order(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Decimal(x), Value::Decimal(y)) => match (Decimal::parse(x), Decimal::parse(y)) {
            (Some(dx), Some(dy)) => dx.cmp_value(&dy).then_with(|| x.cmp(y)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => x.cmp(y),
        },
        _ => a.cmp(b),
    }
}

/// The text a value is matched by against a `priority_order` list.
pub(crate) fn priority_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::Text(s) | Value::Decimal(s) => Some(Cow::Borrowed(s)),
        Value::Int(i) => Some(Cow::Owned(i.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Float(_) | Value::Bytes(_) | Value::Json(_) | Value::Timestamp(_) => {
            None
        }
    }
}

/// Position in the list; `list.len()` for unlisted values.
fn list_rank(list: &[String], v: &Value) -> usize {
    priority_text(v)
        .and_then(|t| list.iter().position(|e| e.as_str() == t.as_ref()))
        .unwrap_or(list.len())
}

/// `new − old` of a `sum` field as its origin saw the write: the delta the
/// op carries. Exact for integers (an i64 overflow becomes an exact
/// decimal) and for decimals (the larger scale of the two), IEEE for
/// floats; NULL counts as zero. `None` when either side is not a number
/// (a type mismatch the caller reports).
pub fn counter_delta(old: &Value, new: &Value) -> Option<Value> {
    let num = |v: &Value| match v {
        Value::Null => Some(Value::Int(0)),
        Value::Int(_) | Value::Float(_) | Value::Decimal(_) => Some(v.clone()),
        _ => None,
    };
    let dec = |v: &Value| match v {
        Value::Int(i) => Some(Decimal::from_i64(*i)),
        Value::Decimal(s) => Decimal::parse(s),
        _ => None,
    };
    let float = |v: &Value| match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(x) => Some(*x),
        Value::Decimal(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    Some(match (num(old)?, num(new)?) {
        (Value::Int(a), Value::Int(b)) => match b.checked_sub(a) {
            Some(d) => Value::Int(d),
            None => Value::Decimal((i128::from(b) - i128::from(a)).to_string()),
        },
        (a @ Value::Float(_), b) | (a, b @ Value::Float(_)) => {
            Value::Float(float(&b)? - float(&a)?)
        }
        (a, b) => Value::Decimal(dec(&b)?.add(&dec(&a)?.negated()).to_text()),
    })
}

/// The exact sum of counter deltas, taken in the order given (callers pass
/// them sorted by op id); `None` when no delta counts. Rules: [`Strategy::Sum`].
pub(crate) fn sum<'a>(deltas: impl Iterator<Item = &'a Value> + Clone) -> Option<Value> {
    // All integers (the usual counter): the exact total without a buffer.
    let mut ints = 0i128;
    let mut any = false;
    if deltas.clone().all(|d| match d {
        Value::Int(i) => {
            ints = ints.saturating_add(i128::from(*i));
            any = true;
            true
        }
        _ => false,
    }) {
        let clamped = ints.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        return any.then_some(Value::Int(clamped as i64));
    }
    enum Term<'v> {
        Int(i64),
        Float(f64),
        Dec(Decimal, &'v str),
    }
    let terms: Vec<Term> = deltas
        .filter_map(|d| match d {
            Value::Int(i) => Some(Term::Int(*i)),
            Value::Float(x) => Some(Term::Float(*x)),
            Value::Decimal(s) => Decimal::parse(s).map(|p| Term::Dec(p, s)),
            _ => None,
        })
        .collect();
    if terms.iter().any(|t| matches!(t, Term::Float(_))) {
        let mut acc = -0.0f64;
        for t in &terms {
            acc += match t {
                Term::Int(i) => *i as f64,
                Term::Float(x) => *x,
                Term::Dec(_, s) => s.parse::<f64>().unwrap_or(0.0),
            };
        }
        Some(Value::Float(acc))
    } else if terms.iter().any(|t| matches!(t, Term::Dec(..))) {
        let mut acc: Option<Decimal> = None;
        for t in terms {
            let term = match t {
                Term::Int(i) => Decimal::from_i64(i),
                Term::Dec(d, _) => d,
                Term::Float(_) => continue,
            };
            acc = Some(match acc {
                None => term,
                Some(a) => a.add(&term),
            });
        }
        acc.map(|a| Value::Decimal(a.to_text()))
    } else if terms.is_empty() {
        None
    } else {
        let mut acc = 0i128;
        for t in &terms {
            if let Term::Int(i) = t {
                acc = acc.saturating_add(i128::from(*i));
            }
        }
        let clamped = acc.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
        Some(Value::Int(clamped as i64))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
    }

    /// Picks among `(origin, hlc time, value)` and returns the winner's value.
    fn winner(strategy: &Strategy, rules: &TableRules, cands: &[(&str, u64, Value)]) -> Value {
        let ids: Vec<(OpId, Hlc)> = cands
            .iter()
            .map(|(n, t, _)| (id(n, 1), Hlc { time: *t, id: 1 }))
            .collect();
        let c = cands
            .iter()
            .zip(&ids)
            .map(|((_, _, v), (op, hlc))| Cand { op, hlc, value: v });
        pick(strategy, rules, c).unwrap().value.clone()
    }

    #[test]
    fn nan_in_max_and_min() {
        let r = TableRules::default();
        let nan = Value::Float(f64::NAN);
        let cands = [
            ("a", 1, Value::Float(f64::INFINITY)),
            ("b", 2, nan.clone()),
            ("c", 3, Value::Float(-1.0)),
        ];
        assert_eq!(winner(&Strategy::Max, &r, &cands), nan);
        assert_eq!(winner(&Strategy::Min, &r, &cands), Value::Float(-1.0));
        let neg_nan = Value::Float(-f64::NAN);
        let cands = [
            ("a", 1, neg_nan.clone()),
            ("b", 2, Value::Float(f64::NEG_INFINITY)),
        ];
        assert_eq!(winner(&Strategy::Min, &r, &cands), neg_nan);
        assert_eq!(
            winner(&Strategy::Max, &r, &cands),
            Value::Float(f64::NEG_INFINITY)
        );
        // NaN ties with NaN: the later HLC wins, the value is the same.
        let cands = [("a", 5, nan.clone()), ("b", 2, nan.clone())];
        assert_eq!(winner(&Strategy::Max, &r, &cands), nan);
    }

    #[test]
    fn null_loses_in_max_and_min_and_equal_values_tie_break_by_hlc() {
        let r = TableRules::default();
        let cands = [
            ("a", 9, Value::Null),
            ("b", 1, Value::Int(7)),
            ("c", 2, Value::Int(3)),
        ];
        assert_eq!(winner(&Strategy::Max, &r, &cands), Value::Int(7));
        assert_eq!(winner(&Strategy::Min, &r, &cands), Value::Int(3));
        let all_null = [("a", 1, Value::Null), ("b", 2, Value::Null)];
        assert_eq!(winner(&Strategy::Min, &r, &all_null), Value::Null);
        // Decimals compare numerically, then by text.
        let decs = [
            ("a", 1, Value::Decimal("9".into())),
            ("b", 2, Value::Decimal("10".into())),
            ("c", 3, Value::Decimal("x".into())),
        ];
        assert_eq!(
            winner(&Strategy::Min, &r, &decs),
            Value::Decimal("9".into())
        );
        assert_eq!(
            winner(&Strategy::Max, &r, &decs),
            Value::Decimal("x".into())
        );
        let ties = [
            ("a", 1, Value::Decimal("1.50".into())),
            ("b", 2, Value::Decimal("1.5".into())),
        ];
        assert_eq!(
            winner(&Strategy::Max, &r, &ties),
            Value::Decimal("1.50".into())
        );
    }

    #[test]
    fn values_outside_the_priority_list_rank_last() {
        let r = TableRules::default();
        let s = Strategy::PriorityOrder(vec!["active".into(), "pending".into(), "3".into()]);
        let t = |x: &str| Value::Text(x.into());
        let cands = [
            ("a", 9, t("deleted")),
            ("b", 1, t("pending")),
            ("c", 2, Value::Null),
        ];
        assert_eq!(winner(&s, &r, &cands), t("pending"));
        // Two unlisted values: the later HLC wins.
        let cands = [
            ("a", 9, t("deleted")),
            ("b", 1, t("zzz")),
            ("c", 2, Value::Null),
        ];
        assert_eq!(winner(&s, &r, &cands), t("deleted"));
        // Ints match by their digits; floats never match; text "3" and int 3
        // rank the same, so the HLC decides.
        let cands = [("a", 1, Value::Int(3)), ("b", 2, Value::Float(3.0))];
        assert_eq!(winner(&s, &r, &cands), Value::Int(3));
        let cands = [("a", 1, Value::Int(3)), ("b", 2, t("3"))];
        assert_eq!(winner(&s, &r, &cands), t("3"));
        let cands = [("a", 1, t("active")), ("b", 2, t("Active"))];
        assert_eq!(winner(&s, &r, &cands), t("active"), "matching is exact");
    }

    #[test]
    fn source_priority_then_hlc_and_unlisted_nodes_rank_zero() {
        let mut r = TableRules::default();
        r.priorities.insert(NodeId::new("a").unwrap(), 10);
        r.priorities.insert(NodeId::new("c").unwrap(), -1);
        let cands = [
            ("a", 1, Value::Int(1)),
            ("b", 5, Value::Int(2)),
            ("c", 9, Value::Int(3)),
        ];
        for s in [Strategy::SourcePriority, Strategy::Merge] {
            assert_eq!(winner(&s, &r, &cands), Value::Int(1));
        }
        let cands = [("b", 5, Value::Int(2)), ("c", 9, Value::Int(3))];
        assert_eq!(winner(&Strategy::Merge, &r, &cands), Value::Int(2));
        assert_eq!(winner(&Strategy::LastWriteWins, &r, &cands), Value::Int(3));
    }

    #[test]
    fn int_sum_saturates_once_on_the_exact_total() {
        let v = |xs: &[i64]| xs.iter().map(|x| Value::Int(*x)).collect::<Vec<_>>();
        let s = |xs: Vec<Value>| sum(xs.iter());
        assert_eq!(s(v(&[i64::MAX, 1])), Some(Value::Int(i64::MAX)));
        assert_eq!(s(v(&[i64::MIN, -1, -5])), Some(Value::Int(i64::MIN)));
        // Past the range and back: exact, in any order.
        assert_eq!(s(v(&[i64::MAX, 10, -20])), Some(Value::Int(i64::MAX - 10)));
        assert_eq!(s(v(&[-20, i64::MAX, 10])), Some(Value::Int(i64::MAX - 10)));
        assert_eq!(
            s(v(&[i64::MAX, i64::MAX, i64::MIN, i64::MIN])),
            Some(Value::Int(-2))
        );
        assert_eq!(s(vec![Value::Null, Value::Text("1".into())]), None);
    }

    #[test]
    fn counter_deltas_are_exact() {
        let d = |s: &str| Value::Decimal(s.into());
        assert_eq!(counter_delta(&d("10.25"), &d("12.5")), Some(d("2.25")));
        assert_eq!(counter_delta(&d("12.50"), &d("10.25")), Some(d("-2.25")));
        assert_eq!(counter_delta(&Value::Null, &d("0.10")), Some(d("0.10")));
        assert_eq!(counter_delta(&d("1.5"), &Value::Int(3)), Some(d("1.5")));
        assert_eq!(counter_delta(&d("2.00"), &d("2.00")), Some(d("0.00")));
        // 0.1 + 0.2 style values stay exact.
        assert_eq!(
            counter_delta(&d("0.1"), &d("0.3")),
            Some(d("0.2")),
            "no float rounding"
        );
        assert_eq!(
            counter_delta(&Value::Int(i64::MIN), &Value::Int(i64::MAX)),
            Some(d("18446744073709551615"))
        );
        assert_eq!(
            counter_delta(&Value::Int(1), &Value::Int(4)),
            Some(Value::Int(3))
        );
        assert_eq!(
            counter_delta(&Value::Float(0.5), &d("2")),
            Some(Value::Float(1.5))
        );
        assert_eq!(
            counter_delta(&Value::Text("x".into()), &Value::Int(1)),
            None
        );
        assert_eq!(counter_delta(&d("1e5"), &d("2")), None);
    }

    #[test]
    fn decimal_and_float_sums() {
        let d = |x: &str| Value::Decimal(x.into());
        let terms = [d("-12.340"), Value::Int(2), d("0.005"), d("nonsense")];
        assert_eq!(sum(terms.iter()), Some(d("-10.335")));
        let f = [
            Value::Float(0.1),
            Value::Float(0.2),
            Value::Int(1),
            d("0.5"),
        ];
        assert_eq!(sum(f.iter()), Some(Value::Float(((0.1 + 0.2) + 1.0) + 0.5)));
        assert_eq!(
            sum([Value::Float(-0.0)].iter()),
            Some(Value::Float(-0.0)),
            "a lone -0.0 stays -0.0"
        );
    }
}
