//! modvisord's limit on open files. systemd starts services with a soft limit of 1024 (hard
//! 524288), which a daemon that keeps a pipe or two per direct child and a file or two per
//! sampled unit outgrows at a few hundred modules. The soft limit is raised to the hard one
//! at start; what modvisord starts gets back the soft limit it found, as systemd advises
//! (a program using `select()` cannot go past 1024).

use std::sync::OnceLock;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// The (soft, hard) limits found at start, for children.
static FOUND: OnceLock<(u64, u64)> = OnceLock::new();

/// Raises the soft limit on open files to the hard one; returns (soft before, soft now).
pub fn raise_nofile() -> nix::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = FOUND.set((soft, hard));
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// The limits a child should get back (None: never raised).
pub fn for_children() -> Option<(u64, u64)> {
    FOUND.get().copied().filter(|(soft, hard)| soft < hard)
}

/// Gives the calling process the limits of [`for_children`]. Async-signal-safe: for
/// `pre_exec`, with `limits` read before the fork.
pub fn restore_in_child(limits: Option<(u64, u64)>) -> std::io::Result<()> {
    if let Some((soft, hard)) = limits {
        // nix's setrlimit is the system call on a struct on the stack: no allocation.
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nextest runs each test in a process of its own: changing its limits touches no other.
    #[test]
    fn the_soft_limit_is_raised_and_children_get_the_old_one_back() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let low = hard.min(1024) / 2;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).expect("lower");
        assert_eq!(raise_nofile().expect("raise"), (low, hard));
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("get"),
            (hard, hard)
        );
        assert_eq!(for_children(), Some((low, hard)));
        restore_in_child(for_children()).expect("restore");
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("get"),
            (low, hard)
        );
    }
}
