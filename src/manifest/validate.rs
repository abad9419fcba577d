//! Parse, then validate once: raw TOML -> [`Module`], every error with file:line:col.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::container::validate_container;
use super::containment::{Containment, check_untrusted};
use super::ctx::{Ctx, is_absolute_clean};
use super::health::validate_health;
use super::native::validate_native;
use super::raw::*;
use super::units::parse_size;
use super::*;

/// Checks a module name against `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "invalid module name \"{name}\", expected 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        ))
    }
}

/// Parses and validates one manifest. `stem` is the file name without `.toml`. An untrusted
/// module's container is checked against the default containment rules.
pub fn parse_manifest(path: &Path, src: &str, stem: &str) -> Result<Module, ManifestError> {
    parse_manifest_with(path, src, stem, &Containment::default())
}

/// [`parse_manifest`] with the daemon config's containment rules.
pub fn parse_manifest_with(
    path: &Path,
    src: &str,
    stem: &str,
    rules: &Containment,
) -> Result<Module, ManifestError> {
    let raw = parse_raw(path, src)?;
    let cx = Ctx::new(path, src);
    if let Some((at, key)) = super::text::first_control_char(src) {
        return cx.err(
            at,
            format!("{key}: control characters (such as NUL) are not allowed in a manifest"),
        );
    }
    let name = module_name(&cx, raw.name.as_ref(), stem)?;
    let (modes, preferred, stop_timeout) = validate_runtime(&cx, &raw)?;
    let mut native = native_section(&cx, &raw, &modes)?;
    let container = container_section(&cx, &raw, &modes, rules)?;
    let model = validate_model(&cx, raw.model.as_ref())?;
    if let Some(NativeExec::Command { privileges, .. }) = native.as_mut() {
        privileges.model_directory = model_directory(model.as_ref());
    }
    if mentions_model(native.as_ref(), container.as_ref())
        && model.as_ref().and_then(|m| m.default.as_ref()).is_none()
    {
        let off = raw.model.as_ref().map(|m| m.span().start).unwrap_or(0);
        return cx.err(off, "${model} is used but model.default is not set");
    }
    let health = validate_health(&cx, raw.health.as_ref())?;
    let resources = validate_resources(&cx, raw.resources.as_ref())?;
    let restart = validate_restart(&cx, raw.restart.as_ref())?;
    Ok(Module {
        name,
        description: raw.description.unwrap_or_default(),
        enabled: raw.enabled.unwrap_or(true),
        trusted: raw.trusted.unwrap_or(false),
        modes,
        preferred,
        stop_timeout,
        native,
        container,
        model,
        health,
        resources,
        restart,
        serve: super::serve::validate(&cx, raw.serve.as_ref())?,
        source: path.to_path_buf(),
    })
}

/// The TOML text into the raw manifest, a syntax or unknown-key error at its position.
fn parse_raw(path: &Path, src: &str) -> Result<RawManifest, ManifestError> {
    match toml::from_str(src) {
        Ok(r) => Ok(r),
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            Err(ManifestError::at(
                path,
                src,
                offset,
                e.message().trim().to_string(),
            ))
        }
    }
}

/// `name`, else the file name without `.toml`.
fn module_name(
    cx: &Ctx<'_>,
    name: Option<&Spanned<String>>,
    stem: &str,
) -> Result<String, ManifestError> {
    match name {
        Some(n) => {
            if let Err(e) = validate_name(n.get_ref()) {
                return cx.err(n.span().start, format!("name: {e}"));
            }
            Ok(n.get_ref().clone())
        }
        None => {
            if let Err(e) = validate_name(stem) {
                return cx.err(0, format!("file name: {e} (set `name` or rename the file)"));
            }
            Ok(stem.to_string())
        }
    }
}

