//! What admission keeps: per module (footprints, the admitted share, the last arithmetic),
//! and per start that waits for evictions; admit.rs decides with them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::admission::{Footprint, Footprints, GpuFree, Need};

/// A module's admission state, kept in its slot.
#[derive(Debug, Default)]
pub(super) struct AdmissionSlot {
    /// Footprints by model, as learned (and as last written).
    pub footprints: Footprints,
    pub written: Footprints,
    /// The current run's peaks, and since when it has been online.
    pub run_peak: Footprint,
    pub online_at: Option<Instant>,
    /// What it was admitted with (its share while it is still starting).
    pub admitted: Option<Need>,
    /// The arithmetic of the last decision (for `explain`).
    pub arithmetic: String,
    /// VRAM it uses now, per GPU.
    pub vram_now: BTreeMap<u32, u64>,
}

impl AdmissionSlot {
    /// A new run: nothing of the previous one counts (its VRAM, its peaks, when it was online).
    pub fn new_run(&mut self) {
        self.vram_now.clear();
        self.run_peak = Footprint::default();
        self.online_at = None;
    }

    pub fn load(state_dir: &Path) -> AdmissionSlot {
        let footprints = Footprints::load(state_dir);
        AdmissionSlot {
            written: footprints.clone(),
            footprints,
            ..AdmissionSlot::default()
        }
    }
}

/// A start waiting for evicted modules to stop and their memory to show as free.
#[derive(Debug)]
pub(super) struct Pending {
    pub generation: u64,
    pub model: Option<PathBuf>,
    pub victims: Vec<String>,
    /// The GPUs the decision placed it on (`"any"`: the one chosen).
    pub gpus: Vec<u32>,
    /// The release poll is under way.
    pub polling: bool,
}

/// The live figures of one measurement.
#[derive(Debug, Clone, Default)]
pub(super) struct Live {
    pub mem_available: u64,
    pub gpus: Vec<GpuFree>,
}
