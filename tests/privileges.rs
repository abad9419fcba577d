//! Engines never run as root by default: the engine user under the direct backend (a root
//! modvisord, real children) and under the testbed's systemd; a root engine only on models no
//! other user can change; models re-validated at every start; secrets out of `systemctl show`,
//! D-Bus and the journal; a stop that finds `setsid` escapees and never signals a reused
//! process group. Every attack is tried for real. Needs root (it creates the engine user).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::engine_user::{EngineUser, ids};
use common::*;

fn module(script: &str, native_extra: &str, tail: &str) -> String {
    format!(
        "{ENGINE_DEFAULTS}trusted = true\n[native]\ncommand = [\"/bin/sh\", \"-c\", {}, \"${{name}}\"]\n{native_extra}\n{tail}",
        toml_str(script)
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn write_secret(p: &Path, text: &str) {
    std::fs::write(p, text).expect("write secret");
    chmod(p, 0o600);
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("environ")
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn err_text(r: zbus::Result<()>) -> String {
    match r {
        Ok(()) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A models directory (root-owned, 0755) with two valid GGUF files and one outside it.
fn models(t: &Path) -> PathBuf {
    let m = t.join("models");
    std::fs::create_dir_all(&m).expect("mkdir");
    chmod(t, 0o755);
    chmod(&m, 0o755);
    for f in ["m1.gguf", "m2.gguf"] {
        std::fs::write(m.join(f), b"GGUF\x03\0\0\0").expect("write");
    }
    std::fs::write(t.join("outside.gguf"), b"GGUF\x03\0\0\0").expect("write");
    m
}

fn model_tail(models: &Path) -> String {
    format!(
        "[model]\ndefault = \"{0}/m1.gguf\"\ndirectory = \"{0}\"\n[restart]\npolicy = \"no\"\n",
        models.display()
    )
}

async fn pid_of(d: &Daemon, name: &str) -> u32 {
    d.module(name).await.main_pid().await.expect("MainPID")
}

#[tokio::test]
async fn direct_default_engine_runs_as_the_engine_user() {
    let user = EngineUser::ensure();
    let d = Daemon::start(&[("eng", &module("exec sleep 1000", "", ""))]).await;
    d.wait_state("eng", "running").await;
    let pid = pid_of(&d, "eng").await;
    let (uids, groups) = ids(pid);
    assert_eq!(uids, vec![user.uid; 4], "real, effective, saved and fs uid");
    for (g, gid) in &user.groups {
        assert!(groups.contains(gid), "member of {g}: {groups:?}");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    let env = environ(pid);
    assert!(env.contains(&"USER=modvisor-engine".to_string()), "{env:?}");
    let text = d.manager().await.explain("eng").await.expect("explain");
    assert!(
        text.contains(
            "native engine: runs as modvisor-engine (the default engine user); full sandbox"
        ),
        "{text}"
    );
    drop(d);
}

#[tokio::test]
async fn root_engine_refuses_models_a_non_root_group_can_change() {
    let user = EngineUser::ensure();
    let t = tempfile::tempdir().expect("tempdir");
    let m = models(t.path());
    let manifest = module("exec sleep 1000", "user = \"root\"", &model_tail(&m));
    let d = Daemon::start(&[("rooty", &manifest)]).await;
    d.wait_state("rooty", "running").await;
    let pid = pid_of(&d, "rooty").await;
    assert_eq!(ids(pid).0[0], 0, "user = \"root\" runs as root");
    let text = d.manager().await.explain("rooty").await.expect("explain");
    assert!(
        text.contains("native engine: runs as root (explicit"),
        "{text}"
    );
    assert!(
        d.log()
            .contains("runs as root (user = \"root\" in its manifest)"),
        "a warning at start:\n{}",
        d.log()
    );
    // The directory becomes writable by a non-root group (video).
    let video = user.groups[0].1;
    nix::unistd::chown(&m, None, Some(nix::unistd::Gid::from_raw(video))).expect("chgrp");
    chmod(&m, 0o775);
    let mgr = d.manager().await;
    let e = err_text(mgr.activate_model("rooty", "m2.gguf").await);
    assert!(
        e.contains("InvalidArgument")
            && e.contains("refusing a root engine")
            && e.contains(&format!("writable by group {video} (mode 0775)")),
        "{e}"
    );
    let e = err_text(mgr.restart_module("rooty").await);
    assert!(e.contains("refusing a root engine"), "{e}");
    assert_eq!(pid_of(&d, "rooty").await, pid, "nothing restarted");
    assert!(alive(pid));
    mgr.stop_module("rooty").await.expect("stop");
    let e = err_text(mgr.start_module("rooty").await);
    assert!(e.contains("refusing a root engine"), "{e}");
    let (state, _, reason) = d.wait_state("rooty", "failed").await;
    assert!(
        reason.contains("refusing a root engine"),
        "{state}: {reason}"
    );
    drop(d);
}

#[tokio::test]
async fn a_model_swapped_for_a_symlink_out_is_refused_at_restart() {
    let _user = EngineUser::ensure();
    let t = tempfile::tempdir().expect("tempdir");
    let m = models(t.path());
    let d = Daemon::start(&[("swap", &module("exec sleep 1000", "", &model_tail(&m)))]).await;
    d.wait_state("swap", "running").await;
    let mgr = d.manager().await;
    mgr.activate_model("swap", "m2.gguf")
        .await
        .expect("activate m2");
    d.wait_health("swap", "online").await;
    let pid = pid_of(&d, "swap").await;
    // A member swaps the activated file for a link out of the directory.
    std::fs::remove_file(m.join("m2.gguf")).expect("rm");
    std::os::unix::fs::symlink(t.path().join("outside.gguf"), m.join("m2.gguf")).expect("ln");
    let e1 = err_text(mgr.restart_module("swap").await);
    assert!(
        e1.contains("is no longer a file inside model.directory"),
        "{e1}"
    );
    assert_eq!(pid_of(&d, "swap").await, pid, "nothing restarted");
    assert!(alive(pid));
    // A link to nothing gives the same answer: no oracle for paths outside.
    std::fs::remove_file(m.join("m2.gguf")).expect("rm");
    std::os::unix::fs::symlink("/etc/no-such-file", m.join("m2.gguf")).expect("ln");
    assert_eq!(err_text(mgr.restart_module("swap").await), e1);
    // Activation answers the same whether an outside path exists or not.
    let a = err_text(mgr.activate_model("swap", "/etc/passwd").await);
    let b = err_text(mgr.activate_model("swap", "/etc/no-such-file").await);
    assert_eq!(
        a.replace("/etc/passwd", "P"),
        b.replace("/etc/no-such-file", "P")
    );
    assert_eq!(pid_of(&d, "swap").await, pid);
    drop(d);
}

#[tokio::test]
async fn direct_secrets_reach_the_engine_only() {
    let user = EngineUser::ensure();
    let t = tempfile::tempdir().expect("tempdir");
    let secret = format!("hunter2-{}", std::process::id());
    let env_file = t.path().join("llm.env");
    write_secret(&env_file, &format!("# a comment\nAPI_TOKEN=\"{secret}\"\n"));
    let cred = t.path().join("token");
    write_secret(&cred, &format!("cred-{secret}"));
    let extra = format!(
        "environment_file = \"{}\"\ncredentials = {{ token = \"{}\" }}",
        env_file.display(),
        cred.display()
    );
    let manifest = module("exec sleep 1000", &extra, "[restart]\npolicy = \"no\"\n");
    let d = Daemon::start(&[("sec", &manifest)]).await;
    d.wait_state("sec", "running").await;
    let pid = pid_of(&d, "sec").await;
    let env = environ(pid);
    assert!(env.contains(&format!("API_TOKEN={secret}")), "{env:?}");
    let dir = env
        .iter()
        .find_map(|e| e.strip_prefix("CREDENTIALS_DIRECTORY="))
        .map(PathBuf::from)
        .expect("$CREDENTIALS_DIRECTORY");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join("token")).expect("credential");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o400));
    assert_eq!(std::fs::metadata(&dir).expect("dir").mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::read_to_string(dir.join("token")).expect("read"),
        format!("cred-{secret}")
    );
    // Not on D-Bus, not in explain, not in modvisord's log.
    let props = zbus::fdo::PropertiesProxy::builder(&d.conn)
        .destination("org.modvisor1")
        .path(modvisor::dbus::module_path("sec"))
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("props");
    let all = props
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            "org.modvisor1.Module",
        ))
        .await
        .expect("GetAll");
    let mgr = d.manager().await;
    let shown = format!(
        "{all:?}{:?}{}",
        mgr.list_modules().await.expect("list"),
        mgr.explain("sec").await.expect("explain")
    );
    assert!(!shown.contains(&secret), "{shown}");
    // A secret file others can read is refused at the next start, with a clear error.
    chmod(&env_file, 0o644);
    // Answered OK (the start began) or Failed (it failed before the backend answered): the
    // module ends failed either way, with the reason.
    let restarted = mgr.restart_module("sec").await;
    if let Err(e) = &restarted {
        assert!(e.to_string().contains("0600"), "{e}");
    }
    let (_, _, reason) = d
        .wait_module("sec", T, |s, _, r| s == "failed" && r.contains("0600"))
        .await;
    assert!(
        reason.contains("must be mode 0600 or stricter (is 0644)"),
        "{reason}"
    );
    assert!(!dir.exists(), "the credentials are removed with the run");
    assert!(!d.log().contains(&secret), "the log never shows a secret");
    drop(d);
}

fn cmdline(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

#[tokio::test]
async fn stop_module_stops_a_setsid_escapee() {
    let _user = EngineUser::ensure();
    let d = Daemon::start(&[(
        "esc",
        &module("setsid sleep 1001 & exec sleep 1000", "", ""),
    )])
    .await;
    d.wait_state("esc", "running").await;
    let pid = pid_of(&d, "esc").await;
    let deadline = Instant::now() + T;
    let escapee = loop {
        let found = std::fs::read_dir("/proc")
            .expect("proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
            .find(|p| {
                cmdline(*p) == "sleep\u{0}1001\u{0}"
                    && modvisor::procfs::stat(*p).is_some_and(|s| s.ppid == pid)
            });
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no escapee under {pid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(escapee as i32))).expect("sid");
    assert_eq!(
        sid.as_raw() as u32,
        escapee,
        "it left the module's session and group"
    );
    d.manager().await.stop_module("esc").await.expect("stop");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(escapee) || alive(pid) {
        assert!(
            Instant::now() < deadline,
            "escapee {escapee} or main {pid} still alive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(d);
}

/// Spawns `sleep 30` in a process group of its own whose id is `want` (ns_last_pid), so a
/// signal to the old group id would hit it. Bounded retries; fails when it cannot.
fn victim_with_pid(want: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", want - 1))
            .expect("write ns_last_pid (root in the initial PID namespace)");
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn sleep");
        if c.id() == want {
            return c;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    panic!("could not get PID {want} back for the victim");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_after_the_exit_never_signals_a_reused_process_group() {
    use modvisor::manifest::{NativeExec, Privileges, RestartPolicy, RestartSpec};
    use modvisor::runtime::{Backend, Exec, RunRequest, RuntimeEvent};
    let run = tempfile::tempdir().expect("tempdir");
    let b = modvisor::runtime::direct::DirectBackend::new(run.path());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = RunRequest {
        name: "quick".into(),
        generation: 1,
        description: String::new(),
        exec: Exec::Native(NativeExec::Command {
            argv: vec!["/bin/true".into()],
            environment: Default::default(),
            working_directory: None,
            privileges: Privileges {
                user: Some("root".into()),
                ..Privileges::default()
            },
        }),
        restart: RestartSpec {
            policy: RestartPolicy::No,
            delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(1),
            max: 0,
            window: Duration::from_secs(60),
        },
        stop_timeout: Duration::from_secs(2),
        memory_max: None,
        guard_port: None,
        sink: modvisor::journal::OutputSink::new("quick", None, None, 0),
        found_at_start: false,
    };
    let handle = b.start(req, tx).expect("start");
    let mut pid = 0;
    let exited = tokio::time::timeout(T, async {
        while let Some(ev) = rx.recv().await {
            match ev {
                RuntimeEvent::Status { main_pid, .. } => pid = main_pid,
                RuntimeEvent::Exited { info, .. } => return info,
            }
        }
        panic!("events ended");
    })
    .await
    .expect("exit within bound");
    assert!(exited.success(), "{exited}");
    assert!(pid > 1);
    // The leader is reaped; its number now leads someone else's group.
    let mut victim = victim_with_pid(pid);
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .expect("pgid")
            .as_raw() as u32,
        pid
    );
    tokio::time::timeout(T, b.stop(&handle, Duration::from_secs(2)))
        .await
        .expect("stop returns");
    std::thread::sleep(Duration::from_millis(200));
    let still = victim.try_wait().expect("try_wait").is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    assert!(
        still,
        "the stop of an exited run signalled the reused group {pid}"
    );
}
