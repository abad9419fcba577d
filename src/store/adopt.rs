//! Taking a downloaded file over from the fetcher without trusting its path.
//!
//! The fetcher's directory (`STORE/.partial/KEY/`) belongs to the fetch user, which by default
//! is also the user direct-backend engines run as. That user can swap any `*.part` for a
//! symbolic link, a hard link, a FIFO, or a file it keeps writing to, at any moment, also
//! between two of our system calls. So modvisord never chowns, chmods, hashes or renames by
//! that path. It opens the file once (`O_NOFOLLOW`, `O_NONBLOCK`, `O_NOCTTY`), checks the open
//! descriptor (a regular file of the fetch user's with one link and the announced size), and
//! copies from it into a new file of its own in the (root-owned) destination directory. The
//! sha256 is computed over that copy, which nobody else can write, and the copy is what is
//! renamed into place. The `.part` file is only ever read, through the checked descriptor.
//!
//! The copy is `copy_file_range` (through `std::io::copy`): a reflink on filesystems that
//! have them (btrfs, XFS), an in-kernel copy elsewhere; the store needs room for a second copy
//! of the file while it is being installed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// A fetcher's file, opened without following links, and its checked length.
pub struct Opened {
    file: File,
    len: u64,
}

/// Opens `p` (in the fetch user's directory) for reading, without trusting it: a symbolic link
/// is not followed, a FIFO does not block, a device does not become our terminal. The
/// descriptor must be a regular file owned by `owner` with exactly one link (a hard link to
/// someone else's file has its owner, or a second link), of the `announced` size (else of at
/// most `max` bytes).
pub fn open_part(p: &Path, owner: u32, announced: Option<u64>, max: u64) -> Result<Opened, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => {
                "it is a symbolic link, not the file the fetcher wrote: refused".to_string()
            }
            _ => e.to_string(),
        })?;
    let m = file.metadata().map_err(|e| e.to_string())?;
    if !m.file_type().is_file() {
        return Err("it is not a regular file (replaced after the download?): refused".into());
    }
    if m.uid() != owner {
        return Err(format!(
            "it belongs to uid {}, not to the fetch user (uid {owner}): refused",
            m.uid()
        ));
    }
    if m.nlink() != 1 {
        return Err(format!(
            "it has {} hard links (a link to another file?): refused",
            m.nlink()
        ));
    }
    if let Some(s) = announced
        && m.len() != s
    {
        return Err(format!("it has {} bytes, not the {s} announced", m.len()));
    }
    if m.len() > max {
        return Err(format!(
            "it has {} bytes, more than the {max} allowed",
            m.len()
        ));
    }
    Ok(Opened { file, len: m.len() })
}

/// A new file of ours in a destination directory; removed when dropped before it is placed.
pub struct Staged {
    path: PathBuf,
    placed: bool,
}

