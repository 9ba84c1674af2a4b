//! Row state: multi-value registers per field, tombstones, and the rules that
//! pick the visible row.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use crate::{Hlc, Op, OpId, OpKind, Value};

/// How concurrent writes of a field are resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// The write with the highest HLC wins.
    #[default]
    LastWriteWins,
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
    /// The whole row is one register: every upsert writes every column, so
    /// all fields share one set of concurrent writes and one winner.
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
}

impl TableRules {
    /// The strategy of `field`.
    pub fn strategy(&self, field: &str) -> &Strategy {
        self.fields.get(field).unwrap_or(&self.default_strategy)
    }
}

/// A visible row: column name to value (columns without a live write are
/// absent and read as NULL).
pub type VisibleRow = BTreeMap<String, Value>;

/// One live write of a field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was written.
    pub hlc: Hlc,
    /// The value written.
    pub value: Value,
}

/// What a superseded id covers: every write of that op in this row, or only
/// its write of one field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Scope {
    Row,
    Field(String),
}

/// The merged state of one row: a pure function of the set of ops applied.
///
/// Per field, the writes that no applied op lists in its `pred` (a
/// multi-value register); the deletes no later upsert superseded; and the ids
/// already superseded, so a write that arrives after its successor is
/// discarded on arrival. [`RowState::apply`] is commutative, associative and
/// idempotent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowState {
    fields: BTreeMap<String, BTreeMap<OpId, Entry>>,
    tombstones: BTreeMap<OpId, Hlc>,
    superseded: BTreeSet<(OpId, Scope)>,
}

impl RowState {
    fn is_superseded(&self, id: &OpId, field: Option<&str>) -> bool {
        // Range over all scopes of `id`: (id, Row) sorts before (id, Field(_)).
        if self.superseded.contains(&(id.clone(), Scope::Row)) {
            return true;
        }
        match field {
            Some(f) => self
                .superseded
                .contains(&(id.clone(), Scope::Field(f.to_owned()))),
            None => false,
        }
    }

    /// Merges one op into the row. Applying the same op again changes nothing.
    pub fn apply(&mut self, op: &Op) {
        match op.kind {
            OpKind::Upsert => {
                for w in &op.fields {
                    let entries = self.fields.entry(w.name.clone()).or_default();
                    for p in &w.pred {
                        entries.remove(p);
                        self.superseded
                            .insert((p.clone(), Scope::Field(w.name.clone())));
                    }
                }
                for p in &op.row_pred {
                    self.supersede_row(p);
                }
                for w in &op.fields {
                    if !self.is_superseded(&op.id, Some(&w.name)) {
                        self.fields.entry(w.name.clone()).or_default().insert(
                            op.id.clone(),
                            Entry {
                                hlc: op.hlc,
                                value: w.value.clone(),
                            },
                        );
                    }
                }
            }
            OpKind::Delete => {
                for p in &op.row_pred {
                    self.supersede_row(p);
                }
                if !self.is_superseded(&op.id, None) {
                    self.tombstones.insert(op.id.clone(), op.hlc);
                }
            }
        }
        self.fields.retain(|_, e| !e.is_empty());
    }

    fn supersede_row(&mut self, p: &OpId) {
        for entries in self.fields.values_mut() {
            entries.remove(p);
        }
        self.tombstones.remove(p);
        self.superseded.insert((p.clone(), Scope::Row));
    }

