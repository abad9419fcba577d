//! A private real dbus-daemon configured like a system bus: the stock default policy plus the
//! shipped policy file. Shared by the tests and the benchmarks (benches/common includes it).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use zbus::Connection;

/// A private dbus-daemon with the stock system-bus default policy plus our shipped policy file.
pub struct Bus {
    child: Child,
    pub address: String,
    _dir: Option<tempfile::TempDir>,
}

impl Bus {
    pub fn start() -> Bus {
        Bus::start_in(tempfile::tempdir().expect("tempdir"))
    }

    /// A bus whose socket lives in `dir` (e.g. outside /tmp, for a daemon with PrivateTmp=).
    pub fn start_in(dir: tempfile::TempDir) -> Bus {
        // Other users (the authorization tests) must reach the socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let mut bus = Bus::start_at(dir.path());
        bus._dir = Some(dir);
        bus
    }

    /// A bus whose socket and config live in `dir`, which the caller keeps.
    pub fn start_at(dir: &Path) -> Bus {
        let sock = dir.join("bus");
        let policy =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/dbus/org.modvisor1.conf");
        let conf = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={sock}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
            sock = sock.display(),
            policy = policy.display()
        );
        let conf_path = dir.join("bus.conf");
        std::fs::write(&conf_path, conf).expect("write bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf_path.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon must be installed (make test installs it)");
        // It prints its address once it listens.
        use std::io::BufRead;
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("read dbus-daemon address");
        assert!(!line.trim().is_empty(), "dbus-daemon did not start");
        Bus {
            child,
            address: format!("unix:path={}", sock.display()),
            _dir: None,
        }
    }

    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connect to test bus")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