/// `[runtime]`: the modes (the preferred one first), the preferred mode, the stop timeout.
fn validate_runtime(
    cx: &Ctx<'_>,
    raw: &RawManifest,
) -> Result<(Vec<Mode>, Option<Mode>, Duration), ManifestError> {
    let rt = raw.runtime.as_ref().map(|r| r.get_ref());
    let mut modes = runtime_modes(cx, raw)?;
    let preferred = match rt.and_then(|r| r.preferred.as_ref()) {
        Some(p) => {
            let mode = to_mode(*p.get_ref());
            if !modes.contains(&mode) {
                return cx.err(
                    p.span().start,
                    format!("runtime.preferred: \"{mode}\" is not in runtime.modes"),
                );
            }
            modes.retain(|m| *m != mode);
            modes.insert(0, mode);
            Some(mode)
        }
        None => None,
    };
    let stop_timeout = cx.duration(
        &rt.and_then(|r| r.stop_timeout.clone()),
        "runtime.stop_timeout",
        Duration::from_secs(10),
    )?;
    Ok((modes, preferred, stop_timeout))
}

/// `runtime.modes` as written, else the modes whose sections are present.
fn runtime_modes(cx: &Ctx<'_>, raw: &RawManifest) -> Result<Vec<Mode>, ManifestError> {
    let rt = raw.runtime.as_ref().map(|r| r.get_ref());
    let mut modes: Vec<Mode> = Vec::new();
    if let Some(list) = rt.and_then(|r| r.modes.as_ref()) {
        if list.get_ref().is_empty() {
            return cx.err(
                list.span().start,
                "runtime.modes: expected at least one of \"native\", \"container\"",
            );
        }
        for m in list.get_ref() {
            let mode = to_mode(*m.get_ref());
            if modes.contains(&mode) {
                return cx.err(
                    m.span().start,
                    format!("runtime.modes: \"{mode}\" is listed twice"),
                );
            }
            modes.push(mode);
        }
    } else {
        if raw.native.is_some() {
            modes.push(Mode::Native);
        }
        if raw.container.is_some() {
            modes.push(Mode::Container);
        }
        if modes.is_empty() {
            return cx.err(
                0,
                "expected a [native] or [container] section: the module has nothing to run",
            );
        }
    }
    Ok(modes)
}

/// `[native]`, required when `runtime.modes` lists "native".
fn native_section(
    cx: &Ctx<'_>,
    raw: &RawManifest,
    modes: &[Mode],
) -> Result<Option<NativeExec>, ManifestError> {
    match &raw.native {
        None => {
            if modes.contains(&Mode::Native) {
                let off = raw.runtime.as_ref().map(|r| r.span().start).unwrap_or(0);
                return cx.err(
                    off,
                    "runtime.modes contains \"native\" but there is no [native] section",
                );
            }
            Ok(None)
        }
        Some(n) => Ok(Some(validate_native(cx, n)?)),
    }
}

/// `[container]`, required when `runtime.modes` lists "container"; an untrusted module's
/// container checked against the containment rules first.
fn container_section(
    cx: &Ctx<'_>,
    raw: &RawManifest,
    modes: &[Mode],
    rules: &Containment,
) -> Result<Option<ContainerSpec>, ManifestError> {
    match &raw.container {
        None => {
            if modes.contains(&Mode::Container) {
                let off = raw.runtime.as_ref().map(|r| r.span().start).unwrap_or(0);
                return cx.err(
                    off,
                    "runtime.modes contains \"container\" but there is no [container] section",
                );
            }
            Ok(None)
        }
        Some(c) => {
            if !raw.trusted.unwrap_or(false)
                && let Err((offset, why)) = check_untrusted(c.get_ref(), rules)
            {
                return cx.err(offset, why);
            }
            Ok(Some(validate_container(cx, c)?))
        }
    }
}