    /// The ids a new write of `field` at this replica supersedes.
    pub fn field_pred(&self, field: &str) -> Vec<OpId> {
        self.fields
            .get(field)
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The live tombstones (what a re-insert supersedes).
    pub fn tombstone_pred(&self) -> Vec<OpId> {
        self.tombstones.keys().cloned().collect()
    }

    /// Every live write and tombstone of the row (what a delete supersedes).
    pub fn delete_pred(&self) -> Vec<OpId> {
        let mut ids: BTreeSet<OpId> = self.tombstones.keys().cloned().collect();
        for entries in self.fields.values() {
            ids.extend(entries.keys().cloned());
        }
        ids.into_iter().collect()
    }

    /// Live writes of `field` (more than one means concurrent writes).
    pub fn entries(&self, field: &str) -> impl Iterator<Item = (&OpId, &Entry)> {
        self.fields.get(field).into_iter().flat_map(|e| e.iter())
    }

    /// True when a live delete is present.
    pub fn has_tombstone(&self) -> bool {
        !self.tombstones.is_empty()
    }

    /// The visible row under `rules`, or `None` when the row does not exist.
    pub fn visible(&self, rules: &TableRules) -> Option<VisibleRow> {
        if self.fields.is_empty() {
            return None;
        }
        if self.has_tombstone() && rules.deletes == DeletePolicy::DeleteWins {
            return None;
        }
        let mut row = VisibleRow::new();
        for (name, entries) in &self.fields {
            let winner = match rules.strategy(name) {
                Strategy::LastWriteWins => entries
                    .iter()
                    .max_by(|a, b| (a.1.hlc, a.0).cmp(&(b.1.hlc, b.0))),
            };
            if let Some((_, e)) = winner {
                row.insert(name.clone(), e.value.clone());
            }
        }
        Some(row)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{FieldWrite, NodeId};

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
    }
    fn hlc(t: u64) -> Hlc {
        Hlc { time: t, id: 1 }
    }
    fn w(name: &str, v: i64, pred: Vec<OpId>) -> FieldWrite {
        FieldWrite {
            name: name.into(),
            value: Value::Int(v),
            pred,
            delta: None,
        }
    }

    #[test]
    fn sequential_write_replaces_concurrent_write_resolves_by_hlc() {
        let rules = TableRules::default();
        let a1 = Op::upsert(id("a", 1), hlc(10), "t", vec![], vec![w("x", 1, vec![])]);
        let b1 = Op::upsert(
            id("b", 1),
            hlc(20),
            "t",
            vec![],
            vec![w("x", 2, vec![id("a", 1)])],
        );
        let c1 = Op::upsert(
            id("c", 1),
            hlc(15),
            "t",
            vec![],
            vec![w("x", 3, vec![id("a", 1)])],
        );
        let mut r = RowState::default();
        r.apply(&a1);
        r.apply(&b1);
        assert_eq!(r.entries("x").count(), 1);
        r.apply(&c1);
        assert_eq!(r.entries("x").count(), 2, "b1 and c1 are concurrent");
        assert_eq!(r.visible(&rules).unwrap()["x"], Value::Int(2));
    }

    #[test]
    fn late_predecessor_is_discarded() {
        let a1 = Op::upsert(id("a", 1), hlc(30), "t", vec![], vec![w("x", 1, vec![])]);
        let b1 = Op::upsert(
            id("b", 1),
            hlc(20),
            "t",
            vec![],
            vec![w("x", 2, vec![id("a", 1)])],
        );
        let mut r = RowState::default();
        r.apply(&b1);
        r.apply(&a1);
        assert_eq!(
            r.visible(&TableRules::default()).unwrap()["x"],
            Value::Int(2)
        );
    }

    #[test]
    fn delete_wins_against_concurrent_update_and_reinsert_resurrects() {
        let mut rules = TableRules::default();
        let a1 = Op::upsert(
            id("a", 1),
            hlc(10),
            "t",
            vec![],
            vec![w("x", 1, vec![]), w("y", 1, vec![])],
        );
        let del = Op::delete(id("b", 1), hlc(20), "t", vec![], vec![id("a", 1)]);
        let upd = Op::upsert(
            id("c", 1),
            hlc(30),
            "t",
            vec![],
            vec![w("y", 5, vec![id("a", 1)])],
        );
        let mut r = RowState::default();
        for op in [&a1, &del, &upd] {
            r.apply(op);
        }
        assert_eq!(r.visible(&rules), None);
        rules.deletes = DeletePolicy::UpdateWins;
        let v = r.visible(&rules).unwrap();
        assert_eq!(v.get("y"), Some(&Value::Int(5)));
        assert_eq!(v.get("x"), None);
        let mut re = Op::upsert(
            id("a", 2),
            hlc(40),
            "t",
            vec![],
            vec![w("x", 9, r.field_pred("x")), w("y", 9, r.field_pred("y"))],
        );
        re.row_pred = r.tombstone_pred();
        r.apply(&re);
        rules.deletes = DeletePolicy::DeleteWins;
        assert_eq!(r.visible(&rules).unwrap()["y"], Value::Int(9));
    }
}
