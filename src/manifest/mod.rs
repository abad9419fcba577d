//! Module manifests: strict parsing into raw types, validation into the trusted [`Module`]
//! type, and loading from the drop-in directories with precedence and masking.

mod containment;
mod load;
mod raw;
mod render;
mod serve;
mod text;
mod trust;
pub mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use containment::{Containment, UNTRUSTED_CAPS};
pub use load::{
    LoadResult, ManifestSource, load_dirs, load_dirs_checked, load_dirs_with, scan_dirs, untrusted,
};
pub use render::{Exec, substitute};
pub use trust::acl_write_entry;
pub use validate::{parse_manifest, parse_manifest_with, validate_name};

/// A container's process limit when the manifest sets none.
pub const DEFAULT_PIDS_LIMIT: u32 = 4096;

/// An execution mode of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Native,
    Container,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Container => "container",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "native" => Some(Mode::Native),
            "container" => Some(Mode::Container),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the native mode runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeExec {
    /// A command modvisor starts itself (direct child or transient unit).
    Command {
        argv: Vec<String>,
        environment: BTreeMap<String, String>,
        working_directory: Option<PathBuf>,
        user: Option<String>,
    },
    /// An existing systemd unit, started/stopped/observed, never duplicated.
    Unit(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    All,
    Count(u32),
    Ids(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    Never,
    Missing,
}

/// A published port: host address, host port, container port, protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMap {
    pub host_ip: String,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub image: String,
    pub command: Vec<String>,
    pub ports: Vec<PortMap>,
    pub volumes: Vec<Volume>,
    pub environment: BTreeMap<String, String>,
    pub gpus: Option<Gpus>,
    pub pull: Pull,
    /// The engine's network mode ("host", "none", "bridge", a network name); None: the engine's default.
    pub network: Option<String>,
    /// Capabilities kept; all others are dropped.
    pub cap_add: Vec<String>,
    /// The most processes (and threads) the container may have (its pids cgroup).
    pub pids_limit: u32,
    /// The user the engine runs as inside ("name", "uid", "uid:gid"); None: the image's.
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub default: Option<PathBuf>,
    pub directory: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http { url: String, expect: Option<String> },
    Tcp { address: String },
    Exec { argv: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub probe: Option<Probe>,
    pub interval: Duration,
    pub timeout: Duration,
    /// How long a start may go without progress (memory growing, the probe's answer
    /// changing) before it is cut off.
    pub start_timeout: Duration,
    /// How long a start may take at most, progress or not.
    pub start_limit: Duration,
    pub failures: u32,
    pub successes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    pub memory_max: Option<u64>,
    pub vram: Option<u64>,
    pub ram_warn_percent: Option<u8>,
    pub vram_warn_percent: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    pub delay: Duration,
    pub max: u32,
    pub window: Duration,
}

/// `[serve]`: modvisord listens on `listen` and forwards each connection to `upstream`, where
/// the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSpec {
    pub listen: Vec<std::net::SocketAddr>,
    pub upstream: std::net::SocketAddr,
    /// Not started at boot: the first connection starts it.
    pub on_demand: bool,
    /// Stopped after this long with no open connection.
    pub idle_stop: Option<Duration>,
    /// Connections held while the engine starts; more are refused.
    pub max_pending: u32,
}

/// A validated module: everything downstream of `manifest` works with this type only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub trusted: bool,
    /// The modes the module can run as, `preferred` first.
    pub modes: Vec<Mode>,
    pub preferred: Option<Mode>,
    pub stop_timeout: Duration,
    pub native: Option<NativeExec>,
    pub container: Option<ContainerSpec>,
    pub model: Option<ModelSpec>,
    pub health: HealthSpec,
    pub resources: Resources,
    pub restart: RestartSpec,
    /// The module's public address, owned by modvisord (start on demand, stop when idle).
    pub serve: Option<ServeSpec>,
    /// The file the module came from.
    pub source: PathBuf,
}

impl Module {
    /// True when what the module runs differs (a restart is needed); description-only or
    /// `enabled` changes do not restart a running module.
    pub fn run_spec_differs(&self, other: &Module) -> bool {
        self.modes != other.modes
            || self.native != other.native
            || self.container != other.container
            || self.model != other.model
            || self.resources.memory_max != other.resources.memory_max
            || self.trusted != other.trusted
            || self.serve.as_ref().map(|s| s.upstream) != other.serve.as_ref().map(|s| s.upstream)
    }
}

/// A manifest error with its position. Displayed as `FILE:LINE:COL: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for ManifestError {}

impl ManifestError {
    pub fn at(path: &Path, src: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_col(src, offset);
        ManifestError {
            path: path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
