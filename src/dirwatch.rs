//! Watching the module directories: every burst of inotify events asks the supervisor for one
//! reload, once the burst is over.
//!
//! How long "over" is depends on what the last event says about the file. A rename into the
//! directory (the way `install`, editors and package managers put a file in place), a removal,
//! or the close of a file opened for writing leaves a complete file: 10 ms of quiet end the
//! burst, so a dropped-in manifest is picked up a few milliseconds after it lands. A file still
//! being written (created, data modified, not yet closed) gets 100 ms of quiet, as before. A
//! burst never holds a reload back longer than a second, so a directory that never goes quiet
//! (a writer appending forever) still gets its manifests read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::supervisor::Handle;

/// Quiet that ends a burst whose last event left a complete file.
pub const SETTLED_QUIET: Duration = Duration::from_millis(10);
/// Quiet that ends a burst whose last event was a write in progress.
pub const WRITING_QUIET: Duration = Duration::from_millis(100);
/// The longest a burst holds its reload back.
pub const BURST_MAX: Duration = Duration::from_secs(1);

/// How much quiet an event asks for before the directory is read, or None to ignore it.
pub fn quiet_after(kind: &EventKind) -> Option<Duration> {
    match kind {
        // Our own reads of the manifests show up as access events: ignoring them keeps a
        // reload from triggering the next one. A close after writing completes a file.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(SETTLED_QUIET),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_) | ModifyKind::Metadata(_)) | EventKind::Remove(_) => {
            Some(SETTLED_QUIET)
        }
        _ => Some(WRITING_QUIET),
    }
}

/// Waits for the next burst of events and for its end; false when the watcher is gone.
pub async fn next_burst(rx: &mut mpsc::UnboundedReceiver<Duration>) -> bool {
    let Some(mut quiet) = rx.recv().await else {
        return false;
    };
    let cap = Instant::now() + BURST_MAX;
    loop {
        let until = (Instant::now() + quiet).min(cap);
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(q)) => quiet = q,
            Ok(None) | Err(_) => return true,
        }
    }
}

/// The directories to watch: each module directory, or its nearest existing ancestor so that
/// creating the directory later is noticed too.
fn watch_targets(dirs: &[PathBuf]) -> BTreeSet<PathBuf> {
    dirs.iter()
        .filter_map(|d| d.ancestors().find(|a| a.is_dir()).map(Path::to_path_buf))
        .collect()
}

/// The watcher of the module directories. Created before the supervisor's first scan, so that
/// no change can fall between the two.
pub struct DirWatch {
    dirs: Vec<PathBuf>,
    watcher: notify::RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
    rx: mpsc::UnboundedReceiver<Duration>,
}

