//! The systemd backend: each module a transient unit `modvisor-NAME.service` (or an existing
//! unit, started/stopped/observed, never duplicated), followed through the manager's
//! PropertiesChanged signals after `Subscribe()`; no polling.
//!
//! Every transient-unit property is set explicitly, with why:
//! - `LimitCORE`/`LimitCORESoft` = 0: a crashing engine never dumps gigabytes of core.
//! - `KillMode=control-group`: stop really stops everything the engine forked.
//! - `Restart`, `RestartUSec`, `StartLimitBurst`, `StartLimitIntervalUSec`: systemd restarts the
//!   engine itself (also while modvisord is down), within the manifest's budget;
//!   `RestartPreventExitStatus=126 127`: a command that cannot run is not restarted.
//! - `TimeoutStopUSec`: SIGTERM, then SIGKILL of the cgroup after the manifest's stop timeout.
//! - `MemoryMax` when set; `Environment`, `WorkingDirectory`, `User` as the manifest says.
//! - `Environment=MODVISOR_SPEC=HASH`: a hash of what the unit runs, read back on adoption.
//! - `SyslogIdentifier`/`LogExtraFields=MODVISOR_MODULE=NAME`: the journal can be filtered by module.
//! - `User=` (default `modvisor-engine`), the sandbox and the secrets: see [`sandbox`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use zbus::message::Sequence;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

use crate::manifest::NativeExec;

pub mod calls;
mod changed_body;
mod payload;
pub mod sandbox;
pub mod signals;
use calls::Calls;
use sandbox::ManagerKind;
use signals::{Change, Subscription, UnitSignals};

use super::{
    Backend, BoxFuture, Exec, ExitInfo, Owned, RunHandle, RunPhase, RunRequest, RuntimeError,
    RuntimeEvent, fnv,
};

pub fn unit_name(module: &str) -> String {
    format!("modvisor-{module}.service")
}

/// The object path systemd gives a unit (same escaping as ours).
pub fn unit_path(unit: &str) -> String {
    format!(
        "/org/freedesktop/systemd1/unit/{}",
        crate::objpath::escape_path_element(unit)
    )
}

/// The hash of what a transient unit runs: a change means the unit must be replaced.
/// It covers the identity and the sandbox (and the manager kind, which decides the directives).
pub fn spec_hash(req: &RunRequest, kind: ManagerKind) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Exec::Native(NativeExec::Command {
        argv,
        environment,
        working_directory,
        privileges,
    }) = &req.exec
    {
        parts.extend(argv.iter().cloned());
        parts.push("--env".into());
        parts.extend(environment.iter().map(|(k, v)| format!("{k}={v}")));
        parts.push(format!("wd={:?}", working_directory));
        parts.push(format!("privileges={:?}", privileges));
        parts.push(format!("manager={:?}", kind));
    }
    parts.push(format!("mem={:?}", req.memory_max));
    parts.push(format!("restart={:?}", req.restart));
    parts.push(format!("stop={:?}", req.stop_timeout));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    fnv(&refs)
}

/// What the unit looks like now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitStatus {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub job_pending: bool,
    pub main_pid: u32,
    pub n_restarts: u32,
    pub result: String,
    pub exec_main_code: i32,
    pub exec_main_status: i32,
    pub environment: Vec<String>,
}

impl UnitStatus {
    /// The last exit as systemd saw it: "exit-code 1", "signal SEGV", "oom-kill", ...
    pub fn exit_info(&self) -> ExitInfo {
        match self.result.as_str() {
            "oom-kill" => ExitInfo::Other("oom-kill".into()),
            "timeout" => ExitInfo::Other("timeout".into()),
            "core-dump" | "signal" => ExitInfo::Signal(self.exec_main_status),
            "exit-code" => ExitInfo::Code(self.exec_main_status),
            _ => match self.exec_main_code {
                // CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3
                2 | 3 => ExitInfo::Signal(self.exec_main_status),
                _ => ExitInfo::Code(self.exec_main_status),
            },
        }
    }
}

