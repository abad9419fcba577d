//! The lifecycle as tables: every row is (input, the exact effects, the resulting state), fed
//! on a clock the test moves. No runtime, no bus, no root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::health::ProbeResult;

const NAME: &str = "m";

fn module(extra: &str) -> Module {
    let src = format!("name = \"{NAME}\"\n[native]\ncommand = [\"/bin/true\"]\n{extra}");
    crate::manifest::parse_manifest(Path::new("/m/m.toml"), &src, NAME).expect("valid manifest")
}

const PROBE: &str = "[health]\ntcp = \"127.0.0.1:9\"\nstart_timeout = \"30s\"\n";
const MODEL: &str = "[model]\ndirectory = \"/models\"\ndefault = \"/models/a.gguf\"\n";

struct T {
    lc: Lifecycle,
    now: Now,
}

impl T {
    fn new(extra: &str) -> T {
        let now = Now {
            mono: Instant::now(),
            wall: SystemTime::UNIX_EPOCH,
        };
        let m = module(extra);
        let model = m.model.as_ref().and_then(|s| s.default.clone());
        T {
            lc: Lifecycle::new(m, model, now),
            now,
        }
    }
    fn feed(&mut self, i: Input) -> Vec<Effect> {
        self.lc.handle(i, self.now)
    }
    fn advance(&mut self, d: Duration) {
        self.now.mono += d;
        self.now.wall += d;
    }
    /// Feeds every row, asserting the effects and the state after each.
    fn rows(&mut self, rows: Vec<(Input, Vec<Effect>, State)>) {
        for (i, (input, want, state)) in rows.into_iter().enumerate() {
            let desc = format!("row {i}: {input:?}");
            let got = self.feed(input);
            assert_eq!(got, want, "{desc}: effects");
            assert_eq!(self.lc.state(), state, "{desc}: state");
        }
    }
    /// Boots and starts generation 1 (direct backend, pid 42).
    fn running(extra: &str) -> T {
        let mut t = T::new(extra);
        t.feed(Input::Boot);
        t.feed(started(1));
        t
    }
}

fn started(generation: u64) -> Input {
    started_as(generation, false)
}
fn started_as(generation: u64, systemd: bool) -> Input {
    Input::Started(Started {
        generation,
        main_pid: 41 + generation as u32,
        unit: if systemd {
            "modvisor-m.service".into()
        } else {
            String::new()
        },
        restarts_itself: systemd,
        survives: systemd,
        fallback: None,
    })
}
fn exited(generation: u64, code: i32) -> Input {
    Input::Exited(Exit {
        generation,
        info: ExitInfo::Code(code),
        line: None,
    })
}
fn start(generation: u64) -> Effect {
    Effect::Start {
        generation,
        model: None,
    }
}
fn changed(state: State, health: Health, reason: &str) -> Effect {
    Effect::Changed {
        state,
        health,
        reason: reason.into(),
    }
}
fn ok(id: ReplyId) -> Effect {
    Effect::Reply(id, Ok(()))
}
fn busy(id: ReplyId) -> Effect {
    Effect::Reply(
        id,
        Err(OpError::Busy(
            "a model activation of m is in progress".into(),
        )),
    )
}
fn probe(generation: u64, ok: bool) -> Input {
    Input::Probe {
        generation,
        result: ProbeResult {
            ok,
            detail: if ok { "up".into() } else { "down".into() },
            loading: false,
        },
    }
}
use State::*;

#[test]
fn boot_start_stop() {
    let mut t = T::new("");
    t.rows(vec![
        (
            Input::Boot,
            vec![start(1), changed(Starting, Health::Unknown, "starting")],
            Starting,
        ),
        (
            started(1),
            vec![changed(
                Running,
                Health::Online,
                "running (pid 42), no health probe configured",
            )],
            Running,
        ),
        (Input::Start(1), vec![ok(1)], Running),
        (
            Input::Stop(2),
            vec![
                Effect::StopProbe,
                Effect::Stop { generation: 1 },
                changed(Stopping, Health::Offline, "stopping (pid 42)"),
            ],
            Stopping,
        ),
        (
            exited(1, 0),
            vec![
                Effect::StopProbe,
                ok(2),
                changed(Inactive, Health::Offline, "stopped"),
            ],
            Inactive,
        ),
        // An exit of an old run, after the stop, changes nothing.
        (exited(1, 1), vec![], Inactive),
        (Input::Stop(3), vec![ok(3)], Inactive),
    ]);
}

#[test]
fn stop_during_restart_wins_and_stays_stopped() {
    let mut t = T::running("");
    t.rows(vec![
        (
            Input::Restart(1),
            vec![
                Effect::StopProbe,
                Effect::Stop { generation: 1 },
                changed(Stopping, Health::Offline, "stopping (pid 42)"),
            ],
            Stopping,
        ),
        // The stop joins the stop under way; the restart is cancelled, answered now.
        (
            Input::Stop(2),
            vec![Effect::Reply(
                1,
                Err(OpError::Failed("cancelled: m was stopped meanwhile".into())),
            )],
            Stopping,
        ),
        (
            exited(1, 143),
            vec![
                Effect::StopProbe,
                ok(2),
                changed(Inactive, Health::Offline, "stopped"),
            ],
            Inactive,
        ),
    ]);
    assert!(t.lc.is_down());
}

