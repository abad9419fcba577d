//! Pull jobs: one per model at a time (a second request joins the first), a bounded number
//! running at once, each driving one fetcher child; then modvisord takes every file over
//! (adopt.rs: through a checked descriptor, into a copy of its own), verifies the copy's
//! sha256 and only then moves it into the store and writes the record. The fetcher also
//! parses the GGUF headers (remote data, so never as root); modvisord only bounds what it
//! reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::adopt::{self, Staged};
use super::source::{check_scheme, safe_file_name, safe_rel_path, valid_sha256};
use super::wire::{MAX_UNHASHED, Msg, PlanFile, Request, Wire, part_name};
use super::{FileRecord, Record, Source, Store, StoreError, gguf};
use crate::manifest::units::format_bytes;

/// Pulls (fetcher children) running at once; more wait in `queued`.
const RUNNING_AT_ONCE: usize = 2;
/// Without a quota, the most bytes a file of unannounced size may have.
const UNANNOUNCED_LIMIT: u64 = 1 << 40;
/// The longest line the fetcher may send (a plan of 1000 files fits many times over).
const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Confirms a pull above `confirm_above`.
    pub yes: bool,
    /// The sha256 of a URL source (instead of `#sha256=`).
    pub sha256: Option<String>,
    /// Globs of the files of a Hugging Face repository to pull (all when empty).
    pub include: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobState {
    #[default]
    Queued,
    Running,
    Verifying,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Verifying => "verifying",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct JobStatus {
    pub state: JobState,
    pub done: u64,
    pub total: u64,
    pub error: String,
}

pub struct Job {
    pub number: u64,
    /// The store id of the model.
    pub model: String,
    pub status: watch::Receiver<JobStatus>,
    cancel: CancellationToken,
}

impl Job {
    /// Stops the download; complete files and the partial one (for a resume) stay.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

pub struct Puller {
    store: Arc<Store>,
    fetcher: PathBuf,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    next: AtomicU64,
    slots: Arc<Semaphore>,
}

type Tx = watch::Sender<JobStatus>;

/// What the fetcher delivered, checked: the plan, for a Hugging Face source the commit, the
/// GGUF headers it parsed (bounded) by file name, and the size limit of unannounced files.
#[derive(Default)]
struct Fetched {
    plan: Vec<PlanFile>,
    commit: Option<String>,
    headers: HashMap<String, gguf::GgufInfo>,
    limit: u64,
}

impl Puller {
    /// `fetcher`: the `modvisor-fetch` executable.
    pub fn new(store: Arc<Store>, fetcher: PathBuf) -> Arc<Puller> {
        Arc::new(Puller {
            store,
            fetcher,
            jobs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            slots: Arc::new(Semaphore::new(RUNNING_AT_ONCE)),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a pull of this id is under way.
    pub fn pulling(&self, id: &str) -> bool {
        self.jobs().contains_key(id)
    }

    /// Starts a pull, or joins the one under way for the same model (then `true`).
    pub fn pull(
        self: &Arc<Self>,
        raw: &str,
        opts: PullOptions,
    ) -> Result<(Arc<Job>, bool), StoreError> {
        let src = Source::parse(raw, opts.sha256.as_deref())?.with_include(&opts.include)?;
        let id = src.id();
        let mut jobs = self.jobs();
        if let Some(j) = jobs.get(&id) {
            return Ok((j.clone(), true));
        }
        let (tx, rx) = watch::channel(JobStatus::default());
        let job = Arc::new(Job {
            number: self.next.fetch_add(1, Ordering::Relaxed),
            model: id.clone(),
            status: rx,
            cancel: CancellationToken::new(),
        });
        jobs.insert(id, job.clone());
        let me = self.clone();
        let (j, raw) = (job.clone(), raw.to_string());
        tokio::spawn(async move { me.run(j, src, raw, opts, tx).await });
        Ok((job, false))
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, src: Source, raw: String, o: PullOptions, tx: Tx) {
        let r = self.attempt(&job.cancel, &src, &raw, &o, &tx).await;
        let id = src.id();
        self.jobs().remove(&id);
        tx.send_modify(|s| match r {
            Ok(()) => s.state = JobState::Completed,
            Err(None) => s.state = JobState::Cancelled,
            Err(Some(e)) => {
                s.state = JobState::Failed;
                s.error = e.to_string();
            }
        });
        let s = tx.borrow().clone();
        match s.state {
            JobState::Completed => {
                tracing::info!(modvisor_model = %id, "pulled {id} ({})", format_bytes(s.total))
            }
            st => tracing::warn!(modvisor_model = %id, "pull of {id} {}: {}", st.as_str(), s.error),
        }
    }

    /// `Err(None)`: cancelled.
    async fn attempt(
        &self,
        cancel: &CancellationToken,
        src: &Source,
        raw: &str,
        o: &PullOptions,
        tx: &Tx,
    ) -> Result<(), Option<StoreError>> {
        let _permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.map_err(|e| Some(StoreError::Failed(e.to_string())))?,
            _ = cancel.cancelled() => return Err(None),
        };
        tx.send_modify(|s| s.state = JobState::Running);
        let id = src.id();
        // A file by content digest that is already here needs no second download.
        if let (Source::Url { .. }, Some(r)) = (src, self.store.get(&id)) {
            tx.send_modify(|s| (s.done, s.total) = (r.size(), r.size()));
            return Ok(());
        }
        let part = self.store.partial_dir(&id);
        let user = fetch_identity(self.store.settings.fetch_user.as_deref())?;
        // Who must own the fetcher's files (the fetch user; ourselves when we are not root).
        let owner = user.map_or_else(|| nix::unistd::geteuid().as_raw(), |(u, _)| u);
        let (root, p2) = (self.store.root().to_path_buf(), part.clone());
        blocking(move || prepare_dirs(&root, &p2, user)).await?;
        let req = Request {
            source: self.wire(src)?,
            dir: part.clone(),
            limit: self.remaining().unwrap_or(UNANNOUNCED_LIMIT),
            model: id.clone(),
        };
        let limit = req.limit;
        let fetched = match self.fetch(cancel, req, o, user, tx).await {
            Err(e) => {
                let _ = std::fs::remove_dir(&part); // only when empty
                return Err(e);
            }
            Ok(f) => Fetched { limit, ..f },
        };
        if fetched.plan.is_empty() {
            let _ = std::fs::remove_dir(&part);
            return Ok(());
        }
        tx.send_modify(|s| s.state = JobState::Verifying);
        let (store, src, raw) = (self.store.clone(), src.clone(), raw.to_string());
        let to = Target {
            src,
            raw,
            commit: fetched.commit.clone(),
            owner,
        };
        blocking(move || install(&store, &to, &fetched, &part))
            .await
            .map_err(Some)
    }

    fn wire(&self, src: &Source) -> Result<Wire, StoreError> {
        Ok(match src {
            Source::Ollama { name, tag } => {
                let reg = &self.store.settings.ollama_registry;
                let u = reqwest::Url::parse(reg).map_err(|e| {
                    StoreError::Invalid(format!("models.ollama_registry {reg}: {e}"))
                })?;
                check_scheme(&u)?;
                Wire::Ollama {
                    registry: reg.clone(),
                    name: name.clone(),
                    tag: tag.clone(),
                }
            }
            Source::Url { url, file, sha256 } => Wire::Url {
                url: url.clone(),
                file: file.clone(),
                sha256: sha256.clone(),
            },
            Source::Hf {
                repo,
                revision,
                include,
            } => {
                let ep = &self.store.settings.hf_endpoint;
                let u = reqwest::Url::parse(ep)
                    .map_err(|e| StoreError::Invalid(format!("models.hf_endpoint {ep}: {e}")))?;
                check_scheme(&u)?;
                Wire::Hf {
                    endpoint: ep.clone(),
                    repo: repo.clone(),
                    revision: revision.clone(),
                    include: include.clone(),
                    token: self.token()?,
                }
            }
        })
    }

    /// The Hugging Face token, from a file only root can read; never logged.
    fn token(&self) -> Result<Option<String>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let Some(p) = &self.store.settings.hf_token_file else {
            return Ok(None);
        };
        let bad =
            |m: String| StoreError::Failed(format!("models.hf_token_file {}: {m}", p.display()));
        let meta = std::fs::metadata(p).map_err(|e| bad(e.to_string()))?;
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(bad(
                "must be owned by root and readable by nobody else (0600)".into(),
            ));
        }
        let t = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("expected one token".into()));
        }
        Ok(Some(t.to_string()))
    }

    /// Runs the fetcher child to the end; returns the checked plan.
    async fn fetch(
        &self,
        cancel: &CancellationToken,
        req: Request,
        o: &PullOptions,
        user: Option<(u32, u32)>,
        tx: &Tx,
    ) -> Result<Fetched, Option<StoreError>> {
        let failed = |m: String| Some(StoreError::Failed(m));
        let wire = req.source.clone();
        let mut child = spawn_fetcher(&self.fetcher, user)
            .map_err(|e| failed(format!("cannot start {}: {e}", self.fetcher.display())))?;
        let pid = child.id();
        let r = tokio::select! {
            r = self.converse(&mut child, &req, &wire, o, tx) => r,
            _ = cancel.cancelled() => Err(None),
        };
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        if let Some(p) = pid {
            crate::reaper::forget(p);
        }
        r
    }

    async fn converse(
        &self,
        child: &mut tokio::process::Child,
        req: &Request,
        wire: &Wire,
        o: &PullOptions,
        tx: &Tx,
    ) -> Result<Fetched, Option<StoreError>> {
        let failed = |m: String| Some(StoreError::Failed(m));
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| failed("no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no stdout".into()))?;
        let line = serde_json::to_string(req).map_err(|e| failed(e.to_string()))?;
        let io = |e: std::io::Error| failed(format!("the fetcher: {e}"));
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(io)?;
        let mut out = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut plan: Option<Vec<PlanFile>> = None;
        let mut commit = None;
        let mut headers = HashMap::new();
        while read_line_bounded(&mut out, &mut line, MAX_LINE)
            .await
            .map_err(io)?
        {
            let msg: Msg = serde_json::from_slice(&line)
                .map_err(|e| failed(format!("the fetcher said something unexpected: {e}")))?;
            match msg {
                Msg::Plan(p) => {
                    check_plan(wire, &p)?;
                    let total: u64 = p.iter().filter_map(|f| f.size).sum();
                    tx.send_modify(|s| s.total = total);
                    if self.unchanged(&req.model, &p, commit.as_deref()) {
                        tx.send_modify(|s| s.done = total);
                        // An empty plan (never a checked one): nothing to install.
                        return Ok(Fetched {
                            commit,
                            ..Fetched::default()
                        });
                    }
                    self.admit(total, &req.dir, o)?;
                    stdin.write_all(b"go\n").await.map_err(io)?;
                    plan = Some(p);
                }
                Msg::Revision(c) => commit = Some(c),
                Msg::Progress(n) => tx.send_modify(|s| s.done = n),
                Msg::Gguf { name, info, error } => {
                    let p = plan.as_deref().unwrap_or_default();
                    take_header(p, &mut headers, name, info, error)?;
                }
                Msg::Error(e) => return Err(failed(e)),
                Msg::Done => {
                    let plan = plan.ok_or_else(|| failed("the fetcher sent no plan".into()))?;
                    return Ok(Fetched {
                        plan,
                        commit,
                        headers,
                        limit: 0,
                    });
                }
            }
        }
        Err(failed("the fetcher ended without a result".into()))
    }

    /// Whether the store already holds exactly what the plan names (same digests, same commit).
    fn unchanged(&self, id: &str, plan: &[PlanFile], commit: Option<&str>) -> bool {
        let Some(r) = self.store.get(id) else {
            return false;
        };
        let dir = self.store.root().join(&r.dir);
        commit.is_none_or(|c| c == r.revision)
            && r.files.len() == plan.len()
            && plan.iter().all(|f| {
                // A file without a digest is pinned by the commit (which matched) alone.
                let same = |x: &FileRecord| {
                    x.name == f.name
                        && (x.sha256 == f.sha256 || (f.sha256.is_empty() && commit.is_some()))
                };
                r.files.iter().any(same) && dir.join(&f.name).exists()
            })
    }

    /// Bytes left under `max_disk`.
    fn remaining(&self) -> Option<u64> {
        let max = self.store.settings.max_disk?;
        Some(max.saturating_sub(self.store.usage()))
    }

    /// Quota and confirmation, before any byte is downloaded.
    fn admit(&self, total: u64, part: &Path, o: &PullOptions) -> Result<(), StoreError> {
        let s = &self.store.settings;
        if let Some(max) = s.max_disk {
            let have = super::dir_size(part, 0);
            let used = self.store.usage();
            if used + total.saturating_sub(have) > max {
                return Err(StoreError::Invalid(format!(
                    "refused: the pull needs {}, the store holds {} of models.max_disk {}",
                    format_bytes(total),
                    format_bytes(used),
                    format_bytes(max)
                )));
            }
        }
        if let Some(c) = s.confirm_above
            && total > c
            && !o.yes
        {
            return Err(StoreError::Invalid(format!(
                "the pull is {}, more than models.confirm_above {}: confirm it (--yes)",
                format_bytes(total),
                format_bytes(c)
            )));
        }
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed(format!("did not finish: {e}"))))
}

