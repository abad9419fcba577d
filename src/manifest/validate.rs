//! Parse, then validate once: raw TOML -> [`Module`], every error with file:line:col.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::containment::{Containment, check_untrusted};
use super::raw::*;
use super::units::{parse_duration, parse_size};
use super::*;

const PLACEHOLDERS: [&str; 6] = [
    "model",
    "model_file",
    "name",
    "state_dir",
    "port",
    "upstream",
];

pub(super) struct Ctx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl Ctx<'_> {
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

    fn placeholders(&self, s: &str, offset: usize, key: &str) -> Result<(), ManifestError> {
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
                    format!("{key}: unknown placeholder \"${{{name}}}\", expected one of ${{model}}, ${{model_file}}, ${{name}}, ${{state_dir}}"),
                );
            }
            rest = &after[end + 1..];
        }
        Ok(())
    }

    fn environment(
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

fn is_absolute_clean(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute() && !path.components().any(|c| matches!(c, Component::ParentDir))
}

/// The longest duration a manifest may give (a timer or deadline is computed from it).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

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
    let raw: RawManifest = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            return Err(ManifestError::at(
                path,
                src,
                offset,
                e.message().trim().to_string(),
            ));
        }
    };
    let cx = Ctx { path, src };
    if let Some((at, key)) = super::text::first_control_char(src) {
        return cx.err(
            at,
            format!("{key}: control characters (such as NUL) are not allowed in a manifest"),
        );
    }

    let name = match &raw.name {
        Some(n) => {
            if let Err(e) = validate_name(n.get_ref()) {
                return cx.err(n.span().start, format!("name: {e}"));
            }
            n.get_ref().clone()
        }
        None => {
            if let Err(e) = validate_name(stem) {
                return cx.err(0, format!("file name: {e} (set `name` or rename the file)"));
            }
            stem.to_string()
        }
    };

    // [runtime]
    let (modes, preferred, stop_timeout) = {
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
        (modes, preferred, stop_timeout)
    };

    // [native]
    let native = match &raw.native {
        None => {
            if modes.contains(&Mode::Native) {
                let off = raw.runtime.as_ref().map(|r| r.span().start).unwrap_or(0);
                return cx.err(
                    off,
                    "runtime.modes contains \"native\" but there is no [native] section",
                );
            }
            None
        }
        Some(n) => Some(validate_native(&cx, n)?),
    };

    // [container]
    let container = match &raw.container {
        None => {
            if modes.contains(&Mode::Container) {
                let off = raw.runtime.as_ref().map(|r| r.span().start).unwrap_or(0);
                return cx.err(
                    off,
                    "runtime.modes contains \"container\" but there is no [container] section",
                );
            }
            None
        }
        Some(c) => {
            if !raw.trusted.unwrap_or(false)
                && let Err((offset, why)) = check_untrusted(c.get_ref(), rules)
            {
                return cx.err(offset, why);
            }
            Some(validate_container(&cx, c)?)
        }
    };

    // [model]
    let model = match &raw.model {
        None => None,
        Some(m) => {
            let mr = m.get_ref();
            let directory = match &mr.directory {
                Some(d) if !is_absolute_clean(d.get_ref()) => {
                    return cx.err(d.span().start, format!("model.directory: expected an absolute path without \"..\", found \"{}\"", d.get_ref()));
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
            Some(ModelSpec { default, directory })
        }
    };
    let mut native = native;
    if let Some(NativeExec::Command { privileges, .. }) = native.as_mut() {
        privileges.model_directory = model.as_ref().and_then(|m| {
            m.directory.clone().or_else(|| {
                m.default
                    .as_ref()
                    .and_then(|d| d.parent().map(Path::to_path_buf))
            })
        });
    }
    let uses_model = |s: &str| s.contains("${model}") || s.contains("${model_file}");
    let mentions_model = match (&native, &container) {
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
    };
    if mentions_model && model.as_ref().and_then(|m| m.default.as_ref()).is_none() {
        let off = raw.model.as_ref().map(|m| m.span().start).unwrap_or(0);
        return cx.err(off, "${model} is used but model.default is not set");
    }

    // [health]
    let health = validate_health(&cx, raw.health.as_ref())?;

    // [resources]
    let resources = match &raw.resources {
        None => Resources::default(),
        Some(r) => {
            let size =
                |v: &Option<Spanned<String>>, key: &str| -> Result<Option<u64>, ManifestError> {
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
                };
            let pct = |v: &Option<Spanned<i64>>, key: &str| -> Result<Option<u8>, ManifestError> {
                match v {
                    None => Ok(None),
                    Some(_) => cx.count(v, key, 1, 100, 0).map(|n| Some(n as u8)),
                }
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
            Resources {
                priority,
                pinned: r.pinned.unwrap_or(false),
                memory_max: size(&r.memory_max, "resources.memory_max")?,
                vram: size(&r.vram, "resources.vram")?,
                ram_warn_percent: pct(&r.ram_warn_percent, "resources.ram_warn_percent")?,
                vram_warn_percent: pct(&r.vram_warn_percent, "resources.vram_warn_percent")?,
            }
        }
    };

    // [restart]
    let restart = {
        let r = raw.restart.as_ref();
        let mut spec = RestartSpec {
            policy: match r.and_then(|r| r.policy) {
                None | Some(RawRestartPolicy::OnFailure) => RestartPolicy::OnFailure,
                Some(RawRestartPolicy::No) => RestartPolicy::No,
                Some(RawRestartPolicy::Always) => RestartPolicy::Always,
            },
            delay: match r.and_then(|r| r.delay.as_ref()) {
                None => Duration::from_secs(2),
                Some(s) => match parse_duration(s.get_ref()) {
                    Ok(d) if d > MAX_DURATION => cx.err(
                        s.span().start,
                        "restart.delay: expected a duration of at most 366d",
                    )?,
                    Ok(d) => d,
                    Err(e) => cx.err(s.span().start, format!("restart.delay: {e}"))?,
                },
            },
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
        spec
    };

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

fn to_mode(m: RawMode) -> Mode {
    match m {
        RawMode::Native => Mode::Native,
        RawMode::Container => Mode::Container,
    }
}

fn validate_native(cx: &Ctx<'_>, n: &Spanned<RawNative>) -> Result<NativeExec, ManifestError> {
    let r = n.get_ref();
    match (&r.command, &r.unit) {
        (Some(_), Some(u)) => cx.err(
            u.span().start,
            "native: expected either `command` or `unit`, not both",
        ),
        (None, None) => cx.err(
            n.span().start,
            "native: expected `command` (a program to run) or `unit` (an existing systemd unit)",
        ),
        (None, Some(u)) => {
            let unit = u.get_ref();
            let valid_chars = unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":_.\\@-".contains(c));
            if !valid_chars
                || !unit.ends_with(".service")
                || unit.len() <= ".service".len()
                || unit.len() > 255
            {
                return cx.err(u.span().start, format!("native.unit: expected a systemd service name such as \"ollama.service\", found \"{unit}\""));
            }
            for (key, v) in [
                (
                    "native.environment",
                    r.environment.as_ref().map(|s| s.span().start),
                ),
                (
                    "native.working_directory",
                    r.working_directory.as_ref().map(|s| s.span().start),
                ),
                ("native.user", r.user.as_ref().map(|s| s.span().start)),
                ("native.group", r.group.as_ref().map(|s| s.span().start)),
                (
                    "native.environment_file",
                    r.environment_file.as_ref().map(|s| s.span().start),
                ),
                (
                    "native.credentials",
                    r.credentials.as_ref().map(|s| s.span().start),
                ),
                ("native.sandbox", r.sandbox.as_ref().map(|s| s.span().start)),
                ("native.gpu", r.gpu.map(|_| n.span().start)),
                ("native.gpus", r.gpus.as_ref().map(|s| s.span().start)),
            ] {
                if let Some(off) = v {
                    return cx.err(
                        off,
                        format!("{key}: not allowed with `unit` (the unit defines it)"),
                    );
                }
            }
            Ok(NativeExec::Unit(unit.clone()))
        }
        (Some(cmd), None) => {
            let argv = cmd.get_ref();
            if argv.is_empty() || argv[0].is_empty() {
                return cx.err(
                    cmd.span().start,
                    "native.command: expected a non-empty list: the program and its arguments",
                );
            }
            for a in argv {
                if a.contains('\0') {
                    return cx.err(
                        cmd.span().start,
                        "native.command: arguments must not contain NUL bytes",
                    );
                }
                cx.placeholders(a, cmd.span().start, "native.command")?;
            }
            let environment = cx.environment(&r.environment, "native.environment")?;
            let working_directory = match &r.working_directory {
                None => None,
                Some(w) => {
                    cx.placeholders(w.get_ref(), w.span().start, "native.working_directory")?;
                    if !w.get_ref().starts_with('/') && !w.get_ref().starts_with("${state_dir}") {
                        return cx.err(
                            w.span().start,
                            format!(
                                "native.working_directory: expected an absolute path, found \"{}\"",
                                w.get_ref()
                            ),
                        );
                    }
                    Some(PathBuf::from(w.get_ref()))
                }
            };
            let privileges = validate_privileges(cx, r)?;
            Ok(NativeExec::Command {
                argv: argv.clone(),
                environment,
                working_directory,
                privileges,
            })
        }
    }
}

/// A user or group name as `useradd` accepts it; numbers are refused, so that root is only
/// ever named "root" (an explicit, visible choice).
fn account_name(cx: &Ctx<'_>, v: &Spanned<String>, key: &str) -> Result<String, ManifestError> {
    let s = v.get_ref();
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !s.starts_with('-');
    if !ok {
        let what = if key.ends_with("group") {
            "group"
        } else {
            "user"
        };
        return cx.err(
            v.span().start,
            format!("{key}: expected a {what} name, found \"{s}\""),
        );
    }
    if s.chars().all(|c| c.is_ascii_digit()) {
        return cx.err(
            v.span().start,
            format!("{key}: expected a name, not a number, found \"{s}\" (write \"root\" to run as root)"),
        );
    }
    Ok(s.clone())
}

fn secret_path(cx: &Ctx<'_>, v: &Spanned<String>, key: &str) -> Result<PathBuf, ManifestError> {
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

/// `user`, `group`, `environment_file`, `credentials`, `sandbox`, `gpu` of `[native]`.
fn validate_privileges(cx: &Ctx<'_>, r: &RawNative) -> Result<Privileges, ManifestError> {
    let user = match &r.user {
        Some(u) => Some(account_name(cx, u, "native.user")?),
        None => None,
    };
    let group = match &r.group {
        Some(g) => Some(account_name(cx, g, "native.group")?),
        None => None,
    };
    let environment_file = match &r.environment_file {
        Some(f) => Some(secret_path(cx, f, "native.environment_file")?),
        None => None,
    };
    let mut credentials = BTreeMap::new();
    for (name, path) in r.credentials.iter().flat_map(|c| c.get_ref()) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return cx.err(
                path.span().start,
                format!("native.credentials: invalid credential name \"{name}\", expected letters, digits, '_', '.' and '-'"),
            );
        }
        credentials.insert(name.clone(), secret_path(cx, path, "native.credentials")?);
    }
    let gpus = match &r.gpus {
        None => None,
        Some(g) => Some(super::gpus::parse(cx, g, "native.gpus")?),
    };
    let d = Sandbox::default();
    let s = r.sandbox.as_ref().map(|s| s.get_ref());
    let pick = |f: fn(&RawSandbox) -> Option<bool>, dflt: bool| s.and_then(f).unwrap_or(dflt);
    let sandbox = Sandbox {
        no_new_privileges: pick(|s| s.no_new_privileges, d.no_new_privileges),
        protect_system: pick(|s| s.protect_system, d.protect_system),
        protect_home: pick(|s| s.protect_home, d.protect_home),
        private_tmp: pick(|s| s.private_tmp, d.private_tmp),
        private_devices: pick(|s| s.private_devices, d.private_devices),
        restrict_suid_sgid: pick(|s| s.restrict_suid_sgid, d.restrict_suid_sgid),
        lock_personality: pick(|s| s.lock_personality, d.lock_personality),
        protect_kernel_modules: pick(|s| s.protect_kernel_modules, d.protect_kernel_modules),
        protect_kernel_tunables: pick(|s| s.protect_kernel_tunables, d.protect_kernel_tunables),
        protect_kernel_logs: pick(|s| s.protect_kernel_logs, d.protect_kernel_logs),
        protect_control_groups: pick(|s| s.protect_control_groups, d.protect_control_groups),
        drop_capabilities: pick(|s| s.drop_capabilities, d.drop_capabilities),
    };
    Ok(Privileges {
        user,
        group,
        environment_file,
        credentials,
        sandbox,
        gpu: r.gpu.unwrap_or(false) || gpus.is_some(),
        gpus,
        model_directory: None,
    })
}

fn validate_container(
    cx: &Ctx<'_>,
    c: &Spanned<RawContainer>,
) -> Result<ContainerSpec, ManifestError> {
    let r = c.get_ref();
    let image = match &r.image {
        None => return cx.err(c.span().start, "container: expected `image`"),
        Some(i)
            if i.get_ref().trim().is_empty() || i.get_ref().chars().any(|c| c.is_whitespace()) =>
        {
            return cx.err(i.span().start, format!("container.image: expected an image reference such as \"localhost/llama-server:latest\", found \"{}\"", i.get_ref()));
        }
        Some(i) => i.get_ref().clone(),
    };
    let command = r.command.clone().unwrap_or_default();
    for a in &command {
        cx.placeholders(a, c.span().start, "container.command")?;
    }
    let mut ports = Vec::new();
    for p in r.ports.iter().flatten() {
        ports.push(
            parse_port(p.get_ref())
                .or_else(|e| cx.err(p.span().start, format!("container.ports: {e}")))?,
        );
    }
    let mut volumes = Vec::new();
    for v in r.volumes.iter().flatten() {
        volumes.push(
            parse_volume(v.get_ref())
                .or_else(|e| cx.err(v.span().start, format!("container.volumes: {e}")))?,
        );
    }
    let environment = cx.environment(&r.environment, "container.environment")?;
    let gpus = match &r.gpus {
        None => None,
        Some(g) => Some(super::gpus::parse(cx, g, "container.gpus")?),
    };
    let pull = match r.pull {
        None | Some(RawPull::Never) => Pull::Never,
        Some(RawPull::Missing) => Pull::Missing,
    };
    let network = match &r.network {
        None => None,
        Some(n) => {
            let v = n.get_ref();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return cx.err(n.span().start, format!("container.network: expected \"host\", \"none\", \"bridge\" or a network name, found \"{v}\""));
            }
            Some(v.clone())
        }
    };
    let mut cap_add = Vec::new();
    for c in r.cap_add.iter().flatten() {
        let v = c.get_ref().trim_start_matches("CAP_");
        if v.is_empty() || !v.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_') {
            return cx.err(c.span().start, format!("container.cap_add: expected a capability name such as \"SYS_NICE\", found \"{}\"", c.get_ref()));
        }
        cap_add.push(v.to_string());
    }
    let (pids_limit, user) = container_limits(cx, r)?;
    Ok(ContainerSpec {
        network,
        cap_add,
        pids_limit,
        user,
        image,
        command,
        ports,
        volumes,
        environment,
        environment_file: match &r.environment_file {
            Some(f) => Some(secret_path(cx, f, "container.environment_file")?),
            None => None,
        },
        gpus,
        pull,
    })
}

