//! Moving the bytes of one connection both ways: splice(2) from one socket into a pipe and
//! from the pipe into the other socket, so they never enter modvisord's memory.
//!
//! A direction starts without a pipe: what arrives is passed on at once through 8 KiB on the
//! stack (a request, a small response or a streamed token costs no pipe, that is no pipe2(2)
//! and two close(2)s, and an idle connection holds no descriptors beyond its two sockets).
//! A read that fills those 8 KiB shows a bulk direction: it gets a pipe, the kernel's default
//! (64 KiB), grown to 1 MiB once it fills up: a splice moves at most one pipe's worth, and with
//! 64 KiB modvisord spent about twice the CPU time per MiB and 8 times the context switches.
//! Within one wake-up a direction moves all it can (fill, drain, fill again) until both its
//! sockets would block; tokio's cooperative budget, charged by every readiness poll, keeps one
//! busy connection from starving the others. When no pipe can be made (out of descriptors),
//! the direction goes on copying through the 8 KiB on the stack.

use std::future::poll_fn;
use std::io::{self, ErrorKind, PipeReader, PipeWriter};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::task::{Context, Poll};

use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl};
use nix::sys::socket::{MsgFlags, Shutdown};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// The kernel's default pipe size: what a direction starts with.
const SMALL: usize = 64 << 10;
/// What the pipe of a bulk direction grows to (fs.pipe-max-size's default, so no privilege is
/// needed).
const BULK: usize = 1 << 20;
/// The buffer of a direction whose peer did not take a chunk passed on at once.
const COPY: usize = 64 << 10;
/// What a direction without a pipe reads at a time.
const FIRST: usize = 8 << 10;

