//! `org.modvisor1.Models` on `/org/modvisor1/models` (pull, list, remove models of the store)
//! and one `org.modvisor1.Job` object per pull at `/org/modvisor1/job/N`. Thin: the work is
//! in `crate::store`; pulls run in their own tasks, never in the supervisor's actor.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use zbus::fdo::Properties;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, interface};
use zbus::{OwnedVariant as OwnedValue, Variant as Value};

use super::authz::authorize;
use super::error::Error;
use super::text::clean;
use crate::state::{Snapshot, State};
use crate::store::{Job, JobState, PullOptions, Puller, Record, StoreError};

pub const MODELS_PATH: &str = "/org/modvisor1/models";
pub const JOB_IFACE: &str = "org.modvisor1.Job";
/// PropertiesChanged of a job at most this often.
const EMIT_EVERY: Duration = Duration::from_millis(250);
/// A finished job's object stays this long for late readers.
const KEEP_FINISHED: Duration = Duration::from_secs(300);

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(s) => Error::InvalidArgument(clean(&s)),
            StoreError::NotFound(s) => Error::InvalidArgument(clean(&s)),
            StoreError::Busy(s) => Error::Busy(clean(&s)),
            StoreError::Failed(s) => Error::Failed(clean(&s)),
        }
    }
}

/// (id, source, revision, path, size, date, architecture, file_type, parameters,
/// context_length, modules using it)
pub type ModelRow = (
    String,
    String,
    String,
    String,
    u64,
    u64,
    String,
    String,
    u64,
    u64,
    Vec<String>,
);

pub struct Models {
    puller: Arc<Puller>,
    state: watch::Receiver<Arc<Snapshot>>,
}

pub fn job_path(n: u64) -> String {
    format!("/org/modvisor1/job/{n}")
}

impl Models {
    /// Modules whose active model is this record's file: (name, running).
    /// Every file of the record counts (another GGUF of a Hugging Face snapshot too).
    fn users(&self, r: &Record) -> Vec<(String, bool)> {
        let store = self.puller.store();
        let snap = self.state.borrow().clone();
        snap.modules
            .values()
            .filter(|m| {
                !m.active_model.is_empty()
                    && store.used_by(r, std::path::Path::new(&m.active_model))
            })
            .map(|m| {
                let running = matches!(m.state, State::Running | State::Starting);
                (m.name.clone(), running)
            })
            .collect()
    }

    fn row(&self, r: &Record) -> ModelRow {
        let path = self.puller.store().main_file(r).unwrap_or_default();
        let g = r
            .files
            .iter()
            .find_map(|f| f.gguf.clone())
            .unwrap_or_default();
        (
            clean(&r.id),
            clean(&r.source),
            clean(&r.revision),
            clean(&path.display().to_string()),
            r.size(),
            r.date,
            clean(&g.architecture),
            clean(&g.file_type),
            g.parameters,
            g.context_length,
            self.users(r).into_iter().map(|(n, _)| n).collect(),
        )
    }
}

fn opt_bool(o: &HashMap<String, OwnedValue>, k: &str) -> Result<bool, Error> {
    match o.get(k).map(|v| bool::try_from(v.clone())) {
        None => Ok(false),
        Some(Ok(b)) => Ok(b),
        Some(Err(_)) => Err(Error::InvalidArgument(format!(
            "option {k}: expected a boolean"
        ))),
    }
}

fn opt_str(o: &HashMap<String, OwnedValue>, k: &str) -> Result<Option<String>, Error> {
    match o.get(k).map(|v| String::try_from(v.clone())) {
        None => Ok(None),
        Some(Ok(s)) => Ok(Some(s)),
        Some(Err(_)) => Err(Error::InvalidArgument(format!(
            "option {k}: expected a string"
        ))),
    }
}

/// A string or an array of strings.
fn opt_strs(o: &HashMap<String, OwnedValue>, k: &str) -> Result<Vec<String>, Error> {
    let Some(v) = o.get(k) else {
        return Ok(Vec::new());
    };
    if let Ok(s) = String::try_from(v.clone()) {
        return Ok(vec![s]);
    }
    Vec::<String>::try_from(v.clone())
        .map_err(|_| Error::InvalidArgument(format!("option {k}: expected strings")))
}