fn get<T: TryFrom<OwnedVariant>>(m: &HashMap<String, OwnedVariant>, k: &str) -> Option<T> {
    m.get(k)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

pub struct SystemdBackend {
    sh: Arc<Shared>,
}

/// What every run of the backend uses: the connection, its bounded calls and the one
/// subscription to systemd's signals.
struct Shared {
    conn: Connection,
    manager: ManagerProxy<'static>,
    calls: Calls,
    /// Bounds the creations among the calls ([`calls::MAX_CREATING`]).
    creating: tokio::sync::Semaphore,
    signals: UnitSignals,
    /// `MODVISOR_OWNER=STATE_DIR` in each transient unit's environment: which modvisord
    /// instance a unit belongs to (one per manager in production; many in tests).
    owner: String,
    /// The state root (`${state_dir}` of a module is `STATE/modules/NAME`).
    state: std::path::PathBuf,
    kind: ManagerKind,
}

impl SystemdBackend {
    /// Connects to the manager on `conn` (the system bus), subscribes to its signals (needed
    /// for systemd to send unit changes at all) and adds the match rules for them.
    /// Fails when no manager answers there.
    pub async fn connect(
        conn: Connection,
        state_dir: &std::path::Path,
    ) -> zbus::Result<SystemdBackend> {
        let manager = ManagerProxy::new(&conn).await?;
        let version = manager.version().await?;
        manager.subscribe().await?;
        let signals = UnitSignals::start(&conn).await?;
        let kind = ManagerKind::detect(&conn).await?;
        tracing::info!(
            "systemd {version} answers on the bus ({}): using transient units",
            kind.describe()
        );
        if !kind.system {
            tracing::warn!(
                "{} refuses ProtectHome=, ProtectKernelTunables= and ProtectKernelLogs=: engines run without them",
                kind.describe()
            );
        }
        let sh = Shared {
            conn,
            manager,
            calls: Calls::default(),
            creating: tokio::sync::Semaphore::new(calls::MAX_CREATING),
            signals,
            owner: format!("MODVISOR_OWNER={}", state_dir.display()),
            state: state_dir.to_path_buf(),
            kind,
        };
        Ok(SystemdBackend { sh: Arc::new(sh) })
    }

    /// The manager units are created in.
    pub fn manager_kind(&self) -> ManagerKind {
        self.sh.kind
    }

    fn transient_properties(
        req: &RunRequest,
        hash: &str,
        owner: &str,
        unit_env: &UnitEnv,
    ) -> Vec<(String, OwnedVariant)> {
        let Exec::Native(NativeExec::Command {
            argv,
            environment,
            working_directory,
            privileges,
        }) = &req.exec
        else {
            return Vec::new();
        };
        let usec = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
        let ov = |v: Variant<'static>| OwnedVariant::try_from(v).ok();
        let mut p: Vec<(&str, Option<OwnedVariant>)> = vec![
            ("Description", ov(Variant::from(unit_description(req)))),
            ("ExecStart", ov(Variant::from(exec_start(argv)))),
            (
                "Environment",
                ov(Variant::from(unit_environment(
                    req,
                    environment,
                    hash,
                    owner,
                ))),
            ),
            ("LimitCORE", ov(Variant::from(0u64))),
            ("LimitCORESoft", ov(Variant::from(0u64))),
            ("KillMode", ov(Variant::from("control-group".to_string()))),
            (
                "Restart",
                ov(Variant::from(req.restart.policy.as_str().to_string())),
            ),
            ("RestartUSec", ov(Variant::from(usec(req.restart.delay)))),
            // 126/127: the command could not run (not executable, not found, a shared
            // library missing). A configuration error: restarting cannot help.
            (
                "RestartPreventExitStatus",
                ov(Variant::from((vec![126i32, 127], Vec::<i32>::new()))),
            ),
            // Measured on systemd 252: StartLimitBurst=N allows N automatic restarts.
            ("StartLimitBurst", ov(Variant::from(req.restart.max))),
            (
                "StartLimitIntervalUSec",
                ov(Variant::from(usec(req.restart.window))),
            ),
            ("TimeoutStopUSec", ov(Variant::from(usec(req.stop_timeout)))),
            ("SyslogIdentifier", ov(Variant::from(req.name.clone()))),
            (
                "LogExtraFields",
                ov(Variant::from(vec![
                    format!("MODVISOR_MODULE={}", req.name).into_bytes(),
                ])),
            ),
            ("StandardOutput", ov(Variant::from("journal".to_string()))),
            ("StandardError", ov(Variant::from("journal".to_string()))),
        ];
        if let Some(m) = req.memory_max {
            p.push(("MemoryMax", ov(Variant::from(m))));
        }
        if let Some(w) = working_directory {
            p.push((
                "WorkingDirectory",
                ov(Variant::from(w.display().to_string())),
            ));
        }
        p.extend(sandbox::properties(
            privileges,
            unit_env.kind,
            &sandbox::state_dir(&unit_env.state, &req.name),
            &unit_env.host,
        ));
        p.into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect()
    }
}

fn unit_description(req: &RunRequest) -> String {
    if req.description.is_empty() {
        format!("modvisor module {}", req.name)
    } else {
        format!("modvisor module {}: {}", req.name, req.description)
    }
}

/// systemd expands $VAR and $$ in ExecStart at exec time; escaped, so that the engine gets the
/// argv the manifest wrote, as under the direct backend.
fn exec_start(argv: &[String]) -> Vec<(String, Vec<String>, bool)> {
    let escaped = argv.iter().map(|a| a.replace('$', "$$")).collect();
    vec![(argv[0].clone(), escaped, false)]
}

/// The manifest's environment, plus who the unit belongs to: the module, the spec it runs
/// (adoption compares it) and the modvisord instance (`owner`).
fn unit_environment(
    req: &RunRequest,
    environment: &std::collections::BTreeMap<String, String>,
    hash: &str,
    owner: &str,
) -> Vec<String> {
    let mut env: Vec<String> = environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("MODVISOR_MODULE={}", req.name));
    env.push(format!("MODVISOR_SPEC={hash}"));
    env.push(owner.to_string());
    env
}

