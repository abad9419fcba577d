//! `gpus` of `[native]` and `[container]`: which GPUs an engine gets, and the GPU placement
//! that admission reads (`"any"`: the freer GPU, chosen at each start).

use toml::Spanned;

use super::ctx::Ctx;
use super::raw::{RawGpuId, RawGpus};
use super::{Gpus, ManifestError};

/// `"all"`, `"any"`, a count, or a list of indices/UUIDs (`key`: "container.gpus").
pub(super) fn parse(cx: &Ctx<'_>, g: &Spanned<RawGpus>, key: &str) -> Result<Gpus, ManifestError> {
    let at = g.span().start;
    Ok(match g.get_ref() {
        RawGpus::Word(w) if w == "all" => Gpus::All,
        RawGpus::Word(w) if w == "any" => Gpus::Any,
        RawGpus::Word(w) => {
            return cx.err(
                at,
                format!("{key}: expected \"all\", \"any\", a count or a list of GPU indices/UUIDs, found \"{w}\""),
            );
        }
        RawGpus::Count(n) if *n >= 1 && *n <= 64 => Gpus::Count(*n as u32),
        RawGpus::Count(n) => {
            return cx.err(
                at,
                format!("{key}: expected a count from 1 to 64, found {n}"),
            );
        }
        RawGpus::List(l) if l.is_empty() => {
            return cx.err(
                at,
                format!("{key}: expected at least one GPU index or UUID"),
            );
        }
        RawGpus::List(l) => {
            let mut ids = Vec::new();
            for id in l {
                match id {
                    RawGpuId::Index(i) if *i >= 0 && *i < 64 => ids.push(i.to_string()),
                    RawGpuId::Uuid(u) if u.starts_with("GPU-") || u.starts_with("MIG-") => {
                        ids.push(u.clone())
                    }
                    _ => {
                        return cx.err(
                            at,
                            format!(
                                "{key}: expected GPU indices (0, 1, ...) or UUIDs (\"GPU-...\")"
                            ),
                        );
                    }
                }
            }
            Gpus::Ids(ids)
        }
    })
}

impl Gpus {
    /// `CUDA_VISIBLE_DEVICES` for a native engine placed on `chosen` (admission's choice for
    /// `"any"`); None: leave the engine's view alone (`"all"`).
    pub fn cuda_visible(&self, chosen: &[u32]) -> Option<String> {
        let join = |v: Vec<String>| v.join(",");
        match self {
            Gpus::All => None,
            Gpus::Any if chosen.is_empty() => Some("0".into()),
            Gpus::Any => Some(join(chosen.iter().map(|g| g.to_string()).collect())),
            Gpus::Count(n) => Some(join((0..*n).map(|g| g.to_string()).collect())),
            Gpus::Ids(ids) => Some(ids.join(",")),
        }
    }

    /// What a container engine gets once placed: `"any"` becomes the chosen GPU.
    pub fn placed(&self, chosen: &[u32]) -> Gpus {
        match self {
            Gpus::Any if chosen.is_empty() => Gpus::Count(1),
            Gpus::Any => Gpus::Ids(chosen.iter().map(|g| g.to_string()).collect()),
            g => g.clone(),
        }
    }
}
