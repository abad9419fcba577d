//! The client side: proxies for `org.modvisor1`, and how a client finds the daemon's bus.

use std::path::{Path, PathBuf};

use zbus::{Connection, OwnedObjectPath, proxy};

use super::BUS_NAME;

#[proxy(
    interface = "org.modvisor1.Manager",
    default_service = "org.modvisor1",
    default_path = "/org/modvisor1"
)]
pub trait Manager {
    fn list_modules(
        &self,
    ) -> zbus::Result<Vec<(String, String, String, String, String, OwnedObjectPath)>>;
    fn get_module(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_module(&self, name: &str) -> zbus::Result<()>;
    fn stop_module(&self, name: &str) -> zbus::Result<()>;
    fn restart_module(&self, name: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<Vec<(String, String)>>;
    fn set_mode_override(&self, name: &str, mode: &str) -> zbus::Result<()>;
    fn activate_model(&self, name: &str, model: &str) -> zbus::Result<()>;
    fn explain(&self, name: &str) -> zbus::Result<String>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn modules_online(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn modules_degraded(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn modules_offline(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn manifest_errors(&self) -> zbus::Result<Vec<(String, String)>>;
    #[zbus(property)]
    fn container_engine(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn native_backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn gpus(&self) -> zbus::Result<Vec<(u32, String, String, u64, u64)>>;
    #[zbus(property)]
    fn foreign_gpu_processes(&self) -> zbus::Result<Vec<(u32, String, u64)>>;

    #[zbus(signal)]
    fn module_changed(
        &self,
        name: String,
        state: String,
        health: String,
        reason: String,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn module_evicted(&self, name: String, by: String, reason: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn model_activation(
        &self,
        name: String,
        model: String,
        step: String,
        detail: String,
    ) -> zbus::Result<()>;
}

#[proxy(interface = "org.modvisor1.Module", default_service = "org.modvisor1")]
pub trait Module {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn description(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mode(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn mode_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn backend(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn health(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn health_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn unit(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn container_id(&self) -> zbus::Result<String>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn memory_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_max_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn vram_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn restarts(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn active_model(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn since(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn manifest_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn connections(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn last_activity(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn idle_stop_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn on_demand(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn ram_peak_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn vram_peak_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn footprint_source(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pinned(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn priority(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn evictable(&self) -> zbus::Result<bool>;
}

/// The runtime directory where the embedded bus lives, as clients see it.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("MODVISOR_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/modvisor"))
}

/// Finds the bus the daemon serves on: an explicit address, else the system bus when
/// `org.modvisor1` is owned there, else the embedded bus in the runtime directory.
pub async fn connect(explicit: Option<&str>) -> Result<Connection, String> {
    if let Some(addr) = explicit
        .map(str::to_string)
        .or_else(|| std::env::var("MODVISOR_BUS_ADDRESS").ok())
        .filter(|a| !a.is_empty())
    {
        return zbus::connection::Builder::address(addr.as_str())
            .build()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"));
    }
    if let Ok(conn) = Connection::system().await
        && let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await
        && let Ok(name) = zbus::names::BusName::try_from(BUS_NAME)
        && dbus.name_has_owner(name).await.unwrap_or(false)
    {
        return Ok(conn);
    }
    let embedded = embedded_address(&runtime_dir());
    match zbus::connection::Builder::address(embedded.as_str())
        .build()
        .await
    {
        Ok(c) => Ok(c),
        Err(e) => Err(format!(
            "modvisord is not reachable: org.modvisor1 is not on the system bus and the embedded bus {embedded} does not answer ({e})"
        )),
    }
}

pub fn embedded_address(runtime: &Path) -> String {
    format!("unix:path={}", runtime.join("bus").display())
}
