#!/bin/bash
# Builds the Debian package: release binaries, man pages and completions generated from clap,
# then cargo-deb (metadata in Cargo.toml). Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked >&2
cargo build --release --locked --bins >&2
cargo run --locked -q --example gen-docs -- target/docs >&2
cargo deb --no-build --locked 2>&1 | tail -1