/// What the properties need besides the request: the manager and the host's devices.
struct UnitEnv {
    kind: ManagerKind,
    state: std::path::PathBuf,
    host: sandbox::Host,
}

/// The blocking checks before a transient unit (identity, secret files, devices); logs a
/// warning for a root engine. Blocking: [`SystemdBackend::start`] runs it on the blocking
/// thread it is called on, [`prepare_unit`] on one of its own.
fn prepare_now(
    req: &RunRequest,
    kind: ManagerKind,
    state: &std::path::Path,
) -> Result<UnitEnv, String> {
    let Exec::Native(NativeExec::Command { privileges, .. }) = &req.exec else {
        return Err("not a native command".into());
    };
    let host = sandbox::prepare(privileges, kind)?;
    if privileges.runs_as_root() {
        tracing::warn!(modvisor_module = %req.name, "{} runs as root (user = \"root\" in its manifest): a crafted model would run code as root", req.name);
    }
    Ok(UnitEnv {
        kind,
        state: state.to_path_buf(),
        host,
    })
}

/// [`prepare_now`] off the runtime, for a unit created again (it existed) or not prepared at
/// the start (adoption was expected).
async fn prepare_unit(
    req: &RunRequest,
    kind: ManagerKind,
    state: &std::path::Path,
) -> Result<UnitEnv, String> {
    let (req, state) = (req.clone(), state.to_path_buf());
    tokio::task::spawn_blocking(move || prepare_now(&req, kind, &state))
        .await
        .map_err(|e| format!("preparing the unit: {e}"))?
}

const SYSTEMD: &str = "org.freedesktop.systemd1";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const UNIT_EXISTS: &str = "org.freedesktop.systemd1.UnitExists";
const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
const SERVICE_IFACE: &str = "org.freedesktop.systemd1.Service";
/// What [`UnitStatus`] is made of.
const UNIT_PROPS: &[&str] = &["LoadState", "ActiveState", "SubState", "Job"];
const SERVICE_PROPS: &[&str] = &[
    "MainPID",
    "NRestarts",
    "Result",
    "ExecMainCode",
    "ExecMainStatus",
    "Environment",
];

impl Shared {
    /// One property of the object at `path`, in one bounded call.
    async fn get_one(&self, path: &str, interface: &str, name: &str) -> zbus::Result<OwnedVariant> {
        self.calls
            .run("Get", |_| async {
                let reply = self
                    .conn
                    .call_method(
                        Some(SYSTEMD),
                        path,
                        Some("org.freedesktop.DBus.Properties"),
                        "Get",
                        &(interface, name),
                    )
                    .await?;
                reply.body().deserialize::<OwnedVariant>()
            })
            .await
    }

    /// The named properties of one interface, asked all at once. Not GetAll: systemd's Service
    /// interface has hundreds of properties, and serializing them for every change of every
    /// unit was most of the work modvisord gave systemd while hundreds of units started.
    async fn get_some(
        &self,
        path: &str,
        interface: &str,
        names: &[&str],
    ) -> zbus::Result<HashMap<String, OwnedVariant>> {
        let values =
            futures_util::future::join_all(names.iter().map(|n| self.get_one(path, interface, n)))
                .await;
        names
            .iter()
            .zip(values)
            .map(|(n, v)| v.map(|v| (n.to_string(), v)))
            .collect()
    }

