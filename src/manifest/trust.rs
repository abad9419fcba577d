//! Whether a manifest can be trusted, checked without races: each manifest is opened once,
//! walking from `/` one component at a time with `O_NOFOLLOW` (so nothing can be swapped in
//! between the check and the read), and every directory on the way and the file itself are
//! checked through their open descriptors: owned by root (or the daemon's user), not writable
//! by others, not group-writable by a group other than 0, and no POSIX ACL entry that lets
//! another user or group write. What is read is the content of the file that was checked.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, fstatat};

/// What a manifest file holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// An empty file or a symlink to /dev/null.
    Mask,
    Text(Vec<u8>),
}

/// Manifests are small: anything larger is refused rather than read into memory.
const MAX_MANIFEST: u64 = 1 << 20;

const ONLY_ROOT: &str = "only root may change what modvisord runs";

/// Directories already walked and checked in this load pass, by the path the manifests
/// named them with: 200 manifests in one directory cost one walk from `/` (an open, a stat
/// and an ACL read per component), not 200. A pass checks each directory once, as it stood
/// when the pass first opened it; the next pass walks it anew.
#[derive(Default)]
pub struct Walked {
    dirs: HashMap<PathBuf, Result<(PathBuf, OwnedFd), String>>,
}

/// Opens and reads a manifest. With `check`, refuses it (with the reason) when anyone but root
/// (and the daemon's own user) could change it, its directory or any directory above.
pub fn open_manifest(path: &Path, check: bool) -> Result<Opened, String> {
    open_manifest_in(&mut Walked::default(), path, check)
}

/// [`open_manifest`], its directory walked once per `walked`.
pub fn open_manifest_in(walked: &mut Walked, path: &Path, check: bool) -> Result<Opened, String> {
    if !check {
        return open_unchecked(path);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let entry = walked.dirs.entry(parent.to_path_buf()).or_insert_with(|| {
        let dir_path = std::fs::canonicalize(parent)
            .map_err(|e| format!("cannot resolve {}: {e}", parent.display()))?;
        walk(&dir_path).map(|dir| (dir_path, dir))
    });
    let (dir_path, dir) = entry.as_ref().map_err(Clone::clone)?;
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => read_checked(File::from(fd), path),
        Err(Errno::ELOOP) => follow_link(dir, dir_path, path),
        Err(e) => Err(format!("cannot open: {e}")),
    }
}

/// A symlink in a trusted directory: to /dev/null it masks; otherwise its target is opened
/// with the same checks (every directory of the target's path, and the target itself).
fn follow_link(dir: &OwnedFd, dir_path: &Path, path: &Path) -> Result<Opened, String> {
    let name = path.file_name().unwrap_or_default();
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| format!("cannot stat: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != me {
        return Err(format!(
            "refusing the symlink {}: owned by uid {}, not root ({ONLY_ROOT})",
            path.display(),
            st.st_uid
        ));
    }
    let target = nix::fcntl::readlinkat(dir, name).map_err(|e| format!("cannot read link: {e}"))?;
    let target = dir_path.join(target);
    let real = std::fs::canonicalize(&target)
        .map_err(|e| format!("cannot resolve {}: {e}", target.display()))?;
    if real == Path::new("/dev/null") {
        return Ok(Opened::Mask);
    }
    let parent = real.parent().unwrap_or(Path::new("/"));
    let dir = walk(parent)?;
    let name = real.file_name().unwrap_or_default();
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = openat(&dir, name, flags, Mode::empty())
        .map_err(|e| format!("cannot open {}: {e}", real.display()))?;
    read_checked(File::from(fd), &real)
}

/// Opens `dir` (absolute, without symlinks) from `/`, checking every directory on the way.
fn walk(dir: &Path) -> Result<OwnedFd, String> {
    let dflags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut fd =
        nix::fcntl::open("/", dflags, Mode::empty()).map_err(|e| format!("cannot open /: {e}"))?;
    let mut at = PathBuf::from("/");
    check_open(&fd, "directory", &at)?;
    for c in dir.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        at.push(name);
        fd = openat(&fd, name, dflags, Mode::empty()).map_err(|e| match e {
            // A symlink where the resolved path had a directory: it changed under us.
            Errno::ELOOP | Errno::ENOTDIR => {
                format!("{} changed while it was checked", at.display())
            }
            e => format!("cannot open {}: {e}", at.display()),
        })?;
        check_open(&fd, "directory", &at)?;
    }
    Ok(fd)
}

fn check_open(fd: &OwnedFd, what: &str, path: &Path) -> Result<(), String> {
    let f = File::from(fd.try_clone().map_err(|e| e.to_string())?);
    let m = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    check_node(&f, &m, what, path)
}

fn read_checked(f: File, path: &Path) -> Result<Opened, String> {
    let m = f.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !m.is_file() {
        return Err(format!(
            "refusing the manifest {}: not a regular file",
            path.display()
        ));
    }
    check_node(&f, &m, "manifest", path)?;
    if m.len() > MAX_MANIFEST {
        return Err(format!(
            "refusing the manifest {}: larger than {MAX_MANIFEST} bytes",
            path.display()
        ));
    }
    let mut text = Vec::with_capacity(m.len() as usize);
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(if text.is_empty() {
        Opened::Mask
    } else {
        Opened::Text(text)
    })
}

