//! The durable log store behind node and hub cores.
//!
//! A core sees one ordered key space through [`LogStore`]: it applies atomic
//! [`WriteBatch`]es and calls [`LogStore::flush`] before it acknowledges
//! anything. [`SledStore`] is the production implementation; [`MemStore`]
//! keeps everything in memory and can [`MemStore::crash`], dropping every
//! write that was not flushed, which is what the simulator and the crash
//! tests need.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An atomic group of puts and removes.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    /// Stores `value` at `key`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    /// True when the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of puts and removes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// An ordered, durable key-value store.
pub trait LogStore: Send {
    /// Reads one key (seeing every applied batch, flushed or not).
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Up to `limit` entries with keys in `[start, end)`, in key order.
    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// The last entry with a key in `[start, end)`.
    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Applies a batch atomically (all or nothing, also across a crash).
    fn write(&mut self, batch: WriteBatch) -> Result<()>;
    /// Makes every applied batch durable. Nothing is acknowledged before this.
    fn flush(&mut self) -> Result<()>;
}

/// The end of a prefix range: the smallest key greater than every key
/// starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xFF; prefix.len() + 1]
}

/// Where an incremental scan goes on after a page of `rows` read with a
/// limit of `max_rows`: just after the last key when the page was full,
/// `None` (start over) when the scan reached the end.
pub fn next_cursor<V>(rows: &[(Vec<u8>, V)], max_rows: usize) -> Option<Vec<u8>> {
    match rows.last() {
        Some((k, _)) if rows.len() >= max_rows => {
            let mut next = k.clone();
            next.push(0);
            Some(next)
        }
        _ => None,
    }
}

/// sled-backed store (one tree, flushed with fsync). A clone is another
/// handle to the same database (the hub's conflict mirror reads through one).
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

impl SledStore {
    /// Opens or creates the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.to_path_buf();
        std::fs::create_dir_all(dir).map_err(|e| Error::Store {
            path: path.display().to_string(),
            message: format!(
                "cannot create the data directory: {e}; check data_dir and permissions"
            ),
        })?;
        let db = sled::Config::new()
            .path(dir.join("log"))
            .flush_every_ms(None)
            .open()
            .map_err(|e| Error::Store {
                path: path.display().to_string(),
                message: format!(
                    "cannot open the sled log: {e}; is another syncmesh process using this data_dir?"
                ),
            })?;
        Ok(SledStore { db, path })
    }

    fn err(&self, e: sled::Error) -> Error {
        Error::Store {
            path: self.path.display().to_string(),
            message: format!("{e}; check free disk space and permissions"),
        }
    }
}

impl LogStore for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.db.range(start..end).take(limit) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        match self.db.range(start..end).next_back() {
            Some(item) => {
                let (k, v) = item.map_err(|e| self.err(e))?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn write(&mut self, batch: WriteBatch) -> Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.db.apply_batch(b).map_err(|e| self.err(e))
    }

    fn flush(&mut self) -> Result<()> {
        self.db.flush().map_err(|e| self.err(e)).map(|_| ())
    }
}

/// In-memory store that loses unflushed batches on [`MemStore::crash`].
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    durable: BTreeMap<Vec<u8>, Vec<u8>>,
    current: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Number of flushes so far.
    pub flushes: u64,
}

impl MemStore {
    /// Drops every write since the last flush, as a power cut would.
    pub fn crash(&mut self) {
        self.current = self.durable.clone();
    }
}

impl LogStore for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.current.get(key).cloned())
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .current
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .current
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .next_back()
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn write(&mut self, batch: WriteBatch) -> Result<()> {
        for (k, v) in batch.ops {
            match v {
                Some(v) => self.current.insert(k, v),
                None => self.current.remove(&k),
            };
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.durable = self.current.clone();
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn exercise(s: &mut dyn LogStore) {
        let mut b = WriteBatch::default();
        b.put(b"a/1".to_vec(), b"x".to_vec());
        b.put(b"a/2".to_vec(), b"y".to_vec());
        b.put(b"b/1".to_vec(), b"z".to_vec());
        s.write(b).unwrap();
        assert_eq!(s.range(b"a/", &prefix_end(b"a/"), 10).unwrap().len(), 2);
        assert_eq!(
            s.last_in(b"a/", &prefix_end(b"a/")).unwrap().unwrap().1,
            b"y"
        );
        let mut b = WriteBatch::default();
        b.remove(b"a/2".to_vec());
        s.write(b).unwrap();
        assert_eq!(s.get(b"a/2").unwrap(), None);
        s.flush().unwrap();
    }

    #[test]
    fn sled_and_mem_behave_alike() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&mut SledStore::open(dir.path()).unwrap());
        exercise(&mut MemStore::default());
    }

    #[test]
    fn mem_crash_loses_only_unflushed() {
        let mut s = MemStore::default();
        let mut b = WriteBatch::default();
        b.put(b"k1".to_vec(), b"1".to_vec());
        s.write(b).unwrap();
        s.flush().unwrap();
        let mut b = WriteBatch::default();
        b.put(b"k2".to_vec(), b"2".to_vec());
        s.write(b).unwrap();
        s.crash();
        assert!(s.get(b"k1").unwrap().is_some());
        assert!(s.get(b"k2").unwrap().is_none());
    }

    #[test]
    fn sled_survives_reopen_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            let mut b = WriteBatch::default();
            b.put(b"k".to_vec(), b"v".to_vec());
            s.write(b).unwrap();
            s.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k").unwrap().unwrap(), b"v");
    }
}