#[test]
fn restart_after_a_stop_runs_after_it() {
    let mut t = T::running("");
    t.feed(Input::Stop(1));
    t.rows(vec![
        (Input::Restart(2), vec![], Stopping),
        (
            exited(1, 0),
            vec![
                Effect::StopProbe,
                ok(1),
                start(2),
                changed(Starting, Health::Unknown, "starting"),
            ],
            Starting,
        ),
        (
            started(2),
            vec![
                ok(2),
                changed(
                    Running,
                    Health::Online,
                    "running (pid 43), no health probe configured",
                ),
            ],
            Running,
        ),
    ]);
}

#[test]
fn stop_between_two_automatic_restarts() {
    let mut t = T::running("[restart]\ndelay = \"1s\"\n");
    t.rows(vec![
        (
            exited(1, 1),
            vec![
                Effect::StopProbe,
                Effect::LookupEngineLine,
                Effect::Arm {
                    timer: Timer::RestartDue(2),
                    after: Duration::from_secs(1),
                },
                changed(
                    Starting,
                    Health::Offline,
                    "pid 42 exited: exit-code 1; restarting in 1s (restart 1 of 5 within 600s)",
                ),
            ],
            Starting,
        ),
        (
            Input::Stop(1),
            vec![ok(1), changed(Inactive, Health::Offline, "stopped")],
            Inactive,
        ),
        // The timer that was armed fires anyway: nothing starts.
        (Input::Timer(Timer::RestartDue(2)), vec![], Inactive),
    ]);
}

#[test]
fn crash_loop_until_the_budget_is_spent() {
    let mut t = T::running("[restart]\ndelay = \"1s\"\nmax = 2\nwindow = \"1m\"\n");
    // Each restart of the budget waits twice as long as the one before.
    for (g, n) in [(1u64, 1u32), (3, 2)] {
        let fx = t.feed(exited(g, 1));
        let after = Duration::from_secs(1 << (n - 1));
        assert!(
            fx.contains(&Effect::Arm {
                timer: Timer::RestartDue(g + 1),
                after
            }),
            "{fx:?}"
        );
        t.advance(after);
        assert_eq!(
            t.feed(Input::Timer(Timer::RestartDue(g + 1)))[0],
            start(g + 2)
        );
        t.feed(started(g + 2));
        assert_eq!(t.lc.restarts(), n);
    }
    t.rows(vec![(exited(5, 1), vec![
        Effect::StopProbe,
        Effect::LookupEngineLine,
        changed(Failed, Health::Offline, "pid 46 exited: exit-code 1; restart limit reached (2 restarts within 60s), left stopped"),
    ], Failed)]);
    // A manual start resets the budget.
    let fx = t.feed(Input::Start(9));
    assert_eq!(fx[0], start(6));
}

#[test]
fn start_timeout_stops_then_a_stop_wins_over_the_restart_policy() {
    let mut t = T::new(PROBE);
    t.rows(vec![
        (
            Input::Boot,
            vec![start(1), changed(Starting, Health::Unknown, "starting")],
            Starting,
        ),
        (
            started(1),
            vec![
                Effect::StartProbe { generation: 1 },
                Effect::Arm {
                    timer: Timer::StartLimit(1),
                    after: Duration::from_secs(3600),
                },
                Effect::Arm {
                    timer: Timer::StartTimeout(1),
                    after: Duration::from_secs(30),
                },
            ],
            Starting,
        ),
        // The first answer is news (progress: start_timeout starts again) ...
        (
            probe(1, false),
            vec![Effect::Arm {
                timer: Timer::StartTimeout(2),
                after: Duration::from_secs(30),
            }],
            Starting,
        ),
        // ... the same answer again is not, and the first arming is stale now.
        (probe(1, false), vec![], Starting),
        (Input::Timer(Timer::StartTimeout(1)), vec![], Starting),
        (
            Input::Timer(Timer::StartTimeout(2)),
            vec![Effect::StopProbe, Effect::Stop { generation: 1 }],
            Starting,
        ),
        // The user's stop while the timed-out run is being stopped: no second stop, and the
        // exit is a stop (no restart).
        (
            Input::Stop(1),
            vec![changed(Stopping, Health::Offline, "stopping (pid 42)")],
            Stopping,
        ),
        (
            exited(1, 143),
            vec![
                Effect::StopProbe,
                ok(1),
                changed(Inactive, Health::Offline, "stopped"),
            ],
            Inactive,
        ),
    ]);
}

#[test]
fn start_timeout_goes_through_the_restart_policy() {
    let mut t = T::new(PROBE);
    t.feed(Input::Boot);
    t.feed(started(1));
    t.feed(Input::Timer(Timer::StartTimeout(1)));
    let fx = t.feed(exited(1, 143));
    assert_eq!(
        fx.last(),
        Some(&changed(
            Starting,
            Health::Offline,
            "no successful health probe within start_timeout (30s) and no progress meanwhile; restarting in 2s (restart 1 of 5 within 600s)"
        ))
    );
    // A start timeout of a run that is healthy by then does nothing.
    let mut t = T::new(PROBE);
    t.feed(Input::Boot);
    t.feed(started(1));
    t.feed(probe(1, true));
    assert_eq!(t.lc.state(), Running);
    assert_eq!(t.feed(Input::Timer(Timer::StartTimeout(1))), vec![]);
}

