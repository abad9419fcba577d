//! The container backend against BOTH real engines of the testbed (Podman 4.3 and Docker
//! 20.10, Docker API 1.41), proven by asking the engines themselves (their CLIs). The busybox
//! images come from the testbed (`podman import` / `docker import` of a rootfs tarball).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::engines::*;
use common::*;

fn uniq(e: Eng, tag: &str) -> String {
    format!("ct{}{}-{tag}", e.tag(), std::process::id())
}

/// A daemon using this engine.
async fn start(e: Eng, manifests: &[(&str, &str)]) -> Daemon {
    start_on(e, manifests).await
}

fn cmodule(e: Eng, script: &str, extra: &str) -> String {
    format!(
        "{extra}\n[runtime]\nstop_timeout = \"2s\"\n[container]\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", {}]\nnetwork = \"none\"\n",
        e.image(),
        toml_str(script)
    )
}

/// The container as the engine shows it: modvisor's labels, the memory limit of the manifest,
/// unprivileged, core dumps off.
fn assert_labels_and_limits(i: &serde_json::Value, name: &str) {
    assert_eq!(
        i["Config"]["Labels"]["org.modvisor.module"].as_str(),
        Some(name)
    );
    assert!(
        i["Config"]["Labels"]["org.modvisor.spec"]
            .as_str()
            .is_some_and(|h| h.len() == 16)
    );
    assert_eq!(i["HostConfig"]["Memory"].as_i64(), Some(64 << 20));
    assert_eq!(i["HostConfig"]["Privileged"].as_bool(), Some(false));
    let ulimits = i["HostConfig"]["Ulimits"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        ulimits
            .iter()
            .any(|u| (u["Name"] == "core" || u["Name"] == "RLIMIT_CORE")
                && u["Soft"] == 0
                && u["Hard"] == 0),
        "{ulimits:?}"
    );
}

