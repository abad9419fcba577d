#!/bin/bash
# The whole test suite, on a fresh Debian 12 machine of this project's kind, as root:
# installs what the tests need, brings up the testbed (journald, a system bus, a systemd
# manager, Podman, Docker), runs formatting/lint checks and every test, and tears the
# testbed down again whatever happens. Tests that need a component fail when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root (the tests start system services)" >&2
  exit 2
fi
t0=$(date +%s)
# The build and the tests need about 8 GiB in the checkout's filesystem (the target directory,
# the package, the fuzz build) and a few more for the images and caches: say so up front
# rather than fail later with "No space left on device".
avail_kib=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${avail_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
  echo "scripts/test.sh: warning: only $((avail_kib / 1024)) MiB free here; the suite needs about 8 GiB" >&2
fi
testbed/install.sh
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked
trap 'testbed/sysmgr/down.sh >/dev/null 2>&1; testbed/down.sh >/dev/null 2>&1 || true' EXIT
testbed/up.sh
# shellcheck disable=SC1091
. "${TESTBED_STATE:-/tmp/testbed-state}/env"
export DBUS_SYSTEM_BUS_ADDRESS XDG_RUNTIME_DIR PODMAN_SOCK DOCKER_HOST
# A clean slate: nothing an earlier run, `make run` or an installed package left outside the
# checkout can make a test pass (each test creates the system paths it needs).
scripts/clean-slate.sh
# The rootfs of the real systemd system manager the sysmgr tests boot (debootstrap, ~1 min
# once, cached).
testbed/sysmgr/up.sh --prepare
# A real llama.cpp server and tiny GGUF models, built once per machine (~6 min the first time),
# cached outside the checkout; then its container image for both engines.
export MODVISOR_TEST_LLAMA=${MODVISOR_TEST_LLAMA:-/var/cache/modvisor-test/llama}
engines/build-llama-server.sh "$MODVISOR_TEST_LLAMA"
engines/build-llama-image.sh "$MODVISOR_TEST_LLAMA"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The Cockpit page (npm, esbuild; no CDN) and its browser test's dependencies; the package
# ships the page, so it is built first.
(cd packaging/cockpit && npm ci --no-audit --no-fund && npm run build)
(cd tests/cockpit && npm ci --no-audit --no-fund)
# The Debian package the packaging test installs (release build, man pages, completions).
scripts/package.sh
cargo nextest run --profile ci --locked
# The Cockpit page in a real cockpit-ws and Debian's Chromium against a real modvisord
# (bounded: 150 s), outside nextest because of its own bound.
cargo build --locked --bins
tests/cockpit/run.sh
# The fuzz target of the manifest parser and validator, for a bounded time.
FUZZ_SECONDS=${FUZZ_SECONDS:-60} scripts/fuzz.sh
echo "scripts/test.sh: all green in $(( $(date +%s) - t0 )) s ($(du -sh target 2>/dev/null | cut -f1) in target/)"
