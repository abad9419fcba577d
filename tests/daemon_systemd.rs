//! The systemd backend against the testbed's real systemd (a manager registered as
//! org.freedesktop.systemd1 on the system bus): everything is proven by reading systemd,
//! /proc and the journal. Fails (never skips) when systemd is not there.

mod common;

use std::time::{Duration, Instant};

use common::*;
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

/// A module name unique to this test process (units are global to the manager).
fn uniq(tag: &str) -> String {
    format!("sd{}-{tag}", std::process::id())
}

async fn system_bus() -> zbus::Connection {
    zbus::Connection::system()
        .await
        .expect("the testbed's system bus (make test brings it up)")
}

async fn unit(conn: &zbus::Connection, name: &str) -> (UnitProxy<'static>, ServiceProxy<'static>) {
    let path = modvisor::runtime::systemd::unit_path(name);
    let u = UnitProxy::builder(conn)
        .path(path.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("unit proxy");
    let s = ServiceProxy::builder(conn)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("service proxy");
    (u, s)
}

async fn start(manifests: &[(&str, &str)]) -> Daemon {
    Daemon::start_with(
        manifests,
        Options {
            backend: "systemd",
            ..Options::default()
        },
    )
    .await
}

fn opts() -> Options {
    Options {
        backend: "systemd",
        ..Options::default()
    }
}

#[tokio::test]
async fn transient_unit_has_the_properties_and_core_limit_zero() {
    let name = uniq("props");
    let unit_name = format!("modvisor-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let tag = format!("unit-line-{}", std::process::id());
    let m = sh_module(
        &format!("echo {tag}; exec sleep 1000"),
        "description = \"props test\"\n[resources]\nmemory_max = \"256M\"\n[runtime]\nmodes = [\"native\"]\nstop_timeout = \"7s\"\n[restart]\npolicy = \"always\"\ndelay = \"300ms\"\nmax = 4\nwindow = \"2m\"\n",
    );
    let d = start(&[(&name, &m)]).await;
    d.wait_state(&name, "running").await;
    let mm = d.manager().await;
    assert_eq!(mm.native_backend().await.expect("Backend"), "systemd");
    let p = d.module(&name).await;
    assert_eq!(p.unit().await.expect("Unit"), unit_name);
    assert_eq!(p.backend().await.expect("Backend"), "systemd");
    let sys = system_bus().await;
    let (u, s) = unit(&sys, &unit_name).await;
    assert_eq!(u.active_state().await.expect("ActiveState"), "active");
    assert_eq!(
        u.description().await.expect("Description"),
        format!("modvisor module {name}: props test")
    );
    assert_eq!(s.limit_core().await.expect("LimitCORE"), 0);
    assert_eq!(s.limit_core_soft().await.expect("LimitCORESoft"), 0);
    assert_eq!(s.kill_mode().await.expect("KillMode"), "control-group");
    assert_eq!(s.restart().await.expect("Restart"), "always");
    assert_eq!(s.restart_u_sec().await.expect("RestartUSec"), 300_000);
    assert_eq!(
        s.timeout_stop_u_sec().await.expect("TimeoutStopUSec"),
        7_000_000
    );
    assert_eq!(s.memory_max().await.expect("MemoryMax"), 256 << 20);
    assert_eq!(u.start_limit_burst().await.expect("StartLimitBurst"), 4);
    assert_eq!(
        u.start_limit_interval_u_sec()
            .await
            .expect("StartLimitIntervalUSec"),
        120_000_000
    );
    assert_eq!(s.syslog_identifier().await.expect("SyslogIdentifier"), name);
    assert!(
        s.environment()
            .await
            .expect("Environment")
            .iter()
            .any(|e| e.starts_with("MODVISOR_SPEC="))
    );
    let main = s.main_pid().await.expect("MainPID");
    assert_eq!(p.main_pid().await.expect("MainPID"), main);
    let limits = std::fs::read_to_string(format!("/proc/{main}/limits")).expect("limits");
    let core: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core")
        .split_whitespace()
        .collect();
    assert_eq!((core[4], core[5]), ("0", "0"));
    // The engine's output is in the journal under its unit (a user manager: _SYSTEMD_USER_UNIT).
    let deadline = Instant::now() + T;
    loop {
        let out = std::process::Command::new("journalctl")
            .args([
                "--no-pager",
                "-o",
                "cat",
                &format!("_SYSTEMD_USER_UNIT={unit_name}"),
                "+",
                &format!("_SYSTEMD_UNIT={unit_name}"),
            ])
            .output()
            .expect("journalctl");
        if String::from_utf8_lossy(&out.stdout).contains(&tag) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the unit's output is not in the journal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // modvisorctl logs finds it too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(["logs", &name])
        .output()
        .expect("modvisorctl logs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&tag),
        "modvisorctl logs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn killed_engine_is_restarted_by_systemd_offline_then_online() {
    let name = uniq("kill");
    let unit_name = format!("modvisor-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let d = start(&[(
        &name,
        &sh_module("exec sleep 1000", "[restart]\ndelay = \"200ms\"\n"),
    )])
    .await;
    d.wait_state(&name, "running").await;
    let sys = system_bus().await;
    let (_, s) = unit(&sys, &unit_name).await;
    let pid1 = s.main_pid().await.expect("MainPID");
    assert_eq!(s.n_restarts().await.expect("NRestarts"), 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let (_, h, r) = d.wait_module(&name, T, |_, h, _| h == "offline").await;
    assert_eq!(h, "offline");
    assert!(r.contains("signal KILL"), "{r}");
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let pid2 = s.main_pid().await.expect("MainPID");
    assert_ne!(pid1, pid2);
    assert_eq!(s.n_restarts().await.expect("NRestarts"), 1);
    assert_eq!(d.module(&name).await.restarts().await.expect("Restarts"), 1);
    assert_eq!(
        d.module(&name).await.main_pid().await.expect("MainPID"),
        pid2
    );
}

#[tokio::test]
async fn stop_leaves_no_process_of_the_cgroup_including_a_grandchild() {
    let name = uniq("stop");
    let unit_name = format!("modvisor-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("grandchild");
    let script = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 1000' & exec sleep 1000",
        pidfile.display()
    );
    let d = start(&[(&name, &sh_module(&script, ""))]).await;
    d.wait_state(&name, "running").await;
    let deadline = Instant::now() + T;
    let grandchild: u32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(Instant::now() < deadline, "grandchild never wrote its pid");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let main = d.module(&name).await.main_pid().await.expect("MainPID");
    assert!(alive(grandchild) && alive(main));
    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    assert!(!alive(main), "main process stopped");
    assert!(
        !alive(grandchild),
        "the setsid grandchild in the unit's cgroup is stopped too"
    );
    let (st, h, _) = d.wait_state(&name, "inactive").await;
    assert_eq!((st.as_str(), h.as_str()), ("inactive", "offline"));
}

#[tokio::test]
async fn kill_9_of_modvisord_keeps_the_same_main_pid_and_no_duplicate() {
    let name = uniq("adopt");
    let unit_name = format!("modvisor-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let mut d = start(&[(&name, &sh_module("exec sleep 1000", ""))]).await;
    d.wait_state(&name, "running").await;
    let pid = d.module(&name).await.main_pid().await.expect("MainPID");
    d.kill9();
    assert!(alive(pid), "the engine does not depend on modvisord");
    d.spawn(&[]).await;
    d.wait_state(&name, "running").await;
    assert_eq!(
        d.module(&name).await.main_pid().await.expect("MainPID"),
        pid,
        "adopted, not restarted"
    );
    let sys = system_bus().await;
    let (_, s) = unit(&sys, &unit_name).await;
    assert_eq!(s.main_pid().await.expect("MainPID"), pid);
    assert_eq!(s.n_restarts().await.expect("NRestarts"), 0);
    let mgr = ManagerProxy::new(&sys).await.expect("manager");
    let units = mgr
        .list_units_by_patterns(vec![], vec![format!("modvisor-{name}*")])
        .await
        .expect("ListUnitsByPatterns");
    assert_eq!(units.len(), 1, "{units:?}");
    assert!(d.log().contains("adopted"), "{}", d.log());
    // A clean stop of modvisord also leaves the unit running, for the next one to adopt.
    assert_eq!(d.stop(), Some(0));
    assert!(alive(pid));
}

#[tokio::test]
async fn command_change_restarts_exactly_that_unit_and_removal_stops_it() {
    let (a, b) = (uniq("edit-a"), uniq("edit-b"));
    let (ua, ub) = (
        format!("modvisor-{a}.service"),
        format!("modvisor-{b}.service"),
    );
    let _g = Units(vec![ua.clone(), ub.clone()]);
    let d = start(&[
        (&a, &sh_module("exec sleep 1000", "")),
        (&b, &sh_module("exec sleep 1000", "")),
    ])
    .await;
    d.wait_state(&a, "running").await;
    d.wait_state(&b, "running").await;
    let pa = d.module(&a).await.main_pid().await.expect("pid");
    let pb = d.module(&b).await.main_pid().await.expect("pid");
    d.write_manifest(&a, &sh_module("exec sleep 999", ""));
    let pa_ref = pa;
    let deadline = Instant::now() + T;
    loop {
        let now = d.module(&a).await.main_pid().await.expect("pid");
        let st = d.module(&a).await.state().await.expect("state");
        // Type=simple: "running" from the fork on; the sandbox setup before the exec takes a
        // moment, so wait for the new command line too.
        let cmdline = std::fs::read_to_string(format!("/proc/{now}/cmdline")).unwrap_or_default();
        if now != 0 && now != pa_ref && st == "running" && cmdline == "sleep\0999\0" {
            break;
        }
        assert!(Instant::now() < deadline, "unit a was not replaced");
        d.wait_module(&a, Duration::from_secs(2), |_, _, _| true)
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = d.module(&a).await.main_pid().await.expect("pid");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{new}/cmdline")).expect("cmdline"),
        "sleep\0999\0"
    );
    assert!(!alive(pa));
    assert_eq!(
        d.module(&b).await.main_pid().await.expect("pid"),
        pb,
        "the other unit is untouched"
    );

    std::fs::remove_file(d.modules.join(format!("{b}.toml"))).expect("rm");
    d.wait_module(&b, T, |s, _, _| s == "(absent)").await;
    assert!(!alive(pb));
    let sys = system_bus().await;
    let (u, _) = unit(&sys, &ub).await;
    let state = u.active_state().await.unwrap_or_else(|_| "inactive".into());
    assert_eq!(state, "inactive");
}

#[tokio::test]
async fn crash_loop_ends_failed_with_the_systemd_result() {
    let name = uniq("crash");
    let unit_name = format!("modvisor-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let d = start(&[(
        &name,
        &sh_module(
            "echo crashing; exit 1",
            "[restart]\ndelay = \"100ms\"\nmax = 2\nwindow = \"1m\"\n",
        ),
    )])
    .await;
    let (st, h, r) = d.wait_state(&name, "failed").await;
    assert_eq!((st.as_str(), h.as_str()), ("failed", "offline"));
    assert!(r.contains("exit-code 1"), "{r}");
    assert!(r.contains("restart limit reached"), "{r}");
    let sys = system_bus().await;
    let (u, s) = unit(&sys, &unit_name).await;
    assert_eq!(u.active_state().await.expect("ActiveState"), "failed");
    assert_eq!(s.n_restarts().await.expect("NRestarts"), 2);
    // Left stopped: still failed a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        d.module(&name).await.state().await.expect("state"),
        "failed"
    );
    // Until started again.
    d.manager()
        .await
        .start_module(&name)
        .await
        .expect("StartModule");
    d.wait_module(&name, T, |_, _, r| r.contains("systemd restarts"))
        .await;
}

fn write_user_unit(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new("/root/.config/systemd/user");
    std::fs::create_dir_all(dir).expect("mkdir user unit dir");
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write unit");
    p
}

/// A new unit file is read when the unit is first referenced: no daemon-reload, which would
/// also re-read (and reset the counters of) every other test's transient units.
async fn load_unit(sys: &zbus::Connection, name: &str) {
    ManagerProxy::new(sys)
        .await
        .expect("manager")
        .load_unit(name.to_string())
        .await
        .expect("LoadUnit");
}

#[tokio::test]
async fn existing_unit_is_observed_and_never_duplicated() {
    let name = uniq("existing");
    let unit_name = format!("mvtest-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let file = write_user_unit(&unit_name, "[Service]\nExecStart=/bin/sleep 1000\n");
    let sys = system_bus().await;
    load_unit(&sys, &unit_name).await;
    // The engine is already running when modvisord arrives.
    let mgr = ManagerProxy::new(&sys).await.expect("manager");
    mgr.start_unit(unit_name.clone(), "replace".into())
        .await
        .expect("StartUnit");
    let (u, s) = unit(&sys, &unit_name).await;
    let deadline = Instant::now() + T;
    while s.main_pid().await.unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = s.main_pid().await.expect("MainPID");
    let m = format!("trusted = true\n[native]\nunit = \"{unit_name}\"\n");
    let d = start(&[(&name, &m)]).await;
    d.wait_state(&name, "running").await;
    let p = d.module(&name).await;
    assert_eq!(
        p.main_pid().await.expect("MainPID"),
        pid,
        "observed, not started again"
    );
    assert_eq!(p.unit().await.expect("Unit"), unit_name);
    let sleepers = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|x| x.parse::<u32>().ok()))
        .filter(|p| {
            alive(*p)
                && std::fs::read_to_string(format!("/proc/{p}/cgroup"))
                    .is_ok_and(|c| c.contains(&unit_name))
        })
        .count();
    assert_eq!(sleepers, 1, "exactly one process in the unit's cgroup");
    // Stop and start through modvisor act on that unit.
    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    assert_eq!(u.active_state().await.expect("ActiveState"), "inactive");
    d.manager()
        .await
        .start_module(&name)
        .await
        .expect("StartModule");
    d.wait_state(&name, "running").await;
    assert_eq!(u.active_state().await.expect("ActiveState"), "active");
    drop(d);
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn existing_unit_is_not_started_when_its_port_is_taken() {
    let name = uniq("port");
    let unit_name = format!("mvtest-{name}.service");
    let _g = Units(vec![unit_name.clone()]);
    let file = write_user_unit(&unit_name, "[Service]\nExecStart=/bin/sleep 1000\n");
    let sys = system_bus().await;
    load_unit(&sys, &unit_name).await;
    // Something else (an engine started by hand) holds the port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let m =
        format!("trusted = true\n[native]\nunit = \"{unit_name}\"\n[health]\ntcp = \"{addr}\"\n");
    let d = Daemon::start_with(&[(&name, &m)], opts()).await;
    let (st, _, r) = d.wait_state(&name, "failed").await;
    assert_eq!(st, "failed");
    assert!(r.contains("already in use"), "{r}");
    let (u, _) = unit(&sys, &unit_name).await;
    assert_eq!(
        u.active_state().await.expect("ActiveState"),
        "inactive",
        "not started"
    );
    drop(listener);
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn after_a_restart_changed_specs_are_replaced_and_orphans_stopped() {
    let (keep, change, gone) = (uniq("keep"), uniq("change"), uniq("gone"));
    let units: Vec<String> = [&keep, &change, &gone]
        .iter()
        .map(|n| format!("modvisor-{n}.service"))
        .collect();
    let _g = Units(units.clone());
    let mut d = start(&[
        (&keep, &sh_module("exec sleep 1000", "")),
        (&change, &sh_module("exec sleep 1000", "")),
        (&gone, &sh_module("exec sleep 1000", "")),
    ])
    .await;
    for n in [&keep, &change, &gone] {
        d.wait_state(n, "running").await;
    }
    let pid = |n: &str| {
        let n = n.to_string();
        let d = &d;
        async move { d.module(&n).await.main_pid().await.expect("pid") }
    };
    let (pk, pc, pg) = (pid(&keep).await, pid(&change).await, pid(&gone).await);
    d.kill9();
    // While modvisord is down the admin edits one manifest and removes another.
    d.write_manifest(&change, &sh_module("exec sleep 998", ""));
    std::fs::remove_file(d.modules.join(format!("{gone}.toml"))).expect("rm");
    d.spawn(&[]).await;
    d.wait_state(&keep, "running").await;
    assert_eq!(
        d.module(&keep).await.main_pid().await.expect("pid"),
        pk,
        "unchanged spec: adopted"
    );
    let deadline = Instant::now() + T;
    loop {
        let now = d.module(&change).await.main_pid().await.expect("pid");
        if now != 0 && now != pc {
            break;
        }
        assert!(Instant::now() < deadline, "changed spec was not replaced");
        d.wait_module(&change, Duration::from_secs(2), |_, _, _| true)
            .await;
    }
    assert!(!alive(pc));
    let deadline = Instant::now() + T;
    while alive(pg) {
        assert!(
            Instant::now() < deadline,
            "the unit whose manifest is gone still runs"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alive(pk));
}
