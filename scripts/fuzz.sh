#!/bin/bash
# A bounded run of the manifest/config fuzz target (cargo fuzz, libFuzzer). The machine's one
# toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use the sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p fuzz/target/corpus
RUSTC_BOOTSTRAP=1 cargo fuzz run manifest fuzz/target/corpus fuzz/corpus/manifest -- \
  -max_total_time="${FUZZ_SECONDS:-60}" -max_len=4096 -print_final_stats=1
