//! Admission benchmarks (plain `harness = false`): `cargo bench --bench admission`.
//! - the decision (`admission::decide`, run in the actor before every start) for 100 modules
//!   on 8 GPUs, in three cases: fits, needs evictions (`gpus = "any"`), refused; median and
//!   p99 (goal: at most 100 µs);
//! - a real modvisord (direct backend, private dbus-daemon, the NVML stand-in of
//!   tests/nvml-stub in `auto` mode, one 24 GiB GPU) with two 16 GiB engines: starting the
//!   stopped one evicts the running one. From the daemon's log timestamps: the eviction
//!   decision (t_evict), the victim's state change to inactive (t_exit) and the new module's
//!   change to running (t_start). Reported: t_start - t_exit, median over the runs (goal: at
//!   most 50 ms plus the memory release poll), and t_exit - t_evict (the victim's own stop).
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use modvisor::admission::{
    Foreign, GpuFree, GpuNeed, Holder, Machine, Need, Request, Source, Verdict, decide,
};
use modvisor::dbus::client::ModuleProxy;

mod common;
use common::{WAIT, manager, median, start_daemon, wait_state};
use zbus::proxy::CacheProperties;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------ the decision

const GPUS: u32 = 8;
const GPU_TOTAL: u64 = 80 * GIB;
const VRAM_MARGIN: u64 = 256 * MIB;

/// 100 modules spread over 8 GPUs: 1-6 GiB of VRAM each (every 25th split over two GPUs),
/// 0.5-4 GiB of RAM; every 10th pinned, every 13th with open connections, every 17th still
/// starting (with a reserved share): every GPU has some memory nothing can evict.
fn holders() -> Vec<Holder> {
    (0..100u64)
        .map(|i| {
            let gpu = (i % GPUS as u64) as u32;
            let mut vram = BTreeMap::from([(gpu, (1 + (i * 7) % 6) * GIB)]);
            if i % 25 == 3 {
                vram.insert((gpu + 1) % GPUS, 2 * GIB);
            }
            let ram = (512 + (i * 97) % 3584) * MIB;
            let starting = i % 17 == 0;
            let keep = if i % 10 == 0 {
                Some("pinned".to_string())
            } else if i % 13 == 0 {
                Some("2 open connections".to_string())
            } else if starting {
                Some("starting".to_string())
            } else {
                None
            };
            Holder {
                name: format!("module-{i:03}"),
                ram,
                vram,
                ram_footprint: ram + ram / 4,
                reserved_ram: if starting { GIB } else { 0 },
                reserved_vram: if starting {
                    BTreeMap::from([(gpu, GIB)])
                } else {
                    BTreeMap::new()
                },
                keep,
                priority: (i % 3) as i32 - 1,
                last_used: 1_700_000_000_000_000 + (i * 7919 % 100) * 60_000_000,
            }
        })
        .collect()
}

/// A few GPU processes of no module.
fn foreign() -> Vec<Foreign> {
    [(0, 4 * GIB), (3, 2 * GIB), (5, 6 * GIB), (5, GIB)]
        .into_iter()
        .enumerate()
        .map(|(k, (gpu, bytes))| Foreign {
            gpu,
            pid: 40_000 + k as u32,
            command: "python3".into(),
            bytes,
        })
        .collect()
}

