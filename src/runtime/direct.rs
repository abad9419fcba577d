//! The direct native backend: each module is a child of modvisord in its own process group,
//! with RLIMIT_CORE 0; stop is SIGTERM to the group, then SIGKILL after the stop timeout.
#![allow(unsafe_code)]

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use super::{
    BoxFuture, ExitInfo, NativeBackend, RunHandle, RunRequest, RuntimeError, RuntimeEvent,
};
use crate::journal::{OutputSink, Stream};
use crate::reaper;

/// The PATH modules get (they do not inherit the daemon's environment, as under systemd).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Default)]
pub struct DirectBackend;

fn signal_group(pgid: i32, sig: Signal) {
    // Never signal a group <= 1: that would be init's or "every process".
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

async fn forward<R: AsyncRead + Unpin>(r: R, sink: OutputSink, stream: Stream) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::with_capacity(512);
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => sink.line(stream, &buf[..buf.len().min(64 * 1024)]),
        }
    }
}

impl NativeBackend for DirectBackend {
    fn kind(&self) -> &'static str {
        "direct"
    }

    fn start(
        &self,
        req: RunRequest,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Result<RunHandle, RuntimeError> {
        let mut cmd = Command::new(&req.argv[0]);
        cmd.args(&req.argv[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("MODVISOR_MODULE", &req.name)
            .envs(&req.environment)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(wd) = &req.working_directory {
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
            program: req.argv[0].clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let pgid = pid as i32;
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
