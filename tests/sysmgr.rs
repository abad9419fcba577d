//! The .deb under a real systemd system manager (PID 1 in a container), installed and enabled
//! as an operator would, on a machine where modvisor's directories do not exist yet.

mod common;

use common::llama_dir;
use common::sysmgr::{Sysmgr, deb};

#[test]
fn the_package_starts_with_enable_now_where_no_directory_exists_yet() {
    let sm = Sysmgr::up();
    let inside = sm.copy_in(&deb());
    sm.ok(&["dpkg", "-i", &inside]);
    // As on a fresh machine: none of the directories the unit writes exist (the package's
    // tmpfiles.d would create them at boot; a first start must not depend on that).
    sm.ok(&[
        "rm",
        "-rf",
        "/run/modvisor",
        "/var/lib/modvisor",
        "/var/log/modvisor",
    ]);
    let out = sm.run_for(120, &["systemctl", "enable", "--now", "modvisord.service"]);
    assert!(
        out.status.success(),
        "systemctl enable --now: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        sm.journal("modvisord")
    );
    let active = sm.run(&["systemctl", "is-active", "modvisord"]);
    assert_eq!(
        String::from_utf8_lossy(&active.stdout).trim(),
        "active",
        "{}",
        sm.journal("modvisord")
    );
    for d in ["/run/modvisor", "/var/lib/modvisor", "/var/log/modvisor"] {
        sm.ok(&["test", "-d", d]);
    }
    // Served on the container's system bus, found by modvisorctl without flags.
    let status = sm.ok(&["modvisorctl", "--json", "status"]);
    assert!(
        status.contains("\"native_backend\": \"systemd\""),
        "{status}"
    );
    // Reload and restart as an operator would.
    sm.ok(&["systemctl", "reload", "modvisord"]);
    sm.ok(&["systemctl", "restart", "modvisord"]);
    let active = sm.run(&["systemctl", "is-active", "modvisord"]);
    assert_eq!(String::from_utf8_lossy(&active.stdout).trim(), "active");
}

/// The shipped example manifest, with secrets: what an operator would install.
fn llama_manifest() -> String {
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/llama-chat.toml"),
    )
    .expect("example");
    src.replace("modes = [\"native\", \"container\"]", "modes = [\"native\"]")
        .replace(
            "command = [\"/usr/local/bin/llama-server\"",
            "environment_file = \"/etc/modvisor/secrets/llama-chat.env\"\ncredentials = { token = \"/etc/modvisor/secrets/llama-chat.token\" }\ncommand = [\"/usr/local/bin/llama-server\"",
        )
}

/// Polls `modvisorctl --json status NAME` inside until `pred`, bounded.
fn wait_status(sm: &Sysmgr, name: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let out = sm.run(&["modvisorctl", "--json", "status", name]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if pred(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: {text}\n{}\n{}",
            sm.journal("modvisord"),
            sm.journal(&format!("modvisor-{name}"))
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn a_real_llama_server_runs_as_the_engine_user_in_the_full_sandbox() {
    let sm = Sysmgr::up();
    let inside = sm.copy_in(&deb());
    sm.ok(&["dpkg", "-i", &inside]);
    let id = sm.ok(&["id", "modvisor-engine"]);
    assert!(id.contains("(video)") && id.contains("(render)"), "{id}");
    let uid = sm.ok(&["id", "-u", "modvisor-engine"]).trim().to_string();
    sm.install_program(
        &llama_dir().join("bin/llama-server"),
        "/usr/local/bin/llama-server",
    );
    let model = std::fs::read(llama_dir().join("tiny.gguf")).expect("model");
    sm.write("/srv/models/tiny.gguf", &model, 0o644);
    let secret = format!("s3cr3t-{}", std::process::id());
    sm.write(
        "/etc/modvisor/secrets/llama-chat.env",
        format!("LLAMA_TEST_SECRET={secret}\n").as_bytes(),
        0o600,
    );
    sm.write(
        "/etc/modvisor/secrets/llama-chat.token",
        format!("token-{secret}").as_bytes(),
        0o600,
    );
    sm.write(
        "/etc/modvisor/modules.d/llama-chat.toml",
        llama_manifest().as_bytes(),
        0o644,
    );
    let out = sm.run_for(120, &["systemctl", "enable", "--now", "modvisord.service"]);
    assert!(out.status.success(), "{}", sm.journal("modvisord"));
    wait_status(&sm, "llama-chat", 80, |t| t.contains("\"online\""));
    let unit = "modvisor-llama-chat.service";
    // curl from the host into the container's loopback.
    let answer = sm.in_netns(&[
        "curl",
        "-sf",
        "--max-time",
        "20",
        "http://127.0.0.1:8080/completion",
        "-d",
        r#"{"prompt":"Hello","n_predict":8}"#,
    ]);
    let body = String::from_utf8_lossy(&answer.stdout);
    assert!(
        answer.status.success() && body.contains("\"content\""),
        "{body}\n{}",
        sm.journal(unit)
    );
    let pid = sm.ok(&["systemctl", "show", "-p", "MainPID", "--value", unit]);
    let pid = pid.trim();
    let status = sm.ok(&["cat", &format!("/proc/{pid}/status")]);
    assert!(
        status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
        "{status}"
    );
    let show = sm.ok(&["systemctl", "show", unit]);
    for want in [
        "User=modvisor-engine",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ReadOnlyPaths=-/srv/models",
        "ReadWritePaths=-/var/lib/modvisor/modules/llama-chat",
        "EnvironmentFiles=/etc/modvisor/secrets/llama-chat.env",
    ] {
        assert!(
            show.contains(want),
            "systemctl show lacks {want:?}:\n{show}"
        );
    }
    assert!(!show.contains(&secret), "systemctl show leaks the secret");
    // Empty values are only printed when asked for.
    let caps = sm.ok(&["systemctl", "show", "-p", "CapabilityBoundingSet", unit]);
    assert_eq!(
        caps.trim(),
        "CapabilityBoundingSet=",
        "no capability at all"
    );
    // systemctl 252 does not print LoadCredential=: read the property itself.
    let load = sm.ok(&[
        "busctl",
        "get-property",
        "org.freedesktop.systemd1",
        &modvisor::runtime::systemd::unit_path(unit),
        "org.freedesktop.systemd1.Service",
        "LoadCredential",
    ]);
    assert_eq!(
        load.trim(),
        "a(ss) 1 \"token\" \"/etc/modvisor/secrets/llama-chat.token\""
    );
    let environ = sm.ok(&["cat", &format!("/proc/{pid}/environ")]);
    assert!(environ.contains(&format!("LLAMA_TEST_SECRET={secret}")));
    let cred = sm.ok(&[
        "cat",
        &format!("/proc/{pid}/root/run/credentials/{unit}/token"),
    ]);
    assert_eq!(cred, format!("token-{secret}"));
    let journal = sm.ok(&["journalctl", "--no-pager", "-o", "export"]);
    assert!(!journal.contains(&secret), "the journal holds the secret");
    let explain = sm.ok(&["modvisorctl", "explain", "llama-chat"]);
    assert!(
        explain.contains(
            "native engine: runs as modvisor-engine (the default engine user); full sandbox"
        ),
        "{explain}"
    );
}
