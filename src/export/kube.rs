//! A module as a Kubernetes Deployment (one replica, `Recreate`) and a Service, from its
//! `[container]` section: what modvisord would create in Docker/Podman, in Kubernetes' terms.
//!
//! YAML is written by `serde_norway` (a maintained serde_yaml fork, with its own maintained
//! libyaml translation) from typed structs: quoting of values such as `"8080"`, `yes` or `: `
//! is the library's, and field order is the structs' (maps are `BTreeMap`), so the same module
//! gives the same bytes. What Kubernetes cannot express is said in the header comment.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::{ExportError, ceil_secs};
use crate::manifest::{ContainerSpec, Exec, Gpus, Mode, Module, PortMap, Probe, Pull};

mod spec;

use spec::*;

/// The YAML: a header comment, the Deployment, and a Service when the module has a port.
pub fn render(m: &Module, state_dir: &Path, model: Option<&Path>) -> Result<String, ExportError> {
    let spec = container_spec(m, state_dir, model)?;
    let mut notes = Notes::default();
    let name = kube_name(&m.name);
    let host_network = spec.network.as_deref() == Some("host");
    let ports = if host_network {
        Vec::new()
    } else {
        spec.ports.clone()
    };
    let container = container(m, &spec, &name, host_network, model, &mut notes);
    let service_ports = service_ports(m, &ports, host_network);
    let pod = pod_spec(m, &spec, container, host_network, &mut notes);
    let labels = labels(m);
    let deployment = Object {
        api_version: "apps/v1",
        kind: "Deployment",
        metadata: metadata(m, &name, &labels),
        spec: DeploymentSpec {
            replicas: 1,
            strategy: Strategy { kind: "Recreate" },
            selector: Selector {
                match_labels: selector(&name),
            },
            template: Template {
                metadata: TemplateMeta {
                    labels: labels.clone(),
                },
                spec: pod,
            },
        },
    };
    let mut out = header(m, model, &notes, service_ports.is_empty());
    out.push_str(&yaml(&deployment)?);
    if !service_ports.is_empty() {
        let service = Object {
            api_version: "v1",
            kind: "Service",
            metadata: metadata(m, &name, &labels),
            spec: ServiceSpec {
                selector: selector(&name),
                ports: service_ports,
            },
        };
        out.push_str("---\n");
        out.push_str(&yaml(&service)?);
    }
    Ok(out)
}

fn container_spec(
    m: &Module,
    state_dir: &Path,
    model: Option<&Path>,
) -> Result<ContainerSpec, ExportError> {
    let modes: Vec<&str> = m.modes.iter().map(|m| m.as_str()).collect();
    let exec = m
        .modes
        .contains(&Mode::Container)
        .then(|| m.render(Mode::Container, state_dir, model))
        .flatten();
    match exec {
        Some(Exec::Container(c)) => Ok(c),
        _ => Err(ExportError::NotExportable(format!(
            "module {} cannot be exported to Kubernetes: it runs only natively (runtime.modes = {modes:?}) and Kubernetes runs containers; add a [container] section (and \"container\" to runtime.modes)",
            m.name
        ))),
    }
}

fn yaml<T: Serialize>(v: &T) -> Result<String, ExportError> {
    serde_norway::to_string(v).map_err(|e| ExportError::Io(format!("YAML: {e}")))
}

/// Notes for the header: what differs from modvisor, in the order found.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn add(&mut self, s: impl Into<String>) {
        self.0.push(s.into());
    }
}

fn header(m: &Module, model: Option<&Path>, notes: &Notes, no_service: bool) -> String {
    let mut h = format!(
        "# Module {} exported by `modvisorctl export --format kube` from {}.\n",
        m.name,
        m.source.display()
    );
    if let Some(p) = model {
        h.push_str(&format!("# Model: {}\n", p.display()));
    }
    h.push_str("# Where Kubernetes cannot do what modvisor does:\n");
    let fixed = [
        "core dumps: modvisor sets the container's core ulimit to 0; a pod spec has no ulimits: set it in the node's container runtime (containerd/CRI-O default ulimits)".to_string(),
        "init: modvisor runs the engine under an init that reaps zombies; here shareProcessNamespace makes the pod's pause process PID 1, which reaps them".to_string(),
        format!(
            "restarts: restart.policy = \"{}\" (at most {} within {}s, then left stopped); a Deployment always restarts its pod, with the kubelet's back-off instead of a budget",
            m.restart.policy.as_str(),
            m.restart.max,
            m.restart.window.as_secs()
        ),
    ];
    for n in fixed.iter().chain(notes.0.iter()) {
        h.push_str(&wrap(n));
    }
    if no_service {
        h.push_str("# No Service: the module names no port (container.ports, or the probe's port with network = \"host\").\n");
    }
    h
}

