//! The synced tables, the random local writes, and what each local write
//! must become in the log (the oracle of "no lost write, no echo").
//!
//! Three tables, small key spaces so that concurrent writes to one row are
//! common:
//!
//! | table      | key           | rules                                  |
//! |------------|---------------|----------------------------------------|
//! | `items`    | `id`          | `TableRules::default()` (delete wins)  |
//! | `notes`    | `owner`, `n`  | `DeletePolicy::UpdateWins`             |
//! | `profiles` | `id`          | delete wins, `Granularity::Row`        |
//! | `counters` | `id`          | every other strategy, see below        |
//!
//! `items`, `notes` and `profiles` use `last_write_wins`. `counters` has one
//! field per remaining strategy: `total` is a `sum` (users increment it),
//! `hi` `max`, `lo` `min`, `status` `priority_order: [active, pending,
//! inactive]`, `owner` `source_priority` and `note` `merge` (node `nI` has
//! rank `I`). Its rows are never deleted or re-keyed, so the true total of
//! a counter is the sum of every increment any user made
//! ([`crate::check`] checks it on every replica).

use std::collections::BTreeMap;

use syncmesh_node::adapter::{CapturedChange, ChangeKind, ColumnInfo, TableSchema};
use syncmesh_node::core::TableInfo;
use syncmesh_resolver::{
    DeletePolicy, Granularity, NodeId, Op, OpKind, Strategy, TableRules, Value, VersionVector,
};

use crate::db::{Row, SimDb};
use crate::rng::Rng;

/// The tables every node syncs.
pub fn tables() -> Vec<TableInfo> {
    let col = |n: &str, t: &str| ColumnInfo {
        name: n.into(),
        decl_type: t.into(),
        not_null: false,
    };
    vec![
        TableInfo {
            schema: TableSchema {
                name: "items".into(),
                columns: vec![
                    col("id", "INTEGER"),
                    col("name", "TEXT"),
                    col("qty", "INTEGER"),
                    col("price", "REAL"),
                ],
                key: vec!["id".into()],
            },
            rules: TableRules::default(),
        },
        TableInfo {
            schema: TableSchema {
                name: "notes".into(),
                columns: vec![
                    col("owner", "TEXT"),
                    col("n", "INTEGER"),
                    col("body", "TEXT"),
                    col("tag", "TEXT"),
                ],
                key: vec!["owner".into(), "n".into()],
            },
            rules: TableRules {
                deletes: DeletePolicy::UpdateWins,
                ..TableRules::default()
            },
        },
        TableInfo {
            schema: TableSchema {
                name: "profiles".into(),
                columns: vec![col("id", "INTEGER"), col("a", "INTEGER"), col("b", "TEXT")],
                key: vec!["id".into()],
            },
            rules: TableRules {
                granularity: Granularity::Row,
                ..TableRules::default()
            },
        },
        TableInfo {
            schema: TableSchema {
                name: COUNTERS.into(),
                columns: vec![
                    col("id", "INTEGER"),
                    col("total", "INTEGER"),
                    col("hi", "INTEGER"),
                    col("lo", "INTEGER"),
                    col("status", "TEXT"),
                    col("owner", "TEXT"),
                    col("note", "TEXT"),
                ],
                key: vec!["id".into()],
            },
            rules: TableRules {
                fields: [
                    ("total", Strategy::Sum),
                    ("hi", Strategy::Max),
                    ("lo", Strategy::Min),
                    (
                        "status",
                        Strategy::PriorityOrder(vec![
                            "active".into(),
                            "pending".into(),
                            "inactive".into(),
                        ]),
                    ),
                    ("owner", Strategy::SourcePriority),
                    ("note", Strategy::Merge),
                ]
                .into_iter()
                .map(|(f, s)| (f.to_owned(), s))
                .collect(),
                priorities: (0..8)
                    .filter_map(|i| Some((NodeId::new(format!("n{i}")).ok()?, i)))
                    .collect(),
                ..TableRules::default()
            },
        },
    ]
}

/// The table whose `total` column is a counter.
pub const COUNTERS: &str = "counters";
/// The counter column of [`COUNTERS`].
pub const TOTAL: &str = "total";

/// Every key of `table` the workload uses.
fn key_space(table: &str) -> Vec<Vec<Value>> {
    match table {
        "items" => (1..=8).map(|i| vec![Value::Int(i)]).collect(),
        "notes" => ["a", "b"]
            .iter()
            .flat_map(|o| (1..=3).map(move |n| vec![Value::Text((*o).into()), Value::Int(n)]))
            .collect(),
        COUNTERS => (1..=4).map(|i| vec![Value::Int(i)]).collect(),
        _ => (1..=5).map(|i| vec![Value::Int(i)]).collect(),
    }
}

