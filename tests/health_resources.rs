//! Health probes against real processes, start phases, RAM thresholds, and VRAM through the
//! real nvml-wrapper code path loading a stand-in libnvidia-ml.so.1 built here (no GPU on
//! this machine: the stand-in is the only fake, at the lowest boundary).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A small HTTP server whose behaviour the test switches through a file: ok (200), error
/// (500), hang (never answers), loading (503 and 4 MiB more memory per request: progress),
/// stalled (503, memory unchanged: no progress), chatty (503, memory unchanged, a line of
/// output per request: progress), die (exit 3).
const SERVER: &str = r#"
import http.server, os, sys, time
mode_file, port = sys.argv[1], int(sys.argv[2])
hog = []
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mode = open(mode_file).read().strip()
        if mode == "hang":
            time.sleep(60)
        if mode == "die":
            os._exit(3)
        if mode == "loading":
            hog.append(bytearray(4 << 20))
        if mode == "chatty":
            print("loading tensors", flush=True)
        code = {"ok": 200, "error": 500, "loading": 503, "stalled": 503, "chatty": 503}.get(mode, 500)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
print("listening", port, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

fn server_module(mode_file: &Path, port: u16, health: &str, extra: &str) -> String {
    format!(
        "trusted = true\n{extra}\n[native]\ncommand = [\"python3\", \"-c\", {}, \"{}\", \"{port}\"]\n[health]\nhttp = \"http://127.0.0.1:{port}/health\"\n{health}\n",
        toml_str(SERVER),
        mode_file.display()
    )
}

fn set_mode(f: &Path, m: &str) {
    let tmp = f.with_extension("tmp");
    std::fs::write(&tmp, m).expect("write mode");
    std::fs::rename(&tmp, f).expect("rename mode");
}

#[tokio::test]
async fn http_probe_moves_online_offline_online_by_the_thresholds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "ok");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        "interval = \"300ms\"\ntimeout = \"500ms\"\nfailures = 2\nsuccesses = 2\n",
        "[restart]\ndelay = \"100ms\"\n",
    );
    let d = Daemon::start(&[("web", &m)]).await;
    let (_, _, r) = d
        .wait_module("web", T, |s, h, _| s == "running" && h == "online")
        .await;
    assert!(r.contains("HTTP 200"), "{r}");
    let pid = d.module("web").await.main_pid().await.expect("pid");

    set_mode(&mode, "error");
    let (_, h, r) = d.wait_module("web", T, |_, h, _| h != "online").await;
    assert_eq!(h, "offline", "one bad answer is not enough, two are: {r}");
    assert!(
        r.contains("failed 2 times") && r.contains("HTTP 500"),
        "{r}"
    );
    assert_eq!(
        d.module("web").await.state().await.expect("state"),
        "running",
        "the process still runs"
    );

    set_mode(&mode, "ok");
    let (_, h, _) = d.wait_module("web", T, |_, h, _| h != "offline").await;
    assert_eq!(h, "online");

    set_mode(&mode, "hang");
    let (_, _, r) = d.wait_module("web", T, |_, h, _| h == "offline").await;
    assert!(r.contains("timed out"), "{r}");
    set_mode(&mode, "ok");
    d.wait_module("web", T, |_, h, _| h == "online").await;
    assert_eq!(
        d.module("web").await.main_pid().await.expect("pid"),
        pid,
        "probes never restart a running engine"
    );

    // It dies: a restart, offline then online again with a new process.
    set_mode(&mode, "die");
    let (_, _, r) = d
        .wait_module("web", T, |_, _, r| r.contains("exit-code 3"))
        .await;
    assert!(r.contains("restarting"), "{r}");
    set_mode(&mode, "ok");
    d.wait_module("web", T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_ne!(d.module("web").await.main_pid().await.expect("pid"), pid);
}

