//! The syncmesh hub.
//!
//! [`core::HubCore`] is the sans-IO state machine: it stores ops (in a
//! [`syncmesh_node::store::LogStore`]), keeps the mesh's version vector and
//! one per connected node, checks that every op comes from its own origin
//! with a gap-free sequence and a sane clock, acknowledges only after a
//! flush, and hands each session the ops its node lacks. [`server`] is the
//! tonic shell: one actor task owns the core; each `Sync` stream is a
//! session. [`mirror`] copies conflict records into an optional
//! `sync_conflicts` table in its own task.

pub mod core;
pub mod error;
pub mod mirror;
pub mod server;
pub mod stats;
pub mod telemetry;

pub use error::{Error, Result};
