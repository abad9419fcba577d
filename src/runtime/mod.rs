//! Runtime backends: how a module's process is started, stopped and watched.
//!
//! The supervisor talks to a backend through [`NativeBackend`]; it learns about exits through
//! [`RuntimeEvent`]s on a channel, never by polling.

pub mod direct;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
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
        }
    }
}

/// What the backend reports to the supervisor.
#[derive(Debug)]
pub enum RuntimeEvent {
    Exited {
        name: String,
        generation: u64,
        info: ExitInfo,
    },
}

/// Everything needed to start one native process.
#[derive(Clone)]
pub struct RunRequest {
    pub name: String,
    /// Increases with every start of the module, so late events of an old run are ignored.
    pub generation: u64,
    pub argv: Vec<String>,
    pub environment: BTreeMap<String, String>,
    pub working_directory: Option<PathBuf>,
    pub sink: OutputSink,
}

/// A started process.
#[derive(Debug, Clone)]
pub struct RunHandle {
    pub pid: u32,
    /// The process group (direct backend: the child leads its own group).
    pub pgid: i32,
    /// Becomes true once the main process has been reaped.
    pub exited: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// A native execution backend (direct children today; systemd units later).
pub trait NativeBackend: Send + Sync {
    /// "direct" or "systemd", as the `NativeBackend` property shows it.
    fn kind(&self) -> &'static str;
    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError>;
    /// Stops the process and everything it started; resolves once the main process is gone.
    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()>;
}
