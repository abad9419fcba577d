//! The model store: pulled models under one directory, each with a metadata record.
//!
//! | file        | one job                                                              |
//! |-------------|----------------------------------------------------------------------|
//! | source.rs   | parsing and checking sources (`ollama:`, `https://…#sha256=`)         |
//! | fetcher.rs  | the unprivileged child that talks to the network (`modvisor-fetch`)  |
//! | pull.rs     | jobs: one per model, quota, verification, moving files into place    |
//! | adopt.rs    | taking a fetcher's file over through a checked descriptor (no paths) |
//! | hf.rs       | the Hugging Face source in the fetcher (and why not the hf-hub crate)|
//! | gguf.rs     | the GGUF header reader (run by the fetcher)                          |
//! | compat.rs   | the engine a module runs, the format it takes                        |
//!
//! Layout: `STORE/ollama/NS/NAME/TAG/model.gguf`, `STORE/url/SHA256/FILE`, records in
//! `STORE/.records/*.json`, downloads in progress in `STORE/.partial/KEY/` (owned by the
//! fetch user). Sits below the supervisor and the D-Bus face and imports neither.

mod adopt;
pub mod compat;
pub mod fetcher;
pub mod gguf;
mod hf;
mod http;
pub mod pull;
pub mod source;
pub mod wire;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use pull::{Job, JobState, JobStatus, PullOptions, Puller};
pub use source::Source;

/// The fetcher's executable (src/bin/modvisor-fetch.rs): beside modvisord, or in
/// `../libexec/modvisor/` from it.
pub const FETCHER: &str = "modvisor-fetch";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// Store settings, from `[models]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub root: PathBuf,
    pub max_disk: Option<u64>,
    pub confirm_above: Option<u64>,
    pub ollama_registry: String,
    pub fetch_user: Option<String>,
    /// The Hugging Face endpoint (`HF_ENDPOINT`-style).
    pub hf_endpoint: String,
    /// A root-only file with a Hugging Face token.
    pub hf_token_file: Option<PathBuf>,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Settings {
        Settings {
            root: c.models_store(),
            max_disk: c.models.max_disk,
            confirm_above: c.models.confirm_above,
            ollama_registry: c
                .models
                .ollama_registry
                .clone()
                .unwrap_or_else(|| "https://registry.ollama.ai".into()),
            fetch_user: c.models.fetch_user.clone(),
            hf_endpoint: c
                .models
                .hf_endpoint
                .clone()
                .unwrap_or_else(|| "https://huggingface.co".into()),
            hf_token_file: c.models.hf_token_file.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gguf: Option<gguf::GgufInfo>,
}

/// The metadata record of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    /// What was pulled, as written (without any token).
    pub source: String,
    /// The tag or content digest pulled.
    pub revision: String,
    /// The directory, relative to the store.
    pub dir: PathBuf,
    pub files: Vec<FileRecord>,
    /// Seconds since the epoch.
    pub date: u64,
}

impl Record {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

pub struct Store {
    pub settings: Settings,
}

/// A relative path with only normal components (no `..`, no root).
fn plain_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_))) && p.components().next().is_some()
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A short stable key for file names derived from an id.
pub fn key(id: &str) -> String {
    hex(&Sha256::digest(id.as_bytes())[..12])
}

impl Store {
    pub fn new(settings: Settings) -> Store {
        Store { settings }
    }