/// The fetcher's plan is remote data passed through: names must stay in their directory and
/// a URL source's file must be the one asked for.
fn check_plan(wire: &Wire, p: &[PlanFile]) -> Result<(), StoreError> {
    if p.is_empty() || p.len() > 1000 {
        return Err(StoreError::Failed(
            "the source lists no files (or too many)".into(),
        ));
    }
    let hf = matches!(wire, Wire::Hf { .. });
    for f in p {
        let name_ok = if hf {
            safe_rel_path(&f.name)
        } else {
            safe_file_name(&f.name)
        };
        // Only small non-LFS files of a Hugging Face repository come without a sha256.
        let unhashed_ok = hf && f.size.is_some_and(|s| s <= MAX_UNHASHED);
        let sha_ok = valid_sha256(&f.sha256) || (f.sha256.is_empty() && unhashed_ok);
        if !name_ok || !sha_ok {
            return Err(StoreError::Failed(format!(
                "the source names an unsafe file \"{}\" or digest: refused",
                f.name.escape_debug()
            )));
        }
    }
    if let Wire::Url { file, sha256, .. } = wire
        && (p.len() != 1 || &p[0].name != file || &p[0].sha256 != sha256)
    {
        return Err(StoreError::Failed(
            "the fetcher's plan does not match the URL".into(),
        ));
    }
    Ok(())
}

