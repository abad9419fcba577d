//! `[metrics]` against real components: Debian's Prometheus scrapes a real modvisord every
//! second and its query API shows the module's health, then the change after StopModule;
//! `promtool check metrics` accepts the endpoint's output. Every wait is bounded; a missing
//! component fails the test.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

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
