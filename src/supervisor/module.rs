//! The lifecycle of one module: a pure state machine. Inputs in (with the time), new state
//! and [`Effect`]s out; no I/O, no tokio, no channels. The actor routes inputs here and carries
//! out the effects; re-entrancy is impossible by construction.
//!
//! | phase \ input        | Start / Restart          | Stop                     | Exited (own)                   | Timer                      |
//! |----------------------|--------------------------|--------------------------|--------------------------------|----------------------------|
//! | Down                 | start                    | Inactive, OK             | -                              | stale: ignored             |
//! | RestartWait(token)   | start now                | Inactive, OK (cancelled) | -                              | RestartDue(token): start   |
//! | Up, running          | OK / stop then start     | stop, OK when it exits   | restart policy (restart.rs)    | StartTimeout: stop it      |
//! | Up, stop asked       | start after the stop     | joins the stop           | Then: nothing / start / remove | stale: ignored             |
//! | Up, start timed out  | stop, then start         | stop wins                | restart policy                 | -                          |
//!
//! Every other input, by phase (Down includes RestartWait unless said):
//!
//! | input                  | Down                          | Up, running                     | Up, stop asked               |
//! |------------------------|-------------------------------|---------------------------------|------------------------------|
//! | Boot                   | start                         | -                               | -                            |
//! | Reconfigure{respawn}   | start if newly enabled        | respawn: stop, then start       | the stop stays a stop        |
//! | Respawn (override)     | -                             | stop, then start                | the stop stays a stop        |
//! | Remove                 | Removed                       | stop, then Removed              | then Removed                 |
//! | Shutdown               | -                             | units/containers: Detach; else stop | joins                    |
//! | Started / StartFailed  | stale: ignored                | (not started yet) Running / Failed | started: stop it now; failed: stopped |
//! | Progress / Probe       | stale: ignored                | shown state, start_timeout re-armed on news | ignored         |
//! | Demand (a connection)  | start if on demand or standby | -                               | idle/evicted stop: start after |
//! | Connections(n)         | counted                       | n = 0: arm IdleStop             | counted                      |
//! | Timer IdleStop         | stale                         | quiet stop (standby)            | stale                        |
//! | Evict{by}              | -                             | quiet stop (evicted)            | -                            |
//! | Waiting (admission)    | -                             | (not started yet) reason shown  | -                            |
//! | Warning / Progressing  | threshold kept                | degraded / start_timeout re-armed | -                          |
//! | ActivateModel          | validate, then start on it    | validate, record, restart       | Busy                         |
//! | ModelValidated/Recorded/EngineLine | the activation's next step (activation.rs), or the failed run's reason |  |               |
//!
//! Rules stated once: a stop always wins over a pending start, restart or automatic restart,
//! and its OK means "stopped and staying stopped"; a restart asked after a stop runs after it;
//! during a model activation every other command is `Busy`; events of an older run
//! (generation) are ignored; an activation's failure is handled once (activation.rs).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::activation::{self, Activation, Next};
use super::failure;
use super::restart::{self, AfterExit, RestartBudget};
use super::run::{Run, Shown, Stopping, Then};
use super::{OpError, ReplyId};
use crate::health::ProbeResult;
use crate::manifest::Module;
use crate::runtime::{ExitInfo, RunPhase};
use crate::state::{Health, State};

/// What happens to a module.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// StartModule: answered once the run has started.
    Start(ReplyId),
    /// StopModule: answered once the run has ended.
    Stop(ReplyId),
    /// RestartModule: answered once the new run has started.
    Restart(ReplyId),
    /// Start without a reply (boot, a reload enabled it, a run left by an earlier daemon).
    Boot,
    /// The manifest changed (what it runs: `respawn`), or only its other settings.
    Reconfigure {
        module: Box<Module>,
        respawn: bool,
    },
    /// The mode changed (override): restart if it runs.
    Respawn,
    /// The manifest is gone: stop, then remove.
    Remove,
    /// The daemon stops: direct runs are stopped, units and containers left running.
    Shutdown,
    Started(Started),
    StartFailed {
        generation: u64,
        why: String,
    },
    Progress {
        generation: u64,
        main_pid: u32,
        restarts: Option<u32>,
        phase: RunPhase,
    },
    Exited(Exit),
    Probe {
        generation: u64,
        result: ProbeResult,
    },
    Timer(Timer),
    /// A connection arrived at the listen address while the engine was not serving.
    Demand {
        peer: String,
    },
    /// The number of open connections to the listen address.
    Connections(u32),
    /// A sign that a start makes progress (its memory grew): start_timeout starts again.
    Progressing {
        generation: u64,
        what: String,
    },
    /// Stop to make room for another module (admission): `by` needs the memory, `why` says
    /// how much.
    Evict {
        by: String,
        why: String,
    },
    /// A start waits for admission (memory being released): what it waits for.
    Waiting {
        generation: u64,
        why: String,
    },
    /// A resource threshold crossed (or none), from the latest sample.
    Warning(Option<String>),
    ActivateModel {
        reply: ReplyId,
        requested: String,
    },
    ModelValidated(Result<PathBuf, String>),
    ModelRecorded(Result<(), String>),
    EngineLine(Option<String>),
}

