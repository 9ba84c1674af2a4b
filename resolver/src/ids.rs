//! Compact op-id-keyed containers of [`RowState`](crate::RowState).
//!
//! A row holds few origins but, until garbage collection, many superseded
//! writes per origin. [`IdMap`] keeps them grouped by origin (sorted by
//! name, each origin's [`NodeId`] stored once) and sorted by seq inside a
//! group; ops reach a replica gap-free per origin, so the common insert is
//! an append, and a `row_pred` prefix `(O, s)` is a prefix of `O`'s group.
//! [`Killers`] holds its usual single entry inline. Both are canonical
//! (sorted, no empty group), so equal contents serialize to equal bytes.

use serde::{Deserialize, Serialize};
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

/// A map from op id to `V`: per origin (sorted by name), per seq (sorted).
/// No group is empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IdMap<V>(Vec<(NodeId, Vec<(u64, V)>)>);

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap(Vec::new())
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

impl<V> IdMap<V> {
    fn origin_pos(&self, origin: &NodeId) -> Result<usize, usize> {
        self.0.binary_search_by(|(o, _)| o.cmp(origin))
    }

    /// Every entry of `origin`, sorted by seq.
    pub(crate) fn group(&self, origin: &NodeId) -> &[(u64, V)] {
        match self.origin_pos(origin) {
            Ok(i) => &self.0[i].1,
            Err(_) => &[],
        }
    }

    pub(crate) fn get(&self, id: &OpId) -> Option<&V> {
        let group = self.group(&id.origin);
        seq_pos(group, id.seq).ok().map(|i| &group[i].1)
    }

    pub(crate) fn get_mut(&mut self, id: &OpId) -> Option<&mut V> {
        let g = self.origin_pos(&id.origin).ok()?;
        let group = &mut self.0[g].1;
        let i = seq_pos(group, id.seq).ok()?;
        Some(&mut group[i].1)
    }

    pub(crate) fn contains(&self, id: &OpId) -> bool {
        self.get(id).is_some()
    }

    /// The group of `origin`, created if absent.
    fn group_mut(&mut self, origin: &NodeId) -> &mut Vec<(u64, V)> {
        let g = match self.origin_pos(origin) {
            Ok(g) => g,
            Err(g) => {
                self.0.insert(g, (origin.clone(), Vec::new()));
                g
            }
        };
        &mut self.0[g].1
    }

    /// The value of `id`, inserted with `make` if absent.
    pub(crate) fn get_or_insert_with(&mut self, id: &OpId, make: impl FnOnce() -> V) -> &mut V {
        let group = self.group_mut(&id.origin);
        let i = match seq_pos(group, id.seq) {
            Ok(i) => i,
            Err(i) => {
                group.insert(i, (id.seq, make()));
                i
            }
        };
        &mut group[i].1
    }

    /// Sets the value of `id`.
    pub(crate) fn insert(&mut self, id: &OpId, value: V) {
        let group = self.group_mut(&id.origin);
        match seq_pos(group, id.seq) {
            Ok(i) => group[i].1 = value,
            Err(i) => group.insert(i, (id.seq, value)),
        }
    }

    /// The entries of `origin` with `seq <= upto`.
    pub(crate) fn prefix_mut(
        &mut self,
        origin: &NodeId,
        upto: u64,
    ) -> impl Iterator<Item = (u64, &mut V)> {
        let group: &mut [(u64, V)] = match self.origin_pos(origin) {
            Ok(g) => &mut self.0[g].1,
            Err(_) => &mut [],
        };
        let end = group.partition_point(|(s, _)| *s <= upto);
        group[..end].iter_mut().map(|(s, v)| (*s, v))
    }

    /// Removes the entries of `origin` with `seq <= upto`.
    pub(crate) fn remove_prefix(&mut self, origin: &NodeId, upto: u64) {
        if let Ok(g) = self.origin_pos(origin) {
            let group = &mut self.0[g].1;
            let end = group.partition_point(|(s, _)| *s <= upto);
            group.drain(..end);
            if group.is_empty() {
                self.0.remove(g);
            }
        }
    }

    /// Keeps the entries for which `keep` holds.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&NodeId, u64, &V) -> bool) {
        for (origin, group) in &mut self.0 {
            group.retain(|(s, v)| keep(origin, *s, v));
        }
        self.0.retain(|(_, g)| !g.is_empty());
    }

    /// Every entry in op-id order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&NodeId, u64, &V)> {
        self.0
            .iter()
            .flat_map(|(o, g)| g.iter().map(move |(s, v)| (o, *s, v)))
    }

    /// Every entry's value in op-id order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().flat_map(|(_, g)| g.iter().map(|(_, v)| v))
    }

    /// Per origin, the highest seq held.
    pub(crate) fn tops(&self) -> impl Iterator<Item = (&NodeId, u64)> {
        self.0
            .iter()
            .filter_map(|(o, g)| g.last().map(|(s, _)| (o, *s)))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(n: &str, s: u64) -> OpId {
        OpId::new(NodeId::new(n).unwrap(), s)
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
        let order: Vec<(String, u64)> = fwd
            .iter()
            .map(|(o, s, _)| (o.as_str().to_owned(), s))
            .collect();
        assert_eq!(
            order,
            [("a", 1), ("a", 3), ("b", 1), ("b", 2), ("c", 7)]
                .map(|(o, s)| (o.to_owned(), s))
                .to_vec()
        );
        fwd.insert(&id("a", 3), 9);
        assert_eq!(fwd.get(&id("a", 3)), Some(&9));
        assert_eq!(fwd.get(&id("a", 2)), None);
        fwd.remove_prefix(&NodeId::new("a").unwrap(), 3);
        fwd.retain(|_, s, _| s != 7);
        assert_eq!(fwd.iter().count(), 2, "the a and c groups are gone");
        assert_eq!(fwd.0.len(), 1);
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
