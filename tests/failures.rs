//! What an operator sees when an engine fails: the reason quotes the engine's own line, a
//! configuration error is `failed` at once and never restarted (direct children and transient
//! units of the testbed's systemd), and a crash loop backs off.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// What a binary whose library is missing prints (the dynamic loader's words), then its exit.
const MISSING_LIB: &str = "echo 'engine: error while loading shared libraries: libfoo.so.1: cannot open shared object file: No such file or directory' >&2; exit 127";

fn systemd() -> Options {
    Options {
        backend: "systemd",
        ..Options::default()
    }
}

/// Waits for `failed`, then checks it stays so with no restart: the reason names the cause
/// (and the engine's line when `line`).
async fn failed_at_once(d: &Daemon, name: &str, line: bool) {
    let (_, _, r) = d
        .wait_module(name, T, |s, _, r| {
            s == "failed" && (!line || r.contains("libfoo.so.1: cannot open shared object file"))
        })
        .await;
    assert!(
        r.contains("exit-code 127") && r.contains("a configuration error, not restarted"),
        "{r}"
    );
    // The restart delay is 100 ms: a retry would have happened by now.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let p = d.module(name).await;
    assert_eq!(p.restarts().await.expect("Restarts"), 0, "not restarted");
    assert_eq!(p.state().await.expect("State"), "failed");
}

#[tokio::test]
async fn direct_a_missing_library_fails_at_once_with_the_engine_s_line() {
    let restart = "[restart]\npolicy = \"always\"\ndelay = \"100ms\"\n";
    let d = Daemon::start(&[("nolib", &sh_module(MISSING_LIB, restart))]).await;
    failed_at_once(&d, "nolib", true).await;
}

#[tokio::test]
async fn systemd_a_missing_library_fails_at_once_with_the_engine_s_line() {
    let name = format!("nolib{}", std::process::id());
    let unit = format!("modvisor-{name}.service");
    let _u = Units(vec![unit.clone()]);
    let restart = "[restart]\npolicy = \"always\"\ndelay = \"100ms\"\n";
    let d = Daemon::start_with(&[(&name, &sh_module(MISSING_LIB, restart))], systemd()).await;
    // The engine's line comes from the journal here, when journald could still attribute it
    // to the unit: a process that exits at once sometimes loses its _SYSTEMD_* fields, and
    // modvisord quotes only lines its trusted matches find (see the README). The decision does
    // not depend on it: exit 127 is a configuration error.
    failed_at_once(&d, &name, false).await;
    // systemd did not retry it either (RestartPreventExitStatus=126 127).
    let sys = zbus::Connection::system().await.expect("the testbed's bus");
    let s = zbus_systemd::systemd1::ServiceProxy::builder(&sys)
        .path(modvisor::runtime::systemd::unit_path(&unit))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("service proxy");
    assert_eq!(s.n_restarts().await.expect("NRestarts"), 0);
    assert_eq!(s.exec_main_status().await.expect("ExecMainStatus"), 127);
}

/// A command that does not exist: nothing runs, the reason says so, no retry.
#[tokio::test]
async fn direct_a_missing_command_is_not_retried() {
    let m = root_engine(
        "trusted = true\n[restart]\npolicy = \"always\"\ndelay = \"100ms\"\n[native]\ncommand = [\"/nonexistent/engine\"]\n",
    );
    let d = Daemon::start(&[("nocmd", &m)]).await;
    let (_, _, r) = d.wait_state("nocmd", "failed").await;
    assert!(r.contains("program /nonexistent/engine not found"), "{r}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let p = d.module("nocmd").await;
    assert_eq!(p.restarts().await.expect("Restarts"), 0);
}

/// A crash loop waits longer before each restart: the times between the restarts' starting
/// states grow (100 ms, 200 ms, 400 ms, ...).
#[tokio::test]
async fn a_crash_loop_backs_off() {
    let restart = "[restart]\ndelay = \"100ms\"\nmax_delay = \"1s\"\nmax = 10\nwindow = \"1m\"\n";
    let d = Daemon::start(&[]).await;
    let m = d.manager().await;
    let mut changes = m.receive_module_changed().await.expect("ModuleChanged");
    d.write_manifest(
        "flap",
        &sh_module("echo 'error: boom' >&2; exit 3", restart),
    );
    // (time, reason) of each "restarting in" announcement.
    let mut announced = Vec::new();
    let deadline = Instant::now() + T;
    while announced.len() < 5 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(sig)) = tokio::time::timeout(left, changes.next()).await else {
            panic!("only {announced:?} within {T:?}:\n{}", d.log());
        };
        let a = sig.args().expect("args");
        if a.name == "flap" && a.reason.contains("restarting in") {
            announced.push((Instant::now(), a.reason.to_string()));
        }
    }
    let delays = ["100ms", "200ms", "400ms", "800ms", "1s"];
    for ((_, r), want) in announced.iter().zip(delays) {
        assert!(
            r.contains(&format!("restarting in {want} ")) && r.contains("error: boom"),
            "{r} (expected {want})"
        );
    }
    // The gaps between the announcements follow the delays (each includes one run of the
    // engine, a few ms).
    let gaps: Vec<Duration> = announced
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0))
        .collect();
    for (g, min) in gaps.iter().zip([100u64, 200, 400, 800]) {
        assert!(
            *g >= Duration::from_millis(min),
            "gaps {gaps:?} grow with the delays"
        );
    }
    assert!(gaps[3] > gaps[0] * 3, "gaps {gaps:?}");
}
