//! Daemon logging: the journal (native protocol, `SYSLOG_IDENTIFIER=modvisord`, fields such as
//! `MODVISOR_MODULE` and `MESSAGE_ID` from the event's fields) when stderr is the journal or the
//! journal socket exists; stderr otherwise.

use tracing_subscriber::EnvFilter;
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

/// Installs the global subscriber. Returns where logs go, for a first log line.
pub fn init() -> &'static str {
    let filter = EnvFilter::try_from_env("MODVISOR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    "stderr"
}
