//! TCP or Unix: the listeners and connections of the proxy, and moving bytes between two.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::splice;
use crate::fdstore::Bound;
use crate::manifest::ServeAddr;

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    /// Registers a socket bound (or kept) by `fdstore` with the runtime.
    pub fn from_bound(b: Bound) -> std::io::Result<Listener> {
        match b {
            Bound::Tcp(l) => {
                l.set_nonblocking(true)?;
                TcpListener::from_std(l).map(Listener::Tcp)
            }
            Bound::Unix(l) => {
                l.set_nonblocking(true)?;
                UnixListener::from_std(l).map(Listener::Unix)
            }
        }
    }

    /// The next connection and who it is from ("127.0.0.1:50312", "uid 1000 (pid 4242)").
    pub async fn accept(&self) -> std::io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let peer = match s.peer_cred() {
                    Ok(c) => match c.pid() {
                        Some(pid) => format!("uid {} (pid {pid})", c.uid()),
                        None => format!("uid {}", c.uid()),
                    },
                    Err(_) => "a local client".to_string(),
                };
                Ok((Stream::Unix(s), peer))
            }
        }
    }
}

/// Connects to the engine; a fresh engine may accept a moment after it reports running.
pub async fn connect(addr: &ServeAddr) -> std::io::Result<Stream> {
    let mut last = None;
    for _ in 0..50 {
        let attempt = match addr {
            ServeAddr::Tcp(a) => TcpStream::connect(a).await.map(|s| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
            ServeAddr::Unix(p) => UnixStream::connect(p).await.map(Stream::Unix),
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
}

/// Moves bytes both ways until both sides are done (see splice.rs).
pub async fn forward(a: &mut Stream, b: &mut Stream) {
    // An error ends the connection: the caller drops both sockets.
    let _ = match (&*a, &*b) {
        (Stream::Tcp(a), Stream::Tcp(b)) => splice::bidirectional(a, b).await,
        (Stream::Tcp(a), Stream::Unix(b)) => splice::bidirectional(a, b).await,
        (Stream::Unix(a), Stream::Tcp(b)) => splice::bidirectional(a, b).await,
        (Stream::Unix(a), Stream::Unix(b)) => splice::bidirectional(a, b).await,
    };
}
