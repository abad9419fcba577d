//! The public address of a module: modvisord listens there for as long as the module exists
//! and forwards every connection, byte for byte, to the engine's `upstream` (no protocol
//! parsing). A connection that arrives while the engine is not serving asks for a start and is
//! held (up to `max_pending`; more are refused by closing them) until the engine is online, or
//! closed when the start fails. The supervisor tells the proxy through a [`Gate`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;

use crate::manifest::{ServeAddr, ServeSpec};

mod stream;
use stream::{Listener, Stream};

/// Whether connections may pass now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The engine serves: forward.
    Open,
    /// It starts (or will, on demand): hold.
    Wait,
    /// It will not serve (stopped, failed): close, with why.
    Closed(String),
}

/// What the proxy reports to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    /// A connection arrived while the engine was not serving (the peer's address).
    Demand(String),
    /// The number of open connections changed (at once for 0 <-> n, else at most 1/s).
    Connections(u32),
}

pub type Report = Arc<dyn Fn(ProxyEvent) + Send + Sync>;

/// Binds every listen address of `spec` and serves them; returns the tasks (abort them to stop
/// listening) or why an address cannot be bound.
pub fn listen(
    spec: &ServeSpec,
    gate: watch::Receiver<Gate>,
    report: Report,
    hold_limit: Duration,
) -> Result<Vec<AbortHandle>, String> {
    let open = Arc::new(Counter::default());
    let pending = Arc::new(Semaphore::new(spec.max_pending as usize));
    let mut tasks = Vec::new();
    for addr in &spec.listen {
        // The socket bound once for the address (kept across modvisord restarts by systemd).
        let l = crate::fdstore::listener(addr)
            .and_then(Listener::from_bound)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let ctx = Conn {
            upstream: spec.upstream.clone(),
            gate: gate.clone(),
            report: report.clone(),
            open: open.clone(),
            pending: pending.clone(),
            hold_limit,
        };
        tasks.push(tokio::spawn(accept_loop(l, ctx)).abort_handle());
    }
    tasks.push(tokio::spawn(count_reporter(open, report)).abort_handle());
    Ok(tasks)
}

#[derive(Clone)]
struct Conn {
    upstream: ServeAddr,
    gate: watch::Receiver<Gate>,
    report: Report,
    open: Arc<Counter>,
    pending: Arc<Semaphore>,
    hold_limit: Duration,
}

async fn accept_loop(l: Listener, ctx: Conn) {
    loop {
        let (sock, peer) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if ctx.open.n.fetch_add(1, Ordering::SeqCst) == 0 {
            ctx.open.reported.store(1, Ordering::SeqCst);
            (ctx.report)(ProxyEvent::Connections(1));
        } else {
            ctx.open.changed.notify_one();
        }
        let c = ctx.clone();
        tokio::spawn(async move {
            c.serve(sock, peer).await;
            if c.open.n.fetch_sub(1, Ordering::SeqCst) == 1 {
                c.open.reported.store(0, Ordering::SeqCst);
                (c.report)(ProxyEvent::Connections(0));
            } else {
                c.open.changed.notify_one();
            }
        });
    }
}

/// The open connections of a module's listen addresses.
#[derive(Default)]
struct Counter {
    n: AtomicU32,
    /// What the supervisor was told last.
    reported: AtomicU32,
    changed: tokio::sync::Notify,
}

/// Reports the count when it changed while connections stay open, at most once a second
/// (0 <-> n is reported at once by the connections themselves: the idle clock depends on it).
/// Sleeps while nothing changes: no wake-ups of an idle daemon.
async fn count_reporter(open: Arc<Counter>, report: Report) {
    loop {
        open.changed.notified().await;
        let now = open.n.load(Ordering::SeqCst);
        let told = open.reported.load(Ordering::SeqCst);
        if now > 0 && told > 0 && now != told {
            open.reported.store(now, Ordering::SeqCst);
            report(ProxyEvent::Connections(now));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Conn {
    async fn serve(&self, mut sock: Stream, peer: String) {
        if !self.wait_open(&peer).await {
            return; // dropped: the client sees the connection closed
        }
        let mut up = match stream::connect(&self.upstream).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("forwarding a connection from {peer}: {e}");
                return;
            }
        };
        stream::forward(&mut sock, &mut up).await;
    }

    /// Holds until the gate opens; false when it closes, the hold is too long, or too many wait.
    async fn wait_open(&self, peer: &str) -> bool {
        let mut gate = self.gate.clone();
        let initial = gate.borrow_and_update().clone();
        if initial == Gate::Open {
            return true;
        }
        let Ok(_permit) = self.pending.try_acquire() else {
            tracing::warn!(
                "refusing a connection from {peer}: too many held while the engine starts"
            );
            return false;
        };
        (self.report)(ProxyEvent::Demand(peer.to_string()));
        if let Gate::Closed(_) = initial {
            // A start on demand changes the gate at once; an unchanged one will not serve.
            match tokio::time::timeout(Duration::from_secs(2), gate.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
        let done = gate.wait_for(|g| *g != Gate::Wait);
        match tokio::time::timeout(self.hold_limit, done).await {
            Ok(Ok(g)) => *g == Gate::Open,
            _ => false,
        }
    }
}
