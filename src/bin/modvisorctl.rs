//! modvisorctl: the client. Talks to modvisord over D-Bus only (`validate` and `logs` need no daemon).
//! Exit codes: 0 ok, 1 failure, 2 usage, 3 no such module, 4 not allowed, 5 daemon not reachable.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use modvisor::cli::{Cli, Cmd, ExportFormat};
use modvisor::dbus::client::{ManagerProxy, connect};
use modvisor::dbus::{BUS_NAME, MANAGER_IFACE, MANAGER_PATH, MODULE_IFACE};
use modvisor::manifest::units::format_bytes;
use serde_json::json;
use zbus::OwnedVariant;
use zbus::fdo::{ObjectManagerProxy, PropertiesProxy};
use zbus::names::InterfaceName;

#[path = "modvisorctl/models.rs"]
mod models;

enum Fail {
    Code(u8, String),
    /// The bus's policy refused the call (exit code 4, one sentence naming the command).
    Denied,
}

fn from_zbus(e: zbus::Error) -> Fail {
    match &e {
        zbus::Error::MethodError(name, _, _)
            if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
        {
            Fail::Denied
        }
        zbus::Error::FDO(f) if matches!(f.as_ref(), zbus::fdo::Error::AccessDenied(_)) => {
            Fail::Denied
        }
        zbus::Error::MethodError(name, msg, _) => {
            let text = msg.clone().unwrap_or_else(|| name.to_string());
            let code = match name.as_str() {
                "org.modvisor1.Error.NoSuchModule" => 3,
                "org.modvisor1.Error.NotAllowed" => 4,
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
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => 5,
                zbus::fdo::Error::InvalidArgs(_) => 2,
                _ => 1,
            };
            // The text without the error's name ("org.freedesktop.DBus.Error.X: ...").
            let text = zbus::DBusError::description(f.as_ref())
                .map_or_else(|| e.to_string(), str::to_string);
            Fail::Code(code, text)
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
        Fail::Denied => Fail::Denied,
    })?;
    Ok((conn, m))
}

/// A D-Bus object's properties, as one GetAll (or GetManagedObjects) returns them.
type Props = HashMap<String, OwnedVariant>;

fn take<T>(p: &mut Props, name: &str) -> Result<T, Fail>
where
    T: TryFrom<OwnedVariant>,
    T::Error: std::fmt::Display,
{
    let v = p
        .remove(name)
        .ok_or_else(|| Fail::Code(1, format!("the daemon did not report the property {name}")))?;
    T::try_from(v).map_err(|e| Fail::Code(1, format!("the property {name}: {e}")))
}

/// All properties of the manager in one call; failing it means the daemon is not reachable.
async fn manager_props(conn: &zbus::Connection) -> Result<Props, Fail> {
    let unreachable = |e: zbus::Error| match from_zbus(e) {
        Fail::Code(_, t) => Fail::Code(5, format!("modvisord is not reachable: {t}")),
        Fail::Denied => Fail::Denied,
    };
    let p = PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await
        .map_err(unreachable)?;
    let iface = InterfaceName::from_static_str_unchecked(MANAGER_IFACE);
    p.get_all(iface).await.map_err(|e| unreachable(e.into()))
}

/// One module's properties in one call.
async fn module_props(conn: &zbus::Connection, path: zbus::OwnedObjectPath) -> Result<Props, Fail> {
    let p = PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .path(path)
        .build()
        .await
        .map_err(from_zbus)?;
    let iface = InterfaceName::from_static_str_unchecked(MODULE_IFACE);
    p.get_all(iface).await.map_err(|e| from_zbus(e.into()))
}

