//! The durable log store behind node and hub cores.
//!
//! A core sees one ordered key space through [`LogStore`]: it applies atomic
//! [`WriteBatch`]es and calls [`LogStore::flush`] before it acknowledges
//! anything. [`SledStore`] is the production implementation; [`MemStore`]
//! keeps everything in memory and can [`MemStore::crash`], dropping every
//! write that was not flushed, which is what the simulator and the crash
//! tests need.
//!
//! sled costs about the same per key written whatever the value's size
//! (~11 µs per key in a batch on this project's machines, ~0.8 µs per row
//! when 32 rows share a key), so [`SledStore`] keeps row states in pages:
//! every key of the form `r/<table>\0\x01<8-byte group><rest>` (what
//! [`crate::core::row_key`] makes for a single integer key, grouping 32
//! consecutive ids) is an entry in one sled value per
//! `r/<table>\0\x01<group>`. A core never sees pages: gets, ranges and
//! batches behave exactly as on [`MemStore`] (a property test checks it),
//! a batch rewrites each page it touches once, and a page is one sled
//! value, so a batch stays atomic.

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

/// How long [`SledStore::open`] waits for the log's file lock: a handle
/// dropped just before (a restart in the same process) releases it once
/// sled's background writes finish, which takes milliseconds.
const LOCK_WAIT_MS: u64 = 5_000;

