//! Rendering the published [`Snapshot`] as Prometheus/OpenMetrics text with
//! `prometheus-client`: one [`Collector`] per scrape that reads the snapshot it is given and
//! nothing else (no locks, no supervisor), so a scrape never waits for the actor.
//!
//! Labels are bounded: a module's name, a GPU's index, and the names of states, health values
//! and activation results. Reasons, PIDs, models and paths never become labels.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::process::SelfStats;
use crate::state::{Health, ModuleStatus, PROBE_BUCKETS, Snapshot, State};

/// The two text formats; Prometheus asks for OpenMetrics, curl and promtool get the classic one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// From a request's `Accept` header: OpenMetrics when the client lists it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Renders one scrape. Fails only if a metric could not be encoded (a bug, not an input).
pub fn render(
    snapshot: Arc<Snapshot>,
    me: SelfStats,
    format: Format,
) -> Result<String, fmt::Error> {
    let size = 512 + snapshot.modules.len() * 3072;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { snapshot, me }));
    let mut out = String::with_capacity(size);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
        }
    }
    Ok(out)
}

const STATES: [State; 5] = [
    State::Inactive,
    State::Starting,
    State::Running,
    State::Stopping,
    State::Failed,
];
const HEALTHS: [Health; 5] = [
    Health::Online,
    Health::Degraded,
    Health::Offline,
    Health::Unknown,
    Health::Standby,
];

/// Fails to compile when a state or health is added without being listed above.
#[allow(dead_code)]
fn listed(s: State, h: Health) {
    match s {
        State::Inactive | State::Starting | State::Running | State::Stopping | State::Failed => {}
    }
    match h {
        Health::Online | Health::Standby | Health::Degraded | Health::Offline | Health::Unknown => {
        }
    }
}

#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Arc<Snapshot>,
    me: SelfStats,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = &self.snapshot;
        module_enums(&mut enc, s)?;
        module_figures(&mut enc, s)?;
        module_probes(&mut enc, s)?;
        module_activations(&mut enc, s)?;
        module_serve(&mut enc, s)?;
        host(&mut enc, s, self.me)
    }
}

type Modules<'a> = std::collections::btree_map::Iter<'a, String, std::sync::Arc<ModuleStatus>>;

/// One gauge per module.
fn gauges<'a, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl Iterator<Item = (&'a str, V)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    for (module, v) in rows {
        m.encode_family(&[("module", module)])?.encode_gauge(&v)?;
    }
    Ok(())
}

/// One counter per module.
fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (module, v) in rows {
        m.encode_family(&[("module", module)])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

/// State and health as enum-style gauges: a series per value, 1 for the current one.
fn module_enums(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "modvisor_module_state",
        "The module's lifecycle state: 1 for the current state, 0 for the others",
        None,
        MetricType::Gauge,
    )?;
    for (name, st) in s.modules.iter() {
        for v in STATES {
            m.encode_family(&[("module", name.as_str()), ("state", v.as_str())])?
                .encode_gauge(&i64::from(st.state == v))?;
        }
    }
    let mut m = enc.encode_descriptor(
        "modvisor_module_health",
        "The module's health: 1 for the current value, 0 for the others",
        None,
        MetricType::Gauge,
    )?;
    for (name, st) in s.modules.iter() {
        for v in HEALTHS {
            m.encode_family(&[("module", name.as_str()), ("state", v.as_str())])?
                .encode_gauge(&i64::from(st.health == v))?;
        }
    }
    Ok(())
}