#[tokio::test]
async fn a_slow_loader_is_not_cut_off_before_start_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "loading");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        "interval = \"200ms\"\ntimeout = \"500ms\"\nfailures = 1\nstart_timeout = \"20s\"\n",
        "",
    );
    let d = Daemon::start(&[("slow", &m)]).await;
    // (Its memory growth may be the first news, its probe's 503 follows.)
    let (s, h, r) = d
        .wait_module("slow", T, |_, _, r| {
            r.contains("loading") && r.contains("HTTP 503")
        })
        .await;
    assert_eq!((s.as_str(), h.as_str()), ("starting", "unknown"));
    assert!(r.contains("HTTP 503"), "{r}");
    let pid = d.module("slow").await.main_pid().await.expect("pid");
    // Several seconds of 503 with memory growing: failures = 1 does not apply in the start phase.
    let until = Instant::now() + Duration::from_secs(3);
    let mut grew = false;
    let mut last = 0u64;
    while Instant::now() < until {
        let mem = d.module("slow").await.memory_bytes().await.expect("mem");
        grew |= last > 0 && mem > last;
        last = mem.max(last);
        assert_eq!(
            d.module("slow").await.state().await.expect("state"),
            "starting"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(grew, "its memory grew while loading (RAM is reported)");
    set_mode(&mode, "ok");
    d.wait_module("slow", T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(
        d.module("slow").await.main_pid().await.expect("pid"),
        pid,
        "never killed"
    );
}

#[tokio::test]
async fn start_timeout_ends_a_start_phase_that_makes_no_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "stalled");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        "interval = \"200ms\"\nstart_timeout = \"1500ms\"\n",
        "[restart]\npolicy = \"no\"\n",
    );
    let d = Daemon::start(&[("never", &m)]).await;
    let t0 = Instant::now();
    let (s, h, r) = d.wait_state("never", "failed").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1400),
        "not before start_timeout"
    );
    assert_eq!((s.as_str(), h.as_str()), ("failed", "offline"));
    assert!(
        r.contains(
            "no successful health probe within start_timeout (1.5s) and no progress meanwhile"
        ),
        "{r}"
    );
}

/// A loader that only writes output (same memory, same probe answer) makes progress: it is
/// not cut off at start_timeout; once it falls silent, start_timeout ends it.
#[tokio::test]
async fn a_loader_that_keeps_writing_output_is_not_cut_off_at_start_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "chatty");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        "interval = \"200ms\"\nstart_timeout = \"1500ms\"\n",
        "[restart]\npolicy = \"no\"\n",
    );
    let d = Daemon::start(&[("chatty", &m)]).await;
    let (_, _, r) = d
        .wait_module("chatty", T, |_, _, r| r.contains("lines of output"))
        .await;
    assert!(r.contains("loading: ") && r.contains("wrote"), "{r}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let p = d.module("chatty").await;
    assert_eq!(p.state().await.expect("State"), "starting", "still loading");
    set_mode(&mode, "stalled");
    let t0 = Instant::now();
    let (_, _, r) = d.wait_state("chatty", "failed").await;
    assert!(t0.elapsed() >= Duration::from_millis(1400), "{r}");
    assert!(r.contains("and no progress meanwhile"), "{r}");
}

#[tokio::test]
async fn a_loader_whose_memory_keeps_growing_is_not_cut_off_at_start_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "loading");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        // Memory is sampled every second (the harness's monitor.interval): two samples fit
        // in start_timeout.
        "interval = \"200ms\"\nstart_timeout = \"2500ms\"\nstart_limit = \"1m\"\n",
        "[restart]\npolicy = \"no\"\n",
    );
    let d = Daemon::start(&[("grower", &m)]).await;
    let (_, _, r) = d
        .wait_module("grower", T, |_, _, r| r.contains("resident"))
        .await;
    assert!(
        r.contains("loading") && r.contains("since the last sample"),
        "{r}"
    );
    let pid = d.module("grower").await.main_pid().await.expect("pid");
    // Over twice start_timeout of loading with memory growing: still starting, never cut off.
    let until = Instant::now() + Duration::from_millis(6000);
    while Instant::now() < until {
        let st = d.module("grower").await.state().await.expect("state");
        assert_eq!(
            st,
            "starting",
            "cut off while making progress; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    set_mode(&mode, "ok");
    d.wait_module("grower", T, |s, h, _| s == "running" && h == "online")
        .await;
    assert_eq!(d.module("grower").await.main_pid().await.expect("pid"), pid);
}

#[tokio::test]
async fn start_limit_holds_whatever_the_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "loading");
    let port = free_port();
    let m = server_module(
        &mode,
        port,
        "interval = \"200ms\"\nstart_timeout = \"2500ms\"\nstart_limit = \"6s\"\n",
        "[restart]\npolicy = \"no\"\n",
    );
    let d = Daemon::start(&[("capped", &m)]).await;
    let t0 = Instant::now();
    let (_, _, r) = d.wait_state("capped", "failed").await;
    assert!(
        t0.elapsed() >= Duration::from_millis(5900),
        "not before start_limit"
    );
    assert!(
        r.contains("no successful health probe within start_limit (6s), progress or not"),
        "{r}"
    );
}

