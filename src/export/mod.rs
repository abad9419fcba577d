//! `modvisorctl export`: a module as a Kubernetes Deployment + Service (`kube.rs`) or as a
//! standalone systemd unit (`systemd.rs`), from its validated manifest alone (no daemon).
//! Reads `manifest` and `config`; knows nothing of the supervisor or the runtimes.
//!
//! The output is a pure function of the manifest, the state directory and the model: same
//! input, same bytes (maps are ordered, nothing reads the clock or the environment).

pub mod kube;
pub mod systemd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::manifest::{Module, load_dirs, parse_manifest};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Kube,
    Systemd,
}

/// Why a module cannot be exported; each maps to modvisorctl's exit codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// exit 3
    #[error("no module named \"{0}\" in {1}")]
    NoSuchModule(String, String),
    /// exit 1: the module's manifest has errors.
    #[error("{0}")]
    Manifest(String),
    /// exit 1: the module has nothing this format can express.
    #[error("{0}")]
    NotExportable(String),
    /// exit 1
    #[error("{0}")]
    Io(String),
}

impl ExportError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExportError::NoSuchModule(..) => 3,
            _ => 1,
        }
    }
}

/// One exported file: its conventional name and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub module: String,
    pub file_name: String,
    pub text: String,
}

/// Where the manifests come from.
pub enum Source<'a> {
    /// The config's manifest directories, with the daemon's precedence and masking.
    Config(&'a Config),
    /// One manifest file.
    File(&'a Path),
}

/// The valid modules of a source, and the manifest errors by file stem (so that asking for a
/// broken module names its error rather than "no such module").
pub struct Loaded {
    pub modules: BTreeMap<String, Module>,
    pub errors: Vec<(String, String)>,
    pub what: String,
}

pub fn load(source: Source<'_>) -> Result<Loaded, ExportError> {
    match source {
        Source::Config(cfg) => {
            let r = load_dirs(&cfg.modules);
            let errors = r
                .errors
                .iter()
                .map(|e| (stem(&e.path), e.to_string()))
                .collect();
            let dirs: Vec<String> = cfg
                .modules
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            Ok(Loaded {
                modules: r.modules,
                errors,
                what: dirs.join(", "),
            })
        }
        Source::File(path) => {
            // Absolute, so the export names the same file wherever it was run from.
            let path = &std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            let text = std::fs::read_to_string(path)
                .map_err(|e| ExportError::Io(format!("{}: cannot read: {e}", path.display())))?;
            let m = parse_manifest(path, &text, &stem(path))
                .map_err(|e| ExportError::Manifest(e.to_string()))?;
            Ok(Loaded {
                modules: BTreeMap::from([(m.name.clone(), m)]),
                errors: Vec::new(),
                what: path.display().to_string(),
            })
        }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Loaded {
    /// The module called `name`, or why there is none.
    pub fn get(&self, name: &str) -> Result<&Module, ExportError> {
        if let Some(m) = self.modules.get(name) {
            return Ok(m);
        }
        match self.errors.iter().find(|(s, _)| s == name) {
            Some((_, e)) => Err(ExportError::Manifest(e.clone())),
            None => Err(ExportError::NoSuchModule(name.into(), self.what.clone())),
        }
    }
}

/// The model a start would use when nothing was activated: `--model`, else `model.default`.
pub fn model_for(m: &Module, chosen: Option<&Path>) -> Option<PathBuf> {
    chosen
        .map(Path::to_path_buf)
        .or_else(|| m.model.as_ref().and_then(|s| s.default.clone()))
}

/// Exports one module; `state_root` is the config's state directory (`${state_dir}` is
/// `STATE/modules/NAME`, as under modvisord).
pub fn export(
    m: &Module,
    format: Format,
    state_root: &Path,
    model: Option<&Path>,
) -> Result<Output, ExportError> {
    let state_dir = state_root.join("modules").join(&m.name);
    let model = model_for(m, model);
    let (file_name, text) = match format {
        Format::Kube => (
            format!("{}.yaml", m.name),
            kube::render(m, &state_dir, model.as_deref())?,
        ),
        Format::Systemd => (
            systemd::unit_file_name(&m.name),
            systemd::render(m, &state_dir, model.as_deref())?,
        ),
    };
    Ok(Output {
        module: m.name.clone(),
        file_name,
        text,
    })
}

/// Which modules to export.
pub enum Selection {
    One(String),
    /// Every valid module; broken manifests are reported as errors.
    All,
    /// The only module of a `Source::File`.
    TheFile,
}

/// Exports the selection: what could be exported, and why the rest could not (in name order).
pub fn export_selected(
    loaded: &Loaded,
    selection: &Selection,
    format: Format,
    state_root: &Path,
    model: Option<&Path>,
) -> (Vec<Output>, Vec<ExportError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let modules: Vec<Result<&Module, ExportError>> = match selection {
        Selection::One(n) => vec![loaded.get(n)],
        Selection::All | Selection::TheFile => loaded.modules.values().map(Ok).collect(),
    };
    if matches!(selection, Selection::All) {
        errors.extend(
            loaded
                .errors
                .iter()
                .map(|(_, e)| ExportError::Manifest(e.clone())),
        );
    }
    for m in modules {
        match m.and_then(|m| export(m, format, state_root, model)) {
            Ok(o) => out.push(o),
            Err(e) => errors.push(e),
        }
    }
    (out, errors)
}

/// Whole seconds, rounded up (Kubernetes and a few notes count in seconds; never 0).
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}
