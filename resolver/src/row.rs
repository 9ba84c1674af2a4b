//! Row state: multi-value registers per field, counter contributions,
//! tombstones, conflict memory and garbage collection. The semantics are
//! documented on [`RowState`].
//!
//! Layout: the row's origins once, sorted by name, and everything else
//! naming ops by [`Lid`] (origin index, seq); one [`FieldState`] per field
//! name (sorted by name) holding everything the row knows about that
//! field, so a field write looks its field up once; op-id-keyed memory
//! lives in [`IdMap`]s (per origin, per seq), whose common insert is an
//! append. Every container is kept canonical (sorted, nothing empty, no
//! origin nobody names), so the encoded form is a function of the op set
//! alone.

use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};

use crate::ids::{IdMap, Killers, Lid};
use crate::rules::{Cand, pick, sum};
use crate::stored::{Bytes, PackedHlc, Stored};
use crate::{
    Candidate, Conflict, DeletePolicy, FieldWrite, Hlc, NodeId, Op, OpId, OpKind, Strategy,
    TableRules, Value, VersionVector,
};

/// A visible row: column name to value (columns without a live write are
/// absent and read as NULL).
pub type VisibleRow = BTreeMap<String, Value>;

/// One live write of a field.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    /// When it was written.
    pub hlc: Hlc,
    /// The value written.
    pub value: Value,
}

/// A live write: its row-local id, its op id and what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Live {
    pub(crate) id: Lid,
    pub(crate) op: OpId,
    pub(crate) hlc: PackedHlc,
    pub(crate) value: Stored,
}

/// A superseded, non-counted write kept for conflict records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dead {
    pub(crate) hlc: PackedHlc,
    pub(crate) value: Stored,
    pub(crate) by: Killers,
}

/// What a row knows about a superseded write of one field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Gone {
    /// Field-scope supersession: who named it in a field `pred` (empty:
    /// nobody).
    pub(crate) pred_by: Killers,
    /// Its HLC and value if its op arrived and the write is not counted, and
    /// everyone who superseded it.
    pub(crate) dead: Option<Dead>,
}

/// The bit of origin index `o` in a 64-bit set (none past 63).
fn bit(o: u32) -> u64 {
    1u64.checked_shl(o).unwrap_or(0)
}

/// `cut[o]`: the stable cut's seq of the row's origin `o`.
fn covered(id: Lid, cut: &[u64]) -> bool {
    id.seq <= cut[id.o as usize]
}

/// Row-scope supersession: origin, seq `s` (every op of the origin up to `s`
/// is superseded), by whom.
pub(crate) type RowDead = IdMap<Killers>;

/// Who superseded `id` row-wide, if anyone did.
fn row_killers(row_dead: &RowDead, id: Lid) -> Option<Killers> {
    if row_dead.is_empty() {
        return None;
    }
    let mut by = Killers::default();
    row_dead.for_from(id.o, id.seq, |k| by.join(k));
    (!by.is_empty()).then_some(by)
}

/// Everything a row knows about one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldState {
    /// The column name (UTF-8).
    pub(crate) name: Bytes,
    /// Live writes, sorted by id (the multi-value register); usually one,
    /// two when writes were concurrent: up to two held inline.
    pub(crate) live: SmallVec<[Live; 2]>,
    /// Live counter contributions: op id to delta.
    pub(crate) counters: IdMap<Value>,
    /// Superseded writes: who superseded them by field `pred`, and the
    /// non-counted ones' values for conflict records. No entry is empty.
    pub(crate) gone: IdMap<Gone>,
    /// Candidate sets named by `pred`s of two or more ids, sorted.
    pub(crate) pred_sets: Vec<Vec<Lid>>,
}

impl FieldState {
    fn new(name: &str) -> Self {
        FieldState {
            name: Bytes::new(name.as_bytes()),
            live: SmallVec::new(),
            counters: IdMap::default(),
            gone: IdMap::default(),
            pred_sets: Vec::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty()
            && self.counters.is_empty()
            && self.gone.is_empty()
            && self.pred_sets.is_empty()
    }

    fn live_pos(&self, id: Lid) -> Result<usize, usize> {
        match self.live.as_slice() {
            [] => Err(0),
            [l] => match l.id.cmp(&id) {
                std::cmp::Ordering::Equal => Ok(0),
                std::cmp::Ordering::Less => Err(1),
                std::cmp::Ordering::Greater => Err(0),
            },
            live => live.binary_search_by(|l| l.id.cmp(&id)),
        }
    }

    /// Who named `id` in a field `pred`, if anyone did.
    fn pred_killers(&self, id: Lid) -> Option<&Killers> {
        if self.gone.is_empty() {
            return None;
        }
        self.gone
            .get(id)
            .map(|g| &g.pred_by)
            .filter(|k| !k.is_empty())
    }

    /// The remembered value of `id`'s superseded write.
    fn history(&self, id: Lid) -> Option<&Dead> {
        self.gone.get(id).and_then(|g| g.dead.as_ref())
    }

    /// Who superseded `id`'s write of this field, by field `pred` or
    /// row-wide.
    fn killers(&self, id: Lid, row_dead: &RowDead) -> Killers {
        let mut by = row_killers(row_dead, id).unwrap_or_default();
        if let Some(k) = self.pred_killers(id) {
            by.join(k);
        }
        by
    }

    /// Moves a superseded live write to history (unless it is counted).
    fn bury(&mut self, l: Live, row_dead: &RowDead) {
        if self.counters.contains(l.id) {
            return;
        }
        let by = self.killers(l.id, row_dead);
        self.gone.get_or_insert_with(l.id, Gone::default).dead = Some(Dead {
            hlc: l.hlc,
            value: l.value,
            by,
        });
    }

    /// `by`'s field `pred` names `x`.
    fn kill(&mut self, x: Lid, by: Lid, row_dead: &RowDead) {
        // A live write moves to history (unless it is counted).
        let buried = match self.live_pos(x) {
            Ok(i) => {
                let counted = self.counters.contains(x);
                let l = if self.live.len() == 1 {
                    self.live.pop()
                } else {
                    Some(self.live.remove(i))
                };
                l.map(|l| (l, counted))
            }
            Err(_) => None,
        };
        let g = self.gone.get_or_insert_with(x, Gone::default);
        g.pred_by.note(by);
        match buried {
            Some((l, false)) => {
                let killers = match row_killers(row_dead, x) {
                    None => g.pred_by.clone(),
                    Some(mut k) => {
                        k.join(&g.pred_by);
                        k
                    }
                };
                g.dead = Some(Dead {
                    hlc: l.hlc,
                    value: l.value,
                    by: killers,
                });
            }
            Some((_, true)) => {}
            None => {
                if let Some(d) = &mut g.dead {
                    d.by.note(by);
                }
            }
        }
    }

    /// Supersedes everything of `origin` up to `upto` (the row-wide mark is
    /// already in `row_dead`).
    fn kill_prefix(&mut self, origin: u32, upto: u64, by: Lid, row_dead: &RowDead) {
        let mut i = 0;
        while i < self.live.len() {
            let id = self.live[i].id;
            if id.o == origin && id.seq <= upto {
                let l = self.live.remove(i);
                self.bury(l, row_dead);
            } else {
                i += 1;
            }
        }
        self.gone.for_prefix_mut(origin, upto, |g| {
            if let Some(d) = &mut g.dead {
                d.by.note(by);
            }
        });
        self.counters.remove_prefix(origin, upto);
    }

    /// Phase 2 of a field write: store `w` as live, as a contribution or as
    /// dead on arrival. `row` is who superseded `op` row-wide.
    fn add_write(
        &mut self,
        op: &Op,
        id: Lid,
        w: &FieldWrite,
        row: Option<&Killers>,
        origin: &NodeId,
    ) {
        if row.is_none()
            && let Some(delta) = &w.delta
        {
            self.counters.insert(id, delta.clone());
        }
        let field = self.pred_killers(id);
        if row.is_none() && field.is_none() {
            let value = Stored::from(&w.value);
            match self.live_pos(id) {
                Ok(i) => {
                    self.live[i].hlc = op.hlc.into();
                    self.live[i].value = value;
                }
                Err(i) => {
                    let l = Live {
                        // The row's own copy of the origin: its reference
                        // count is hot, the op's is not.
                        op: OpId::new(origin.clone(), id.seq),
                        id,
                        hlc: op.hlc.into(),
                        value,
                    };
                    if i == self.live.len() {
                        self.live.push(l);
                    } else {
                        self.live.insert(i, l);
                    }
                }
            }
        } else if w.delta.is_none() {
            let mut by = row.cloned().unwrap_or_default();
            if let Some(k) = field {
                by.join(k);
            }
            let g = self.gone.get_or_insert_with(id, Gone::default);
            match &mut g.dead {
                Some(d) => {
                    d.hlc = op.hlc.into();
                    d.value = Stored::from(&w.value);
                    d.by.join(&by);
                }
                None => {
                    g.dead = Some(Dead {
                        hlc: op.hlc.into(),
                        value: Stored::from(&w.value),
                        by,
                    })
                }
            }
        }
    }

    /// Merges one (deduplicated) write of `op`, whose id here is `id`;
    /// `preds` is the write's `pred` as row-local ids, without `id`.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        op: &Op,
        id: Lid,
        w: &FieldWrite,
        preds: &[Lid],
        row: Option<&Killers>,
        row_dead: &RowDead,
        origin: &NodeId,
    ) {
        if w.delta.is_none() && preds.len() >= 2 {
            let sorted = preds.windows(2).all(|p| p[0] < p[1]);
            let found = if sorted {
                self.pred_sets.binary_search_by(|s| s.as_slice().cmp(preds))
            } else {
                Ok(0)
            };
            match found {
                Ok(_) if sorted => {}
                Err(i) => self.pred_sets.insert(i, preds.to_vec()),
                _ => {
                    let mut set = preds.to_vec();
                    set.sort_unstable();
                    set.dedup();
                    if set.len() >= 2
                        && let Err(i) = self.pred_sets.binary_search(&set)
                    {
                        self.pred_sets.insert(i, set);
                    }
                }
            }
        }
        for p in preds {
            self.kill(*p, id, row_dead);
        }
        self.add_write(op, id, w, row, origin);
    }

