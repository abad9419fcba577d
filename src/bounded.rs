//! Bounds on what modules can make modvisord hold: their output is read in fixed chunks and
//! split into lines of at most [`MAX_LINE`] bytes (a module writing gigabytes without a
//! newline costs one buffer, not gigabytes), and strings that come from modules and go out
//! over D-Bus are capped to [`DBUS_TEXT_MAX`] bytes on a character boundary.

use std::io::ErrorKind;

use tokio::net::unix::pipe;

/// The longest line forwarded as one journal entry; longer ones are split.
pub const MAX_LINE: usize = 64 * 1024;

/// The most bytes of one reason, detail or error text sent over D-Bus.
pub const DBUS_TEXT_MAX: usize = 4096;

/// One read from an engine's pipe. The buffer is on the stack of the read that fills it: a
/// stream waiting for output holds none (a 4 KiB buffer per stream held while waiting was
/// 0.8 MiB of a 100-module daemon). A pipe page: an engine's output arrives in writes smaller
/// than this; a larger burst takes a few more reads.
const READ_CHUNK: usize = 4 * 1024;

/// The length of `bytes` without a UTF-8 sequence cut off at its end (at most 3 bytes
/// shorter; the whole when that would leave nothing, or when the end is not UTF-8 anyway).
fn complete_prefix(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=n.min(4) {
        let b = bytes[n - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: its lead is further back
        }
        let need = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if need > back && n - back > 0 {
            n - back
        } else {
            n
        };
    }
    n
}

/// Splits a byte stream into lines (the newline kept) of at most `max` bytes. A line that
/// arrives whole goes out from the input; only a line split across pushes is copied, and its
/// buffer is released once the line is out (a long line once does not stay allocated).
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            max: max.max(4),
        }
    }

    /// Adds bytes; calls `emit` for every complete line and for every `max` bytes without one.
    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let room = self.max - self.buf.len();
            let take = bytes.len().min(room);
            if let Some(i) = bytes[..take].iter().position(|b| *b == b'\n') {
                if self.buf.is_empty() {
                    emit(&bytes[..=i]);
                } else {
                    self.buf.extend_from_slice(&bytes[..=i]);
                    emit(&self.buf);
                    self.buf = Vec::new();
                }
                bytes = &bytes[i + 1..];
                continue;
            }
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() >= self.max {
                let cut = complete_prefix(&self.buf);
                emit(&self.buf[..cut]);
                self.buf.drain(..cut);
                if self.buf.is_empty() {
                    self.buf = Vec::new();
                }
            }
        }
    }

    /// What is left without a newline at the end of the stream.
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(&self.buf);
            self.buf = Vec::new();
        }
    }

    /// The bytes of a partial line held (allocated, not only used).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

/// Reads the pipe `r` to its end in fixed chunks and hands each line (split at [`MAX_LINE`])
/// to `emit`. Between reads it holds no buffer but a partial line's.
pub async fn forward_lines(r: pipe::Receiver, mut emit: impl FnMut(&[u8])) {
    let mut split = LineSplitter::new(MAX_LINE);
    while r.readable().await.is_ok() {
        // Not held across the await above: no part of the task's state.
        let mut chunk = [0u8; READ_CHUNK];
        match r.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => split.push(&chunk[..n], &mut emit),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    split.finish(&mut emit);
}

/// `s` cut to at most `max` bytes on a character boundary, with " [... N bytes cut]" when cut.
pub fn cap_str(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{} [... {} bytes cut]", &s[..end], s.len() - end))
}

/// A string from a module (reason, activation detail, engine error line) as sent over D-Bus:
/// at most [`DBUS_TEXT_MAX`] bytes of it.
pub fn cap_for_dbus(s: &str) -> String {
    cap_str(s, DBUS_TEXT_MAX).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(input: &[&[u8]], max: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max);
        let mut emit = |l: &[u8]| out.push(l.to_vec());
        for i in input {
            s.push(i, &mut emit);
        }
        s.finish(&mut emit);
        out
    }

    #[test]
    fn lines_and_long_runs() {
        let out = split_all(&[b"ab\ncd", b"e\n", b"fghijklmn"], 4);
        let want: Vec<&[u8]> = vec![b"ab\n", b"cde\n", b"fghi", b"jklm", b"n"];
        assert_eq!(out, want);
        // A newline exactly at the limit stays with its line.
        let out = split_all(&[b"abc\nd"], 4);
        let want: Vec<&[u8]> = vec![b"abc\n", b"d"];
        assert_eq!(out, want);
    }

    #[test]
    fn splits_never_cut_a_character() {
        // "é" is 2 bytes: with max 4, "aaaé" would cut it.
        let text = "aaaéb".as_bytes();
        let out = split_all(&[text], 4);
        assert_eq!(out[0], b"aaa");
        assert!(
            out.iter().all(|l| std::str::from_utf8(l).is_ok()),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn forward_bounded() {
        let (mut tx, rx) = pipe::pipe().expect("pipe");
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let data = vec![b'a'; 3 * MAX_LINE + 5];
            tx.write_all(&data).await.expect("write");
        });
        let mut sizes = Vec::new();
        forward_lines(rx, |l| sizes.push(l.len())).await;
        writer.await.expect("writer");
        assert_eq!(sizes, vec![MAX_LINE, MAX_LINE, MAX_LINE, 5]);
    }

    #[tokio::test]
    async fn a_waiting_stream_holds_no_read_buffer() {
        let (_tx, rx) = pipe::pipe().expect("pipe");
        let waiting = forward_lines(rx, |_| {});
        let size = std::mem::size_of_val(&waiting);
        assert!(size < READ_CHUNK / 4, "the forwarding task is {size} bytes");
    }

    #[test]
    fn whole_lines_are_not_copied_and_a_partial_one_is_released() {
        let mut s = LineSplitter::new(MAX_LINE);
        let mut out = Vec::new();
        s.push(b"one\ntwo\n", &mut |l: &[u8]| out.push(l.to_vec()));
        assert_eq!(s.held(), 0);
        let long = vec![b'x'; 10_000];
        s.push(&long, &mut |l: &[u8]| out.push(l.to_vec()));
        assert!(s.held() >= 10_000);
        s.push(b"end\n", &mut |l: &[u8]| out.push(l.to_vec()));
        assert_eq!(
            s.held(),
            0,
            "the partial line's buffer is released once it is out"
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[2].len(), 10_004);
    }

    #[test]
    fn caps_on_char_boundaries() {
        assert_eq!(cap_str("short", 10), "short");
        let s = "ééééé"; // 10 bytes
        let c = cap_str(s, 5);
        assert!(c.starts_with("éé ["), "{c}");
        assert!(c.contains("6 bytes cut"), "{c}");
        let long = "x".repeat(100_000);
        assert!(cap_for_dbus(&long).len() < DBUS_TEXT_MAX + 40);
    }
}
