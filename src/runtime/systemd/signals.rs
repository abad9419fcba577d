//! One subscription for all units: three match rules on the bus, whatever the number of modules
//! (systemd's `PropertiesChanged` under `/org/freedesktop/systemd1/unit`, the manager's
//! `UnitRemoved`, and the bus's `NameOwnerChanged` of `org.freedesktop.systemd1`), dispatched
//! inside modvisord to the run that follows each unit's object path.
//!
//! dbus-daemon allows a connection 512 match rules on the system bus: a rule per unit ran out
//! at a few hundred modules. zbus never drops a message of a match rule's queue (a full queue
//! stops reading the socket instead), so a change cannot be lost between the bus and a run;
//! the dispatcher only looks up a map and never waits, so it does not hold the socket up.
//!
//! A run learns *that* its unit changed (several changes coalesce into one wake-up) and reads
//! the unit's state itself. When systemd takes its name anew (it lost its bus connection under
//! a flood of signals, or re-executed), modvisord subscribes again and every run re-reads its
//! unit. When modvisord's own connection to the bus ends, every subscription ends too: the runs
//! report that systemd is not reachable.

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

/// What a signal asks of the dispatcher.
#[derive(Debug, PartialEq, Eq)]
enum Signal {
    /// A unit changed (or was unloaded): wake the runs following its object path.
    Unit(String),
    /// systemd took its bus name anew (it re-connected to the bus, or re-executed): what it
    /// knew of its subscribers may be gone.
    NewManager(String),
}

/// The object path of a `PropertiesChanged`, the second argument of a `UnitRemoved(s id, o
/// path)`, the new owner of a `NameOwnerChanged`.
fn classify(msg: &Message) -> Option<Signal> {
    let h = msg.header();
    match h.member().map(|m| m.as_str()) {
        Some("UnitRemoved") => {
            let (_, path): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            Some(Signal::Unit(path.as_str().to_string()))
        }
        Some("NameOwnerChanged") => {
            let (_, _, new): (String, String, String) = msg.body().deserialize().ok()?;
            (!new.is_empty()).then_some(Signal::NewManager(new))
        }
        _ => h.path().map(|p| Signal::Unit(p.as_str().to_string())),
    }
}

/// NameOwnerChanged of org.freedesktop.systemd1.
fn owner_rule() -> zbus::Result<MatchRule<'static>> {
    MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.DBus")
        .interface("org.freedesktop.DBus")
        .member("NameOwnerChanged")
        .path("/org/freedesktop/DBus")
        .arg(0, SYSTEMD)
        .build()
}

/// A new manager: subscribe again (systemd sends unit changes only to subscribers), then wake
/// every run, so that each reads its unit anew.
async fn resubscribe(conn: Connection, routes: Arc<Mutex<Routes>>, owner: String) {
    let r = conn
        .call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some("org.freedesktop.systemd1.Manager"),
            "Subscribe",
            &(),
        )
        .await;
    match r {
        Ok(_) => tracing::info!("systemd took its bus name anew ({owner}): subscribed again"),
        Err(e) => tracing::warn!("systemd took its bus name anew ({owner}); Subscribe: {e}"),
    }
    let paths: Vec<String> = lock(&routes).by_path.keys().cloned().collect();
    for p in paths {
        dispatch(&routes, &p);
    }
}

impl UnitSignals {
    /// Adds the three match rules on `conn` (the calls return once the bus has them, so a
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
        let owner = MessageStream::for_match_rule(owner_rule()?, conn, None).await?;
        let signals = UnitSignals::default();
        lock(&signals.routes).alive = true;
        let routes = signals.routes.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            let units = futures_util::stream::select(changed, removed);
            let mut all = futures_util::stream::select(units, owner);
            while let Some(msg) = all.next().await {
                match msg.ok().as_ref().and_then(classify) {
                    Some(Signal::Unit(path)) => dispatch(&routes, &path),
                    Some(Signal::NewManager(owner)) => {
                        tokio::spawn(resubscribe(conn.clone(), routes.clone(), owner));
                    }
                    None => {}
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

    fn signal<B: serde::Serialize + zbus::zvariant::DynamicType>(
        path: &str,
        iface: &str,
        member: &str,
        body: &B,
    ) -> Message {
        Message::signal(path, iface, member)
            .build(body)
            .expect("a valid signal")
    }

    #[test]
    fn signals_name_their_unit_or_a_new_manager() {
        let unit = "/org/freedesktop/systemd1/unit/modvisor_2da_2eservice";
        let changed = signal(
            unit,
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
            &(
                "org.freedesktop.systemd1.Unit",
                HashMap::<String, zbus::Variant>::new(),
                Vec::<String>::new(),
            ),
        );
        assert_eq!(classify(&changed), Some(Signal::Unit(unit.into())));
        let path = OwnedObjectPath::try_from(unit).expect("path");
        let removed = signal(
            MANAGER_PATH,
            "org.freedesktop.systemd1.Manager",
            "UnitRemoved",
            &("modvisor-a.service", path),
        );
        assert_eq!(classify(&removed), Some(Signal::Unit(unit.into())));
        let owner = |new: &str| {
            signal(
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameOwnerChanged",
                &(SYSTEMD, ":1.4", new),
            )
        };
        assert_eq!(
            classify(&owner(":1.9")),
            Some(Signal::NewManager(":1.9".into()))
        );
        assert_eq!(
            classify(&owner("")),
            None,
            "the name lost is not a new manager"
        );
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
