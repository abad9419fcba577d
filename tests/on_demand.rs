//! Start on demand and stop when idle, through modvisord's own listen address ([serve]),
//! against real engines (a small Python HTTP server that takes a moment to start, and a real
//! llama-server under the direct backend, under the testbed's systemd and as a Podman
//! container), real sockets and real clients; a listen address two modules claim.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// An HTTP server on argv[1] that waits argv[2] seconds before it listens (loading), answers
/// GET / with "hello", and GET /stream with a line every 0.5 s for argv[3] seconds.
const ENGINE: &str = r#"
import http.server, sys, time
port, delay, stream = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.path == "/stream":
            end = time.time() + stream
            while time.time() < end:
                self.wfile.write(b"tick\n"); self.wfile.flush(); time.sleep(0.5)
            self.wfile.write(b"done\n")
        else:
            self.wfile.write(b"hello")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

struct Ports {
    listen: u16,
    upstream: u16,
}

fn module(p: &Ports, delay: &str, serve_extra: &str) -> String {
    format!(
        "trusted = true\n[native]\ncommand = [\"python3\", \"-c\", {}, \"${{port}}\", \"{delay}\", \"4\"]\n[health]\nhttp = \"http://127.0.0.1:{u}/\"\ninterval = \"200ms\"\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\non_demand = true\n{serve_extra}",
        toml_str(ENGINE),
        l = p.listen,
        u = p.upstream
    )
}

/// GET `path` through `addr`: the whole answer, or the error (a closed or refused connection).
fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(out)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn first_connection_starts_it_idle_stops_it_and_the_next_starts_it_again() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let d = Daemon::start(&[("od", &module(&p, "1", "idle_stop = \"2s\"\n"))]).await;
    let m = d.manager().await;
    let od = d.module("od").await;
    // Nothing runs before the first connection; standby is not a failure.
    let (s, _, r) = d.wait_module("od", T, |_, h, _| h == "standby").await;
    assert_eq!(s, "inactive", "{r}");
    assert!(r.contains(&format!("127.0.0.1:{}", p.listen)), "{r}");
    assert_eq!(od.main_pid().await.expect("MainPID"), 0);
    assert!(od.on_demand().await.expect("OnDemand"));
    assert_eq!(m.health().await.expect("Health"), "online");
    assert_eq!(m.modules_offline().await.expect("ModulesOffline"), 0);
    // The first request is held while the engine loads (1 s), then served.
    let t0 = Instant::now();
    let a = addr(p.listen);
    let body = tokio::task::spawn_blocking(move || get(a, "/", Duration::from_secs(15)))
        .await
        .expect("join")
        .expect("the first request is served");
    assert!(body.ends_with("hello"), "{body}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "held during the load"
    );
    let pid = od.main_pid().await.expect("MainPID");
    assert!(pid > 0 && alive(pid));
    // Idle for 2 s: stopped, in standby, the Manager still online.
    let (_, _, r) = d
        .wait_module("od", T, |s, h, _| s == "inactive" && h == "standby")
        .await;
    assert!(
        r.contains("stopped after 2s idle; starts on the next connection"),
        "{r}"
    );
    assert!(!alive(pid), "the engine is gone after the idle stop");
    assert_eq!(m.health().await.expect("Health"), "online");
    assert!(
        d.log().contains("no connection for 2s"),
        "journal line of the idle stop"
    );
    // The next request starts it again.
    let body = tokio::task::spawn_blocking(move || get(a, "/", Duration::from_secs(15)))
        .await
        .expect("join")
        .expect("served after the idle stop");
    assert!(body.ends_with("hello"));
    assert!(
        d.log().contains("on demand: connection from 127.0.0.1"),
        "{}",
        d.log()
    );
}

#[tokio::test]
async fn a_stream_longer_than_idle_stop_is_never_interrupted() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let d = Daemon::start(&[("st", &module(&p, "0", "idle_stop = \"1s\"\n"))]).await;
    d.wait_module("st", T, |_, h, _| h == "standby").await;
    let a = addr(p.listen);
    // The stream lasts 4 s: four times idle_stop.
    let body = tokio::task::spawn_blocking(move || get(a, "/stream", Duration::from_secs(15)))
        .await
        .expect("join")
        .expect("the stream is served");
    assert!(
        body.trim_end().ends_with("done"),
        "the stream ran to its end: {body}"
    );
    assert!(body.matches("tick").count() >= 6, "{body}");
    let c = d
        .module("st")
        .await
        .connections()
        .await
        .expect("Connections");
    assert_eq!(c, 0);
}

