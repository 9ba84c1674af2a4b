//! Compact op-id-keyed containers of [`RowState`](crate::RowState).
//!
//! A row holds few origins but, until garbage collection, many superseded
//! writes per origin. The row keeps its origins once, in a table sorted by
//! name; everything inside the row names an op by a [`Lid`] — the origin's
//! index in that table and the seq — so ids are copied, compared and
//! stored as two integers (no reference counts, no string compares), and
//! their order is the order of the op ids they stand for. [`IdMap`] keeps
//! entries in one sorted vector while small and grouped by origin (sorted
//! by seq, so the common insert is an append and a `row_pred` prefix
//! `(O, s)` is a prefix of `O`'s group) once large. [`Killers`] holds its
//! usual single entry inline. Both are canonical (sorted, no empty group),
//! so equal contents encode to equal bytes.

use smallvec::SmallVec;

/// A row-local op id: the origin's index in the row's origin table (sorted
/// by name, so these ids order as the op ids they stand for) and the seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Lid {
    /// Index in the row's origin table.
    pub(crate) o: u32,
    /// The op's seq.
    pub(crate) seq: u64,
}

impl Lid {
    pub(crate) fn new(o: u32, seq: u64) -> Self {
        Lid { o, seq }
    }
}

/// Entries of a boxed [`Killers`] set held in its one allocation.
const MANY_INLINE: usize = 3;

/// Two or more killers, sorted by origin.
type ManyKillers = SmallVec<[(u32, u64); MANY_INLINE]>;

/// The ops that superseded something, as the lowest seq per origin, sorted
/// by origin (enough to tell whether any of them is covered by a stable
/// cut). 16 bytes: one entry, or two with small indices and seqs (a write
/// superseded by a write and a concurrent one) inline; more boxed (one
/// allocation for up to [`MANY_INLINE`]). Equality sees the entries only.
#[derive(Clone, Debug, Default)]
pub(crate) enum Killers {
    /// Nobody.
    #[default]
    Empty,
    /// One op: origin index, seq.
    One { o: u32, seq: u64 },
    /// Two ops, origins increasing, each index below 2^16 and seq below
    /// 2^32.
    Two { o: [u16; 2], seq: [u32; 2] },
    /// Two or more, sorted by origin (a thin box keeps the set at 16
    /// bytes).
    Many(Box<ManyKillers>),
}

/// `(a, b)` inline, if both fit (`a.0 < b.0`).
fn two(a: (u32, u64), b: (u32, u64)) -> Option<Killers> {
    Some(Killers::Two {
        o: [u16::try_from(a.0).ok()?, u16::try_from(b.0).ok()?],
        seq: [u32::try_from(a.1).ok()?, u32::try_from(b.1).ok()?],
    })
}

/// Exactly `entries` (sorted by origin, at most one per origin, at least
/// two), in the smallest form.
fn several(entries: &[(u32, u64)]) -> Killers {
    match entries {
        [a, b] => {
            two(*a, *b).unwrap_or_else(|| Killers::Many(Box::new(ManyKillers::from_slice(entries))))
        }
        _ => Killers::Many(Box::new(ManyKillers::from_slice(entries))),
    }
}

impl Killers {
    /// Just `by`.
    pub(crate) fn one(by: Lid) -> Self {
        Killers::One {
            o: by.o,
            seq: by.seq,
        }
    }

    /// Exactly `entries` (sorted by origin, at most one per origin).
    pub(crate) fn from_sorted(entries: Vec<(u32, u64)>) -> Self {
        match entries.as_slice() {
            [] => Killers::Empty,
            [(o, seq)] => Killers::One { o: *o, seq: *seq },
            _ => several(&entries),
        }
    }

    /// Adds `(origin, seq)`, keeping the lowest seq per origin.
    #[inline]
    fn add(&mut self, origin: u32, seq: u64) {
        match self {
            Killers::Empty => *self = Killers::One { o: origin, seq },
            Killers::One { o, seq: s } if *o == origin => *s = (*s).min(seq),
            Killers::One { o, seq: s } => {
                let (a, b) = ((*o, *s), (origin, seq));
                *self = if a.0 < b.0 {
                    several(&[a, b])
                } else {
                    several(&[b, a])
                };
            }
            Killers::Two { o, seq: s } => {
                let a = (u32::from(o[0]), u64::from(s[0]));
                let b = (u32::from(o[1]), u64::from(s[1]));
                let new = (origin, seq);
                *self = if origin == a.0 {
                    several(&[(a.0, a.1.min(seq)), b])
                } else if origin == b.0 {
                    several(&[a, (b.0, b.1.min(seq))])
                } else if origin < a.0 {
                    several(&[new, a, b])
                } else if origin < b.0 {
                    several(&[a, new, b])
                } else {
                    several(&[a, b, new])
                };
            }
            Killers::Many(v) => match v.binary_search_by(|(o, _)| o.cmp(&origin)) {
                Ok(i) => v[i].1 = v[i].1.min(seq),
                Err(i) => v.insert(i, (origin, seq)),
            },
        }
    }

