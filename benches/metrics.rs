//! Metrics benchmarks (plain `harness = false`): `cargo bench --bench metrics`.
//! - one scrape's rendering of a synthetic snapshot of 500 modules, both text formats
//!   (goal: at most 5 ms);
//! - the extra resident memory of a real modvisord with `[metrics]` (goal: at most 2 MiB):
//!   VmRSS of modvisord with 20 modules, without and with metrics (idle, then after 200
//!   scrapes), median of 3 runs each.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modvisor::metrics::{Format, SelfStats, render};
use modvisor::state::{Health, ModuleCounters, ModuleStatus, Snapshot, State};

fn bench<F: FnMut()>(name: &str, min_time: Duration, mut f: F) {
    f();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < min_time {
        f();
        n += 1;
    }
    let per = t0.elapsed() / n.max(1) as u32;
    println!("{name:<52} {n:>8} iterations  {per:>12?} per iteration");
}

fn synthetic(n: usize) -> Arc<Snapshot> {
    let mut s = Snapshot::default();
    for i in 0..n {
        let mut c = ModuleCounters::default();
        for k in 0..50 {
            c.observe_probe(0.0007 * k as f64, k % 7 != 0);
        }
        c.last_start_seconds = 1.25;
        let name = format!("module-{i:03}");
        s.modules.insert(
            name.clone(),
            std::sync::Arc::new(ModuleStatus {
                name,
                description: "a synthetic module".into(),
                mode: "native".into(),
                mode_reason: "preferred".into(),
                backend: "systemd".into(),
                state: State::Running,
                health: if i % 10 == 0 {
                    Health::Degraded
                } else {
                    Health::Online
                },
                health_reason: "GET http://127.0.0.1:8080/health: HTTP 200".into(),
                unit: String::new(),
                container_id: String::new(),
                main_pid: 1000 + i as u32,
                memory_bytes: 512 << 20,
                memory_max_bytes: 8 << 30,
                vram_bytes: 2 << 30,
                vram_by_gpu: Vec::new(),
                restarts: (i % 3) as u32,
                active_model: "/srv/models/tiny.gguf".into(),
                since_us: 0,
                manifest_path: String::new(),
                counters: c,
                connections: 0,
                last_activity_us: 0,
                idle_stop_at_us: 0,
                on_demand: false,
                ram_peak_bytes: 0,
                vram_peak_bytes: 0,
                footprint_source: String::new(),
                pinned: false,
                priority: 0,
                evictable: false,
            }),
        );
    }
    s.gpus = (0..4)
        .map(|i| (i, "GPU".into(), format!("GPU-{i}"), 24 << 30, 10 << 30))
        .collect();
    Arc::new(s)
}

fn scrape_time() {
    let snap = synthetic(500);
    let me = SelfStats::read();
    for (label, format) in [
        ("OpenMetrics", Format::OpenMetrics),
        ("Prometheus text", Format::Prometheus),
    ] {
        let size = render(snap.clone(), me, format).expect("render").len();
        bench(
            &format!("render 500 modules, {label} ({} KiB)", size / 1024),
            Duration::from_secs(3),
            || {
                let t = render(snap.clone(), me, format).expect("render");
                assert!(t.len() > 100_000);
            },
        );
    }
}

/// A modvisord on its embedded bus with `modules` sleeping modules; returns once READY=1.
fn start_daemon(dir: &Path, modules: usize, metrics_port: Option<u16>) -> Child {
    let mods = dir.join("modules.d");
    std::fs::create_dir_all(&mods).expect("mkdir");
    for i in 0..modules {
        std::fs::write(
            mods.join(format!("m{i}.toml")),
            "trusted = true\n[native]\ncommand = [\"/bin/sleep\", \"1000\"]\n[health]\nexec = [\"/bin/true\"]\ninterval = \"1s\"\n",
        )
        .expect("manifest");
    }
    let metrics = metrics_port
        .map(|p| format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    let cfg = dir.join("modvisor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[paths]\nmodules = [\"{}\"]\nstate = \"{1}/state\"\nruntime = \"{1}/run\"\n[runtime]\nnative_backend = \"direct\"\n[dbus]\nbus = \"embedded\"\n{metrics}",
            mods.display(),
            dir.display()
        ),
    )
    .expect("config");
    let notify = dir.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_modvisord"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("MODVISOR_BUS_ADDRESS")
        .env("NOTIFY_SOCKET", &notify)
        .env("MODVISOR_LOG_STDERR", "1")
        .env("MODVISOR_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn modvisord");
    let mut buf = [0u8; 4096];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => return child,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("modvisord did not say READY=1 within 20 s: {e}");
            }
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn scrape(port: u16) -> usize {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n")
        .expect("write");
    let mut body = Vec::new();
    s.read_to_end(&mut body).expect("read");
    body.len()
}

fn stop(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

/// (idle RSS, RSS after 200 scrapes) in KiB of one daemon run.
fn one_run(metrics: bool) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = start_daemon(dir.path(), 20, metrics.then_some(port));
    // Settle: every module started and probed, a few sampling passes.
    std::thread::sleep(Duration::from_secs(6));
    let idle = vm_rss_kib(child.id());
    if metrics {
        for _ in 0..200 {
            assert!(scrape(port) > 1000);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = vm_rss_kib(child.id());
    stop(child);
    (idle, after)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn rss() {
    let runs = |metrics: bool| -> (Vec<u64>, Vec<u64>) { (0..3).map(|_| one_run(metrics)).unzip() };
    let (base, _) = runs(false);
    let (idle, scraped) = runs(true);
    let (base, idle, scraped) = (median(base), median(idle), median(scraped));
    println!("modvisord VmRSS, 20 modules, no [metrics]            {base:>8} KiB");
    println!(
        "modvisord VmRSS, 20 modules, [metrics], idle          {idle:>8} KiB  ({:+} KiB)",
        idle as i64 - base as i64
    );
    println!(
        "modvisord VmRSS, 20 modules, [metrics], 200 scrapes   {scraped:>8} KiB  ({:+} KiB)",
        scraped as i64 - base as i64
    );
}

fn main() {
    scrape_time();
    rss();
}
