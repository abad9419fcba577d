//! The actor's side of commands and reloads: replies are registered, inputs fed to machines.

use tokio::sync::{oneshot, watch};

use super::module::{Input, Lifecycle, Now};
use super::reconcile::{self, Change};
use super::table::{Event, Slot, Supervisor};
use super::{Command, OpError};
use crate::manifest::{self, LoadResult, Mode, Module};
use crate::supervisor::MSG_MANIFEST_ERROR;

impl Supervisor {
    pub(super) fn command(&mut self, c: Command) {
        match c {
            Command::Start(n, r) => self.module_command(&n, r, Input::Start),
            Command::Stop(n, r) => self.module_command(&n, r, Input::Stop),
            Command::Restart(n, r) => self.checked_restart(n, r),
            Command::ActivateModel(n, model, r) => {
                self.module_command(&n, r, |reply| Input::ActivateModel {
                    reply,
                    requested: model,
                })
            }
            Command::Reload(r) => self.request_scan(r),
            Command::SetModeOverride(n, mode, r) => {
                let _ = r.send(self.set_override(&n, &mode));
            }
            Command::Explain(n, r) => {
                let _ = r.send(self.explain(&n));
            }
            Command::Output {
                name,
                after,
                max,
                reply,
            } => {
                let out = match self.slots.get(&name) {
                    None => Err(Self::no_such(&name)),
                    Some(s) => Ok(s
                        .sink
                        .as_ref()
                        .map_or((0, Vec::new()), |k| k.recent_after(after, max))),
                };
                let _ = reply.send(out);
            }
            Command::Ping(r) => {
                let _ = r.send(());
            }
            Command::Shutdown(_) => {}
        }
    }

    /// A restart runs the engine on its model again: a model swapped since its activation is
    /// refused before anything is stopped (the check is blocking I/O: off the actor).
    fn checked_restart(&mut self, n: String, r: super::Reply<()>) {
        let Some(s) = self.slots.get(&n) else {
            let _ = r.send(Err(Self::no_such(&n)));
            return;
        };
        if s.lc.activating() {
            return self.module_command(&n, r, Input::Restart);
        }
        let mode = s.decision.mode.unwrap_or(Mode::Native);
        let model = s.lc.active_model().cloned();
        let check = super::effects::ModelCheck::of(s.lc.module(), mode, model);
        let tx = self.events.clone();
        self.tasks.spawn(async move {
            let refused = tokio::task::spawn_blocking(move || check.run().err())
                .await
                .unwrap_or_else(|e| Some(format!("the model check did not finish: {e}")));
            let _ = tx.send(Event::RestartChecked {
                name: n,
                reply: r,
                refused,
            });
        });
    }

    pub(super) fn module_command(
        &mut self,
        n: &str,
        r: super::Reply<()>,
        input: impl FnOnce(super::ReplyId) -> Input,
    ) {
        if !self.slots.contains_key(n) {
            let _ = r.send(Err(Self::no_such(n)));
            return;
        }
        let id = self.reply_id(r);
        self.feed(n, input(id));
    }

    fn set_override(&mut self, n: &str, mode: &str) -> Result<(), OpError> {
        let new = match mode {
            "" => None,
            m => Some(Mode::parse(m).ok_or_else(|| {
                OpError::InvalidArgument(format!(
                    "invalid mode \"{m}\": expected \"native\", \"container\" or \"\" to clear"
                ))
            })?),
        };
        let host = self.host();
        let Some(s) = self.slots.get(n) else {
            return Err(Self::no_such(n));
        };
        if s.lc.activating() {
            return Err(OpError::Busy(format!(
                "a model activation of {n} is in progress"
            )));
        }
        if let Some(m) = new {
            let avail = crate::host::availability(&host, s.lc.module());
            crate::policy::possible(s.lc.module(), &self.cfg.policy, &avail, m)
                .map_err(|why| OpError::NotAllowed(format!("cannot run {n} as {m}: {why}")))?;
        }
        let old_mode = s.decision.mode;
        let running = s.lc.running().is_some();
        let mut decision = None;
        if let Some(s) = self.slots.get_mut(n) {
            s.override_mode = new;
        }
        if let Some(s) = self.slots.get(n) {
            decision = Some(self.decide(s));
        }
        let changed = decision.as_ref().is_some_and(|d| d.mode != old_mode);
        if let (Some(s), Some(d)) = (self.slots.get_mut(n), decision) {
            s.decision = d;
        }
        if changed && running {
            self.feed(n, Input::Respawn);
        }
        Ok(())
    }

