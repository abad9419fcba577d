//! The container backend: Docker or Podman through their Docker-compatible API (bollard,
//! version negotiated: Docker here speaks at most 1.41).
//!
//! Each module runs as container `modvisor-NAME` with labels `org.modvisor.module=NAME`,
//! `org.modvisor.spec=HASH` and `org.modvisor.owner=STATE_DIR`. State comes from the engine's
//! event stream (start, die with exit code, oom), never from polling. Restarts are modvisor's,
//! with the same policy as native modules, so behaviour is identical across engines.
//! bollard cannot parse Podman's "stopped" state (bollard issue 293): inspection goes through a
//! small JSON request of our own instead of bollard's typed inspect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptions, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::{
    Backend, BoxFuture, Exec, ExitInfo, Owned, RunHandle, RunPhase, RunRequest, RuntimeError,
    RuntimeEvent, fnv,
};
use crate::bounded::{LineSplitter, MAX_LINE};
use crate::health::ProbeResult;
use crate::journal::{OutputSink, Stream};
use crate::manifest::{ContainerSpec, Pull};

mod body;

pub const LABEL_MODULE: &str = "org.modvisor.module";
pub const LABEL_SPEC: &str = "org.modvisor.spec";
pub const LABEL_OWNER: &str = "org.modvisor.owner";

/// Why a container did not start: `Refused` when retrying cannot help (configuration).
enum Failure {
    Refused(String),
    Other(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Failure::Other(why)
    }
}

pub fn container_name(module: &str) -> String {
    format!("modvisor-{module}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

/// The sockets tried, in the contract's order: $DOCKER_HOST, Podman's, Docker's, the user's Podman.
pub fn candidate_sockets(configured: &str) -> Vec<PathBuf> {
    if !configured.is_empty() {
        return vec![PathBuf::from(configured.trim_start_matches("unix://"))];
    }
    let mut v = Vec::new();
    if let Ok(h) = std::env::var("DOCKER_HOST")
        && let Some(p) = h.strip_prefix("unix://")
    {
        v.push(PathBuf::from(p));
    }
    v.push("/run/podman/podman.sock".into());
    v.push("/run/docker.sock".into());
    if let Ok(x) = std::env::var("XDG_RUNTIME_DIR") {
        v.push(Path::new(&x).join("podman/podman.sock"));
    }
    v
}

/// A minimal HTTP/1.1 GET over the engine's socket, returning (status, JSON body).
async fn get_json(sock: &Path, path: &str) -> Result<(u16, Value), String> {
    let mut s = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("connect {}: {e}", sock.display()))?;
    let req = format!("GET /v1.41{path} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| "the engine did not answer within 30s".to_string())?
        .map_err(|e| e.to_string())?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("not an HTTP response")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = buf[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            let start = i + 2;
            let end = (start + size).min(rest.len());
            out.extend_from_slice(&rest[start..end]);
            rest = rest.get(end + 2..).unwrap_or(&[]);
        }
        body = out;
    }
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, v))
}

/// What we need of a container, read leniently (Podman's states included).
#[derive(Debug, Clone, Default)]
pub struct Inspect {
    pub id: String,
    pub running: bool,
    pub status: String,
    pub pid: u32,
    pub exit_code: i64,
    pub oom_killed: bool,
    pub labels: HashMap<String, String>,
}

pub async fn inspect(sock: &Path, name: &str) -> Result<Option<Inspect>, String> {
    let (status, v) = get_json(sock, &format!("/containers/{name}/json")).await?;
    if status == 404 {
        return Ok(None);
    }
    if status != 200 {
        return Err(format!(
            "inspect {name}: HTTP {status}: {}",
            v["message"].as_str().unwrap_or("")
        ));
    }
    let st = &v["State"];
    let labels = v["Config"]["Labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Inspect {
        id: v["Id"].as_str().unwrap_or("").to_string(),
        running: st["Running"].as_bool().unwrap_or(false),
        status: st["Status"].as_str().unwrap_or("").to_string(),
        pid: st["Pid"].as_u64().unwrap_or(0) as u32,
        exit_code: st["ExitCode"].as_i64().unwrap_or(0),
        oom_killed: st["OOMKilled"].as_bool().unwrap_or(false),
        labels,
    }))
}

/// The hash of what a container runs: a change means it must be recreated.
pub fn spec_hash(spec: &ContainerSpec, memory_max: Option<u64>) -> String {
    let text = format!("{spec:?}|{memory_max:?}");
    fnv(&[&text])
}

