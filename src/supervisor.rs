//! The supervisor: one actor that owns the module table.
//!
//! Everything else sends it [`Command`]s and watches the [`Snapshot`] it publishes; runtime
//! exits, probe results and timers come back to it as [`Event`]s. Nothing here blocks: stops
//! run in their own tasks and report through the runtime's exit event.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::config::Config;
use crate::health::{self, Hysteresis, ProbeResult};
use crate::journal::{Journal, OutputSink};
use crate::manifest::{self, ManifestError, Mode, Module, NativeExec};
use crate::monitor::Target;
use crate::policy::{self, Availability, Decision};
use crate::runtime::{Backend, ExitInfo, Owned, RunHandle, RunPhase, RunRequest, RuntimeEvent};
use crate::state::{Health, ModuleStatus, Snapshot, State};

/// Stable journal MESSAGE_IDs.
pub const MSG_STATE_CHANGED: &str = "5e1b0a3c7d2f4e6a9b8c1d0e2f3a4b5c";
pub const MSG_MANIFEST_ERROR: &str = "8a7c2e1f0b3d4c5e6f7a8b9c0d1e2f3a";
pub const MSG_FOREIGN_GPU: &str = "e7f8091a2b3c4d5e6f708192a3b4c5d6";
pub const MSG_MODEL_ACTIVATION: &str = "c3d4e5f60718293a4b5c6d7e8f901a2b";

/// Errors of operations, mapped 1:1 to `org.modvisor1.Error.*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NoSuchModule(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

type Reply<T> = oneshot::Sender<Result<T, OpError>>;

/// What the outside asks of the supervisor.
pub enum Command {
    Start(String, Reply<()>),
    Stop(String, Reply<()>),
    Restart(String, Reply<()>),
    Reload(oneshot::Sender<Vec<(String, String)>>),
    SetModeOverride(String, String, Reply<()>),
    Explain(String, Reply<String>),
    ActivateModel(String, String, Reply<()>),
    /// Answered when the actor's loop is alive (watchdog).
    Ping(oneshot::Sender<()>),
    /// Stop every module, then end the actor.
    Shutdown(oneshot::Sender<()>),
}

/// What comes back to the supervisor from its own tasks.
#[derive(Debug)]
pub enum Event {
    Runtime(RuntimeEvent),
    RestartDue {
        name: String,
        generation: u64,
    },
    Probe {
        name: String,
        generation: u64,
        result: ProbeResult,
    },
    StartTimeout {
        name: String,
        generation: u64,
    },
    MemoryTick,
    Sample(Box<crate::monitor::Sample>),
    /// An engine's last error line read from the journal (units write there directly).
    EngineLine {
        name: String,
        line: Option<String>,
    },
}

/// A client's handle on the supervisor.
#[derive(Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub state: watch::Receiver<Arc<Snapshot>>,
    /// Model activation steps: (module, model, step, detail), for the ModelActivation signal.
    pub activations: tokio::sync::broadcast::Sender<ActivationStep>,
}

/// One step of a model activation: (module, model, step, detail).
pub type ActivationStep = (String, String, String, String);

/// A model activation in progress (one per module; anything else meanwhile is Busy).
struct Activation {
    model: PathBuf,
    previous: Option<PathBuf>,
    rolling_back: bool,
    failure: String,
    /// The engine's error line is still being looked up: the reply waits for it.
    engine_pending: bool,
    reply: Option<Reply<()>>,
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, OpError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| OpError::Failed("the supervisor has stopped".into()))?;
        rx.await
            .map_err(|_| OpError::Failed("the supervisor dropped the request".into()))?
    }
    pub async fn start(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Start(name.into(), r)).await
    }
    pub async fn stop(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Stop(name.into(), r)).await
    }
    pub async fn restart(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Restart(name.into(), r)).await
    }
    pub async fn set_mode_override(&self, name: &str, mode: &str) -> Result<(), OpError> {
        self.ask(|r| Command::SetModeOverride(name.into(), mode.into(), r))
            .await
    }
    pub async fn explain(&self, name: &str) -> Result<String, OpError> {
        self.ask(|r| Command::Explain(name.into(), r)).await
    }
    pub async fn activate_model(&self, name: &str, model: &str) -> Result<(), OpError> {
        self.ask(|r| Command::ActivateModel(name.into(), model.into(), r))
            .await
    }
    pub async fn reload(&self) -> Result<Vec<(String, String)>, OpError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Reload(tx))
            .await
            .map_err(|_| OpError::Failed("the supervisor has stopped".into()))?;
        rx.await
            .map_err(|_| OpError::Failed("the supervisor dropped the request".into()))
    }
}

/// Restart budget: at most `max` restarts within a sliding `window`.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    max: u32,
    window: Duration,
    history: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(max: u32, window: Duration) -> Self {
        RestartBudget {
            max,
            window,
            history: VecDeque::new(),
        }
    }

    /// Records a restart at `now` if the budget allows one; returns the number of restarts
    /// in the window including this one, or None when the budget is spent.
    pub fn try_take(&mut self, now: Instant) -> Option<u32> {
        while let Some(&t) = self.history.front() {
            if now.duration_since(t) >= self.window {
                self.history.pop_front();
            } else {
                break;
            }
        }
        if self.history.len() as u32 >= self.max {
            return None;
        }
        self.history.push_back(now);
        Some(self.history.len() as u32)
    }

    pub fn reset(&mut self) {
        self.history.clear();
    }
}

struct Running {
    generation: u64,
    backend: Arc<dyn Backend>,
    container_id: String,
    handle: RunHandle,
    /// The engine's main PID (the backend may learn it later, and it changes on its restarts).
    main_pid: u32,
    probe: Option<AbortHandle>,
    hysteresis: Hysteresis,
    /// Set when the supervisor itself ended the process because it never became healthy.
    start_timed_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    Nothing,
    Start,
    Remove,
}

struct Entry {
    module: Module,
    stem: String,
    override_mode: Option<Mode>,
    decision: Decision,
    state: State,
    health: Health,
    reason: String,
    since: SystemTime,
    run: Option<Running>,
    generation: u64,
    stopping: bool,
    after_stop: AfterStop,
    stop_waiters: Vec<Reply<()>>,
    restart_waiters: Vec<Reply<()>>,
    budget: RestartBudget,
    restarts: u32,
    memory: u64,
    vram: u64,
    vram_total: u64,
    activation: Option<Activation>,
    /// Where the current run's output goes (its recent lines explain failures).
    sink: Option<OutputSink>,
    /// The unit or container of the latest run ("" for direct children).
    last_unit: String,
    /// A resource threshold crossed ("RAM 1.2 GiB is 92% of ..."): online shows as degraded.
    warning: Option<String>,
    active_model: Option<PathBuf>,
}

/// A run of ours found at start-up, with the backend that runs it.
pub type Found = (Arc<dyn Backend>, Owned);

/// The backends the supervisor can run modules with.
pub struct Backends {
    pub native: Option<Arc<dyn Backend>>,
    /// The container engine, or why there is none ("no container engine answers (...)").
    pub container: Result<Arc<dyn Backend>, String>,
    /// "podman 4.3.1", "docker 20.10.24" or "".
    pub container_engine: String,
}

