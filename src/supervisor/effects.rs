//! Carrying out the machines' effects: backends, probes, timers, model I/O, journal lookups.
//! Everything that can take time runs in a task whose result comes back as an input.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::module::{Effect, Input, Timer};
use super::table::{Event, Slot, Supervisor};
use super::{MSG_MODEL_ACTIVATION, MSG_STATE_CHANGED};
use crate::health;
use crate::journal::OutputSink;
use crate::manifest::Mode;
use crate::runtime::{Backend, RunRequest};
use crate::state::{Health, State};

impl Supervisor {
    pub(super) fn carry_out(&mut self, n: &str, e: Effect) {
        match e {
            Effect::Start { generation, model } => {
                if let Some(s) = self.slots.get_mut(n) {
                    s.start_at = Some(std::time::Instant::now());
                }
                self.admit(n, generation, model)
            }
            Effect::Stop { generation } => self.stop(n, generation),
            Effect::Detach { generation } => {
                if let Some(s) = self.slots.get_mut(n)
                    && let Some(r) = s.run.take_if(|r| r.generation == generation)
                {
                    tracing::info!(
                        modvisor_module = n,
                        "leaving {} running ({})",
                        r.handle.unit,
                        r.backend.kind()
                    );
                }
            }
            Effect::StartProbe { generation } => self.start_probe(n, generation),
            Effect::StopProbe => {
                if let Some(p) = self.slots.get_mut(n).and_then(|s| s.probe.take()) {
                    p.abort();
                }
            }
            Effect::Arm { timer, after } => self.arm(n, timer, after),
            Effect::Reply(id, result) => {
                if let Some(r) = self.replies.remove(&id) {
                    let _ = r.send(result);
                }
            }
            Effect::Changed {
                state,
                health,
                reason,
            } => {
                self.count_start(n, state, health);
                if state == crate::state::State::Running {
                    self.sample_fresh(n);
                }
                tracing::info!(
                    modvisor_module = n,
                    message_id = MSG_STATE_CHANGED,
                    modvisor_state = state.as_str(),
                    modvisor_health = health.as_str(),
                    "{n}: {state}, {health}: {reason}"
                )
            }
            Effect::Step {
                model,
                step,
                detail,
            } => self.step(n, &model, step, &detail),
            Effect::Activated(outcome) => self.count_activation(n, outcome),
            Effect::Notice(id, text) => {
                self.count_notice(n, id);
                tracing::info!(modvisor_module = n, message_id = id, "{text}")
            }
            Effect::ValidateModel { requested } => self.validate_model(n, requested),
            Effect::RecordModel { model, previous } => self.record_model(n, model, previous),
            Effect::LookupEngineLine => self.lookup_engine_line(n),
            Effect::Removed => {
                if let Some(mut s) = self.slots.remove(n) {
                    s.abort_all();
                    for a in &s.listening {
                        crate::fdstore::release(a);
                    }
                    tracing::info!(modvisor_module = n, "{n} stopped and removed");
                }
            }
        }
    }

    /// The start duration, once a start is online.
    fn count_start(&mut self, n: &str, state: State, health: Health) {
        let online = state == State::Running && matches!(health, Health::Online | Health::Degraded);
        if let Some(s) = self.slots.get_mut(n)
            && online
            && let Some(t0) = s.start_at.take()
        {
            s.counters.last_start_seconds = t0.elapsed().as_secs_f64();
        }
    }

    fn count_activation(&mut self, n: &str, outcome: &str) {
        let Some(c) = self.slots.get_mut(n).map(|s| &mut s.counters) else {
            return;
        };
        match outcome {
            "online" => c.activations_online += 1,
            "rolled-back" => c.activations_rolled_back += 1,
            _ => c.activations_failed += 1,
        }
    }

    /// On-demand starts, idle stops and evictions: counted where their journal entry is made.
    fn count_notice(&mut self, n: &str, id: &str) {
        use super::module::{MSG_EVICTED, MSG_IDLE_STOP, MSG_ON_DEMAND};
        let Some(c) = self.slots.get_mut(n).map(|s| &mut s.counters) else {
            return;
        };
        match id {
            MSG_ON_DEMAND => c.on_demand_starts += 1,
            MSG_IDLE_STOP => c.idle_stops += 1,
            MSG_EVICTED => c.evictions += 1,
            _ => {}
        }
    }

