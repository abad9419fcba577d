//! Where modules' output goes: the journal's native protocol (with `MODVISOR_MODULE=NAME`),
//! per-module log files with rotation when configured, stderr otherwise.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// journald's socket: `JOURNAL_SOCKET`, or `$MODVISOR_JOURNAL_SOCKET` (a daemon in a container
/// with the host's journal mounted elsewhere, or run without one in a test).
pub fn journal_socket() -> PathBuf {
    std::env::var_os("MODVISOR_JOURNAL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET))
}

/// A connection to journald's native socket.
#[derive(Debug)]
pub struct Journal {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    /// Connects to journald, or `None` when no journal runs here.
    pub fn connect() -> Option<Journal> {
        Journal::connect_at(&journal_socket())
    }

    pub fn connect_at(path: &Path) -> Option<Journal> {
        let sock = UnixDatagram::unbound().ok()?;
        // Probe: an empty datagram is ignored by journald but tells us the socket answers.
        sock.send_to(b"", path).ok()?;
        Some(Journal {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// Sends one entry. Values may hold newlines (binary field encoding is used for them).
    pub fn send(&self, fields: &[(&str, &str)]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(256);
        for (k, v) in fields {
            buf.extend_from_slice(k.as_bytes());
            if v.contains('\n') {
                buf.push(b'\n');
                buf.extend_from_slice(&(v.len() as u64).to_le_bytes());
                buf.extend_from_slice(v.as_bytes());
                buf.push(b'\n');
            } else {
                buf.push(b'=');
                buf.extend_from_slice(v.as_bytes());
                buf.push(b'\n');
            }
        }
        self.sock.send_to(&buf, &self.path).map(|_| ())
    }
}

/// The journalctl matches for a module's (or a unit's) entries, from trusted writers only:
/// entries with `MODVISOR_MODULE=NAME` written by root (modvisord forwards direct and
/// container output so), the output of the system manager's unit (`_SYSTEMD_UNIT`: only root
/// makes system units; its processes run as root or the engine's user), and a user manager's
/// unit only when that manager is root's (`_UID=0`, as in the testbed). Never another user's
/// unit of the same name, nor anyone else's entry that sets `MODVISOR_MODULE` itself. Fields
/// starting with `_` are journald's own, not the writer's. Terms within one group are ANDed,
/// `+` separates the alternatives.
pub fn trusted_matches(module: Option<&str>, unit: &str) -> Vec<String> {
    let mut m = Vec::new();
    if let Some(name) = module {
        m.extend([
            format!("MODVISOR_MODULE={name}"),
            "_UID=0".into(),
            "+".into(),
        ]);
    }
    m.extend([
        format!("_SYSTEMD_UNIT={unit}"),
        "+".into(),
        format!("_SYSTEMD_USER_UNIT={unit}"),
        "_UID=0".into(),
    ]);
    m
}

/// A per-module log file, rotated at `max_bytes` (NAME.log -> NAME.log.1 -> ... .3).
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

const KEEP: u32 = 3;

impl RotatingFile {
    pub fn open(dir: &Path, name: &str, max_bytes: u64) -> io::Result<RotatingFile> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.log"));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path,
            file,
            size,
            max_bytes,
        })
    }

    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size + line.len() as u64 + 1 > self.max_bytes && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.file.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let numbered = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        for i in (1..KEEP).rev() {
            let from = numbered(i);
            if from.exists() {
                std::fs::rename(&from, numbered(i + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Where one module's output lines go. Cheap to clone; shared by its stdout and stderr readers.
#[derive(Clone)]
pub struct OutputSink {
    module: Arc<str>,
    /// The last lines this run wrote (for error reports such as a failed model activation).
    recent: Arc<Mutex<Recent>>,
    /// The last lines the module wrote, across its runs (`modvisorctl logs` without a journal).
    history: Arc<Mutex<Recent>>,
    journal: Option<Arc<Journal>>,
    file: Option<Arc<Mutex<RotatingFile>>>,
}

const RECENT_LINES: usize = 40;
/// The recent lines together never hold more than this (a module decides how long its lines are).
const RECENT_BYTES: usize = 16 * 1024;
/// Each kept line is cut to this (error lines are short; the journal has the whole line).
const RECENT_LINE_MAX: usize = 2048;

/// The last lines of a module, bounded in count and in bytes, numbered from 1 (across its runs).
#[derive(Debug, Default)]
struct Recent {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
    /// The number of the newest line (0: none yet).
    seq: u64,
}

impl Recent {
    fn push(&mut self, line: &str) {
        let line = crate::bounded::cap_str(line, RECENT_LINE_MAX).into_owned();
        self.bytes += line.len();
        self.seq += 1;
        self.lines.push_back(line);
        while self.lines.len() > RECENT_LINES || self.bytes > RECENT_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The kept lines numbered above `after`, the last `max` of them.
    fn after(&self, after: u64, max: usize) -> Vec<String> {
        let first = self.seq + 1 - self.lines.len() as u64;
        let skip = after.saturating_add(1).saturating_sub(first) as usize;
        let newer: Vec<&String> = self.lines.iter().skip(skip).collect();
        let from = newer.len().saturating_sub(max);
        newer[from..].iter().map(|l| l.to_string()).collect()
    }
}

impl OutputSink {
    /// Adds lines to the recent ones (not to the journal) unless they are there already: the
    /// tail of an engine's output read back from its container engine.
    pub fn remember(&self, lines: &[String]) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let start = lines
            .iter()
            .position(|l| !r.lines.contains(l))
            .unwrap_or(lines.len());
        for l in &lines[start..] {
            r.push(l);
        }
    }

    /// The last lines the module wrote, oldest first.
    pub fn recent(&self) -> Vec<String> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.lines.iter().cloned().collect()
    }

    /// The number of the module's newest line, across its runs (0: none yet).
    pub fn seq(&self) -> u64 {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).seq
    }

    /// The module's kept lines (across its runs) numbered above `after`, the last `max` of
    /// them, with the newest number.
    pub fn recent_after(&self, after: u64, max: usize) -> (u64, Vec<String>) {
        let r = self.history.lock().unwrap_or_else(|p| p.into_inner());
        (r.seq, r.after(after, max))
    }

    /// Keeps the module's history of `previous` (its earlier run): `modvisorctl logs` without
    /// a journal shows what a run said before it was restarted. Error lookups read this run's
    /// own lines only.
    pub fn continuing(mut self, previous: Option<&OutputSink>) -> OutputSink {
        if let Some(p) = previous {
            self.history = p.history.clone();
        }
        self
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl OutputSink {
    pub fn new(
        module: &str,
        journal: Option<Arc<Journal>>,
        log_dir: Option<&Path>,
        max_bytes: u64,
    ) -> OutputSink {
        let file = log_dir.and_then(|d| match RotatingFile::open(d, module, max_bytes) {
            Ok(f) => Some(Arc::new(Mutex::new(f))),
            Err(e) => {
                tracing::warn!(
                    modvisor_module = module,
                    "cannot open module log file in {}: {e}",
                    d.display()
                );
                None
            }
        });
        OutputSink {
            module: module.into(),
            recent: Arc::new(Mutex::new(Recent::default())),
            history: Arc::new(Mutex::new(Recent::default())),
            journal,
            file,
        }
    }

    pub fn line(&self, stream: Stream, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text);
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text);
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_line(text.as_bytes()) {
                tracing::warn!(modvisor_module = &*self.module, "module log file: {e}");
            }
        }
        let (stream_name, priority) = match stream {
            Stream::Stdout => ("stdout", "6"),
            Stream::Stderr => ("stderr", "4"),
        };
        let sent = self.journal.as_ref().is_some_and(|j| {
            j.send(&[
                ("MESSAGE", text),
                ("PRIORITY", priority),
                ("SYSLOG_IDENTIFIER", &self.module),
                ("MODVISOR_MODULE", &self.module),
                ("MODVISOR_STREAM", stream_name),
            ])
            .is_ok()
        });
        if !sent && self.file.is_none() {
            eprintln!("{}[{stream_name}]: {text}", self.module);
        }
    }
}

/// The last error line of a unit in the journal (system or user manager). `journalctl` is
/// spawned through the reaper's registry, so the subreaper never steals its exit status.
pub async fn unit_error_line(unit: &str) -> Option<String> {
    let mut cmd = tokio::process::Command::new("journalctl");
    cmd.args(["--no-pager", "-o", "cat", "-n", "40"])
        .args(trusted_matches(None, unit))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = crate::reaper::spawn(&mut cmd).ok()?;
    let pid = child.id().unwrap_or(0);
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(5), child.wait_with_output()).await;
    crate::reaper::forget(pid);
    let out = out.ok()?.ok()?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    crate::model::last_error_line(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_need_trusted_writers() {
        assert_eq!(
            trusted_matches(Some("m"), "modvisor-m.service").join(" "),
            "MODVISOR_MODULE=m _UID=0 + _SYSTEMD_UNIT=modvisor-m.service + _SYSTEMD_USER_UNIT=modvisor-m.service _UID=0"
        );
        assert_eq!(
            trusted_matches(None, "ollama.service").join(" "),
            "_SYSTEMD_UNIT=ollama.service + _SYSTEMD_USER_UNIT=ollama.service _UID=0"
        );
    }

    #[test]
    fn recent_lines_are_numbered_across_runs() {
        let a = OutputSink::new("m", None, None, 0);
        for i in 1..=50 {
            a.line(Stream::Stdout, format!("line {i}").as_bytes());
        }
        assert_eq!(a.seq(), 50);
        let (seq, lines) = a.recent_after(0, 3);
        assert_eq!(
            (seq, lines),
            (
                50,
                vec!["line 48".into(), "line 49".into(), "line 50".into()]
            )
        );
        assert_eq!(a.recent_after(48, 100).1, vec!["line 49", "line 50"]);
        assert!(a.recent_after(50, 100).1.is_empty());
        assert_eq!(
            a.recent_after(0, 100).1.len(),
            RECENT_LINES,
            "only what is kept"
        );
        let b = OutputSink::new("m", None, None, 0).continuing(Some(&a));
        b.line(Stream::Stderr, b"next run");
        assert_eq!(a.recent_after(50, 10), (51, vec!["next run".to_string()]));
        assert_eq!(b.recent(), vec!["next run"], "a run's own lines");
    }

    #[test]
    fn recent_lines_are_bounded_in_bytes() {
        let t = tempfile::tempdir().expect("tempdir");
        let sink = OutputSink::new("m", None, Some(t.path()), 1 << 20);
        for _ in 0..100 {
            sink.line(Stream::Stdout, &vec![b'a'; 64 * 1024]);
        }
        sink.line(Stream::Stderr, b"error: the last words\n");
        let r = sink.recent();
        assert!(r.iter().map(String::len).sum::<usize>() <= RECENT_BYTES);
        assert!(r.iter().all(|l| l.len() <= RECENT_LINE_MAX + 40));
        assert_eq!(r.last().map(String::as_str), Some("error: the last words"));
    }

    #[test]
    fn rotation_keeps_three() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut f = RotatingFile::open(t.path(), "m", 100).expect("open");
        for i in 0..50 {
            f.write_line(format!("line {i:04} ..........").as_bytes())
                .expect("write");
        }
        let names: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(t.path())
                .expect("read")
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names, vec!["m.log", "m.log.1", "m.log.2", "m.log.3"]);
        for n in &names {
            assert!(std::fs::metadata(t.path().join(n)).expect("stat").len() <= 100);
        }
        let last = std::fs::read_to_string(t.path().join("m.log")).expect("read");
        assert!(last.contains("line 0049"));
    }
}
