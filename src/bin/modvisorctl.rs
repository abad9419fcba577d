//! modvisorctl: the client. Talks to modvisord over D-Bus only (`validate` and `logs` need no daemon).
//! Exit codes: 0 ok, 1 failure, 2 usage, 3 no such module, 4 not allowed, 5 daemon not reachable.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use modvisor::cli::{Cli, Cmd};
use modvisor::dbus::client::{ManagerProxy, ModuleProxy, connect};
use modvisor::manifest::units::format_bytes;
use serde_json::json;

enum Fail {
    Code(u8, String),
}

fn from_zbus(e: zbus::Error) -> Fail {
    match &e {
        zbus::Error::MethodError(name, msg, _) => {
            let text = msg.clone().unwrap_or_else(|| name.to_string());
            let code = match name.as_str() {
                "org.modvisor1.Error.NoSuchModule" => 3,
                "org.modvisor1.Error.NotAllowed" | "org.freedesktop.DBus.Error.AccessDenied" => 4,
                "org.modvisor1.Error.InvalidArgument"
                | "org.freedesktop.DBus.Error.InvalidArgs" => 2,
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner" => 5,
                _ => 1,
            };
            Fail::Code(code, text)
        }
        zbus::Error::FDO(f) => {
            let code = match f.as_ref() {
                zbus::fdo::Error::AccessDenied(_) => 4,
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => 5,
                zbus::fdo::Error::InvalidArgs(_) => 2,
                _ => 1,
            };
            Fail::Code(code, e.to_string())
        }
        zbus::Error::InputOutput(_) | zbus::Error::Address(_) => {
            Fail::Code(5, format!("modvisord is not reachable: {e}"))
        }
        _ => Fail::Code(1, e.to_string()),
    }
}

fn color(health: &str, tty: bool) -> String {
    if !tty {
        return health.to_string();
    }
    let c = match health {
        "online" => "32",
        "degraded" => "33",
        "offline" => "31",
        _ => "2",
    };
    format!("\x1b[{c}m{health}\x1b[0m")
}

async fn manager(cli: &Cli) -> Result<(zbus::Connection, ManagerProxy<'static>), Fail> {
    let conn = connect(cli.bus_address.as_deref())
        .await
        .map_err(|e| Fail::Code(5, e))?;
    let m = ManagerProxy::new(&conn).await.map_err(from_zbus)?;
    // Fail early with 5 when nobody owns the name.
    m.version().await.map_err(|e| match from_zbus(e) {
        Fail::Code(_, t) => Fail::Code(5, format!("modvisord is not reachable: {t}")),
    })?;
    Ok((conn, m))
}

async fn module_json(
    conn: &zbus::Connection,
    path: zbus::OwnedObjectPath,
) -> Result<serde_json::Value, Fail> {
    let p = ModuleProxy::builder(conn)
        .path(path)
        .build()
        .await
        .map_err(from_zbus)?;
    let z = from_zbus;
    Ok(json!({
        "name": p.name().await.map_err(z)?,
        "description": p.description().await.map_err(z)?,
        "mode": p.mode().await.map_err(z)?,
        "mode_reason": p.mode_reason().await.map_err(z)?,
        "backend": p.backend().await.map_err(z)?,
        "state": p.state().await.map_err(z)?,
        "health": p.health().await.map_err(z)?,
        "health_reason": p.health_reason().await.map_err(z)?,
        "unit": p.unit().await.map_err(z)?,
        "container_id": p.container_id().await.map_err(z)?,
        "main_pid": p.main_pid().await.map_err(z)?,
        "memory_bytes": p.memory_bytes().await.map_err(z)?,
        "memory_max_bytes": p.memory_max_bytes().await.map_err(z)?,
        "vram_bytes": p.vram_bytes().await.map_err(z)?,
        "restarts": p.restarts().await.map_err(z)?,
        "active_model": p.active_model().await.map_err(z)?,
        "since_us": p.since().await.map_err(z)?,
        "manifest_path": p.manifest_path().await.map_err(z)?,
    }))
}

