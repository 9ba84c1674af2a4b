//! Compact op-id-keyed containers of [`RowState`](crate::RowState).
//!
//! A row holds few origins but, until garbage collection, many superseded
//! writes per origin. [`IdMap`] keeps them grouped by origin (sorted by
//! name, each origin's [`NodeId`] stored once) and sorted by seq inside a
//! group; ops reach a replica gap-free per origin, so the common insert is
//! an append, and a `row_pred` prefix `(O, s)` is a prefix of `O`'s group.
//! [`Killers`] holds its usual single entry inline. Both are canonical
//! (sorted, no empty group), so equal contents serialize to equal bytes.

use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use crate::{NodeId, OpId, VersionVector};

/// The ops that superseded something, as the lowest seq per origin, sorted
/// by origin (enough to tell whether any of them is covered by a stable
/// cut).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Killers(SmallVec<[(NodeId, u64); 1]>);

impl Killers {
    /// Just `by`.
    pub(crate) fn one(by: &OpId) -> Self {
        let mut k = SmallVec::new();
        k.push((by.origin.clone(), by.seq));
        Killers(k)
    }

    /// Adds `(origin, seq)`, keeping the lowest seq per origin.
    fn add(&mut self, origin: &NodeId, seq: u64) {
        match self.0.as_mut_slice() {
            [] => {
                self.0.push((origin.clone(), seq));
                return;
            }
            [(o, s)] if *o == *origin => {
                *s = (*s).min(seq);
                return;
            }
            _ => {}
        }
        match self.0.binary_search_by(|(o, _)| o.cmp(origin)) {
            Ok(i) => self.0[i].1 = self.0[i].1.min(seq),
            Err(i) => self.0.insert(i, (origin.clone(), seq)),
        }
    }

    /// Adds the op `by`.
    pub(crate) fn note(&mut self, by: &OpId) {
        self.add(&by.origin, by.seq);
    }

