//! Footprints: what a module really used, per (module, active model), learned from samples
//! while it was online and kept in its state directory (`footprint.json`, written
//! atomically) across restarts of modvisord.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The file in a module's state directory.
pub const FILE: &str = "footprint.json";

/// The measured peaks of one (module, model).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Peak resident memory of the module's processes.
    pub ram_peak: u64,
    /// Peak VRAM per GPU index.
    pub vram_peak: BTreeMap<u32, u64>,
    /// When it was last updated (seconds since the epoch).
    pub measured_at: u64,
}

impl Footprint {
    pub fn vram_total(&self) -> u64 {
        self.vram_peak.values().sum()
    }

    /// Takes the larger of each figure; true when something grew.
    pub fn absorb(&mut self, ram: u64, vram: &BTreeMap<u32, u64>) -> bool {
        let mut grew = false;
        if ram > self.ram_peak {
            self.ram_peak = ram;
            grew = true;
        }
        for (g, b) in vram {
            let e = self.vram_peak.entry(*g).or_insert(0);
            if *b > *e {
                *e = *b;
                grew = true;
            }
        }
        grew
    }

    /// Worth writing again: new, or grown by more than 5% (or 64 MiB) on some figure.
    pub fn differs_enough(&self, written: Option<&Footprint>) -> bool {
        let Some(w) = written else { return true };
        let more = |now: u64, then: u64| now > then + (then / 20).max(64 << 20);
        more(self.ram_peak, w.ram_peak)
            || self
                .vram_peak
                .iter()
                .any(|(g, b)| more(*b, w.vram_peak.get(g).copied().unwrap_or(0)))
    }
}

/// Every footprint of one module, by model ("" when it runs without one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprints {
    pub by_model: BTreeMap<String, Footprint>,
}

/// The key of a model in [`Footprints`].
pub fn model_key(model: Option<&Path>) -> String {
    model.map(|m| m.display().to_string()).unwrap_or_default()
}

impl Footprints {
    /// Reads `footprint.json` of a state directory; nothing (or a broken file) is empty.
    /// Blocking.
    pub fn load(state_dir: &Path) -> Footprints {
        let path = state_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                Footprints::default()
            }),
            Err(_) => Footprints::default(),
        }
    }

    /// Writes atomically (temp file, fsync, rename). Blocking.
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::model::write_atomic(&state_dir.join(FILE), &format!("{text}\n"))
    }

    pub fn get(&self, model: Option<&Path>) -> Option<&Footprint> {
        self.by_model.get(&model_key(model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_atomically_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Footprints::load(dir.path()), Footprints::default());
        let mut f = Footprints::default();
        let mut fp = Footprint::default();
        assert!(fp.absorb(100, &BTreeMap::from([(1, 5)])));
        assert!(!fp.absorb(50, &BTreeMap::from([(1, 4)])));
        f.by_model
            .insert(model_key(Some(Path::new("/m/a.gguf"))), fp);
        f.store(dir.path()).expect("store");
        let back = Footprints::load(dir.path());
        assert_eq!(back, f);
        assert_eq!(
            back.get(Some(Path::new("/m/a.gguf"))).map(|f| f.ram_peak),
            Some(100)
        );
        std::fs::write(dir.path().join(FILE), "{broken").expect("write");
        assert_eq!(Footprints::load(dir.path()), Footprints::default());
    }

    #[test]
    fn written_again_only_when_grown_enough() {
        let gib = 1u64 << 30;
        let w = Footprint {
            ram_peak: gib,
            ..Footprint::default()
        };
        let mut now = w.clone();
        assert!(now.differs_enough(None));
        now.ram_peak = gib + (32 << 20);
        assert!(!now.differs_enough(Some(&w)));
        now.ram_peak = gib + (80 << 20);
        assert!(now.differs_enough(Some(&w)));
    }
}
