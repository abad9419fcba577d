//! The lifecycle's side of a model activation: it feeds the sub-machine (activation.rs) what
//! happens to the run and carries out what comes back.

use super::*;

impl Lifecycle {
    pub(super) fn on_activate(&mut self, reply: ReplyId, requested: String, fx: &mut Fx) {
        if self.busy(reply, fx) {
            return;
        }
        if let Phase::Up(Run {
            stopping: Some(Stopping::Asked(_)),
            ..
        }) = &self.phase
        {
            let n = &self.name;
            fx.push(Effect::Reply(
                reply,
                Err(OpError::Busy(format!("{n} is being stopped"))),
            ));
            return;
        }
        fx.push(Effect::ValidateModel {
            requested: requested.clone(),
        });
        self.activation = Some(Activation::new(reply, requested));
    }

    pub(super) fn on_validated(&mut self, r: Result<PathBuf, String>, fx: &mut Fx) {
        let n = self.name.clone();
        let Some(a) = self.activation.as_mut() else {
            return;
        };
        if a.phase != activation::Phase::Validating {
            return;
        }
        match r {
            Err(why) => {
                let msg = format!("cannot activate {} for {n}: {why}", a.requested);
                fx.push(Effect::Reply(a.reply, Err(OpError::InvalidArgument(msg))));
                self.activation = None;
            }
            Ok(model) => {
                a.model = model.clone();
                a.previous = self.active_model.clone();
                a.phase = activation::Phase::Recording;
                fx.push(Effect::Step {
                    model: model.clone(),
                    step: "validated",
                    detail: String::new(),
                });
                fx.push(Effect::RecordModel {
                    model,
                    previous: a.previous.clone(),
                });
            }
        }
    }

    pub(super) fn on_recorded(&mut self, r: Result<(), String>, now: Now, fx: &mut Fx) {
        let Some(a) = self.activation.as_mut() else {
            return;
        };
        if a.phase != activation::Phase::Recording {
            // The rollback's record: the actor logs a failure; the rollback goes on.
            return;
        }
        if let Err(err) = r {
            let msg = format!("cannot record the active model: {err}");
            fx.push(Effect::Reply(a.reply, Err(OpError::Failed(msg))));
            self.activation = None;
            return;
        }
        let detail = a
            .previous
            .as_ref()
            .map(|p| format!("previous {}", p.display()))
            .unwrap_or_default();
        let model = a.model.clone();
        a.phase = activation::Phase::Restarting;
        a.generation = 0;
        fx.push(Effect::Step {
            model: model.clone(),
            step: "recorded",
            detail,
        });
        self.active_model = Some(model.clone());
        fx.push(Effect::Step {
            model,
            step: "restarting",
            detail: String::new(),
        });
        self.restart_on_model(now, fx);
    }

    /// Runs the module again on its (new) active model: stop then start, or start now.
    fn restart_on_model(&mut self, now: Now, fx: &mut Fx) {
        self.budget.reset();
        match std::mem::replace(&mut self.phase, Phase::Down) {
            Phase::Up(mut run) => {
                self.begin_stop(&mut run, Then::Start, fx);
                self.phase = Phase::Up(run);
            }
            Phase::Down | Phase::RestartWait { .. } => self.start(now, fx),
        }
    }

    /// The run the activation watches failed: once per run (activation.rs filters).
    pub(super) fn activation_failed(&mut self, generation: u64, why: &str, now: Now, fx: &mut Fx) {
        let Some(a) = self.activation.as_mut() else {
            return;
        };
        for next in a.failed(generation, why) {
            self.activation_next(next, now, fx);
        }
    }

    pub(super) fn activation_next(&mut self, next: Next, now: Now, fx: &mut Fx) {
        let Some(a) = self.activation.as_mut() else {
            return;
        };
        let model = a.model.clone();
        match next {
            Next::Nothing => {}
            Next::Lookup => fx.push(Effect::LookupEngineLine),
            Next::RollBack(previous) => {
                fx.push(Effect::Step {
                    model: model.clone(),
                    step: "failed",
                    detail: a.failure.clone(),
                });
                fx.push(Effect::Step {
                    model,
                    step: "rolling-back",
                    detail: format!("to {}", previous.display()),
                });
                fx.push(Effect::RecordModel {
                    model: previous.clone(),
                    previous: None,
                });
                self.active_model = Some(previous);
                self.restart_on_model(now, fx);
            }
            Next::Done {
                step,
                detail,
                result,
            } => {
                let reply = a.reply;
                let respawn = a.respawn_after;
                self.activation = None;
                fx.push(Effect::Step {
                    model,
                    step,
                    detail,
                });
                fx.push(Effect::Activated(match step {
                    "online" | "rolled-back" => step,
                    _ => "failed",
                }));
                fx.push(Effect::Reply(reply, result.map_err(OpError::Failed)));
                if respawn {
                    self.respawn(fx);
                }
            }
        }
    }
}
