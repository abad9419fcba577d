//! Benchmarks (plain `harness = false`, no extra crates): run with `cargo bench`.
//! - parse + validate one manifest (the contract's full example);
//! - a full rescan of a directory of 200 manifests (what every inotify burst and SIGHUP costs);
//! - one resource sampling pass over /proc (what every monitor interval costs).
use std::path::Path;
use std::time::{Duration, Instant};

fn bench<F: FnMut()>(name: &str, min_time: Duration, mut f: F) {
    // Warm up, then as many iterations as fit in min_time.
    f();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < min_time {
        f();
        n += 1;
    }
    let per = t0.elapsed() / n.max(1) as u32;
    println!("{name:<48} {n:>8} iterations  {per:>12?} per iteration");
}

fn main() {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good/contract-example.toml"),
    )
    .expect("fixture");
    bench(
        "parse+validate the contract's manifest",
        Duration::from_secs(2),
        || {
            let m = modvisor::manifest::parse_manifest(Path::new("x.toml"), &example, "x");
            assert!(m.is_ok());
        },
    );

    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..200 {
        let text = example.replace("name = \"llama-chat\"", &format!("name = \"m{i}\""));
        std::fs::write(dir.path().join(format!("m{i}.toml")), text).expect("write");
    }
    let dirs = vec![dir.path().to_path_buf()];
    bench(
        "rescan 200 manifests (load_dirs)",
        Duration::from_secs(3),
        || {
            let r = modvisor::manifest::load_dirs(&dirs);
            assert_eq!(r.modules.len(), 200);
        },
    );

    let me = std::process::id();
    let targets: Vec<modvisor::monitor::Target> = (0..20)
        .map(|i| modvisor::monitor::Target {
            name: format!("t{i}"),
            main_pid: me,
            pgid: 0,
            own_cgroup: false,
        })
        .collect();
    bench(
        "sample RAM of 20 modules (one /proc pass)",
        Duration::from_secs(3),
        || {
            let s = modvisor::monitor::sample(&targets, None);
            assert_eq!(s.modules.len(), 20);
        },
    );
}
