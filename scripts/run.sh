#!/bin/bash
# Runs modvisord on this machine with the example modules in config/modules.d: no systemd and
# no system bus needed (direct supervision, API on the embedded bus in /run/modvisor).
# Installs the two Debian packages it relies on when missing (dbus-daemon, python3).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v dbus-daemon >/dev/null 2>&1 || need+=(dbus-daemon)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "scripts/run.sh: please install ${need[*]} (apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
cargo build --release --locked
echo "modvisord starting; in another terminal: ./target/release/modvisorctl status"
exec ./target/release/modvisord --config config/quickstart.toml "$@"