/// The user the fetcher runs as (when we are root): `fetch_user`, else `modvisor-engine`,
/// else `nobody`; never one with uid or gid 0.
fn fetch_identity(name: Option<&str>) -> Result<Option<(u32, u32)>, StoreError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let names: Vec<&str> = match name {
        Some(n) => vec![n],
        None => vec!["modvisor-engine", "nobody"],
    };
    for n in &names {
        if let Ok(Some(u)) = nix::unistd::User::from_name(n) {
            if u.uid.is_root() || u.gid.as_raw() == 0 {
                return Err(StoreError::Failed(format!(
                    "the fetch user {n} has uid or gid 0: the fetcher never runs as root"
                )));
            }
            return Ok(Some((u.uid.as_raw(), u.gid.as_raw())));
        }
    }
    Err(StoreError::Failed(format!(
        "no user for the fetcher: none of {names:?} exists"
    )))
}

/// The store and `.partial` readable by all; the job's partial directory owned by the fetcher.
fn prepare_dirs(root: &Path, part: &Path, user: Option<(u32, u32)>) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let f = |p: &Path, e: std::io::Error| StoreError::Failed(format!("{}: {e}", p.display()));
    for d in [
        root.to_path_buf(),
        root.join(".partial"),
        part.to_path_buf(),
    ] {
        std::fs::create_dir_all(&d).map_err(|e| f(&d, e))?;
    }
    for d in [root, &root.join(".partial")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).map_err(|e| f(d, e))?;
    }
    if let Some((u, g)) = user {
        std::os::unix::fs::chown(part, Some(u), Some(g)).map_err(|e| f(part, e))?;
        std::fs::set_permissions(part, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| f(part, e))?;
    }
    Ok(())
}

