//! How many connections are open through a module's listen addresses, and telling the
//! supervisor: the first connection at once (it starts an idle module, keeps it from eviction,
//! disarms the idle clock); the last one closing after a short quiet moment (a client making
//! request after request does not bounce the count through zero each time); other changes at
//! most once a second. Nothing wakes while nothing changes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{ProxyEvent, Report};

/// How long the count stays at zero before the supervisor hears of it.
const ZERO_AFTER: Duration = Duration::from_millis(100);
/// At most one report of another count per this.
const EVERY: Duration = Duration::from_secs(1);

pub struct Counter {
    n: AtomicU32,
    /// What the supervisor was told last (reports are made under this lock, in order).
    told: Mutex<u32>,
    changed: tokio::sync::Notify,
    report: Report,
}

impl Counter {
    pub fn new(report: Report) -> Counter {
        Counter {
            n: AtomicU32::new(0),
            told: Mutex::new(0),
            changed: tokio::sync::Notify::new(),
            report,
        }
    }

    /// The connections open now.
    pub fn open(&self) -> u32 {
        self.n.load(Ordering::SeqCst)
    }

    fn told(&self) -> std::sync::MutexGuard<'_, u32> {
        self.told.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn opened(&self) {
        if self.n.fetch_add(1, Ordering::SeqCst) != 0 {
            self.changed.notify_one();
            return;
        }
        let mut told = self.told();
        if *told == 0 {
            *told = self.n.load(Ordering::SeqCst).max(1);
            (self.report)(ProxyEvent::Connections(*told));
        }
    }

    pub fn closed(&self) {
        self.n.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Tells the supervisor of the changes the connections do not tell themselves.
    pub async fn report_changes(&self) {
        loop {
            self.changed.notified().await;
            if self.n.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(ZERO_AFTER).await;
                let mut told = self.told();
                if self.n.load(Ordering::SeqCst) == 0 && *told != 0 {
                    *told = 0;
                    (self.report)(ProxyEvent::Connections(0));
                }
                continue;
            }
            {
                let mut told = self.told();
                let now = self.n.load(Ordering::SeqCst);
                if now == 0 || *told == 0 || now == *told {
                    continue;
                }
                *told = now;
                (self.report)(ProxyEvent::Connections(now));
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn counter() -> (Arc<Counter>, Arc<Mutex<Vec<u32>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let report: Report = Arc::new(move |ev| {
            if let ProxyEvent::Connections(n) = ev {
                l.lock().expect("log").push(n);
            }
        });
        let c = Arc::new(Counter::new(report));
        let r = c.clone();
        tokio::spawn(async move { r.report_changes().await });
        (c, log)
    }

    async fn settle(d: Duration) {
        tokio::time::sleep(d).await;
        tokio::task::yield_now().await;
    }

    #[tokio::test(start_paused = true)]
    async fn first_at_once_last_after_a_quiet_moment_others_once_a_second() {
        let (c, log) = counter();
        let seen = || log.lock().expect("log").clone();
        // Request after request: 1 at once, never 0 in between.
        for _ in 0..20 {
            c.opened();
            settle(Duration::from_millis(5)).await;
            c.closed();
            settle(Duration::from_millis(5)).await;
        }
        assert_eq!(seen(), vec![1]);
        // Quiet: 0 after the moment.
        settle(Duration::from_millis(150)).await;
        assert_eq!(seen(), vec![1, 0]);
        // Five at once: 1 at once, 5 within the second, not 2, 3, 4.
        for _ in 0..5 {
            c.opened();
            settle(Duration::from_millis(10)).await;
        }
        settle(Duration::from_millis(1100)).await;
        let s = seen();
        assert_eq!(s.first(), Some(&1));
        assert_eq!(s.last(), Some(&5), "{s:?}");
        assert!(s.len() <= 5, "{s:?}");
        for _ in 0..5 {
            c.closed();
        }
        settle(Duration::from_millis(1200)).await;
        assert_eq!(log.lock().expect("log").last(), Some(&0));
    }
}
