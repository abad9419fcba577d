//! The default engine user `modvisor-engine` on the host (the package creates it; the tests
//! that need it create it, in groups video and render, and remove what they created). The
//! tests using it run one at a time (nextest group `engine-user`).

use std::process::Command;
use std::time::{Duration, Instant};

pub const NAME: &str = "modvisor-engine";

pub struct EngineUser {
    pub uid: u32,
    pub gid: u32,
    /// (group name, gid) of video and render.
    pub groups: Vec<(String, u32)>,
    created_user: bool,
    created_groups: Vec<String>,
}

/// Runs `args`; a failure is fine when `done` holds afterwards (the package's postinst, in
/// tests/package.rs, may have created the same user or group meanwhile).
fn run(args: &[&str], done: impl Fn() -> bool) -> bool {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success() || done(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success()
}

fn gid_of(group: &str) -> Option<u32> {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

impl EngineUser {
    pub fn ensure() -> EngineUser {
        let mut created_groups = Vec::new();
        for g in ["video", "render"] {
            if gid_of(g).is_none() && run(&["groupadd", "--system", g], || gid_of(g).is_some()) {
                created_groups.push(g.to_string());
            }
        }
        let exists = || nix::unistd::User::from_name(NAME).ok().flatten().is_some();
        let mut created_user = false;
        if !exists() {
            created_user = run(
                &[
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--groups",
                    "video,render",
                    NAME,
                ],
                exists,
            );
        }
        let u = nix::unistd::User::from_name(NAME)
            .ok()
            .flatten()
            .expect("the engine user exists now");
        EngineUser {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups: ["video", "render"]
                .iter()
                .map(|g| (g.to_string(), gid_of(g).expect("group")))
                .collect(),
            created_user,
            created_groups,
        }
    }
}

impl Drop for EngineUser {
    fn drop(&mut self) {
        if self.created_user {
            // Its last processes (a unit being stopped) may take a moment to go.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let ok = Command::new("userdel")
                    .arg(NAME)
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for g in &self.created_groups {
            let _ = Command::new("groupdel").arg(g).output();
        }
    }
}

/// `Uid:` (real, effective, saved, fs) and `Groups:` of /proc/PID/status.
pub fn ids(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| -> Vec<u32> {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    (field("Uid:"), field("Groups:"))
}
