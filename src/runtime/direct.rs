//! The direct native backend: each module is a child of modvisord in its own process group,
//! as the engine user (RLIMIT_CORE 0 is inherited from modvisord); stop is SIGTERM to the
//! group and to every process under the main one, then SIGKILL after the stop timeout.
//!
//! A start returns at once: the engine's identity (NSS), its environment file and its
//! credentials are prepared in `spawn_blocking`, never on the supervisor actor; the PID
//! follows as a `Status` event.
//!
//! Stop and exit never signal a reused process group: the exit is awaited on a pidfd
//! (readable once the process is a zombie, without reaping it), the group is SIGKILLed while
//! the zombie leader still holds its id, and only then is the leader reaped, all under the
//! run's lock, under which `stop` also signals.

mod launch;
mod pidfd;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::{
    Backend, BoxFuture, Exec, ExitInfo, RunHandle, RunPhase, RunRequest, RuntimeError, RuntimeEvent,
};
use crate::journal::{OutputSink, Stream};
use crate::manifest::NativeExec;
use crate::reaper;

/// The PATH modules get (they do not inherit the daemon's environment, as under systemd).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Each running module has `RUNTIME/direct/NAME.pid` ("PID STARTTIME"), so that a modvisord
/// started after a crash of the previous one finds the process groups it left behind and
/// stops them before starting anything: never two copies of an engine.
#[derive(Default)]
pub struct DirectBackend {
    pid_dir: Option<PathBuf>,
    /// `RUNTIME/credentials`: each module's private copy of its credentials.
    cred_dir: Option<PathBuf>,
    runs: Arc<Mutex<Vec<Run>>>,
}

/// A run `stop` can find again: its exit channel (the handle's) and its state.
type Run = (watch::Receiver<bool>, Arc<Mutex<RunState>>);

/// One run, shared by its task (spawn, exit, reap) and `stop`.
#[derive(Debug, Default)]
struct RunState {
    /// The main process (and process group) once spawned.
    pid: Option<u32>,
    /// Stopped before it was spawned: it never will be.
    cancelled: bool,
    /// The leader is reaped: its PID and group id may belong to someone else now.
    reaped: bool,
    /// Processes under the main one when a stop began (with their start times): those that
    /// left the group (`setsid`) are killed with it.
    tree: Vec<(u32, u64)>,
}

fn lock(s: &Mutex<RunState>) -> MutexGuard<'_, RunState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Field 22 of /proc/PID/stat: the start time, which tells a reused PID from the original.
fn start_time(pid: u32) -> Option<u64> {
    // A zombie has exited, only not yet been reaped by its new parent.
    crate::procfs::stat(pid)
        .filter(|s| s.state != 'Z')
        .map(|s| s.start_time)
}

