//! The lifecycle's side of `[serve]`: start on demand, stop when idle.

use super::*;

/// MESSAGE_IDs of the journal entries.
pub const MSG_ON_DEMAND: &str = "b1c2d3e4f5061728394a5b6c7d8e9f01";
pub const MSG_IDLE_STOP: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
pub const MSG_EVICTED: &str = "4d5e6f708192a3b4c5d6e7f8091a2b3c";

impl Lifecycle {
    /// A connection while the engine does not serve: start it if it starts on demand (or was
    /// stopped for being idle), else nothing (the proxy closes the connection).
    pub(super) fn on_demand(&mut self, peer: String, now: Now, fx: &mut Fx) {
        let Some(serve) = self.module.serve.clone() else {
            return;
        };
        let n = self.name.clone();
        let wakes = serve.on_demand || self.shown.1 == Health::Standby;
        match &mut self.phase {
            Phase::Down | Phase::RestartWait { .. } if wakes && self.activation.is_none() => {
                fx.push(Effect::Notice(
                    MSG_ON_DEMAND,
                    format!("starting {n} on demand: connection from {peer}"),
                ));
                self.start(now, fx);
            }
            // Being stopped for idleness: a new client wants it after all.
            Phase::Up(run) if self.quiet.is_some() => {
                run.stopping = Some(Stopping::Asked(Then::Start));
                self.quiet = None;
            }
            _ => {}
        }
    }

    pub(super) fn on_connections(&mut self, open: u32, now: Now, fx: &mut Fx) {
        self.connections = open;
        self.last_activity = now.wall;
        if open > 0 {
            self.timers += 1; // any armed idle stop is stale now
            self.idle_token = 0;
            self.idle_stop_at = None;
        } else {
            self.arm_idle(now, fx);
        }
    }

    /// With no connection open, a serving engine is stopped after `idle_stop`.
    pub(super) fn arm_idle(&mut self, now: Now, fx: &mut Fx) {
        let Some(after) = self.module.serve.as_ref().and_then(|s| s.idle_stop) else {
            return;
        };
        let serving = matches!(&self.phase, Phase::Up(r) if r.started && r.stopping.is_none());
        if !serving || self.connections > 0 {
            return;
        }
        self.timers += 1;
        self.idle_token = self.timers;
        self.idle_stop_at = Some(now.wall + after);
        fx.push(Effect::Arm {
            timer: Timer::IdleStop(self.idle_token),
            after,
        });
    }

    pub(super) fn idle_timer(&mut self, token: u64, _now: Now, fx: &mut Fx) {
        if token != self.idle_token || self.connections > 0 || self.activation.is_some() {
            return;
        }
        let Phase::Up(mut run) = std::mem::replace(&mut self.phase, Phase::Down) else {
            return;
        };
        if run.stopping.is_none() {
            let after = self.module.serve.as_ref().and_then(|s| s.idle_stop);
            let n = &self.name;
            fx.push(Effect::Notice(
                MSG_IDLE_STOP,
                format!(
                    "stopping {n}: no connection for {:?}",
                    after.unwrap_or_default()
                ),
            ));
            self.quiet = Some(Quiet::Idle);
            self.begin_stop(&mut run, Then::Nothing, fx);
        }
        self.phase = Phase::Up(run);
    }

    /// Admission needs this module's memory for `by`: stopped like an idle stop (ready to
    /// start again on the next connection), unless it is no longer a candidate.
    pub(super) fn on_evict(&mut self, by: String, why: String, fx: &mut Fx) {
        if !self.serving() {
            return;
        }
        let Phase::Up(mut run) = std::mem::replace(&mut self.phase, Phase::Down) else {
            return;
        };
        let n = &self.name;
        fx.push(Effect::Notice(
            MSG_EVICTED,
            format!("evicting {n} to start {by}: {why}"),
        ));
        self.timers += 1; // an armed idle stop is stale now
        self.idle_token = 0;
        self.quiet = Some(Quiet::Evicted(by, why));
        self.begin_stop(&mut run, Then::Nothing, fx);
        self.phase = Phase::Up(run);
    }

    /// The run ended after a stop with nothing to follow: stopped, or in standby when a
    /// connection will start it again.
    pub(super) fn stopped_for_good(&mut self) {
        self.idle_stop_at = None;
        let quiet = self.quiet.take();
        let serve = self
            .module
            .serve
            .as_ref()
            .filter(|s| quiet.is_some() || s.on_demand);
        let what = match (&quiet, serve.and_then(|s| s.idle_stop)) {
            (Some(Quiet::Idle), Some(d)) => format!("stopped after {d:?} idle"),
            (Some(Quiet::Evicted(by, why)), _) => format!("evicted to start {by} ({why})"),
            _ => "stopped".to_string(),
        };
        match serve {
            Some(s) => {
                let listen = listen_list(s);
                let why = format!("{what}; starts on the next connection to {listen}");
                self.set(State::Inactive, Health::Standby, why);
            }
            None => self.set(State::Inactive, Health::Offline, what),
        }
    }

    /// What the proxy does with a connection now.
    pub fn gate(&self) -> crate::proxy::Gate {
        use crate::proxy::Gate;
        let (health, reason) = self.effective();
        match (&self.phase, self.shown.0) {
            (Phase::Up(_), State::Running)
                if matches!(health, Health::Online | Health::Degraded) =>
            {
                Gate::Open
            }
            (Phase::Up(r), _) => match r.stopping {
                Some(Stopping::Asked(Then::Nothing | Then::Remove)) if self.quiet.is_none() => {
                    Gate::Closed(reason.to_string())
                }
                _ => Gate::Wait,
            },
            (Phase::RestartWait { .. }, _) => Gate::Wait,
            (Phase::Down, _) if health == Health::Standby => Gate::Wait,
            (Phase::Down, _) => Gate::Closed(reason.to_string()),
        }
    }
}
