//! Test harness: a private real `dbus-daemon` configured like a system bus with the shipped
//! policy file, and a real `modvisord` serving on it, with temp manifest/state/runtime dirs.
//! Every wait is event-driven (bus signals) and bounded by an explicit timeout.
#![allow(dead_code)]

pub mod bus;
pub mod engine_user;
pub mod engines;
pub mod sysmgr;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use modvisor::dbus::client::{ManagerProxy, ModuleProxy};
use zbus::Connection;

/// The soft limit on open files systemd gives a service: test daemons start with it.
pub const SERVICE_NOFILE: u64 = 1024;

pub use bus::Bus;
use zbus::proxy::CacheProperties;

pub const T: Duration = Duration::from_secs(20);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running modvisord with its own directories.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub modules: PathBuf,
    pub config: PathBuf,
    pub bus: Bus,
    pub conn: Connection,
    pub extra_config: String,
}

pub struct Options {
    pub extra_config: String,
    pub env: Vec<(String, String)>,
    /// native_backend: "direct" (the default here) or "systemd".
    pub backend: &'static str,
    /// More keys for the config's [runtime] table.
    pub runtime_extra: String,
    /// `[monitor] interval` (default 1s).
    pub monitor_interval: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_config: String::new(),
            env: Vec::new(),
            backend: "direct",
            runtime_extra: String::new(),
            monitor_interval: "1s",
        }
    }
}

impl Daemon {
    /// Starts modvisord with the given manifests already in place; returns once it owns its name.
    pub async fn start(manifests: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(manifests, Options::default()).await
    }

