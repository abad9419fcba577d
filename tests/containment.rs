//! Untrusted modules stay contained, against both real engines of the testbed: an exec health
//! probe runs inside the container (the file it touches appears there, never on the host),
//! the pids limit is the container's pids cgroup, and manifests asking for the host network,
//! SYS_ADMIN or the host's root are refused with the key named.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::engines::*;
use common::*;

fn uniq(e: Eng, tag: &str) -> String {
    format!("cn{}{}-{tag}", e.tag(), std::process::id())
}

async fn start(e: Eng, manifests: &[(&str, &str)]) -> Daemon {
    start_on(e, manifests).await
}

/// An untrusted container module (no `trusted` key: the default).
fn untrusted(e: Eng, script: &str, extra: &str, tail: &str) -> String {
    format!(
        "{tail}\n[runtime]\nstop_timeout = \"2s\"\n[container]\nimage = \"{}\"\ncommand = [\"sh\", \"-c\", {}]\nnetwork = \"none\"\n{extra}\n",
        e.image(),
        toml_str(script)
    )
}

async fn exec_probe_runs_inside(e: Eng) {
    let name = uniq(e, "probe");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    // Unique, and in a directory that exists on the host and in the image alike.
    let marker = format!("/tmp/modvisor-probe-{}-{}", e.tag(), std::process::id());
    let _ = std::fs::remove_file(&marker);
    let health = format!(
        "[health]\nexec = [\"touch\", \"{marker}\"]\ninterval = \"1s\"\ntimeout = \"5s\"\n"
    );
    let d = start(e, &[(&name, &untrusted(e, "exec sleep 1000", "", &health))]).await;
    let (_, _, reason) = d
        .wait_module(&name, Duration::from_secs(40), |s, h, _| {
            s == "running" && h == "online"
        })
        .await;
    assert!(reason.contains(&format!("in {cname}")), "{reason}");
    assert!(
        e.exec_ok(&cname, &["test", "-e", &marker]),
        "the probe ran inside the container"
    );
    assert!(
        !Path::new(&marker).exists(),
        "the probe of an untrusted module never runs on the host"
    );
    // A failing probe fails inside too: the module goes offline, the host is untouched.
    assert!(e.exec_ok(&cname, &["sh", "-c", "rm -f /tmp/*; chmod 0555 /tmp"]));
    d.wait_module(&name, Duration::from_secs(40), |_, h, _| h == "offline")
        .await;
    assert!(!Path::new(&marker).exists());
}

/// The pids limit is the container's pids cgroup, in both engines: a fork bomb of 200
/// sleeps stops at the limit. With Podman the nproc rlimit (sent because Podman resets its
/// defaults when one ulimit is sent) follows the same figure.
async fn pids_limit_applies(e: Eng) {
    let name = uniq(e, "pids");
    let cname = format!("modvisor-{name}");
    let _c = Cleanup(e, vec![cname.clone()]);
    // The bomb runs in a subshell (a shell whose fork fails gives up); the main process stays.
    let script = "(i=0; while [ $i -lt 200 ]; do sleep 1000 & i=$((i+1)); done) 2>/dev/null & exec sleep 1000";
    let d = start(e, &[(&name, &untrusted(e, script, "pids_limit = 32", ""))]).await;
    d.wait_state(&name, "running").await;
    let i = e.inspect(&cname).expect("the engine knows the container");
    assert_eq!(
        i["HostConfig"]["PidsLimit"].as_i64(),
        Some(32),
        "{}",
        i["HostConfig"]
    );
    let pid = i["State"]["Pid"].as_u64().expect("pid");
    // The host's view of its pids cgroup (cgroup v1 here: the "pids" hierarchy).
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let path = cg
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, p) = (f.next()?, f.next()?, f.next()?);
            (ctl.split(',').any(|c| c == "pids")).then(|| p.to_string())
        })
        .expect("the container has a pids cgroup");
    let dir = Path::new("/sys/fs/cgroup/pids").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("pids.max")).expect("pids.max");
    assert_eq!(max.trim(), "32");
    // The bomb has stopped at the limit (bounded wait for it to get there).
    let deadline = Instant::now() + T;
    loop {
        let cur: u32 = std::fs::read_to_string(dir.join("pids.current"))
            .expect("pids.current")
            .trim()
            .parse()
            .expect("number");
        assert!(cur <= 32, "pids.current {cur} over the limit");
        if cur >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bomb never reached the limit ({cur})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Eng::Podman = e {
        let ulimits = i["HostConfig"]["Ulimits"].to_string();
        assert!(
            ulimits.contains("\"Name\":\"RLIMIT_NPROC\"") || ulimits.contains("\"nproc\""),
            "{ulimits}"
        );
        assert!(
            ulimits.contains("32"),
            "nproc follows pids_limit: {ulimits}"
        );
    }
}

async fn refused_with_the_key_named(e: Eng) {
    let names = ["hostnet", "sysadmin", "hostroot"].map(|t| uniq(e, t));
    let _c = Cleanup(e, names.iter().map(|n| format!("modvisor-{n}")).collect());
    let bodies = [
        untrusted(e, "exec sleep 1000", "", "").replace("network = \"none\"", "network = \"host\""),
        untrusted(e, "exec sleep 1000", "cap_add = [\"SYS_ADMIN\"]", ""),
        untrusted(e, "exec sleep 1000", "volumes = [\"/:/host\"]", ""),
    ];
    let manifests: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(bodies.iter().map(String::as_str))
        .collect();
    let d = start(e, &manifests).await;
    let errors = d
        .manager()
        .await
        .manifest_errors()
        .await
        .expect("ManifestErrors");
    for (n, key) in names.iter().zip([
        "container.network: \"host\"",
        "container.cap_add: \"SYS_ADMIN\"",
        "container.volumes: \"/:/host\"",
    ]) {
        let (file, why) = errors
            .iter()
            .find(|(f, _)| f.ends_with(&format!("{n}.toml")))
            .unwrap_or_else(|| panic!("{n} is refused: {errors:?}"));
        assert!(why.contains(key), "{file}: {why}");
        assert!(why.contains("untrusted module"), "{why}");
        // file:line:col: the position of the value.
        assert!(why.contains(".toml:"), "{why}");
        assert!(
            e.inspect(&format!("modvisor-{n}")).is_none(),
            "no container was made for {n}"
        );
    }
}

#[tokio::test]
async fn podman_exec_probe_runs_inside_the_container() {
    exec_probe_runs_inside(Eng::Podman).await;
}

#[tokio::test]
async fn docker_exec_probe_runs_inside_the_container() {
    exec_probe_runs_inside(Eng::Docker).await;
}

#[tokio::test]
async fn podman_pids_limit() {
    pids_limit_applies(Eng::Podman).await;
}

#[tokio::test]
async fn docker_pids_limit() {
    pids_limit_applies(Eng::Docker).await;
}

#[tokio::test]
async fn podman_untrusted_requests_refused() {
    refused_with_the_key_named(Eng::Podman).await;
}

#[tokio::test]
async fn docker_untrusted_requests_refused() {
    refused_with_the_key_named(Eng::Docker).await;
}
