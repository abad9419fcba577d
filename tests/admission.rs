//! Memory-aware admission and eviction against a real modvisord and real processes.
//!
//! GPU path: no GPU here, so the real nvml-wrapper code loads the stand-in libnvidia-ml.so.1
//! the tests build (tests/nvml-stub), in its `auto` mode: a live process whose environment
//! has `NVML_STUB_VRAM=TAG:BYTES` uses BYTES on the GPU its `CUDA_VISIBLE_DEVICES` names, and
//! frees it when it exits. Engines are real processes started by modvisord; foreign GPU
//! processes are real processes started by the test.
//! RAM path: real llama-servers, a `ram_budget` they do not fit in together.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const GIB: u64 = 1 << 30;

/// A tag of this test process and a name, so that concurrent tests never see each other.
fn tag(what: &str) -> String {
    format!("{what}{}", std::process::id())
}

/// A daemon whose NVML shows `gpus` (total bytes each) in auto mode with `tag`.
async fn gpu_daemon(tag: &str, gpus: &[u64], manifests: &[(&str, &str)]) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = build_nvml_stub(dir.path(), false);
    let figures = dir.path().join("gpus");
    let mut text = format!("auto {tag}\n");
    for (i, total) in gpus.iter().enumerate() {
        text.push_str(&format!("gpu Stand-in_GPU_{i} GPU-{tag}-{i} {total} 0\n"));
    }
    std::fs::write(&figures, text).expect("write figures");
    let o = Options {
        extra_config: format!(
            "nvml_library = \"{}\"\n[admission]\nlearn_after = \"1s\"\nrelease_timeout = \"10s\"\n",
            lib.display()
        ),
        env: vec![("NVML_STUB_FILE".into(), figures.display().to_string())],
        ..Options::default()
    };
    let d = Daemon::start_with(manifests, o).await;
    // The stub's directory lives as long as the test: leak it into the daemon's.
    std::mem::forget(dir);
    d
}

/// A native engine (a shell that sleeps) that uses `vram` bytes of VRAM while it runs.
fn gpu_engine(tag: &str, vram: u64, extra_native: &str, extra: &str) -> String {
    root_engine(&format!(
        "trusted = true\n{extra}\n[native]\ncommand = [\"/bin/sh\", \"-c\", \"exec sleep 1000\"]\nenvironment = {{ NVML_STUB_VRAM = \"{tag}:{vram}\" }}\n{extra_native}\n[resources]\nvram = \"{}G\"\n",
        vram / GIB
    ))
}

/// A process of no module that uses `vram` on GPU `gpu` (killed when dropped).
struct Foreign(Child);