    /// Adds every entry of `from`.
    pub(crate) fn join(&mut self, from: &Killers) {
        if self.0.is_empty() {
            self.0.clone_from(&from.0);
            return;
        }
        for (origin, seq) in &from.0 {
            self.add(origin, *seq);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when one of them is covered by `stable`.
    pub(crate) fn any_covered(&self, stable: &VersionVector) -> bool {
        self.0
            .iter()
            .any(|(origin, seq)| *seq <= stable.get(origin))
    }
}

/// Entries an [`IdMap`] keeps in one flat vector before it groups them by
/// origin.
const FLAT_MAX: usize = 32;

/// Capacity of a flat [`IdMap`]'s first allocation (a row's field usually
/// sees several superseded writes).
const FLAT_FIRST: usize = 8;

/// A map from op id to `V`, in op-id order. Small maps are one sorted
/// vector (one allocation); from [`FLAT_MAX`] entries on, entries are
/// grouped per origin (sorted by name) and sorted by seq inside a group, so
/// an insert is an append even in a row with thousands of entries. The
/// representation never shows: equality and the serialized form (the
/// entries in op-id order) depend on the contents only.
#[derive(Clone, Debug)]
pub(crate) enum IdMap<V> {
    /// Sorted by op id.
    Flat(Vec<(OpId, V)>),
    /// Sorted by origin, then seq; no group is empty.
    Grouped(Vec<(NodeId, Vec<(u64, V)>)>),
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
fn flat_pos<V>(flat: &[(OpId, V)], id: &OpId) -> Result<usize, usize> {
    match flat.last() {
        None => Err(0),
        Some((last, _)) if *last < *id => Err(flat.len()),
        Some(_) => flat.binary_search_by(|(k, _)| k.cmp(id)),
    }
}

/// The range of a flat map holding `origin`'s entries with `seq <= upto`.
fn flat_prefix<V>(flat: &[(OpId, V)], origin: &NodeId, upto: u64) -> std::ops::Range<usize> {
    let start = flat.partition_point(|(k, _)| k.origin < *origin);
    let len = flat[start..].partition_point(|(k, _)| k.origin == *origin && k.seq <= upto);
    start..start + len
}

fn origin_pos<V>(groups: &[(NodeId, Vec<(u64, V)>)], origin: &NodeId) -> Result<usize, usize> {
    groups.binary_search_by(|(o, _)| o.cmp(origin))
}

impl<V> IdMap<V> {
    pub(crate) fn get(&self, id: &OpId) -> Option<&V> {
        match self {
            IdMap::Flat(flat) => flat_pos(flat, id).ok().map(|i| &flat[i].1),
            IdMap::Grouped(groups) => {
                let group = &groups[origin_pos(groups, &id.origin).ok()?].1;
                seq_pos(group, id.seq).ok().map(|i| &group[i].1)
            }
        }
    }

    pub(crate) fn get_mut(&mut self, id: &OpId) -> Option<&mut V> {
        match self {
            IdMap::Flat(flat) => {
                let i = flat_pos(flat, id).ok()?;
                Some(&mut flat[i].1)
            }
            IdMap::Grouped(groups) => {
                let g = origin_pos(groups, &id.origin).ok()?;
                let group = &mut groups[g].1;
                let i = seq_pos(group, id.seq).ok()?;
                Some(&mut group[i].1)
            }
        }
    }

    pub(crate) fn contains(&self, id: &OpId) -> bool {
        self.get(id).is_some()
    }

    /// Regroups a flat map that has grown to [`FLAT_MAX`] entries.
    fn regroup(&mut self) {
        if let IdMap::Flat(flat) = self
            && flat.len() >= FLAT_MAX
        {
            let mut groups: Vec<(NodeId, Vec<(u64, V)>)> = Vec::new();
            for (id, v) in std::mem::take(flat) {
                match groups.last_mut() {
                    Some((o, g)) if *o == id.origin => g.push((id.seq, v)),
                    _ => groups.push((id.origin, vec![(id.seq, v)])),
                }
            }
            *self = IdMap::Grouped(groups);
        }
    }

    /// The value of `id`, inserted with `make` if absent.
    pub(crate) fn get_or_insert_with(&mut self, id: &OpId, make: impl FnOnce() -> V) -> &mut V {
        self.regroup();
        match self {
            IdMap::Flat(flat) => {
                let i = match flat_pos(flat, id) {
                    Ok(i) => i,
                    Err(i) => {
                        if flat.capacity() == 0 {
                            flat.reserve_exact(FLAT_FIRST);
                        }
                        flat.insert(i, (id.clone(), make()));
                        i
                    }
                };
                &mut flat[i].1
            }
            IdMap::Grouped(groups) => {
                let g = match origin_pos(groups, &id.origin) {
                    Ok(g) => g,
                    Err(g) => {
                        groups.insert(g, (id.origin.clone(), Vec::new()));
                        g
                    }
                };
                let group = &mut groups[g].1;
                let i = match seq_pos(group, id.seq) {
                    Ok(i) => i,
                    Err(i) => {
                        group.insert(i, (id.seq, make()));
                        i
                    }
                };
                &mut group[i].1
            }
        }
    }

    /// Sets the value of `id`.
    pub(crate) fn insert(&mut self, id: &OpId, value: V) {
        if let Some(slot) = self.get_mut(id) {
            *slot = value;
            return;
        }
        self.get_or_insert_with(id, || value);
    }

    /// Calls `f` on every entry of `origin` with `seq <= upto`.
    pub(crate) fn for_prefix_mut(&mut self, origin: &NodeId, upto: u64, mut f: impl FnMut(&mut V)) {
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
    pub(crate) fn for_from(&self, origin: &NodeId, from: u64, mut f: impl FnMut(&V)) {
        match self {
            IdMap::Flat(flat) => {
                let start = flat.partition_point(|(k, _)| {
                    k.origin < *origin || (k.origin == *origin && k.seq < from)
                });
                flat[start..]
                    .iter()
                    .take_while(|(k, _)| k.origin == *origin)
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
    pub(crate) fn remove_prefix(&mut self, origin: &NodeId, upto: u64) {
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
    pub(crate) fn retain_mut(&mut self, mut keep: impl FnMut(&NodeId, u64, &mut V) -> bool) {
        match self {
            IdMap::Flat(flat) => flat.retain_mut(|(k, v)| keep(&k.origin, k.seq, v)),
            IdMap::Grouped(groups) => {
                for (origin, group) in groups.iter_mut() {
                    group.retain_mut(|(s, v)| keep(origin, *s, v));
                }
                groups.retain(|(_, g)| !g.is_empty());
            }
        }
    }

    /// Calls `f` on every entry in op-id order.
    pub(crate) fn for_each<'a>(&'a self, mut f: impl FnMut(&'a NodeId, u64, &'a V)) {
        match self {
            IdMap::Flat(flat) => flat.iter().for_each(|(k, v)| f(&k.origin, k.seq, v)),
            IdMap::Grouped(groups) => {
                for (origin, group) in groups {
                    group.iter().for_each(|(s, v)| f(origin, *s, v));
                }
            }
        }
    }

    /// Every entry in op-id order.
    fn entries(&self) -> Vec<(&NodeId, u64, &V)> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(|o, s, v| out.push((o, s, v)));
        out
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
            (IdMap::Grouped(a), IdMap::Grouped(b)) => a == b,
            _ => self.entries() == other.entries(),
        }
    }
}

impl<V: Eq> Eq for IdMap<V> {}

impl<V: Serialize> Serialize for IdMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        let mut result = Ok(());
        self.for_each(|origin, s, v| {
            if result.is_ok() {
                result = seq.serialize_element(&((origin, s), v));
            }
        });
        result?;
        seq.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for IdMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries: Vec<((NodeId, u64), V)> = Vec::deserialize(deserializer)?;
        let mut flat: Vec<(OpId, V)> = entries
            .into_iter()
            .map(|((origin, seq), v)| (OpId::new(origin, seq), v))
            .collect();
        if !flat.is_sorted_by(|a, b| a.0 < b.0) {
            flat.sort_by(|a, b| a.0.cmp(&b.0));
            flat.dedup_by(|a, b| a.0 == b.0);
        }
        let mut map = IdMap::Flat(flat);
        map.regroup();
        Ok(map)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
    }

    fn order(m: &IdMap<usize>) -> Vec<(String, u64, usize)> {
        m.entries()
            .into_iter()
            .map(|(o, s, v)| (o.as_str().to_owned(), s, *v))
            .collect()
    }

    #[test]
    fn id_map_is_canonical_in_any_insert_order() {
        let ids = [id("b", 2), id("a", 3), id("b", 1), id("a", 1), id("c", 7)];
        let mut fwd = IdMap::default();
        let mut rev = IdMap::default();
        for (i, x) in ids.iter().enumerate() {
            fwd.insert(x, i);
        }
        for (i, x) in ids.iter().enumerate().rev() {
            rev.insert(x, i);
        }
        assert_eq!(fwd, rev);
        let keys: Vec<(String, u64)> = order(&fwd).into_iter().map(|(o, s, _)| (o, s)).collect();
        assert_eq!(
            keys,
            [("a", 1), ("a", 3), ("b", 1), ("b", 2), ("c", 7)]
                .map(|(o, s)| (o.to_owned(), s))
                .to_vec()
        );
        fwd.insert(&id("a", 3), 9);
        assert_eq!(fwd.get(&id("a", 3)), Some(&9));
        assert_eq!(fwd.get(&id("a", 2)), None);
        fwd.remove_prefix(&NodeId::new("a").unwrap(), 3);
        fwd.retain_mut(|_, s, _| s != 7);
        assert_eq!(order(&fwd), vec![("b".into(), 1, 2), ("b".into(), 2, 0)]);
    }

    #[test]
    fn flat_and_grouped_maps_with_the_same_entries_are_equal_and_serialize_alike() {
        let nodes = ["d", "a", "c", "b"];
        let ids: Vec<OpId> = (1..=50u64)
            .flat_map(|s| nodes.iter().map(move |n| id(n, s)))
            .collect();
        let mut grown = IdMap::default();
        for (i, x) in ids.iter().enumerate() {
            grown.insert(x, i);
        }
        assert!(matches!(grown, IdMap::Grouped(_)));
        let mut backwards = IdMap::default();
        for (i, x) in ids.iter().enumerate().rev() {
            backwards.insert(x, i);
        }
        assert_eq!(grown, backwards);
        let bytes = postcard::to_allocvec(&grown).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&backwards).unwrap());
        let back: IdMap<usize> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, grown);
        // Shrunk below the threshold it stays grouped, yet equals a flat map.
        grown.retain_mut(|o, s, _| o.as_str() == "b" && s <= 3);
        let mut flat = IdMap::default();
        for s in 1..=3 {
            flat.insert(&id("b", s), ((s - 1) * 4 + 3) as usize);
        }
        assert!(matches!(flat, IdMap::Flat(_)));
        assert_eq!(grown, flat);
        assert_eq!(
            postcard::to_allocvec(&grown).unwrap(),
            postcard::to_allocvec(&flat).unwrap()
        );
        // Prefix queries agree in both forms.
        let b = NodeId::new("b").unwrap();
        for m in [&mut grown, &mut flat] {
            let mut seen = Vec::new();
            m.for_from(&b, 2, |v| seen.push(*v));
            assert_eq!(seen, vec![7, 11]);
            m.for_prefix_mut(&b, 2, |v| *v += 100);
            m.remove_prefix(&b, 1);
        }
        assert_eq!(grown, flat);
        assert_eq!(
            order(&flat),
            vec![("b".into(), 2, 107), ("b".into(), 3, 11)]
        );
    }

    #[test]
    fn killers_keep_the_lowest_seq_per_origin() {
        let mut k = Killers::one(&id("b", 5));
        k.note(&id("a", 9));
        k.note(&id("b", 3));
        k.note(&id("b", 4));
        let mut j = Killers::default();
        j.join(&k);
        assert_eq!(j, k);
        let mut cut = VersionVector::default();
        cut.set(NodeId::new("b").unwrap(), 2);
        assert!(!k.any_covered(&cut));
        cut.set(NodeId::new("b").unwrap(), 3);
        assert!(k.any_covered(&cut));
    }
}
