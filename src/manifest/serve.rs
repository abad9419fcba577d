//! `[serve]`: the module's public address, owned by modvisord.

use std::time::Duration;

use toml::Spanned;

use super::ctx::Ctx;
use super::raw::RawServe;
use super::{ManifestError, ServeAddr, ServeSpec};

fn addr(cx: &Ctx<'_>, s: &Spanned<String>, key: &str) -> Result<ServeAddr, ManifestError> {
    s.get_ref()
        .parse::<ServeAddr>()
        .or_else(|e| cx.err(s.span().start, format!("{key}: {e}")))
}

pub(super) fn validate(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<RawServe>>,
) -> Result<Option<ServeSpec>, ManifestError> {
    let Some(raw) = raw else { return Ok(None) };
    let at = raw.span().start;
    let r = raw.get_ref();
    let Some(list) = r.listen.as_ref().filter(|l| !l.get_ref().is_empty()) else {
        return cx.err(
            at,
            "serve.listen: expected at least one address modvisord listens on",
        );
    };
    let mut listen = Vec::new();
    for s in list.get_ref() {
        let a = addr(cx, s, "serve.listen")?;
        if matches!(&a, ServeAddr::Tcp(t) if t.ip().is_unspecified()) {
            return cx.err(
                s.span().start,
                format!("serve.listen: {a} would listen on every address: name the one to serve on (127.0.0.1, or a LAN address)"),
            );
        }
        if listen.contains(&a) {
            return cx.err(s.span().start, format!("serve.listen: {a} is listed twice"));
        }
        listen.push(a);
    }
    let Some(up) = r.upstream.as_ref() else {
        return cx.err(
            at,
            "serve.upstream: expected the address the engine listens on",
        );
    };
    let upstream = addr(cx, up, "serve.upstream")?;
    if listen.contains(&upstream) {
        return cx.err(
            up.span().start,
            format!("serve.upstream: {upstream} is also a listen address (modvisord listens there; the engine needs another)"),
        );
    }
    let idle_stop = match &r.idle_stop {
        None => None,
        Some(_) => Some(cx.duration(&r.idle_stop, "serve.idle_stop", Duration::ZERO)?),
    };
    Ok(Some(ServeSpec {
        listen,
        upstream,
        on_demand: r.on_demand.unwrap_or(false),
        idle_stop,
        max_pending: cx.count(&r.max_pending, "serve.max_pending", 1, 4096, 64)?,
    }))
}

/// An address a valid manifest's `[serve]` claims, with where it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claim {
    pub addr: ServeAddr,
    /// Byte offset of the value in the manifest text.
    pub offset: usize,
    /// A `listen` address (modvisord binds it), else the `upstream` (the engine binds it).
    pub listen: bool,
}

/// The `[serve]` addresses of a manifest that validated, in the order written (listen first).
/// The text is read again only for the spans: validation already accepted every value.
pub(super) fn claims(src: &str) -> Vec<Claim> {
    #[derive(serde::Deserialize)]
    struct Only {
        serve: Option<Addrs>,
    }
    #[derive(serde::Deserialize)]
    struct Addrs {
        listen: Option<Vec<Spanned<String>>>,
        upstream: Option<Spanned<String>>,
    }
    let Ok(Only { serve: Some(s) }) = toml::from_str::<Only>(src) else {
        return Vec::new();
    };
    let listen = s.listen.into_iter().flatten().map(|a| (a, true));
    let upstream = s.upstream.into_iter().map(|a| (a, false));
    listen
        .chain(upstream)
        .filter_map(|(a, listen)| {
            Some(Claim {
                addr: a.get_ref().parse().ok()?,
                offset: a.span().start,
                listen,
            })
        })
        .collect()
}
