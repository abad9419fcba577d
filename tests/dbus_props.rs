//! The D-Bus properties as a client sees them on a private real dbus-daemon: every
//! PropertiesChanged names only properties the interface introspects (the manager's carries
//! NativeBackend), a pass of the Publisher that fails for real is retried without losing
//! objects or signals, and text the bus cannot carry does not cost the daemon its bus.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use common::*;
use futures_util::StreamExt;
use modvisor::dbus::server::{Publisher, serve};
use modvisor::state::{Health, ModuleStatus, Snapshot, State};
use modvisor::supervisor::Handle;
use tokio::sync::{broadcast, mpsc, watch};
use zbus::{Connection, Message, MessageStream, OwnedVariant};

const MANAGER: &str = "org.modvisor1.Manager";
const MODULE: &str = "org.modvisor1.Module";

/// Every signal under /org/modvisor1, whoever sends it (also before the name is owned).
async fn signals(conn: &Connection) -> MessageStream {
    MessageStream::for_match_rule(
        "type='signal',path_namespace='/org/modvisor1'",
        conn,
        NonZeroUsize::new(10_000),
    )
    .await
    .expect("subscribe to signals")
}

/// A signal, reduced to what the tests look at.
#[derive(Debug, Clone)]
enum Sig {
    /// (object path, interface, changed properties)
    Changed(String, String, HashMap<String, OwnedVariant>),
    /// ModuleChanged: (name, state)
    Module(String, String),
    /// (object path, interfaces with their properties)
    Added(String, HashMap<String, HashMap<String, OwnedVariant>>),
    Other,
}

type ChangedBody = (String, HashMap<String, OwnedVariant>, Vec<String>);
type AddedBody = (
    zbus::OwnedObjectPath,
    HashMap<String, HashMap<String, OwnedVariant>>,
);

fn parse(msg: &Message) -> Sig {
    let h = msg.header();
    let member = h.member().map(|m| m.to_string()).unwrap_or_default();
    let path = h.path().map(|p| p.to_string()).unwrap_or_default();
    let body = msg.body();
    match member.as_str() {
        "PropertiesChanged" => {
            let (iface, changed, _): ChangedBody = body.deserialize().expect("PropertiesChanged");
            Sig::Changed(path, iface, changed)
        }
        "ModuleChanged" => {
            let (n, s, _, _): (String, String, String, String) =
                body.deserialize().expect("ModuleChanged");
            Sig::Module(n, s)
        }
        "InterfacesAdded" => {
            let (p, ifaces): AddedBody = body.deserialize().expect("InterfacesAdded");
            Sig::Added(p.to_string(), ifaces)
        }
        _ => Sig::Other,
    }
}

/// Reads signals into `seen` until `done(seen)` holds; panics after `T`.
async fn until(stream: &mut MessageStream, seen: &mut Vec<Sig>, done: impl Fn(&[Sig]) -> bool) {
    let deadline = Instant::now() + T;
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(msg))) => seen.push(parse(&msg)),
            Ok(Some(Err(e))) => panic!("signal stream: {e}"),
            Ok(None) => panic!("signal stream ended; seen {seen:?}"),
            Err(_) => panic!("condition not reached within {T:?}; seen {seen:?}"),
        }
    }
}

/// The property names of `iface` as the object at `path` introspects them.
async fn introspected(conn: &Connection, path: &str, iface: &str) -> BTreeSet<String> {
    let p = zbus::fdo::IntrospectableProxy::builder(conn)
        .destination("org.modvisor1")
        .path(path)
        .build()
        .await
        .expect("introspectable proxy");
    let xml = p.introspect().await.expect("Introspect");
    let start = format!("<interface name=\"{iface}\">");
    let body = xml
        .split_once(&start)
        .and_then(|(_, rest)| rest.split_once("</interface>"))
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("{path} has no {iface}: {xml}"));
    body.split("<property name=\"")
        .skip(1)
        .filter_map(|s| s.split_once('"').map(|(n, _)| n.to_string()))
        .collect()
}

