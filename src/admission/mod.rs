//! Memory-aware admission: does a module about to start fit in what the machine has free,
//! and if not, which idle modules to evict so that it does. Pure: figures in, a decision and
//! its arithmetic out; no I/O. The supervisor measures (NVML, /proc/meminfo), calls
//! [`decide`], and carries the decision out (admission in `supervisor/admit.rs`).
//!
//! The rules, stated once:
//! - what a module needs is its footprint: its measured peak per (module, model), else what
//!   its manifest declares (`resources.memory_max`, `resources.vram`), else nothing (it is
//!   admitted and the arithmetic says that nothing is known);
//! - it fits when its RAM need is within `MemAvailable` minus the margin minus what modules
//!   still starting will take (and within `ram_budget` when one is set, where every module
//!   counts with the larger of its use and its footprint), and its VRAM need is
//!   within the free memory of each GPU it will use, minus the margin and the starting ones;
//! - `gpus = "any"`: the GPU with the most free memory that fits, else the one that needs the
//!   fewest evictions;
//! - eviction candidates are running modules that are not pinned, not mid-activation, not
//!   starting or stopping, and without open connections (unless `preempt`); lowest
//!   `priority` first, then least recently used; only as many as the shortfall needs;
//! - when even all candidates would not free enough, the start is refused with a reason that
//!   names what holds the memory: modules (with why they cannot be evicted) and foreign
//!   GPU processes.

pub mod config;
pub mod footprint;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::manifest::units::format_bytes;

pub use config::AdmissionConfig;
pub use footprint::{Footprint, Footprints};

/// Where a module's VRAM footprint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuNeed {
    /// No VRAM footprint (or no GPU to place it on).
    None,
    /// This much on one GPU, which admission picks (`gpus = "any"`).
    Any(u64),
    /// This much on each of these GPUs (an explicit list, or where it was measured).
    On(BTreeMap<u32, u64>),
}

impl GpuNeed {
    /// The VRAM it needs over all its GPUs.
    pub fn total(&self) -> u64 {
        match self {
            GpuNeed::None => 0,
            GpuNeed::Any(v) => *v,
            GpuNeed::On(m) => m.values().sum(),
        }
    }
}

/// Where a footprint figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Measured,
    Declared,
    Unknown,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Measured => "measured",
            Source::Declared => "declared",
            Source::Unknown => "",
        }
    }
}

/// What the module about to start needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub ram: u64,
    pub gpu: GpuNeed,
    pub source: Source,
}

/// Another module that holds (or will take) memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    /// What it uses now (RSS of its processes; VRAM per GPU index).
    pub ram: u64,
    pub vram: BTreeMap<u32, u64>,
    /// Its RAM footprint (measured peak or declared): what it may grow back to, counted in
    /// `ram_budget` even while it uses less.
    pub ram_footprint: u64,
    /// What it will take beyond that (a module still starting: footprint minus usage).
    pub reserved_ram: u64,
    pub reserved_vram: BTreeMap<u32, u64>,
    /// Why it may not be evicted; None: it may.
    pub keep: Option<String>,
    pub priority: i32,
    /// When it was last used (µs since the epoch): the least recently used go first.
    pub last_used: u64,
}

/// A GPU process that belongs to no module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub gpu: u32,
    pub pid: u32,
    pub command: String,
    pub bytes: u64,
}

/// One GPU as measured now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuFree {
    pub index: u32,
    pub total: u64,
    pub used: u64,
}

/// The machine as measured now, and the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub mem_available: u64,
    pub ram_budget: Option<u64>,
    pub gpus: Vec<GpuFree>,
    pub ram_margin: u64,
    pub vram_margin: u64,
}

/// The question: can `name` start now, next to `holders`?
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub name: &'a str,
    pub need: &'a Need,
    pub holders: &'a [Holder],
    pub foreign: &'a [Foreign],
    pub machine: &'a Machine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It fits; on these GPUs (empty: none placed).
    Admit { gpus: Vec<u32> },
    /// It fits once these modules are stopped (in this order).
    Evict {
        gpus: Vec<u32>,
        victims: Vec<String>,
    },
    /// It cannot fit: why, naming what holds the memory.
    Refuse(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The arithmetic, one line per resource (for `explain` and the journal).
    pub arithmetic: String,
}