/// Every module's properties in one call, ordered by name (as ListModules orders them).
async fn all_module_props(conn: &zbus::Connection) -> Result<Vec<Props>, Fail> {
    let om = ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)
        .path(MANAGER_PATH)
        .build()
        .await
        .map_err(from_zbus)?;
    let objects = om
        .get_managed_objects()
        .await
        .map_err(|e| from_zbus(e.into()))?;
    let mut mods: BTreeMap<String, Props> = BTreeMap::new();
    for (_, mut ifaces) in objects {
        let Some(props) = ifaces.remove(MODULE_IFACE) else {
            continue;
        };
        let name = props
            .get("Name")
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
            .unwrap_or_default();
        mods.insert(name, props);
    }
    Ok(mods.into_values().collect())
}

fn module_json(mut p: Props) -> Result<serde_json::Value, Fail> {
    let p = &mut p;
    Ok(json!({
        "name": take::<String>(p, "Name")?,
        "description": take::<String>(p, "Description")?,
        "mode": take::<String>(p, "Mode")?,
        "mode_reason": take::<String>(p, "ModeReason")?,
        "backend": take::<String>(p, "Backend")?,
        "state": take::<String>(p, "State")?,
        "health": take::<String>(p, "Health")?,
        "health_reason": take::<String>(p, "HealthReason")?,
        "unit": take::<String>(p, "Unit")?,
        "container_id": take::<String>(p, "ContainerId")?,
        "main_pid": take::<u32>(p, "MainPID")?,
        "memory_bytes": take::<u64>(p, "MemoryBytes")?,
        "memory_max_bytes": take::<u64>(p, "MemoryMaxBytes")?,
        "vram_bytes": take::<u64>(p, "VramBytes")?,
        "restarts": take::<u32>(p, "Restarts")?,
        "active_model": take::<String>(p, "ActiveModel")?,
        "since_us": take::<u64>(p, "Since")?,
        "manifest_path": take::<String>(p, "ManifestPath")?,
        "connections": take::<u32>(p, "Connections")?,
        "last_activity_us": take::<u64>(p, "LastActivity")?,
        "idle_stop_at_us": take::<u64>(p, "IdleStopAt")?,
        "on_demand": take::<bool>(p, "OnDemand")?,
        "ram_peak_bytes": take::<u64>(p, "RamPeakBytes")?,
        "vram_peak_bytes": take::<u64>(p, "VramPeakBytes")?,
        "footprint_source": take::<String>(p, "FootprintSource")?,
        "pinned": take::<bool>(p, "Pinned")?,
        "priority": take::<i32>(p, "Priority")?,
        "evictable": take::<bool>(p, "Evictable")?,
    }))
}

/// "3 connections", or "idle 4m, stops in 11m" ([serve]); "" otherwise.
fn activity(v: &serde_json::Value, now_us: u64) -> String {
    let conns = v["connections"].as_u64().unwrap_or(0);
    let at = v["idle_stop_at_us"].as_u64().unwrap_or(0);
    let last = v["last_activity_us"].as_u64().unwrap_or(0);
    let ago = |us: u64| modvisor::manifest::units::format_age(std::time::Duration::from_micros(us));
    match (conns, at) {
        (1, _) => "1 connection".into(),
        (c, _) if c > 1 => format!("{c} connections"),
        (_, 0) => String::new(),
        (_, at) => format!(
            "idle {}, stops in {}",
            ago(now_us.saturating_sub(last)),
            ago(at.saturating_sub(now_us))
        ),
    }
}