    /// Rescans the manifests off the actor (a scan reads every file); the reply waits for the
    /// scan that started after it was asked, so it sees what was on disk then.
    fn request_scan(&mut self, r: oneshot::Sender<Vec<(String, String)>>) {
        self.scan.next.push(r);
        if !self.scan.running {
            self.start_scan();
        }
    }

    fn start_scan(&mut self) {
        self.scan.running = true;
        self.scan.current = std::mem::take(&mut self.scan.next);
        let dirs = self.cfg.modules.clone();
        let rules = self.cfg.containment.clone();
        let check = self.trust_check();
        let tx = self.events.clone();
        self.tasks.spawn_blocking(move || {
            let res = manifest::load_dirs_with(&dirs, check, &rules);
            let _ = tx.send(Event::Scanned(Box::new(res)));
        });
    }

    pub(super) fn scanned(&mut self, res: LoadResult) {
        let errs = self.apply(res);
        for r in std::mem::take(&mut self.scan.current) {
            let _ = r.send(errs.clone());
        }
        self.scan.running = false;
        if !self.scan.next.is_empty() {
            self.start_scan();
        }
    }

    /// In system mode (running as root) a manifest anyone else can change is refused.
    fn trust_check(&self) -> bool {
        self.cfg.manifest_trust_check && nix::unistd::geteuid().is_root()
    }

    /// The first scan, before the loop runs (the daemon says READY=1 after it).
    pub(super) fn reload(&mut self) -> Vec<(String, String)> {
        let res =
            manifest::load_dirs_with(&self.cfg.modules, self.trust_check(), &self.cfg.containment);
        self.apply(res)
    }

    /// Applies a scan: the difference to the table; returns the manifest errors.
    fn apply(&mut self, res: LoadResult) -> Vec<(String, String)> {
        for e in &res.errors {
            tracing::error!(message_id = MSG_MANIFEST_ERROR, "manifest error: {e}");
        }
        self.manifest_errors = res.errors.clone();
        let changes = reconcile::diff(self.slots.values().map(|s| s.lc.module()), &res);
        for change in changes {
            self.change(change);
        }
        self.stop_unclaimed(&res.broken_stems);
        self.manifest_errors
            .iter()
            .map(|e| (e.path.display().to_string(), e.to_string()))
            .collect()
    }

    fn change(&mut self, change: Change) {
        match change {
            Change::Remove(n) => {
                tracing::info!(modvisor_module = %n, "manifest removed: stopping {n}");
                self.feed(&n, Input::Remove);
            }
            Change::Add(m) => self.add(m),
            Change::Update { module, respawn } => {
                let n = module.name.clone();
                let relisten = self.slots.get(&n).is_some_and(|s| {
                    s.lc.module().serve.as_ref().map(|v| &v.listen)
                        != module.serve.as_ref().map(|v| &v.listen)
                });
                if respawn {
                    tracing::info!(modvisor_module = %n, "manifest changed what {n} runs: restarting");
                }
                let input = Input::Reconfigure {
                    module: Box::new(module),
                    respawn,
                };
                self.feed(&n, input);
                if relisten {
                    self.listen(&n);
                }
                if let Some(s) = self.slots.get(&n) {
                    let d = self.decide(s);
                    if let Some(s) = self.slots.get_mut(&n) {
                        s.decision = d;
                    }
                }
            }
        }
    }

