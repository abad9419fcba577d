//! `[health]`: the probe (http, tcp or exec) and its timing.

use std::time::Duration;

use toml::Spanned;

use super::ctx::Ctx;
use super::raw::RawHealth;
use super::{HealthSpec, ManifestError, Probe};

pub(super) fn validate_health(
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
    let probe = validate_probe(cx, h)?;
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

/// At most one of `http`, `tcp`, `exec`; `expect` only with `http`.
fn validate_probe(cx: &Ctx<'_>, h: &Spanned<RawHealth>) -> Result<Option<Probe>, ManifestError> {
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
            expect: r.expect.as_ref().map(|e| e.get_ref().clone()),
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
    if let Some(e) = r.expect.as_ref().filter(|_| r.http.is_none()) {
        return cx.err(e.span().start, "health.expect: only allowed with `http`");
    }
    Ok(probe)
}