#[test]
fn stop_before_the_backend_answered_the_start() {
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.rows(vec![
        (
            Input::Stop(1),
            vec![
                Effect::StopProbe,
                changed(Stopping, Health::Offline, "stopping (not started yet)"),
            ],
            Stopping,
        ),
        (started(1), vec![Effect::Stop { generation: 1 }], Stopping),
        (
            exited(1, 143),
            vec![
                Effect::StopProbe,
                ok(1),
                changed(Inactive, Health::Offline, "stopped"),
            ],
            Inactive,
        ),
    ]);
}

#[test]
fn a_failed_start_answers_start_and_leaves_it_failed() {
    let mut t = T::new("");
    t.rows(vec![
        (
            Input::Start(1),
            vec![start(1), changed(Starting, Health::Unknown, "starting")],
            Starting,
        ),
        (
            Input::StartFailed {
                generation: 1,
                why: "no".into(),
            },
            vec![
                Effect::Reply(1, Err(OpError::Failed("no".into()))),
                changed(Failed, Health::Offline, "no"),
            ],
            Failed,
        ),
        // Stop of a failed module keeps its reason.
        (Input::Stop(2), vec![ok(2)], Failed),
    ]);
}

#[test]
fn removed_while_stopping() {
    let mut t = T::running("");
    t.feed(Input::Stop(1));
    t.rows(vec![
        (Input::Remove, vec![], Stopping),
        (
            exited(1, 0),
            vec![Effect::StopProbe, ok(1), Effect::Removed],
            Stopping,
        ),
    ]);
    // Removed while down: at once.
    let mut t = T::new("");
    assert_eq!(t.feed(Input::Remove), vec![Effect::Removed]);
}

#[test]
fn start_while_being_removed_is_no_such_module() {
    let mut t = T::running("");
    t.feed(Input::Remove);
    let fx = t.feed(Input::Start(1));
    assert!(
        matches!(&fx[..], [Effect::Reply(1, Err(OpError::NoSuchModule(_)))]),
        "{fx:?}"
    );
}

#[test]
fn shutdown_detaches_units_and_stops_direct_children() {
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.feed(started_as(1, true));
    assert_eq!(
        t.feed(Input::Shutdown),
        vec![Effect::StopProbe, Effect::Detach { generation: 1 }]
    );
    assert!(t.lc.is_down());
    let mut t = T::running("");
    let fx = t.feed(Input::Shutdown);
    assert!(fx.contains(&Effect::Stop { generation: 1 }), "{fx:?}");
    assert!(!t.lc.is_down());
}

#[test]
fn systemd_restarts_and_start_limit() {
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.rows(vec![
        // Same state and health as "starting": no journal line, only the reason changes.
        (started_as(1, true), vec![], Starting),
        (
            Input::Progress {
                generation: 1,
                main_pid: 50,
                restarts: Some(0),
                phase: RunPhase::Running,
            },
            vec![changed(
                Running,
                Health::Online,
                "running (pid 50), no health probe configured",
            )],
            Running,
        ),
        (
            Input::Progress {
                generation: 1,
                main_pid: 0,
                restarts: Some(0),
                phase: RunPhase::Restarting(ExitInfo::Code(1)),
            },
            vec![changed(
                Starting,
                Health::Offline,
                "exit-code 1; systemd restarts modvisor-m.service (restart 1)",
            )],
            Starting,
        ),
        (
            Input::Progress {
                generation: 1,
                main_pid: 0,
                restarts: Some(5),
                phase: RunPhase::Ended,
            },
            vec![],
            Starting,
        ),
        (
            Input::Exited(Exit {
                generation: 1,
                info: ExitInfo::StartLimitHit(Box::new(ExitInfo::Code(1))),
                line: None,
            }),
            vec![
                Effect::StopProbe,
                Effect::LookupEngineLine,
                changed(
                    Failed,
                    Health::Offline,
                    "exit-code 1; restart limit reached (5 restarts within 600s), left stopped",
                ),
            ],
            Failed,
        ),
    ]);
    assert_eq!(t.lc.restarts(), 5);
}

#[test]
fn probes_with_hysteresis_and_no_republishing() {
    let mut t = T::new(&format!("{PROBE}failures = 2\n"));
    t.feed(Input::Boot);
    t.feed(started(1));
    t.rows(vec![
        (
            probe(1, true),
            vec![changed(Running, Health::Online, "healthy: up")],
            Running,
        ),
        (probe(1, true), vec![], Running),
        (probe(1, false), vec![], Running),
        (
            probe(1, false),
            vec![changed(
                Running,
                Health::Offline,
                "health probe failed 2 times in a row (failures = 2): down",
            )],
            Running,
        ),
        (probe(1, false), vec![], Running),
        (
            probe(1, true),
            vec![changed(Running, Health::Online, "healthy: up")],
            Running,
        ),
        // A stale probe of an old run.
        (probe(7, false), vec![], Running),
        (
            Input::Warning(Some("RAM high".into())),
            vec![changed(Running, Health::Degraded, "RAM high")],
            Running,
        ),
        (
            Input::Warning(None),
            vec![changed(Running, Health::Online, "healthy: up")],
            Running,
        ),
    ]);
}

