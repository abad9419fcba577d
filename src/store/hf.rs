//! The Hugging Face source, in the fetcher (unprivileged): repository info, then a `HEAD` of
//! `resolve/COMMIT/FILE` per file for its sha256 and size (`X-Linked-Etag`, `X-Linked-Size`
//! of an LFS file; small files have none), giving the fetcher's plan.
//!
//! Why not the `hf-hub` crate (the issue asked for it "where it fits"): hf-hub downloads into
//! the Hugging Face cache layout itself (blobs, snapshots, refs, lock files), while the fetcher
//! must write only `.part` files into its own directory and modvisord builds the layout from
//! verified root-owned copies; hf-hub neither checks the sha256 the hub announces nor bounds a
//! body by the announced size, and 1.0 restarts an interrupted download from zero instead of
//! resuming it with a Range request; its HTTP clients are its own, so our redirect policy
//! (https only but to loopback, at most 5) and the token-only-to-the-endpoint rule cannot be
//! imposed; and 1.0 brings reqwest 0.13 (a second HTTP/TLS stack beside our 0.12) and hf-xet.
//! What would remain "where it fits" is the two small requests below. Details for operators:
//! the README, "Models", "Layout and guarantees".

use serde::Deserialize;

use super::http::{bounded_body, client_no_redirects};
use super::source::{glob_match, safe_rel_path, valid_sha256};
use super::wire::{MAX_UNHASHED, Msg, PlanFile, emit};

/// The most bytes of repository info read.
const MAX_REPO_INFO: usize = 4 << 20;

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// The Hugging Face Hub endpoints: repository info, then `resolve/COMMIT/FILE`.
pub struct Hf<'a> {
    pub c: &'a reqwest::Client,
    pub base: &'a str,
    pub token: Option<&'a str>,
}

impl Hf<'_> {
    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn info(&self, repo: &str, rev: &str) -> Result<RepoInfo, String> {
        let url = format!("{}/api/models/{repo}/revision/{rev}", self.base);
        let r = self
            .auth(self.c.get(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !r.status().is_success() {
            return Err(format!(
                "{url}: HTTP {} (no such repository or revision?)",
                r.status()
            ));
        }
        let body = bounded_body(r, MAX_REPO_INFO)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not repository info: {e}"))
    }

    pub async fn plan(
        &self,
        repo: &str,
        rev: &str,
        include: &[String],
    ) -> Result<Vec<PlanFile>, String> {
        let info = self.info(repo, rev).await?;
        let commit = info.sha;
        if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "the hub answered an odd commit \"{}\"",
                commit.escape_debug()
            ));
        }
        emit(&Msg::Revision(commit.clone()));
        let mut plan = Vec::new();
        for s in &info.siblings {
            let n = &s.rfilename;
            if !include.is_empty() && !include.iter().any(|g| glob_match(g, n)) {
                continue;
            }
            if !safe_rel_path(n) {
                return Err(format!(
                    "the repository lists an unsafe file name \"{}\": refused",
                    n.escape_debug()
                ));
            }
            plan.push(self.file(repo, &commit, n).await?);
        }
        if plan.is_empty() {
            return Err(format!("no file of {repo}@{rev} matches {include:?}"));
        }
        Ok(plan)
    }

    /// HEAD without following redirects: an LFS file's sha256 and size are in `X-Linked-*`.
    async fn file(&self, repo: &str, commit: &str, name: &str) -> Result<PlanFile, String> {
        let url = format!("{}/{repo}/resolve/{commit}/{name}", self.base);
        let nf = client_no_redirects()?;
        let r = self
            .auth(nf.head(&url))
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !(r.status().is_success() || r.status().is_redirection()) {
            return Err(format!("{url}: HTTP {}", r.status()));
        }
        let h = |k: &str| {
            r.headers().get(k).and_then(|v| v.to_str().ok()).map(|v| {
                v.trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_string()
            })
        };
        let etag = h("x-linked-etag").or_else(|| h("etag")).unwrap_or_default();
        let size = h("x-linked-size")
            .or_else(|| h("content-length"))
            .and_then(|v| v.parse::<u64>().ok());
        let sha256 = if valid_sha256(&etag) {
            etag
        } else {
            String::new()
        };
        if sha256.is_empty() && size.is_none_or(|s| s > MAX_UNHASHED) {
            return Err(format!("{name}: no sha256 and not a small file: refused"));
        }
        Ok(PlanFile {
            name: name.to_string(),
            url,
            size,
            sha256,
        })
    }
}
