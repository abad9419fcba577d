//! The fetcher: a child process (`modvisor-fetch`, a binary of its own) that runs as an unprivileged user and
//! does everything that touches remote data: registry manifests, HTTP, writing the bytes,
//! parsing the GGUF headers of what it downloaded. It writes only `*.part` files into the one
//! directory it is given (owned by its user); modvisord takes them over without trusting that
//! directory (adopt.rs), verifies them and moves them into the store.
//!
//! The protocol is in wire.rs.

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::gguf;
use super::hf::Hf;
use super::http::client;
use super::source::{OLLAMA_MODEL_LAYER, valid_sha256};
use super::wire::{Msg, PlanFile, Request, Wire, emit, part_name};

/// Files downloaded at once within one pull.
const PARALLEL: usize = 3;
const MAX_MANIFEST: usize = 1 << 20;
/// The entry point of `modvisor-fetch`.
pub fn main() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return ExitCode::FAILURE;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            emit(&Msg::Error(format!("bad request: {e}")));
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            emit(&Msg::Error(format!("start the async runtime: {e}")));
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(req)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(&Msg::Error(e));
            ExitCode::FAILURE
        }
    }
}

/// The files of the source, with their sizes and checksums where the source says.
async fn plan(c: &reqwest::Client, source: &Wire) -> Result<Vec<PlanFile>, String> {
    match source {
        Wire::Ollama {
            registry,
            name,
            tag,
        } => ollama_plan(c, registry, name, tag).await,
        Wire::Url { url, file, sha256 } => Ok(vec![PlanFile {
            name: file.clone(),
            url: url.clone(),
            size: head_size(c, url).await,
            sha256: sha256.clone(),
        }]),
        Wire::Hf {
            endpoint,
            repo,
            revision,
            include,
            token,
        } => {
            let hf = Hf {
                c,
                base: endpoint.trim_end_matches('/'),
                token: token.as_deref(),
            };
            hf.plan(repo, revision, include).await
        }
    }
}

/// modvisord answers the plan with "go" on stdin (after its quota check), or ends the pull.
async fn told_to_go() -> Result<bool, String> {
    let line = tokio::task::spawn_blocking(|| {
        let mut l = String::new();
        std::io::stdin().lock().read_line(&mut l).map(|_| l)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    Ok(line.trim() == "go")
}

/// Reads the GGUF header of each downloaded `.gguf` and reports it (or why it is not one).
async fn report_ggufs(plan: &[PlanFile], dir: &Path) -> Result<(), String> {
    for f in plan.iter().filter(|f| f.name.ends_with(".gguf")) {
        let p = dir.join(part_name(&f.name));
        let r = tokio::task::spawn_blocking(move || open_own(&p).and_then(gguf::read))
            .await
            .map_err(|e| e.to_string())?;
        let (info, error) = match r {
            Ok(i) => (Some(i), None),
            Err(e) => (None, Some(e.to_string())),
        };
        emit(&Msg::Gguf {
            name: f.name.clone(),
            info,
            error,
        });
    }
    Ok(())
}

async fn run(req: Request) -> Result<(), String> {
    let c = client()?;
    let plan = plan(&c, &req.source).await?;
    emit(&Msg::Plan(plan.clone()));
    if !told_to_go().await? {
        return Ok(());
    }
    let done = Arc::new(AtomicU64::new(0));
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                emit(&Msg::Progress(done.load(Ordering::Relaxed)));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let auth = match &req.source {
        Wire::Hf {
            endpoint,
            token: Some(t),
            ..
        } => Some((endpoint.trim_end_matches('/').to_string(), t.clone())),
        _ => None,
    };
    let results: Vec<Result<(), String>> = futures_util::stream::iter(plan.iter())
        .map(|f| download(&c, f, &req.dir, req.limit, &done, auth.as_ref()))
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    ticker.abort();
    emit(&Msg::Progress(done.load(Ordering::Relaxed)));
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    report_ggufs(&plan, &req.dir).await?;
    emit(&Msg::Done);
    Ok(())
}

/// One of our own `.part` files for reading: never through a link, never blocking on a FIFO
/// (others running as the fetch user, engines by default, can reach this directory too).
fn open_own(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)?;
    if !f.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

async fn head_size(c: &reqwest::Client, url: &str) -> Option<u64> {
    let r = c.head(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.headers()
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

/// GET the manifest (bounded), find the model layer, plan its blob.
async fn ollama_plan(
    c: &reqwest::Client,
    registry: &str,
    name: &str,
    tag: &str,
) -> Result<Vec<PlanFile>, String> {
    let base = registry.trim_end_matches('/');
    let url = format!("{base}/v2/{name}/manifests/{tag}");
    let accept = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";
    let r = c
        .get(&url)
        .header(reqwest::header::ACCEPT, accept)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!(
            "{url}: HTTP {} (no such model or tag?)",
            r.status()
        ));
    }
    let mut body = Vec::new();
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| format!("{url}: {e}"))?;
        if body.len() + chunk.len() > MAX_MANIFEST {
            return Err(format!("{url}: the manifest is larger than 1 MiB"));
        }
        body.extend_from_slice(&chunk);
    }
    let m: Manifest =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a manifest: {e}"))?;
    let layer = m
        .layers
        .iter()
        .find(|l| l.media_type == OLLAMA_MODEL_LAYER)
        .ok_or_else(|| format!("{url}: no layer of type {OLLAMA_MODEL_LAYER}"))?;
    let hexd = layer
        .digest
        .strip_prefix("sha256:")
        .filter(|h| valid_sha256(h))
        .ok_or_else(|| format!("{url}: bad layer digest \"{}\"", layer.digest))?;
    Ok(vec![PlanFile {
        name: "model.gguf".into(),
        url: format!("{base}/v2/{name}/blobs/{}", layer.digest),
        size: Some(layer.size),
        sha256: hexd.to_string(),
    }])
}