#[tokio::test]
async fn many_first_connections_are_held_and_served_and_beyond_max_pending_refused() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let d = Daemon::start(&[("many", &module(&p, "1", "max_pending = 64\n"))]).await;
    d.wait_module("many", T, |_, h, _| h == "standby").await;
    let a = addr(p.listen);
    let clients: Vec<_> = (0..50)
        .map(|_| tokio::task::spawn_blocking(move || get(a, "/", Duration::from_secs(20))))
        .collect();
    for c in clients {
        let body = c
            .await
            .expect("join")
            .expect("every held connection is served");
        assert!(body.ends_with("hello"));
    }
    drop(d);
    // max_pending = 5: of 20 concurrent first connections, the excess is closed at once.
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let d = Daemon::start(&[("few", &module(&p, "2", "max_pending = 5\n"))]).await;
    d.wait_module("few", T, |_, h, _| h == "standby").await;
    let a = addr(p.listen);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            tokio::task::spawn_blocking(move || {
                (get(a, "/", Duration::from_secs(20)), t0.elapsed())
            })
        })
        .collect();
    let mut served = 0;
    let mut refused = 0;
    for c in clients {
        match c.await.expect("join") {
            (Ok(_), _) => served += 1,
            (Err(_), took) => {
                refused += 1;
                assert!(
                    took < Duration::from_millis(1500),
                    "refused, not hung: {took:?}"
                );
            }
        }
    }
    assert!(
        served >= 5 && refused >= 10,
        "served {served}, refused {refused}"
    );
}

#[tokio::test]
async fn a_start_that_fails_closes_the_held_connections_with_the_reason() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let m = format!(
        "trusted = true\n[native]\ncommand = [\"sh\", \"-c\", \"echo 'error: model file is corrupt' >&2; sleep 0.5; exit 1\"]\n[health]\ntcp = \"127.0.0.1:{u}\"\n[restart]\npolicy = \"no\"\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\non_demand = true\n",
        l = p.listen,
        u = p.upstream
    );
    let d = Daemon::start(&[("bad", &m)]).await;
    d.wait_module("bad", T, |_, h, _| h == "standby").await;
    let a = addr(p.listen);
    let t0 = Instant::now();
    let r = tokio::task::spawn_blocking(move || get(a, "/", Duration::from_secs(20)))
        .await
        .expect("join");
    assert!(r.is_err(), "no answer from a failed start: {r:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "closed promptly: {:?}",
        t0.elapsed()
    );
    let (s, _, reason) = d.wait_state("bad", "failed").await;
    assert_eq!(s, "failed");
    assert!(reason.contains("exit-code 1"), "{reason}");
}

fn completion(a: SocketAddr) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&a, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let body = r#"{"prompt":"Hello","n_predict":4}"#;
    write!(
        s,
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A real llama-server under the testbed's systemd, on demand: nothing runs before the first
/// request, which is served on the first try; a `kill -9` of modvisord leaves the engine
/// running and the next modvisord adopts it and serves the address again; idle, it stops.
#[tokio::test]
async fn llama_server_on_demand_under_systemd_adopted_after_kill_9_and_idle_stopped() {
    let name = format!("odl{}", std::process::id());
    let unit = format!("modvisor-{name}.service");
    let _u = Units(vec![unit.clone()]);
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let llama = llama_dir();
    let m = format!(
        "trusted = true\n[native]\ncommand = [\"{}\", \"-m\", \"{}\", \"--host\", \"127.0.0.1\", \"--port\", \"${{port}}\"]\n[health]\nhttp = \"http://127.0.0.1:{u}/health\"\ninterval = \"300ms\"\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\non_demand = true\nidle_stop = \"4s\"\n",
        llama.join("bin/llama-server").display(),
        llama.join("tiny.gguf").display(),
        l = p.listen,
        u = p.upstream
    );
    let opts = Options {
        backend: "systemd",
        ..Options::default()
    };
    let mut d = Daemon::start_with(&[(&name, &m)], opts).await;
    d.wait_module(&name, T, |_, h, _| h == "standby").await;
    assert_eq!(
        d.module(&name).await.main_pid().await.expect("MainPID"),
        0,
        "nothing before the first request"
    );
    let a = addr(p.listen);
    let out = tokio::task::spawn_blocking(move || completion(a))
        .await
        .expect("join")
        .expect("first request");
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("\"content\""),
        "{out}"
    );
    let pid = d.module(&name).await.main_pid().await.expect("MainPID");
    assert!(pid > 0);
    // kill -9 of modvisord: the unit lives on; the next modvisord adopts it (same PID) and
    // listens again.
    d.kill9();
    assert!(alive(pid));
    d.spawn(&[]).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(
        d.module(&name).await.main_pid().await.expect("MainPID"),
        pid,
        "adopted, no second copy"
    );
    let out = tokio::task::spawn_blocking(move || completion(a))
        .await
        .expect("join")
        .expect("after the restart");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // Idle: stopped (no process, the unit inactive), standby, the Manager online.
    d.wait_module(&name, Duration::from_secs(30), |s, h, _| {
        s == "inactive" && h == "standby"
    })
    .await;
    assert!(!alive(pid), "the engine is gone after the idle stop");
    assert_eq!(d.manager().await.health().await.expect("Health"), "online");
}

