//! The model fetcher: the unprivileged child modvisord starts for each pull (see
//! `store/fetcher.rs`). A binary of its own, so that the HTTP and TLS client is not part of
//! the daemon: modvisord never runs it, and its code is not in the daemon's memory.

fn main() -> std::process::ExitCode {
    modvisor::store::fetcher::main()
}