/// Where the response starts writing: an append after `have` bytes (206), or from 0 (200).
fn resume_offset(r: &reqwest::Response, have: u64) -> Result<u64, String> {
    match r.status().as_u16() {
        200 => Ok(0),
        206 => {
            let start = r
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            if start == Some(have) {
                Ok(have)
            } else {
                Err(format!(
                    "the server resumed at {start:?}, not at byte {have}"
                ))
            }
        }
        s => Err(format!("HTTP {s}")),
    }
}

/// Appends the response body to `file`, counting from `from`, never past `cap` bytes.
async fn copy_body(
    r: reqwest::Response,
    file: &mut tokio::fs::File,
    from: u64,
    cap: u64,
    done: &AtomicU64,
) -> Result<u64, String> {
    let mut written = from;
    let mut s = r.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| format!("after {written} bytes: {e}"))?;
        written += chunk.len() as u64;
        if written > cap {
            return Err(format!("the server sent more than {cap} bytes"));
        }
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
        done.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    Ok(written)
}

/// Downloads one file into `DIR/NAME.part`, resuming what is there (Range), never past its
/// announced size (or `limit` when none was announced).
async fn download(
    c: &reqwest::Client,
    f: &PlanFile,
    dir: &Path,
    limit: u64,
    done: &AtomicU64,
    auth: Option<&(String, String)>,
) -> Result<(), String> {
    let part = dir.join(part_name(&f.name));
    let ctx = |e: &dyn std::fmt::Display| format!("{}: {e}", f.name);
    let mut have = tokio::fs::symlink_metadata(&part)
        .await
        .ok()
        .filter(|m| m.file_type().is_file())
        .map_or(0, |m| m.len());
    if f.size.is_some_and(|s| have > s) {
        have = 0;
    }
    if have > 0 && f.size == Some(have) {
        done.fetch_add(have, Ordering::Relaxed);
        return Ok(());
    }
    let mut rq = c.get(&f.url);
    if let Some((base, t)) = auth
        && f.url.starts_with(&format!("{base}/"))
    {
        rq = rq.bearer_auth(t);
    }
    if have > 0 {
        rq = rq.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let r = rq.send().await.map_err(|e| ctx(&e))?;
    let from = resume_offset(&r, have).map_err(|e| ctx(&e))?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(from > 0)
        .truncate(from == 0)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&part)
        .await
        .map_err(|e| ctx(&e))?;
    let cap = f.size.unwrap_or(limit);
    done.fetch_add(from, Ordering::Relaxed);
    let copied = copy_body(r, &mut file, from, cap, done).await;
    // tokio's File writes in the background: without this flush a failed attempt could
    // still be writing when the retry measures the part file, and resume too early.
    let flushed = file.flush().await;
    let written = copied.map_err(|e| ctx(&e))?;
    flushed.map_err(|e| ctx(&e))?;
    file.sync_all().await.map_err(|e| ctx(&e))?;
    if let Some(sz) = f.size
        && written != sz
    {
        return Err(ctx(&format!(
            "the download ended after {written} of {sz} bytes"
        )));
    }
    Ok(())
}
