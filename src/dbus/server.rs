//! The service side: `org.modvisor1.Manager` on `/org/modvisor1`, one `org.modvisor1.Module`
//! object per module, the ObjectManager, and a publisher task that turns snapshot changes
//! into PropertiesChanged, ModuleChanged and object additions/removals.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;
use zbus::message::Header;
use zbus::names::{BusName, InterfaceName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, Variant, interface};

use super::{ADMIN_GROUP, MANAGER_IFACE, MANAGER_PATH, MODULE_IFACE, module_path};
use crate::manifest::validate_name;
use crate::state::{Health, ModuleStatus, Snapshot};
use crate::supervisor::{Handle, OpError};

#[derive(zbus::DBusError, Debug)]
#[zbus(prefix = "org.modvisor1.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchModule(String),
    NotAllowed(String),
    InvalidArgument(String),
    Busy(String),
    Failed(String),
}

impl From<OpError> for Error {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NoSuchModule(s) => Error::NoSuchModule(s),
            OpError::InvalidArgument(s) => Error::InvalidArgument(s),
            OpError::NotAllowed(s) => Error::NotAllowed(s),
            OpError::Busy(s) => Error::Busy(s),
            OpError::Failed(s) => Error::Failed(s),
        }
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    validate_name(name).map_err(Error::InvalidArgument)
}