    /// The unit's state in one round trip: every property is asked at once (the Service ones
    /// are used only when the unit is loaded).
    async fn status(&self, path: &str) -> zbus::Result<UnitStatus> {
        let (unit, svc) = futures_util::join!(
            self.get_some(path, UNIT_IFACE, UNIT_PROPS),
            self.get_some(path, SERVICE_IFACE, SERVICE_PROPS)
        );
        let unit = unit?;
        let mut st = UnitStatus {
            load_state: get(&unit, "LoadState").unwrap_or_default(),
            active_state: get(&unit, "ActiveState").unwrap_or_default(),
            sub_state: get(&unit, "SubState").unwrap_or_default(),
            ..UnitStatus::default()
        };
        let job: Option<(u32, OwnedObjectPath)> = get(&unit, "Job");
        st.job_pending = job.is_some_and(|(id, _)| id != 0);
        if st.load_state == "loaded" {
            let svc = svc?;
            st.main_pid = get(&svc, "MainPID").unwrap_or(0);
            st.n_restarts = get(&svc, "NRestarts").unwrap_or(0);
            st.result = get(&svc, "Result").unwrap_or_default();
            st.exec_main_code = get(&svc, "ExecMainCode").unwrap_or(0);
            st.exec_main_status = get(&svc, "ExecMainStatus").unwrap_or(0);
            st.environment = get(&svc, "Environment").unwrap_or_default();
        }
        Ok(st)
    }

    /// The unit's state before a run starts or adopts it. A unit systemd has not loaded (the
    /// usual case: a transient unit about to be created) is told by one `GetUnit`, without
    /// reading its properties: reading a property of an unloaded unit makes systemd load it
    /// from disk and unload it again, once per property, all before the start itself.
    async fn look(&self, unit: &str) -> zbus::Result<UnitStatus> {
        let found = self
            .calls
            .run("GetUnit", |_| self.manager.get_unit(unit.to_string()))
            .await;
        match found {
            Ok(_) => self.status(&unit_path(unit)).await,
            Err(e) if calls::error_name(&e).as_deref() == Some(NO_SUCH_UNIT) => Ok(UnitStatus {
                load_state: "not-found".into(),
                active_state: "inactive".into(),
                ..UnitStatus::default()
            }),
            Err(e) => Err(e),
        }
    }

    async fn start_unit(&self, unit: &str) -> zbus::Result<()> {
        self.calls
            .run("StartUnit", |_| {
                self.manager.start_unit(unit.to_string(), "replace".into())
            })
            .await
            .map(drop)
    }

    async fn stop_unit(&self, unit: &str) -> zbus::Result<()> {
        self.calls
            .run("StopUnit", |_| {
                self.manager.stop_unit(unit.to_string(), "replace".into())
            })
            .await
            .map(drop)
    }

    async fn reset_failed(&self, unit: &str) -> zbus::Result<()> {
        self.calls
            .run("ResetFailedUnit", |_| {
                self.manager.reset_failed_unit(unit.to_string())
            })
            .await
    }

    /// StartTransientUnit with the properties `props` makes (again for each attempt). Returns
    /// where its reply came in the connection's stream (None when an earlier attempt created
    /// the unit after all: its changes may have come before this reply).
    async fn start_transient(
        &self,
        unit: &str,
        props: impl Fn() -> Vec<(String, OwnedVariant)>,
    ) -> zbus::Result<Option<Sequence>> {
        // Never closed; were it, creations would just go unbounded.
        let _creating = self.creating.acquire().await.ok();
        self.calls
            .run("StartTransientUnit", |attempt| {
                let aux: Vec<(String, Vec<(String, OwnedVariant)>)> = Vec::new();
                let body = (unit.to_string(), "fail".to_string(), props(), aux);
                async move {
                    let call = self
                        .manager
                        .inner()
                        .call_method("StartTransientUnit", &body);
                    match call.await {
                        Ok(reply) => Ok(Some(reply.recv_position())),
                        // After a NoReply, the attempt before may have created it after all.
                        Err(e)
                            if attempt > 0
                                && calls::error_name(&e).as_deref() == Some(UNIT_EXISTS) =>
                        {
                            Ok(None)
                        }
                        Err(e) => Err(e),
                    }
                }
            })
            .await
    }

    /// Our units that exist now (their environment names this modvisord as the owner).
    async fn owned_units(&self) -> Vec<Owned> {
        let listed = self
            .calls
            .run("ListUnitsByPatterns", |_| {
                self.manager
                    .list_units_by_patterns(vec![], vec!["modvisor-*.service".into()])
            })
            .await;
        let units = match listed {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("listing modvisor units: {e}");
                return Vec::new();
            }
        };
        // The environments are read side by side (bounded by the calls' own limit).
        let paths: Vec<String> = units.iter().map(|u| u.6.to_string()).collect();
        let envs: Vec<Vec<String>> = futures_util::stream::iter(paths)
            .map(|path| async move {
                match self.get_some(&path, SERVICE_IFACE, &["Environment"]).await {
                    Ok(svc) => get(&svc, "Environment").unwrap_or_default(),
                    Err(_) => Vec::new(),
                }
            })
            .buffered(calls::MAX_IN_FLIGHT)
            .collect()
            .await;
        let mut ours = Vec::new();
        for (u, env) in units.iter().zip(envs) {
            let module =
                u.0.strip_prefix("modvisor-")
                    .and_then(|m| m.strip_suffix(".service"));
            if let (Some(module), true) = (module, env.iter().any(|e| e == &self.owner)) {
                ours.push(Owned {
                    module: module.to_string(),
                    id: u.0.clone(),
                    running: matches!(u.3.as_str(), "active" | "activating" | "reloading"),
                });
            }
        }
        ours
    }
}