impl DirectBackend {
    pub fn new(runtime: &Path) -> DirectBackend {
        let dir = runtime.join("direct");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(
                "cannot create {}: {e}; leftovers of a crash cannot be found",
                dir.display()
            );
            return DirectBackend::default();
        }
        DirectBackend {
            pid_dir: Some(dir),
            cred_dir: Some(runtime.join("credentials")),
            runs: Arc::default(),
        }
    }

    /// Stops the process groups a previous modvisord left running (SIGTERM, then SIGKILL after
    /// `grace`). Blocking and bounded; called once at start-up, before any module starts.
    pub fn stop_leftovers(&self, grace: Duration) -> Vec<(String, u32)> {
        let mut stopped = Vec::new();
        let Some(dir) = &self.pid_dir else {
            return stopped;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return stopped;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut f = text.split_whitespace().map(|x| x.parse::<u64>().ok());
            if let (Some(Some(pid)), Some(Some(st))) = (f.next(), f.next()) {
                let pid = pid as u32;
                if pid > 1 && start_time(pid) == Some(st) {
                    tracing::warn!(modvisor_module = %name, "stopping pid {pid}, left running by a previous modvisord");
                    signal_group(pid as i32, Signal::SIGTERM);
                    let deadline = std::time::Instant::now() + grace;
                    while start_time(pid) == Some(st) && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    signal_group(pid as i32, Signal::SIGKILL);
                    stopped.push((name, pid));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        stopped
    }
}

/// Writes `PID_DIR/NAME.pid` ("PID STARTTIME") for the leftover search after a crash.
fn record_pid(dir: Option<&Path>, name: &str, pid: u32) -> Option<PathBuf> {
    {
        let dir = dir?;
        let path = dir.join(format!("{name}.pid"));
        let st = start_time(pid)?;
        let tmp = dir.join(format!(".{name}.pid.tmp"));
        std::fs::write(&tmp, format!("{pid} {st}\n")).ok()?;
        std::fs::rename(&tmp, &path).ok()?;
        Some(path)
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    // Never signal a group <= 1: that would be init's or "every process".
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// Forwards a pipe line by line, in bounded chunks (lines split at 64 KiB): a module writing
/// without newlines cannot grow modvisord.
async fn forward(r: pipe::Receiver, sink: OutputSink, stream: Stream) {
    crate::bounded::forward_lines(r, |line| sink.line(stream, line)).await;
}

/// A child's output pipe as a readiness-driven receiver (read only when there is output).
fn receiver(fd: std::io::Result<std::os::fd::OwnedFd>) -> Option<pipe::Receiver> {
    match fd.and_then(pipe::Receiver::from_owned_fd) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("cannot read an engine's output: {e}");
            None
        }
    }
}

impl DirectBackend {
    fn state_of(&self, h: &RunHandle) -> Option<Arc<Mutex<RunState>>> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.iter()
            .find(|(rx, _)| rx.same_channel(&h.exited))
            .map(|(_, s)| s.clone())
    }
}

/// Signals the group and every process seen under the main one, unless the leader is reaped.
fn signal_run(st: &mut RunState, sig: Signal) {
    let Some(pid) = st.pid.filter(|_| !st.reaped) else {
        return;
    };
    for d in pidfd::descendants(pid) {
        if !st.tree.contains(&d) {
            st.tree.push(d);
        }
    }
    signal_group(pid as i32, sig);
    for (p, t) in &st.tree {
        pidfd::signal_verified(*p, *t, sig);
    }
}

/// Everything `run` needs, moved into its task.
struct Launch {
    req: RunRequest,
    cred_dir: Option<PathBuf>,
    state: Arc<Mutex<RunState>>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Sender<bool>,
}

/// What the end of a run reports, and to whom.
struct Ending {
    name: String,
    generation: u64,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    exited: watch::Sender<bool>,
}

impl Ending {
    fn end(self, info: ExitInfo) {
        let _ = self.exited.send(true);
        let _ = self.events.send(RuntimeEvent::Exited {
            name: self.name,
            generation: self.generation,
            info,
        });
    }
}

/// A spawned child and what goes when it has ended.
struct Spawned {
    pid: u32,
    child: tokio::process::Child,
    pid_file: Option<PathBuf>,
    credentials: Option<PathBuf>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

/// The life of one direct child: prepare (blocking, off the actor), spawn, report the PID,
/// await the exit on a pidfd, kill the group, reap. The start (the request, the command, its
/// preparation) is on the heap only while it runs: the task that waits for the exit for as
/// long as the engine runs holds what the end needs.
fn run(
    l: Launch,
    backend_record: impl FnOnce(u32) -> Option<PathBuf> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let Launch {
        req,
        cred_dir,
        state,
        events,
        exited,
    } = l;
    let ending = Ending {
        name: req.name.clone(),
        generation: req.generation,
        events: events.clone(),
        exited,
    };
    let starting = Box::pin(spawn_run(
        req,
        cred_dir,
        state.clone(),
        events,
        backend_record,
    ));
    async move {
        let s = match starting.await {
            Ok(s) => s,
            Err(info) => return ending.end(info),
        };
        let info = wait_kill_reap(s.pid, &state).await;
        // The Child is only dropped once reaped: tokio never waits for it.
        drop(s.child);
        reaper::forget(s.pid);
        if let Some(f) = s.pid_file {
            let _ = std::fs::remove_file(f);
        }
        remove_credentials(s.credentials.as_deref());
        drain(s.forwarders).await;
        ending.end(info);
    }
}

/// Prepares and spawns the child, forwards its output and reports its PID.
async fn spawn_run(
    req: RunRequest,
    cred_dir: Option<PathBuf>,
    state: Arc<Mutex<RunState>>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    backend_record: impl FnOnce(u32) -> Option<PathBuf> + Send,
) -> Result<Spawned, ExitInfo> {
    let Exec::Native(NativeExec::Command {
        argv,
        environment,
        working_directory,
        privileges,
    }) = &req.exec
    else {
        return Err(ExitInfo::Other("not a native command".into()));
    };
    let (name, p2) = (req.name.clone(), privileges.clone());
    let prep =
        tokio::task::spawn_blocking(move || launch::prepare(&name, &p2, cred_dir.as_deref()))
            .await
            .unwrap_or_else(|e| Err(format!("preparing the start: {e}")));
    let prep = prep.map_err(|why| {
        tracing::error!(modvisor_module = %req.name, "not starting {}: {why}", req.name);
        ExitInfo::Refused(why)
    })?;
    if privileges.runs_as_root() && prep.identity.as_ref().is_some_and(|i| i.is_root()) {
        tracing::warn!(modvisor_module = %req.name, "{} runs as root (user = \"root\" in its manifest): a crafted model would run code as root", req.name);
    }
    let mut cmd = launch::command(
        argv,
        environment,
        working_directory.as_deref(),
        &req.name,
        &prep,
        privileges.sandbox.no_new_privileges,
    );
    let mut child = spawn_locked(&state, &mut cmd, &argv[0]).map_err(|why| {
        remove_credentials(prep.credentials.as_deref());
        ExitInfo::Refused(why)
    })?;
    let pid = child.id().unwrap_or(0);
    let pid_file = backend_record(pid);
    let forwarders = forward_output(&mut child, &req.sink);
    if let Some(i) = &prep.identity {
        tracing::info!(modvisor_module = %req.name, "started pid {pid} as {} (uid {})", i.user, i.uid);
    }
    let _ = events.send(RuntimeEvent::Status {
        name: req.name.clone(),
        generation: req.generation,
        main_pid: pid,
        restarts: None,
        phase: RunPhase::Running,
        container_id: None,
    });
    Ok(Spawned {
        pid,
        child,
        pid_file,
        credentials: prep.credentials,
        forwarders,
    })
}

/// Forwards the child's stdout and stderr to the module's sink, a task each.
fn forward_output(
    child: &mut tokio::process::Child,
    sink: &OutputSink,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(out) = child
        .stdout
        .take()
        .and_then(|o| receiver(o.into_owned_fd()))
    {
        tasks.push(tokio::spawn(forward(out, sink.clone(), Stream::Stdout)));
    }
    if let Some(err) = child
        .stderr
        .take()
        .and_then(|e| receiver(e.into_owned_fd()))
    {
        tasks.push(tokio::spawn(forward(err, sink.clone(), Stream::Stderr)));
    }
    tasks
}

/// The engine's last words are read before its exit is reported (its reason quotes them),
/// for a moment at most: an escaped grandchild may hold the pipes open.
async fn drain(forwarders: Vec<tokio::task::JoinHandle<()>>) {
    let drained = futures_util::future::join_all(forwarders);
    let _ = tokio::time::timeout(Duration::from_millis(100), drained).await;
}

/// Spawns under the run's lock, so that a `stop` either cancels it first or sees its PID.
fn spawn_locked(
    state: &Mutex<RunState>,
    cmd: &mut tokio::process::Command,
    program: &str,
) -> Result<tokio::process::Child, String> {
    let mut st = lock(state);
    if st.cancelled {
        return Err("stopped before it started".to_string());
    }
    let child = reaper::spawn(cmd).map_err(|e| format!("cannot start {program}: {e}"))?;
    st.pid = child.id();
    Ok(child)
}

fn remove_credentials(dir: Option<&Path>) {
    if let Some(d) = dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Waits for the main process to exit without reaping it (pidfd readable), SIGKILLs its
/// group (and whatever `stop` saw under it) while the zombie still reserves the group id,
/// then reaps it, all under the run's lock.
async fn wait_kill_reap(pid: u32, state: &Mutex<RunState>) -> ExitInfo {
    let fd = match pidfd::exit_watch(pid as i32) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!("pidfd of {pid}: {e}; waiting in a thread");
            None
        }
    };
    match &fd {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => wait_without_pidfd(pid).await,
    }
    let mut st = lock(state);
    // Like KillMode=control-group: nothing of the module outlives its main process.
    signal_run(&mut st, Signal::SIGKILL);
    let status = loop {
        match waitid(Id::Pid(Pid::from_raw(pid as i32)), WaitPidFlag::WEXITED) {
            Err(nix::Error::EINTR) => continue,
            other => break other,
        }
    };
    st.reaped = true;
    match status {
        Ok(WaitStatus::Exited(_, c)) => ExitInfo::Code(c),
        Ok(WaitStatus::Signaled(_, s, _)) => ExitInfo::Signal(s as i32),
        Ok(other) => ExitInfo::Other(format!("{other:?}")),
        Err(e) => {
            tracing::error!("waiting for pid {pid}: {e}");
            ExitInfo::Code(-1)
        }
    }
}

/// Without a pidfd (Linux before 5.3): waits for the exit (without reaping) in a thread of
/// its own for as long as the engine runs (the blocking pool is small and kept for short
/// work), or polls when no thread can be made.
async fn wait_without_pidfd(pid: u32) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            while let Err(nix::Error::EINTR) = waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {}
            let _ = tx.send(());
        });
    match waiter {
        Ok(_) => {
            let _ = rx.await;
        }
        Err(e) => {
            tracing::warn!("no thread to wait for {pid} ({e}): polling");
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
            while let Ok(WaitStatus::StillAlive) | Err(nix::Error::EINTR) =
                waitid(Id::Pid(Pid::from_raw(pid as i32)), flags)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Backend for DirectBackend {
    fn kind(&self) -> &'static str {
        "direct"
    }

    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError> {
        if !matches!(req.exec, Exec::Native(NativeExec::Command { .. })) {
            return Err(RuntimeError::Unsupported(
                "existing units need the systemd backend".into(),
            ));
        }
        if let Some(addr) = req.guard_port.as_deref().filter(|a| super::port_in_use(a)) {
            return Err(RuntimeError::Unsupported(format!(
                "{addr} is already in use by another process: not starting a second copy"
            )));
        }
        let (exited_tx, exited_rx) = watch::channel(false);
        let state = Arc::new(Mutex::new(RunState::default()));
        {
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            // Forget runs that are over.
            runs.retain(|(rx, _)| !*rx.borrow());
            runs.push((exited_rx.clone(), state.clone()));
        }
        let name = req.name.clone();
        let pid_dir = self.pid_dir.clone();
        let record = move |pid: u32| record_pid(pid_dir.as_deref(), &name, pid);
        let l = Launch {
            req,
            cred_dir: self.cred_dir.clone(),
            state,
            events,
            exited: exited_tx,
        };
        tokio::spawn(run(l, record));
        Ok(RunHandle {
            pid: 0,
            pgid: 0,
            exited: exited_rx,
            unit: String::new(),
            stop_asked: Default::default(),
        })
    }

    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()> {
        let state = self.state_of(handle);
        let mut exited = handle.exited.clone();
        Box::pin(async move {
            let Some(state) = state else { return };
            let pid = {
                let mut st = lock(&state);
                if st.pid.is_none() {
                    st.cancelled = true;
                }
                signal_run(&mut st, Signal::SIGTERM);
                st.pid
            };
            let Some(pid) = pid else { return };
            let gone = tokio::time::timeout(timeout, exited.wait_for(|e| *e))
                .await
                .is_ok();
            if !gone {
                tracing::warn!(
                    "pid {pid} and its process group still running {timeout:?} after SIGTERM: sending SIGKILL"
                );
                signal_run(&mut lock(&state), Signal::SIGKILL);
                let gone = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
                    .await
                    .is_ok();
                if !gone {
                    tracing::error!("pid {pid} survived SIGKILL for 5s");
                }
            }
        })
    }
}
