//! Module manifests: strict parsing into raw types, validation into the trusted [`Module`]
//! type, and loading from the drop-in directories with precedence and masking.

mod container;
mod containment;
mod ctx;
mod gpus;
mod health;
mod load;
mod native;
pub mod probe;
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
// One per manifest, moved rarely: the size of the Command variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeExec {
    /// A command modvisor starts itself (direct child or transient unit).
    Command {
        argv: Vec<String>,
        environment: BTreeMap<String, String>,
        working_directory: Option<PathBuf>,
        privileges: Privileges,
    },
    /// An existing systemd unit, started/stopped/observed, never duplicated.
    Unit(String),
}

/// The user native engines run as when the manifest names none (created by the package's
/// sysusers.d file, a member of `video` and `render`).
pub const DEFAULT_ENGINE_USER: &str = "modvisor-engine";

/// Who a native engine runs as, what it may see and its secrets: `[native] user`, `group`,
/// `environment_file`, `credentials`, `sandbox`, `gpu`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Privileges {
    /// None: [`DEFAULT_ENGINE_USER`]. Root only when the manifest says `user = "root"`.
    pub user: Option<String>,
    /// None: the user's primary group.
    pub group: Option<String>,
    /// A root-owned file (mode 0600 or stricter) of `KEY=VALUE` lines: systemd's
    /// `EnvironmentFile=` (units), read by modvisord (direct children).
    pub environment_file: Option<PathBuf>,
    /// Credential name -> root-owned file: `LoadCredential=` (units), a private copy under
    /// `$CREDENTIALS_DIRECTORY` (direct children).
    pub credentials: BTreeMap<String, PathBuf>,
    pub sandbox: Sandbox,
    /// The engine uses NVIDIA GPUs: their device nodes stay visible (`PrivateDevices=no`,
    /// `DeviceAllow=` the NVIDIA devices only).
    pub gpu: bool,
    /// `gpus`: which GPUs the engine sees (`CUDA_VISIBLE_DEVICES`); `"any"`: the one
    /// admission picks at each start. Implies `gpu`.
    pub gpus: Option<Gpus>,
    /// Not a key: `model.directory` (or the default model's directory), mounted read-only
    /// into the engine's unit (`ReadOnlyPaths=`).
    pub model_directory: Option<PathBuf>,
}

impl Privileges {
    /// The user name the engine runs as.
    pub fn user_name(&self) -> &str {
        self.user.as_deref().unwrap_or(DEFAULT_ENGINE_USER)
    }

    /// True only for an explicit `user = "root"` (numeric names are refused by validation;
    /// the backends refuse another name that resolves to uid 0).
    pub fn runs_as_root(&self) -> bool {
        self.user_name() == "root"
    }

    /// One line for `explain`: who the engine runs as and what of its sandbox is relaxed.
    pub fn describe(&self) -> String {
        let who = match (&self.user, &self.group) {
            (None, _) => format!("{DEFAULT_ENGINE_USER} (the default engine user)"),
            (Some(u), _) if u == "root" => {
                "root (explicit user = \"root\": the engine and every model it parses run with full privileges)".to_string()
            }
            (Some(u), None) => u.clone(),
            (Some(u), Some(g)) => format!("{u}, group {g}"),
        };
        let relaxed = self.sandbox.relaxed();
        let sandbox = if relaxed.is_empty() {
            "full sandbox".to_string()
        } else {
            format!("sandbox relaxed: {}", relaxed.join(", "))
        };
        let gpu = if self.gpu {
            ", NVIDIA devices allowed"
        } else {
            ""
        };
        format!("runs as {who}; {sandbox}{gpu}")
    }
}

