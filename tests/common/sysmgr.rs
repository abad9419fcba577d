//! A real systemd *system* manager: Debian bookworm booted with systemd as PID 1 under
//! systemd-nspawn (`testbed/sysmgr/up.sh`), for what the testbed's user manager cannot do:
//! `User=`, the full unit sandbox, the .deb with `systemctl enable --now`. One at a time (the
//! nextest test group `sysmgr`); stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Sysmgr {
    pub init: u32,
    pub rootfs: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testbed/sysmgr")
        .join(name)
}

impl Sysmgr {
    /// Boots the container (its rootfs is a fresh copy of the cached one every time).
    pub fn up() -> Sysmgr {
        let out = Command::new("timeout")
            .arg("600")
            .arg(script("up.sh"))
            .output()
            .expect("testbed/sysmgr/up.sh");
        assert!(
            out.status.success(),
            "sysmgr did not boot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let init = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("up.sh prints the init PID");
        let state = std::env::var("SYSMGR_STATE").unwrap_or_else(|_| "/run/modvisor-sysmgr".into());
        Sysmgr {
            init,
            rootfs: Path::new(&state).join("rootfs"),
        }
    }

    /// Runs a command inside (all namespaces of the container's PID 1), bounded by `secs`.
    pub fn run_for(&self, secs: u32, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg(secs.to_string())
            .args(["nsenter", "-t", &self.init.to_string(), "-a"])
            .args(args)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("nsenter")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_for(60, args)
    }

    /// Runs a command inside and asserts it succeeds; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "inside the system manager: {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Copies a host file into the container's /root; returns its path inside.
    pub fn copy_in(&self, host: &Path) -> String {
        let name = host.file_name().expect("file name");
        std::fs::copy(host, self.rootfs.join("root").join(name)).expect("copy into the rootfs");
        format!("/root/{}", name.to_string_lossy())
    }

    /// The journal of a unit inside, for failure messages.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.run(&[
            "journalctl",
            "--no-pager",
            "-o",
            "cat",
            "-n",
            "40",
            "-u",
            unit,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Sysmgr {
    fn drop(&mut self) {
        let _ = Command::new(script("down.sh")).output();
    }
}

/// The .deb built by scripts/package.sh (make test builds it before the tests).
pub fn deb() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let found = std::fs::read_dir(&dir).ok().and_then(|rd| {
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .max()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no .deb in {} (make test builds it with scripts/package.sh)",
            dir.display()
        )
    })
}

impl Sysmgr {
    /// Writes a file inside the container (path inside, mode), creating its directory.
    pub fn write(&self, inside: &str, text: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.rootfs.join(inside.trim_start_matches('/'));
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir inside");
        }
        std::fs::write(&p, text).expect("write inside");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Copies a host program into the container at `inside` with the shared libraries `ldd`
    /// lists that the container lacks (at the same paths, so its own libc is kept).
    pub fn install_program(&self, host: &Path, inside: &str) {
        let bytes = std::fs::read(host).expect("read program");
        self.write(inside, &bytes, 0o755);
        let out = Command::new("ldd").arg(host).output().expect("ldd");
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/') && w.contains(".so"))
        {
            let dst = self.rootfs.join(lib.trim_start_matches('/'));
            if !dst.exists() {
                let bytes = std::fs::read(lib).expect("read library");
                self.write(lib, &bytes, 0o644);
            }
        }
    }

    /// Runs a host program in the container's network namespace only (e.g. curl to its
    /// loopback, which the host cannot reach).
    pub fn in_netns(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("30")
            .args(["nsenter", "-t", &self.init.to_string(), "-n"])
            .args(args)
            .output()
            .expect("nsenter -n")
    }
}
