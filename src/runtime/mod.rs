//! Runtime backends: how a module's process is started, stopped and watched.
//!
//! The supervisor talks to a backend through [`Backend`]; it learns about exits through
//! [`RuntimeEvent`]s on a channel, never by polling.

pub mod container;
pub mod direct;
pub mod systemd;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::journal::OutputSink;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How a module's main process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// Anything else the backend knows: "oom-kill", "timeout", a start failure.
    Other(String),
    /// The backend's own restart budget is spent (systemd's start-limit-hit) after this exit.
    StartLimitHit(Box<ExitInfo>),
    /// The backend could not start the engine for a reason a restart cannot change (an image
    /// missing with `pull = "never"`, a command or user that does not exist): no process ran.
    Refused(String),
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        matches!(self, ExitInfo::Code(0))
    }
}

impl fmt::Display for ExitInfo {
    /// In systemd's words: "exit-code 1", "signal KILL".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(c) => write!(f, "exit-code {c}"),
            ExitInfo::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => write!(f, "signal {}", sig.as_str().trim_start_matches("SIG")),
                Err(_) => write!(f, "signal {s}"),
            },
            ExitInfo::Other(s) => f.write_str(s),
            ExitInfo::StartLimitHit(last) => write!(f, "{last}; start limit hit"),
            ExitInfo::Refused(s) => f.write_str(s),
        }
    }
}

/// Where a backend-managed run is (systemd restarts units itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunPhase {
    Starting,
    Running,
    /// The backend restarts it after this exit.
    Restarting(ExitInfo),
    Stopping,
    /// The final counters of a run; its `Exited` event follows.
    Ended,
    /// The backend cannot see the run now (engine or manager gone); it may come back.
    Unreachable(String),
}

/// What the backend reports to the supervisor.
#[derive(Debug)]
pub enum RuntimeEvent {
    /// The run is over (process reaped, unit inactive/failed/gone).
    Exited {
        name: String,
        generation: u64,
        info: ExitInfo,
    },
    /// Progress of a backend-managed run.
    Status {
        name: String,
        generation: u64,
        main_pid: u32,
        /// The backend's restart count, when it restarts runs itself.
        restarts: Option<u32>,
        phase: RunPhase,
        container_id: Option<String>,
    },
}

/// What to run: a native command or unit, or a container (placeholders substituted).
pub use crate::manifest::Exec;

/// A run of ours a backend found (adoption after a daemon restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub module: String,
    /// Unit name or container ID.
    pub id: String,
    pub running: bool,
}

/// FNV-1a 64 over the parts: stable across builds and Rust versions (unlike std's hasher).
pub fn fnv(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// Everything needed to start one native process.
#[derive(Clone)]
pub struct RunRequest {
    pub name: String,
    /// Increases with every start of the module, so late events of an old run are ignored.
    pub generation: u64,
    pub description: String,
    pub exec: Exec,
    pub restart: crate::manifest::RestartSpec,
    pub stop_timeout: Duration,
    pub memory_max: Option<u64>,
    /// The address the engine will listen on (from its probe): if something else already
    /// answers there, starting would only make a second copy fight for it.
    pub guard_port: Option<String>,
    pub sink: OutputSink,
    /// A run of this module was found in this backend when modvisord started: look at it
    /// before starting (it is adopted when it runs the same spec). Otherwise a backend may
    /// start at once and look only when its start finds something there.
    pub found_at_start: bool,
}

/// A started process.
#[derive(Debug, Clone)]
pub struct RunHandle {
    pub pid: u32,
    /// The process group (direct backend: the child leads its own group).
    pub pgid: i32,
    /// Becomes true once the run is over.
    pub exited: watch::Receiver<bool>,
    /// The unit, for backends that have one.
    pub unit: String,
    /// Told by a stop, for a start that is still being made.
    pub stop_asked: StopAsked,
}

/// A stop may come while the backend is still making the run (a unit or a container is
/// created off the actor, after `start` returned): the stop cannot reach what does not exist
/// yet, so it says so here first, and the start checks before it creates the run (abandoned)
/// and after (undone).
#[derive(Debug, Clone, Default)]
pub struct StopAsked(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StopAsked {
    pub fn ask(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn asked(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs one health probe where it belongs: an exec probe inside the run when the backend can
/// (a container: the engine's exec API), never on the host for such a backend; http and tcp
/// probes, and exec probes of host-side backends, from modvisord.
pub fn probe(
    backend: &dyn Backend,
    handle: &RunHandle,
    p: &crate::manifest::Probe,
    timeout: Duration,
) -> BoxFuture<crate::health::ProbeResult> {
    if let crate::manifest::Probe::Exec { argv } = p
        && let Some(inside) = backend.exec_probe(handle, argv, timeout)
    {
        return inside;
    }
    let p = p.clone();
    Box::pin(async move { crate::health::probe(&p, timeout).await })
}

/// Whether something already accepts connections at `addr` (loopback: answers at once).
pub fn port_in_use(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(mut addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// A native execution backend (direct children today; systemd units later).
pub trait Backend: Send + Sync {
    /// "direct" or "systemd", as the `Backend` property shows it.
    fn kind(&self) -> &'static str;
    /// True when the backend applies the restart policy itself (systemd's Restart=).
    fn restarts_itself(&self) -> bool {
        false
    }
    /// True when runs outlive modvisord (units, containers): not stopped on shutdown.
    fn survives_daemon(&self) -> bool {
        false
    }
    /// The unit a request runs as ("" when there is none).
    fn unit_for(&self, _req: &RunRequest) -> String {
        String::new()
    }
    /// Starts a run. Called on a blocking thread inside the runtime: it may fork, look
    /// users up or check files, and spawn tasks.
    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError>;
    /// Stops the process and everything it started; resolves once the main process is gone.
    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()>;
    /// Units of ours that exist now, with their active state (adoption after a restart).
    fn list_units(&self) -> BoxFuture<Vec<Owned>> {
        Box::pin(async { Vec::new() })
    }
    /// Runs an exec health probe inside the run (a container's exec API), bounded by
    /// `timeout`. None: the backend runs on the host, and so does the probe.
    fn exec_probe(
        &self,
        _handle: &RunHandle,
        _argv: &[String],
        _timeout: Duration,
    ) -> Option<BoxFuture<crate::health::ProbeResult>> {
        None
    }
    /// Stops a unit of ours that no manifest wants any more.
    fn stop_unit(&self, _unit: &str) -> BoxFuture<()> {
        Box::pin(async {})
    }
}
