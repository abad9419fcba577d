//! The child subreaper.
//!
//! modvisord marks itself `PR_SET_CHILD_SUBREAPER`, so orphaned grandchildren of engines are
//! re-parented to it and must be reaped here. A blind `waitpid(-1)` would also steal the exit
//! status of children that tokio waits for, so every child the daemon spawns goes through
//! [`spawn`], which records its PID under a lock; the reaper reaps only PIDs it finds in
//! `/proc` as its children that are not recorded, under the same lock.

use std::collections::HashSet;
use std::io;
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

fn owned() -> MutexGuard<'static, HashSet<i32>> {
    static OWNED: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    OWNED
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Spawns a child whose exit status belongs to the caller (through tokio), never to the reaper.
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut set = owned();
    let child = cmd.spawn()?;
    if let Some(pid) = child.id() {
        set.insert(pid as i32);
    }
    Ok(child)
}

/// Called once the caller has waited for its child: the PID is no longer ours to skip.
pub fn forget(pid: u32) {
    owned().remove(&(pid as i32));
}

/// Makes this process the child subreaper of everything it starts.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Our children. `/proc/self/task/*/children` needs CONFIG_PROC_CHILDREN, which many kernels
/// (this project's CI among them) lack, so fall back to scanning `/proc/*/stat` for our PID as
/// parent; only zombies matter there, so the scan keeps just those.
fn children() -> Vec<i32> {
    let mut pids = Vec::new();
    let mut have_children_files = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                have_children_files = true;
                pids.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    if have_children_files {
        return pids;
    }
    let me = std::process::id();
    pids.extend(
        crate::procfs::all()
            .into_iter()
            .filter(|s| s.state == 'Z' && s.ppid == me)
            .map(|s| s.pid as i32),
    );
    pids
}

/// Reaps every exited child that nobody else waits for. Returns how many were reaped.
pub fn reap_orphans() -> usize {
    let set = owned();
    let mut n = 0;
    for pid in children() {
        if set.contains(&pid) {
            continue;
        }
        loop {
            match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    tracing::debug!(pid, ?status, "reaped orphan");
                    n += 1;
                    break;
                }
            }
        }
    }
    n
}

/// Runs the reaper until the process ends: one scan at start, then one per SIGCHLD.
pub async fn run() -> io::Result<()> {
    let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    loop {
        reap_orphans();
        if sig.recv().await.is_none() {
            return Ok(());
        }
    }
}