/// A run ended: how, and the engine's last error line when modvisord has it at hand (the
/// output it keeps of direct children and containers).
#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub generation: u64,
    pub info: ExitInfo,
    pub line: Option<String>,
}

/// The backend's answer to a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub generation: u64,
    pub main_pid: u32,
    pub unit: String,
    pub restarts_itself: bool,
    pub survives: bool,
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// An automatic restart is due (token: the wait it belongs to).
    RestartDue(u64),
    /// A start has gone start_timeout without progress (token: the arming it belongs to).
    StartTimeout(u64),
    /// The run (generation) has had start_limit to become healthy.
    StartLimit(u64),
    /// No connection for idle_stop (token: the arming it belongs to).
    IdleStop(u64),
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start a run on `model` (decide the mode, render, check, start the backend).
    Start {
        generation: u64,
        model: Option<PathBuf>,
    },
    /// Stop the run (its Exited follows).
    Stop {
        generation: u64,
    },
    /// Leave the run running and forget it (shutdown, units and containers).
    Detach {
        generation: u64,
    },
    StartProbe {
        generation: u64,
    },
    StopProbe,
    Arm {
        timer: Timer,
        after: Duration,
    },
    Reply(ReplyId, Result<(), OpError>),
    /// The published state or health changed: one journal line.
    Changed {
        state: State,
        health: Health,
        reason: String,
    },
    /// A model activation step: the ModelActivation signal and a journal line.
    Step {
        model: PathBuf,
        step: &'static str,
        detail: String,
    },
    /// A model activation ended: "online", "rolled-back" or "failed" (metrics).
    Activated(&'static str),
    /// A journal entry of its own (MESSAGE_ID, text): on-demand starts, idle stops.
    Notice(&'static str, String),
    ValidateModel {
        requested: String,
    },
    RecordModel {
        model: PathBuf,
        previous: Option<PathBuf>,
    },
    LookupEngineLine,
    /// The module is gone (stopped after its manifest was removed).
    Removed,
}

#[derive(Debug, Clone)]
enum Phase {
    Down,
    RestartWait { token: u64 },
    Up(Run),
}

/// The lifecycle of one module.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    name: String,
    module: Module,
    phase: Phase,
    shown: Shown,
    logged: (State, Health),
    since: SystemTime,
    generation: u64,
    /// Tokens of start_timeout armings.
    timers: u64,
    budget: RestartBudget,
    restarts: u32,
    warning: Option<String>,
    active_model: Option<PathBuf>,
    activation: Option<Activation>,
    start_waiters: Vec<ReplyId>,
    stop_waiters: Vec<ReplyId>,
    shutting_down: bool,
    /// Open connections to the listen address, and the armed idle stop.
    connections: u32,
    last_activity: SystemTime,
    idle_token: u64,
    idle_stop_at: Option<SystemTime>,
    /// A stop of our own that leaves the module ready to start again: idle, or evicted.
    quiet: Option<Quiet>,
    /// A start that never came online ended: the engine's last error line is looked up for
    /// the reason shown (the generation it belongs to).
    line_for: Option<(u64, String)>,
}

/// Why modvisor itself stopped a module that will start again on demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiet {
    Idle,
    /// Evicted to start another module: (by, why).
    Evicted(String, String),
}

/// The time an input happens at: monotonic for budgets, wall clock for `Since`.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn current() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

type Fx = Vec<Effect>;

