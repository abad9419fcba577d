//! The engine's identity, sandbox and secrets as transient-unit properties. Each property is
//! set for a reason (one line each below), and each was checked against a real llama-server
//! (tests/sysmgr.rs under a system manager, tests/llama.rs under the testbed's user manager).

use std::path::{Path, PathBuf};

use zbus::zvariant::{OwnedVariant, Variant};

use crate::manifest::{Privileges, Sandbox};

/// The manager the units are created in, as told by the bus (see [`ManagerKind::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ManagerKind {
    /// systemd as PID 1: every sandbox directive works.
    pub system: bool,
    /// The manager's uid: only a root manager can run units as another user (`User=`).
    pub uid: u32,
}

impl ManagerKind {
    /// Asks the bus daemon who owns `org.freedesktop.systemd1`: the system manager is PID 1
    /// and uid 0. The bus reports the owner's credentials itself (SO_PEERCRED), so a manager
    /// cannot claim to be another; a user manager is never PID 1.
    pub async fn detect(conn: &zbus::Connection) -> zbus::Result<ManagerKind> {
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        let name = zbus::names::BusName::try_from("org.freedesktop.systemd1")?;
        let pid = dbus.get_connection_unix_process_id(name.clone()).await?;
        let uid = dbus.get_connection_unix_user(name).await?;
        Ok(ManagerKind {
            system: pid == 1 && uid == 0,
            uid,
        })
    }

    /// Whether units can be given a `User=`: a manager running as root can switch users (the
    /// system manager, and also a root user manager, as in the testbed: measured).
    pub fn can_switch_users(&self) -> bool {
        self.uid == 0
    }

    pub fn describe(&self) -> String {
        match (self.system, self.uid) {
            (true, _) => "the system manager".into(),
            (false, 0) => "a user manager running as root".into(),
            (false, u) => format!("the user manager of uid {u}"),
        }
    }
}

/// What the blocking preparation found on this machine (device nodes, checked files).
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// `/dev/nvidia*` nodes present now (for `DeviceAllow=`).
    pub nvidia_devices: Vec<String>,
    /// Of video and render, those that exist (a missing group fails the unit with 216/GROUP).
    pub gpu_groups: Vec<String>,
}

/// The NVIDIA device nodes: the fixed ones (which need not exist yet: the driver creates
/// them on first use) and every `/dev/nvidia*` present now.
pub fn nvidia_devices() -> Vec<String> {
    let mut v: Vec<String> = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Ok(rd) = std::fs::read_dir("/dev") {
        let mut found: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.starts_with("nvidia"))
            .map(|n| format!("/dev/{n}"))
            .filter(|p| !v.contains(p))
            .collect();
        found.sort();
        v.extend(found);
    }
    v
}

fn ov(v: Variant<'static>) -> Option<OwnedVariant> {
    OwnedVariant::try_from(v).ok()
}

fn b(x: bool) -> Option<OwnedVariant> {
    ov(Variant::from(x))
}

/// Identity, sandbox and secrets of a transient unit.
pub fn properties(
    p: &Privileges,
    mgr: ManagerKind,
    state_dir: &Path,
    host: &Host,
) -> Vec<(&'static str, Option<OwnedVariant>)> {
    let mut v = identity(p, mgr, host);
    v.extend(sandbox(&p.sandbox, p.gpu, mgr, host));
    v.extend(paths(p, state_dir));
    v.extend(secrets(p));
    v
}

fn identity(
    p: &Privileges,
    mgr: ManagerKind,
    host: &Host,
) -> Vec<(&'static str, Option<OwnedVariant>)> {
    let mut v = Vec::new();
    if !mgr.can_switch_users() {
        // A non-root user manager runs every unit as itself (start() refuses another user).
        return v;
    }
    // The engine never runs as root unless the manifest says so.
    v.push(("User", ov(Variant::from(p.user_name().to_string()))));
    if let Some(g) = &p.group {
        // The manifest's group instead of the user's primary one.
        v.push(("Group", ov(Variant::from(g.clone()))));
    }
    if p.gpu && !host.gpu_groups.is_empty() {
        // GPU device nodes belong to video (NVIDIA) and render (DRM); the engine user is a
        // member through sysusers.d, this keeps it so for another `user`.
        v.push((
            "SupplementaryGroups",
            ov(Variant::from(host.gpu_groups.clone())),
        ));
    }
    v
}

