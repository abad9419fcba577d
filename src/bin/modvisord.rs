use std::process::ExitCode;

use modvisor::cli::daemon_argv::{self, Request};

/// The most threads doing blocking work at once.
const BLOCKING_THREADS: usize = 8;

fn main() -> ExitCode {
    // One malloc arena: a thread's own arena (glibc makes up to 8 per core) keeps what the
    // start of hundreds of modules freed scattered in its pages; with one, VmRSS with 100
    // modules is 0.3 MiB lower. The daemon's threads mostly wait, and each has glibc's
    // per-thread cache for small blocks, so they rarely meet on the arena's lock.
    // SAFETY: no other thread exists yet.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // The listening sockets systemd kept for us across a restart, taken before any thread
    // runs (the LISTEN_* variables are removed, so engines do not inherit them).
    // SAFETY: no other thread exists yet.
    let kept = unsafe { modvisor::fdstore::take_inherited() };
    let args = match read_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let sink = modvisor::logging::init();
    let explicit = args.config.as_os_str() != modvisor::config::DEFAULT_CONFIG;
    let opts = modvisor::daemon::Options {
        config: if explicit { Some(args.config) } else { None },
        bus_address: args.bus_address,
        embedded_bus: args.embedded_bus,
    };
    // Blocking work (file checks, NSS lookups, /proc sampling) is short: a few threads keep up
    // with hundreds of modules starting at once, where tokio's default of 512 made one thread
    // (and a malloc arena) per start.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modvisord: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::debug!("logging to {sink}");
    if kept > 0 {
        tracing::info!("{kept} listening sockets kept across the restart by systemd");
    }
    match rt.block_on(modvisor::daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("modvisord: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The command line; help, version and a refusal end the program with their exit code.
fn read_args() -> Result<daemon_argv::Args, ExitCode> {
    let env = || std::env::var_os(daemon_argv::BUS_ADDRESS_ENV);
    match daemon_argv::parse(std::env::args_os().skip(1), env()) {
        Ok(Request::Run(args)) => Ok(args),
        Ok(Request::Help) => {
            let shown = env().map(|v| v.to_string_lossy().into_owned());
            print!("{}", daemon_argv::help(shown.as_deref()));
            Err(ExitCode::SUCCESS)
        }
        Ok(Request::Version) => {
            println!("{}", daemon_argv::version());
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Err(ExitCode::from(2))
        }
    }
}