#[tokio::test]
async fn ram_over_the_threshold_is_degraded_with_the_figure() {
    // Allocates 48 MiB and touches it; memory_max 64 MiB, warn at 50%.
    let script =
        "import time\nb = bytearray(48 << 20)\nprint('allocated', flush=True)\ntime.sleep(1000)";
    let m = format!(
        "trusted = true\n[native]\ncommand = [\"python3\", \"-c\", {}]\n[resources]\nmemory_max = \"64M\"\nram_warn_percent = 50\n",
        toml_str(script)
    );
    let d = Daemon::start(&[("hog", &m)]).await;
    let (_, h, r) = d.wait_module("hog", T, |_, h, _| h == "degraded").await;
    assert_eq!(h, "degraded");
    assert!(
        r.starts_with("RAM ") && r.contains("of memory_max (64.0 MiB), over ram_warn_percent 50%"),
        "{r}"
    );
    let mem = d
        .module("hog")
        .await
        .memory_bytes()
        .await
        .expect("MemoryBytes");
    assert!(mem > 48 << 20, "{mem}");
    assert_eq!(
        d.manager()
            .await
            .modules_degraded()
            .await
            .expect("ModulesDegraded"),
        1
    );
    assert_eq!(
        d.manager().await.health().await.expect("Health"),
        "degraded"
    );
}

// ------------------------------------------------------------------ VRAM through NVML

fn write_figures(f: &Path, text: &str) {
    let tmp = f.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, f).expect("rename");
}

async fn wait_prop<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + T;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn vram_daemon(legacy: bool) -> (Daemon, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = build_nvml_stub(dir.path(), legacy);
    let figures = dir.path().join("gpus");
    write_figures(
        &figures,
        "gpu Stand-in_GPU_A GPU-aaaa-1111 8589934592 1073741824\ngpu Stand-in_GPU_B GPU-bbbb-2222 17179869184 0\n",
    );
    let o = Options {
        extra_config: format!(
            "nvml_library = \"{}\"\nvram_warn_percent = 50\n",
            lib.display()
        ),
        env: vec![("NVML_STUB_FILE".into(), figures.display().to_string())],
        ..Options::default()
    };
    // nvml_library belongs to [monitor]: the harness's config ends inside that table.
    let d = Daemon::start_with(&[("gpu-user", &sh_module("exec sleep 1000", ""))], o).await;
    (d, dir, figures)
}

