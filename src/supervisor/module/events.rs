//! The lifecycle's handling of what the run does: started, progressed, probed, exited, timers.

use super::*;

impl Lifecycle {
    /// A new run: the actor decides the mode, renders and starts it, then answers Started or
    /// StartFailed.
    pub(super) fn start(&mut self, _now: Now, fx: &mut Fx) {
        self.generation += 1;
        let g = self.generation;
        self.phase = Phase::Up(Run::new(g, &self.module.health));
        if let Some(a) = self.activation.as_mut()
            && a.generation == 0
        {
            a.generation = g;
        }
        fx.push(Effect::Start {
            generation: g,
            model: self.active_model.clone(),
        });
        self.set(State::Starting, Health::Unknown, "starting".into());
    }

    pub(super) fn on_started(&mut self, s: Started, now: Now, fx: &mut Fx) {
        let has_probe = self.module.health.probe.is_some();
        let (health, restarts) = (self.module.health.clone(), self.restarts);
        let start_limit = self.module.health.start_limit;
        let shutting_down = self.shutting_down;
        let Some(run) = self.run_mut(s.generation) else {
            return;
        };
        run.started = true;
        // The backend may have reported the PID already (a direct child prepared off the
        // actor sends it as progress, which can arrive before this answer): keep it.
        if s.main_pid != 0 {
            run.main_pid = s.main_pid;
        }
        run.unit = s.unit;
        run.restarts_itself = s.restarts_itself;
        run.survives = s.survives;
        run.fallback = s.fallback;
        let g = run.generation;
        if shutting_down && run.survives {
            fx.push(Effect::Detach { generation: g });
            self.phase = Phase::Down;
            return;
        }
        if run.stopping.is_some() {
            // Asked to stop before the backend answered: now it can be.
            let pid = run.main_pid;
            fx.push(Effect::Stop { generation: g });
            self.set(
                State::Stopping,
                Health::Offline,
                format!("stopping (pid {pid})"),
            );
            return;
        }
        // A unit or container whose backend reported it before answering the start (an adopted
        // container is running at once) shows what was reported, not "starting" again.
        let reported = match run.last_phase.clone() {
            Some(p) if run.survives => run.progress_shown(&p, restarts, &health),
            _ => None,
        };
        self.shown = reported.unwrap_or_else(|| run.started_shown(has_probe));
        self.arm_idle(now, fx);
        if has_probe {
            fx.push(Effect::StartProbe { generation: g });
            fx.push(Effect::Arm {
                timer: Timer::StartLimit(g),
                after: start_limit,
            });
            self.progressed(g, fx);
        }
        for w in self.start_waiters.drain(..) {
            fx.push(Effect::Reply(w, Ok(())));
        }
    }

    pub(super) fn on_start_failed(&mut self, generation: u64, why: String, now: Now, fx: &mut Fx) {
        let Some(run) = self.run_mut(generation) else {
            return;
        };
        let then = run.stopping;
        self.phase = Phase::Down;
        // Stopped before it started (waiting for admission, say): the stop wins, no failure.
        if then == Some(Stopping::Asked(Then::Nothing)) {
            self.stopped_for_good();
        } else {
            self.set(State::Failed, Health::Offline, why.clone());
        }
        for w in self.start_waiters.drain(..) {
            fx.push(Effect::Reply(w, Err(OpError::Failed(why.clone()))));
        }
        for w in self.stop_waiters.drain(..) {
            fx.push(Effect::Reply(w, Ok(())));
        }
        if then == Some(Stopping::Asked(Then::Remove)) {
            fx.push(Effect::Removed);
            return;
        }
        self.activation_failed(generation, &why, now, fx);
    }

    pub(super) fn on_progress(
        &mut self,
        generation: u64,
        main_pid: u32,
        restarts: Option<u32>,
        phase: RunPhase,
        now: Now,
        fx: &mut Fx,
    ) {
        if phase == RunPhase::Ended {
            // The final counters of a run: its Exited follows.
            if let (Some(r), Some(_)) = (restarts, self.run_mut(generation)) {
                self.restarts = r;
            }
            return;
        }
        let activating = self.activation.is_some();
        let Phase::Up(run) = &mut self.phase else {
            return;
        };
        if run.generation != generation || run.stopping.is_some() {
            return;
        }
        run.main_pid = main_pid;
        run.last_phase = Some(phase.clone());
        if let Some(r) = restarts {
            self.restarts = r;
        }
        if let RunPhase::Restarting(info) = &phase
            && activating
        {
            // systemd restarts the engine on the model being activated: that is a failure.
            let why = format!("pid {} exited: {info}", run.main_pid);
            self.activation_failed(generation, &why, now, fx);
            return;
        }
        if let Some(shown) = run.progress_shown(&phase, self.restarts, &self.module.health) {
            self.shown = shown;
        }
    }