pub struct Supervisor {
    cfg: Arc<Config>,
    native: Option<Arc<dyn Backend>>,
    container: Result<Arc<dyn Backend>, String>,
    container_engine: String,
    journal: Option<Arc<Journal>>,
    modules: BTreeMap<String, Entry>,
    manifest_errors: Vec<ManifestError>,
    events_tx: mpsc::UnboundedSender<Event>,
    runtime_tx: mpsc::UnboundedSender<RuntimeEvent>,
    state_tx: watch::Sender<Arc<Snapshot>>,
    activations: tokio::sync::broadcast::Sender<ActivationStep>,
    gpu: Option<Arc<crate::monitor::Gpu>>,
    gpu_error_logged: bool,
    sampling: bool,
    machine_total: u64,
    gpus: Vec<crate::monitor::GpuRow>,
    foreign: Vec<(u32, String, u64)>,
    /// Runs of ours found at start-up, by module, consumed by the first reload.
    existing: BTreeMap<String, Vec<Found>>,
}

fn now_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Whether a program can be found: absolute and executable, or on the modules' PATH.
fn program_exists(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        return exec(Path::new(prog));
    }
    crate::runtime::direct::DEFAULT_PATH
        .split(':')
        .any(|d| exec(&Path::new(d).join(prog)))
}

/// Spawns the supervisor actor; returns its handle and a receiver that fires after the first
/// reconcile (when the daemon may say READY=1).
pub fn spawn(
    cfg: Arc<Config>,
    backends: Backends,
    journal: Option<Arc<Journal>>,
    existing: Vec<Found>,
    gpu: Result<Arc<crate::monitor::Gpu>, String>,
) -> (Handle, oneshot::Receiver<()>, tokio::task::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (runtime_tx, runtime_rx) = mpsc::unbounded_channel();
    let Backends {
        native,
        container,
        container_engine,
    } = backends;
    let snap = Snapshot {
        native_backend: native
            .as_ref()
            .map(|n| n.kind().to_string())
            .unwrap_or_default(),
        container_engine: container_engine.clone(),
        ..Snapshot::default()
    };
    let mut by_module: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for (b, o) in existing {
        by_module.entry(o.module.clone()).or_default().push((b, o));
    }
    let (state_tx, state_rx) = watch::channel(Arc::new(snap));
    let (ready_tx, ready_rx) = oneshot::channel();
    let (activations, _) = tokio::sync::broadcast::channel(64);
    let sup = Supervisor {
        cfg,
        native,
        container,
        container_engine,
        journal,
        modules: BTreeMap::new(),
        manifest_errors: Vec::new(),
        events_tx,
        runtime_tx,
        state_tx,
        existing: by_module,
        activations: activations.clone(),
        gpu: gpu.ok(),
        gpu_error_logged: false,
        sampling: false,
        machine_total: 0,
        gpus: Vec::new(),
        foreign: Vec::new(),
    };
    let task = tokio::spawn(sup.run(cmd_rx, events_rx, runtime_rx, ready_tx));
    (
        Handle {
            commands: cmd_tx,
            state: state_rx,
            activations,
        },
        ready_rx,
        task,
    )
}