    /// Sends an input back to a module's machine from a task.
    fn back(&self, n: &str) -> impl Fn(Input) + Send + 'static {
        let tx = self.events.clone();
        let n = n.to_string();
        move |input| {
            let _ = tx.send(Event::Module(n.clone(), input));
        }
    }

    fn spawn_for(&mut self, n: &str, fut: impl Future<Output = ()> + Send + 'static) {
        let h = tokio::spawn(fut).abort_handle();
        if let Some(s) = self.slots.get_mut(n) {
            s.own(h);
        }
    }

    /// Decides the mode, renders what to run, and starts it off the actor.
    pub(super) fn start(
        &mut self,
        n: &str,
        generation: u64,
        model: Option<PathBuf>,
        gpus: Vec<u32>,
    ) {
        let back = self.back(n);
        let fail = |why: String| Input::StartFailed { generation, why };
        let Some(s) = self.slots.get(n) else { return };
        let decision = self.decide(s);
        let Some(mode) = decision.mode else {
            return back(fail(decision.reason.clone()));
        };
        let backend = match mode {
            Mode::Native => self.native.clone().ok_or("no native backend".to_string()),
            Mode::Container => self.container.clone(),
        };
        let backend = match backend {
            Ok(b) => b,
            Err(why) => return back(fail(why)),
        };
        let state_dir = self.state_dir(n);
        let found_here = s.found.iter().any(|(b, _)| b.kind() == backend.kind());
        let mut req =
            match self.run_request(n, s, generation, mode, &state_dir, model.as_deref(), &gpus) {
                Ok(req) => req,
                Err(why) => return back(fail(why)),
            };
        req.found_at_start = found_here;
        let fallback = decision.fallback.then(|| decision.reason.clone());
        let Some(s) = self.slots.get_mut(n) else {
            return;
        };
        s.decision = decision;
        s.output_start = req.sink.seq();
        s.sink = Some(req.sink.clone());
        // A run left in another backend than the one chosen now would be a second copy.
        for (b, o) in std::mem::take(&mut s.found) {
            if b.kind() != backend.kind() {
                tokio::spawn(b.stop_unit(&o.id));
            }
        }
        let job = Box::new(StartJob {
            backend,
            req,
            events: self.runtime_tx.clone(),
            state_dir,
            check: ModelCheck::of(s.lc.module(), mode, model),
        });
        self.spawn_start(n, generation, job, fallback);
    }

    /// What to run for `n`: its rendered exec (GPUs placed), output sink and limits.
    #[allow(clippy::too_many_arguments)]
    fn run_request(
        &self,
        n: &str,
        s: &Slot,
        generation: u64,
        mode: Mode,
        state_dir: &Path,
        model: Option<&Path>,
        gpus: &[u32],
    ) -> Result<RunRequest, String> {
        let m = s.lc.module();
        let Some(mut exec) = m.render(mode, state_dir, model) else {
            return Err(format!("the manifest has no [{mode}] section"));
        };
        exec.place_gpus(gpus);
        let sink = OutputSink::new(
            n,
            self.journal.clone(),
            self.cfg.module_log_dir.as_deref(),
            self.cfg.module_log_max_bytes,
        )
        .continuing(s.sink.as_ref());
        Ok(RunRequest {
            name: n.to_string(),
            generation,
            description: m.description.clone(),
            exec,
            restart: m.restart.clone(),
            stop_timeout: m.stop_timeout,
            memory_max: m.resources.memory_max,
            guard_port: m.health.probe.as_ref().and_then(|p| p.address()),
            sink,
            // Set by the caller, which knows the backend.
            found_at_start: false,
        })
    }

    /// Carries the start to the blocking pool; its outcome comes back as an event. The task
    /// holds the boxed job, not the request.
    fn spawn_start(
        &mut self,
        n: &str,
        generation: u64,
        job: Box<StartJob>,
        fallback: Option<String>,
    ) {
        let (tx, name, backend) = (self.events.clone(), n.to_string(), job.backend.clone());
        self.spawn_for(n, async move {
            let ev = match run_start(job).await {
                Ok(handle) => Event::Started {
                    name,
                    generation,
                    backend,
                    handle,
                    fallback,
                },
                Err(why) => Event::Module(name, Input::StartFailed { generation, why }),
            };
            let _ = tx.send(ev);
        });
    }

    fn stop(&mut self, n: &str, generation: u64) {
        let Some(s) = self.slots.get(n) else { return };
        let Some(r) = s.run.as_ref().filter(|r| r.generation == generation) else {
            return;
        };
        let fut = r.backend.stop(&r.handle, s.lc.module().stop_timeout);
        // Not owned by the module: a stop must finish even if the module is removed meanwhile.
        tokio::spawn(fut);
    }

    fn start_probe(&mut self, n: &str, generation: u64) {
        let Some(s) = self.slots.get(n) else { return };
        let h = s.lc.module().health.clone();
        let Some(p) = h.probe else { return };
        // An exec probe of a container runs inside it (the engine's exec API), never here.
        let Some(run) = s.run.as_ref().filter(|r| r.generation == generation) else {
            return;
        };
        let (b, rh) = (run.backend.clone(), run.handle.clone());
        let back = self.back(n);
        let (tx, name) = (self.events.clone(), n.to_string());
        let task = tokio::spawn(async move {
            let timed = || {
                let (tx, name, p, b, rh) = (tx.clone(), name.clone(), &p, b.clone(), rh.clone());
                async move {
                    let t0 = std::time::Instant::now();
                    let r = crate::runtime::probe(&*b, &rh, p, h.timeout).await;
                    let seconds = t0.elapsed().as_secs_f64();
                    let _ = tx.send(Event::ProbeTimed {
                        name,
                        seconds,
                        ok: r.ok,
                    });
                    r
                }
            };
            let report = |result| {
                back(Input::Probe { generation, result });
                true
            };
            health::probe_loop(timed, h.interval, report).await;
        });
        if let Some(s) = self.slots.get_mut(n)
            && let Some(old) = s.probe.replace(task.abort_handle())
        {
            old.abort();
        }
    }

    fn arm(&mut self, n: &str, timer: Timer, after: Duration) {
        let back = self.back(n);
        self.spawn_for(n, async move {
            tokio::time::sleep(after).await;
            back(Input::Timer(timer));
        });
    }

    fn step(&self, n: &str, model: &std::path::Path, step: &str, detail: &str) {
        let model_s = model.display().to_string();
        tracing::info!(
            modvisor_module = n,
            message_id = MSG_MODEL_ACTIVATION,
            modvisor_model = %model_s,
            modvisor_step = step,
            "{n}: model activation {step}: {model_s}{}{detail}",
            if detail.is_empty() { "" } else { ": " }
        );
        let detail = crate::bounded::cap_for_dbus(detail);
        let step = (n.to_string(), model_s, step.to_string(), detail);
        let _ = self.signals.send(super::ManagerSignal::Activation(step));
    }

    fn validate_model(&mut self, n: &str, requested: String) {
        let Some(s) = self.slots.get(n) else { return };
        let m = s.lc.module().clone();
        let mode = s.decision.mode.unwrap_or(Mode::Native);
        // A store reference (ollama:NAME:TAG, hf:ORG/REPO@REV:FILE) becomes its file first.
        let engine = crate::store::compat::engine_of(s.lc.module());
        let store = self.cfg.models_store();
        // The GPUs NVML showed at the last sample (none: no NVML, or no device).
        let has_gpu = !self.gpus.is_empty();
        let back = self.back(n);
        self.spawn_for(n, async move {
            let r = tokio::task::spawn_blocking(move || {
                let requested = crate::store::compat::resolve_for(&store, engine, requested)?;
                let model = crate::model::validate(m.model.as_ref(), &requested)?;
                crate::store::compat::check_gpu(engine, &model, has_gpu)?;
                // A root engine only loads what no other user can change.
                ModelCheck::of(&m, mode, Some(model.clone())).run()?;
                Ok(model)
            })
            .await
            .unwrap_or_else(|e| Err(format!("validation did not finish: {e}")));
            back(Input::ModelValidated(r));
        });
    }

    fn record_model(&mut self, n: &str, model: PathBuf, previous: Option<PathBuf>) {
        let dir = self.state_dir(n);
        let back = self.back(n);
        let name = n.to_string();
        self.spawn_for(n, async move {
            let r = tokio::task::spawn_blocking(move || {
                crate::model::record(&dir, &model, previous.as_deref()).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("recording did not finish: {e}")));
            if let Err(e) = &r {
                tracing::error!(modvisor_module = %name, "cannot record the active model: {e}");
            }
            back(Input::ModelRecorded(r));
        });
    }

    /// The engine's last error line: from its output (container logs may still be on their
    /// way: look again shortly), else from the journal (a unit writes there directly).
    fn lookup_engine_line(&mut self, n: &str) {
        let Some(s) = self.slots.get(n) else { return };
        let sink = s.sink.clone();
        let unit = Some(s.last_unit.clone()).filter(|u| u.ends_with(".service"));
        let back = self.back(n);
        self.spawn_for(n, async move {
            let from_output = || {
                sink.as_ref()
                    .and_then(|s| crate::model::last_error_line(&s.recent()))
            };
            let mut line = from_output();
            if line.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                line = from_output();
            }
            if line.is_none()
                && let Some(u) = unit
            {
                line = crate::journal::unit_error_line(&u).await;
            }
            back(Input::EngineLine(line));
        });
    }
}

