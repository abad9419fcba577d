#!/bin/bash
# The browser test of modvisor's Cockpit page, against real components only: Debian's
# cockpit-ws + cockpit-bridge (+ cockpit-system for the shell), Debian's Chromium driven
# headless by playwright-core, and a real modvisord (the debug build) owning org.modvisor1 on
# the testbed's system bus, its modules real transient units of the testbed's systemd manager.
#
#   tests/cockpit/run.sh        as root, the testbed up (scripts/test.sh brings it up),
#                               after `cargo build`, `npm ci` + `npm run build` in
#                               packaging/cockpit and `npm ci` in tests/cockpit, and with the
#                               tiny GGUF of engines/build-llama-server.sh in
#                               $MODVISOR_TEST_LLAMA (default /var/cache/modvisor-test/llama)
#
# The model the page pulls comes from a small HTTP server on loopback started here
# (tests/cockpit/slow_http.py: a copy of the tiny GGUF, sent in chunks so that the pull takes
# a few seconds); modvisord's model store is under the stand-in engine's model directory, so
# the pulled model can be activated into it.
#
# It fails, never skips, when a component is missing. Bounded: every wait here has a limit,
# the browser part runs under `timeout` (MVCK_TIMEOUT, default 240 s). Screenshots of each
# state and the logs go to target/cockpit-screenshots/. Everything it sets up (the bus policy
# file, the test user, the daemon, cockpit-ws, the units) is removed again on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
fail() { echo "tests/cockpit/run.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs a bus policy file and creates a user)"
if [ -z "${DBUS_SYSTEM_BUS_ADDRESS:-}" ] && [ -f "${TESTBED_STATE:-/tmp/testbed-state}/env" ]; then
  # shellcheck disable=SC1091
  . "${TESTBED_STATE:-/tmp/testbed-state}/env"
fi
export DBUS_SYSTEM_BUS_ADDRESS=${DBUS_SYSTEM_BUS_ADDRESS:-unix:path=/run/dbus/system_bus_socket}
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/run/user/0}

WS=/usr/lib/cockpit/cockpit-ws
MODVISORD=${MODVISORD:-$ROOT/target/debug/modvisord}
MODVISORCTL=${MODVISORCTL:-$ROOT/target/debug/modvisorctl}
PAGE=$ROOT/target/cockpit/modvisor
SHOTS=$ROOT/target/cockpit-screenshots
TESTUSER=mvtest-cockpit-ro
POLICY=/etc/dbus-1/system.d/org.modvisor1-cockpit-test.conf
MODULES=(mvck-svc mvck-stop mvck-mem mvck-fail mvck-llm mvck-new mvck-od)
TINY=${MODVISOR_TEST_LLAMA:-/var/cache/modvisor-test/llama}/tiny.gguf

# --- what must be there (missing is a failure)
for f in "$WS" /usr/bin/cockpit-bridge /usr/share/cockpit/shell/manifest.json /usr/bin/chromium; do
  [ -e "$f" ] || fail "$f is missing (testbed/install.sh installs cockpit-ws, cockpit-bridge, cockpit-system and chromium)"
done
for c in node cc python3 busctl runuser useradd setpriv sha256sum journalctl curl; do
  command -v "$c" >/dev/null || fail "$c is missing"
done
[ -x "$MODVISORD" ] && [ -x "$MODVISORCTL" ] || fail "no modvisord/modvisorctl at $MODVISORD (cargo build first)"
[ -f "$PAGE/manifest.json" ] && [ -f "$PAGE/modvisor.js.gz" ] ||
  fail "the page is not built: (cd packaging/cockpit && npm ci && npm run build)"
[ -f tests/cockpit/node_modules/playwright-core/package.json ] || fail "playwright-core is not installed: (cd tests/cockpit && npm ci)"
[ -f "$TINY" ] || fail "$TINY is missing (engines/build-llama-server.sh builds it; MODVISOR_TEST_LLAMA names its directory)"
for _ in $(seq 50); do busctl --system status org.freedesktop.systemd1 >/dev/null 2>&1 && break; sleep 0.2; done
busctl --system status org.freedesktop.systemd1 >/dev/null 2>&1 ||
  fail "no systemd manager on the system bus ($DBUS_SYSTEM_BUS_ADDRESS): the testbed is not up"