// ------------------------------------------------------------ model activation

fn step(model: &str, step: &'static str, detail: &str) -> Effect {
    Effect::Step {
        model: PathBuf::from(model),
        step,
        detail: detail.into(),
    }
}

/// Runs the activation of /models/b.gguf up to the restart on it (generation 2 starting).
fn activating() -> T {
    let mut t = T::running(MODEL);
    t.rows(vec![
        (
            Input::ActivateModel {
                reply: 1,
                requested: "b.gguf".into(),
            },
            vec![Effect::ValidateModel {
                requested: "b.gguf".into(),
            }],
            Running,
        ),
        (
            Input::ModelValidated(Ok("/models/b.gguf".into())),
            vec![
                step("/models/b.gguf", "validated", ""),
                Effect::RecordModel {
                    model: "/models/b.gguf".into(),
                    previous: Some("/models/a.gguf".into()),
                },
            ],
            Running,
        ),
        (
            Input::ModelRecorded(Ok(())),
            vec![
                step("/models/b.gguf", "recorded", "previous /models/a.gguf"),
                step("/models/b.gguf", "restarting", ""),
                Effect::StopProbe,
                Effect::Stop { generation: 1 },
                changed(Stopping, Health::Offline, "stopping (pid 42)"),
            ],
            Stopping,
        ),
        (
            exited(1, 0),
            vec![
                Effect::StopProbe,
                Effect::Start {
                    generation: 2,
                    model: Some("/models/b.gguf".into()),
                },
                changed(Starting, Health::Unknown, "starting"),
            ],
            Starting,
        ),
    ]);
    t
}

#[test]
fn activation_confirmed_online() {
    let mut t = activating();
    t.rows(vec![(
        started(2),
        vec![
            changed(
                Running,
                Health::Online,
                "running (pid 43), no health probe configured",
            ),
            step("/models/b.gguf", "online", ""),
            Effect::Activated("online"),
            ok(1),
        ],
        Running,
    )]);
    assert_eq!(t.lc.active_model(), Some(&PathBuf::from("/models/b.gguf")));
    assert!(!t.lc.activating());
}

#[test]
fn commands_during_an_activation_are_busy() {
    let mut t = activating();
    for (i, input) in [Input::Stop(5), Input::Start(6), Input::Restart(7)]
        .into_iter()
        .enumerate()
    {
        assert_eq!(t.feed(input), vec![busy(5 + i as u64)]);
    }
    assert_eq!(
        t.feed(Input::ActivateModel {
            reply: 8,
            requested: "c.gguf".into()
        }),
        vec![busy(8)],
        "a second activation"
    );
    assert!(t.lc.activating());
}

#[test]
fn activation_fails_rolls_back_once_with_the_engine_line() {
    let mut t2 = activating();
    t2.rows(vec![
        (exited(2, 1), vec![
            Effect::StopProbe,
            Effect::LookupEngineLine,
            step("/models/b.gguf", "failed", "the engine exited: exit-code 1"),
            step("/models/b.gguf", "rolling-back", "to /models/a.gguf"),
            Effect::RecordModel { model: "/models/a.gguf".into(), previous: None },
            Effect::Start { generation: 3, model: Some("/models/a.gguf".into()) },
        ], Starting),
        // The same failure reported again (a late event of the dead run): handled once.
        (exited(2, 1), vec![], Starting),
        (Input::ModelRecorded(Ok(())), vec![], Starting),
        // Online on the previous model, but the engine's line is not known yet: held.
        (started(3), vec![changed(Running, Health::Online, "running (pid 44), no health probe configured")], Running),
        (Input::EngineLine(Some("error loading model".into())), vec![
            step("/models/b.gguf", "rolled-back", "activating /models/b.gguf failed: the engine exited: exit-code 1; the engine said: error loading model; rolled back to /models/a.gguf, which is online"),
            Effect::Activated("rolled-back"),
            Effect::Reply(1, Err(OpError::Failed("activating /models/b.gguf failed: the engine exited: exit-code 1; the engine said: error loading model; rolled back to /models/a.gguf, which is online".into()))),
        ], Running),
    ]);
    assert_eq!(t2.lc.active_model(), Some(&PathBuf::from("/models/a.gguf")));
    assert!(!t2.lc.activating());
}

#[test]
fn rollback_that_fails_too() {
    let mut t = activating();
    t.feed(exited(2, 1));
    t.feed(Input::EngineLine(None));
    let fx = t.feed(Input::StartFailed {
        generation: 3,
        why: "program gone".into(),
    });
    let msg = "activating /models/b.gguf failed: the engine exited: exit-code 1; the rollback failed too: program gone";
    assert_eq!(
        fx,
        vec![
            step("/models/b.gguf", "rollback-failed", msg),
            Effect::Activated("failed"),
            Effect::Reply(1, Err(OpError::Failed(msg.into()))),
            changed(Failed, Health::Offline, "program gone"),
        ]
    );
    assert!(!t.lc.activating());
}

