//! The .deb under a real systemd system manager (PID 1 in a container), installed and enabled
//! as an operator would, on a machine where modvisor's directories do not exist yet.

mod common;

use common::sysmgr::{Sysmgr, deb};

#[test]
fn the_package_starts_with_enable_now_where_no_directory_exists_yet() {
    let sm = Sysmgr::up();
    let inside = sm.copy_in(&deb());
    sm.ok(&["dpkg", "-i", &inside]);
    // As on a fresh machine: none of the directories the unit writes exist (the package's
    // tmpfiles.d would create them at boot; a first start must not depend on that).
    sm.ok(&[
        "rm",
        "-rf",
        "/run/modvisor",
        "/var/lib/modvisor",
        "/var/log/modvisor",
    ]);
    let out = sm.run_for(120, &["systemctl", "enable", "--now", "modvisord.service"]);
    assert!(
        out.status.success(),
        "systemctl enable --now: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        sm.journal("modvisord")
    );
    let active = sm.run(&["systemctl", "is-active", "modvisord"]);
    assert_eq!(
        String::from_utf8_lossy(&active.stdout).trim(),
        "active",
        "{}",
        sm.journal("modvisord")
    );
    for d in ["/run/modvisor", "/var/lib/modvisor", "/var/log/modvisor"] {
        sm.ok(&["test", "-d", d]);
    }
    // Served on the container's system bus, found by modvisorctl without flags.
    let status = sm.ok(&["modvisorctl", "--json", "status"]);
    assert!(status.trim_start().starts_with('['), "{status}");
    // Reload and restart as an operator would.
    sm.ok(&["systemctl", "reload", "modvisord"]);
    sm.ok(&["systemctl", "restart", "modvisord"]);
    let active = sm.run(&["systemctl", "is-active", "modvisord"]);
    assert_eq!(String::from_utf8_lossy(&active.stdout).trim(), "active");
}