struct Run {
    generation: u64,
    id: String,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Sender<bool>,
    oom: bool,
    /// modvisor asked for the stop: the container is removed before its exit is reported, so
    /// whoever waits for the stop finds it gone.
    stopping: bool,
    sink: OutputSink,
}

pub struct ContainerBackend {
    docker: Docker,
    sock: PathBuf,
    engine: Engine,
    description: String,
    owner: String,
    /// Container name -> the run modvisor follows there.
    runs: Arc<Mutex<HashMap<String, (String, Run)>>>,
    /// Starts (pull, create, start) in progress at most: the systemd backend's bound, so that
    /// hundreds of modules at once queue here, in order, not in the engine's API.
    starts: tokio::sync::Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ContainerBackend {
    /// Finds an engine in the contract's order, negotiates the API version, and starts
    /// following its events. Err lists what was tried.
    pub async fn connect(
        configured: &str,
        state_dir: &Path,
    ) -> Result<Arc<ContainerBackend>, String> {
        let mut tried = Vec::new();
        for sock in candidate_sockets(configured) {
            if !sock.exists() {
                tried.push(format!("{}: absent", sock.display()));
                continue;
            }
            let attempt = async {
                let d = Docker::connect_with_unix(
                    &sock.display().to_string(),
                    120,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| e.to_string())?;
                let d = d.negotiate_version().await.map_err(|e| e.to_string())?;
                d.ping().await.map_err(|e| e.to_string())?;
                let v = d.version().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((d, v))
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok((docker, v))) => {
                    let podman = v
                        .components
                        .iter()
                        .flatten()
                        .any(|c| c.name.to_lowercase().contains("podman"));
                    let engine = if podman {
                        Engine::Podman
                    } else {
                        Engine::Docker
                    };
                    let description = format!(
                        "{} {}",
                        if podman { "podman" } else { "docker" },
                        v.version.clone().unwrap_or_default()
                    );
                    tracing::info!(
                        "container engine: {description} at {} (API {})",
                        sock.display(),
                        docker.client_version()
                    );
                    let b = Arc::new(ContainerBackend {
                        docker,
                        sock,
                        engine,
                        description,
                        owner: state_dir.display().to_string(),
                        runs: Arc::new(Mutex::new(HashMap::new())),
                        starts: tokio::sync::Semaphore::new(super::systemd::calls::MAX_IN_FLIGHT),
                    });
                    b.clone().spawn_events();
                    return Ok(b);
                }
                Ok(Err(e)) => tried.push(format!("{}: {e}", sock.display())),
                Err(_) => tried.push(format!("{}: no answer within 5s", sock.display())),
            }
        }
        Err(format!(
            "no container engine answers ({})",
            tried.join("; ")
        ))
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// Follows the engine's container events for the whole life of the daemon, reconnecting
    /// when the engine goes away and comes back.
    fn spawn_events(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut lost = false;
            loop {
                let opts = EventsOptions {
                    filters: Some(HashMap::from([(
                        "type".to_string(),
                        vec!["container".to_string()],
                    )])),
                    ..Default::default()
                };
                let mut stream = self.docker.events(Some(opts));
                if lost {
                    // The engine is back: what happened to our containers meanwhile?
                    if self.docker.ping().await.is_ok() {
                        tracing::info!("container engine {} is reachable again", self.description);
                        self.resync().await;
                        lost = false;
                    }
                }
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(m) => self.event(m),
                        Err(e) => {
                            tracing::debug!("container events: {e}");
                            break;
                        }
                    }
                }
                if !lost {
                    tracing::warn!(
                        "lost the event stream of {}: reconnecting",
                        self.description
                    );
                    lost = true;
                    let runs: Vec<(String, u64, mpsc::UnboundedSender<RuntimeEvent>)> =
                        lock(&self.runs)
                            .values()
                            .map(|(m, r)| (m.clone(), r.generation, r.events.clone()))
                            .collect();
                    for (name, generation, tx) in runs {
                        let _ = tx.send(RuntimeEvent::Status {
                            name,
                            generation,
                            main_pid: 0,
                            restarts: None,
                            phase: RunPhase::Unreachable(
                                "the container engine is not reachable".into(),
                            ),
                            container_id: None,
                        });
                    }
                }
                // No event tells us the engine is back: retry, bounded by the daemon's life.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn resync(&self) {
        let names: Vec<String> = lock(&self.runs).keys().cloned().collect();
        for cname in names {
            let st = inspect(&self.sock, &cname).await;
            let mut runs = lock(&self.runs);
            let Some((module, run)) = runs.get(&cname) else {
                continue;
            };
            match st {
                Ok(Some(i)) if i.running && i.id == run.id => {
                    let _ = run.events.send(RuntimeEvent::Status {
                        name: module.clone(),
                        generation: run.generation,
                        main_pid: i.pid,
                        restarts: None,
                        phase: RunPhase::Running,
                        container_id: Some(i.id.clone()),
                    });
                }
                other => {
                    let info = match other {
                        Ok(Some(i)) if i.oom_killed => ExitInfo::Other("oom-kill".into()),
                        Ok(Some(i)) => ExitInfo::Code(i.exit_code as i32),
                        _ => ExitInfo::Other("the container is gone".into()),
                    };
                    if let Some((module, run)) = runs.remove(&cname) {
                        let _ = run.exited.send(true);
                        let _ = run.events.send(RuntimeEvent::Exited {
                            name: module,
                            generation: run.generation,
                            info,
                        });
                    }
                }
            }
        }
    }

