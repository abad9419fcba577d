//! The service side: `org.modvisor1.Manager` on `/org/modvisor1`, one `org.modvisor1.Module`
//! object per module, and the ObjectManager. Methods forward to the supervisor handle;
//! properties read through the table in `props.rs`; `publisher.rs` mirrors changes onto the bus.

use std::sync::Arc;

use tokio::sync::watch;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, interface};

use super::authz::authorize;
pub use super::error::Error;
use super::props::{manager as mp, module as mo};
use super::text::clean;
use super::{MANAGER_PATH, module_path};
use crate::manifest::validate_name;
use crate::state::{ModuleStatus, Snapshot};
use crate::supervisor::Handle;

pub use super::publisher::Publisher;

fn check_name(name: &str) -> Result<(), Error> {
    validate_name(name).map_err(Error::InvalidArgument)
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

impl Manager {
    fn read<T>(&self, f: fn(&Snapshot) -> T) -> T {
        f(&self.handle.state.borrow())
    }
}

#[interface(name = "org.modvisor1.Manager")]
impl Manager {
    async fn list_modules(&self) -> Vec<ModuleRow> {
        let snap = self.published.borrow().clone();
        snap.modules
            .values()
            .map(|m| {
                (
                    clean(&m.name),
                    clean(&m.mode),
                    m.state.to_string(),
                    m.health.to_string(),
                    clean(&m.health_reason),
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
        let errors = self.handle.reload().await?;
        Ok(errors.iter().map(|(f, e)| (clean(f), clean(e))).collect())
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

    /// The module's recent output (what modvisord keeps in memory: its last 40 lines, at
    /// most 16 KiB) numbered above `after`, the last `max` of them; with the newest number
    /// (for the next call) and whether module output also goes to the journal. Root and
    /// group modvisor only: an engine's output may hold what its clients sent.
    async fn get_output(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
        after: u64,
        max: u32,
    ) -> Result<(bool, u64, Vec<String>), Error> {
        check_name(name)?;
        authorize(conn, &hdr, "GetOutput").await?;
        let (seq, lines) = self.handle.output(name, after, max as usize).await?;
        let journal = crate::journal::journal_socket().exists();
        Ok((journal, seq, lines))
    }

    async fn explain(&self, name: &str) -> Result<String, Error> {
        check_name(name)?;
        Ok(clean(&self.handle.explain(name).await?))
    }

    // Every getter reads through the property table (props.rs), as PropertiesChanged does.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        self.read(mp::version)
    }

    #[zbus(property)]
    fn health(&self) -> String {
        self.read(mp::health)
    }

    #[zbus(property)]
    fn modules_online(&self) -> u32 {
        self.read(mp::modules_online)
    }

    #[zbus(property)]
    fn modules_degraded(&self) -> u32 {
        self.read(mp::modules_degraded)
    }

    #[zbus(property)]
    fn modules_offline(&self) -> u32 {
        self.read(mp::modules_offline)
    }

    #[zbus(property)]
    fn manifest_errors(&self) -> Vec<(String, String)> {
        self.read(mp::manifest_errors)
    }

    #[zbus(property)]
    fn container_engine(&self) -> String {
        self.read(mp::container_engine)
    }

    #[zbus(property)]
    fn native_backend(&self) -> String {
        self.read(mp::native_backend)
    }

    #[zbus(property)]
    fn gpus(&self) -> Vec<(u32, String, String, u64, u64)> {
        self.read(mp::gpus)
    }

    /// GPU processes that belong to no module (pid, command, bytes): usually orphaned engines.
    #[zbus(property)]
    fn foreign_gpu_processes(&self) -> Vec<(u32, String, u64)> {
        self.read(mp::foreign_gpu_processes)
    }

    #[zbus(signal)]
    pub(super) async fn module_changed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        state: &str,
        health: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    /// A module was stopped to make room for another: (name, by, reason).
    #[zbus(signal)]
    pub(super) async fn module_evicted(
        emitter: &SignalEmitter<'_>,
        name: &str,
        by: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub(super) async fn model_activation(
        emitter: &SignalEmitter<'_>,
        name: &str,
        model: &str,
        step: &str,
        detail: &str,
    ) -> zbus::Result<()>;
}

/// One module object; its properties read the supervisor's latest snapshot through the table.
pub struct ModuleObject {
    pub(super) name: String,
    pub(super) state: watch::Receiver<Arc<Snapshot>>,
}

impl ModuleObject {
    /// A module gone from the snapshot (its object about to be removed) reads as defaults.
    fn read<T: Default>(&self, f: fn(&ModuleStatus) -> T) -> T {
        self.state
            .borrow()
            .modules
            .get(&self.name)
            .map(|m| f(m))
            .unwrap_or_default()
    }
}

#[interface(name = "org.modvisor1.Module")]
impl ModuleObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.read(mo::name)
    }
    #[zbus(property)]
    fn description(&self) -> String {
        self.read(mo::description)
    }
    #[zbus(property)]
    fn mode(&self) -> String {
        self.read(mo::mode)
    }
    #[zbus(property)]
    fn mode_reason(&self) -> String {
        self.read(mo::mode_reason)
    }
    #[zbus(property)]
    fn backend(&self) -> String {
        self.read(mo::backend)
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.read(mo::state)
    }
    #[zbus(property)]
    fn health(&self) -> String {
        self.read(mo::health)
    }
    #[zbus(property)]
    fn health_reason(&self) -> String {
        self.read(mo::health_reason)
    }
    #[zbus(property)]
    fn unit(&self) -> String {
        self.read(mo::unit)
    }
    #[zbus(property)]
    fn container_id(&self) -> String {
        self.read(mo::container_id)
    }
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.read(mo::main_pid)
    }
    #[zbus(property)]
    fn memory_bytes(&self) -> u64 {
        self.read(mo::memory_bytes)
    }
    #[zbus(property)]
    fn memory_max_bytes(&self) -> u64 {
        self.read(mo::memory_max_bytes)
    }
    #[zbus(property)]
    fn vram_bytes(&self) -> u64 {
        self.read(mo::vram_bytes)
    }
    #[zbus(property)]
    fn restarts(&self) -> u32 {
        self.read(mo::restarts)
    }
    #[zbus(property)]
    fn active_model(&self) -> String {
        self.read(mo::active_model)
    }
    #[zbus(property)]
    fn since(&self) -> u64 {
        self.read(mo::since)
    }
    #[zbus(property)]
    fn manifest_path(&self) -> String {
        self.read(mo::manifest_path)
    }
    /// Open connections to the module's listen address ([serve]).
    #[zbus(property)]
    fn connections(&self) -> u32 {
        self.read(mo::connections)
    }
    /// µs since the epoch of the last connection opened or closed.
    #[zbus(property)]
    fn last_activity(&self) -> u64 {
        self.read(mo::last_activity)
    }
    /// µs since the epoch when the idle stop fires (0: not armed).
    #[zbus(property)]
    fn idle_stop_at(&self) -> u64 {
        self.read(mo::idle_stop_at)
    }
    /// Started by the first connection rather than at boot.
    #[zbus(property)]
    fn on_demand(&self) -> bool {
        self.read(mo::on_demand)
    }
    /// The RAM footprint admission uses: the measured peak, else `resources.memory_max`.
    #[zbus(property)]
    fn ram_peak_bytes(&self) -> u64 {
        self.read(mo::ram_peak_bytes)
    }
    /// The VRAM footprint admission uses (all GPUs): the measured peak, else `resources.vram`.
    #[zbus(property)]
    fn vram_peak_bytes(&self) -> u64 {
        self.read(mo::vram_peak_bytes)
    }
    /// "measured", "declared", or "" (nothing known).
    #[zbus(property)]
    fn footprint_source(&self) -> String {
        self.read(mo::footprint_source)
    }
    /// `resources.pinned`: never evicted.
    #[zbus(property)]
    fn pinned(&self) -> bool {
        self.read(mo::pinned)
    }
    /// `resources.priority`: lower priorities are evicted first.
    #[zbus(property)]
    fn priority(&self) -> i32 {
        self.read(mo::priority)
    }
    /// Running, idle and not pinned: admission may stop it to start another module.
    #[zbus(property)]
    fn evictable(&self) -> bool {
        self.read(mo::evictable)
    }
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

#[cfg(test)]
mod tests {
    use zbus::object_server::Interface;

    use super::*;
    use crate::dbus::props::{self, Emits, Prop};

    fn manager() -> Manager {
        let (_, state) = watch::channel(Arc::new(Snapshot::default()));
        let handle = Handle {
            commands: tokio::sync::mpsc::channel(1).0,
            state: state.clone(),
            signals: tokio::sync::broadcast::channel(1).0,
        };
        Manager {
            handle,
            published: state,
        }
    }

    fn xml(iface: &dyn Interface) -> String {
        let mut s = String::new();
        iface.introspect_to_writer(&mut s, 0);
        s
    }

    /// (name, type, emits) of each property in an interface's introspection XML.
    fn introspected(xml: &str) -> Vec<(String, String, Emits)> {
        let attr = |tag: &str, key: &str| -> String {
            let pat = format!("{key}=\"");
            tag.split_once(&pat)
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (i, chunk) in xml.split("<property ").enumerate().skip(1) {
            let tag = chunk.split('>').next().unwrap_or_default();
            // A property with annotations is not self-closing; its body ends at </property>.
            let body = if tag.ends_with('/') {
                ""
            } else {
                chunk.split("</property>").next().unwrap_or_default()
            };
            let emits = if body.contains("EmitsChangedSignal\" value=\"const\"") {
                Emits::Const
            } else {
                Emits::Changes
            };
            assert!(
                !body.contains("EmitsChangedSignal") || emits == Emits::Const,
                "property {i}: only \"const\" is used: {body}"
            );
            out.push((attr(tag, "name"), attr(tag, "type"), emits));
        }
        out.sort();
        out
    }

    fn table<S>(t: &[Prop<S>], sample: &S) -> Vec<(String, String, Emits)> {
        let mut v: Vec<_> = t
            .iter()
            .map(|p| {
                let sig = (p.value)(sample).value_signature().to_string();
                (p.name.to_string(), sig, p.emits)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_property_tables_are_exactly_what_the_interfaces_introspect() {
        let snap = Snapshot::default();
        assert_eq!(
            introspected(&xml(&manager())),
            table(props::manager::TABLE, &snap),
            "org.modvisor1.Manager: name, type, EmitsChangedSignal"
        );
        let (_, state) = watch::channel(Arc::new(Snapshot::default()));
        let obj = ModuleObject {
            name: "a".into(),
            state,
        };
        assert_eq!(
            introspected(&xml(&obj)),
            table(props::module::TABLE, &props::tests::status("a")),
            "org.modvisor1.Module: name, type, EmitsChangedSignal"
        );
    }
}
