//! Listening sockets that outlive a modvisord process. Each `[serve]` address is bound once;
//! under systemd a copy goes into the unit's file descriptor store (`FDSTORE=1`, named
//! `serve-ADDR`; the shipped unit sets `FileDescriptorStoreMax=`), so a restarted modvisord
//! gets the very socket back (`LISTEN_FDS`/`LISTEN_FDNAMES`) and the connections that arrive
//! while no modvisord runs wait in the kernel's backlog instead of being refused. Without
//! systemd nothing is stored: a restart closes the sockets for its duration.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, OnceLock};

use sd_notify::NotifyState;

/// The bound sockets by address (the copy modvisord keeps; listeners get clones).
fn sockets() -> MutexGuard<'static, HashMap<SocketAddr, TcpListener>> {
    static SOCKETS: OnceLock<Mutex<HashMap<SocketAddr, TcpListener>>> = OnceLock::new();
    SOCKETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The store's name of an address: `serve-127.0.0.1_8080` (systemd refuses ':' in names).
pub fn name(addr: &SocketAddr) -> String {
    format!("serve-{}", addr.to_string().replace(':', "_"))
}

fn parse(name: &str) -> Option<SocketAddr> {
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
            Some(addr) => {
                map.insert(addr, TcpListener::from(owned));
            }
            None => drop(owned),
        }
    }
    map.len()
}

/// A listener on `addr`: the socket bound earlier (or passed back by systemd), else a new one,
/// stored with systemd.
pub fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut map = sockets();
    if let Some(l) = map.get(&addr) {
        return l.try_clone();
    }
    let l = TcpListener::bind(addr)?;
    let state = [NotifyState::FdStore, NotifyState::FdName(&name(&addr))];
    if let Err(e) = sd_notify::notify_with_fds(&state, &[l.as_fd()]) {
        tracing::debug!("cannot keep {addr} in systemd's file descriptor store: {e}");
    }
    let copy = l.try_clone()?;
    map.insert(addr, l);
    Ok(copy)
}

/// No module listens on `addr` any more: the socket is closed (here and in the store) once
/// its listeners end.
pub fn release(addr: &SocketAddr) {
    if sockets().remove(addr).is_some() {
        let state = [NotifyState::FdStoreRemove, NotifyState::FdName(&name(addr))];
        let _ = sd_notify::notify(&state);
    }
}

/// After the first reconcile: sockets passed back for addresses no module claims are released.
pub fn release_unclaimed(claimed: &HashSet<SocketAddr>) {
    let unclaimed: Vec<SocketAddr> = sockets()
        .keys()
        .filter(|a| !claimed.contains(a))
        .copied()
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
        for a in ["127.0.0.1:8080", "[::1]:9000", "0.0.0.0:1", "[fe80::1]:443"] {
            let addr: SocketAddr = a.parse().expect("addr");
            let n = name(&addr);
            assert!(!n.contains(':') && n.is_ascii(), "{n}");
            assert_eq!(parse(&n), Some(addr), "{n}");
        }
        assert_eq!(parse("other"), None);
        assert_eq!(parse("serve-nonsense"), None);
    }

    #[test]
    fn one_socket_per_address_until_released() {
        let a = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let l1 = listener(a).expect("bind");
        // The same socket again, not a second bind (which would fail: in use).
        let l2 = listener(a).expect("the kept socket");
        assert_eq!(l1.local_addr().ok(), l2.local_addr().ok());
        drop((l1, l2));
        release(&a);
        // Released and closed: the address can be bound anew.
        let again = std::net::TcpListener::bind(a);
        assert!(again.is_ok(), "{again:?}");
    }
}