impl Supervisor {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut events_rx: mpsc::UnboundedReceiver<Event>,
        mut runtime_rx: mpsc::UnboundedReceiver<RuntimeEvent>,
        ready: oneshot::Sender<()>,
    ) {
        self.reload();
        self.publish();
        let _ = ready.send(());
        let tick_tx = self.events_tx.clone();
        let interval = self.cfg.monitor_interval;
        let ticker = tokio::spawn(async move {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                if tick_tx.send(Event::MemoryTick).is_err() {
                    return;
                }
            }
        });
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                cmd = cmd_rx.recv(), if shutdown.is_none() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        shutdown = Some(done);
                        self.stop_all_for_shutdown();
                    }
                    Some(c) => self.command(c),
                    None => {
                        // Every handle is gone: stop as if asked to.
                        let (tx, _rx) = oneshot::channel();
                        shutdown = Some(tx);
                        self.stop_all_for_shutdown();
                    }
                },
                Some(ev) = runtime_rx.recv() => self.event(Event::Runtime(ev)),
                Some(ev) = events_rx.recv() => self.event(ev),
            }
            self.publish();
            if shutdown.is_some() && self.modules.values().all(|e| e.run.is_none()) {
                break;
            }
        }
        ticker.abort();
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// On shutdown, direct children are stopped (they cannot outlive the daemon); units and
    /// containers keep running and are adopted by the next modvisord.
    fn stop_all_for_shutdown(&mut self) {
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for n in names {
            let survive = self
                .modules
                .get(&n)
                .and_then(|e| e.run.as_ref())
                .is_some_and(|r| r.backend.survives_daemon());
            if survive {
                if let Some(e) = self.modules.get_mut(&n)
                    && let Some(r) = e.run.take()
                {
                    if let Some(p) = r.probe {
                        p.abort();
                    }
                    tracing::info!(modvisor_module = %n, "leaving {} running ({})", r.handle.unit, r.backend.kind());
                }
            } else {
                self.begin_stop(&n, AfterStop::Nothing);
            }
        }
    }

    fn publish(&self) {
        let snap = Snapshot {
            modules: self
                .modules
                .iter()
                .map(|(n, e)| (n.clone(), self.status(e)))
                .collect(),
            manifest_errors: self
                .manifest_errors
                .iter()
                .map(|e| (e.path.display().to_string(), e.to_string()))
                .collect(),
            native_backend: self
                .native
                .as_ref()
                .map(|n| n.kind().to_string())
                .unwrap_or_default(),
            container_engine: self.container_engine.clone(),
            gpus: self.gpus.clone(),
            foreign_gpu_processes: self.foreign.clone(),
        };
        self.state_tx.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
    }

    fn status(&self, e: &Entry) -> ModuleStatus {
        let m = &e.module;
        let running_mode = e.decision.mode;
        ModuleStatus {
            name: m.name.clone(),
            description: m.description.clone(),
            mode: running_mode.map(|m| m.to_string()).unwrap_or_default(),
            mode_reason: e.decision.reason.clone(),
            backend: match (&e.run, running_mode) {
                (Some(r), _) => r.backend.kind().to_string(),
                (None, Some(Mode::Native)) => self
                    .native
                    .as_ref()
                    .map(|n| n.kind().to_string())
                    .unwrap_or_default(),
                (None, Some(Mode::Container)) => self
                    .container
                    .as_ref()
                    .map(|c| c.kind().to_string())
                    .unwrap_or_default(),
                (None, None) => String::new(),
            },
            state: e.state,
            health: self.effective(e).0,
            health_reason: self.effective(e).1,
            unit: match (&e.run, running_mode, &self.native) {
                (Some(r), _, _) if r.backend.restarts_itself() => r.handle.unit.clone(),
                (Some(_), _, _) => String::new(),
                (None, Some(Mode::Native), Some(b)) if b.restarts_itself() => match &m.native {
                    Some(NativeExec::Unit(u)) => u.clone(),
                    _ => crate::runtime::systemd::unit_name(&m.name),
                },
                _ => String::new(),
            },
            container_id: e
                .run
                .as_ref()
                .map(|r| r.container_id.clone())
                .unwrap_or_default(),
            main_pid: e.run.as_ref().map(|r| r.main_pid).unwrap_or(0),
            memory_bytes: if e.run.is_some() { e.memory } else { 0 },
            memory_max_bytes: m.resources.memory_max.unwrap_or(0),
            vram_bytes: if e.run.is_some() { e.vram } else { 0 },
            restarts: e.restarts,
            active_model: e
                .active_model
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            since_us: now_us(e.since),
            manifest_path: m.source.display().to_string(),
        }
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.cfg.state.join("modules").join(name)
    }

    fn availability(&self, m: &Module) -> Availability {
        availability(&self.native, &self.container, m)
    }

    fn decide(&self, e: &Entry) -> Decision {
        policy::decide(
            &e.module,
            &self.cfg.policy,
            &self.availability(&e.module),
            e.override_mode,
        )
    }

    /// Changes state/health/reason, logging once per transition.
    fn set(&mut self, name: &str, state: State, health: Health, reason: String) {
        let Some(e) = self.modules.get_mut(name) else {
            return;
        };
        if e.state == state && e.health == health && e.reason == reason {
            return;
        }
        if e.state != state {
            e.since = SystemTime::now();
        }
        let changed_health = e.health != health || e.state != state;
        e.state = state;
        e.health = health;
        e.reason = reason;
        if changed_health {
            tracing::info!(
                modvisor_module = name,
                message_id = MSG_STATE_CHANGED,
                modvisor_state = state.as_str(),
                modvisor_health = health.as_str(),
                "{name}: {state}, {health}: {}",
                e.reason
            );
        }
        self.check_activation(name);
    }

    fn read_active_model(&self, m: &Module) -> Option<PathBuf> {
        let recorded = std::fs::read_to_string(self.state_dir(&m.name).join("active-model")).ok();
        let recorded = recorded.map(|s| PathBuf::from(s.trim())).filter(|p| {
            m.model
                .as_ref()
                .and_then(|mm| mm.directory.as_ref())
                .is_some_and(|d| {
                    p.starts_with(d) || std::fs::canonicalize(d).is_ok_and(|c| p.starts_with(c))
                })
        });
        recorded.or_else(|| m.model.as_ref().and_then(|mm| mm.default.clone()))
    }

    // ---------------------------------------------------------------- manifests

    fn reload(&mut self) -> Vec<(String, String)> {
        // In system mode (running as root) a manifest anyone else can change is refused.
        let check = self.cfg.manifest_trust_check && nix::unistd::geteuid().is_root();
        let res = manifest::load_dirs_checked(&self.cfg.modules, check);
        tracing::debug!(
            "manifests scanned: {} modules, {} errors",
            res.modules.len(),
            res.errors.len()
        );
        for e in &res.errors {
            tracing::error!(message_id = MSG_MANIFEST_ERROR, "manifest error: {e}");
        }
        self.manifest_errors = res.errors.clone();
        // Removed manifests (not merely broken ones) stop their module.
        let gone: Vec<String> = self
            .modules
            .iter()
            .filter(|(n, e)| !res.modules.contains_key(*n) && !res.broken_stems.contains(&e.stem))
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            tracing::info!(modvisor_module = %n, "manifest removed: stopping {n}");
            if self.modules.get(&n).is_some_and(|e| e.run.is_some()) {
                self.begin_stop(&n, AfterStop::Remove);
            } else {
                self.modules.remove(&n);
            }
        }
        for (name, module) in res.modules {
            let stem = module
                .source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            match self.modules.get_mut(&name) {
                None => {
                    let active_model = self.read_active_model(&module);
                    let enabled = module.enabled;
                    let mut e = Entry {
                        budget: RestartBudget::new(module.restart.max, module.restart.window),
                        module,
                        stem,
                        override_mode: None,
                        decision: Decision {
                            mode: None,
                            reason: String::new(),
                            fallback: false,
                        },
                        state: State::Inactive,
                        health: Health::Offline,
                        reason: "not started".into(),
                        since: SystemTime::now(),
                        run: None,
                        generation: 0,
                        stopping: false,
                        after_stop: AfterStop::Nothing,
                        stop_waiters: Vec::new(),
                        restart_waiters: Vec::new(),
                        restarts: 0,
                        memory: 0,
                        vram: 0,
                        vram_total: 0,
                        warning: None,
                        activation: None,
                        sink: None,
                        last_unit: String::new(),
                        active_model,
                    };
                    e.decision = self.decide(&e);
                    if !enabled {
                        e.reason = "not started (enabled = false)".into();
                    }
                    self.modules.insert(name.clone(), e);
                    // A run left by an earlier modvisord is adopted whatever `enabled` says.
                    let found = self.existing.remove(&name).unwrap_or_default();
                    if enabled || found.iter().any(|(_, o)| o.running) {
                        let _ = self.start(&name);
                    }
                    // One left in another backend than the one chosen now would be a second copy.
                    let chosen = self
                        .modules
                        .get(&name)
                        .and_then(|e| e.run.as_ref())
                        .map(|r| r.backend.kind());
                    for (b, o) in found {
                        if chosen.is_some_and(|k| k != b.kind()) {
                            tokio::spawn(b.stop_unit(&o.id));
                        }
                    }
                }
                Some(e) => {
                    let differs = e.module.run_spec_differs(&module);
                    let newly_enabled = module.enabled && !e.module.enabled;
                    if e.module.restart != module.restart {
                        e.budget = RestartBudget::new(module.restart.max, module.restart.window);
                    }
                    e.module = module;
                    e.stem = stem;
                    let d = policy::decide(
                        &e.module,
                        &self.cfg.policy,
                        &availability(&self.native, &self.container, &e.module),
                        e.override_mode,
                    );
                    if let Some(e) = self.modules.get_mut(&name) {
                        e.decision = d;
                    }
                    let running = self.modules.get(&name).is_some_and(|e| e.run.is_some());
                    if differs && running {
                        tracing::info!(modvisor_module = %name, "manifest changed what {name} runs: restarting");
                        self.begin_stop(&name, AfterStop::Start);
                    } else if newly_enabled && !running {
                        let _ = self.start(&name);
                    }
                }
            }
        }
        // Runs of ours that no manifest (valid or broken) claims any more are stopped, once.
        let existing = std::mem::take(&mut self.existing);
        for (name, found) in existing {
            let claimed = self.modules.contains_key(&name) || res.broken_stems.contains(&name);
            if !claimed {
                for (b, o) in found {
                    tokio::spawn(b.stop_unit(&o.id));
                }
            }
        }
        self.manifest_errors
            .iter()
            .map(|e| (e.path.display().to_string(), e.to_string()))
            .collect()
    }

    // ---------------------------------------------------------------- commands

    fn command(&mut self, c: Command) {
        match c {
            Command::Start(n, r)
            | Command::Stop(n, r)
            | Command::Restart(n, r)
            | Command::SetModeOverride(n, _, r)
                if self.modules.get(&n).is_some_and(|e| e.activation.is_some()) =>
            {
                let _ = r.send(Err(OpError::Busy(format!(
                    "a model activation of {n} is in progress"
                ))));
            }
            Command::Start(n, r) => {
                let res = self.user_start(&n);
                let _ = r.send(res);
            }
            Command::Stop(n, r) => match self.modules.get_mut(&n) {
                None => {
                    let _ = r.send(Err(no_such(&n)));
                }
                Some(e) => {
                    // A pending restart is cancelled by a stop.
                    e.generation += 1;
                    if e.run.is_none() {
                        if e.state != State::Failed {
                            self.set(&n, State::Inactive, Health::Offline, "stopped".into());
                        }
                        let _ = r.send(Ok(()));
                    } else {
                        e.stop_waiters.push(r);
                        self.begin_stop(&n, AfterStop::Nothing);
                    }
                }
            },
            Command::Restart(n, r) => match self.modules.get_mut(&n) {
                None => {
                    let _ = r.send(Err(no_such(&n)));
                }
                Some(e) => {
                    // [privileges] A model swapped since activation: refused, the running
                    // engine is left alone.
                    let mode = e.decision.mode.unwrap_or(Mode::Native);
                    if let Err(why) = check_model(&e.module, mode, e.active_model.as_deref()) {
                        let _ = r.send(Err(OpError::Failed(format!("not restarting {n}: {why}"))));
                        return;
                    }
                    e.budget.reset();
                    if e.run.is_none() {
                        let res = self.user_start(&n);
                        let _ = r.send(res);
                    } else {
                        e.restart_waiters.push(r);
                        self.begin_stop(&n, AfterStop::Start);
                    }
                }
            },
            Command::Reload(r) => {
                let errs = self.reload();
                let _ = r.send(errs);
            }
            Command::SetModeOverride(n, mode, r) => {
                let res = self.set_override(&n, &mode);
                let _ = r.send(res);
            }
            Command::Explain(n, r) => {
                let res = self.explain(&n);
                let _ = r.send(res);
            }
            Command::ActivateModel(n, model, r) => self.activate(&n, &model, r),
            Command::Ping(r) => {
                let _ = r.send(());
            }
            Command::Shutdown(_) => {}
        }
    }

    fn user_start(&mut self, n: &str) -> Result<(), OpError> {
        let Some(e) = self.modules.get_mut(n) else {
            return Err(no_such(n));
        };
        if e.run.is_some() {
            if e.stopping {
                e.after_stop = AfterStop::Start;
            }
            return Ok(());
        }
        e.budget.reset();
        self.start(n)
    }

    fn set_override(&mut self, n: &str, mode: &str) -> Result<(), OpError> {
        let Some(e) = self.modules.get(n) else {
            return Err(no_such(n));
        };
        let new = match mode {
            "" => None,
            m => match Mode::parse(m) {
                Some(m) => Some(m),
                None => {
                    return Err(OpError::InvalidArgument(format!(
                        "invalid mode \"{m}\": expected \"native\", \"container\" or \"\" to clear"
                    )));
                }
            },
        };
        if let Some(m) = new
            && let Err(why) = policy::possible(
                &e.module,
                &self.cfg.policy,
                &self.availability(&e.module),
                m,
            )
        {
            return Err(OpError::NotAllowed(format!("cannot run {n} as {m}: {why}")));
        }
        let running = e.run.is_some();
        let old_mode = e.decision.mode;
        let Some(e) = self.modules.get_mut(n) else {
            return Err(no_such(n));
        };
        e.override_mode = new;
        let d = policy::decide(
            &e.module,
            &self.cfg.policy,
            &availability(&self.native, &self.container, &e.module),
            new,
        );
        let changed = d.mode != old_mode;
        if let Some(e) = self.modules.get_mut(n) {
            e.decision = d;
        }
        if changed && running {
            self.begin_stop(n, AfterStop::Start);
        }
        Ok(())
    }

    fn explain(&self, n: &str) -> Result<String, OpError> {
        let Some(e) = self.modules.get(n) else {
            return Err(no_such(n));
        };
        let m = &e.module;
        let avail = self.availability(m);
        let p = &self.cfg.policy;
        let mut out = format!("module {} ({})\n", m.name, m.source.display());
        out.push_str(&format!("decision: {}\n", e.decision.reason));
        out.push_str(&format!(
            "modes in order: {}\n",
            m.modes
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for mode in [Mode::Native, Mode::Container] {
            let v = match policy::possible(m, p, &avail, mode) {
                Ok(()) => "possible".to_string(),
                Err(w) => format!("not possible: {w}"),
            };
            out.push_str(&format!("  {mode}: {v}\n"));
        }
        out.push_str(&format!(
            "override: {}\n",
            e.override_mode
                .map(|m| m.to_string())
                .unwrap_or_else(|| "none".into())
        ));
        out.push_str(&format!(
            "policy: default_mode={} allowed_modes={} native_enabled={} docker_enabled={} trusted={}\n",
            p.default_mode,
            p.allowed_modes.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","),
            p.native_enabled,
            p.docker_enabled,
            m.trusted
        ));
        // [privileges] Who the engine runs as (root only when the manifest says so).
        if let Some(NativeExec::Command { privileges, .. }) = &m.native {
            out.push_str(&format!("native engine: {}\n", privileges.describe()));
        }
        out.push_str(&format!(
            "state: {} ({}): {}\n",
            e.state, e.health, e.reason
        ));
        Ok(out)
    }

    // ---------------------------------------------------------------- lifecycle

    fn start(&mut self, n: &str) -> Result<(), OpError> {
        let Some(e) = self.modules.get(n) else {
            return Err(no_such(n));
        };
        let decision = self.decide(e);
        let state_dir = self.state_dir(n);
        let Some(e) = self.modules.get_mut(n) else {
            return Err(no_such(n));
        };
        e.decision = decision.clone();
        let mode = match decision.mode {
            Some(m) => m,
            None => {
                let why = decision.reason.clone();
                self.set(n, State::Failed, Health::Offline, why.clone());
                return Err(OpError::Failed(why));
            }
        };
        let backend = match mode {
            Mode::Native => self
                .native
                .clone()
                .ok_or_else(|| "no native backend".to_string()),
            Mode::Container => self.container.clone(),
        };
        let backend = match backend {
            Ok(b) => b,
            Err(why) => {
                self.set(n, State::Failed, Health::Offline, why.clone());
                return Err(OpError::Failed(why));
            }
        };
        let model = e.active_model.clone();
        // [privileges] Re-validate the model before every start (blocking I/O on the actor).
        if let Err(why) = check_model(&e.module, mode, model.as_deref()) {
            self.set(n, State::Failed, Health::Offline, why.clone());
            return Err(OpError::Failed(why));
        }
        if let Err(err) = std::fs::create_dir_all(&state_dir) {
            tracing::warn!(
                modvisor_module = n,
                "cannot create {}: {err}",
                state_dir.display()
            );
        }
        let Some(exec) = e.module.render(mode, &state_dir, model.as_deref()) else {
            return Err(OpError::Failed(format!(
                "the manifest has no [{mode}] section"
            )));
        };
        e.generation += 1;
        let generation = e.generation;
        let req = RunRequest {
            name: n.to_string(),
            generation,
            description: e.module.description.clone(),
            exec,
            restart: e.module.restart.clone(),
            stop_timeout: e.module.stop_timeout,
            memory_max: e.module.resources.memory_max,
            guard_port: e
                .module
                .health
                .probe
                .as_ref()
                .and_then(manifest::Probe::address),
            sink: OutputSink::new(
                n,
                self.journal.clone(),
                self.cfg.module_log_dir.as_deref(),
                self.cfg.module_log_max_bytes,
            ),
        };
        e.sink = Some(req.sink.clone());
        let handle = match backend.start(req, self.runtime_tx.clone()) {
            Ok(h) => h,
            Err(err) => {
                let why = err.to_string();
                self.set(n, State::Failed, Health::Offline, why.clone());
                return Err(OpError::Failed(why));
            }
        };
        let health = e.module.health.clone();
        let probe = health.probe.clone().map(|p| {
            let tx = self.events_tx.clone();
            let name = n.to_string();
            let (interval, timeout) = (health.interval, health.timeout);
            tokio::spawn(async move {
                health::probe_loop(
                    || health::probe(&p, timeout),
                    interval,
                    |result| {
                        tx.send(Event::Probe {
                            name: name.clone(),
                            generation,
                            result,
                        })
                        .is_ok()
                    },
                )
                .await;
            })
            .abort_handle()
        });
        if probe.is_some() {
            let tx = self.events_tx.clone();
            let name = n.to_string();
            let st = health.start_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(st).await;
                let _ = tx.send(Event::StartTimeout { name, generation });
            });
        }
        let pid = handle.pid;
        e.last_unit = handle.unit.clone();
        e.stopping = false;
        e.after_stop = AfterStop::Nothing;
        e.memory = 0;
        e.run = Some(Running {
            generation,
            backend: backend.clone(),
            container_id: String::new(),
            main_pid: handle.pid,
            handle,
            probe,
            hysteresis: Hysteresis::new(health.failures, health.successes),
            start_timed_out: false,
        });
        let waiters = std::mem::take(&mut e.restart_waiters);
        let (state, h, why) = if backend.survives_daemon() {
            let unit = e
                .run
                .as_ref()
                .map(|r| r.handle.unit.clone())
                .unwrap_or_default();
            (State::Starting, Health::Unknown, format!("starting {unit}"))
        } else if pid == 0 {
            // [privileges] The direct backend prepares off the actor; its PID follows as Status.
            (State::Starting, Health::Unknown, "starting".to_string())
        } else if health.probe.is_some() {
            (
                State::Starting,
                Health::Unknown,
                format!("started (pid {pid}), waiting for the health probe"),
            )
        } else if decision.fallback {
            (
                State::Running,
                Health::Degraded,
                format!("running (pid {pid}) in fallback mode: {}", decision.reason),
            )
        } else {
            (
                State::Running,
                Health::Online,
                format!("running (pid {pid}), no health probe configured"),
            )
        };
        self.set(n, state, h, why);
        for w in waiters {
            let _ = w.send(Ok(()));
        }
        Ok(())
    }

    fn begin_stop(&mut self, n: &str, after: AfterStop) {
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        if after != AfterStop::Nothing || e.after_stop == AfterStop::Nothing {
            e.after_stop = after;
        }
        let Some(run) = e.run.as_mut() else {
            if after == AfterStop::Remove {
                self.modules.remove(n);
            }
            return;
        };
        if let Some(p) = run.probe.take() {
            p.abort();
        }
        if e.stopping {
            return;
        }
        e.stopping = true;
        let timeout = e.module.stop_timeout;
        let handle = run.handle.clone();
        let pid = run.main_pid;
        tokio::spawn(run.backend.stop(&handle, timeout));
        self.set(
            n,
            State::Stopping,
            Health::Offline,
            format!("stopping (pid {pid})"),
        );
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Runtime(RuntimeEvent::Status {
                name,
                generation,
                main_pid,
                restarts,
                phase,
                container_id,
            }) => self.progressed(&name, generation, main_pid, restarts, phase, container_id),
            Event::Runtime(RuntimeEvent::Exited {
                name,
                generation,
                info,
            }) => self.exited(&name, generation, info),
            Event::RestartDue { name, generation } => {
                if self
                    .modules
                    .get(&name)
                    .is_some_and(|e| e.generation == generation && e.run.is_none())
                    && let Err(err) = self.start(&name)
                {
                    tracing::warn!(modvisor_module = %name, "restart of {name} failed: {err}");
                }
            }
            Event::Probe {
                name,
                generation,
                result,
            } => self.probed(&name, generation, result),
            Event::StartTimeout { name, generation } => {
                let Some(e) = self.modules.get_mut(&name) else {
                    return;
                };
                if e.state != State::Starting {
                    return;
                }
                let Some(run) = e.run.as_mut().filter(|r| r.generation == generation) else {
                    return;
                };
                run.start_timed_out = true;
                let st = e.module.health.start_timeout;
                tracing::warn!(modvisor_module = %name, "{name}: no successful health probe within start_timeout ({st:?}): stopping it");
                let handle = run.handle.clone();
                if let Some(p) = run.probe.take() {
                    p.abort();
                }
                let timeout = e.module.stop_timeout;
                tokio::spawn(run.backend.stop(&handle, timeout));
            }
            Event::MemoryTick => {
                let targets: Vec<Target> = self
                    .modules
                    .iter()
                    .filter_map(|(n, e)| {
                        e.run.as_ref().filter(|r| r.main_pid > 1).map(|r| Target {
                            name: n.clone(),
                            main_pid: r.main_pid,
                            // [privileges] A direct child leads its own group; its PID
                            // arrives after the start.
                            pgid: if r.handle.pgid > 1 || r.backend.kind() != "direct" {
                                r.handle.pgid
                            } else {
                                r.main_pid as i32
                            },
                            // A unit or a container has a cgroup of its own; a direct child
                            // shares the daemon's.
                            own_cgroup: r.backend.kind() != "direct",
                        })
                    })
                    .collect();
                // Nothing runs and no GPU to watch: sampling costs nothing.
                if (targets.is_empty() && self.gpu.is_none()) || self.sampling {
                    return;
                }
                self.sampling = true;
                let tx = self.events_tx.clone();
                let gpu = self.gpu.clone();
                tokio::task::spawn_blocking(move || {
                    let s = crate::monitor::sample(&targets, gpu.as_deref());
                    let _ = tx.send(Event::Sample(Box::new(s)));
                });
            }
            Event::EngineLine { name, line } => {
                if let Some(act) = self
                    .modules
                    .get_mut(&name)
                    .and_then(|e| e.activation.as_mut())
                {
                    act.engine_pending = false;
                    if let Some(line) = line {
                        act.failure = format!("{}; the engine said: {line}", act.failure);
                    }
                }
                self.check_activation(&name);
            }
            Event::Sample(sample) => {
                self.sampling = false;
                self.sampled(*sample);
            }
        }
    }

    /// Applies one resource sample: figures, thresholds (degraded), GPUs, foreign processes.
    fn sampled(&mut self, s: crate::monitor::Sample) {
        self.machine_total = s.machine_total;
        if !s.gpu_error.is_empty() && !self.gpu_error_logged {
            tracing::warn!("VRAM unknown: {}", s.gpu_error);
            self.gpu_error_logged = true;
        }
        self.gpus = s.gpus;
        if s.foreign != self.foreign {
            for (pid, comm, bytes) in s
                .foreign
                .iter()
                .filter(|f| !self.foreign.iter().any(|o| o.0 == f.0))
            {
                tracing::warn!(
                    message_id = MSG_FOREIGN_GPU,
                    "GPU process {pid} ({comm}) holds {} of VRAM and belongs to no module (an orphaned engine?)",
                    crate::manifest::units::format_bytes(*bytes)
                );
            }
            self.foreign = s.foreign;
        }
        let names: Vec<String> = self.modules.keys().cloned().collect();
        for n in names {
            let before = self.modules.get(&n).map(|e| self.effective(e));
            let Some(e) = self.modules.get_mut(&n) else {
                continue;
            };
            if e.run.is_none() {
                e.warning = None;
                continue;
            }
            if let Some(m) = s.modules.get(&n) {
                e.memory = m.rss;
                e.vram = m.vram;
                e.vram_total = m.vram_total;
            }
            e.warning = resource_warning(e, &self.cfg, self.machine_total);
            let after = self.modules.get(&n).map(|e| self.effective(e));
            if let (Some(b), Some(a)) = (before, after)
                && b.0 != a.0
            {
                tracing::info!(
                    modvisor_module = %n,
                    message_id = MSG_STATE_CHANGED,
                    modvisor_health = a.0.as_str(),
                    "{n}: {}: {}",
                    a.0,
                    a.1
                );
            }
        }
    }

    /// Health and reason as published: probe/run health, then resource thresholds on top.
    fn effective(&self, e: &Entry) -> (Health, String) {
        match (&e.warning, e.health) {
            (Some(w), Health::Online) => (Health::Degraded, w.clone()),
            _ => (e.health, e.reason.clone()),
        }
    }

    // ---------------------------------------------------------------- model activation

    fn step(&self, n: &str, model: &Path, step: &str, detail: &str) {
        let model_s = model.display().to_string();
        tracing::info!(
            modvisor_module = n,
            message_id = MSG_MODEL_ACTIVATION,
            modvisor_model = %model_s,
            modvisor_step = step,
            "{n}: model activation {step}: {model_s}{}{detail}",
            if detail.is_empty() { "" } else { ": " }
        );
        let _ =
            self.activations
                .send((n.to_string(), model_s, step.to_string(), detail.to_string()));
    }

    /// ActivateModel: validate, record, restart on the new model, wait for online, roll back
    /// on failure. The reply is sent when the transaction ends.
    fn activate(&mut self, n: &str, requested: &str, reply: Reply<()>) {
        let Some(e) = self.modules.get(n) else {
            let _ = reply.send(Err(no_such(n)));
            return;
        };
        if e.activation.is_some() {
            let _ = reply.send(Err(OpError::Busy(format!(
                "a model activation of {n} is in progress"
            ))));
            return;
        }
        let model = match crate::model::validate(e.module.model.as_ref(), requested) {
            Ok(m) => m,
            Err(why) => {
                let _ = reply.send(Err(OpError::InvalidArgument(format!(
                    "cannot activate {requested} for {n}: {why}"
                ))));
                return;
            }
        };
        // [privileges] A root engine only loads what no other user can change.
        let mode = e.decision.mode.unwrap_or(Mode::Native);
        if let Err(why) = check_model(&e.module, mode, Some(&model)) {
            let _ = reply.send(Err(OpError::InvalidArgument(format!(
                "cannot activate {requested} for {n}: {why}"
            ))));
            return;
        }
        let previous = e.active_model.clone();
        self.step(n, &model, "validated", "");
        if let Err(err) = crate::model::record(&self.state_dir(n), &model, previous.as_deref()) {
            let _ = reply.send(Err(OpError::Failed(format!(
                "cannot record the active model: {err}"
            ))));
            return;
        }
        self.step(
            n,
            &model,
            "recorded",
            previous
                .as_ref()
                .map(|p| format!("previous {}", p.display()))
                .as_deref()
                .unwrap_or(""),
        );
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        e.active_model = Some(model.clone());
        e.budget.reset();
        e.activation = Some(Activation {
            model: model.clone(),
            previous,
            rolling_back: false,
            failure: String::new(),
            engine_pending: false,
            reply: Some(reply),
        });
        let running = e.run.is_some();
        self.step(n, &model, "restarting", "");
        if running {
            self.begin_stop(n, AfterStop::Start);
        } else if let Err(err) = self.start(n) {
            self.activation_failed(n, err.to_string());
        }
    }

    /// Called after every state change: ends an activation when the module is online (or failed).
    fn check_activation(&mut self, n: &str) {
        let Some(e) = self.modules.get(n) else { return };
        let Some(act) = &e.activation else { return };
        if e.stopping {
            return;
        }
        if e.state == State::Failed {
            let why = e.reason.clone();
            self.activation_failed(n, why);
            return;
        }
        let online = e.state == State::Running
            && matches!(self.effective(e).0, Health::Online | Health::Degraded);
        if !online {
            return;
        }
        if act.rolling_back && act.engine_pending {
            return; // answered once the engine's error line is known
        }
        let (model, rolling_back) = (act.model.clone(), act.rolling_back);
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        let Some(mut act) = e.activation.take() else {
            return;
        };
        let reply = act.reply.take();
        if !rolling_back {
            self.step(n, &model, "online", "");
            if let Some(r) = reply {
                let _ = r.send(Ok(()));
            }
        } else {
            let prev = act
                .previous
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let msg = format!(
                "activating {} failed: {}; rolled back to {prev}, which is online",
                model.display(),
                act.failure
            );
            self.step(n, &model, "rolled-back", &msg);
            if let Some(r) = reply {
                let _ = r.send(Err(OpError::Failed(msg)));
            }
        }
    }

    /// The new model did not come up: restore the previous one and restart on it.
    fn activation_failed(&mut self, n: &str, why: String) {
        let state_dir = self.state_dir(n);
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        let Some(act) = e.activation.as_mut() else {
            return;
        };
        let engine = e
            .sink
            .as_ref()
            .and_then(|s| crate::model::last_error_line(&s.recent()));
        let model = act.model.clone();
        if act.rolling_back {
            let msg = format!(
                "activating {} failed: {}; the rollback failed too: {why}{}",
                model.display(),
                act.failure,
                engine
                    .map(|l| format!(" (engine: {l})"))
                    .unwrap_or_default()
            );
            let reply = act.reply.take();
            e.activation = None;
            self.step(n, &model, "rollback-failed", &msg);
            if let Some(r) = reply {
                let _ = r.send(Err(OpError::Failed(msg)));
            }
            return;
        }
        act.failure = match engine {
            Some(l) => format!("{why}; the engine said: {l}"),
            None => {
                // The engine's last words may still be on their way (container logs), or in
                // the journal only (a unit writes there directly): look again shortly.
                let unit = Some(e.last_unit.clone()).filter(|u| u.ends_with(".service"));
                let sink = e.sink.clone();
                let tx = self.events_tx.clone();
                let name = n.to_string();
                act.engine_pending = true;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let line = match (
                        sink.and_then(|s| crate::model::last_error_line(&s.recent())),
                        unit,
                    ) {
                        (Some(l), _) => Some(l),
                        (None, Some(u)) => {
                            tokio::task::spawn_blocking(move || journal_error_line(&u))
                                .await
                                .ok()
                                .flatten()
                        }
                        (None, None) => None,
                    };
                    let _ = tx.send(Event::EngineLine { name, line });
                });
                why
            }
        };
        let failure = act.failure.clone();
        let Some(previous) = act.previous.clone() else {
            let reply = act.reply.take();
            e.activation = None;
            let msg = format!(
                "activating {} failed: {failure}; there is no previous model to roll back to",
                model.display()
            );
            self.step(n, &model, "failed", &msg);
            if let Some(r) = reply {
                let _ = r.send(Err(OpError::Failed(msg)));
            }
            return;
        };
        act.rolling_back = true;
        e.active_model = Some(previous.clone());
        e.budget.reset();
        let running = e.run.is_some();
        if let Err(err) = crate::model::record(&state_dir, &previous, None) {
            tracing::error!(
                modvisor_module = n,
                "cannot record the rolled-back model: {err}"
            );
        }
        self.step(n, &model, "failed", &failure);
        self.step(
            n,
            &model,
            "rolling-back",
            &format!("to {}", previous.display()),
        );
        // A systemd engine may still be (re)starting on the bad model: stop it, then start.
        if running {
            self.begin_stop(n, AfterStop::Start);
        } else if let Err(err) = self.start(n) {
            self.activation_failed(n, err.to_string());
        }
    }

    /// Progress of a backend-managed run (systemd): main PID, restarts, phase.
    fn progressed(
        &mut self,
        n: &str,
        generation: u64,
        main_pid: u32,
        restarts: Option<u32>,
        phase: RunPhase,
        container_id: Option<String>,
    ) {
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        if phase == RunPhase::Ended {
            if let Some(r) = restarts
                && e.run
                    .as_ref()
                    .is_some_and(|run| run.generation == generation)
            {
                e.restarts = r;
            }
            return;
        }
        if e.stopping {
            return;
        }
        let has_probe = e.module.health.probe.is_some();
        let (failures, successes) = (e.module.health.failures, e.module.health.successes);
        let fallback = e.decision.fallback.then(|| e.decision.reason.clone());
        let Some(run) = e.run.as_mut().filter(|r| r.generation == generation) else {
            return;
        };
        run.main_pid = main_pid;
        if let Some(id) = container_id {
            run.container_id = id;
        }
        if let Some(r) = restarts {
            e.restarts = r;
        }
        let restarts = e.restarts;
        let unit = run.handle.unit.clone();
        let (state, health, why) = match phase {
            RunPhase::Restarting(info) if e.activation.is_some() => {
                let why = format!("pid {} exited: {info}", run.main_pid);
                self.activation_failed(n, why);
                return;
            }
            RunPhase::Restarting(info) => {
                // A new process: its health starts from scratch.
                run.hysteresis = Hysteresis::new(failures, successes);
                (
                    State::Starting,
                    Health::Offline,
                    format!("{info}; systemd restarts {unit} (restart {})", restarts + 1),
                )
            }
            RunPhase::Unreachable(why) => (
                State::Running,
                Health::Unknown,
                format!("{why}: {unit} cannot be observed now"),
            ),
            RunPhase::Starting => (
                State::Starting,
                Health::Unknown,
                format!("{unit} is starting"),
            ),
            RunPhase::Stopping | RunPhase::Ended => (
                State::Stopping,
                Health::Offline,
                format!("{unit} is stopping"),
            ),
            RunPhase::Running => match run.hysteresis.verdict() {
                _ if !has_probe => match fallback {
                    Some(f) => (
                        State::Running,
                        Health::Degraded,
                        format!("running (pid {main_pid}) in fallback mode: {f}"),
                    ),
                    None => (
                        State::Running,
                        Health::Online,
                        format!("running (pid {main_pid}), no health probe configured"),
                    ),
                },
                None => (
                    State::Starting,
                    Health::Unknown,
                    format!("running (pid {main_pid}), waiting for the health probe"),
                ),
                // The probe's verdict stands; only the PID may have changed.
                Some(_) => return,
            },
        };
        self.set(n, state, health, why);
    }

    fn probed(&mut self, n: &str, generation: u64, result: ProbeResult) {
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        if e.stopping {
            return;
        }
        let Some(run) = e.run.as_mut().filter(|r| r.generation == generation) else {
            return;
        };
        // A unit or container is not online before its backend has said it runs (and which
        // process it is): an answer on its port could still come from something else.
        if run.backend.survives_daemon() && run.main_pid == 0 {
            return;
        }
        let failures = e.module.health.failures;
        let fallback = e.decision.fallback.then(|| e.decision.reason.clone());
        let verdict = run.hysteresis.feed(result.ok);
        let bad = run.hysteresis.bad_streak();
        let (state, health, why) = match verdict {
            // Still in the start phase: failures do not count, only start_timeout ends it.
            // Show what the engine says meanwhile ("HTTP 503": still loading).
            None => {
                let pid = run.main_pid;
                let what = if result.loading {
                    "loading"
                } else {
                    "waiting for the health probe"
                };
                let why = format!("starting (pid {pid}), {what}: {}", result.detail);
                if e.reason == why {
                    return;
                }
                (State::Starting, Health::Unknown, why)
            }
            Some(true) => match fallback {
                Some(f) => (
                    State::Running,
                    Health::Degraded,
                    format!(
                        "healthy ({}) but running in fallback mode: {f}",
                        result.detail
                    ),
                ),
                None => (
                    State::Running,
                    Health::Online,
                    format!("healthy: {}", result.detail),
                ),
            },
            Some(false) => (
                State::Running,
                Health::Offline,
                format!(
                    "health probe failed {bad} times in a row (failures = {failures}): {}",
                    result.detail
                ),
            ),
        };
        // Keep the reason of a healthy module stable (do not republish every probe).
        if health == e.health && state == e.state && result.ok {
            return;
        }
        if health == Health::Offline
            && e.health == Health::Offline
            && e.state == State::Running
            && bad > failures
        {
            return;
        }
        self.set(n, state, health, why);
    }

    fn exited(&mut self, n: &str, generation: u64, info: ExitInfo) {
        let Some(e) = self.modules.get_mut(n) else {
            return;
        };
        let Some(run) = e.run.take_if(|r| r.generation == generation) else {
            return;
        };
        if let Some(p) = run.probe {
            p.abort();
        }
        let pid = run.main_pid;
        let was_stopping = std::mem::replace(&mut e.stopping, false);
        if was_stopping && !run.start_timed_out {
            let after = std::mem::replace(&mut e.after_stop, AfterStop::Nothing);
            for w in e.stop_waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
            match after {
                AfterStop::Remove => {
                    tracing::info!(modvisor_module = n, "{n} stopped and removed");
                    self.modules.remove(n);
                }
                AfterStop::Start => {
                    self.set(
                        n,
                        State::Inactive,
                        Health::Offline,
                        format!("stopped ({info}), restarting"),
                    );
                    if let Err(err) = self.start(n)
                        && let Some(e) = self.modules.get_mut(n)
                    {
                        for w in e.restart_waiters.drain(..) {
                            let _ = w.send(Err(err.clone()));
                        }
                    }
                }
                AfterStop::Nothing => {
                    self.set(n, State::Inactive, Health::Offline, "stopped".into())
                }
            }
            return;
        }
        let what = if run.start_timed_out {
            format!(
                "no successful health probe within start_timeout ({:?})",
                e.module.health.start_timeout
            )
        } else {
            format!("pid {pid} exited: {info}")
        };
        if e.activation.is_some() {
            // The engine died on the model being activated (or on the rollback): no restart
            // policy here, the transaction decides.
            self.activation_failed(n, what);
            return;
        }
        let r = &e.module.restart;
        if run.backend.restarts_itself() && !run.start_timed_out {
            // systemd applied the restart policy; this is the end of it.
            let (max, window) = (r.max, r.window);
            let (state, why) = match &info {
                ExitInfo::StartLimitHit(last) => (
                    State::Failed,
                    format!(
                        "{last}; restart limit reached ({max} restarts within {window:?}), left stopped"
                    ),
                ),
                i if i.success() => (State::Inactive, format!("exited: {i}")),
                i if r.policy != manifest::RestartPolicy::No && e.restarts >= max => (
                    State::Failed,
                    format!(
                        "{i}; restart limit reached ({max} restarts within {window:?}), left stopped"
                    ),
                ),
                i => (
                    State::Failed,
                    format!(
                        "{i}; not restarted (restart.policy = {})",
                        r.policy.as_str()
                    ),
                ),
            };
            self.set(n, state, Health::Offline, why);
            return;
        }
        let want = match r.policy {
            manifest::RestartPolicy::No => false,
            manifest::RestartPolicy::OnFailure => !info.success() || run.start_timed_out,
            manifest::RestartPolicy::Always => true,
        };
        if !want {
            let (state, why) = if info.success() && !run.start_timed_out {
                (
                    State::Inactive,
                    format!(
                        "{what}; not restarted (restart.policy = {})",
                        r.policy.as_str()
                    ),
                )
            } else {
                (
                    State::Failed,
                    format!(
                        "{what}; not restarted (restart.policy = {})",
                        r.policy.as_str()
                    ),
                )
            };
            self.set(n, state, Health::Offline, why);
            return;
        }
        let (delay, max, window) = (r.delay, r.max, r.window);
        match e.budget.try_take(Instant::now()) {
            Some(count) => {
                e.restarts += 1;
                let generation = e.generation;
                let tx = self.events_tx.clone();
                let name = n.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Event::RestartDue { name, generation });
                });
                self.set(
                    n,
                    State::Starting,
                    Health::Offline,
                    format!("{what}; restarting in {delay:?} (restart {count} of {max} within {window:?})"),
                );
            }
            None => {
                self.set(
                    n,
                    State::Failed,
                    Health::Offline,
                    format!("{what}; restart limit reached ({max} restarts within {window:?}), left stopped"),
                );
            }
        }
    }
}

