//! `${...}` placeholders: what a module runs, rendered for one start (its active model, its
//! state directory). Pure string work on the validated [`Module`].

use std::path::Path;

use super::{Mode, Module, NativeExec};

/// Substitutes `${model}`, `${model_file}`, `${name}`, `${state_dir}`, `${upstream}`, `${port}`.
pub fn substitute(s: &str, name: &str, state_dir: &Path, model: Option<&Path>) -> String {
    substitute_all(s, name, state_dir, model, None)
}

/// Also `${upstream}` ("127.0.0.1:18080") and `${port}` (18080) of `[serve]`.
fn substitute_all(
    s: &str,
    name: &str,
    state_dir: &Path,
    model: Option<&Path>,
    upstream: Option<&super::ServeAddr>,
) -> String {
    // ${upstream}: "127.0.0.1:18080", or the socket's path; ${port}: a TCP upstream's port.
    let (up, port) = match upstream {
        Some(super::ServeAddr::Tcp(u)) => (u.to_string(), u.port().to_string()),
        Some(super::ServeAddr::Unix(p)) => (p.display().to_string(), String::new()),
        None => Default::default(),
    };
    let model_s = model.map(|m| m.display().to_string()).unwrap_or_default();
    let model_file = model
        .and_then(|m| m.file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    s.replace("${model}", &model_s)
        .replace("${model_file}", &model_file)
        .replace("${name}", name)
        .replace("${state_dir}", &state_dir.display().to_string())
        .replace("${upstream}", &up)
        .replace("${port}", &port)
}

/// What to run for one start, placeholders substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exec {
    Native(NativeExec),
    Container(super::ContainerSpec),
}

impl Exec {
    /// Places the engine on the GPUs admission chose (`gpus`): `CUDA_VISIBLE_DEVICES` for a
    /// native command, the devices of a container. Nothing chosen: `"any"` is GPU 0 (native)
    /// or one GPU of the engine's choice (container).
    pub fn place_gpus(&mut self, chosen: &[u32]) {
        match self {
            Exec::Native(NativeExec::Command {
                environment,
                privileges,
                ..
            }) => {
                if let Some(v) = privileges
                    .gpus
                    .as_ref()
                    .and_then(|g| g.cuda_visible(chosen))
                {
                    environment.insert("CUDA_VISIBLE_DEVICES".into(), v);
                }
            }
            Exec::Native(NativeExec::Unit(_)) => {}
            Exec::Container(c) => c.gpus = c.gpus.as_ref().map(|g| g.placed(chosen)),
        }
    }
}

impl Module {
    /// The command (native) or container spec of `mode`, rendered for `model`; None when the
    /// manifest has no section for that mode.
    pub fn render(&self, mode: Mode, state_dir: &Path, model: Option<&Path>) -> Option<Exec> {
        let upstream = self.serve.as_ref().map(|s| &s.upstream);
        let sub = |s: &str| substitute_all(s, &self.name, state_dir, model, upstream);
        match mode {
            Mode::Container => self.container.clone().map(|mut c| {
                c.command = c.command.iter().map(|a| sub(a)).collect();
                c.environment = c
                    .environment
                    .iter()
                    .map(|(k, v)| (k.clone(), sub(v)))
                    .collect();
                Exec::Container(c)
            }),
            Mode::Native => self.native.clone().map(|n| match n {
                NativeExec::Command {
                    argv,
                    environment,
                    working_directory,
                    privileges,
                } => Exec::Native(NativeExec::Command {
                    argv: argv.iter().map(|a| sub(a)).collect(),
                    environment: environment
                        .iter()
                        .map(|(k, v)| (k.clone(), sub(v)))
                        .collect(),
                    working_directory: working_directory
                        .map(|w| sub(&w.display().to_string()).into()),
                    privileges,
                }),
                unit @ NativeExec::Unit(_) => Exec::Native(unit),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Probe;

    #[test]
    fn placeholders() {
        let s = substitute(
            "${name}:${model}:${model_file}:${state_dir}",
            "m",
            Path::new("/var/lib/modvisor/modules/m"),
            Some(Path::new("/srv/models/tiny.gguf")),
        );
        assert_eq!(
            s,
            "m:/srv/models/tiny.gguf:tiny.gguf:/var/lib/modvisor/modules/m"
        );
    }

    #[test]
    fn probe_addresses() {
        let http = Probe::Http {
            url: "http://127.0.0.1:8080/health".into(),
            expect: None,
        };
        assert_eq!(http.address().as_deref(), Some("127.0.0.1:8080"));
        let tcp = Probe::Tcp {
            address: "[::1]:9".into(),
        };
        assert_eq!(tcp.address().as_deref(), Some("[::1]:9"));
        assert_eq!(
            Probe::Exec {
                argv: vec!["true".into()]
            }
            .address(),
            None
        );
    }
}