#[interface(name = "org.modvisor1.Models")]
impl Models {
    /// Starts a pull (or joins the one under way for the same model) and returns its job.
    /// Options: `yes` or `confirm` (b), `sha256` (s), `include` (as or s: globs, hf: only).
    async fn pull(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        source: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, Error> {
        authorize(conn, &hdr, "Pull").await?;
        for k in options.keys() {
            if !matches!(k.as_str(), "yes" | "confirm" | "sha256" | "include") {
                return Err(Error::InvalidArgument(format!("unknown option {k}")));
            }
        }
        let opts = PullOptions {
            yes: opt_bool(&options, "yes")? || opt_bool(&options, "confirm")?,
            sha256: opt_str(&options, "sha256")?,
            include: opt_strs(&options, "include")?,
        };
        let (job, joined) = self.puller.pull(source, opts)?;
        let path = job_path(job.number);
        if !joined {
            let obj = JobObject { job: job.clone() };
            conn.object_server().at(path.as_str(), obj).await?;
            tokio::spawn(follow(conn.clone(), path.clone(), job));
        }
        OwnedObjectPath::try_from(path).map_err(|e| Error::Failed(e.to_string()))
    }

    /// Removes a model; refused while a running module uses it, unless `force`.
    async fn remove(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        model: &str,
        force: bool,
    ) -> Result<(), Error> {
        authorize(conn, &hdr, "Remove").await?;
        let store = self.puller.store().clone();
        let id = crate::store::normalize(model)?;
        if self.puller.pulling(&id) {
            return Err(Error::Busy(format!("{id} is being pulled")));
        }
        let r = store
            .get(&id)
            .ok_or_else(|| Error::InvalidArgument(format!("{id} is not in the model store")))?;
        let running: Vec<String> = self
            .users(&r)
            .into_iter()
            .filter_map(|(n, run)| run.then_some(n))
            .collect();
        if !running.is_empty() && !force {
            return Err(Error::Busy(format!(
                "{id} is the active model of running module(s) {}: stop them or use --force",
                running.join(", ")
            )));
        }
        tokio::task::spawn_blocking(move || store.remove(&id))
            .await
            .map_err(|e| Error::Failed(e.to_string()))??;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ModelRow>, Error> {
        let store = self.puller.store().clone();
        let records = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| Error::Failed(e.to_string()))?;
        Ok(records.iter().map(|r| self.row(r)).collect())
    }
}

pub struct JobObject {
    job: Arc<Job>,
}

#[interface(name = "org.modvisor1.Job")]
impl JobObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        clean(&self.job.model)
    }
    #[zbus(property)]
    fn state(&self) -> String {
        self.job.status.borrow().state.as_str().to_string()
    }
    #[zbus(property)]
    fn bytes_done(&self) -> u64 {
        self.job.status.borrow().done
    }
    #[zbus(property)]
    fn bytes_total(&self) -> u64 {
        self.job.status.borrow().total
    }
    #[zbus(property)]
    fn progress(&self) -> f64 {
        progress(&self.job.status.borrow())
    }
    #[zbus(property)]
    fn error(&self) -> String {
        clean(&self.job.status.borrow().error)
    }

    async fn cancel(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        authorize(conn, &hdr, "Cancel").await?;
        self.job.cancel();
        Ok(())
    }

    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, state: &str, error: &str) -> zbus::Result<()>;
}

fn progress(s: &crate::store::JobStatus) -> f64 {
    if s.state == JobState::Completed {
        1.0
    } else if s.total == 0 {
        0.0
    } else {
        (s.done as f64 / s.total as f64).min(1.0)
    }
}

/// Mirrors a job's status onto the bus (at most every 250 ms), then `Finished`; the object
/// goes after a while.
async fn follow(conn: Connection, path: String, job: Arc<Job>) {
    let mut rx = job.status.clone();
    loop {
        let s = rx.borrow_and_update().clone();
        let body: HashMap<&str, Value<'_>> = HashMap::from([
            ("State", Value::from(s.state.as_str())),
            ("BytesDone", Value::from(s.done)),
            ("BytesTotal", Value::from(s.total)),
            ("Progress", Value::from(progress(&s))),
            ("Error", Value::from(clean(&s.error))),
        ]);
        let Ok(em) = SignalEmitter::new(&conn, path.clone()) else {
            return;
        };
        let iface = InterfaceName::from_static_str_unchecked(JOB_IFACE);
        if let Err(e) = Properties::properties_changed(&em, iface, body, Cow::Borrowed(&[])).await {
            tracing::debug!("job {path}: PropertiesChanged: {e}");
        }
        if s.state.finished() {
            let _ = JobObject::finished(&em, s.state.as_str(), &clean(&s.error)).await;
            break;
        }
        tokio::time::sleep(EMIT_EVERY).await;
        if rx.changed().await.is_err() && !rx.borrow().state.finished() {
            break;
        }
    }
    tokio::time::sleep(KEEP_FINISHED).await;
    let _ = conn
        .object_server()
        .remove::<JobObject, _>(path.as_str())
        .await;
}

/// Registers `org.modvisor1.Models` on `conn`.
pub async fn serve(
    conn: &Connection,
    puller: Arc<Puller>,
    state: watch::Receiver<Arc<Snapshot>>,
) -> zbus::Result<()> {
    conn.object_server()
        .at(MODELS_PATH, Models { puller, state })
        .await?;
    Ok(())
}

/// Client proxies (modvisorctl, tests).
pub mod proxy {
    use std::collections::HashMap;

    use zbus::{OwnedObjectPath, Variant, proxy};

    use super::ModelRow;

    #[proxy(
        interface = "org.modvisor1.Models",
        default_service = "org.modvisor1",
        default_path = "/org/modvisor1/models"
    )]
    pub trait Models {
        fn pull(
            &self,
            source: &str,
            options: HashMap<&str, Variant<'_>>,
        ) -> zbus::Result<OwnedObjectPath>;
        fn remove(&self, model: &str, force: bool) -> zbus::Result<()>;
        fn list(&self) -> zbus::Result<Vec<ModelRow>>;
    }

    #[proxy(interface = "org.modvisor1.Job", default_service = "org.modvisor1")]
    pub trait Job {
        fn cancel(&self) -> zbus::Result<()>;
        #[zbus(property)]
        fn model(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn state(&self) -> zbus::Result<String>;
        #[zbus(property)]
        fn bytes_done(&self) -> zbus::Result<u64>;
        #[zbus(property)]
        fn bytes_total(&self) -> zbus::Result<u64>;
        #[zbus(property)]
        fn progress(&self) -> zbus::Result<f64>;
        #[zbus(property)]
        fn error(&self) -> zbus::Result<String>;
        #[zbus(signal)]
        fn finished(&self, state: String, error: String) -> zbus::Result<()>;
    }
}
