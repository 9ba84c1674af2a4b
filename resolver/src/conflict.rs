//! Conflict records: sets of concurrent writes of one field of one row.
//!
//! [`RowState::conflicts`](crate::RowState::conflicts) computes them as a pure
//! function of the set of ops the row has seen; the exact definition is in
//! the [`RowState`](crate::RowState) docs.

use serde::{Deserialize, Serialize};

use crate::{Hlc, OpId, Value};

/// One of the concurrent writes of a conflict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The write's op (its origin is the node that wrote it).
    pub op: OpId,
    /// When it was written; `None` while its op is not in this replica's op
    /// set (only a later write's `pred` named it so far).
    pub hlc: Option<Hlc>,
    /// The value it wrote; `None` exactly when `hlc` is `None`.
    pub value: Option<Value>,
}

/// A conflict: two or more concurrent writes of one field of one row, and how
/// the field's strategy resolves them. Its identity is `(table, key, field,
/// candidate op ids)`; table and key are known by the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The field (column).
    pub field: String,
    /// The concurrent writes, sorted by op id (at least two).
    pub candidates: Vec<Candidate>,
    /// The field's strategy name (`last_write_wins`, `max`, ...).
    pub strategy: String,
    /// The candidate the strategy picks; `None` until every candidate is
    /// known.
    pub winner: Option<OpId>,
    /// The winning value; `None` until every candidate is known.
    pub value: Option<Value>,
    /// When the conflict arose: the highest HLC among the known candidates
    /// (`None` if none is known yet).
    pub hlc: Option<Hlc>,
}

impl Conflict {
    /// True when every candidate's op is known here, so `winner`, `value`
    /// and `hlc` are final.
    pub fn is_complete(&self) -> bool {
        self.candidates.iter().all(|c| c.value.is_some())
    }

    /// The candidate op ids: with table, key and field, the conflict's
    /// identity.
    pub fn ids(&self) -> Vec<&OpId> {
        self.candidates.iter().map(|c| &c.op).collect()
    }
}
