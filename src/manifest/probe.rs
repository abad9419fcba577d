//! The one parser of probe addresses: `http://HOST:PORT/PATH` and `HOST:PORT`, used by
//! validation, the probes themselves, the start's port guard and the Kubernetes export.

/// An http probe's URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl<'a> {
    /// "127.0.0.1:8080" as written (what a connect and the Host header take).
    pub hostport: &'a str,
    /// "127.0.0.1" (brackets of an IPv6 address removed).
    pub host: &'a str,
    pub port: u16,
    /// "/health" ("/" when the URL has none).
    pub path: &'a str,
}

/// `http://HOST:PORT[/PATH]` with an explicit port; None for anything else.
pub fn http_url(url: &str) -> Option<HttpUrl<'_>> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = host_port(hostport)?;
    Some(HttpUrl {
        hostport,
        host,
        port,
        path,
    })
}

/// `HOST:PORT` with a non-empty host and a port from 1 to 65535; the host without the
/// brackets of an IPv6 address.
pub fn host_port(s: &str) -> Option<(&str, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port = p.parse::<u16>().ok().filter(|p| *p > 0)?;
    let host = h.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port))
}

impl super::Probe {
    /// The address the probe talks to, if any ("127.0.0.1:8080"): where the engine listens.
    pub fn address(&self) -> Option<String> {
        match self {
            super::Probe::Http { url, .. } => http_url(url).map(|u| u.hostport.to_string()),
            super::Probe::Tcp { address } => Some(address.clone()),
            super::Probe::Exec { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let u = http_url("http://127.0.0.1:8080/health?x=1").expect("valid");
        assert_eq!(
            (u.hostport, u.host, u.port, u.path),
            ("127.0.0.1:8080", "127.0.0.1", 8080, "/health?x=1")
        );
        let u = http_url("http://[::1]:9").expect("valid");
        assert_eq!((u.host, u.port, u.path), ("::1", 9, "/"));
        for bad in [
            "https://a:1/",
            "http://a/",
            "http://:80/",
            "http://a:0/",
            "a:80",
        ] {
            assert_eq!(http_url(bad), None, "{bad}");
        }
        assert_eq!(host_port("localhost:11434"), Some(("localhost", 11434)));
        assert_eq!(host_port("localhost"), None);
    }
}