/// "# - " and the note, continued on "#   " lines at about 96 columns.
fn wrap(note: &str) -> String {
    let mut out = String::from("# -");
    let mut col = 3;
    for w in note.split(' ') {
        if col + 1 + w.len() > 96 && col > 4 {
            out.push_str("\n#  ");
            col = 3;
        }
        out.push(' ');
        out.push_str(w);
        col += 1 + w.len();
    }
    out.push('\n');
    out
}

/// A DNS-1123 label for object and container names: `_` becomes `-`, a leading digit gets
/// `m-`, at most 63 characters, ending in a letter or digit. Labels keep the module's name.
pub fn kube_name(module: &str) -> String {
    let mut n: String = module
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .collect();
    if n.starts_with(|c: char| c.is_ascii_digit()) {
        n.insert_str(0, "m-");
    }
    n.truncate(63);
    n.trim_end_matches('-').to_string()
}

fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        ("app.kubernetes.io/name".to_string(), name.to_string()),
    ])
}

fn labels(m: &Module) -> BTreeMap<String, String> {
    let name = kube_name(&m.name);
    let mut l = selector(&name);
    // A label value must end in a letter or digit, as every module name but a few does.
    let value = m.name.trim_end_matches(['-', '_']);
    l.insert("org.modvisor.module".into(), value.to_string());
    l
}

fn metadata(m: &Module, name: &str, labels: &BTreeMap<String, String>) -> Meta {
    let mut annotations = BTreeMap::new();
    if !m.description.is_empty() {
        annotations.insert("kubernetes.io/description".into(), m.description.clone());
    }
    annotations.insert(
        "org.modvisor.manifest".into(),
        m.source.display().to_string(),
    );
    Meta {
        name: name.to_string(),
        labels: labels.clone(),
        annotations,
    }
}

fn pod_spec(
    m: &Module,
    spec: &ContainerSpec,
    container: Container,
    host_network: bool,
    notes: &mut Notes,
) -> PodSpec {
    match spec.network.as_deref() {
        None | Some("host") => {}
        Some(n) => notes.add(format!(
            "network = \"{n}\" has no pod equivalent: the pod network is used"
        )),
    }
    if host_network {
        notes.add("network = \"host\" is hostNetwork: the engine shares the node's network, so its ports are the node's (no hostPort mappings)");
    }
    if spec.environment_file.is_some() {
        notes.add("container.environment_file is not exported (its secrets stay on this machine): create a Secret and add it to the container with envFrom");
    }
    let mut volumes = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        volumes.push(PodVolume {
            name: format!("volume-{i}"),
            host_path: HostPath {
                path: v.source.display().to_string(),
            },
        });
    }
    PodSpec {
        host_network,
        dns_policy: host_network.then_some("ClusterFirstWithHostNet"),
        share_process_namespace: true,
        termination_grace_period_seconds: ceil_secs(m.stop_timeout),
        containers: vec![container],
        volumes,
    }
}

fn container(
    m: &Module,
    spec: &ContainerSpec,
    name: &str,
    host_network: bool,
    model: Option<&Path>,
    notes: &mut Notes,
) -> Container {
    let mut env: Vec<EnvVar> = spec
        .environment
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: v.clone(),
        })
        .collect();
    if !spec.environment.contains_key("MODVISOR_MODULE") {
        env.push(EnvVar {
            name: "MODVISOR_MODULE".into(),
            value: m.name.clone(),
        });
    }
    let probes = probes(m, &spec.ports, host_network, notes);
    Container {
        name: name.to_string(),
        image: spec.image.clone(),
        image_pull_policy: match spec.pull {
            Pull::Never => "Never",
            Pull::Missing => "IfNotPresent",
        },
        args: spec.command.clone(),
        env,
        ports: if host_network {
            Vec::new()
        } else {
            container_ports(&spec.ports)
        },
        resources: resources(m, spec, notes),
        volume_mounts: volume_mounts(spec, m, model, notes),
        security_context: SecurityContext {
            allow_privilege_escalation: false,
            privileged: false,
            capabilities: Capabilities {
                add: spec.cap_add.clone(),
                drop: vec!["ALL".into()],
            },
        },
        startup_probe: probes.0,
        readiness_probe: probes.1,
        liveness_probe: probes.2,
    }
}

