//! What an untrusted module (`trusted = false`, the default) may ask of its container.
//!
//! Containers are never privileged, drop every capability but `cap_add`, and run with
//! `no-new-privileges`. For an untrusted module the manifest may not undo that: no host
//! network, only capabilities that act inside the container's own namespaces, no mounts of
//! the host's root or of its kernel/runtime interfaces, and read-write mounts only under the
//! directories the daemon config allows (`[containers] writable_volumes`).

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::container::parse_volume;
use super::raw::RawContainer;

/// Capabilities an untrusted container may keep. All are in Docker's and Podman's default set
/// and act only on the container's own files and processes: an image that starts as root,
/// `chown`s its data and drops to a user (CHOWN, DAC_OVERRIDE, FOWNER, SETUID, SETGID), signals
/// its own workers (KILL), or binds a port below 1024 inside its network namespace
/// (NET_BIND_SERVICE). Left out on purpose: SYS_ADMIN, NET_ADMIN, NET_RAW, SYS_PTRACE,
/// SYS_MODULE, DAC_READ_SEARCH (open_by_handle_at escapes), MKNOD, SYS_NICE, SYS_RESOURCE, ...
pub const UNTRUSTED_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
];

/// Host paths an untrusted module may not mount at all, not even read-only: the root (which
/// holds everything), and the kernel's and the host's control interfaces (a read-only bind of
/// an engine's socket under /run still lets the container connect to it and act as root).
const NEVER_MOUNTED: &[&str] = &[
    "/proc", "/sys", "/dev", "/run", "/var/run", "/etc", "/boot", "/root",
];

/// The daemon config's part of the containment rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containment {
    /// Host directories under which an untrusted module may mount read-write.
    pub writable_volumes: Vec<PathBuf>,
}

impl Default for Containment {
    fn default() -> Self {
        Containment {
            writable_volumes: vec![PathBuf::from("/var/lib/modvisor")],
        }
    }
}

/// A refusal: the byte offset of the key's value and the message.
pub(super) type Refusal = (usize, String);

const HINT: &str = "not allowed for an untrusted module (set trusted = true if root trusts it)";

/// Checks the `[container]` table of an untrusted module.
pub(super) fn check_untrusted(r: &RawContainer, rules: &Containment) -> Result<(), Refusal> {
    if let Some(n) = &r.network
        && n.get_ref().eq_ignore_ascii_case("host")
    {
        return Err((
            n.span().start,
            format!(
                "container.network: \"host\" shares the host's network namespace (its loopback services and abstract sockets); {HINT}"
            ),
        ));
    }
    for c in r.cap_add.iter().flatten() {
        let cap = c.get_ref().trim_start_matches("CAP_");
        if !UNTRUSTED_CAPS.contains(&cap) {
            return Err((
                c.span().start,
                format!(
                    "container.cap_add: \"{}\" is {HINT}; allowed: {}",
                    c.get_ref(),
                    UNTRUSTED_CAPS.join(", ")
                ),
            ));
        }
    }
    for v in r.volumes.iter().flatten() {
        check_volume(v, rules)?;
    }
    Ok(())
}

fn check_volume(v: &Spanned<String>, rules: &Containment) -> Result<(), Refusal> {
    // Syntax errors are reported by validation proper.
    let Ok(vol) = parse_volume(v.get_ref()) else {
        return Ok(());
    };
    let at = v.span().start;
    let text = v.get_ref();
    if vol.source == Path::new("/") {
        return Err((
            at,
            format!("container.volumes: \"{text}\" mounts the host's root directory; {HINT}"),
        ));
    }
    if let Some(p) = NEVER_MOUNTED
        .iter()
        .map(Path::new)
        .find(|p| vol.source.starts_with(p))
    {
        return Err((
            at,
            format!(
                "container.volumes: \"{text}\" mounts {} of the host (even read-only it exposes the host); {HINT}",
                p.display()
            ),
        ));
    }
    if !vol.read_only
        && !rules
            .writable_volumes
            .iter()
            .any(|w| vol.source.starts_with(w))
    {
        let allowed: Vec<String> = rules
            .writable_volumes
            .iter()
            .map(|w| w.display().to_string())
            .collect();
        return Err((
            at,
            format!(
                "container.volumes: \"{text}\" is read-write outside [containers] writable_volumes ({}); add \":ro\", or set trusted = true if root trusts the module",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            ),
        ));
    }
    Ok(())
}