fn changed_names(seen: &[Sig], iface: &str) -> BTreeSet<String> {
    seen.iter()
        .filter_map(|s| match s {
            Sig::Changed(_, i, c) if i == iface => Some(c.keys().cloned()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn manager_changed(seen: &[Sig], name: &str) -> bool {
    changed_names(seen, MANAGER).contains(name)
}

#[tokio::test]
async fn properties_changed_names_only_introspected_properties_and_carries_native_backend() {
    properties_changed_names_only_introspected_properties("direct").await;
}

#[tokio::test]
async fn properties_changed_under_systemd_carries_native_backend_systemd() {
    properties_changed_names_only_introspected_properties("systemd").await;
}

async fn properties_changed_names_only_introspected_properties(backend: &'static str) {
    let svc = format!("pc{backend}{}", std::process::id());
    let _units = Units(vec![format!("modvisor-{svc}.service")]);
    let opts = Options {
        backend,
        ..Options::default()
    };
    let mut d = Daemon::start_with(&[(&svc, &sh_module("exec sleep 1000", ""))], opts).await;
    let svc = svc.as_str();
    d.wait_state(svc, "running").await;
    let manager_props = introspected(&d.conn, "/org/modvisor1", MANAGER).await;
    let path = format!("/org/modvisor1/module/{svc}");
    let module_props = introspected(&d.conn, &path, MODULE).await;
    assert!(manager_props.contains("NativeBackend") && !manager_props.contains("Backend"));

    // A new modvisord publishes the manager for the first time: it announces NativeBackend.
    assert_eq!(d.stop(), Some(0), "a clean exit; log:\n{}", d.log());
    let mut stream = signals(&d.conn).await;
    d.spawn(&[]).await;
    let mut seen = Vec::new();
    until(&mut stream, &mut seen, |s| {
        manager_changed(s, "NativeBackend")
    })
    .await;
    let first = seen.iter().find_map(|s| match s {
        Sig::Changed(_, i, c) if i == MANAGER => Some(c.clone()),
        _ => None,
    });
    let native = first.and_then(|c| c.get("NativeBackend").map(|v| v.to_string()));
    assert_eq!(native, Some(format!("\"{backend}\"")), "{seen:?}");
    d.wait_state(svc, "running").await;

    // Online to offline changes the manager's Health and counts, and the module's State.
    let m = d.manager().await;
    m.stop_module(svc).await.expect("StopModule");
    until(&mut stream, &mut seen, |s| {
        ["Health", "ModulesOnline", "ModulesOffline"]
            .iter()
            .all(|p| manager_changed(s, p))
            && changed_names(s, MODULE).contains("State")
    })
    .await;
    assert_eq!(m.modules_offline().await.expect("ModulesOffline"), 1);
    assert_eq!(m.health().await.expect("Health"), "offline");

    let unknown: Vec<_> = changed_names(&seen, MANAGER)
        .difference(&manager_props)
        .cloned()
        .collect();
    assert!(unknown.is_empty(), "not Manager properties: {unknown:?}");
    let unknown: Vec<_> = changed_names(&seen, MODULE)
        .difference(&module_props)
        .cloned()
        .collect();
    assert!(unknown.is_empty(), "not Module properties: {unknown:?}");
    assert!(!changed_names(&seen, MANAGER).contains("Version"), "const");
}

#[tokio::test]
async fn a_nul_in_a_description_does_not_cost_the_daemon_its_bus() {
    // Refused at load with its position (a NUL cannot cross D-Bus); the daemon stays on the
    // bus and the others run.
    let d = Daemon::start(&[
        (
            "nul",
            &sh_module("exec sleep 1000", "description = \"a\\u0000b\"\n"),
        ),
        ("fine", &sh_module("exec sleep 1000", "")),
    ])
    .await;
    d.wait_state("fine", "running").await;
    let m = d.manager().await;
    let errs = m.manifest_errors().await.expect("ManifestErrors");
    assert!(
        errs.iter().any(|(f, e)| f.ends_with("nul.toml")
            && e.contains(
                "nul.toml:2:15: description: control characters (such as NUL) are not allowed"
            )),
        "{errs:?}"
    );
    assert_eq!(
        m.version().await.expect("still on the bus"),
        env!("CARGO_PKG_VERSION")
    );
}

fn status(name: &str, description: String) -> ModuleStatus {
    ModuleStatus {
        name: name.into(),
        description,
        mode: "native".into(),
        mode_reason: "native: the only mode of the module".into(),
        backend: "direct".into(),
        state: State::Running,
        health: Health::Online,
        health_reason: "running".into(),
        unit: String::new(),
        container_id: String::new(),
        main_pid: 100,
        memory_bytes: 0,
        memory_max_bytes: 0,
        vram_bytes: 0,
        vram_by_gpu: Vec::new(),
        restarts: 0,
        active_model: String::new(),
        since_us: 1,
        manifest_path: format!("/m/{name}.toml"),
        counters: Default::default(),
        connections: 0,
        last_activity_us: 0,
        idle_stop_at_us: 0,
        on_demand: false,
        ram_peak_bytes: 0,
        vram_peak_bytes: 0,
        footprint_source: String::new(),
        pinned: false,
        priority: 0,
        evictable: false,
    }
}

/// A description no D-Bus message can carry (over 128 MiB): the signals with it fail.
fn too_big() -> String {
    "x".repeat(130 << 20)
}

fn snapshot(mods: Vec<ModuleStatus>) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        modules: mods
            .into_iter()
            .map(|m| (m.name.clone(), m.into()))
            .collect(),
        native_backend: "direct".into(),
        ..Snapshot::default()
    })
}

fn added(seen: &[Sig], path: &str) -> Option<HashMap<String, OwnedVariant>> {
    seen.iter().find_map(|s| match s {
        Sig::Added(p, i) if p == path => i.get(MODULE).cloned(),
        _ => None,
    })
}

fn module_changes<'a>(seen: &'a [Sig], name: &str) -> Vec<&'a str> {
    seen.iter()
        .filter_map(|s| match s {
            Sig::Module(n, st) if n == name => Some(st.as_str()),
            _ => None,
        })
        .collect()
}