/// "pinned", "evictable", with the activity: what `status` shows of admission and [serve].
fn marks(v: &serde_json::Value, now_us: u64) -> String {
    let mut out = Vec::new();
    if v["pinned"].as_bool() == Some(true) {
        out.push("pinned".to_string());
    } else if v["evictable"].as_bool() == Some(true) {
        out.push("evictable".to_string());
    }
    let a = activity(v, now_us);
    if !a.is_empty() {
        out.push(a);
    }
    out.join(", ")
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn s(v: &serde_json::Value, k: &str) -> String {
    match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

async fn connect_daemon(cli: &Cli) -> Result<zbus::Connection, Fail> {
    connect(cli.bus_address.as_deref())
        .await
        .map_err(|e| Fail::Code(5, e))
}

async fn status(cli: &Cli, name: Option<&str>) -> Result<(), Fail> {
    let conn = connect_daemon(cli).await?;
    // One GetAll on the manager: the manager's properties, and whether the daemon answers.
    let mut mgr = manager_props(&conn).await?;
    match name {
        Some(name) => status_one(cli, &conn, name).await,
        None => status_all(cli, &conn, &mut mgr).await,
    }
}

async fn status_one(cli: &Cli, conn: &zbus::Connection, name: &str) -> Result<(), Fail> {
    let m = ManagerProxy::new(conn).await.map_err(from_zbus)?;
    let path = m.get_module(name).await.map_err(from_zbus)?;
    let v = module_json(module_props(conn, path).await?)?;
    if cli.json {
        println!("{v:#}");
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
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
    let fp = s(&v, "footprint_source");
    if !fp.is_empty() {
        println!(
            "  Footprint: RAM {}, VRAM {} ({fp})",
            format_bytes(v["ram_peak_bytes"].as_u64().unwrap_or(0)),
            format_bytes(v["vram_peak_bytes"].as_u64().unwrap_or(0))
        );
    }
    let marks = marks(&v, now_us());
    println!(
        "   Eviction: priority {}{}{marks}",
        s(&v, "priority"),
        if marks.is_empty() { "" } else { ", " }
    );
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
    Ok(())
}

async fn status_all(cli: &Cli, conn: &zbus::Connection, mgr: &mut Props) -> Result<(), Fail> {
    let mut mods = Vec::new();
    for p in all_module_props(conn).await? {
        mods.push(module_json(p)?);
    }
    let errors: Vec<(String, String)> = take(mgr, "ManifestErrors")?;
    let version: String = take(mgr, "Version")?;
    let health: String = take(mgr, "Health")?;
    let native_backend: String = take(mgr, "NativeBackend")?;
    let container_engine: String = take(mgr, "ContainerEngine")?;
    if cli.json {
        let v = json!({
            "version": version,
            "health": health,
            "native_backend": native_backend,
            "container_engine": container_engine,
            "modules": mods,
            "manifest_errors": errors.iter().map(|(f, e)| json!({"file": f, "error": e})).collect::<Vec<_>>(),
        });
        println!("{v:#}");
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    println!(
        "modvisord {version}: {} (native backend: {}, container engine: {})",
        color(&health, tty),
        or_none(native_backend),
        or_none(container_engine),
    );
    println!(
        "{:<20} {:<9} {:<9} {:<9} {:>8} {:>10} {:>9}  {:<24} REASON",
        "NAME", "MODE", "STATE", "HEALTH", "PID", "RAM", "VRAM", "USE"
    );
    let now = now_us();
    for v in &mods {
        let health = s(v, "health");
        let pad = 9usize.saturating_sub(health.len());
        let pid = v["main_pid"].as_u64().unwrap_or(0);
        println!(
            "{:<20} {:<9} {:<9} {}{} {:>8} {:>10} {:>9}  {:<24} {}",
            s(v, "name"),
            or_dash(s(v, "mode")),
            s(v, "state"),
            color(&health, tty),
            " ".repeat(pad),
            if pid > 0 { pid.to_string() } else { "-".into() },
            mem_or_dash(v["memory_bytes"].as_u64().unwrap_or(0)),
            mem_or_dash(v["vram_bytes"].as_u64().unwrap_or(0)),
            or_dash(marks(v, now)),
            s(v, "health_reason"),
        );
    }
    for (_, e) in &errors {
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

/// `logs`: from the journal when modvisord writes module output there (journalctl, with
/// matches only journald and root can produce); otherwise modvisord's own recent lines.
async fn logs(cli: &Cli, name: &str, follow: bool, lines: u32) -> Result<(), Fail> {
    if let Err(e) = modvisor::manifest::validate_name(name) {
        return Err(Fail::Code(2, e));
    }
    let journal = modvisor::journal::journal_socket().exists();
    let asked = match connect(cli.bus_address.as_deref()).await {
        Ok(conn) => get_output(&conn, name, 0, lines).await.map(|o| (conn, o)),
        Err(e) => Err(Fail::Code(5, e)),
    };
    match asked {
        Ok((conn, (false, seq, out))) => {
            print_lines(&out);
            if follow {
                follow_output(&conn, name, seq).await?;
            }
            Ok(())
        }
        Ok((_, (true, ..))) => journal_logs(name, follow, lines),
        Err(_) if journal => journal_logs(name, follow, lines),
        Err(Fail::Code(5, _)) => Err(Fail::Code(
            5,
            "modvisord is not reachable and no journal runs here: module output is in \
             module_log_dir/NAME.log when [logging] module_log_dir is set"
                .into(),
        )),
        Err(f) => Err(f),
    }
}

async fn get_output(
    conn: &zbus::Connection,
    name: &str,
    after: u64,
    max: u32,
) -> Result<(bool, u64, Vec<String>), Fail> {
    let reply = conn
        .call_method(
            Some(BUS_NAME),
            MANAGER_PATH,
            Some(MANAGER_IFACE),
            "GetOutput",
            &(name, after, max),
        )
        .await
        .map_err(from_zbus)?;
    reply
        .body()
        .deserialize()
        .map_err(|e| Fail::Code(1, format!("GetOutput: {e}")))
}

fn print_lines(lines: &[String]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for l in lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
}

/// `logs -f` without a journal: asks for newer lines twice a second until interrupted.
async fn follow_output(conn: &zbus::Connection, name: &str, mut seq: u64) -> Result<(), Fail> {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let (_, newest, out) = get_output(conn, name, seq, u32::MAX).await?;
        if newest < seq {
            // The module was removed and added again: its lines start over.
            seq = 0;
            continue;
        }
        print_lines(&out);
        seq = newest;
    }
}

fn journal_logs(name: &str, follow: bool, lines: u32) -> Result<(), Fail> {
    use std::os::unix::process::CommandExt;
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

struct ExportArgs<'a> {
    name: Option<&'a str>,
    all: bool,
    format: ExportFormat,
    config: &'a Path,
    manifest: Option<&'a Path>,
    model: Option<&'a Path>,
    output: Option<&'a Path>,
}

/// `export`: from the manifests alone, like `validate`. Writes what it can; exits with the
/// code of the first failure (3 no such module, 1 otherwise, 2 usage).
fn export(a: &ExportArgs<'_>) -> Result<(), Fail> {
    use modvisor::export::{self, Format, Selection, Source};
    if let Some(n) = a.name
        && let Err(e) = modvisor::manifest::validate_name(n)
    {
        return Err(Fail::Code(2, e));
    }
    let format = match a.format {
        ExportFormat::Kube => Format::Kube,
        ExportFormat::Systemd => Format::Systemd,
    };
    if a.all && format == Format::Systemd && a.output.is_none() {
        return Err(Fail::Code(
            2,
            "--all --format systemd writes one unit file per module: give --output DIR".into(),
        ));
    }
    let explicit = a.config.as_os_str() != modvisor::config::DEFAULT_CONFIG;
    let cfg = modvisor::config::Config::load(explicit.then_some(a.config))
        .map_err(|e| Fail::Code(1, e.to_string()))?;
    let source = match a.manifest {
        Some(p) => Source::File(p),
        None => Source::Config(&cfg),
    };
    let loaded = export::load(source).map_err(|e| Fail::Code(e.exit_code(), e.to_string()))?;
    let selection = match (a.name, a.all) {
        (Some(n), _) => Selection::One(n.to_string()),
        (None, true) => Selection::All,
        (None, false) => Selection::TheFile,
    };
    let (outputs, errors) =
        export::export_selected(&loaded, &selection, format, &cfg.state, a.model);
    write_exports(&outputs, a.output)?;
    match errors.as_slice() {
        [] => Ok(()),
        [e] if outputs.is_empty() => Err(Fail::Code(e.exit_code(), e.to_string())),
        [first, ..] => {
            for e in &errors {
                eprintln!("modvisorctl: {e}");
            }
            Err(Fail::Code(
                first.exit_code(),
                format!(
                    "{} of {} modules not exported",
                    errors.len(),
                    errors.len() + outputs.len()
                ),
            ))
        }
    }
}

fn write_exports(outputs: &[modvisor::export::Output], dir: Option<&Path>) -> Result<(), Fail> {
    let Some(dir) = dir else {
        let texts: Vec<&str> = outputs.iter().map(|o| o.text.as_str()).collect();
        print!("{}", texts.join("---\n"));
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|e| Fail::Code(1, format!("{}: {e}", dir.display())))?;
    for o in outputs {
        let p = dir.join(&o.file_name);
        std::fs::write(&p, &o.text).map_err(|e| Fail::Code(1, format!("{}: {e}", p.display())))?;
        eprintln!("{}: {}", o.module, p.display());
    }
    Ok(())
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

async fn list(cli: &Cli) -> Result<(), Fail> {
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

async fn reload(cli: &Cli) -> Result<(), Fail> {
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

async fn explain(cli: &Cli, name: &str) -> Result<(), Fail> {
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

/// `activate`: with `--pull`, the model is pulled into the store first.
async fn activate(cli: &Cli, name: &str, model: &str, pull: bool, yes: bool) -> Result<(), Fail> {
    let (conn, m) = manager(cli).await?;
    if pull {
        let source = modvisor::store::split_file(model).0;
        models::pull(&conn, source, None, &[], yes).await?;
    }
    m.activate_model(name, model).await.map_err(from_zbus)
}

async fn run(cli: &Cli) -> Result<(), Fail> {
    match &cli.cmd {
        Cmd::Status { name } => status(cli, name.as_deref()).await,
        Cmd::List => list(cli).await,
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
        Cmd::Reload => reload(cli).await,
        Cmd::Explain { name } => explain(cli, name).await,
        Cmd::Activate {
            name,
            model,
            pull,
            yes,
        } => activate(cli, name, model, *pull, *yes).await,
        Cmd::Pull {
            source,
            sha256,
            include,
            yes,
        } => {
            let conn = connect_daemon(cli).await?;
            models::pull(&conn, source, sha256.as_deref(), include, *yes).await
        }
        Cmd::Models => models::list(&connect_daemon(cli).await?, cli.json).await,
        Cmd::Rm { model, force } => {
            models::remove(&connect_daemon(cli).await?, model, *force).await
        }
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
        } => logs(cli, name, *follow, *lines).await,
        Cmd::Validate { paths } => validate(paths, cli.json),
        Cmd::Export {
            name,
            all,
            format,
            config,
            manifest,
            model,
            output,
        } => export(&ExportArgs {
            name: name.as_deref(),
            all: *all,
            format: *format,
            config,
            manifest: manifest.as_deref(),
            model: model.as_deref(),
            output: output.as_deref(),
        }),
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
        Err(Fail::Denied) => {
            eprintln!(
                "modvisorctl: not allowed: only root and members of group modvisor may {}",
                action(&cli.cmd)
            );
            ExitCode::from(4)
        }
        Err(Fail::Code(code, msg)) => {
            eprintln!("modvisorctl: {msg}");
            ExitCode::from(code)
        }
    }
}

/// What a refused command wanted to do, for the one sentence a refusal prints (the bus's own
/// "Rejected send message, 1 matched rules; ..." helps nobody).
fn action(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Start { .. } => "start modules",
        Cmd::Stop { .. } => "stop modules",
        Cmd::Restart { .. } => "restart modules",
        Cmd::Reload => "reload the manifests",
        Cmd::Override { .. } => "override a module's mode",
        Cmd::Activate { .. } => "activate models",
        Cmd::Pull { .. } => "pull models",
        Cmd::Rm { .. } => "remove models",
        Cmd::Logs { .. } => "read module output",
        _ => "do this",
    }
}