    fn event(&self, m: bollard::models::EventMessage) {
        let Some(actor) = m.actor else { return };
        let attrs = actor.attributes.unwrap_or_default();
        let Some(cname) = attrs.get("name") else {
            return;
        };
        let id = actor.id.unwrap_or_default();
        let action = m.action.unwrap_or_default();
        let mut runs = lock(&self.runs);
        let Some((module, run)) = runs.get_mut(cname) else {
            return;
        };
        if !run.id.is_empty() && !id.is_empty() && run.id != id {
            return; // an older container of the same name
        }
        tracing::debug!(modvisor_module = %module, "container {cname}: {action}");
        match action.as_str() {
            "oom" => run.oom = true,
            "die" => {
                let code: i32 = attrs
                    .get("exitCode")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(-1);
                let info = if run.oom {
                    ExitInfo::Other("oom-kill".into())
                } else if code > 128 && code < 160 {
                    ExitInfo::Signal(code - 128)
                } else {
                    ExitInfo::Code(code)
                };
                if let Some((module, run)) = runs.remove(cname) {
                    // A follow may end before the last lines of a quickly dying engine: read
                    // them once more (they explain the exit) before the container can go.
                    let docker = self.docker.clone();
                    tokio::spawn(async move {
                        let opts = LogsOptionsBuilder::default()
                            .stdout(true)
                            .stderr(true)
                            .tail("40")
                            .build();
                        let fetch = async {
                            let mut lines = Vec::new();
                            let mut bytes = 0;
                            let mut s = docker.logs(&run.id, Some(opts));
                            // Bounded: 40 lines of any length are still at most 64 KiB here.
                            while let Some(Ok(chunk)) = s.next().await {
                                let chunk = chunk.into_bytes();
                                bytes += chunk.len();
                                if bytes > MAX_LINE {
                                    break;
                                }
                                lines.extend(
                                    String::from_utf8_lossy(&chunk).lines().map(str::to_string),
                                );
                            }
                            lines
                        };
                        if let Ok(lines) = tokio::time::timeout(Duration::from_secs(2), fetch).await
                        {
                            run.sink.remember(&lines);
                        }
                        if run.stopping {
                            let opts = RemoveContainerOptionsBuilder::default().force(true).build();
                            if let Err(e) = docker.remove_container(&run.id, Some(opts)).await {
                                tracing::debug!("removing {}: {e}", run.id);
                            }
                        }
                        let _ = run.exited.send(true);
                        let _ = run.events.send(RuntimeEvent::Exited {
                            name: module,
                            generation: run.generation,
                            info,
                        });
                    });
                }
            }
            _ => {}
        }
    }

    async fn ensure_image(&self, spec: &ContainerSpec) -> Result<(), Failure> {
        let (status, _) = get_json(&self.sock, &format!("/images/{}/json", spec.image)).await?;
        if status == 200 {
            return Ok(());
        }
        match spec.pull {
            Pull::Never => Err(Failure::Refused(format!(
                "image {} is not present in {} and pull = \"never\"",
                spec.image, self.description
            ))),
            Pull::Missing => {
                let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
                    .from_image(&spec.image)
                    .build();
                let mut s = self.docker.create_image(Some(opts), None, None);
                while let Some(r) = s.next().await {
                    r.map_err(|e| format!("pulling {}: {e}", spec.image))?;
                }
                Ok(())
            }
        }
    }

