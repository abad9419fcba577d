//! A real llama.cpp `llama-server` under modvisor: natively under the testbed's systemd, and as
//! a container in both engines; model activation with rollback; steady state across a
//! modvisord restart. The engine and tiny GGUF models come from engines/build-llama-server.sh
//! (scripts/test.sh builds them once per machine); the image from engines/build-llama-image.sh.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A model directory with tiny.gguf, tiny2.gguf (another valid model) and broken.gguf
/// (truncated: GGUF magic, then nothing usable).
fn models() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    let tiny = llama_dir().join("tiny.gguf");
    std::fs::copy(&tiny, t.path().join("tiny.gguf")).expect("copy");
    std::fs::copy(&tiny, t.path().join("tiny2.gguf")).expect("copy");
    let bytes = std::fs::read(&tiny).expect("read");
    std::fs::write(
        t.path().join("broken.gguf"),
        &bytes[..bytes.len().min(4096)],
    )
    .expect("write");
    t
}

/// The shipped example manifest, pointed at this machine's engine, models, port and image.
fn manifest(name: &str, models: &Path, port: u16, preferred: &str, image: &str) -> String {
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
            "preferred = \"native\"",
            &format!("preferred = \"{preferred}\""),
        )
        .replace("localhost/llama-server:latest", image)
        .replace("interval = \"2s\"", "interval = \"500ms\"")
        .replace("delay = \"2s\"", "delay = \"200ms\"")
        .replace("stop_timeout = \"10s\"", "stop_timeout = \"3s\"")
}

/// One HTTP exchange with the engine (Connection: close), bounded.
async fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default();
        (code, body)
    };
    tokio::time::timeout(T, fut)
        .await
        .expect("the engine answers in time")
}

async fn model_path(port: u16) -> String {
    let (code, body) = http(port, "GET", "/props", "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("props json");
    v["model_path"].as_str().unwrap_or("").to_string()
}

async fn completes(port: u16) {
    let (code, body) = http(
        port,
        "POST",
        "/completion",
        r#"{"prompt":"Hello","n_predict":8}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("completion json");
    assert!(
        v["content"].as_str().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
}

struct Containers(Vec<String>);
impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = std::process::Command::new("podman")
                .args(["rm", "-f", c])
                .output();
            let _ = std::process::Command::new("/usr/bin/docker")
                .args(["-H", "unix:///run/docker.sock", "rm", "-f", c])
                .output();
        }
    }
}

fn uniq(tag: &str) -> String {
    format!("ll{}-{tag}", std::process::id())
}

