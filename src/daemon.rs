//! modvisord: wiring of config, supervisor, bus, signals, inotify, sd_notify and the watchdog.
//! One ordered shutdown path: signal -> STOPPING=1 -> stop modules -> release the bus.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::config::{BusChoice, Config, NativeBackendChoice};
use crate::dbus::embedded::EmbeddedBus;
use crate::dbus::{self, BUS_NAME};
use crate::dirwatch::DirWatch;
use crate::journal::Journal;
use crate::runtime::Backend;
use crate::runtime::container::ContainerBackend;
use crate::runtime::direct::DirectBackend;
use crate::runtime::systemd::SystemdBackend;
use crate::supervisor::{self, Command, Handle};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("config: {0}")]
    Config(#[from] crate::manifest::ManifestError),
    #[error("{0}")]
    Setup(String),
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

/// Options the command line adds to the config file.
#[derive(Debug, Default, Clone)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub bus_address: Option<String>,
    pub embedded_bus: bool,
}

fn notify(states: &[NotifyState<'_>]) {
    // Without NOTIFY_SOCKET this is a no-op; a failure to notify is logged, never fatal.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

enum Bus {
    Given,
    System,
    Embedded(Box<EmbeddedBus>),
}

async fn connect_bus(cfg: &Config, opts: &Options) -> Result<(zbus::Connection, Bus), DaemonError> {
    if let Some(addr) = opts.bus_address.clone().or_else(|| cfg.bus_address.clone()) {
        let c = zbus::connection::Builder::address(addr.as_str())
            .build()
            .await?;
        return Ok((c, Bus::Given));
    }
    let choice = if opts.embedded_bus {
        BusChoice::Embedded
    } else {
        cfg.bus
    };
    if choice != BusChoice::Embedded {
        match zbus::Connection::system().await {
            Ok(c) => {
                // The object server first: once the name is ours, a call that comes before the
                // objects are served is answered (UnknownObject) instead of left to time out.
                let _ = c.object_server();
                // Only keep the system bus if it lets us own the name (the policy file is installed).
                match c
                    .request_name_with_flags(BUS_NAME, dbus::embedded::OWN_NAME_FLAGS)
                    .await
                {
                    Ok(_) => return Ok((c, Bus::System)),
                    Err(e) if choice == BusChoice::System => {
                        return Err(DaemonError::Setup(format!(
                            "cannot own {BUS_NAME} on the system bus: {e}"
                        )));
                    }
                    Err(e) => tracing::warn!(
                        "the system bus refused {BUS_NAME} ({e}): using the embedded bus"
                    ),
                }
            }
            Err(e) if choice == BusChoice::System => return Err(DaemonError::Bus(e)),
            Err(_) => tracing::info!("no system bus: using the embedded bus"),
        }
    }
    let eb = EmbeddedBus::start(&cfg.runtime)
        .await
        .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let c = zbus::connection::Builder::address(eb.address.as_str())
        .build()
        .await?;
    Ok((c, Bus::Embedded(Box::new(eb))))
}

/// Connects to systemd on the system bus (bounded: 5 s).
async fn systemd_backend(state_dir: &Path) -> Result<SystemdBackend, String> {
    let attempt = async {
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| format!("no system bus: {e}"))?;
        SystemdBackend::connect(conn, state_dir)
            .await
            .map_err(|e| format!("systemd does not answer: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("systemd did not answer within 5s".into()))
}

/// `native_backend`: systemd when asked (or, for `auto`, when the manager answers on the bus),
/// else direct children (after stopping what a crashed predecessor left running).
async fn native_backend(cfg: &Config) -> Result<Arc<dyn Backend>, DaemonError> {
    match cfg.native_backend {
        NativeBackendChoice::Systemd => {
            let b = systemd_backend(&cfg.state)
                .await
                .map_err(|e| DaemonError::Setup(format!("native_backend = \"systemd\": {e}")))?;
            return Ok(Arc::new(b));
        }
        NativeBackendChoice::Auto => match systemd_backend(&cfg.state).await {
            Ok(b) => return Ok(Arc::new(b)),
            Err(e) => tracing::info!("native backend: direct ({e})"),
        },
        NativeBackendChoice::Direct => {}
    }
    let direct = DirectBackend::new(&cfg.runtime);
    let grace = Duration::from_secs(10);
    let (left, direct) =
        tokio::task::spawn_blocking(move || (direct.stop_leftovers(grace), direct))
            .await
            .map_err(|e| DaemonError::Setup(format!("stopping leftovers: {e}")))?;
    for (name, pid) in &left {
        tracing::warn!(modvisor_module = %name, "stopped pid {pid} of {name}, left by a previous modvisord");
    }
    Ok(Arc::new(direct))
}

/// The model store's pulls; the fetcher child is `modvisor-fetch` (see [`fetcher_path`]).
fn model_puller(cfg: &Config) -> Result<Arc<crate::store::Puller>, DaemonError> {
    let exe = std::env::current_exe()
        .map_err(|e| DaemonError::Setup(format!("find our own executable: {e}")))?;
    // After a package upgrade replaced the binary, its directory is still the package's.
    let exe = match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => exe,
    };
    let fetcher = fetcher_path(&exe);
    tracing::debug!("model fetcher: {}", fetcher.display());
    let store = crate::store::Store::new(crate::store::Settings::from_config(cfg));
    Ok(crate::store::Puller::new(Arc::new(store), fetcher))
}

/// Where `modvisor-fetch` is, from where modvisord is: beside it (a build tree), else in
/// `../libexec/modvisor/` (the package: /usr/bin -> /usr/libexec/modvisor). Both are as trusted
/// as modvisord's own directory. When neither exists, the first: a pull's error names it.
pub fn fetcher_path(daemon: &Path) -> PathBuf {
    let dir = daemon.parent().unwrap_or(Path::new("/"));
    let beside = dir.join(crate::store::FETCHER);
    let libexec = dir.join("../libexec/modvisor").join(crate::store::FETCHER);
    if !beside.exists() && libexec.exists() {
        return libexec;
    }
    beside
}

/// Sends WATCHDOG=1 at half the watchdog interval, but only while the supervisor answers.
fn spawn_watchdog(handle: Handle) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        loop {
            t.tick().await;
            let (tx, rx) = oneshot::channel();
            if handle.commands.send(Command::Ping(tx)).await.is_err() {
                return;
            }
            if tokio::time::timeout(every, rx)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "the supervisor did not answer within {every:?}: withholding WATCHDOG=1"
                );
            }
        }
    });
}

