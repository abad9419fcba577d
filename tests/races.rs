//! The lifecycle races, driven over D-Bus against real backends: a stop issued while a restart
//! is under way, or between two automatic restarts of a crash loop, must win, answer OK only
//! once the module is stopped, and leave it stopped. The interleaving is driven (each stop is
//! sent once the daemon shows the restart or the crash loop in progress), and each case is
//! looped.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

/// Ignores SIGTERM (and so do its children), so a stop, and the stop of a restart, is under
/// way for the whole `stop_timeout` of [`SLOW_STOP`] until the SIGKILL, whatever the backend
/// and however loaded the machine, once the shell has run its `trap` (see
/// [`wait_term_ignored`]: a unit is active as soon as the shell is exec'd, and a SIGTERM
/// before the trap ends it at once).
const SLOW_STOPPER: &str = "trap '' TERM; echo up; while :; do sleep 0.1; done";
const SLOW_STOP: &str = "[runtime]\nstop_timeout = \"1s\"\n";
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

/// Waits until the module's main process ignores SIGTERM (its `trap` ran), from
/// /proc/PID/status, bounded.
async fn wait_term_ignored(d: &Daemon, name: &str) {
    let p = d.module(name).await;
    let deadline = Instant::now() + T;
    loop {
        let pid = p.main_pid().await.expect("MainPID");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| pid != 0 && m & (1 << (libc::SIGTERM - 1)) != 0);
        if ignored {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: pid {pid} does not ignore SIGTERM within {T:?}; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A call to the daemon, bounded: one that is never answered fails with the daemon's log.
async fn answered<R>(d: &Daemon, what: &str, call: impl std::future::Future<Output = R>) -> R {
    match tokio::time::timeout(T, call).await {
        Ok(r) => r,
        Err(_) => panic!("{what} not answered within {T:?}; log:\n{}", d.log()),
    }
}

/// RestartModule, then StopModule while the restart's stop is under way.
async fn restart_then_stop(d: &Daemon, name: &str) {
    let m = d.manager().await;
    for i in 0..LOOPS {
        d.wait_state(name, "running").await;
        wait_term_ignored(d, name).await;
        let restart = {
            let m = m.clone();
            let name = name.to_string();
            tokio::spawn(async move { m.restart_module(&name).await })
        };
        d.wait_state(name, "stopping").await;
        answered(d, "StopModule", m.stop_module(name))
            .await
            .expect("StopModule");
        let restarted = answered(d, "RestartModule", restart).await.expect("task");
        assert!(
            restarted
                .as_ref()
                .is_err_and(|e| e.to_string().contains("cancelled")),
            "loop {i}: the restart overtaken by a stop is answered as cancelled: {restarted:?}; log:\n{}",
            d.log()
        );
        stays_stopped(d, name, Duration::from_secs(1)).await;
        if i + 1 < LOOPS {
            answered(d, "StartModule", m.start_module(name))
                .await
                .expect("StartModule");
        }
    }
}

/// StopModule between two automatic restarts of a crash loop (and once while it runs).
async fn stop_in_crash_loop(d: &Daemon, name: &str, between: &str) {
    let m = d.manager().await;
    for i in 0..LOOPS {
        let b = between.to_string();
        d.wait_module(name, T, move |_, _, r| r.contains(&b)).await;
        answered(d, "StopModule", m.stop_module(name))
            .await
            .expect("StopModule");
        stays_stopped(d, name, Duration::from_millis(1500)).await;
        // The last loop leaves it stopped, for the check of the unit itself.
        if i + 1 < LOOPS {
            answered(d, "StartModule", m.start_module(name))
                .await
                .expect("StartModule");
        }
    }
}

#[tokio::test]
async fn direct_restart_then_stop_stays_stopped() {
    let d = Daemon::start(&[("rs", &sh_module(SLOW_STOPPER, SLOW_STOP))]).await;
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
    let d = Daemon::start_with(&[(&name, &sh_module(SLOW_STOPPER, SLOW_STOP))], systemd()).await;
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
