//! Resource sampling from /proc (RAM per process group). Blocking: call from spawn_blocking.

use std::collections::HashMap;

/// Sums the resident memory of every process in each of the given process groups, in one
/// pass over /proc.
pub fn rss_by_group(groups: &[(String, i32)]) -> HashMap<String, u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let by_pgid: HashMap<i32, &str> = groups.iter().map(|(n, g)| (*g, n.as_str())).collect();
    let mut out: HashMap<String, u64> = groups.iter().map(|(n, _)| (n.clone(), 0)).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        // Fields after COMM: state(0) ppid(1) pgrp(2) ... rss(21)
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (Some(pgrp), Some(rss)) = (
            f.get(2).and_then(|s| s.parse::<i32>().ok()),
            f.get(21).and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if let Some(name) = by_pgid.get(&pgrp)
            && let Some(v) = out.get_mut(*name)
        {
            *v += rss * page;
        }
    }
    out
}
