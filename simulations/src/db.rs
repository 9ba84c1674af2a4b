//! A faithful in-memory stand-in for the database behind a node.
//!
//! It follows the contract of `syncmesh_node::sqlite::SqliteAdapter`:
//!
//! - tables of full rows (every column present; NULL is [`Value::Null`]),
//!   keyed by primary-key values;
//! - every *local* write (the user's own connection) is recorded in a change
//!   log as a [`CapturedChange`] with the full old and new rows, as the
//!   capture triggers do, with change ids that increase and are never reused
//!   (`AUTOINCREMENT`), also after consumed changes are deleted;
//! - [`SimDb::apply`] writes [`RowWrite`]s in one atomic step *without*
//!   recording them (the echo-suppression flag) and returns the change-id
//!   watermark at that moment: changes with an id at or below it were
//!   committed before the apply, later ones after;
//! - `INSERT OR REPLACE` of an existing key is captured as an `Insert` with
//!   no old row (SQLite fires no delete trigger without
//!   `recursive_triggers`);
//! - a local write that would violate the primary key is refused, as the
//!   database would refuse it, and records nothing.
//!
//! The database lives outside the node process: a simulated node crash
//! leaves it, and its unconsumed change rows, untouched.

use std::collections::BTreeMap;

use syncmesh_node::adapter::{CapturedChange, ChangeKind, RowWrite, TableSchema};
use syncmesh_resolver::Value;

/// A full row: every column of the table.
pub type Row = BTreeMap<String, Value>;

/// The rows of one table by primary key.
pub type Rows = BTreeMap<Vec<Value>, Row>;

/// A write the database refused (the caller's bug, or a constraint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug)]
struct Table {
    schema: TableSchema,
    rows: Rows,
}

/// One database: tables, a change log, and a change-id sequence.
#[derive(Clone, Debug)]
pub struct SimDb {
    tables: BTreeMap<String, Table>,
    changes: BTreeMap<i64, CapturedChange>,
    last_change_id: i64,
    capture: bool,
}

