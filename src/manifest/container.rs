//! `[container]`: the image, its command, ports, volumes, environment, GPUs and limits.

use std::net::IpAddr;

use toml::Spanned;

use super::ctx::{Ctx, is_absolute_clean, secret_path};
use super::raw::{RawContainer, RawPull};
use super::{ContainerSpec, DEFAULT_PIDS_LIMIT, ManifestError, PortMap, Pull, Volume};

pub(super) fn validate_container(
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
        Some(n) => Some(network_name(cx, n)?),
    };
    let cap_add = capabilities(cx, r)?;
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

/// `network`: "host", "none", "bridge" or a network name.
fn network_name(cx: &Ctx<'_>, n: &Spanned<String>) -> Result<String, ManifestError> {
    let v = n.get_ref();
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return cx.err(n.span().start, format!("container.network: expected \"host\", \"none\", \"bridge\" or a network name, found \"{v}\""));
    }
    Ok(v.clone())
}

/// `cap_add`: capability names, written with or without the `CAP_` prefix, kept without it.
fn capabilities(cx: &Ctx<'_>, r: &RawContainer) -> Result<Vec<String>, ManifestError> {
    let mut cap_add = Vec::new();
    for c in r.cap_add.iter().flatten() {
        let v = c.get_ref().trim_start_matches("CAP_");
        if v.is_empty() || !v.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_') {
            return cx.err(c.span().start, format!("container.cap_add: expected a capability name such as \"SYS_NICE\", found \"{}\"", c.get_ref()));
        }
        cap_add.push(v.to_string());
    }
    Ok(cap_add)
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