/// Decides whether the caller of a mutating method may act: root, or a member of the
/// `modvisor` group. The caller is identified by the bus (its credentials), never by our pid.
async fn authorize(conn: &Connection, hdr: &Header<'_>, what: &str) -> Result<(), Error> {
    let sender = hdr
        .sender()
        .ok_or_else(|| Error::NotAllowed("the call has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    let creds = dbus
        .get_connection_credentials(BusName::from(sender.to_owned()))
        .await
        .map_err(|e| Error::NotAllowed(format!("cannot identify the caller: {e}")))?;
    let uid = creds
        .unix_user_id()
        .ok_or_else(|| Error::NotAllowed("the bus did not say who the caller is".into()))?;
    if uid == 0 {
        return Ok(());
    }
    let admin_gid = nix::unistd::Group::from_name(ADMIN_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if let Some(gid) = admin_gid {
        let in_group = match creds.unix_group_ids() {
            Some(gids) => gids.contains(&gid),
            None => user_in_group(uid, gid),
        };
        if in_group {
            return Ok(());
        }
    }
    // A caller decides how often this happens: at most 5 lines per 10 s.
    static DENIED: super::ratelimit::RateLimit =
        super::ratelimit::RateLimit::new(std::time::Duration::from_secs(10), 5);
    if let Some(left_out) = DENIED.check(std::time::Instant::now()) {
        tracing::warn!(
            caller_uid = uid,
            "denied {what} to uid {uid}{}",
            match left_out {
                0 => String::new(),
                n => format!(" ({n} refusals before this one not logged)"),
            }
        );
    }
    Err(Error::NotAllowed(format!(
        "{what} needs root or membership in the \"{ADMIN_GROUP}\" group (caller uid {uid})"
    )))
}

fn user_in_group(uid: u32, gid: u32) -> bool {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|gs| gs.iter().any(|g| g.as_raw() == gid))
        .unwrap_or(false)
}

pub struct Manager {
    handle: Handle,
    /// What the bus shows: the snapshot whose module objects exist (the Publisher's last sync),
    /// so ListModules never names an object a client cannot reach yet.
    published: watch::Receiver<Arc<Snapshot>>,
}

type ModuleRow = (String, String, String, String, String, OwnedObjectPath);

fn path(name: &str) -> OwnedObjectPath {
    // Escaped names are always valid object paths.
    OwnedObjectPath::try_from(module_path(name))
        .unwrap_or_else(|_| OwnedObjectPath::try_from("/org/modvisor1").expect("static path"))
}

#[interface(name = "org.modvisor1.Manager")]
impl Manager {
    async fn list_modules(&self) -> Vec<ModuleRow> {
        let snap = self.published.borrow().clone();
        snap.modules
            .values()
            .map(|m| {
                (
                    m.name.clone(),
                    m.mode.clone(),
                    m.state.to_string(),
                    m.health.to_string(),
                    m.health_reason.clone(),
                    path(&m.name),
                )
            })
            .collect()
    }

    async fn get_module(&self, name: &str) -> Result<OwnedObjectPath, Error> {
        check_name(name)?;
        if self.published.borrow().modules.contains_key(name) {
            Ok(path(name))
        } else {
            Err(Error::NoSuchModule(format!("no module named \"{name}\"")))
        }
    }

    async fn start_module(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "StartModule").await?;
        Ok(self.handle.start(name).await?)
    }

    async fn stop_module(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "StopModule").await?;
        Ok(self.handle.stop(name).await?)
    }

    async fn restart_module(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "RestartModule").await?;
        Ok(self.handle.restart(name).await?)
    }

    async fn reload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String)>, Error> {
        authorize(conn, &hdr, "Reload").await?;
        Ok(self.handle.reload().await?)
    }

    async fn set_mode_override(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
        mode: &str,
    ) -> Result<(), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "SetModeOverride").await?;
        Ok(self.handle.set_mode_override(name, mode).await?)
    }

    async fn activate_model(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
        model: &str,
    ) -> Result<(), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "ActivateModel").await?;
        Ok(self.handle.activate_model(name, model).await?)
    }

    async fn explain(&self, name: &str) -> Result<String, Error> {
        check_name(name)?;
        Ok(self.handle.explain(name).await?)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    #[zbus(property)]
    fn health(&self) -> String {
        self.handle.state.borrow().health().to_string()
    }

    #[zbus(property)]
    fn modules_online(&self) -> u32 {
        self.handle.state.borrow().count(Health::Online)
    }

    #[zbus(property)]
    fn modules_degraded(&self) -> u32 {
        self.handle.state.borrow().count(Health::Degraded)
    }

    #[zbus(property)]
    fn modules_offline(&self) -> u32 {
        self.handle.state.borrow().count(Health::Offline)
    }

    #[zbus(property)]
    fn manifest_errors(&self) -> Vec<(String, String)> {
        self.handle.state.borrow().manifest_errors.clone()
    }

    #[zbus(property)]
    fn container_engine(&self) -> String {
        self.handle.state.borrow().container_engine.clone()
    }

    #[zbus(property)]
    fn native_backend(&self) -> String {
        self.handle.state.borrow().native_backend.clone()
    }

    #[zbus(property)]
    fn gpus(&self) -> Vec<(u32, String, String, u64, u64)> {
        self.handle.state.borrow().gpus.clone()
    }

    /// GPU processes that belong to no module (pid, command, bytes): usually orphaned engines.
    #[zbus(property)]
    fn foreign_gpu_processes(&self) -> Vec<(u32, String, u64)> {
        self.handle.state.borrow().foreign_gpu_processes.clone()
    }

    #[zbus(signal)]
    async fn module_changed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        state: &str,
        health: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn model_activation(
        emitter: &SignalEmitter<'_>,
        name: &str,
        model: &str,
        step: &str,
        detail: &str,
    ) -> zbus::Result<()>;
}

/// One module object; its properties read the latest snapshot.
pub struct ModuleObject {
    name: String,
    state: watch::Receiver<Arc<Snapshot>>,
}

impl ModuleObject {
    fn get<T: Default>(&self, f: impl FnOnce(&ModuleStatus) -> T) -> T {
        self.state
            .borrow()
            .modules
            .get(&self.name)
            .map(f)
            .unwrap_or_default()
    }
}