#[test]
fn invalid_model_changes_nothing() {
    let mut t = T::running(MODEL);
    t.feed(Input::ActivateModel {
        reply: 1,
        requested: "/etc/passwd".into(),
    });
    let fx = t.feed(Input::ModelValidated(Err("not inside".into())));
    assert_eq!(
        fx,
        vec![Effect::Reply(
            1,
            Err(OpError::InvalidArgument(
                "cannot activate /etc/passwd for m: not inside".into()
            ))
        )]
    );
    assert_eq!(t.lc.state(), Running);
    assert_eq!(t.lc.main_pid(), 42);
    assert!(!t.lc.activating());
}

#[test]
fn systemd_restarting_on_the_new_model_is_a_failure() {
    let mut t = activating();
    t.feed(started_as(2, true));
    let fx = t.feed(Input::Progress {
        generation: 2,
        main_pid: 0,
        restarts: Some(1),
        phase: RunPhase::Restarting(ExitInfo::Code(1)),
    });
    assert!(fx.contains(&Effect::Stop { generation: 2 }), "{fx:?}");
    assert!(fx.contains(&Effect::LookupEngineLine), "{fx:?}");
    // The unit's final exit (it was stopped for the rollback) starts the previous model.
    let fx = t.feed(exited(2, 143));
    assert!(
        fx.contains(&Effect::Start {
            generation: 3,
            model: Some("/models/a.gguf".into())
        }),
        "{fx:?}"
    );
}

#[test]
fn reload_during_an_activation_restarts_after_it() {
    let mut t = activating();
    assert_eq!(t.feed(Input::Respawn), vec![]);
    let fx = t.feed(started(2));
    assert_eq!(
        &fx[1..],
        &[
            step("/models/b.gguf", "online", ""),
            Effect::Activated("online"),
            ok(1),
            Effect::StopProbe,
            Effect::Stop { generation: 2 },
        ][..]
    );
}

#[test]
fn removal_during_an_activation_answers_it_and_stops() {
    let mut t = activating();
    let fx = t.feed(Input::Remove);
    assert!(
        matches!(&fx[0], Effect::Reply(1, Err(OpError::Failed(_)))),
        "{fx:?}"
    );
    t.feed(started(2));
    let fx = t.feed(exited(2, 0));
    assert!(fx.contains(&Effect::Removed), "{fx:?}");
}

#[test]
fn an_activation_with_no_previous_model_fails_without_rollback() {
    let mut t = T::running("[model]\ndirectory = \"/models\"\n");
    t.feed(Input::ActivateModel {
        reply: 1,
        requested: "b.gguf".into(),
    });
    t.feed(Input::ModelValidated(Ok("/models/b.gguf".into())));
    t.feed(Input::ModelRecorded(Ok(())));
    t.feed(exited(1, 0));
    let fx = t.feed(exited(2, 1));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Start { .. })),
        "{fx:?}"
    );
    let fx = t.feed(Input::EngineLine(None));
    let msg = "activating /models/b.gguf failed: the engine exited: exit-code 1; there is no previous model to roll back to";
    assert_eq!(
        fx,
        vec![
            step("/models/b.gguf", "failed", msg),
            Effect::Activated("failed"),
            Effect::Reply(1, Err(OpError::Failed(msg.into())))
        ]
    );
}

#[test]
fn progress_keeps_a_start_alive_until_start_limit() {
    let mut t =
        T::new("[health]\ntcp = \"127.0.0.1:9\"\nstart_timeout = \"10s\"\nstart_limit = \"1m\"\n");
    t.feed(Input::Boot);
    t.feed(started(1));
    let grow = |g| Input::Progressing {
        generation: g,
        what: "2.0 GiB resident, +100.0 MiB since the last sample".into(),
    };
    t.rows(vec![
        (
            grow(1),
            vec![Effect::Arm {
                timer: Timer::StartTimeout(2),
                after: Duration::from_secs(10),
            }],
            Starting,
        ),
        // The timeout armed before the progress is stale.
        (Input::Timer(Timer::StartTimeout(1)), vec![], Starting),
        (
            grow(1),
            vec![Effect::Arm {
                timer: Timer::StartTimeout(3),
                after: Duration::from_secs(10),
            }],
            Starting,
        ),
        // Progress of another run counts for nothing.
        (grow(7), vec![], Starting),
        // The hard cap holds whatever the progress.
        (
            Input::Timer(Timer::StartLimit(1)),
            vec![Effect::StopProbe, Effect::Stop { generation: 1 }],
            Starting,
        ),
        (grow(1), vec![], Starting),
    ]);
    let fx = t.feed(exited(1, 143));
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Changed { reason, .. } if reason.starts_with("no successful health probe within start_limit (60s), progress or not"))),
        "{fx:?}"
    );
}

