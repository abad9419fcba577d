//! Resource sampling: one pass over /proc (and NVML) for all modules, off the actor, never
//! overlapping; its figures become each module's usage and threshold warning.

use super::module::Input;
use super::resources;
use super::table::{Event, Supervisor};
use crate::monitor::Target;
use crate::supervisor::MSG_FOREIGN_GPU;

/// How long after a pass the pass owed to modules that came up meanwhile runs.
pub(super) const AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

impl Supervisor {
    /// A run whose process is known (started, or its PID reported) or that reached `running`
    /// is sampled at once while it has no figures, not at the next interval: no view shows
    /// 0 bytes for a running engine.
    pub(super) fn sample_fresh(&mut self, n: &str) {
        let Some(s) = self.slots.get_mut(n) else {
            return;
        };
        let pid = s.lc.main_pid();
        let fresh = s.run.is_some() && s.usage.memory == 0 && pid > 1;
        if fresh {
            // At once, the main process alone (one small /proc read): a lower bound until the
            // full pass below (its group or cgroup, and VRAM) lands.
            if let Some(st) = crate::procfs::stat(pid) {
                s.usage.memory = st.rss_pages * crate::procfs::page_size();
            }
            if self.sampling || self.again_scheduled {
                self.sample_again = true;
            } else {
                self.memory_tick();
            }
        }
    }

    /// The pass owed to modules that came up while one was in flight, [`AGAIN_AFTER`] later:
    /// hundreds of modules starting together are sampled a few times a second, not in
    /// back-to-back passes over all of them.
    pub(super) fn sample_soon(&mut self) {
        if self.again_scheduled {
            return;
        }
        self.again_scheduled = true;
        let tx = self.events.clone();
        self.tasks.spawn(async move {
            tokio::time::sleep(AGAIN_AFTER).await;
            let _ = tx.send(Event::MemoryTick);
        });
    }

    pub(super) fn memory_tick(&mut self) {
        let targets: Vec<Target> = self
            .slots
            .iter()
            .filter_map(|(n, s)| {
                let r = s.run.as_ref()?;
                let main_pid = s.lc.main_pid();
                (main_pid > 1).then(|| Target {
                    name: n.clone(),
                    main_pid,
                    // A direct child leads its own group; its PID arrives after the start.
                    pgid: if r.handle.pgid > 1 || r.backend.kind() != "direct" {
                        r.handle.pgid
                    } else {
                        main_pid as i32
                    },
                    // A unit or a container has a cgroup of its own; a direct child shares
                    // the daemon's.
                    own_cgroup: r.backend.kind() != "direct",
                })
            })
            .collect();
        // Nothing runs and no GPU to watch: sampling costs nothing.
        if (targets.is_empty() && self.gpu.is_none()) || self.sampling {
            return;
        }
        self.sampling = true;
        let tx = self.events.clone();
        let gpu = self.gpu.clone();
        let cgroups = self.cgroups.clone();
        let started = self.runs_started;
        self.tasks.spawn_blocking(move || {
            let mut cgroups = cgroups.lock().unwrap_or_else(|e| e.into_inner());
            let s = crate::monitor::sample_with(&targets, gpu.as_deref(), &mut cgroups);
            let _ = tx.send(Event::Sample(Box::new(s), started));
        });
    }

    /// Applies one sample: figures, thresholds (degraded), GPUs, foreign processes.
    pub(super) fn sampled(&mut self, mut s: crate::monitor::Sample, started: u64) {
        if started != self.runs_started {
            // A run started meanwhile: its engine may be in this pass's GPU processes without
            // being known as a module's. Its foreign processes wait for the next pass (now).
            s.foreign.clone_from(&self.foreign);
            s.foreign_gpu.clone_from(&self.foreign_gpu);
            self.sample_again = true;
        }
        self.machine_total = s.machine_total;
        if !s.gpu_error.is_empty() && !self.gpu_error_logged {
            tracing::warn!("VRAM unknown: {}", s.gpu_error);
            self.gpu_error_logged = true;
        }
        self.gpus = s.gpus;
        for (pid, comm, bytes) in s
            .foreign
            .iter()
            .filter(|f| !self.foreign.iter().any(|o| o.0 == f.0))
        {
            tracing::warn!(
                message_id = MSG_FOREIGN_GPU,
                "GPU process {pid} ({comm}) holds {} of VRAM and belongs to no module (an orphaned engine?)",
                crate::manifest::units::format_bytes(*bytes)
            );
        }
        self.foreign = s.foreign;
        self.foreign_gpu = s.foreign_gpu;
        let (ram_pct, vram_pct) = (self.cfg.ram_warn_percent, self.cfg.vram_warn_percent);
        let names: Vec<String> = self.slots.keys().cloned().collect();
        let mut writes = Vec::new();
        for n in names {
            let Some(slot) = self.slots.get_mut(&n) else {
                continue;
            };
            let mut progress = None;
            let warning = if slot.run.is_none() {
                None
            } else {
                if let Some(m) = s.modules.get(&n) {
                    let now = resources::Usage {
                        memory: m.rss,
                        vram: m.vram,
                        vram_total: m.vram_total,
                    };
                    progress = resources::growth(&slot.usage, &now);
                    slot.usage = now;
                    slot.adm.vram_now.clone_from(&m.vram_by_gpu);
                }
                if let Some(lines) = output_progress(slot) {
                    progress = Some(match progress.take() {
                        Some(p) => format!("{p}, {lines}"),
                        None => lines,
                    });
                }
                let r = &slot.lc.module().resources;
                resources::warning(r, &slot.usage, self.machine_total, ram_pct, vram_pct)
            };
            let generation = slot.lc.running().unwrap_or(0);
            writes.extend(self.learn(&n));
            self.feed(&n, Input::Warning(warning));
            if let Some(what) = progress {
                self.feed(&n, Input::Progressing { generation, what });
            }
        }
        self.write_footprints(writes);
    }
}

/// Output written since the last sample is progress too (direct children and containers:
/// modvisord reads their output; a unit's goes to the journal, which is not watched).
fn output_progress(slot: &mut super::table::Slot) -> Option<String> {
    let seq = slot.sink.as_ref().map_or(0, |k| k.seq());
    let wrote = seq.saturating_sub(slot.output_seen.max(slot.output_start));
    slot.output_seen = seq;
    (wrote > 0).then(|| format!("wrote {wrote} lines of output"))
}