/// The transient unit's sandbox: every setting on unless the manifest relaxes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sandbox {
    pub no_new_privileges: bool,
    pub protect_system: bool,
    pub protect_home: bool,
    pub private_tmp: bool,
    pub private_devices: bool,
    pub restrict_suid_sgid: bool,
    pub lock_personality: bool,
    pub protect_kernel_modules: bool,
    pub protect_kernel_tunables: bool,
    pub protect_kernel_logs: bool,
    pub protect_control_groups: bool,
    /// `CapabilityBoundingSet=` empty.
    pub drop_capabilities: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            no_new_privileges: true,
            protect_system: true,
            protect_home: true,
            private_tmp: true,
            private_devices: true,
            restrict_suid_sgid: true,
            lock_personality: true,
            protect_kernel_modules: true,
            protect_kernel_tunables: true,
            protect_kernel_logs: true,
            protect_control_groups: true,
            drop_capabilities: true,
        }
    }
}

impl Sandbox {
    /// The manifest names of the settings it relaxes ("protect_home", ...), for `explain`.
    pub fn relaxed(&self) -> Vec<&'static str> {
        let s = self;
        [
            ("no_new_privileges", s.no_new_privileges),
            ("protect_system", s.protect_system),
            ("protect_home", s.protect_home),
            ("private_tmp", s.private_tmp),
            ("private_devices", s.private_devices),
            ("restrict_suid_sgid", s.restrict_suid_sgid),
            ("lock_personality", s.lock_personality),
            ("protect_kernel_modules", s.protect_kernel_modules),
            ("protect_kernel_tunables", s.protect_kernel_tunables),
            ("protect_kernel_logs", s.protect_kernel_logs),
            ("protect_control_groups", s.protect_control_groups),
            ("drop_capabilities", s.drop_capabilities),
        ]
        .into_iter()
        .filter(|(_, on)| !on)
        .map(|(n, _)| n)
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpus {
    All,
    /// One GPU, the one with the most free memory that fits (chosen by admission).
    Any,
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
    /// A root-owned file (mode 0600 or stricter) of `KEY=VALUE` lines, read by modvisord at
    /// each container creation: secrets that stay out of the manifest and of D-Bus.
    pub environment_file: Option<PathBuf>,
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
    /// Eviction order: lower priorities are evicted first (default 0).
    pub priority: i32,
    /// Never evicted to make room for another module.
    pub pinned: bool,
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
    /// The wait before the first restart of a budget; each next one waits twice as long, up
    /// to `max_delay`.
    pub delay: Duration,
    pub max_delay: Duration,
    pub max: u32,
    pub window: Duration,
}

/// `[serve]`: modvisord listens on `listen` and forwards each connection to `upstream`, where
/// the engine listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeSpec {
    pub listen: Vec<ServeAddr>,
    pub upstream: ServeAddr,
    /// Not started at boot: the first connection starts it.
    pub on_demand: bool,
    /// Stopped after this long with no open connection.
    pub idle_stop: Option<Duration>,
    /// Connections held while the engine starts; more are refused.
    pub max_pending: u32,
}

/// An address of `[serve]`: TCP ("127.0.0.1:8080", "[::1]:8080") or a Unix socket
/// ("unix:/run/llama/chat.sock", or an absolute path).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServeAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for ServeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeAddr::Tcp(a) => write!(f, "{a}"),
            ServeAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for ServeAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let path = s.strip_prefix("unix:").or(s.starts_with('/').then_some(s));
        let Some(p) = path else {
            return s.parse().map(ServeAddr::Tcp).map_err(|_| {
                "expected an address with a port, such as \"127.0.0.1:8080\" or \"[::1]:8080\", or a Unix socket such as \"unix:/run/llama/chat.sock\"".to_string()
            });
        };
        // sun_path holds 108 bytes with the terminating NUL.
        if !p.starts_with('/') || p.len() > 107 || p.contains('\0') || p.ends_with('/') {
            return Err(format!(
                "expected an absolute socket path of at most 107 bytes, found \"{p}\""
            ));
        }
        Ok(ServeAddr::Unix(PathBuf::from(p)))
    }
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
            || self.serve.as_ref().map(|s| &s.upstream) != other.serve.as_ref().map(|s| &s.upstream)
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
