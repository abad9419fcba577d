//! `modvisorctl logs NAME` and the engine-error lookup of an activation show only what
//! trusted writers logged: modvisord (root) forwarding the module's output, never a non-root
//! user's process that sets `MODVISOR_MODULE=NAME` itself, nor a non-root user's own unit
//! named `modvisor-NAME.service`. Real journald, a real user created here; the user's unit is
//! a process of that user in the cgroup its user manager would give the unit, which is all
//! journald goes by.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WRITER: &str = "mvtest-jwriter";

struct User(u32, u32);

impl User {
    fn create() -> User {
        let exists = |u: &str| {
            Command::new("id")
                .arg(u)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists(WRITER) {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    WRITER,
                ])
                .output()
                .expect("useradd");
            assert!(out.status.success() || exists(WRITER), "useradd: {out:?}");
        }
        let u = nix::unistd::User::from_name(WRITER)
            .expect("getpwnam")
            .expect("the user exists");
        User(u.uid.as_raw(), u.gid.as_raw())
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(WRITER).output();
    }
}

/// The cgroups (v1 name=systemd and the unified hierarchy) of `unit` in `uid`'s user manager.
struct UserUnitCgroup(Vec<PathBuf>);

impl UserUnitCgroup {
    fn create(uid: u32, unit: &str) -> UserUnitCgroup {
        let rel = format!("user.slice/user-{uid}.slice/user@{uid}.service/app.slice/{unit}");
        let dirs: Vec<PathBuf> = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
            .iter()
            .filter(|root| Path::new(root).join("cgroup.procs").exists())
            .map(|root| Path::new(root).join(&rel))
            .collect();
        assert!(!dirs.is_empty(), "no systemd cgroup hierarchy here");
        for d in &dirs {
            std::fs::create_dir_all(d).expect("mkdir cgroup");
        }
        UserUnitCgroup(dirs)
    }
}

impl Drop for UserUnitCgroup {
    fn drop(&mut self) {
        for d in &self.0 {
            // Innermost first, up to the user's slice that the test made.
            for dir in d.ancestors().take(4) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Logs MODVISOR_MODULE=NAME and MESSAGE=TEXT through the journal's native protocol as the
/// user, from within `cgroups` when given.
fn log_as(user: &User, cgroups: &[PathBuf], module: &str, text: &str) {
    let join: String = cgroups
        .iter()
        .map(|d| format!("echo $$ > {}/cgroup.procs; ", d.display()))
        .collect();
    // The sender itself stays a moment so journald can read its credentials and cgroup (a
    // `logger` that exits at once leaves journald a dead PID: no cgroup, no unit).
    let script = format!(
        "{join}exec setpriv --reuid={} --regid={} --clear-groups /usr/bin/python3 -c 'import socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b\"MODVISOR_MODULE={module}\\nMESSAGE={text}\\n\", \"/run/systemd/journal/socket\"); time.sleep(1)'",
        user.0, user.1
    );
    let st = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .status()
        .expect("sh");
    assert!(st.success(), "logging as {WRITER} failed");
}

/// journalctl's view of the entry with this MESSAGE (verbose), once it is there (bounded).
fn entry(text: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "verbose", &format!("MESSAGE={text}")])
            .output()
            .expect("journalctl");
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if s.contains(text) {
            return s;
        }
        assert!(Instant::now() < deadline, "the journal never got {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn logs_show_only_trusted_writers() {
    assert!(
        Path::new(modvisor::journal::JOURNAL_SOCKET).exists(),
        "journald must run (the testbed starts it)"
    );
    let user = User::create();
    let tag = std::process::id();
    let name = format!("jt{tag}");
    let unit = format!("modvisor-{name}.service");
    let (trusted, spoof_proc, spoof_unit) = (
        format!("trusted-line-{tag}"),
        format!("error loading model: spoof-process-{tag}"),
        format!("error loading model: spoof-user-unit-{tag}"),
    );
    // The trusted writer: modvisord forwarding its direct child's output.
    let d = Daemon::start(&[(
        &name,
        &sh_module(&format!("echo {trusted}; exec sleep 1000"), ""),
    )])
    .await;
    d.wait_state(&name, "running").await;
    // A user's process setting the field itself.
    log_as(&user, &[], &name, &spoof_proc);
    // A user's own unit of the module's unit name.
    {
        let cg = UserUnitCgroup::create(user.0, &unit);
        log_as(&user, &cg.0, &name, &spoof_unit);
    }
    // The attacks reached the journal as meant: with the field, from the user, the user unit.
    let e = entry(&spoof_proc);
    assert!(
        e.contains(&format!("MODVISOR_MODULE={name}")) && e.contains(&format!("_UID={}", user.0)),
        "{e}"
    );
    let e = entry(&spoof_unit);
    assert!(
        e.contains(&format!("_SYSTEMD_USER_UNIT={unit}")),
        "the entry is the user unit's: {e}"
    );
    entry(&trusted);
    let out = Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(["logs", &name, "-n", "1000"])
        .output()
        .expect("modvisorctl logs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&trusted),
        "the module's own output is shown: {text}"
    );
    assert!(
        !text.contains(&spoof_proc),
        "a user's process is not the module: {text}"
    );
    assert!(
        !text.contains(&spoof_unit),
        "a user's unit is not the module: {text}"
    );
    // The engine-error lookup of a failed activation (the same trusted matches) does not
    // quote what the user wrote either, though both lines look like an engine's error.
    let line = modvisor::journal::unit_error_line(&unit).await;
    assert!(
        !line.as_deref().unwrap_or("").contains("spoof"),
        "an activation's error never quotes a user's line: {line:?}"
    );
}
