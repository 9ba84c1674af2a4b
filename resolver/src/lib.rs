//! The pure merge library of syncmesh.
//!
//! Everything that decides *what a row looks like* lives here, with no IO, no
//! async runtime and no storage, so that the node, the hub and the simulator
//! share exactly the same rules:
//!
//! - [`Value`]: the engine-neutral value model with a total order.
//! - [`Hlc`] and [`HlcClock`]: hybrid logical clock timestamps (uhlc's NTP64
//!   layout) and a sans-IO clock that is *given* physical time.
//! - [`Op`]: one captured change to one row, identified by
//!   [`OpId`] `(origin, seq)` with `seq` gap-free per origin. Every field write
//!   names the writes it supersedes (`pred`), so concurrency is detected
//!   causally, not guessed from timestamps.
//! - [`RowState`]: per field, the set of writes no later write superseded (a
//!   multi-value register), counter contributions, live tombstones and the
//!   memory needed for conflict records. [`RowState::apply`] is commutative,
//!   associative and idempotent; [`RowState::visible`] picks the visible row
//!   with the table's [`TableRules`] and its per-field [`Strategy`];
//!   [`RowState::conflicts`] lists the [`Conflict`]s, a pure function of the
//!   op set too; [`RowState::collect_garbage`] forgets what a causally stable
//!   cut makes useless.
//!
//! The exact semantics — supersession, counters, the conflict definition and
//! the conditions of garbage collection — are in the docs of [`RowState`];
//! how each strategy picks, and how `sum` adds, in the docs of [`Strategy`].
//! `resolver/testdata/strategies.txt` is a table of worked cases, checked in
//! every order by `tests/golden.rs`; `tests/laws.rs` holds the property laws.
//!
//! ```
//! use syncmesh_resolver::*;
//! let a = NodeId::new("edge-a").unwrap();
//! let mut clock = HlcClock::new(&a, 500);
//! let hlc = clock.tick(Ntp64::from_unix_millis(1_000));
//! let op = Op::upsert(OpId::new(a.clone(), 1), hlc, "orders", vec![Value::Int(7)],
//!     vec![FieldWrite::new("id", Value::Int(7)), FieldWrite::new("qty", Value::Int(3))]);
//! let mut row = RowState::default();
//! row.apply(&op);
//! let rules = TableRules::default();
//! let visible = row.visible(&rules).unwrap();
//! assert_eq!(visible.get("qty"), Some(&Value::Int(3)));
//! ```

#![forbid(unsafe_code)]

mod codec;
mod conflict;
mod decimal;
mod error;
mod hlc;
mod ids;
mod op;
mod row;
mod rules;
mod stored;
mod value;

pub use conflict::{Candidate, Conflict};
pub use error::{Error, Result};
pub use hlc::{Hlc, HlcClock, Ntp64};
pub use op::{FieldWrite, NodeId, Op, OpId, OpKind, VersionVector};
pub use row::{Entry, RowState, VisibleRow};
pub use rules::{DeletePolicy, Granularity, Strategy, TableRules, counter_delta};
pub use value::Value;
