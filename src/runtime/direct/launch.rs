//! What a direct child needs before it can be spawned, prepared off the supervisor actor
//! (NSS lookups and secret files are blocking I/O): the engine's identity, the environment
//! file's variables, a private credentials directory; and the `Command` that applies them.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::manifest::Privileges;
use crate::privileges::Identity;

/// The blocking part of a start, done in `spawn_blocking`.
pub struct Prepared {
    /// None: run as modvisord's own user (it is not root and so cannot switch).
    pub identity: Option<Identity>,
    pub env_file: Vec<(String, String)>,
    pub credentials: Option<PathBuf>,
}

/// Resolves the identity, reads the environment file, writes the credentials directory.
pub fn prepare(name: &str, p: &Privileges, cred_root: Option<&Path>) -> Result<Prepared, String> {
    let identity = if nix::unistd::geteuid().is_root() {
        Some(crate::privileges::resolve(p)?)
    } else if p.user.is_some() {
        return Err(format!(
            "modvisord is not root: it cannot run an engine as user {}",
            p.user_name()
        ));
    } else {
        None
    };
    let env_file = match &p.environment_file {
        Some(f) => crate::secrets::environment_file(f)?,
        None => Vec::new(),
    };
    let credentials = if p.credentials.is_empty() {
        None
    } else {
        let root = cred_root.ok_or("no runtime directory for the credentials")?;
        Some(write_credentials(
            &root.join(name),
            &p.credentials,
            identity.as_ref(),
        )?)
    };
    Ok(Prepared {
        identity,
        env_file,
        credentials,
    })
}

/// Copies each credential into `dir` (mode 0700, owned by the engine; files 0400), as
/// systemd's `LoadCredential=` does under `/run/credentials/UNIT`.
fn write_credentials(
    dir: &Path,
    creds: &BTreeMap<String, PathBuf>,
    id: Option<&Identity>,
) -> Result<PathBuf, String> {
    let fail = |e: std::io::Error| format!("credentials directory {}: {e}", dir.display());
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
        // Others may pass through to their own directory, not list the others.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).map_err(fail)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir(dir).map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    let owner = id.map(|i| {
        (
            nix::unistd::Uid::from_raw(i.uid),
            nix::unistd::Gid::from_raw(i.gid),
        )
    });
    for (name, src) in creds {
        let bytes = crate::secrets::read_checked(src, &format!("credential {name}"))?;
        let dst = dir.join(name);
        std::fs::write(&dst, bytes).map_err(fail)?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o400)).map_err(fail)?;
        if let Some((u, g)) = owner {
            nix::unistd::chown(&dst, Some(u), Some(g)).map_err(|e| fail(e.into()))?;
        }
    }
    if let Some((u, g)) = owner {
        nix::unistd::chown(dir, Some(u), Some(g)).map_err(|e| fail(e.into()))?;
    }
    Ok(dir.to_path_buf())
}

/// The command of a direct child: a clean environment, its own process group, output piped,
/// and the engine's identity applied between fork and exec.
pub fn command(
    argv: &[String],
    environment: &BTreeMap<String, String>,
    working_directory: Option<&Path>,
    name: &str,
    prep: &Prepared,
    no_new_privileges: bool,
) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", super::DEFAULT_PATH)
        .env("MODVISOR_MODULE", name)
        .envs(environment)
        // Like EnvironmentFile=: its settings override Environment=.
        .envs(prep.env_file.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(c) = &prep.credentials {
        cmd.env("CREDENTIALS_DIRECTORY", c);
    }
    if let Some(wd) = working_directory {
        cmd.current_dir(wd);
    }
    let id = prep.identity.clone();
    if let Some(i) = &id {
        cmd.env("USER", &i.user)
            .env("LOGNAME", &i.user)
            .env("HOME", &i.home);
    }
    let groups: Vec<libc::gid_t> = id.as_ref().map(|i| i.groups.clone()).unwrap_or_default();
    let nofile = crate::limits::for_children();
    // std's uid()/gid() drop every supplementary group and `groups()` is not stable, so the
    // identity is applied here: setgroups, setgid, then setuid (which drops all capabilities).
    // SAFETY: between fork and exec only async-signal-safe system calls are made (setrlimit,
    // setgroups, setgid, setuid, prctl); `groups` was allocated before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            // The open-file limit modvisord found, not the one it raised for itself.
            crate::limits::restore_in_child(nofile)?;
            if let Some(i) = &id
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(i.gid) != 0
                    || libc::setuid(i.uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}