/// PIDs of live processes whose command line has `--port PORT` (the engine of that upstream,
/// whoever started it: modvisord's child, a unit's, a container's).
fn engines_on(port: u16) -> Vec<u32> {
    let want = format!("\0--port\0{port}\0");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = format!(
            "\0{}\0",
            String::from_utf8_lossy(&cmd).trim_end_matches('\0')
        );
        if cmd.contains(&want) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until no engine listens on `port`'s command line.
async fn no_engine_on(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = engines_on(port);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "engine processes on port {port} still alive after {within:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A model directory with tiny.gguf and broken.gguf (truncated: GGUF magic, then nothing
/// usable), as tests/llama.rs makes them.
fn models() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    let tiny = llama_dir().join("tiny.gguf");
    std::fs::copy(&tiny, t.path().join("tiny.gguf")).expect("copy");
    let bytes = std::fs::read(&tiny).expect("read");
    std::fs::write(
        t.path().join("broken.gguf"),
        &bytes[..bytes.len().min(4096)],
    )
    .expect("write");
    t
}

/// A native llama-server on `p.upstream` behind `p.listen`, on demand, with `model`.
fn llama_native(p: &Ports, model: &std::path::Path, extra: &str) -> String {
    let llama = llama_dir();
    format!(
        "trusted = true\n[runtime]\nstop_timeout = \"3s\"\n[native]\ncommand = [\"{}\", \"-m\", \"{}\", \"--host\", \"127.0.0.1\", \"--port\", \"${{port}}\"]\n[health]\nhttp = \"http://127.0.0.1:{u}/health\"\ninterval = \"300ms\"\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\non_demand = true\n{extra}",
        llama.join("bin/llama-server").display(),
        model.display(),
        l = p.listen,
        u = p.upstream
    )
}

/// `POST /completion` through `a` answered 200 with generated content, first try.
async fn completes_through(a: SocketAddr) {
    let out = tokio::task::spawn_blocking(move || completion(a))
        .await
        .expect("join")
        .expect("the request is served on the first try");
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("\"content\""),
        "{out}"
    );
}

/// A real llama-server under the direct backend (modvisord's own child), on demand: no
/// process before the first request; the first `POST /completion` is held during the load
/// and served; after idle_stop the process is gone, the module in standby, the Manager online;
/// the next request starts a new one.
#[tokio::test]
async fn llama_server_on_demand_under_the_direct_backend() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let name = format!("odd{}", std::process::id());
    let m = llama_native(&p, &llama_dir().join("tiny.gguf"), "idle_stop = \"2s\"\n");
    let d = Daemon::start(&[(&name, &m)]).await;
    let (s, _, r) = d.wait_module(&name, T, |_, h, _| h == "standby").await;
    assert_eq!(s, "inactive", "{r}");
    let od = d.module(&name).await;
    assert_eq!(od.main_pid().await.expect("MainPID"), 0);
    assert!(
        engines_on(p.upstream).is_empty(),
        "no process before the first request"
    );
    let a = addr(p.listen);
    completes_through(a).await;
    let pid = od.main_pid().await.expect("MainPID");
    assert!(pid > 0 && alive(pid));
    assert_eq!(engines_on(p.upstream), vec![pid], "one engine, modvisord's");
    let (_, _, r) = d
        .wait_module(&name, T, |s, h, _| s == "inactive" && h == "standby")
        .await;
    assert_eq!(
        r,
        format!(
            "stopped after 2s idle; starts on the next connection to 127.0.0.1:{}",
            p.listen
        )
    );
    no_engine_on(p.upstream, Duration::from_secs(5)).await;
    assert!(!alive(pid), "the engine is gone after the idle stop");
    let mgr = d.manager().await;
    assert_eq!(mgr.health().await.expect("Health"), "online");
    assert_eq!(mgr.modules_offline().await.expect("ModulesOffline"), 0);
    assert_eq!(od.main_pid().await.expect("MainPID"), 0);
    // The next request starts it again: a new engine.
    completes_through(a).await;
    let again = od.main_pid().await.expect("MainPID");
    assert!(again > 0 && again != pid && alive(again));
    assert_eq!(
        d.log()
            .matches("on demand: connection from 127.0.0.1")
            .count(),
        2
    );
}