if busctl --system status org.modvisor1 >/dev/null 2>&1; then
  fail "org.modvisor1 is already owned on the system bus (another modvisord): not touching it"
fi

W=$(mktemp -d /tmp/mvck.XXXXXX)
chmod 755 "$W"
PGIDS=()
sysd() { busctl --system call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager "$@"; }
stop_units() {
  for m in "${MODULES[@]}"; do
    sysd StopUnit ss "modvisor-$m.service" replace >/dev/null 2>&1 || true
    sysd ResetFailedUnit s "modvisor-$m.service" >/dev/null 2>&1 || true
  done
}
stop_group() { # SIGTERM to a process group we started, SIGKILL after 10 s
  local g=$1 i
  kill -TERM -- "-$g" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 -- "-$g" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL -- "-$g" 2>/dev/null || true
}
cleanup() {
  set +e
  local i
  for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do stop_group "${PGIDS[$i]}"; done
  stop_units
  rm -f "$POLICY"
  busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1
  # the cgroups the browser test makes for a user's unit named like a module's (when it was
  # cut short before it removed them)
  if [ -n "${TESTUID:-}" ]; then
    for d in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
      [ -d "$d/user.slice/user-$TESTUID.slice" ] &&
        find "$d/user.slice/user-$TESTUID.slice" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
  fi
  if id "$TESTUSER" >/dev/null 2>&1; then
    for p in $(pgrep -u "$TESTUSER"); do kill -KILL "$p" 2>/dev/null; done
    userdel "$TESTUSER" >/dev/null 2>&1
  fi
  mkdir -p "$SHOTS/logs"
  cp "$W"/*.log "$SHOTS/logs/" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
rm -rf "$SHOTS"
mkdir -p "$SHOTS"
stop_units # whatever an interrupted earlier run left

# --- the bus policy, as a package installs it, on the testbed's system bus
install -m 0644 packaging/dbus/org.modvisor1.conf "$POLICY"
busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null

# --- a user who is neither root nor in group modvisor
groupadd -f --system modvisor
id "$TESTUSER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$TESTUSER"
gpasswd -d "$TESTUSER" modvisor >/dev/null 2>&1 || true
TESTUID=$(id -u "$TESTUSER")
mkdir -p "$W/home/.cache" "$W/home/run"
chmod 700 "$W/home/run"
chown -R "$TESTUSER" "$W/home"

# --- the page, where both bridges find it (XDG_DATA_DIRS), readable by the test user
mkdir -p "$W/share/cockpit"
cp -r "$PAGE" "$W/share/cockpit/modvisor"
chmod -R a+rX "$W/share"

# --- a stand-in NVML (the suite's only fake, at the lowest boundary): one GPU, figures from a file
mkdir -p "$W/nvml"
cc -shared -fPIC -O1 -o "$W/nvml/libnvidia-ml.so.1" tests/nvml-stub/nvml_stub.c
printf 'gpu Stand-in_GPU GPU-c0c0-0001 8589934592 1610612736\n' >"$W/gpus"
# An engine left over from an earlier run, holding VRAM: a GPU process of no module.
# (A copy of sleep, so that its command name is the one an operator would see.)
cp /bin/sleep "$W/llama-server"
setsid "$W/llama-server" 100000 </dev/null >/dev/null 2>&1 &
FOREIGN=$!
PGIDS+=("$FOREIGN")

# --- models and the engine stand-in for activation: serves HTTP on a good model, exits 1 on a broken one
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LLM_PORT=$(free_port)
mkdir -p "$W/models"
for m in good good2 broken; do printf 'GGUF\003\000\000\000%s' "$m" >"$W/models/$m.gguf"; done
cat >"$W/engine.sh" <<EOF
#!/bin/sh
# A stand-in inference engine: "loads" the model named by \$1, then serves HTTP.
# On a broken model it stays a second after its error lines before it exits: journald reads a
# writer's unit from /proc when it gets to the line, and a process already gone leaves the
# line without _SYSTEMD_USER_UNIT, which the trusted matches (rightly) do not take as the
# unit's. On a loaded machine journald is that late; modvisord then finds no error line.
case "\$1" in
  *broken*) sleep 0.5; echo "error loading model: \$1: invalid tensor data" >&2; echo "exiting due to model loading error" >&2; sleep 1; exit 1 ;;
esac
echo "serving \$1 on port $LLM_PORT"
exec python3 -m http.server $LLM_PORT --bind 127.0.0.1 --directory "$W/models"
EOF
chmod 755 "$W/engine.sh"

# --- the model store (under the stand-in engine's model directory, so that a pulled model can
# be activated into it) and the server the page pulls from: a copy of the tiny GGUF over plain
# HTTP on loopback (modvisord takes http:// only there), sent slowly
mkdir -p "$W/models/store" "$W/srv"
chmod 755 "$W/models" "$W/models/store" "$W/srv"
cp "$TINY" "$W/srv/tiny.gguf"
chmod 644 "$W/srv/tiny.gguf"
PULL_SHA=$(sha256sum "$W/srv/tiny.gguf" | cut -d' ' -f1)
PULL_SIZE=$(stat -c %s "$W/srv/tiny.gguf")
SRV_PORT=$(free_port)
setsid python3 tests/cockpit/slow_http.py "$SRV_PORT" "$W/srv" "$W/http-requests.log" </dev/null >"$W/slow-http.log" 2>&1 &
PGIDS+=("$!")
for _ in $(seq 100); do curl -sf -o /dev/null -I "http://127.0.0.1:$SRV_PORT/tiny.gguf" && break; sleep 0.1; done
curl -sf -o /dev/null -I "http://127.0.0.1:$SRV_PORT/tiny.gguf" || fail "the model server did not answer on 127.0.0.1:$SRV_PORT within 10 s"

# --- an on-demand module: modvisord listens, the engine (an HTTP server) starts on the first
# connection and stops after 3 s without one (standby)
OD_PORT=$(free_port)
OD_UP=$(free_port)

# --- modvisord's config and modules
mkdir -p "$W/modules.d"
cat >"$W/modvisor.toml" <<EOF
[paths]
modules = ["$W/modules.d"]
state = "$W/state"
runtime = "$W/run"
[runtime]
default_mode = "native"
native_backend = "systemd"
[monitor]
interval = "1s"
nvml_library = "$W/nvml/libnvidia-ml.so.1"
[models]
store = "$W/models/store"
EOF
cat >"$W/modules.d/mvck-svc.toml" <<'EOF'
description = "killed from outside, restarted by systemd"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["/bin/sh", "-c", "echo mvck-svc up; exec sleep 100000"]
[restart]
delay = "3s"
EOF
cat >"$W/modules.d/mvck-stop.toml" <<'EOF'
description = "stopped and started from the page"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["/bin/sh", "-c", "echo mvck-stop up; exec sleep 100000"]
EOF
cat >"$W/modules.d/mvck-mem.toml" <<'EOF'
description = "over its RAM warning threshold"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["/bin/sh", "-c", "exec sleep 100000"]
[resources]
memory_max = "64M"
ram_warn_percent = 1
EOF
cat >"$W/modules.d/mvck-fail.toml" <<'EOF'
description = "an engine that cannot start"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["/bin/sh", "-c", "echo 'cannot open /dev/nvidia0' >&2; exit 3"]
[restart]
policy = "no"
EOF
cat >"$W/modules.d/mvck-llm.toml" <<EOF
description = "model activation with rollback"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["$W/engine.sh", "\${model}"]
[model]
directory = "$W/models"
default = "$W/models/good.gguf"
[health]
http = "http://127.0.0.1:$LLM_PORT/"
interval = "1s"
start_timeout = "20s"
[restart]
delay = "500ms"
EOF
cat >"$W/modules.d/mvck-od.toml" <<EOF
description = "started by a connection, stopped when idle"
trusted = true
[native]
# The engines read files under /tmp (mode 0700): root, temp directory visible, as the
# suites written before engines ran unprivileged (tests/common/mod.rs root_engine).
user = "root"
sandbox = { private_tmp = false, protect_system = false }
command = ["python3", "-m", "http.server", "\${port}", "--bind", "127.0.0.1", "--directory", "$W/srv"]
[health]
http = "http://127.0.0.1:$OD_UP/"
interval = "500ms"
start_timeout = "20s"
[serve]
listen = ["127.0.0.1:$OD_PORT"]
upstream = "127.0.0.1:$OD_UP"
on_demand = true
idle_stop = "3s"
[resources]
priority = 7
EOF
printf 'trusted = true\n[native]\ncommand = ["/bin/true"]\nfrobnicate = 1\n' >"$W/modules.d/mvck-bad.toml"
chmod 644 "$W"/modules.d/*.toml

# --- modvisord on the system bus
NVML_STUB_FILE="$W/gpus" MODVISOR_LOG_STDERR=1 MODVISOR_LOG=info \
  setsid "$MODVISORD" --config "$W/modvisor.toml" --bus-address "$DBUS_SYSTEM_BUS_ADDRESS" \
  </dev/null >"$W/modvisord.log" 2>&1 &
PGIDS+=("$!")
for _ in $(seq 100); do busctl --system status org.modvisor1 >/dev/null 2>&1 && break; sleep 0.2; done
busctl --system status org.modvisor1 >/dev/null 2>&1 || { cat "$W/modvisord.log" >&2; fail "modvisord did not take org.modvisor1 within 20 s"; }

# --- cockpit-ws with a local session: as root, and as the test user
ROOT_PORT=$(free_port)
XDG_DATA_DIRS="$W/share:/usr/share" setsid "$WS" --no-tls -p "$ROOT_PORT" -a 127.0.0.1 --local-session=cockpit-bridge \
  </dev/null >"$W/cockpit-ws-root.log" 2>&1 &
PGIDS+=("$!")
USER_PORT=$(free_port)
setsid runuser -u "$TESTUSER" -- env -i PATH=/usr/bin:/bin HOME="$W/home" USER="$TESTUSER" LANG=C.UTF-8 \
  XDG_CACHE_HOME="$W/home/.cache" XDG_RUNTIME_DIR="$W/home/run" \
  XDG_DATA_DIRS="$W/share:/usr/share" DBUS_SYSTEM_BUS_ADDRESS="$DBUS_SYSTEM_BUS_ADDRESS" \
  "$WS" --no-tls -p "$USER_PORT" -a 127.0.0.1 --local-session=cockpit-bridge \
  </dev/null >"$W/cockpit-ws-user.log" 2>&1 &
PGIDS+=("$!")
for port in "$ROOT_PORT" "$USER_PORT"; do
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/cockpit/login" -H 'Accept: */*' && break
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  curl -s -o /dev/null "http://127.0.0.1:$port/" || fail "cockpit-ws did not listen on 127.0.0.1:$port within 10 s"
done

# --- the browser
export MVCK_ROOT_URL="http://127.0.0.1:$ROOT_PORT" MVCK_USER_URL="http://127.0.0.1:$USER_PORT"
export MVCK_SHOTS="$SHOTS" MVCK_CTL="$MODVISORCTL" MVCK_BUS="$DBUS_SYSTEM_BUS_ADDRESS"
export MVCK_WORK="$W" MVCK_GPUS="$W/gpus" MVCK_FOREIGN_PID="$FOREIGN" MVCK_USER="$TESTUSER"
export MVCK_PROFILE="$W/chromium"
export MVCK_PULL_URL="http://127.0.0.1:$SRV_PORT/tiny.gguf" MVCK_PULL_SHA="$PULL_SHA" MVCK_PULL_SIZE="$PULL_SIZE"
export MVCK_HTTP_LOG="$W/http-requests.log" MVCK_STORE="$W/models/store" MVCK_OD_PORT="$OD_PORT"
timeout --kill-after=10 "${MVCK_TIMEOUT:-240}" node --test --test-concurrency=1 tests/cockpit/page.test.mjs