    /// The HLC and value of `id`'s write, if the op set has it.
    fn known(&self, id: Lid) -> Option<(Hlc, &Stored)> {
        if let Ok(i) = self.live_pos(id) {
            let l = &self.live[i];
            return Some((l.hlc.get(), &l.value));
        }
        self.history(id).map(|d| (d.hlc.get(), &d.value))
    }

    /// True when `id`'s write is covered and was superseded by a covered op
    /// (no future `pred` can name it).
    fn settled(&self, id: Lid, cut: &[u64], row_dead: &RowDead) -> bool {
        if !covered(id, cut) || self.live_pos(id).is_ok() {
            return false;
        }
        let mut by = self.killers(id, row_dead);
        if let Some(d) = self.history(id) {
            by.join(&d.by);
        }
        by.any_covered(cut)
    }

    /// Rewrites every origin index with the monotone map `f`.
    fn map_origins(&mut self, f: &impl Fn(u32) -> u32) {
        for l in self.live.iter_mut() {
            l.id.o = f(l.id.o);
        }
        self.counters.map_origins(f);
        self.gone.map_origins(f);
        self.gone.values_mut(|g| {
            g.pred_by.map_origins(f);
            if let Some(d) = &mut g.dead {
                d.by.map_origins(f);
            }
        });
        for set in &mut self.pred_sets {
            for id in set {
                id.o = f(id.o);
            }
        }
    }

    /// Marks every origin index this field uses.
    fn mark_origins(&self, used: &mut [bool]) {
        for l in &self.live {
            used[l.id.o as usize] = true;
        }
        self.counters.for_each(|k, _| used[k.o as usize] = true);
        self.gone.for_each(|k, g| {
            used[k.o as usize] = true;
            g.pred_by.mark_origins(used);
            if let Some(d) = &g.dead {
                d.by.mark_origins(used);
            }
        });
        for id in self.pred_sets.iter().flatten() {
            used[id.o as usize] = true;
        }
    }
}