impl SimDb {
    /// An empty database with `schemas`; `capture` = capture triggers are
    /// installed (not on a subscribe-only replica).
    pub fn new(schemas: &[TableSchema], capture: bool) -> Self {
        SimDb {
            tables: schemas
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        Table {
                            schema: s.clone(),
                            rows: Rows::new(),
                        },
                    )
                })
                .collect(),
            changes: BTreeMap::new(),
            last_change_id: 0,
            capture,
        }
    }

    fn table(&self, name: &str) -> Result<&Table, DbError> {
        self.tables
            .get(name)
            .ok_or_else(|| DbError(format!("no such table: {name}")))
    }

    fn table_mut(&mut self, name: &str) -> Result<&mut Table, DbError> {
        self.tables
            .get_mut(name)
            .ok_or_else(|| DbError(format!("no such table: {name}")))
    }

    /// A full row of `schema` from `row`: absent columns become NULL,
    /// unknown columns are an error.
    fn normalize(schema: &TableSchema, row: &Row) -> Result<Row, DbError> {
        if let Some(c) = row
            .keys()
            .find(|c| !schema.columns.iter().any(|col| &col.name == *c))
        {
            return Err(DbError(format!(
                "table {} has no column named {c}",
                schema.name
            )));
        }
        Ok(schema
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    row.get(&c.name).cloned().unwrap_or(Value::Null),
                )
            })
            .collect())
    }

    fn key_of(schema: &TableSchema, row: &Row) -> Vec<Value> {
        schema
            .key
            .iter()
            .map(|k| row.get(k).cloned().unwrap_or(Value::Null))
            .collect()
    }

    fn record(&mut self, table: &str, kind: ChangeKind, old: Option<Row>, new: Option<Row>) -> i64 {
        self.last_change_id += 1;
        let id = self.last_change_id;
        if self.capture {
            self.changes.insert(
                id,
                CapturedChange {
                    change_id: id,
                    table: table.to_owned(),
                    kind,
                    old,
                    new,
                },
            );
        }
        id
    }

    /// The row with `key`, if any.
    pub fn get(&self, table: &str, key: &[Value]) -> Option<&Row> {
        self.tables.get(table).and_then(|t| t.rows.get(key))
    }

    /// Every row of `table` in key order.
    pub fn rows(&self, table: &str) -> Option<&Rows> {
        self.tables.get(table).map(|t| &t.rows)
    }

    /// The schemas of every table.
    pub fn schemas(&self) -> impl Iterator<Item = &TableSchema> {
        self.tables.values().map(|t| &t.schema)
    }

    /// A local `INSERT`: refused if the key exists. Returns the captured
    /// change (if capture is installed).
    pub fn insert(&mut self, table: &str, row: &Row) -> Result<Option<CapturedChange>, DbError> {
        let t = self.table(table)?;
        let row = Self::normalize(&t.schema, row)?;
        let key = Self::key_of(&t.schema, &row);
        if t.rows.contains_key(&key) {
            return Err(DbError(format!("UNIQUE constraint failed: {table} key")));
        }
        self.table_mut(table)?.rows.insert(key, row.clone());
        let id = self.record(table, ChangeKind::Insert, None, Some(row));
        Ok(self.changes.get(&id).cloned())
    }

    /// A local `INSERT OR REPLACE`: captured as an `Insert` with no old row
    /// whether or not the key existed.
    pub fn replace(&mut self, table: &str, row: &Row) -> Result<Option<CapturedChange>, DbError> {
        let t = self.table(table)?;
        let row = Self::normalize(&t.schema, row)?;
        let key = Self::key_of(&t.schema, &row);
        self.table_mut(table)?.rows.insert(key, row.clone());
        let id = self.record(table, ChangeKind::Insert, None, Some(row));
        Ok(self.changes.get(&id).cloned())
    }

    /// A local `UPDATE` of the row at `key` to `new` (a full row; it may
    /// change the key, refused if the new key is taken by another row).
    /// An update that changes nothing is still captured, as a trigger does.
    pub fn update(
        &mut self,
        table: &str,
        key: &[Value],
        new: &Row,
    ) -> Result<Option<CapturedChange>, DbError> {
        let t = self.table(table)?;
        let new = Self::normalize(&t.schema, new)?;
        let new_key = Self::key_of(&t.schema, &new);
        let Some(old) = t.rows.get(key).cloned() else {
            return Err(DbError(format!("update of a missing row of {table}")));
        };
        if new_key.as_slice() != key && t.rows.contains_key(&new_key) {
            return Err(DbError(format!("UNIQUE constraint failed: {table} key")));
        }
        let rows = &mut self.table_mut(table)?.rows;
        rows.remove(key);
        rows.insert(new_key, new.clone());
        let id = self.record(table, ChangeKind::Update, Some(old), Some(new));
        Ok(self.changes.get(&id).cloned())
    }

    /// A local `DELETE` of the row at `key`.
    pub fn delete(
        &mut self,
        table: &str,
        key: &[Value],
    ) -> Result<Option<CapturedChange>, DbError> {
        let Some(old) = self.table_mut(table)?.rows.remove(key) else {
            return Err(DbError(format!("delete of a missing row of {table}")));
        };
        let id = self.record(table, ChangeKind::Delete, Some(old), None);
        Ok(self.changes.get(&id).cloned())
    }

    /// Up to `limit` change rows with `id > after`, in id order
    /// (`SqliteAdapter::read_changes`).
    pub fn read_changes(&self, after: i64, limit: usize) -> Vec<CapturedChange> {
        self.changes
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Deletes change rows with `id <= through`
    /// (`SqliteAdapter::delete_changes_through`).
    pub fn delete_changes_through(&mut self, through: i64) {
        self.changes = self.changes.split_off(&through.saturating_add(1));
    }

    /// Change rows with an id above `after` (not yet consumed).
    pub fn pending_changes_after(&self, after: i64) -> usize {
        self.changes.range(after.saturating_add(1)..).count()
    }

    /// The highest change id ever assigned (`SqliteAdapter::change_watermark`).
    pub fn change_watermark(&self) -> i64 {
        self.last_change_id
    }

    /// Writes `writes` atomically without capturing them and returns the
    /// change-id watermark at that moment (`SqliteAdapter::apply`). Every
    /// write is checked first: an unknown table or column or a key of the
    /// wrong length writes nothing.
    pub fn apply(&mut self, writes: &[RowWrite]) -> Result<i64, DbError> {
        let mut planned = Vec::with_capacity(writes.len());
        for w in writes {
            let t = self.table(&w.table)?;
            if w.key.len() != t.schema.key.len() {
                return Err(DbError(format!(
                    "write to {} has {} key values, the key has {}",
                    w.table,
                    w.key.len(),
                    t.schema.key.len()
                )));
            }
            let row = match &w.row {
                None => None,
                Some(r) => {
                    let mut full = Self::normalize(&t.schema, r)?;
                    for (k, v) in t.schema.key.iter().zip(&w.key) {
                        full.insert(k.clone(), v.clone());
                    }
                    Some(full)
                }
            };
            planned.push((w.table.clone(), w.key.clone(), row));
        }
        for (table, key, row) in planned {
            let rows = &mut self.table_mut(&table)?.rows;
            match row {
                Some(r) => rows.insert(key, r),
                None => rows.remove(&key),
            };
        }
        Ok(self.last_change_id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use syncmesh_node::adapter::ColumnInfo;

    fn schema() -> TableSchema {
        let col = |n: &str| ColumnInfo {
            name: n.into(),
            decl_type: "ANY".into(),
            not_null: false,
        };
        TableSchema {
            name: "t".into(),
            columns: vec![col("id"), col("a")],
            key: vec!["id".into()],
        }
    }

    fn row(id: i64, a: i64) -> Row {
        Row::from([("id".into(), Value::Int(id)), ("a".into(), Value::Int(a))])
    }

    #[test]
    fn local_writes_are_captured_applies_are_not_and_ids_are_never_reused() {
        let mut db = SimDb::new(&[schema()], true);
        db.insert("t", &row(1, 1)).unwrap();
        assert!(db.insert("t", &row(1, 2)).is_err(), "primary key");
        db.update("t", &[Value::Int(1)], &row(2, 5)).unwrap();
        db.delete("t", &[Value::Int(2)]).unwrap();
        let ch = db.read_changes(0, 10);
        assert_eq!(
            ch.iter().map(|c| c.kind).collect::<Vec<_>>(),
            vec![ChangeKind::Insert, ChangeKind::Update, ChangeKind::Delete]
        );
        assert_eq!(ch[1].old, Some(row(1, 1)));
        db.delete_changes_through(3);
        assert_eq!(db.pending_changes_after(0), 0);
        let wm = db
            .apply(&[RowWrite {
                table: "t".into(),
                key: vec![Value::Int(9)],
                row: Some(Row::from([("a".into(), Value::Int(7))])),
            }])
            .unwrap();
        assert_eq!(wm, 3);
        assert_eq!(db.get("t", &[Value::Int(9)]), Some(&row(9, 7)));
        assert_eq!(db.pending_changes_after(0), 0, "no echo");
        db.replace("t", &row(9, 8)).unwrap();
        let ch = db.read_changes(3, 10);
        assert_eq!((ch[0].change_id, ch[0].kind), (4, ChangeKind::Insert));
        assert!(ch[0].old.is_none());
        assert!(
            db.apply(&[RowWrite {
                table: "t".into(),
                key: vec![Value::Int(1)],
                row: Some(Row::from([("zz".into(), Value::Int(7))])),
            }])
            .is_err()
        );
    }
}
