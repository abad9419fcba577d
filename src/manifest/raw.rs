//! The manifest exactly as written: strict (`deny_unknown_fields`) serde types with spans, so
//! that validation can point at the line and column of a bad value. Nothing outside
//! `manifest` sees these types; they become a [`super::Module`] in `validate`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub trusted: Option<bool>,
    pub runtime: Option<Spanned<RawRuntime>>,
    pub native: Option<Spanned<RawNative>>,
    pub container: Option<Spanned<RawContainer>>,
    pub model: Option<Spanned<RawModel>>,
    pub health: Option<Spanned<RawHealth>>,
    pub resources: Option<RawResources>,
    pub restart: Option<RawRestart>,
    pub serve: Option<Spanned<RawServe>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServe {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub upstream: Option<Spanned<String>>,
    pub on_demand: Option<bool>,
    pub idle_stop: Option<Spanned<String>>,
    pub max_pending: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawMode {
    Native,
    Container,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub modes: Option<Spanned<Vec<Spanned<RawMode>>>>,
    pub preferred: Option<Spanned<RawMode>>,
    pub stop_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNative {
    pub command: Option<Spanned<Vec<String>>>,
    pub environment: Option<Spanned<BTreeMap<String, String>>>,
    pub working_directory: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub environment_file: Option<Spanned<String>>,
    pub credentials: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub sandbox: Option<Spanned<RawSandbox>>,
    pub gpu: Option<Spanned<bool>>,
    pub gpus: Option<Spanned<RawGpus>>,
    pub unit: Option<Spanned<String>>,
}

/// `[native] sandbox = { protect_home = false, ... }`: each key relaxes one setting of the
/// transient unit's sandbox (an unknown name is an error at its position).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    pub no_new_privileges: Option<bool>,
    pub protect_system: Option<bool>,
    pub protect_home: Option<bool>,
    pub private_tmp: Option<bool>,
    pub private_devices: Option<bool>,
    pub restrict_suid_sgid: Option<bool>,
    pub lock_personality: Option<bool>,
    pub protect_kernel_modules: Option<bool>,
    pub protect_kernel_tunables: Option<bool>,
    pub protect_kernel_logs: Option<bool>,
    pub protect_control_groups: Option<bool>,
    pub drop_capabilities: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawGpus {
    Word(String),
    Count(i64),
    List(Vec<RawGpuId>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawGpuId {
    Index(i64),
    Uuid(String),
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RawPull {
    Never,
    Missing,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawContainer {
    pub image: Option<Spanned<String>>,
    pub command: Option<Vec<String>>,
    pub ports: Option<Vec<Spanned<String>>>,
    pub volumes: Option<Vec<Spanned<String>>>,
    pub environment: Option<Spanned<BTreeMap<String, String>>>,
    pub environment_file: Option<Spanned<String>>,
    pub gpus: Option<Spanned<RawGpus>>,
    pub pull: Option<RawPull>,
    pub network: Option<Spanned<String>>,
    pub cap_add: Option<Vec<Spanned<String>>>,
    pub pids_limit: Option<Spanned<i64>>,
    pub user: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub default: Option<Spanned<String>>,
    pub directory: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub http: Option<Spanned<String>>,
    pub tcp: Option<Spanned<String>>,
    pub exec: Option<Spanned<Vec<String>>>,
    pub expect: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub start_timeout: Option<Spanned<String>>,
    pub start_limit: Option<Spanned<String>>,
    pub failures: Option<Spanned<i64>>,
    pub successes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub priority: Option<Spanned<i64>>,
    pub pinned: Option<bool>,
    pub memory_max: Option<Spanned<String>>,
    pub vram: Option<Spanned<String>>,
    pub ram_warn_percent: Option<Spanned<i64>>,
    pub vram_warn_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RawRestartPolicy {
    No,
    OnFailure,
    Always,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRestart {
    pub policy: Option<RawRestartPolicy>,
    pub delay: Option<Spanned<String>>,
    pub max_delay: Option<Spanned<String>>,
    pub max: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
}