/// One placement considered: its evictions (or why none suffice) and its free memory.
struct Plan {
    cost: usize,
    free: u64,
    gpus: Vec<u32>,
    shorts: Vec<Short>,
    evict: Result<Vec<String>, String>,
}

impl Plan {
    fn better_than(&self, other: &Plan) -> bool {
        (self.cost, std::cmp::Reverse(self.free)) < (other.cost, std::cmp::Reverse(other.free))
    }
}

/// A shortfall on one resource: the label ("RAM", "GPU 0"), how much is missing, and what is
/// free.
#[derive(Debug, Clone)]
struct Short {
    what: Resource,
    missing: u64,
    free: u64,
    need: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    /// `MemAvailable`: stopping a module frees what it uses now.
    Ram,
    /// `ram_budget`: stopping a module frees what it counts there (use or footprint).
    RamBudget,
    Gpu(u32),
}

impl Resource {
    fn label(self) -> String {
        match self {
            Resource::Ram => "RAM".into(),
            Resource::RamBudget => "ram_budget".into(),
            Resource::Gpu(g) => format!("GPU {g}"),
        }
    }
    /// What stopping `h` frees of this resource.
    fn held_by(self, h: &Holder) -> u64 {
        match self {
            Resource::Ram => h.ram,
            Resource::RamBudget => (h.ram + h.reserved_ram).max(h.ram_footprint),
            Resource::Gpu(g) => h.vram.get(&g).copied().unwrap_or(0),
        }
    }
    /// What `h`, still starting, will take beyond its use.
    fn reserved_by(self, h: &Holder) -> u64 {
        match self {
            Resource::Ram => h.reserved_ram,
            Resource::RamBudget => 0,
            Resource::Gpu(g) => h.reserved_vram.get(&g).copied().unwrap_or(0),
        }
    }
}

/// The one entry point: admit, evict or refuse, with the arithmetic.
pub fn decide(r: &Request<'_>) -> Decision {
    let mut text = String::new();
    let ram = ram_short(r, &mut text);
    let choices: Vec<Vec<u32>> = match &r.need.gpu {
        GpuNeed::None => vec![Vec::new()],
        GpuNeed::On(map) => vec![map.keys().copied().collect()],
        GpuNeed::Any(_) if r.machine.gpus.is_empty() => vec![Vec::new()],
        GpuNeed::Any(_) => r.machine.gpus.iter().map(|g| vec![g.index]).collect(),
    };
    // Each placement: its shortfalls, then the eviction that covers them (if any).
    let mut best: Option<Plan> = None;
    for gpus in choices {
        let mut shorts: Vec<Short> = ram.clone();
        let mut free = 0;
        for &g in &gpus {
            let (short, f) = gpu_short(r, g);
            free += f;
            shorts.extend(short);
        }
        let evict = evict_plan(r, &shorts);
        let cost = evict.as_ref().map_or(usize::MAX, |v| v.len());
        let plan = Plan {
            cost,
            free,
            gpus,
            shorts,
            evict,
        };
        // Fewest evictions first, then the most free memory.
        if best.as_ref().is_none_or(|b| plan.better_than(b)) {
            best = Some(plan);
        }
    }
    let Some(Plan {
        gpus,
        shorts,
        evict: plan,
        ..
    }) = best
    else {
        return Decision {
            verdict: Verdict::Admit { gpus: Vec::new() },
            arithmetic: text,
        };
    };
    gpu_text(r, &gpus, &mut text);
    let verdict = match plan {
        Ok(v) if v.is_empty() => Verdict::Admit { gpus },
        Ok(victims) => {
            let _ = write!(text, "\nevict: {}", victims.join(", "));
            Verdict::Evict { gpus, victims }
        }
        Err(why) => Verdict::Refuse(why_not(r, &shorts, &why)),
    };
    Decision {
        verdict,
        arithmetic: text.trim_start().to_string(),
    }
}