    /// Forwards the container's output. `from_now`: an adopted container (do not replay its
    /// history); otherwise a new container's whole output, from its start.
    fn follow_logs(&self, id: String, sink: OutputSink, from_now: bool) {
        let docker = self.docker.clone();
        tokio::spawn(async move {
            let since = if from_now {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i32)
                    .unwrap_or(0)
            } else {
                0
            };
            let opts = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .since(since)
                .build();
            let mut s = docker.logs(&id, Some(opts));
            // Lines split at 64 KiB, as for direct children: bounded whatever the engine sends.
            let mut out = LineSplitter::new(MAX_LINE);
            let mut err = LineSplitter::new(MAX_LINE);
            let mut emit_out = |l: &[u8]| sink.line(Stream::Stdout, l);
            let mut emit_err = |l: &[u8]| sink.line(Stream::Stderr, l);
            while let Some(Ok(chunk)) = s.next().await {
                match chunk {
                    bollard::container::LogOutput::StdErr { message } => {
                        err.push(&message, &mut emit_err)
                    }
                    bollard::container::LogOutput::StdOut { message }
                    | bollard::container::LogOutput::Console { message } => {
                        out.push(&message, &mut emit_out)
                    }
                    bollard::container::LogOutput::StdIn { .. } => {}
                }
            }
            out.finish(&mut emit_out);
            err.finish(&mut emit_err);
        });
    }

    async fn remove(&self, name: &str) -> Result<(), String> {
        let opts = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(format!("removing {name}: {e}")),
        }
    }

    /// Keeps the run of a container modvisord follows (events, logs, stop).
    fn register(&self, cname: &str, req: &RunRequest, id: &str, events: &Events, exited: Exited) {
        let run = Run {
            generation: req.generation,
            id: id.to_string(),
            events: events.clone(),
            exited,
            oom: false,
            stopping: false,
            sink: req.sink.clone(),
        };
        lock(&self.runs).insert(cname.to_string(), (req.name.clone(), run));
    }

    /// The container of that name as found: the one to adopt (running, same spec, ours), or
    /// None once any other is removed.
    async fn adoptable(
        &self,
        req: &RunRequest,
        cname: &str,
        hash: &str,
    ) -> Result<Option<Inspect>, Failure> {
        // A container of that name may be in the middle of its removal (the previous run's
        // stop): Podman then answers 500 "no such container". Treat that as gone.
        let existing = match inspect(&self.sock, cname).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(modvisor_module = %req.name, "{e}");
                self.remove(cname).await?;
                None
            }
        };
        match existing {
            Some(i)
                if i.running
                    && i.labels.get(LABEL_SPEC).map(String::as_str) == Some(hash)
                    && i.labels.get(LABEL_OWNER) == Some(&self.owner) =>
            {
                tracing::info!(modvisor_module = %req.name, "adopted container {cname} ({}), already running with the same spec", &i.id[..12.min(i.id.len())]);
                Ok(Some(i))
            }
            Some(i) => {
                if i.running {
                    tracing::info!(modvisor_module = %req.name, "container {cname} runs another spec: recreating it");
                }
                self.remove(cname).await?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Creates the container; a name still taken by one on its way out is removed, once.
    async fn create(&self, cname: &str, body: ContainerCreateBody) -> Result<String, Failure> {
        let opts = CreateContainerOptionsBuilder::default().name(cname).build();
        match self
            .docker
            .create_container(Some(opts.clone()), body.clone())
            .await
        {
            Ok(c) => Ok(c.id),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.remove(cname).await?;
                let c = self
                    .docker
                    .create_container(Some(opts), body)
                    .await
                    .map_err(|e| format!("creating {cname}: {e}"))?;
                Ok(c.id)
            }
            Err(e) => Err(format!("creating {cname}: {e}").into()),
        }
    }

    async fn run(
        self: Arc<Self>,
        req: RunRequest,
        spec: ContainerSpec,
        events: Events,
        exited: Exited,
        stop_asked: super::StopAsked,
    ) -> Result<(), Failure> {
        let cname = container_name(&req.name);
        let hash = spec_hash(&spec, req.memory_max);
        let send_running = |i: &Inspect| {
            let _ = events.send(RuntimeEvent::Status {
                name: req.name.clone(),
                generation: req.generation,
                main_pid: i.pid,
                restarts: None,
                phase: RunPhase::Running,
                container_id: Some(i.id.clone()),
            });
        };
        if let Some(i) = self.adoptable(&req, &cname, &hash).await? {
            self.register(&cname, &req, &i.id, &events, exited);
            self.follow_logs(i.id.clone(), req.sink.clone(), true);
            send_running(&i);
            return Ok(());
        }
        self.ensure_image(&spec).await?;
        let secrets = read_secrets(&spec).await?;
        let body = body::create_body(self.engine, &self.owner, &req, &spec, &hash, secrets);
        if stop_asked.asked() {
            return Err(Failure::Other("stopped before it started".into()));
        }
        let id = self.create(&cname, body).await?;
        self.register(&cname, &req, &id, &events, exited);
        let start = self.docker.start_container(
            &cname,
            None::<bollard::query_parameters::StartContainerOptions>,
        );
        if let Err(e) = start.await {
            lock(&self.runs).remove(&cname);
            let _ = self.remove(&cname).await;
            return Err(format!("starting {cname}: {e}").into());
        }
        if stop_asked.asked() {
            // A stop came while the container was being made and found nothing: stop it now
            // (its die event ends the run, and it is removed then).
            if let Some((_, run)) = lock(&self.runs).get_mut(&cname) {
                run.stopping = true;
            }
            let t = req.stop_timeout.as_secs().max(1) as i32;
            let opts = StopContainerOptionsBuilder::default().t(t).build();
            if let Err(e) = self.docker.stop_container(&cname, Some(opts)).await {
                tracing::debug!("stopping {cname}: {e}");
            }
        }
        // After the start: both engines end a follow of a container that is not running yet.
        // (A quick exit's last lines are read again on its die event.)
        self.follow_logs(id, req.sink.clone(), false);
        // It may already have exited (the die event reports that): only a running one is news.
        if let Ok(Some(i)) = inspect(&self.sock, &cname).await
            && i.running
        {
            send_running(&i);
        }
        Ok(())
    }
}