fn port_name(p: &PortMap) -> String {
    format!("{}-{}", p.protocol, p.container_port)
}

/// Every mapping, named once per container port (port names must be unique in a pod).
fn container_ports(ports: &[PortMap]) -> Vec<ContainerPort> {
    let mut named = std::collections::BTreeSet::new();
    ports
        .iter()
        .map(|p| ContainerPort {
            name: named.insert(port_name(p)).then(|| port_name(p)),
            container_port: p.container_port,
            host_port: p.host_port,
            host_ip: p.host_ip.clone(),
            protocol: p.protocol.to_ascii_uppercase(),
        })
        .collect()
}

/// The Service's ports: each container port once (the host port clients use today as the
/// Service port); with host networking, the port the probe talks to.
fn service_ports(m: &Module, ports: &[PortMap], host_network: bool) -> Vec<ServicePort> {
    let mut out: Vec<ServicePort> = Vec::new();
    for p in ports {
        if out.iter().any(|s| s.name == port_name(p)) {
            continue;
        }
        out.push(ServicePort {
            name: port_name(p),
            port: p.host_port,
            target_port: p.container_port,
            protocol: p.protocol.to_ascii_uppercase(),
        });
    }
    if host_network && let Some(port) = m.health.probe.as_ref().and_then(probe_port) {
        out.push(ServicePort {
            name: format!("tcp-{port}"),
            port,
            target_port: port,
            protocol: "TCP".into(),
        });
    }
    out
}

fn probe_port(p: &Probe) -> Option<u16> {
    let addr = p.address()?;
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

fn resources(m: &Module, spec: &ContainerSpec, notes: &mut Notes) -> Option<Resources> {
    let mut limits = BTreeMap::new();
    if let Some(b) = m.resources.memory_max {
        limits.insert("memory".to_string(), quantity(b));
    }
    match &spec.gpus {
        None => {}
        Some(Gpus::Count(n)) => {
            limits.insert("nvidia.com/gpu".into(), n.to_string());
        }
        // The scheduler places the pod on a node with a free GPU: the nearest to "any".
        Some(Gpus::Any) => {
            limits.insert("nvidia.com/gpu".into(), "1".into());
        }
        Some(Gpus::All) => {
            notes.add("gpus = \"all\": a pod asks for a number of GPUs; 1 is written, set the node's count");
            limits.insert("nvidia.com/gpu".into(), "1".into());
        }
        Some(Gpus::Ids(ids)) => {
            notes.add(format!(
                "gpus = {ids:?}: a pod cannot pick GPUs by index or UUID; it asks for {} of them",
                ids.len()
            ));
            limits.insert("nvidia.com/gpu".into(), ids.len().to_string());
        }
    }
    (!limits.is_empty()).then_some(Resources { limits })
}

/// Bytes as a Kubernetes quantity, exact: "8Gi", "512Mi", "1000".
pub fn quantity(b: u64) -> String {
    for (shift, suffix) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if b > 0 && b.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", b >> shift);
        }
    }
    b.to_string()
}

/// Mounts as the manifest writes them; a volume holding the model (or the model directory)
/// is read-only whatever the manifest says: an engine has no business writing its weights.
fn volume_mounts(
    spec: &ContainerSpec,
    m: &Module,
    model: Option<&Path>,
    notes: &mut Notes,
) -> Vec<VolumeMount> {
    let model_dir = m.model.as_ref().and_then(|s| s.directory.as_deref());
    spec.volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let holds_model = model.is_some_and(|p| p.starts_with(&v.source))
                || model_dir.is_some_and(|d| d.starts_with(&v.source));
            if holds_model && !v.read_only {
                notes.add(format!(
                    "the volume {} holds the model: mounted read-only",
                    v.source.display()
                ));
            }
            VolumeMount {
                name: format!("volume-{i}"),
                mount_path: v.target.display().to_string(),
                read_only: v.read_only || holds_model,
            }
        })
        .collect()
}

type Probes = (Option<KubeProbe>, Option<KubeProbe>, Option<KubeProbe>);