/// Where a run reports to the supervisor.
struct Run {
    name: String,
    generation: u64,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Sender<bool>,
    stop_asked: super::StopAsked,
    /// The unit has `Restart=no` (a transient unit of ours): its end in systemd's signals is
    /// final, reported without reading the unit again.
    ends_final: bool,
}

impl Run {
    fn status(&self, st: &UnitStatus, phase: RunPhase) {
        let _ = self.events.send(RuntimeEvent::Status {
            name: self.name.clone(),
            generation: self.generation,
            main_pid: st.main_pid,
            restarts: Some(st.n_restarts),
            container_id: None,
            phase,
        });
    }

    /// The final restart count first, so the supervisor can tell a spent budget; then the exit.
    fn ended(self, restarts: u32, info: ExitInfo) {
        let _ = self.events.send(RuntimeEvent::Status {
            name: self.name.clone(),
            generation: self.generation,
            main_pid: 0,
            restarts: Some(restarts),
            container_id: None,
            phase: RunPhase::Ended,
        });
        self.fail_with(info);
    }

    fn fail_with(self, info: ExitInfo) {
        let _ = self.exited.send(true);
        let _ = self.events.send(RuntimeEvent::Exited {
            name: self.name,
            generation: self.generation,
            info,
        });
    }

    fn fail(self, why: String) {
        self.fail_with(ExitInfo::Other(why));
    }
}

fn is_running(st: &UnitStatus) -> bool {
    matches!(
        st.active_state.as_str(),
        "active" | "activating" | "reloading"
    )
}

fn phase_of(st: &UnitStatus) -> RunPhase {
    match (st.active_state.as_str(), st.sub_state.as_str()) {
        ("activating", "auto-restart") => RunPhase::Restarting(st.exit_info()),
        ("active", _) | ("reloading", _) => RunPhase::Running,
        ("deactivating", _) => RunPhase::Stopping,
        _ => RunPhase::Starting,
    }
}

/// How a run ended, from the unit's final state `st` and the one before it.
fn final_exit(st: &UnitStatus, last: &UnitStatus) -> ExitInfo {
    if st.result == "start-limit-hit" {
        ExitInfo::StartLimitHit(Box::new(last.exit_info()))
    } else if st.result == "success" && st.active_state == "inactive" {
        ExitInfo::Code(st.exec_main_status)
    } else {
        st.exit_info()
    }
}

/// How [`follow`] learns the unit's state first.
enum First {
    /// Just read, and nothing was done to the unit since (adopted or observed).
    Known(Box<UnitStatus>),
    /// Started; the reply came at this position: its changes after it, or a read.
    After(Sequence),
    /// Read it.
    Read,
}

/// Follows one unit until it is final (inactive with no job, failed, or gone), reporting each
/// change. An `inactive` is the end once the unit was seen active (or is gone), not a
/// not-yet-started unit.
async fn follow(sh: Arc<Shared>, unit: String, run: Run, mut changes: Subscription, first: First) {
    let path = unit_path(&unit);
    let mut seen_active = false;
    let mut last = UnitStatus::default();
    let (mut next, mut after) = match first {
        First::Known(st) => (Some(st), None),
        First::After(at) => (None, Some(at)),
        First::Read => (None, None),
    };
    loop {
        let st = match (next.take(), after.take()) {
            (Some(st), _) => *st,
            // Once per run, and rarely: on the heap while they last, not in the task.
            (None, Some(at)) => Box::pin(first_picture(&sh, &path, &run, &mut changes, at)).await,
            (None, None) => Box::pin(read_or_gone(&sh, &path, &run.name, &last)).await,
        };
        if st != last {
            tracing::debug!(modvisor_module = %run.name, "{unit}: {} {} result={} pid={} restarts={} job={}", st.active_state, st.sub_state, st.result, st.main_pid, st.n_restarts, st.job_pending);
            seen_active |= matches!(
                st.active_state.as_str(),
                "active" | "activating" | "reloading" | "deactivating"
            );
            let gone = st.load_state == "not-found";
            if st.active_state == "failed"
                || (!st.job_pending && st.active_state == "inactive" && (seen_active || gone))
            {
                return run.ended(st.n_restarts, final_exit(&st, &last));
            }
            run.status(&st, phase_of(&st));
            last = st;
        }
        // Nothing wakes a unit that does not change: zbus drops no signal of a match rule (see
        // [`signals`]), and the subscription ends only with the connection.
        match next_picture(&mut changes, &last, run.ends_final).await {
            Some(picture) => next = picture,
            None => return run.fail("systemd is not reachable".into()),
        }
    }
}