fn availability(
    native_backend: &Option<Arc<dyn Backend>>,
    container: &Result<Arc<dyn Backend>, String>,
    m: &Module,
) -> Availability {
    let native = match (native_backend, &m.native) {
        (None, _) => Err("no native backend is available".to_string()),
        (_, None) => Err("the manifest has no [native] section".to_string()),
        (Some(b), Some(NativeExec::Unit(u))) if !b.restarts_itself() => Err(format!(
            "existing units ({u}) need the systemd backend, which this daemon does not run"
        )),
        (Some(_), Some(NativeExec::Unit(_))) => Ok(()),
        (Some(_), Some(NativeExec::Command { argv, .. })) => {
            if argv[0].contains("${") || program_exists(&argv[0]) {
                Ok(())
            } else {
                Err(format!("program {} not found", argv[0]))
            }
        }
    };
    let container = match container {
        Ok(_) => Ok(()),
        Err(why) => Err(why.clone()),
    };
    Availability { native, container }
}

/// [privileges] The model check before a start: `model::check_for_start`, with the engine
/// root only for a native command whose manifest says `user = "root"`.
fn check_model(m: &Module, mode: Mode, model: Option<&Path>) -> Result<(), String> {
    let Some(model) = model else { return Ok(()) };
    let root = mode == Mode::Native
        && matches!(&m.native, Some(NativeExec::Command { privileges, .. }) if privileges.runs_as_root());
    crate::model::check_for_start(m.model.as_ref(), model, root)
}

