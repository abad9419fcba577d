//! The actor: owns the module table (table.rs: one `Lifecycle` per module plus the I/O side
//! of its run), routes inputs to the machines, carries out their effects (effects.rs) and
//! publishes the snapshot after every input. Commands come from D-Bus, events from its own
//! tasks and the backends; nothing here blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::module::{Exit, Input, Now, Started};
use super::resources::Usage;
use super::sampler::{AGAIN_AFTER, Ask, Sampler};
use super::table::{Event, RunSlot, Scans, Slot, Supervisor};
use super::{Backends, Command, Found, Handle, OpError, Reply, ReplyId};
use crate::config::Config;
use crate::journal::Journal;
use crate::policy::Decision;
use crate::runtime::{Backend, RunHandle, RuntimeEvent};
use crate::state::Snapshot;

/// Spawns the supervisor actor; returns its handle, a receiver that fires after the first
/// reconcile (when the daemon may say READY=1), and the actor's task.
pub fn spawn(
    cfg: Arc<Config>,
    backends: Backends,
    journal: Option<Arc<Journal>>,
    existing: Vec<Found>,
    gpu: Result<Arc<crate::monitor::Gpu>, String>,
) -> (Handle, oneshot::Receiver<()>, tokio::task::JoinHandle<()>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (events, events_rx) = mpsc::unbounded_channel();
    let (runtime_tx, runtime_rx) = mpsc::unbounded_channel();
    let mut by_module: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for (b, o) in existing {
        by_module.entry(o.module.clone()).or_default().push((b, o));
    }
    let (state_tx, state_rx) = watch::channel(Arc::new(Snapshot::default()));
    let gpu = gpu.ok();
    let schedule = super::sampler::Schedule::new(cfg.monitor_interval, AGAIN_AFTER);
    let to_actor = events.clone();
    let deliver =
        Box::new(move |s, started| to_actor.send(Event::Sample(Box::new(s), started)).is_ok());
    let sampler = Sampler::spawn(schedule, state_rx.clone(), gpu.clone(), deliver);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (signals, _) = tokio::sync::broadcast::channel(64);
    let sup = Supervisor {
        cfg,
        native: backends.native,
        container: backends.container,
        container_engine: backends.container_engine,
        journal,
        slots: Default::default(),
        manifest_errors: Vec::new(),
        events,
        runtime_tx,
        state_tx,
        existing: by_module,
        signals: signals.clone(),
        gpu,
        gpu_error_logged: false,
        sampler,
        sample_wanted: false,
        sample_soon: false,
        runs_started: 0,
        machine_total: 0,
        gpus: Vec::new(),
        foreign: Vec::new(),
        foreign_gpu: HashMap::new(),
        pending: BTreeMap::new(),
        replies: HashMap::new(),
        next_reply: 0,
        tasks: tokio::task::JoinSet::new(),
        scan: Scans::default(),
    };
    let task = tokio::spawn(sup.run(cmd_rx, events_rx, runtime_rx, ready_tx));
    let handle = Handle {
        commands: cmd_tx,
        state: state_rx,
        signals,
    };
    (handle, ready_rx, task)
}

