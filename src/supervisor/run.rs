//! One run of a module as the lifecycle sees it, and what its backend's progress and its
//! probe results mean for the published state (pure).

use crate::health::{Hysteresis, ProbeResult};
use crate::manifest::HealthSpec;
use crate::runtime::RunPhase;
use crate::state::{Health, State};

/// Why a run is being stopped, and what comes after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    /// Asked (a user, a reload, a removal): then do `Then`.
    Asked(Then),
    /// It never became healthy: start_timeout passed without progress, or start_limit
    /// (`limit`) passed whatever the progress. The restart policy decides.
    StartTimeout { limit: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Nothing,
    Start,
    Remove,
}

#[derive(Debug, Clone)]
pub struct Run {
    pub generation: u64,
    /// The backend has answered the start (pid/unit known, the run can be stopped).
    pub started: bool,
    pub restarts_itself: bool,
    pub survives: bool,
    /// Running in a fallback mode: the policy's reason.
    pub fallback: Option<String>,
    pub main_pid: u32,
    pub unit: String,
    pub hysteresis: Hysteresis,
    pub stopping: Option<Stopping>,
    /// The armed start_timeout (re-armed on every sign of progress).
    pub start_token: u64,
    /// The probe's last answer in the start phase (a change is progress).
    pub last_detail: String,
    /// What the backend last reported of the run; it may report before it answers the start
    /// (an adopted container is running at once).
    pub last_phase: Option<RunPhase>,
}

/// The published triple.
pub type Shown = (State, Health, String);

impl Run {
    pub fn new(generation: u64, health: &HealthSpec) -> Self {
        Run {
            generation,
            started: false,
            restarts_itself: false,
            survives: false,
            fallback: None,
            main_pid: 0,
            unit: String::new(),
            hysteresis: Hysteresis::new(health.failures, health.successes),
            stopping: None,
            start_token: 0,
            last_detail: String::new(),
            last_phase: None,
        }
    }

    /// Right after the backend started it.
    pub fn started_shown(&self, has_probe: bool) -> Shown {
        let pid = self.main_pid;
        if pid == 0 && !self.survives {
            // The backend prepares the process off the actor; its PID follows as progress.
            (State::Starting, Health::Unknown, "starting".into())
        } else if self.survives {
            (
                State::Starting,
                Health::Unknown,
                format!("starting {}", self.unit),
            )
        } else if has_probe {
            (
                State::Starting,
                Health::Unknown,
                format!("started (pid {pid}), waiting for the health probe"),
            )
        } else {
            self.no_probe_shown()
        }
    }

    fn no_probe_shown(&self) -> Shown {
        let pid = self.main_pid;
        match &self.fallback {
            Some(f) => (
                State::Running,
                Health::Degraded,
                format!("running (pid {pid}) in fallback mode: {f}"),
            ),
            None => (
                State::Running,
                Health::Online,
                format!("running (pid {pid}), no health probe configured"),
            ),
        }
    }

    /// The backend's progress (systemd units, containers); None: nothing to show.
    pub fn progress_shown(
        &mut self,
        phase: &RunPhase,
        restarts: u32,
        health: &HealthSpec,
    ) -> Option<Shown> {
        let unit = &self.unit;
        Some(match phase {
            RunPhase::Restarting(info) => {
                // A new process: its health starts from scratch.
                self.hysteresis = Hysteresis::new(health.failures, health.successes);
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
            RunPhase::Running => match self.hysteresis.verdict() {
                _ if health.probe.is_none() => self.no_probe_shown(),
                None => (
                    State::Starting,
                    Health::Unknown,
                    format!(
                        "running (pid {}), waiting for the health probe",
                        self.main_pid
                    ),
                ),
                // The probe's verdict stands; only the PID may have changed.
                Some(_) => return None,
            },
        })
    }

    /// One probe result; None: nothing changes (a steady state is not republished).
    pub fn probe_shown(
        &mut self,
        result: &ProbeResult,
        current: &Shown,
        failures: u32,
    ) -> Option<Shown> {
        let verdict = self.hysteresis.feed(result.ok);
        let bad = self.hysteresis.bad_streak();
        let shown = match verdict {
            // Still in the start phase: failures do not count, only start_timeout ends it.
            None => {
                let what = if result.loading {
                    "loading"
                } else {
                    "waiting for the health probe"
                };
                let why = format!(
                    "starting (pid {}), {what}: {}",
                    self.main_pid, result.detail
                );
                (State::Starting, Health::Unknown, why)
            }
            Some(true) => match &self.fallback {
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
        let (state, health, _) = current;
        // Keep the reason of a healthy module stable (do not republish every probe), and of
        // a module that is already known to fail.
        let same = shown.0 == *state && shown.1 == *health;
        if (same && result.ok) || (same && shown.1 == Health::Offline && bad > failures) {
            return None;
        }
        Some(shown)
    }
}