/// Owner, mode and ACL of one open file or directory.
fn check_node(f: &File, m: &Metadata, what: &str, path: &Path) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let mode = m.mode() & 0o7777;
    let p = path.display();
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "refusing the {what} {p}: owned by uid {}, not root ({ONLY_ROOT})",
            m.uid()
        ));
    }
    // A sticky directory of root's (/tmp) lets others add entries, never replace root's own:
    // each entry below is checked in turn.
    let sticky_root_dir = m.is_dir() && mode & 0o1000 != 0 && m.uid() == 0;
    if (mode & 0o002 != 0 && !sticky_root_dir) || (mode & 0o020 != 0 && m.gid() != 0) {
        return Err(format!(
            "refusing the {what} {p}: writable by others (mode {mode:04o}); {ONLY_ROOT}"
        ));
    }
    if let Some(who) = acl_writer(f)? {
        return Err(format!(
            "refusing the {what} {p}: its ACL lets {who} write; {ONLY_ROOT}"
        ));
    }
    Ok(())
}

/// Who other than root an access ACL lets write (named users and groups, after the mask).
fn acl_writer(f: &File) -> Result<Option<String>, String> {
    use xattr::FileExt;
    match f.get_xattr("system.posix_acl_access") {
        Ok(Some(bytes)) => Ok(acl_write_entry(&bytes, nix::unistd::geteuid().as_raw())),
        Ok(None) => Ok(None),
        // A file system without ACLs has none to check.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(format!("cannot read the ACL: {e}")),
    }
}

const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_WRITE: u16 = 0x02;

/// Parses the kernel's xattr form of an ACL (version 2: a u32 header, then 8-byte entries
/// of tag u16, perm u16, id u32, little endian) and names the first entry that grants write
/// to a user other than root and `me`, or to a group other than 0. Malformed data counts as
/// a writer: it cannot be shown harmless.
pub fn acl_write_entry(bytes: &[u8], me: u32) -> Option<String> {
    let body = match bytes.split_first_chunk::<4>() {
        Some((h, body)) if u32::from_le_bytes(*h) == 2 && body.len() % 8 == 0 => body,
        _ => return Some("an entry of an unreadable ACL".into()),
    };
    let entries: Vec<(u16, u16, u32)> = body
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect();
    let mask = entries
        .iter()
        .find(|e| e.0 == ACL_MASK)
        .map(|e| e.1)
        .unwrap_or(0o7);
    entries.iter().find_map(|&(tag, perm, id)| {
        let writes = perm & mask & ACL_WRITE != 0;
        match tag {
            ACL_USER if writes && id != 0 && id != me => Some(format!("uid {id}")),
            ACL_GROUP if writes && id != 0 => Some(format!("gid {id}")),
            _ => None,
        }
    })
}

/// Without the trust check (not running as root): follow symlinks, read.
fn open_unchecked(path: &Path) -> Result<Opened, String> {
    if std::fs::read_link(path).is_ok_and(|t| t == Path::new("/dev/null")) {
        return Ok(Opened::Mask);
    }
    let f = File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut text = Vec::new();
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_MANIFEST {
        return Err(format!("larger than {MAX_MANIFEST} bytes"));
    }
    Ok(if text.is_empty() {
        Opened::Mask
    } else {
        Opened::Text(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (t, p, i) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn a_directory_walked_once_per_pass_answers_for_each_of_its_manifests() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("modules.d");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for n in ["a", "b"] {
            std::fs::write(dir.join(format!("{n}.toml")), format!("name = \"{n}\"\n"))
                .expect("write");
        }
        std::fs::write(dir.join("c.toml"), "").expect("write");
        let mut walked = Walked::default();
        let read = |w: &mut Walked, n: &str| open_manifest_in(w, &dir.join(n), true);
        assert_eq!(
            read(&mut walked, "a.toml"),
            Ok(Opened::Text(b"name = \"a\"\n".to_vec()))
        );
        assert_eq!(
            read(&mut walked, "b.toml"),
            Ok(Opened::Text(b"name = \"b\"\n".to_vec()))
        );
        assert_eq!(read(&mut walked, "c.toml"), Ok(Opened::Mask));
        assert!(read(&mut walked, "d.toml").is_err_and(|e| e.contains("cannot open")));
        // Anyone may write the directory now: the next pass refuses every manifest in it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let mut next = Walked::default();
        for n in ["a.toml", "b.toml"] {
            let why = read(&mut next, n).expect_err("a world-writable directory");
            assert!(why.contains("refusing the directory"), "{why}");
        }
        assert_eq!(next.dirs.len(), 1, "one walk for the directory");
    }

    #[test]
    fn acl_entries() {
        let obj = [
            (0x01, 6, u32::MAX),
            (0x04, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ];
        assert_eq!(acl_write_entry(&acl(&obj), 0), None);
        let alice = [&obj[..], &[(ACL_USER, 6, 1000), (ACL_MASK, 6, u32::MAX)]].concat();
        assert_eq!(
            acl_write_entry(&acl(&alice), 0).as_deref(),
            Some("uid 1000")
        );
        // The mask takes write away: harmless.
        let masked = [&obj[..], &[(ACL_USER, 6, 1000), (ACL_MASK, 4, u32::MAX)]].concat();
        assert_eq!(acl_write_entry(&acl(&masked), 0), None);
        let group = [&obj[..], &[(ACL_GROUP, 7, 50), (ACL_MASK, 7, u32::MAX)]].concat();
        assert_eq!(acl_write_entry(&acl(&group), 0).as_deref(), Some("gid 50"));
        let root_group = [&obj[..], &[(ACL_GROUP, 7, 0), (ACL_MASK, 7, u32::MAX)]].concat();
        assert_eq!(acl_write_entry(&acl(&root_group), 0), None);
        assert!(acl_write_entry(&[1, 2, 3], 0).is_some());
    }
}