async fn vram_attribution(legacy: bool) {
    let (d, _dir, figures) = vram_daemon(legacy).await;
    d.wait_state("gpu-user", "running").await;
    let m = d.manager().await;
    wait_prop("Gpus", || async {
        m.gpus().await.map(|g| g.len() == 2).unwrap_or(false)
    })
    .await;
    let gpus = m.gpus().await.expect("Gpus");
    assert_eq!(
        gpus[0],
        (
            0,
            "Stand-in GPU A".to_string(),
            "GPU-aaaa-1111".to_string(),
            8 << 30,
            1 << 30
        )
    );
    assert_eq!(gpus[1].2, "GPU-bbbb-2222");
    assert_eq!(gpus[1].3, 16 << 30);

    // The module's real PID uses 2 GiB on GPU 0; a process of no module (this test) uses 1 GiB.
    let pid = d.module("gpu-user").await.main_pid().await.expect("pid");
    let me = std::process::id();
    write_figures(
        &figures,
        &format!(
            "gpu Stand-in_GPU_A GPU-aaaa-1111 8589934592 3221225472\ngpu Stand-in_GPU_B GPU-bbbb-2222 17179869184 0\nproc 0 {pid} 2147483648\nproc 0 {me} 1073741824\n"
        ),
    );
    let p = d.module("gpu-user").await;
    wait_prop("VramBytes", || async {
        p.vram_bytes().await.unwrap_or(0) == 2 << 30
    })
    .await;
    wait_prop("ForeignGpuProcesses", || async {
        m.foreign_gpu_processes()
            .await
            .map(|f| f.iter().any(|x| x.0 == me && x.2 == 1 << 30))
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        d.module("gpu-user").await.health().await.expect("health"),
        "online",
        "2 of 8 GiB is under 50%"
    );

    // 5 of 8 GiB: over vram_warn_percent 50 -> degraded with the figure.
    write_figures(
        &figures,
        &format!(
            "gpu Stand-in_GPU_A GPU-aaaa-1111 8589934592 5368709120\nproc 0 {pid} 5368709120\n"
        ),
    );
    let (_, h, r) = d
        .wait_module("gpu-user", T, |_, h, _| h == "degraded")
        .await;
    assert_eq!(h, "degraded");
    assert!(
        r.contains("VRAM 5.0 GiB is 62% of its GPUs' 8.0 GiB, over vram_warn_percent 50%"),
        "{r}"
    );
    // Back under: online again.
    write_figures(
        &figures,
        &format!(
            "gpu Stand-in_GPU_A GPU-aaaa-1111 8589934592 1073741824\nproc 0 {pid} 1073741824\n"
        ),
    );
    d.wait_module("gpu-user", T, |_, h, _| h == "online").await;
    assert!(
        d.log().contains("belongs to no module"),
        "the foreign process is in the journal/log"
    );
}

#[tokio::test]
async fn vram_per_gpu_attribution_threshold_and_foreign_processes() {
    vram_attribution(false).await;
}

#[tokio::test]
async fn vram_with_a_pre_r510_driver_uses_the_legacy_query() {
    vram_attribution(true).await;
}

#[tokio::test]
async fn no_nvml_library_is_unknown_once_not_an_error_loop() {
    let o = Options {
        extra_config: "nvml_library = \"/nonexistent/libnvidia-ml.so.1\"\n".into(),
        ..Options::default()
    };
    let d = Daemon::start_with(&[("plain", &sh_module("exec sleep 1000", ""))], o).await;
    d.wait_state("plain", "running").await;
    // Several monitor intervals (1 s here) pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(d.manager().await.gpus().await.expect("Gpus").is_empty());
    assert_eq!(
        d.module("plain")
            .await
            .vram_bytes()
            .await
            .expect("VramBytes"),
        0
    );
    assert_eq!(
        d.module("plain").await.health().await.expect("health"),
        "online"
    );
    let log = d.log();
    assert_eq!(log.matches("VRAM unknown").count(), 1, "said once:\n{log}");
}

/// A module that comes up is sampled at once: its first ModuleChanged(online) is followed by
/// figures, not one sampling interval (here an hour) later.
#[tokio::test]
async fn memory_is_known_as_soon_as_a_module_is_online() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = dir.path().join("mode");
    set_mode(&mode, "ok");
    let port = free_port();
    let m = server_module(&mode, port, "interval = \"100ms\"\n", "");
    let opts = Options {
        monitor_interval: "1h",
        ..Options::default()
    };
    let d = Daemon::start_with(&[], opts).await;
    let mgr = d.manager().await;
    let mut changes = mgr.receive_module_changed().await.expect("ModuleChanged");
    d.write_manifest("fig", &m);
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(sig)) = tokio::time::timeout(left, changes.next()).await else {
            panic!("fig not online within {T:?}:\n{}", d.log());
        };
        let a = sig.args().expect("args");
        if a.name == "fig" && a.health == "online" {
            break;
        }
    }
    let mem = d
        .module("fig")
        .await
        .memory_bytes()
        .await
        .expect("MemoryBytes");
    assert!(mem > 0, "MemoryBytes right after online: {mem}");
}
