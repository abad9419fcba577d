//! What a module's container is created with: the engine-neutral parts of the spec, the
//! hardening modvisor always adds, and where Docker and Podman differ (GPUs, ulimits). Pure:
//! no request is sent from here.

use std::collections::HashMap;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, DeviceRequest, HostConfig, PortBinding, ResourcesUlimits,
};

use super::{Engine, LABEL_MODULE, LABEL_OWNER, LABEL_SPEC};
use crate::manifest::{ContainerSpec, Gpus};
use crate::runtime::RunRequest;

type PortMap = HashMap<String, Option<Vec<PortBinding>>>;

/// The body of the create request for `req`'s container.
pub fn create_body(
    engine: Engine,
    owner: &str,
    req: &RunRequest,
    spec: &ContainerSpec,
    hash: &str,
    secrets: Vec<(String, String)>,
) -> ContainerCreateBody {
    let labels = HashMap::from([
        (LABEL_MODULE.to_string(), req.name.clone()),
        (LABEL_SPEC.to_string(), hash.to_string()),
        (LABEL_OWNER.to_string(), owner.to_string()),
    ]);
    let (exposed, port_bindings) = ports(spec);
    let env = spec
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(secrets.iter().map(|(k, v)| format!("{k}={v}")))
        .chain([format!("MODVISOR_MODULE={}", req.name)])
        .collect();
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: non_empty(spec.command.clone()),
        env: Some(env),
        user: spec.user.clone(),
        labels: Some(labels),
        exposed_ports: non_empty(exposed),
        stop_timeout: Some(req.stop_timeout.as_secs().max(1) as i64),
        host_config: Some(host_config(engine, req, spec, port_bindings)),
        ..Default::default()
    }
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    if v.is_empty() { None } else { Some(v) }
}

/// The ports to expose ("8080/tcp") and where each is published on the host.
fn ports(spec: &ContainerSpec) -> (Vec<String>, PortMap) {
    let mut bindings: PortMap = HashMap::new();
    let mut exposed = Vec::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(p.host_ip.clone()),
                host_port: Some(p.host_port.to_string()),
            });
    }
    (exposed, bindings)
}

/// The sandbox and limits of the container.
fn host_config(
    engine: Engine,
    req: &RunRequest,
    spec: &ContainerSpec,
    port_bindings: PortMap,
) -> HostConfig {
    // "any" not placed by admission (it is off): one GPU, the engine's pick.
    let placed = spec.gpus.as_ref().map(|g| g.placed(&[]));
    let (device_requests, devices) = match &placed {
        None => (None, None),
        Some(g) => gpu_devices(engine, g),
    };
    let binds = spec.volumes.iter().map(|v| {
        let mode = if v.read_only { "ro" } else { "rw" };
        format!("{}:{}:{mode}", v.source.display(), v.target.display())
    });
    HostConfig {
        memory: req.memory_max.map(|m| m as i64),
        // The pids cgroup of the container (both engines): a fork bomb inside stops there.
        pids_limit: Some(spec.pids_limit as i64),
        ulimits: Some(ulimits(engine, spec)),
        init: Some(true),
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: non_empty(spec.cap_add.clone()),
        security_opt: Some(vec!["no-new-privileges".into()]),
        binds: Some(binds.collect()),
        port_bindings: if port_bindings.is_empty() {
            None
        } else {
            Some(port_bindings)
        },
        network_mode: spec.network.clone(),
        device_requests,
        devices,
        ..Default::default()
    }
}

/// Core 0 always. Podman replaces all its default ulimits as soon as one is sent, and then asks
/// for more open files than this machine allows: send nofile/nproc too. RLIMIT_NPROC counts
/// every process of the uid on the host (no user namespace here), so it is no container limit
/// (the pids cgroup is); it only must not be lower.
fn ulimits(engine: Engine, spec: &ContainerSpec) -> Vec<ResourcesUlimits> {
    let ulimit = |name: &str, v: i64| ResourcesUlimits {
        name: Some(name.into()),
        soft: Some(v),
        hard: Some(v),
    };
    let mut v = vec![ulimit("core", 0)];
    if engine == Engine::Podman {
        v.push(ulimit("nofile", 20000));
        v.push(ulimit("nproc", spec.pids_limit as i64));
    }
    v
}

/// Docker takes GPUs as a DeviceRequest of the nvidia driver; Podman ignores DeviceRequests
/// and takes CDI device names instead.
fn gpu_devices(
    engine: Engine,
    g: &Gpus,
) -> (Option<Vec<DeviceRequest>>, Option<Vec<DeviceMapping>>) {
    match engine {
        Engine::Docker => {
            let (count, ids) = match g {
                Gpus::All => (Some(-1), None),
                Gpus::Count(n) => (Some(*n as i64), None),
                Gpus::Any => (Some(1), None),
                Gpus::Ids(v) => (None, Some(v.clone())),
            };
            let request = DeviceRequest {
                driver: Some("nvidia".into()),
                count,
                device_ids: ids,
                capabilities: Some(vec![vec!["gpu".into()]]),
                options: None,
            };
            (Some(vec![request]), None)
        }
        Engine::Podman => {
            let names: Vec<String> = match g {
                Gpus::All => vec!["nvidia.com/gpu=all".into()],
                Gpus::Count(n) => (0..*n).map(|i| format!("nvidia.com/gpu={i}")).collect(),
                Gpus::Any => vec!["nvidia.com/gpu=0".into()],
                Gpus::Ids(v) => v.iter().map(|i| format!("nvidia.com/gpu={i}")).collect(),
            };
            let mapping = |n: String| DeviceMapping {
                path_on_host: Some(n.clone()),
                path_in_container: Some(n),
                cgroup_permissions: Some("rwm".into()),
            };
            (None, Some(names.into_iter().map(mapping).collect()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_are_a_device_request_for_docker_and_cdi_names_for_podman() {
        let (req, dev) = gpu_devices(Engine::Docker, &Gpus::Count(2));
        assert!(dev.is_none());
        let r = &req.expect("a request")[0];
        assert_eq!((r.driver.as_deref(), r.count), (Some("nvidia"), Some(2)));
        let (req, dev) = gpu_devices(Engine::Podman, &Gpus::Ids(vec!["1".into(), "3".into()]));
        assert!(req.is_none());
        let names: Vec<_> = dev
            .expect("devices")
            .into_iter()
            .filter_map(|d| d.path_on_host)
            .collect();
        assert_eq!(names, ["nvidia.com/gpu=1", "nvidia.com/gpu=3"]);
    }
}
