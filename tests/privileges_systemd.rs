//! Unprivileged, sandboxed engines under the testbed's systemd (a user manager running as
//! root, which can switch users but refuses ProtectHome=, ProtectKernelTunables= and
//! ProtectKernelLogs=): the engine user, the sandbox properties as `systemctl show` reads
//! them, secrets only in the engine's environment, and a real llama-server answering under
//! the default sandbox. Fails (never skips) when systemd or the engine is missing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::engine_user::{EngineUser, ids};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn uniq(tag: &str) -> String {
    format!("pv{}-{tag}", std::process::id())
}

fn opts() -> Options {
    Options {
        backend: "systemd",
        ..Options::default()
    }
}

/// A directory outside /tmp (the engine's /tmp is private), removed on drop.
fn var_dir(mode: u32) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("modvisor-test-priv")
        .tempdir_in("/var/lib")
        .expect("tempdir in /var/lib");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).expect("chmod");
    d
}

/// `busctl get-property` of the unit's Service interface: "s \"strict\"", "b true", ...
fn service_prop(unit: &str, prop: &str) -> String {
    let out = Command::new("busctl")
        .args([
            "--system",
            "get-property",
            "org.freedesktop.systemd1",
            &modvisor::runtime::systemd::unit_path(unit),
            "org.freedesktop.systemd1.Service",
            prop,
        ])
        .output()
        .expect("busctl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `systemctl show UNIT` as an operator runs it (inside the manager's mount namespace, where
/// its private socket is).
fn systemctl_show(unit: &str) -> String {
    let pid = std::fs::read_to_string("/tmp/testbed-state/user-manager.pid")
        .expect("the testbed's user manager (make test brings it up)");
    let out = Command::new("timeout")
        .args([
            "20",
            "nsenter",
            "-t",
            pid.trim(),
            "-m",
            "systemctl",
            "show",
            unit,
        ])
        .output()
        .expect("systemctl show");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn environ(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).expect("environ"))
        .replace('\0', "\n")
}

#[tokio::test]
async fn unit_runs_as_the_engine_user_sandboxed_and_secrets_stay_out_of_show() {
    let user = EngineUser::ensure();
    let name = uniq("sec");
    let unit = format!("modvisor-{name}.service");
    let _units = Units(vec![unit.clone()]);
    let secrets = var_dir(0o700);
    let secret = format!("s3cr3t-{}", std::process::id());
    let env_file = secrets.path().join("x.env");
    std::fs::write(&env_file, format!("API_TOKEN={secret}\n")).expect("write");
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // (Credentials: tests/sysmgr.rs; this user manager keeps them where another user
    // cannot read them, so modvisord refuses them here.)
    let m = format!(
        "{ENGINE_DEFAULTS}trusted = true\n[native]\ncommand = [\"/bin/sleep\", \"1000\"]\nenvironment_file = \"{}\"\n",
        env_file.display(),
    );
    let d = Daemon::start_with(&[(&name, &m)], opts()).await;
    d.wait_state(&name, "running").await;
    let pid = d.module(&name).await.main_pid().await.expect("MainPID");
    // Type=simple: running from the fork; the uid changes at the exec.
    let deadline = std::time::Instant::now() + T;
    while std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
        != "/bin/sleep\u{0}1000\u{0}"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} never exec'd the engine"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ids(pid).0, vec![user.uid; 4], "{}", d.log());
    for (p, want) in [
        ("User", "s \"modvisor-engine\""),
        ("NoNewPrivileges", "b true"),
        ("ProtectSystem", "s \"strict\""),
        ("PrivateTmp", "b true"),
        ("PrivateDevices", "b true"),
        ("RestrictSUIDSGID", "b true"),
        ("LockPersonality", "b true"),
        ("ProtectKernelModules", "b true"),
        ("ProtectControlGroups", "b true"),
        ("CapabilityBoundingSet", "t 0"),
        // Refused by this user manager (226/NAMESPACE): only under a system manager.
        ("ProtectKernelTunables", "b false"),
    ] {
        assert_eq!(service_prop(&unit, p), want, "{p}");
    }
    let env = environ(pid);
    assert!(env.contains(&format!("API_TOKEN={secret}")), "{env}");
    let show = systemctl_show(&unit);
    assert!(show.contains("User=modvisor-engine"), "{show}");
    assert!(
        show.contains(&format!("EnvironmentFiles={}", env_file.display())),
        "{show}"
    );
    assert!(
        !show.contains(&secret),
        "systemctl show leaks the secret:\n{show}"
    );
    assert!(!service_prop(&unit, "Environment").contains(&secret));
    let journal = Command::new("journalctl")
        .args([
            "--no-pager",
            "-o",
            "export",
            &format!("MODVISOR_MODULE={name}"),
        ])
        .output()
        .expect("journalctl");
    assert!(!String::from_utf8_lossy(&journal.stdout).contains(&secret));
    assert!(!d.log().contains(&secret));
    drop(d);
}

async fn post_completion(port: u16) -> String {
    let body = r#"{"prompt":"Hello","n_predict":8}"#;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let req = format!(
            "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf).into_owned()
    };
    tokio::time::timeout(T, fut).await.expect("answer in time")
}

/// The shipped example, its engine, models and port replaced; the engine defaults kept.
fn llama_manifest(name: &str, models: &Path, port: u16) -> String {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/llama-chat.toml"),
    )
    .expect("example");
    let m = src
        .replace("name = \"llama-chat\"", &format!("name = \"{name}\""))
        .replace(
            "modes = [\"native\", \"container\"]",
            "modes = [\"native\"]",
        )
        .replace(
            "/usr/local/bin/llama-server",
            &llama_dir().join("bin/llama-server").display().to_string(),
        )
        .replace("/srv/models", &models.display().to_string())
        .replace("8080", &port.to_string());
    format!("{ENGINE_DEFAULTS}{m}")
}

#[tokio::test]
async fn llama_server_answers_under_the_default_sandbox() {
    let user = EngineUser::ensure();
    let name = uniq("llama");
    let _units = Units(vec![format!("modvisor-{name}.service")]);
    let models = var_dir(0o755);
    std::fs::copy(
        llama_dir().join("tiny.gguf"),
        models.path().join("tiny.gguf"),
    )
    .expect("copy");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let d = Daemon::start_with(
        &[(&name, &llama_manifest(&name, models.path(), port))],
        opts(),
    )
    .await;
    d.wait_module(&name, std::time::Duration::from_secs(80), |_, h, _| {
        h == "online"
    })
    .await;
    let pid = d.module(&name).await.main_pid().await.expect("MainPID");
    assert_eq!(ids(pid).0[0], user.uid);
    let answer = post_completion(port).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"content\""), "{answer}");
    drop(d);
}
