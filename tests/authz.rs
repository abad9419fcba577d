//! Who may change things: a real non-root user created here, outside and then inside group
//! `modvisor`, against a real dbus-daemon with the shipped policy (AccessDenied from the bus),
//! and against the embedded bus where only modvisord's own check of the caller stands
//! (NotAllowed). Anyone may read.

mod common;

use std::process::{Command, Output};

use common::*;

const OUTSIDER: &str = "mvtest-outsider";
const MEMBER: &str = "mvtest-member";

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates the group and the two users (idempotent).
fn users() {
    run(Command::new("groupadd").args(["-f", "--system", "modvisor"]));
    for u in [OUTSIDER, MEMBER] {
        if Command::new("id")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            continue;
        }
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            u,
        ]));
    }
    run(Command::new("usermod").args(["-aG", "modvisor", MEMBER]));
    // Not a member (whatever an earlier run left): failure here only means "was not one".
    let _ = Command::new("gpasswd")
        .args(["-d", OUTSIDER, "modvisor"])
        .output();
}

fn ctl_as(user: &str, bus: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            env!("CARGO_BIN_EXE_modvisorctl"),
            "--bus-address",
            bus,
        ])
        .args(args)
        .env_remove("MODVISOR_BUS_ADDRESS")
        .output()
        .expect("runuser")
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

const MUTATING: &[&[&str]] = &[
    &["start", "svc"],
    &["stop", "svc"],
    &["restart", "svc"],
    &["reload"],
    &["override", "svc", "native"],
    &["activate", "svc", "/x.gguf"],
];

#[tokio::test]
async fn only_root_and_group_modvisor_may_change_anything() {
    users();
    let d = Daemon::start(&[("svc", &sh_module("exec sleep 1000", ""))]).await;
    d.wait_state("svc", "running").await;
    let bus = d.bus.address.clone();
    let pid = d.module("svc").await.main_pid().await.expect("pid");

    // Outside the group: every mutating method is refused by the bus policy; reading works.
    for args in MUTATING {
        let o = ctl_as(OUTSIDER, &bus, args);
        assert_eq!(
            code(&o),
            Some(4),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // One sentence, not the bus's rule dump.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with(
                "modvisorctl: not allowed: only root and members of group modvisor may "
            ) && !err.contains("Rejected send message")
                && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        d.module("svc").await.main_pid().await.expect("pid"),
        pid,
        "nothing changed"
    );
    for args in [
        &["status"][..],
        &["list"],
        &["explain", "svc"],
        &["status", "svc"],
    ] {
        let o = ctl_as(OUTSIDER, &bus, args);
        assert_eq!(
            code(&o),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // In the group: allowed.
    let o = ctl_as(MEMBER, &bus, &["restart", "svc"]);
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    d.wait_state("svc", "running").await;
    assert_ne!(d.module("svc").await.main_pid().await.expect("pid"), pid);
    let o = ctl_as(MEMBER, &bus, &["stop", "svc"]);
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    // Root: allowed.
    d.manager()
        .await
        .start_module("svc")
        .await
        .expect("root may start");
    d.wait_state("svc", "running").await;
    drop(d);

    // The embedded bus has no policy file: modvisord's own check of the caller is the gate.
    let mut e = EmbeddedDaemon::start(&[("svc", &sh_module("exec sleep 1000", ""))]);
    let embedded = e.address();
    for args in MUTATING {
        let o = ctl_as(OUTSIDER, &embedded, args);
        assert_eq!(
            code(&o),
            Some(4),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).starts_with(
                "modvisorctl: not allowed: only root and members of group modvisor may call "
            ),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(code(&ctl_as(OUTSIDER, &embedded, &["status"])), Some(0));
    let o = ctl_as(MEMBER, &embedded, &["restart", "svc"]);
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    e.stop();
    assert!(
        e.log().contains("denied StartModule to uid"),
        "the refusal is logged: {}",
        e.log()
    );
}

/// A member of `modvisor` chooses the model of an engine, not what the engine runs as: a root
/// engine (explicit `user = "root"`) whose model directory the group can write is refused the
/// activation, with the reason, and keeps running as it was.
#[tokio::test]
async fn a_member_cannot_make_a_root_engine_load_a_model_the_group_can_change() {
    use std::os::unix::fs::PermissionsExt;
    users();
    let t = tempfile::tempdir().expect("tempdir");
    let m = t.path().join("models");
    std::fs::create_dir_all(&m).expect("mkdir");
    for f in ["m1.gguf", "m2.gguf"] {
        std::fs::write(m.join(f), b"GGUF\x03\0\0\0").expect("write");
    }
    let mode = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    mode(t.path(), 0o755);
    mode(&m, 0o755);
    let tail = format!(
        "[model]\ndefault = \"{0}/m1.gguf\"\ndirectory = \"{0}\"\n[restart]\npolicy = \"no\"\n",
        m.display()
    );
    let d = Daemon::start(&[(
        "rootm",
        &format!("{}{tail}", sh_module("exec sleep 1000", "")),
    )])
    .await;
    d.wait_state("rootm", "running").await;
    let pid = d.module("rootm").await.main_pid().await.expect("pid");
    // The group modvisor may now write the directory: its members could plant a file there.
    let gid = nix::unistd::Group::from_name("modvisor")
        .ok()
        .flatten()
        .expect("group modvisor")
        .gid;
    nix::unistd::chown(&m, None, Some(gid)).expect("chgrp");
    mode(&m, 0o775);
    let o = ctl_as(MEMBER, &d.bus.address, &["activate", "rootm", "m2.gguf"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), Some(2), "InvalidArgument: {err}");
    assert!(
        err.contains("refusing a root engine")
            && err.contains(&format!("writable by group {} (mode 0775)", gid.as_raw())),
        "{err}"
    );
    assert_eq!(
        d.module("rootm").await.main_pid().await.expect("pid"),
        pid,
        "nothing restarted"
    );
    assert!(alive(pid));
}
