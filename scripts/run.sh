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
# Native engines run as modvisor-engine unless a manifest names another user: create it as the
# package's sysusers.d file does (group modvisor for operators, the engine user in video and
# render), when running as root and it is missing.
if [ "$(id -u)" = 0 ] && ! id modvisor-engine >/dev/null 2>&1; then
  echo "scripts/run.sh: creating the engine user modvisor-engine (as the package does)"
  getent group modvisor >/dev/null || groupadd --system modvisor
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    --comment "modvisor engines" modvisor-engine
  for g in video render; do
    if getent group "$g" >/dev/null; then usermod -aG "$g" modvisor-engine; fi
  done
fi
cargo build --release --locked
echo "modvisord starting; in another terminal: ./target/release/modvisorctl status"
exec ./target/release/modvisord --config config/quickstart.toml "$@"
