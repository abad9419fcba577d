//! The embedded bus: on a machine without a system bus (or one that will not let us own
//! `org.modvisor1`), modvisord starts a private `dbus-daemon` listening on `RUNTIME/bus`,
//! which `modvisorctl` finds without flags. Everyone may connect and read; the daemon itself
//! checks the caller's uid before any change.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::reaper;

pub struct EmbeddedBus {
    pub address: String,
    child: Option<Child>,
    socket: PathBuf,
}

fn config(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Written by modvisord: the embedded bus. Regenerated at every start. -->
<busconfig>
  <type>modvisor</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}

impl EmbeddedBus {
    /// Starts the bus (or reuses a live one left by an earlier modvisord). Bounded: 10 s.
    pub async fn start(runtime: &Path) -> io::Result<EmbeddedBus> {
        std::fs::create_dir_all(runtime)?;
        let socket = runtime.join("bus");
        let address = format!("unix:path={}", socket.display());
        if socket.exists() {
            if zbus::connection::Builder::address(address.as_str())
                .build()
                .await
                .is_ok()
            {
                tracing::info!("reusing the embedded bus at {address}");
                return Ok(EmbeddedBus {
                    address,
                    child: None,
                    socket,
                });
            }
            std::fs::remove_file(&socket)?;
        }
        let conf = runtime.join("bus.conf");
        std::fs::write(&conf, config(&socket))?;
        let mut cmd = Command::new("dbus-daemon");
        cmd.arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .arg("--print-address=1")
            // Our READY=1 is ours to send: a dbus-daemon built with systemd support would
            // otherwise answer on NOTIFY_SOCKET too.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C or a group signal meant for modvisord must not
            // take the bus away before modvisord has stopped its modules.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = reaper::spawn(&mut cmd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start dbus-daemon for the embedded bus: {e}"),
            )
        })?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout from dbus-daemon"))?;
        let mut lines = BufReader::new(out).lines();
        // dbus-daemon prints its address once it listens: that is the readiness signal.
        match tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => {
                return Err(io::Error::other(
                    "dbus-daemon for the embedded bus exited before listening",
                ));
            }
            Err(_) => {
                return Err(io::Error::other(
                    "dbus-daemon for the embedded bus did not listen within 10s",
                ));
            }
        }
        tracing::info!("started the embedded bus at {address}");
        Ok(EmbeddedBus {
            address,
            child: Some(child),
            socket,
        })
    }

    /// Stops the bus if we started it.
    pub async fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id().unwrap_or(0);
            if pid > 1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
            reaper::forget(pid);
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}