/// The merged state of one row: a pure function of the set of ops applied.
///
/// [`RowState::apply`] is commutative, associative and idempotent: any order
/// and any duplication of the same ops gives byte-identical state.
///
/// # Supersession
///
/// An op supersedes earlier writes in two ways:
///
/// - **Field `pred`** (exact): a write of field `f` listing op id `x`
///   supersedes `x`'s write of `f`, and nothing else.
/// - **`row_pred`** (prefix): an id `(O, s)` in an op's `row_pred` supersedes
///   every write, counter contribution and tombstone of this row *from origin
///   `O` with `seq <= s`*. Ops reach every replica gap-free per origin, so
///   an origin that names `(O, s)` has seen all of `O`'s ops up to `s`; the
///   ones it did not list were already superseded there by an op in its
///   causal past. Reading the id as a prefix therefore gives the same result
///   on every causally complete op set as listing every id, and it lets a
///   delete name a counter's contributions with one id per origin instead of
///   one per increment.
///
/// A write or tombstone is **live** when nothing in the op set supersedes it.
/// Supersession is remembered, so a write that arrives after its successor
/// is dead on arrival.
///
/// # Counters (`sum`)
///
/// Every write that carries a `delta` is a **counted write** (capture sets
/// `delta` exactly on the writes of `sum` fields). Its
/// **contribution** (the delta) stays until a `row_pred` supersedes it (a
/// delete, or an insert made with [`RowState::insert_pred`]); field `pred`
/// does not remove it, so sequential and concurrent increments all count. A
/// `sum` field reads as the exact sum of its live contributions in op-id
/// order (overflow and decimal rules: [`Strategy::Sum`]). Contributions are
/// keyed by op id, so an op applied twice counts once. A `sum` field with no counted contribution falls back to
/// last-write-wins over its register (e.g. rows written before the field
/// became a counter). Counted writes are not remembered once superseded, so
/// they never appear as known candidates of a resolved conflict.
///
/// # Conflicts
///
/// For a field `f` whose strategy is not `sum`, the conflicts of a row are
/// the distinct **candidate sets** (sets of ≥ 2 op ids) from two sources:
///
/// 1. the live writes of `f`, when there are at least two;
/// 2. the `pred` of `f` of every non-counted write of `f` in the op set
///    (live, superseded, or dead on arrival) that lists at least two distinct
///    ids — those were live at the same time at the writer's origin, i.e. a
///    conflict that was resolved later.
///
/// The same set seen through (1) at one moment and (2) later is one record.
/// Each candidate is **known** when its op is in the op set and writes `f`,
/// without a delta or still live: the state keeps the HLC and value of every
/// superseded write without a delta (until garbage collection) precisely so
/// that this does not depend on the order ops arrived in. A candidate named only by
/// someone's `pred` is unknown (`hlc`/`value` `None`); the record's `winner`
/// is the strategy's pick among the candidates once all are known. So
/// [`RowState::conflicts`] is a pure function of the op set (and the rules):
/// every replica that has seen the same ops reports the same records.
///
/// # Garbage collection
///
/// [`RowState::collect_garbage`] forgets what no future op can need, given a
/// **stable cut** `stable` (a version vector) that satisfies:
///
/// - **(P1)** every op covered by `stable` (`seq <= stable[origin]`) has been
///   applied to this state;
/// - **(P2)** every op applied to this state afterwards is not covered by
///   `stable` and was written by an origin that had already applied every
///   covered op.
///
/// "Every node has seen it" is not enough for (P2): a node may have written
/// an op before it saw a covered op, and that op may still be in flight. A
/// cut that satisfies both: take every node `N`'s version vector `V_N` as
/// reported at some moment (including `V_N[N]`, its own last seq); let
/// `stable = min_N V_N` (componentwise). It is valid at a replica as soon as
/// that replica holds, for every `N`, all of `N`'s ops up to `V_N[N]`: every
/// op of `N` it has not applied yet was written after that report.
///
/// What it drops:
/// - supersession memory of covered ids (covered ops are never applied
///   again: callers deduplicate by version vector);
/// - superseded values and resolved candidate sets once settled: a write is
///   **settled** when it is covered and some covered op superseded it — every
///   future op's origin has then seen it superseded, so no future `pred` can
///   name it. A candidate set is dropped when all its candidates are
///   settled; values are kept while a remaining set needs them;
/// - covered live tombstones, but only when the row has no live write and no
///   live contribution: they hide nothing now, and by (P2) every future op
///   was written by an origin that had seen them, so it supersedes them
///   (it names them, or it is an insert carrying [`RowState::insert_pred`],
///   or its causal past holds such an op).
///
/// Live writes and live contributions are never dropped (future ops name
/// them), so a counter keeps one contribution per counted write until a
/// delete; and until garbage collection runs, a row keeps the HLC and value
/// of every superseded write and the id of every superseded op.
///
/// A dropped tombstone can no longer be named by this replica's future ops,
/// while other replicas may still hold it. So once garbage collection is
/// used, every upsert that (re)creates a row — the row was absent from the
/// origin's database — must carry [`RowState::insert_pred`] as `row_pred`:
/// it names the origin's whole version vector as prefixes, which supersedes
/// every tombstone it had seen, dropped or not. Updates carry
/// [`RowState::tombstone_pred`], deletes [`RowState::delete_pred`]. With
/// that, replicas that collect garbage at different times converge to the
/// rows of the union of all ops (`tests/laws.rs`,
/// `replicas_collecting_garbage_while_writing_converge_to_the_union`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowState {
    /// Every origin the row names, sorted by name, none unnamed: a
    /// [`Lid`]'s `o` is an index into it.
    pub(crate) origins: Vec<NodeId>,
    /// Per field, sorted by name; none is empty.
    pub(crate) fields: Vec<FieldState>,
    /// Live deletes, sorted by id.
    pub(crate) tombstones: Vec<(Lid, Hlc)>,
    /// Row-scope supersession: origin, seq `s` (every op of the origin up to
    /// `s` is superseded), by whom.
    pub(crate) row_dead: RowDead,
}

/// The first 8 bytes of a name, zero-padded, big-endian: names compare as
/// their keys unless the keys tie.
fn name_key(name: &str) -> u64 {
    bytes_key(name.as_bytes())
}

/// The first 8 bytes, zero-padded, big-endian.
fn bytes_key(b: &[u8]) -> u64 {
    match b.first_chunk::<8>() {
        Some(k) => u64::from_be_bytes(*k),
        // Byte by byte: no `memcpy` call for a short name.
        None => b
            .iter()
            .enumerate()
            .fold(0u64, |k, (i, &x)| k | (u64::from(x) << (56 - 8 * i))),
    }
}

/// `a == b` for field names, without a `memcmp` call for short names.
fn same_name(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && if a.len() <= 8 {
            bytes_key(a) == bytes_key(b)
        } else {
            a == b
        }
}

/// `a < b` for field names, without a `memcmp` call for short names.
fn name_before(a: &str, b: &str) -> bool {
    match name_key(a).cmp(&name_key(b)) {
        std::cmp::Ordering::Equal if a.len() <= 8 && b.len() <= 8 => a.len() < b.len(),
        std::cmp::Ordering::Equal => a < b,
        o => o.is_lt(),
    }
}

/// The first byte of a value's text or bytes, if it has any.
fn first_byte(v: &Value) -> Option<u8> {
    match v {
        Value::Decimal(s) | Value::Text(s) | Value::Json(s) => s.as_bytes().first().copied(),
        Value::Bytes(b) => b.first().copied(),
        _ => None,
    }
}

/// True when no two writes of `writes` name the same field (the names are
/// strictly increasing, as capture usually emits them, or all distinct).
fn distinct_names(writes: &[FieldWrite]) -> bool {
    writes
        .windows(2)
        .all(|p| name_before(&p[0].name, &p[1].name))
        || writes
            .iter()
            .enumerate()
            .all(|(i, w)| writes[i + 1..].iter().all(|x| x.name != w.name))
}
impl RowState {
    /// The index of `origin` in the origin table (which must hold it).
    fn ix(&self, origin: &NodeId) -> u32 {
        self.origins
            .iter()
            .position(|o| o == origin)
            .unwrap_or_default() as u32
    }

    /// Adds `origin` to the origin table if it is not there; true when it
    /// was added.
    fn intern(&mut self, origin: &NodeId) -> bool {
        if self.origins.iter().any(|o| o == origin) {
            return false;
        }
        let at = self.origins.partition_point(|o| o < origin);
        self.origins.insert(at, origin.clone());
        // Indices from `at` on shift (none when it is the last).
        if at + 1 < self.origins.len() {
            let at = at as u32;
            self.map_origins(&|o| if o >= at { o + 1 } else { o });
        }
        true
    }

    /// Rewrites every origin index with the monotone map `f`.
    fn map_origins(&mut self, f: &impl Fn(u32) -> u32) {
        for (id, _) in &mut self.tombstones {
            id.o = f(id.o);
        }
        self.row_dead.map_origins(f);
        self.row_dead.values_mut(|k| k.map_origins(f));
        for field in &mut self.fields {
            field.map_origins(f);
        }
    }

    /// True when every origin of the table is named by something.
    pub(crate) fn names_every_origin(&self) -> bool {
        self.used_origins().iter().all(|u| *u)
    }

    /// Per origin of the table, whether something names it.
    fn used_origins(&self) -> SmallVec<[bool; 16]> {
        let mut used: SmallVec<[bool; 16]> = SmallVec::from_elem(false, self.origins.len());
        for (id, _) in &self.tombstones {
            used[id.o as usize] = true;
        }
        self.row_dead.for_each(|k, v| {
            used[k.o as usize] = true;
            v.mark_origins(&mut used);
        });
        for field in &self.fields {
            field.mark_origins(&mut used);
        }
        used
    }