/// RAM: `MemAvailable` minus the margin and what starting modules will take, and within the
/// budget when one is set: a shortfall of each, separately (they are freed differently).
fn ram_short(r: &Request<'_>, text: &mut String) -> Vec<Short> {
    let m = r.machine;
    let need = r.need.ram;
    let reserved: u64 = r.holders.iter().map(|h| h.reserved_ram).sum();
    let mut shorts = Vec::new();
    let free = m
        .mem_available
        .saturating_sub(m.ram_margin)
        .saturating_sub(reserved);
    let _ = write!(
        text,
        "\nRAM: needs {} ({}); MemAvailable {} - margin {} - {} for starting modules = {}",
        format_bytes(need),
        source_text(r.need.source, need),
        format_bytes(m.mem_available),
        format_bytes(m.ram_margin),
        format_bytes(reserved),
        format_bytes(free)
    );
    let short = |what, free: u64| Short {
        what,
        missing: need.saturating_sub(free),
        free,
        need,
    };
    if need > free {
        shorts.push(short(Resource::Ram, free));
    }
    let mut shown = free;
    if let Some(b) = m.ram_budget {
        let used: u64 = r
            .holders
            .iter()
            .map(|h| (h.ram + h.reserved_ram).max(h.ram_footprint))
            .sum();
        let in_budget = b.saturating_sub(used);
        let _ = write!(
            text,
            "; ram_budget {} - {} held by modules = {}",
            format_bytes(b),
            format_bytes(used),
            format_bytes(in_budget)
        );
        if need > in_budget {
            shorts.push(short(Resource::RamBudget, in_budget));
        }
        shown = shown.min(in_budget);
    }
    verdict_text(text, need, shown);
    shorts
}

fn gpu_need(r: &Request<'_>, g: u32) -> u64 {
    match &r.need.gpu {
        GpuNeed::None => 0,
        GpuNeed::Any(n) => *n,
        GpuNeed::On(m) => m.get(&g).copied().unwrap_or(0),
    }
}

/// One GPU: its free memory minus the margin and what starting modules will take there.
fn gpu_short(r: &Request<'_>, g: u32) -> (Option<Short>, u64) {
    let need = gpu_need(r, g);
    let Some(gpu) = r.machine.gpus.iter().find(|x| x.index == g) else {
        // A GPU that NVML does not show: nothing can be checked (the engine will say).
        return (None, 0);
    };
    let reserved: u64 = r
        .holders
        .iter()
        .filter_map(|h| h.reserved_vram.get(&g))
        .sum();
    let free = gpu
        .total
        .saturating_sub(gpu.used)
        .saturating_sub(r.machine.vram_margin)
        .saturating_sub(reserved);
    let short = (need > free).then(|| Short {
        what: Resource::Gpu(g),
        missing: need - free,
        free,
        need,
    });
    (short, free)
}

fn gpu_text(r: &Request<'_>, gpus: &[u32], text: &mut String) {
    for &g in gpus {
        let need = gpu_need(r, g);
        let Some(gpu) = r.machine.gpus.iter().find(|x| x.index == g) else {
            let _ = write!(text, "\nGPU {g}: not found by NVML; not checked");
            continue;
        };
        let reserved: u64 = r
            .holders
            .iter()
            .filter_map(|h| h.reserved_vram.get(&g))
            .sum();
        let (_, free) = gpu_short(r, g);
        let _ = write!(
            text,
            "\nGPU {g}: needs {} ({}); total {} - used {} - margin {} - {} for starting modules = {}",
            format_bytes(need),
            source_text(r.need.source, need),
            format_bytes(gpu.total),
            format_bytes(gpu.used),
            format_bytes(r.machine.vram_margin),
            format_bytes(reserved),
            format_bytes(free)
        );
        verdict_text(text, need, free);
    }
}

fn source_text(s: Source, need: u64) -> &'static str {
    match (s, need) {
        (_, 0) => "no footprint known",
        (Source::Measured, _) => "measured peak",
        (Source::Declared, _) => "declared",
        (Source::Unknown, _) => "unknown",
    }
}

fn verdict_text(text: &mut String, need: u64, free: u64) {
    let _ = match need <= free {
        true => write!(text, ": fits"),
        false => write!(text, ": short {}", format_bytes(need - free)),
    };
}

