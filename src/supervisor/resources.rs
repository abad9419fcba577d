//! Resource thresholds: the RAM or VRAM figure that turns an online module degraded (pure).

use crate::manifest::Resources;
use crate::manifest::units::format_bytes;

/// What a module uses now, and what it is measured against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory: u64,
    pub vram: u64,
    /// Total memory of the GPUs its processes use.
    pub vram_total: u64,
}

/// What grew from one sample to the next (a loading engine's progress), if anything did:
/// resident memory by more than 1 MiB, or VRAM at all.
pub fn growth(before: &Usage, now: &Usage) -> Option<String> {
    const MIB: u64 = 1024 * 1024;
    if before.memory > 0 && now.memory > before.memory + MIB {
        return Some(format!(
            "{} resident, +{} since the last sample",
            format_bytes(now.memory),
            format_bytes(now.memory - before.memory)
        ));
    }
    if now.vram > before.vram {
        return Some(format!(
            "{} of VRAM, +{} since the last sample",
            format_bytes(now.vram),
            format_bytes(now.vram - before.vram)
        ));
    }
    None
}

/// The threshold crossed by a module's RAM or VRAM, if any, with the figures.
pub fn warning(
    r: &Resources,
    u: &Usage,
    machine_total: u64,
    ram_warn_default: u8,
    vram_warn_default: u8,
) -> Option<String> {
    let ram_pct = r.ram_warn_percent.unwrap_or(ram_warn_default) as u64;
    let (base, of) = match r.memory_max {
        Some(m) => (m, "memory_max"),
        None => (machine_total, "the machine's memory"),
    };
    if base > 0 && u.memory * 100 > base * ram_pct {
        return Some(format!(
            "RAM {} is {}% of {of} ({}), over ram_warn_percent {ram_pct}%",
            format_bytes(u.memory),
            u.memory * 100 / base,
            format_bytes(base)
        ));
    }
    let vram_pct = r.vram_warn_percent.unwrap_or(vram_warn_default) as u64;
    if u.vram_total > 0 && u.vram * 100 > u.vram_total * vram_pct {
        return Some(format!(
            "VRAM {} is {}% of its GPUs' {}, over vram_warn_percent {vram_pct}%",
            format_bytes(u.vram),
            u.vram * 100 / u.vram_total,
            format_bytes(u.vram_total)
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let mib = 1024 * 1024;
        let r = Resources {
            memory_max: Some(64 * mib),
            ..Resources::default()
        };
        let u = |memory, vram, vram_total| Usage {
            memory,
            vram,
            vram_total,
        };
        assert_eq!(warning(&r, &u(10 * mib, 0, 0), 0, 50, 90), None);
        assert_eq!(
            warning(&r, &u(48 * mib, 0, 0), 0, 50, 90).as_deref(),
            Some("RAM 48.0 MiB is 75% of memory_max (64.0 MiB), over ram_warn_percent 50%")
        );
        let none = Resources::default();
        assert!(
            warning(&none, &u(0, 95, 100), 1000, 50, 90).is_some_and(|w| w.starts_with("VRAM"))
        );
        assert_eq!(
            warning(&none, &u(0, 0, 0), 0, 50, 90),
            None,
            "no figures, no warning"
        );
    }
}