/// The most messages handled between two publications of the state.
const BATCH: usize = 64;

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
        self.want_samples();
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        loop {
            tokio::select! {
                cmd = cmd_rx.recv(), if shutdown.is_none() => {
                    self.command_or_end(cmd, &mut shutdown);
                }
                Some(ev) = runtime_rx.recv() => self.runtime(ev),
                Some(ev) = events_rx.recv() => self.event(ev),
                // Finished helper tasks of the daemon are reaped here (a JoinSet keeps them).
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => continue,
            }
            self.drain(&mut cmd_rx, &mut events_rx, &mut runtime_rx, &mut shutdown);
            self.check_pending(None);
            self.publish();
            self.want_samples();
            if shutdown.is_some() && self.slots.values().all(|s| s.lc.is_down()) {
                break;
            }
        }
        for s in self.slots.values_mut() {
            s.abort_all();
        }
        self.tasks.abort_all();
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    fn command_or_end(&mut self, cmd: Option<Command>, shutdown: &mut Option<oneshot::Sender<()>>) {
        match cmd {
            Some(Command::Shutdown(done)) => *shutdown = Some(self.shutdown(done)),
            Some(c) => self.command(c),
            // Every handle is gone: stop as if asked to.
            None => *shutdown = Some(self.shutdown(oneshot::channel().0)),
        }
    }

    /// Handles what is already queued (at most [`BATCH`] messages) before the state is
    /// published once: a burst, such as hundreds of units starting together, costs one
    /// projection of the table and one pass of the publisher, not one per event (each is
    /// O(modules): at 500 modules they were most of modvisord's time).
    fn drain(
        &mut self,
        cmd_rx: &mut mpsc::Receiver<Command>,
        events_rx: &mut mpsc::UnboundedReceiver<Event>,
        runtime_rx: &mut mpsc::UnboundedReceiver<RuntimeEvent>,
        shutdown: &mut Option<oneshot::Sender<()>>,
    ) {
        for _ in 1..BATCH {
            if let Ok(ev) = runtime_rx.try_recv() {
                self.runtime(ev);
            } else if let Ok(ev) = events_rx.try_recv() {
                self.event(ev);
            } else if shutdown.is_none()
                && let Ok(c) = cmd_rx.try_recv()
            {
                self.command_or_end(Some(c), shutdown);
            } else {
                return;
            }
        }
    }

    /// Tells the sampler whether there is anything to sample, and asks for the pass owed to
    /// modules that came up: after the publication, so that the pass sees them.
    fn want_samples(&mut self) {
        let wanted = self.gpu.is_some() || self.slots.values().any(|s| s.run.is_some());
        if std::mem::replace(&mut self.sample_wanted, wanted) != wanted {
            self.sampler.ask(Ask::Wanted(wanted));
        }
        if std::mem::take(&mut self.sample_soon) {
            self.sampler.ask(Ask::Soon);
        }
    }

    /// Direct children are stopped (they cannot outlive the daemon); units and containers
    /// keep running and are adopted by the next modvisord.
    fn shutdown(&mut self, done: oneshot::Sender<()>) -> oneshot::Sender<()> {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for n in names {
            self.feed(&n, Input::Shutdown);
        }
        done
    }

    /// Feeds one input to a module's machine and carries out what it returns.
    pub fn feed(&mut self, name: &str, input: Input) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        let fx = slot.lc.handle(input, Now::current());
        let gate = slot.lc.gate();
        slot.gate.send_if_modified(|g| {
            let changed = *g != gate;
            *g = gate;
            changed
        });
        for e in fx {
            self.carry_out(name, e);
        }
    }

    pub fn reply_id(&mut self, r: Reply<()>) -> ReplyId {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, r);
        self.next_reply
    }

    fn runtime(&mut self, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::Exited {
                name,
                generation,
                info,
            } => {
                let mut line = None;
                if let Some(s) = self.slots.get_mut(&name)
                    && s.run.as_ref().is_some_and(|r| r.generation == generation)
                {
                    s.run = None;
                    // The output kept in memory (direct children, containers): no I/O.
                    line = s
                        .sink
                        .as_ref()
                        .and_then(|k| crate::model::last_error_line(&k.recent()));
                }
                let exit = Exit {
                    generation,
                    info,
                    line,
                };
                self.feed(&name, Input::Exited(exit));
            }
            RuntimeEvent::Status {
                name,
                generation,
                main_pid,
                restarts,
                phase,
                container_id,
            } => {
                if let (Some(id), Some(s)) = (container_id, self.slots.get_mut(&name)) {
                    match s.run.as_mut().filter(|r| r.generation == generation) {
                        Some(r) => r.container_id = id,
                        // Reported before the start was answered (an adopted container).
                        None => s.early_container_id = Some((generation, id)),
                    }
                }
                let input = Input::Progress {
                    generation,
                    main_pid,
                    restarts,
                    phase,
                };
                self.feed(&name, input);
                self.sample_fresh(&name);
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Module(name, input) => self.feed(&name, input),
            Event::Started {
                name,
                generation,
                backend,
                handle,
                fallback,
            } => self.started(name, generation, backend, handle, fallback),
            Event::Scanned(res) => self.scanned(*res),
            Event::RestartChecked {
                name,
                reply,
                refused,
            } => match refused {
                Some(why) => {
                    let msg = format!("not restarting {name}: {why}");
                    let _ = reply.send(Err(OpError::Failed(msg)));
                }
                None => self.module_command(&name, reply, Input::Restart),
            },
            Event::ProbeTimed { name, seconds, ok } => {
                if let Some(s) = self.slots.get_mut(&name) {
                    s.counters.observe_probe(seconds, ok);
                }
            }
            Event::Sample(s, started) => self.sampled(*s, started),
            Event::Measured {
                name,
                generation,
                model,
                live,
                round,
            } => self.measured(&name, generation, model, *live, round),
            Event::PendingDue { name, generation } => self.check_pending(Some((&name, generation))),
        }
    }

    fn started(
        &mut self,
        name: String,
        generation: u64,
        backend: Arc<dyn Backend>,
        handle: RunHandle,
        fallback: Option<String>,
    ) {
        let Some(s) = self.slots.get_mut(&name) else {
            return;
        };
        // A run that already ended (or was replaced) before its start was answered.
        if s.lc.running() != Some(generation) {
            return;
        }
        s.last_unit = handle.unit.clone();
        let started = Started {
            generation,
            main_pid: handle.pid,
            unit: handle.unit.clone(),
            restarts_itself: backend.restarts_itself(),
            survives: backend.survives_daemon(),
            fallback,
        };
        s.usage = Usage::default();
        s.adm.new_run();
        self.runs_started += 1;
        let container_id = s
            .early_container_id
            .take()
            .filter(|(g, _)| *g == generation)
            .map(|(_, id)| id)
            .unwrap_or_default();
        s.run = Some(RunSlot {
            generation,
            backend,
            handle,
            container_id,
        });
        self.feed(&name, Input::Started(started));
        self.sample_fresh(&name);
    }

    pub fn publish(&self) {
        let prev = self.state_tx.borrow().clone();
        let snap = super::snapshot::project(self, &prev);
        self.state_tx.send_if_modified(|cur| {
            if super::snapshot::unchanged(cur, &snap) {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.cfg.state.join("modules").join(name)
    }

    pub fn host(&self) -> crate::host::Backends {
        crate::host::Backends {
            native_is_systemd: self.native.as_ref().map(|n| n.restarts_itself()),
            container: self.container.as_ref().map(|_| ()).map_err(|e| e.clone()),
            search_path: crate::runtime::direct::DEFAULT_PATH.to_string(),
        }
    }

    pub fn decide(&self, s: &Slot) -> Decision {
        let m = s.lc.module();
        let avail = crate::host::availability(&self.host(), m);
        crate::policy::decide(m, &self.cfg.policy, &avail, s.override_mode)
    }

    pub fn no_such(n: &str) -> OpError {
        OpError::NoSuchModule(format!("no module named \"{n}\""))
    }
}