    /// A store for reading only (resolve, list): no limits, no registry.
    pub fn at(root: &Path) -> Store {
        Store::new(Settings {
            root: root.to_path_buf(),
            max_disk: None,
            confirm_above: None,
            ollama_registry: String::new(),
            fetch_user: None,
            hf_endpoint: String::new(),
            hf_token_file: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.settings.root
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root()
            .join(".records")
            .join(format!("{}.json", key(id)))
    }

    pub fn partial_dir(&self, id: &str) -> PathBuf {
        self.root().join(".partial").join(key(id))
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        let text = std::fs::read_to_string(self.record_path(id)).ok()?;
        serde_json::from_str::<Record>(&text)
            .ok()
            .filter(|r| r.id == id && plain_relative(&r.dir))
    }

    /// Every record, sorted by id; unreadable records are skipped with a warning.
    pub fn list(&self) -> Vec<Record> {
        let Ok(rd) = std::fs::read_dir(self.root().join(".records")) else {
            return Vec::new();
        };
        let mut out: Vec<Record> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                match serde_json::from_str::<Record>(&text) {
                    Ok(r) if plain_relative(&r.dir) => Some(r),
                    _ => {
                        tracing::warn!("skipping unreadable model record {}", e.path().display());
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn write_record(&self, r: &Record) -> Result<(), StoreError> {
        let text =
            serde_json::to_string_pretty(r).map_err(|e| StoreError::Failed(e.to_string()))?;
        crate::model::write_atomic(&self.record_path(&r.id), &format!("{text}\n"))
            .map_err(|e| StoreError::Failed(format!("write the record of {}: {e}", r.id)))
    }

    /// The main file of a record: its first GGUF, else its first file. Resolved (a Hugging
    /// Face snapshot's entry is a link to its blob) the way an activated model's path is, so
    /// the two compare equal.
    pub fn main_file(&self, r: &Record) -> Option<PathBuf> {
        let f = r
            .files
            .iter()
            .find(|f| f.name.ends_with(".gguf"))
            .or(r.files.first())?;
        let p = self.root().join(&r.dir).join(&f.name);
        Some(std::fs::canonicalize(&p).unwrap_or(p))
    }

    /// Whether a module's active model (a canonical path, as validation returns it) is one of
    /// the record's files, not only its main one.
    pub fn used_by(&self, r: &Record, active_model: &Path) -> bool {
        let dir = self.root().join(&r.dir);
        r.files.iter().any(|f| {
            let p = dir.join(&f.name);
            p == active_model || std::fs::canonicalize(&p).is_ok_and(|c| c == active_model)
        })
    }

    /// Turns a store reference (`ollama:NAME[:TAG]`, `sha256:HEX`) into the model's path.
    /// `hf:ORG/REPO@REV:FILE` names one file of the snapshot.
    pub fn resolve(&self, reference: &str) -> Result<PathBuf, StoreError> {
        let (reference, file) = split_file(reference);
        let id = normalize(reference)?;
        let r = self.get(&id).ok_or_else(|| {
            StoreError::NotFound(format!(
                "{id} is not in the model store (modvisorctl pull {reference})"
            ))
        })?;
        match file {
            Some(f) if r.files.iter().any(|x| x.name == f) => Ok(self.root().join(&r.dir).join(f)),
            Some(f) => Err(StoreError::NotFound(format!("{id} has no file {f}"))),
            None => self
                .main_file(&r)
                .ok_or_else(|| StoreError::Failed(format!("the record of {id} lists no files"))),
        }
    }

    /// Removes a model: the record first (so it is gone for readers at once), then its files.
    pub fn remove(&self, reference: &str) -> Result<Record, StoreError> {
        let id = normalize(reference)?;
        let r = self
            .get(&id)
            .ok_or_else(|| StoreError::NotFound(format!("{id} is not in the model store")))?;
        std::fs::remove_file(self.record_path(&id))
            .map_err(|e| StoreError::Failed(format!("remove the record of {id}: {e}")))?;
        let dir = self.root().join(&r.dir);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(StoreError::Failed(format!("remove {}: {e}", dir.display())));
        }
        let _ = std::fs::remove_dir_all(self.partial_dir(&id));
        self.remove_unused_blobs(&r);
        Ok(r)
    }

    /// A Hugging Face snapshot's blobs that no other record uses.
    fn remove_unused_blobs(&self, r: &Record) {
        let Some(repo) = r.dir.components().next() else {
            return;
        };
        if !repo.as_os_str().to_string_lossy().starts_with("models--") {
            return;
        }
        // Blobs are per repository: another repository's file of the same content keeps only
        // its own copy.
        let used: std::collections::HashSet<String> = self
            .list()
            .into_iter()
            .filter(|o| o.dir.components().next() == Some(repo))
            .flat_map(|o| o.files.into_iter().map(|f| f.sha256))
            .collect();
        for f in &r.files {
            if !used.contains(&f.sha256) && source::valid_sha256(&f.sha256) {
                let _ = std::fs::remove_file(self.root().join(repo).join("blobs").join(&f.sha256));
            }
        }
    }

    /// Bytes the store takes: complete models plus partial downloads.
    pub fn usage(&self) -> u64 {
        let complete: u64 = self.list().iter().map(Record::size).sum();
        complete + dir_size(&self.root().join(".partial"), 3)
    }
}

fn dir_size(p: &Path, depth: u8) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_file() => m.len(),
            Ok(m) if m.is_dir() && depth > 0 => dir_size(&e.path(), depth - 1),
            _ => 0,
        })
        .sum()
}

/// Whether a model argument names a store entry rather than a path.
pub fn is_reference(s: &str) -> bool {
    s.starts_with("ollama:") || s.starts_with("sha256:") || s.starts_with("hf:")
}

/// `hf:ORG/REPO@REV:FILE` -> (`hf:ORG/REPO@REV`, `FILE`).
pub fn split_file(r: &str) -> (&str, Option<&str>) {
    if let Some(rest) = r.strip_prefix("hf:")
        && let Some((a, f)) = rest.split_once(':')
    {
        return (&r[..3 + a.len()], Some(f));
    }
    (r, None)
}

/// The id a reference names (`ollama:tiny` is `ollama:tiny:latest`).
pub fn normalize(reference: &str) -> Result<String, StoreError> {
    let reference = split_file(reference).0;
    if let Some(h) = reference.strip_prefix("sha256:") {
        if source::valid_sha256(h) {
            return Ok(reference.to_string());
        }
        return Err(StoreError::Invalid(format!(
            "{reference}: expected sha256:64 hex digits"
        )));
    }
    Source::parse(reference, None).map(|s| s.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_list_resolve_remove() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = Store::new(Settings {
            root: t.path().to_path_buf(),
            max_disk: None,
            confirm_above: None,
            ollama_registry: "http://127.0.0.1:1".into(),
            fetch_user: None,
            hf_endpoint: String::new(),
            hf_token_file: None,
        });
        let dir = PathBuf::from("ollama/library/tiny/latest");
        std::fs::create_dir_all(t.path().join(&dir)).expect("mkdir");
        std::fs::write(t.path().join(&dir).join("model.gguf"), b"GGUF").expect("write");
        let r = Record {
            id: "ollama:tiny:latest".into(),
            source: "ollama:tiny".into(),
            revision: "latest".into(),
            dir: dir.clone(),
            files: vec![FileRecord {
                name: "model.gguf".into(),
                size: 4,
                sha256: "x".into(),
                gguf: None,
            }],
            date: 1,
        };
        s.write_record(&r).expect("record");
        assert_eq!(s.list(), vec![r.clone()]);
        let file = t.path().join(&dir).join("model.gguf");
        assert_eq!(
            s.resolve("ollama:tiny").expect("resolve"),
            file.canonicalize().expect("canon")
        );
        assert!(s.used_by(&r, &file.canonicalize().expect("canon")));
        assert!(!s.used_by(&r, Path::new("/elsewhere/model.gguf")));
        assert_eq!(s.usage(), 4);
        let mut evil = r.clone();
        evil.id = "ollama:evil:latest".into();
        evil.dir = PathBuf::from("../../etc");
        s.write_record(&evil).expect("record");
        assert!(
            s.get("ollama:evil:latest").is_none(),
            "a record cannot point outside"
        );
        s.remove("ollama:tiny:latest").expect("rm");
        assert!(!t.path().join(&dir).exists());
        assert!(s.resolve("ollama:tiny").is_err());
    }
}
