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
    let Some(u) = crate::manifest::probe::http_url(url) else {
        return ProbeResult::fail(format!("unsupported URL {url}"));
    };
    let (hostport, path) = (u.hostport, u.path);
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

/// Probes forever: quickly until the first success (20 ms after the first try, doubling up to
/// 250 ms, never slower than `interval`), so a module shows online as soon as it is (an engine
/// that restarts in 30 ms is online ~40 ms later), then every `interval`. Each result goes to
/// `report`; the loop ends when `report` returns false.
pub async fn probe_loop<F, Fut>(
    mut probe: F,
    interval: Duration,
    mut report: impl FnMut(ProbeResult) -> bool,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ProbeResult>,
{
    let mut passed = false;
    let mut quick = START_PROBE_FIRST;
    loop {
        let result = probe().await;
        passed |= result.ok;
        if !report(result) {
            return;
        }
        let wait = if passed {
            interval
        } else {
            let w = quick.min(interval);
            quick = (quick * 2).min(START_PROBE_MAX);
            w
        };
        tokio::time::sleep(wait).await;
    }
}

/// The start phase's probing: the first wait, doubled after each failure up to the last.
const START_PROBE_FIRST: Duration = Duration::from_millis(20);
const START_PROBE_MAX: Duration = Duration::from_millis(250);

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

    /// Virtual time: a start phase of ten failures probes at 0, 20, 60, 140, 300 ms, then every
    /// 250 ms; a short interval caps it.
    #[tokio::test(start_paused = true)]
    async fn the_start_phase_probes_on_a_short_backoff() {
        for (interval, want) in [
            (5000, vec![0, 20, 60, 140, 300, 550, 800, 1050]),
            (30, vec![0, 20, 50, 80, 110, 140, 170, 200]),
        ] {
            let t0 = tokio::time::Instant::now();
            let mut times = Vec::new();
            probe_loop(
                || async {
                    ProbeResult {
                        ok: false,
                        detail: String::new(),
                        loading: true,
                    }
                },
                Duration::from_millis(interval),
                |_| {
                    times.push(t0.elapsed().as_millis() as u64);
                    times.len() < want.len()
                },
            )
            .await;
            assert_eq!(times, want, "interval {interval} ms");
        }
    }

    /// Virtual time: a flapping engine (good, bad, good, bad...) never changes the verdict;
    /// three bad answers in a row turn it offline at exactly the third bad probe; two good ones
    /// bring it back. Timing follows the interval exactly.
    #[tokio::test(start_paused = true)]
    async fn probe_loop_hysteresis_on_a_paused_clock() {
        use std::sync::{Arc, Mutex};
        let t0 = tokio::time::Instant::now();
        // Start phase: 2 failures (loading), then 2 successes; flapping; down; up.
        let script: Vec<bool> = [
            vec![false, false, true, true],
            vec![false, true, false, true, false, true],
            vec![false, false, false],
            vec![true, false, true, true],
        ]
        .concat();
        let calls = Arc::new(Mutex::new(0usize));
        type Log = Arc<Mutex<Vec<(u64, Option<bool>)>>>;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let mut h = Hysteresis::new(3, 2);
        let (c2, l2) = (calls.clone(), log.clone());
        let n = script.len();
        probe_loop(
            move || {
                let i = {
                    let mut c = c2.lock().expect("lock");
                    *c += 1;
                    *c - 1
                };
                let ok = script[i.min(n - 1)];
                async move {
                    ProbeResult {
                        ok,
                        detail: String::new(),
                        loading: !ok,
                    }
                }
            },
            Duration::from_secs(5),
            move |r| {
                let v = h.feed(r.ok);
                let mut l = l2.lock().expect("lock");
                l.push((t0.elapsed().as_millis() as u64, v));
                l.len() < n
            },
        )
        .await;
        let log = log.lock().expect("lock").clone();
        let times: Vec<u64> = log.iter().map(|(t, _)| *t).collect();
        // 20 ms, then 40 ms apart until the first success (third probe), then the 5 s interval.
        assert_eq!(&times[..4], &[0, 20, 60, 5060]);
        let verdicts: Vec<Option<bool>> = log.iter().map(|(_, v)| *v).collect();
        assert_eq!(
            verdicts,
            vec![
                None,
                None,
                None,
                Some(true), // start phase: two successes with successes = 2
                Some(true),
                Some(true),
                Some(true),
                Some(true),
                Some(true),
                Some(true), // flapping: no change
                Some(true),
                Some(true),
                Some(false), // three failures in a row: offline
                Some(false),
                Some(false),
                Some(false),
                Some(true), // one success is not enough
            ]
        );
        // The offline verdict came exactly at the third failure, 5 s after the second.
        assert_eq!(times[12] - times[11], 5000);
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
