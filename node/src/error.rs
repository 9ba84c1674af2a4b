//! The node crate's error type.

/// Everything that can go wrong in a node. Every message names what failed,
/// where, and what to do about it, on one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is missing, malformed or inconsistent.
    #[error("config {path}: {message}")]
    Config {
        /// The config file (or `<config>` when parsed from a string).
        path: String,
        /// What is wrong and what to do, one line.
        message: String,
    },
    /// A database could not be reached or refused a statement.
    #[error("database {database}: {message}")]
    Database {
        /// The database, as a redacted URL or node name.
        database: String,
        /// What failed and what to do, one line.
        message: String,
    },
    /// A configured table does not fit syncmesh (missing, no primary key, ...).
    #[error("table {table}: {message}")]
    Schema {
        /// The table.
        table: String,
        /// What is wrong and what to do, one line.
        message: String,
    },
    /// The local sled log failed.
    #[error("log store {path}: {message}")]
    Store {
        /// The data directory.
        path: String,
        /// What failed and what to do, one line.
        message: String,
    },
    /// A message from a peer broke the protocol (size, shape, identity).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The hub could not be reached or closed the stream.
    #[error("hub {url}: {message}")]
    Hub {
        /// The hub URL.
        url: String,
        /// What failed and what to do, one line.
        message: String,
    },
    /// A resolver rule was violated (e.g. clock drift).
    #[error(transparent)]
    Resolver(#[from] syncmesh_resolver::Error),
}

/// Result alias of the node crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
