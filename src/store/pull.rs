//! Pull jobs: one per model at a time (a second request joins the first), a bounded number
//! running at once, each driving one fetcher child; then modvisord verifies every file's
//! sha256 and only then moves it into the store and writes the record.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use super::fetcher::{MAX_UNHASHED, Msg, PlanFile, Request, Wire, part_name};
use super::source::{check_scheme, safe_file_name, safe_rel_path, valid_sha256};
use super::{FileRecord, Record, Source, Store, StoreError, gguf, hex};
use crate::manifest::units::format_bytes;

/// Pulls (fetcher children) running at once; more wait in `queued`.
const RUNNING_AT_ONCE: usize = 2;
/// Without a quota, the most bytes a file of unannounced size may have.
const UNANNOUNCED_LIMIT: u64 = 1 << 40;

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
/// The checked plan and, for a Hugging Face source, the commit.
type Fetched = (Vec<PlanFile>, Option<String>);

impl Puller {
    /// `fetcher`: the executable that serves `--fetch` (modvisord itself).
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
        let (root, p2) = (self.store.root().to_path_buf(), part.clone());
        blocking(move || prepare_dirs(&root, &p2, user)).await?;
        let req = Request {
            source: self.wire(src)?,
            dir: part.clone(),
            limit: self.remaining().unwrap_or(UNANNOUNCED_LIMIT),
            model: id.clone(),
        };
        let plan = self.fetch(cancel, req, o, user, tx).await;
        let (plan, commit) = match plan {
            Err(e) => {
                let _ = std::fs::remove_dir(&part); // only when empty
                return Err(e);
            }
            Ok(p) => p,
        };
        if plan.is_empty() {
            let _ = std::fs::remove_dir(&part);
            return Ok(());
        }
        tx.send_modify(|s| s.state = JobState::Verifying);
        let (store, src, raw) = (self.store.clone(), src.clone(), raw.to_string());
        let to = Target { src, raw, commit };
        blocking(move || install(&store, &to, &plan, &part))
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
        let mut child = spawn_fetcher(&self.fetcher, user).map_err(|e| failed(e.to_string()))?;
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
        let mut lines = BufReader::new(stdout).lines();
        let mut plan = None;
        let mut commit = None;
        while let Some(l) = lines.next_line().await.map_err(io)? {
            let msg: Msg = serde_json::from_str(&l)
                .map_err(|e| failed(format!("the fetcher said something unexpected: {e}")))?;
            match msg {
                Msg::Plan(p) => {
                    check_plan(wire, &p)?;
                    let total: u64 = p.iter().filter_map(|f| f.size).sum();
                    tx.send_modify(|s| s.total = total);
                    if self.unchanged(&req.model, &p, commit.as_deref()) {
                        tx.send_modify(|s| s.done = total);
                        // An empty plan (never a checked one): nothing to install.
                        return Ok((Vec::new(), commit));
                    }
                    self.admit(total, &req.dir, o)?;
                    stdin.write_all(b"go\n").await.map_err(io)?;
                    plan = Some(p);
                }
                Msg::Revision(c) => commit = Some(c),
                Msg::Progress(n) => tx.send_modify(|s| s.done = n),
                Msg::Error(e) => return Err(failed(e)),
                Msg::Done => {
                    let p = plan.ok_or_else(|| failed("the fetcher sent no plan".into()))?;
                    return Ok((p, commit));
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
/// else `nobody`.
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
    cmd.arg("--fetch")
        .env_clear()
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

fn sha256_file(p: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

/// Takes a `.part` file from the fetcher: ours (root-owned, read-only to others) before it is
/// hashed, so nothing can change it after the check.
fn take_over(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(p, Some(0), Some(0))?;
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))
}

/// What is being installed: the source as parsed and as written, and a Hugging Face commit.
struct Target {
    src: Source,
    raw: String,
    commit: Option<String>,
}

/// Checks one `.part` file after taking it over; a mismatch discards it.
fn verify(f: &PlanFile, p: &Path) -> Result<FileRecord, StoreError> {
    let fail = |m: String| StoreError::Failed(m);
    take_over(p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
    let (got, size) = sha256_file(p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
    if !f.sha256.is_empty() && got != f.sha256 {
        let _ = std::fs::remove_file(p);
        return Err(fail(format!(
            "{}: sha256 mismatch: expected {}, got {got}; the download was discarded",
            f.name, f.sha256
        )));
    }
    let gguf = f
        .name
        .ends_with(".gguf")
        .then(|| std::fs::File::open(p).and_then(gguf::read))
        .and_then(|r| {
            r.map_err(|e| tracing::warn!("{}: GGUF header: {e}", f.name))
                .ok()
        });
    Ok(FileRecord {
        name: f.name.clone(),
        size,
        sha256: got,
        gguf,
    })
}

fn fsync_dir(d: &Path) -> Result<(), StoreError> {
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::Failed(format!("{}: {e}", d.display())))
}

/// `DIR/NAME` for each file.
fn place_flat(dir: &Path, part: &Path, files: &[FileRecord]) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Failed(format!("{}: {e}", dir.display())))?;
    for f in files {
        std::fs::rename(part.join(part_name(&f.name)), dir.join(&f.name))
            .map_err(|e| StoreError::Failed(format!("move {} into the store: {e}", f.name)))?;
    }
    fsync_dir(dir)
}

/// The Hugging Face cache layout: `blobs/SHA256`, `snapshots/COMMIT/NAME` -> `../../blobs/SHA256`,
/// `refs/REVISION` holding the commit.
fn place_hf(
    repo: &Path,
    rev: &str,
    commit: &str,
    part: &Path,
    files: &[FileRecord],
) -> Result<(), StoreError> {
    let fail = |m: String| StoreError::Failed(m);
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).map_err(|e| fail(format!("{}: {e}", blobs.display())))?;
    for f in files {
        let blob = blobs.join(&f.sha256);
        std::fs::rename(part.join(part_name(&f.name)), &blob)
            .map_err(|e| fail(format!("move {} into the store: {e}", f.name)))?;
        let link = snap.join(&f.name);
        let parent = link.parent().unwrap_or(&snap);
        std::fs::create_dir_all(parent).map_err(|e| fail(format!("{}: {e}", parent.display())))?;
        let up = "../".repeat(f.name.matches('/').count() + 2);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("{up}blobs/{}", f.sha256), &link)
            .map_err(|e| fail(format!("{}: {e}", link.display())))?;
    }
    fsync_dir(&blobs)?;
    crate::model::write_atomic(&repo.join("refs").join(rev), commit)
        .map_err(|e| fail(format!("refs/{rev}: {e}")))
}

/// Verifies every file, then moves them into the store and writes the record.
fn install(store: &Store, to: &Target, plan: &[PlanFile], part: &Path) -> Result<(), StoreError> {
    let files = plan
        .iter()
        .map(|f| verify(f, &part.join(part_name(&f.name))))
        .collect::<Result<Vec<_>, _>>()?;
    let src = &to.src;
    let (dir, revision) = match (src, &to.commit) {
        (Source::Hf { revision, .. }, Some(c)) => {
            place_hf(&store.root().join(src.dir()), revision, c, part, &files)?;
            (src.dir().join("snapshots").join(c), c.clone())
        }
        (Source::Hf { .. }, None) => {
            return Err(StoreError::Failed("the fetcher named no commit".into()));
        }
        (Source::Ollama { tag, .. }, _) => {
            place_flat(&store.root().join(src.dir()), part, &files)?;
            (src.dir(), tag.clone())
        }
        (Source::Url { sha256, .. }, _) => {
            place_flat(&store.root().join(src.dir()), part, &files)?;
            (src.dir(), sha256.clone())
        }
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
