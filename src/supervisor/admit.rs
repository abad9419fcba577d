//! Admission in the actor: before every start, what is free is measured off the actor, the
//! pure decision (`admission::decide`) runs here, and the actor starts the module, evicts
//! idle ones and waits for their memory to show as free, or fails the start with the reason.
//! Footprints are learned from samples while a module is online and written off the actor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::ManagerSignal;
use super::admission_slot::{Live, Pending};
use super::module::Input;
use super::table::{Event, Slot, Supervisor};
use crate::admission::{
    self, Decision, Footprint, Footprints, Foreign, GpuFree, GpuNeed, Holder, Machine, Need,
    Request, Source, Verdict,
};
use crate::manifest::units::format_bytes;
use crate::manifest::{Gpus, Mode, Module, NativeExec};
use crate::state::State;

/// Journal MESSAGE_ID of admission decisions that evict or refuse.
pub const MSG_ADMISSION: &str = "6a7b8c9d0e1f42a3b4c5d6e7f8091a2b";

/// What must be free before a start that evicted proceeds: MemAvailable, and free bytes per GPU.
#[derive(Debug, Clone)]
/// A module's footprints to record in its state directory.
pub(super) struct FootprintWrite {
    name: String,
    dir: PathBuf,
    footprints: Footprints,
}

struct Want {
    ram: u64,
    gpu_free: Vec<(u32, u64)>,
}

impl Want {
    fn met(&self, live: &Live) -> bool {
        live.mem_available >= self.ram
            && self.gpu_free.iter().all(|(g, want)| {
                live.gpus
                    .iter()
                    .find(|x| x.index == *g)
                    .is_none_or(|x| x.total.saturating_sub(x.used) >= *want)
            })
    }
}