/// Containers of a module, by its label, running or not (the engine's own view).
fn podman_containers(module: &str) -> Vec<String> {
    let out = std::process::Command::new("podman")
        .args([
            "ps",
            "-a",
            "--filter",
            &format!("label=org.modvisor.module={module}"),
            "--format",
            "{{.ID}} {{.Names}} {{.Status}}",
        ])
        .output()
        .expect("podman must be installed (testbed/install.sh)");
    assert!(
        out.status.success(),
        "podman ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

struct PodmanCleanup(String);

impl Drop for PodmanCleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.0])
            .output();
    }
}

/// A real llama-server as a Podman container (host network, the image of
/// engines/build-llama-image.sh), on demand: no container before the first request; the first
/// `POST /completion` is served; after idle_stop no container has the module's label, the
/// module is in standby, the Manager online; the next request starts a new container.
#[tokio::test]
async fn llama_server_on_demand_as_a_podman_container() {
    let sock = std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into());
    assert!(
        std::path::Path::new(&sock).exists(),
        "the Podman API socket must exist (testbed/up.sh starts it): {sock}"
    );
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let name = format!("odc{}", std::process::id());
    let _c = PodmanCleanup(format!("modvisor-{name}"));
    let models = models();
    let m = format!(
        "trusted = true\n[runtime]\nstop_timeout = \"3s\"\n[container]\nimage = \"localhost/llama-server:test\"\ncommand = [\"-m\", \"/models/tiny.gguf\", \"--host\", \"127.0.0.1\", \"--port\", \"{u}\"]\nnetwork = \"host\"\nvolumes = [\"{}:/models:ro\"]\n[health]\nhttp = \"http://127.0.0.1:{u}/health\"\ninterval = \"300ms\"\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\non_demand = true\nidle_stop = \"2s\"\n",
        models.path().display(),
        l = p.listen,
        u = p.upstream
    );
    let d = Daemon::start_with(
        &[(&name, &m)],
        Options {
            runtime_extra: format!("container_socket = \"{sock}\"\n"),
            ..Options::default()
        },
    )
    .await;
    d.wait_module(&name, T, |s, h, _| s == "inactive" && h == "standby")
        .await;
    assert!(
        podman_containers(&name).is_empty(),
        "no container before the first request"
    );
    let a = addr(p.listen);
    completes_through(a).await;
    let od = d.module(&name).await;
    assert_eq!(od.mode().await.expect("Mode"), "container");
    let id = od.container_id().await.expect("ContainerId");
    let running = podman_containers(&name);
    assert!(
        running.len() == 1 && id.starts_with(running[0].split(' ').next().unwrap_or("-")),
        "{running:?} vs {id}"
    );
    let (_, _, r) = d
        .wait_module(&name, Duration::from_secs(30), |s, h, _| {
            s == "inactive" && h == "standby"
        })
        .await;
    assert!(
        r.starts_with("stopped after 2s idle; starts on the next connection"),
        "{r}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !podman_containers(&name).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a container is left after the idle stop: {:?}",
            podman_containers(&name)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        engines_on(p.upstream).is_empty(),
        "no engine process either"
    );
    assert_eq!(d.manager().await.health().await.expect("Health"), "online");
    // The next request starts a new container.
    completes_through(a).await;
    let again = od.container_id().await.expect("ContainerId");
    assert!(!again.is_empty() && again != id, "{again} vs {id}");
    assert_eq!(podman_containers(&name).len(), 1);
}