/// The machine these holders and foreign processes are on: 8 × 80 GiB, 768 GiB of RAM, a
/// 400 GiB `ram_budget`.
fn machine(holders: &[Holder], foreign: &[Foreign]) -> Machine {
    let gpus = (0..GPUS)
        .map(|g| {
            let used = holders
                .iter()
                .filter_map(|h| h.vram.get(&g))
                .chain(foreign.iter().filter(|f| f.gpu == g).map(|f| &f.bytes))
                .sum::<u64>()
                + 300 * MIB; // driver context
            assert!(used < GPU_TOTAL, "GPU {g}: {used}");
            GpuFree {
                index: g,
                total: GPU_TOTAL,
                used,
            }
        })
        .collect();
    let ram: u64 = holders.iter().map(|h| h.ram).sum();
    Machine {
        mem_available: 768 * GIB - ram - 12 * GIB,
        ram_budget: Some(400 * GIB),
        gpus,
        ram_margin: 512 * MIB,
        vram_margin: VRAM_MARGIN,
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Times `f` one call at a time (after a warm-up), for `min_time` or at least 1000 calls;
/// returns (calls, median, p99).
fn time_calls<F: FnMut()>(min_time: Duration, mut f: F) -> (usize, Duration, Duration) {
    for _ in 0..200 {
        f();
    }
    let mut v = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < min_time || v.len() < 1000 {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    v.sort_unstable();
    (v.len(), percentile(&v, 50), percentile(&v, 99))
}

fn decision_time() {
    let holders = holders();
    let foreign = foreign();
    let machine = machine(&holders, &foreign);
    // The freest GPU's room as the decision sees it (reserved shares of starting ones out).
    let room = (0..GPUS)
        .map(|g| {
            let gpu = machine.gpus[g as usize];
            let reserved: u64 = holders.iter().filter_map(|h| h.reserved_vram.get(&g)).sum();
            gpu.total - gpu.used - VRAM_MARGIN - reserved
        })
        .max()
        .expect("GPUs");
    let cases = [
        ("fits", GpuNeed::Any(room / 2)),
        ("needs evictions", GpuNeed::Any(room + 12 * GIB)),
        ("refused", GpuNeed::Any(GPU_TOTAL - GIB)),
    ];
    println!(
        "decide(), 100 modules on 8 GPUs of 80 GiB (freest: {:.1} GiB free), gpus = \"any\":",
        room as f64 / GIB as f64
    );
    for (label, gpu) in cases {
        let need = Need {
            ram: 16 * GIB,
            gpu,
            source: Source::Measured,
        };
        let r = Request {
            name: "new-module",
            need: &need,
            holders: &holders,
            foreign: &foreign,
            machine: &machine,
        };
        let what = match decide(&r).verdict {
            Verdict::Admit { gpus } if label == "fits" => format!("admit on GPU {gpus:?}"),
            Verdict::Evict { gpus, victims } if label == "needs evictions" => {
                format!("evict {} on GPU {gpus:?}", victims.len())
            }
            Verdict::Refuse(why) if label == "refused" => format!("refuse ({} chars)", why.len()),
            v => panic!("{label}: unexpected verdict {v:?}"),
        };
        let (n, p50, p99) = time_calls(Duration::from_secs(2), || {
            black_box(decide(black_box(&r)));
        });
        println!("  {label:<16} {what:<28} {n:>8} calls  median {p50:>10?}  p99 {p99:>10?}");
    }
}

// ------------------------------------------------------------------ eviction to start

fn build_stub(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml-stub/nvml_stub.c");
    let out = dir.join("libnvidia-ml.so.1");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) must be installed");
    assert!(st.success(), "building the NVML stand-in failed");
    out
}

/// A native engine (a shell exec'ing sleep) that uses 16 GiB on the stand-in GPU while it
/// runs, as root with /tmp visible (like the tests' engines).
fn engine(tag: &str, enabled: bool) -> String {
    format!(
        "trusted = true\nenabled = {enabled}\n[native]\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nenvironment = {{ NVML_STUB_VRAM = \"{tag}:{}\" }}\nuser = \"root\"\nsandbox = {{ private_tmp = false, protect_system = false }}\n[resources]\nvram = \"16G\"\n",
        16 * GIB
    )
}

/// Seconds since midnight (UTC) of a log line's RFC 3339 timestamp ("2025-01-01T12:34:56.789012Z").
fn stamp(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?;
    let time = t.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The timestamp of the first line of `log` containing `what`.
fn find(log: &str, what: &str) -> Option<f64> {
    log.lines().find(|l| l.contains(what)).and_then(stamp)
}

/// Waits until the running `name` has been sampled with its 16 GiB, its footprint is learned
/// (`learn_after`), and it may be evicted.
async fn wait_evictable(p: &ModuleProxy<'_>, name: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let sampled = p.vram_bytes().await.unwrap_or(0) == 16 * GIB;
        let learned = p.footprint_source().await.is_ok_and(|s| s == "measured");
        if sampled && learned && p.evictable().await.unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} not evictable in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const RUNS: usize = 10;

async fn eviction_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tag = format!("bench{}", std::process::id());
    let lib = build_stub(d);
    let figures = d.join("gpus");
    std::fs::write(
        &figures,
        format!(
            "auto {tag}\ngpu Stand-in_GPU_0 GPU-{tag}-0 {} 0\n",
            24 * GIB
        ),
    )
    .expect("figures");
    let modules = d.join("modules.d");
    std::fs::create_dir_all(&modules).expect("mkdir");
    std::fs::write(modules.join("first.toml"), engine(&tag, true)).expect("manifest");
    std::fs::write(modules.join("second.toml"), engine(&tag, false)).expect("manifest");
    let config_text = format!(
        "[paths]\nmodules = [\"{}\"]\nstate = \"{}\"\nruntime = \"{}\"\n[runtime]\ndefault_mode = \"native\"\nnative_backend = \"direct\"\n[monitor]\ninterval = \"1s\"\nnvml_library = \"{}\"\n[admission]\nlearn_after = \"1s\"\nrelease_timeout = \"10s\"\n",
        modules.display(),
        d.join("state").display(),
        d.join("run").display(),
        lib.display()
    );
    let r = start_daemon(d, &config_text, &[("NVML_STUB_FILE", figures.as_os_str())]).await;
    let (conn, log_path) = (&r.conn, r.log.clone());
    let m = manager(conn).await;
    let module = |name: &'static str| {
        ModuleProxy::builder(conn)
            .path(modvisor::dbus::module_path(name))
            .cache_properties(CacheProperties::No)
            .build()
    };
    let (p1, p2) = (
        module("first").await.expect("proxy"),
        module("second").await.expect("proxy"),
    );

    // Each run starts the stopped module, which evicts the running one; then they swap.
    let (mut running, mut stopped) = (("first", &p1), ("second", &p2));
    wait_state(&m, running.0, "running").await;
    // Milliseconds per run: [measure+decide, victim's stop, release poll+decide, spawn,
    // exit to running].
    let mut rows: Vec<[f64; 5]> = Vec::new();
    let mut measured = 0;
    println!(
        "eviction to start, real modvisord (ms): start->evict = first measurement and decision; evict->exit = the victim's own stop; exit->admit = release poll and decision; admit->running = spawn"
    );
    for run in 0..=RUNS {
        wait_evictable(running.1, running.0).await;
        let offset = std::fs::metadata(&log_path).map(|x| x.len()).unwrap_or(0) as usize;
        m.start_module(stopped.0).await.expect("StartModule");
        wait_state(&m, stopped.0, "running").await;
        wait_state(&m, running.0, "inactive").await;
        let text = std::fs::read_to_string(&log_path).expect("log");
        let text = &text[offset..];
        let t = |what: &str| {
            find(text, what).unwrap_or_else(|| panic!("no log line with {what:?}:\n{text}"))
        };
        let t_asked = t(&format!("{}: starting,", stopped.0));
        let t_evict = t(&format!(
            "{} needs memory: evicting {}",
            stopped.0, running.0
        ));
        let t_exit = t(&format!("{}: inactive,", running.0));
        let t_admit = t(&format!("{} admitted after eviction", stopped.0));
        let t_start = t(&format!("{}: running,", stopped.0));
        let row = [
            t_evict - t_asked,
            t_exit - t_evict,
            t_admit - t_exit,
            t_start - t_admit,
            t_start - t_exit,
        ]
        .map(|x| x * 1e3);
        println!(
            "  run {run:>2} ({} evicts {}): start->evict {:>6.1}  evict->exit {:>6.1}  exit->admit {:>6.1}  admit->running {:>6.1}  exit->running {:>6.1}{}",
            stopped.0,
            running.0,
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            if run == 0 {
                "  (warm-up, not counted)"
            } else {
                ""
            }
        );
        if run > 0 {
            rows.push(row);
            // The starter's need from its learned footprint (not the declared 16G)?
            measured += usize::from(text.contains("GPU 0: needs 16.0 GiB (measured peak)"));
        }
        std::mem::swap(&mut running, &mut stopped);
    }
    let col = |i: usize| rows.iter().map(|r| r[i]).collect::<Vec<f64>>();
    let exit_to_running = col(4);
    println!(
        "  median of {RUNS} runs:     start->evict {:>6.1}  evict->exit {:>6.1}  exit->admit {:>6.1}  admit->running {:>6.1}  exit->running {:>6.1} (min {:.1}, max {:.1})",
        median(col(0)),
        median(col(1)),
        median(col(2)),
        median(col(3)),
        median(exit_to_running.clone()),
        exit_to_running
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min),
        exit_to_running.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "  (the starting module's need was its learned footprint in {measured} of {RUNS} runs)"
    );
}

fn main() {
    decision_time();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(eviction_to_start());
}
