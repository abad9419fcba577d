//! The daemon's own figures for `/metrics`: resident memory and CPU time, from `/proc/self`.

/// modvisord's own resource use at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SelfStats {
    pub resident_bytes: u64,
    /// User + system CPU time.
    pub cpu_seconds: f64,
}

impl SelfStats {
    /// Reads `/proc/self/stat` (two small procfs reads; procfs never blocks on I/O). A field
    /// that cannot be read is 0, never an error: a scrape still shows every other metric.
    pub fn read() -> SelfStats {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        parse_stat(&stat, crate::procfs::page_size(), clock_ticks())
    }
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as u64
}

/// Fields of a stat line after COMM: state(0) ... utime(11) stime(12) ... rss(21).
fn parse_stat(line: &str, page_size: u64, ticks: u64) -> SelfStats {
    let rest = line.rfind(')').map(|i| &line[i + 1..]).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    SelfStats {
        resident_bytes: num(21).saturating_mul(page_size),
        cpu_seconds: (num(11) + num(12)) as f64 / ticks.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rss_after_a_comm_with_parens() {
        let line = "42 (mod (visor) d) S 1 42 42 0 -1 4194560 100 0 0 0 150 50 0 0 20 0 1 0 12345 1000 77 18446744073709551615";
        let s = parse_stat(line, 4096, 100);
        assert_eq!(s.resident_bytes, 77 * 4096);
        assert!((s.cpu_seconds - 2.0).abs() < 1e-9, "{}", s.cpu_seconds);
    }

    #[test]
    fn unreadable_is_zero() {
        assert_eq!(parse_stat("", 4096, 100), SelfStats::default());
    }

    #[test]
    fn this_process_has_memory() {
        assert!(SelfStats::read().resident_bytes > 0);
    }
}
