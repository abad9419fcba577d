//! The sampling thread: one pass over the running modules' processes (and NVML) every
//! `[monitor] interval`, on a thread of its own that sleeps until a pass is due.
//!
//! An idle daemon's wake-ups are its sampling passes. On tokio's runtime a pass cost about
//! six: the timer wheel wakes a worker at each of its levels before a 5 s timer fires (three
//! wake-ups), the pass itself went to a blocking thread, and its result woke the worker
//! again. Here a pass costs two: this thread's own timeout, and the actor receiving the
//! result. The thread reads what to sample from the published snapshot, so the actor is not
//! asked for it: running modules with a main process, as the snapshot shows them.
//!
//! When passes run is [`Schedule`], pure and tested as a table; the thread only waits for
//! what it says and carries out the passes.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::monitor::{CgroupFiles, Gpu, Sample, Target};
use crate::state::Snapshot;

/// How long after a pass the pass owed to modules that came up meanwhile runs.
pub(super) const AGAIN_AFTER: Duration = Duration::from_millis(250);

/// What the actor asks of the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ask {
    /// Whether there is anything to sample (a run, or a GPU to watch). Without, the thread
    /// waits with no timeout: no wake-up at all.
    Wanted(bool),
    /// A module came up with no figures yet: a pass now, or, right after a pass,
    /// [`Schedule::again_after`] after it (hundreds of modules starting together are
    /// sampled a few times a second, not in back-to-back passes).
    Soon,
}

/// When the next pass is due. Pure: the time comes in with every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Schedule {
    pub period: Duration,
    pub again_after: Duration,
    wanted: bool,
    due: Option<Instant>,
    last_pass: Option<Instant>,
}

impl Schedule {
    pub fn new(period: Duration, again_after: Duration) -> Schedule {
        Schedule {
            period,
            again_after,
            wanted: false,
            due: None,
            last_pass: None,
        }
    }

    /// The next pass, if any is due at all.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    pub fn ask(&mut self, ask: Ask, now: Instant) {
        match ask {
            // The first pass after a pause is a full interval later: a run that just
            // started is sampled at once anyway (Soon).
            Ask::Wanted(true) if !self.wanted => {
                self.wanted = true;
                self.due = Some(
                    self.due
                        .map_or(now + self.period, |d| d.min(now + self.period)),
                );
            }
            Ask::Wanted(true) => {}
            Ask::Wanted(false) => {
                self.wanted = false;
                self.due = None;
            }
            Ask::Soon => {
                let earliest = self
                    .last_pass
                    .map_or(now, |l| (l + self.again_after).max(now));
                self.due = Some(self.due.map_or(earliest, |d| d.min(earliest)));
            }
        }
    }

    /// A pass ran (it ended at `now`): the next one an interval later, while wanted.
    pub fn passed(&mut self, now: Instant) {
        self.last_pass = Some(now);
        self.due = self.wanted.then(|| now + self.period);
    }
}

/// Where a pass goes, with the runs started before it: false once nobody takes passes any
/// more (the thread then ends).
pub(super) type Deliver = Box<dyn Fn(Sample, u64) -> bool + Send>;

/// The actor's side: asks go to the thread, which ends when this is dropped.
pub(super) struct Sampler {
    tx: Option<mpsc::Sender<Ask>>,
}

impl Sampler {
    /// Starts the thread. Without it (the system refused a thread) the daemon runs on
    /// without figures, and says so once.
    pub fn spawn(
        schedule: Schedule,
        state: watch::Receiver<Arc<Snapshot>>,
        gpu: Option<Arc<Gpu>>,
        deliver: Deliver,
    ) -> Sampler {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("modvisor-sample".into())
            .spawn(move || run(schedule, rx, state, gpu, deliver));
        match spawned {
            Ok(_) => Sampler { tx: Some(tx) },
            Err(e) => {
                tracing::error!("resource sampling is off: cannot start its thread: {e}");
                Sampler { tx: None }
            }
        }
    }

    pub fn ask(&self, ask: Ask) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ask);
        }
    }
}