/// A manager served on a private bus with its publisher running from `first`, and a client
/// that follows the signals.
struct Published {
    _bus: Bus,
    _server: Connection,
    client: Connection,
    stream: MessageStream,
    tx: watch::Sender<Arc<Snapshot>>,
}

async fn publish(first: Arc<Snapshot>) -> Published {
    let bus = Bus::start();
    let conn = bus.connect().await;
    let client = bus.connect().await;
    let stream = signals(&client).await;
    let (tx, rx) = watch::channel(first);
    let handle = Handle {
        commands: mpsc::channel(1).0,
        state: rx.clone(),
        signals: broadcast::channel(4).0,
    };
    let published = serve(&conn, handle.clone()).await.expect("serve");
    let publisher = Publisher::new(conn.clone(), rx, published)
        .await
        .expect("publisher");
    conn.request_name("org.modvisor1").await.expect("own name");
    tokio::spawn(publisher.run(handle.signals.subscribe()));
    Published {
        _bus: bus,
        _server: conn,
        client,
        stream,
        tx,
    }
}

/// The first PropertiesChanged of the object at `path`.
fn changed_of(seen: &[Sig], path: &str) -> Option<HashMap<String, OwnedVariant>> {
    seen.iter().find_map(|x| match x {
        Sig::Changed(p, _, c) if p == path => Some(c.clone()),
        _ => None,
    })
}

/// `name`, failed and offline, with `description`.
fn failed(name: &str, description: String) -> ModuleStatus {
    let mut m = status(name, description);
    (m.state, m.health, m.main_pid) = (State::Failed, Health::Offline, 0);
    m
}

#[tokio::test]
async fn a_failed_pass_is_retried_and_loses_no_object_or_signal() {
    let first = snapshot(vec![
        status("big", too_big()),
        status("small", "small".into()),
    ]);
    let mut p = publish(first).await;
    // Pass 1: big's InterfacesAdded fails (too large); nothing else may be lost.
    let mut seen = Vec::new();
    until(&mut p.stream, &mut seen, |s| {
        module_changes(s, "big") == ["running"]
            && module_changes(s, "small") == ["running"]
            && added(s, "/org/modvisor1/module/small").is_some()
            && manager_changed(s, "NativeBackend")
    })
    .await;
    let proxy = modvisor::dbus::client::ManagerProxy::new(&p.client)
        .await
        .expect("manager");
    let rows = proxy.list_modules().await.expect("ListModules");
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["big", "small"], "both objects exist");
    assert!(added(&seen, "/org/modvisor1/module/big").is_none());

    // Pass 2: big's description fits again: its InterfacesAdded goes out, with it.
    let fits = || status("big", "fits".into());
    p.tx.send_replace(snapshot(vec![fits(), status("small", "small".into())]));
    until(&mut p.stream, &mut seen, |s| {
        added(s, "/org/modvisor1/module/big").is_some()
    })
    .await;
    let big = added(&seen, "/org/modvisor1/module/big").unwrap_or_default();
    assert_eq!(
        big.get("Description").map(|v| v.to_string()).as_deref(),
        Some("\"fits\"")
    );

    // Pass 3: small fails and gets a description too large: its PropertiesChanged fails,
    // its ModuleChanged and the manager's PropertiesChanged still go out.
    p.tx.send_replace(snapshot(vec![fits(), failed("small", too_big())]));
    until(&mut p.stream, &mut seen, |s| {
        module_changes(s, "small") == ["running", "failed"] && manager_changed(s, "ModulesOffline")
    })
    .await;

    // Pass 4: the description fits: the PropertiesChanged carries what was never announced
    // (State, MainPID), not only what changed since pass 3.
    p.tx.send_replace(snapshot(vec![fits(), failed("small", "fits".into())]));
    let small = "/org/modvisor1/module/small";
    until(&mut p.stream, &mut seen, |s| changed_of(s, small).is_some()).await;
    let body = changed_of(&seen, small).unwrap_or_default();
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["Description", "Health", "MainPID", "State"]);
    assert_eq!(
        module_changes(&seen, "small"),
        ["running", "failed"],
        "no ModuleChanged twice"
    );
    assert_eq!(
        managed_module_paths(&p.client).await,
        ["/org/modvisor1/module/big", "/org/modvisor1/module/small"]
    );
}
