//! The Publisher follows the supervisor's snapshots and mirrors them onto the bus: module
//! objects, what ListModules shows, InterfacesAdded/Removed, PropertiesChanged and
//! ModuleChanged. It remembers what the bus was actually told, step by step, so a step that
//! fails in one pass (a signal that could not be sent) is retried by the next pass instead of
//! being skipped because the pass "happened".

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use zbus::fdo::{ObjectManager, Properties};
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, Variant};

use super::props::{self, manager as mp, module as mo};
use super::server::{Manager, ModuleObject};
use super::text::clean;
use super::{MANAGER_IFACE, MANAGER_PATH, MODULE_IFACE, module_path};
use crate::state::{Health, ModuleStatus, Snapshot, State};
use crate::supervisor::ManagerSignal;

/// A failed pass is retried after this long even when nothing changes, doubling up to the max.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the bus has been told so far: the baseline of the next pass. Each piece is updated
/// only when its step succeeded.
#[derive(Default)]
struct Shown {
    /// Registered module objects; false while their InterfacesAdded has not gone out.
    objects: BTreeMap<String, bool>,
    /// Objects removed whose InterfacesRemoved has not gone out.
    unsent_removals: BTreeSet<String>,
    /// Per module: the status its properties last announced (InterfacesAdded, PropertiesChanged).
    props: BTreeMap<String, Arc<ModuleStatus>>,
    /// Per module: what ModuleChanged last said.
    changes: BTreeMap<String, (State, Health, String)>,
    /// The snapshot the manager's PropertiesChanged last announced (None: nothing yet).
    manager: Option<Arc<Snapshot>>,
}

/// The steps of one pass that failed; the next pass retries them.
#[derive(Debug)]
pub struct SyncError(pub Vec<String>);

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} step(s) failed: {}", self.0.len(), self.0.join("; "))
    }
}

/// Follows the supervisor's snapshots and mirrors them onto the bus until the supervisor ends.
/// Module objects for the current snapshot exist when `new` returns.
pub struct Publisher {
    conn: Connection,
    state: watch::Receiver<Arc<Snapshot>>,
    published: watch::Sender<Arc<Snapshot>>,
    shown: Shown,
    /// Set after a failed pass: when to try again without waiting for a change.
    retry: Option<Duration>,
    /// Busy properties held back (at most one announcement a second) and when they are due.
    throttle: super::throttle::Throttle,
    held_until: Option<tokio::time::Instant>,
}

impl Publisher {
    pub async fn new(
        conn: Connection,
        state: watch::Receiver<Arc<Snapshot>>,
        published: watch::Sender<Arc<Snapshot>>,
    ) -> zbus::Result<Publisher> {
        let mut p = Publisher {
            conn,
            state,
            published,
            shown: Shown::default(),
            retry: None,
            throttle: Default::default(),
            held_until: None,
        };
        p.pass().await;
        Ok(p)
    }

