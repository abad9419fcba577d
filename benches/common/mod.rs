//! What the benchmarks that run a real modvisord share: a private bus with the shipped
//! policy, the daemon process, waiting for a state, the median.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use modvisor::dbus::client::ManagerProxy;

pub const WAIT: Duration = Duration::from_secs(30);

#[path = "../../tests/common/bus.rs"]
mod bus;
pub use bus::Bus;

/// modvisord; SIGTERM and a bounded wait when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `name` is in `state` (checked at once and after every ModuleChanged).
pub async fn wait_state(m: &ManagerProxy<'_>, name: &str, state: &str) {
    let mut changes = m.receive_module_changed().await.expect("subscribe");
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = m.list_modules().await.expect("ListModules");
        if rows.iter().any(|r| r.0 == name && r.2 == state) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, changes.next()).await.is_err() {
            panic!("{name} not {state} within {WAIT:?}");
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A modvisord on a private bus, running: the bus, the daemon, a connection, its log file.
pub struct Running {
    pub daemon: Daemon,
    pub conn: zbus::Connection,
    pub log: std::path::PathBuf,
    /// Last: the bus outlives the daemon (dropped after it).
    pub bus: Bus,
}

/// Writes `config` into `dir`, starts modvisord with it on a new private bus (extra
/// environment `env`), and returns once it owns org.modvisor1.
pub async fn start_daemon(dir: &Path, config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Running {
    let config_path = dir.join("modvisor.toml");
    std::fs::write(&config_path, config).expect("config");
    let bus = Bus::start_at(dir);
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("connect to the bus");
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("dbus proxy");
    let mut owners = dbus.receive_name_owner_changed().await.expect("subscribe");
    let log_path = dir.join("modvisord.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_modvisord"))
            .arg("--config")
            .arg(&config_path)
            .arg("--bus-address")
            .arg(&bus.address)
            .env("MODVISOR_LOG_STDERR", "1")
            .env("MODVISOR_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn modvisord"),
    );
    tokio::time::timeout(WAIT, async {
        while let Some(sig) = owners.next().await {
            if let Ok(a) = sig.args()
                && a.name().as_str() == "org.modvisor1"
                && a.new_owner().is_some()
            {
                return;
            }
        }
    })
    .await
    .expect("modvisord took org.modvisor1 in time");
    Running {
        daemon,
        conn,
        log: log_path,
        bus,
    }
}

/// The manager's proxy, uncached.
pub async fn manager(conn: &zbus::Connection) -> ManagerProxy<'static> {
    ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("manager proxy")
}
