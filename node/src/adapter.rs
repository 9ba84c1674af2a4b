//! Engine-neutral types shared by every database adapter.

use std::collections::BTreeMap;

use syncmesh_resolver::Value;

/// A column of a synced table, as introspected from the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Declared type as the database reports it (e.g. `INTEGER`, `TEXT`).
    pub decl_type: String,
    /// Declared NOT NULL.
    pub not_null: bool,
}

/// A synced table: its columns (in table order) and its primary key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// Table name.
    pub name: String,
    /// All columns in declaration order (key columns included).
    pub columns: Vec<ColumnInfo>,
    /// Primary-key column names, in key order.
    pub key: Vec<String>,
}

impl TableSchema {
    /// Extracts the key values from a full row, in key order (`None` if a
    /// key column is missing).
    pub fn key_of(&self, row: &BTreeMap<String, Value>) -> Option<Vec<Value>> {
        self.key.iter().map(|k| row.get(k).cloned()).collect()
    }
}

/// The kind of a captured change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
}

/// One row of the capture change table: a local write as the database saw
/// it, with the full row before and after.
#[derive(Clone, Debug, PartialEq)]
pub struct CapturedChange {
    /// Position in the change table (strictly increasing).
    pub change_id: i64,
    /// Table name.
    pub table: String,
    /// Insert, update or delete.
    pub kind: ChangeKind,
    /// The full row before the change (update, delete).
    pub old: Option<BTreeMap<String, Value>>,
    /// The full row after the change (insert, update).
    pub new: Option<BTreeMap<String, Value>>,
}

/// A row to make visible in the database: the resolver's visible row, or
/// `None` to delete it.
#[derive(Clone, Debug, PartialEq)]
pub struct RowWrite {
    /// Table name.
    pub table: String,
    /// Primary-key values in key order.
    pub key: Vec<Value>,
    /// The visible row (columns absent from it are written as NULL), or
    /// `None` when the row must not exist.
    pub row: Option<BTreeMap<String, Value>>,
}
