//! The lifecycle races, driven over D-Bus against real backends: a stop issued while a restart
//! is under way, or between two automatic restarts of a crash loop, must win, answer OK only
//! once the module is stopped, and leave it stopped. The interleaving is driven (each stop is
//! sent once the daemon shows the restart or the crash loop in progress), and each case is
//! looped.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// Exits half a second after SIGTERM, so a stop (and a restart) is visibly under way.
const SLOW_STOPPER: &str = "trap 'sleep 0.5; exit 0' TERM; echo up; while :; do sleep 0.1; done";
const LOOPS: usize = 3;

fn systemd() -> Options {
    Options {
        backend: "systemd",
        ..Options::default()
    }
}

/// After `d` answered a stop of `name`: it is inactive now and nothing starts it again
/// within `quiet` (every ModuleChanged meanwhile is checked).
async fn stays_stopped(d: &Daemon, name: &str, quiet: Duration) {
    let m = d.manager().await;
    let mut changes = m.receive_module_changed().await.expect("ModuleChanged");
    let p = d.module(name).await;
    let st = p.state().await.expect("State");
    assert!(
        st == "inactive",
        "{name}: {st} right after StopModule answered; log:\n{}",
        d.log()
    );
    assert_eq!(p.main_pid().await.expect("MainPID"), 0);
    let deadline = Instant::now() + quiet;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, changes.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(sig)) => {
                let a = sig.args().expect("args");
                if a.name == name {
                    assert!(
                        a.state == "inactive",
                        "{name} came back after StopModule: {} ({}); log:\n{}",
                        a.state,
                        a.reason,
                        d.log()
                    );
                }
            }
        }
    }
    assert_eq!(p.state().await.expect("State"), "inactive");
}

/// RestartModule, then StopModule while the restart's stop is under way.
async fn restart_then_stop(d: &Daemon, name: &str) {
    let m = d.manager().await;
    for i in 0..LOOPS {
        d.wait_state(name, "running").await;
        let restart = {
            let m = m.clone();
            let name = name.to_string();
            tokio::spawn(async move { m.restart_module(&name).await })
        };
        d.wait_state(name, "stopping").await;
        m.stop_module(name).await.expect("StopModule");
        let restarted = tokio::time::timeout(T, restart)
            .await
            .expect("RestartModule answered")
            .expect("task");
        assert!(
            restarted
                .as_ref()
                .is_err_and(|e| e.to_string().contains("cancelled")),
            "loop {i}: the restart overtaken by a stop is answered as cancelled: {restarted:?}"
        );
        stays_stopped(d, name, Duration::from_secs(1)).await;
        if i + 1 < LOOPS {
            m.start_module(name).await.expect("StartModule");
        }
    }
}

/// StopModule between two automatic restarts of a crash loop (and once while it runs).
async fn stop_in_crash_loop(d: &Daemon, name: &str, between: &str) {
    let m = d.manager().await;
    for i in 0..LOOPS {
        let b = between.to_string();
        d.wait_module(name, T, move |_, _, r| r.contains(&b)).await;
        m.stop_module(name).await.expect("StopModule");
        stays_stopped(d, name, Duration::from_millis(1500)).await;
        // The last loop leaves it stopped, for the check of the unit itself.
        if i + 1 < LOOPS {
            m.start_module(name).await.expect("StartModule");
        }
    }
}

#[tokio::test]
async fn direct_restart_then_stop_stays_stopped() {
    let d = Daemon::start(&[("rs", &sh_module(SLOW_STOPPER, ""))]).await;
    restart_then_stop(&d, "rs").await;
}

#[tokio::test]
async fn direct_stop_during_a_crash_loop_stays_stopped() {
    let restart = "[restart]\ndelay = \"300ms\"\nmax = 1000\nwindow = \"1m\"\n";
    let d = Daemon::start(&[("cl", &sh_module("sleep 0.2; exit 1", restart))]).await;
    stop_in_crash_loop(&d, "cl", "restarting in 300ms").await;
}

#[tokio::test]
async fn systemd_restart_then_stop_stays_stopped() {
    let name = format!("rs{}", std::process::id());
    let _u = Units(vec![format!("modvisor-{name}.service")]);
    let d = Daemon::start_with(&[(&name, &sh_module(SLOW_STOPPER, ""))], systemd()).await;
    restart_then_stop(&d, &name).await;
}

#[tokio::test]
async fn systemd_stop_during_a_crash_loop_stays_stopped() {
    let name = format!("cl{}", std::process::id());
    let unit = format!("modvisor-{name}.service");
    let _u = Units(vec![unit.clone()]);
    let restart = "[restart]\ndelay = \"300ms\"\nmax = 1000\nwindow = \"1m\"\n";
    let d = Daemon::start_with(
        &[(&name, &sh_module("sleep 0.2; exit 1", restart))],
        systemd(),
    )
    .await;
    // Between two of systemd's automatic restarts (the unit is in auto-restart).
    stop_in_crash_loop(&d, &name, "systemd restarts").await;
    let out = std::process::Command::new("systemctl")
        .args(["--user", "show", "-p", "ActiveState", "--value", &unit])
        .output()
        .expect("systemctl");
    let st = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        st == "inactive" || st.is_empty(),
        "the unit after the last stop: {st}"
    );
}
