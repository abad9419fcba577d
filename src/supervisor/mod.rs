//! The supervisor: one actor that owns the module table.
//!
//! Everything else sends it [`Command`]s and watches the [`Snapshot`] it publishes. Each
//! module's lifecycle is a pure state machine (`module.rs`); the actor (`actor.rs`) routes
//! inputs to it and carries out its effects (`effects.rs`). Nothing in the actor blocks:
//! starts, stops, model checks and journal lookups run in tasks and come back as inputs.
//!
//! | file           | one job                                                         |
//! |----------------|-----------------------------------------------------------------|
//! | module.rs      | the lifecycle state machine (+ module/events.rs, activate.rs)   |
//! | run.rs         | one run: what backend progress and probe results show           |
//! | restart.rs     | the restart budget and the decision after an exit               |
//! | failure.rs     | what kind of failure ended a run: configuration, resource, crash |
//! | activation.rs  | model activation as a sub-machine                               |
//! | reconcile.rs   | the pure diff of old and new manifests                          |
//! | resources.rs   | RAM/VRAM thresholds                                             |
//! | slots.rs       | the module table, marking each module touched since publishing  |
//! | snapshot.rs    | the projection into the published `Snapshot`                    |
//! | explain.rs     | the `Explain` text                                              |
//! | actor.rs       | the table, routing, publishing                                  |
//! | effects.rs     | carrying out effects: backends, probes, timers, lookups         |

mod activation;
mod actor;
mod admission_slot;
mod admit;
mod commands;
mod effects;
mod explain;
pub mod failure;
pub mod module;
mod reconcile;
mod resources;
pub mod restart;
mod run;
mod sampler;
mod sampling;
mod slots;
mod snapshot;
mod table;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use crate::runtime::{Backend, Owned};
use crate::state::Snapshot;

pub use actor::spawn;
pub use restart::RestartBudget;

/// Identifies a pending reply to a command, inside the state machine.
pub type ReplyId = u64;

/// Stable journal MESSAGE_IDs.
pub const MSG_STATE_CHANGED: &str = "5e1b0a3c7d2f4e6a9b8c1d0e2f3a4b5c";
pub const MSG_MANIFEST_ERROR: &str = "8a7c2e1f0b3d4c5e6f7a8b9c0d1e2f3a";
pub const MSG_FOREIGN_GPU: &str = "e7f8091a2b3c4d5e6f708192a3b4c5d6";
pub const MSG_MODEL_ACTIVATION: &str = "c3d4e5f60718293a4b5c6d7e8f901a2b";

/// Errors of operations, mapped 1:1 to `org.modvisor1.Error.*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NoSuchModule(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

type Reply<T> = oneshot::Sender<Result<T, OpError>>;

/// What the outside asks of the supervisor.
pub enum Command {
    Start(String, Reply<()>),
    Stop(String, Reply<()>),
    Restart(String, Reply<()>),
    Reload(oneshot::Sender<Vec<(String, String)>>),
    SetModeOverride(String, String, Reply<()>),
    Explain(String, Reply<String>),
    /// The module's recent output lines numbered above `after` (the last `max`), with the
    /// newest number.
    Output {
        name: String,
        after: u64,
        max: usize,
        reply: Reply<(u64, Vec<String>)>,
    },
    ActivateModel(String, String, Reply<()>),
    /// Answered when the actor's loop is alive (watchdog).
    Ping(oneshot::Sender<()>),
    /// Stop every module, then end the actor.
    Shutdown(oneshot::Sender<()>),
}

/// A client's handle on the supervisor.
#[derive(Clone)]
pub struct Handle {
    pub commands: mpsc::Sender<Command>,
    pub state: watch::Receiver<Arc<Snapshot>>,
    /// What the Manager signals besides state: model activation steps, evictions.
    pub signals: tokio::sync::broadcast::Sender<ManagerSignal>,
}

/// One step of a model activation: (module, model, step, detail).
pub type ActivationStep = (String, String, String, String);

/// A Manager signal the supervisor raises (the Publisher sends it after the state it follows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerSignal {
    /// ModelActivation(name, model, step, detail).
    Activation(ActivationStep),
    /// ModuleEvicted(name, by, reason).
    Evicted {
        name: String,
        by: String,
        reason: String,
    },
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, OpError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| OpError::Failed("the supervisor has stopped".into()))?;
        rx.await
            .map_err(|_| OpError::Failed("the supervisor dropped the request".into()))?
    }
    pub async fn start(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Start(name.into(), r)).await
    }
    pub async fn stop(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Stop(name.into(), r)).await
    }
    pub async fn restart(&self, name: &str) -> Result<(), OpError> {
        self.ask(|r| Command::Restart(name.into(), r)).await
    }
    pub async fn set_mode_override(&self, name: &str, mode: &str) -> Result<(), OpError> {
        self.ask(|r| Command::SetModeOverride(name.into(), mode.into(), r))
            .await
    }
    pub async fn explain(&self, name: &str) -> Result<String, OpError> {
        self.ask(|r| Command::Explain(name.into(), r)).await
    }
    pub async fn output(
        &self,
        name: &str,
        after: u64,
        max: usize,
    ) -> Result<(u64, Vec<String>), OpError> {
        self.ask(|reply| Command::Output {
            name: name.into(),
            after,
            max,
            reply,
        })
        .await
    }
    pub async fn activate_model(&self, name: &str, model: &str) -> Result<(), OpError> {
        self.ask(|r| Command::ActivateModel(name.into(), model.into(), r))
            .await
    }
    pub async fn reload(&self) -> Result<Vec<(String, String)>, OpError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Reload(tx))
            .await
            .map_err(|_| OpError::Failed("the supervisor has stopped".into()))?;
        rx.await
            .map_err(|_| OpError::Failed("the supervisor dropped the request".into()))
    }
}

/// A run of ours found at start-up, with the backend that runs it.
pub type Found = (Arc<dyn Backend>, Owned);

/// The backends the supervisor can run modules with.
pub struct Backends {
    pub native: Option<Arc<dyn Backend>>,
    /// The container engine, or why there is none ("no container engine answers (...)").
    pub container: Result<Arc<dyn Backend>, String>,
    /// "podman 4.3.1", "docker 20.10.24" or "".
    pub container_engine: String,
}