/// A socket registered with tokio: readiness to wait on, and raw I/O to attempt.
pub trait Socket: AsRawFd + AsFd {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_io<R>(&self, i: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn try_io<R>(&self, i: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                <$t>::try_io(self, i, f)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// Moves bytes both ways until both directions have seen their end (each end is passed on as
/// a shutdown of the other socket's write side), or until either fails.
pub async fn bidirectional<A: Socket, B: Socket>(a: &A, b: &B) -> io::Result<()> {
    let (mut ab, mut ba) = (Half::default(), Half::default());
    poll_fn(|cx| {
        let ab = ab.poll(cx, a, b)?;
        let ba = ba.poll(cx, b, a)?;
        if ab.is_ready() && ba.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Where a direction's bytes wait between its two sockets.
#[derive(Default)]
enum Via {
    /// No pipe (yet): chunks are passed on at once.
    #[default]
    Nothing,
    Pipe {
        r: PipeReader,
        w: PipeWriter,
        size: usize,
    },
    /// A chunk passed on was not taken whole: `buf[start..start + held]` waits (and what
    /// arrives meanwhile joins it). Once it is sent the direction is without a pipe again.
    Copy { buf: Box<[u8]>, start: usize },
}

/// One direction.
#[derive(Default)]
struct Half {
    via: Via,
    /// Bytes read and not yet written.
    held: usize,
    /// The pipe took no more though the socket may have more: wait for the writer.
    stalled: bool,
    eof: bool,
    done: bool,
}

impl Half {
    /// Ready once this direction's end has been passed on; pending with a wake-up registered.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &impl Socket,
        to: &impl Socket,
    ) -> Poll<io::Result<()>> {
        while !self.done {
            let moved = if matches!(self.via, Via::Nothing) {
                self.pass(cx, from, to)?
            } else {
                let filled = self.fill(cx, from)?;
                let drained = self.drain(cx, to)?;
                filled || drained
            };
            if self.held == 0 && matches!(self.via, Via::Copy { .. }) {
                self.via = Via::Nothing;
            }
            if self.eof && self.held == 0 {
                // Failure (the peer is already gone) is the other direction's to see.
                let _ = nix::sys::socket::shutdown(to.as_raw_fd(), Shutdown::Write);
                self.done = true;
            } else if !moved {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what `from` has into the pipe; false when there is nothing to do now (a wake-up
    /// on `from` is registered, or the writer has to make room first).
    fn fill(&mut self, cx: &mut Context<'_>, from: &impl Socket) -> io::Result<bool> {
        if self.eof || self.stalled || self.held >= self.room() {
            return Ok(false);
        }
        loop {
            match from.poll_read_ready(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(r) => r?,
            }
            let fd = from.as_fd();
            match from.try_io(Interest::READABLE, || self.read(fd)) {
                Ok(Some(0)) => self.eof = true,
                Ok(Some(n)) => self.held += n,
                Ok(None) => self.stalled = true,
                // Readiness is cleared: poll again to register for the next.
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            if self.stalled || self.held >= SMALL {
                self.grow();
            }
            return Ok(!self.stalled);
        }
    }

    /// Without a pipe: reads a chunk from `from` and sends it to `to` at once (whatever `to`
    /// does not take waits in a buffer); a chunk that fills the stack buffer gets the direction
    /// a pipe. False when `from` has nothing (a wake-up is registered).
    fn pass(
        &mut self,
        cx: &mut Context<'_>,
        from: &impl Socket,
        to: &impl Socket,
    ) -> io::Result<bool> {
        loop {
            match from.poll_read_ready(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(r) => r?,
            }
            let mut chunk = [0u8; FIRST];
            let fd = from.as_raw_fd();
            let n = match from.try_io(Interest::READABLE, || recv(fd, &mut chunk)) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.eof = true;
                return Ok(true);
            }
            // Tried whatever tokio last saw of `to`: a full socket answers EAGAIN, and the
            // buffer's drain below then waits for it the usual way.
            let sent = match send(to.as_raw_fd(), &chunk[..n]) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                r => r?,
            };
            if sent < n {
                let mut buf = vec![0; COPY].into_boxed_slice();
                buf[..n - sent].copy_from_slice(&chunk[sent..n]);
                self.via = Via::Copy { buf, start: 0 };
                self.held = n - sent;
            } else if n == FIRST {
                self.via = Via::pipe()?;
            }
            return Ok(true);
        }
    }

    /// Writes what is held to `to`; false when nothing is held or `to` is full (a wake-up on
    /// it is registered).
    fn drain(&mut self, cx: &mut Context<'_>, to: &impl Socket) -> io::Result<bool> {
        if self.held == 0 {
            return Ok(false);
        }
        loop {
            match to.poll_write_ready(cx) {
                Poll::Pending => return Ok(false),
                Poll::Ready(r) => r?,
            }
            let fd = to.as_fd();
            match to.try_io(Interest::WRITABLE, || self.write(fd)) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.held -= n;
                    self.stalled = false;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// How much may be held.
    fn room(&self) -> usize {
        match &self.via {
            Via::Pipe { size, .. } => *size,
            _ => COPY,
        }
    }

    /// A bulk direction's pipe grows once; when the kernel refuses (the user's pipe pages are
    /// used up) it stays as it is.
    fn grow(&mut self) {
        if let Via::Pipe { w, size, .. } = &mut self.via
            && *size < BULK
        {
            *size = match fcntl(&*w, FcntlArg::F_SETPIPE_SZ(BULK as i32)) {
                Ok(n) if n > 0 => n as usize,
                _ => BULK, // not again
            };
        }
    }

    /// One read from `fd`: Some(0) at its end; None when a non-empty pipe took nothing (it is
    /// full in pages though not in bytes: splice cannot tell that from an empty socket).
    fn read(&mut self, fd: BorrowedFd<'_>) -> io::Result<Option<usize>> {
        let r = match &mut self.via {
            Via::Pipe { w, .. } => splice(fd, w.as_fd(), BULK),
            Via::Copy { buf, start } => {
                if *start + self.held == buf.len() {
                    // Make room at the end (held < COPY, or fill would not read).
                    buf.copy_within(*start.., 0);
                    *start = 0;
                }
                recv(fd.as_raw_fd(), &mut buf[*start + self.held..])
            }
            Via::Nothing => Err(io::Error::other("no pipe")),
        };
        match r {
            Err(e) if e.kind() == ErrorKind::WouldBlock && self.held > 0 => {
                if let Via::Pipe { .. } = self.via {
                    return Ok(None);
                }
                Err(e)
            }
            r => r.map(Some),
        }
    }

    /// One write of what is held to `fd`.
    fn write(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        match &mut self.via {
            Via::Pipe { r, .. } => splice(r.as_fd(), fd, self.held),
            Via::Copy { buf, start } => {
                let n = send(fd.as_raw_fd(), &buf[*start..*start + self.held])?;
                *start += n;
                Ok(n)
            }
            Via::Nothing => Err(io::Error::other("no pipe")),
        }
    }
}

impl Via {
    /// A pipe, or still none when the process or the system is out of descriptors (the
    /// direction goes on through the stack; a later bulk read tries again).
    fn pipe() -> io::Result<Via> {
        #[cfg(test)]
        if tests::NO_PIPES.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Via::Nothing);
        }
        match std::io::pipe() {
            Ok((r, w)) => Ok(Via::Pipe { r, w, size: SMALL }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                Ok(Via::Nothing)
            }
            Err(e) => Err(e),
        }
    }
}

/// recv(2) into `buf`, never blocking.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(nix::sys::socket::recv(fd, buf, MsgFlags::MSG_DONTWAIT)?)
}

/// send(2) of `buf`, never blocking; no SIGPIPE for a peer that is gone (an error instead).
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    Ok(nix::sys::socket::send(fd, buf, flags)?)
}

/// splice(2) of up to `len` bytes (no offsets: both are sockets or pipes), never blocking on
/// the pipe (the socket is non-blocking).
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Via::pipe makes no pipe, as when out of descriptors (only the test that sets it runs in
    /// its process under nextest; under `cargo test` others merely use buffers too).
    pub static NO_PIPES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Bytes no two positions of which repeat in a short cycle (a dropped, doubled or
    /// reordered chunk shows).
    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// One end of the connection: sends `out` and then its end (shutdown of its write side)
    /// while it reads to the peer's end; returns what it read.
    async fn end<S: AsyncRead + AsyncWrite>(s: S, out: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = tokio::io::split(s);
        let send = async move {
            w.write_all(&out).await.expect("send");
            w.shutdown().await.expect("shutdown");
        };
        let recv = async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("receive");
            got
        };
        tokio::join!(send, recv).1
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(a), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    /// 24 MiB one way and 8 MiB the other, at the same time, each followed by its end: both
    /// arrive intact, both ends are passed on, and the forwarding finishes.
    async fn both_ways(
        client: impl AsyncRead + AsyncWrite,
        engine: impl AsyncRead + AsyncWrite,
        fwd: impl Future<Output = io::Result<()>>,
    ) {
        let (up, down) = (payload(8 << 20, 1), payload(24 << 20, 2));
        let (to_engine, to_client, done) =
            tokio::join!(end(engine, down.clone()), end(client, up.clone()), fwd);
        done.expect("forwarding ends without error");
        assert!(
            to_engine == up,
            "client to engine: {} of {} bytes, or different",
            to_engine.len(),
            up.len()
        );
        assert!(
            to_client == down,
            "engine to client: {} of {} bytes, or different",
            to_client.len(),
            down.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_to_tcp_through_pipes() {
        let ((client, a), (b, engine)) = (tcp_pair().await, tcp_pair().await);
        both_ways(client, engine, bidirectional(&a, &b)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_to_unix_through_pipes() {
        let (client, a) = tcp_pair().await;
        let (b, engine) = UnixStream::pair().expect("pair");
        both_ways(client, engine, bidirectional(&a, &b)).await;
    }

    /// A small request and a small response, each followed by its end: passed on without a
    /// pipe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_exchange_without_pipes() {
        let ((client, a), (b, engine)) = (tcp_pair().await, tcp_pair().await);
        let (req, resp) = (payload(300, 4), payload(2000, 5));
        let (got_req, got_resp, done) = tokio::join!(
            end(engine, resp.clone()),
            end(client, req.clone()),
            bidirectional(&a, &b)
        );
        done.expect("forwarding ends without error");
        assert_eq!((got_req, got_resp), (req, resp));
    }

    /// Many small writes to an engine that reads nothing for a while: chunks its socket does
    /// not take wait in a buffer, and all arrive in order once it reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_writes_to_a_slow_reader() {
        let ((mut client, a), (b, mut engine)) = (tcp_pair().await, tcp_pair().await);
        let fwd = tokio::spawn(async move { bidirectional(&a, &b).await });
        let data = payload(6 << 20, 6);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for c in sent.chunks(1000) {
                client.write_all(c).await.expect("send");
                tokio::task::yield_now().await;
            }
            client.shutdown().await.expect("shutdown");
            client
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut got = Vec::new();
        engine.read_to_end(&mut got).await.expect("receive");
        assert!(
            got == data,
            "{} of {} bytes, or different",
            got.len(),
            data.len()
        );
        engine.shutdown().await.expect("shutdown");
        let mut client = writer.await.expect("writer");
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("the engine's end");
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), fwd).await;
        assert!(matches!(r, Ok(Ok(Ok(())))), "{r:?}");
    }

    /// What a direction does when no pipe can be made (out of descriptors): it copies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_to_unix_through_buffers() {
        let (client, a) = tcp_pair().await;
        let (b, engine) = UnixStream::pair().expect("pair");
        NO_PIPES.store(true, std::sync::atomic::Ordering::Relaxed);
        both_ways(client, engine, bidirectional(&a, &b)).await;
    }

    /// A peer that resets ends the forwarding with an error instead of a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_ends_the_connection() {
        let ((client, a), (b, mut engine)) = (tcp_pair().await, tcp_pair().await);
        let fwd = tokio::spawn(async move { bidirectional(&a, &b).await });
        engine.write_all(&payload(1 << 20, 3)).await.expect("send");
        client.set_zero_linger().expect("linger");
        drop(client);
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), fwd).await;
        assert!(matches!(r, Ok(Ok(Err(_)))), "{r:?}");
    }
}