/// What a start on demand of llama-server on a truncated GGUF did: the daemon, how long the
/// three held connections took to be closed, the module's (state, health, reason), and the
/// module's own output (its log file).
struct BrokenStart {
    daemon: Daemon,
    name: String,
    took: Duration,
    shown: (String, String, String),
    output: String,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start_on_a_broken_model(restart: &str) -> BrokenStart {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let name = format!("odb{}", std::process::id());
    let models = models();
    let logs = tempfile::tempdir().expect("tempdir");
    let m = llama_native(&p, &models.path().join("broken.gguf"), restart);
    let d = Daemon::start_with(
        &[(&name, &m)],
        Options {
            extra_config: format!(
                "[logging]\nmodule_log_dir = \"{}\"\n",
                logs.path().display()
            ),
            ..Options::default()
        },
    )
    .await;
    d.wait_module(&name, T, |_, h, _| h == "standby").await;
    let a = addr(p.listen);
    let t0 = Instant::now();
    let held: Vec<_> = (0..3)
        .map(|_| tokio::task::spawn_blocking(move || get(a, "/health", Duration::from_secs(30))))
        .collect();
    for h in held {
        let r = h.await.expect("join");
        assert!(r.is_err(), "no answer from a failed start: {r:?}");
    }
    let took = t0.elapsed();
    let shown = d.wait_state(&name, "failed").await;
    assert!(engines_on(p.upstream).is_empty(), "no engine left");
    let mut output = String::new();
    for e in std::fs::read_dir(logs.path()).expect("log dir").flatten() {
        output.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
    }
    BrokenStart {
        daemon: d,
        name,
        took,
        shown,
        output,
        _dirs: (models, logs),
    }
}

/// llama-server's own words for a model it cannot load.
fn names_the_load_error(text: &str) -> bool {
    text.contains("exiting due to model loading error")
        || text.contains("failed to load model")
        || text.contains("error loading model")
}

/// A start on demand that fails on a broken model (a truncated GGUF, restart.policy = "no"):
/// the connections held for it are closed promptly, the module is failed (not standby), and
/// llama-server's error is in the module's output.
#[tokio::test]
async fn a_llama_server_that_fails_on_a_broken_model_closes_the_held_connections() {
    let b = start_on_a_broken_model("[restart]\npolicy = \"no\"\n").await;
    assert!(
        b.took < Duration::from_secs(10),
        "closed promptly: {:?}",
        b.took
    );
    let (s, h, reason) = &b.shown;
    assert_eq!((s.as_str(), h.as_str()), ("failed", "offline"), "{reason}");
    assert!(reason.contains("exited: exit-code 1"), "{reason}");
    assert!(names_the_load_error(&b.output), "{}", b.output);
}

/// The reason of such a failed start names the engine's own error line, as the reason of a
/// failed model activation does.
#[tokio::test]
async fn the_reason_of_a_start_that_fails_on_a_broken_model_names_the_engine_error() {
    let b = start_on_a_broken_model("[restart]\npolicy = \"no\"\n").await;
    // The line is in the output modvisord keeps: the decision's reason quotes it
    // ("pid N exited: exit-code 1: LINE; ...").
    let (_, _, reason) = b
        .daemon
        .wait_module(&b.name, T, |_, _, r| names_the_load_error(r))
        .await;
    assert!(reason.contains("exited: exit-code 1: "), "{reason}");
}

/// Two modules cannot listen on one address: the later manifest (in name order) is refused
/// at the line and column of the address, the earlier one keeps it and serves.
#[tokio::test]
async fn a_listen_address_of_another_module_is_a_manifest_error_at_its_line() {
    let p = Ports {
        listen: free_port(),
        upstream: free_port(),
    };
    let q = Ports {
        listen: p.listen,
        upstream: free_port(),
    };
    let d = Daemon::start(&[("lsa", &module(&p, "0", "")), ("lsb", &module(&q, "0", ""))]).await;
    d.wait_module("lsa", T, |_, h, _| h == "standby").await;
    let m = d.manager().await;
    let errors = m.manifest_errors().await.expect("ManifestErrors");
    let lsb = d.modules.join("lsb.toml");
    let text = std::fs::read_to_string(&lsb).expect("manifest");
    let at = text
        .find(&format!("\"127.0.0.1:{}\"", p.listen))
        .expect("the address");
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    let want = format!(
        "{}:{line}:{col}: serve.listen: 127.0.0.1:{} is already a listen address of module \"lsa\" ({})",
        lsb.display(),
        p.listen,
        d.modules.join("lsa.toml").display()
    );
    assert!(
        errors.iter().any(|(_, e)| *e == want),
        "{want}\nin {errors:?}"
    );
    assert!(
        !m.list_modules()
            .await
            .expect("ListModules")
            .iter()
            .any(|r| r.0 == "lsb"),
        "the later module is not loaded"
    );
    let a = addr(p.listen);
    let body = tokio::task::spawn_blocking(move || get(a, "/", Duration::from_secs(15)))
        .await
        .expect("join")
        .expect("the earlier module serves the address");
    assert!(body.ends_with("hello"), "{body}");
}
