//! `[admission]` of the daemon config: margins, an optional RAM budget, how long to wait for
//! evicted memory to be released, when a footprint is learned, whether busy modules may be
//! preempted. Parsed strictly; errors name file:line:col.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::manifest::ManifestError;
use crate::manifest::units::{parse_duration, parse_size};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Off: every start is admitted (the arithmetic is still shown by `explain`).
    pub enabled: bool,
    /// Kept free of `MemAvailable`.
    pub ram_margin: u64,
    /// Kept free on each GPU.
    pub vram_margin: u64,
    /// The most RAM all modules together may hold (None: only `MemAvailable` counts).
    pub ram_budget: Option<u64>,
    /// How long to wait for an evicted module's memory to show as free.
    pub release_timeout: Duration,
    /// How long a module must have been online before its peaks are recorded.
    pub learn_after: Duration,
    /// Modules with open connections may be evicted too.
    pub preempt: bool,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            enabled: true,
            ram_margin: 512 << 20,
            vram_margin: 256 << 20,
            ram_budget: None,
            release_timeout: Duration::from_secs(30),
            learn_after: Duration::from_secs(30),
            preempt: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    enabled: Option<bool>,
    ram_margin: Option<Spanned<String>>,
    vram_margin: Option<Spanned<String>>,
    ram_budget: Option<Spanned<String>>,
    release_timeout: Option<Spanned<String>>,
    learn_after: Option<Spanned<String>>,
    preempt: Option<bool>,
}

/// Longest wait or learning delay: past a day, the setting is a mistake.
const MAX_WAIT: Duration = Duration::from_secs(86_400);

impl RawAdmission {
    pub fn validate(self, path: &Path, src: &str) -> Result<AdmissionConfig, ManifestError> {
        let err = |at: usize, msg: String| ManifestError::at(path, src, at, msg);
        let size = |v: &Spanned<String>, key: &str| {
            parse_size(v.get_ref())
                .map_err(|e| err(v.span().start, format!("admission.{key}: {e}")))
        };
        let wait = |v: &Spanned<String>, key: &str| match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() || d > MAX_WAIT => Err(err(
                v.span().start,
                format!("admission.{key}: expected a duration from 1ms to 1d"),
            )),
            Ok(d) => Ok(d),
            Err(e) => Err(err(v.span().start, format!("admission.{key}: {e}"))),
        };
        let mut c = AdmissionConfig::default();
        if let Some(b) = self.enabled {
            c.enabled = b;
        }
        if let Some(v) = &self.ram_margin {
            c.ram_margin = size(v, "ram_margin")?;
        }
        if let Some(v) = &self.vram_margin {
            c.vram_margin = size(v, "vram_margin")?;
        }
        if let Some(v) = &self.ram_budget {
            c.ram_budget = match size(v, "ram_budget")? {
                0 => return Err(err(v.span().start, "admission.ram_budget: expected a size greater than zero (leave it out for no budget)".into())),
                n => Some(n),
            };
        }
        if let Some(v) = &self.release_timeout {
            c.release_timeout = wait(v, "release_timeout")?;
        }
        if let Some(v) = &self.learn_after {
            c.learn_after = wait(v, "learn_after")?;
        }
        if let Some(b) = self.preempt {
            c.preempt = b;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn parsed_with_positions() {
        let c = Config::parse(
            std::path::Path::new("c.toml"),
            "[admission]\nram_budget = \"8G\"\nram_margin = \"1G\"\nrelease_timeout = \"5s\"\npreempt = true\n",
        )
        .expect("valid");
        assert_eq!(c.admission.ram_budget, Some(8 << 30));
        assert_eq!(c.admission.ram_margin, 1 << 30);
        assert!(c.admission.preempt && c.admission.enabled);
        for (bad, col) in [
            ("ram_budget = \"0\"", 14),
            ("ram_margin = \"lots\"", 14),
            ("learn_after = \"0s\"", 15),
            ("release_timeout = \"2d\"", 19),
        ] {
            let e = Config::parse(
                std::path::Path::new("c.toml"),
                &format!("[admission]\n{bad}\n"),
            )
            .expect_err(bad);
            assert_eq!((e.line, e.column), (2, col), "{e}");
        }
    }
}
