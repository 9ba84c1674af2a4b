//! The syncmesh node: the sidecar next to one database.
//!
//! Layout (sans-IO core, thin shell):
//! - [`config`]: the YAML configuration shared by every process.
//! - [`adapter`], [`sqlite`] and [`postgres`]: database adapters. SQLite
//!   captures by triggers into a change table, PostgreSQL by logical
//!   decoding (`pgoutput`); both apply visible rows in one transaction
//!   without echo. [`adapter::Db`] picks one by the configured engine.
//! - [`pgstream`]: the replication-protocol reader PostgreSQL capture
//!   streams its slot with (falls back to peeking when unavailable).
//! - [`mysql`]: MySQL / MariaDB, capture by triggers like SQLite (change
//!   ids handed out in commit order), echo-free apply in one transaction.
//! - [`mongodb`]: MongoDB, capture by a change stream (resume token kept
//!   with the ops), apply by `_id` in one transaction without echo.
//! - [`redis`]: Redis as a cache target (apply only).
//! - [`typemap`]: the one cross-engine type-mapping table (README shows it).
//! - [`store`]: the [`store::LogStore`] trait, its sled implementation and an
//!   in-memory one (used by tests and the simulator, which can crash it).
//! - [`wire`]: conversion between resolver types and protocol v1 messages,
//!   with every limit checked on decode.
//! - [`core`]: [`core::NodeCore`], the state machine. Input goes in through
//!   `handle_*`, output comes out through `poll_*`; time is an argument.
//! - [`shell`]: the tokio/tonic driver that feeds the core from the database
//!   and the hub stream.
//! - [`tls`]: TLS of the gRPC links (hub certificate, node trust and client
//!   certificates, one-line explanations of failed handshakes).

pub mod adapter;
pub mod config;
pub mod core;
pub mod error;
pub mod mongodb;
pub mod mysql;
pub mod pgstream;
pub mod postgres;
pub mod redis;
pub mod shell;
pub mod sqlite;
pub mod store;
pub mod tls;
pub mod typemap;
pub mod wire;

pub use error::{Error, Result};
