//! `[metrics]` against real components: Debian's Prometheus scrapes a real modvisord every
//! second and its query API shows the module's health, then the change after StopModule;
//! `promtool check metrics` accepts the endpoint's output; on-demand starts, idle stops,
//! evictions and open connections move with real connections through `[serve]`. Every wait is bounded; a missing
//! component fails the test.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.0 GET (so the answer is never chunked), bounded: (status, body).
async fn get(port: u16, path: &str, accept: Option<&str>) -> (u16, String) {
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n");
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf).into_owned()
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("an answer in time");
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
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's prometheus on a free loopback port, with its own config and storage, scraping
/// `target` as job "modvisor" every second.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: modvisor\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus must be installed (testbed/install.sh)");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + T;
        while !Self::ready(port).await {
            assert!(
                Instant::now() < deadline,
                "prometheus is not ready within {T:?}: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p
    }

    async fn ready(port: u16) -> bool {
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(_) => get(port, "/-/ready", None).await.0 == 200,
            Err(_) => false,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The values of an instant query's series.
    async fn query(&self, q: &str) -> Vec<f64> {
        let (code, body) = get(
            self.port,
            &format!("/api/v1/query?query={}", urlencode(q)),
            None,
        )
        .await;
        assert_eq!(code, 200, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["value"][1].as_str().and_then(|x| x.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `q` has exactly one series and `pred` holds for its value.
    async fn wait(&self, q: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + T;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = self.query(q).await;
            if let [v] = last.as_slice()
                && pred(*v)
            {
                return *v;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{q}: not reached within {T:?}, last {last:?}; prometheus log:\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn daemon_with_metrics(name: &str, port: u16) -> Daemon {
    let module = sh_module(
        "exec sleep 1000",
        "[health]\nexec = [\"/bin/true\"]\ninterval = \"1s\"\n",
    );
    Daemon::start_with(
        &[(name, &module)],
        Options {
            extra_config: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            ..Options::default()
        },
    )
    .await
}

#[tokio::test]
async fn prometheus_scrapes_the_health_and_sees_a_stop() {
    let name = format!("mx{}-prom", std::process::id());
    let port = free_port();
    let d = daemon_with_metrics(&name, port).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let prom = Prometheus::start(&format!("127.0.0.1:{port}")).await;
    prom.wait("up{job=\"modvisor\"}", |v| v == 1.0).await;
    let health = |h: &str| format!("modvisor_module_health{{module=\"{name}\",state=\"{h}\"}}");
    let state = |s: &str| format!("modvisor_module_state{{module=\"{name}\",state=\"{s}\"}}");
    prom.wait(&health("online"), |v| v == 1.0).await;
    prom.wait(&state("running"), |v| v == 1.0).await;
    prom.wait(
        &format!("modvisor_module_probe_duration_seconds_count{{module=\"{name}\"}}"),
        |v| v >= 1.0,
    )
    .await;
    prom.wait("process_resident_memory_bytes{job=\"modvisor\"}", |v| {
        v > 0.0
    })
    .await;

    d.manager()
        .await
        .stop_module(&name)
        .await
        .expect("StopModule");
    prom.wait(&state("inactive"), |v| v == 1.0).await;
    prom.wait(&health("offline"), |v| v == 1.0).await;
    prom.wait(&health("online"), |v| v == 0.0).await;
}

#[tokio::test]
async fn promtool_accepts_the_endpoint_and_only_get_metrics_is_served() {
    let name = format!("mx{}-lint", std::process::id());
    let port = free_port();
    let d = daemon_with_metrics(&name, port).await;
    d.wait_module(&name, T, |s, h, _| s == "running" && h == "online")
        .await;
    let (code, text) = get(port, "/metrics", None).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(&format!(
        "modvisor_module_health{{module=\"{name}\",state=\"online\"}} 1"
    )));
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (testbed/install.sh)");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, om) = get(
        port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .await;
    assert_eq!(code, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert_eq!(get(port, "/", None).await.0, 404);
    assert_eq!(get(port, "/metrics/x", None).await.0, 404);
}

/// An HTTP engine on argv[1] that answers GET / with "hello" and GET /stream with a line
/// every 0.2 s for 3 s (a connection that stays open).
const ENGINE: &str = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        if self.path == "/stream":
            for _ in range(15):
                self.wfile.write(b"tick\n"); self.wfile.flush(); time.sleep(0.2)
        self.wfile.write(b"hello")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// An on-demand module behind `listen`, declaring 1 GiB (its footprint for admission).
fn on_demand(listen: u16, upstream: u16, extra: &str) -> String {
    format!(
        "trusted = true\n[native]\ncommand = [\"python3\", \"-c\", {}, \"${{port}}\"]\n[health]\nhttp = \"http://127.0.0.1:{upstream}/\"\ninterval = \"200ms\"\n[resources]\nmemory_max = \"1G\"\n[serve]\nlisten = [\"127.0.0.1:{listen}\"]\nupstream = \"127.0.0.1:{upstream}\"\non_demand = true\n{extra}",
        toml_str(ENGINE)
    )
}

/// GET through a listen address, off the runtime: the whole answer.
async fn through(port: u16, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    })
    .await
    .expect("join")
}

/// Scrapes until every line of `want` is in the output (bounded); returns that output.
async fn scrape_until(port: u16, want: &[String]) -> String {
    let deadline = Instant::now() + T;
    loop {
        let (code, text) = get(port, "/metrics", None).await;
        assert_eq!(code, 200, "{text}");
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "not all of {want:#?} within {T:?} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn promtool_accepts(text: &str) {
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (testbed/install.sh)");
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = lint.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// On-demand starts, idle stops, evictions and open connections per module, counted by a real
/// modvisord as real connections come and go: `oa` is started by a connection and stays; a
/// connection to `ob` (1 GiB declared each, a 1.5 GiB ram_budget) evicts `oa` and holds a
/// stream open; once it ends, `ob` stops after idle_stop. Standby shows in the health gauge;
/// promtool accepts the output at every step.
#[tokio::test]
async fn on_demand_starts_idle_stops_evictions_and_connections_are_counted() {
    let port = free_port();
    let (la, ua, lb, ub) = (free_port(), free_port(), free_port(), free_port());
    let (a, b) = (
        format!("mxa{}", std::process::id()),
        format!("mxb{}", std::process::id()),
    );
    let d = Daemon::start_with(
        &[
            (&a, &on_demand(la, ua, "")),
            (&b, &on_demand(lb, ub, "idle_stop = \"1s\"\n")),
        ],
        Options {
            extra_config: format!(
                "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[admission]\nram_budget = \"1536M\"\nlearn_after = \"10m\"\n"
            ),
            ..Options::default()
        },
    )
    .await;
    let line = |metric: &str, m: &str, v: u64| format!("{metric}{{module=\"{m}\"}} {v}");
    let health = |m: &str, h: &str, v: u64| {
        format!("modvisor_module_health{{module=\"{m}\",state=\"{h}\"}} {v}")
    };
    const STARTS: &str = "modvisor_module_on_demand_starts_total";
    const IDLE: &str = "modvisor_module_idle_stops_total";
    const EVICTED: &str = "modvisor_module_evictions_total";
    const CONNS: &str = "modvisor_module_connections";
    d.wait_module(&a, T, |_, h, _| h == "standby").await;
    d.wait_module(&b, T, |_, h, _| h == "standby").await;
    let text = scrape_until(
        port,
        &[
            health(&a, "standby", 1),
            health(&b, "standby", 1),
            health(&b, "offline", 0),
            line(STARTS, &a, 0),
            line(IDLE, &b, 0),
            line(EVICTED, &a, 0),
            line(CONNS, &b, 0),
        ],
    )
    .await;
    promtool_accepts(&text);

    // A connection starts oa; it has no idle_stop and stays.
    assert!(through(la, "/").await.ends_with("hello"));
    d.wait_module(&a, T, |s, h, _| s == "running" && h == "online")
        .await;
    scrape_until(
        port,
        &[
            line(STARTS, &a, 1),
            health(&a, "online", 1),
            health(&a, "standby", 0),
        ],
    )
    .await;

    // A stream through ob: it starts on demand, evicting the idle oa, and the open
    // connection shows.
    let stream = tokio::spawn(through(lb, "/stream"));
    let text = scrape_until(
        port,
        &[
            line(STARTS, &b, 1),
            line(CONNS, &b, 1),
            line(EVICTED, &a, 1),
            line(EVICTED, &b, 0),
            line(STARTS, &a, 1),
        ],
    )
    .await;
    promtool_accepts(&text);
    let (_, h, r) = d.wait_state(&a, "inactive").await;
    assert_eq!(h, "standby", "{r}");
    assert!(r.starts_with(&format!("evicted to start {b}")), "{r}");
    let body = stream.await.expect("join");
    assert!(body.ends_with("hello"), "the stream ran to its end: {body}");

    // The stream ended: ob stops after idle_stop (1 s), in standby.
    d.wait_module(&b, T, |s, h, _| s == "inactive" && h == "standby")
        .await;
    let text = scrape_until(
        port,
        &[
            line(IDLE, &b, 1),
            line(CONNS, &b, 0),
            line(STARTS, &b, 1),
            line(IDLE, &a, 0),
            health(&b, "standby", 1),
            health(&a, "standby", 1),
        ],
    )
    .await;
    promtool_accepts(&text);
    // Labels are the module only.
    for l in text.lines().filter(|l| {
        [STARTS, IDLE, EVICTED, CONNS]
            .iter()
            .any(|m| l.starts_with(&format!("{m}{{")))
    }) {
        assert!(
            l.starts_with(&format!("{}{{module=\"", l.split('{').next().unwrap_or("")))
                && l.matches('=').count() == 1,
            "{l}"
        );
    }
}

#[test]
fn a_metrics_port_in_use_fails_the_start_with_the_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("modvisor.toml");
    std::fs::write(
        &config,
        format!(
            "[paths]\nmodules = [\"{0}/m\"]\nstate = \"{0}/state\"\nruntime = \"{0}/run\"\n[runtime]\nnative_backend = \"direct\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let bus = Bus::start();
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_modvisord"))
            .arg("--config")
            .arg(&config)
            .arg("--bus-address")
            .arg(&bus.address)
            .env("MODVISOR_LOG_STDERR", "1"),
        dir.path(),
    );
    assert!(!out.0, "modvisord must not start");
    assert!(
        out.1.contains(&format!("metrics: bind 127.0.0.1:{port}")),
        "{}",
        out.1
    );
}

/// Runs to completion within T: (success, stderr).
fn run_bounded(cmd: &mut Command, dir: &Path) -> (bool, String) {
    let err = dir.join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("did not exit within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.success(),
        std::fs::read_to_string(err).unwrap_or_default(),
    )
}