    /// Adds the op `by`.
    #[inline]
    pub(crate) fn note(&mut self, by: Lid) {
        self.add(by.o, by.seq);
    }

    /// Adds every entry of `from`.
    pub(crate) fn join(&mut self, from: &Killers) {
        if self.is_empty() {
            self.clone_from(from);
            return;
        }
        from.for_each(|o, s| self.add(o, s));
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Killers::Empty)
    }

    /// The number of entries.
    pub(crate) fn len(&self) -> usize {
        match self {
            Killers::Empty => 0,
            Killers::One { .. } => 1,
            Killers::Two { .. } => 2,
            Killers::Many(v) => v.len(),
        }
    }

    /// Calls `f` on every entry in origin order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32, u64)) {
        match self {
            Killers::Empty => {}
            Killers::One { o, seq } => f(*o, *seq),
            Killers::Two { o, seq } => {
                f(u32::from(o[0]), u64::from(seq[0]));
                f(u32::from(o[1]), u64::from(seq[1]));
            }
            Killers::Many(v) => v.iter().for_each(|(o, s)| f(*o, *s)),
        }
    }

    /// True when one of them is covered by the cut (`cut[o]` is the cut's
    /// seq of origin `o`).
    pub(crate) fn any_covered(&self, cut: &[u64]) -> bool {
        let mut any = false;
        self.for_each(|o, seq| any |= seq <= cut[o as usize]);
        any
    }

    /// Rewrites origin indices with the monotone map `f`.
    pub(crate) fn map_origins(&mut self, f: &impl Fn(u32) -> u32) {
        match self {
            Killers::Empty => {}
            Killers::One { o, .. } => *o = f(*o),
            Killers::Two { .. } => {
                let mut e = [(0, 0); 2];
                let mut i = 0;
                self.for_each(|o, s| {
                    e[i] = (f(o), s);
                    i += 1;
                });
                *self = several(&e);
            }
            Killers::Many(v) => v.iter_mut().for_each(|(o, _)| *o = f(*o)),
        }
    }

    /// Marks the origins named.
    pub(crate) fn mark_origins(&self, used: &mut [bool]) {
        self.for_each(|o, _| used[o as usize] = true);
    }
}

impl PartialEq for Killers {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Killers::Empty, Killers::Empty) => true,
            (Killers::One { o, seq }, Killers::One { o: p, seq: t }) => o == p && seq == t,
            (Killers::Two { o, seq }, Killers::Two { o: p, seq: t }) => o == p && seq == t,
            _ => {
                if self.len() != other.len() {
                    return false;
                }
                let mut a: SmallVec<[(u32, u64); 4]> = SmallVec::new();
                self.for_each(|o, s| a.push((o, s)));
                let mut b: SmallVec<[(u32, u64); 4]> = SmallVec::new();
                other.for_each(|o, s| b.push((o, s)));
                a == b
            }
        }
    }
}

impl Eq for Killers {}

/// Entries an [`IdMap`] keeps in one flat vector before it groups them by
/// origin.
const FLAT_MAX: usize = 32;

/// Capacity of a flat [`IdMap`]'s first allocation (a row's field usually
/// sees several superseded writes).
const FLAT_FIRST: usize = 8;

/// A map from row-local op id to `V`, in id order. Small maps are one
/// sorted vector (one allocation); from [`FLAT_MAX`] entries on, entries
/// are grouped per origin and sorted by seq inside a group, so an insert is
/// an append even in a row with thousands of entries. The representation
/// never shows: equality and the encoded form (the entries in id order)
/// depend on the contents only.
#[derive(Clone, Debug)]
pub(crate) enum IdMap<V> {
    /// Sorted by id.
    Flat(Vec<(Lid, V)>),
    /// Sorted by origin, then seq; no group is empty.
    Grouped(Vec<(u32, Vec<(u64, V)>)>),
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap::Flat(Vec::new())
    }
}

/// Position of `seq` in a group sorted by seq (appends checked first).
fn seq_pos<V>(group: &[(u64, V)], seq: u64) -> Result<usize, usize> {
    match group.last() {
        None => Err(0),
        Some((last, _)) if *last < seq => Err(group.len()),
        Some((last, _)) if *last == seq => Ok(group.len() - 1),
        Some(_) => group.binary_search_by(|(s, _)| s.cmp(&seq)),
    }
}

