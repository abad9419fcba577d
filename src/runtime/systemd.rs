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
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

use crate::manifest::NativeExec;

pub mod sandbox;
use sandbox::ManagerKind;

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
    conn: Connection,
    manager: ManagerProxy<'static>,
    /// `MODVISOR_OWNER=STATE_DIR` in each transient unit's environment: which modvisord
    /// instance a unit belongs to (one per manager in production; many in tests).
    owner: String,
    /// The state root (`${state_dir}` of a module is `STATE/modules/NAME`).
    state: std::path::PathBuf,
    kind: ManagerKind,
}

impl SystemdBackend {
    /// Connects to the manager on `conn` (the system bus) and subscribes to its signals.
    /// Fails when no manager answers there.
    pub async fn connect(
        conn: Connection,
        state_dir: &std::path::Path,
    ) -> zbus::Result<SystemdBackend> {
        let manager = ManagerProxy::new(&conn).await?;
        let version = manager.version().await?;
        manager.subscribe().await?;
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
        Ok(SystemdBackend {
            conn,
            manager,
            owner: format!("MODVISOR_OWNER={}", state_dir.display()),
            state: state_dir.to_path_buf(),
            kind,
        })
    }

    /// The manager units are created in.
    pub fn manager_kind(&self) -> ManagerKind {
        self.kind
    }

    async fn status(conn: &Connection, path: &str) -> zbus::Result<UnitStatus> {
        let props = zbus::fdo::PropertiesProxy::builder(conn)
            .destination("org.freedesktop.systemd1")
            .path(path.to_string())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let unit = props
            .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                "org.freedesktop.systemd1.Unit",
            ))
            .await?;
        let mut st = UnitStatus {
            load_state: get(&unit, "LoadState").unwrap_or_default(),
            active_state: get(&unit, "ActiveState").unwrap_or_default(),
            sub_state: get(&unit, "SubState").unwrap_or_default(),
            ..UnitStatus::default()
        };
        let job: Option<(u32, OwnedObjectPath)> = get(&unit, "Job");
        st.job_pending = job.is_some_and(|(id, _)| id != 0);
        if st.load_state == "loaded" {
            let svc = props
                .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
                    "org.freedesktop.systemd1.Service",
                ))
                .await?;
            st.main_pid = get(&svc, "MainPID").unwrap_or(0);
            st.n_restarts = get(&svc, "NRestarts").unwrap_or(0);
            st.result = get(&svc, "Result").unwrap_or_default();
            st.exec_main_code = get(&svc, "ExecMainCode").unwrap_or(0);
            st.exec_main_status = get(&svc, "ExecMainStatus").unwrap_or(0);
            st.environment = get(&svc, "Environment").unwrap_or_default();
        }
        Ok(st)
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
        let mut env: Vec<String> = environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!("MODVISOR_MODULE={}", req.name));
        env.push(format!("MODVISOR_SPEC={hash}"));
        env.push(owner.to_string());
        let usec = |d: Duration| d.as_micros().min(u64::MAX as u128) as u64;
        let ov = |v: Variant<'static>| OwnedVariant::try_from(v).ok();
        let mut p: Vec<(&str, Option<OwnedVariant>)> = vec![
            (
                "Description",
                ov(Variant::from(format!(
                    "modvisor module {}{}",
                    req.name,
                    if req.description.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", req.description)
                    }
                ))),
            ),
            // systemd expands $VAR and $$ in ExecStart at exec time; escape, so that the
            // engine gets the argv the manifest wrote, as under the direct backend.
            (
                "ExecStart",
                ov(Variant::from(vec![(
                    argv[0].clone(),
                    argv.iter()
                        .map(|a| a.replace('$', "$$"))
                        .collect::<Vec<_>>(),
                    false,
                )])),
            ),
            ("Environment", ov(Variant::from(env))),
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

/// What the properties need besides the request: the manager and the host's devices.
struct UnitEnv {
    kind: ManagerKind,
    state: std::path::PathBuf,
    host: sandbox::Host,
}

/// The blocking checks before a transient unit (identity, secret files, devices), off the
/// supervisor actor; logs a warning for a root engine.
async fn prepare_unit(
    req: &RunRequest,
    kind: ManagerKind,
    state: &std::path::Path,
) -> Result<UnitEnv, String> {
    let Exec::Native(NativeExec::Command { privileges, .. }) = &req.exec else {
        return Err("not a native command".into());
    };
    let p = privileges.clone();
    let host = tokio::task::spawn_blocking(move || sandbox::prepare(&p, kind))
        .await
        .map_err(|e| format!("preparing the unit: {e}"))??;
    if privileges.runs_as_root() {
        tracing::warn!(modvisor_module = %req.name, "{} runs as root (user = \"root\" in its manifest): a crafted model would run code as root", req.name);
    }
    Ok(UnitEnv {
        kind,
        state: state.to_path_buf(),
        host,
    })
}