    pub(super) fn on_probe(&mut self, generation: u64, result: ProbeResult, fx: &mut Fx) {
        let failures = self.module.health.failures;
        let current = self.shown.clone();
        let Some(run) = self.run_mut(generation) else {
            return;
        };
        // A unit or container is not online before its backend has said it runs (and which
        // process it is): an answer on its port could still come from something else.
        if run.stopping.is_some() || !run.started || run.main_pid == 0 {
            return;
        }
        let in_start = run.hysteresis.verdict().is_none();
        let changed = run.last_detail != result.detail;
        run.last_detail.clone_from(&result.detail);
        if let Some(shown) = run.probe_shown(&result, &current, failures) {
            self.shown = shown;
        }
        if in_start && changed {
            self.progressed(generation, fx);
        }
    }

    /// A start shows progress (or just began): start_timeout is armed again. Returns whether
    /// the run is in its start phase (and so whether this counted).
    pub(super) fn progressed(&mut self, generation: u64, fx: &mut Fx) -> bool {
        let after = self.module.health.start_timeout;
        let starting = self.shown.0 == State::Starting && self.module.health.probe.is_some();
        self.timers += 1;
        let token = self.timers;
        let Some(run) = self.run_mut(generation) else {
            return false;
        };
        if !starting || !run.started || run.stopping.is_some() || run.hysteresis.verdict().is_some()
        {
            return false;
        }
        run.start_token = token;
        fx.push(Effect::Arm {
            timer: Timer::StartTimeout(token),
            after,
        });
        true
    }

    pub(super) fn on_timer(&mut self, t: Timer, now: Now, fx: &mut Fx) {
        match t {
            Timer::RestartDue(token) => {
                if matches!(self.phase, Phase::RestartWait { token: w } if w == token) {
                    self.start(now, fx);
                }
            }
            Timer::StartTimeout(token) => {
                let g = self.running().unwrap_or(0);
                if self.run().is_some_and(|r| r.start_token == token) {
                    self.start_timed_out(g, false, fx);
                }
            }
            Timer::StartLimit(g) => self.start_timed_out(g, true, fx),
            Timer::IdleStop(token) => self.idle_timer(token, now, fx),
        }
    }

    /// No successful probe in time: the run is stopped and its exit goes through the policy.
    fn start_timed_out(&mut self, g: u64, limit: bool, fx: &mut Fx) {
        let starting = self.shown.0 == State::Starting;
        let Some(run) = self.run_mut(g) else { return };
        if !starting || run.stopping.is_some() || !run.started {
            return;
        }
        run.stopping = Some(Stopping::StartTimeout { limit });
        fx.push(Effect::StopProbe);
        fx.push(Effect::Stop { generation: g });
    }

    pub(super) fn on_exited(&mut self, e: Exit, now: Now, fx: &mut Fx) {
        let Some(run) = self.run_mut(e.generation).cloned() else {
            return;
        };
        self.phase = Phase::Down;
        fx.push(Effect::StopProbe);
        let line = e.line.as_deref();
        match run.stopping {
            Some(Stopping::Asked(then)) => self.stopped(then, &e.info, now, fx),
            Some(Stopping::StartTimeout { limit }) => {
                self.ended(&run, &e.info, Some(limit), None, now, fx)
            }
            None => self.ended(&run, &e.info, None, line, now, fx),
        }
    }