/// `[health]` as startup, readiness and liveness probes.
/// - startup: modvisor probes every 250 ms until the first success and gives up after
///   `start_timeout`: every second (Kubernetes' shortest period), `start_timeout` seconds long;
/// - readiness: `failures` bad probes make the module offline, `successes` good ones online;
/// - liveness: the same check and threshold. modvisor never restarts an engine for failed
///   probes (only for its exit); the kubelet does, which the header says.
fn probes(m: &Module, ports: &[PortMap], host_network: bool, notes: &mut Notes) -> Probes {
    let h = &m.health;
    let Some(p) = &h.probe else {
        notes.add("no [health] probe: the pod is ready once it runs, as the module is online once running");
        return (None, None, None);
    };
    let action = action(p, ports, host_network, notes);
    let period = ceil_secs(h.interval);
    let timeout = ceil_secs(h.timeout);
    let probe = |period: u64, failure: u64, success: u32| KubeProbe {
        action: action.clone(),
        period_seconds: period,
        timeout_seconds: timeout,
        failure_threshold: failure,
        success_threshold: success,
    };
    notes.add(format!(
        "livenessProbe: modvisor marks the module offline after {} failed probes but never restarts it for that; the kubelet restarts the container: drop livenessProbe for modvisor's behaviour",
        h.failures
    ));
    (
        Some(probe(1, ceil_secs(h.start_timeout), 1)),
        Some(probe(period, u64::from(h.failures), h.successes)),
        Some(probe(period, u64::from(h.failures), 1)),
    )
}