#[test]
fn progress_after_the_start_phase_changes_nothing() {
    let mut t = T::new(PROBE);
    t.feed(Input::Boot);
    t.feed(started(1));
    t.feed(probe(1, true));
    let fx = t.feed(Input::Progressing {
        generation: 1,
        what: "x".into(),
    });
    assert_eq!(fx, vec![]);
    assert_eq!(t.lc.state(), Running);
}

#[test]
fn a_manifest_start_limit_below_start_timeout_is_refused() {
    let src = "name = \"m\"\n[native]\ncommand = [\"/bin/true\"]\n[health]\ntcp = \"127.0.0.1:9\"\nstart_timeout = \"10m\"\nstart_limit = \"1m\"\n";
    let e =
        crate::manifest::parse_manifest(Path::new("/m/m.toml"), src, NAME).expect_err("refused");
    assert_eq!(
        e.to_string(),
        "/m/m.toml:7:15: health.start_limit: expected at least health.start_timeout"
    );
}

// ------------------------------------------------------------ start on demand, stop when idle

const SERVE: &str = "[serve]\nlisten = [\"127.0.0.1:8080\"]\nupstream = \"127.0.0.1:18080\"\non_demand = true\nidle_stop = \"15m\"\n";

#[test]
fn on_demand_idle_stop_and_wake() {
    let mut t = T::new(SERVE);
    assert_eq!(t.lc.state(), Inactive);
    assert_eq!(t.lc.effective().0, Health::Standby);
    assert_eq!(
        t.lc.gate(),
        crate::proxy::Gate::Wait,
        "held: a connection starts it"
    );
    let idle = |token| Effect::Arm {
        timer: Timer::IdleStop(token),
        after: Duration::from_secs(900),
    };
    t.rows(vec![
        (
            Input::Demand {
                peer: "127.0.0.1:5000".into(),
            },
            vec![
                Effect::Notice(
                    serve::MSG_ON_DEMAND,
                    "starting m on demand: connection from 127.0.0.1:5000".into(),
                ),
                start(1),
                changed(Starting, Health::Unknown, "starting"),
            ],
            Starting,
        ),
        (Input::Connections(1), vec![], Starting),
        (
            started(1),
            vec![changed(
                Running,
                Health::Online,
                "running (pid 42), no health probe configured",
            )],
            Running,
        ),
        (Input::Connections(0), vec![idle(2)], Running),
        (Input::Connections(3), vec![], Running),
        // Armed before the connections came: stale.
        (Input::Timer(Timer::IdleStop(1)), vec![], Running),
        (Input::Connections(0), vec![idle(4)], Running),
        (
            Input::Timer(Timer::IdleStop(4)),
            vec![
                Effect::Notice(
                    serve::MSG_IDLE_STOP,
                    "stopping m: no connection for 900s".into(),
                ),
                Effect::StopProbe,
                Effect::Stop { generation: 1 },
                changed(Stopping, Health::Offline, "stopping (pid 42)"),
            ],
            Stopping,
        ),
        (
            exited(1, 0),
            vec![
                Effect::StopProbe,
                changed(
                    Inactive,
                    Health::Standby,
                    "stopped after 900s idle; starts on the next connection to 127.0.0.1:8080",
                ),
            ],
            Inactive,
        ),
    ]);
    assert_eq!(t.lc.gate(), crate::proxy::Gate::Wait);
}

#[test]
fn a_connection_during_the_idle_stop_starts_it_again() {
    let mut t = T::new(SERVE);
    t.feed(Input::Demand { peer: "p".into() });
    t.feed(started(1));
    // Armed at the start (no connection then), again when the count drops to 0.
    t.feed(Input::Connections(0));
    t.feed(Input::Timer(Timer::IdleStop(2)));
    assert_eq!(t.feed(Input::Demand { peer: "p".into() }), vec![]);
    let fx = t.feed(exited(1, 0));
    assert!(fx.contains(&start(2)), "{fx:?}");
}

#[test]
fn a_user_stop_of_an_on_demand_module_leaves_it_in_standby() {
    let mut t = T::new(SERVE);
    t.feed(Input::Demand { peer: "p".into() });
    t.feed(started(1));
    t.feed(Input::Stop(1));
    assert!(
        matches!(t.lc.gate(), crate::proxy::Gate::Closed(_)),
        "closed while a user stop runs"
    );
    t.feed(exited(1, 0));
    assert_eq!(
        t.lc.effective(),
        (
            Health::Standby,
            "stopped; starts on the next connection to 127.0.0.1:8080"
        )
    );
    // Not on demand: a user stop is a stop, and the listen address closes connections.
    let mut t =
        T::running("[serve]\nlisten = [\"127.0.0.1:8080\"]\nupstream = \"127.0.0.1:18080\"\n");
    t.feed(Input::Stop(1));
    t.feed(exited(1, 0));
    assert_eq!(t.lc.effective(), (Health::Offline, "stopped"));
    assert_eq!(t.lc.gate(), crate::proxy::Gate::Closed("stopped".into()));
    assert_eq!(t.feed(Input::Demand { peer: "p".into() }), vec![]);
}

// ------------------------------------------------------------ eviction (admission)

fn evict(by: &str) -> Input {
    Input::Evict {
        by: by.into(),
        why: "needs 4.0 GiB".into(),
    }
}

