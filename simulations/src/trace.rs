//! The run's trace: a rolling window of recent events for failure reports,
//! optionally every event, and a hash over all of them that pins the run
//! down (two runs of one seed must produce the same hash).

use std::collections::VecDeque;
use std::fmt;

/// FNV-1a, 64 bit: stable, portable, good enough to compare traces.
#[derive(Clone, Debug)]
pub struct TraceHash(u64);

impl Default for TraceHash {
    fn default() -> Self {
        TraceHash(0xCBF2_9CE4_8422_2325)
    }
}

impl TraceHash {
    /// Feeds bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= u64::from(*x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    /// Feeds a number.
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// One trace line: simulated time (ms since the start) and what happened.
#[derive(Clone, Debug)]
pub struct Event {
    /// Simulated ms since the start of the run.
    pub at_ms: u64,
    /// Description.
    pub text: String,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>7}.{:03}s {}",
            self.at_ms / 1000,
            self.at_ms % 1000,
            self.text
        )
    }
}

/// Recent events and the running hash.
#[derive(Debug)]
pub struct Trace {
    recent: VecDeque<Event>,
    keep: usize,
    live: bool,
    hash: TraceHash,
    /// Events recorded.
    pub count: u64,
}

impl Trace {
    /// Keeps the last `keep` events; `live` also prints each event to
    /// stderr as it happens (so a panic still leaves the full trace).
    pub fn new(keep: usize, live: bool) -> Self {
        Trace {
            recent: VecDeque::with_capacity(keep),
            keep,
            live,
            hash: TraceHash::default(),
            count: 0,
        }
    }

    /// Records an event.
    pub fn push(&mut self, at_ms: u64, text: String) {
        self.hash.u64(at_ms);
        self.hash.bytes(text.as_bytes());
        self.count += 1;
        let ev = Event { at_ms, text };
        if self.live {
            eprintln!("{ev}");
        }
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(ev);
    }

    /// Feeds extra state into the hash without an event line.
    pub fn hash_mut(&mut self) -> &mut TraceHash {
        &mut self.hash
    }

    /// The hash of everything recorded.
    pub fn hash(&self) -> u64 {
        self.hash.value()
    }

    /// The last `n` events.
    pub fn last(&self, n: usize) -> Vec<Event> {
        let skip = self.recent.len().saturating_sub(n);
        self.recent.iter().skip(skip).cloned().collect()
    }
}
