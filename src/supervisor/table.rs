//! What the actor holds: the module table (a machine and the I/O side of its run per module),
//! the daemon-wide state beside it, and the events its own tasks send back. The actor
//! (actor.rs) and the files that extend it (admit, commands, effects, sampling, snapshot,
//! explain) work on these.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::admission_slot::{AdmissionSlot, Live, Pending};
use super::module::{Input, Lifecycle};
use super::resources::Usage;
use super::{Found, ManagerSignal, Reply, ReplyId};
use crate::config::Config;
use crate::journal::{Journal, OutputSink};
use crate::manifest::{ManifestError, Mode};
use crate::policy::Decision;
use crate::runtime::{Backend, RunHandle, RuntimeEvent};
use crate::state::Snapshot;

/// What comes back to the actor from its own tasks.
pub(super) enum Event {
    /// An input for one module's machine.
    Module(String, Input),
    /// The backend started a run (or adopted one): the handle the actor keeps.
    Started {
        name: String,
        generation: u64,
        backend: Arc<dyn Backend>,
        handle: RunHandle,
        fallback: Option<String>,
    },
    /// A sampling pass, and the number of runs started before it began.
    Sample(Box<crate::monitor::Sample>, u64),
    /// A RestartModule whose model was checked first (off the actor): None, or why not.
    RestartChecked {
        name: String,
        reply: Reply<()>,
        refused: Option<String>,
    },
    /// One probe's duration and outcome (metrics).
    ProbeTimed {
        name: String,
        seconds: f64,
        ok: bool,
    },
    /// A manifest scan finished.
    Scanned(Box<crate::manifest::LoadResult>),
    /// Admission's measurement of free memory for a start (round 1: after evicting).
    Measured {
        name: String,
        generation: u64,
        model: Option<PathBuf>,
        live: Box<Live>,
        round: u8,
    },
    /// A start waiting for evictions has waited long enough: decide again now.
    PendingDue { name: String, generation: u64 },
}

/// Manifest scans: one at a time; replies wait for the scan that started after they asked.
#[derive(Default)]
pub(super) struct Scans {
    pub running: bool,
    pub current: Vec<oneshot::Sender<Vec<(String, String)>>>,
    pub next: Vec<oneshot::Sender<Vec<(String, String)>>>,
}

/// The I/O side of a module's current run.
pub(super) struct RunSlot {
    pub generation: u64,
    pub backend: Arc<dyn Backend>,
    pub handle: RunHandle,
    pub container_id: String,
}

/// One module: its machine, and what the actor holds for it.
pub(super) struct Slot {
    pub lc: Lifecycle,
    pub override_mode: Option<Mode>,
    pub decision: Decision,
    pub run: Option<RunSlot>,
    pub probe: Option<AbortHandle>,
    /// Timers and helper tasks of this module, aborted when it is removed.
    pub tasks: Vec<AbortHandle>,
    pub sink: Option<OutputSink>,
    /// The number of the module's last output line before its current run started: what
    /// the run said is numbered above it.
    pub output_start: u64,
    /// The number of its last output line the latest sample saw (output is start progress).
    pub output_seen: u64,
    /// A container ID its backend reported before it answered the start: (generation, ID).
    pub early_container_id: Option<(u64, String)>,
    /// The unit or container of the latest run ("" for direct children).
    pub last_unit: String,
    pub usage: Usage,
    /// Runs of ours found at start-up, consumed by the first start.
    pub found: Vec<Found>,
    pub counters: crate::state::ModuleCounters,
    /// What the module's listen address does with a connection now ([serve]).
    pub gate: watch::Sender<crate::proxy::Gate>,
    /// The addresses it listens on (their sockets are released when it no longer does).
    pub listening: Vec<crate::manifest::ServeAddr>,
    /// The connections open through them right now (admission reads it: the lifecycle hears
    /// of the last one closing a moment later).
    pub open: Option<Arc<crate::proxy::Counter>>,
    /// The listener's tasks (aborted when the module goes or its listen addresses change).
    pub listener: Vec<AbortHandle>,
    /// When the current start began (until it is online: the start duration).
    pub start_at: Option<std::time::Instant>,
    /// Footprints, the admitted share, the last admission arithmetic.
    pub adm: AdmissionSlot,
}

impl Slot {
    pub fn own(&mut self, task: AbortHandle) {
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(task);
    }
    pub fn abort_all(&mut self) {
        if let Some(p) = self.probe.take() {
            p.abort();
        }
        for t in self.listener.drain(..) {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

pub(super) struct Supervisor {
    pub cfg: Arc<Config>,
    pub native: Option<Arc<dyn Backend>>,
    pub container: Result<Arc<dyn Backend>, String>,
    pub container_engine: String,
    pub journal: Option<Arc<Journal>>,
    pub slots: super::slots::Slots<Slot>,
    pub manifest_errors: Vec<ManifestError>,
    pub events: mpsc::UnboundedSender<Event>,
    pub runtime_tx: mpsc::UnboundedSender<RuntimeEvent>,
    pub state_tx: watch::Sender<Arc<Snapshot>>,
    pub signals: tokio::sync::broadcast::Sender<ManagerSignal>,
    pub gpu: Option<Arc<crate::monitor::Gpu>>,
    pub gpu_error_logged: bool,
    /// The sampling thread (sampler.rs).
    pub sampler: super::sampler::Sampler,
    /// Whether the sampler was last told there is anything to sample.
    pub sample_wanted: bool,
    /// A module came up with no figures yet: the sampler is asked for a pass once the
    /// snapshot that shows it is published.
    pub sample_soon: bool,
    /// Runs started so far: a sample that began before the latest start may have seen its
    /// engine's process without knowing it is a module's.
    pub runs_started: u64,
    pub machine_total: u64,
    pub gpus: Vec<crate::monitor::GpuRow>,
    pub foreign: Vec<(u32, String, u64)>,
    /// The GPU of each foreign process.
    pub foreign_gpu: HashMap<u32, u32>,
    /// Starts waiting for evicted modules' memory.
    pub pending: BTreeMap<String, Pending>,
    /// Runs of ours found at start-up, by module, consumed by the first reload.
    pub existing: BTreeMap<String, Vec<Found>>,
    pub replies: HashMap<ReplyId, Reply<()>>,
    pub next_reply: ReplyId,
    /// Helper tasks of the daemon itself (stops of unclaimed runs, footprint writes).
    pub tasks: tokio::task::JoinSet<()>,
    pub scan: Scans,
}