/// `[model]`: absolute paths, the default inside the directory when both are given.
fn validate_model(
    cx: &Ctx<'_>,
    m: Option<&Spanned<RawModel>>,
) -> Result<Option<ModelSpec>, ManifestError> {
    let Some(m) = m else { return Ok(None) };
    let mr = m.get_ref();
    let directory = match &mr.directory {
        Some(d) if !is_absolute_clean(d.get_ref()) => {
            return cx.err(
                d.span().start,
                format!(
                    "model.directory: expected an absolute path without \"..\", found \"{}\"",
                    d.get_ref()
                ),
            );
        }
        Some(d) => Some(PathBuf::from(d.get_ref())),
        None => None,
    };
    let default = match &mr.default {
        Some(d) if !is_absolute_clean(d.get_ref()) => {
            return cx.err(
                d.span().start,
                format!(
                    "model.default: expected an absolute path without \"..\", found \"{}\"",
                    d.get_ref()
                ),
            );
        }
        Some(d) => {
            let p = PathBuf::from(d.get_ref());
            if let Some(dir) = &directory
                && !p.starts_with(dir)
            {
                return cx.err(
                    d.span().start,
                    format!(
                        "model.default: \"{}\" is not inside model.directory \"{}\"",
                        p.display(),
                        dir.display()
                    ),
                );
            }
            Some(p)
        }
        None => None,
    };
    Ok(Some(ModelSpec { default, directory }))
}

/// The directory a native command reads its models from: model.directory, else the
/// directory of model.default.
fn model_directory(model: Option<&ModelSpec>) -> Option<PathBuf> {
    model.and_then(|m| {
        m.directory.clone().or_else(|| {
            m.default
                .as_ref()
                .and_then(|d| d.parent().map(Path::to_path_buf))
        })
    })
}

/// Whether the command or environment of either mode uses `${model}` or `${model_file}`.
fn mentions_model(native: Option<&NativeExec>, container: Option<&ContainerSpec>) -> bool {
    let uses_model = |s: &str| s.contains("${model}") || s.contains("${model_file}");
    match (native, container) {
        (
            Some(NativeExec::Command {
                argv, environment, ..
            }),
            _,
        ) if argv
            .iter()
            .chain(environment.values())
            .any(|s| uses_model(s)) =>
        {
            true
        }
        (_, Some(c))
            if c.command
                .iter()
                .chain(c.environment.values())
                .any(|s| uses_model(s)) =>
        {
            true
        }
        _ => false,
    }
}

/// A size such as "16G", more than zero.
fn size(
    cx: &Ctx<'_>,
    v: &Option<Spanned<String>>,
    key: &str,
) -> Result<Option<u64>, ManifestError> {
    match v {
        None => Ok(None),
        Some(s) => match parse_size(s.get_ref()) {
            Ok(0) => cx.err(
                s.span().start,
                format!("{key}: expected a size greater than zero"),
            ),
            Ok(b) => Ok(Some(b)),
            Err(e) => cx.err(s.span().start, format!("{key}: {e}")),
        },
    }
}

/// A percentage from 1 to 100.
fn percent(cx: &Ctx<'_>, v: &Option<Spanned<i64>>, key: &str) -> Result<Option<u8>, ManifestError> {
    match v {
        None => Ok(None),
        Some(_) => cx.count(v, key, 1, 100, 0).map(|n| Some(n as u8)),
    }
}

/// `[resources]`.
fn validate_resources(cx: &Ctx<'_>, r: Option<&RawResources>) -> Result<Resources, ManifestError> {
    let Some(r) = r else {
        return Ok(Resources::default());
    };
    let priority = match &r.priority {
        None => 0,
        Some(p) if (-1000..=1000).contains(p.get_ref()) => *p.get_ref() as i32,
        Some(p) => cx.err(
            p.span().start,
            format!(
                "resources.priority: expected an integer from -1000 to 1000, found {}",
                p.get_ref()
            ),
        )?,
    };
    Ok(Resources {
        priority,
        pinned: r.pinned.unwrap_or(false),
        memory_max: size(cx, &r.memory_max, "resources.memory_max")?,
        vram: size(cx, &r.vram, "resources.vram")?,
        ram_warn_percent: percent(cx, &r.ram_warn_percent, "resources.ram_warn_percent")?,
        vram_warn_percent: percent(cx, &r.vram_warn_percent, "resources.vram_warn_percent")?,
    })
}