/// The unit's state right after its start, from its changes after the start's reply when
/// they tell it completely (the usual case: the engine is reported running in the wake-up
/// systemd's signal arrives in). Changes that came before the reply were about the unit as it
/// was before the start, and are skipped. The unit is read only when the signals cannot tell
/// (an invalidated property, a restart) or have not told within [`FIRST_PICTURE_WAIT`]: a read
/// asked at once, racing them, made systemd answer ten property reads in the middle of every
/// start (2,000 for 200 modules starting together), and the signals won almost always.
async fn first_picture(
    sh: &Shared,
    path: &str,
    run: &Run,
    changes: &mut Subscription,
    after: Sequence,
) -> UnitStatus {
    let from_signals = async {
        let mut cur = UnitStatus::default();
        loop {
            let c = changes.changed().await?;
            if matches!(&*c, Change::Props { at, .. } if *at < after) {
                continue;
            }
            let applied = payload::apply(&mut cur, &c);
            if applied.reread {
                return None;
            }
            if applied.unit_changed && payload::enough(&cur, run.ends_final) {
                return Some(cur);
            }
        }
    };
    // A read after changes consumed here is newer than they are: it tells them too.
    match tokio::time::timeout(FIRST_PICTURE_WAIT, from_signals).await {
        Ok(Some(st)) => st,
        _ => read_or_gone(sh, path, &run.name, &UnitStatus::default()).await,
    }
}

/// How long a started unit's signals may take to tell its state before it is read.
const FIRST_PICTURE_WAIT: Duration = Duration::from_secs(2);

/// Waits for the unit's next change: Some(Some(state)) when the signals tell it completely,
/// Some(None) when it must be read; None once the bus is gone.
async fn next_picture(
    changes: &mut Subscription,
    last: &UnitStatus,
    ends_final: bool,
) -> Option<Option<Box<UnitStatus>>> {
    // Copied from `last` at the first change, not held while nothing changes.
    let mut cur: Option<Box<UnitStatus>> = None;
    loop {
        let first = changes.changed().await?;
        let now = cur.get_or_insert_with(|| Box::new(last.clone()));
        let batch: Vec<_> = std::iter::once(first).chain(changes.pending()).collect();
        let applied = payload::apply_all(now, batch.iter().map(|c| &**c));
        if applied.reread {
            return Some(None);
        }
        if applied.unit_changed {
            let enough = payload::enough(now, ends_final);
            return Some(cur.filter(|_| enough));
        }
    }
}

/// The unit's state; a unit that cannot be read any more counts as gone.
async fn read_or_gone(sh: &Shared, path: &str, name: &str, last: &UnitStatus) -> UnitStatus {
    match sh.status(path).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(modvisor_module = %name, "{path}: {e}");
            UnitStatus {
                load_state: "not-found".into(),
                active_state: "inactive".into(),
                ..last.clone()
            }
        }
    }
}

/// Starts (or adopts) the run's unit, then follows it. The launch (the request, the calls'
/// futures) is on the heap only while it runs: the task that then follows the unit for as long
/// as it runs holds what following needs, not 3.8 KiB of a start long done.
fn run_unit(
    sh: Arc<Shared>,
    req: RunRequest,
    unit: String,
    run: Run,
    prepared: Option<Result<UnitEnv, String>>,
) -> impl Future<Output = ()> + Send + 'static {
    // Subscribe before looking or starting, so that no change falls between the two.
    let changes = sh.signals.subscribe(&unit_path(&unit));
    let stop = run.stop_asked.clone();
    let launching = Box::pin(launch(sh.clone(), req, unit.clone(), stop, prepared));
    async move {
        let launched = launching.await;
        // A stop that came while the unit was being made found nothing to stop: stop it now
        // (the follow below sees it end).
        if matches!(launched, Ok(Launch::Started(_)))
            && run.stop_asked.asked()
            && let Err(e) = Box::pin(sh.stop_unit(&unit)).await
        {
            tracing::warn!("StopUnit {unit}: {e}");
        }
        match launched {
            Ok(Launch::Left(now)) => follow(sh, unit, run, changes, First::Known(now)).await,
            Ok(Launch::Started(Some(at))) => follow(sh, unit, run, changes, First::After(at)).await,
            Ok(Launch::Started(None)) => follow(sh, unit, run, changes, First::Read).await,
            Ok(Launch::Abandoned) => {
                run.fail_with(ExitInfo::Other("stopped before it started".into()))
            }
            Err(why) => run.fail(why),
        }
    }
}

