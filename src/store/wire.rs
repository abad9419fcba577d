//! What modvisord and its fetcher (`modvisor-fetch`) say to each other.
//!
//! Protocol, one JSON object per line: modvisord writes a [`Request`]; the fetcher answers
//! [`Msg::Plan`], waits for `go` (anything else or EOF: it stops), then sends
//! [`Msg::Progress`] at most 10 times a second, a [`Msg::Gguf`] for every `.gguf` file once
//! all are downloaded, and finally [`Msg::Done`] or [`Msg::Error`].

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::gguf::GgufInfo;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Wire {
    Ollama {
        registry: String,
        name: String,
        tag: String,
    },
    Url {
        url: String,
        file: String,
        sha256: String,
    },
    Hf {
        endpoint: String,
        repo: String,
        revision: String,
        include: Vec<String>,
        /// Sent only to the endpoint's host (reqwest drops it on a redirect elsewhere).
        #[serde(default)]
        token: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub source: Wire,
    /// Where the `.part` files go.
    pub dir: PathBuf,
    /// Most bytes any file may have when its size is not announced.
    pub limit: u64,
    /// The store id (modvisord's own; not sent to the fetcher).
    #[serde(skip)]
    pub model: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    pub name: String,
    pub url: String,
    pub size: Option<u64>,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Msg {
    /// The commit a Hugging Face revision resolved to (before the plan).
    Revision(String),
    Plan(Vec<PlanFile>),
    Progress(u64),
    /// The GGUF header of a downloaded `.gguf` file, or why it could not be read.
    Gguf {
        name: String,
        info: Option<GgufInfo>,
        error: Option<String>,
    },
    Done,
    Error(String),
}

/// A file without a sha256 (not in LFS: config, tokenizer) may be at most this large.
pub const MAX_UNHASHED: u64 = 16 << 20;

/// The `.part` name of a plan file (repository paths flattened; `%` is never in a safe name).
pub fn part_name(name: &str) -> String {
    format!("{}.part", name.replace('/', "%"))
}

/// Writes one message to modvisord (the fetcher's stdout).
pub(super) fn emit(m: &Msg) {
    if let Ok(s) = serde_json::to_string(m) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}
