//! modvisord against a private real dbus-daemon (with the shipped policy), direct backend:
//! everything is checked as a client sees it (D-Bus) and by reading the real system (/proc).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;

const SLEEPER: &str = "echo started; exec sleep 1000";

#[tokio::test]
async fn modules_appear_start_and_report_state() {
    let d = Daemon::start(&[
        ("alpha", &sh_module(SLEEPER, "")),
        (
            "beta",
            &sh_module(SLEEPER, "description = \"second\"\nenabled = false\n"),
        ),
    ])
    .await;
    d.wait_state("alpha", "running").await;
    let m = d.manager().await;
    let rows = m.list_modules().await.expect("ListModules");
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, vec!["alpha", "beta"]);
    let alpha = rows.iter().find(|r| r.0 == "alpha").expect("alpha");
    assert_eq!(
        (alpha.1.as_str(), alpha.2.as_str(), alpha.3.as_str()),
        ("native", "running", "online")
    );
    assert_eq!(alpha.5.as_str(), "/org/modvisor1/module/alpha");
    let beta = rows.iter().find(|r| r.0 == "beta").expect("beta");
    assert_eq!(
        (beta.2.as_str(), beta.3.as_str()),
        ("inactive", "offline"),
        "enabled = false is not started"
    );

    let a = d.module("alpha").await;
    let pid = a.main_pid().await.expect("MainPID");
    assert!(pid > 0 && alive(pid));
    assert_eq!(a.backend().await.expect("Backend"), "direct");
    assert_eq!(
        a.mode_reason().await.expect("ModeReason"),
        "native: the only mode of the module"
    );
    assert!(a.since().await.expect("Since") > 0);
    assert!(
        a.manifest_path()
            .await
            .expect("ManifestPath")
            .ends_with("modules.d/alpha.toml")
    );
    assert_eq!(m.native_backend().await.expect("Backend"), "direct");
    assert_eq!(m.modules_online().await.expect("ModulesOnline"), 1);
    assert_eq!(m.modules_offline().await.expect("ModulesOffline"), 1);
    assert_eq!(m.health().await.expect("Health"), "offline");
    assert_eq!(
        m.get_module("beta").await.expect("GetModule").as_str(),
        "/org/modvisor1/module/beta"
    );

    // The ObjectManager lists both module objects.
    let paths = managed_module_paths(&d.conn).await;
    assert_eq!(
        paths,
        vec!["/org/modvisor1/module/alpha", "/org/modvisor1/module/beta"]
    );

    // Start the disabled one through the API: PropertiesChanged/ModuleChanged follow.
    m.start_module("beta").await.expect("StartModule");
    d.wait_state("beta", "running").await;
    assert_eq!(m.modules_online().await.expect("ModulesOnline"), 2);
    assert_eq!(m.health().await.expect("Health"), "online");
}

#[tokio::test]
async fn module_limits_show_core_zero_and_own_process_group() {
    let d = Daemon::start(&[("lim", &sh_module(SLEEPER, ""))]).await;
    d.wait_state("lim", "running").await;
    let pid = d.module("lim").await.main_pid().await.expect("MainPID");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    let f: Vec<&str> = core.split_whitespace().collect();
    assert_eq!((f[4], f[5]), ("0", "0"), "{core}");
    // modvisord raised its own open-file limit; the engine got back the one it started with.
    let nofile = |pid: u32| -> (String, String) {
        let l = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let line = l
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("open files line")
            .to_string();
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[3].to_string(), f[4].to_string())
    };
    let (soft, hard) = nofile(d.pid());
    assert_eq!(soft, hard, "modvisord's soft limit is its hard one");
    assert_eq!(
        nofile(pid),
        (common::SERVICE_NOFILE.to_string(), hard),
        "the engine's"
    );
    // Its own process group, led by itself.
    let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))).expect("getpgid");
    assert_eq!(pgid.as_raw() as u32, pid);
}