/// Follows one unit until it is final (inactive with no job, failed, or gone), reporting each
/// change. `stop_requested` marks that an `inactive` is the end, not a not-yet-started unit.
async fn follow(
    conn: Connection,
    unit: String,
    name: String,
    generation: u64,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Sender<bool>,
    mut signals: zbus::fdo::PropertiesChangedStream,
) {
    let path = unit_path(&unit);
    let mut seen_active = false;
    let mut last = UnitStatus::default();
    loop {
        let st = match SystemdBackend::status(&conn, &path).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(modvisor_module = %name, "{unit}: {e}");
                UnitStatus {
                    load_state: "not-found".into(),
                    active_state: "inactive".into(),
                    ..last.clone()
                }
            }
        };
        if st != last {
            tracing::debug!(modvisor_module = %name, "{unit}: {} {} result={} pid={} restarts={} job={}", st.active_state, st.sub_state, st.result, st.main_pid, st.n_restarts, st.job_pending);
            seen_active |= matches!(
                st.active_state.as_str(),
                "active" | "activating" | "reloading" | "deactivating"
            );
            let phase = match (st.active_state.as_str(), st.sub_state.as_str()) {
                ("activating", "auto-restart") => RunPhase::Restarting(st.exit_info()),
                ("active", _) | ("reloading", _) => RunPhase::Running,
                ("deactivating", _) => RunPhase::Stopping,
                _ => RunPhase::Starting,
            };
            let gone = st.load_state == "not-found";
            let final_state = st.active_state == "failed"
                || (!st.job_pending && st.active_state == "inactive" && (seen_active || gone));
            if final_state {
                let mut info = st.exit_info();
                if st.result == "start-limit-hit" {
                    info = ExitInfo::StartLimitHit(Box::new(last.exit_info()));
                } else if st.result == "success" && st.active_state == "inactive" {
                    info = ExitInfo::Code(st.exec_main_status);
                }
                // The final restart count first, so the supervisor can tell a spent budget.
                let _ = events.send(RuntimeEvent::Status {
                    name: name.clone(),
                    generation,
                    main_pid: 0,
                    restarts: Some(st.n_restarts),
                    container_id: None,
                    phase: RunPhase::Ended,
                });
                let _ = exited.send(true);
                let _ = events.send(RuntimeEvent::Exited {
                    name,
                    generation,
                    info,
                });
                return;
            }
            let _ = events.send(RuntimeEvent::Status {
                name: name.clone(),
                generation,
                main_pid: st.main_pid,
                restarts: Some(st.n_restarts),
                container_id: None,
                phase,
            });
            last = st;
        }
        // Wait for the next change of this unit, bounded so that a missed signal is recovered.
        match tokio::time::timeout(Duration::from_secs(30), signals.next()).await {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => {
                let _ = exited.send(true);
                let _ = events.send(RuntimeEvent::Exited {
                    name,
                    generation,
                    info: ExitInfo::Other("systemd is not reachable".into()),
                });
                return;
            }
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
        let conn = self.conn.clone();
        let manager = self.manager.clone();
        let owner = self.owner.clone();
        let (kind, state) = (self.kind, self.state.clone());
        let handle = RunHandle {
            pid: 0,
            pgid: 0,
            exited: exited_rx,
            unit: unit.clone(),
        };
        let name = req.name.clone();
        let generation = req.generation;
        tokio::spawn(async move {
            let fail = |why: String| {
                let _ = exited_tx.send(true);
                let _ = events.send(RuntimeEvent::Exited {
                    name: name.clone(),
                    generation,
                    info: ExitInfo::Other(why),
                });
            };
            let path = unit_path(&unit);
            let props = zbus::fdo::PropertiesProxy::builder(&conn)
                .destination("org.freedesktop.systemd1")
                .path(path.clone())
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await;
            // Subscribe before looking, so that no change falls between the two.
            let signals = match props {
                Ok(p) => p.receive_properties_changed().await,
                Err(e) => Err(e),
            };
            let signals = match signals {
                Ok(s) => s,
                Err(e) => return fail(format!("cannot follow {unit}: {e}")),
            };
            let now = SystemdBackend::status(&conn, &path)
                .await
                .unwrap_or_default();
            let running = matches!(
                now.active_state.as_str(),
                "active" | "activating" | "reloading"
            );
            match &req.exec {
                Exec::Native(NativeExec::Unit(_)) => {
                    if running {
                        tracing::info!(modvisor_module = %name, "{unit} is already running (pid {}): observing it, not starting a second copy", now.main_pid);
                    } else if let Some(addr) =
                        req.guard_port.as_deref().filter(|a| super::port_in_use(a))
                    {
                        return fail(format!(
                            "{addr} is already in use by another process: not starting {unit}, which would be a second copy"
                        ));
                    } else if let Err(e) = manager.start_unit(unit.clone(), "replace".into()).await
                    {
                        return fail(format!("StartUnit {unit}: {e}"));
                    }
                }
                Exec::Container(_) => return fail("containers are not run by systemd".into()),
                Exec::Native(NativeExec::Command { .. }) => {
                    let hash = spec_hash(&req, kind);
                    let ours = now
                        .environment
                        .iter()
                        .any(|e| e == &format!("MODVISOR_SPEC={hash}"));
                    if running && ours {
                        tracing::info!(modvisor_module = %name, "adopted {unit} (pid {}), already running with the same spec", now.main_pid);
                    } else {
                        if running {
                            tracing::info!(modvisor_module = %name, "{unit} runs an older spec: replacing it");
                            let _ = manager.stop_unit(unit.clone(), "replace".into()).await;
                            wait_gone(&conn, &path, req.stop_timeout + Duration::from_secs(5))
                                .await;
                        }
                        if now.load_state == "loaded" || now.active_state == "failed" {
                            let _ = manager.reset_failed_unit(unit.clone()).await;
                            wait_gone(&conn, &path, Duration::from_secs(5)).await;
                        }
                        if let Some(addr) =
                            req.guard_port.as_deref().filter(|a| super::port_in_use(a))
                        {
                            return fail(format!(
                                "{addr} is already in use by another process: not starting a second copy"
                            ));
                        }
                        let unit_env = match prepare_unit(&req, kind, &state).await {
                            Ok(u) => u,
                            Err(why) => return fail(why),
                        };
                        let props =
                            SystemdBackend::transient_properties(&req, &hash, &owner, &unit_env);
                        if let Err(e) = manager
                            .start_transient_unit(unit.clone(), "fail".into(), props, vec![])
                            .await
                        {
                            return fail(format!("StartTransientUnit {unit}: {e}"));
                        }
                    }
                }
            }
            follow(conn, unit, name, generation, events, exited_tx, signals).await;
        });
        Ok(handle)
    }

    fn list_units(&self) -> BoxFuture<Vec<Owned>> {
        let manager = self.manager.clone();
        let conn = self.conn.clone();
        let owner = self.owner.clone();
        Box::pin(async move {
            let units = match manager
                .list_units_by_patterns(vec![], vec!["modvisor-*.service".into()])
                .await
            {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!("listing modvisor units: {e}");
                    return Vec::new();
                }
            };
            let mut ours = Vec::new();
            for u in units {
                let st = SystemdBackend::status(&conn, u.6.as_str())
                    .await
                    .unwrap_or_default();
                let module =
                    u.0.strip_prefix("modvisor-")
                        .and_then(|m| m.strip_suffix(".service"));
                if let (Some(module), true) = (module, st.environment.iter().any(|e| e == &owner)) {
                    let running = matches!(u.3.as_str(), "active" | "activating" | "reloading");
                    ours.push(Owned {
                        module: module.to_string(),
                        id: u.0.clone(),
                        running,
                    });
                }
            }
            ours
        })
    }

    fn stop_unit(&self, unit: &str) -> BoxFuture<()> {
        let manager = self.manager.clone();
        let unit = unit.to_string();
        Box::pin(async move {
            tracing::info!("stopping {unit}: no manifest wants it any more");
            if let Err(e) = manager.stop_unit(unit.clone(), "replace".into()).await {
                tracing::warn!("StopUnit {unit}: {e}");
            }
        })
    }

    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()> {
        let manager = self.manager.clone();
        let unit = handle.unit.clone();
        let mut exited = handle.exited.clone();
        Box::pin(async move {
            if let Err(e) = manager.stop_unit(unit.clone(), "replace".into()).await {
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
async fn wait_gone(conn: &Connection, path: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        match SystemdBackend::status(conn, path).await {
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
