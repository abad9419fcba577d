//! A module that writes 300 MB without a newline (direct backend) does not grow modvisord:
//! its peak resident size (VmHWM) stays under 64 MiB, and it keeps answering D-Bus meanwhile.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn gigabytes_without_a_newline_do_not_grow_the_daemon() {
    let t = tempfile::tempdir().expect("tempdir");
    let done = t.path().join("done");
    let script = format!(
        "head -c 300000000 /dev/zero | tr '\\0' a; touch {}; exec sleep 1000",
        done.display()
    );
    let d = Daemon::start(&[("flood", &sh_module(&script, ""))]).await;
    let pid = d.pid();
    let m = d.manager().await;
    // The whole flood (bounded: a debug build forwards it in a few seconds here).
    let deadline = Instant::now() + Duration::from_secs(80);
    let mut calls = 0;
    while !Path::new(&done).exists() {
        assert!(
            Instant::now() < deadline,
            "the module's output was not read within 80s; log:\n{}",
            d.log().chars().take(4000).collect::<String>()
        );
        let t0 = Instant::now();
        let rows = tokio::time::timeout(Duration::from_secs(5), m.list_modules())
            .await
            .expect("modvisord answers D-Bus within 5s during the flood")
            .expect("ListModules");
        assert!(rows.iter().any(|r| r.0 == "flood"));
        assert!(t0.elapsed() < Duration::from_secs(5));
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(calls > 0);
    let hwm = vm_hwm_kib(pid);
    assert!(
        hwm < 64 * 1024,
        "modvisord's peak RSS is {hwm} KiB after 300 MB of output without a newline"
    );
    let (state, _, _) = d.wait_state("flood", "running").await;
    assert_eq!(state, "running");
    // What it keeps of the output for error reports is bounded too: the module is still
    // reported with a short reason.
    let reason = d
        .module("flood")
        .await
        .health_reason()
        .await
        .expect("HealthReason");
    assert!(reason.len() < 4096, "{}", reason.len());
}
