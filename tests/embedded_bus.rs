//! On the embedded bus only root may own `org.modvisor1`: a real non-root user asking for the
//! name with REPLACE_EXISTING (and ALLOW_REPLACEMENT) is refused, and root's `modvisorctl`
//! still reaches the real daemon.

mod common;

use std::process::{Command, Output};

use common::*;

/// The test user, removed again whatever happens (one per test: they run in parallel).
struct User(u32, u32, &'static str);

impl User {
    fn create(name: &'static str) -> User {
        let exists = |u: &str| {
            Command::new("id")
                .arg(u)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists(name) {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ])
                .output()
                .expect("useradd");
            assert!(
                out.status.success() || exists(name),
                "useradd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let u = nix::unistd::User::from_name(name)
            .expect("getpwnam")
            .expect("the user exists");
        User(u.uid.as_raw(), u.gid.as_raw(), name)
    }

    /// `busctl --address=ADDR ARGS...` as this user.
    fn busctl(&self, address: &str, args: &[&str]) -> Output {
        Command::new("setpriv")
            .arg(format!("--reuid={}", self.0))
            .arg(format!("--regid={}", self.1))
            .arg("--clear-groups")
            .arg("busctl")
            .arg(format!("--address={address}"))
            .args(args)
            .output()
            .expect("setpriv busctl")
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(self.2).output();
    }
}

const DBUS: [&str; 4] = [
    "call",
    "org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus",
];

#[test]
fn only_root_may_own_the_name_on_the_embedded_bus() {
    let user = User::create("mvtest-impostor");
    let e = EmbeddedDaemon::start(&[("svc", &sh_module("exec sleep 1000", ""))]);
    let addr = e.address();
    // 3 = ALLOW_REPLACEMENT | REPLACE_EXISTING: the impostor asks to take the name over.
    let request = [&DBUS[..], &["RequestName", "su", "org.modvisor1", "3"]].concat();
    let o = user.busctl(&addr, &request);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Access denied"),
        "a non-root user must not get org.modvisor1: {:?} {} {err}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    // Other names stay free for anyone (clients may own names of their own).
    let other = [&DBUS[..], &["RequestName", "su", "org.example.mvtest", "4"]].concat();
    let o = user.busctl(&addr, &other);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The name is still root's modvisord.
    let out = Command::new("busctl")
        .arg(format!("--address={addr}"))
        .args(DBUS)
        .args(["GetConnectionUnixUser", "s", "org.modvisor1"])
        .output()
        .expect("busctl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "u 0",
        "{out:?}"
    );
    let ctl = Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(["--bus-address", &addr, "status", "svc"])
        .output()
        .expect("modvisorctl");
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    assert!(String::from_utf8_lossy(&ctl.stdout).contains("svc"));
    drop(e);
}

/// The bus config an earlier modvisord wrote: anyone could own any name.
fn old_config(socket: &std::path::Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>modvisor</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}

/// A child process stopped (SIGTERM, SIGKILL after 10 s) and reaped when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the dbus-daemons started with this config file when dropped (a bus a killed
/// modvisord left behind).
struct BusAt(std::path::PathBuf);

impl Drop for BusAt {
    fn drop(&mut self) {
        let want = format!("--config-file={}", self.0.display());
        for p in modvisor::procfs::all() {
            let cmd = std::fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap_or_default();
            let has = cmd.split(|b| *b == 0).any(|a| a == want.as_bytes());
            if has && p.pid > 1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

/// Reads one line of the child's stdout within `T` (on a thread: the read blocks).
fn line_within(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut l);
        let _ = tx.send(l);
    });
    rx.recv_timeout(T).expect("a line within the timeout")
}

/// modvisord on the embedded bus in `run`; returns once it says READY=1.
fn embedded_daemon(dir: &std::path::Path, run: &std::path::Path) -> Proc {
    let modules = dir.join("modules.d");
    std::fs::create_dir_all(&modules).expect("mkdir");
    std::fs::write(modules.join("svc.toml"), sh_module("exec sleep 1000", "")).expect("manifest");
    let cfg = dir.join("modvisor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\nnative_backend = \"direct\"\n[dbus]\nbus = \"embedded\"\n",
            modules.display(),
            dir.join("state").display(),
            run.display()
        ),
    )
    .expect("config");
    let notify = dir.join("notify");
    let _ = std::fs::remove_file(&notify);
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(T)).expect("timeout");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("modvisord.log"))
        .expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_modvisord"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("MODVISOR_BUS_ADDRESS")
        .env("NOTIFY_SOCKET", &notify)
        .env("MODVISOR_LOG_STDERR", "1")
        .stdin(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn modvisord");
    let p = Proc(child);
    let mut buf = [0u8; 4096];
    loop {
        let n = sock.recv(&mut buf).unwrap_or_else(|e| {
            panic!(
                "READY=1 within the timeout: {e}; log:\n{}",
                std::fs::read_to_string(dir.join("modvisord.log")).unwrap_or_default()
            )
        });
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            return p;
        }
    }
}