/// Makes the run's unit: an existing unit, or a transient one.
async fn launch(
    sh: Arc<Shared>,
    req: RunRequest,
    unit: String,
    stop: super::StopAsked,
    prepared: Option<Result<UnitEnv, String>>,
) -> Result<Launch, String> {
    match &req.exec {
        Exec::Native(NativeExec::Unit(_)) => launch_unit(&sh, &req, &unit, &stop).await,
        Exec::Container(_) => Err("containers are not run by systemd".into()),
        Exec::Native(NativeExec::Command { .. }) => {
            launch_transient(&sh, &req, &unit, &stop, prepared).await
        }
    }
}

/// What a launch did to the unit.
enum Launch {
    /// Nothing: it runs as it should (adopted, or an existing unit observed), as read.
    Left(Box<UnitStatus>),
    /// Started (or replaced), its reply at this position of the connection's stream (None:
    /// unknown): its state comes from its first changes after that, or a read.
    Started(Option<Sequence>),
    /// A stop came first: nothing was started.
    Abandoned,
}

/// An existing unit: observed when it runs, started otherwise (never a second copy).
async fn launch_unit(
    sh: &Shared,
    req: &RunRequest,
    unit: &str,
    stop: &super::StopAsked,
) -> Result<Launch, String> {
    let now = sh.look(unit).await.unwrap_or_default();
    if stop.asked() {
        return Ok(Launch::Abandoned);
    }
    if is_running(&now) {
        tracing::info!(modvisor_module = %req.name, "{unit} is already running (pid {}): observing it, not starting a second copy", now.main_pid);
        return Ok(Launch::Left(Box::new(now)));
    }
    if let Some(addr) = req.guard_port.as_deref().filter(|a| super::port_in_use(a)) {
        return Err(format!(
            "{addr} is already in use by another process: not starting {unit}, which would be a second copy"
        ));
    }
    sh.start_unit(unit)
        .await
        .map(|()| Launch::Started(None))
        .map_err(|e| format!("StartUnit {unit}: {e}"))
}

/// A transient unit. Usually none exists yet: it is created at once, and looked at only when
/// systemd answers that one does (a failed run's unit stays loaded until it is reset). A unit
/// of ours found when modvisord started, or a port already answering, is looked at first: it is
/// adopted when it runs our spec, else replaced.
async fn launch_transient(
    sh: &Shared,
    req: &RunRequest,
    unit: &str,
    stop: &super::StopAsked,
    prepared: Option<Result<UnitEnv, String>>,
) -> Result<Launch, String> {
    let hash = spec_hash(req, sh.kind);
    let port_busy = req.guard_port.as_deref().is_some_and(super::port_in_use);
    if !req.found_at_start && !port_busy {
        if stop.asked() {
            return Ok(Launch::Abandoned);
        }
        match create_transient(sh, req, unit, &hash, prepared).await {
            Err(CreateError::Start(_, e))
                if calls::error_name(&e).as_deref() == Some(UNIT_EXISTS) =>
            {
                tracing::debug!(modvisor_module = %req.name, "{unit} exists: looking at it");
            }
            r => return r.map(Launch::Started).map_err(|e| e.to_string()),
        }
    }
    let now = sh.look(unit).await.unwrap_or_default();
    if stop.asked() {
        return Ok(Launch::Abandoned);
    }
    replace_transient(sh, req, unit, now, &hash).await
}

/// An existing transient unit: adopted when it runs our spec, else stopped or reset, then
/// created anew.
async fn replace_transient(
    sh: &Shared,
    req: &RunRequest,
    unit: &str,
    now: UnitStatus,
    hash: &str,
) -> Result<Launch, String> {
    let path = unit_path(unit);
    let ours = now
        .environment
        .iter()
        .any(|e| e == &format!("MODVISOR_SPEC={hash}"));
    if is_running(&now) && ours {
        tracing::info!(modvisor_module = %req.name, "adopted {unit} (pid {}), already running with the same spec", now.main_pid);
        return Ok(Launch::Left(Box::new(now)));
    }
    if is_running(&now) {
        tracing::info!(modvisor_module = %req.name, "{unit} runs an older spec: replacing it");
        let _ = sh.stop_unit(unit).await;
        wait_gone(sh, &path, req.stop_timeout + Duration::from_secs(5)).await;
    }
    if now.load_state == "loaded" || now.active_state == "failed" {
        let _ = sh.reset_failed(unit).await;
        wait_gone(sh, &path, Duration::from_secs(5)).await;
    }
    if let Some(addr) = req.guard_port.as_deref().filter(|a| super::port_in_use(a)) {
        return Err(format!(
            "{addr} is already in use by another process: not starting a second copy"
        ));
    }
    create_transient(sh, req, unit, hash, None)
        .await
        .map(Launch::Started)
        .map_err(|e| e.to_string())
}