type Events = mpsc::UnboundedSender<RuntimeEvent>;
type Exited = watch::Sender<bool>;

/// Secrets are read at each creation (a rotated file applies at the next start), checked
/// root-only like the native backends' (values never appear in an error).
async fn read_secrets(spec: &ContainerSpec) -> Result<Vec<(String, String)>, Failure> {
    let Some(f) = spec.environment_file.clone() else {
        return Ok(Vec::new());
    };
    tokio::task::spawn_blocking(move || crate::secrets::environment_file(&f))
        .await
        .map_err(|e| format!("reading the environment file: {e}"))?
        .map_err(Failure::Refused)
}

impl Backend for Arc<ContainerBackend> {
    fn kind(&self) -> &'static str {
        match self.engine {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    fn survives_daemon(&self) -> bool {
        true
    }

    fn unit_for(&self, req: &RunRequest) -> String {
        container_name(&req.name)
    }

    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError> {
        let Exec::Container(spec) = req.exec.clone() else {
            return Err(RuntimeError::Unsupported("not a container".into()));
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        let handle = RunHandle {
            pid: 0,
            pgid: 0,
            exited: exited_rx,
            unit: container_name(&req.name),
            stop_asked: Default::default(),
        };
        let stop_asked = handle.stop_asked.clone();
        let me = self.clone();
        let exited_for_fail = exited_tx.clone();
        tokio::spawn(async move {
            let (name, generation) = (req.name.clone(), req.generation);
            // The semaphore is never closed; were it, the start would just go unbounded.
            let _permit = me.starts.acquire().await.ok();
            if let Err(f) = me
                .clone()
                .run(req, spec, events.clone(), exited_tx, stop_asked)
                .await
            {
                let info = match f {
                    Failure::Refused(why) => ExitInfo::Refused(why),
                    Failure::Other(why) => ExitInfo::Other(why),
                };
                tracing::warn!(modvisor_module = %name, "{info}");
                let _ = exited_for_fail.send(true);
                let _ = events.send(RuntimeEvent::Exited {
                    name,
                    generation,
                    info,
                });
            }
        });
        Ok(handle)
    }

    fn exec_probe(
        &self,
        handle: &RunHandle,
        argv: &[String],
        timeout: Duration,
    ) -> Option<BoxFuture<ProbeResult>> {
        let docker = self.docker.clone();
        let cname = handle.unit.clone();
        let argv = argv.to_vec();
        Some(Box::pin(async move {
            let what = format!("exec {} in {cname}", argv.join(" "));
            match tokio::time::timeout(timeout, exec_in(&docker, &cname, argv)).await {
                Ok(Ok(0)) => ProbeResult {
                    ok: true,
                    detail: format!("{what}: exited 0"),
                    loading: false,
                },
                Ok(Ok(code)) => probe_failed(format!("{what}: exited with {code}")),
                Ok(Err(e)) => probe_failed(format!("{what}: {e}")),
                Err(_) => probe_failed(format!("{what}: timed out after {timeout:?}")),
            }
        }))
    }

    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()> {
        // First: a container still being made is then not made, or stopped once it is.
        handle.stop_asked.ask();
        let me = self.clone();
        let cname = handle.unit.clone();
        let mut exited = handle.exited.clone();
        // The container of this run, by ID: once it has died the supervisor may already have
        // created the next run's container under the same name.
        let mut target = cname.clone();
        if let Some((_, run)) = lock(&self.runs).get_mut(&cname) {
            run.stopping = true;
            if !run.id.is_empty() {
                target.clone_from(&run.id);
            }
        }
        Box::pin(async move {
            let t = timeout.as_secs().max(1) as i32;
            let opts = StopContainerOptionsBuilder::default().t(t).build();
            if let Err(e) = me.docker.stop_container(&cname, Some(opts)).await {
                tracing::debug!("stopping {cname}: {e}");
            }
            let done = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
                .await
                .is_ok();
            if !done {
                // No die event (already dead, or the engine lost it): forget the run ourselves.
                if let Some((module, run)) = lock(&me.runs).remove(&cname) {
                    let _ = run.exited.send(true);
                    let _ = run.events.send(RuntimeEvent::Exited {
                        name: module,
                        generation: run.generation,
                        info: ExitInfo::Other("stopped".into()),
                    });
                }
            }
            if let Err(e) = me.remove(&target).await {
                tracing::warn!("{e}");
            }
        })
    }

    fn list_units(&self) -> BoxFuture<Vec<Owned>> {
        let sock = self.sock.clone();
        let owner = self.owner.clone();
        Box::pin(async move {
            let filter =
                serde_json::json!({"label": [format!("{LABEL_OWNER}={owner}")]}).to_string();
            let q: String = url_encode(&filter);
            match get_json(&sock, &format!("/containers/json?all=true&filters={q}")).await {
                Ok((200, Value::Array(list))) => list
                    .iter()
                    .filter_map(|c| {
                        let module = c["Labels"][LABEL_MODULE].as_str()?.to_string();
                        let id = c["Id"].as_str()?.to_string();
                        let running = c["State"].as_str() == Some("running");
                        Some(Owned {
                            module,
                            id,
                            running,
                        })
                    })
                    .collect(),
                Ok((s, v)) => {
                    tracing::warn!("listing containers: HTTP {s}: {v}");
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!("listing containers: {e}");
                    Vec::new()
                }
            }
        })
    }

    fn stop_unit(&self, id: &str) -> BoxFuture<()> {
        let me = self.clone();
        let id = id.to_string();
        Box::pin(async move {
            tracing::info!("removing container {id}: no manifest wants it any more");
            if let Err(e) = me.remove(&id).await {
                tracing::warn!("{e}");
            }
        })
    }
}

fn probe_failed(detail: String) -> ProbeResult {
    ProbeResult {
        ok: false,
        detail,
        loading: false,
    }
}

/// Runs `argv` inside the container through the engine's exec API (as the container's user,
/// never privileged) and returns its exit code. Its output is read and dropped.
async fn exec_in(docker: &Docker, cname: &str, argv: Vec<String>) -> Result<i64, String> {
    use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
    let opts = CreateExecOptions {
        cmd: Some(argv),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        privileged: Some(false),
        ..Default::default()
    };
    let exec = docker
        .create_exec(cname, opts)
        .await
        .map_err(|e| format!("create exec: {e}"))?;
    let start = StartExecOptions {
        detach: false,
        tty: false,
        output_capacity: None,
    };
    match docker.start_exec(&exec.id, Some(start)).await {
        Ok(StartExecResults::Attached { mut output, .. }) => {
            while let Some(Ok(_)) = output.next().await {}
        }
        Ok(StartExecResults::Detached) => {}
        Err(e) => return Err(format!("start exec: {e}")),
    }
    // The stream ends with the process; the engine may record its exit a moment later. The
    // caller's timeout bounds this.
    loop {
        let i = docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| format!("inspect exec: {e}"))?;
        if i.running != Some(true) {
            return i
                .exit_code
                .ok_or_else(|| "the engine reported no exit code".to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
