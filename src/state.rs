//! The published state: what the supervisor shows the world (D-Bus, sd_notify STATUS=).
//! Plain data, replaced whole on every change (`watch` channel of `Arc<Snapshot>`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Inactive,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Inactive => "inactive",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Failed => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health, ordered from best to worst (the manager's `Health` is the worst of its modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Online,
    /// Stopped, and started by the next connection to its listen address (on demand, or
    /// after an idle stop): not a failure, counted as online in the Manager's figures.
    Standby,
    Unknown,
    Degraded,
    Offline,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Online => "online",
            Health::Degraded => "degraded",
            Health::Offline => "offline",
            Health::Unknown => "unknown",
            Health::Standby => "standby",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModuleStatus {
    pub name: String,
    pub description: String,
    pub mode: String,
    pub mode_reason: String,
    pub backend: String,
    pub state: State,
    pub health: Health,
    pub health_reason: String,
    pub unit: String,
    pub container_id: String,
    pub main_pid: u32,
    pub memory_bytes: u64,
    pub memory_max_bytes: u64,
    pub vram_bytes: u64,
    /// VRAM per GPU index (those it uses).
    pub vram_by_gpu: Vec<(u32, u64)>,
    pub restarts: u32,
    pub active_model: String,
    /// µs since the epoch of the last state change.
    pub since_us: u64,
    pub manifest_path: String,
    /// Running totals for monitoring (metrics); not D-Bus properties.
    pub counters: ModuleCounters,
    /// `[serve]`: open connections, µs since the epoch of the last connection opened or
    /// closed, of the armed idle stop (0: none), and whether it starts on demand.
    pub connections: u32,
    pub last_activity_us: u64,
    pub idle_stop_at_us: u64,
    pub on_demand: bool,
    /// Admission: the footprint it is admitted with (measured peaks per (module, model), or
    /// what the manifest declares), where that comes from ("measured", "declared", ""),
    /// whether it is pinned, its eviction priority, and whether it could be evicted now.
    pub ram_peak_bytes: u64,
    pub vram_peak_bytes: u64,
    pub footprint_source: String,
    pub pinned: bool,
    pub priority: i32,
    pub evictable: bool,
}

/// Upper bounds (seconds) of the probe latency histogram's buckets (+Inf is implied).
pub const PROBE_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Counters of one module since modvisord started, for monitoring.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModuleCounters {
    /// Probe latency: count per bucket of [`PROBE_BUCKETS`] (not cumulative) and +Inf last.
    pub probe_buckets: [u64; PROBE_BUCKETS.len() + 1],
    pub probe_seconds_sum: f64,
    pub probe_count: u64,
    pub probe_failures: u64,
    /// Seconds from the last start to online (0 before the first).
    pub last_start_seconds: f64,
    pub activations_online: u64,
    pub activations_rolled_back: u64,
    /// Failed without a rollback, or the rollback failed too.
    pub activations_failed: u64,
    /// `[serve]`: starts asked for by a connection, stops after `idle_stop`, and stops to make
    /// room for another module (admission), counted with their journal entries.
    pub on_demand_starts: u64,
    pub idle_stops: u64,
    pub evictions: u64,
}

impl ModuleCounters {
    pub fn observe_probe(&mut self, seconds: f64, ok: bool) {
        let i = PROBE_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(PROBE_BUCKETS.len());
        self.probe_buckets[i] += 1;
        self.probe_seconds_sum += seconds;
        self.probe_count += 1;
        if !ok {
            self.probe_failures += 1;
        }
    }
}

impl ModuleStatus {
    /// A running direct-backend module, for tests.
    #[cfg(test)]
    pub(crate) fn example(name: &str) -> ModuleStatus {
        ModuleStatus {
            name: name.into(),
            description: "d".into(),
            mode: "native".into(),
            mode_reason: "native: the only mode of the module".into(),
            backend: "direct".into(),
            state: State::Running,
            health: Health::Online,
            health_reason: "running".into(),
            unit: String::new(),
            container_id: String::new(),
            main_pid: 42,
            memory_bytes: 1 << 20,
            memory_max_bytes: 0,
            vram_bytes: 0,
            vram_by_gpu: Vec::new(),
            restarts: 0,
            active_model: String::new(),
            since_us: 1,
            manifest_path: "/m.toml".into(),
            counters: Default::default(),
            connections: 0,
            last_activity_us: 0,
            idle_stop_at_us: 0,
            on_demand: false,
            ram_peak_bytes: 0,
            vram_peak_bytes: 0,
            footprint_source: String::new(),
            pinned: false,
            priority: 0,
            evictable: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Shared with the snapshot before when unchanged: an unchanged module costs a pointer
    /// compare to every reader that looks for changes (`Arc::ptr_eq`).
    pub modules: BTreeMap<String, Arc<ModuleStatus>>,
    /// (manifest file, error)
    pub manifest_errors: Vec<(String, String)>,
    pub native_backend: String,
    pub container_engine: String,
    /// (index, name, uuid, total bytes, used bytes)
    pub gpus: Vec<(u32, String, String, u64, u64)>,
    /// GPU processes that belong to no module: (pid, command, bytes).
    pub foreign_gpu_processes: Vec<(u32, String, u64)>,
    /// How many runs the supervisor had started when it published this: a sampling pass
    /// over this snapshot's modules may have seen the processes of runs started after it
    /// without knowing they are a module's (not on D-Bus).
    pub runs_started: u64,
}

impl Snapshot {
    /// The worst health of all modules ("online" when there are none); a module in standby
    /// counts as online.
    pub fn health(&self) -> Health {
        self.modules
            .values()
            .map(|m| match m.health {
                Health::Standby => Health::Online,
                h => h,
            })
            .max()
            .unwrap_or(Health::Online)
    }

    pub fn count(&self, h: Health) -> u32 {
        // A module in standby counts as online.
        let norm = |h: Health| {
            if h == Health::Standby {
                Health::Online
            } else {
                h
            }
        };
        self.modules
            .values()
            .filter(|m| norm(m.health) == norm(h))
            .count() as u32
    }

    /// One line for `STATUS=`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} modules: {} online, {} degraded, {} offline",
            self.modules.len(),
            self.count(Health::Online),
            self.count(Health::Degraded),
            self.count(Health::Offline)
        );
        if !self.manifest_errors.is_empty() {
            s.push_str(&format!("; {} manifest errors", self.manifest_errors.len()));
        }
        s
    }
}