impl Lifecycle {
    pub fn new(module: Module, active_model: Option<PathBuf>, now: Now) -> Self {
        let on_demand = module
            .serve
            .as_ref()
            .filter(|s| s.on_demand && module.enabled);
        let shown = match on_demand {
            Some(s) => (
                State::Inactive,
                Health::Standby,
                format!("starts on the first connection to {}", listen_list(s)),
            ),
            None if module.enabled => (State::Inactive, Health::Offline, "not started".into()),
            None => (
                State::Inactive,
                Health::Offline,
                "not started (enabled = false)".into(),
            ),
        };
        Lifecycle {
            name: module.name.clone(),
            budget: RestartBudget::new(&module.restart),
            module,
            phase: Phase::Down,
            logged: (shown.0, shown.1),
            shown,
            since: now.wall,
            generation: 0,
            timers: 0,
            restarts: 0,
            warning: None,
            active_model,
            activation: None,
            start_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            shutting_down: false,
            connections: 0,
            last_activity: now.wall,
            idle_token: 0,
            idle_stop_at: None,
            quiet: None,
            line_for: None,
        }
    }

    // ------------------------------------------------------------ getters

    pub fn module(&self) -> &Module {
        &self.module
    }
    pub fn state(&self) -> State {
        self.shown.0
    }
    /// Health and reason as published: run/probe health, resource thresholds on top.
    pub fn effective(&self) -> (Health, &str) {
        match (&self.warning, self.shown.1) {
            (Some(w), Health::Online) => (Health::Degraded, w.as_str()),
            (_, h) => (h, self.shown.2.as_str()),
        }
    }
    pub fn since(&self) -> SystemTime {
        self.since
    }
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
    pub fn active_model(&self) -> Option<&PathBuf> {
        self.active_model.as_ref()
    }
    pub fn main_pid(&self) -> u32 {
        self.run().map(|r| r.main_pid).unwrap_or(0)
    }
    /// The generation of the current run, if one exists.
    pub fn running(&self) -> Option<u64> {
        self.run().map(|r| r.generation)
    }
    pub fn connections(&self) -> u32 {
        self.connections
    }
    pub fn last_activity(&self) -> SystemTime {
        self.last_activity
    }
    pub fn idle_stop_at(&self) -> Option<SystemTime> {
        self.idle_stop_at
    }
    pub fn activating(&self) -> bool {
        self.activation.is_some()
    }
    /// When it was last used: its last connection, or when it became what it is now.
    pub fn last_used(&self) -> SystemTime {
        self.last_activity.max(self.since)
    }
    /// Running and serving, not stopping, not mid-activation: a candidate for eviction.
    pub fn serving(&self) -> bool {
        self.activation.is_none()
            && self.shown.0 == State::Running
            && matches!(&self.phase, Phase::Up(r) if r.started && r.stopping.is_none())
    }
    /// Nothing runs (the actor may end at shutdown).
    pub fn is_down(&self) -> bool {
        !matches!(self.phase, Phase::Up(_))
    }
    fn run(&self) -> Option<&Run> {
        match &self.phase {
            Phase::Up(r) => Some(r),
            _ => None,
        }
    }
    fn run_mut(&mut self, generation: u64) -> Option<&mut Run> {
        match &mut self.phase {
            Phase::Up(r) if r.generation == generation => Some(r),
            _ => None,
        }
    }

    // ------------------------------------------------------------ the one entry point