impl Foreign {
    fn start(tag: &str, gpu: u32, vram: u64) -> Foreign {
        let c = Command::new("sleep")
            .arg("600")
            .env("NVML_STUB_VRAM", format!("{tag}:{vram}"))
            .env("CUDA_VISIBLE_DEVICES", gpu.to_string())
            .spawn()
            .expect("spawn sleep");
        Foreign(c)
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The module's main PID once the backend has reported it.
async fn main_pid(d: &Daemon, name: &str) -> u32 {
    let p = d.module(name).await;
    wait_for(&format!("{name}'s MainPID"), || async {
        p.main_pid().await.unwrap_or(0) > 0
    })
    .await;
    p.main_pid().await.expect("MainPID")
}

fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_module_that_does_not_fit_evicts_the_idle_one_and_starts() {
    let t = tag("ev");
    let first = gpu_engine(&t, 16 * GIB, "", "");
    let second = gpu_engine(&t, 16 * GIB, "", "enabled = false");
    let d = gpu_daemon(&t, &[24 * GIB], &[("first", &first), ("second", &second)]).await;
    d.wait_state("first", "running").await;
    let f = d.module("first").await;
    wait_for("first's VRAM sampled", || async {
        f.vram_bytes().await.unwrap_or(0) == 16 * GIB
    })
    .await;
    let first_pid = main_pid(&d, "first").await;
    assert!(f.evictable().await.expect("Evictable"));
    let m = d.manager().await;
    let mut evicted = m.receive_module_evicted().await.expect("subscribe");

    m.start_module("second").await.expect("second starts");
    d.wait_state("second", "running").await;
    let sig = tokio::time::timeout(T, evicted.next())
        .await
        .expect("ModuleEvicted in time")
        .expect("signal");
    let a = sig.args().expect("args");
    assert_eq!(
        (a.name(), a.by()),
        (&"first".to_string(), &"second".to_string())
    );
    assert!(
        a.reason().contains("GPU 0: needs 16.0 GiB"),
        "{}",
        a.reason()
    );
    let (s, h, r) = d.wait_state("first", "inactive").await;
    assert_eq!(h, "offline");
    assert!(r.starts_with("evicted to start second ("), "{r}");
    assert!(!alive(first_pid), "the evicted engine is gone");
    let explain = m.explain("second").await.expect("Explain");
    assert!(
        explain.contains("footprint: RAM 0 B, VRAM 16.0 GiB (declared)")
            && explain.contains("GPU 0: needs 16.0 GiB (declared); total 24.0 GiB - used 16.0 GiB")
            && explain.contains("evict: first"),
        "{explain}"
    );
    assert!(
        d.log().contains("evicting first to start second"),
        "journal entry of the eviction"
    );
    drop(s);
}

#[tokio::test]
async fn a_pinned_module_stays_and_the_refusal_names_it_and_foreign_processes() {
    let t = tag("pin");
    let first = gpu_engine(&t, 16 * GIB, "", "");
    let first = first.replace("[resources]\n", "[resources]\npinned = true\n");
    let second = gpu_engine(&t, 16 * GIB, "", "enabled = false");
    let d = gpu_daemon(&t, &[24 * GIB], &[("first", &first), ("second", &second)]).await;
    d.wait_state("first", "running").await;
    let other = Foreign::start(&t, 0, 2 * GIB);
    let m = d.manager().await;
    wait_for("the foreign process seen", || async {
        m.foreign_gpu_processes()
            .await
            .is_ok_and(|f| f.iter().any(|x| x.0 == other.0.id()))
    })
    .await;
    let f = d.module("first").await;
    assert!(f.pinned().await.expect("Pinned") && !f.evictable().await.expect("Evictable"));
    let pid = main_pid(&d, "first").await;

    let err = m
        .start_module("second")
        .await
        .expect_err("does not fit")
        .to_string();
    let want = format!(
        "needs 16.0 GiB on GPU 0, 5.8 GiB free: first holds 16.0 GiB (pinned), pid {} sleep (not a module) holds 2.0 GiB",
        other.0.id()
    );
    assert!(err.contains(&want), "{err}\nwanted: {want}");
    let (_, _, r) = d.wait_state("second", "failed").await;
    assert!(r.contains(&want), "{r}");
    assert_eq!(
        f.main_pid().await.expect("MainPID"),
        pid,
        "the pinned one untouched"
    );
    assert_eq!(f.state().await.expect("State"), "running");
}

#[tokio::test]
async fn gpus_any_picks_the_freer_gpu_and_tells_the_engine() {
    let t = tag("any");
    let any = gpu_engine(&t, 8 * GIB, "gpus = \"any\"", "enabled = false");
    let d = gpu_daemon(&t, &[24 * GIB, 24 * GIB], &[("any", &any)]).await;
    let _busy = Foreign::start(&t, 0, 20 * GIB);
    let m = d.manager().await;
    m.start_module("any").await.expect("starts");
    let pid = main_pid(&d, "any").await;
    assert!(
        environ(pid).lines().any(|l| l == "CUDA_VISIBLE_DEVICES=1"),
        "{}",
        environ(pid)
    );
    let explain = m.explain("any").await.expect("Explain");
    assert!(explain.contains("GPU 1: needs 8.0 GiB"), "{explain}");
}

// ------------------------------------------------------------------ RAM, real llama-servers

/// A llama-server module on `port` (or behind `[serve]` when `listen` is given).
fn llama(port: u16, listen: Option<u16>, extra: &str) -> String {
    let l = llama_dir();
    let serve = match listen {
        Some(p) => format!(
            "[serve]\nlisten = [\"127.0.0.1:{p}\"]\nupstream = \"127.0.0.1:{port}\"\non_demand = true\n"
        ),
        None => String::new(),
    };
    root_engine(&format!(
        "trusted = true\n{extra}\n[runtime]\nstop_timeout = \"3s\"\n[native]\ncommand = [\"{}\", \"-m\", \"{}\", \"--host\", \"127.0.0.1\", \"--port\", \"{port}\"]\n[health]\nhttp = \"http://127.0.0.1:{port}/health\"\ninterval = \"300ms\"\n{serve}",
        l.join("bin/llama-server").display(),
        l.join("tiny.gguf").display(),
    ))
}

fn admission_config(extra: &str) -> Options {
    Options {
        extra_config: format!(
            "[admission]\nlearn_after = \"1s\"\nrelease_timeout = \"10s\"\n{extra}"
        ),
        ..Options::default()
    }
}

/// Waits until a module's footprint is measured; returns its RAM peak.
async fn measured(d: &Daemon, name: &str) -> u64 {
    let p = d.module(name).await;
    wait_for(&format!("{name}'s footprint measured"), || async {
        p.footprint_source().await.is_ok_and(|s| s == "measured")
    })
    .await;
    p.ram_peak_bytes().await.expect("RamPeakBytes")
}

#[tokio::test]
async fn real_llama_servers_in_a_ram_budget_evict_the_least_recently_used() {
    let (pa, pb) = (free_port(), free_port());
    let a = llama(pa, None, "");
    let b = llama(pb, None, "enabled = false");
    let mut d = Daemon::start_with(&[("la", &a), ("lb", &b)], admission_config("")).await;
    d.wait_health("la", "online").await;
    let m = d.manager().await;
    m.start_module("lb")
        .await
        .expect("lb starts (no budget yet)");
    d.wait_health("lb", "online").await;
    let (ra, rb) = (measured(&d, "la").await, measured(&d, "lb").await);
    assert!(ra > 4 << 20 && rb > 4 << 20, "real RSS: {ra} {rb}");
    m.stop_module("lb").await.expect("stop lb");
    // The learned footprints are on disk: a new modvisord with a budget they do not fit in
    // together reads them.
    d.stop();
    let budget = ra + rb / 2;
    let cfg = std::fs::read_to_string(&d.config).expect("config");
    std::fs::write(&d.config, format!("{cfg}ram_budget = \"{budget}\"\n")).expect("config");
    d.spawn(&[]).await;
    d.wait_health("la", "online").await;
    let pb_ = d.module("lb").await;
    assert_eq!(pb_.footprint_source().await.expect("source"), "measured");
    assert_eq!(
        pb_.ram_peak_bytes().await.expect("peak"),
        rb,
        "kept across the restart"
    );
    let la_pid = main_pid(&d, "la").await;

    let m = d.manager().await;
    m.start_module("lb").await.expect("lb starts, evicting la");
    d.wait_health("lb", "online").await;
    let (_, _, r) = d.wait_state("la", "inactive").await;
    assert!(r.starts_with("evicted to start lb"), "{r}");
    assert!(!alive(la_pid));
    let explain = m.explain("lb").await.expect("Explain");
    assert!(
        explain.contains(&format!(
            "ram_budget {}",
            modvisor::manifest::units::format_bytes(budget)
        )) && explain.contains("(measured peak)")
            && explain.contains("evict: la"),
        "{explain}"
    );
}

fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[tokio::test]
async fn a_connection_to_an_on_demand_module_evicts_the_idle_one_and_is_served() {
    let (ua, ub, la, lb) = (free_port(), free_port(), free_port(), free_port());
    let decl = "[resources]\nmemory_max = \"1G\"\n";
    let a = format!("{}{decl}", llama(ua, Some(la), ""));
    let b = format!("{}{decl}", llama(ub, Some(lb), ""));
    let d = Daemon::start_with(
        &[("oa", &a), ("ob", &b)],
        admission_config("ram_budget = \"1536M\"\n"),
    )
    .await;
    d.wait_health("oa", "standby").await;
    let first =
        tokio::task::spawn_blocking(move || get(SocketAddr::from(([127, 0, 0, 1], la)), "/health"))
            .await
            .expect("join")
            .expect("oa answers");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    d.wait_health("oa", "online").await;
    let oa_pid = main_pid(&d, "oa").await;
    // oa is idle now (its connection closed): a connection to ob evicts it and is served.
    let second =
        tokio::task::spawn_blocking(move || get(SocketAddr::from(([127, 0, 0, 1], lb)), "/health"))
            .await
            .expect("join")
            .expect("ob answers");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    let (_, h, r) = d.wait_state("oa", "inactive").await;
    assert_eq!(h, "standby", "evicted, and ready to start again");
    assert!(r.starts_with("evicted to start ob"), "{r}");
    assert!(!alive(oa_pid));
    assert_eq!(d.manager().await.health().await.expect("Health"), "online");
}
