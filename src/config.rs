//! The daemon config (`modvisor.toml`): strict parsing, validated once into [`Config`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::manifest::units::parse_duration;
use crate::manifest::{Containment, ManifestError, Mode};
use crate::policy::Policy;

pub const DEFAULT_CONFIG: &str = "/etc/modvisor/modvisor.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeBackendChoice {
    Auto,
    Systemd,
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusChoice {
    /// The system bus when it lets us own `org.modvisor1`, else the embedded bus.
    Auto,
    System,
    /// A private dbus-daemon the daemon starts, at `RUNTIME/bus`.
    Embedded,
}

/// Validated daemon settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub modules: Vec<PathBuf>,
    pub state: PathBuf,
    pub runtime: PathBuf,
    pub policy: Policy,
    pub container_socket: String,
    pub native_backend: NativeBackendChoice,
    pub monitor_interval: Duration,
    pub ram_warn_percent: u8,
    pub vram_warn_percent: u8,
    pub nvml_library: String,
    pub module_log_dir: Option<PathBuf>,
    /// Rotate per-module log files at this size.
    pub module_log_max_bytes: u64,
    pub bus: BusChoice,
    pub bus_address: Option<String>,
    /// Refuse manifests (and directories) that anyone but root can change (when running as root).
    pub manifest_trust_check: bool,
    /// `[containers]`: what untrusted modules' containers may mount read-write.
    pub containment: Containment,
    /// `[metrics] listen`: where `GET /metrics` is served; None (the default): not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// The model store (`[models]`).
    pub models: ModelsConfig,
    /// `[admission]`: memory-aware admission and eviction.
    pub admission: crate::admission::AdmissionConfig,
}

