//! The public address of a module: modvisord listens there for as long as the module exists
//! and forwards every connection, byte for byte, to the engine's `upstream` (no protocol
//! parsing). A connection that arrives while the engine is not serving asks for a start and is
//! held (up to `max_pending`; more are refused by closing them) until the engine is online, or
//! closed when the start fails. The supervisor tells the proxy through a [`Gate`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;

use crate::manifest::{ServeAddr, ServeSpec};

mod count;
mod splice;
mod stream;
pub use count::Counter;
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
    /// The number of open connections changed (see count.rs for when it is told).
    Connections(u32),
}

pub type Report = Arc<dyn Fn(ProxyEvent) + Send + Sync>;

/// What serves a module's listen addresses.
pub struct Listening {
    /// Abort them to stop listening.
    pub tasks: Vec<AbortHandle>,
    /// The connections open right now (the supervisor hears of changes a moment later).
    pub open: Arc<Counter>,
}

/// Binds every listen address of `spec` and serves them, or says why an address cannot be
/// bound.
pub fn listen(
    spec: &ServeSpec,
    gate: watch::Receiver<Gate>,
    report: Report,
    hold_limit: Duration,
) -> Result<Listening, String> {
    let open = Arc::new(Counter::new(report.clone()));
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
    let counter = open.clone();
    tasks.push(tokio::spawn(async move { counter.report_changes().await }).abort_handle());
    Ok(Listening { tasks, open })
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
        ctx.open.opened();
        let c = ctx.clone();
        tokio::spawn(async move {
            c.serve(sock, peer).await;
            c.open.closed();
        });
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