/// `pids_limit` (default 4096: a fork bomb inside cannot exhaust the host's PIDs) and `user`
/// ("name", "uid", "uid:gid", "name:group"; the image's default when absent).
fn container_limits(
    cx: &Ctx<'_>,
    r: &RawContainer,
) -> Result<(u32, Option<String>), ManifestError> {
    let pids = cx.count(
        &r.pids_limit,
        "container.pids_limit",
        16,
        1_000_000,
        DEFAULT_PIDS_LIMIT,
    )?;
    let user = match &r.user {
        None => None,
        Some(u) => {
            let s = u.get_ref();
            let part_ok = |p: &str| {
                !p.is_empty()
                    && p.len() <= 32
                    && !p.starts_with('-')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            };
            let ok = match s.split_once(':') {
                Some((a, b)) => part_ok(a) && part_ok(b),
                None => part_ok(s),
            };
            if !ok {
                return cx.err(
                    u.span().start,
                    format!(
                        "container.user: expected \"USER\", \"UID\" or \"UID:GID\", found \"{s}\""
                    ),
                );
            }
            Some(s.clone())
        }
    };
    Ok((pids, user))
}

/// `ADDR:HOST_PORT:CONTAINER_PORT[/tcp|/udp]`, the host address explicit (IPv6 in brackets).
fn parse_port(s: &str) -> Result<PortMap, String> {
    let expected = || {
        format!(
            "expected \"HOST_ADDRESS:HOST_PORT:CONTAINER_PORT\" with an explicit host address such as \"127.0.0.1:8080:8080\", found \"{s}\""
        )
    };
    let (spec, protocol) = match s.rsplit_once('/') {
        Some((a, p @ ("tcp" | "udp"))) => (a, p.to_string()),
        Some(_) => return Err(expected()),
        None => (s, "tcp".to_string()),
    };
    let (host_ip, rest) = if let Some(r) = spec.strip_prefix('[') {
        let (ip, rest) = r.split_once("]:").ok_or_else(expected)?;
        (ip.to_string(), rest)
    } else {
        let (ip, rest) = spec.split_once(':').ok_or_else(expected)?;
        (ip.to_string(), rest)
    };
    if host_ip.parse::<IpAddr>().is_err() {
        return Err(expected());
    }
    let (hp, cp) = rest.split_once(':').ok_or_else(expected)?;
    let host_port: u16 = hp.parse().map_err(|_| expected())?;
    let container_port: u16 = cp.parse().map_err(|_| expected())?;
    if host_port == 0 || container_port == 0 {
        return Err(expected());
    }
    Ok(PortMap {
        host_ip,
        host_port,
        container_port,
        protocol,
    })
}

