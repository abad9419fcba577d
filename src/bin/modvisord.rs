use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// modvisord: supervisor for local AI inference engines.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Daemon config file.
    #[arg(long, value_name = "FILE", default_value = modvisor::config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Serve on this D-Bus address instead of the system or embedded bus.
    #[arg(long, value_name = "ADDRESS", env = "MODVISOR_BUS_ADDRESS")]
    bus_address: Option<String>,
    /// Always use the embedded bus (RUNTIME/bus), even when a system bus exists.
    #[arg(long)]
    embedded_bus: bool,
}

fn main() -> ExitCode {
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