fn no_such(n: &str) -> OpError {
    OpError::NoSuchModule(format!("no module named \"{n}\""))
}

/// The threshold crossed by a module's RAM or VRAM, if any, with the figures.
fn resource_warning(e: &Entry, cfg: &Config, machine_total: u64) -> Option<String> {
    use crate::manifest::units::format_bytes;
    let r = &e.module.resources;
    let ram_pct = r.ram_warn_percent.unwrap_or(cfg.ram_warn_percent) as u64;
    let (base, of) = match r.memory_max {
        Some(m) => (m, "memory_max"),
        None => (machine_total, "the machine's memory"),
    };
    if base > 0 && e.memory * 100 > base * ram_pct {
        return Some(format!(
            "RAM {} is {}% of {of} ({}), over ram_warn_percent {ram_pct}%",
            format_bytes(e.memory),
            e.memory * 100 / base,
            format_bytes(base)
        ));
    }
    let vram_pct = r.vram_warn_percent.unwrap_or(cfg.vram_warn_percent) as u64;
    if e.vram_total > 0 && e.vram * 100 > e.vram_total * vram_pct {
        return Some(format!(
            "VRAM {} is {}% of its GPUs' {}, over vram_warn_percent {vram_pct}%",
            format_bytes(e.vram),
            e.vram * 100 / e.vram_total,
            format_bytes(e.vram_total)
        ));
    }
    None
}

