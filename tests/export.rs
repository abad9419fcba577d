//! `modvisorctl export` against real components: the exported Deployment of the example
//! llama-server module runs under `podman kube play` (answers `/completion`, its probes are
//! in the container's health check), and the exported unit passes `systemd-analyze verify`
//! and serves the same engine under the testbed's systemd with core limit 0. Every wait is
//! bounded; a missing component fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

fn uniq(tag: &str) -> String {
    format!("ex{}-{tag}", std::process::id())
}

/// The shipped example, pointed at this machine's engine, a copy of the model, a free port
/// and the test image (as tests/llama.rs does).
fn example(name: &str, models: &Path, port: u16) -> String {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/llama-chat.toml"),
    )
    .expect("example");
    src.replace("name = \"llama-chat\"", &format!("name = \"{name}\""))
        .replace(
            "/usr/local/bin/llama-server",
            &llama_dir().join("bin/llama-server").display().to_string(),
        )
        .replace("/srv/models", &models.display().to_string())
        .replace("8080", &port.to_string())
        .replace(
            "localhost/llama-server:latest",
            "localhost/llama-server:test",
        )
        .replace("stop_timeout = \"10s\"", "stop_timeout = \"3s\"")
}

struct Fixture {
    dir: tempfile::TempDir,
    manifest: PathBuf,
    port: u16,
}

fn fixture(name: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::copy(llama_dir().join("tiny.gguf"), models.join("tiny.gguf")).expect("copy");
    let port = free_port();
    let manifest = dir.path().join(format!("{name}.toml"));
    // Root, with its temp directory visible, as the testbed's other suites (the defaults are
    // tested in tests/privileges*.rs and tests/sysmgr.rs).
    let text = root_engine(&example(name, &models, port));
    std::fs::write(&manifest, text).expect("write manifest");
    Fixture {
        dir,
        manifest,
        port,
    }
}

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(args)
        .output()
        .expect("run modvisorctl")
}

/// `modvisorctl export --format F --manifest FILE`, twice: the same bytes both times.
fn export(format: &str, manifest: &Path) -> String {
    let m = manifest.display().to_string();
    let run = || {
        let o = ctl(&["export", "--format", format, "--manifest", &m]);
        assert!(
            o.status.success(),
            "export: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).expect("UTF-8")
    };
    let first = run();
    assert_eq!(first, run(), "the export is deterministic");
    first
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman must be installed (testbed/install.sh)")
}

/// `podman kube down` of the YAML (and the pod by name), whatever happened.
struct KubeDown(PathBuf, String);
impl Drop for KubeDown {
    fn drop(&mut self) {
        let _ = podman(&["kube", "down", &self.0.display().to_string()]);
        let _ = podman(&["pod", "rm", "-f", "-t", "0", &self.1]);
    }
}

/// POST /completion until the engine answers 200 with content (bounded).
async fn completes(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        let body = r#"{"prompt":"Hello","n_predict":8}"#;
        let req = format!(
            "POST /completion HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let fut = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(r)) if r.starts_with("HTTP/1.1 200") && r.contains("\"content\"") => return,
            Ok(Ok(r)) => last = r,
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("/completion on port {port} did not answer within {limit:?}: {last}");
}

#[tokio::test]
async fn the_exported_deployment_runs_under_podman_kube_play() {
    let name = uniq("kube");
    let f = fixture(&name);
    let yaml = export("kube", &f.manifest);
    assert!(yaml.contains("kind: Deployment") && yaml.contains("kind: Service"));
    let file = f.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, &yaml).expect("write yaml");
    // podman 4.3 names the pod of a Deployment NAME-pod-0.
    let pod = format!("{name}-pod-0");
    let _down = KubeDown(file.clone(), pod.clone());
    let play = podman(&["kube", "play", &file.display().to_string()]);
    assert!(
        play.status.success(),
        "kube play: {}",
        String::from_utf8_lossy(&play.stderr)
    );
    completes(f.port, Duration::from_secs(60)).await;

    // The probes became the container's health check; the security context is applied.
    let ctr = format!("{pod}-{name}");
    let inspect = podman(&[
        "inspect",
        &ctr,
        "--format",
        "{{json .Config.Healthcheck}}|{{.HostConfig.SecurityOpt}}|{{.HostConfig.CapAdd}}|{{.HostConfig.Memory}}",
    ]);
    let text = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(inspect.status.success(), "{text}");
    let health = format!("http://127.0.0.1:{}/health", f.port);
    assert!(
        text.contains(&health),
        "the probe in the health check: {text}"
    );
    assert!(text.contains("\"Retries\":3"), "failureThreshold: {text}");
    assert!(text.contains("no-new-privileges"), "{text}");
    assert!(text.contains("|[]|"), "no capability added: {text}");
    assert!(
        text.ends_with(&format!("|{}\n", 8u64 << 30)),
        "memory limit: {text}"
    );

    let down = podman(&["kube", "down", &file.display().to_string()]);
    assert!(
        down.status.success(),
        "kube down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        !podman(&["pod", "exists", &pod]).status.success(),
        "the pod is gone"
    );
}