/// Position of `id` in a flat map (appends checked first).
fn flat_pos<V>(flat: &[(Lid, V)], id: Lid) -> Result<usize, usize> {
    match flat.last() {
        None => Err(0),
        Some((last, _)) if *last < id => Err(flat.len()),
        Some(_) => flat.binary_search_by(|(k, _)| k.cmp(&id)),
    }
}

/// The range of a flat map holding `origin`'s entries with `seq <= upto`.
fn flat_prefix<V>(flat: &[(Lid, V)], origin: u32, upto: u64) -> std::ops::Range<usize> {
    let start = flat.partition_point(|(k, _)| k.o < origin);
    let len = flat[start..].partition_point(|(k, _)| k.o == origin && k.seq <= upto);
    start..start + len
}

fn origin_pos<V>(groups: &[(u32, Vec<(u64, V)>)], origin: u32) -> Result<usize, usize> {
    groups.binary_search_by(|(o, _)| o.cmp(&origin))
}

impl<V> IdMap<V> {
    pub(crate) fn get(&self, id: Lid) -> Option<&V> {
        match self {
            IdMap::Flat(flat) => flat_pos(flat, id).ok().map(|i| &flat[i].1),
            IdMap::Grouped(groups) => {
                let group = &groups[origin_pos(groups, id.o).ok()?].1;
                seq_pos(group, id.seq).ok().map(|i| &group[i].1)
            }
        }
    }

    pub(crate) fn get_mut(&mut self, id: Lid) -> Option<&mut V> {
        match self {
            IdMap::Flat(flat) => {
                let i = flat_pos(flat, id).ok()?;
                Some(&mut flat[i].1)
            }
            IdMap::Grouped(groups) => {
                let g = origin_pos(groups, id.o).ok()?;
                let group = &mut groups[g].1;
                let i = seq_pos(group, id.seq).ok()?;
                Some(&mut group[i].1)
            }
        }
    }

    pub(crate) fn contains(&self, id: Lid) -> bool {
        !self.is_empty() && self.get(id).is_some()
    }

    /// Regroups a flat map that has grown to [`FLAT_MAX`] entries.
    #[inline]
    fn regroup(&mut self) {
        if let IdMap::Flat(flat) = self
            && flat.len() >= FLAT_MAX
        {
            self.regroup_now();
        }
    }

    #[cold]
    fn regroup_now(&mut self) {
        if let IdMap::Flat(flat) = self {
            let mut groups: Vec<(u32, Vec<(u64, V)>)> = Vec::new();
            for (id, v) in std::mem::take(flat) {
                match groups.last_mut() {
                    Some((o, g)) if *o == id.o => g.push((id.seq, v)),
                    _ => groups.push((id.o, vec![(id.seq, v)])),
                }
            }
            *self = IdMap::Grouped(groups);
        }
    }

    /// The value of `id`, inserted with `make` if absent.
    pub(crate) fn get_or_insert_with(&mut self, id: Lid, make: impl FnOnce() -> V) -> &mut V {
        self.regroup();
        match self {
            IdMap::Flat(flat) => {
                let i = match flat_pos(flat, id) {
                    Ok(i) => i,
                    Err(i) => {
                        if flat.capacity() == 0 {
                            flat.reserve_exact(FLAT_FIRST);
                        }
                        if i == flat.len() {
                            flat.push((id, make()));
                        } else {
                            flat.insert(i, (id, make()));
                        }
                        i
                    }
                };
                &mut flat[i].1
            }
            IdMap::Grouped(groups) => {
                let g = match origin_pos(groups, id.o) {
                    Ok(g) => g,
                    Err(g) => {
                        groups.insert(g, (id.o, Vec::new()));
                        g
                    }
                };
                let group = &mut groups[g].1;
                let i = match seq_pos(group, id.seq) {
                    Ok(i) => i,
                    Err(i) => {
                        if i == group.len() {
                            group.push((id.seq, make()));
                        } else {
                            group.insert(i, (id.seq, make()));
                        }
                        i
                    }
                };
                &mut group[i].1
            }
        }
    }

    /// Sets the value of `id`.
    pub(crate) fn insert(&mut self, id: Lid, value: V) {
        if let Some(slot) = self.get_mut(id) {
            *slot = value;
            return;
        }
        self.get_or_insert_with(id, || value);
    }

