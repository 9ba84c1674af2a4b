//! Wire protocol of syncmesh, version 1.
//!
//! Generated from `proto/syncmesh_v1.proto` with a vendored `protoc`. The
//! protocol is versioned by package (`syncmesh.v1`) and by the
//! `protocol_version` field of `Hello`; decoders everywhere use the explicit
//! size limits below.

#![allow(missing_docs, clippy::all)]

/// Generated messages and the `Sync` service of protocol version 1.
pub mod v1 {
    tonic::include_proto!("syncmesh.v1");
}

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest encoded message accepted on the sync stream (bytes).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Largest number of ops in one `OpBatch`.
pub const MAX_BATCH_OPS: usize = 10_000;

/// Longest table, field or node name accepted from a peer (bytes).
pub const MAX_NAME_BYTES: usize = 256;

/// Most fields accepted in one op.
pub const MAX_FIELDS_PER_OP: usize = 4096;

/// Most predecessor ids accepted on one field write or row.
pub const MAX_PRED_IDS: usize = 1024;

/// Most entries (origins) accepted in one version vector of a stable cut or
/// seen report.
pub const MAX_VV_ENTRIES: usize = 4096;

/// Most primary-key values accepted in one op.
pub const MAX_KEY_VALUES: usize = 32;

/// Most rows in one `SnapshotChunk` (re-snapshot).
pub const MAX_SNAPSHOT_ROWS: usize = 4096;

/// The `SnapshotChunk.state_format` this build writes and reads: the
/// resolver's `RowState` encoded with postcard.
pub const SNAPSHOT_STATE_FORMAT: u32 = 1;