fn s(v: &serde_json::Value, k: &str) -> String {
    match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn status(cli: &Cli, name: Option<&str>) -> Result<(), Fail> {
    let (conn, m) = manager(cli).await?;
    let tty = std::io::stdout().is_terminal();
    if let Some(name) = name {
        let path = m.get_module(name).await.map_err(from_zbus)?;
        let v = module_json(&conn, path).await?;
        if cli.json {
            println!("{v:#}");
            return Ok(());
        }
        println!("{} - {}", s(&v, "name"), s(&v, "description"));
        println!(
            "      State: {} ({})",
            s(&v, "state"),
            color(&s(&v, "health"), tty)
        );
        println!("     Reason: {}", s(&v, "health_reason"));
        println!(
            "       Mode: {} via {} ({})",
            s(&v, "mode"),
            s(&v, "backend"),
            s(&v, "mode_reason")
        );
        println!("   Main PID: {}", s(&v, "main_pid"));
        let mem = v["memory_bytes"].as_u64().unwrap_or(0);
        let max = v["memory_max_bytes"].as_u64().unwrap_or(0);
        let max_s = if max > 0 {
            format!(" (max {})", format_bytes(max))
        } else {
            String::new()
        };
        println!("     Memory: {}{max_s}", format_bytes(mem));
        println!(
            "       VRAM: {}",
            format_bytes(v["vram_bytes"].as_u64().unwrap_or(0))
        );
        println!("   Restarts: {}", s(&v, "restarts"));
        for (label, key) in [
            ("Unit", "unit"),
            ("Container", "container_id"),
            ("Model", "active_model"),
        ] {
            let val = s(&v, key);
            if !val.is_empty() {
                println!("{label:>11}: {val}");
            }
        }
        println!("   Manifest: {}", s(&v, "manifest_path"));
        return Ok(());
    }
    let rows = m.list_modules().await.map_err(from_zbus)?;
    let mut mods = Vec::new();
    for r in rows {
        mods.push(module_json(&conn, r.5).await?);
    }
    let errors = m.manifest_errors().await.map_err(from_zbus)?;
    if cli.json {
        let v = json!({
            "version": m.version().await.map_err(from_zbus)?,
            "health": m.health().await.map_err(from_zbus)?,
            "native_backend": m.native_backend().await.map_err(from_zbus)?,
            "container_engine": m.container_engine().await.map_err(from_zbus)?,
            "modules": mods,
            "manifest_errors": errors.iter().map(|(f, e)| json!({"file": f, "error": e})).collect::<Vec<_>>(),
        });
        println!("{v:#}");
        return Ok(());
    }
    println!(
        "modvisord {}: {} (native backend: {}, container engine: {})",
        m.version().await.map_err(from_zbus)?,
        color(&m.health().await.map_err(from_zbus)?, tty),
        or_none(m.native_backend().await.map_err(from_zbus)?),
        or_none(m.container_engine().await.map_err(from_zbus)?),
    );
    println!(
        "{:<20} {:<9} {:<9} {:<9} {:>8} {:>10} {:>9}  REASON",
        "NAME", "MODE", "STATE", "HEALTH", "PID", "RAM", "VRAM"
    );
    for v in &mods {
        let health = s(v, "health");
        let pad = 9usize.saturating_sub(health.len());
        let pid = v["main_pid"].as_u64().unwrap_or(0);
        println!(
            "{:<20} {:<9} {:<9} {}{} {:>8} {:>10} {:>9}  {}",
            s(v, "name"),
            or_dash(s(v, "mode")),
            s(v, "state"),
            color(&health, tty),
            " ".repeat(pad),
            if pid > 0 { pid.to_string() } else { "-".into() },
            mem_or_dash(v["memory_bytes"].as_u64().unwrap_or(0)),
            mem_or_dash(v["vram_bytes"].as_u64().unwrap_or(0)),
            s(v, "health_reason"),
        );
    }
    for (f, e) in &errors {
        let _ = f;
        println!("manifest error: {e}");
    }
    Ok(())
}

fn or_none(s: String) -> String {
    if s.is_empty() { "none".into() } else { s }
}
fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}
fn mem_or_dash(b: u64) -> String {
    if b == 0 { "-".into() } else { format_bytes(b) }
}