    /// Drops origins nothing names any more (keeps the table canonical).
    fn prune_origins(&mut self) {
        let used = self.used_origins();
        if used.iter().all(|u| *u) {
            return;
        }
        let mut new = Vec::with_capacity(used.len());
        let mut next = 0u32;
        for u in &used {
            new.push(next);
            if *u {
                next += 1;
            }
        }
        let mut i = 0;
        self.origins.retain(|_| {
            i += 1;
            used[i - 1]
        });
        self.map_origins(&|o| new[o as usize]);
    }

    /// Merges one op into the row. Applying the same op again changes nothing.
    ///
    /// Malformed ops are read deterministically: an op that writes one field
    /// twice writes it once, with its last write of that field; an op never
    /// supersedes itself or its origin's later ops (an id of its own origin
    /// in `row_pred` counts up to the op's seq − 1, its own id in a field
    /// `pred` is ignored).
    pub fn apply(&mut self, op: &Op) {
        // Every origin the op names gets an index first (indices shift when
        // one is added), then every id of the op becomes a row-local id, in
        // op order: the op's own, its `row_pred`, each write's `pred`.
        let mut lids: SmallVec<[Lid; 32]> = SmallVec::new();
        let mut added: SmallVec<[NodeId; 4]> = SmallVec::new();
        while let Err(missing) = self.local_ids(op, &mut lids) {
            let missing = missing.clone();
            self.intern(&missing);
            added.push(missing);
        }
        let id = lids[0];
        // Origins (by index, below 64) something of this op surely names
        // once it is merged: then adding them leaves no origin unnamed.
        let mut named = 0u64;
        let rows = 1 + op.row_pred.len();
        if !op.row_pred.is_empty() {
            // Row predecessors as prefixes: the highest seq per origin says it all.
            let mut upto: SmallVec<[(u32, u64); 4]> = SmallVec::new();
            for (p, l) in op.row_pred.iter().zip(&lids[1..rows]) {
                let o = l.o;
                let seq = if o == id.o {
                    p.seq.min(op.id.seq.saturating_sub(1))
                } else {
                    p.seq
                };
                match upto.iter_mut().find(|(x, _)| *x == o) {
                    Some(e) => e.1 = e.1.max(seq),
                    None => upto.push((o, seq)),
                }
            }
            upto.sort_unstable_by_key(|e| e.0);
            for (origin, seq) in upto {
                if seq > 0 {
                    // The mark names `origin`, its killer names the op.
                    named |= bit(origin) | bit(id.o);
                    self.kill_row(origin, seq, id);
                }
            }
        }
        let mut emptied = !op.row_pred.is_empty();
        match op.kind {
            OpKind::Upsert => {
                let row = row_killers(&self.row_dead, id);
                // A counted write of an op superseded row-wide stores nothing.
                emptied |= row.is_some();
                // Any write names the op: stored live, as a contribution,
                // dead on arrival, or (a counted write superseded row-wide)
                // by the row-wide mark of its own origin.
                if !op.fields.is_empty() {
                    named |= bit(id.o);
                }
                if distinct_names(&op.fields) {
                    let mut next = 0;
                    let mut at = rows;
                    for w in &op.fields {
                        let preds = &lids[at..at + w.pred.len()];
                        at += w.pred.len();
                        next = self.write(op, id, w, preds, row.as_ref(), next, &mut named);
                    }
                } else {
                    // The last write of each name counts.
                    let mut writes: Vec<(usize, &FieldWrite, usize)> = Vec::new();
                    let mut at = rows;
                    for (i, w) in op.fields.iter().enumerate() {
                        writes.push((i, w, at));
                        at += w.pred.len();
                    }
                    writes.sort_by(|a, b| a.1.name.cmp(&b.1.name).then(b.0.cmp(&a.0)));
                    writes.dedup_by(|later, first| later.1.name == first.1.name);
                    let mut next = 0;
                    for (_, w, at) in writes {
                        let preds = &lids[at..at + w.pred.len()];
                        next = self.write(op, id, w, preds, row.as_ref(), next, &mut named);
                    }
                }
            }
            OpKind::Delete => {
                // A tombstone, or the row-wide mark that superseded it.
                named |= bit(id.o);
                if row_killers(&self.row_dead, id).is_none() {
                    match self.tombstone_pos(id) {
                        Ok(i) => self.tombstones[i].1 = op.hlc,
                        Err(i) => self.tombstones.insert(i, (id, op.hlc)),
                    }
                }
            }
        }
        // Only a row-wide kill can leave a field empty (a field `pred`
        // leaves the superseded entry behind, a write stores itself).
        if emptied {
            self.fields.retain(|f| !f.is_empty());
        }
        debug_assert!(self.fields.iter().all(|f| !f.is_empty()));
        // Nothing that was named stops being named by a merge, so only an
        // added origin can be unnamed.
        if added.iter().any(|n| named & bit(self.ix(n)) == 0) {
            self.prune_origins();
        }
        debug_assert!(self.names_every_origin());
    }

