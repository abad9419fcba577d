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

/// The table of [`Slot`](super::table::Slot)s (generic for its tests).
pub(super) struct Slots<T> {
    map: BTreeMap<String, T>,
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
    type Target = BTreeMap<String, T>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<T> Slots<T> {
    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        if let Some(t) = self.touched.get(name) {
            t.set(true);
        }
        self.map.get_mut(name)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.touched.values().for_each(|t| t.set(true));
        self.map.values_mut()
    }

    pub fn insert(&mut self, name: String, slot: T) -> Option<T> {
        self.touched.insert(name.clone(), Cell::new(true));
        self.map.insert(name, slot)
    }

    pub fn remove(&mut self, name: &str) -> Option<T> {
        self.touched.remove(name);
        self.map.remove(name)
    }

    /// Whether `name` was touched since the last call for it (and clears the mark).
    pub fn take_touched(&self, name: &str) -> bool {
        self.touched.get(name).is_none_or(|t| t.replace(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_way_to_change_a_slot_marks_it() {
        let mut s = Slots::<u32>::default();
        assert!(s.take_touched("a"), "unknown: counts as touched");
        s.insert("a".into(), 1);
        s.insert("b".into(), 2);
        assert!(s.take_touched("a") && s.take_touched("b"));
        assert!(!s.take_touched("a") && !s.take_touched("b"));
        let _ = s.get("a");
        assert!(!s.take_touched("a"), "a read does not mark");
        let _ = s.get_mut("a");
        assert!(s.take_touched("a") && !s.take_touched("b"));
        s.values_mut().for_each(|_| {});
        assert!(s.take_touched("a") && s.take_touched("b"));
        s.remove("a");
        assert!(s.take_touched("a"));
    }
}
