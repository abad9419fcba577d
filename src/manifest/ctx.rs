//! What every section's validation shares: the manifest's text and path to point errors at
//! (file:line:col), and the checks of durations, counts, placeholders, environments and paths.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::ManifestError;
use super::units::parse_duration;

const PLACEHOLDERS: [&str; 6] = [
    "model",
    "model_file",
    "name",
    "state_dir",
    "port",
    "upstream",
];

/// Where a manifest's values come from: every error names its file:line:col.
pub(super) struct Ctx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(path: &'a Path, src: &'a str) -> Self {
        Ctx { path, src }
    }

    pub(super) fn err<T>(&self, offset: usize, msg: impl Into<String>) -> Result<T, ManifestError> {
        Err(ManifestError::at(self.path, self.src, offset, msg))
    }

    pub(super) fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ManifestError> {
        match v {
            None => Ok(default),
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) if d.is_zero() => self.err(
                    s.span().start,
                    format!("{key}: expected a duration greater than zero"),
                ),
                // Longer would overflow the deadlines computed from it (Instant + d).
                Ok(d) if d > MAX_DURATION => self.err(
                    s.span().start,
                    format!("{key}: expected a duration of at most 366d"),
                ),
                Ok(d) => Ok(d),
                Err(e) => self.err(s.span().start, format!("{key}: {e}")),
            },
        }
    }

    pub(super) fn count(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: u32,
    ) -> Result<u32, ManifestError> {
        match v {
            None => Ok(default),
            Some(n) => {
                let x = *n.get_ref();
                if x < min || x > max {
                    return self.err(
                        n.span().start,
                        format!("{key}: expected an integer from {min} to {max}, found {x}"),
                    );
                }
                Ok(x as u32)
            }
        }
    }

    pub(super) fn placeholders(
        &self,
        s: &str,
        offset: usize,
        key: &str,
    ) -> Result<(), ManifestError> {
        let mut rest = s;
        while let Some(i) = rest.find("${") {
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                return self.err(
                    offset,
                    format!("{key}: unterminated placeholder \"{}\"", &rest[i..]),
                );
            };
            let name = &after[..end];
            if !PLACEHOLDERS.contains(&name) {
                return self.err(
                    offset,
                    format!("{key}: unknown placeholder \"${{{name}}}\", expected one of ${{model}}, ${{model_file}}, ${{name}}, ${{state_dir}}, ${{port}}, ${{upstream}}"),
                );
            }
            rest = &after[end + 1..];
        }
        Ok(())
    }

    pub(super) fn environment(
        &self,
        env: &Option<Spanned<BTreeMap<String, String>>>,
        key: &str,
    ) -> Result<BTreeMap<String, String>, ManifestError> {
        let Some(env) = env else {
            return Ok(BTreeMap::new());
        };
        for (k, v) in env.get_ref() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return self.err(
                    env.span().start,
                    format!(
                        "{key}: invalid variable name \"{k}\", expected letters, digits and '_'"
                    ),
                );
            }
            self.placeholders(v, env.span().start, key)?;
        }
        Ok(env.get_ref().clone())
    }
}

pub(super) fn is_absolute_clean(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute() && !path.components().any(|c| matches!(c, Component::ParentDir))
}

pub(super) fn secret_path(
    cx: &Ctx<'_>,
    v: &Spanned<String>,
    key: &str,
) -> Result<PathBuf, ManifestError> {
    if !is_absolute_clean(v.get_ref()) || v.get_ref().contains("${") {
        return cx.err(
            v.span().start,
            format!(
                "{key}: expected an absolute path without \"..\" or placeholders, found \"{}\"",
                v.get_ref()
            ),
        );
    }
    Ok(PathBuf::from(v.get_ref()))
}

/// The longest duration a manifest may give (a timer or deadline is computed from it).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