/// Opens the sled database at `path`, waiting up to [`LOCK_WAIT_MS`] while
/// its file lock is held; any other error, or a lock still held after the
/// wait (another process), is returned.
fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let start = std::time::Instant::now();
    loop {
        match sled::Config::new().path(path).flush_every_ms(None).open() {
            // sled reports a held lock as `ErrorKind::Other` with this text.
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && start.elapsed() < std::time::Duration::from_millis(LOCK_WAIT_MS) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
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
        remove_unfinished_snapshots(&dir.join("log"))?;
        let db = open_sled(&dir.join("log")).map_err(|e| Error::Store {
            path: path.display().to_string(),
            message: format!(
                "cannot open the sled log: {e}; is another syncmesh process using this data_dir?"
            ),
        })?;
        let store = SledStore { db, path };
        // In a tree of its own, so no range of a core ever sees it.
        let meta = store.db.open_tree(LAYOUT_TREE).map_err(|e| store.err(e))?;
        match meta.get(K_LAYOUT).map_err(|e| store.err(e))? {
            Some(v) if v.as_ref() == [LAYOUT_PAGED_ROWS] => {}
            Some(v) => {
                return Err(Error::Store {
                    path: store.path.display().to_string(),
                    message: format!(
                        "the data dir has store layout {v:?}, this build reads layout {LAYOUT_PAGED_ROWS}: use the syncmesh build that wrote it, or re-create the data dir"
                    ),
                });
            }
            None => {
                let old_rows = store
                    .db
                    .scan_prefix(PAGED_PREFIX)
                    .next()
                    .transpose()
                    .map_err(|e| store.err(e))?
                    .is_some();
                if old_rows {
                    return Err(Error::Store {
                        path: store.path.display().to_string(),
                        message: "the data dir was written by an earlier syncmesh build (row states one per key); this build keeps them in pages: re-create the data dir (a node then gets its rows from the hub)".into(),
                    });
                }
                meta.insert(K_LAYOUT, &[LAYOUT_PAGED_ROWS])
                    .map_err(|e| store.err(e))?;
            }
        }
        Ok(store)
    }

    fn corrupt(&self, page: &[u8], why: &str) -> Error {
        Error::Store {
            path: self.path.display().to_string(),
            message: format!(
                "corrupt row page {}: {why}; the data dir is damaged, restore it or re-create it (the node then re-snapshots from the hub)",
                String::from_utf8_lossy(page)
            ),
        }
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
        if let Some((page, suffix)) = split_paged(key) {
            let Some(v) = self.db.get(page).map_err(|e| self.err(e))? else {
                return Ok(None);
            };
            return find_in_page(&v, suffix)
                .map(|found| found.map(<[u8]>::to_vec))
                .map_err(|e| self.corrupt(page, e));
        }
        Ok(self
            .db
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if limit == 0 || start >= end {
            return Ok(out);
        }
        for item in self.db.range(physical_start(start)..end) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if is_page_key(&k) {
                for (suffix, value) in decode_page(&v).map_err(|e| self.corrupt(&k, e))? {
                    let mut lk = k.to_vec();
                    lk.extend_from_slice(suffix);
                    if lk.as_slice() >= start && lk.as_slice() < end {
                        out.push((lk, value.to_vec()));
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
            } else if &k[..] >= start {
                out.push((k.to_vec(), v.to_vec()));
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if start >= end {
            return Ok(None);
        }
        for item in self.db.range(physical_start(start)..end).rev() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if is_page_key(&k) {
                let entries = decode_page(&v).map_err(|e| self.corrupt(&k, e))?;
                for (suffix, value) in entries.into_iter().rev() {
                    let mut lk = k.to_vec();
                    lk.extend_from_slice(suffix);
                    if lk.as_slice() >= start && lk.as_slice() < end {
                        return Ok(Some((lk, value.to_vec())));
                    }
                }
            } else if &k[..] >= start {
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
        }
        Ok(None)
    }

    fn write(&mut self, batch: WriteBatch) -> Result<()> {
        let mut b = sled::Batch::default();
        // Paged writes, per page in batch order (a later write wins).
        let mut pages: BTreeMap<Vec<u8>, Vec<Write>> = BTreeMap::new();
        for (k, v) in batch.ops {
            if let Some((page, suffix)) = split_paged(&k) {
                pages
                    .entry(page.to_vec())
                    .or_default()
                    .push((suffix.to_vec(), v));
                continue;
            }
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        for (page, writes) in pages {
            let old = self.db.get(&page).map_err(|e| self.err(e))?;
            let mut entries: BTreeMap<&[u8], &[u8]> = match &old {
                Some(v) => decode_page(v)
                    .map_err(|e| self.corrupt(&page, e))?
                    .into_iter()
                    .collect(),
                None => BTreeMap::new(),
            };
            for (suffix, v) in &writes {
                match v {
                    Some(v) => entries.insert(suffix, v),
                    None => entries.remove(suffix.as_slice()),
                };
            }
            if entries.is_empty() {
                b.remove(page);
            } else {
                b.insert(page, encode_page(&entries));
            }
        }
        self.db.apply_batch(b).map_err(|e| self.err(e))
    }

    fn flush(&mut self) -> Result<()> {
        self.db.flush().map_err(|e| self.err(e)).map(|_| ())
    }
}

/// Removes `snap.<lsn>.generating` files from sled's directory: a
/// snapshot that a killed process was still writing. sled 0.34 renames a
/// snapshot to `snap.<lsn>` only once it is complete and synced, but when it
/// opens it also considers the unfinished files and, if one sorts last,
/// refuses to open ("Read corrupted data at file offset None"). The log
/// and the last complete snapshot hold everything, so the unfinished file
/// is safe to drop; this was seen after a SIGKILL in this project's tests.
fn remove_unfinished_snapshots(log_dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Store {
                path: log_dir.display().to_string(),
                message: format!("cannot list the sled log directory: {e}; check permissions"),
            });
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a sled snapshot that was not finished (the process stopped while writing it); the log still holds every flushed write");
            std::fs::remove_file(entry.path()).map_err(|e| Error::Store {
                path: entry.path().display().to_string(),
                message: format!(
                    "cannot remove an unfinished sled snapshot: {e}; remove it by hand"
                ),
            })?;
        }
    }
    Ok(())
}

/// A put (`Some`) or remove (`None`) of one key.
type Write = (Vec<u8>, Option<Vec<u8>>);
/// One entry of a page: the key's rest after the page part, and the value.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// The prefix of the keys [`SledStore`] keeps in pages.
const PAGED_PREFIX: &[u8] = b"r/";
/// The byte after `<table>\0` that marks a paged key.
pub const PAGE_TAG: u8 = 1;
/// Bytes of the group after the tag.
pub const PAGE_GROUP_BYTES: usize = 8;
/// Version byte of an encoded page.
const PAGE_VERSION: u8 = 1;
/// The marker of the paged row layout (a data dir without it that holds
/// `r/` keys was written by an earlier build).
const K_LAYOUT: &[u8] = b"layout";
/// The sled tree holding [`K_LAYOUT`].
const LAYOUT_TREE: &[u8] = b"syncmesh-store";
const LAYOUT_PAGED_ROWS: u8 = 2;

/// Where the page part of a paged key ends, if `key` is one (page and
/// entry, the entry part non-empty).
fn split_paged(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = key.strip_prefix(PAGED_PREFIX)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    let tag_at = PAGED_PREFIX.len() + nul + 1;
    let page_end = tag_at + 1 + PAGE_GROUP_BYTES;
    (key.get(tag_at) == Some(&PAGE_TAG) && key.len() > page_end).then(|| key.split_at(page_end))
}

/// True for a physical page key (exactly the page part).
fn is_page_key(key: &[u8]) -> bool {
    let Some(rest) = key.strip_prefix(PAGED_PREFIX) else {
        return false;
    };
    let Some(nul) = rest.iter().position(|b| *b == 0) else {
        return false;
    };
    let tag_at = PAGED_PREFIX.len() + nul + 1;
    key.get(tag_at) == Some(&PAGE_TAG) && key.len() == tag_at + 1 + PAGE_GROUP_BYTES
}

/// Where a physical scan for logical keys from `start` begins: at its
/// page when `start` lies inside one.
fn physical_start(start: &[u8]) -> &[u8] {
    split_paged(start).map_or(start, |(page, _)| page)
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(buf: &[u8], pos: &mut usize) -> std::result::Result<usize, &'static str> {
    let mut n = 0usize;
    for shift in (0..35).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated length")?;
        *pos += 1;
        n |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err("length too long")
}

/// A page: version byte, then (entry length, entry, value length, value)
/// in entry order.
fn encode_page(entries: &BTreeMap<&[u8], &[u8]>) -> Vec<u8> {
    let size: usize = entries.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(PAGE_VERSION);
    for (k, v) in entries {
        put_varint(&mut out, k.len());
        out.extend_from_slice(k);
        put_varint(&mut out, v.len());
        out.extend_from_slice(v);
    }
    out
}

/// The entries of a page in order, each checked (lengths inside the page,
/// non-empty, strictly increasing), without allocating.
struct PageEntries<'a> {
    buf: &'a [u8],
    pos: usize,
    last: Option<&'a [u8]>,
}

impl<'a> PageEntries<'a> {
    fn new(buf: &'a [u8]) -> std::result::Result<Self, &'static str> {
        if buf.first() != Some(&PAGE_VERSION) {
            return Err("unknown page version");
        }
        Ok(PageEntries {
            buf,
            pos: 1,
            last: None,
        })
    }

    fn take(&mut self) -> std::result::Result<&'a [u8], &'static str> {
        let n = take_varint(self.buf, &mut self.pos)?;
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or("truncated entry")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

impl<'a> Iterator for PageEntries<'a> {
    type Item = std::result::Result<Entry<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let entry = (|| {
            let k = self.take()?;
            let v = self.take()?;
            if k.is_empty() || self.last.is_some_and(|last| last >= k) {
                return Err("entries out of order");
            }
            self.last = Some(k);
            Ok((k, v))
        })();
        if entry.is_err() {
            // Stop after the first error.
            self.pos = self.buf.len();
        }
        Some(entry)
    }
}

/// The value of `entry` in a page, reading no further than it.
fn find_in_page<'a>(
    buf: &'a [u8],
    entry: &[u8],
) -> std::result::Result<Option<&'a [u8]>, &'static str> {
    for e in PageEntries::new(buf)? {
        let (k, v) = e?;
        match k.cmp(entry) {
            std::cmp::Ordering::Equal => return Ok(Some(v)),
            // Entries are sorted: it is not there.
            std::cmp::Ordering::Greater => return Ok(None),
            std::cmp::Ordering::Less => {}
        }
    }
    Ok(None)
}

fn decode_page(buf: &[u8]) -> std::result::Result<Vec<Entry<'_>>, &'static str> {
    PageEntries::new(buf)?.collect()
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
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .current
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_in(&self, start: &[u8], end: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if start >= end {
            return Ok(None);
        }
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

    /// A restart in one process: the old handle goes away while the new
    /// one waits for the lock, and then opens with the data intact. A
    /// handle that stays open makes the wait end in the clear error.
    #[test]
    fn open_waits_for_a_released_lock_and_names_a_held_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = SledStore::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"k".to_vec(), b"v".to_vec());
        first.write(b).unwrap();
        first.flush().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let second = SledStore::open(dir.path()).unwrap();
        release.join().unwrap();
        assert_eq!(second.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));

        let err = SledStore::open(dir.path()).err().expect("the lock is held");
        let msg = err.to_string();
        assert!(
            msg.contains("could not acquire lock") && msg.contains("another syncmesh process"),
            "{msg}"
        );
    }

    /// Keys around two row pages of one table, a plain row key, another
    /// table's page and keys of other prefixes; the page keys themselves
    /// and cursors just after a key are among the range bounds.
    fn key_universe() -> Vec<Vec<u8>> {
        let page = |table: &[u8], group: u8| {
            let mut k = b"r/".to_vec();
            k.extend_from_slice(table);
            k.push(0);
            k.push(PAGE_TAG);
            k.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, group]);
            k
        };
        let mut keys = Vec::new();
        for p in [page(b"t", 1), page(b"t", 2), page(b"u", 1)] {
            for suffix in [&b"a"[..], b"ab", b"b", b"\xff"] {
                let mut k = p.clone();
                k.extend_from_slice(suffix);
                keys.push(k);
            }
        }
        keys.push(b"r/t\0\0a".to_vec());
        keys.push(b"r/t\0\0b".to_vec());
        keys.push(b"q/1".to_vec());
        keys.push(b"s/r/t\0\x01aaaaaaaab".to_vec());
        keys
    }

    fn bounds() -> Vec<Vec<u8>> {
        let mut b = key_universe();
        for k in key_universe() {
            let mut next = k.clone();
            next.push(0);
            b.push(next);
            b.push(k[..k.len() - 1].to_vec());
        }
        for p in [&b"r/"[..], b"r/t\0", b"r/t\0\x01", b"r/u\0", b"", b"s/"] {
            b.push(p.to_vec());
            b.push(prefix_end(p));
        }
        b.push(vec![0xFF; 4]);
        b
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write(Vec<(usize, Option<u8>)>),
        Get(usize),
        Range(usize, usize, usize),
        Last(usize, usize),
        Flush,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let n = key_universe().len();
        let nb = bounds().len();
        prop_oneof![
            3 => proptest::collection::vec((0..n, proptest::option::of(any::<u8>())), 1..8)
                .prop_map(Step::Write),
            1 => (0..n).prop_map(Step::Get),
            2 => (0..nb, 0..nb, 0usize..6).prop_map(|(a, b, l)| Step::Range(a, b, l)),
            1 => (0..nb, 0..nb).prop_map(|(a, b)| Step::Last(a, b)),
            1 => Just(Step::Flush),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Row pages are invisible: every read of a SledStore equals the
        /// same read of a MemStore after the same writes.
        #[test]
        fn paged_sled_reads_like_mem(steps in proptest::collection::vec(step(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut sled = SledStore::open(dir.path()).unwrap();
            let mut mem = MemStore::default();
            let keys = key_universe();
            let bounds = bounds();
            for st in steps {
                match st {
                    Step::Write(w) => {
                        let mut b = WriteBatch::default();
                        for (k, v) in w {
                            match v {
                                Some(v) => b.put(keys[k].clone(), vec![v; (v % 5) as usize]),
                                None => b.remove(keys[k].clone()),
                            }
                        }
                        sled.write(b.clone()).unwrap();
                        mem.write(b).unwrap();
                    }
                    Step::Get(k) => {
                        proptest::prop_assert_eq!(sled.get(&keys[k]).unwrap(), mem.get(&keys[k]).unwrap());
                    }
                    Step::Range(a, b, l) => {
                        let (a, b) = (&bounds[a], &bounds[b]);
                        proptest::prop_assert_eq!(sled.range(a, b, l).unwrap(), mem.range(a, b, l).unwrap(), "range {:?}..{:?} limit {}", a, b, l);
                        proptest::prop_assert_eq!(sled.range(a, b, usize::MAX).unwrap(), mem.range(a, b, usize::MAX).unwrap());
                    }
                    Step::Last(a, b) => {
                        let (a, b) = (&bounds[a], &bounds[b]);
                        proptest::prop_assert_eq!(sled.last_in(a, b).unwrap(), mem.last_in(a, b).unwrap(), "last_in {:?}..{:?}", a, b);
                    }
                    Step::Flush => {
                        sled.flush().unwrap();
                        mem.flush().unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn pages_group_consecutive_ids_and_decode_rejects_garbage() {
        use crate::core::row_key;
        use syncmesh_resolver::Value;
        let k = |i| row_key(b"r/", "t", &[Value::Int(i)]).unwrap();
        assert_eq!(
            split_paged(&k(0)).unwrap().0,
            split_paged(&k(31)).unwrap().0
        );
        assert_ne!(
            split_paged(&k(31)).unwrap().0,
            split_paged(&k(32)).unwrap().0
        );
        assert!(split_paged(&k(-1)).unwrap().0 < split_paged(&k(0)).unwrap().0);
        assert!(split_paged(&row_key(b"r/", "t", &[Value::Text("a".into())]).unwrap()).is_none());
        assert!(split_paged(&row_key(b"s/r/", "t", &[Value::Int(1)]).unwrap()).is_none());
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStore::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        for i in 0..100 {
            b.put(k(i), vec![i as u8; 3]);
        }
        s.write(b).unwrap();
        // 100 ids in 4 sled values.
        assert_eq!(s.db.len(), 4);
        assert_eq!(
            s.range(b"r/", &prefix_end(b"r/"), usize::MAX)
                .unwrap()
                .len(),
            100
        );
        let page = encode_page(&BTreeMap::from([
            (&b"a"[..], &b"1"[..]),
            (&b"b"[..], &b"22"[..]),
        ]));
        assert_eq!(
            decode_page(&page).unwrap(),
            vec![(&b"a"[..], &b"1"[..]), (&b"b"[..], &b"22"[..])]
        );
        for cut in 0..page.len() - 1 {
            // Every truncation is an error, or a shorter page (at an
            // entry boundary).
            if let Ok(e) = decode_page(&page[..cut]) {
                assert!(e.len() < 2, "{cut}");
            }
        }
        assert!(decode_page(&[2, 1, b'a', 0]).is_err());
        assert!(
            decode_page(&[1, 1, b'b', 0, 1, b'a', 0]).is_err(),
            "out of order"
        );
        assert!(decode_page(&[1, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).is_err());
    }

    #[test]
    fn a_data_dir_with_unpaged_rows_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("log")).unwrap();
            db.insert(b"r/t\0\x05", b"old".to_vec()).unwrap();
            db.flush().unwrap();
        }
        let e = SledStore::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("earlier syncmesh build") && e.contains("re-create the data dir"),
            "{e}"
        );
    }

    /// Writes `k` = `v` into a new store in `dir`, flushes and closes it.
    fn write_k_and_close(dir: &Path) {
        let mut s = SledStore::open(dir).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"k".to_vec(), b"v".to_vec());
        s.write(b).unwrap();
        s.flush().unwrap();
    }

    #[test]
    fn an_unfinished_sled_snapshot_left_by_a_kill_does_not_stop_the_open() {
        let dir = tempfile::tempdir().unwrap();
        write_k_and_close(dir.path());
        // What a process killed while sled wrote a snapshot leaves behind.
        std::fs::write(
            dir.path()
                .join("log")
                .join("snap.FFFFFFFFFFFFFFFF.generating"),
            b"partial",
        )
        .unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k").unwrap().unwrap(), b"v");
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
        write_k_and_close(dir.path());
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.get(b"k").unwrap().unwrap(), b"v");
    }
}