#[interface(name = "org.modvisor1.Module")]
impl ModuleObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.name.clone()
    }
    #[zbus(property)]
    fn description(&self) -> String {
        self.get(|m| m.description.clone())
    }
    #[zbus(property)]
    fn mode(&self) -> String {
        self.get(|m| m.mode.clone())
    }
    #[zbus(property)]
    fn mode_reason(&self) -> String {
        self.get(|m| m.mode_reason.clone())
    }
    #[zbus(property)]
    fn backend(&self) -> String {
        self.get(|m| m.backend.clone())
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.get(|m| m.state.to_string())
    }
    #[zbus(property)]
    fn health(&self) -> String {
        self.get(|m| m.health.to_string())
    }
    #[zbus(property)]
    fn health_reason(&self) -> String {
        self.get(|m| m.health_reason.clone())
    }
    #[zbus(property)]
    fn unit(&self) -> String {
        self.get(|m| m.unit.clone())
    }
    #[zbus(property)]
    fn container_id(&self) -> String {
        self.get(|m| m.container_id.clone())
    }
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.get(|m| m.main_pid)
    }
    #[zbus(property)]
    fn memory_bytes(&self) -> u64 {
        self.get(|m| m.memory_bytes)
    }
    #[zbus(property)]
    fn memory_max_bytes(&self) -> u64 {
        self.get(|m| m.memory_max_bytes)
    }
    #[zbus(property)]
    fn vram_bytes(&self) -> u64 {
        self.get(|m| m.vram_bytes)
    }
    #[zbus(property)]
    fn restarts(&self) -> u32 {
        self.get(|m| m.restarts)
    }
    #[zbus(property)]
    fn active_model(&self) -> String {
        self.get(|m| m.active_model.clone())
    }
    #[zbus(property)]
    fn since(&self) -> u64 {
        self.get(|m| m.since_us)
    }
    #[zbus(property)]
    fn manifest_path(&self) -> String {
        self.get(|m| m.manifest_path.clone())
    }
}

fn module_props(m: &ModuleStatus) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        ("Description", Variant::from(m.description.clone())),
        ("Mode", Variant::from(m.mode.clone())),
        ("ModeReason", Variant::from(m.mode_reason.clone())),
        ("Backend", Variant::from(m.backend.clone())),
        ("State", Variant::from(m.state.to_string())),
        ("Health", Variant::from(m.health.to_string())),
        ("HealthReason", Variant::from(m.health_reason.clone())),
        ("Unit", Variant::from(m.unit.clone())),
        ("ContainerId", Variant::from(m.container_id.clone())),
        ("MainPID", Variant::from(m.main_pid)),
        ("MemoryBytes", Variant::from(m.memory_bytes)),
        ("MemoryMaxBytes", Variant::from(m.memory_max_bytes)),
        ("VramBytes", Variant::from(m.vram_bytes)),
        ("Restarts", Variant::from(m.restarts)),
        ("ActiveModel", Variant::from(m.active_model.clone())),
        ("Since", Variant::from(m.since_us)),
        ("ManifestPath", Variant::from(m.manifest_path.clone())),
    ]
}

fn manager_props(s: &Snapshot) -> Vec<(&'static str, Variant<'static>)> {
    vec![
        ("Health", Variant::from(s.health().to_string())),
        ("ModulesOnline", Variant::from(s.count(Health::Online))),
        ("ModulesDegraded", Variant::from(s.count(Health::Degraded))),
        ("ModulesOffline", Variant::from(s.count(Health::Offline))),
        ("ManifestErrors", Variant::from(s.manifest_errors.clone())),
        ("ContainerEngine", Variant::from(s.container_engine.clone())),
        ("Backend", Variant::from(s.native_backend.clone())),
    ]
}

async fn emit_changed(
    conn: &Connection,
    path: &str,
    iface: &'static str,
    old: &[(&'static str, Variant<'static>)],
    new: &[(&'static str, Variant<'static>)],
) -> zbus::Result<()> {
    let changed: HashMap<&str, Variant<'_>> = new
        .iter()
        .filter(|(k, v)| {
            old.iter()
                .find(|(ok, _)| ok == k)
                .is_none_or(|(_, ov)| ov != v)
        })
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let emitter = SignalEmitter::new(conn, path.to_string())?;
    zbus::fdo::Properties::properties_changed(
        &emitter,
        InterfaceName::from_static_str_unchecked(iface),
        changed,
        Cow::Borrowed(&[]),
    )
    .await
}

