//! What this host can run now, for one module: the availability the mode decision
//! (`policy::decide`) takes. The only I/O is a `stat` of the native program.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::manifest::{Module, NativeExec};
use crate::policy::Availability;

/// The backends this daemon has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backends {
    /// The native backend: Some(true) when it is systemd (existing units need it).
    pub native_is_systemd: Option<bool>,
    /// The container engine, or why there is none.
    pub container: Result<(), String>,
    /// Where a native program is looked up (the modules' PATH).
    pub search_path: String,
}

/// Whether a program can be found: absolute and executable, or on `search_path`.
pub fn program_exists(prog: &str, search_path: &str) -> bool {
    let exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if prog.contains('/') {
        return exec(Path::new(prog));
    }
    search_path
        .split(':')
        .any(|d| exec(&Path::new(d).join(prog)))
}

pub fn availability(host: &Backends, m: &Module) -> Availability {
    let native = match (host.native_is_systemd, &m.native) {
        (None, _) => Err("no native backend is available".to_string()),
        (_, None) => Err("the manifest has no [native] section".to_string()),
        (Some(false), Some(NativeExec::Unit(u))) => Err(format!(
            "existing units ({u}) need the systemd backend, which this daemon does not run"
        )),
        (Some(true), Some(NativeExec::Unit(_))) => Ok(()),
        (Some(_), Some(NativeExec::Command { argv, .. })) => {
            if argv[0].contains("${") || program_exists(&argv[0], &host.search_path) {
                Ok(())
            } else {
                Err(format!("program {} not found", argv[0]))
            }
        }
    };
    Availability {
        native,
        container: host.container.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs() {
        assert!(program_exists("sh", "/nonexistent:/bin:/usr/bin"));
        assert!(program_exists("/bin/sh", ""));
        assert!(!program_exists("no-such-program-here", "/bin:/usr/bin"));
        assert!(!program_exists("/etc/passwd", ""), "not executable");
    }
}