fn owner_uid(addr: &str) -> String {
    let out = Command::new("busctl")
        .arg(format!("--address={addr}"))
        .args(DBUS)
        .args(["GetConnectionUnixUser", "s", "org.modvisor1"])
        .output()
        .expect("busctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Not a test of its own: the impostor's process (run by the test below as a non-root user)
/// holds org.modvisor1 on the bus in MVTEST_HOLD_ADDRESS.
#[tokio::test]
async fn hold_name_helper() {
    let Ok(addr) = std::env::var("MVTEST_HOLD_ADDRESS") else {
        return;
    };
    let c = zbus::connection::Builder::address(addr.as_str())
        .build()
        .await
        .expect("connect");
    c.request_name_with_flags("org.modvisor1", zbus::fdo::RequestNameFlags::DO_NOT_QUEUE)
        .await
        .expect("the old policy lets anyone own it");
    println!("held");
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
}

/// A bus left by an earlier modvisord, with the old policy, where a non-root user took the
/// name: it is not reused (that bus is stopped and a new one started); a bus of our own left
/// by a killed modvisord is reused, with today's policy loaded into it.
#[test]
fn a_leftover_bus_is_reused_only_when_it_is_safe() {
    let user = User::create("mvtest-impostr2");
    let dir = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = dir.path().join("run");
    std::fs::create_dir(&run).expect("mkdir");
    let socket = run.join("bus");
    let addr = format!("unix:path={}", socket.display());
    // Dropped last: the bus the first modvisord starts outlives it (kill -9) and its successor.
    let _bus = BusAt(run.join("bus.conf"));
    std::fs::write(run.join("bus.conf"), old_config(&socket)).expect("old config");
    let mut old = Proc(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", run.join("bus.conf").display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon"),
    );
    assert!(!line_within(&mut old.0).is_empty());
    let _holder = Proc(
        Command::new("setpriv")
            .arg(format!("--reuid={}", user.0))
            .arg(format!("--regid={}", user.1))
            .arg("--clear-groups")
            .arg(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "hold_name_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("MVTEST_HOLD_ADDRESS", &addr)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("setpriv"),
    );
    // Wait until the name really is the impostor's.
    let deadline = std::time::Instant::now() + T;
    while owner_uid(&addr) != format!("u {}", user.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the impostor never held the name"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let mut d = embedded_daemon(dir.path(), &run);
    let log = || std::fs::read_to_string(dir.path().join("modvisord.log")).unwrap_or_default();
    assert!(log().contains("not reusing the bus"), "{}", log());
    assert_eq!(
        owner_uid(&addr),
        "u 0",
        "root's modvisord owns the name: {}",
        log()
    );
    let ctl = Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(["--bus-address", &addr, "status", "svc"])
        .output()
        .expect("modvisorctl");
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );

    // kill -9: the bus (its own process group) stays; the next modvisord reuses it.
    let _ = d.0.kill();
    let _ = d.0.wait();
    drop(d);
    let _d2 = embedded_daemon(dir.path(), &run);
    assert!(log().contains("reusing the embedded bus"), "{}", log());
    assert_eq!(owner_uid(&addr), "u 0");
    let request = [&DBUS[..], &["RequestName", "su", "org.modvisor1", "3"]].concat();
    let o = user.busctl(&addr, &request);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Access denied"),
        "the reused bus has today's policy: {o:?}"
    );
}
