//! The embedded bus: on a machine without a system bus (or one that will not let us own
//! `org.modvisor1`), modvisord starts a private `dbus-daemon` listening on `RUNTIME/bus`,
//! which `modvisorctl` finds without flags. Everyone may connect and read; the daemon itself
//! checks the caller's uid before any change. Only the daemon's user (root) may own
//! `org.modvisor1` there, so nobody can take the name and answer root's `modvisorctl`; a bus
//! left by an earlier daemon is reused only when its socket and its dbus-daemon are root's.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::reaper;

/// The runtime directory holds the bus socket: nobody else may be able to swap it.
fn check_runtime_dir(runtime: &Path, me: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(runtime)?;
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{} must be a directory of uid {me} that nobody else can write (it is uid {}, mode {:04o}): the embedded bus socket lives there",
            runtime.display(),
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Whether the bus at `socket` is ours to reuse: a socket of our uid, served by a dbus-daemon
/// of our uid (the peer's credentials, from the kernel). Then the config file is rewritten and
/// reloaded, so a bus of an older modvisord gets today's policy.
async fn reusable(socket: &Path, conf: &Path, me: u32) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(socket).map_err(|e| e.to_string())?;
    if !m.file_type().is_socket() || m.uid() != me {
        return Err(format!("not a socket of uid {me} (uid {})", m.uid()));
    }
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let peer = stream
        .peer_cred()
        .map_err(|e| format!("peer credentials: {e}"))?;
    let pid = peer.pid().unwrap_or(0);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if peer.uid() != me || comm.trim() != "dbus-daemon" {
        return Err(format!(
            "served by pid {pid} ({}) of uid {}, not a dbus-daemon of uid {me}",
            comm.trim(),
            peer.uid()
        ));
    }
    drop(stream);
    std::fs::write(conf, config(socket, me)).map_err(|e| format!("{}: {e}", conf.display()))?;
    let address = format!("unix:path={}", socket.display());
    let conn = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let dbus = zbus::fdo::DBusProxy::new(&conn)
        .await
        .map_err(|e| e.to_string())?;
    dbus.reload_config()
        .await
        .map_err(|e| format!("ReloadConfig: {e}"))?;
    // An owner of our name that is not us (taken before this policy): start a new bus.
    let name = zbus::names::BusName::try_from(super::BUS_NAME).map_err(|e| e.to_string())?;
    if let Ok(owner) = dbus.get_name_owner(name).await {
        let uid = dbus
            .get_connection_unix_user(owner.clone().into())
            .await
            .map_err(|e| e.to_string())?;
        if uid != me {
            // Our own old dbus-daemon (checked above): stop it, its clients follow us.
            if pid > 1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                // It unlinks its socket path when it exits: gone before a new bus listens there.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while crate::procfs::stat(pid as u32).is_some_and(|s| s.state != 'Z')
                    && std::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            return Err(format!(
                "{} is owned there by uid {uid}: stopped that bus (pid {pid})",
                super::BUS_NAME
            ));
        }
    }
    Ok(())
}

/// How modvisord asks for `org.modvisor1` on any bus: never queued, and never with
/// ALLOW_REPLACEMENT (zbus's default), so nobody can take the name over while it runs.
pub const OWN_NAME_FLAGS: zbus::fdo::RequestNameFlags = zbus::fdo::RequestNameFlags::DO_NOT_QUEUE;

pub struct EmbeddedBus {
    pub address: String,
    child: Option<Child>,
    socket: PathBuf,
}

/// The bus config. `owner`: the only uid that may own `org.modvisor1` (the daemon's own).
fn config(socket: &Path, owner: u32) -> String {
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
    <deny own="{name}"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
  </policy>
  <policy user="{owner}">
    <allow own="{name}"/>
  </policy>
</busconfig>
"#,
        socket.display(),
        name = super::BUS_NAME,
    )
}

impl EmbeddedBus {
    /// Starts the bus (or reuses a live one left by an earlier modvisord). Bounded: 10 s.
    pub async fn start(runtime: &Path) -> io::Result<EmbeddedBus> {
        std::fs::create_dir_all(runtime)?;
        let me = nix::unistd::geteuid().as_raw();
        check_runtime_dir(runtime, me)?;
        let socket = runtime.join("bus");
        let address = format!("unix:path={}", socket.display());
        let conf = runtime.join("bus.conf");
        if socket.symlink_metadata().is_ok() {
            match reusable(&socket, &conf, me).await {
                Ok(()) => {
                    tracing::info!("reusing the embedded bus at {address}");
                    return Ok(EmbeddedBus {
                        address,
                        child: None,
                        socket,
                    });
                }
                Err(why) => tracing::warn!("not reusing the bus at {address}: {why}"),
            }
            // The old dbus-daemon may have removed it on its way out.
            match std::fs::remove_file(&socket) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::write(&conf, config(&socket, me))?;
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