fn sandbox(
    s: &Sandbox,
    gpu: bool,
    mgr: ManagerKind,
    host: &Host,
) -> Vec<(&'static str, Option<OwnedVariant>)> {
    let mut v = vec![
        // No setuid binary or file capability can give the engine more than it has.
        ("NoNewPrivileges", b(s.no_new_privileges)),
        // The whole file system read-only but /dev, /proc, /sys and the paths below.
        (
            "ProtectSystem",
            ov(Variant::from(
                if s.protect_system { "strict" } else { "no" }.to_string(),
            )),
        ),
        // A /tmp of its own: no other process's temp files, no planted ones.
        ("PrivateTmp", b(s.private_tmp)),
        // No setuid/setgid files can be created.
        ("RestrictSUIDSGID", b(s.restrict_suid_sgid)),
        // No personality(2) changes (READ_IMPLIES_EXEC and the like).
        ("LockPersonality", b(s.lock_personality)),
        // No kernel module loading (explicit, modules also need capabilities).
        ("ProtectKernelModules", b(s.protect_kernel_modules)),
        // cgroupfs read-only: the engine cannot escape its limits.
        ("ProtectControlGroups", b(s.protect_control_groups)),
    ];
    if s.drop_capabilities {
        // No capability at all, even for user = "root".
        v.push(("CapabilityBoundingSet", ov(Variant::from(0u64))));
    }
    if gpu {
        // The GPU's device nodes must be visible: only those (and the pseudo devices).
        v.push(("PrivateDevices", b(false)));
        v.push(("DevicePolicy", ov(Variant::from("closed".to_string()))));
        let allow: Vec<(String, String)> = host
            .nvidia_devices
            .iter()
            .map(|d| (d.clone(), "rw".to_string()))
            .collect();
        v.push(("DeviceAllow", ov(Variant::from(allow))));
    } else {
        // Only /dev/null, zero, random and the like: no disks, no GPUs, no ttys.
        v.push(("PrivateDevices", b(s.private_devices)));
    }
    if mgr.system {
        // These three fail with 226/NAMESPACE under the testbed's user manager (it runs in a
        // private mount namespace): applied only under a system manager.
        // /home, /root and /run/user invisible.
        v.push((
            "ProtectHome",
            ov(Variant::from(
                if s.protect_home { "yes" } else { "no" }.to_string(),
            )),
        ));
        // /proc/sys, /sys and the like read-only.
        v.push(("ProtectKernelTunables", b(s.protect_kernel_tunables)));
        // No access to the kernel log.
        v.push(("ProtectKernelLogs", b(s.protect_kernel_logs)));
    }
    v
}

fn paths(p: &Privileges, state_dir: &Path) -> Vec<(&'static str, Option<OwnedVariant>)> {
    let mut v = Vec::new();
    if let Some(d) = &p.model_directory {
        // Models are read, never written (also with protect_system relaxed); "-": a missing
        // directory is the engine's error to report, not a 226/NAMESPACE.
        v.push((
            "ReadOnlyPaths",
            ov(Variant::from(vec![format!("-{}", d.display())])),
        ));
    }
    // The module's state directory stays writable under ProtectSystem=strict ("-": a
    // missing path would fail the start with 226/NAMESPACE). Without it nothing is read-only
    // to exempt it from, and the directive alone would cost a mount namespace per start.
    if p.sandbox.protect_system {
        v.push((
            "ReadWritePaths",
            ov(Variant::from(vec![format!("-{}", state_dir.display())])),
        ));
    }
    v
}

fn secrets(p: &Privileges) -> Vec<(&'static str, Option<OwnedVariant>)> {
    let mut v = Vec::new();
    if let Some(f) = &p.environment_file {
        // Read by the manager at start: the values never appear in Environment=, which
        // `systemctl show` shows to every local user.
        v.push((
            "EnvironmentFiles",
            ov(Variant::from(vec![(f.display().to_string(), false)])),
        ));
    }
    if !p.credentials.is_empty() {
        // Files under $CREDENTIALS_DIRECTORY, readable by the engine only.
        let creds: Vec<(String, String)> = p
            .credentials
            .iter()
            .map(|(n, f)| (n.clone(), f.display().to_string()))
            .collect();
        v.push(("LoadCredential", ov(Variant::from(creds))));
    }
    v
}

