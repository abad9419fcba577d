//! Model sources as the user writes them, parsed and checked before anything touches the
//! network: `ollama:NAME[:TAG]`, `https://HOST/…/FILE#sha256=HEX` (plain `http://` only on
//! loopback). Each source names one store entry (its id) and one directory inside the store.

use std::path::PathBuf;

use super::StoreError;

/// The layer media type of the model file in an Ollama manifest.
pub const OLLAMA_MODEL_LAYER: &str = "application/vnd.ollama.image.model";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `name` has its namespace (`library/` when none was written).
    Ollama { name: String, tag: String },
    /// A Hugging Face repository at a revision, the files matching `include` (all when empty).
    Hf {
        repo: String,
        revision: String,
        include: Vec<String>,
    },
    /// A single file by URL, with the sha256 it must have.
    Url {
        url: String,
        file: String,
        sha256: String,
    },
}

impl Source {
    /// Parses a source; `sha256` (the Pull option) is needed for a URL without `#sha256=`.
    pub fn parse(s: &str, sha256: Option<&str>) -> Result<Source, StoreError> {
        let bad = |m: String| Err(StoreError::Invalid(m));
        if let Some(rest) = s.strip_prefix("ollama:") {
            let (name, tag) = rest.split_once(':').unwrap_or((rest, "latest"));
            let name = if name.contains('/') {
                name.to_string()
            } else {
                format!("library/{name}")
            };
            check_ollama_name(&name)?;
            if !valid_tag(tag) {
                return bad(format!(
                    "ollama tag \"{tag}\": expected [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}"
                ));
            }
            return Ok(Source::Ollama {
                name,
                tag: tag.to_string(),
            });
        }
        if s.starts_with("https://") || s.starts_with("http://") {
            return parse_url(s, sha256);
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            return parse_hf(rest, &[]);
        }
        bad(format!(
            "unknown source \"{s}\": expected ollama:NAME[:TAG] or https://…/FILE with a sha256"
        ))
    }

    /// The store id: what `models`, `rm` and `activate` name.
    pub fn id(&self) -> String {
        match self {
            Source::Ollama { name, tag } => {
                let short = name.strip_prefix("library/").unwrap_or(name);
                format!("ollama:{short}:{tag}")
            }
            Source::Url { sha256, .. } => format!("sha256:{sha256}"),
            Source::Hf { repo, revision, .. } => format!("hf:{repo}@{revision}"),
        }
    }

    /// The entry's directory, relative to the store.
    pub fn dir(&self) -> PathBuf {
        match self {
            Source::Ollama { name, tag } => PathBuf::from("ollama").join(name).join(tag),
            Source::Url { sha256, .. } => PathBuf::from("url").join(sha256),
            Source::Hf { repo, .. } => {
                PathBuf::from(format!("models--{}", repo.replace('/', "--")))
            }
        }
    }

    /// Adds `--include` globs (Hugging Face sources only).
    pub fn with_include(self, include: &[String]) -> Result<Source, StoreError> {
        match self {
            Source::Hf { repo, revision, .. } => Ok(Source::Hf {
                repo,
                revision,
                include: include.to_vec(),
            }),
            s if include.is_empty() => Ok(s),
            _ => Err(StoreError::Invalid(
                "include applies to hf: sources only".into(),
            )),
        }
    }
}

/// `ORG/REPO[@REVISION]`; a trailing `:FILE` (as in activation references) is not part of it.
fn parse_hf(rest: &str, include: &[String]) -> Result<Source, StoreError> {
    let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !p.contains("--")
            && !p.contains("..")
    };
    match repo.split_once('/') {
        Some((o, r)) if part(o) && part(r) => {}
        _ => {
            return Err(StoreError::Invalid(format!(
                "hf repository \"{repo}\": expected ORG/REPO of [A-Za-z0-9._-]"
            )));
        }
    }
    if !valid_tag(revision) {
        return Err(StoreError::Invalid(format!(
            "hf revision \"{revision}\": expected a branch, tag or commit"
        )));
    }
    Ok(Source::Hf {
        repo: repo.to_string(),
        revision: revision.to_string(),
        include: include.to_vec(),
    })
}

/// A relative path inside a repository: 1 to 8 safe components.
pub fn safe_rel_path(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    parts.len() <= 8 && parts.iter().all(|c| safe_file_name(c))
}