/// The probe's check. modvisor probes from the host, through the published port: the
/// kubelet probes the pod, at the container port that host port maps to.
fn action(p: &Probe, ports: &[PortMap], host_network: bool, notes: &mut Notes) -> Action {
    let (host, port) = p
        .address()
        .and_then(|a| {
            let (h, p) = crate::manifest::probe::host_port(&a)?;
            Some((h.to_string(), p))
        })
        .unwrap_or_default();
    let (host, port) = if host_network {
        (Some(host), port)
    } else {
        match ports.iter().find(|m| m.host_port == port) {
            Some(m) => (None, m.container_port),
            None => {
                notes.add(format!("the probe's port {port} is not in container.ports: taken as the container's port"));
                (None, port)
            }
        }
    };
    match p {
        Probe::Http { url, expect } => {
            if expect.is_some() {
                notes.add("health.expect: an httpGet probe checks the status only, not the body");
            }
            let path = crate::manifest::probe::http_url(url)
                .map(|u| u.path.to_string())
                .unwrap_or_else(|| "/".into());
            Action::HttpGet(HttpGet { path, port, host })
        }
        Probe::Tcp { .. } => Action::TcpSocket(TcpSocket { port, host }),
        Probe::Exec { argv } => {
            notes.add("health.exec: modvisor runs the probe on the host; an exec probe runs inside the container");
            Action::Exec(ExecAction {
                command: argv.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifest;
    use serde::Deserialize;
    use serde_norway::Value;

    fn module(src: &str) -> Module {
        parse_manifest(Path::new("/etc/modvisor/modules.d/x.toml"), src, "x").expect("valid")
    }

    fn export(src: &str) -> String {
        let m = module(src);
        let model = super::super::model_for(&m, None);
        render(
            &m,
            Path::new("/var/lib/modvisor/modules/x"),
            model.as_deref(),
        )
        .expect("exportable")
    }

    /// The YAML documents, parsed back.
    fn docs(text: &str) -> Vec<Value> {
        serde_norway::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).expect("YAML"))
            .collect()
    }

    const BRIDGED: &str = r#"
name = "my_engine"
description = "yes: a description"
trusted = true
[container]
image = "localhost/engine:1"
command = ["-m", "/models/${model_file}", "--port", "8080"]
ports = ["127.0.0.1:18080:8080", "[::1]:18080:8080", "127.0.0.1:9090:9090/udp"]
volumes = ["/srv/models:/models", "/var/cache/x:/cache:rw"]
environment = { THREADS = "8", FLAG = "yes" }
gpus = 2
cap_add = ["SYS_NICE"]
pull = "missing"
[model]
default = "/srv/models/tiny.gguf"
directory = "/srv/models"
[health]
http = "http://127.0.0.1:18080/health"
interval = "1500ms"
timeout = "2s"
start_timeout = "90s"
failures = 4
successes = 2
[resources]
memory_max = "512M"
"#;

    #[test]
    fn a_bridged_module_maps_ports_probes_resources_and_security() {
        let text = export(BRIDGED);
        let d = docs(&text);
        assert_eq!(d.len(), 2);
        let dep = &d[0];
        assert_eq!(dep["kind"], "Deployment");
        assert_eq!(dep["metadata"]["name"], "my-engine");
        assert_eq!(
            dep["metadata"]["labels"]["org.modvisor.module"],
            "my_engine"
        );
        let pod = &dep["spec"]["template"]["spec"];
        assert_eq!(pod["shareProcessNamespace"], true);
        assert!(pod.get("hostNetwork").is_none());
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "localhost/engine:1");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["args"][1], "/models/tiny.gguf");
        assert_eq!(c["env"][0]["name"], "FLAG");
        assert_eq!(c["env"][0]["value"], "yes", "a string, not a YAML boolean");
        assert_eq!(c["env"][1]["value"], "8");
        assert_eq!(c["env"][2]["name"], "MODVISOR_MODULE");
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(c["ports"][0]["hostPort"], 18080);
        assert_eq!(c["ports"][0]["hostIP"], "127.0.0.1");
        assert_eq!(c["ports"][0]["name"], "tcp-8080");
        assert!(c["ports"][1].get("name").is_none(), "port names are unique");
        assert_eq!(c["ports"][2]["protocol"], "UDP");
        assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "2");
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        assert_eq!(sc["capabilities"]["add"][0], "SYS_NICE");
        assert_eq!(c["volumeMounts"][0]["readOnly"], true, "it holds the model");
        assert!(c["volumeMounts"][1].get("readOnly").is_none());
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/srv/models");
        // The probe's host port 18080 is the container's 8080.
        let startup = &c["startupProbe"];
        assert_eq!(startup["httpGet"]["port"], 8080);
        assert!(startup["httpGet"].get("host").is_none());
        assert_eq!(startup["periodSeconds"], 1);
        assert_eq!(startup["failureThreshold"], 90);
        let ready = &c["readinessProbe"];
        assert_eq!(ready["httpGet"]["path"], "/health");
        assert_eq!(ready["periodSeconds"], 2);
        assert_eq!(ready["failureThreshold"], 4);
        assert_eq!(ready["successThreshold"], 2);
        assert_eq!(c["livenessProbe"]["successThreshold"], 1);
        let svc = &d[1];
        assert_eq!(svc["kind"], "Service");
        assert_eq!(svc["spec"]["ports"][0]["port"], 18080);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(svc["spec"]["ports"][1]["name"], "udp-9090");
        assert_eq!(
            svc["spec"]["selector"],
            dep["spec"]["selector"]["matchLabels"]
        );
        assert!(text.contains("core ulimit to 0"), "{text}");
        assert!(
            text.contains("holds the model: mounted read-only"),
            "{text}"
        );
        assert_eq!(text, export(BRIDGED), "deterministic");
    }

    #[test]
    fn host_network_probes_the_address_the_manifest_names() {
        let src = "trusted = true\n[container]\nimage = \"i\"\nnetwork = \"host\"\ngpus = \"all\"\n[health]\ntcp = \"127.0.0.1:7000\"\n";
        let text = export(src);
        let d = docs(&text);
        let pod = &d[0]["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        let c = &pod["containers"][0];
        assert!(c.get("ports").is_none());
        assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], 7000);
        assert_eq!(c["readinessProbe"]["tcpSocket"]["host"], "127.0.0.1");
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert!(text.contains("gpus = \"all\""), "{text}");
        assert_eq!(d[1]["spec"]["ports"][0]["port"], 7000);
    }

    #[test]
    fn without_a_port_there_is_no_service_and_without_a_probe_no_probes() {
        let text = export("[container]\nimage = \"i\"\n");
        let d = docs(&text);
        assert_eq!(d.len(), 1);
        assert!(
            d[0]["spec"]["template"]["spec"]["containers"][0]
                .get("readinessProbe")
                .is_none()
        );
        assert!(text.contains("No Service"), "{text}");
    }

    #[test]
    fn a_native_only_module_cannot_be_exported_and_says_why() {
        let m = module("trusted = true\n[native]\ncommand = [\"/bin/x\"]\n");
        let e = render(&m, Path::new("/s"), None).expect_err("native only");
        assert!(matches!(e, ExportError::NotExportable(_)));
        assert!(e.to_string().contains("runs only natively"), "{e}");
    }

    #[test]
    fn names_and_quantities() {
        assert_eq!(kube_name("llama-chat"), "llama-chat");
        assert_eq!(kube_name("my_engine_"), "my-engine");
        assert_eq!(kube_name("7b"), "m-7b");
        assert_eq!(kube_name(&"a".repeat(63)).len(), 63);
        assert_eq!(quantity(8 << 30), "8Gi");
        assert_eq!(quantity(1536 << 20), "1536Mi");
        assert_eq!(quantity(1000), "1000");
    }
}