/// `[restart]`: `max_delay` defaults to the longer of `delay` and 1m, and is never shorter
/// than `delay`.
fn validate_restart(cx: &Ctx<'_>, r: Option<&RawRestart>) -> Result<RestartSpec, ManifestError> {
    let mut spec = RestartSpec {
        policy: match r.and_then(|r| r.policy) {
            None | Some(RawRestartPolicy::OnFailure) => RestartPolicy::OnFailure,
            Some(RawRestartPolicy::No) => RestartPolicy::No,
            Some(RawRestartPolicy::Always) => RestartPolicy::Always,
        },
        // Not zero, as no duration is: a restart at once, in a loop, until the budget is spent.
        delay: cx.duration(
            &r.and_then(|r| r.delay.clone()),
            "restart.delay",
            Duration::from_secs(2),
        )?,
        max_delay: Duration::ZERO,
        max: cx.count(&r.and_then(|r| r.max.clone()), "restart.max", 0, 10_000, 5)?,
        window: cx.duration(
            &r.and_then(|r| r.window.clone()),
            "restart.window",
            Duration::from_secs(600),
        )?,
    };
    let max_delay = r.and_then(|r| r.max_delay.clone());
    spec.max_delay = cx.duration(
        &max_delay,
        "restart.max_delay",
        spec.delay.max(Duration::from_secs(60)),
    )?;
    if let Some(s) = max_delay.filter(|_| spec.max_delay < spec.delay) {
        cx.err::<()>(
            s.span().start,
            format!(
                "restart.max_delay: {:?} is shorter than restart.delay ({:?})",
                spec.max_delay, spec.delay
            ),
        )?;
    }
    Ok(spec)
}

fn to_mode(m: RawMode) -> Mode {
    match m {
        RawMode::Native => Mode::Native,
        RawMode::Container => Mode::Container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Module, ManifestError> {
        parse_manifest(Path::new("m.toml"), src, "m")
    }

    #[test]
    fn full_example_parses() {
        let m = parse(
            r#"
name = "llama-chat"
trusted = true
[runtime]
modes = ["native", "container"]
preferred = "container"
[native]
command = ["/usr/bin/llama-server", "-m", "${model}"]
[container]
image = "localhost/llama:latest"
ports = ["127.0.0.1:8080:8080", "[::1]:8081:8081/udp"]
volumes = ["/srv/models:/models:ro"]
gpus = [0, "GPU-abc"]
[model]
default = "/srv/models/tiny.gguf"
directory = "/srv/models"
[health]
http = "http://127.0.0.1:8080/health"
[resources]
memory_max = "16G"
[restart]
policy = "always"
max = 3
window = "1m"
"#,
        )
        .expect("valid");
        assert_eq!(m.name, "llama-chat");
        assert_eq!(m.modes, vec![Mode::Container, Mode::Native]);
        assert_eq!(m.resources.memory_max, Some(16 << 30));
        assert_eq!(m.restart.max, 3);
        let c = m.container.expect("container");
        assert_eq!(c.ports[1].host_ip, "::1");
        assert_eq!(c.ports[1].protocol, "udp");
        assert!(c.volumes[0].read_only);
        assert_eq!(c.gpus, Some(Gpus::Ids(vec!["0".into(), "GPU-abc".into()])));
    }

    #[test]
    fn modes_inferred_from_sections() {
        let m = parse("[native]\ncommand = [\"/bin/true\"]\n").expect("valid");
        assert_eq!(m.modes, vec![Mode::Native]);
        assert!(!m.trusted);
        assert!(m.enabled);
    }

    #[test]
    fn names() {
        assert!(validate_name("llama-chat_2").is_ok());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("A").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(validate_name("a/../b").is_err());
    }

    #[test]
    fn line_and_column() {
        let e = parse("description = \"x\"\n[native]\ncommand = []\n").expect_err("invalid");
        assert_eq!((e.line, e.column), (3, 11));
    }
}