/// What a start takes to the blocking pool. Boxed: the task that carries it holds a pointer
/// until it is done, and the task's memory (kept while the module holds its abort handle) is
/// a few words, not the request.
struct StartJob {
    backend: Arc<dyn Backend>,
    req: RunRequest,
    events: tokio::sync::mpsc::UnboundedSender<crate::runtime::RuntimeEvent>,
    state_dir: PathBuf,
    check: ModelCheck,
}

/// Creates the module's state directory and starts the backend, off the actor (a start may
/// fork, look up the port it will listen on, or talk to systemd).
async fn run_start(job: Box<StartJob>) -> Result<crate::runtime::RunHandle, String> {
    tokio::task::spawn_blocking(move || {
        let StartJob {
            backend,
            req,
            events,
            state_dir,
            check,
        } = *job;
        // The model is checked again before every start: a member may have swapped it.
        check.run()?;
        // Looked at first: `mkdir` takes the parent directory's lock even when the directory
        // exists, and hundreds of starts at once queued on it.
        if !state_dir.is_dir()
            && let Err(err) = std::fs::create_dir_all(&state_dir)
        {
            tracing::warn!(modvisor_module = %req.name, "cannot create {}: {err}", state_dir.display());
        }
        backend.start(req, events).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the start did not finish: {e}")))
}

/// The model check before a start or an activation (`model::check_for_start`): the engine
/// counts as root only for a native command whose manifest says `user = "root"`.
pub(super) struct ModelCheck {
    spec: Option<crate::manifest::ModelSpec>,
    model: Option<PathBuf>,
    root: bool,
}

impl ModelCheck {
    pub(super) fn of(m: &crate::manifest::Module, mode: Mode, model: Option<PathBuf>) -> Self {
        use crate::manifest::NativeExec;
        let root = mode == Mode::Native
            && matches!(&m.native, Some(NativeExec::Command { privileges, .. }) if privileges.runs_as_root());
        ModelCheck {
            spec: m.model.clone(),
            model,
            root,
        }
    }

    /// Blocking (it opens and stats the model): call off the actor.
    pub(super) fn run(&self) -> Result<(), String> {
        match &self.model {
            Some(m) => crate::model::check_for_start(self.spec.as_ref(), m, self.root),
            None => Ok(()),
        }
    }
}
