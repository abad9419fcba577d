//! Health probes (http, tcp, exec) and the hysteresis that turns their results into health.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::manifest::Probe;
use crate::reaper;

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub ok: bool,
    /// For humans: "HTTP 200", "connect 127.0.0.1:8080: Connection refused", "timed out after 2s".
    pub detail: String,
    /// The engine says it is still loading (HTTP 503): progress, not failure, in the start phase.
    pub loading: bool,
}

impl ProbeResult {
    fn fail(detail: String) -> Self {
        ProbeResult {
            ok: false,
            detail,
            loading: false,
        }
    }
}

pub fn describe(p: &Probe) -> String {
    match p {
        Probe::Http { url, .. } => format!("GET {url}"),
        Probe::Tcp { address } => format!("tcp {address}"),
        Probe::Exec { argv } => format!("exec {}", argv.join(" ")),
    }
}

/// Runs one probe, bounded by `timeout`.
pub async fn probe(p: &Probe, timeout: Duration) -> ProbeResult {
    match tokio::time::timeout(timeout, probe_inner(p)).await {
        Ok(r) => r,
        Err(_) => ProbeResult::fail(format!("{} timed out after {timeout:?}", describe(p))),
    }
}

async fn probe_inner(p: &Probe) -> ProbeResult {
    match p {
        Probe::Tcp { address } => match TcpStream::connect(address.as_str()).await {
            Ok(_) => ProbeResult {
                ok: true,
                detail: format!("tcp {address} accepted"),
                loading: false,
            },
            Err(e) => ProbeResult::fail(format!("connect {address}: {e}")),
        },
        Probe::Http { url, expect } => http_get(url, expect.as_deref()).await,
        Probe::Exec { argv } => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let mut child = match reaper::spawn(&mut cmd) {
                Ok(c) => c,
                Err(e) => return ProbeResult::fail(format!("exec {}: {e}", argv[0])),
            };
            let pid = child.id().unwrap_or(0);
            let st = child.wait().await;
            reaper::forget(pid);
            match st {
                Ok(s) if s.success() => ProbeResult {
                    ok: true,
                    detail: "exec exited 0".into(),
                    loading: false,
                },
                Ok(s) => ProbeResult::fail(format!("exec {} exited with {s}", argv[0])),
                Err(e) => ProbeResult::fail(format!("exec {}: {e}", argv[0])),
            }
        }
    }
}

async fn http_get(url: &str, expect: Option<&str>) -> ProbeResult {
    let Some(rest) = url.strip_prefix("http://") else {
        return ProbeResult::fail(format!("unsupported URL {url}"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = match TcpStream::connect(hostport).await {
        Ok(s) => s,
        Err(e) => return ProbeResult::fail(format!("connect {hostport}: {e}")),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: modvisord\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return ProbeResult::fail(format!("GET {url}: {e}"));
    }
    let mut buf = Vec::with_capacity(1024);
    if let Err(e) = (&mut s).take(64 * 1024).read_to_end(&mut buf).await
        && buf.is_empty()
    {
        return ProbeResult::fail(format!("GET {url}: {e}"));
    }
    let text = String::from_utf8_lossy(&buf);
    let status: Option<u16> = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok());
    let Some(status) = status else {
        return ProbeResult::fail(format!("GET {url}: not an HTTP response"));
    };
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if !(200..300).contains(&status) {
        return ProbeResult {
            ok: false,
            detail: format!("GET {url}: HTTP {status}"),
            loading: status == 503,
        };
    }
    if let Some(want) = expect
        && !body.contains(want)
    {
        return ProbeResult::fail(format!(
            "GET {url}: HTTP {status} but the body lacks \"{want}\""
        ));
    }
    ProbeResult {
        ok: true,
        detail: format!("GET {url}: HTTP {status}"),
        loading: false,
    }
}

/// Consecutive-result counting: `failures` bad results in a row flip to unhealthy,
/// `successes` good ones flip back; anything shorter never changes the verdict (no flapping).
#[derive(Debug, Clone)]
pub struct Hysteresis {
    failures: u32,
    successes: u32,
    good_streak: u32,
    bad_streak: u32,
    healthy: Option<bool>,
}

impl Hysteresis {
    pub fn new(failures: u32, successes: u32) -> Self {
        Hysteresis {
            failures: failures.max(1),
            successes: successes.max(1),
            good_streak: 0,
            bad_streak: 0,
            healthy: None,
        }
    }

    /// Feeds one result; returns the verdict (None until the first threshold is reached).
    pub fn feed(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.good_streak += 1;
            self.bad_streak = 0;
            if self.good_streak >= self.successes {
                self.healthy = Some(true);
            }
        } else {
            self.bad_streak += 1;
            self.good_streak = 0;
            if self.bad_streak >= self.failures && self.healthy.is_some() {
                self.healthy = Some(false);
            }
        }
        self.healthy
    }

    pub fn bad_streak(&self) -> u32 {
        self.bad_streak
    }

    pub fn verdict(&self) -> Option<bool> {
        self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bad_answer_never_flips() {
        let mut h = Hysteresis::new(3, 2);
        assert_eq!(
            h.feed(false),
            None,
            "failures before the first success keep the start phase"
        );
        assert_eq!(h.feed(true), None);
        assert_eq!(h.feed(true), Some(true));
        for _ in 0..10 {
            assert_eq!(h.feed(false), Some(true));
            assert_eq!(h.feed(false), Some(true));
            assert_eq!(h.feed(true), Some(true));
        }
        h.feed(false);
        h.feed(false);
        assert_eq!(h.feed(false), Some(false));
        assert_eq!(
            h.feed(true),
            Some(false),
            "one success is not enough with successes = 2"
        );
        assert_eq!(h.feed(true), Some(true));
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_sockets() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\nloading",
                    )
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        assert!(
            probe(
                &Probe::Tcp {
                    address: addr.to_string()
                },
                t
            )
            .await
            .ok
        );
        let r = probe(
            &Probe::Http {
                url: format!("http://{addr}/health"),
                expect: None,
            },
            t,
        )
        .await;
        assert!(!r.ok && r.loading, "{r:?}");
        assert!(r.detail.ends_with("HTTP 503"), "{}", r.detail);
        let r = probe(
            &Probe::Exec {
                argv: vec!["/bin/false".into()],
            },
            t,
        )
        .await;
        assert!(!r.ok);
    }
}