#[tokio::test]
async fn killed_module_is_restarted() {
    let d = Daemon::start(&[(
        "victim",
        &sh_module(SLEEPER, "[restart]\ndelay = \"100ms\"\n"),
    )])
    .await;
    d.wait_state("victim", "running").await;
    let p = d.module("victim").await;
    let pid1 = p.main_pid().await.expect("MainPID");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    d.wait_module("victim", T, |_, _, r| r.contains("signal KILL"))
        .await;
    d.wait_module("victim", T, |s, h, _| s == "running" && h == "online")
        .await;
    let pid2 = p.main_pid().await.expect("MainPID");
    assert_ne!(pid1, pid2);
    assert!(alive(pid2));
    assert_eq!(p.restarts().await.expect("Restarts"), 1);
}

#[tokio::test]
async fn crash_loop_ends_failed_with_reason() {
    let d = Daemon::start(&[(
        "crashy",
        &sh_module(
            "echo dying; exit 3",
            "[restart]\ndelay = \"50ms\"\nmax = 2\nwindow = \"1m\"\n",
        ),
    )])
    .await;
    let (state, health, reason) = d.wait_state("crashy", "failed").await;
    assert_eq!(health, "offline");
    assert!(reason.contains("exit-code 3"), "{reason}");
    assert!(
        reason.contains("restart limit reached (2 restarts within 60s)"),
        "{reason}"
    );
    assert_eq!(state, "failed");
    let p = d.module("crashy").await;
    assert_eq!(p.restarts().await.expect("Restarts"), 2);
    assert_eq!(p.main_pid().await.expect("MainPID"), 0);
    // It stays stopped until started again; a start resets the budget.
    let m = d.manager().await;
    m.start_module("crashy").await.expect("StartModule");
    // The budget was reset: two more restarts (the loop takes ~100 ms, too quick to catch
    // "restart 1 of 2" in passing), then failed again.
    let deadline = Instant::now() + T;
    while p.restarts().await.expect("Restarts") < 4 {
        assert!(
            Instant::now() < deadline,
            "the start reset the restart budget"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.wait_state("crashy", "failed").await;
}

#[tokio::test]
async fn dropped_in_manifest_starts_within_a_second_and_removed_one_stops() {
    let d = Daemon::start(&[]).await;
    let t0 = Instant::now();
    d.write_manifest("late", &sh_module(SLEEPER, ""));
    d.wait_module("late", Duration::from_secs(1), |s, _, _| s == "running")
        .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let pid = d.module("late").await.main_pid().await.expect("MainPID");
    assert!(alive(pid));

    std::fs::remove_file(d.modules.join("late.toml")).expect("rm");
    d.wait_module("late", T, |s, _, _| s == "(absent)").await;
    assert!(!alive(pid), "the process of a removed module is stopped");
    let m = d.manager().await;
    let err = m.get_module("late").await.expect_err("gone");
    assert!(err.to_string().contains("NoSuchModule"), "{err}");
    let intro = zbus::fdo::IntrospectableProxy::builder(&d.conn)
        .destination("org.modvisor1")
        .path("/org/modvisor1")
        .build()
        .await
        .expect("introspect")
        .introspect()
        .await
        .expect("Introspect");
    assert!(
        !intro.contains("node name=\"module\""),
        "module object removed: {intro}"
    );
}

#[tokio::test]
async fn broken_manifest_is_reported_and_disturbs_nothing() {
    let d = Daemon::start(&[
        ("good", &sh_module(SLEEPER, "")),
        ("later-broken", &sh_module(SLEEPER, "")),
    ])
    .await;
    d.wait_state("good", "running").await;
    d.wait_state("later-broken", "running").await;
    let good_pid = d.module("good").await.main_pid().await.expect("pid");
    let lb_pid = d
        .module("later-broken")
        .await
        .main_pid()
        .await
        .expect("pid");

    // A new broken manifest: reported with file:line:col, nothing else touched.
    d.write_manifest(
        "bad",
        "trusted = true\n[native]\ncommand = \"not a list\"\n",
    );
    // And an existing module's manifest breaks: it keeps running as it was.
    d.write_manifest(
        "later-broken",
        "trusted = true\n[native]\ncomand = [\"/bin/true\"]\n",
    );
    let m = d.manager().await;
    let errors = m.reload().await.expect("Reload");
    assert_eq!(errors.len(), 2, "{errors:?}");
    let bad = errors
        .iter()
        .find(|e| e.0.ends_with("bad.toml"))
        .expect("bad.toml error");
    assert!(
        bad.1
            .ends_with("bad.toml:3:11: invalid type: string \"not a list\", expected a sequence"),
        "{}",
        bad.1
    );
    let lb = errors
        .iter()
        .find(|e| e.0.ends_with("later-broken.toml"))
        .expect("later-broken error");
    assert!(
        lb.1.contains("later-broken.toml:3:1: unknown field `comand`"),
        "{}",
        lb.1
    );
    let prop = m.manifest_errors().await.expect("ManifestErrors");
    assert_eq!(prop, errors);
    assert_eq!(
        d.module("good").await.main_pid().await.expect("pid"),
        good_pid
    );
    assert_eq!(
        d.module("later-broken")
            .await
            .main_pid()
            .await
            .expect("pid"),
        lb_pid
    );
    assert!(alive(good_pid) && alive(lb_pid));
    let rows = m.list_modules().await.expect("list");
    assert_eq!(rows.len(), 2, "the broken new manifest adds no module");

    // Fixing it clears the error; the same command means no restart.
    d.write_manifest("later-broken", &sh_module(SLEEPER, ""));
    std::fs::remove_file(d.modules.join("bad.toml")).expect("rm");
    let errors = m.reload().await.expect("Reload");
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        d.module("later-broken")
            .await
            .main_pid()
            .await
            .expect("pid"),
        lb_pid
    );
}

#[tokio::test]
async fn changed_command_restarts_only_that_module() {
    let d = Daemon::start(&[
        ("one", &sh_module(SLEEPER, "")),
        ("two", &sh_module(SLEEPER, "")),
    ])
    .await;
    d.wait_state("one", "running").await;
    d.wait_state("two", "running").await;
    let one = d.module("one").await.main_pid().await.expect("pid");
    let two = d.module("two").await.main_pid().await.expect("pid");
    // Description only: no restart.
    d.write_manifest("one", &sh_module(SLEEPER, "description = \"new words\"\n"));
    d.wait_module("one", T, |_, _, _| true).await;
    let m = d.manager().await;
    m.reload().await.expect("Reload");
    assert_eq!(
        d.module("one").await.description().await.expect("desc"),
        "new words"
    );
    assert_eq!(d.module("one").await.main_pid().await.expect("pid"), one);
    // The command changes: exactly that module restarts.
    d.write_manifest(
        "one",
        &sh_module("echo v2; exec sleep 999", "description = \"new words\"\n"),
    );
    let p = d.module("one").await;
    let deadline = Instant::now() + T;
    loop {
        let now = p.main_pid().await.expect("pid");
        if now != 0 && now != one {
            break;
        }
        assert!(Instant::now() < deadline, "module one was not restarted");
        d.wait_module("one", Duration::from_secs(2), |_, _, _| true)
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(one));
    assert_eq!(d.module("two").await.main_pid().await.expect("pid"), two);
}

#[tokio::test]
async fn orphaned_grandchildren_leave_no_zombie() {
    // The shell forks subshells that exit at once, leaving background grandchildren which
    // are re-parented to modvisord (the subreaper) and die shortly after.
    let script = "for i in 1 2 3 4 5; do (sleep 0.2 &) ; done; (setsid sh -c 'sleep 0.3 &' &); echo forked; exec sleep 1000";
    let d = Daemon::start(&[("forker", &sh_module(script, ""))]).await;
    d.wait_state("forker", "running").await;
    let daemon = d.pid();
    // The grandchildren exist, then exit: wait until none of them is alive, bounded.
    let deadline = Instant::now() + T;
    loop {
        let sleepers: Vec<u32> = children_of(daemon)
            .into_iter()
            .filter(|p| comm(*p) == "sleep" && !is_main(&d, *p))
            .collect();
        let zombies = zombie_children(daemon);
        if sleepers.is_empty() && zombies.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombies left: {zombies:?}, orphans alive: {sleepers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give late SIGCHLDs time to be handled, then prove there is no zombie at all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(zombie_children(daemon), Vec::<u32>::new());
    // The orphans were really ours (re-parented to modvisord), which the log shows was reaped.
    assert!(
        d.log().contains("reaped orphan"),
        "no orphan was reaped:\n{}",
        d.log()
    );
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn is_main(_d: &Daemon, p: u32) -> bool {
    // The module's own main process is `sleep 1000`.
    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
        .unwrap_or_default()
        .contains("1000")
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_leaves_no_process_of_the_group() {
    // Ignores SIGTERM and has a grandchild in the same group that ignores it too.
    let script = "trap '' TERM; sh -c \"trap '' TERM; while :; do sleep 1; done\" & while :; do sleep 1; done";
    let d = Daemon::start(&[(
        "stubborn",
        &sh_module(
            script,
            "[runtime]\nmodes = [\"native\"]\nstop_timeout = \"500ms\"\n",
        ),
    )])
    .await;
    d.wait_state("stubborn", "running").await;
    let pid = d.module("stubborn").await.main_pid().await.expect("pid");
    let deadline = Instant::now() + T;
    while group_members(pid).len() < 2 {
        assert!(Instant::now() < deadline, "grandchild never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = d.manager().await;
    let t0 = Instant::now();
    m.stop_module("stubborn").await.expect("StopModule");
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "the stop timeout was honoured before SIGKILL"
    );
    assert_eq!(
        group_members(pid),
        Vec::<u32>::new(),
        "nothing of the group survives"
    );
    let (s, h, r) = d.wait_state("stubborn", "inactive").await;
    assert_eq!(
        (s.as_str(), h.as_str(), r.as_str()),
        ("inactive", "offline", "stopped")
    );
    assert!(d.log().contains("sending SIGKILL"));
}

#[tokio::test]
async fn bad_dbus_arguments_get_dbus_errors_and_the_daemon_lives_on() {
    let d = Daemon::start(&[("ok", &sh_module(SLEEPER, ""))]).await;
    d.wait_state("ok", "running").await;
    let m = d.manager().await;
    let cases: Vec<(&str, zbus::Error)> = vec![
        (
            "NoSuchModule",
            m.start_module("ghost").await.expect_err("ghost"),
        ),
        (
            "InvalidArgument",
            m.stop_module("../../etc/passwd")
                .await
                .expect_err("traversal"),
        ),
        (
            "InvalidArgument",
            m.restart_module("").await.expect_err("empty"),
        ),
        (
            "InvalidArgument",
            m.get_module("a;b").await.expect_err("shell"),
        ),
        (
            "InvalidArgument",
            m.set_mode_override("ok", "vm").await.expect_err("mode"),
        ),
        (
            "NotAllowed",
            m.set_mode_override("ok", "container")
                .await
                .expect_err("container not possible"),
        ),
        (
            "NoSuchModule",
            m.explain("ghost").await.expect_err("explain"),
        ),
        (
            "InvalidArgument",
            m.activate_model("ok", "/x.gguf")
                .await
                .expect_err("no model.directory"),
        ),
    ];
    for (want, e) in cases {
        match &e {
            zbus::Error::MethodError(name, _, _) => {
                assert_eq!(name.as_str(), format!("org.modvisor1.Error.{want}"), "{e}")
            }
            other => panic!("expected a D-Bus error {want}, got {other:?}"),
        }
    }
    // A call with the wrong signature is refused by the bus layer, also without a crash.
    let r: zbus::Result<()> = d
        .conn
        .call_method(
            Some("org.modvisor1"),
            "/org/modvisor1",
            Some("org.modvisor1.Manager"),
            "StartModule",
            &(42u32,),
        )
        .await
        .map(|_| ());
    assert!(r.is_err());
    assert_eq!(
        d.module("ok").await.state().await.expect("state"),
        "running"
    );
    let text = m.explain("ok").await.expect("Explain");
    assert!(
        text.contains("decision: native: the only mode of the module"),
        "{text}"
    );
    assert!(text.contains("container: not possible"), "{text}");
}

#[tokio::test]
async fn sighup_reloads_and_sigterm_stops_everything() {
    let mut d = Daemon::start(&[("first", &sh_module(SLEEPER, ""))]).await;
    d.wait_state("first", "running").await;
    let first = d.module("first").await.main_pid().await.expect("pid");
    // Written without inotify noticing? It will notice; SIGHUP must work as well.
    std::fs::write(d.modules.join("second.toml"), sh_module(SLEEPER, "")).expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("hup");
    d.wait_state("second", "running").await;
    let second = d.module("second").await.main_pid().await.expect("pid");
    assert_eq!(d.stop(), Some(0));
    assert!(
        !alive(first) && !alive(second),
        "modules stop with the daemon"
    );
}

#[tokio::test]
async fn sd_notify_ready_status_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(T)).expect("timeout");
    let env = vec![
        ("NOTIFY_SOCKET".to_string(), sock_path.display().to_string()),
        // systemd's WatchdogSec=: modvisord must send WATCHDOG=1 at half of it.
        ("WATCHDOG_USEC".to_string(), "400000".to_string()),
    ];
    let mut d = Daemon::start_with(
        &[("n", &sh_module(SLEEPER, ""))],
        Options {
            env,
            ..Options::default()
        },
    )
    .await;
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m| m.contains("READY=1")) {
        let n = sock
            .recv(&mut buf)
            .expect("a notification within the timeout");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready = got.iter().find(|m| m.contains("READY=1")).expect("ready");
    assert!(ready.contains("STATUS=1 modules:"), "{ready}");
    let mut pings = 0;
    while pings < 2 {
        let n = sock.recv(&mut buf).expect("WATCHDOG=1 within the timeout");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert_eq!(d.stop(), Some(0), "a clean exit after SIGTERM");
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 sent on shutdown");
}

#[tokio::test]
async fn module_output_goes_to_the_journal_and_log_files() {
    assert!(
        std::path::Path::new("/run/systemd/journal/socket").exists(),
        "journald must run (make test starts it through the testbed)"
    );
    let tag = format!("journal-line-{}", std::process::id());
    let extra = "[logging]\nmodule_log_dir = \"LOGDIR\"\n".to_string();
    let logdir = tempfile::tempdir().expect("tempdir");
    let extra = extra.replace("LOGDIR", &logdir.path().display().to_string());
    let d = Daemon::start_with(
        &[(
            "talker",
            &sh_module(
                &format!("echo {tag}; echo {tag}-err >&2; exec sleep 1000"),
                "",
            ),
        )],
        Options {
            extra_config: extra,
            ..Options::default()
        },
    )
    .await;
    d.wait_state("talker", "running").await;
    let deadline = Instant::now() + T;
    loop {
        let out = std::process::Command::new("journalctl")
            .args(["--no-pager", "-o", "export", "MODVISOR_MODULE=talker"])
            .output()
            .expect("journalctl");
        let text = String::from_utf8_lossy(&out.stdout);
        let entries: Vec<HashMap<&str, &str>> = text
            .split("\n\n")
            .map(|e| e.lines().filter_map(|l| l.split_once('=')).collect())
            .collect();
        let mine: Vec<_> = entries
            .iter()
            .filter(|e| e.get("MESSAGE").is_some_and(|m| m.starts_with(&tag)))
            .collect();
        if mine.len() == 2 {
            assert!(
                mine.iter()
                    .all(|e| e.get("MODVISOR_MODULE") == Some(&"talker"))
            );
            assert!(
                mine.iter()
                    .any(|e| e.get("MODVISOR_STREAM") == Some(&"stderr"))
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "journal lacks the module's lines: {} entries",
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let file = std::fs::read_to_string(logdir.path().join("talker.log")).expect("module log file");
    assert!(file.contains(&tag), "{file}");
}

#[tokio::test]
async fn after_kill_9_of_the_daemon_a_new_one_never_runs_a_second_copy() {
    let mut d = Daemon::start(&[("solo", &sh_module("exec sleep 1000", ""))]).await;
    d.wait_state("solo", "running").await;
    let old = d.module("solo").await.main_pid().await.expect("pid");
    d.kill9();
    assert!(
        alive(old),
        "a kill -9 of modvisord leaves the direct child running"
    );
    d.spawn(&[]).await;
    d.wait_state("solo", "running").await;
    let new = d.module("solo").await.main_pid().await.expect("pid");
    assert_ne!(old, new);
    assert!(
        !alive(old),
        "the copy left by the killed daemon is stopped before a new one starts"
    );
    let copies: Vec<u32> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|p| {
            alive(*p)
                && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c == "sleep\x001000\x00")
        })
        .filter(|p| group_members(*p).contains(p) && (*p == new || *p == old))
        .collect();
    assert_eq!(copies, vec![new]);
    assert!(
        d.log().contains("left running by a previous modvisord"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_manifest_writable_by_others_is_refused_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(&[("fine", &sh_module(SLEEPER, ""))]).await;
    d.wait_state("fine", "running").await;
    let path = d.modules.join("sneaky.toml");
    std::fs::write(&path, sh_module(SLEEPER, "")).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let errors = d.manager().await.reload().await.expect("Reload");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].1.contains("writable by others (mode 0666)"),
        "{}",
        errors[0].1
    );
    let rows = d.manager().await.list_modules().await.expect("list");
    assert!(
        rows.iter().all(|r| r.0 != "sneaky"),
        "never loaded, never run"
    );
    // An untrusted module never runs native, whatever the policy says.
    d.write_manifest(
        "untrusted",
        "[native]\ncommand = [\"/bin/sleep\", \"1000\"]\n",
    );
    let (s, h, r) = d.wait_module("untrusted", T, |s, _, _| s == "failed").await;
    assert_eq!((s.as_str(), h.as_str()), ("failed", "offline"));
    assert!(r.contains("native needs trusted = true"), "{r}");
    assert_eq!(
        d.module("untrusted").await.main_pid().await.expect("pid"),
        0
    );
}

#[tokio::test]
async fn module_objects_emit_properties_changed() {
    let d = Daemon::start(&[(
        "watched",
        &sh_module(SLEEPER, "[restart]\ndelay = \"100ms\"\n"),
    )])
    .await;
    d.wait_state("watched", "running").await;
    let props = zbus::fdo::PropertiesProxy::builder(&d.conn)
        .destination("org.modvisor1")
        .path("/org/modvisor1/module/watched")
        .build()
        .await
        .expect("properties proxy");
    let mut changes = props.receive_properties_changed().await.expect("subscribe");
    let pid = d.module("watched").await.main_pid().await.expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + T;
    use futures_util::StreamExt;
    while !(seen.iter().any(|k| k == "State")
        && seen.iter().any(|k| k == "MainPID")
        && seen.iter().any(|k| k == "Restarts"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let sig = tokio::time::timeout(left, changes.next())
            .await
            .expect("PropertiesChanged in time")
            .expect("signal");
        let args = sig.args().expect("args");
        assert_eq!(args.interface_name().as_str(), "org.modvisor1.Module");
        seen.extend(args.changed_properties().keys().map(|k| k.to_string()));
    }
}