#[test]
fn an_evicted_module_stops_and_says_why() {
    let mut t = T::running("");
    t.rows(vec![
        (
            evict("big"),
            vec![
                Effect::Notice(
                    serve::MSG_EVICTED,
                    "evicting m to start big: needs 4.0 GiB".into(),
                ),
                Effect::StopProbe,
                Effect::Stop { generation: 1 },
                changed(Stopping, Health::Offline, "stopping (pid 42)"),
            ],
            Stopping,
        ),
        // A second eviction while it stops changes nothing.
        (evict("other"), vec![], Stopping),
        (
            exited(1, 0),
            vec![
                Effect::StopProbe,
                changed(
                    Inactive,
                    Health::Offline,
                    "evicted to start big (needs 4.0 GiB)",
                ),
            ],
            Inactive,
        ),
        // Not running: nothing to evict.
        (evict("big"), vec![], Inactive),
    ]);
}

#[test]
fn an_evicted_on_demand_module_waits_in_standby_and_wakes() {
    let mut t = T::new(SERVE);
    t.feed(Input::Demand { peer: "p".into() });
    t.feed(started(1));
    t.feed(evict("big"));
    assert_eq!(t.lc.gate(), crate::proxy::Gate::Wait, "held, not refused");
    t.feed(exited(1, 0));
    assert_eq!(
        t.lc.effective(),
        (
            Health::Standby,
            "evicted to start big (needs 4.0 GiB); starts on the next connection to 127.0.0.1:8080"
        )
    );
    let fx = t.feed(Input::Demand { peer: "p".into() });
    assert!(fx.contains(&start(2)), "{fx:?}");
}

#[test]
fn never_evicted_while_starting_stopping_or_activating() {
    // Starting (the backend has not answered yet).
    let mut t = T::new("");
    t.feed(Input::Boot);
    assert_eq!(t.feed(evict("big")), vec![]);
    // Stopping on a user's request: the stop is what it is, not an eviction.
    let mut t = T::running("");
    t.feed(Input::Stop(1));
    assert_eq!(t.feed(evict("big")), vec![]);
    t.feed(exited(1, 0));
    assert_eq!(t.lc.effective(), (Health::Offline, "stopped"));
    // Mid-activation.
    let mut t = T::running(MODEL);
    t.feed(Input::ActivateModel {
        reply: 7,
        requested: "/models/b.gguf".into(),
    });
    assert_eq!(t.feed(evict("big")), vec![]);
    assert!(t.lc.activating());
}

#[test]
fn waiting_for_admission_then_stopped_is_stopped_not_failed() {
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.feed(Input::Waiting {
        generation: 1,
        why: "waiting for memory: evicting a".into(),
    });
    assert_eq!(
        t.lc.effective(),
        (Health::Unknown, "waiting for memory: evicting a")
    );
    t.rows(vec![
        (
            Input::Waiting {
                generation: 1,
                why: "waiting for memory: evicting a".into(),
            },
            // The reason changes (published), the state does not (no journal line).
            vec![],
            Starting,
        ),
        // Another generation's wait is stale.
        (
            Input::Waiting {
                generation: 9,
                why: "x".into(),
            },
            vec![],
            Starting,
        ),
        (
            Input::Stop(3),
            vec![
                Effect::StopProbe,
                changed(Stopping, Health::Offline, "stopping (not started yet)"),
            ],
            Stopping,
        ),
        (
            Input::StartFailed {
                generation: 1,
                why: "stopped while waiting for admission".into(),
            },
            vec![ok(3), changed(Inactive, Health::Offline, "stopped")],
            Inactive,
        ),
    ]);
}

#[test]
fn the_engine_line_of_a_failed_start_goes_into_the_reason_once() {
    let mut t = T::new("[restart]\npolicy = \"no\"\n");
    t.feed(Input::Boot);
    t.feed(started(1));
    let fx = t.feed(exited(1, 1));
    assert!(fx.contains(&Effect::LookupEngineLine), "{fx:?}");
    t.feed(Input::EngineLine(Some(
        "error loading model: bad magic".into(),
    )));
    assert_eq!(
        t.lc.effective(),
        (
            Health::Offline,
            "pid 42 exited: exit-code 1; not restarted (restart.policy = no); the engine said: error loading model: bad magic"
        )
    );
    // A second answer (or one after the module moved on) changes nothing.
    t.feed(Input::EngineLine(Some("other".into())));
    assert!(!t.lc.effective().1.contains("other"));
    t.feed(Input::Start(1));
    let fx = t.feed(exited(2, 1));
    assert!(fx.contains(&Effect::LookupEngineLine));
    t.feed(Input::Start(2));
    t.feed(Input::EngineLine(Some("late".into())));
    assert!(
        !t.lc.effective().1.contains("late"),
        "{:?}",
        t.lc.effective()
    );
}

fn exit_with(generation: u64, info: ExitInfo, line: Option<&str>) -> Input {
    Input::Exited(Exit {
        generation,
        info,
        line: line.map(String::from),
    })
}