    /// The engine's error line for a run that ended on its own, looked up after the decision
    /// (it was not in the output modvisord keeps): added to the reason, unless the module has
    /// moved on (started again, or was stopped) meanwhile. A line that names a configuration
    /// error cancels the pending restart.
    pub(super) fn failed_start_line(&mut self, line: Option<String>, fx: &mut Fx) {
        let Some((g, what)) = self.line_for.take() else {
            return;
        };
        let Some(l) = line else { return };
        let waiting = matches!(self.phase, Phase::RestartWait { token } if token == g + 1);
        let same = waiting || matches!(self.phase, Phase::Down if self.generation == g);
        if !same
            || !matches!(
                self.shown.0,
                State::Failed | State::Starting | State::Inactive
            )
        {
            return;
        }
        let class = failure::classify(&ExitInfo::Other(String::new()), Some(&l));
        if let (true, failure::Class::Config(hint)) = (waiting, class) {
            // The restart is not started: its due timer finds the module down and is stale.
            self.phase = Phase::Down;
            let l = failure::short_line(&l);
            let why = format!("{what}: {l}; a configuration error, not restarted: {hint}");
            self.set(
                State::Failed,
                Health::Offline,
                crate::bounded::cap_for_dbus(&why),
            );
            return;
        }
        self.shown.2 =
            crate::bounded::cap_for_dbus(&format!("{}; the engine said: {l}", self.shown.2));
        // The state is the same; the reason is news (a ModuleChanged and a journal line).
        let (health, reason) = self.effective();
        fx.push(Effect::Changed {
            state: self.shown.0,
            health,
            reason: reason.to_string(),
        });
    }

    /// The run ended because it was asked to.
    fn stopped(&mut self, then: Then, info: &ExitInfo, now: Now, fx: &mut Fx) {
        for w in self.stop_waiters.drain(..) {
            fx.push(Effect::Reply(w, Ok(())));
        }
        match then {
            Then::Remove => self.removed(fx),
            Then::Start => {
                self.set(
                    State::Inactive,
                    Health::Offline,
                    format!("stopped ({info}), restarting"),
                );
                self.start(now, fx);
            }
            Then::Nothing => self.stopped_for_good(),
        }
    }

    /// The run ended on its own (or never became healthy): activation or restart policy.
    fn ended(
        &mut self,
        run: &Run,
        info: &ExitInfo,
        timed_out: Option<bool>,
        line: Option<&str>,
        now: Now,
        fx: &mut Fx,
    ) {
        let what = self.what_ended(run, info, timed_out, line);
        if self.activation.is_some() {
            // The engine died on the model being activated (or on the rollback): the
            // transaction decides, not the restart policy.
            self.set(State::Inactive, Health::Offline, what.clone());
            self.activation_failed(run.generation, &what, now, fx);
            return;
        }
        // It exited on its own (a model it cannot load, a crash) and what the engine said last
        // is not known yet: it goes into the reason once found.
        if timed_out.is_none() && line.is_none() {
            self.line_for = Some((run.generation, what.clone()));
            fx.push(Effect::LookupEngineLine);
        }
        let ended = restart::Ended {
            info,
            what: &what,
            timed_out: timed_out.is_some(),
            by_backend: run.restarts_itself,
            restarts: self.restarts,
            line,
        };
        match restart::after_exit(&self.module.restart, &mut self.budget, &ended, now.mono) {
            AfterExit::Stay(state, why) => self.set(state, Health::Offline, why),
            AfterExit::Restart { delay, reason } => {
                self.restarts += 1;
                self.generation += 1;
                let token = self.generation;
                self.phase = Phase::RestartWait { token };
                fx.push(Effect::Arm {
                    timer: Timer::RestartDue(token),
                    after: delay,
                });
                self.set(State::Starting, Health::Offline, reason);
            }
        }
    }

    /// How a run ended, in words: "pid 42 exited: exit-code 127: LINE", "not started: …".
    fn what_ended(
        &self,
        run: &Run,
        info: &ExitInfo,
        timed_out: Option<bool>,
        line: Option<&str>,
    ) -> String {
        let h = &self.module.health;
        let what = if timed_out == Some(true) {
            let lim = h.start_limit;
            format!("no successful health probe within start_limit ({lim:?}), progress or not")
        } else if timed_out == Some(false) {
            let st = h.start_timeout;
            format!(
                "no successful health probe within start_timeout ({st:?}) and no progress meanwhile"
            )
        } else if matches!(info, ExitInfo::Refused(_)) {
            format!("not started: {info}")
        } else if run.main_pid > 0 {
            format!("pid {} exited: {info}", run.main_pid)
        } else {
            format!("the engine exited: {info}")
        };
        match line {
            Some(l) => format!("{what}: {}", failure::short_line(l)),
            None => what,
        }
    }
}
