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
//! A run gets what systemd said of its unit (the properties a `PropertiesChanged` carried, or
//! "read it anew"). When systemd takes its name anew (it lost its bus connection under
//! a flood of signals, or re-executed), modvisord subscribes again and every run re-reads its
//! unit. When modvisord's own connection to the bus ends, every subscription ends too: the runs
//! report that systemd is not reachable.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use zbus::message::{Message, Sequence, Type};
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

use super::changed_body::Wanted;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const UNIT_NAMESPACE: &str = "/org/freedesktop/systemd1/unit";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";

/// Messages zbus queues for the dispatcher before it stops reading the socket. Small: the
/// dispatcher never waits (nothing can deadlock on a full queue), and a burst of hundreds of
/// starts then waits in the socket and the bus instead of in modvisord's memory.
const QUEUE: NonZeroUsize = NonZeroUsize::new(64).expect("non-zero");

/// One run following a path: its id and where its changes go.
type Route = (u64, mpsc::UnboundedSender<Arc<Change>>);

#[derive(Default)]
struct Routes {
    /// False once the connection's signal streams ended: new subscriptions end at once.
    alive: bool,
    next_id: u64,
    /// Object path -> the runs following it (usually one; briefly two while a run replaces
    /// another's unit).
    by_path: HashMap<String, Vec<Route>>,
}

/// The dispatcher's routing table, shared with the subscriptions (which remove themselves).
#[derive(Clone, Default)]
pub struct UnitSignals {
    routes: Arc<Mutex<Routes>>,
}

/// What systemd said of a unit.
#[derive(Debug)]
pub enum Change {
    /// A `PropertiesChanged` of one of the unit's interfaces, with what it carried. systemd
    /// sends every property of the interface that emits changes, the type's interface (Service)
    /// before Unit, so a Unit change completes a consistent picture.
    Props {
        interface: String,
        values: HashMap<String, OwnedVariant>,
        invalidated: Vec<String>,
        /// Where the signal came in the connection's stream: what came before a call's reply
        /// was sent before systemd handled the call.
        at: Sequence,
    },
    /// Read the unit anew: it was unloaded, the signal could not be read, or systemd came back
    /// without its subscribers.
    Reread,
}

/// A run's view of its unit's changes. Dropping it removes its route.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Arc<Change>>,
    id: u64,
    path: String,
    routes: Arc<Mutex<Routes>>,
}

impl Subscription {
    /// The unit's next change; None once the bus connection is gone.
    pub async fn changed(&mut self) -> Option<Arc<Change>> {
        self.rx.recv().await
    }

    /// The changes that came meanwhile, without waiting.
    pub fn pending(&mut self) -> Vec<Arc<Change>> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
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
    /// A unit's properties changed: tell the runs following its object path what changed.
    Props(String),
    /// A unit was unloaded: the runs following it read it anew.
    Removed(String),
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
            Some(Signal::Removed(path.as_str().to_string()))
        }
        Some("NameOwnerChanged") => {
            let (_, _, new): (String, String, String) = msg.body().deserialize().ok()?;
            (!new.is_empty()).then_some(Signal::NewManager(new))
        }
        _ => h.path().map(|p| Signal::Props(p.as_str().to_string())),
    }
}

/// The body of a `PropertiesChanged` (anything unreadable: read the unit anew), keeping only
/// the properties a unit's state is made of ([`super::changed_body`]): systemd sends dozens
/// per change, and a burst of hundreds of starts would otherwise queue them all.
fn props_of(msg: &Message) -> Change {
    type Body<'b> = (&'b str, Wanted<'b>, Vec<&'b str>);
    let body = msg.body();
    let Ok((interface, wanted, invalidated)) = body.deserialize::<Body<'_>>() else {
        return Change::Reread;
    };
    let values = wanted
        .values
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), OwnedVariant::try_from(v).ok()?)))
        .collect();
    Change::Props {
        interface: interface.to_string(),
        values,
        invalidated: invalidated.into_iter().map(str::to_string).collect(),
        at: msg.recv_position(),
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
        dispatch(&routes, &p, || Change::Reread);
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
                let Ok(msg) = msg else { continue };
                match classify(&msg) {
                    Some(Signal::Props(path)) => dispatch(&routes, &path, || props_of(&msg)),
                    Some(Signal::Removed(path)) => dispatch(&routes, &path, || Change::Reread),
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
        let (tx, rx) = mpsc::unbounded_channel();
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

/// Hands the change (made only when someone follows `path`) to the runs following it.
fn dispatch(routes: &Mutex<Routes>, path: &str, change: impl FnOnce() -> Change) {
    let r = lock(routes);
    if let Some(v) = r.by_path.get(path) {
        let c = Arc::new(change());
        for (_, tx) in v {
            // A run that ended has dropped its receiver; its route goes with its Subscription.
            let _ = tx.send(c.clone());
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

    fn is_reread(c: Option<Arc<Change>>) -> bool {
        matches!(c.as_deref(), Some(Change::Reread))
    }

    #[tokio::test]
    async fn changes_reach_only_their_path_in_order() {
        let s = table();
        let mut a = s.subscribe("/u/a");
        let mut b = s.subscribe("/u/b");
        dispatch(&s.routes, "/u/a", || Change::Reread);
        dispatch(&s.routes, "/u/a", || Change::Props {
            interface: "x".into(),
            values: HashMap::new(),
            invalidated: Vec::new(),
            at: Sequence::default(),
        });
        assert!(is_reread(a.changed().await));
        let rest = a.pending();
        assert!(matches!(rest.as_slice(), [c] if matches!(**c, Change::Props { .. })));
        assert!(b.pending().is_empty(), "b's unit did not change");
        dispatch(&s.routes, "/u/b", || Change::Reread);
        assert!(is_reread(b.changed().await));
    }

    #[tokio::test]
    async fn a_change_nobody_follows_is_not_even_made() {
        let s = table();
        dispatch(&s.routes, "/u/nobody", || unreachable!("made for nobody"));
    }

    #[tokio::test]
    async fn dropping_a_subscription_removes_its_route_only() {
        let s = table();
        let a1 = s.subscribe("/u/a");
        let mut a2 = s.subscribe("/u/a");
        assert_eq!(s.followed(), 1);
        drop(a1);
        dispatch(&s.routes, "/u/a", || Change::Reread);
        assert!(is_reread(a2.changed().await));
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
        assert_eq!(classify(&changed), Some(Signal::Props(unit.into())));
        assert!(
            matches!(props_of(&changed), Change::Props { interface, .. } if interface == "org.freedesktop.systemd1.Unit")
        );
        let path = OwnedObjectPath::try_from(unit).expect("path");
        let removed = signal(
            MANAGER_PATH,
            "org.freedesktop.systemd1.Manager",
            "UnitRemoved",
            &("modvisor-a.service", path),
        );
        assert_eq!(classify(&removed), Some(Signal::Removed(unit.into())));
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
        assert!(a.changed().await.is_none());
        let mut late = s.subscribe("/u/b");
        assert!(late.changed().await.is_none());
    }
}
