//! Process file descriptors: an exit that can be awaited without reaping (so the process
//! group id stays reserved until we have signalled it), and signals that can never reach a
//! process that merely reuses a PID.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::sys::signal::Signal;

/// `pidfd_open(2)`: a descriptor of `pid` that stays bound to that very process.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed. The descriptor is owned by the OwnedFd from here on.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor just returned by the kernel that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(2)`.
fn send(fd: &OwnedFd, sig: Signal) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a signal number, no siginfo (NULL) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig as i32,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals `pid` only if it is still the process that started at `start_time`: the pidfd is
/// opened first, then the start time read, so a PID reused in between is never signalled.
pub fn signal_verified(pid: u32, start_time: u64, sig: Signal) {
    let Ok(fd) = open(pid as i32) else { return };
    if crate::procfs::stat(pid).is_some_and(|s| s.start_time == start_time && s.state != 'Z') {
        let _ = send(&fd, sig);
    }
}

/// The processes under `root` (children, their children, ...), with their start times, in
/// one pass over /proc: also those that left the process group with `setsid`.
pub fn descendants(root: u32) -> Vec<(u32, u64)> {
    let all = crate::procfs::all();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for s in all.iter().filter(|s| s.ppid == p && s.pid != root) {
            if !out.iter().any(|(q, _)| *q == s.pid) {
                out.push((s.pid, s.start_time));
                frontier.push(s.pid);
            }
        }
    }
    out
}

/// A pidfd registered with tokio: readable once `pid` has exited (it is not reaped by that).
pub fn exit_watch(pid: i32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = open(pid)?;
    // SAFETY: the OwnedFd owns the descriptor and returns the same one from as_raw_fd for as
    // long as the AsyncFd holds it; nothing else closes it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            .map_err(|e| e.into_parts().1)
    }
}