fn run(
    mut schedule: Schedule,
    rx: mpsc::Receiver<Ask>,
    state: watch::Receiver<Arc<Snapshot>>,
    gpu: Option<Arc<Gpu>>,
    deliver: Deliver,
) {
    let mut cgroups = CgroupFiles::default();
    loop {
        let got = match schedule.due() {
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
        };
        match got {
            Ok(ask) => schedule.ask(ask, Instant::now()),
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                // What the actor published last: every run it started before then.
                let snap = state.borrow().clone();
                let targets = targets(&snap);
                if !targets.is_empty() || gpu.is_some() {
                    let s = crate::monitor::sample_with(&targets, gpu.as_deref(), &mut cgroups);
                    if !deliver(s, snap.runs_started) {
                        return;
                    }
                }
                schedule.passed(Instant::now());
            }
        }
    }
}

/// The running modules with a main process. A unit or a container has a cgroup of its own;
/// a direct child shares the daemon's and leads its own process group.
fn targets(snap: &Snapshot) -> Vec<Target> {
    snap.modules
        .iter()
        .filter(|(_, m)| m.main_pid > 1)
        .map(|(n, m)| {
            let direct = m.backend == "direct";
            Target {
                name: n.clone(),
                main_pid: m.main_pid,
                pgid: if direct { m.main_pid as i32 } else { 0 },
                own_cgroup: !direct,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(5);
    const A: Duration = Duration::from_millis(250);

    fn ms(t0: Instant, d: Option<Instant>) -> Option<u128> {
        d.map(|d| d.duration_since(t0).as_millis())
    }

    /// Each row: (ms since start, what happens, the next pass due then, in ms since start).
    enum Step {
        Ask(Ask),
        Passed,
    }

    fn table(rows: &[(u64, Step, Option<u128>)]) {
        let t0 = Instant::now();
        let mut s = Schedule::new(P, A);
        for (i, (at, step, want)) in rows.iter().enumerate() {
            let now = t0 + Duration::from_millis(*at);
            match step {
                Step::Ask(a) => s.ask(*a, now),
                Step::Passed => s.passed(now),
            }
            assert_eq!(ms(t0, s.due()), *want, "row {i}");
        }
    }

    #[test]
    fn nothing_wanted_means_no_pass_and_no_timeout() {
        table(&[
            (0, Step::Ask(Ask::Wanted(false)), None),
            (10, Step::Passed, None),
        ]);
    }

    #[test]
    fn wanted_passes_come_an_interval_apart_and_stop_when_unwanted() {
        table(&[
            (0, Step::Ask(Ask::Wanted(true)), Some(5000)),
            (100, Step::Ask(Ask::Wanted(true)), Some(5000)),
            (5002, Step::Passed, Some(10002)),
            (6000, Step::Ask(Ask::Wanted(false)), None),
            (7000, Step::Ask(Ask::Wanted(true)), Some(12000)),
        ]);
    }

    #[test]
    fn a_fresh_module_is_sampled_at_once_or_shortly_after_the_last_pass() {
        table(&[
            (0, Step::Ask(Ask::Wanted(true)), Some(5000)),
            (1000, Step::Ask(Ask::Soon), Some(1000)),
            (1001, Step::Passed, Some(6001)),
            // Modules coming up right after a pass wait for one pass a little later.
            (1100, Step::Ask(Ask::Soon), Some(1251)),
            (1200, Step::Ask(Ask::Soon), Some(1251)),
            (1252, Step::Passed, Some(6252)),
            // Long after the last pass: at once.
            (3000, Step::Ask(Ask::Soon), Some(3000)),
        ]);
    }

    #[test]
    fn soon_before_wanted_is_not_lost() {
        table(&[
            (0, Step::Ask(Ask::Soon), Some(0)),
            (1, Step::Ask(Ask::Wanted(true)), Some(0)),
            (2, Step::Passed, Some(5002)),
        ]);
    }

    #[test]
    fn targets_are_the_running_modules_with_a_main_process() {
        let mut snap = Snapshot::default();
        let status = |pid: u32, backend: &str| {
            Arc::new(crate::state::ModuleStatus {
                main_pid: pid,
                backend: backend.into(),
                ..crate::state::ModuleStatus::example("x")
            })
        };
        snap.modules.insert("a".into(), status(0, "systemd"));
        snap.modules.insert("b".into(), status(42, "systemd"));
        snap.modules.insert("c".into(), status(43, "direct"));
        let t = targets(&snap);
        let got: Vec<_> = t
            .iter()
            .map(|t| (t.name.as_str(), t.main_pid, t.pgid, t.own_cgroup))
            .collect();
        assert_eq!(got, [("b", 42, 0, true), ("c", 43, 43, false)]);
    }
}