fn validate(paths: &[PathBuf], json_out: bool) -> Result<(), Fail> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Fail::Code(1, format!("{}: {e}", p.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    let mut results = Vec::new();
    for f in &files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let r = match std::fs::read_to_string(f) {
            Ok(src) if src.trim().is_empty() => Ok("masked (empty file)".to_string()),
            Ok(src) => modvisor::manifest::parse_manifest(f, &src, &stem)
                .map(|m| {
                    format!(
                        "module {} ({})",
                        m.name,
                        m.modes
                            .iter()
                            .map(|m| m.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
                .map_err(|e| e.to_string()),
            Err(e) => Err(format!("{}: cannot read: {e}", f.display())),
        };
        results.push((f.clone(), r));
    }
    let bad = results.iter().filter(|(_, r)| r.is_err()).count();
    if json_out {
        let v: Vec<_> = results
            .iter()
            .map(|(f, r)| match r {
                Ok(ok) => json!({"file": f, "ok": true, "detail": ok}),
                Err(e) => json!({"file": f, "ok": false, "error": e}),
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(v));
    } else {
        for (f, r) in &results {
            match r {
                Ok(ok) => println!("{}: OK: {ok}", f.display()),
                Err(e) => eprintln!("{e}"),
            }
        }
    }
    if bad > 0 {
        return Err(Fail::Code(
            1,
            format!("{bad} of {} manifests have errors", results.len()),
        ));
    }
    Ok(())
}

fn logs(name: &str, follow: bool, lines: u32) -> Result<(), Fail> {
    use std::os::unix::process::CommandExt;
    if let Err(e) = modvisor::manifest::validate_name(name) {
        return Err(Fail::Code(2, e));
    }
    if !std::path::Path::new(modvisor::journal::JOURNAL_SOCKET).exists() {
        return Err(Fail::Code(
            1,
            "no journal runs on this machine: module output goes to modvisord's stderr (or to \
             module_log_dir/NAME.log when [logging] module_log_dir is set)"
                .into(),
        ));
    }
    let unit = format!("modvisor-{name}.service");
    let mut cmd = std::process::Command::new("journalctl");
    cmd.arg("--no-pager")
        .arg("-n")
        .arg(lines.to_string())
        .args(modvisor::journal::trusted_matches(Some(name), &unit));
    if follow {
        cmd.arg("-f");
    }
    let e = cmd.exec();
    Err(Fail::Code(1, format!("cannot run journalctl: {e}")))
}

async fn watch(cli: &Cli) -> Result<(), Fail> {
    let (_conn, m) = manager(cli).await?;
    let mut changes = m.receive_module_changed().await.map_err(from_zbus)?;
    let tty = std::io::stdout().is_terminal();
    for r in m.list_modules().await.map_err(from_zbus)? {
        print_change(cli.json, tty, &r.0, &r.2, &r.3, &r.4);
    }
    while let Some(sig) = changes.next().await {
        if let Ok(a) = sig.args() {
            print_change(cli.json, tty, &a.name, &a.state, &a.health, &a.reason);
        }
    }
    Err(Fail::Code(5, "the daemon went away".into()))
}

fn print_change(json_out: bool, tty: bool, name: &str, state: &str, health: &str, reason: &str) {
    if json_out {
        println!(
            "{}",
            json!({"name": name, "state": state, "health": health, "reason": reason})
        );
    } else {
        println!("{name:<20} {state:<9} {}  {reason}", color(health, tty));
    }
}

async fn run(cli: &Cli) -> Result<(), Fail> {
    match &cli.cmd {
        Cmd::Status { name } => status(cli, name.as_deref()).await,
        Cmd::List => {
            let (_c, m) = manager(cli).await?;
            let rows = m.list_modules().await.map_err(from_zbus)?;
            if cli.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| json!({"name": r.0, "mode": r.1, "state": r.2, "health": r.3, "reason": r.4, "path": r.5.as_str()}))
                    .collect();
                println!("{:#}", serde_json::Value::Array(v));
            } else {
                for r in rows {
                    println!("{}\t{}\t{}\t{}", r.0, or_dash(r.1), r.2, r.3);
                }
            }
            Ok(())
        }
        Cmd::Start { name } => manager(cli)
            .await?
            .1
            .start_module(name)
            .await
            .map_err(from_zbus),
        Cmd::Stop { name } => manager(cli)
            .await?
            .1
            .stop_module(name)
            .await
            .map_err(from_zbus),
        Cmd::Restart { name } => manager(cli)
            .await?
            .1
            .restart_module(name)
            .await
            .map_err(from_zbus),
        Cmd::Reload => {
            let errs = manager(cli).await?.1.reload().await.map_err(from_zbus)?;
            for (_, e) in &errs {
                eprintln!("{e}");
            }
            if errs.is_empty() {
                Ok(())
            } else {
                Err(Fail::Code(1, format!("{} manifest errors", errs.len())))
            }
        }
        Cmd::Explain { name } => {
            let text = manager(cli)
                .await?
                .1
                .explain(name)
                .await
                .map_err(from_zbus)?;
            if cli.json {
                println!("{}", json!({"name": name, "explanation": text}));
            } else {
                print!("{text}");
            }
            Ok(())
        }
        Cmd::Activate { name, model } => manager(cli)
            .await?
            .1
            .activate_model(name, model)
            .await
            .map_err(from_zbus),
        Cmd::Override { name, mode } => manager(cli)
            .await?
            .1
            .set_mode_override(name, mode)
            .await
            .map_err(from_zbus),
        Cmd::Logs {
            name,
            follow,
            lines,
        } => logs(name, *follow, *lines),
        Cmd::Validate { paths } => validate(paths, cli.json),
        Cmd::Watch => watch(cli).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modvisorctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Code(code, msg)) => {
            eprintln!("modvisorctl: {msg}");
            ExitCode::from(code)
        }
    }
}