    /// Calls `f` on every entry of `origin` with `seq <= upto`.
    pub(crate) fn for_prefix_mut(&mut self, origin: u32, upto: u64, mut f: impl FnMut(&mut V)) {
        match self {
            IdMap::Flat(flat) => {
                let r = flat_prefix(flat, origin, upto);
                flat[r].iter_mut().for_each(|(_, v)| f(v));
            }
            IdMap::Grouped(groups) => {
                if let Ok(g) = origin_pos(groups, origin) {
                    let group = &mut groups[g].1;
                    let end = group.partition_point(|(s, _)| *s <= upto);
                    group[..end].iter_mut().for_each(|(_, v)| f(v));
                }
            }
        }
    }

    /// Calls `f` on every entry of `origin` with `seq >= from`.
    pub(crate) fn for_from(&self, origin: u32, from: u64, mut f: impl FnMut(&V)) {
        match self {
            IdMap::Flat(flat) => {
                let start = flat.partition_point(|(k, _)| *k < Lid::new(origin, from));
                flat[start..]
                    .iter()
                    .take_while(|(k, _)| k.o == origin)
                    .for_each(|(_, v)| f(v));
            }
            IdMap::Grouped(groups) => {
                if let Ok(g) = origin_pos(groups, origin) {
                    let group = &groups[g].1;
                    let start = group.partition_point(|(s, _)| *s < from);
                    group[start..].iter().for_each(|(_, v)| f(v));
                }
            }
        }
    }

    /// Removes the entries of `origin` with `seq <= upto`.
    pub(crate) fn remove_prefix(&mut self, origin: u32, upto: u64) {
        match self {
            IdMap::Flat(flat) => {
                let r = flat_prefix(flat, origin, upto);
                if !r.is_empty() {
                    flat.drain(r);
                }
            }
            IdMap::Grouped(groups) => {
                if let Ok(g) = origin_pos(groups, origin) {
                    let group = &mut groups[g].1;
                    let end = group.partition_point(|(s, _)| *s <= upto);
                    group.drain(..end);
                    if group.is_empty() {
                        groups.remove(g);
                    }
                }
            }
        }
    }

    /// Keeps the entries for which `keep` holds (it may change them).
    pub(crate) fn retain_mut(&mut self, mut keep: impl FnMut(Lid, &mut V) -> bool) {
        match self {
            IdMap::Flat(flat) => flat.retain_mut(|(k, v)| keep(*k, v)),
            IdMap::Grouped(groups) => {
                for (origin, group) in groups.iter_mut() {
                    let o = *origin;
                    group.retain_mut(|(s, v)| keep(Lid::new(o, *s), v));
                }
                groups.retain(|(_, g)| !g.is_empty());
            }
        }
    }

    /// Calls `f` on every entry in id order.
    pub(crate) fn for_each<'a>(&'a self, mut f: impl FnMut(Lid, &'a V)) {
        match self {
            IdMap::Flat(flat) => flat.iter().for_each(|(k, v)| f(*k, v)),
            IdMap::Grouped(groups) => {
                for (origin, group) in groups {
                    group.iter().for_each(|(s, v)| f(Lid::new(*origin, *s), v));
                }
            }
        }
    }

    /// The values in id order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + Clone {
        let (flat, groups) = match self {
            IdMap::Flat(flat) => (flat.as_slice(), &[][..]),
            IdMap::Grouped(groups) => (&[][..], groups.as_slice()),
        };
        flat.iter()
            .map(|(_, v)| v)
            .chain(groups.iter().flat_map(|(_, g)| g.iter().map(|(_, v)| v)))
    }

    /// Calls `f` on every value (any order).
    pub(crate) fn values_mut(&mut self, mut f: impl FnMut(&mut V)) {
        match self {
            IdMap::Flat(flat) => flat.iter_mut().for_each(|(_, v)| f(v)),
            IdMap::Grouped(groups) => {
                for (_, group) in groups {
                    group.iter_mut().for_each(|(_, v)| f(v));
                }
            }
        }
    }

    /// Rewrites the keys' origin indices with the monotone map `f` (the
    /// order of the entries does not change).
    pub(crate) fn map_origins(&mut self, f: &impl Fn(u32) -> u32) {
        match self {
            IdMap::Flat(flat) => flat.iter_mut().for_each(|(k, _)| k.o = f(k.o)),
            IdMap::Grouped(groups) => groups.iter_mut().for_each(|(o, _)| *o = f(*o)),
        }
    }

    /// A map of `entries`, which must be strictly increasing by id.
    pub(crate) fn from_sorted(entries: Vec<(Lid, V)>) -> Self {
        let mut map = IdMap::Flat(entries);
        map.regroup();
        map
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            IdMap::Flat(flat) => flat.len(),
            IdMap::Grouped(groups) => groups.iter().map(|(_, g)| g.len()).sum(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            IdMap::Flat(flat) => flat.is_empty(),
            IdMap::Grouped(groups) => groups.is_empty(),
        }
    }
}