fn spawn_fetcher(exe: &Path, user: Option<(u32, u32)>) -> std::io::Result<tokio::process::Child> {
    use std::process::Stdio;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some((u, g)) = user {
        // Also drops the supplementary groups (std does setgroups when it sets the uid).
        cmd.uid(u).gid(g);
    }
    crate::reaper::spawn(&mut cmd)
}

/// Reads one line (without its newline) of at most `max` bytes into `buf`; `false` at the end.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    buf.clear();
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', buf)
        .await?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Err(std::io::Error::other(format!(
            "a message longer than {max} bytes"
        )));
    }
    Ok(true)
}

/// A GGUF header the fetcher parsed: only for a `.gguf` file of the plan, once, and bounded
/// (gguf::checked); an implausible one or a parse error is logged and left out of the record.
fn take_header(
    plan: &[PlanFile],
    headers: &mut HashMap<String, gguf::GgufInfo>,
    name: String,
    info: Option<gguf::GgufInfo>,
    error: Option<String>,
) -> Result<(), StoreError> {
    if !name.ends_with(".gguf") || !plan.iter().any(|f| f.name == name) {
        return Err(StoreError::Failed(format!(
            "the fetcher sent a GGUF header for a file not in the plan (\"{}\")",
            short(&name)
        )));
    }
    if headers.contains_key(&name) {
        return Err(StoreError::Failed(format!(
            "the fetcher sent two GGUF headers for {name}"
        )));
    }
    match (info, error) {
        (Some(i), _) => match gguf::checked(i) {
            Ok(i) => {
                headers.insert(name, i);
            }
            Err(e) => tracing::warn!("{name}: the GGUF header is implausible ({e}): not recorded"),
        },
        (None, e) => tracing::warn!(
            "{name}: GGUF header: {}",
            short(e.as_deref().unwrap_or("unreadable"))
        ),
    }
    Ok(())
}