impl Staged {
    /// Renames it to `to` (in the same directory or one beside it, on the same filesystem).
    pub fn place(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.placed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The copy of a fetcher's file: where it waits, its sha256 and size, and whether it starts
/// with the GGUF magic bytes.
pub struct Copied {
    pub staged: Staged,
    pub sha256: String,
    pub size: u64,
    pub gguf_magic: bool,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A new, empty file in `dir` (`O_EXCL`, mode 0600, never through a link), ours.
fn create_staged(dir: &Path) -> Result<(File, Staged), String> {
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".modvisor-{}-{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => {
                return Ok((
                    f,
                    Staged {
                        path,
                        placed: false,
                    },
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Err(format!("{}: no free temporary name", dir.display()))
}

/// Copies the opened file into a new file in `dir` and hashes the copy: what is checked is
/// exactly what will be placed, whatever happens to the fetcher's file meanwhile. The copy is
/// fsynced and made readable by all (0644) through its descriptor.
pub fn copy_into(src: Opened, dir: &Path) -> Result<Copied, String> {
    let (mut dst, staged) = create_staged(dir)?;
    let len = src.len;
    let n = std::io::copy(&mut (&src.file).take(len), &mut dst).map_err(|e| e.to_string())?;
    drop(src);
    if n != len {
        return Err(format!(
            "it shrank to {n} of {len} bytes while it was being copied: refused"
        ));
    }
    // Our copy, from its start: nobody else has it open.
    dst.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    let mut head: Vec<u8> = Vec::with_capacity(4);
    let mut r = &dst;
    loop {
        let k = r.read(&mut buf).map_err(|e| e.to_string())?;
        if k == 0 {
            break;
        }
        if head.len() < 4 {
            head.extend(buf[..k].iter().take(4 - head.len()));
        }
        h.update(&buf[..k]);
        size += k as u64;
    }
    dst.sync_all().map_err(|e| e.to_string())?;
    dst.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| e.to_string())?;
    Ok(Copied {
        staged,
        sha256: super::hex(&h.finalize()),
        size,
        gguf_magic: head == b"GGUF",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_file_of_the_owner_is_taken_and_the_copy_is_what_is_hashed() {
        let t = tempfile::tempdir().expect("tempdir");
        let me = nix::unistd::geteuid().as_raw();
        let part = t.path().join("m.gguf.part");
        std::fs::write(&part, b"GGUF and more").expect("write");

        let err = |r: Result<Opened, String>| r.err().unwrap_or_default();
        assert!(err(open_part(&part, me + 1, None, 100)).contains("belongs to uid"));
        assert!(err(open_part(&part, me, Some(3), 100)).contains("not the 3 announced"));
        assert!(err(open_part(&part, me, None, 3)).contains("more than the 3 allowed"));
        let link = t.path().join("link.part");
        std::os::unix::fs::symlink(&part, &link).expect("symlink");
        assert!(err(open_part(&link, me, None, 100)).contains("symbolic link"));
        let fifo = t.path().join("fifo.part");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        assert!(err(open_part(&fifo, me, None, 100)).contains("not a regular file"));
        let hard = t.path().join("hard.part");
        std::fs::hard_link(&part, &hard).expect("link");
        assert!(err(open_part(&hard, me, None, 100)).contains("2 hard links"));
        std::fs::remove_file(&hard).expect("rm");

        let dest = t.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        let o = open_part(&part, me, Some(13), 100).expect("open");
        std::fs::write(&part, b"short").expect("rewrite");
        let shrunk = copy_into(o, &dest).err().unwrap_or_default();
        assert!(shrunk.contains("shrank"), "{shrunk}");
        assert_eq!(
            std::fs::read_dir(&dest).expect("ls").count(),
            0,
            "no copy left"
        );
        std::fs::write(&part, b"GGUF and more").expect("rewrite");
        let o = open_part(&part, me, Some(13), 100).expect("open");
        // Whatever happens to the fetcher's file after it was opened, the copy is hashed.
        std::fs::write(&part, b"XGUF-changed!").expect("rewrite");
        let c = copy_into(o, &dest).expect("copy");
        assert_eq!(c.size, 13);
        assert_eq!(
            c.sha256,
            super::super::hex(&Sha256::digest(b"XGUF-changed!"))
        );
        assert!(!c.gguf_magic);
        let staged = c.staged.path.clone();
        assert_eq!(
            std::fs::metadata(&staged)
                .expect("stat")
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
        drop(c.staged);
        assert!(!staged.exists(), "an unplaced copy is removed");

        std::fs::write(&part, b"GGUF and more").expect("rewrite");
        let c = copy_into(open_part(&part, me, None, 100).expect("open"), &dest).expect("copy");
        assert!(c.gguf_magic);
        c.staged.place(&dest.join("m.gguf")).expect("place");
        assert_eq!(
            std::fs::read(dest.join("m.gguf")).expect("read"),
            b"GGUF and more"
        );
        assert_eq!(std::fs::read_dir(&dest).expect("ls").count(), 1);
    }
}
