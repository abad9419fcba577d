//! The restart budget and the decision after a run ended on its own (pure): configuration
//! errors are never restarted; crashes and resource errors follow the policy, each restart
//! of a budget waiting twice as long as the one before (`delay` up to `max_delay`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::failure::{self, Class};
use crate::manifest::{RestartPolicy, RestartSpec};
use crate::runtime::ExitInfo;
use crate::state::State;

/// At most `max` restarts within a sliding `window`.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    max: u32,
    window: Duration,
    history: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(spec: &RestartSpec) -> Self {
        RestartBudget {
            max: spec.max,
            window: spec.window,
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

/// What becomes of a module whose run ended without being asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterExit {
    /// Left stopped: `Inactive` (a clean exit) or `Failed`.
    Stay(State, String),
    /// Started again after `delay` (the budget had room: this is restart `count`).
    Restart { delay: Duration, reason: String },
}

/// How the run ended, as the decision needs it.
pub struct Ended<'a> {
    pub info: &'a ExitInfo,
    /// "pid 42 exited: exit-code 1" or "no successful health probe within start_timeout (10s)".
    pub what: &'a str,
    /// modvisord ended it because it never became healthy.
    pub timed_out: bool,
    /// The backend applied the restart policy itself (systemd's Restart=): this is the end.
    pub by_backend: bool,
    /// Restarts so far (the backend's count when it restarts itself).
    pub restarts: u32,
    /// The engine's last error line, when known: it may name a configuration error.
    pub line: Option<&'a str>,
}