fn each<'a, V>(
    mods: Modules<'a>,
    f: impl Fn(&'a ModuleStatus) -> V + 'a,
) -> impl Iterator<Item = (&'a str, V)> + 'a {
    mods.map(move |(n, m)| (n.as_str(), f(m)))
}

fn module_figures(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mods = || s.modules.iter();
    counters(
        enc,
        "modvisor_module_restarts",
        "Automatic restarts of the module's current run (the Restarts property; starts again at 0 after a manual start)",
        each(mods(), |m| u64::from(m.restarts)),
    )?;
    gauges(
        enc,
        "modvisor_module_memory",
        "Resident memory of the module's processes",
        Some(Unit::Bytes),
        each(mods(), |m| m.memory_bytes),
    )?;
    gauges(
        enc,
        "modvisor_module_memory_max",
        "The module's memory limit (memory_max); modules without one are not listed",
        Some(Unit::Bytes),
        mods()
            .filter(|(_, m)| m.memory_max_bytes > 0)
            .map(|(n, m)| (n.as_str(), m.memory_max_bytes)),
    )?;
    let mut m = enc.encode_descriptor(
        "modvisor_module_vram",
        "GPU memory used by the module's processes, per GPU it uses",
        Some(&Unit::Bytes),
        MetricType::Gauge,
    )?;
    for (name, st) in mods() {
        for (gpu, bytes) in &st.vram_by_gpu {
            let gpu = gpu.to_string();
            m.encode_family(&[("module", name.as_str()), ("gpu", gpu.as_str())])?
                .encode_gauge(bytes)?;
        }
    }
    gauges(
        enc,
        "modvisor_module_last_start_duration",
        "Seconds from the module's last start to online (0 before the first)",
        Some(Unit::Seconds),
        each(mods(), |m| m.counters.last_start_seconds),
    )
}

fn module_probes(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "modvisor_module_probe_duration",
        "Duration of the module's health probes",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    for (name, st) in s.modules.iter() {
        let c = &st.counters;
        // Per-bucket counts (the encoder makes them cumulative), +Inf last.
        let mut buckets = [(f64::INFINITY, 0u64); PROBE_BUCKETS.len() + 1];
        for (i, b) in buckets.iter_mut().enumerate() {
            *b = (
                PROBE_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                c.probe_buckets[i],
            );
        }
        m.encode_family(&[("module", name.as_str())])?
            .encode_histogram::<NoLabelSet>(c.probe_seconds_sum, c.probe_count, &buckets, None)?;
    }
    counters(
        enc,
        "modvisor_module_probe_failures",
        "Health probes of the module that failed",
        each(s.modules.iter(), |m| m.counters.probe_failures),
    )
}

fn module_activations(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mut m = enc.encode_descriptor(
        "modvisor_module_activations",
        "Model activations by result: online, rolled_back (failed, back on the previous model), failed",
        None,
        MetricType::Counter,
    )?;
    for (name, st) in s.modules.iter() {
        let c = &st.counters;
        for (result, v) in [
            ("online", c.activations_online),
            ("rolled_back", c.activations_rolled_back),
            ("failed", c.activations_failed),
        ] {
            m.encode_family(&[("module", name.as_str()), ("result", result)])?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
    }
    Ok(())
}

/// `[serve]`: open connections through modvisord's listen addresses, starts on demand, stops
/// after `idle_stop`, and evictions (stopped to make room for another module). Every module is
/// listed (0 without `[serve]`), so a series never appears out of nowhere.
fn module_serve(enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mods = || s.modules.iter();
    gauges(
        enc,
        "modvisor_module_connections",
        "Client connections open through the module's listen addresses (held or forwarded)",
        None,
        each(mods(), |m| i64::from(m.connections)),
    )?;
    counters(
        enc,
        "modvisor_module_on_demand_starts",
        "Starts of the module asked for by a connection to its listen address",
        each(mods(), |m| m.counters.on_demand_starts),
    )?;
    counters(
        enc,
        "modvisor_module_idle_stops",
        "Stops of the module after idle_stop without a connection",
        each(mods(), |m| m.counters.idle_stops),
    )?;
    counters(
        enc,
        "modvisor_module_evictions",
        "Stops of the idle module to make room for another module's start (admission)",
        each(mods(), |m| m.counters.evictions),
    )
}

/// GPUs, manifest errors and the daemon itself.
fn host(enc: &mut DescriptorEncoder, s: &Snapshot, me: SelfStats) -> fmt::Result {
    for (name, help, pick) in [
        (
            "modvisor_gpu_memory_total",
            "Memory of the GPU",
            (|g| g.3) as fn(&(u32, String, String, u64, u64)) -> u64,
        ),
        (
            "modvisor_gpu_memory_used",
            "Memory in use on the GPU, by anyone",
            |g| g.4,
        ),
    ] {
        let mut m = enc.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?;
        for g in &s.gpus {
            m.encode_family(&[("gpu", g.0.to_string())])?
                .encode_gauge(&pick(g))?;
        }
    }
    let foreign: u64 = s.foreign_gpu_processes.iter().map(|p| p.2).sum();
    let one = |enc: &mut DescriptorEncoder, name, help, unit: Option<Unit>, v: u64| {
        enc.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?
            .encode_gauge(&v)
    };
    one(
        enc,
        "modvisor_gpu_foreign_memory",
        "GPU memory held by processes of no module (all GPUs)",
        Some(Unit::Bytes),
        foreign,
    )?;
    one(
        enc,
        "modvisor_gpu_foreign_processes",
        "GPU processes that belong to no module",
        None,
        s.foreign_gpu_processes.len() as u64,
    )?;
    one(
        enc,
        "modvisor_manifest_errors",
        "Manifests that are broken or refused now",
        None,
        s.manifest_errors.len() as u64,
    )?;
    one(
        enc,
        "process_resident_memory",
        "Resident memory of modvisord",
        Some(Unit::Bytes),
        me.resident_bytes,
    )?;
    enc.encode_descriptor(
        "process_cpu",
        "CPU time (user and system) of modvisord",
        Some(&Unit::Seconds),
        MetricType::Counter,
    )?
    .encode_counter::<NoLabelSet, _, f64>(&me.cpu_seconds, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, state: State, health: Health) -> ModuleStatus {
        ModuleStatus {
            description: String::new(),
            mode_reason: "preferred".into(),
            state,
            health,
            health_reason: "GET http://127.0.0.1:1/health: HTTP 503 \"quoted\"".into(),
            main_pid: 4242,
            vram_bytes: 3 << 20,
            vram_by_gpu: vec![(0, 3 << 20)],
            restarts: 2,
            active_model: "/srv/models/tiny.gguf".into(),
            since_us: 0,
            manifest_path: "/etc/modvisor/modules.d/x.toml".into(),
            ..ModuleStatus::example(name)
        }
    }

    fn snapshot() -> Arc<Snapshot> {
        let mut a = module("a", State::Running, Health::Degraded);
        a.memory_max_bytes = 8 << 20;
        for (s, ok) in [(0.0005, true), (0.003, true), (0.2, false), (9.0, false)] {
            a.counters.observe_probe(s, ok);
        }
        a.counters.activations_rolled_back = 1;
        let mut b = module("b", State::Failed, Health::Offline);
        b.connections = 3;
        b.counters.on_demand_starts = 4;
        b.counters.idle_stops = 2;
        b.counters.evictions = 1;
        let c = module("c", State::Inactive, Health::Standby);
        let mut s = Snapshot::default();
        s.modules.insert("a".into(), a.into());
        s.modules.insert("b".into(), b.into());
        s.modules.insert("c".into(), c.into());
        s.gpus = vec![(0, "Tesla".into(), "GPU-1".into(), 16 << 30, 5 << 30)];
        s.foreign_gpu_processes = vec![(77, "python".into(), 1 << 30), (78, "x".into(), 1)];
        s.manifest_errors = vec![("f.toml".into(), "f.toml:1:1: bad".into())];
        Arc::new(s)
    }

    fn text(format: Format) -> String {
        let me = SelfStats {
            resident_bytes: 123,
            cpu_seconds: 1.5,
        };
        render(snapshot(), me, format).expect("render")
    }

    #[test]
    fn state_and_health_are_enum_gauges() {
        let t = text(Format::Prometheus);
        for line in [
            r#"modvisor_module_state{module="a",state="running"} 1"#,
            r#"modvisor_module_state{module="a",state="inactive"} 0"#,
            r#"modvisor_module_state{module="b",state="failed"} 1"#,
            r#"modvisor_module_health{module="a",state="degraded"} 1"#,
            r#"modvisor_module_health{module="a",state="online"} 0"#,
            r#"modvisor_module_health{module="b",state="offline"} 1"#,
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in\n{t}");
        }
        let ones = t
            .lines()
            .filter(|l| l.starts_with("modvisor_module_state{module=\"a\"") && l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1);
    }

    #[test]
    fn per_bucket_counts_become_a_cumulative_histogram() {
        let t = text(Format::Prometheus);
        for line in [
            r#"modvisor_module_probe_duration_seconds_bucket{module="a",le="0.001"} 1"#,
            r#"modvisor_module_probe_duration_seconds_bucket{module="a",le="0.005"} 2"#,
            r#"modvisor_module_probe_duration_seconds_bucket{module="a",le="0.25"} 3"#,
            r#"modvisor_module_probe_duration_seconds_bucket{module="a",le="5"} 3"#,
            r#"modvisor_module_probe_duration_seconds_bucket{module="a",le="+Inf"} 4"#,
            r#"modvisor_module_probe_duration_seconds_count{module="a"} 4"#,
            r#"modvisor_module_probe_failures_total{module="a"} 2"#,
            r#"modvisor_module_activations_total{module="a",result="rolled_back"} 1"#,
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in\n{t}");
        }
    }

    #[test]
    fn figures_gpus_and_the_daemon() {
        let t = text(Format::Prometheus);
        for line in [
            r#"modvisor_module_restarts_total{module="a"} 2"#,
            r#"modvisor_module_memory_bytes{module="a"} 1048576"#,
            r#"modvisor_module_memory_max_bytes{module="a"} 8388608"#,
            r#"modvisor_module_vram_bytes{module="b",gpu="0"} 3145728"#,
            r#"modvisor_gpu_memory_total_bytes{gpu="0"} 17179869184"#,
            r#"modvisor_gpu_memory_used_bytes{gpu="0"} 5368709120"#,
            "modvisor_gpu_foreign_memory_bytes 1073741825",
            "modvisor_gpu_foreign_processes 2",
            "modvisor_manifest_errors 1",
            "process_resident_memory_bytes 123",
            "process_cpu_seconds_total 1.5",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in\n{t}");
        }
        assert!(!t.contains(r#"modvisor_module_memory_max_bytes{module="b"}"#));
    }

    #[test]
    fn connections_on_demand_starts_idle_stops_and_evictions_per_module() {
        let t = text(Format::Prometheus);
        for line in [
            "# TYPE modvisor_module_connections gauge",
            r#"modvisor_module_connections{module="a"} 0"#,
            r#"modvisor_module_connections{module="b"} 3"#,
            "# TYPE modvisor_module_on_demand_starts_total counter",
            r#"modvisor_module_on_demand_starts_total{module="b"} 4"#,
            r#"modvisor_module_on_demand_starts_total{module="a"} 0"#,
            r#"modvisor_module_idle_stops_total{module="b"} 2"#,
            r#"modvisor_module_evictions_total{module="b"} 1"#,
            r#"modvisor_module_health{module="c",state="standby"} 1"#,
            r#"modvisor_module_health{module="c",state="offline"} 0"#,
            r#"modvisor_module_state{module="c",state="inactive"} 1"#,
        ] {
            assert!(t.lines().any(|l| l == line), "{line} in\n{t}");
        }
        // Labels: the module only.
        for l in t.lines().filter(|l| {
            l.starts_with("modvisor_module_connections")
                || l.starts_with("modvisor_module_on_demand")
                || l.starts_with("modvisor_module_idle_stops")
                || l.starts_with("modvisor_module_evictions")
        }) {
            let labels = &l[l.find('{').expect("labels")..l.find('}').expect("labels")];
            assert_eq!(labels.matches('=').count(), 1, "{l}");
        }
        let om = text(Format::OpenMetrics);
        assert!(
            om.contains(r#"modvisor_module_idle_stops_total{module="b"} 2"#),
            "{om}"
        );
    }

    #[test]
    fn no_reasons_pids_models_or_paths_in_labels() {
        let t = text(Format::OpenMetrics);
        for never in [
            "4242",
            "HTTP 503",
            "tiny.gguf",
            "x.toml",
            "python",
            "Tesla",
            "GPU-1",
        ] {
            assert!(!t.contains(never), "{never} leaked into\n{t}");
        }
    }

    #[test]
    fn openmetrics_ends_with_eof_and_output_is_deterministic() {
        let t = text(Format::OpenMetrics);
        assert!(t.ends_with("# EOF\n"), "{t}");
        assert!(t.contains("# UNIT modvisor_module_memory_bytes bytes"));
        assert_eq!(t, text(Format::OpenMetrics));
        assert_eq!(text(Format::Prometheus), text(Format::Prometheus));
    }

    #[test]
    fn accept_header_picks_the_format() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
