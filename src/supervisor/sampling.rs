//! Resource sampling, the actor's side: a pass (sampler.rs, on its own thread) becomes each
//! module's usage and threshold warning.

use super::module::Input;
use super::resources;
use super::table::Supervisor;
use crate::supervisor::MSG_FOREIGN_GPU;

impl Supervisor {
    /// A run whose process is known (started, or its PID reported) or that reached `running`
    /// is sampled at once while it has no figures, not at the next interval: no view shows
    /// 0 bytes for a running engine.
    pub(super) fn sample_fresh(&mut self, n: &str) {
        let Some(s) = self.slots.get(n) else {
            return;
        };
        let pid = s.lc.main_pid();
        if s.run.is_none() || s.usage.memory != 0 || pid <= 1 {
            return;
        }
        // At once, the main process alone (one small /proc read): a lower bound until the
        // full pass (its group or cgroup, and VRAM) lands.
        if let (Some(st), Some(s)) = (crate::procfs::stat(pid), self.slots.get_mut(n)) {
            s.usage.memory = st.rss_pages * crate::procfs::page_size();
        }
        self.sample_soon = true;
    }

    /// Applies one sample: figures, thresholds (degraded), GPUs, foreign processes.
    pub(super) fn sampled(&mut self, mut s: crate::monitor::Sample, started: u64) {
        if started != self.runs_started {
            // A run started meanwhile: its engine may be in this pass's GPU processes without
            // being known as a module's. Its foreign processes wait for the next pass (now).
            s.foreign.clone_from(&self.foreign);
            s.foreign_gpu.clone_from(&self.foreign_gpu);
            self.sample_soon = true;
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
