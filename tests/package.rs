//! The Debian package, built by scripts/package.sh (make test runs it first), installed on this
//! machine with dpkg: files land where the contract says, the unit verifies, the shipped
//! config and examples are valid. Purged again at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run_ok;
use common::sysmgr::deb;

struct Purge;
impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "modvisor"]).output();
    }
}

#[test]
fn the_deb_installs_where_the_contract_says_and_verifies() {
    let deb = deb();
    let _p = Purge;
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert_files_installed();
    assert!(
        Path::new("/etc/modvisor/modules.d").is_dir(),
        "postinst creates the admin's manifest directory"
    );
    let group = Command::new("getent")
        .args(["group", "modvisor"])
        .output()
        .expect("getent");
    assert!(group.status.success(), "postinst creates group modvisor");
    assert_units_verify();
    // The installed default config is valid and is the contract's defaults.
    let c = modvisor::config::Config::load(Some(Path::new("/etc/modvisor/modvisor.toml")))
        .expect("installed config parses");
    assert_eq!(c.state, PathBuf::from("/var/lib/modvisor"));
    // The installed tools work: the examples validate, the man page renders.
    run_ok(
        Command::new("/usr/bin/modvisorctl").args(["validate", "/usr/share/doc/modvisor/examples"]),
    );
    let out = Command::new("/usr/bin/modvisord")
        .arg("--version")
        .output()
        .expect("version");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Every file the package ships where the contract says, and the daemon finding its fetcher.
fn assert_files_installed() {
    for f in [
        "/usr/bin/modvisord",
        "/usr/bin/modvisorctl",
        "/usr/libexec/modvisor/modvisor-fetch",
        "/usr/lib/systemd/system/modvisord.service",
        "/usr/share/dbus-1/system.d/org.modvisor1.conf",
        "/usr/lib/sysusers.d/modvisor.conf",
        "/usr/lib/tmpfiles.d/modvisor.conf",
        "/etc/modvisor/modvisor.toml",
        "/usr/share/man/man8/modvisord.8.gz",
        "/usr/share/man/man1/modvisorctl.1.gz",
        "/usr/share/bash-completion/completions/modvisorctl",
        "/usr/share/doc/modvisor/examples/llama-chat.toml",
    ] {
        assert!(Path::new(f).exists(), "{f} is installed");
    }
    // The installed daemon finds the installed fetcher (not one beside it).
    let fetcher = modvisor::daemon::fetcher_path(Path::new("/usr/bin/modvisord"));
    assert_eq!(
        std::fs::canonicalize(&fetcher).expect("the fetcher modvisord looks for"),
        PathBuf::from("/usr/libexec/modvisor/modvisor-fetch")
    );
}

/// Every unit file shipped passes systemd-analyze verify.
fn assert_units_verify() {
    let units: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("units"))
            .expect("units/")
            .flatten()
            .map(|e| Path::new("/usr/lib/systemd/system").join(e.file_name()))
            .collect();
    assert!(!units.is_empty());
    for u in units {
        run_ok(Command::new("systemd-analyze").arg("verify").arg(&u));
    }
}