/// At most 200 characters of something the fetcher said, escaped.
fn short(s: &str) -> String {
    s.chars()
        .take(200)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// What is being installed: the source as parsed and as written, a Hugging Face commit, and
/// the uid that must own the fetcher's files.
struct Target {
    src: Source,
    raw: String,
    commit: Option<String>,
    owner: u32,
}

/// Takes one `.part` file over (adopt.rs: a checked descriptor, copied into `stage`, a
/// root-owned directory) and checks the copy's sha256; a mismatch discards the download.
fn verify(
    f: &PlanFile,
    fx: &Fetched,
    owner: u32,
    part: &Path,
    stage: &Path,
) -> Result<(FileRecord, Staged), StoreError> {
    let fail = |m: String| StoreError::Failed(format!("{}: {m}", f.name));
    let p = part.join(part_name(&f.name));
    let opened = adopt::open_part(&p, owner, f.size, fx.limit).map_err(|e| {
        // unlink() never follows a link: only the fetcher's directory entry goes.
        let _ = std::fs::remove_file(&p);
        fail(format!(
            "taking the download over from the fetcher: {e}; it was discarded"
        ))
    })?;
    let c = adopt::copy_into(opened, stage).map_err(|e| fail(format!("copying it: {e}")))?;
    if !f.sha256.is_empty() && c.sha256 != f.sha256 {
        // unlink() never follows a link: only the fetcher's directory entry goes.
        let _ = std::fs::remove_file(&p);
        return Err(fail(format!(
            "sha256 mismatch: expected {}, got {}; the download was discarded",
            f.sha256, c.sha256
        )));
    }
    // The fetcher's header, for a file that has the GGUF magic bytes.
    let gguf = fx.headers.get(&f.name).filter(|_| c.gguf_magic).cloned();
    let rec = FileRecord {
        name: f.name.clone(),
        size: c.size,
        sha256: c.sha256,
        gguf,
    };
    Ok((rec, c.staged))
}

fn fsync_dir(d: &Path) -> Result<(), StoreError> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Failed(format!("{}: {e}", d.display())))
}

