//! One subscription for all units: two match rules on the bus, whatever the number of modules
//! (systemd's `PropertiesChanged` under `/org/freedesktop/systemd1/unit`, and the manager's
//! `UnitRemoved`), dispatched inside modvisord to the run that follows each unit's object path.
//!
//! dbus-daemon allows a connection 512 match rules on the system bus: a rule per unit ran out
//! at a few hundred modules. zbus never drops a message of a match rule's queue (a full queue
//! stops reading the socket instead), so a change cannot be lost between the bus and a run;
//! the dispatcher only looks up a map and never waits, so it does not hold the socket up.
//!
//! A run learns *that* its unit changed (several changes coalesce into one wake-up) and reads
//! the unit's state itself. When the connection to the bus ends, every subscription ends too:
//! the runs report that systemd is not reachable.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use zbus::message::{Message, Type};
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath};

const SYSTEMD: &str = "org.freedesktop.systemd1";
const UNIT_NAMESPACE: &str = "/org/freedesktop/systemd1/unit";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";

/// Messages zbus queues for the dispatcher before it stops reading the socket (a burst of
/// starts emits a few signals per unit; the dispatcher drains them at once).
const QUEUE: NonZeroUsize = NonZeroUsize::new(4096).expect("non-zero");

#[derive(Default)]
struct Routes {
    /// False once the connection's signal streams ended: new subscriptions end at once.
    alive: bool,
    next_id: u64,
    /// Object path -> the runs following it (usually one; briefly two while a run replaces
    /// another's unit).
    by_path: HashMap<String, Vec<(u64, mpsc::Sender<()>)>>,
}

/// The dispatcher's routing table, shared with the subscriptions (which remove themselves).
#[derive(Clone, Default)]
pub struct UnitSignals {
    routes: Arc<Mutex<Routes>>,
}

/// A run's view of its unit's changes. Dropping it removes its route.
pub struct Subscription {
    rx: mpsc::Receiver<()>,
    id: u64,
    path: String,
    routes: Arc<Mutex<Routes>>,
}

impl Subscription {
    /// Resolves at the unit's next change (all changes since the last call count as one);
    /// None once the bus connection is gone.
    pub async fn changed(&mut self) -> Option<()> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut r = lock(&self.routes);
        if let Some(v) = r.by_path.get_mut(&self.path) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                r.by_path.remove(&self.path);
            }
        }
    }
}

/// The table stays consistent whatever panicked while holding it (each change is one
/// statement), so a poisoned lock is used as it is.
fn lock(m: &Mutex<Routes>) -> MutexGuard<'_, Routes> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rule(
    member: &str,
    interface: &str,
    path_namespace: Option<&str>,
) -> zbus::Result<MatchRule<'static>> {
    let b = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(SYSTEMD)
        .interface(interface.to_string())
        .member(member.to_string());
    match path_namespace {
        Some(ns) => b.path_namespace(ns.to_string()),
        None => b.path(MANAGER_PATH),
    }
    .build()
}

/// The unit a signal is about: the object path of a `PropertiesChanged`, the second argument
/// of a `UnitRemoved(s id, o path)`.
fn unit_of(msg: &Message) -> Option<String> {
    let h = msg.header();
    if h.member().is_some_and(|m| m.as_str() == "UnitRemoved") {
        let (_, path): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
        return Some(path.as_str().to_string());
    }
    h.path().map(|p| p.as_str().to_string())
}

impl UnitSignals {
    /// Adds the two match rules on `conn` (the calls return once the bus has them, so a
    /// subscription made afterwards misses nothing) and spawns the dispatcher.
    pub async fn start(conn: &Connection) -> zbus::Result<UnitSignals> {
        let changed = rule(
            "PropertiesChanged",
            "org.freedesktop.DBus.Properties",
            Some(UNIT_NAMESPACE),
        )?;
        let removed = rule("UnitRemoved", "org.freedesktop.systemd1.Manager", None)?;
        let changed = MessageStream::for_match_rule(changed, conn, Some(QUEUE)).await?;
        let removed = MessageStream::for_match_rule(removed, conn, Some(QUEUE)).await?;
        let signals = UnitSignals::default();
        lock(&signals.routes).alive = true;
        let routes = signals.routes.clone();
        tokio::spawn(async move {
            let mut all = futures_util::stream::select(changed, removed);
            while let Some(msg) = all.next().await {
                if let Some(path) = msg.ok().as_ref().and_then(unit_of) {
                    dispatch(&routes, &path);
                }
            }
            tracing::warn!("the connection to systemd's bus ended: no more unit changes");
            let mut r = lock(&routes);
            r.alive = false;
            r.by_path.clear();
        });
        Ok(signals)
    }

    /// Follows the unit at `path` from now on.
    pub fn subscribe(&self, path: &str) -> Subscription {
        // One slot: a change while one is pending is already covered by it.
        let (tx, rx) = mpsc::channel(1);
        let mut r = lock(&self.routes);
        r.next_id += 1;
        let id = r.next_id;
        if r.alive {
            r.by_path
                .entry(path.to_string())
                .or_default()
                .push((id, tx));
        }
        Subscription {
            rx,
            id,
            path: path.to_string(),
            routes: self.routes.clone(),
        }
    }

    /// How many object paths are followed now.
    pub fn followed(&self) -> usize {
        lock(&self.routes).by_path.len()
    }
}

fn dispatch(routes: &Mutex<Routes>, path: &str) {
    let r = lock(routes);
    if let Some(v) = r.by_path.get(path) {
        for (_, tx) in v {
            // Full: a wake-up is already pending, which covers this change too.
            let _ = tx.try_send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> UnitSignals {
        let s = UnitSignals::default();
        lock(&s.routes).alive = true;
        s
    }

    #[tokio::test]
    async fn changes_coalesce_and_reach_only_their_path() {
        let s = table();
        let mut a = s.subscribe("/u/a");
        let mut b = s.subscribe("/u/b");
        dispatch(&s.routes, "/u/a");
        dispatch(&s.routes, "/u/a");
        assert_eq!(a.changed().await, Some(()));
        assert!(
            a.rx.try_recv().is_err(),
            "two changes coalesce into one wake-up"
        );
        assert!(b.rx.try_recv().is_err(), "b's unit did not change");
        dispatch(&s.routes, "/u/b");
        assert_eq!(b.changed().await, Some(()));
    }

    #[tokio::test]
    async fn dropping_a_subscription_removes_its_route_only() {
        let s = table();
        let a1 = s.subscribe("/u/a");
        let mut a2 = s.subscribe("/u/a");
        assert_eq!(s.followed(), 1);
        drop(a1);
        dispatch(&s.routes, "/u/a");
        assert_eq!(a2.changed().await, Some(()));
        drop(a2);
        assert_eq!(s.followed(), 0);
    }

    #[tokio::test]
    async fn subscriptions_end_when_the_bus_is_gone() {
        let s = table();
        let mut a = s.subscribe("/u/a");
        {
            let mut r = lock(&s.routes);
            r.alive = false;
            r.by_path.clear();
        }
        assert_eq!(a.changed().await, None);
        let mut late = s.subscribe("/u/b");
        assert_eq!(late.changed().await, None);
    }
}
