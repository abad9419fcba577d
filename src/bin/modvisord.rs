use std::process::ExitCode;

use clap::Parser;
use modvisor::cli::DaemonArgs as Args;

fn main() -> ExitCode {
    // The model fetcher child (unprivileged; see store/fetcher.rs), not a daemon.
    if std::env::args().nth(1).as_deref() == Some("--fetch") {
        return modvisor::store::fetcher::main();
    }
    let args = Args::parse();
    let sink = modvisor::logging::init();
    let explicit = args.config.as_os_str() != modvisor::config::DEFAULT_CONFIG;
    let opts = modvisor::daemon::Options {
        config: if explicit { Some(args.config) } else { None },
        bus_address: args.bus_address,
        embedded_bus: args.embedded_bus,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modvisord: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::debug!("logging to {sink}");
    match rt.block_on(modvisor::daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("modvisord: {e}");
            ExitCode::FAILURE
        }
    }
}
