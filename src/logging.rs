//! Daemon logging: the journal (native protocol, `SYSLOG_IDENTIFIER=modvisord`, fields such as
//! `MODVISOR_MODULE` and `MESSAGE_ID` from the event's fields) when stderr is the journal or the
//! journal socket exists; stderr otherwise.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

fn stderr_is_journal() -> bool {
    let Ok(js) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = js.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// `MODVISOR_LOG`: a level, and `target=level` directives, separated by commas (such as
/// `debug,zbus=info`); `info` when unset or not understood. Targets, not `EnvFilter`: span and
/// field filters are not worth the regular expression engine they bring into the daemon.
fn filter(given: Option<&str>) -> Targets {
    given
        .and_then(|f| f.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

/// Installs the global subscriber. Returns where logs go, for a first log line.
pub fn init() -> &'static str {
    let filter = filter(std::env::var("MODVISOR_LOG").ok().as_deref());
    let use_journal = stderr_is_journal()
        || (crate::journal::journal_socket().exists()
            && std::env::var_os("MODVISOR_LOG_STDERR").is_none());
    if use_journal && let Ok(layer) = tracing_journald::layer() {
        let layer = layer
            .with_syslog_identifier("modvisord".into())
            .with_field_prefix(None);
        if tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .is_ok()
        {
            return "journal";
        }
        return "stderr";
    }
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    "stderr"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn modvisor_log_takes_a_level_and_target_directives() {
        let f = filter(Some("debug,zbus=info"));
        assert!(f.would_enable("modvisor::supervisor", &Level::DEBUG));
        assert!(!f.would_enable("zbus::connection", &Level::DEBUG));
        assert!(f.would_enable("zbus::connection", &Level::INFO));
        for unset_or_garbage in [None, Some("no such=level=at all")] {
            let f = filter(unset_or_garbage);
            assert!(f.would_enable("modvisor", &Level::INFO));
            assert!(!f.would_enable("modvisor", &Level::DEBUG));
        }
    }
}