    /// Feeds one input; returns what to carry out, in order.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Effect> {
        let mut fx = Vec::new();
        match input {
            Input::Start(r) => self.on_start(Some(r), false, now, &mut fx),
            Input::Boot => self.on_start(None, false, now, &mut fx),
            Input::Restart(r) => self.on_start(Some(r), true, now, &mut fx),
            Input::Stop(r) => self.on_stop(r, &mut fx),
            Input::Reconfigure { module, respawn } => {
                self.on_reconfigure(*module, respawn, now, &mut fx)
            }
            Input::Respawn => self.respawn(&mut fx),
            Input::Remove => self.on_remove(&mut fx),
            Input::Shutdown => self.on_shutdown(&mut fx),
            Input::Started(s) => self.on_started(s, now, &mut fx),
            Input::StartFailed { generation, why } => {
                self.on_start_failed(generation, why, now, &mut fx)
            }
            Input::Progress {
                generation,
                main_pid,
                restarts,
                phase,
            } => self.on_progress(generation, main_pid, restarts, phase, now, &mut fx),
            Input::Exited(e) => self.on_exited(e, now, &mut fx),
            Input::Probe { generation, result } => self.on_probe(generation, result, &mut fx),
            Input::Timer(t) => self.on_timer(t, now, &mut fx),
            Input::Warning(w) => self.warning = w,
            Input::Evict { by, why } => self.on_evict(by, why, &mut fx),
            Input::Waiting { generation, why } => {
                let waiting = matches!(&self.phase, Phase::Up(r) if r.generation == generation && !r.started && r.stopping.is_none());
                if waiting {
                    self.set(State::Starting, Health::Unknown, why);
                }
            }
            Input::Demand { peer } => self.on_demand(peer, now, &mut fx),
            Input::Connections(n) => self.on_connections(n, now, &mut fx),
            Input::Progressing { generation, what } => {
                if self.progressed(generation, &mut fx) {
                    let pid = self.main_pid();
                    let probe = self
                        .run()
                        .map(|r| r.last_detail.clone())
                        .unwrap_or_default();
                    let why = match probe.is_empty() {
                        true => format!("starting (pid {pid}), loading: {what}"),
                        false => format!("starting (pid {pid}), loading: {probe}; {what}"),
                    };
                    self.set(State::Starting, Health::Unknown, why);
                }
            }
            Input::ActivateModel { reply, requested } => {
                self.on_activate(reply, requested, &mut fx)
            }
            Input::ModelValidated(r) => self.on_validated(r, &mut fx),
            Input::ModelRecorded(r) => self.on_recorded(r, now, &mut fx),
            Input::EngineLine(l) => {
                if let Some(a) = self.activation.as_mut() {
                    let next = a.engine_line(l);
                    self.activation_next(next, now, &mut fx);
                } else {
                    self.failed_start_line(l, &mut fx);
                }
            }
        }
        self.settle(now, &mut fx);
        fx
    }

    /// After every input: log a changed state/health once, confirm an activation online.
    fn settle(&mut self, now: Now, fx: &mut Fx) {
        let (health, reason) = self.effective();
        let (cur, reason) = ((self.shown.0, health), reason.to_string());
        if cur != self.logged {
            if cur.0 != self.logged.0 {
                self.since = now.wall;
            }
            fx.push(Effect::Changed {
                state: cur.0,
                health: cur.1,
                reason,
            });
            self.logged = cur;
        }
        let online =
            self.shown.0 == State::Running && matches!(health, Health::Online | Health::Degraded);
        if let (true, Some(g), Some(a)) = (online, self.running(), self.activation.as_mut()) {
            let stopping = matches!(&self.phase, Phase::Up(r) if r.stopping.is_some());
            if !stopping {
                let next = a.online(g);
                self.activation_next(next, now, fx);
            }
        }
    }

    fn set(&mut self, state: State, health: Health, reason: String) {
        self.shown = (state, health, reason);
    }

    fn busy(&self, reply: ReplyId, fx: &mut Fx) -> bool {
        if self.activation.is_some() {
            let n = &self.name;
            fx.push(Effect::Reply(
                reply,
                Err(OpError::Busy(format!(
                    "a model activation of {n} is in progress"
                ))),
            ));
            return true;
        }
        false
    }

    // ------------------------------------------------------------ commands

    fn on_start(&mut self, reply: Option<ReplyId>, restart: bool, now: Now, fx: &mut Fx) {
        if let Some(r) = reply
            && self.busy(r, fx)
        {
            return;
        }
        if reply.is_some() {
            self.budget.reset();
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Down);
        match phase {
            Phase::Down | Phase::RestartWait { .. } => {
                self.start_waiters.extend(reply);
                self.start(now, fx);
            }
            Phase::Up(mut run) => {
                match (run.stopping, restart) {
                    (Some(Stopping::Asked(Then::Remove)), _) => {
                        let n = &self.name;
                        let err = OpError::NoSuchModule(format!(
                            "{n} is being removed: its manifest is gone"
                        ));
                        fx.extend(reply.map(|r| Effect::Reply(r, Err(err))));
                    }
                    // Running and not asked to stop: a start is done; a restart stops it first.
                    (None, false) => fx.extend(reply.map(|r| Effect::Reply(r, Ok(())))),
                    (None, true) | (Some(Stopping::StartTimeout { .. }), _) => {
                        self.start_waiters.extend(reply);
                        self.begin_stop(&mut run, Then::Start, fx);
                    }
                    // A stop is under way: the start comes after it (it was asked later).
                    (Some(Stopping::Asked(_)), _) => {
                        self.start_waiters.extend(reply);
                        run.stopping = Some(Stopping::Asked(Then::Start));
                    }
                }
                self.phase = Phase::Up(run);
            }
        }
    }

    fn on_stop(&mut self, reply: ReplyId, fx: &mut Fx) {
        if self.busy(reply, fx) {
            return;
        }
        // A pending start or restart is cancelled: the stop wins.
        let n = self.name.clone();
        for w in self.start_waiters.drain(..) {
            let err = OpError::Failed(format!("cancelled: {n} was stopped meanwhile"));
            fx.push(Effect::Reply(w, Err(err)));
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Down);
        match phase {
            Phase::Down | Phase::RestartWait { .. } => {
                if self.shown.0 != State::Failed || matches!(phase, Phase::RestartWait { .. }) {
                    self.set(State::Inactive, Health::Offline, "stopped".into());
                }
                fx.push(Effect::Reply(reply, Ok(())));
            }
            Phase::Up(mut run) => {
                self.stop_waiters.push(reply);
                let then = match run.stopping {
                    Some(Stopping::Asked(Then::Remove)) => Then::Remove,
                    _ => Then::Nothing,
                };
                self.begin_stop(&mut run, then, fx);
                self.phase = Phase::Up(run);
            }
        }
    }

    /// Asks the run to stop (once), then `then`; a stop already under way just changes `then`.
    fn begin_stop(&mut self, run: &mut Run, then: Then, fx: &mut Fx) {
        let already = run.stopping.is_some();
        run.stopping = Some(Stopping::Asked(then));
        if !already {
            fx.push(Effect::StopProbe);
            if run.started {
                fx.push(Effect::Stop {
                    generation: run.generation,
                });
            }
        }
        let why = match run.started {
            true => format!("stopping (pid {})", run.main_pid),
            false => "stopping (not started yet)".to_string(),
        };
        self.set(State::Stopping, Health::Offline, why);
    }

    fn on_reconfigure(&mut self, module: Module, respawn: bool, now: Now, fx: &mut Fx) {
        let newly_enabled = module.enabled && !self.module.enabled;
        if module.restart != self.module.restart {
            self.budget = RestartBudget::new(&module.restart);
        }
        self.module = module;
        if respawn {
            self.respawn(fx);
        } else if newly_enabled && matches!(self.phase, Phase::Down) {
            self.on_start(None, false, now, fx);
        }
    }

    /// What it runs changed: a running module restarts (after an activation, if one runs).
    fn respawn(&mut self, fx: &mut Fx) {
        if let Some(a) = self.activation.as_mut() {
            a.respawn_after = true;
            return;
        }
        if let Phase::Up(run) = &mut self.phase {
            let mut run = run.clone();
            // A stop that was asked stays a stop; a removal stays a removal.
            if !matches!(
                run.stopping,
                Some(Stopping::Asked(Then::Nothing | Then::Remove))
            ) {
                self.begin_stop(&mut run, Then::Start, fx);
            }
            self.phase = Phase::Up(run);
        }
    }

    fn on_remove(&mut self, fx: &mut Fx) {
        if let Some(a) = self.activation.take() {
            let n = &self.name;
            let msg = format!("{n} was removed (its manifest is gone) during the activation");
            fx.push(Effect::Reply(a.reply, Err(OpError::Failed(msg))));
        }
        match std::mem::replace(&mut self.phase, Phase::Down) {
            Phase::Up(mut run) => {
                self.begin_stop(&mut run, Then::Remove, fx);
                self.phase = Phase::Up(run);
            }
            Phase::Down | Phase::RestartWait { .. } => self.removed(fx),
        }
    }

    fn removed(&mut self, fx: &mut Fx) {
        let n = self.name.clone();
        for w in self.start_waiters.drain(..) {
            fx.push(Effect::Reply(
                w,
                Err(OpError::NoSuchModule(format!("{n} was removed"))),
            ));
        }
        for w in self.stop_waiters.drain(..) {
            fx.push(Effect::Reply(w, Ok(())));
        }
        fx.push(Effect::Removed);
    }

    fn on_shutdown(&mut self, fx: &mut Fx) {
        self.shutting_down = true;
        if let Some(a) = self.activation.take() {
            let msg = "modvisord is shutting down".to_string();
            fx.push(Effect::Reply(a.reply, Err(OpError::Failed(msg))));
        }
        match std::mem::replace(&mut self.phase, Phase::Down) {
            Phase::Up(run) if run.survives && run.started => {
                fx.push(Effect::StopProbe);
                fx.push(Effect::Detach {
                    generation: run.generation,
                });
            }
            Phase::Up(mut run) => {
                self.begin_stop(&mut run, Then::Nothing, fx);
                self.phase = Phase::Up(run);
            }
            Phase::Down | Phase::RestartWait { .. } => {}
        }
    }
}

/// "127.0.0.1:8080" or "127.0.0.1:8080, [::1]:8080".
pub(super) fn listen_list(s: &crate::manifest::ServeSpec) -> String {
    s.listen
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

mod activate;
mod events;
mod serve;
pub use serve::{MSG_EVICTED, MSG_IDLE_STOP, MSG_ON_DEMAND};
#[cfg(test)]
mod tests;