/// `*` (any run within a path component), `?`, everything else literal.
pub fn glob_match(pat: &str, s: &str) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], s) || (!s.is_empty() && s[0] != b'/' && m(p, &s[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(pat.as_bytes(), s.as_bytes())
}

/// `ns/name`: each part `[a-z0-9][a-z0-9._-]{0,63}`, exactly one slash.
fn check_ollama_name(name: &str) -> Result<(), StoreError> {
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
            })
    };
    match name.split_once('/') {
        Some((ns, n)) if ok(ns) && ok(n) => Ok(()),
        _ => Err(StoreError::Invalid(format!(
            "ollama model \"{name}\": expected [NAMESPACE/]NAME of [a-z0-9._-]"
        ))),
    }
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'.' | b'-'))
        })
}

/// A file name that stays in its directory: `[A-Za-z0-9._-]`, not starting with a dot.
pub fn safe_file_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn valid_sha256(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Plain HTTP is allowed only to this machine (tests, a local mirror).
pub fn check_scheme(url: &reqwest::Url) -> Result<(), StoreError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(StoreError::Invalid(format!(
                    "{url}: plain http:// is allowed only on loopback; use https://"
                )))
            }
        }
        s => Err(StoreError::Invalid(format!(
            "{url}: unsupported scheme {s}"
        ))),
    }
}

fn parse_url(s: &str, sha256: Option<&str>) -> Result<Source, StoreError> {
    let mut url = reqwest::Url::parse(s).map_err(|e| StoreError::Invalid(format!("{s}: {e}")))?;
    check_scheme(&url)?;
    let from_fragment = url
        .fragment()
        .and_then(|f| f.strip_prefix("sha256="))
        .map(str::to_string);
    url.set_fragment(None);
    let sha = from_fragment
        .or(sha256.map(str::to_string))
        .map(|h| h.to_ascii_lowercase())
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "{s}: a URL source needs its sha256 (URL#sha256=HEX or the sha256 option)"
            ))
        })?;
    if !valid_sha256(&sha) {
        return Err(StoreError::Invalid(format!(
            "sha256 \"{sha}\": expected 64 hex digits"
        )));
    }
    let file = url
        .path_segments()
        .and_then(|mut p| p.next_back())
        .unwrap_or_default()
        .to_string();
    if !safe_file_name(&file) {
        return Err(StoreError::Invalid(format!(
            "{s}: the URL must end in a plain file name ([A-Za-z0-9._-])"
        )));
    }
    Ok(Source::Url {
        url: url.to_string(),
        file,
        sha256: sha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let o = Source::parse("ollama:tiny", None).expect("ollama");
        assert_eq!(o.id(), "ollama:tiny:latest");
        assert_eq!(o.dir(), PathBuf::from("ollama/library/tiny/latest"));
        assert_eq!(
            Source::parse("ollama:me/m:q4_0", None).expect("ns").id(),
            "ollama:me/m:q4_0"
        );
        for bad in [
            "ollama:../x",
            "ollama:a/../b",
            "ollama:a:../../x",
            "ollama:a/b/c",
            "ftp://x/y.gguf",
        ] {
            assert!(Source::parse(bad, None).is_err(), "{bad}");
        }
        let h = "a".repeat(64);
        let u = Source::parse(&format!("https://h/x/m.gguf#sha256={h}"), None).expect("url");
        assert_eq!(u.id(), format!("sha256:{h}"));
        assert!(
            Source::parse("https://h/x/m.gguf", None).is_err(),
            "sha256 required"
        );
        assert!(Source::parse("http://example.com/m.gguf", Some(&h)).is_err());
        assert!(Source::parse("http://127.0.0.1:9/m.gguf", Some(&h)).is_ok());
        assert!(Source::parse("https://h/x/", Some(&h)).is_err());
        assert!(Source::parse("https://h/x/..", Some(&h)).is_err());
        let hf = Source::parse("hf:org/repo@v1", None).expect("hf");
        assert_eq!(hf.id(), "hf:org/repo@v1");
        assert_eq!(hf.dir(), PathBuf::from("models--org--repo"));
        assert!(Source::parse("hf:../x", None).is_err());
        assert!(Source::parse("hf:a/b@../x", None).is_err());
        assert!(glob_match("*.gguf", "m-Q4.gguf") && !glob_match("*.gguf", "a/b.gguf"));
        assert!(safe_rel_path("a/b.json") && !safe_rel_path("../../etc/x") && !safe_rel_path("/x"));
    }
}