/// `[metrics] listen`: serve `GET /metrics` from the published snapshot (before READY=1, so a
/// port that cannot be bound fails the start, as any other config error does).
async fn start_metrics(
    cfg: &Config,
    handle: &Handle,
) -> Result<Option<crate::metrics::MetricsServer>, DaemonError> {
    let Some(addr) = cfg.metrics_listen else {
        return Ok(None);
    };
    let server =
        crate::metrics::MetricsServer::start(addr, handle.state.clone(), Default::default())
            .await
            .map_err(|e| DaemonError::Setup(format!("metrics: bind {addr}: {e}")))?;
    if addr.ip().is_loopback() {
        tracing::info!("metrics at http://{}/metrics", server.addr);
    } else {
        tracing::warn!(
            "metrics at http://{}/metrics: reachable from other machines ([metrics] listen names a non-loopback address)",
            server.addr
        );
    }
    Ok(Some(server))
}

/// The signals modvisord acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        let on = |k| signal(k).map_err(|e| DaemonError::Setup(e.to_string()));
        Ok(Signals {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
        })
    }
}

/// What the process itself needs before anything starts: to reap every orphan, no core dumps,
/// its directories.
fn prepare_process(cfg: &Config) -> Result<(), DaemonError> {
    crate::reaper::become_subreaper()
        .map_err(|e| DaemonError::Setup(format!("become child subreaper: {e}")))?;
    // No core dumps, of modvisord or of anything it starts (inherited by every direct child;
    // units get LimitCORE=0): a core of an engine holds its model and its secrets.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| DaemonError::Setup(format!("set RLIMIT_CORE to 0: {e}")))?;
    match crate::limits::raise_nofile() {
        Ok((before, now)) if before < now => {
            tracing::info!("open files: soft limit raised from {before} to {now}");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("open files: the soft limit stays as it is: {e}"),
    }
    tokio::spawn(async {
        if let Err(e) = crate::reaper::run().await {
            tracing::error!("reaper: {e}");
        }
    });
    for d in [&cfg.state, &cfg.runtime] {
        std::fs::create_dir_all(d)
            .map_err(|e| DaemonError::Setup(format!("create {}: {e}", d.display())))?;
    }
    Ok(())
}

/// The container backend and the engine's description, or why containers are unavailable.
async fn container_backend(cfg: &Config) -> (Result<Arc<dyn Backend>, String>, String) {
    if !cfg.policy.docker_enabled {
        let why = "containers are disabled (docker_enabled = false)";
        return (Err(why.into()), String::new());
    }
    match ContainerBackend::connect(&cfg.container_socket, &cfg.state).await {
        Ok(b) => {
            let d = b.description().to_string();
            (Ok(Arc::new(b)), d)
        }
        Err(why) => {
            tracing::info!("containers unavailable: {why}");
            (Err(why), String::new())
        }
    }
}

/// NVML is optional: without it VRAM is unknown, said once here, never an error loop.
async fn open_gpu(cfg: &Config) -> Result<Arc<crate::monitor::Gpu>, String> {
    let lib = cfg.nvml_library.clone();
    let gpu = tokio::task::spawn_blocking(move || crate::monitor::Gpu::open(&lib))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .map(Arc::new);
    match &gpu {
        Ok(_) => tracing::info!("NVML loaded: GPUs and VRAM are monitored"),
        Err(e) => tracing::info!("VRAM unknown: {e}"),
    }
    gpu
}

/// The supervisor's handle, its first reconcile, its task.
type Spawned = (Handle, oneshot::Receiver<()>, tokio::task::JoinHandle<()>);

/// The supervisor and what it runs on, started; the module directories watched.
async fn start_supervisor(cfg: &Arc<Config>) -> Result<Spawned, DaemonError> {
    let native = native_backend(cfg).await?;
    let (container, container_engine) = container_backend(cfg).await;
    let gpu = open_gpu(cfg).await;
    // Engines of an earlier modvisord, to adopt.
    let mut existing: Vec<(Arc<dyn Backend>, crate::runtime::Owned)> = Vec::new();
    for b in std::iter::once(native.clone()).chain(container.clone().ok()) {
        for o in b.list_units().await {
            existing.push((b.clone(), o));
        }
    }
    let journal = Journal::connect().map(Arc::new);
    let dir_watch = DirWatch::new(cfg.modules.clone()).map_err(DaemonError::Setup)?;
    let backends = supervisor::Backends {
        native: Some(native),
        container,
        container_engine,
    };
    let (handle, ready, task) = supervisor::spawn(cfg.clone(), backends, journal, existing, gpu);
    dir_watch.spawn(handle.clone());
    Ok((handle, ready, task))
}

pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let cfg = Arc::new(Config::load(opts.config.as_deref())?);
    // Handlers first: a SIGTERM right after READY=1 must take the orderly path.
    let mut signals = Signals::install()?;
    prepare_process(&cfg)?;
    let (handle, ready, sup_task) = start_supervisor(&cfg).await?;
    let (conn, bus) = connect_bus(&cfg, &opts).await?;
    let published = dbus::server::serve(&conn, handle.clone()).await?;
    dbus::models::serve(&conn, model_puller(&cfg)?, handle.state.clone()).await?;
    // Wait for the first reconcile so the module objects exist before the name appears.
    ready
        .await
        .map_err(|_| DaemonError::Setup("the supervisor ended during start-up".into()))?;
    let publisher =
        dbus::server::Publisher::new(conn.clone(), handle.state.clone(), published).await?;
    tokio::spawn(publisher.run(handle.signals.subscribe()));
    if !matches!(bus, Bus::System) {
        conn.request_name_with_flags(BUS_NAME, dbus::embedded::OWN_NAME_FLAGS)
            .await?;
    }
    spawn_watchdog(handle.clone());
    let metrics = start_metrics(&cfg, &handle).await?;

    let summary = handle.state.borrow().summary();
    notify(&[NotifyState::Ready, NotifyState::Status(&summary)]);
    tracing::info!("modvisord {} ready: {summary}", env!("CARGO_PKG_VERSION"));

    let why = serve_until_signal(&handle, &mut signals).await;
    tracing::info!("{why}: stopping");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping modules"),
    ]);
    let (tx, rx) = oneshot::channel();
    if handle.commands.send(Command::Shutdown(tx)).await.is_ok() {
        let _ = rx.await;
    }
    let _ = sup_task.await;
    if let Some(m) = metrics {
        m.stop().await;
    }
    let _ = conn.release_name(BUS_NAME).await;
    drop(conn);
    if let Bus::Embedded(eb) = bus {
        eb.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs until a signal (or the supervisor's end) says stop; SIGHUP reloads; the status line
/// follows the state. Returns what ended it.
async fn serve_until_signal(handle: &Handle, sig: &mut Signals) -> &'static str {
    let mut state = handle.state.clone();
    loop {
        tokio::select! {
            _ = sig.term.recv() => return "SIGTERM",
            _ = sig.int.recv() => return "SIGINT",
            _ = sig.hup.recv() => {
                notify(&[NotifyState::Reloading]);
                let errs = handle.reload().await.unwrap_or_default();
                tracing::info!("SIGHUP: manifests reloaded, {} errors", errs.len());
                let s = handle.state.borrow().summary();
                notify(&[NotifyState::Ready, NotifyState::Status(&s)]);
            }
            r = state.changed() => {
                if r.is_err() {
                    return "the supervisor ended";
                }
                let s = state.borrow_and_update().summary();
                notify(&[NotifyState::Status(&s)]);
            }
        }
    }
}

#[cfg(test)]
mod fetcher_tests {
    use super::fetcher_path;

    #[test]
    fn the_fetcher_is_beside_the_daemon_else_in_libexec() {
        let root = tempfile::tempdir().expect("tempdir");
        let bin = root.path().join("bin");
        let libexec = root.path().join("libexec/modvisor");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::create_dir_all(&libexec).expect("mkdir");
        let daemon = bin.join("modvisord");
        // Neither: the first place, which a pull's error then names.
        assert_eq!(fetcher_path(&daemon), bin.join("modvisor-fetch"));
        std::fs::write(libexec.join("modvisor-fetch"), "").expect("write");
        assert_eq!(
            fetcher_path(&daemon),
            bin.join("../libexec/modvisor/modvisor-fetch")
        );
        std::fs::write(bin.join("modvisor-fetch"), "").expect("write");
        assert_eq!(fetcher_path(&daemon), bin.join("modvisor-fetch"));
    }
}
