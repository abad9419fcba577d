//! Model switches and cold starts with a real llama.cpp server and the tiny GGUF models of
//! engines/build-llama-server.sh (`MODVISOR_TEST_LLAMA` overrides the cache directory), side
//! by side with the engine's own start, in one run: `cargo bench --bench activation`.
//! - the floor: llama-server started on tiny.gguf by hand, until `GET /health` answers 200
//!   (polled every millisecond);
//! - `ActivateModel` (tiny.gguf <-> tiny2.gguf), call to reply, through a real modvisord (direct
//!   backend, private bus): stop the engine, start it on the other model, confirm online;
//! - a cold start on demand: a request to the listen address of a stopped `on_demand` module,
//!   to the first byte of the engine's answer.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{manager, median, start_daemon, wait_state};

const RUNS: usize = 10;

fn llama() -> PathBuf {
    let d = PathBuf::from(
        std::env::var("MODVISOR_TEST_LLAMA")
            .unwrap_or_else(|_| "/var/cache/modvisor-test/llama".into()),
    );
    assert!(
        d.join("bin/llama-server").exists() && d.join("tiny.gguf").exists(),
        "llama-server and tiny.gguf in {} (engines/build-llama-server.sh builds them)",
        d.display()
    );
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `GET path` (HTTP/1.0): the status code, or None when nothing answers.
async fn get(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The floor: llama-server on tiny.gguf, from spawn to `/health` 200 (ms).
async fn engine_own_start(dir: &Path) -> f64 {
    let port = free_port();
    let t0 = Instant::now();
    let mut child = Command::new(dir.join("bin/llama-server"))
        .args(["-m", &dir.join("tiny.gguf").display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server");
    let deadline = t0 + common::WAIT;
    while get(port, "/health").await != Some(200) {
        assert!(
            Instant::now() < deadline,
            "llama-server not healthy in time"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    ms
}

/// The manifests: `chat` (switched between the two models) and `cold` (on demand).
fn manifests(dir: &Path, models: &Path, modules: &Path) -> (u16, u16) {
    let server = dir.join("bin/llama-server").display().to_string();
    let (chat, listen, upstream) = (free_port(), free_port(), free_port());
    let common = format!(
        "trusted = true\n[runtime]\nstop_timeout = \"3s\"\n[model]\ndefault = \"{m}/tiny.gguf\"\ndirectory = \"{m}\"\n",
        m = models.display()
    );
    let native = |port: u16| {
        format!(
            "[native]\ncommand = [\"{server}\", \"-m\", \"${{model}}\", \"--host\", \"127.0.0.1\", \"--port\", \"{port}\"]\nuser = \"root\"\nsandbox = {{ private_tmp = false, protect_system = false }}\n[health]\nhttp = \"http://127.0.0.1:{port}/health\"\ninterval = \"2s\"\n"
        )
    };
    std::fs::write(
        modules.join("chat.toml"),
        format!("{common}{}", native(chat)),
    )
    .expect("manifest");
    std::fs::write(
        modules.join("cold.toml"),
        format!(
            "{common}{}[serve]\nlisten = [\"127.0.0.1:{listen}\"]\nupstream = \"127.0.0.1:{upstream}\"\non_demand = true\n",
            native(upstream)
        ),
    )
    .expect("manifest");
    (chat, listen)
}

/// A request to the stopped on-demand module's listen address, to the first byte (ms).
async fn cold_first_byte(listen: u16) -> f64 {
    let t0 = Instant::now();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", listen))
        .await
        .expect("connect to the listen address");
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(common::WAIT, s.read(&mut b))
        .await
        .expect("an answer in time")
        .expect("read");
    assert_eq!(n, 1, "the held connection was answered");
    t0.elapsed().as_secs_f64() * 1e3
}

fn report(what: &str, v: &[f64]) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    println!(
        "{what:<52} median {:>7.1} ms  (min {min:.1}, max {max:.1}, N={})",
        median(v.to_vec()),
        v.len()
    );
}

async fn run() {
    let dir = llama();
    let mut own = Vec::new();
    for _ in 0..RUNS {
        own.push(engine_own_start(&dir).await);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let models = d.join("models");
    let modules = d.join("modules.d");
    std::fs::create_dir_all(&models).expect("mkdir");
    std::fs::create_dir_all(&modules).expect("mkdir");
    for m in ["tiny.gguf", "tiny2.gguf"] {
        std::fs::copy(dir.join("tiny.gguf"), models.join(m)).expect("copy model");
    }
    let (_chat, listen) = manifests(&dir, &models, &modules);
    let config = format!(
        "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\ndefault_mode = \"native\"\nnative_backend = \"direct\"\n",
        modules.display(),
        d.join("state").display(),
        d.join("run").display()
    );
    let r = start_daemon(d, &config, &[]).await;
    let m = manager(&r.conn).await;
    wait_state(&m, "chat", "running").await;
    let mut activate = Vec::new();
    for i in 0..=RUNS {
        let model = models.join(if i % 2 == 0 {
            "tiny2.gguf"
        } else {
            "tiny.gguf"
        });
        let t0 = Instant::now();
        m.activate_model("chat", &model.display().to_string())
            .await
            .expect("ActivateModel");
        if i > 0 {
            activate.push(t0.elapsed().as_secs_f64() * 1e3); // the first warms up
        }
    }
    let mut cold = Vec::new();
    for _ in 0..RUNS {
        cold.push(cold_first_byte(listen).await);
        m.stop_module("cold").await.expect("StopModule");
        wait_state(&m, "cold", "inactive").await;
    }
    println!("llama-server with tiny.gguf on this machine ({RUNS} runs each):");
    report("the engine's own start to /health 200 (floor)", &own);
    report(
        "ActivateModel, call to reply (stop, start, online)",
        &activate,
    );
    report("cold on-demand start, connect to first byte", &cold);
    let floor = median(own.clone());
    println!(
        "beyond the floor: ActivateModel +{:.1} ms (goal <= 100), cold first byte +{:.1} ms (goal <= 10)",
        median(activate) - floor,
        median(cold) - floor
    );
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}