async fn kill9_restart_online(d: &Daemon, name: &str, port: u16) {
    let p = d.module(name).await;
    let pid = p.main_pid().await.expect("MainPID");
    assert!(pid > 0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    d.wait_module(name, T, |_, h, _| h != "online").await;
    d.wait_module(name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_ne!(p.main_pid().await.expect("MainPID"), pid);
    completes(port).await;
}

#[tokio::test]
async fn native_under_systemd_serves_restarts_and_stops() {
    let m = models();
    let port = free_port();
    let name = uniq("native");
    let _u = Units(vec![format!("modvisor-{name}.service")]);
    let d = Daemon::start_with(
        &[(&name, &manifest(&name, m.path(), port, "native", "x"))],
        Options {
            backend: "systemd",
            ..Options::default()
        },
    )
    .await;
    let (_, _, r) = d
        .wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert!(r.contains("/health: HTTP 200"), "{r}");
    completes(port).await;
    let p = d.module(&name).await;
    assert_eq!(p.backend().await.expect("Backend"), "systemd");
    assert!(model_path(port).await.ends_with("tiny.gguf"));
    let deadline = Instant::now() + T;
    while p.memory_bytes().await.expect("MemoryBytes") == 0 {
        assert!(Instant::now() < deadline, "RAM is reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill9_restart_online(&d, &name, port).await;
    let pid = p.main_pid().await.expect("pid");
    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    assert!(!alive(pid), "stopped: its memory is freed");
    assert_eq!(p.memory_bytes().await.expect("MemoryBytes"), 0);
}

async fn container_serves(e: &str) {
    let (image, sock) = match e {
        "podman" => (
            "localhost/llama-server:test",
            std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into()),
        ),
        _ => ("llama-server:test", "/run/docker.sock".to_string()),
    };
    let m = models();
    let port = free_port();
    let name = uniq(&format!("ct-{e}"));
    let _c = Containers(vec![format!("modvisor-{name}")]);
    let o = Options {
        runtime_extra: format!("container_socket = \"{sock}\"\n"),
        ..Options::default()
    };
    let d = Daemon::start_with(
        &[(&name, &manifest(&name, m.path(), port, "container", image))],
        o,
    )
    .await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let p = d.module(&name).await;
    assert_eq!(p.mode().await.expect("Mode"), "container");
    assert_eq!(p.backend().await.expect("Backend"), e);
    assert!(!p.container_id().await.expect("ContainerId").is_empty());
    completes(port).await;
    assert!(model_path(port).await.ends_with("/models/tiny.gguf"));
    let deadline = Instant::now() + T;
    while p.memory_bytes().await.expect("MemoryBytes") == 0 {
        assert!(Instant::now() < deadline, "RAM is reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill9_restart_online(&d, &name, port).await;
    let pid = p.main_pid().await.expect("pid");
    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    assert!(!alive(pid));
}

#[tokio::test]
async fn container_in_podman_serves_and_restarts() {
    container_serves("podman").await;
}

#[tokio::test]
async fn container_in_docker_serves_and_restarts() {
    container_serves("docker").await;
}

async fn activation_transaction(
    d: &Daemon,
    name: &str,
    port: u16,
    models: &Path,
    in_container: bool,
) {
    let m = d.manager().await;
    let mut steps = m
        .receive_model_activation()
        .await
        .expect("subscribe ModelActivation");
    let p = d.module(name).await;
    let shown = |f: &str| {
        if in_container {
            format!("/models/{f}")
        } else {
            models.join(f).display().to_string()
        }
    };

    // 1. A second valid model: online on it.
    m.activate_model(name, &models.join("tiny2.gguf").display().to_string())
        .await
        .expect("ActivateModel tiny2");
    assert_eq!(model_path(port).await, shown("tiny2.gguf"));
    assert!(
        p.active_model()
            .await
            .expect("ActiveModel")
            .ends_with("tiny2.gguf")
    );
    completes(port).await;
    let mut seen = Vec::new();
    while let Ok(Some(sig)) = tokio::time::timeout(Duration::from_millis(500), steps.next()).await {
        if let Ok(a) = sig.args() {
            seen.push(a.step.clone());
        }
    }
    for want in ["validated", "recorded", "restarting", "online"] {
        assert!(
            seen.iter().any(|s| s == want),
            "step {want} signalled: {seen:?}"
        );
    }

    // 2. A truncated GGUF: the engine fails, modvisor rolls back to tiny2, online again.
    let err = m
        .activate_model(name, &models.join("broken.gguf").display().to_string())
        .await
        .expect_err("rollback");
    let text = err.to_string();
    assert!(text.contains("org.modvisor1.Error.Failed"), "{text}");
    assert!(
        text.contains("rolled back to") && text.contains("tiny2.gguf"),
        "{text}"
    );
    assert!(
        text.contains("exiting due to model loading error")
            || text.contains("failed to load model"),
        "the engine's error: {text}"
    );
    assert_eq!(
        d.module(name).await.health().await.expect("health"),
        "online"
    );
    assert_eq!(model_path(port).await, shown("tiny2.gguf"));
    assert!(
        p.active_model()
            .await
            .expect("ActiveModel")
            .ends_with("tiny2.gguf")
    );

    // 3. Outside model.directory: refused, nothing restarted.
    let pid = p.main_pid().await.expect("pid");
    let outside = tempfile::NamedTempFile::new().expect("tmp");
    let err = m
        .activate_model(name, &outside.path().display().to_string())
        .await
        .expect_err("outside");
    assert!(
        err.to_string().contains("InvalidArgument")
            && err.to_string().contains("not inside model.directory"),
        "{err}"
    );
    let err = m
        .activate_model(name, "../../etc/passwd")
        .await
        .expect_err("traversal");
    assert!(err.to_string().contains("InvalidArgument"), "{err}");
    assert_eq!(p.main_pid().await.expect("pid"), pid, "nothing restarted");

    // 4. Concurrent activations: the second one is Busy, and so is a stop meanwhile. The first
    //    goes to the broken model, so it is surely still running (rolling back) when they come.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), steps.next()).await {}
    let m2 = d.manager().await;
    let first = {
        let name = name.to_string();
        let model = models.join("broken.gguf").display().to_string();
        tokio::spawn(async move { m2.activate_model(&name, &model).await })
    };
    let deadline = Instant::now() + T;
    loop {
        let sig = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            steps.next(),
        )
        .await
        .expect("steps")
        .expect("signal");
        if sig.args().is_ok_and(|a| a.step == "rolling-back") {
            break;
        }
    }
    let tiny = models.join("tiny.gguf").display().to_string();
    let (busy_a, busy_s) = tokio::join!(m.activate_model(name, &tiny), m.stop_module(name));
    let busy_a = busy_a.expect_err("busy");
    assert!(
        busy_a.to_string().contains("org.modvisor1.Error.Busy"),
        "{busy_a}"
    );
    let busy_s = busy_s.expect_err("busy");
    assert!(
        busy_s.to_string().contains("org.modvisor1.Error.Busy"),
        "{busy_s}"
    );
    first
        .await
        .expect("join")
        .expect_err("the first one rolls back");
    assert_eq!(model_path(port).await, shown("tiny2.gguf"));
    d.wait_module(name, T, |s, h, _| s == "running" && h == "online")
        .await;
}

#[tokio::test]
async fn model_activation_native_under_systemd() {
    let m = models();
    let port = free_port();
    let name = uniq("act");
    let _u = Units(vec![format!("modvisor-{name}.service")]);
    let mut d = Daemon::start_with(
        &[(&name, &manifest(&name, m.path(), port, "native", "x"))],
        Options {
            backend: "systemd",
            ..Options::default()
        },
    )
    .await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    activation_transaction(&d, &name, port, m.path(), false).await;
    // Steady state across a modvisord restart: same engine, same active model.
    d.manager()
        .await
        .activate_model(&name, "tiny2.gguf")
        .await
        .expect("relative to model.directory");
    let pid = d.module(&name).await.main_pid().await.expect("pid");
    d.kill9();
    d.spawn(&[]).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(
        d.module(&name).await.main_pid().await.expect("pid"),
        pid,
        "same engine"
    );
    assert!(
        d.module(&name)
            .await
            .active_model()
            .await
            .expect("ActiveModel")
            .ends_with("tiny2.gguf")
    );
    assert_eq!(
        model_path(port).await,
        m.path().join("tiny2.gguf").display().to_string()
    );
}

#[tokio::test]
async fn model_activation_in_a_podman_container() {
    let m = models();
    let port = free_port();
    let name = uniq("act-ct");
    let _c = Containers(vec![format!("modvisor-{name}")]);
    let sock = std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into());
    let o = Options {
        runtime_extra: format!("container_socket = \"{sock}\"\n"),
        ..Options::default()
    };
    let mut d = Daemon::start_with(
        &[(
            &name,
            &manifest(
                &name,
                m.path(),
                port,
                "container",
                "localhost/llama-server:test",
            ),
        )],
        o,
    )
    .await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    activation_transaction(&d, &name, port, m.path(), true).await;
    let id = d.module(&name).await.container_id().await.expect("id");
    d.kill9();
    d.spawn(&[]).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(
        d.module(&name).await.container_id().await.expect("id"),
        id,
        "same container"
    );
    assert!(
        d.module(&name)
            .await
            .active_model()
            .await
            .expect("ActiveModel")
            .ends_with("tiny2.gguf")
    );
}

#[tokio::test]
async fn stop_with_an_open_request_finishes_within_the_stop_timeout() {
    let m = models();
    let port = free_port();
    let name = uniq("stop");
    let d = Daemon::start(&[(&name, &manifest(&name, m.path(), port, "native", "x"))]).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let pid = d.module(&name).await.main_pid().await.expect("pid");
    // A streaming completion that the client never reads: llama-server waits for it on SIGTERM.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let body = r#"{"prompt":"Hello","n_predict":1000000,"stream":true}"#;
    let req = format!(
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut first = [0u8; 64];
    let _ = tokio::time::timeout(T, s.read(&mut first))
        .await
        .expect("the stream started");
    let t0 = Instant::now();
    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3) + Duration::from_secs(2),
        "stop took {took:?} (stop_timeout 3s)"
    );
    assert!(!alive(pid), "the engine is gone");
    drop(s);
}