fn random_value(r: &mut Rng, column: &str) -> Value {
    match column {
        "name" | "body" | "b" => {
            if r.chance(0.1) {
                Value::Null
            } else {
                const WORDS: [&str; 8] = ["ant", "bee", "cat", "dog", "eel", "fox", "", "ünï"];
                Value::Text(WORDS[r.index(WORDS.len())].into())
            }
        }
        "owner" | "note" => {
            const WORDS: [&str; 4] = ["ann", "bob", "cy", "dee"];
            Value::Text(WORDS[r.index(WORDS.len())].into())
        }
        "status" => {
            const STATES: [&str; 4] = ["active", "pending", "inactive", "other"];
            if r.chance(0.1) {
                Value::Null
            } else {
                Value::Text(STATES[r.index(STATES.len())].into())
            }
        }
        "hi" | "lo" => {
            if r.chance(0.1) {
                Value::Null
            } else {
                Value::Int(r.below(50) as i64)
            }
        }
        "tag" => {
            if r.chance(0.3) {
                Value::Null
            } else {
                Value::Text(format!("t{}", r.below(4)))
            }
        }
        "price" => {
            const FLOATS: [f64; 6] = [0.0, -0.0, 0.1, 1.5, 1e300, -2.25];
            if r.chance(0.1) {
                Value::Null
            } else {
                Value::Float(FLOATS[r.index(FLOATS.len())])
            }
        }
        _ => Value::Int(r.below(20) as i64 - 5),
    }
}

fn random_row(r: &mut Rng, schema: &TableSchema, key: &[Value]) -> Row {
    schema
        .columns
        .iter()
        .map(|c| match schema.key.iter().position(|k| k == &c.name) {
            Some(i) => (c.name.clone(), key[i].clone()),
            None => (c.name.clone(), random_value(r, &c.name)),
        })
        .collect()
}

/// What one op made from a local write must look like.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedOp {
    /// The change it comes from.
    pub change_id: i64,
    /// Table.
    pub table: String,
    /// Primary key.
    pub key: Vec<Value>,
    /// `Some(fields in column order)` for an upsert, `None` for a delete.
    pub fields: Option<Vec<(String, Value)>>,
    /// The ops of other origins the node held when the user wrote: the
    /// most this write can have seen.
    pub seen: VersionVector,
    /// For each `sum` field the op writes: new − old as the user's
    /// database saw it (NULL counts as 0).
    pub deltas: BTreeMap<String, i64>,
}

impl ExpectedOp {
    /// Whether `op` is exactly this write (table, key, kind, fields).
    pub fn matches(&self, op: &Op) -> bool {
        if op.table != self.table || op.key != self.key {
            return false;
        }
        match (&self.fields, op.kind) {
            (None, OpKind::Delete) => op.fields.is_empty(),
            (Some(f), OpKind::Upsert) => {
                op.fields.len() == f.len()
                    && op.fields.iter().zip(f).all(|(w, (n, v))| {
                        &w.name == n
                            && same_bits(&w.value, v)
                            && w.delta == self.deltas.get(n).map(|d| Value::Int(*d))
                    })
            }
            _ => false,
        }
    }
}

/// Value equality that also tells `0.0` from `-0.0` (the resolver's order
/// already does; this states it).
pub fn same_bits(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

/// The ops a captured change must produce, written from the design, not
/// from the core: an insert writes every column; an update of the same key
/// writes the changed columns (every column under row granularity; nothing
/// if nothing changed under field granularity); an update that changes the
/// key is a delete of the old key and an insert of the new; a delete is a
/// delete.
pub fn expected_ops(
    info: &TableInfo,
    ch: &CapturedChange,
    seen: &VersionVector,
) -> Vec<ExpectedOp> {
    let s = &info.schema;
    let key_of = |r: &Row| -> Vec<Value> {
        s.key
            .iter()
            .map(|k| r.get(k).cloned().unwrap_or(Value::Null))
            .collect()
    };
    let full = |r: &Row| -> Vec<(String, Value)> {
        s.columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    r.get(&c.name).cloned().unwrap_or(Value::Null),
                )
            })
            .collect()
    };
    let int = |r: Option<&Row>, c: &str| match r.and_then(|r| r.get(c)) {
        Some(Value::Int(i)) => *i,
        _ => 0,
    };
    let op = |key, fields: Option<Vec<(String, Value)>>, old: Option<&Row>| ExpectedOp {
        change_id: ch.change_id,
        table: s.name.clone(),
        key,
        deltas: fields
            .iter()
            .flatten()
            .filter(|(c, _)| *info.rules.strategy(c) == Strategy::Sum)
            .map(|(c, _)| (c.clone(), int(ch.new.as_ref(), c) - int(old, c)))
            .collect(),
        fields,
        seen: seen.clone(),
    };
    match (ch.kind, &ch.old, &ch.new) {
        (ChangeKind::Insert, _, Some(new)) => vec![op(key_of(new), Some(full(new)), None)],
        (ChangeKind::Delete, Some(old), _) => vec![op(key_of(old), None, Some(old))],
        (ChangeKind::Update, Some(old), Some(new)) => {
            if key_of(old) != key_of(new) {
                vec![
                    op(key_of(old), None, Some(old)),
                    op(key_of(new), Some(full(new)), None),
                ]
            } else {
                let fields: Vec<_> = if info.rules.granularity == Granularity::Row {
                    full(new)
                } else {
                    full(new)
                        .into_iter()
                        .filter(|(c, v)| !same_bits(old.get(c).unwrap_or(&Value::Null), v))
                        .collect()
                };
                if fields.is_empty() {
                    Vec::new()
                } else {
                    vec![op(key_of(new), Some(fields), Some(old))]
                }
            }
        }
        _ => Vec::new(),
    }
}