/// `[models]`: where pulled models live and how much they may take.
#[derive(Debug, Clone, Default)]
pub struct ModelsConfig {
    /// The store directory; `None`: `STATE/models`.
    pub store: Option<PathBuf>,
    /// Refuse a pull that would take the store past this many bytes.
    pub max_disk: Option<u64>,
    /// A pull larger than this needs an explicit confirmation (`--yes`).
    pub confirm_above: Option<u64>,
    /// The Ollama registry (`http://` only on loopback); default `https://registry.ollama.ai`.
    pub ollama_registry: Option<String>,
    /// The unprivileged user the fetcher runs as; default `modvisor-engine`, else `nobody`.
    pub fetch_user: Option<String>,
    /// The Hugging Face endpoint; default `https://huggingface.co`.
    pub hf_endpoint: Option<String>,
    /// A file with a Hugging Face token (root-owned, mode 0600 or stricter).
    pub hf_token_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            modules: vec![
                "/usr/lib/modvisor/modules.d".into(),
                "/etc/modvisor/modules.d".into(),
                "/run/modvisor/modules.d".into(),
            ],
            state: "/var/lib/modvisor".into(),
            runtime: "/run/modvisor".into(),
            policy: Policy::default(),
            container_socket: String::new(),
            native_backend: NativeBackendChoice::Auto,
            monitor_interval: Duration::from_secs(5),
            ram_warn_percent: 85,
            vram_warn_percent: 85,
            nvml_library: String::new(),
            module_log_dir: None,
            module_log_max_bytes: 10 << 20,
            bus: BusChoice::Auto,
            bus_address: None,
            manifest_trust_check: true,
            containment: Containment::default(),
            metrics_listen: None,
            models: ModelsConfig::default(),
            admission: crate::admission::AdmissionConfig::default(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    paths: Option<RawPaths>,
    runtime: Option<RawRuntime>,
    monitor: Option<RawMonitor>,
    logging: Option<RawLogging>,
    dbus: Option<RawDbus>,
    containers: Option<RawContainers>,
    metrics: Option<RawMetrics>,
    models: Option<RawModels>,
    admission: Option<crate::admission::config::RawAdmission>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    store: Option<String>,
    max_disk: Option<Spanned<String>>,
    confirm_above: Option<Spanned<String>>,
    ollama_registry: Option<String>,
    fetch_user: Option<String>,
    hf_endpoint: Option<String>,
    hf_token_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    modules: Option<Vec<String>>,
    manifest_trust_check: Option<bool>,
    state: Option<String>,
    runtime: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Native,
    Container,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawBackend {
    Auto,
    Systemd,
    Direct,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    default_mode: Option<RawMode>,
    allowed_modes: Option<Vec<RawMode>>,
    docker_enabled: Option<bool>,
    native_enabled: Option<bool>,
    container_socket: Option<String>,
    native_backend: Option<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    interval: Option<Spanned<String>>,
    ram_warn_percent: Option<Spanned<u8>>,
    vram_warn_percent: Option<Spanned<u8>>,
    nvml_library: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    module_log_dir: Option<String>,
    module_log_max_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawBus {
    Auto,
    System,
    Embedded,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDbus {
    bus: Option<RawBus>,
    address: Option<String>,
}

// ---------------------------------------------------------------- [containers]

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContainers {
    writable_volumes: Option<Vec<Spanned<String>>>,
}

/// `[containers] writable_volumes`: absolute host directories (no `..`).
fn containment(raw: RawContainers, path: &Path, src: &str) -> Result<Containment, ManifestError> {
    let mut c = Containment::default();
    if let Some(list) = raw.writable_volumes {
        c.writable_volumes = Vec::new();
        for d in list {
            let p = Path::new(d.get_ref());
            let clean = p.is_absolute()
                && !p
                    .components()
                    .any(|x| matches!(x, std::path::Component::ParentDir));
            if !clean || p == Path::new("/") {
                return Err(ManifestError::at(
                    path,
                    src,
                    d.span().start,
                    format!(
                        "containers.writable_volumes: expected an absolute directory other than /, found \"{}\"",
                        d.get_ref()
                    ),
                ));
            }
            c.writable_volumes.push(p.to_path_buf());
        }
    }
    Ok(c)
}

#[cfg(test)]
mod containers_tests {
    use super::*;

    #[test]
    fn writable_volumes() {
        let c = Config::parse(
            Path::new("c.toml"),
            "[containers]\nwritable_volumes = [\"/srv/rw\", \"/var/lib/modvisor\"]\n",
        )
        .expect("valid");
        assert_eq!(
            c.containment.writable_volumes,
            vec![PathBuf::from("/srv/rw"), PathBuf::from("/var/lib/modvisor")]
        );
        assert_eq!(
            Config::parse(Path::new("c.toml"), "")
                .expect("valid")
                .containment,
            Containment::default()
        );
        for bad in ["\"/\"", "\"rel\"", "\"/a/../etc\""] {
            let src = format!("[containers]\nwritable_volumes = [{bad}]\n");
            let e = Config::parse(Path::new("c.toml"), &src).expect_err(bad);
            assert_eq!((e.line, e.column), (2, 21), "{e}");
        }
    }
}

// ----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

/// `[metrics] listen`: `"IP:PORT"` as written (a non-loopback address only when written out),
/// `":PORT"` for 127.0.0.1, `""` for off. No host names: nothing is resolved to pick where
/// the daemon listens.
fn metrics_listen(cx: &Ctx<'_>, v: &Spanned<String>) -> Result<Option<SocketAddr>, ManifestError> {
    let text = v.get_ref().trim();
    let at = v.span().start;
    let addr = if text.is_empty() {
        return Ok(None);
    } else if let Some(port) = text.strip_prefix(':') {
        port.parse::<u16>()
            .ok()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
    } else {
        text.parse::<SocketAddr>().ok()
    };
    match addr {
        Some(a) if a.port() != 0 => Ok(Some(a)),
        Some(_) => cx.err(at, "metrics.listen: expected a port from 1 to 65535".into()),
        None => cx.err(
            at,
            format!(
                "metrics.listen: expected an address such as \"127.0.0.1:9184\", \"[::1]:9184\" or \":9184\" (loopback), found \"{}\"",
                v.get_ref()
            ),
        ),
    }
}

fn mode(m: RawMode) -> Mode {
    match m {
        RawMode::Native => Mode::Native,
        RawMode::Container => Mode::Container,
    }
}

/// Longest `monitor.interval` (as written in errors): past far larger values a timer's deadline
/// overflows the clock and panics; a day is already longer than any sampling needs.
const MAX_INTERVAL: (Duration, &str) = (Duration::from_secs(86_400), "1d");
/// Smallest rotation size of per-module log files.
const MIN_LOG_BYTES: u64 = 4096;

/// The file being parsed, for errors at a value's position.
struct Ctx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl Ctx<'_> {
    fn err<T>(&self, offset: usize, msg: String) -> Result<T, ManifestError> {
        Err(ManifestError::at(self.path, self.src, offset, msg))
    }

    /// A duration that a timer runs on: more than zero (a zero period panics) and at most `max`.
    fn interval(
        &self,
        v: &Spanned<String>,
        key: &str,
        max: (Duration, &str),
    ) -> Result<Duration, ManifestError> {
        let at = v.span().start;
        match parse_duration(v.get_ref()) {
            Err(e) => self.err(at, format!("{key}: {e}")),
            Ok(d) if d.is_zero() => {
                self.err(at, format!("{key}: expected a duration greater than zero"))
            }
            Ok(d) if d > max.0 => self.err(
                at,
                format!(
                    "{key}: expected at most {}, found \"{}\"",
                    max.1,
                    v.get_ref()
                ),
            ),
            Ok(d) => Ok(d),
        }
    }

    fn monitor(&self, m: RawMonitor, c: &mut Config) -> Result<(), ManifestError> {
        if let Some(i) = &m.interval {
            c.monitor_interval = self.interval(i, "monitor.interval", MAX_INTERVAL)?;
        }
        for (v, slot, key) in [
            (
                m.ram_warn_percent,
                &mut c.ram_warn_percent,
                "monitor.ram_warn_percent",
            ),
            (
                m.vram_warn_percent,
                &mut c.vram_warn_percent,
                "monitor.vram_warn_percent",
            ),
        ] {
            if let Some(p) = v {
                if !(1..=100).contains(p.get_ref()) {
                    return self.err(
                        p.span().start,
                        format!(
                            "{key}: expected an integer from 1 to 100, found {}",
                            p.get_ref()
                        ),
                    );
                }
                *slot = *p.get_ref();
            }
        }
        if let Some(n) = m.nvml_library {
            c.nvml_library = n;
        }
        Ok(())
    }

    /// A size such as "100G"; "0" or "" means no limit.
    fn size(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<u64>, ManifestError> {
        let Some(v) = v else { return Ok(None) };
        if v.get_ref().trim().is_empty() {
            return Ok(None);
        }
        match crate::manifest::units::parse_size(v.get_ref()) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(e) => self.err(v.span().start, format!("{key}: {e}")),
        }
    }

    /// Rotating at zero bytes would rotate at every line.
    fn log_max_bytes(&self, n: &Spanned<u64>) -> Result<u64, ManifestError> {
        let v = *n.get_ref();
        if v < MIN_LOG_BYTES {
            return self.err(
                n.span().start,
                format!(
                    "logging.module_log_max_bytes: expected at least {MIN_LOG_BYTES}, found {v}"
                ),
            );
        }
        Ok(v)
    }

    /// `[logging]`.
    fn logging(&self, l: RawLogging, base: &Path, c: &mut Config) -> Result<(), ManifestError> {
        if let Some(d) = l.module_log_dir.filter(|d| !d.is_empty()) {
            c.module_log_dir = Some(resolve(base, &d));
        }
        if let Some(n) = l.module_log_max_bytes {
            c.module_log_max_bytes = self.log_max_bytes(&n)?;
        }
        Ok(())
    }

    /// `[models]`.
    fn models(&self, m: RawModels, base: &Path) -> Result<ModelsConfig, ManifestError> {
        Ok(ModelsConfig {
            store: m.store.filter(|s| !s.is_empty()).map(|s| resolve(base, &s)),
            max_disk: self.size(&m.max_disk, "models.max_disk")?,
            confirm_above: self.size(&m.confirm_above, "models.confirm_above")?,
            ollama_registry: m.ollama_registry.filter(|s| !s.is_empty()),
            fetch_user: m.fetch_user.filter(|s| !s.is_empty()),
            hf_endpoint: m.hf_endpoint.filter(|s| !s.is_empty()),
            hf_token_file: m
                .hf_token_file
                .filter(|s| !s.is_empty())
                .map(|s| resolve(base, &s)),
        })
    }
}

/// A path as written in the config file: relative paths are relative to the file (so a
/// checkout's config/ works from anywhere).
fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    if p.is_absolute() { p } else { base.join(p) }
}

/// `[paths]`.
fn paths(p: RawPaths, base: &Path, c: &mut Config) {
    if let Some(t) = p.manifest_trust_check {
        c.manifest_trust_check = t;
    }
    if let Some(m) = p.modules {
        c.modules = m.iter().map(|s| resolve(base, s)).collect();
    }
    if let Some(s) = p.state {
        c.state = resolve(base, &s);
    }
    if let Some(r) = p.runtime {
        c.runtime = resolve(base, &r);
    }
}

/// `[runtime]`.
fn runtime(r: RawRuntime, c: &mut Config) {
    if let Some(d) = r.default_mode {
        c.policy.default_mode = mode(d);
    }
    if let Some(a) = r.allowed_modes {
        c.policy.allowed_modes = a.into_iter().map(mode).collect();
    }
    if let Some(b) = r.docker_enabled {
        c.policy.docker_enabled = b;
    }
    if let Some(b) = r.native_enabled {
        c.policy.native_enabled = b;
    }
    if let Some(s) = r.container_socket {
        c.container_socket = s;
    }
    if let Some(b) = r.native_backend {
        c.native_backend = match b {
            RawBackend::Auto => NativeBackendChoice::Auto,
            RawBackend::Systemd => NativeBackendChoice::Systemd,
            RawBackend::Direct => NativeBackendChoice::Direct,
        };
    }
}

/// `[dbus]`.
fn dbus(d: RawDbus, c: &mut Config) {
    if let Some(b) = d.bus {
        c.bus = match b {
            RawBus::Auto => BusChoice::Auto,
            RawBus::System => BusChoice::System,
            RawBus::Embedded => BusChoice::Embedded,
        };
    }
    c.bus_address = d.address.filter(|a| !a.is_empty());
}

impl Config {
    /// Reads a config file. A missing file at the default path means defaults; any other
    /// missing or broken file is an error naming file:line:col.
    pub fn load(path: Option<&Path>) -> Result<Config, ManifestError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        // Absolute, so relative paths in it resolve the same whatever the working directory.
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        match std::fs::read_to_string(&path) {
            Ok(src) => Config::parse(&path, &src),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(ManifestError {
                path,
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    pub fn parse(path: &Path, src: &str) -> Result<Config, ManifestError> {
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            ManifestError::at(
                path,
                src,
                e.span().map(|s| s.start).unwrap_or(0),
                e.message().trim().to_string(),
            )
        })?;
        let mut c = Config::default();
        let base = path.parent().unwrap_or(Path::new("/"));
        if let Some(p) = raw.paths {
            paths(p, base, &mut c);
        }
        if let Some(r) = raw.runtime {
            runtime(r, &mut c);
        }
        let cx = Ctx { path, src };
        if let Some(m) = raw.monitor {
            cx.monitor(m, &mut c)?;
        }
        if let Some(l) = raw.logging {
            cx.logging(l, base, &mut c)?;
        }
        if let Some(d) = raw.dbus {
            dbus(d, &mut c);
        }
        if let Some(k) = raw.containers {
            c.containment = containment(k, path, src)?;
        }
        if let Some(l) = raw.metrics.and_then(|m| m.listen) {
            c.metrics_listen = metrics_listen(&cx, &l)?;
        }
        if let Some(a) = raw.admission {
            c.admission = a.validate(path, src)?;
        }
        if let Some(m) = raw.models {
            c.models = cx.models(m, base)?;
        }
        Ok(c)
    }

    /// The model store directory.
    pub fn models_store(&self) -> PathBuf {
        self.models
            .store
            .clone()
            .unwrap_or_else(|| self.state.join("models"))
    }

    /// The socket path of the embedded bus.
    pub fn embedded_bus_path(&self) -> PathBuf {
        self.runtime.join("bus")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_contract_example() {
        let src = r#"
[paths]
modules = ["/a", "rel"]
state = "/var/lib/modvisor"
runtime = "/run/modvisor"
[runtime]
default_mode = "native"
allowed_modes = ["native"]
docker_enabled = false
native_backend = "direct"
[monitor]
interval = "2s"
ram_warn_percent = 90
[logging]
module_log_dir = "/var/log/modvisor"
"#;
        let c = Config::parse(Path::new("/etc/x/modvisor.toml"), src).expect("valid");
        assert_eq!(
            c.modules,
            vec![PathBuf::from("/a"), PathBuf::from("/etc/x/rel")]
        );
        assert_eq!(c.policy.default_mode, Mode::Native);
        assert!(!c.policy.docker_enabled);
        assert_eq!(c.native_backend, NativeBackendChoice::Direct);
        assert_eq!(c.monitor_interval, Duration::from_secs(2));
        assert_eq!(c.ram_warn_percent, 90);
    }

    #[test]
    fn the_shipped_default_config_parses_to_the_defaults() {
        let src = include_str!("../config/modvisor.toml");
        let c = Config::parse(Path::new("/etc/modvisor/modvisor.toml"), src).expect("valid");
        let d = Config::default();
        assert_eq!(c.modules, d.modules);
        assert_eq!((c.state, c.runtime), (d.state, d.runtime));
        assert_eq!(c.policy, d.policy);
        assert_eq!(c.monitor_interval, d.monitor_interval);
        assert!(c.module_log_dir.is_none() && c.manifest_trust_check);
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let e = Config::parse(Path::new("c.toml"), "[runtime]\nnative_backnd = \"x\"\n")
            .expect_err("invalid");
        assert_eq!((e.line, e.column), (2, 1));
        assert!(
            e.message.contains("unknown field `native_backnd`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_given_file_is_error() {
        assert!(Config::load(Some(Path::new("/nonexistent/modvisor.toml"))).is_err());
    }

    fn error(src: &str) -> String {
        Config::parse(Path::new("/etc/modvisor/modvisor.toml"), src)
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn a_zero_monitor_interval_is_an_error_at_its_value() {
        for zero in ["0s", "0", "0ms", "0h0m"] {
            assert_eq!(
                error(&format!(
                    "[monitor]\nram_warn_percent = 80\ninterval = \"{zero}\"\n"
                )),
                "/etc/modvisor/modvisor.toml:3:12: monitor.interval: expected a duration greater than zero",
                "{zero}"
            );
        }
    }

    #[test]
    fn a_monitor_interval_past_a_day_or_unreadable_is_an_error() {
        assert_eq!(
            error("[monitor]\ninterval = \"200000000000000d\"\n"),
            "/etc/modvisor/modvisor.toml:2:12: monitor.interval: expected at most 1d, found \"200000000000000d\""
        );
        assert_eq!(
            error("[monitor]\ninterval = \"soon\"\n"),
            "/etc/modvisor/modvisor.toml:2:12: monitor.interval: expected a duration such as \"5s\", \"500ms\" or \"10m\", found \"soon\""
        );
        let c =
            Config::parse(Path::new("c.toml"), "[monitor]\ninterval = \"1d\"\n").expect("valid");
        assert_eq!(c.monitor_interval, Duration::from_secs(86_400));
    }

    #[test]
    fn module_log_files_rotate_at_no_less_than_4096_bytes() {
        assert_eq!(
            error("[logging]\nmodule_log_max_bytes = 0\n"),
            "/etc/modvisor/modvisor.toml:2:24: logging.module_log_max_bytes: expected at least 4096, found 0"
        );
        assert_eq!(
            error("[logging]\nmodule_log_max_bytes = 4095\n"),
            "/etc/modvisor/modvisor.toml:2:24: logging.module_log_max_bytes: expected at least 4096, found 4095"
        );
        let c = Config::parse(
            Path::new("c.toml"),
            "[logging]\nmodule_log_max_bytes = 4096\n",
        )
        .expect("valid");
        assert_eq!(c.module_log_max_bytes, 4096);
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_unless_an_address_is_written() {
        assert_eq!(Config::default().metrics_listen, None);
        let listen = |v: &str| {
            Config::parse(
                Path::new("c.toml"),
                &format!("[metrics]\nlisten = \"{v}\"\n"),
            )
            .map(|c| c.metrics_listen.map(|a| a.to_string()))
        };
        assert_eq!(listen("").expect("valid"), None);
        assert_eq!(
            listen(":9184").expect("valid").as_deref(),
            Some("127.0.0.1:9184")
        );
        assert_eq!(
            listen("127.0.0.1:9184").expect("valid").as_deref(),
            Some("127.0.0.1:9184")
        );
        assert_eq!(
            listen("[::1]:9184").expect("valid").as_deref(),
            Some("[::1]:9184")
        );
        assert_eq!(
            listen("0.0.0.0:9184").expect("valid").as_deref(),
            Some("0.0.0.0:9184")
        );
        let c = Config::parse(Path::new("c.toml"), "[metrics]\n").expect("valid");
        assert_eq!(c.metrics_listen, None);
    }

    #[test]
    fn a_metrics_address_that_is_a_name_or_port_zero_is_an_error_at_its_value() {
        assert_eq!(
            error("[metrics]\nlisten = \"localhost:9184\"\n"),
            "/etc/modvisor/modvisor.toml:2:10: metrics.listen: expected an address such as \"127.0.0.1:9184\", \"[::1]:9184\" or \":9184\" (loopback), found \"localhost:9184\""
        );
        assert_eq!(
            error("[metrics]\nlisten = \":0\"\n"),
            "/etc/modvisor/modvisor.toml:2:10: metrics.listen: expected a port from 1 to 65535"
        );
        assert!(error("[metrics]\nlisten = \"9184\"\n").contains("expected an address"));
        assert!(error("[metrics]\nport = 1\n").contains("unknown field `port`"));
    }

    #[test]
    fn warn_percentages_outside_1_to_100_are_errors_at_their_value() {
        assert_eq!(
            error("[monitor]\nvram_warn_percent = 0\n"),
            "/etc/modvisor/modvisor.toml:2:21: monitor.vram_warn_percent: expected an integer from 1 to 100, found 0"
        );
    }
}
