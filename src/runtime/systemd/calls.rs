//! Calls to systemd, bounded: at most [`MAX_IN_FLIGHT`] at a time on the connection, in the
//! order they were asked for (tokio's semaphore is fair), and retried with backoff while the
//! bus refuses one for its own limits.
//!
//! dbus-daemon allows a connection 128 pending method calls on the system bus; the 129th is
//! answered `org.freedesktop.DBus.Error.LimitsExceeded` at once. Starting hundreds of modules
//! at once sent that many. The bound keeps well under the limit (other code on the connection,
//! such as the manager proxy's own calls, has room left), and a refusal the bus still gives
//! (another client of the same uid, a configured lower limit) or a `NoReply` (systemd busy past
//! the bus's reply timeout) is waited out, never turned into a module failure.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use zbus::DBusError;

/// Calls in flight on the systemd connection at most (dbus-daemon's limit: 128).
pub const MAX_IN_FLIGHT: usize = 64;

/// `StartTransientUnit` calls in flight at most, within [`MAX_IN_FLIGHT`]. Each carries a
/// unit's whole description (its properties, their variants and the message: several KiB
/// while it is built and sent), and systemd takes them one at a time anyway. With 16 instead
/// of 64, 200 modules start as fast (within the noise), and after 100 modules started the
/// heap holds 0.35-0.45 MiB less (Private_Dirty 3.0-3.2 -> 2.7-3.0 MiB): their descriptions
/// no longer pile up in it at once and leave it fragmented.
pub const MAX_CREATING: usize = 16;

/// How long a call is retried while the bus refuses it for its limits.
const RETRY_FOR: Duration = Duration::from_secs(120);
const FIRST_DELAY: Duration = Duration::from_millis(10);
const MAX_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Calls {
    permits: Arc<Semaphore>,
}

impl Default for Calls {
    fn default() -> Self {
        Calls::new(MAX_IN_FLIGHT)
    }
}

/// The error's D-Bus name, however zbus reported it.
pub fn error_name(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.as_str().to_string()),
        zbus::Error::FDO(e) => Some(e.name().to_string()),
        _ => None,
    }
}

/// True when the bus (not systemd) refused or gave up on the call, or systemd is away from
/// the bus for a moment: worth retrying. A manager that loses its bus connection comes back
/// under a new unique name; meanwhile its well-known name has no owner, and a call to it is
/// answered `ServiceUnknown`, `NameHasNoOwner` or, where the bus tries to activate the name,
/// `Spawn.*` (seen with 1,000 modules starting at once: the testbed's manager was dropped by
/// the bus, and 815 starts failed for good before these were retried).
pub fn bus_busy(e: &zbus::Error) -> bool {
    error_name(e).is_some_and(|n| {
        matches!(
            n.as_str(),
            "org.freedesktop.DBus.Error.LimitsExceeded"
                | "org.freedesktop.DBus.Error.NoReply"
                | "org.freedesktop.DBus.Error.Timeout"
                | "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner"
        ) || n.starts_with("org.freedesktop.DBus.Error.Spawn.")
    })
}

impl Calls {
    pub fn new(max: usize) -> Calls {
        Calls {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }

    /// Runs `call` (given the attempt number, 0 first) within the bound, again after a backoff
    /// while the bus refuses it for its limits, for up to [`RETRY_FOR`].
    pub async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> zbus::Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = zbus::Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        let mut delay = FIRST_DELAY;
        let mut attempt = 0;
        loop {
            let result = {
                // The semaphore is never closed; were it, the call would just go unbounded.
                let _permit = self.permits.acquire().await.ok();
                call(attempt).await
            };
            match result {
                Err(e) if bus_busy(&e) && tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!("{what}: {e}; again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_DELAY);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn limits() -> zbus::Error {
        zbus::Error::FDO(Box::new(zbus::fdo::Error::LimitsExceeded(
            "too many".into(),
        )))
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_bound_in_flight() {
        let calls = Calls::new(3);
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (calls, now, peak) = (calls.clone(), now.clone(), peak.clone());
                tokio::spawn(async move {
                    calls
                        .run("t", |_| async {
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(n, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            now.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("call");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bus_limit_is_retried_other_errors_are_not() {
        let calls = Calls::default();
        let tries = AtomicUsize::new(0);
        let r = calls
            .run("t", |attempt| {
                tries.fetch_add(1, Ordering::SeqCst);
                async move {
                    if attempt < 4 {
                        Err(limits())
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await;
        assert_eq!(r.expect("succeeds once the bus has room"), 4);
        let tries = AtomicUsize::new(0);
        let r: zbus::Result<()> = calls
            .run("t", |_| {
                tries.fetch_add(1, Ordering::SeqCst);
                async { Err(zbus::Error::Failure("systemd said no".into())) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_manager_away_from_the_bus_is_waited_for() {
        use zbus::fdo::Error as E;
        let away = [
            E::ServiceUnknown("no owner".into()),
            E::NameHasNoOwner("no owner".into()),
            E::SpawnChildExited("Launch helper exited with unknown return code 1".into()),
        ];
        for e in away {
            assert!(bus_busy(&zbus::Error::FDO(Box::new(e))));
        }
        let systemd_said = E::AccessDenied("denied".into());
        assert!(!bus_busy(&zbus::Error::FDO(Box::new(systemd_said))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bus_that_stays_full_ends_the_retries() {
        let calls = Calls::default();
        let r: zbus::Result<()> = calls.run("t", |_| async { Err(limits()) }).await;
        assert!(r.is_err_and(|e| bus_busy(&e)));
    }
}
