//! modvisord under its own shipped unit file, hardening included (ProtectSystem=strict,
//! PrivateTmp, NoNewPrivileges, RestrictAddressFamilies, ...), run by the testbed's real
//! systemd: it must still reach READY (Type=notify), serve D-Bus, create transient units and
//! talk to the container socket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{ManagerProxy, UnitProxy};

/// modvisord under the shipped unit in the testbed's systemd, with these manifests and
/// `config_extra` in its config; stopped and removed when dropped.
struct Deployed {
    unit: String,
    bus: Bus,
    _rm: RmBin,
    _c: Cleanup,
    _base: tempfile::TempDir,
}

struct RmBin(std::path::PathBuf);
impl Drop for RmBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// (unit, unit file, units and containers of its modules to stop).
struct Cleanup(String, std::path::PathBuf, Vec<String>, Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let sc = |a: &[&str]| {
            let _ = std::process::Command::new("systemctl")
                .arg("--user")
                .args(a)
                .env("XDG_RUNTIME_DIR", "/run/user/0")
                .output();
        };
        sc(&["stop", &self.0]);
        for u in &self.2 {
            sc(&["stop", u]);
        }
        sc(&["reset-failed", &self.0]);
        for c in &self.3 {
            let _ = std::process::Command::new("podman")
                .args(["rm", "-f", c])
                .output();
        }
        let _ = std::fs::remove_file(&self.1);
    }
}

impl Deployed {
    fn start(
        tag: &str,
        manifests: &[(&str, String)],
        config_extra: &str,
        cleanup: (Vec<String>, Vec<String>),
    ) -> Deployed {
        // Outside /tmp: the unit has a private /tmp.
        let base = tempfile::Builder::new()
            .prefix("modvisor-hardening-")
            .tempdir_in("/run")
            .expect("dir in /run");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let root = base.path().to_path_buf();
        let bus = Bus::start_in(
            tempfile::Builder::new()
                .prefix("bus")
                .tempdir_in(&root)
                .expect("bus dir"),
        );
        let modules = root.join("modules.d");
        std::fs::create_dir_all(&modules).expect("mkdir");
        for (name, text) in manifests {
            std::fs::write(modules.join(format!("{name}.toml")), text).expect("write");
        }
        let cfg = root.join("modvisor.toml");
        std::fs::write(
            &cfg,
            format!(
                "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n{config_extra}",
                modules.display(),
                root.join("state").display(),
                root.join("run").display()
            ),
        )
        .expect("config");
        // The unit has a private /tmp: the build under test may live there (a CI clone), so
        // the binary is copied where the unit can see it.
        let bin_dir = Path::new("/usr/local/libexec/modvisor-test");
        std::fs::create_dir_all(bin_dir).expect("mkdir");
        let bin = bin_dir.join(format!("modvisord-{tag}"));
        std::fs::copy(env!("CARGO_BIN_EXE_modvisord"), &bin).expect("copy modvisord");
        let rm = RmBin(bin.clone());
        let unit = format!("mvharden-{tag}.service");
        let unit_file = Path::new("/root/.config/systemd/user").join(&unit);
        std::fs::create_dir_all(unit_file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&unit_file, unit_text(&bin, &cfg, &bus.address, &root)).expect("write unit");
        let c = Cleanup(unit.clone(), unit_file, cleanup.0, cleanup.1);
        Deployed {
            unit,
            bus,
            _rm: rm,
            _c: c,
            _base: base,
        }
    }

    /// Starts the unit and waits until it is active (READY=1).
    async fn run(&self, sys: &zbus::Connection) -> UnitProxy<'static> {
        let mgr = ManagerProxy::new(sys).await.expect("systemd");
        mgr.load_unit(self.unit.clone()).await.expect("LoadUnit");
        mgr.start_unit(self.unit.clone(), "replace".into())
            .await
            .expect("StartUnit");
        let u = UnitProxy::builder(sys)
            .path(modvisor::runtime::systemd::unit_path(&self.unit))
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .expect("unit proxy");
        wait_active(&u, &self.unit).await;
        u
    }
}

/// Waits until the unit is active (READY=1), failing on `failed`.
async fn wait_active(u: &UnitProxy<'_>, unit: &str) {
    // Generous: under a loaded CI machine the whole suite runs alongside.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = u.active_state().await.unwrap_or_default();
        if st == "active" {
            return;
        }
        assert!(
            st != "failed",
            "modvisord failed under its hardened unit: {}",
            journal(unit)
        );
        assert!(
            Instant::now() < deadline,
            "not active (READY=1) in time: {st}; {}",
            journal(unit)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shipped unit, pointed at this build and these paths; everything else as shipped.
fn unit_text(bin: &Path, cfg: &Path, bus: &str, root: &Path) -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("units/modvisord.service"),
    )
    .expect("unit");
    let unit_text = shipped
        .replace(
            "ExecStart=/usr/bin/modvisord",
            &format!(
                "ExecStart={} --config {} --bus-address {bus}",
                bin.display(),
                cfg.display(),
            ),
        )
        .replace(
            "[Service]\n",
            &format!("[Service]\nReadWritePaths={}\n", root.display()),
        );
    assert!(
        !shipped.contains("\nReadWritePaths="),
        "the shipped unit names no fixed ReadWritePaths= (a missing one fails with 226/NAMESPACE)"
    );
    assert!(
        unit_text.contains("ProtectSystem=strict") && unit_text.contains("NoNewPrivileges=yes")
    );
    // The testbed's manager is a user manager inside a private mount namespace: these two fail
    // there with 226/NAMESPACE for any program (bisected with /bin/true), so they are the only
    // options not exercised here. Everything else is exactly as shipped.
    unit_text
        .replace(
            "ProtectKernelTunables=yes",
            "# ProtectKernelTunables=yes (not applicable in the testbed)",
        )
        .replace(
            "ProtectKernelLogs=yes",
            "# ProtectKernelLogs=yes (not applicable in the testbed)",
        )
}