/// `DIR/NAME` for each file.
fn place_flat(dir: &Path, files: Vec<(FileRecord, Staged)>) -> Result<Vec<FileRecord>, StoreError> {
    let mut out = Vec::new();
    for (f, staged) in files {
        staged
            .place(&dir.join(&f.name))
            .map_err(|e| StoreError::Failed(format!("move {} into the store: {e}", f.name)))?;
        out.push(f);
    }
    fsync_dir(dir)?;
    Ok(out)
}

/// The Hugging Face cache layout: `blobs/SHA256`, `snapshots/COMMIT/NAME` -> `../../blobs/SHA256`,
/// `refs/REVISION` holding the commit.
fn place_hf(
    repo: &Path,
    rev: &str,
    commit: &str,
    files: Vec<(FileRecord, Staged)>,
) -> Result<Vec<FileRecord>, StoreError> {
    let fail = |m: String| StoreError::Failed(m);
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(commit);
    let mut out = Vec::new();
    for (f, staged) in files {
        staged
            .place(&blobs.join(&f.sha256))
            .map_err(|e| fail(format!("move {} into the store: {e}", f.name)))?;
        let link = snap.join(&f.name);
        let parent = link.parent().unwrap_or(&snap);
        std::fs::create_dir_all(parent).map_err(|e| fail(format!("{}: {e}", parent.display())))?;
        let up = "../".repeat(f.name.matches('/').count() + 2);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("{up}blobs/{}", f.sha256), &link)
            .map_err(|e| fail(format!("{}: {e}", link.display())))?;
        out.push(f);
    }
    fsync_dir(&blobs)?;
    crate::model::write_atomic(&repo.join("refs").join(rev), commit)
        .map_err(|e| fail(format!("refs/{rev}: {e}")))?;
    Ok(out)
}

/// Creates `dir` and the parents it lacks; returns those it created, deepest first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let created: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Failed(format!("{}: {e}", dir.display())))?;
    Ok(created)
}

