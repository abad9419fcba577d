//! modvisorctl as a user runs it: exit codes, tables, --json, validate without a daemon, and
//! finding the daemon without flags (system bus, or the embedded bus).

mod common;

use std::process::{Command, Output};

use common::*;

fn ctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_modvisorctl"));
    c.args(args).env_remove("MODVISOR_BUS_ADDRESS").env(
        "DBUS_SYSTEM_BUS_ADDRESS",
        "unix:path=/nonexistent/modvisor-test-bus",
    );
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run modvisorctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn validate_needs_no_daemon_and_reports_file_line_col() {
    let root = env!("CARGO_MANIFEST_DIR");
    let o = ctl(&["validate", &format!("{root}/config/modules.d")], &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(
        out.contains("hello-web.toml: OK: module hello-web (native)"),
        "{out}"
    );

    let bad = format!("{root}/tests/fixtures/bad/02-unknown-native-key.toml");
    let o = ctl(&["validate", &bad], &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("02-unknown-native-key.toml:3:1: unknown field `cmd`"),
        "{err}"
    );

    let o = ctl(&["--json", "validate", &bad], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["ok"], false);
    assert!(v[0]["error"].as_str().unwrap_or("").contains(":3:1:"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(ctl(&["frobnicate"], &[]).status.code(), Some(2));
    assert_eq!(ctl(&["start"], &[]).status.code(), Some(2));
}

#[test]
fn unreachable_daemon_exits_5() {
    let o = ctl(
        &["status"],
        &[("MODVISOR_RUNTIME_DIR", "/nonexistent/modvisor-run")],
    );
    assert_eq!(o.status.code(), Some(5), "{:?}", text(&o));
    assert!(text(&o).1.contains("not reachable"));
}

#[tokio::test]
async fn status_list_explain_and_exit_codes_over_the_system_bus() {
    let d = Daemon::start(&[(
        "svc",
        &sh_module("exec sleep 1000", "description = \"a service\"\n"),
    )])
    .await;
    d.wait_state("svc", "running").await;
    // No --bus-address: modvisorctl finds org.modvisor1 on the system bus.
    let env = [("DBUS_SYSTEM_BUS_ADDRESS", d.bus.address.as_str())];
    let o = ctl(&["status"], &env);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("svc "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("native") && line.contains("running") && line.contains("online"),
        "{line}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colors when stdout is not a terminal"
    );

    let o = ctl(&["--json", "status"], &env);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["modules"][0]["name"], "svc");
    assert_eq!(v["modules"][0]["health"], "online");
    assert!(v["modules"][0]["main_pid"].as_u64().unwrap_or(0) > 0);
    assert_eq!(v["native_backend"], "direct");

    let o = ctl(&["status", "svc"], &env);
    assert!(text(&o).0.contains("svc - a service"), "{:?}", text(&o));
    let o = ctl(&["explain", "svc"], &env);
    assert!(text(&o).0.contains("decision: native"), "{:?}", text(&o));
    assert_eq!(ctl(&["status", "ghost"], &env).status.code(), Some(3));
    assert_eq!(ctl(&["stop", "ghost"], &env).status.code(), Some(3));
    assert_eq!(ctl(&["stop", "../x"], &env).status.code(), Some(2));
    assert_eq!(
        ctl(&["activate", "svc", "/x.gguf"], &env).status.code(),
        Some(2),
        "no model.directory: an invalid argument"
    );

    let o = ctl(&["stop", "svc"], &env);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = ctl(&["list"], &env);
    assert!(
        text(&o).0.contains("svc\tnative\tinactive\toffline"),
        "{:?}",
        text(&o)
    );
    assert_eq!(ctl(&["start", "svc"], &env).status.code(), Some(0));
    d.wait_state("svc", "running").await;
}

#[tokio::test]
async fn embedded_bus_is_found_without_flags() {
    let mut d = EmbeddedDaemon::start(&[("emb", &sh_module("exec sleep 1000", ""))]);
    let run = d.run.clone();
    let env = [("MODVISOR_RUNTIME_DIR", run.to_str().unwrap_or_default())];
    let o = ctl(&["--json", "list"], &env);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("\"emb\""), "{out}");
    assert!(d.stop(), "a clean exit after SIGTERM");
    assert!(
        !run.join("bus").exists(),
        "the embedded bus is gone with the daemon"
    );
}

/// Without a journal, `logs` shows the module output modvisord keeps (the quick-start's
/// ticker, on the embedded bus as `make run` runs it), and `-f` follows it.
#[test]
fn logs_without_a_journal_come_from_modvisord() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let root = env!("CARGO_MANIFEST_DIR");
    let ticker =
        std::fs::read_to_string(format!("{root}/config/modules.d/ticker.toml")).expect("ticker");
    let no_journal = ("MODVISOR_JOURNAL_SOCKET", "/nonexistent/journal-socket");
    let mut e = EmbeddedDaemon::start_env(&[("ticker", &ticker)], &[no_journal]);
    let addr = e.address();
    let deadline = Instant::now() + T;
    let last = loop {
        let o = ctl(
            &["--bus-address", &addr, "logs", "ticker", "-n", "3"],
            &[no_journal],
        );
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        let lines: Vec<u32> = out
            .lines()
            .map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
            .collect::<Option<_>>()
            .unwrap_or_else(|| panic!("only ticks: {out}"));
        assert!(lines.len() <= 3, "{out}");
        if lines.len() == 3 {
            assert_eq!(lines[2], lines[0] + 2, "the last three, in order: {out}");
            break lines[2];
        }
        assert!(Instant::now() < deadline, "three lines within {T:?}: {out}");
        std::thread::sleep(Duration::from_millis(300));
    };
    // -f prints the last line, then the next ones as they come.
    let mut f = Command::new(env!("CARGO_BIN_EXE_modvisorctl"))
        .args(["--bus-address", &addr, "logs", "-f", "ticker", "-n", "1"])
        .env(no_journal.0, no_journal.1)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    let out = f.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(T).expect("the last line");
    let next = rx.recv_timeout(T).expect("a followed line");
    let _ = f.kill();
    let _ = f.wait();
    let n = |l: &str| l.strip_prefix("tick ").and_then(|n| n.parse::<u32>().ok());
    let (a, b) = (n(&first).expect("tick"), n(&next).expect("tick"));
    assert!(a >= last && b == a + 1, "{first} then {next}");
    e.stop();
}