#[tokio::test]
async fn modvisord_works_under_its_hardened_unit() {
    let tag = format!("hd{}", std::process::id());
    let native = format!("{tag}-native");
    let ctr = format!("{tag}-ctr");
    let podman = std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into());
    let d = Deployed::start(
        &tag,
        &[
            (&native, sh_module("exec sleep 1000", "")),
            (
                &ctr,
                "[container]\nimage = \"localhost/bb:latest\"\ncommand = [\"sleep\", \"1000\"]\nnetwork = \"none\"\n".to_string(),
            ),
        ],
        &format!("[runtime]\nnative_backend = \"systemd\"\ncontainer_socket = \"{podman}\"\n"),
        (
            vec![format!("modvisor-{native}.service")],
            vec![format!("modvisor-{ctr}")],
        ),
    );
    let (unit, bus) = (d.unit.clone(), &d.bus);
    let sys = zbus::Connection::system()
        .await
        .expect("the testbed's system bus");
    let conn = bus.connect().await;
    d.run(&sys).await;
    // D-Bus works: the API answers; a transient unit and a container run.
    let m = modvisor::dbus::client::ManagerProxy::builder(&conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("proxy");
    let deadline = Instant::now() + T;
    loop {
        let rows = m.list_modules().await.unwrap_or_default();
        let running = rows.iter().filter(|r| r.2 == "running").count();
        if running == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "modules not running under the hardened unit: {rows:?}; {}",
            journal(&unit)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(m.native_backend().await.expect("NativeBackend"), "systemd");
    assert!(
        m.container_engine()
            .await
            .expect("ContainerEngine")
            .starts_with("podman")
    );
    // Its own limits: core 0 (LimitCORE=0 in the shipped unit).
    let svc = zbus_systemd::systemd1::ServiceProxy::builder(&sys)
        .path(modvisor::runtime::systemd::unit_path(&unit))
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("service");
    let pid = svc.main_pid().await.expect("MainPID");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    assert!(
        limits.lines().any(
            |l| l.starts_with("Max core file size") && l.split_whitespace().nth(4) == Some("0")
        ),
        "{limits}"
    );
}

fn journal(unit: &str) -> String {
    std::process::Command::new("journalctl")
        .args([
            "--no-pager",
            "-o",
            "cat",
            "-n",
            "30",
            &format!("_SYSTEMD_USER_UNIT={unit}"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// A restart of modvisord does not refuse a module's clients: under the shipped unit the
/// listening socket of an on-demand module is kept in systemd's file descriptor store, so a
/// client that connects while no modvisord runs (between a kill -9 and systemd's restart)
/// waits in the backlog and is served by the next modvisord.
#[tokio::test]
async fn a_listen_address_keeps_its_clients_across_a_daemon_restart() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tag = format!("fd{}", std::process::id());
    let (listen, upstream) = (free_port(), free_port());
    let web = root_engine(&format!(
        "trusted = true\n[native]\ncommand = [\"python3\", \"-m\", \"http.server\", \"{upstream}\", \"--bind\", \"127.0.0.1\"]\n[health]\ntcp = \"127.0.0.1:{upstream}\"\ninterval = \"1s\"\n[serve]\nlisten = [\"127.0.0.1:{listen}\"]\nupstream = \"127.0.0.1:{upstream}\"\non_demand = true\n"
    ));
    let d = Deployed::start(
        &tag,
        &[("web", web)],
        "[runtime]\nnative_backend = \"direct\"\n",
        (Vec::new(), Vec::new()),
    );
    let sys = zbus::Connection::system()
        .await
        .expect("the testbed's system bus");
    let u = d.run(&sys).await;
    let get = || async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .expect("connect: the listen address is not refused");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("send");
        let mut out = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut out))
            .await
            .expect("an answer in time")
            .expect("read");
        String::from_utf8_lossy(&out).to_string()
    };
    let first = get().await;
    assert!(first.starts_with("HTTP/1.0 200"), "{first}");

    let svc = zbus_systemd::systemd1::ServiceProxy::builder(&sys)
        .path(modvisor::runtime::systemd::unit_path(&d.unit))
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("service");
    let pid = svc.main_pid().await.expect("MainPID");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 modvisord");
    // No modvisord runs now (systemd restarts it after RestartSec=): the client connects and
    // waits; the next modvisord starts the engine on demand and answers it.
    let t0 = Instant::now();
    let answered = get().await;
    assert!(answered.starts_with("HTTP/1.0 200"), "{answered}");
    let restarted = svc.main_pid().await.expect("MainPID");
    assert!(restarted != pid && restarted != 0, "a new modvisord");
    assert_eq!(svc.n_restarts().await.expect("NRestarts"), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "the client waited for the restart (RestartSec=2s): {:?}",
        t0.elapsed()
    );
    wait_active(&u, &d.unit).await;
    assert!(
        journal(&d.unit).contains("1 listening sockets kept across the restart by systemd"),
        "{}",
        journal(&d.unit)
    );
}
