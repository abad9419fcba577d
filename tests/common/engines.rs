//! The two real container engines of the testbed (Podman and Docker), as the container tests
//! drive and inspect them through their own CLIs.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{Daemon, Options};

#[derive(Clone, Copy)]
pub enum Eng {
    Podman,
    Docker,
}

impl Eng {
    pub fn socket(self) -> String {
        match self {
            Eng::Podman => {
                std::env::var("PODMAN_SOCK").unwrap_or_else(|_| "/run/podman/podman.sock".into())
            }
            Eng::Docker => std::env::var("DOCKER_HOST")
                .map(|h| h.trim_start_matches("unix://").to_string())
                .unwrap_or_else(|_| "/run/docker.sock".into()),
        }
    }
    pub fn image(self) -> &'static str {
        match self {
            Eng::Podman => "localhost/bb:latest",
            Eng::Docker => "bb:latest",
        }
    }
    pub fn cli(self) -> Command {
        match self {
            Eng::Podman => Command::new("podman"),
            Eng::Docker => {
                let mut c = Command::new("/usr/bin/docker");
                c.env("DOCKER_HOST", format!("unix://{}", self.socket()));
                c
            }
        }
    }
    pub fn tag(self) -> &'static str {
        match self {
            Eng::Podman => "pm",
            Eng::Docker => "dk",
        }
    }
    /// The engine's own view of a container (None when it does not exist).
    pub fn inspect(self, name: &str) -> Option<Value> {
        let out = self
            .cli()
            .args(["inspect", "--type", "container", name])
            .output()
            .expect("engine CLI");
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("inspect json");
        v.get(0).cloned()
    }
    /// `ENGINE exec NAME ARGV...` succeeded.
    pub fn exec_ok(self, name: &str, argv: &[&str]) -> bool {
        self.cli()
            .arg("exec")
            .arg(name)
            .args(argv)
            .output()
            .expect("engine CLI")
            .status
            .success()
    }
}

/// Removes the test's containers whatever happened (containers outlive modvisord).
pub struct Cleanup(pub Eng, pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.1 {
            let _ = self.0.cli().args(["rm", "-f", n]).output();
        }
    }
}

/// A daemon whose container backend is this engine (its API socket must exist).
pub async fn start_on(e: Eng, manifests: &[(&str, &str)]) -> Daemon {
    assert!(
        Path::new(&e.socket()).exists(),
        "the {} API socket must exist (the testbed starts it)",
        e.tag()
    );
    let o = Options {
        runtime_extra: format!("container_socket = \"{}\"\n", e.socket()),
        ..Options::default()
    };
    Daemon::start_with(manifests, o).await
}
