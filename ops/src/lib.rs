//! Operations support shared by the syncmesh hub and nodes.
//!
//! - [`prom`]: the Prometheus registry behind `/metrics` (the metric names
//!   are a user contract: `sync_lag_seconds`, `records_synced_total`,
//!   `sync_errors_total`, `conflict_count`) plus process basics.
//! - [`http`]: the small HTTP/1.1 server on the metrics address: `/metrics`,
//!   and on the hub the live status page at `/` and its `/status.json`.
//! - [`series`]: 10-second buckets over the last 24 hours: throughput now,
//!   average and peak, 24-hour totals and the chart of the last hour.
//! - [`alert`]: the conflicts-per-hour threshold and the webhook sender
//!   (bounded queue and retries; never blocks sync).
//! - [`progress`]: progress of long work (catch-up after offline): a bar on
//!   a terminal, periodic log lines otherwise.
//!
//! Nothing here knows about the sync cores: they count, the shells publish.

pub mod alert;
pub mod http;
pub mod page;
pub mod progress;
pub mod prom;
pub mod series;

/// Everything that can go wrong in this crate. Messages are one line and say
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr}: {message}")]
    Bind {
        /// The address.
        addr: String,
        /// Why, and what to do.
        message: String,
    },
    /// The webhook URL cannot be used.
    #[error("conflicts.alert.webhook {url}: {message}")]
    Webhook {
        /// The URL with its path hidden (it often holds a token).
        url: String,
        /// Why, and what to do.
        message: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Milliseconds since the Unix epoch by the wall clock (0 before 1970).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
