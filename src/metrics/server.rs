//! The `/metrics` endpoint: hyper's HTTP/1 server (hyper is already built for bollard's
//! client), one request per connection, bounded in every dimension:
//! - at most `max_connections` connections at once: the next one waits in the kernel's
//!   listen backlog until a slot frees (nothing is accepted that cannot be served);
//! - the request head within `header_timeout` and at most 8 KiB (hyper's smallest buffer):
//!   a slow or oversized client is cut off, its body is never read;
//! - the whole connection within `connection_timeout`.
//!
//! `GET /metrics` renders the snapshot the supervisor last published (an `Arc` clone out of the
//! `watch` channel, so the actor is never waited for); any other path is 404, any other
//! method on `/metrics` is 405.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;

use super::process::SelfStats;
use super::render::{Format, render};
use crate::state::Snapshot;

/// The smallest read buffer hyper allows: it bounds the request line and headers.
const MAX_REQUEST_HEAD: usize = 8192;

/// Bounds of the endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// A running endpoint; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` (an error here is the daemon's start-up error) and serves in a task.
    pub async fn start(
        addr: SocketAddr,
        state: watch::Receiver<Arc<Snapshot>>,
        limits: Limits,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(listener, state, limits, async {
            let _ = stopped.await;
        }));
        Ok(MetricsServer { addr, stop, task })
    }

    /// Stops accepting, aborts connections in flight, and waits for the task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Serves `listener` until `shutdown` resolves; then drops every open connection.
pub async fn run(
    listener: TcpListener,
    state: watch::Receiver<Arc<Snapshot>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: say so, give the system a moment, go on.
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        conns.spawn(async move {
            serve(stream, state, limits).await;
            drop(permit);
        });
    }
    conns.shutdown().await;
}

async fn serve(stream: TcpStream, state: watch::Receiver<Arc<Snapshot>>, limits: Limits) {
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let res = respond(&req, &state);
        async move { Ok::<_, Infallible>(res) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    match tokio::time::timeout(limits.connection_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("metrics: connection: {e}"),
        Err(_) => tracing::debug!(
            "metrics: connection cut off after {:?}",
            limits.connection_timeout
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn respond(
    req: &Request<Incoming>,
    state: &watch::Receiver<Arc<Snapshot>>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: only GET /metrics is served\n",
        );
    }
    if req.method() != Method::GET {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: only GET /metrics is served\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return r;
    }
    let format = Format::from_accept(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    // Clone the Arc and let go of the channel at once; rendering works on our own copy.
    // Rendering runs inline: 500 modules take about 2 ms (benches/metrics.rs).
    let snapshot = state.borrow().clone();
    match render(snapshot, SelfStats::read(), format) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        Err(e) => {
            tracing::error!("metrics: rendering failed: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_millis(300),
        connection_timeout: Duration::from_secs(2),
    };

    async fn server(limits: Limits) -> (MetricsServer, watch::Sender<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let s = MetricsServer::start("127.0.0.1:0".parse().expect("addr"), rx, limits)
            .await
            .expect("bind");
        (s, tx)
    }

    /// Sends `req` and reads until the server closes (bounded): the response text.
    async fn exchange(addr: SocketAddr, req: &[u8]) -> String {
        let fut = async {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(req).await.expect("write");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            String::from_utf8_lossy(&buf).into_owned()
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("the server answers and closes in time")
    }

    #[tokio::test]
    async fn get_metrics_only() {
        let (s, _tx) = server(LIMITS).await;
        let ok = exchange(s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("modvisor_manifest_errors 0"), "{ok}");
        let om = exchange(
            s.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n",
        )
        .await;
        assert!(
            om.contains("application/openmetrics-text") && om.ends_with("# EOF\n"),
            "{om}"
        );
        let nf = exchange(s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = exchange(
            s.addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("allow: GET"),
            "{post}"
        );
        s.stop().await;
    }

    #[tokio::test]
    async fn the_snapshot_published_last_is_served() {
        let (s, tx) = server(LIMITS).await;
        let mut snap = Snapshot::default();
        snap.manifest_errors.push(("a".into(), "b".into()));
        tx.send_replace(Arc::new(snap));
        let ok = exchange(s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.contains("modvisor_manifest_errors 1"), "{ok}");
        s.stop().await;
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused_unread() {
        let (s, _tx) = server(LIMITS).await;
        let mut req = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        req.extend(b"\r\n\r\n");
        let r = exchange(s.addr, &req).await;
        assert!(!r.contains("HTTP/1.1 200"), "{r}");
        s.stop().await;
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_and_connections_are_bounded() {
        let (s, _tx) = server(LIMITS).await;
        // Two silent clients take both slots; a third request waits for one to be cut off.
        let t0 = Instant::now();
        let mut silent = Vec::new();
        for _ in 0..LIMITS.max_connections {
            silent.push(TcpStream::connect(s.addr).await.expect("connect"));
        }
        let r = exchange(s.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let waited = t0.elapsed();
        assert!(waited >= LIMITS.header_timeout, "served after {waited:?}");
        for mut c in silent {
            let mut buf = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut buf))
                .await
                .expect("the silent client is closed");
            assert!(n.is_ok());
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn stop_ends_the_server_and_frees_the_port() {
        let (s, _tx) = server(LIMITS).await;
        let addr = s.addr;
        let _open = TcpStream::connect(addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(2), s.stop())
            .await
            .expect("stops at once, open connections included");
        TcpListener::bind(addr)
            .await
            .expect("the port is free again");
    }
}
