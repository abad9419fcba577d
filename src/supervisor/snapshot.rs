//! The projection of the table into the published [`Snapshot`] (what D-Bus and sd_notify see).

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use super::table::{Slot, Supervisor};
use crate::manifest::{Mode, NativeExec};
use crate::state::{ModuleStatus, Snapshot};

/// `prev` is the snapshot published before: a module whose status did not change keeps its
/// `Arc`, so that whoever compares the two (the actor before it publishes, the publisher)
/// skips it with a pointer compare, and the unchanged statuses are not copied again. A
/// module not touched since (slots.rs) is not even projected again.
pub(super) fn project(sup: &Supervisor, prev: &Snapshot) -> Snapshot {
    // Both in name order: the status before of each module is found walking side by side,
    // not looked up (a publication touching one module of hundreds is now mostly this walk).
    let mut before = prev.modules.iter().peekable();
    Snapshot {
        modules: (sup.slots.take_marked())
            .map(|(n, s, touched)| {
                while before.next_if(|(b, _)| *b < n).is_some() {}
                let p = before.next_if(|(b, _)| *b == n).map(|(_, p)| p);
                (n.clone(), module(sup, n, s, touched, p))
            })
            .collect(),
        manifest_errors: sup
            .manifest_errors
            .iter()
            .map(|e| (e.path.display().to_string(), e.to_string()))
            .collect(),
        native_backend: sup
            .native
            .as_ref()
            .map(|n| n.kind().to_string())
            .unwrap_or_default(),
        container_engine: sup.container_engine.clone(),
        gpus: sup.gpus.clone(),
        foreign_gpu_processes: sup.foreign.clone(),
        runs_started: sup.runs_started,
    }
}

/// Whether a new projection shows nothing new: each unchanged module's status is the
/// published one's `Arc` (see [`project`]), so this is a pointer compare per module.
pub(super) fn unchanged(cur: &Snapshot, new: &Snapshot) -> bool {
    // Every field named: a field added to Snapshot must be added here.
    let Snapshot {
        modules,
        manifest_errors,
        native_backend,
        container_engine,
        gpus,
        foreign_gpu_processes,
        runs_started,
    } = new;
    cur.modules.len() == modules.len()
        && (cur.modules.iter().zip(modules)).all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y))
        && cur.manifest_errors == *manifest_errors
        && cur.native_backend == *native_backend
        && cur.container_engine == *container_engine
        && cur.gpus == *gpus
        && cur.foreign_gpu_processes == *foreign_gpu_processes
        && cur.runs_started == *runs_started
}

/// One module's status: the one before when its slot was not touched since, else projected
/// anew (and still the one before when equal to it).
fn module(
    sup: &Supervisor,
    n: &str,
    s: &Slot,
    touched: bool,
    prev: Option<&Arc<ModuleStatus>>,
) -> Arc<ModuleStatus> {
    match prev {
        Some(p) if !touched => {
            // The tests check the promise of slots.rs: nothing changes a status untouched.
            debug_assert!(**p == status(sup, n, s), "{n} changed without a mark");
            p.clone()
        }
        Some(p) => {
            let now = status(sup, n, s);
            if **p == now { p.clone() } else { Arc::new(now) }
        }
        None => Arc::new(status(sup, n, s)),
    }
}

fn us(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn status(sup: &Supervisor, name: &str, s: &Slot) -> ModuleStatus {
    let (ram_peak, vram_peak, source) = sup.footprint_shown(s);
    let m = s.lc.module();
    let mode = s.decision.mode;
    let (health, reason) = s.lc.effective();
    let running = s.run.is_some();
    let backend = match (&s.run, mode) {
        (Some(r), _) => r.backend.kind().to_string(),
        (None, Some(Mode::Native)) => sup
            .native
            .as_ref()
            .map(|n| n.kind().to_string())
            .unwrap_or_default(),
        (None, Some(Mode::Container)) => sup
            .container
            .as_ref()
            .map(|c| c.kind().to_string())
            .unwrap_or_default(),
        (None, None) => String::new(),
    };
    let unit = match (&s.run, mode, &sup.native) {
        (Some(r), _, _) if r.backend.restarts_itself() => r.handle.unit.clone(),
        (Some(_), _, _) => String::new(),
        (None, Some(Mode::Native), Some(b)) if b.restarts_itself() => match &m.native {
            Some(NativeExec::Unit(u)) => u.clone(),
            _ => crate::runtime::systemd::unit_name(&m.name),
        },
        _ => String::new(),
    };
    ModuleStatus {
        name: m.name.clone(),
        description: m.description.clone(),
        mode: mode.map(|m| m.to_string()).unwrap_or_default(),
        mode_reason: s.decision.reason.clone(),
        backend,
        state: s.lc.state(),
        health,
        health_reason: crate::bounded::cap_for_dbus(reason),
        unit,
        container_id: s
            .run
            .as_ref()
            .map(|r| r.container_id.clone())
            .unwrap_or_default(),
        main_pid: if running { s.lc.main_pid() } else { 0 },
        memory_bytes: if running { s.usage.memory } else { 0 },
        memory_max_bytes: m.resources.memory_max.unwrap_or(0),
        vram_bytes: if running { s.usage.vram } else { 0 },
        vram_by_gpu: match running {
            true => s.adm.vram_now.iter().map(|(g, b)| (*g, *b)).collect(),
            false => Vec::new(),
        },
        restarts: s.lc.restarts(),
        active_model: s
            .lc
            .active_model()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        since_us: us(s.lc.since()),
        manifest_path: m.source.display().to_string(),
        counters: s.counters.clone(),
        connections: s.lc.connections(),
        last_activity_us: us(s.lc.last_activity()),
        idle_stop_at_us: s.lc.idle_stop_at().map(us).unwrap_or(0),
        on_demand: m.serve.as_ref().is_some_and(|v| v.on_demand),
        ram_peak_bytes: ram_peak,
        vram_peak_bytes: vram_peak,
        footprint_source: source.as_str().to_string(),
        pinned: m.resources.pinned,
        priority: m.resources.priority,
        evictable: sup.evictable(name, s),
    }
}