    pub async fn start_with(manifests: &[(&str, &str)], opts: Options) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("modules.d");
        std::fs::create_dir_all(&modules).expect("mkdir");
        for (name, text) in manifests {
            std::fs::write(modules.join(format!("{name}.toml")), root_engine(text))
                .expect("write manifest");
        }
        let config = dir.path().join("modvisor.toml");
        let cfg = format!(
            "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\ndefault_mode = \"native\"\nnative_backend = \"{}\"\n{}[monitor]\ninterval = \"{}\"\n{}",
            modules.display(),
            dir.path().join("state").display(),
            dir.path().join("run").display(),
            opts.backend,
            opts.runtime_extra,
            opts.monitor_interval,
            opts.extra_config
        );
        std::fs::write(&config, cfg).expect("write config");
        let bus = Bus::start();
        let conn = bus.connect().await;
        let mut d = Daemon {
            child: None,
            dir,
            modules,
            config,
            bus,
            conn,
            extra_config: opts.extra_config.clone(),
        };
        d.spawn(&opts.env).await;
        d
    }

    /// (Re)starts the modvisord process and waits until it owns org.modvisor1.
    pub async fn spawn(&mut self, env: &[(String, String)]) {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn)
            .await
            .expect("dbus proxy");
        let mut owners = dbus
            .receive_name_owner_changed()
            .await
            .expect("subscribe NameOwnerChanged");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("modvisord.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modvisord"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--bus-address")
            .arg(&self.bus.address)
            .env("MODVISOR_LOG_STDERR", "1")
            .env(
                "MODVISOR_LOG",
                "debug,bollard=info,hyper=info,hyper_util=info,zbus=info",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // As systemd starts a service: a soft limit of 1024 open files (modvisord raises it
        // for itself and gives its children this one back).
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .expect("getrlimit");
        let soft = SERVICE_NOFILE.min(hard);
        // SAFETY: only setrlimit (async-signal-safe, no allocation) between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    soft,
                    hard,
                )
                .map_err(std::io::Error::from)
            });
        }
        self.child = Some(cmd.spawn().expect("spawn modvisord"));
        let name = zbus::names::BusName::try_from("org.modvisor1").expect("name");
        if dbus.name_has_owner(name).await.unwrap_or(false) {
            return;
        }
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, owners.next()).await {
                Ok(Some(sig)) => {
                    if let Ok(a) = sig.args()
                        && a.name().as_str() == "org.modvisor1"
                        && a.new_owner().is_some()
                    {
                        return;
                    }
                }
                _ => panic!(
                    "modvisord did not take org.modvisor1 within {T:?}; log:\n{}",
                    self.log()
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("modvisord.log")).unwrap_or_default()
    }

    pub async fn manager(&self) -> ManagerProxy<'static> {
        ManagerProxy::builder(&self.conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .expect("manager proxy")
    }

    pub async fn module(&self, name: &str) -> ModuleProxy<'static> {
        ModuleProxy::builder(&self.conn)
            .path(modvisor::dbus::module_path(name))
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .expect("module proxy")
    }

    pub fn write_manifest(&self, name: &str, text: &str) {
        // Write then rename, as an admin's editor or config management would.
        let tmp = self.modules.join(format!(".{name}.toml.tmp"));
        std::fs::write(&tmp, root_engine(text)).expect("write");
        std::fs::rename(&tmp, self.modules.join(format!("{name}.toml"))).expect("rename");
    }

    /// `kill -9` of modvisord (waits until it is gone).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("modvisord did not stop within 20s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the module satisfies `pred` (checked at once and after every ModuleChanged
    /// signal), bounded by `timeout`. Returns the last (state, health, reason).
    pub async fn wait_module(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&str, &str, &str) -> bool,
    ) -> (String, String, String) {
        let m = self.manager().await;
        let mut changes = m
            .receive_module_changed()
            .await
            .expect("subscribe ModuleChanged");
        let deadline = Instant::now() + timeout;
        let mut last = (String::new(), String::new(), String::new());
        loop {
            if let Ok(rows) = m.list_modules().await {
                if let Some(r) = rows.iter().find(|r| r.0 == name) {
                    last = (r.2.clone(), r.3.clone(), r.4.clone());
                    if pred(&r.2, &r.3, &r.4) {
                        return last;
                    }
                } else {
                    last = ("(absent)".into(), String::new(), String::new());
                    if pred("(absent)", "", "") {
                        return last;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, changes.next()).await.is_err() {
                panic!(
                    "module {name}: condition not reached within {timeout:?}; last {last:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    pub async fn wait_state(&self, name: &str, state: &str) -> (String, String, String) {
        let s = state.to_string();
        self.wait_module(name, T, move |st, _, _| st == s).await
    }

    pub async fn wait_health(&self, name: &str, health: &str) -> (String, String, String) {
        let h = health.to_string();
        self.wait_module(name, T, move |_, he, _| he == h).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A native module manifest running `sh -c SCRIPT`.
pub fn sh_module(script: &str, extra: &str) -> String {
    root_engine(&format!(
        "trusted = true\n{extra}\n[native]\ncommand = [\"/bin/sh\", \"-c\", {}]\n",
        toml_str(script)
    ))
}

/// A manifest containing this line keeps the engine defaults (see [`root_engine`]).
pub const ENGINE_DEFAULTS: &str = "# engine defaults\n";

/// The suites written before engines ran unprivileged keep their engines as they were: root,
/// with the files of their temp directories (under /tmp, mode 0700) visible. Adds
/// `user = "root"` and relaxes PrivateTmp/ProtectSystem in a `[native]` command section that
/// names no user; everything else of the sandbox stays on. tests/privileges.rs and
/// tests/sysmgr.rs test the defaults (engine user, full sandbox).
pub fn root_engine(text: &str) -> String {
    if text.contains(ENGINE_DEFAULTS) {
        return text.to_string();
    }
    let Some(start) = text.find("[native]\n") else {
        return text.to_string();
    };
    let body = start + "[native]\n".len();
    let end = text[body..]
        .find("\n[")
        .map(|i| body + i)
        .unwrap_or(text.len());
    let section = &text[body..end];
    if !section.contains("command = [") || section.contains("user =") {
        return text.to_string();
    }
    format!(
        "{}user = \"root\"\nsandbox = {{ private_tmp = false, protect_system = false }}\n{}",
        &text[..body],
        &text[body..]
    )
}

pub fn toml_str(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}

/// Zombie children of `pid`.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    modvisor::procfs::all()
        .into_iter()
        .filter(|s| s.state == 'Z' && s.ppid == pid)
        .map(|s| s.pid)
        .collect()
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    modvisor::procfs::all()
        .into_iter()
        .filter(|s| s.pgrp == pgid as i32 && s.state != 'Z')
        .map(|s| s.pid)
        .collect()
}

/// Children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    modvisor::procfs::all()
        .into_iter()
        .filter(|s| s.ppid == pid)
        .map(|s| s.pid)
        .collect()
}

/// The module objects modvisord's ObjectManager lists on `conn`, sorted.
pub async fn managed_module_paths(conn: &Connection) -> Vec<String> {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination("org.modvisor1")
        .path("/org/modvisor1")
        .build()
        .await
        .expect("object manager");
    let objects = om.get_managed_objects().await.expect("GetManagedObjects");
    let mut paths: Vec<String> = objects
        .iter()
        .filter(|(_, ifaces)| ifaces.keys().any(|i| i.as_str() == "org.modvisor1.Module"))
        .map(|(p, _)| p.to_string())
        .collect();
    paths.sort();
    paths
}

/// Runs `cmd` and asserts it succeeded, showing its output when it did not.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

/// Stops and forgets units a test made, whatever happened (units outlive modvisord). Through
/// the manager's D-Bus API on the system bus, like modvisord itself.
pub struct Units(pub Vec<String>);

impl Drop for Units {
    fn drop(&mut self) {
        let m = [
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        ];
        for u in &self.0 {
            let _ = Command::new("busctl")
                .args([
                    "--system", "call", m[0], m[1], m[2], "StopUnit", "ss", u, "replace",
                ])
                .output();
            let _ = Command::new("busctl")
                .args([
                    "--system",
                    "call",
                    m[0],
                    m[1],
                    m[2],
                    "ResetFailedUnit",
                    "s",
                    u,
                ])
                .output();
        }
    }
}

/// modvisord on its embedded bus (no --bus-address), started the way an admin would, ready
/// when it says READY=1 on a NOTIFY_SOCKET of ours.
pub struct EmbeddedDaemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub run: PathBuf,
}

impl EmbeddedDaemon {
    pub fn start(manifests: &[(&str, &str)]) -> EmbeddedDaemon {
        EmbeddedDaemon::start_env(manifests, &[])
    }

    pub fn start_env(manifests: &[(&str, &str)], env: &[(&str, &str)]) -> EmbeddedDaemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        // Other users (the authorization tests) must reach the bus socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let modules = dir.path().join("modules.d");
        std::fs::create_dir_all(&modules).expect("mkdir");
        for (name, text) in manifests {
            std::fs::write(modules.join(format!("{name}.toml")), root_engine(text))
                .expect("write manifest");
        }
        let run = dir.path().join("run");
        let cfg = dir.path().join("modvisor.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\nnative_backend = \"direct\"\n[dbus]\nbus = \"embedded\"\n",
                modules.display(),
                dir.path().join("state").display(),
                run.display()
            ),
        )
        .expect("config");
        let notify = dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
        sock.set_read_timeout(Some(T)).expect("timeout");
        let log = std::fs::File::create(dir.path().join("modvisord.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_modvisord"))
            .arg("--config")
            .arg(&cfg)
            .env_remove("MODVISOR_BUS_ADDRESS")
            .env("NOTIFY_SOCKET", &notify)
            .env("MODVISOR_LOG_STDERR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn modvisord");
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).expect("READY=1 within the timeout");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        EmbeddedDaemon {
            child: Some(child),
            dir,
            run,
        }
    }

    pub fn address(&self) -> String {
        format!("unix:path={}", self.run.join("bus").display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("modvisord.log")).unwrap_or_default()
    }

    /// SIGTERM, bounded wait; true when it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EmbeddedDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The llama-server and tiny GGUF models built by engines/build-llama-server.sh (make test
/// builds them; `MODVISOR_TEST_LLAMA` overrides the cache directory). Fails when missing.
pub fn llama_dir() -> PathBuf {
    let d = PathBuf::from(
        std::env::var("MODVISOR_TEST_LLAMA")
            .unwrap_or_else(|_| "/var/cache/modvisor-test/llama".into()),
    );
    assert!(
        d.join("bin/llama-server").exists() && d.join("tiny.gguf").exists(),
        "llama-server and tiny.gguf must be built (make test runs engines/build-llama-server.sh) in {}",
        d.display()
    );
    d
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Builds the stand-in libnvidia-ml.so.1 of tests/nvml-stub into `dir` (`legacy`: without the
/// v3 process query, like drivers older than R510). No GPU here: the real nvml-wrapper code
/// path loads it.
pub fn build_nvml_stub(dir: &Path, legacy: bool) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml-stub/nvml_stub.c");
    let out = dir.join("libnvidia-ml.so.1");
    let mut cc = Command::new("cc");
    cc.args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src);
    if legacy {
        cc.arg("-DNO_V3");
    }
    let st = cc.status().expect("a C compiler (cc) must be installed");
    assert!(st.success(), "building the NVML stand-in failed");
    out
}