pub(super) fn parse_volume(s: &str) -> Result<Volume, String> {
    let expected = || {
        format!(
            "expected \"/HOST/PATH:/CONTAINER/PATH[:ro|:rw]\" with absolute paths, found \"{s}\""
        )
    };
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, ro) = match parts.as_slice() {
        [a, b] => (*a, *b, false),
        [a, b, "ro"] => (*a, *b, true),
        [a, b, "rw"] => (*a, *b, false),
        _ => return Err(expected()),
    };
    if !is_absolute_clean(src) || !is_absolute_clean(dst) {
        return Err(expected());
    }
    Ok(Volume {
        source: src.into(),
        target: dst.into(),
        read_only: ro,
    })
}

fn validate_health(
    cx: &Ctx<'_>,
    h: Option<&Spanned<RawHealth>>,
) -> Result<HealthSpec, ManifestError> {
    let Some(h) = h else {
        return Ok(HealthSpec {
            probe: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(600),
            start_limit: Duration::from_secs(3600),
            failures: 3,
            successes: 1,
        });
    };
    let r = h.get_ref();
    let set = [r.http.is_some(), r.tcp.is_some(), r.exec.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set > 1 {
        return cx.err(
            h.span().start,
            "health: expected only one of `http`, `tcp`, `exec`",
        );
    }
    let probe = if let Some(u) = &r.http {
        let url = u.get_ref();
        let ok = super::probe::http_url(url).is_some();
        if !ok {
            return cx.err(u.span().start, format!("health.http: expected a URL such as \"http://127.0.0.1:8080/health\" (http, explicit port), found \"{url}\""));
        }
        Some(Probe::Http {
            url: url.clone(),
            expect: r.expect.clone(),
        })
    } else if let Some(t) = &r.tcp {
        let a = t.get_ref();
        let ok = super::probe::host_port(a).is_some();
        if !ok {
            return cx.err(
                t.span().start,
                format!("health.tcp: expected \"HOST:PORT\", found \"{a}\""),
            );
        }
        Some(Probe::Tcp { address: a.clone() })
    } else if let Some(e) = &r.exec {
        if e.get_ref().is_empty() || e.get_ref()[0].is_empty() {
            return cx.err(
                e.span().start,
                "health.exec: expected a non-empty list: the program and its arguments",
            );
        }
        Some(Probe::Exec {
            argv: e.get_ref().clone(),
        })
    } else {
        None
    };
    if r.expect.is_some() && r.http.is_none() {
        return cx.err(h.span().start, "health.expect: only allowed with `http`");
    }
    let start_timeout = cx.duration(
        &r.start_timeout,
        "health.start_timeout",
        Duration::from_secs(600),
    )?;
    let default_limit = Duration::from_secs(3600).max(start_timeout);
    let start_limit = cx.duration(&r.start_limit, "health.start_limit", default_limit)?;
    if let Some(s) = &r.start_limit
        && start_limit < start_timeout
    {
        return cx.err(
            s.span().start,
            "health.start_limit: expected at least health.start_timeout",
        );
    }
    Ok(HealthSpec {
        probe,
        interval: cx.duration(&r.interval, "health.interval", Duration::from_secs(5))?,
        timeout: cx.duration(&r.timeout, "health.timeout", Duration::from_secs(2))?,
        start_timeout,
        start_limit,
        failures: cx.count(&r.failures, "health.failures", 1, 1000, 3)?,
        successes: cx.count(&r.successes, "health.successes", 1, 1000, 1)?,
    })
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
