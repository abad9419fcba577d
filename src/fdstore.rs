//! Listening sockets that outlive a modvisord process. Each `[serve]` address is bound once;
//! under systemd a copy goes into the unit's file descriptor store (`FDSTORE=1`, named
//! `serve-ADDR`; the shipped unit sets `FileDescriptorStoreMax=`), so a restarted modvisord
//! gets the very socket back (`LISTEN_FDS`/`LISTEN_FDNAMES`) and the connections that arrive
//! while no modvisord runs wait in the kernel's backlog instead of being refused. Without
//! systemd nothing is stored: a restart closes the sockets for its duration.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use sd_notify::NotifyState;

use crate::manifest::ServeAddr;

/// A bound listening socket.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Bound {
    fn try_clone(&self) -> std::io::Result<Bound> {
        Ok(match self {
            Bound::Tcp(l) => Bound::Tcp(l.try_clone()?),
            Bound::Unix(l) => Bound::Unix(l.try_clone()?),
        })
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Bound::Tcp(l) => l.as_fd(),
            Bound::Unix(l) => l.as_fd(),
        }
    }
}

/// The bound sockets by address (the copy modvisord keeps; listeners get clones).
fn sockets() -> MutexGuard<'static, HashMap<ServeAddr, Bound>> {
    static SOCKETS: OnceLock<Mutex<HashMap<ServeAddr, Bound>>> = OnceLock::new();
    SOCKETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The store's name of an address: `serve-127.0.0.1_8080` (systemd refuses ':' in names),
/// `serve-unix/run/llama/chat.sock`.
pub fn name(addr: &ServeAddr) -> String {
    match addr {
        ServeAddr::Tcp(a) => format!("serve-{}", a.to_string().replace(':', "_")),
        ServeAddr::Unix(p) => format!("serve-unix{}", p.display()),
    }
}

fn parse(name: &str) -> Option<ServeAddr> {
    if let Some(p) = name.strip_prefix("serve-unix") {
        return p.parse().ok();
    }
    let a = name.strip_prefix("serve-")?;
    // The port follows the last '_'; an IPv6 address has its own (from its ':').
    let (host, port) = a.rsplit_once('_')?;
    format!("{}:{port}", host.replace('_', ":")).parse().ok()
}

/// Takes the sockets systemd passed back at start-up. Returns how many were kept.
///
/// # Safety
/// Unsets `LISTEN_*` in the environment: call it before any other thread runs (first thing
/// in `main`).
#[allow(unsafe_code)]
pub unsafe fn take_inherited() -> usize {
    // SAFETY: the caller guarantees no other thread runs (environment changes).
    let Ok(fds) = (unsafe { sd_notify::listen_fds_with_names_and_unset_env() }) else {
        return 0;
    };
    let mut map = sockets();
    for (fd, n) in fds {
        // SAFETY: sd_listen_fds(3) hands these descriptors to this process, once; nothing else
        // in it owns them (they are taken here only).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        match parse(&n) {
            Some(a @ ServeAddr::Tcp(_)) => {
                map.insert(a, Bound::Tcp(TcpListener::from(owned)));
            }
            Some(a @ ServeAddr::Unix(_)) => {
                map.insert(a, Bound::Unix(UnixListener::from(owned)));
            }
            None => drop(owned),
        }
    }
    map.len()
}

/// A listener on `addr`: the socket bound earlier (or passed back by systemd), else a new one,
/// stored with systemd.
pub fn listener(addr: &ServeAddr) -> std::io::Result<Bound> {
    let mut map = sockets();
    if let Some(l) = map.get(addr) {
        return l.try_clone();
    }
    let l = match addr {
        ServeAddr::Tcp(a) => Bound::Tcp(TcpListener::bind(a)?),
        ServeAddr::Unix(p) => Bound::Unix(bind_unix(p)?),
    };
    let state = [NotifyState::FdStore, NotifyState::FdName(&name(addr))];
    if let Err(e) = sd_notify::notify_with_fds(&state, &[l.as_fd()]) {
        tracing::debug!("cannot keep {addr} in systemd's file descriptor store: {e}");
    }
    let copy = l.try_clone()?;
    map.insert(addr.clone(), l);
    Ok(copy)
}

/// Binds a Unix socket at `p`, replacing a stale socket file nobody listens on (never another
/// kind of file, nor a socket in use), readable and writable by every local user as a
/// loopback TCP address would be (the directory's permissions decide who reaches it).
fn bind_unix(p: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::symlink_metadata(p) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        if std::os::unix::net::UnixStream::connect(p).is_ok() {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        std::fs::remove_file(p)?;
    }
    let l = UnixListener::bind(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// No module listens on `addr` any more: the socket is closed (here and in the store) once
/// its listeners end; a Unix socket's file is removed.
pub fn release(addr: &ServeAddr) {
    if sockets().remove(addr).is_some() {
        let state = [NotifyState::FdStoreRemove, NotifyState::FdName(&name(addr))];
        let _ = sd_notify::notify(&state);
        if let ServeAddr::Unix(p) = addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// After the first reconcile: sockets passed back for addresses no module claims are released.
pub fn release_unclaimed(claimed: &HashSet<ServeAddr>) {
    let unclaimed: Vec<ServeAddr> = sockets()
        .keys()
        .filter(|a| !claimed.contains(a))
        .cloned()
        .collect();
    for a in unclaimed {
        tracing::info!("releasing the socket of {a}: no module listens there any more");
        release(&a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in [
            "127.0.0.1:8080",
            "[::1]:9000",
            "0.0.0.0:1",
            "[fe80::1]:443",
            "unix:/run/llama/chat.sock",
        ] {
            let addr: ServeAddr = a.parse().expect("addr");
            let n = name(&addr);
            assert!(!n.contains(':') && n.is_ascii(), "{n}");
            assert_eq!(parse(&n), Some(addr), "{n}");
        }
        assert_eq!(parse("other"), None);
        assert_eq!(parse("serve-nonsense"), None);
    }

    #[test]
    fn one_socket_per_address_until_released() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let a = ServeAddr::Tcp(port);
        let l1 = listener(&a).expect("bind");
        // The same socket again, not a second bind (which would fail: in use).
        let l2 = listener(&a).expect("the kept socket");
        drop((l1, l2));
        release(&a);
        // Released and closed: the address can be bound anew.
        let again = std::net::TcpListener::bind(port);
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn unix_sockets_replace_stale_files_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("s.sock");
        let a = ServeAddr::Unix(p.clone());
        // A stale socket file (its listener gone) is replaced.
        drop(UnixListener::bind(&p).expect("bind"));
        let l = listener(&a).expect("replaces the stale socket");
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        // In use by someone else: refused. Not a socket: refused.
        let other = ServeAddr::Unix(t.path().join("busy.sock"));
        let _busy = UnixListener::bind(t.path().join("busy.sock")).expect("bind");
        assert!(listener(&other).is_err());
        std::fs::write(t.path().join("file"), b"x").expect("write");
        assert!(listener(&ServeAddr::Unix(t.path().join("file"))).is_err());
        drop(l);
        release(&a);
        assert!(!p.exists(), "released: the file is gone");
    }
}
