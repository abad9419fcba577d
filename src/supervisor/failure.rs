//! What kind of failure ended a run (pure): the restart policy treats each differently.
//!
//! | class         | from                                                              | restart          |
//! |---------------|-------------------------------------------------------------------|------------------|
//! | configuration | no process ran (image missing with `pull = "never"`, no such command or user), exit 126/127, the engine said a library, file or port is missing/taken | never: `failed` at once, with a hint |
//! | resource      | oom-kill, the engine said it ran out of (GPU) memory              | policy, backoff, said so |
//! | crash         | anything else                                                     | policy, backoff  |

use std::time::Duration;

use crate::runtime::ExitInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Retrying cannot help: what to fix.
    Config(&'static str),
    /// Out of memory: retrying may help once memory is free.
    Resource,
    Crash,
}

/// Line fragments (lowercase) that name a configuration error, with the hint shown.
const CONFIG_LINES: &[(&str, &str)] = &[
    (
        "error while loading shared libraries",
        "install the missing library",
    ),
    (
        "cannot open shared object file",
        "install the missing library",
    ),
    (
        "address already in use",
        "another process listens on the engine's port",
    ),
    ("command not found", "fix the command in the manifest"),
    (
        "no such file or directory",
        "a path the engine needs does not exist",
    ),
];

/// Line fragments (lowercase) that name an out-of-memory failure.
const RESOURCE_LINES: &[&str] = &[
    "out of memory",
    "cudamalloc failed",
    "failed to allocate",
    "cuda_error_out_of_memory",
    "std::bad_alloc",
];

/// Classifies a run that ended on its own (not a clean exit), from how it ended and the
/// engine's last error line, when known.
pub fn classify(info: &ExitInfo, line: Option<&str>) -> Class {
    let line = line.map(str::to_ascii_lowercase).unwrap_or_default();
    match info {
        ExitInfo::Refused(_) => return Class::Config("fix the manifest or the machine"),
        ExitInfo::StartLimitHit(last) => return classify(last, Some(&line)),
        ExitInfo::Other(s) if s == "oom-kill" => return Class::Resource,
        _ => {}
    }
    if let Some((_, hint)) = CONFIG_LINES.iter().find(|(l, _)| line.contains(l)) {
        return Class::Config(hint);
    }
    if RESOURCE_LINES.iter().any(|l| line.contains(l)) {
        return Class::Resource;
    }
    match info {
        ExitInfo::Code(126) => Class::Config("the command is not executable"),
        ExitInfo::Code(127) => Class::Config("the command or a library it needs is missing"),
        _ => Class::Crash,
    }
}

/// The engine's line as it goes into a reason: one line, at most 200 bytes.
pub fn short_line(line: &str) -> String {
    let one = line.lines().next().unwrap_or_default().trim();
    crate::bounded::cap_str(one, 200).into_owned()
}

/// The delay before restart `count` (1-based) of a budget: `delay` doubling each time,
/// capped at `max_delay`.
pub fn backoff(delay: Duration, max_delay: Duration, count: u32) -> Duration {
    let factor = 1u32 << count.saturating_sub(1).min(20);
    delay.saturating_mul(factor).min(max_delay.max(delay))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (exit, the engine's line) -> class, as a table.
    #[test]
    fn classes() {
        let libgomp = "llama-server: error while loading shared libraries: libgomp.so.1: cannot open shared object file: No such file or directory";
        #[rustfmt::skip]
        let rows: Vec<(ExitInfo, Option<&str>, Class)> = vec![
            (ExitInfo::Code(127), Some(libgomp), Class::Config("install the missing library")),
            (ExitInfo::Code(127), None, Class::Config("the command or a library it needs is missing")),
            (ExitInfo::Code(126), None, Class::Config("the command is not executable")),
            (ExitInfo::Refused("image x is not present".into()), None, Class::Config("fix the manifest or the machine")),
            (ExitInfo::Code(1), Some("error: couldn't bind HTTP server socket: Address already in use"), Class::Config("another process listens on the engine's port")),
            (ExitInfo::Other("oom-kill".into()), None, Class::Resource),
            (ExitInfo::Code(1), Some("CUDA error: out of memory"), Class::Resource),
            (ExitInfo::Signal(6), Some("terminate called after throwing an instance of 'std::bad_alloc'"), Class::Resource),
            (ExitInfo::Code(1), Some("error: something else"), Class::Crash),
            (ExitInfo::Signal(9), None, Class::Crash),
            (ExitInfo::StartLimitHit(Box::new(ExitInfo::Code(127))), None, Class::Config("the command or a library it needs is missing")),
        ];
        for (info, line, want) in rows {
            assert_eq!(classify(&info, line), want, "{info} / {line:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        let got: Vec<_> = (1..=7).map(|n| backoff(s(2), s(30), n)).collect();
        assert_eq!(got, vec![s(2), s(4), s(8), s(16), s(30), s(30), s(30)]);
        assert_eq!(backoff(s(2), s(1), 3), s(2), "never below delay");
        assert_eq!(backoff(s(2), s(60), 10_000), s(60), "no overflow");
    }

    #[test]
    fn short_line_is_one_bounded_line() {
        assert_eq!(short_line("  a\nb"), "a");
        assert!(short_line(&"x".repeat(1000)).len() <= 230);
    }
}