/// Checks done before `StartTransientUnit` (blocking: NSS and files; run off the runtime).
/// Returns what the properties need from the host.
pub fn prepare(p: &Privileges, mgr: ManagerKind) -> Result<Host, String> {
    if mgr.can_switch_users() {
        crate::privileges::check(p)?;
    } else if p.user.is_some() {
        return Err(format!(
            "{} cannot run units as user {}: native.user needs a system manager",
            mgr.describe(),
            p.user_name()
        ));
    }
    if !mgr.system && !p.credentials.is_empty() && !p.runs_as_root() {
        // Measured: a user manager puts them under its own $XDG_RUNTIME_DIR (mode 0700),
        // which another user cannot enter.
        return Err(format!(
            "{} keeps credentials where user {} cannot read them: native.credentials needs a system manager (or environment_file)",
            mgr.describe(),
            p.user_name()
        ));
    }
    if let Some(f) = &p.environment_file {
        crate::secrets::open_checked(f, "environment_file")?;
    }
    for (name, f) in &p.credentials {
        crate::secrets::open_checked(f, &format!("credential {name}"))?;
    }
    let gpu_groups = ["video", "render"]
        .iter()
        .filter(|g| p.gpu && nix::unistd::Group::from_name(g).ok().flatten().is_some())
        .map(|g| g.to_string())
        .collect();
    Ok(Host {
        nvidia_devices: if p.gpu { nvidia_devices() } else { Vec::new() },
        gpu_groups,
    })
}

/// The module's state directory, as the supervisor creates it.
pub fn state_dir(state: &Path, module: &str) -> PathBuf {
    state.join("modules").join(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[(&'static str, Option<OwnedVariant>)]) -> Vec<&'static str> {
        v.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn system_only_directives_and_gpu_devices() {
        let p = Privileges::default();
        let host = Host::default();
        let user_mgr = ManagerKind {
            system: false,
            uid: 0,
        };
        let sys = ManagerKind {
            system: true,
            uid: 0,
        };
        let u = names(&properties(&p, user_mgr, Path::new("/s"), &host));
        let s = names(&properties(&p, sys, Path::new("/s"), &host));
        for k in ["ProtectHome", "ProtectKernelTunables", "ProtectKernelLogs"] {
            assert!(!u.contains(&k) && s.contains(&k), "{k}");
        }
        assert!(u.contains(&"User") && u.contains(&"CapabilityBoundingSet"));
        let nonroot = ManagerKind {
            system: false,
            uid: 1000,
        };
        assert!(!names(&properties(&p, nonroot, Path::new("/s"), &host)).contains(&"User"));
        let gpu = Privileges {
            gpu: true,
            ..Privileges::default()
        };
        let host = Host {
            nvidia_devices: vec!["/dev/nvidiactl".into()],
            gpu_groups: vec!["video".into()],
        };
        let g = properties(&gpu, sys, Path::new("/s"), &host);
        let pd = g
            .iter()
            .find(|(k, _)| *k == "PrivateDevices")
            .and_then(|(_, v)| v.as_ref());
        assert_eq!(
            pd.and_then(|v| bool::try_from(v.try_clone().ok()?).ok()),
            Some(false)
        );
        assert!(names(&g).contains(&"DeviceAllow") && names(&g).contains(&"SupplementaryGroups"));
        let relaxed = Privileges {
            sandbox: Sandbox {
                drop_capabilities: false,
                ..Sandbox::default()
            },
            ..Privileges::default()
        };
        assert!(
            !names(&properties(
                &relaxed,
                sys,
                Path::new("/s"),
                &Host::default()
            ))
            .contains(&"CapabilityBoundingSet")
        );
        assert!(names(&properties(&p, sys, Path::new("/s"), &host)).contains(&"ReadWritePaths"));
        let writable = Privileges {
            sandbox: Sandbox {
                protect_system: false,
                ..Sandbox::default()
            },
            ..Privileges::default()
        };
        let w = names(&properties(&writable, sys, Path::new("/s"), &host));
        assert!(
            !w.contains(&"ReadWritePaths"),
            "no namespace for nothing: {w:?}"
        );
    }

    #[test]
    fn a_non_root_user_manager_cannot_switch() {
        let p = Privileges {
            user: Some("alice".into()),
            ..Privileges::default()
        };
        let e = prepare(
            &p,
            ManagerKind {
                system: false,
                uid: 1000,
            },
        )
        .unwrap_err();
        assert!(e.contains("cannot run units as user alice"), "{e}");
    }
}
