//! Start on demand and stop when idle, through modvisord's own listen address ([serve]),
//! against real engines (a small Python HTTP server that takes a moment to start, and a real
//! llama-server under the testbed's systemd), real sockets and real clients.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

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

fn llama_dir() -> std::path::PathBuf {
    let d = std::path::PathBuf::from(
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
