//! On the embedded bus only root may own `org.modvisor1`: a real non-root user asking for the
//! name with REPLACE_EXISTING (and ALLOW_REPLACEMENT) is refused, and root's `modvisorctl`
//! still reaches the real daemon.

mod common;

use std::process::{Command, Output};

use common::*;

const IMPOSTOR: &str = "mvtest-impostor";

/// The test user, removed again whatever happens.
struct User(u32, u32);

impl User {
    fn create() -> User {
        let exists = |u: &str| {
            Command::new("id")
                .arg(u)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists(IMPOSTOR) {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    IMPOSTOR,
                ])
                .output()
                .expect("useradd");
            assert!(
                out.status.success() || exists(IMPOSTOR),
                "useradd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let u = nix::unistd::User::from_name(IMPOSTOR)
            .expect("getpwnam")
            .expect("the user exists");
        User(u.uid.as_raw(), u.gid.as_raw())
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
        let _ = Command::new("userdel").arg(IMPOSTOR).output();
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
    let user = User::create();
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
