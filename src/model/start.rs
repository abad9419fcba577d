//! The check before every start of an engine on a model: the model a member activated may
//! have been swapped since (for a symlink out of `model.directory`, for another file), and a
//! root engine must never load a file a non-root user can change.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::manifest::ModelSpec;

/// One opened step of the walk to the model: its path (for messages) and what `fstat` saw.
struct Step {
    path: PathBuf,
    stat: FileStat,
}

enum WalkError {
    /// A component is a symlink (or was swapped for one during the walk).
    Symlink,
    Other(String),
}

/// Re-validates the model an engine is about to be started on. Blocking (a few `openat` and
/// `fstat` calls): the caller runs it before every start.
///
/// - The path must still lead to a regular file inside `model.directory`: every component
///   below the directory is opened with `O_NOFOLLOW` and checked with `fstat`; a symlink is
///   only accepted when it resolves inside the directory (then its target is walked again).
/// - `.gguf` files must still start with the GGUF magic.
/// - `engine_is_root`: the file, every directory on the way and every ancestor of the
///   directory must be owned by root and writable by no other user or group (else a member
///   could swap what a root process parses).
pub fn check_for_start(
    spec: Option<&ModelSpec>,
    model: &Path,
    engine_is_root: bool,
) -> Result<(), String> {
    let dir = spec.and_then(|s| s.directory.as_deref());
    let gone = || match dir {
        Some(d) => format!(
            "{} is no longer a file inside model.directory {} (removed, or replaced by a symlink leading out of it)",
            model.display(),
            d.display()
        ),
        None => format!("{}: no such model file", model.display()),
    };
    // The base the walk starts from: the directory members may write to, or (a model named
    // only by the manifest) the file's own directory.
    let base = match dir {
        Some(d) => d.to_path_buf(),
        None => model.parent().unwrap_or(Path::new("/")).to_path_buf(),
    };
    let canon_base = std::fs::canonicalize(&base)
        .map_err(|e| format!("model.directory {}: {e}", base.display()))?;
    let rel = model
        .strip_prefix(&base)
        .or_else(|_| model.strip_prefix(&canon_base))
        .map_err(|_| gone())?
        .to_path_buf();
    let steps = match walk(&canon_base, &rel) {
        Ok(s) => s,
        Err(WalkError::Other(e)) => return Err(e),
        Err(WalkError::Symlink) => {
            // A link inside the directory is fine if it stays there; its target is walked.
            let target = std::fs::canonicalize(canon_base.join(&rel)).map_err(|_| gone())?;
            let rel2 = target.strip_prefix(&canon_base).map_err(|_| gone())?;
            match walk(&canon_base, rel2) {
                Ok(s) => s,
                Err(WalkError::Symlink) => return Err(gone()),
                Err(WalkError::Other(e)) => return Err(e),
            }
        }
    };
    if engine_is_root {
        for a in canon_base.ancestors().skip(1) {
            let st = nix::sys::stat::stat(a).map_err(|e| format!("{}: {e}", a.display()))?;
            root_only(a, &st)?;
        }
        for s in &steps {
            root_only(&s.path, &s.stat)?;
        }
    }
    Ok(())
}

