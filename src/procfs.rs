//! `/proc/PID/stat`, parsed once for everyone (reaper, resource sampling, leftover detection).

/// The fields of `/proc/PID/stat` modvisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// 'R', 'S', 'Z', ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: i32,
    /// Resident set size, in pages.
    pub rss_pages: u64,
    /// Start time after boot, in clock ticks: tells a reused PID from the original.
    pub start_time: u64,
}

/// Parses a stat line. COMM may hold spaces and parentheses: fields are split after the last ')'.
pub fn parse(pid: u32, line: &str) -> Option<Stat> {
    let rest = &line[line.rfind(')')? + 1..];
    // After COMM: state(0) ppid(1) pgrp(2) ... starttime(19) vsize(20) rss(21)
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
        rss_pages: f.get(21)?.parse().ok()?,
    })
}

/// One process, if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    parse(pid, &read_small(format!("/proc/{pid}/stat"), true)?)
}

/// A small /proc or /sys file, read with as few calls as the kernel allows: open, read, close.
/// Not `fs::read_to_string`, which first asks the size (a `statx`; these files say 0) and
/// then reads in chunks growing from 32 bytes: 8 calls for a 300-byte stat line, for every
/// process of the machine at every sampling pass (most of an idle modvisord's CPU time).
/// `one_line`: the file is a single line (`stat`), complete once a read ends with a newline,
/// so the read that would return 0 is not made.
pub fn read_small(path: impl AsRef<std::path::Path>, one_line: bool) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    read_chunks(|buf, _| f.read(buf), one_line)
}

/// A small file through `read(buf, offset)` (a plain read, or a `pread` from offset), in
/// 2 KiB chunks, until it ends (or, `one_line`, once a chunk ends with a newline).
pub fn read_chunks(
    mut read: impl FnMut(&mut [u8], u64) -> std::io::Result<usize>,
    one_line: bool,
) -> Option<String> {
    let mut chunk = [0u8; 2048];
    let mut out = Vec::new();
    loop {
        let n = match read(&mut chunk, out.len() as u64) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        out.extend_from_slice(&chunk[..n]);
        if one_line && out.ends_with(b"\n") {
            break;
        }
    }
    String::from_utf8(out).ok()
}

/// Every process, in one pass over /proc.
pub fn all() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter_map(stat)
        .collect()
}

pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_are_read_whole() {
        let me = std::process::id();
        let st = stat(me).expect("own stat");
        assert!(st.pid == me && st.rss_pages > 0, "{st:?}");
        let status = read_small(format!("/proc/{me}/status"), false).expect("status");
        assert!(
            status.contains("VmRSS:") && status.ends_with('\n'),
            "{status}"
        );
        assert!(read_small("/proc/nonexistent", false).is_none());
    }

    #[test]
    fn comm_with_spaces_and_parens() {
        let line = "42 (we (ird) name) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 77 18446744073709551615";
        let s = parse(42, line).expect("parse");
        assert_eq!(
            (s.state, s.ppid, s.pgrp, s.start_time, s.rss_pages),
            ('S', 1, 42, 12345, 77)
        );
    }

    #[test]
    fn this_process() {
        let me = stat(std::process::id()).expect("own stat");
        assert_eq!(me.pid, std::process::id());
        assert!(me.rss_pages > 0);
    }
}