    pub async fn run(mut self, mut signals: broadcast::Receiver<ManagerSignal>) {
        loop {
            let retry = self.retry;
            let retry_due = async move {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let held = self.held_until;
            let held_due = async move {
                match held {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.pass().await;
                }
                () = retry_due => self.pass().await,
                () = held_due => {
                    self.held_until = None;
                    self.pass().await;
                }
                sig = signals.recv() => match sig {
                    Ok(sig) => {
                        // The module's state first, so that a client sees ActiveModel updated.
                        self.pass().await;
                        if let Err(e) = self.signal(&sig).await {
                            tracing::warn!("Manager signal {sig:?}: {e}");
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("{n} Manager signals not sent");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn signal(&self, sig: &ManagerSignal) -> zbus::Result<()> {
        let em = SignalEmitter::new(&self.conn, MANAGER_PATH)?;
        match sig {
            ManagerSignal::Activation((name, model, step, detail)) => {
                let (model, detail) = (clean(model), clean(detail));
                Manager::model_activation(&em, name, &model, step, &detail).await
            }
            ManagerSignal::Evicted { name, by, reason } => {
                Manager::module_evicted(&em, name, by, &clean(reason)).await
            }
        }
    }

    /// One pass over the latest snapshot; a failure schedules a retry.
    async fn pass(&mut self) {
        let snap = self.state.borrow_and_update().clone();
        match self.sync(snap).await {
            Ok(()) => self.retry = None,
            Err(e) => {
                let next = self.retry.map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX));
                tracing::warn!("publishing state on D-Bus: {e}; retrying in {next:?}");
                self.retry = Some(next);
            }
        }
    }

    /// Objects first, then what ListModules shows, then the signals: a client that reacts to a
    /// signal always finds the state it announces, and the object it names.
    async fn sync(&mut self, new: Arc<Snapshot>) -> Result<(), SyncError> {
        let mut failed = Vec::new();
        if self.objects_settled(&new) {
            // The same modules as last time, each announced: only their states to follow.
            self.published.send_replace(new.clone());
        } else {
            self.sync_objects(&new, &mut failed).await;
            let reachable = self.reachable(&new);
            self.published.send_replace(reachable);
            self.announce_objects(&new, &mut failed).await;
            self.announce_removals(&new, &mut failed).await;
        }
        self.announce_modules(&new, &mut failed).await;
        self.announce_manager(new, &mut failed).await;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(SyncError(failed))
        }
    }

    /// Whether every module of `new` has its object, announced, and no other object or
    /// removal is left to deal with: the steps for objects would do nothing. Three walks of
    /// the names side by side instead of a lookup per module and step (a pass follows every
    /// publication, hundreds a second while hundreds of modules start).
    fn objects_settled(&self, new: &Snapshot) -> bool {
        let Shown {
            objects,
            unsent_removals,
            changes,
            ..
        } = &self.shown;
        unsent_removals.is_empty()
            && objects.len() == new.modules.len()
            && changes.len() == new.modules.len()
            && objects.keys().eq(new.modules.keys())
            && changes.keys().eq(new.modules.keys())
            && objects.values().all(|announced| *announced)
    }

    /// The snapshot restricted to modules whose objects exist.
    fn reachable(&self, new: &Arc<Snapshot>) -> Arc<Snapshot> {
        if new
            .modules
            .keys()
            .all(|n| self.shown.objects.contains_key(n))
        {
            return new.clone();
        }
        let mut s = (**new).clone();
        s.modules.retain(|n, _| self.shown.objects.contains_key(n));
        Arc::new(s)
    }

    /// Registers objects for new modules and removes those of modules gone.
    async fn sync_objects(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        self.retry_removals(new, failed).await;
        self.remove_gone(new, failed).await;
        self.add_new(new, failed).await;
    }

    async fn remove_gone(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        let conn = self.conn.clone();
        let server = conn.object_server();
        let gone: Vec<String> = (self.shown.objects.keys())
            .filter(|n| !new.modules.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let announced = self.shown.objects.remove(&name).unwrap_or(false);
            self.shown.props.remove(&name);
            self.throttle.forget(&name);
            // The object is gone even when the signal fails (zbus prunes it first).
            match server.remove::<ModuleObject, _>(module_path(&name)).await {
                Ok(_) | Err(zbus::Error::InterfaceNotFound) => {}
                Err(e) => {
                    failed.push(format!("InterfacesRemoved for {name}: {e}"));
                    if announced {
                        self.shown.unsent_removals.insert(name);
                    }
                }
            }
        }
    }

    async fn add_new(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        let conn = self.conn.clone();
        let server = conn.object_server();
        for (name, m) in &new.modules {
            if self.shown.objects.contains_key(name) {
                continue;
            }
            let path = module_path(name);
            let obj = ModuleObject {
                name: name.clone(),
                state: self.state.clone(),
            };
            let announced = match server.at(path.as_str(), obj).await {
                Ok(None) => Some(true),
                // Already there without our knowing: announce it ourselves.
                Ok(Some(_)) => Some(false),
                Err(e) => {
                    failed.push(format!("InterfacesAdded for {name}: {e}"));
                    // zbus registers the object before it signals: it may well exist.
                    let exists = server.interface::<_, ModuleObject>(path.as_str()).await;
                    exists.is_ok().then_some(false)
                }
            };
            if let Some(announced) = announced {
                self.shown.objects.insert(name.clone(), announced);
                if announced {
                    self.shown.props.insert(name.clone(), m.clone());
                }
            }
            // Exporting an object never waits (zbus's locks are free, the socket takes the
            // signal), so hundreds of them held a worker for ~60 ms while the starts of the
            // modules waited behind it: let them go first.
            tokio::task::yield_now().await;
        }
    }

    /// Sends the InterfacesRemoved that failed before; one superseded by the module's return
    /// is dropped (the new InterfacesAdded says what is there).
    async fn retry_removals(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        let pending = std::mem::take(&mut self.shown.unsent_removals);
        for name in pending {
            if new.modules.contains_key(&name) {
                continue;
            }
            if let Err(e) = self.interfaces_removed(&name).await {
                failed.push(format!("InterfacesRemoved for {name}: {e}"));
                self.shown.unsent_removals.insert(name);
            }
        }
    }

    async fn interfaces_removed(&self, name: &str) -> zbus::Result<()> {
        let em = SignalEmitter::new(&self.conn, MANAGER_PATH)?;
        let path = module_path(name);
        let iface = [InterfaceName::from_static_str_unchecked(MODULE_IFACE)];
        ObjectManager::interfaces_removed(
            &em,
            ObjectPath::try_from(path.as_str())?,
            (&iface).into(),
        )
        .await
    }

    /// Sends the InterfacesAdded that failed before, with the properties as they are now.
    async fn announce_objects(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        let Shown { objects, props, .. } = &mut self.shown;
        for (name, announced) in objects.iter_mut().filter(|(_, a)| !**a) {
            let Some(m) = new.modules.get(name) else {
                continue;
            };
            match interfaces_added(&self.conn, name, m).await {
                Ok(()) => {
                    *announced = true;
                    props.insert(name.clone(), m.clone());
                }
                Err(e) => failed.push(format!("InterfacesAdded for {name}: {e}")),
            }
        }
    }

    /// ModuleChanged for modules gone (their objects removed), once.
    async fn announce_removals(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        let gone: Vec<String> = (self.shown.changes.keys())
            .filter(|n| !new.modules.contains_key(*n) && !self.shown.objects.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let reason = "removed: its manifest is gone";
            match self
                .module_changed(&name, "inactive", "offline", reason)
                .await
            {
                Ok(()) => {
                    self.shown.changes.remove(&name);
                }
                Err(e) => failed.push(format!("ModuleChanged for {name}: {e}")),
            }
        }
    }

    /// PropertiesChanged and ModuleChanged for each module whose object exists. A module
    /// whose status is the one announced (the same `Arc`) and whose ModuleChanged went out is
    /// passed over with a pointer compare.
    async fn announce_modules(&mut self, new: &Snapshot, failed: &mut Vec<String>) {
        for (name, m) in self.to_announce(new) {
            let Some(&announced) = self.shown.objects.get(name) else {
                continue;
            };
            let old = self.shown.props.get(name).cloned();
            if announced && !old.as_ref().is_some_and(|o| Arc::ptr_eq(o, m)) {
                self.announce_props(name, old.as_deref(), m, failed).await;
            }
            self.announce_change(name, m, failed).await;
        }
    }

    /// The modules that may have something to announce: all but those whose status is the
    /// `Arc` their properties announced and whose last ModuleChanged said what it says. Found
    /// walking the three maps side by side, without a lookup per module.
    fn to_announce<'a>(&self, new: &'a Snapshot) -> Vec<(&'a String, &'a Arc<ModuleStatus>)> {
        let mut props = self.shown.props.iter().peekable();
        let mut changes = self.shown.changes.iter().peekable();
        let mut v = Vec::new();
        for (name, m) in &new.modules {
            while props.next_if(|(n, _)| *n < name).is_some() {}
            while changes.next_if(|(n, _)| *n < name).is_some() {}
            let told = props
                .next_if(|(n, _)| *n == name)
                .is_some_and(|(_, o)| Arc::ptr_eq(o, m));
            let said = changes
                .next_if(|(n, _)| *n == name)
                .is_some_and(|(_, c)| same_change(c, m));
            if !(told && said) {
                v.push((name, m));
            }
        }
        v
    }

    /// Whether the last ModuleChanged for `name` said what `m` says.
    fn changed_told(&self, name: &str, m: &ModuleStatus) -> bool {
        self.shown
            .changes
            .get(name)
            .is_some_and(|c| same_change(c, m))
    }

    /// PropertiesChanged with what changed since `old` (busy properties held back: see
    /// throttle.rs).
    async fn announce_props(
        &mut self,
        name: &str,
        old: Option<&ModuleStatus>,
        m: &Arc<ModuleStatus>,
        failed: &mut Vec<String>,
    ) {
        let now = tokio::time::Instant::now();
        let (send, later) = self.throttle.hold(name, old, m, now);
        if let Some(t) = later {
            self.held_until = Some(self.held_until.map_or(t, |h| h.min(t)));
        }
        if old == Some(&*send) {
            return;
        }
        let body = props::changed(mo::TABLE, old, &send);
        match properties_changed(&self.conn, &module_path(name), MODULE_IFACE, body).await {
            Ok(()) => {
                self.throttle.announced(name, old, &send, now);
                self.shown.props.insert(name.to_string(), send);
            }
            Err(e) => failed.push(format!("PropertiesChanged for {name}: {e}")),
        }
    }

    async fn announce_change(&mut self, name: &str, m: &ModuleStatus, failed: &mut Vec<String>) {
        if self.changed_told(name, m) {
            return;
        }
        let (state, health) = (m.state.as_str(), m.health.as_str());
        match self
            .module_changed(name, state, health, &m.health_reason)
            .await
        {
            Ok(()) => {
                let told = (m.state, m.health, m.health_reason.clone());
                self.shown.changes.insert(name.to_string(), told);
            }
            Err(e) => failed.push(format!("ModuleChanged for {name}: {e}")),
        }
    }

    async fn announce_manager(&mut self, new: Arc<Snapshot>, failed: &mut Vec<String>) {
        let body = props::changed(mp::TABLE, self.shown.manager.as_deref(), &new);
        match properties_changed(&self.conn, MANAGER_PATH, MANAGER_IFACE, body).await {
            Ok(()) => self.shown.manager = Some(new),
            Err(e) => failed.push(format!("PropertiesChanged for the manager: {e}")),
        }
    }

    async fn module_changed(
        &self,
        name: &str,
        state: &str,
        health: &str,
        reason: &str,
    ) -> zbus::Result<()> {
        let em = SignalEmitter::new(&self.conn, MANAGER_PATH)?;
        Manager::module_changed(&em, name, state, health, &clean(reason)).await
    }
}

/// Whether a ModuleChanged that said `c` says what `m` would.
fn same_change(c: &(State, Health, String), m: &ModuleStatus) -> bool {
    (c.0, c.1) == (m.state, m.health) && c.2 == m.health_reason
}

async fn interfaces_added(conn: &Connection, name: &str, m: &ModuleStatus) -> zbus::Result<()> {
    let em = SignalEmitter::new(conn, MANAGER_PATH)?;
    let path = module_path(name);
    let mut ifaces = HashMap::new();
    ifaces.insert(
        InterfaceName::from_static_str_unchecked(MODULE_IFACE),
        props::values(mo::TABLE, m),
    );
    ObjectManager::interfaces_added(&em, ObjectPath::try_from(path.as_str())?, ifaces).await
}

/// Emits PropertiesChanged with `body` (nothing when it is empty).
async fn properties_changed(
    conn: &Connection,
    path: &str,
    iface: &'static str,
    body: HashMap<&'static str, Variant<'static>>,
) -> zbus::Result<()> {
    if body.is_empty() {
        return Ok(());
    }
    let em = SignalEmitter::new(conn, path.to_string())?;
    let iface = InterfaceName::from_static_str_unchecked(iface);
    Properties::properties_changed(&em, iface, body, Cow::Borrowed(&[])).await
}
