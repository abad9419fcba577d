//! The subset of the Kubernetes API the export writes, as serde types. Field order here is
//! the order in the YAML; empty lists and unset options are left out.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub metadata: Meta,
    pub spec: S,
}

#[derive(Serialize)]
pub struct Meta {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    pub replicas: u32,
    pub strategy: Strategy,
    pub selector: Selector,
    pub template: Template,
}

#[derive(Serialize)]
pub struct Strategy {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
pub struct Template {
    pub metadata: TemplateMeta,
    pub spec: PodSpec,
}

#[derive(Serialize)]
pub struct TemplateMeta {
    pub labels: BTreeMap<String, String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(skip_serializing_if = "is_false")]
    pub host_network: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_policy: Option<&'static str>,
    pub share_process_namespace: bool,
    pub termination_grace_period_seconds: u64,
    pub containers: Vec<Container>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<PodVolume>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    pub image_pull_policy: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    pub security_context: SecurityContext,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<KubeProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<KubeProbe>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<KubeProbe>,
}

#[derive(Serialize)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    pub host_port: u16,
    #[serde(rename = "hostIP")]
    pub host_ip: String,
    pub protocol: String,
}

#[derive(Serialize)]
pub struct Resources {
    pub limits: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    #[serde(skip_serializing_if = "is_false")]
    pub read_only: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodVolume {
    pub name: String,
    pub host_path: HostPath,
}

#[derive(Serialize)]
pub struct HostPath {
    pub path: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub allow_privilege_escalation: bool,
    pub privileged: bool,
    pub capabilities: Capabilities,
}

#[derive(Serialize)]
pub struct Capabilities {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    pub drop: Vec<String>,
}

#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
pub struct KubeProbe {
    #[serde(flatten)]
    pub action: Action,
    pub period_seconds: u64,
    pub timeout_seconds: u64,
    pub failure_threshold: u64,
    pub success_threshold: u32,
}

#[derive(Serialize, Clone)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    HttpGet(HttpGet),
    TcpSocket(TcpSocket),
    Exec(ExecAction),
}

#[derive(Serialize, Clone)]
pub struct HttpGet {
    pub path: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Serialize, Clone)]
pub struct TcpSocket {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Serialize, Clone)]
pub struct ExecAction {
    pub command: Vec<String>,
}

#[derive(Serialize)]
pub struct ServiceSpec {
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub protocol: String,
}