#[test]
fn a_native_only_module_is_not_exported_to_kube_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("nat.toml");
    std::fs::write(&m, sh_module("sleep 100", "")).expect("write");
    let o = ctl(&[
        "export",
        "--format",
        "kube",
        "--manifest",
        &m.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("runs only natively") && err.contains("Kubernetes runs containers"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    let o = ctl(&[
        "export",
        "other",
        "--format",
        "kube",
        "--manifest",
        &m.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(3), "no such module");
}

async fn system_bus() -> zbus::Connection {
    zbus::Connection::system()
        .await
        .expect("the testbed's system bus")
}

/// The unit file in the user manager's search path, removed with the test.
struct UnitFile(PathBuf);
impl Drop for UnitFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn the_exported_unit_verifies_and_serves_under_systemd_with_core_limit_0() {
    let name = uniq("unit");
    let f = fixture(&name);
    let text = export("systemd", &f.manifest);
    let unit = format!("modvisor-{name}.service");
    let local = f.dir.path().join(&unit);
    std::fs::write(&local, &text).expect("write unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .expect("systemd-analyze must be installed");
    let said = String::from_utf8_lossy(&verify.stderr).to_string();
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );

    // Into the testbed's user manager: LoadUnit reads the new file (no daemon-reload, which
    // would reset other tests' units), then StartUnit.
    let _guard = Units(vec![unit.clone()]);
    let dir = Path::new("/root/.config/systemd/user");
    std::fs::create_dir_all(dir).expect("mkdir");
    let _file = UnitFile(dir.join(&unit));
    // As in tests/hardening.rs: the testbed's user manager runs in a private mount namespace
    // where these three fail with 226/NAMESPACE for any program; a system manager applies them.
    let for_testbed: String = text
        .lines()
        .filter(|l| {
            ![
                "ProtectHome=",
                "ProtectKernelTunables=",
                "ProtectKernelLogs=",
            ]
            .iter()
            .any(|d| l.starts_with(d))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.join(&unit), &for_testbed).expect("install unit");
    let sys = system_bus().await;
    let mgr = ManagerProxy::new(&sys).await.expect("manager");
    mgr.load_unit(unit.clone()).await.expect("LoadUnit");
    mgr.start_unit(unit.clone(), "replace".into())
        .await
        .expect("StartUnit");
    let path = modvisor::runtime::systemd::unit_path(&unit);
    let svc = ServiceProxy::builder(&sys)
        .path(path.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("service proxy");
    let deadline = Instant::now() + T;
    let pid = loop {
        let pid = svc.main_pid().await.unwrap_or(0);
        if pid > 0 {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "{unit} has a MainPID within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Limits are set between fork and exec: read them once the engine runs.
    let exe = std::fs::canonicalize(llama_dir().join("bin/llama-server")).expect("engine");
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .as_deref()
        != Some(exe.as_path())
    {
        assert!(
            Instant::now() < deadline,
            "pid {pid} runs llama-server within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    completes(f.port, Duration::from_secs(60)).await;

    mgr.stop_unit(unit.clone(), "replace".into())
        .await
        .expect("StopUnit");
    let u = UnitProxy::builder(&sys)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .expect("unit proxy");
    let deadline = Instant::now() + T;
    while u.active_state().await.unwrap_or_default() != "inactive" {
        assert!(Instant::now() < deadline, "{unit} stops within {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!alive(pid), "stopped with its unit");
}