/// The fewest candidates, in eviction order, whose memory covers every shortfall; or why not.
fn evict_plan(r: &Request<'_>, shorts: &[Short]) -> Result<Vec<String>, String> {
    if shorts.is_empty() {
        return Ok(Vec::new());
    }
    let mut candidates: Vec<&Holder> = r
        .holders
        .iter()
        .filter(|h| h.keep.is_none() && h.name != r.name)
        .collect();
    candidates.sort_by(|a, b| {
        (a.priority, a.last_used, &a.name).cmp(&(b.priority, b.last_used, &b.name))
    });
    let mut missing: Vec<(Resource, u64)> = shorts.iter().map(|s| (s.what, s.missing)).collect();
    let mut victims: Vec<&Holder> = Vec::new();
    for h in candidates {
        if missing.iter().all(|(_, m)| *m == 0) {
            break;
        }
        // Only a module that frees some of what is missing is worth stopping.
        if !missing.iter().any(|(w, m)| *m > 0 && w.held_by(h) > 0) {
            continue;
        }
        for (w, m) in missing.iter_mut() {
            *m = m.saturating_sub(w.held_by(h));
        }
        victims.push(h);
    }
    match missing.iter().find(|(_, m)| *m > 0) {
        None => Ok(prune(shorts, victims)),
        Some((w, m)) => Err(format!(
            "{} more on {} than evicting every idle module would free",
            format_bytes(*m),
            w.label()
        )),
    }
}

/// Only as many as needed: a victim taken early (least recently used) whose memory the later
/// ones cover anyway is spared.
fn prune(shorts: &[Short], mut victims: Vec<&Holder>) -> Vec<String> {
    let covers = |vs: &[&Holder]| {
        shorts
            .iter()
            .all(|s| vs.iter().map(|h| s.what.held_by(h)).sum::<u64>() >= s.missing)
    };
    let mut i = 0;
    while i < victims.len() {
        let mut without = victims.clone();
        without.remove(i);
        if covers(&without) {
            victims = without;
        } else {
            i += 1;
        }
    }
    victims.iter().map(|h| h.name.clone()).collect()
}

/// "needs 9.2 GiB on GPU 0, 3.1 GiB free: llama-big holds 12.0 GiB (pinned), pid 4242
/// python3 (not a module) holds 6.5 GiB"
fn why_not(r: &Request<'_>, shorts: &[Short], detail: &str) -> String {
    let mut parts = Vec::new();
    for s in shorts {
        let mut holders: Vec<String> = r
            .holders
            .iter()
            .filter(|h| s.what.held_by(h) > 0 || s.what.reserved_by(h) > 0)
            .map(|h| {
                let (held, more) = (s.what.held_by(h), s.what.reserved_by(h));
                let what = match (held, more) {
                    (0, m) => format!("will take {}", format_bytes(m)),
                    (h, 0) => format!("holds {}", format_bytes(h)),
                    (h, m) => format!(
                        "holds {} and will take {} more",
                        format_bytes(h),
                        format_bytes(m)
                    ),
                };
                match &h.keep {
                    Some(k) => format!("{} {what} ({k})", h.name),
                    None => format!("{} {what}", h.name),
                }
            })
            .collect();
        if let Resource::Gpu(g) = s.what {
            holders.extend(r.foreign.iter().filter(|f| f.gpu == g).map(|f| {
                format!(
                    "pid {} {} (not a module) holds {}",
                    f.pid,
                    f.command,
                    format_bytes(f.bytes)
                )
            }));
        }
        let on = match s.what {
            Resource::Ram => "of RAM".to_string(),
            Resource::RamBudget => "of RAM in ram_budget".to_string(),
            w => format!("on {}", w.label()),
        };
        let who = match holders.is_empty() {
            true => "nothing modvisor can stop holds it".to_string(),
            false => holders.join(", "),
        };
        parts.push(format!(
            "needs {} {on}, {} free: {who}",
            format_bytes(s.need),
            format_bytes(s.free)
        ));
    }
    format!(
        "not enough memory to start {}: {} ({detail})",
        r.name,
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests;
