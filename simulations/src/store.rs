//! The crashable log store of every simulated process.
//!
//! The cores take their [`LogStore`] by value. To crash a process the
//! simulator drops the core, makes the store lose every write since its last
//! flush ([`MemStore::crash`]), and opens a new core on what is left, as a
//! restarted process finds its data directory. [`Shared`] is a handle that
//! lets the simulator keep the store while a core owns a clone of it (the hub
//! core has no `into_store`).
//!
//! `MemStore::flush` copies the whole map, so a flush costs O(store size);
//! that bounds how long a single seed can usefully run (see the crate docs).
//! A cheaper journaled store cannot be written outside `node/` today because
//! `WriteBatch` does not expose its operations.

use std::sync::{Arc, Mutex, MutexGuard};

use syncmesh_node::Result;
use syncmesh_node::store::{LogStore, MemStore, WriteBatch};

/// A handle to one process's [`MemStore`], shared between the simulator and
/// the core that owns a clone of it. Single-threaded use only: the mutex is
/// there because `LogStore` requires `Send`.
#[derive(Clone, Debug, Default)]
pub struct Shared(Arc<Mutex<MemStore>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MemStore> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every write since the last flush, as a power cut would.
    pub fn crash(&self) {
        self.lock().crash();
    }

    /// Number of flushes so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
}

impl LogStore for Shared {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.lock().get(key)
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.lock().range(start, end, limit)
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.lock().last_in(start, end)
    }

    fn write(&mut self, batch: WriteBatch) -> Result<()> {
        self.lock().write(batch)
    }

    fn flush(&mut self) -> Result<()> {
        self.lock().flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_through_any_handle_loses_only_unflushed_writes() {
        let s = Shared::default();
        let mut owner = s.clone();
        let mut b = WriteBatch::default();
        b.put(b"k1".to_vec(), b"1".to_vec());
        owner.write(b).unwrap();
        owner.flush().unwrap();
        let mut b = WriteBatch::default();
        b.put(b"k2".to_vec(), b"2".to_vec());
        owner.write(b).unwrap();
        drop(owner);
        s.crash();
        assert!(s.get(b"k1").unwrap().is_some());
        assert!(s.get(b"k2").unwrap().is_none());
        assert_eq!(s.flushes(), 1);
    }
}