impl<V: PartialEq> PartialEq for IdMap<V> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (IdMap::Flat(a), IdMap::Flat(b)) => a == b,
            _ => {
                if self.len() != other.len() {
                    return false;
                }
                let mut a = Vec::with_capacity(self.len());
                self.for_each(|k, v| a.push((k, v)));
                let mut i = 0;
                let mut same = true;
                other.for_each(|k, v| {
                    same = same && a[i].0 == k && a[i].1 == v;
                    i += 1;
                });
                same
            }
        }
    }
}

impl<V: Eq> Eq for IdMap<V> {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(o: u32, s: u64) -> Lid {
        Lid::new(o, s)
    }

    fn order(m: &IdMap<usize>) -> Vec<(u32, u64, usize)> {
        let mut out = Vec::new();
        m.for_each(|k, v| out.push((k.o, k.seq, *v)));
        out
    }

    #[test]
    fn id_map_is_canonical_in_any_insert_order() {
        let ids = [id(1, 2), id(0, 3), id(1, 1), id(0, 1), id(2, 7)];
        let mut fwd = IdMap::default();
        let mut rev = IdMap::default();
        for (i, x) in ids.iter().enumerate() {
            fwd.insert(*x, i);
        }
        for (i, x) in ids.iter().enumerate().rev() {
            rev.insert(*x, i);
        }
        assert_eq!(fwd, rev);
        let keys: Vec<(u32, u64)> = order(&fwd).into_iter().map(|(o, s, _)| (o, s)).collect();
        assert_eq!(keys, vec![(0, 1), (0, 3), (1, 1), (1, 2), (2, 7)]);
        fwd.insert(id(0, 3), 9);
        assert_eq!(fwd.get(id(0, 3)), Some(&9));
        assert_eq!(fwd.get(id(0, 2)), None);
        fwd.remove_prefix(0, 3);
        fwd.retain_mut(|k, _| k.seq != 7);
        assert_eq!(order(&fwd), vec![(1, 1, 2), (1, 2, 0)]);
    }

    #[test]
    fn flat_and_grouped_maps_with_the_same_entries_are_equal() {
        let nodes = [3, 0, 2, 1];
        let ids: Vec<Lid> = (1..=50u64)
            .flat_map(|s| nodes.iter().map(move |n| id(*n, s)))
            .collect();
        let mut grown = IdMap::default();
        for (i, x) in ids.iter().enumerate() {
            grown.insert(*x, i);
        }
        assert!(matches!(grown, IdMap::Grouped(_)));
        let mut backwards = IdMap::default();
        for (i, x) in ids.iter().enumerate().rev() {
            backwards.insert(*x, i);
        }
        assert_eq!(grown, backwards);
        // Shrunk below the threshold it stays grouped, yet equals a flat map.
        grown.retain_mut(|k, _| k.o == 1 && k.seq <= 3);
        let mut flat = IdMap::default();
        for s in 1..=3 {
            flat.insert(id(1, s), ((s - 1) * 4 + 3) as usize);
        }
        assert!(matches!(flat, IdMap::Flat(_)));
        assert_eq!(grown, flat);
        // Prefix queries and shifts agree in both forms.
        for m in [&mut grown, &mut flat] {
            let mut seen = Vec::new();
            m.for_from(1, 2, |v| seen.push(*v));
            assert_eq!(seen, vec![7, 11]);
            m.for_prefix_mut(1, 2, |v| *v += 100);
            m.remove_prefix(1, 1);
            m.map_origins(&|o| o + 1);
        }
        assert_eq!(grown, flat);
        assert_eq!(order(&flat), vec![(2, 2, 107), (2, 3, 11)]);
    }

    #[test]
    fn killers_keep_the_lowest_seq_per_origin() {
        let mut k = Killers::one(id(1, 5));
        k.note(id(0, 9));
        k.note(id(1, 3));
        k.note(id(1, 4));
        let mut j = Killers::default();
        j.join(&k);
        assert_eq!(j, k);
        assert_eq!(k, Killers::from_sorted(vec![(0, 9), (1, 3)]));
        assert_eq!(std::mem::size_of::<Killers>(), 16);
        assert!(!k.any_covered(&[0, 2]));
        assert!(k.any_covered(&[0, 3]));
    }
}