    /// The row-local ids of `op` (its id, its `row_pred`, every write's
    /// `pred`, in op order) into `out`, or the first origin the table lacks.
    fn local_ids<'o>(&self, op: &'o Op, out: &mut SmallVec<[Lid; 32]>) -> Result<(), &'o NodeId> {
        out.clear();
        let mut last: Option<(&NodeId, u32)> = None;
        let mut local = |n: &'o NodeId, seq: u64| -> Result<Lid, &'o NodeId> {
            let o = match last {
                Some((l, o)) if l == n => o,
                _ => {
                    let o = self.origins.iter().position(|o| o == n).ok_or(n)? as u32;
                    last = Some((n, o));
                    o
                }
            };
            Ok(Lid::new(o, seq))
        };
        out.push(local(&op.id.origin, op.id.seq)?);
        for p in &op.row_pred {
            out.push(local(&p.origin, p.seq)?);
        }
        for w in &op.fields {
            for p in &w.pred {
                out.push(local(&p.origin, p.seq)?);
            }
            // A decoded op's names and texts are separate allocations:
            // reading one byte of each here starts their cache misses
            // together, instead of one at a time as each write is merged.
            std::hint::black_box((w.name.as_bytes().first().copied(), first_byte(&w.value)));
        }
        Ok(())
    }

    fn field(&self, name: &str) -> Option<&FieldState> {
        self.fields
            .binary_search_by(|f| f.name.as_slice().cmp(name.as_bytes()))
            .ok()
            .map(|i| &self.fields[i])
    }

    fn tombstone_pos(&self, id: Lid) -> Result<usize, usize> {
        self.tombstones.binary_search_by(|(k, _)| k.cmp(&id))
    }

    /// The op id of a row-local id.
    fn op_id(&self, id: Lid) -> OpId {
        OpId::new(self.origins[id.o as usize].clone(), id.seq)
    }

    /// Merges one write of `op` (the op writes no other field of that name).
    /// `hint` is where the field probably is (ops write the same fields in
    /// the same order); returns the next hint.
    /// `lids` is the write's `pred` as row-local ids; the origins of the
    /// ids it supersedes are marked in `named`.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        op: &Op,
        id: Lid,
        w: &FieldWrite,
        lids: &[Lid],
        row: Option<&Killers>,
        hint: usize,
        named: &mut u64,
    ) -> usize {
        let i = match self.fields.get(hint) {
            Some(f) if same_name(f.name.as_slice(), w.name.as_bytes()) => hint,
            _ => match self
                .fields
                .binary_search_by(|f| f.name.as_slice().cmp(w.name.as_bytes()))
            {
                Ok(i) => i,
                Err(i) => {
                    if self.fields.capacity() == 0 {
                        self.fields.reserve_exact(op.fields.len());
                    }
                    self.fields.insert(i, FieldState::new(&w.name));
                    i
                }
            },
        };
        let mut preds: SmallVec<[Lid; 4]> = SmallVec::new();
        for &l in lids {
            if l != id {
                // Its superseded entry names the origin.
                *named |= bit(l.o);
                preds.push(l);
            }
        }
        self.fields[i].write(
            op,
            id,
            w,
            &preds,
            row,
            &self.row_dead,
            &self.origins[id.o as usize],
        );
        i + 1
    }

    fn kill_row(&mut self, origin: u32, upto: u64, by: Lid) {
        let p = Lid::new(origin, upto);
        let mut fresh = false;
        let k = self.row_dead.get_or_insert_with(p, || {
            fresh = true;
            Killers::one(by)
        });
        if !fresh {
            k.note(by);
        }
        for f in &mut self.fields {
            f.kill_prefix(origin, upto, by, &self.row_dead);
        }
        self.tombstones
            .retain(|(id, _)| !(id.o == origin && id.seq <= upto));
    }

    /// The ids a new write of `field` at this replica supersedes (its live
    /// writes).
    pub fn field_pred(&self, field: &str) -> Vec<OpId> {
        self.field(field)
            .map(|f| f.live.iter().map(|l| l.op.clone()).collect())
            .unwrap_or_default()
    }

    /// The live tombstones: the `row_pred` of an update.
    pub fn tombstone_pred(&self) -> Vec<OpId> {
        self.tombstones
            .iter()
            .map(|(id, _)| self.op_id(*id))
            .collect()
    }

    /// The `row_pred` of a delete: every live write and tombstone of the row,
    /// and for counter contributions the highest live one per origin (a
    /// `row_pred` id stands for its origin's prefix, see [`RowState`]).
    pub fn delete_pred(&self) -> Vec<OpId> {
        let mut ids: BTreeSet<Lid> = self.tombstones.iter().map(|(id, _)| *id).collect();
        for f in &self.fields {
            ids.extend(f.live.iter().map(|l| l.id));
        }
        let mut top: BTreeMap<u32, u64> = BTreeMap::new();
        for f in &self.fields {
            f.counters.for_each(|k, _| {
                let e = top.entry(k.o).or_insert(0);
                *e = (*e).max(k.seq);
            });
        }
        ids.extend(top.into_iter().map(|(o, s)| Lid::new(o, s)));
        ids.into_iter().map(|id| self.op_id(id)).collect()
    }

    /// The `row_pred` of an upsert that (re)creates the row — the row was
    /// absent from the origin's database: it supersedes everything of the row
    /// the origin has seen. `seen` is the origin's version vector (or at
    /// least the last cut it collected garbage at). One id per origin: the
    /// highest of `seen[origin]` and the origin's live ids of this row.
    ///
    /// Without it, a re-insert after a delete keeps the writes and counter
    /// contributions that were concurrent with the delete (hidden under
    /// `delete_wins`, but still there), and tombstones dropped by garbage
    /// collection could not be superseded at replicas that still hold them.
    pub fn insert_pred(&self, seen: &VersionVector) -> Vec<OpId> {
        let mut top: BTreeMap<NodeId, u64> = seen
            .0
            .iter()
            .filter(|(_, s)| **s > 0)
            .map(|(o, s)| (o.clone(), *s))
            .collect();
        for id in self.delete_pred() {
            let e = top.entry(id.origin).or_insert(0);
            *e = (*e).max(id.seq);
        }
        top.into_iter().map(|(o, s)| OpId::new(o, s)).collect()
    }

    /// Live writes of `field` (more than one means concurrent writes), in
    /// op-id order.
    pub fn entries(&self, field: &str) -> impl Iterator<Item = (&OpId, Entry)> {
        self.field(field).into_iter().flat_map(|f| {
            f.live.iter().map(|l| {
                (
                    &l.op,
                    Entry {
                        hlc: l.hlc.get(),
                        value: l.value.to_value(),
                    },
                )
            })
        })
    }

    /// True when a live delete is present.
    pub fn has_tombstone(&self) -> bool {
        !self.tombstones.is_empty()
    }

    /// True when the state holds nothing at all (as `RowState::default()`).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.tombstones.is_empty() && self.row_dead.is_empty()
    }

    /// Whether [`RowState::collect_garbage`] has nothing to forget at any
    /// cut: the row is not empty and holds live writes and counters only
    /// (no candidate sets, superseded writes, tombstones or row-scope
    /// supersession), as a row written once or never concurrently does.
    /// Cheap: garbage-collection passes skip such rows without cloning.
    pub fn is_compact(&self) -> bool {
        !self.fields.is_empty()
            && self.tombstones.is_empty()
            && self.row_dead.is_empty()
            && self.fields.iter().all(|f| {
                f.pred_sets.is_empty()
                    && f.gone.is_empty()
                    && !(f.live.is_empty() && f.counters.is_empty())
            })
            && self.used_origins().iter().all(|u| *u)
    }

    /// Whether `op`, a write made before its origin saw deletes the mesh
    /// has garbage-collected (concurrent with them), is an update of a row
    /// those deletes removed, so that `delete_wins` must drop it (the
    /// uncollected tombstone would have hidden it): an upsert with no
    /// `row_pred` (not an insert that superseded what it saw) whose field
    /// writes name writes they replaced (an update of a row its database
    /// showed), to a row whose merged state (this one) has no live write
    /// and no tombstone. Every write it named was superseded by ops its
    /// origin did not see, ending in a delete whose tombstone is gone. An
    /// insert of a key nobody wrote before, by an origin that had seen
    /// nothing yet, names no predecessor at all and is kept. ARCHITECTURE.md,
    /// invariant 6.
    pub fn loses_update(&self, rules: &TableRules, op: &Op) -> bool {
        rules.deletes == DeletePolicy::DeleteWins
            && op.kind == OpKind::Upsert
            && op.row_pred.is_empty()
            && op.fields.iter().any(|f| !f.pred.is_empty())
            && !self.has_tombstone()
            && self.visible(rules).is_none()
    }

    /// Whether `op`, a write whose origin had not seen this row's deletes
    /// (a publish-only node that never applies others' ops, judged by a hub
    /// that holds every tombstone it did not see), stays hidden by one of
    /// them under `delete_wins` once merged: an upsert with fields after
    /// which a tombstone remains (its `row_pred` superseded only what its
    /// origin saw, such as its own earlier delete). A replica that has
    /// garbage-collected that tombstone would show the write, one that
    /// still holds it would not: the judge drops the write's fields so both
    /// agree (ARCHITECTURE.md, invariant 6). Unlike [`RowState::loses_update`]
    /// this covers re-inserts, but it needs the tombstones themselves.
    pub fn loses_to_delete(&self, rules: &TableRules, op: &Op) -> bool {
        if rules.deletes != DeletePolicy::DeleteWins
            || op.kind != OpKind::Upsert
            || op.fields.is_empty()
            || !self.has_tombstone()
        {
            return false;
        }
        let mut after = self.clone();
        after.apply(op);
        after.has_tombstone()
    }

    /// Whether `op`, a write made without seeing deletes this row may have
    /// had, loses to them under `delete_wins`: [`RowState::loses_update`]
    /// (the deletes were collected here) or [`RowState::loses_to_delete`]
    /// (a tombstone still held hides it). The one rule the hub and the
    /// nodes judge such writes by; a losing write keeps its id and loses
    /// its fields.
    pub fn loses_to_unseen_deletes(&self, rules: &TableRules, op: &Op) -> bool {
        self.loses_update(rules, op) || self.loses_to_delete(rules, op)
    }

    /// The visible row under `rules`, or `None` when the row does not exist.
    ///
    /// `delete_wins` hides a row with any live tombstone. Otherwise each
    /// field with a live write (or, for `sum`, a live contribution) shows its
    /// strategy's value; `update_wins` therefore shows the fields written
    /// concurrently with a delete, and the others read NULL. A row with no
    /// such field does not exist.
    pub fn visible(&self, rules: &TableRules) -> Option<VisibleRow> {
        if self.has_tombstone() && rules.deletes == DeletePolicy::DeleteWins {
            return None;
        }
        // Fields are sorted by name, so the map is built in one pass.
        let mut row: Vec<(String, Value)> = Vec::with_capacity(self.fields.len());
        for f in &self.fields {
            if f.live.is_empty() && f.counters.is_empty() {
                continue;
            }
            let strategy = rules.strategy(f.name.as_str());
            let counted = match strategy {
                Strategy::Sum if !f.counters.is_empty() => sum(f.counters.values()),
                _ => None,
            };
            let value = counted.or_else(|| match f.live.as_slice() {
                [l] => Some(l.value.to_value()),
                live => {
                    let values: SmallVec<[(Hlc, Value); 4]> = live
                        .iter()
                        .map(|l| (l.hlc.get(), l.value.to_value()))
                        .collect();
                    let cands = live.iter().zip(&values).map(|(l, (hlc, value))| Cand {
                        op: &l.op,
                        hlc,
                        value,
                    });
                    pick(strategy, rules, cands).map(|c| c.value.clone())
                }
            });
            if let Some(v) = value {
                row.push((f.name.as_str().to_owned(), v));
            }
        }
        (!row.is_empty()).then(|| row.into_iter().collect())
    }

    /// The conflict records of this row under `rules`, sorted by field and
    /// candidate ids (exact definition in the [`RowState`] docs). Fields whose
    /// strategy is `sum` never conflict.
    pub fn conflicts(&self, rules: &TableRules) -> Vec<Conflict> {
        let mut out = Vec::new();
        for f in &self.fields {
            if f.live.is_empty() && f.pred_sets.is_empty() {
                continue;
            }
            let strategy = rules.strategy(f.name.as_str());
            if *strategy == Strategy::Sum {
                continue;
            }
            let mut sets: BTreeSet<Vec<Lid>> = f.pred_sets.iter().cloned().collect();
            if f.live.len() >= 2 {
                sets.insert(f.live.iter().map(|l| l.id).collect());
            }
            for ids in sets {
                out.push(self.conflict(f, strategy, rules, ids));
            }
        }
        out
    }

    fn conflict(
        &self,
        f: &FieldState,
        strategy: &Strategy,
        rules: &TableRules,
        ids: Vec<Lid>,
    ) -> Conflict {
        let ops: Vec<OpId> = ids.iter().map(|id| self.op_id(*id)).collect();
        let knowns: Vec<Option<(Hlc, Value)>> = ids
            .iter()
            .map(|id| f.known(*id).map(|(h, v)| (h, v.to_value())))
            .collect();
        let mut known = Vec::new();
        let mut candidates = Vec::with_capacity(ids.len());
        for (op, k) in ops.iter().zip(&knowns) {
            if let Some((hlc, value)) = k {
                known.push(Cand { op, hlc, value });
            }
            candidates.push(Candidate {
                op: op.clone(),
                hlc: k.as_ref().map(|(h, _)| *h),
                value: k.as_ref().map(|(_, v)| v.clone()),
            });
        }
        let hlc = known.iter().map(|c| *c.hlc).max();
        let winner = if known.len() == ids.len() {
            pick(strategy, rules, known.iter().copied())
        } else {
            None
        };
        Conflict {
            field: f.name.as_str().to_owned(),
            candidates,
            strategy: strategy.name().to_owned(),
            winner: winner.map(|c| c.op.clone()),
            value: winner.map(|c| c.value.clone()),
            hlc,
        }
    }

    /// Forgets what no future op can need, given a stable cut (conditions
    /// (P1) and (P2) in the [`RowState`] docs — the caller must guarantee
    /// them).
    /// Returns true when the row is now empty: the caller may delete it, and
    /// a later op starts from `RowState::default()` with the same result.
    ///
    /// Never changes the visible row, and not the visible row after any
    /// further ops that respect (P2) either; [`RowState::conflicts`] loses
    /// exactly the records whose candidates are all settled.
    pub fn collect_garbage(&mut self, stable: &VersionVector) -> bool {
        let cut: Vec<u64> = self.origins.iter().map(|o| stable.get(o)).collect();
        let cut = cut.as_slice();
        let row_dead = &self.row_dead;
        for f in &mut self.fields {
            // Candidate sets: keep those with an unsettled candidate.
            let kept: Vec<Vec<Lid>> = f
                .pred_sets
                .iter()
                .filter(|ids| !ids.iter().all(|id| f.settled(*id, cut, row_dead)))
                .cloned()
                .collect();
            let needed: BTreeSet<Lid> = kept.iter().flatten().copied().collect();
            // Superseded values: drop the settled ones no kept set names.
            // Supersession memory of covered ids.
            f.gone.retain_mut(|id, g| {
                let covered = covered(id, cut);
                if let Some(d) = &g.dead
                    && covered
                    && d.by.any_covered(cut)
                    && !needed.contains(&id)
                {
                    g.dead = None;
                }
                if covered {
                    g.pred_by = Killers::default();
                }
                !(g.pred_by.is_empty() && g.dead.is_none())
            });
            drop(needed);
            f.pred_sets = kept;
        }
        self.row_dead.retain_mut(|id, _| !covered(id, cut));
        // Covered tombstones of a row with nothing live.
        if self
            .fields
            .iter()
            .all(|f| f.live.is_empty() && f.counters.is_empty())
        {
            self.tombstones.retain(|(id, _)| !covered(*id, cut));
        }
        self.fields.retain(|f| !f.is_empty());
        self.prune_origins();
        self.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{FieldWrite, NodeId};

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
    }
    fn hlc(t: u64) -> Hlc {
        Hlc { time: t, id: 1 }
    }
    fn w(name: &str, v: i64, pred: Vec<OpId>) -> FieldWrite {
        FieldWrite {
            name: name.into(),
            value: Value::Int(v),
            pred,
            delta: None,
        }
    }
    fn inc(name: &str, value: i64, delta: i64, pred: Vec<OpId>) -> FieldWrite {
        FieldWrite {
            name: name.into(),
            value: Value::Int(value),
            pred,
            delta: Some(Value::Int(delta)),
        }
    }
    fn up(n: &str, s: u64, t: u64, fields: Vec<FieldWrite>) -> Op {
        Op::upsert(id(n, s), hlc(t), "t", vec![], fields)
    }
    fn merge(ops: &[&Op]) -> RowState {
        let mut r = RowState::default();
        for op in ops {
            r.apply(op);
        }
        r
    }

    /// Past `FLAT_MAX` entries a field's maps regroup per origin; the state
    /// must still be a function of the op set alone.
    #[test]
    fn a_long_history_gives_identical_bytes_in_any_order() {
        let mut rules = TableRules::default();
        rules.fields.insert("n".into(), Strategy::Sum);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let origins = ["d", "a", "c", "b"];
        let mut seq = [0u64; 4];
        let mut state = RowState::default();
        let mut older = RowState::default();
        let mut ops = Vec::new();
        for t in 0..300u64 {
            let o = next(4) as usize;
            seq[o] += 1;
            let seen = if next(5) == 0 { &older } else { &state };
            let op = if next(40) == 0 {
                Op::delete(
                    id(origins[o], seq[o]),
                    hlc(t),
                    "t",
                    vec![],
                    seen.delete_pred(),
                )
            } else {
                let mut op = up(
                    origins[o],
                    seq[o],
                    t,
                    vec![
                        w("x", t as i64, seen.field_pred("x")),
                        inc("n", t as i64, 1, seen.field_pred("n")),
                    ],
                );
                op.row_pred = seen.tombstone_pred();
                op
            };
            older = state.clone();
            state.apply(&op);
            ops.push(op);
        }
        let bytes = |r: &RowState| postcard::to_allocvec(r).unwrap();
        let expect = bytes(&state);
        let mut rev = RowState::default();
        for op in ops.iter().rev() {
            rev.apply(op);
        }
        assert_eq!(bytes(&rev), expect);
        assert_eq!(rev, state);
        // Interleaved, with every op twice.
        let mut mixed = RowState::default();
        for i in (0..ops.len()).step_by(2).chain((1..ops.len()).step_by(2)) {
            mixed.apply(&ops[i]);
            mixed.apply(&ops[ops.len() - 1 - i]);
        }
        assert_eq!(bytes(&mixed), expect);
        assert_eq!(mixed.visible(&rules), state.visible(&rules));
        assert_eq!(mixed.conflicts(&rules), state.conflicts(&rules));
        assert!(
            state.conflicts(&rules).len() > 5,
            "concurrent writes happened"
        );
        let back: RowState = postcard::from_bytes(&expect).unwrap();
        assert_eq!(back, state);
        // Garbage collection at a cut covering every op shrinks it alike.
        let mut cut = VersionVector::default();
        for (o, s) in origins.iter().zip(seq) {
            cut.set(NodeId::new(*o).unwrap(), s);
        }
        let (mut a, mut b) = (state.clone(), mixed.clone());
        a.collect_garbage(&cut);
        b.collect_garbage(&cut);
        assert_eq!(bytes(&a), bytes(&b));
        assert!(bytes(&a).len() < expect.len() / 4);
        assert_eq!(a.visible(&rules), state.visible(&rules));
    }

    #[test]
    fn short_name_comparisons_agree_with_string_order() {
        let names = [
            "",
            "a",
            "a\0",
            "ab",
            "b",
            "f0",
            "f1",
            "f10",
            "qty",
            "12345678",
            "123456789",
            "12345678a",
            "12345678b",
            "price_with_tax",
        ];
        for a in names {
            for b in names {
                assert_eq!(name_before(a, b), a < b, "{a:?} < {b:?}");
                assert_eq!(
                    same_name(a.as_bytes(), b.as_bytes()),
                    a == b,
                    "{a:?} == {b:?}"
                );
            }
        }
    }

    #[test]
    fn sequential_write_replaces_concurrent_write_resolves_by_hlc() {
        let rules = TableRules::default();
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let b1 = up("b", 1, 20, vec![w("x", 2, vec![id("a", 1)])]);
        let c1 = up("c", 1, 15, vec![w("x", 3, vec![id("a", 1)])]);
        let mut r = RowState::default();
        r.apply(&a1);
        r.apply(&b1);
        assert_eq!(r.entries("x").count(), 1);
        r.apply(&c1);
        assert_eq!(r.entries("x").count(), 2, "b1 and c1 are concurrent");
        assert_eq!(r.visible(&rules).unwrap()["x"], Value::Int(2));
    }

    #[test]
    fn late_predecessor_is_discarded() {
        let a1 = up("a", 1, 30, vec![w("x", 1, vec![])]);
        let b1 = up("b", 1, 20, vec![w("x", 2, vec![id("a", 1)])]);
        let mut r = RowState::default();
        r.apply(&b1);
        r.apply(&a1);
        assert_eq!(
            r.visible(&TableRules::default()).unwrap()["x"],
            Value::Int(2)
        );
    }

    #[test]
    fn sequential_pending_replaces_active_even_under_priority_order() {
        let mut rules = TableRules::default();
        rules.fields.insert(
            "s".into(),
            Strategy::PriorityOrder(vec!["active".into(), "pending".into()]),
        );
        let t = |s: &str| Value::Text(s.into());
        let mut a1 = up("a", 1, 10, vec![]);
        a1.fields.push(FieldWrite::new("s", t("active")));
        let mut b1 = up("b", 1, 20, vec![]);
        b1.fields.push(FieldWrite {
            pred: vec![id("a", 1)],
            ..FieldWrite::new("s", t("pending"))
        });
        let r = merge(&[&b1, &a1]);
        assert_eq!(r.visible(&rules).unwrap()["s"], t("pending"));
        assert!(r.conflicts(&rules).is_empty());
    }

    #[test]
    fn delete_wins_against_concurrent_update_and_reinsert_resurrects() {
        let mut rules = TableRules::default();
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![]), w("y", 1, vec![])]);
        let del = Op::delete(id("b", 1), hlc(20), "t", vec![], vec![id("a", 1)]);
        let upd = up("c", 1, 30, vec![w("y", 5, vec![id("a", 1)])]);
        let mut r = merge(&[&a1, &del, &upd]);
        assert_eq!(r.visible(&rules), None);
        rules.deletes = DeletePolicy::UpdateWins;
        let v = r.visible(&rules).unwrap();
        assert_eq!(v.get("y"), Some(&Value::Int(5)));
        assert_eq!(v.get("x"), None);
        let mut re = up(
            "a",
            2,
            40,
            vec![w("x", 9, r.field_pred("x")), w("y", 9, r.field_pred("y"))],
        );
        re.row_pred = r.tombstone_pred();
        r.apply(&re);
        rules.deletes = DeletePolicy::DeleteWins;
        assert_eq!(r.visible(&rules).unwrap()["y"], Value::Int(9));
    }

    #[test]
    fn row_pred_is_a_prefix_per_origin() {
        // a2 wrote y only; a delete naming a#2 also supersedes a#1's write of x.
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let a2 = up("a", 2, 11, vec![w("y", 2, vec![])]);
        let b1 = up("b", 1, 12, vec![w("z", 3, vec![])]);
        let del = Op::delete(id("c", 1), hlc(20), "t", vec![], vec![id("a", 2)]);
        let r = merge(&[&del, &a1, &b1, &a2]);
        let rules = TableRules {
            deletes: DeletePolicy::UpdateWins,
            ..TableRules::default()
        };
        let v = r.visible(&rules).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v["z"], Value::Int(3));
    }

    #[test]
    fn counter_contributions_survive_pred_and_die_by_delete() {
        let mut rules = TableRules::default();
        rules.fields.insert("n".into(), Strategy::Sum);
        let a1 = up("a", 1, 10, vec![inc("n", 5, 5, vec![])]);
        let a2 = up("a", 2, 11, vec![inc("n", 7, 2, vec![id("a", 1)])]);
        let b1 = up("b", 1, 12, vec![inc("n", 15, 10, vec![id("a", 1)])]);
        let r = merge(&[&a2, &b1, &a1]);
        assert_eq!(r.visible(&rules).unwrap()["n"], Value::Int(17));
        assert!(r.conflicts(&rules).is_empty(), "sum never conflicts");
        // Applying again counts once.
        let mut again = r.clone();
        again.apply(&b1);
        assert_eq!(again, r);
        // A delete that saw a1, a2 but not b1 leaves b1's increment.
        let del = Op::delete(id("c", 1), hlc(20), "t", vec![], vec![id("a", 2)]);
        let mut d = r.clone();
        d.apply(&del);
        rules.deletes = DeletePolicy::UpdateWins;
        assert_eq!(d.visible(&rules).unwrap()["n"], Value::Int(10));
        // A re-insert with insert_pred starts from its own delta.
        let mut vv = VersionVector::default();
        vv.set(NodeId::new("a").unwrap(), 2);
        vv.set(NodeId::new("b").unwrap(), 1);
        vv.set(NodeId::new("c").unwrap(), 1);
        let mut re = up("c", 2, 30, vec![inc("n", 4, 4, d.field_pred("n"))]);
        re.row_pred = d.insert_pred(&vv);
        assert_eq!(re.row_pred.len(), 3, "one id per origin");
        d.apply(&re);
        rules.deletes = DeletePolicy::DeleteWins;
        assert_eq!(d.visible(&rules).unwrap()["n"], Value::Int(4));
        assert_eq!(d.delete_pred(), vec![id("c", 2)]);
    }

    #[test]
    fn sum_field_without_counted_writes_falls_back_to_last_write() {
        let mut rules = TableRules::default();
        rules.fields.insert("n".into(), Strategy::Sum);
        let a1 = up("a", 1, 10, vec![w("n", 5, vec![])]);
        let b1 = up("b", 1, 12, vec![w("n", 6, vec![])]);
        let r = merge(&[&a1, &b1]);
        assert_eq!(r.visible(&rules).unwrap()["n"], Value::Int(6));
        let a2 = up(
            "a",
            2,
            13,
            vec![inc("n", 8, 2, vec![id("a", 1), id("b", 1)])],
        );
        let r = merge(&[&a1, &b1, &a2]);
        assert_eq!(
            r.visible(&rules).unwrap()["n"],
            Value::Int(2),
            "only counted writes count once one exists"
        );
    }

    #[test]
    fn resolved_conflict_is_remembered_with_values_in_any_order() {
        let rules = TableRules::default();
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let b1 = up("b", 1, 20, vec![w("x", 2, vec![])]);
        // c saw a1 and b1 live, then wrote: resolves the conflict.
        let c1 = up("c", 1, 30, vec![w("x", 3, vec![id("a", 1), id("b", 1)])]);
        // A delete that saw a1 and b1 but not c1.
        let d1 = Op::delete(
            id("d", 1),
            hlc(25),
            "t",
            vec![],
            vec![id("a", 1), id("b", 1)],
        );
        let all = [&a1, &b1, &c1, &d1];
        let expect = merge(&all).conflicts(&rules);
        assert_eq!(expect.len(), 1);
        let c = &expect[0];
        assert!(c.is_complete());
        assert_eq!(c.winner, Some(id("b", 1)));
        assert_eq!(c.value, Some(Value::Int(2)));
        assert_eq!(c.hlc, Some(hlc(20)));
        // Every order gives the same record (24 permutations).
        let mut idx = [0usize, 1, 2, 3];
        for _ in 0..24 {
            let ops: Vec<&Op> = idx.iter().map(|i| all[*i]).collect();
            assert_eq!(merge(&ops).conflicts(&rules), expect, "{idx:?}");
            next_permutation(&mut idx);
        }
        // Before a1 arrives the candidate is unknown and there is no winner.
        let partial = merge(&[&c1, &b1]).conflicts(&rules);
        assert_eq!(partial[0].candidates[0].value, None);
        assert_eq!(partial[0].winner, None);
        assert!(!partial[0].is_complete());
    }

    fn next_permutation(v: &mut [usize]) {
        let Some(i) = (1..v.len()).rev().find(|&i| v[i - 1] < v[i]) else {
            v.reverse();
            return;
        };
        let j = (i..v.len()).rev().find(|&j| v[j] > v[i - 1]).unwrap();
        v.swap(i - 1, j);
        v[i..].reverse();
    }

    #[test]
    fn an_op_never_supersedes_itself() {
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let mut a2 = up("a", 2, 20, vec![w("y", 2, vec![id("a", 2)])]);
        a2.row_pred = vec![id("a", 5)];
        let r = merge(&[&a2, &a1]);
        assert_eq!(r, merge(&[&a1, &a2]));
        let v = r.visible(&TableRules::default()).unwrap();
        assert_eq!(v.get("x"), None, "a#1 is superseded");
        assert_eq!(v["y"], Value::Int(2), "a#2 is not");
    }

    #[test]
    fn garbage_collection_of_a_deleted_row_empties_it() {
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let b1 = up("b", 1, 20, vec![w("x", 2, vec![])]);
        let c1 = up("c", 1, 30, vec![w("x", 3, vec![id("a", 1), id("b", 1)])]);
        let d = Op::delete(id("a", 2), hlc(40), "t", vec![], vec![id("c", 1)]);
        let mut r = merge(&[&a1, &b1, &c1, &d]);
        let mut cut = VersionVector::default();
        cut.set(NodeId::new("a").unwrap(), 1);
        cut.set(NodeId::new("b").unwrap(), 1);
        cut.set(NodeId::new("c").unwrap(), 1);
        assert!(!r.collect_garbage(&cut), "the tombstone a#2 is not covered");
        assert_eq!(r.conflicts(&TableRules::default()), vec![], "settled");
        assert!(r.has_tombstone());
        cut.set(NodeId::new("a").unwrap(), 2);
        assert!(r.collect_garbage(&cut));
        assert!(r.is_empty());
    }

    #[test]
    fn tombstone_is_kept_while_a_concurrent_write_is_live() {
        let a1 = up("a", 1, 10, vec![w("x", 1, vec![])]);
        let d = Op::delete(id("b", 1), hlc(20), "t", vec![], vec![id("a", 1)]);
        let c1 = up("c", 1, 15, vec![w("y", 1, vec![])]);
        let mut r = merge(&[&a1, &d, &c1]);
        let mut cut = VersionVector::default();
        for n in ["a", "b", "c"] {
            cut.set(NodeId::new(n).unwrap(), 1);
        }
        assert!(!r.collect_garbage(&cut));
        assert_eq!(r.visible(&TableRules::default()), None);
    }
}
