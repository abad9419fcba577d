//! The direct native backend: each module is a child of modvisord in its own process group,
//! with RLIMIT_CORE 0; stop is SIGTERM to the group, then SIGKILL after the stop timeout.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncRead;
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::{
    Backend, BoxFuture, Exec, ExitInfo, RunHandle, RunRequest, RuntimeError, RuntimeEvent,
};
use crate::journal::{OutputSink, Stream};
use crate::manifest::NativeExec;
use crate::reaper;

/// The PATH modules get (they do not inherit the daemon's environment, as under systemd).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Each running module has `RUNTIME/direct/NAME.pid` ("PID STARTTIME"), so that a modvisord
/// started after a crash of the previous one finds the process groups it left behind and
/// stops them before starting anything: never two copies of an engine.
#[derive(Debug, Default)]
pub struct DirectBackend {
    pid_dir: Option<PathBuf>,
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
            return DirectBackend { pid_dir: None };
        }
        DirectBackend { pid_dir: Some(dir) }
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

    fn record(&self, name: &str, pid: u32) -> Option<PathBuf> {
        let dir = self.pid_dir.as_ref()?;
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
async fn forward<R: AsyncRead + Unpin>(r: R, sink: OutputSink, stream: Stream) {
    crate::bounded::forward_lines(r, |line| sink.line(stream, line)).await;
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
        let Exec::Native(NativeExec::Command {
            argv,
            environment,
            working_directory,
            user,
        }) = &req.exec
        else {
            return Err(RuntimeError::Unsupported(
                "existing units need the systemd backend".into(),
            ));
        };
        if user.is_some() {
            return Err(RuntimeError::Unsupported(
                "native.user needs the systemd backend (system manager)".into(),
            ));
        }
        if let Some(addr) = req.guard_port.as_deref().filter(|a| super::port_in_use(a)) {
            return Err(RuntimeError::Unsupported(format!(
                "{addr} is already in use by another process: not starting a second copy"
            )));
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("MODVISOR_MODULE", &req.name)
            .envs(environment)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(wd) = working_directory {
            cmd.current_dir(wd);
        }
        // SAFETY: between fork and exec only async-signal-safe calls are made (setrlimit).
        unsafe {
            cmd.pre_exec(|| {
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = reaper::spawn(&mut cmd).map_err(|source| RuntimeError::Spawn {
            program: argv[0].clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let pgid = pid as i32;
        let pid_file = self.record(&req.name, pid);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(out, req.sink.clone(), Stream::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(err, req.sink.clone(), Stream::Stderr));
        }
        let (exited_tx, exited_rx) = watch::channel(false);
        let name = req.name.clone();
        let generation = req.generation;
        tokio::spawn(async move {
            let info = match child.wait().await {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (st.code(), st.signal()) {
                        (Some(c), _) => ExitInfo::Code(c),
                        (None, Some(s)) => ExitInfo::Signal(s),
                        (None, None) => ExitInfo::Code(-1),
                    }
                }
                Err(e) => {
                    tracing::error!(modvisor_module = %name, "waiting for pid {pid}: {e}");
                    ExitInfo::Code(-1)
                }
            };
            reaper::forget(pid);
            if let Some(f) = pid_file {
                let _ = std::fs::remove_file(f);
            }
            // Like KillMode=control-group: nothing of the module outlives its main process.
            signal_group(pgid, Signal::SIGKILL);
            let _ = exited_tx.send(true);
            let _ = events.send(RuntimeEvent::Exited {
                name,
                generation,
                info,
            });
        });
        Ok(RunHandle {
            pid,
            pgid,
            exited: exited_rx,
            unit: String::new(),
        })
    }

    fn stop(&self, handle: &RunHandle, timeout: Duration) -> BoxFuture<()> {
        let pgid = handle.pgid;
        let mut exited = handle.exited.clone();
        Box::pin(async move {
            signal_group(pgid, Signal::SIGTERM);
            let gone = tokio::time::timeout(timeout, exited.wait_for(|e| *e))
                .await
                .is_ok();
            if !gone {
                tracing::warn!(
                    "process group {pgid} still running {timeout:?} after SIGTERM: sending SIGKILL"
                );
                signal_group(pgid, Signal::SIGKILL);
                let gone = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
                    .await
                    .is_ok();
                if !gone {
                    tracing::error!("process group {pgid} survived SIGKILL for 5s");
                }
            }
        })
    }
}
