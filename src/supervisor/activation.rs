//! Model activation as a sub-machine of a module's lifecycle (pure):
//! validate -> record -> restart -> wait online -> confirm | roll back -> confirm | fail.
//!
//! The module machine owns one `Activation` at most; it tells it what happened to the run it
//! watches (`online`, `failed`) and carries out what comes back. A failure is handled once:
//! only a failure of the run the activation started counts, and after the outcome is known the
//! activation is gone.

use std::path::PathBuf;

use super::ReplyId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The requested path is being validated (off the actor).
    Validating,
    /// The new active model is being written to the state directory (off the actor).
    Recording,
    /// The engine restarts on the new model; online confirms it.
    Restarting,
    /// The new model failed: the engine restarts on the previous one.
    RollingBack,
}

/// How an activation ends, before the engine's error line is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Online,
    NoPrevious,
    RolledBack,
    RollbackFailed(String),
}

#[derive(Debug, Clone)]
pub struct Activation {
    pub reply: ReplyId,
    pub requested: String,
    pub model: PathBuf,
    pub previous: Option<PathBuf>,
    pub phase: Phase,
    /// The run this activation waits on (its failure is the activation's failure).
    pub generation: u64,
    /// Why the new model failed ("pid 42 exited: exit-code 1; the engine said: ...").
    pub failure: String,
    /// The engine's error line is being looked up: the final answer waits for it.
    pub lookup_pending: bool,
    /// The outcome, held until the lookup is done.
    pub held: Option<Outcome>,
    /// The manifest changed what the module runs meanwhile: restart once this ends.
    pub respawn_after: bool,
}

/// What the module machine must do next for the activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Nothing,
    /// Start (or stop and start) the module on `model` (the rollback), recording it.
    RollBack(PathBuf),
    /// Look up the engine's last error line.
    Lookup,
    /// The transaction is over: signal `step` with `detail`, answer the reply.
    Done {
        step: &'static str,
        detail: String,
        result: Result<(), String>,
    },
}

impl Activation {
    pub fn new(reply: ReplyId, requested: String) -> Self {
        Activation {
            reply,
            requested,
            model: PathBuf::new(),
            previous: None,
            phase: Phase::Validating,
            generation: 0,
            failure: String::new(),
            lookup_pending: false,
            held: None,
            respawn_after: false,
        }
    }

    fn watching(&self, generation: u64) -> bool {
        matches!(self.phase, Phase::Restarting | Phase::RollingBack)
            && self.generation == generation
    }

    /// The watched run is online.
    pub fn online(&mut self, generation: u64) -> Next {
        if !self.watching(generation) || self.held.is_some() {
            return Next::Nothing;
        }
        let outcome = match self.phase {
            Phase::RollingBack => Outcome::RolledBack,
            _ => Outcome::Online,
        };
        self.finish(outcome)
    }

    /// The watched run failed (exited, restarted by systemd, never started, timed out).
    /// Returns what to do; the first call for a run is the only one that counts.
    pub fn failed(&mut self, generation: u64, why: &str) -> Vec<Next> {
        if !self.watching(generation) || self.held.is_some() {
            return Vec::new();
        }
        if self.phase == Phase::RollingBack {
            return vec![self.finish(Outcome::RollbackFailed(why.to_string()))];
        }
        self.failure = why.to_string();
        self.lookup_pending = true;
        let mut next = vec![Next::Lookup];
        match self.previous.clone() {
            None => next.push(self.finish(Outcome::NoPrevious)),
            Some(p) => {
                self.phase = Phase::RollingBack;
                // The rollback's run is watched from its start on.
                self.generation = 0;
                next.push(Next::RollBack(p));
            }
        }
        next
    }

    /// The engine's error line arrived (or there is none).
    pub fn engine_line(&mut self, line: Option<String>) -> Next {
        if !self.lookup_pending {
            return Next::Nothing;
        }
        self.lookup_pending = false;
        if let Some(l) = line {
            self.failure = format!("{}; the engine said: {l}", self.failure);
        }
        match self.held.take() {
            Some(o) => self.finish(o),
            None => Next::Nothing,
        }
    }

    fn finish(&mut self, outcome: Outcome) -> Next {
        if self.lookup_pending && outcome != Outcome::Online {
            self.held = Some(outcome);
            return Next::Nothing;
        }
        let m = self.model.display();
        let prev = self
            .previous
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let f = &self.failure;
        let (step, detail) = match &outcome {
            Outcome::Online => {
                return Next::Done {
                    step: "online",
                    detail: String::new(),
                    result: Ok(()),
                };
            }
            Outcome::NoPrevious => (
                "failed",
                format!("activating {m} failed: {f}; there is no previous model to roll back to"),
            ),
            Outcome::RolledBack => (
                "rolled-back",
                format!("activating {m} failed: {f}; rolled back to {prev}, which is online"),
            ),
            Outcome::RollbackFailed(why) => (
                "rollback-failed",
                format!("activating {m} failed: {f}; the rollback failed too: {why}"),
            ),
        };
        Next::Done {
            step,
            result: Err(detail.clone()),
            detail,
        }
    }
}
