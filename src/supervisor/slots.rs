//! The module table, with a mark on each module touched since the state was last published.
//!
//! A module's published status depends on its slot only (and on the daemon's configuration,
//! fixed for its life), so a module that was not touched shows what it showed: the
//! projection (snapshot.rs) passes it over instead of building and comparing its status
//! again. Reads go through `Deref`; every way to change a slot (`get_mut`, `values_mut`,
//! `insert`) marks it, so a change cannot be missed by going around the mark.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Deref;

/// The table of [`Slot`](super::table::Slot)s (generic for its tests). A slot is boxed: the
/// tree's nodes then hold names and pointers (a node of eleven 2.4 KiB slots inline was
/// 27 KiB, mostly empty, about half again the slots' own size).
pub(super) struct Slots<T> {
    map: BTreeMap<String, Box<T>>,
    /// Per module: touched since the last projection.
    touched: BTreeMap<String, Cell<bool>>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            map: BTreeMap::new(),
            touched: BTreeMap::new(),
        }
    }
}

impl<T> Deref for Slots<T> {
    type Target = BTreeMap<String, Box<T>>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<T> Slots<T> {
    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        if let Some(t) = self.touched.get(name) {
            t.set(true);
        }
        self.map.get_mut(name).map(|b| &mut **b)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.touched.values().for_each(|t| t.set(true));
        self.map.values_mut().map(|b| &mut **b)
    }

    pub fn insert(&mut self, name: String, slot: T) -> Option<T> {
        self.touched.insert(name.clone(), Cell::new(true));
        self.map.insert(name, Box::new(slot)).map(|b| *b)
    }

    pub fn remove(&mut self, name: &str) -> Option<T> {
        self.touched.remove(name);
        self.map.remove(name).map(|b| *b)
    }

    /// Every slot in name order with whether it was touched since the last call (the marks
    /// are cleared). Both maps hold the same names, so they are walked side by side.
    pub fn take_marked(&self) -> impl Iterator<Item = (&String, &T, bool)> {
        (self.map.iter())
            .zip(self.touched.values())
            .map(|((n, s), t)| (n, &**s, t.replace(false)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(s: &Slots<u32>) -> Vec<(String, bool)> {
        s.take_marked().map(|(n, _, t)| (n.clone(), t)).collect()
    }

    fn m(a: bool, b: bool) -> Vec<(String, bool)> {
        vec![("a".into(), a), ("b".into(), b)]
    }

    #[test]
    fn every_way_to_change_a_slot_marks_it() {
        let mut s = Slots::<u32>::default();
        s.insert("b".into(), 2);
        s.insert("a".into(), 1);
        assert_eq!(marks(&s), m(true, true), "new: touched");
        assert_eq!(marks(&s), m(false, false), "the marks are cleared");
        let _ = s.get("a");
        assert_eq!(marks(&s), m(false, false), "a read does not mark");
        if let Some(v) = s.get_mut("b") {
            *v = 3;
        }
        let walked: Vec<_> = s
            .take_marked()
            .map(|(n, v, t)| (n.clone(), *v, t))
            .collect();
        assert_eq!(walked, [("a".into(), 1, false), ("b".into(), 3, true)]);
        s.values_mut().for_each(|_| {});
        assert_eq!(marks(&s), m(true, true));
        s.remove("a");
        s.insert("c".into(), 4);
        let left: Vec<_> = s
            .take_marked()
            .map(|(n, v, t)| (n.clone(), *v, t))
            .collect();
        assert_eq!(left, [("b".into(), 3, false), ("c".into(), 4, true)]);
    }
}