    fn add(&mut self, module: Module) {
        let name = module.name.clone();
        let active = read_active_model(&self.state_dir(&name), &module);
        let found = self.existing.remove(&name).unwrap_or_default();
        // A run left by an earlier modvisord is adopted whatever `enabled` says.
        // An on-demand module waits for its first connection.
        let on_demand = module.serve.as_ref().is_some_and(|s| s.on_demand);
        let boot = (module.enabled && !on_demand) || found.iter().any(|(_, o)| o.running);
        let mut slot = Slot {
            lc: Lifecycle::new(module, active, Now::current()),
            override_mode: None,
            decision: crate::policy::Decision {
                mode: None,
                reason: String::new(),
                fallback: false,
            },
            run: None,
            probe: None,
            tasks: Vec::new(),
            sink: None,
            output_start: 0,
            output_seen: 0,
            early_container_id: None,
            last_unit: String::new(),
            usage: Default::default(),
            found,
            counters: Default::default(),
            start_at: None,
            gate: watch::channel(crate::proxy::Gate::Wait).0,
            listener: Vec::new(),
            listening: Vec::new(),
            open: None,
            adm: super::admission_slot::AdmissionSlot::load(&self.state_dir(&name)),
        };
        slot.decision = self.decide(&slot);
        self.slots.insert(name.clone(), slot);
        self.listen(&name);
        if boot {
            self.feed(&name, Input::Boot);
        }
    }

    /// (Re)binds a module's listen addresses ([serve]); the proxy reports back as inputs.
    fn listen(&mut self, name: &str) {
        let events = self.events.clone();
        let Some(s) = self.slots.get_mut(name) else {
            return;
        };
        for t in s.listener.drain(..) {
            t.abort();
        }
        s.open = None;
        let now: Vec<crate::manifest::ServeAddr> =
            s.lc.module()
                .serve
                .as_ref()
                .map_or_else(Vec::new, |v| v.listen.clone());
        for gone in s.listening.iter().filter(|a| !now.contains(a)) {
            crate::fdstore::release(gone);
        }
        s.listening = now;
        let Some(spec) = s.lc.module().serve.clone() else {
            return;
        };
        let n = name.to_string();
        let report: crate::proxy::Report = std::sync::Arc::new(move |ev| {
            let input = match ev {
                crate::proxy::ProxyEvent::Demand(peer) => Input::Demand { peer },
                crate::proxy::ProxyEvent::Connections(c) => Input::Connections(c),
            };
            let _ = events.send(Event::Module(n.clone(), input));
        });
        let hold = s.lc.module().health.start_limit;
        match crate::proxy::listen(&spec, s.gate.subscribe(), report, hold) {
            Ok(l) => {
                s.listener = l.tasks;
                s.open = Some(l.open);
            }
            Err(why) => tracing::error!(modvisor_module = name, "{why}"),
        }
    }

    /// Runs of ours that no manifest (valid or broken) claims any more are stopped, once.
    fn stop_unclaimed(&mut self, broken: &std::collections::BTreeSet<String>) {
        let claimed = self
            .slots
            .values()
            .flat_map(|s| s.listening.iter().cloned())
            .collect();
        crate::fdstore::release_unclaimed(&claimed);
        let existing = std::mem::take(&mut self.existing);
        for (name, found) in existing {
            if self.slots.contains_key(&name) || broken.contains(&name) {
                continue;
            }
            for (b, o) in found {
                tracing::info!(modvisor_module = %name, "stopping {} of a module with no manifest", o.id);
                self.tasks.spawn(b.stop_unit(&o.id));
            }
        }
    }
}

/// The active model recorded in the state directory (when still inside `model.directory`),
/// else the manifest's default.
fn read_active_model(state_dir: &std::path::Path, m: &Module) -> Option<std::path::PathBuf> {
    let recorded = std::fs::read_to_string(state_dir.join("active-model")).ok();
    let dir = m.model.as_ref().and_then(|mm| mm.directory.as_ref());
    let recorded = recorded
        .map(|s| std::path::PathBuf::from(s.trim()))
        .filter(|p| {
            dir.is_some_and(|d| {
                p.starts_with(d) || std::fs::canonicalize(d).is_ok_and(|c| p.starts_with(c))
            })
        });
    recorded.or_else(|| m.model.as_ref().and_then(|mm| mm.default.clone()))
}