impl DirWatch {
    pub fn new(dirs: Vec<PathBuf>) -> Result<DirWatch, String> {
        use notify::{RecursiveMode, Watcher};
        let (tx, rx) = mpsc::unbounded_channel::<Duration>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Some(q) = res.ok().and_then(|ev| quiet_after(&ev.kind)) {
                let _ = tx.send(q);
            }
        })
        .map_err(|e| format!("inotify: {e}"))?;
        let watched = watch_targets(&dirs);
        for d in &watched {
            if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", d.display());
            }
        }
        Ok(DirWatch {
            dirs,
            watcher,
            watched,
            rx,
        })
    }

    /// Directories may have appeared or gone: follow them.
    fn follow_dirs(&mut self) {
        use notify::{RecursiveMode, Watcher};
        let now = watch_targets(&self.dirs);
        for gone in self.watched.difference(&now) {
            let _ = self.watcher.unwatch(gone);
        }
        for new in now.difference(&self.watched) {
            if let Err(e) = self.watcher.watch(new, RecursiveMode::NonRecursive) {
                tracing::warn!("cannot watch {}: {e}", new.display());
            }
        }
        self.watched = now;
    }

    pub fn spawn(mut self, handle: Handle) {
        tokio::spawn(async move {
            while next_burst(&mut self.rx).await {
                self.follow_dirs();
                match handle.reload().await {
                    Ok(errs) if !errs.is_empty() => {
                        tracing::debug!("reload after a change: {} manifest errors", errs.len())
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RemoveKind, RenameMode};

    #[test]
    fn what_each_event_asks_for() {
        let rows: [(EventKind, Option<Duration>); 7] = [
            (
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                Some(SETTLED_QUIET),
            ),
            (EventKind::Remove(RemoveKind::File), Some(SETTLED_QUIET)),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                Some(SETTLED_QUIET),
            ),
            (EventKind::Access(AccessKind::Open(AccessMode::Read)), None),
            (EventKind::Access(AccessKind::Close(AccessMode::Read)), None),
            (EventKind::Create(CreateKind::File), Some(WRITING_QUIET)),
            (
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                Some(WRITING_QUIET),
            ),
        ];
        for (kind, want) in rows {
            assert_eq!(quiet_after(&kind), want, "{kind:?}");
        }
    }

    /// Sends `events` (quiet asked for, then the gap before the next) and measures when the
    /// burst ends, on tokio's paused clock.
    async fn burst_ends_after(events: Vec<(Duration, Duration)>) -> Duration {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let t0 = Instant::now();
        tokio::spawn(async move {
            for (q, gap) in events {
                let _ = tx.send(q);
                tokio::time::sleep(gap).await;
            }
            // Keep the sender: the end of the burst must come from the clock.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        assert!(next_burst(&mut rx).await);
        t0.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_ends_after_the_quiet_its_last_event_asks_for() {
        let ms = Duration::from_millis;
        // A rename into place: 10 ms.
        assert_eq!(burst_ends_after(vec![(SETTLED_QUIET, ms(0))]).await, ms(10));
        // Written in place: create, data, close: 10 ms after the close.
        let written = vec![
            (WRITING_QUIET, ms(2)),
            (WRITING_QUIET, ms(3)),
            (SETTLED_QUIET, ms(0)),
        ];
        assert_eq!(burst_ends_after(written).await, ms(15));
        // Still being written (no close yet): 100 ms after the last write.
        let open = vec![(SETTLED_QUIET, ms(5)), (WRITING_QUIET, ms(0))];
        assert_eq!(burst_ends_after(open).await, ms(105));
        // A burst of renames 5 ms apart coalesces into one reload.
        let many = (0..20).map(|_| (SETTLED_QUIET, ms(5))).collect();
        assert_eq!(burst_ends_after(many).await, ms(105));
        // A directory that never goes quiet is still read after a second.
        let endless = (0..500).map(|_| (WRITING_QUIET, ms(50))).collect();
        assert_eq!(burst_ends_after(endless).await, BURST_MAX);
    }

    /// What the kernel's inotify really reports through `notify` for the two ways a manifest
    /// lands: the last event of each must end the burst after the short quiet.
    #[tokio::test]
    async fn real_inotify_a_rename_and_a_write_in_place_end_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = DirWatch::new(vec![dir.path().to_path_buf()]).expect("watch");
        let drain = |rx: &mut mpsc::UnboundedReceiver<Duration>| {
            let mut seen = Vec::new();
            while let Ok(q) = rx.try_recv() {
                seen.push(q);
            }
            seen
        };
        let settle = || tokio::time::sleep(Duration::from_millis(200));

        let outside = tempfile::tempdir().expect("tempdir");
        let src = outside.path().join("a.toml");
        std::fs::write(&src, "x = 1\n").expect("write");
        std::fs::rename(&src, dir.path().join("a.toml")).expect("rename");
        settle().await;
        assert_eq!(
            drain(&mut w.rx),
            vec![SETTLED_QUIET],
            "a rename into the directory"
        );

        std::fs::write(dir.path().join("b.toml"), "x = 2\n").expect("write");
        settle().await;
        let seen = drain(&mut w.rx);
        assert_eq!(
            seen.last(),
            Some(&SETTLED_QUIET),
            "a write in place: {seen:?}"
        );
        assert!(
            seen.contains(&WRITING_QUIET),
            "create and data first: {seen:?}"
        );

        // Our own read of a manifest wakes nothing.
        std::fs::read(dir.path().join("b.toml")).expect("read");
        settle().await;
        assert_eq!(drain(&mut w.rx), vec![], "a read");
    }
}