/// Opens `base`, then each component of `rel` with `O_NOFOLLOW`, `fstat`ing each; the last
/// must be a regular file (and for `.gguf` start with the magic).
fn walk(base: &Path, rel: &Path) -> Result<Vec<Step>, WalkError> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY;
    let err = |p: &Path, e: nix::Error| match e {
        nix::Error::ELOOP | nix::Error::ENOTDIR => WalkError::Symlink,
        nix::Error::ENOENT => WalkError::Symlink,
        e => WalkError::Other(format!("{}: {e}", p.display())),
    };
    let mut fd: OwnedFd = nix::fcntl::open(base, flags | OFlag::O_DIRECTORY, Mode::empty())
        .map_err(|e| WalkError::Other(format!("{}: {e}", base.display())))?;
    let mut path = base.to_path_buf();
    let mut steps = vec![Step {
        path: path.clone(),
        stat: fstat(fd.as_fd()).map_err(|e| err(&path, e))?,
    }];
    let comps: Vec<_> = rel.components().collect();
    if comps.is_empty() {
        return Err(WalkError::Other(format!(
            "{} is not a regular file",
            base.display()
        )));
    }
    for (i, c) in comps.iter().enumerate() {
        let Component::Normal(name) = c else {
            return Err(WalkError::Symlink);
        };
        let last = i + 1 == comps.len();
        let f = if last {
            flags
        } else {
            flags | OFlag::O_DIRECTORY
        };
        path.push(name);
        fd = openat(fd.as_fd(), *name, f, Mode::empty()).map_err(|e| err(&path, e))?;
        let stat = fstat(fd.as_fd()).map_err(|e| err(&path, e))?;
        steps.push(Step {
            path: path.clone(),
            stat,
        });
    }
    let is_reg = steps.last().is_some_and(|s| {
        SFlag::from_bits_truncate(s.stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
    });
    if !is_reg {
        return Err(WalkError::Other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let mut file = File::from(fd);
    super::check_magic(&mut file, &path).map_err(WalkError::Other)?;
    Ok(steps)
}

/// Refuses what a non-root user could change: owned by someone else, writable by a group
/// other than root's, or by others (a sticky directory is fine: others cannot rename or
/// remove root's entries in it).
fn root_only(path: &Path, st: &FileStat) -> Result<(), String> {
    let mode = st.st_mode & 0o7777;
    let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let why = if st.st_uid != 0 {
        Some(format!("is owned by uid {}", st.st_uid))
    } else if mode & 0o020 != 0 && st.st_gid != 0 {
        Some(format!(
            "is writable by group {} (mode {mode:04o})",
            st.st_gid
        ))
    } else if mode & 0o002 != 0 && !(is_dir && mode & 0o1000 != 0) {
        Some(format!("is writable by others (mode {mode:04o})"))
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(w) => Err(format!(
            "refusing a root engine: {} {w}, so a non-root user could change the model it loads; make it root-owned and not writable by group or others, or run the engine as an unprivileged user (remove user = \"root\")",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(dir: &Path) -> ModelSpec {
        ModelSpec {
            default: None,
            directory: Some(dir.to_path_buf()),
        }
    }

    #[test]
    fn swapped_for_a_symlink_out_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let models = t.path().join("models");
        std::fs::create_dir_all(models.join("sub")).expect("mkdir");
        let m = models.join("sub/m.gguf");
        std::fs::write(&m, b"GGUF\x03\0\0\0").expect("write");
        std::fs::write(t.path().join("out.gguf"), b"GGUF").expect("write");
        let s = spec(&models);
        assert!(check_for_start(Some(&s), &m, false).is_ok());
        std::fs::remove_file(&m).expect("rm");
        std::os::unix::fs::symlink(t.path().join("out.gguf"), &m).expect("symlink");
        let e = check_for_start(Some(&s), &m, false).unwrap_err();
        assert!(
            e.contains("is no longer a file inside model.directory"),
            "{e}"
        );
        // A missing target outside gives the very same answer.
        std::fs::remove_file(&m).expect("rm");
        std::os::unix::fs::symlink(t.path().join("missing.gguf"), &m).expect("symlink");
        assert_eq!(check_for_start(Some(&s), &m, false).unwrap_err(), e);
        // A link that stays inside is followed.
        std::fs::remove_file(&m).expect("rm");
        std::fs::write(models.join("real.gguf"), b"GGUF").expect("write");
        std::os::unix::fs::symlink(models.join("real.gguf"), &m).expect("symlink");
        assert!(check_for_start(Some(&s), &m, false).is_ok());
        // A directory on the way swapped for a link out.
        std::fs::remove_dir_all(models.join("sub")).expect("rm");
        std::fs::create_dir_all(t.path().join("elsewhere")).expect("mkdir");
        std::fs::write(t.path().join("elsewhere/m.gguf"), b"GGUF").expect("write");
        std::os::unix::fs::symlink(t.path().join("elsewhere"), models.join("sub")).expect("ln");
        assert_eq!(check_for_start(Some(&s), &m, false).unwrap_err(), e);
    }

    #[test]
    fn root_engine_needs_root_only_paths() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // Under /tmp (sticky, root-owned ancestors), as the tests run.
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let models = t.path().join("models");
        std::fs::create_dir_all(&models).expect("mkdir");
        std::fs::set_permissions(&models, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let m = models.join("m.gguf");
        std::fs::write(&m, b"GGUF").expect("write");
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let s = spec(&models);
        check_for_start(Some(&s), &m, true).expect("root-only paths pass");
        std::fs::set_permissions(&models, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = check_for_start(Some(&s), &m, true).unwrap_err();
        assert!(e.contains("is writable by others (mode 0777)"), "{e}");
        assert!(
            check_for_start(Some(&s), &m, false).is_ok(),
            "fine for an unprivileged engine"
        );
        std::fs::set_permissions(&models, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        nix::unistd::chown(&m, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
        let e = check_for_start(Some(&s), &m, true).unwrap_err();
        assert!(e.contains("is owned by uid 65534"), "{e}");
    }
}