pub fn after_exit(
    spec: &RestartSpec,
    budget: &mut RestartBudget,
    ended: &Ended<'_>,
    now: Instant,
) -> AfterExit {
    let (max, window, policy) = (spec.max, spec.window, spec.policy.as_str());
    let limit = |what: &dyn std::fmt::Display| {
        AfterExit::Stay(
            State::Failed,
            format!(
                "{what}; restart limit reached ({max} restarts within {window:?}), left stopped"
            ),
        )
    };
    let class = match (ended.info.success(), ended.timed_out) {
        (true, false) => None,
        (_, true) => Some(Class::Crash),
        (false, false) => Some(failure::classify(ended.info, ended.line)),
    };
    if let Some(Class::Config(hint)) = class {
        return AfterExit::Stay(
            State::Failed,
            format!(
                "{}; a configuration error, not restarted: {hint}",
                ended.what
            ),
        );
    }
    if ended.by_backend && !ended.timed_out {
        return match ended.info {
            ExitInfo::StartLimitHit(last) => limit(last),
            i if i.success() => AfterExit::Stay(State::Inactive, format!("exited: {i}")),
            i if spec.policy != RestartPolicy::No && ended.restarts >= max => limit(i),
            i => AfterExit::Stay(
                State::Failed,
                format!("{i}; not restarted (restart.policy = {policy})"),
            ),
        };
    }
    let clean = ended.info.success() && !ended.timed_out;
    let want = match spec.policy {
        RestartPolicy::No => false,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Always => true,
    };
    if !want {
        let state = if clean {
            State::Inactive
        } else {
            State::Failed
        };
        return AfterExit::Stay(
            state,
            format!("{}; not restarted (restart.policy = {policy})", ended.what),
        );
    }
    match budget.try_take(now) {
        Some(count) => {
            let delay = failure::backoff(spec.delay, spec.max_delay, count);
            let kind = match class {
                Some(Class::Resource) => "out of memory (a resource error): ",
                _ => "",
            };
            AfterExit::Restart {
                delay,
                reason: format!(
                    "{}; {kind}restarting in {delay:?} (restart {count} of {max} within {window:?})",
                    ended.what
                ),
            }
        }
        None => limit(&ended.what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(policy: RestartPolicy, max: u32) -> RestartSpec {
        RestartSpec {
            policy,
            delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(60),
            max,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn budget_allows_max_within_window_then_refills() {
        let t0 = Instant::now();
        let mut b = RestartBudget::new(&spec(RestartPolicy::Always, 3));
        assert_eq!(b.try_take(t0), Some(1));
        assert_eq!(b.try_take(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(b.try_take(t0 + Duration::from_secs(20)), Some(3));
        assert_eq!(b.try_take(t0 + Duration::from_secs(30)), None);
        // The first restart leaves the window at t0+60s.
        assert_eq!(b.try_take(t0 + Duration::from_secs(60)), Some(3));
        assert_eq!(b.try_take(t0 + Duration::from_secs(61)), None);
        b.reset();
        assert_eq!(b.try_take(t0 + Duration::from_secs(62)), Some(1));
    }

    #[test]
    fn zero_max_never_restarts() {
        let mut b = RestartBudget::new(&spec(RestartPolicy::Always, 0));
        assert_eq!(b.try_take(Instant::now()), None);
    }

    /// (policy, exit, timed out, by backend, restarts so far) -> decision, as a table.
    #[test]
    fn decisions() {
        use AfterExit::*;
        let code = |c| ExitInfo::Code(c);
        let limit = ExitInfo::StartLimitHit(Box::new(ExitInfo::Code(1)));
        #[rustfmt::skip]
        let rows: Vec<(RestartPolicy, ExitInfo, bool, bool, u32, AfterExit)> = vec![
            (
                RestartPolicy::OnFailure,
                code(1),
                false,
                false,
                0,
                Restart {
                    delay: Duration::from_secs(2),
                    reason: "w; restarting in 2s (restart 1 of 5 within 60s)".into(),
                },
            ),
            (
                RestartPolicy::OnFailure,
                code(0),
                false,
                false,
                0,
                Stay(
                    State::Inactive,
                    "w; not restarted (restart.policy = on-failure)".into(),
                ),
            ),
            (
                RestartPolicy::OnFailure,
                code(0),
                true,
                false,
                0,
                Restart {
                    delay: Duration::from_secs(2),
                    reason: "w; restarting in 2s (restart 1 of 5 within 60s)".into(),
                },
            ),
            (
                RestartPolicy::No,
                code(1),
                false,
                false,
                0,
                Stay(
                    State::Failed,
                    "w; not restarted (restart.policy = no)".into(),
                ),
            ),
            (
                RestartPolicy::No,
                code(0),
                false,
                false,
                0,
                Stay(
                    State::Inactive,
                    "w; not restarted (restart.policy = no)".into(),
                ),
            ),
            (
                RestartPolicy::Always,
                code(0),
                false,
                false,
                0,
                Restart {
                    delay: Duration::from_secs(2),
                    reason: "w; restarting in 2s (restart 1 of 5 within 60s)".into(),
                },
            ),
            (
                RestartPolicy::OnFailure,
                limit.clone(),
                false,
                true,
                5,
                Stay(
                    State::Failed,
                    "exit-code 1; restart limit reached (5 restarts within 60s), left stopped"
                        .into(),
                ),
            ),
            (
                RestartPolicy::OnFailure,
                code(0),
                false,
                true,
                0,
                Stay(State::Inactive, "exited: exit-code 0".into()),
            ),
            (
                RestartPolicy::OnFailure,
                code(2),
                false,
                true,
                5,
                Stay(
                    State::Failed,
                    "exit-code 2; restart limit reached (5 restarts within 60s), left stopped"
                        .into(),
                ),
            ),
            (
                RestartPolicy::No,
                code(2),
                false,
                true,
                0,
                Stay(
                    State::Failed,
                    "exit-code 2; not restarted (restart.policy = no)".into(),
                ),
            ),
            // A start timeout under systemd is modvisor's to restart.
            (
                RestartPolicy::OnFailure,
                code(0),
                true,
                true,
                0,
                Restart {
                    delay: Duration::from_secs(2),
                    reason: "w; restarting in 2s (restart 1 of 5 within 60s)".into(),
                },
            ),
        ];
        for (i, (policy, info, timed_out, by_backend, restarts, want)) in
            rows.into_iter().enumerate()
        {
            let s = spec(policy, 5);
            let mut b = RestartBudget::new(&s);
            let ended = Ended {
                info: &info,
                what: "w",
                timed_out,
                by_backend,
                restarts,
                line: None,
            };
            assert_eq!(
                after_exit(&s, &mut b, &ended, Instant::now()),
                want,
                "row {i}"
            );
        }
    }

    #[test]
    fn spent_budget_leaves_it_failed() {
        let s = spec(RestartPolicy::Always, 1);
        let mut b = RestartBudget::new(&s);
        let info = ExitInfo::Code(1);
        let ended = Ended {
            info: &info,
            what: "w",
            timed_out: false,
            by_backend: false,
            restarts: 0,
            line: None,
        };
        let now = Instant::now();
        assert!(matches!(
            after_exit(&s, &mut b, &ended, now),
            AfterExit::Restart { .. }
        ));
        assert_eq!(
            after_exit(&s, &mut b, &ended, now),
            AfterExit::Stay(
                State::Failed,
                "w; restart limit reached (1 restarts within 60s), left stopped".into()
            )
        );
    }
}
