//! A real modvisord's listen address ([serve]) against a direct connection to the same upstream,
//! side by side in one run (`cargo bench --bench proxy`): added latency of a small HTTP request
//! (p50/p99), the throughput of a large response (and modvisord's CPU time and context switches
//! per MiB of it), and modvisord's memory per open idle connection. The client and the upstream
//! server live in this process, modvisord in its own.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

const BIG: usize = 256 << 20;

/// An upstream: "GET /s" answers 2 bytes, "GET /big" answers BIG bytes, then closes.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 1024];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                if buf[..n].starts_with(b"GET /big") {
                    let chunk = vec![b'x'; 1 << 20];
                    let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
                    for _ in 0..(BIG >> 20) {
                        if s.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    a
}

/// A real modvisord (its own process, direct backend, private bus) with one `[serve]` module
/// whose listen address forwards to `upstream` (the module's engine is a `sleep`: the upstream
/// server lives in this process). Returns the listen address and modvisord's PID.
async fn proxy(dir: &Path, upstream: SocketAddr) -> (SocketAddr, common::Running) {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let modules = dir.join("modules.d");
    std::fs::create_dir_all(&modules).expect("mkdir");
    std::fs::write(
        modules.join("px.toml"),
        format!(
            "trusted = true\n[native]\ncommand = [\"/bin/sleep\", \"1000\"]\nuser = \"root\"\nsandbox = {{ private_tmp = false, protect_system = false }}\n[serve]\nlisten = [\"{listen}\"]\nupstream = \"{upstream}\"\n"
        ),
    )
    .expect("manifest");
    let config = format!(
        "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\ndefault_mode = \"native\"\nnative_backend = \"direct\"\n",
        modules.display(),
        dir.join("state").display(),
        dir.join("run").display()
    );
    let r = common::start_daemon(dir, &config, &[]).await;
    let m = common::manager(&r.conn).await;
    common::wait_state(&m, "px", "running").await;
    (listen, r)
}

fn rss_kib_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn request(a: SocketAddr, path: &str) -> usize {
    let mut s = TcpStream::connect(a).await.expect("connect");
    let _ = s.set_nodelay(true);
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// CPU time (ns) and context switches (wake-ups, mostly) of all of `pid`'s threads so far.
fn cpu_and_switches(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let (mut ns, mut sw) = (0, 0);
    for t in tasks.flatten() {
        let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
        ns += read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        sw += read("status")
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum::<u64>();
    }
    (ns, sw)
}

/// The large response, direct and proxied in turn, three times each (the best of each is
/// shown: other work on the machine only ever slows a run down), with the CPU time per MiB of
/// this process (client and upstream) and of modvisord, and modvisord's context switches per
/// MiB: those hardly depend on what else runs, and show where a proxied MiB's time goes.
async fn big(up: SocketAddr, px: SocketAddr, pid: u32) {
    request(up, "/big").await;
    request(px, "/big").await;
    let (mut direct, mut proxied) = (0f64, 0f64);
    for round in 1..=3 {
        let mut line = format!("  run {round}:");
        for (a, best) in [(up, &mut direct), (px, &mut proxied)] {
            let ((ns0, sw0), (me0, _)) =
                (cpu_and_switches(pid), cpu_and_switches(std::process::id()));
            let t = Instant::now();
            let mib = request(a, "/big").await as f64 / (1 << 20) as f64;
            let rate = mib / t.elapsed().as_secs_f64();
            *best = best.max(rate);
            let ((ns1, sw1), (me1, _)) =
                (cpu_and_switches(pid), cpu_and_switches(std::process::id()));
            let per = |a: u64, b: u64| (b - a) as f64 / 1e3 / mib;
            line += &format!(
                " {rate:>5.0} MiB/s, client+upstream {:>4.0} µs/MiB",
                per(me0, me1)
            );
            if a == px {
                line += &format!(
                    ", modvisord {:>4.0} µs/MiB and {:.1} context switches/MiB",
                    per(ns0, ns1),
                    (sw1 - sw0) as f64 / mib
                );
            } else {
                line += " direct |";
            }
        }
        println!("{line}");
    }
    println!("256 MiB response, direct   {direct:>8.0} MiB/s (best of 3)");
    println!(
        "256 MiB response, proxied  {proxied:>8.0} MiB/s (best of 3), {:.0} % of direct",
        proxied / direct * 100.0
    );
}

async fn latency(a: SocketAddr) -> (Duration, Duration) {
    let mut v = Vec::new();
    for _ in 0..200 {
        request(a, "/s").await;
    }
    for _ in 0..3000 {
        let t = Instant::now();
        request(a, "/s").await;
        v.push(t.elapsed());
    }
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let up = upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (px, daemon) = proxy(dir.path(), up).await;
    let pid = daemon.daemon.0.id();
    let (d50, d99) = latency(up).await;
    let (p50, p99) = latency(px).await;
    println!("small request, direct   p50 {d50:>10?}  p99 {d99:>10?}");
    println!("small request, proxied  p50 {p50:>10?}  p99 {p99:>10?}");
    println!(
        "added by the proxy      p50 {:>10?}  p99 {:>10?}",
        p50.saturating_sub(d50),
        p99.saturating_sub(d99)
    );
    big(up, px, pid).await;
    // Idle connections held open through modvisord: its own memory per connection.
    let before = rss_kib_of(pid);
    let mut held = Vec::new();
    for _ in 0..2000 {
        held.push(TcpStream::connect(px).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib_of(pid);
    println!(
        "2000 idle proxied connections: modvisord +{} KiB RSS, {:.1} KiB each",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / 2000.0
    );
    drop(held);
}
