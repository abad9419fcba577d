//! The properties of a module that move with every client connection (`Connections`,
//! `LastActivity`, `IdleStopAt`) are announced by PropertiesChanged at most once a second per
//! module: a busy engine does not flood the bus. `Get`/`GetAll` always answer the current
//! value; the last change is announced when the second is over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::state::ModuleStatus;

const EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Throttle {
    /// Per module: when its busy properties may be announced again.
    next: BTreeMap<String, Instant>,
}

fn busy(m: &ModuleStatus) -> (u32, u64, u64) {
    (m.connections, m.last_activity_us, m.idle_stop_at_us)
}

impl Throttle {
    /// What of `new` to announce now, given what was announced (`old`): `new`, or `new` with
    /// the busy properties as announced before while their second is not over; and when to
    /// come back for them.
    pub fn hold(
        &self,
        name: &str,
        old: Option<&ModuleStatus>,
        new: &Arc<ModuleStatus>,
        now: Instant,
    ) -> (Arc<ModuleStatus>, Option<Instant>) {
        let Some(o) = old.filter(|o| busy(o) != busy(new)) else {
            return (new.clone(), None);
        };
        match self.next.get(name) {
            Some(&at) if at > now => {
                let mut send = (**new).clone();
                (
                    send.connections,
                    send.last_activity_us,
                    send.idle_stop_at_us,
                ) = busy(o);
                (Arc::new(send), Some(at))
            }
            _ => (new.clone(), None),
        }
    }

    /// `sent` was announced over `old`: a change of the busy properties starts their second.
    pub fn announced(
        &mut self,
        name: &str,
        old: Option<&ModuleStatus>,
        sent: &ModuleStatus,
        now: Instant,
    ) {
        if old.is_some_and(|o| busy(o) != busy(sent)) {
            self.next.insert(name.to_string(), now + EVERY);
        }
    }

    pub fn forget(&mut self, name: &str) {
        self.next.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::props::tests::status;

    #[test]
    fn busy_properties_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut th = Throttle::default();
        let mut a = status("m");
        a.connections = 0;
        let mut b = a.clone();
        b.connections = 1;
        let b = Arc::new(b);
        // The first change goes out at once.
        let (send, later) = th.hold("m", Some(&a), &b, t0);
        assert_eq!((send.connections, later), (1, None));
        th.announced("m", Some(&a), &send, t0);
        // The next within the second is held back (other properties are not).
        let mut c = (*b).clone();
        c.connections = 2;
        c.memory_bytes = 42;
        let c = Arc::new(c);
        let (send, later) = th.hold("m", Some(&b), &c, t0 + Duration::from_millis(300));
        assert_eq!(send.connections, 1);
        assert_eq!(send.memory_bytes, 42);
        assert_eq!(later, Some(t0 + EVERY));
        // After the second: the latest value.
        let (send, later) = th.hold("m", Some(&b), &c, t0 + EVERY);
        assert_eq!((send.connections, later), (2, None));
    }
}