/// Verifies every file (copies in the directory they go to), then moves them into place and
/// writes the record. On a failure nothing becomes visible: the copies are removed, and so
/// are the directories made for them.
fn install(store: &Store, to: &Target, fx: &Fetched, part: &Path) -> Result<(), StoreError> {
    let src = &to.src;
    let dest = store.root().join(src.dir());
    let stage = match src {
        Source::Hf { .. } => dest.join("blobs"),
        _ => dest.clone(),
    };
    if matches!(src, Source::Hf { .. }) && to.commit.is_none() {
        return Err(StoreError::Failed("the fetcher named no commit".into()));
    }
    let created = create_dirs(&stage)?;
    let verified = fx
        .plan
        .iter()
        .map(|f| verify(f, fx, to.owner, part, &stage))
        .collect::<Result<Vec<_>, _>>();
    let verified = match verified {
        Ok(v) => v,
        Err(e) => {
            for d in &created {
                let _ = std::fs::remove_dir(d); // only when empty
            }
            return Err(e);
        }
    };
    let (dir, revision, files) = match src {
        Source::Hf { revision, .. } => {
            let c = to.commit.as_deref().unwrap_or_default();
            let files = place_hf(&dest, revision, c, verified)?;
            (src.dir().join("snapshots").join(c), c.to_string(), files)
        }
        Source::Ollama { tag, .. } => (src.dir(), tag.clone(), place_flat(&dest, verified)?),
        Source::Url { sha256, .. } => (src.dir(), sha256.clone(), place_flat(&dest, verified)?),
    };
    let date = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    store.write_record(&Record {
        id: src.id(),
        source: to.raw.clone(),
        revision,
        dir,
        files,
        date,
    })?;
    let _ = std::fs::remove_dir_all(part);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_file(name: &str) -> PlanFile {
        PlanFile {
            name: name.into(),
            url: String::new(),
            size: Some(4),
            sha256: "a".repeat(64),
        }
    }

    #[test]
    fn the_fetchers_gguf_headers_are_bounded_and_bound_to_the_plan() {
        let plan = vec![plan_file("m.gguf"), plan_file("config.json")];
        let mut h = HashMap::new();
        let good = gguf::GgufInfo {
            version: 3,
            architecture: "llama".into(),
            file_type: "Q4_K_M".into(),
            parameters: 1_000,
            context_length: 2048,
        };
        for bad in ["other.gguf", "config.json"] {
            let e = take_header(&plan, &mut h, bad.into(), Some(good.clone()), None);
            assert!(e.is_err(), "{bad}");
        }
        take_header(&plan, &mut h, "m.gguf".into(), Some(good.clone()), None).expect("taken");
        assert_eq!(h.get("m.gguf"), Some(&good));
        let again = take_header(&plan, &mut h, "m.gguf".into(), Some(good.clone()), None);
        assert!(again.is_err(), "one header per file");

        // Implausible or unreadable: left out, the pull goes on.
        let mut h = HashMap::new();
        let odd = gguf::GgufInfo {
            architecture: "\u{1b}]0;pwned\u{7}".into(),
            ..good
        };
        take_header(&plan, &mut h, "m.gguf".into(), Some(odd), None).expect("not fatal");
        assert!(h.is_empty());
        take_header(
            &plan,
            &mut h,
            "m.gguf".into(),
            None,
            Some("x".repeat(1 << 20)),
        )
        .expect("ok");
        assert!(h.is_empty());
    }

    #[tokio::test]
    async fn the_fetchers_lines_are_bounded() {
        let mut buf = Vec::new();
        let mut r = BufReader::new(&b"{\"done\":1}\nabc"[..]);
        assert!(read_line_bounded(&mut r, &mut buf, 16).await.expect("line"));
        assert_eq!(buf, b"{\"done\":1}");
        assert!(read_line_bounded(&mut r, &mut buf, 16).await.expect("last"));
        assert_eq!(buf, b"abc");
        assert!(!read_line_bounded(&mut r, &mut buf, 16).await.expect("end"));
        let long = [b'x'; 100];
        let mut r = BufReader::new(&long[..]);
        assert!(read_line_bounded(&mut r, &mut buf, 16).await.is_err());
    }

    #[test]
    fn the_fetcher_never_runs_as_root() {
        if nix::unistd::geteuid().is_root() {
            let e = fetch_identity(Some("root")).expect_err("root refused");
            assert!(e.to_string().contains("never runs as root"), "{e}");
        }
    }
}