/// Configuration errors are not restarted, whatever the policy; the engine's line is in the
/// reason; resource errors are restarted and say so.
#[test]
fn configuration_errors_are_not_restarted_and_name_the_cause() {
    let lib =
        "sh: error while loading shared libraries: libgomp.so.1: cannot open shared object file";
    #[rustfmt::skip]
    let rows: Vec<(ExitInfo, Option<&str>, State, &str)> = vec![
        (ExitInfo::Code(127), Some(lib), Failed, "pid 42 exited: exit-code 127: sh: error while loading shared libraries: libgomp.so.1: cannot open shared object file; a configuration error, not restarted: install the missing library"),
        (ExitInfo::Code(127), None, Failed, "pid 42 exited: exit-code 127; a configuration error, not restarted: the command or a library it needs is missing"),
        (ExitInfo::Code(1), Some("error: couldn't bind HTTP server socket, port: 8080: Address already in use"), Failed, "pid 42 exited: exit-code 1: error: couldn't bind HTTP server socket, port: 8080: Address already in use; a configuration error, not restarted: another process listens on the engine's port"),
        (ExitInfo::Refused("image localhost/x:1 is not present in podman and pull = \"never\"".into()), None, Failed, "not started: image localhost/x:1 is not present in podman and pull = \"never\"; a configuration error, not restarted: fix the manifest or the machine"),
        (ExitInfo::Other("oom-kill".into()), None, Starting, "pid 42 exited: oom-kill; out of memory (a resource error): restarting in 2s (restart 1 of 5 within 600s)"),
        (ExitInfo::Code(1), Some("CUDA error: out of memory"), Starting, "pid 42 exited: exit-code 1: CUDA error: out of memory; out of memory (a resource error): restarting in 2s (restart 1 of 5 within 600s)"),
        (ExitInfo::Code(3), Some("error: boom"), Starting, "pid 42 exited: exit-code 3: error: boom; restarting in 2s (restart 1 of 5 within 600s)"),
    ];
    for (info, line, state, reason) in rows {
        let mut t = T::running("[restart]\npolicy = \"always\"\n");
        let fx = t.feed(exit_with(1, info.clone(), line));
        assert_eq!(t.lc.state(), state, "{info}");
        assert_eq!(t.lc.effective().1, reason, "{info}");
        let armed = fx.iter().any(|e| matches!(e, Effect::Arm { .. }));
        assert_eq!(armed, state == Starting, "{info}: {fx:?}");
        assert_eq!(
            fx.contains(&Effect::LookupEngineLine),
            line.is_none(),
            "looked up only when not at hand: {fx:?}"
        );
    }
}

/// The line found after the decision (systemd's journal, late output) still stops a restart
/// that cannot help; the restart's timer then finds nothing to start.
#[test]
fn a_late_configuration_line_cancels_the_pending_restart() {
    let mut t = T::running("");
    t.rows(vec![
        (
            exited(1, 1),
            vec![
                Effect::StopProbe,
                Effect::LookupEngineLine,
                Effect::Arm {
                    timer: Timer::RestartDue(2),
                    after: Duration::from_secs(2),
                },
                changed(
                    Starting,
                    Health::Offline,
                    "pid 42 exited: exit-code 1; restarting in 2s (restart 1 of 5 within 600s)",
                ),
            ],
            Starting,
        ),
        (
            Input::EngineLine(Some("llama-server: error while loading shared libraries: libgomp.so.1: cannot open shared object file".into())),
            vec![changed(
                Failed,
                Health::Offline,
                "pid 42 exited: exit-code 1: llama-server: error while loading shared libraries: libgomp.so.1: cannot open shared object file; a configuration error, not restarted: install the missing library",
            )],
            Failed,
        ),
        (Input::Timer(Timer::RestartDue(2)), vec![], Failed),
    ]);
    // A crash line only adds to the reason; the restart stays due.
    let mut t = T::running("");
    t.feed(exited(1, 1));
    let reason = "pid 42 exited: exit-code 1; restarting in 2s (restart 1 of 5 within 600s); the engine said: error: boom";
    assert_eq!(
        t.feed(Input::EngineLine(Some("error: boom".into()))),
        vec![changed(Starting, Health::Offline, reason)]
    );
    t.advance(Duration::from_secs(2));
    assert_eq!(t.feed(Input::Timer(Timer::RestartDue(2)))[0], start(3));
}

/// An adopted container reports "running" before its backend answers the start: the answer
/// does not turn it back into "starting".
#[test]
fn a_run_reported_running_before_the_start_was_answered_stays_running() {
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.feed(Input::Progress {
        generation: 1,
        main_pid: 77,
        restarts: None,
        phase: RunPhase::Running,
    });
    // A container's start answers without a PID (it is reported as progress).
    let Input::Started(mut s) = started_as(1, true) else {
        unreachable!()
    };
    s.main_pid = 0;
    t.feed(Input::Started(s));
    assert_eq!(t.lc.state(), Running, "{:?}", t.lc.effective());
    assert_eq!(t.lc.main_pid(), 77);
    // Without an early report it starts as before.
    let mut t = T::new("");
    t.feed(Input::Boot);
    t.feed(started_as(1, true));
    assert_eq!(t.lc.state(), Starting);
}