/// Prepares and creates the transient unit (StartTransientUnit).
async fn create_transient(
    sh: &Shared,
    req: &RunRequest,
    unit: &str,
    hash: &str,
    prepared: Option<Result<UnitEnv, String>>,
) -> Result<Option<Sequence>, CreateError> {
    let unit_env = match prepared {
        Some(r) => r,
        None => prepare_unit(req, sh.kind, &sh.state).await,
    }
    .map_err(CreateError::Prepare)?;
    sh.start_transient(unit, || {
        SystemdBackend::transient_properties(req, hash, &sh.owner, &unit_env)
    })
    .await
    .map_err(|e| CreateError::Start(unit.to_string(), e))
}

/// Why a transient unit was not created.
enum CreateError {
    Prepare(String),
    Start(String, zbus::Error),
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Prepare(why) => f.write_str(why),
            CreateError::Start(unit, e) => write!(f, "StartTransientUnit {unit}: {e}"),
        }
    }
}

impl Backend for SystemdBackend {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    fn restarts_itself(&self) -> bool {
        true
    }

    fn survives_daemon(&self) -> bool {
        true
    }

    fn unit_for(&self, req: &RunRequest) -> String {
        match &req.exec {
            Exec::Native(NativeExec::Unit(u)) => u.clone(),
            Exec::Native(NativeExec::Command { .. }) | Exec::Container(_) => unit_name(&req.name),
        }
    }

    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError> {
        let unit = self.unit_for(&req);
        let (exited_tx, exited_rx) = watch::channel(false);
        let handle = RunHandle {
            pid: 0,
            pgid: 0,
            exited: exited_rx,
            unit: unit.clone(),
            stop_asked: Default::default(),
        };
        let run = Run {
            name: req.name.clone(),
            generation: req.generation,
            events,
            exited: exited_tx,
            stop_asked: handle.stop_asked.clone(),
            ends_final: matches!(req.exec, Exec::Native(NativeExec::Command { .. }))
                && req.restart.policy.as_str() == "no",
        };
        // A unit about to be created is prepared here, on the blocking thread this is called
        // on: 200 modules starting together used to wait for every start's hop through the
        // blocking pool before the first preparation (a second hop) could run.
        let prepared = (matches!(req.exec, Exec::Native(NativeExec::Command { .. }))
            && !req.found_at_start)
            .then(|| prepare_now(&req, self.sh.kind, &self.sh.state));
        tokio::spawn(run_unit(self.sh.clone(), req, unit, run, prepared));
        Ok(handle)
    }

    fn list_units(&self) -> BoxFuture<Vec<Owned>> {
        let sh = self.sh.clone();
        Box::pin(async move { sh.owned_units().await })
    }

    fn stop_unit(&self, unit: &str) -> BoxFuture<()> {
        let sh = self.sh.clone();
        let unit = unit.to_string();
        Box::pin(async move {
            tracing::info!("stopping {unit}: no manifest wants it any more");
            if let Err(e) = sh.stop_unit(&unit).await {
                tracing::warn!("StopUnit {unit}: {e}");
            }
        })
    }

    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()> {
        let sh = self.sh.clone();
        let unit = handle.unit.clone();
        let mut exited = handle.exited.clone();
        // Before the StopUnit: a unit not created yet is then not created, or stopped once it is.
        handle.stop_asked.ask();
        Box::pin(async move {
            if let Err(e) = sh.stop_unit(&unit).await {
                tracing::warn!("StopUnit {unit}: {e}");
            }
            // systemd escalates to SIGKILL after TimeoutStopSec; allow a margin beyond it.
            let done =
                tokio::time::timeout(timeout + Duration::from_secs(5), exited.wait_for(|e| *e))
                    .await
                    .is_ok();
            if !done {
                tracing::error!("{unit} did not stop within {timeout:?} + 5s");
            }
        })
    }
}

/// Waits until the unit is unloaded (or inactive and unreferenced), bounded.
async fn wait_gone(sh: &Shared, path: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        match sh.status(path).await {
            Ok(s)
                if s.load_state == "loaded"
                    && s.active_state != "inactive"
                    && s.active_state != "failed" => {}
            Ok(s) if s.load_state == "loaded" && s.active_state == "failed" => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
