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

#[tokio::test]
async fn modvisord_works_under_its_hardened_unit() {
    let tag = format!("hd{}", std::process::id());
    // Outside /tmp: the unit has a private /tmp.
    let base = tempfile::Builder::new()
        .prefix("modvisor-hardening-")
        .tempdir_in("/run")
        .expect("dir in /run");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = base.path().to_path_buf();
    let bus = Bus::start_in(
        tempfile::Builder::new()
            .prefix("bus")
            .tempdir_in(&root)
            .expect("bus dir"),
    );
    let modules = root.join("modules.d");
    std::fs::create_dir_all(&modules).expect("mkdir");
    let native = format!("{tag}-native");
    let ctr = format!("{tag}-ctr");
    std::fs::write(
        modules.join(format!("{native}.toml")),
        sh_module("exec sleep 1000", ""),
    )
    .expect("write");
    std::fs::write(
        modules.join(format!("{ctr}.toml")),
        "[container]\nimage = \"localhost/bb:latest\"\ncommand = [\"sleep\", \"1000\"]\nnetwork = \"none\"\n",
    )
    .expect("write");
    let podman = std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into());
    let cfg = root.join("modvisor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\nnative_backend = \"systemd\"\ncontainer_socket = \"{podman}\"\n",
            modules.display(),
            root.join("state").display(),
            root.join("run").display()
        ),
    )
    .expect("config");

    // The unit has a private /tmp: the build under test may live there (a CI clone), so the
    // binary is copied where the unit can see it.
    let bin_dir = Path::new("/usr/local/libexec/modvisor-test");
    std::fs::create_dir_all(bin_dir).expect("mkdir");
    let bin = bin_dir.join(format!("modvisord-{tag}"));
    std::fs::copy(env!("CARGO_BIN_EXE_modvisord"), &bin).expect("copy modvisord");
    struct RmBin(std::path::PathBuf);
    impl Drop for RmBin {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = RmBin(bin.clone());
    // The shipped unit, pointed at this build and these paths; everything else as shipped.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("units/modvisord.service"),
    )
    .expect("unit");
    let unit_text = shipped
        .replace(
            "ExecStart=/usr/bin/modvisord",
            &format!(
                "ExecStart={} --config {} --bus-address {}",
                bin.display(),
                cfg.display(),
                bus.address
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
    let unit_text = unit_text
        .replace(
            "ProtectKernelTunables=yes",
            "# ProtectKernelTunables=yes (not applicable in the testbed)",
        )
        .replace(
            "ProtectKernelLogs=yes",
            "# ProtectKernelLogs=yes (not applicable in the testbed)",
        );
    let unit = format!("mvharden-{tag}.service");
    let unit_file = Path::new("/root/.config/systemd/user").join(&unit);
    std::fs::create_dir_all(unit_file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&unit_file, unit_text).expect("write unit");
    struct Cleanup(String, std::path::PathBuf, String, String);
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
            sc(&["stop", &format!("modvisor-{}.service", self.2)]);
            sc(&["reset-failed", &self.0]);
            let _ = std::process::Command::new("podman")
                .args(["rm", "-f", &format!("modvisor-{}", self.3)])
                .output();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let _c = Cleanup(unit.clone(), unit_file.clone(), native.clone(), ctr.clone());

    let sys = zbus::Connection::system()
        .await
        .expect("the testbed's system bus");
    let mgr = ManagerProxy::new(&sys).await.expect("systemd");
    mgr.load_unit(unit.clone()).await.expect("LoadUnit");
    // Type=notify: StartUnit's job completes when modvisord says READY=1.
    let conn = bus.connect().await;
    mgr.start_unit(unit.clone(), "replace".into())
        .await
        .expect("StartUnit");
    let u = UnitProxy::builder(&sys)
        .path(modvisor::runtime::systemd::unit_path(&unit))
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("unit proxy");
    // Generous: under a loaded CI machine the whole suite runs alongside.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = u.active_state().await.unwrap_or_default();
        if st == "active" {
            break;
        }
        assert!(
            st != "failed",
            "modvisord failed under its hardened unit: {}",
            journal(&unit)
        );
        assert!(
            Instant::now() < deadline,
            "not active (READY=1) in time: {st}; {}",
            journal(&unit)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
