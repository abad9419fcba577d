//! `[native]`: a command modvisor starts (its arguments, environment, working directory and
//! privileges) or an existing systemd unit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use toml::Spanned;

use super::ctx::{Ctx, secret_path};
use super::raw::{RawNative, RawSandbox};
use super::{ManifestError, NativeExec, Privileges, Sandbox};

pub(super) fn validate_native(
    cx: &Ctx<'_>,
    n: &Spanned<RawNative>,
) -> Result<NativeExec, ManifestError> {
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
        (None, Some(u)) => native_unit(cx, n, u),
        (Some(cmd), None) => native_command(cx, r, cmd),
    }
}

/// `unit`: a systemd service name, and none of the keys the unit itself defines.
fn native_unit(
    cx: &Ctx<'_>,
    n: &Spanned<RawNative>,
    u: &Spanned<String>,
) -> Result<NativeExec, ManifestError> {
    let r = n.get_ref();
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
        ("native.gpu", r.gpu.as_ref().map(|s| s.span().start)),
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

/// `command`: a non-empty argv, its environment, working directory and privileges.
fn native_command(
    cx: &Ctx<'_>,
    r: &RawNative,
    cmd: &Spanned<Vec<String>>,
) -> Result<NativeExec, ManifestError> {
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
        Some(w) => Some(working_dir(cx, w)?),
    };
    let privileges = validate_privileges(cx, r)?;
    Ok(NativeExec::Command {
        argv: argv.clone(),
        environment,
        working_directory,
        privileges,
    })
}

/// `working_directory`: absolute, or under `${state_dir}`.
fn working_dir(cx: &Ctx<'_>, w: &Spanned<String>) -> Result<PathBuf, ManifestError> {
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
    Ok(PathBuf::from(w.get_ref()))
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
        gpu: r.gpu.as_ref().is_some_and(|g| *g.get_ref()) || gpus.is_some(),
        gpus,
        model_directory: None,
    })
}
