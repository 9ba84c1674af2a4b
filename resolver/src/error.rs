use crate::{Hlc, OpId};

/// Errors of the resolver: invalid identifiers, clock violations and
/// corrupt stored row states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A node name is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid node name {name:?}: use 1-64 characters from A-Z a-z 0-9 _ . -")]
    InvalidNodeId {
        /// The rejected name.
        name: String,
    },
    /// A remote timestamp is further ahead of local physical time than allowed.
    #[error(
        "op {op} has HLC {hlc} which is {ahead_ms} ms ahead of this clock (max_clock_drift is {max_ms} ms): fix the clock of node {} (NTP) or raise sync.max_clock_drift",
        op.origin
    )]
    ClockDrift {
        /// The op carrying the timestamp.
        op: OpId,
        /// The timestamp.
        hlc: Hlc,
        /// How far ahead it is, in milliseconds.
        ahead_ms: u64,
        /// The configured limit, in milliseconds.
        max_ms: u64,
    },
    /// Stored row-state bytes that are not a row state of this version.
    #[error("corrupt row state: {message}")]
    CorruptRowState {
        /// What is wrong and where.
        message: String,
    },
}

/// Result alias of the resolver crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