/// A local write the workload made (for the trace).
#[derive(Clone, Debug, PartialEq)]
pub struct WriteSummary {
    /// Change id in the node's change log.
    pub change_id: i64,
    /// insert / replace / update / noop-update / rekey / delete.
    pub what: &'static str,
    /// Table.
    pub table: String,
    /// Key written.
    pub key: Vec<Value>,
}

/// Makes one random local write on `db` (aimed at `target` if given) and
/// returns the captured change and a summary. `None` if the database
/// refused it (nothing changed).
pub fn random_write(
    r: &mut Rng,
    db: &mut SimDb,
    infos: &[TableInfo],
    target: Option<(&str, &[Value])>,
) -> Option<(CapturedChange, WriteSummary)> {
    let info = match target {
        Some((t, _)) => infos.iter().find(|i| i.schema.name == t)?,
        None => &infos[r.index(infos.len())],
    };
    let s = &info.schema;
    let keys = key_space(&s.name);
    let key = match target {
        Some((_, k)) => k.to_vec(),
        None => keys[r.index(keys.len())].clone(),
    };
    let existing = db.get(&s.name, &key).cloned();
    let (res, what, key_written) = match existing {
        None => (db.insert(&s.name, &random_row(r, s, &key)), "insert", key),
        // Counters are never deleted or re-keyed: users increment them and
        // edit the other fields.
        Some(old) if s.name == COUNTERS => {
            let mut new = old.clone();
            let total = match old.get(TOTAL) {
                Some(Value::Int(t)) => *t,
                _ => 0,
            };
            new.insert(TOTAL.into(), Value::Int(total + r.below(9) as i64 - 3));
            let what = if r.chance(0.5) {
                "increment"
            } else {
                for c in ["hi", "lo", "status", "owner", "note"] {
                    if r.chance(0.4) {
                        new.insert(c.into(), random_value(r, c));
                    }
                }
                "update"
            };
            (db.update(&s.name, &key, &new), what, key)
        }
        Some(old) => {
            let roll = r.below(100);
            if roll < 10 {
                (db.update(&s.name, &key, &old), "noop-update", key)
            } else if roll < 20 {
                (db.replace(&s.name, &random_row(r, s, &key)), "replace", key)
            } else if roll < 27 {
                let free: Vec<&Vec<Value>> = keys
                    .iter()
                    .filter(|k| db.get(&s.name, k).is_none())
                    .collect();
                if free.is_empty() {
                    (db.delete(&s.name, &key), "delete", key)
                } else {
                    let nk = free[r.index(free.len())].clone();
                    let mut new = old.clone();
                    for (c, v) in s.key.iter().zip(&nk) {
                        new.insert(c.clone(), v.clone());
                    }
                    (db.update(&s.name, &key, &new), "rekey", nk)
                }
            } else if roll < 45 {
                (db.delete(&s.name, &key), "delete", key)
            } else {
                let mut new = old.clone();
                let non_key: Vec<&ColumnInfo> = s
                    .columns
                    .iter()
                    .filter(|c| !s.key.contains(&c.name))
                    .collect();
                let n = 1 + r.index(non_key.len());
                for _ in 0..n {
                    let c = non_key[r.index(non_key.len())];
                    new.insert(c.name.clone(), random_value(r, &c.name));
                }
                (db.update(&s.name, &key, &new), "update", key)
            }
        }
    };
    let ch = res.ok()??;
    Some((
        ch.clone(),
        WriteSummary {
            change_id: ch.change_id,
            what,
            table: s.name.clone(),
            key: key_written,
        },
    ))
}

/// Counts of each kind of local write (for reports).
pub type WriteCounts = BTreeMap<&'static str, u64>;