/// Registers the manager and the ObjectManager on `conn`.
/// Returns the sender the Publisher reports each synced snapshot on.
pub async fn serve(
    conn: &Connection,
    handle: Handle,
) -> zbus::Result<watch::Sender<Arc<Snapshot>>> {
    let (published_tx, published) = watch::channel(Arc::new(Snapshot::default()));
    let server = conn.object_server();
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    server
        .at(MANAGER_PATH, Manager { handle, published })
        .await?;
    Ok(published_tx)
}

/// Follows the supervisor's snapshots and mirrors them onto the bus until the supervisor ends.
/// Module objects for the current snapshot exist when the first `sync` returns.
pub struct Publisher {
    conn: Connection,
    state: watch::Receiver<Arc<Snapshot>>,
    last: Arc<Snapshot>,
    published: watch::Sender<Arc<Snapshot>>,
}

impl Publisher {
    pub async fn new(
        conn: Connection,
        mut state: watch::Receiver<Arc<Snapshot>>,
        published: watch::Sender<Arc<Snapshot>>,
    ) -> zbus::Result<Publisher> {
        let first = state.borrow_and_update().clone();
        let mut p = Publisher {
            conn,
            state,
            last: Arc::new(Snapshot::default()),
            published,
        };
        p.sync(first).await?;
        Ok(p)
    }

    pub async fn run(
        mut self,
        mut activations: tokio::sync::broadcast::Receiver<crate::supervisor::ActivationStep>,
    ) {
        loop {
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snap = self.state.borrow_and_update().clone();
                    if let Err(e) = self.sync(snap).await {
                        tracing::warn!("publishing state on D-Bus: {e}");
                    }
                }
                step = activations.recv() => match step {
                    Ok((name, model, step, detail)) => {
                        // The module's state first, so that a client sees ActiveModel updated.
                        let snap = self.state.borrow_and_update().clone();
                        if let Err(e) = self.sync(snap).await {
                            tracing::warn!("publishing state on D-Bus: {e}");
                        }
                        if let Ok(em) = SignalEmitter::new(&self.conn, MANAGER_PATH)
                            && let Err(e) = Manager::model_activation(&em, &name, &model, &step, &detail).await {
                                tracing::warn!("ModelActivation signal: {e}");
                            }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!("{n} activation steps not signalled"),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn sync(&mut self, new: Arc<Snapshot>) -> zbus::Result<()> {
        let old = std::mem::replace(&mut self.last, new.clone());
        let server = self.conn.object_server();
        let manager = SignalEmitter::new(&self.conn, MANAGER_PATH)?;
        // Objects first, then what ListModules shows, then the signals: a client that reacts
        // to a signal always finds the state it announces, and the object it names.
        let gone: Vec<&String> = old
            .modules
            .keys()
            .filter(|n| !new.modules.contains_key(*n))
            .collect();
        for name in &gone {
            server.remove::<ModuleObject, _>(module_path(name)).await?;
        }
        for name in new.modules.keys().filter(|n| !old.modules.contains_key(*n)) {
            let obj = ModuleObject {
                name: name.clone(),
                state: self.state.clone(),
            };
            server.at(module_path(name), obj).await?;
        }
        self.published.send_replace(new.clone());
        for name in gone {
            // Watchers learn of the removal from the same signal as of every other change.
            Manager::module_changed(
                &manager,
                name,
                "inactive",
                "offline",
                "removed: its manifest is gone",
            )
            .await?;
        }
        for (name, m) in &new.modules {
            let announce = match old.modules.get(name) {
                None => true,
                Some(o) if o != m => {
                    emit_changed(
                        &self.conn,
                        &module_path(name),
                        MODULE_IFACE,
                        &module_props(o),
                        &module_props(m),
                    )
                    .await?;
                    o.state != m.state || o.health != m.health || o.health_reason != m.health_reason
                }
                Some(_) => false,
            };
            if announce {
                Manager::module_changed(
                    &manager,
                    name,
                    m.state.as_str(),
                    m.health.as_str(),
                    &m.health_reason,
                )
                .await?;
            }
        }
        emit_changed(
            &self.conn,
            MANAGER_PATH,
            MANAGER_IFACE,
            &manager_props(&old),
            &manager_props(&new),
        )
        .await?;
        Ok(())
    }
}
