//! The hub crate's error type.

/// Everything that can stop a hub. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("hub cannot listen on {addr}: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// Why, and what to do.
        message: String,
    },
    /// The log store or another node-crate facility failed.
    #[error(transparent)]
    Node(#[from] syncmesh_node::Error),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Ops(#[from] syncmesh_ops::Error),
    /// The conflict mirror's database failed (the hub keeps running).
    #[error("{target}: {message}")]
    Mirror {
        /// `table T at URL` with the password hidden.
        target: String,
        /// The database's error, password hidden.
        message: String,
    },
    /// The gRPC server failed.
    #[error("hub server: {0}")]
    Server(String),
}

/// Result alias of the hub crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