/// The last error line of a unit in the journal (system or user manager).
fn journal_error_line(unit: &str) -> Option<String> {
    let out = std::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-n", "40"])
        .arg(format!("_SYSTEMD_UNIT={unit}"))
        .arg("+")
        .arg(format!("_SYSTEMD_USER_UNIT={unit}"))
        .output()
        .ok()?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    crate::model::last_error_line(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_max_within_window_then_refills() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(3, Duration::from_secs(60));
        assert_eq!(b.try_take(t0), Some(1));
        assert_eq!(b.try_take(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(b.try_take(t0 + Duration::from_secs(20)), Some(3));
        assert_eq!(
            b.try_take(t0 + Duration::from_secs(30)),
            None,
            "fourth within the window"
        );
        // The first restart leaves the window at t0+60s.
        assert_eq!(b.try_take(t0 + Duration::from_secs(60)), Some(3));
        assert_eq!(b.try_take(t0 + Duration::from_secs(61)), None);
        b.reset();
        assert_eq!(b.try_take(t0 + Duration::from_secs(62)), Some(1));
    }

    #[test]
    fn zero_max_never_restarts() {
        let mut b = RestartBudget::new(0, Duration::from_secs(60));
        assert_eq!(b.try_take(Instant::now()), None);
    }
}