/// The container's own lines reach the journal under its module: core 0, no capabilities.
async fn wait_journal_lines(name: &str, tag: &str) {
    let deadline = Instant::now() + T;
    loop {
        let out = Command::new("journalctl")
            .args([
                "--no-pager",
                "-o",
                "cat",
                &format!("MODVISOR_MODULE={name}"),
            ])
            .output()
            .expect("journalctl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains(tag) && text.contains("core=0") && text.contains("CapEff") {
            assert!(
                text.contains("CapEff:\t0000000000000000"),
                "capabilities dropped: {text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "journal lacks the container's lines: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn labels_limits_journal(e: Eng) {
    let name = uniq(e, "basic");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let tag = format!("container-line-{}", std::process::id());
    let script = format!(
        "echo {tag}; echo core=$(ulimit -c); cat /proc/self/status | grep CapEff; exec sleep 1000"
    );
    let d = start(
        e,
        &[(
            &name,
            &cmodule(e, &script, "[resources]\nmemory_max = \"64M\"\n"),
        )],
    )
    .await;
    d.wait_state(&name, "running").await;
    let m = d.manager().await;
    let engine = m.container_engine().await.expect("ContainerEngine");
    assert!(
        engine.starts_with(match e {
            Eng::Podman => "podman 4.",
            Eng::Docker => "docker 20.10",
        }),
        "{engine}"
    );
    let p = d.module(&name).await;
    assert_eq!(p.mode().await.expect("Mode"), "container");
    let id = p.container_id().await.expect("ContainerId");
    let i = e.inspect(&cname).expect("the engine knows the container");
    assert_eq!(i["Id"].as_str(), Some(id.as_str()));
    assert_labels_and_limits(&i, &name);
    // Read inside the container, through the journal: core 0, no capabilities.
    wait_journal_lines(&name, &tag).await;
    // StopModule removes it.
    m.stop_module(&name).await.expect("StopModule");
    assert!(
        e.inspect(&cname).is_none(),
        "the container is removed on stop"
    );
    d.wait_state(&name, "inactive").await;
}

async fn killed_main_process_restarts(e: Eng) {
    let name = uniq(e, "kill");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let d = start(
        e,
        &[(
            &name,
            &cmodule(e, "exec sleep 1000", "[restart]\ndelay = \"100ms\"\n"),
        )],
    )
    .await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let p = d.module(&name).await;
    let id1 = p.container_id().await.expect("id");
    let pid = e.inspect(&cname).expect("inspect")["State"]["Pid"]
        .as_u64()
        .expect("pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    d.wait_module(&name, T, |_, h, _| h == "offline").await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let id2 = p.container_id().await.expect("id");
    assert_ne!(id1, id2, "a new container");
    assert_eq!(p.restarts().await.expect("Restarts"), 1);
    assert_eq!(
        e.inspect(&cname).expect("inspect")["Id"].as_str(),
        Some(id2.as_str())
    );
}

async fn adoption_and_recreation(e: Eng) {
    let name = uniq(e, "adopt");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let mut d = start(e, &[(&name, &cmodule(e, "exec sleep 1000", ""))]).await;
    d.wait_state(&name, "running").await;
    let id = d.module(&name).await.container_id().await.expect("id");
    d.kill9();
    assert_eq!(
        e.inspect(&cname).expect("still there")["State"]["Running"].as_bool(),
        Some(true)
    );
    d.spawn(&[]).await;
    d.wait_state(&name, "running").await;
    assert_eq!(
        d.module(&name).await.container_id().await.expect("id"),
        id,
        "adopted: same container"
    );
    assert!(d.log().contains("adopted container"), "{}", d.log());
    // A spec change recreates it.
    d.write_manifest(&name, &cmodule(e, "exec sleep 999", ""));
    let p = d.module(&name).await;
    // Engines answer slowly when the whole suite runs on two cores: a wider bound here.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = p.container_id().await.expect("id");
        if !now.is_empty() && now != id && p.state().await.expect("state") == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "not recreated");
        d.wait_module(&name, Duration::from_secs(2), |_, _, _| true)
            .await;
    }
    let i = e.inspect(&cname).expect("inspect");
    assert!(
        i["Config"]["Cmd"].to_string().contains("sleep 999"),
        "{}",
        i["Config"]["Cmd"]
    );
}

async fn missing_image_is_a_clear_error(e: Eng) {
    let name = uniq(e, "noimg");
    // The default policy restarts failures; this one is a configuration error: not retried.
    let m = "[container]\nimage = \"localhost/does-not-exist:1\"\nnetwork = \"none\"\n[restart]\ndelay = \"100ms\"\n".to_string();
    let d = start(e, &[(&name, &m)]).await;
    let (st, h, r) = d.wait_state(&name, "failed").await;
    assert_eq!((st.as_str(), h.as_str()), ("failed", "offline"));
    assert!(
        r.starts_with("not started: image localhost/does-not-exist:1 is not present")
            && r.contains("pull = \"never\"")
            && r.contains("a configuration error, not restarted"),
        "{r}"
    );
    assert!(!r.contains("pid 0"), "{r}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p = d.module(&name).await;
    assert_eq!(p.restarts().await.expect("Restarts"), 0, "not retried");
    assert_eq!(p.state().await.expect("State"), "failed");
}

async fn policy_picks_native_or_container(e: Eng) {
    let name = uniq(e, "both");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let m = format!(
        "trusted = true\n[runtime]\nmodes = [\"native\", \"container\"]\n[native]\ncommand = [\"/bin/sleep\", \"1000\"]\n[container]\nimage = \"{}\"\ncommand = [\"sleep\", \"1000\"]\nnetwork = \"none\"\n",
        e.image()
    );
    let d = start(e, &[(&name, &m)]).await;
    d.wait_state(&name, "running").await;
    let p = d.module(&name).await;
    assert_eq!(p.mode().await.expect("Mode"), "native");
    assert_eq!(
        p.mode_reason().await.expect("ModeReason"),
        "native: first in runtime.modes"
    );
    assert!(e.inspect(&cname).is_none());
    // The override switches it to a container (restart in the other mode).
    d.manager()
        .await
        .set_mode_override(&name, "container")
        .await
        .expect("SetModeOverride");
    d.wait_module(&name, T, |s, _, _| s == "running").await;
    let deadline = Instant::now() + T;
    while p.mode().await.expect("Mode") != "container"
        || p.container_id().await.expect("id").is_empty()
    {
        assert!(Instant::now() < deadline, "did not switch to a container");
        d.wait_module(&name, Duration::from_secs(2), |_, _, _| true)
            .await;
    }
    assert_eq!(
        p.mode_reason().await.expect("ModeReason"),
        "container: set by override"
    );
    assert!(e.inspect(&cname).is_some());
}

/// A secret from `[container] environment_file` (root-only, 0600) reaches the container's
/// environment, and neither D-Bus nor the daemon's log; a file others can read is refused at
/// the next start with the reason.
async fn secrets_reach_the_container_only(e: Eng) {
    use std::os::unix::fs::PermissionsExt;
    let name = uniq(e, "sec");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let env_file = dir.path().join("secrets.env");
    let secret = format!("hunter2-{}", std::process::id());
    std::fs::write(&env_file, format!("# a comment\nAPI_TOKEN=\"{secret}\"\n")).expect("write");
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let m = format!(
        "{}environment_file = \"{}\"\n",
        cmodule(e, "exec sleep 1000", ""),
        env_file.display()
    );
    let d = start(e, &[(&name, &m)]).await;
    d.wait_state(&name, "running").await;
    let env = e
        .inspect(&cname)
        .and_then(|v| v["Config"]["Env"].as_array().cloned())
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|v| v.as_str() == Some(&format!("API_TOKEN={secret}"))),
        "{env:?}"
    );
    let mgr = d.manager().await;
    let shown = format!(
        "{:?}{}{:?}",
        mgr.list_modules().await.expect("list"),
        mgr.explain(&name).await.expect("explain"),
        d.module(&name).await.health_reason().await.expect("reason"),
    );
    assert!(!shown.contains(&secret), "{shown}");
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    mgr.restart_module(&name).await.ok();
    let (_, _, reason) = d
        .wait_module(&name, T, |s, _, r| s == "failed" && r.contains("0600"))
        .await;
    assert!(
        reason.contains("must be mode 0600 or stricter (is 0644)"),
        "{reason}"
    );
    assert!(!d.log().contains(&secret), "the log never shows a secret");
}

macro_rules! both_engines {
    ($($f:ident),*) => {
        mod podman {
            $(#[tokio::test] async fn $f() { super::$f(super::Eng::Podman).await })*
        }
        mod docker {
            $(#[tokio::test] async fn $f() { super::$f(super::Eng::Docker).await })*
        }
    };
}

both_engines!(
    labels_limits_journal,
    killed_main_process_restarts,
    adoption_and_recreation,
    missing_image_is_a_clear_error,
    policy_picks_native_or_container,
    secrets_reach_the_container_only
);

/// A private Podman API service on its own socket (same storage as the testbed's): stopping
/// and restarting it is "the engine going away and coming back" without disturbing others.
struct PodmanService {
    child: std::process::Child,
    sock: std::path::PathBuf,
}

impl PodmanService {
    fn start(sock: &std::path::Path) -> PodmanService {
        let _ = std::fs::remove_file(sock);
        let child = Command::new("podman")
            .args([
                "system",
                "service",
                "--time=0",
                &format!("unix://{}", sock.display()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("podman system service");
        // Bounded wait for the socket to answer.
        let deadline = Instant::now() + T;
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "podman service did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        PodmanService {
            child,
            sock: sock.to_path_buf(),
        }
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

#[tokio::test]
async fn podman_api_going_away_and_back_is_reported_and_readopted() {
    let e = Eng::Podman;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("podman.sock");
    let svc = PodmanService::start(&sock);
    let name = uniq(e, "engine-restart");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    let o = Options {
        runtime_extra: format!("container_socket = \"{}\"\n", sock.display()),
        ..Options::default()
    };
    let d = Daemon::start_with(&[(&name, &cmodule(e, "exec sleep 1000", ""))], o).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let id = d.module(&name).await.container_id().await.expect("id");
    svc.stop();
    let (_, h, r) = d.wait_module(&name, T, |_, h, _| h == "unknown").await;
    assert_eq!(h, "unknown");
    assert!(r.contains("container engine is not reachable"), "{r}");
    assert_eq!(
        e.inspect(&cname).expect("container")["State"]["Running"].as_bool(),
        Some(true),
        "the container itself keeps running"
    );
    let svc = PodmanService::start(&sock);
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(
        d.module(&name).await.container_id().await.expect("id"),
        id,
        "re-adopted: same container"
    );
    drop(d);
    svc.stop();
}
