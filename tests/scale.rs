//! Correctness at scale on the testbed's real systemd: 300 modules dropped in at once all
//! reach running and none fails for the bus's sake (dbus-daemon allows a connection 128
//! pending calls and 512 match rules), the match rules modvisord holds do not grow with the
//! modules, and removing the manifests stops every unit. Timed figures are the benchmark's
//! (scripts/bench), not this test's. Fails (never skips) when systemd is not there.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{FutureExt, StreamExt};

const MODULES: usize = 300;
/// Generous for a loaded 2-core machine (measured: a few seconds).
const LIMIT: Duration = Duration::from_secs(60);

fn names() -> Vec<String> {
    (0..MODULES)
        .map(|i| format!("sc{}-{i:03}", std::process::id()))
        .collect()
}

/// Written straight into the directory (not through `write_manifest`): the engine runs as
/// root like the other suites' (`root_engine`), so the test needs no engine user on the host.
fn manifest(name: &str) -> String {
    root_engine(&format!(
        "name = \"{name}\"\ntrusted = true\n[runtime]\nmodes = [\"native\"]\n[native]\ncommand = [\"/bin/sleep\", \"1000\"]\n[restart]\npolicy = \"no\"\n"
    ))
}

/// Every module's (state, reason), or the daemon's log on a failed call.
async fn states(d: &Daemon) -> HashMap<String, (String, String)> {
    let rows = d
        .manager()
        .await
        .list_modules()
        .await
        .unwrap_or_else(|e| panic!("ListModules: {e}; log:\n{}", d.log()));
    rows.into_iter()
        .map(|r| (r.0, (r.2, r.4)))
        .filter(|(n, _)| n.starts_with(&format!("sc{}-", std::process::id())))
        .collect()
}

/// Waits (re-reading after each burst of ModuleChanged) until `done` holds for the table;
/// panics at once when a module failed, or at the deadline.
async fn wait_all(
    d: &Daemon,
    what: &str,
    done: impl Fn(&HashMap<String, (String, String)>) -> bool,
) {
    // The signals on a connection of their own: 300 modules send more than zbus queues for
    // a stream (64), and a full queue stops the connection from reading, replies included.
    let conn = d.bus.connect().await;
    let m = modvisor::dbus::client::ManagerProxy::new(&conn)
        .await
        .expect("manager proxy");
    let mut changes = m.receive_module_changed().await.expect("ModuleChanged");
    let deadline = Instant::now() + LIMIT;
    loop {
        let now = states(d).await;
        if let Some((n, (_, why))) = now.iter().find(|(_, (s, _))| s == "failed") {
            panic!("{n} failed: {why}; log:\n{}", d.log());
        }
        if done(&now) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, changes.next()).await.is_err() {
            let running = now.values().filter(|(s, _)| s == "running").count();
            let mut other: Vec<_> = now.iter().filter(|(_, (s, _))| s != "running").collect();
            other.sort();
            let log = d.log();
            let first: Vec<&str> = match other.first() {
                Some((n, _)) => log.lines().filter(|l| l.contains(n.as_str())).collect(),
                None => Vec::new(),
            };
            panic!(
                "{what}: not within {LIMIT:?} ({running} of {} running); not running: {:?}; the first one's log:\n{}",
                now.len(),
                &other[..other.len().min(10)],
                first.join("\n")
            );
        }
        // A burst of changes is one re-read.
        while changes.next().now_or_never().flatten().is_some() {}
    }
}

/// The match rules modvisord's connections hold on the system bus (dbus-daemon's Stats).
async fn match_rules_of(pid: u32) -> u32 {
    let sys = zbus::Connection::system()
        .await
        .expect("the testbed's system bus (make test brings it up)");
    let dbus = zbus::fdo::DBusProxy::new(&sys).await.expect("DBus proxy");
    let mut total = 0;
    for name in dbus.list_names().await.expect("ListNames") {
        if !name.starts_with(':') {
            continue;
        }
        let Ok(p) = dbus
            .get_connection_unix_process_id(name.clone().into())
            .await
        else {
            continue;
        };
        if p != pid {
            continue;
        }
        let reply = sys
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus.Debug.Stats"),
                "GetConnectionStats",
                &(name.as_str(),),
            )
            .await
            .expect("GetConnectionStats (dbus-daemon with stats)");
        let stats: HashMap<String, zbus::OwnedVariant> = reply.body().deserialize().expect("stats");
        total += stats
            .get("MatchRules")
            .and_then(|v| u32::try_from(v).ok())
            .expect("MatchRules");
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_modules_dropped_in_at_once_all_run_and_stop() {
    let names = names();
    let _g = Units(
        names
            .iter()
            .map(|n| format!("modvisor-{n}.service"))
            .collect(),
    );
    let mut d = Daemon::start_with(
        &[],
        Options {
            backend: "systemd",
            ..Options::default()
        },
    )
    .await;
    // Written beside the directory, then renamed in: one burst, no partial file seen.
    let staging = d.dir.path().join("staging");
    std::fs::create_dir_all(&staging).expect("mkdir staging");
    for n in &names {
        std::fs::write(staging.join(format!("{n}.toml")), manifest(n)).expect("write");
    }
    let t0 = Instant::now();
    for n in &names {
        let file = format!("{n}.toml");
        std::fs::rename(staging.join(&file), d.modules.join(&file)).expect("rename");
    }
    wait_all(&d, "all running", |t| {
        t.len() == MODULES && t.values().all(|(s, _)| s == "running")
    })
    .await;
    eprintln!(
        "{MODULES} modules running {:?} after the drop",
        t0.elapsed()
    );
    let sys = zbus::Connection::system().await.expect("system bus");
    let systemd = zbus_systemd::systemd1::ManagerProxy::new(&sys)
        .await
        .expect("systemd manager");
    let prefix = format!("modvisor-sc{}-*", std::process::id());
    let active = systemd
        .list_units_by_patterns(vec!["active".into()], vec![prefix.clone()])
        .await
        .expect("ListUnitsByPatterns");
    assert_eq!(active.len(), MODULES, "units active in systemd");
    let rules = match_rules_of(d.pid()).await;
    assert!(
        rules <= 8,
        "modvisord holds {rules} match rules on the system bus with {MODULES} modules"
    );
    for n in &names {
        std::fs::remove_file(d.modules.join(format!("{n}.toml"))).expect("rm");
    }
    wait_all(&d, "all removed", |t| t.is_empty()).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = systemd
            .list_units_by_patterns(vec![], vec![prefix.clone()])
            .await
            .expect("ListUnitsByPatterns");
        let loaded: Vec<_> = left.iter().filter(|u| u.3 != "inactive").collect();
        if loaded.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} units still not inactive, e.g. {:?}",
            loaded.len(),
            loaded.first().map(|u| (&u.0, &u.3))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(d.stop(), Some(0), "modvisord exits cleanly");
}