fn us(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Where a module's VRAM goes, from its manifest for `mode`.
fn placement(m: &Module, mode: Mode) -> Option<&Gpus> {
    match mode {
        Mode::Native => match &m.native {
            Some(NativeExec::Command { privileges, .. }) => privileges.gpus.as_ref(),
            _ => None,
        },
        Mode::Container => m.container.as_ref().and_then(|c| c.gpus.as_ref()),
    }
}

/// What a module needs to start on `model`: the measured footprint, else the declared one.
pub(super) fn need(m: &Module, mode: Mode, fp: Option<&Footprint>, gpus: &[(u32, String)]) -> Need {
    let r = &m.resources;
    let (ram, vram, by_gpu, source) = match fp {
        Some(f) => (
            f.ram_peak,
            f.vram_total(),
            f.vram_peak.clone(),
            Source::Measured,
        ),
        None if r.memory_max.is_some() || r.vram.is_some() => (
            r.memory_max.unwrap_or(0),
            r.vram.unwrap_or(0),
            BTreeMap::new(),
            Source::Declared,
        ),
        None => (0, 0, BTreeMap::new(), Source::Unknown),
    };
    let index_of = |id: &str| -> Option<u32> {
        id.parse::<u32>()
            .ok()
            .or_else(|| gpus.iter().find(|(_, u)| u == id).map(|(i, _)| *i))
    };
    let spread = |list: Vec<u32>| -> GpuNeed {
        let k = list.len().max(1) as u64;
        GpuNeed::On(
            list.into_iter()
                .map(|g| (g, by_gpu.get(&g).copied().unwrap_or(vram / k)))
                .collect(),
        )
    };
    let gpu = match (placement(m, mode), vram) {
        (_, 0) => GpuNeed::None,
        (Some(Gpus::Any), v) => GpuNeed::Any(v),
        (Some(Gpus::Ids(ids)), _) => spread(ids.iter().filter_map(|i| index_of(i)).collect()),
        (Some(Gpus::Count(n)), _) => spread((0..*n).collect()),
        (Some(Gpus::All), _) => spread(gpus.iter().map(|(i, _)| *i).collect()),
        (None, _) if !by_gpu.is_empty() => GpuNeed::On(by_gpu.clone()),
        (None, v) => GpuNeed::On(BTreeMap::from([(0, v)])),
    };
    Need { ram, gpu, source }
}

/// What the module of `s` needs to start on `model` (its decided mode's placement).
fn slot_need(s: &Slot, model: Option<&Path>, gpus: &[(u32, String)]) -> Need {
    let mode = s.decision.mode.unwrap_or(Mode::Native);
    need(s.lc.module(), mode, s.adm.footprints.get(model), gpus)
}

/// `"any"` placed: the need on the GPU the decision chose.
fn pin_any(need: &mut Need, gpus: &[u32]) {
    if let (GpuNeed::Any(v), Some(g)) = (&need.gpu, gpus.first()) {
        need.gpu = GpuNeed::On(BTreeMap::from([(*g, *v)]));
    }
}

impl Supervisor {
    /// (index, uuid) of the GPUs of the last sample: `gpus = ["GPU-..."]` names them by UUID.
    fn gpu_uuids(&self) -> Vec<(u32, String)> {
        self.gpus.iter().map(|g| (g.0, g.2.clone())).collect()
    }

    /// `Effect::Start`: admission first. A run left by an earlier modvisord is adopted as it
    /// is (it holds its memory already); with admission off every start goes ahead.
    pub(super) fn admit(&mut self, n: &str, generation: u64, model: Option<PathBuf>) {
        let Some(s) = self.slots.get(n) else { return };
        if !self.cfg.admission.enabled || !s.found.is_empty() {
            return self.start(n, generation, model, Vec::new());
        }
        // Without GPUs, what is free is one read of /proc/meminfo, which the kernel makes up
        // from its counters (no disk, no waiting): read here, where a round through the
        // blocking pool and back cost two thread wake-ups before every start.
        if self.gpu.is_none() {
            let (mem_available, _) = crate::monitor::free_memory(None);
            let live = Live {
                mem_available,
                gpus: Vec::new(),
            };
            return self.measured(n, generation, model, live, 0);
        }
        self.measure(n, generation, model, None, Duration::ZERO);
    }

    /// Measures what is free off the actor (polling until `want` is met, within `wait`),
    /// then comes back as [`Event::Measured`].
    fn measure(
        &mut self,
        n: &str,
        generation: u64,
        model: Option<PathBuf>,
        want: Option<Want>,
        wait: Duration,
    ) {
        let gpu = self.gpu.clone();
        let tx = self.events.clone();
        let name = n.to_string();
        let round = u8::from(want.is_some());
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + wait;
            let live = loop {
                let g = gpu.clone();
                let (mem_available, rows) =
                    tokio::task::spawn_blocking(move || crate::monitor::free_memory(g.as_deref()))
                        .await
                        .unwrap_or_default();
                let gpus = rows
                    .into_iter()
                    .map(|(index, total, used)| GpuFree { index, total, used })
                    .collect();
                let live = Live {
                    mem_available,
                    gpus,
                };
                let done = want.as_ref().is_none_or(|w| w.met(&live));
                if done || tokio::time::Instant::now() >= deadline {
                    break live;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let _ = tx.send(Event::Measured {
                name,
                generation,
                model,
                live: Box::new(live),
                round,
            });
        });
        if let Some(s) = self.slots.get_mut(n) {
            s.own(task.abort_handle());
        }
    }

    /// The figures are in: decide, then start, evict or refuse.
    pub(super) fn measured(
        &mut self,
        n: &str,
        generation: u64,
        model: Option<PathBuf>,
        live: Live,
        round: u8,
    ) {
        let Some(s) = self.slots.get(n) else { return };
        if s.lc.running() != Some(generation) {
            self.pending.remove(n);
            return;
        }
        if s.lc.state() == State::Stopping {
            self.pending.remove(n);
            let why = "stopped while waiting for admission".to_string();
            return self.feed(n, Input::StartFailed { generation, why });
        }
        let (need, d) = self.decide_admission(n, model.as_deref(), &live);
        if let Some(s) = self.slots.get_mut(n) {
            s.adm.arithmetic = match round {
                0 => d.arithmetic.clone(),
                _ => format!(
                    "{}\nafter the eviction:\n{}",
                    s.adm.arithmetic, d.arithmetic
                ),
            };
        }
        match d.verdict.clone() {
            Verdict::Admit { gpus } => {
                self.pending.remove(n);
                if round > 0 {
                    tracing::info!(
                        modvisor_module = n,
                        message_id = MSG_ADMISSION,
                        "{n} admitted after eviction: {}",
                        d.arithmetic.replace('\n', "; ")
                    );
                }
                // Its share while it starts, on the GPU chosen for "any".
                let mut need = need;
                pin_any(&mut need, &gpus);
                if let Some(s) = self.slots.get_mut(n) {
                    s.adm.admitted = Some(need);
                }
                self.start(n, generation, model, gpus);
            }
            Verdict::Evict { victims, gpus } if round == 0 => {
                self.evict(n, generation, (model, gpus), victims, &d);
            }
            Verdict::Evict { victims, .. } => {
                let why = format!(
                    "not enough memory to start {n}: the memory of evicted modules was not released within {:?}, and it would take evicting {} too ({})",
                    self.cfg.admission.release_timeout,
                    victims.join(", "),
                    d.arithmetic.replace('\n', "; ")
                );
                self.refuse(n, generation, why);
            }
            Verdict::Refuse(why) => self.refuse(n, generation, why),
        }
    }

    fn refuse(&mut self, n: &str, generation: u64, why: String) {
        self.pending.remove(n);
        tracing::warn!(modvisor_module = n, message_id = MSG_ADMISSION, "{why}");
        self.feed(n, Input::StartFailed { generation, why });
    }

    /// Stops the victims (each an eviction: journal, signal), then waits for them.
    fn evict(
        &mut self,
        n: &str,
        generation: u64,
        (model, gpus): (Option<PathBuf>, Vec<u32>),
        victims: Vec<String>,
        d: &Decision,
    ) {
        let why = d.arithmetic.replace('\n', "; ");
        tracing::info!(
            modvisor_module = n,
            message_id = MSG_ADMISSION,
            "{n} needs memory: evicting {} ({why})",
            victims.join(", ")
        );
        for v in &victims {
            let reason = format!("{n} needs the memory: {why}");
            self.feed(
                v,
                Input::Evict {
                    by: n.to_string(),
                    why: reason.clone(),
                },
            );
            let _ = self.signals.send(ManagerSignal::Evicted {
                name: v.clone(),
                by: n.to_string(),
                reason,
            });
        }
        let waiting = format!("waiting for memory: evicting {}", victims.join(", "));
        self.feed(
            n,
            Input::Waiting {
                generation,
                why: waiting,
            },
        );
        self.pending.insert(
            n.to_string(),
            Pending {
                generation,
                model,
                victims,
                gpus,
                polling: false,
            },
        );
        // Victims that do not stop in time: decide again anyway (and refuse if still short).
        let wait = self.cfg.admission.release_timeout
            + self
                .slots
                .values()
                .map(|s| s.lc.module().stop_timeout)
                .max()
                .unwrap_or_default();
        let (tx, name) = (self.events.clone(), n.to_string());
        let task = tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = tx.send(Event::PendingDue { name, generation });
        });
        if let Some(s) = self.slots.get_mut(n) {
            s.own(task.abort_handle());
        }
    }

    /// After every input: pending starts whose victims are all down poll for the memory.
    pub(super) fn check_pending(&mut self, overdue: Option<(&str, u64)>) {
        let ready: Vec<String> = self
            .pending
            .iter()
            .filter(|(name, p)| {
                let due = overdue.is_some_and(|(o, g)| o == name.as_str() && g == p.generation);
                !p.polling
                    && (due
                        || p.victims
                            .iter()
                            .all(|v| self.slots.get(v).is_none_or(|s| s.lc.is_down())))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in ready {
            let Some(p) = self.pending.get_mut(&name) else {
                continue;
            };
            p.polling = true;
            let (g, model, gpus) = (p.generation, p.model.clone(), p.gpus.clone());
            let want = self.want(&name, model.as_deref(), &gpus);
            let wait = self.cfg.admission.release_timeout;
            self.measure(&name, g, model, Some(want), wait);
        }
    }

    /// What must show as free for the start to fit (the live part of the arithmetic).
    fn want(&self, n: &str, model: Option<&Path>, gpus: &[u32]) -> Want {
        let c = &self.cfg.admission;
        let Some(s) = self.slots.get(n) else {
            return Want {
                ram: 0,
                gpu_free: Vec::new(),
            };
        };
        let mut need = slot_need(s, model, &self.gpu_uuids());
        // "any": wait for the GPU the decision chose (the choice is made again once it is free).
        pin_any(&mut need, gpus);
        let holders = self.holders(n);
        let reserved_ram: u64 = holders.iter().map(|h| h.reserved_ram).sum();
        let gpu_free = match &need.gpu {
            GpuNeed::On(m) => m
                .iter()
                .map(|(g, b)| {
                    let r: u64 = holders.iter().filter_map(|h| h.reserved_vram.get(g)).sum();
                    (*g, b + c.vram_margin + r)
                })
                .collect(),
            GpuNeed::Any(_) | GpuNeed::None => Vec::new(),
        };
        Want {
            ram: need.ram + c.ram_margin + reserved_ram,
            gpu_free,
        }
    }

    /// The need of `n` on `model` and the decision against `live`.
    fn decide_admission(&self, n: &str, model: Option<&Path>, live: &Live) -> (Need, Decision) {
        let Some(s) = self.slots.get(n) else {
            let need = Need {
                ram: 0,
                gpu: GpuNeed::None,
                source: Source::Unknown,
            };
            let d = Decision {
                verdict: Verdict::Admit { gpus: Vec::new() },
                arithmetic: String::new(),
            };
            return (need, d);
        };
        let need = slot_need(s, model, &self.gpu_uuids());
        let holders = self.holders(n);
        let foreign: Vec<Foreign> = self
            .foreign
            .iter()
            .map(|(pid, command, bytes)| Foreign {
                gpu: self.foreign_gpu.get(pid).copied().unwrap_or(0),
                pid: *pid,
                command: command.clone(),
                bytes: *bytes,
            })
            .collect();
        let c = &self.cfg.admission;
        let machine = Machine {
            mem_available: live.mem_available,
            ram_budget: c.ram_budget,
            gpus: live.gpus.clone(),
            ram_margin: c.ram_margin,
            vram_margin: c.vram_margin,
        };
        let d = admission::decide(&Request {
            name: n,
            need: &need,
            holders: &holders,
            foreign: &foreign,
            machine: &machine,
        });
        (need, d)
    }

    /// Every other module that holds memory or will take some. One that holds nothing (a
    /// module starting without a footprint, before its first sample) counts nowhere in a
    /// decision: left out, a cold start's admissions no longer list every module each.
    fn holders(&self, n: &str) -> Vec<Holder> {
        let preempt = self.cfg.admission.preempt;
        self.slots
            .iter()
            .filter(|(name, s)| name.as_str() != n && !s.lc.is_down() && holds_something(s))
            .map(|(name, s)| holder(name, s, preempt))
            .collect()
    }

    /// Learns footprints from a sample: the run's peaks, to be written (returned) once it has
    /// been online for `learn_after` and they grew enough.
    pub(super) fn learn(&mut self, n: &str) -> Option<FootprintWrite> {
        let learn_after = self.cfg.admission.learn_after;
        let dir = self.state_dir(n);
        let s = self.slots.get_mut(n)?;
        let a = &mut s.adm;
        if s.run.is_none() {
            a.run_peak = Footprint::default();
            a.online_at = None;
            return None;
        }
        a.run_peak.absorb(s.usage.memory, &a.vram_now);
        if !s.lc.serving() {
            return None;
        }
        let since = *a.online_at.get_or_insert_with(Instant::now);
        if since.elapsed() < learn_after {
            return None;
        }
        let key = admission::footprint::model_key(s.lc.active_model().map(|p| p.as_path()));
        let entry = a.footprints.by_model.entry(key.clone()).or_default();
        entry.absorb(a.run_peak.ram_peak, &a.run_peak.vram_peak);
        if !entry.differs_enough(a.written.by_model.get(&key)) {
            return None;
        }
        entry.measured_at = us(std::time::SystemTime::now()) / 1_000_000;
        let (ram, vram) = (entry.ram_peak, entry.vram_total());
        a.written = a.footprints.clone();
        let fps = a.footprints.clone();
        tracing::info!(
            modvisor_module = n,
            "{n}: footprint learned: peak RAM {}, peak VRAM {}",
            format_bytes(ram),
            format_bytes(vram)
        );
        Some(FootprintWrite {
            name: n.to_string(),
            dir,
            footprints: fps,
        })
    }

    /// Writes the footprints a sampling pass learned, all in one blocking task (the modules
    /// that came online together reach `learn_after` together).
    pub(super) fn write_footprints(&mut self, writes: Vec<FootprintWrite>) {
        if writes.is_empty() {
            return;
        }
        self.tasks.spawn_blocking(move || {
            for w in writes {
                if let Err(e) = w.footprints.store(&w.dir) {
                    tracing::warn!(modvisor_module = %w.name, "cannot record the footprint in {}: {e}", w.dir.display());
                }
            }
        });
    }

    /// The footprint `explain` and the properties show: (ram, vram, source).
    pub(super) fn footprint_shown(&self, s: &Slot) -> (u64, u64, Source) {
        let need = slot_need(s, s.lc.active_model().map(|p| p.as_path()), &[]);
        (need.ram, need.gpu.total(), need.source)
    }

    /// Whether admission could evict `s` now (for the properties and `status`), with the
    /// connections the module shows (the lifecycle's count; the live counter may be a moment
    /// ahead, and a change of it alone does not touch the slot: see slots.rs).
    pub(super) fn evictable(&self, name: &str, s: &Slot) -> bool {
        let preempt = self.cfg.admission.preempt;
        !s.lc.is_down()
            && holder_with(name, s, preempt, s.lc.connections())
                .keep
                .is_none()
    }
}

/// Whether any figure admission takes from `s` can be above zero: its use, its VRAM, a
/// start's share or its footprint (a superset of what [`holder`] counts).
fn holds_something(s: &Slot) -> bool {
    s.usage.memory > 0
        || s.adm.vram_now.values().any(|&b| b > 0)
        || s.adm
            .admitted
            .as_ref()
            .is_some_and(|n| n.ram > 0 || n.gpu.total() > 0)
        || slot_need(s, s.lc.active_model().map(|p| p.as_path()), &[]).ram > 0
}

/// Connections open through the module's listen addresses right now.
fn open_now(s: &Slot) -> u32 {
    s.open.as_ref().map_or(s.lc.connections(), |c| c.open())
}

/// A module as admission sees it.
fn holder(name: &str, s: &Slot, preempt: bool) -> Holder {
    holder_with(name, s, preempt, open_now(s))
}

/// The same, with `open` connections through its listen addresses.
fn holder_with(name: &str, s: &Slot, preempt: bool, open: u32) -> Holder {
    let m = s.lc.module();
    let starting = s.lc.state() == State::Starting;
    let share = s.adm.admitted.as_ref().filter(|_| starting);
    let reserved_ram = share.map_or(0, |n| n.ram.saturating_sub(s.usage.memory));
    let reserved_vram = match share.map(|n| &n.gpu) {
        Some(GpuNeed::On(m)) => m
            .iter()
            .map(|(g, b)| {
                (
                    *g,
                    b.saturating_sub(s.adm.vram_now.get(g).copied().unwrap_or(0)),
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    let keep = if m.resources.pinned {
        Some("pinned".to_string())
    } else if s.lc.activating() {
        Some("mid-activation".to_string())
    } else if !s.lc.serving() {
        Some(s.lc.state().as_str().to_string())
    } else if open > 0 && !preempt {
        Some(format!("{open} open connections"))
    } else {
        None
    };
    Holder {
        name: name.to_string(),
        ram: s.usage.memory,
        ram_footprint: slot_need(s, s.lc.active_model().map(|p| p.as_path()), &[]).ram,
        vram: s.adm.vram_now.clone(),
        reserved_ram,
        reserved_vram,
        keep,
        priority: m.resources.priority,
        last_used: us(s.lc.last_used()),
    }
}
