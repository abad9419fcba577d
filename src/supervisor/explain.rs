//! The `Explain` text: the mode decision with every rule, the override, the policy, the state.

use super::OpError;
use super::table::Supervisor;
use crate::manifest::Mode;

impl Supervisor {
    pub(super) fn explain(&self, n: &str) -> Result<String, OpError> {
        let Some(s) = self.slots.get(n) else {
            return Err(Self::no_such(n));
        };
        let m = s.lc.module();
        let avail = crate::host::availability(&self.host(), m);
        let p = &self.cfg.policy;
        let join = |modes: &[Mode], sep: &str| {
            modes
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(sep)
        };
        let mut out = format!("module {} ({})\n", m.name, m.source.display());
        out.push_str(&format!("decision: {}\n", s.decision.reason));
        out.push_str(&format!("modes in order: {}\n", join(&m.modes, ", ")));
        for mode in [Mode::Native, Mode::Container] {
            let v = match crate::policy::possible(m, p, &avail, mode) {
                Ok(()) => "possible".to_string(),
                Err(w) => format!("not possible: {w}"),
            };
            out.push_str(&format!("  {mode}: {v}\n"));
        }
        let ov = s.override_mode.map(|m| m.to_string());
        out.push_str(&format!("override: {}\n", ov.as_deref().unwrap_or("none")));
        out.push_str(&format!(
            "policy: default_mode={} allowed_modes={} native_enabled={} docker_enabled={} trusted={}\n",
            p.default_mode,
            join(&p.allowed_modes, ","),
            p.native_enabled,
            p.docker_enabled,
            m.trusted
        ));
        // Who the engine runs as (root only when the manifest says so).
        if let Some(crate::manifest::NativeExec::Command { privileges, .. }) = &m.native {
            out.push_str(&format!("native engine: {}\n", privileges.describe()));
        }
        let (health, reason) = s.lc.effective();
        out.push_str(&format!("state: {} ({health}): {reason}\n", s.lc.state()));
        out.push_str(&self.explain_admission(n, s));
        Ok(out)
    }

    /// The footprint, the eviction settings, and the arithmetic of the last decision.
    fn explain_admission(&self, n: &str, s: &super::table::Slot) -> String {
        use crate::manifest::units::format_bytes;
        let (ram, vram, source) = self.footprint_shown(s);
        let r = &s.lc.module().resources;
        let source = match source.as_str() {
            "" => "none known: declare resources.memory_max / resources.vram, or let it run once",
            s => s,
        };
        let mut out = format!(
            "footprint: RAM {}, VRAM {} ({source})\neviction: priority {}{}{}\n",
            format_bytes(ram),
            format_bytes(vram),
            r.priority,
            if r.pinned {
                ", pinned (never evicted)"
            } else {
                ""
            },
            if self.evictable(n, s) {
                ", evictable now"
            } else {
                ""
            },
        );
        if !self.cfg.admission.enabled {
            out.push_str("admission: off ([admission] enabled = false)\n");
        } else if s.adm.arithmetic.is_empty() {
            out.push_str("admission: no decision yet (made at the next start)\n");
        } else {
            out.push_str("admission (last start):\n");
            for l in s.adm.arithmetic.lines() {
                out.push_str(&format!("  {l}\n"));
            }
        }
        out
    }
}
