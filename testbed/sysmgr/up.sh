#!/bin/bash
# A real systemd *system* manager (PID 1 in a container), for what the testbed's user manager cannot
# do: User=, the full unit sandbox, installing the .deb and `systemctl enable --now modvisord` as an
# operator would. Boots a Debian bookworm rootfs under systemd-nspawn in ~0.5 s (the rootfs is built
# once with debootstrap, ~1 min, and cached).
# Usage: up.sh --prepare -> only builds the cached tools and rootfs (scripts/test.sh, before the tests)
#        up.sh   -> prints the container's init PID; run commands inside with
#                   nsenter -t "$(cat $SYSMGR_STATE/init.pid)" -a CMD...
#        down.sh -> stops it and cleans up.
# The host's packages are not changed: systemd-container and debootstrap are unpacked under the cache
# (installing systemd-container could upgrade the host's systemd under a running testbed).
set -euo pipefail
CACHE=${SYSMGR_CACHE:-/var/cache/modvisor-sysmgr}
STATE=${SYSMGR_STATE:-/run/modvisor-sysmgr}
MIRROR=${SYSMGR_MIRROR:-$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
[ -n "$MIRROR" ] || MIRROR=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')
mkdir -p "$CACHE/tools" "$STATE"
if [ ! -x "$CACHE/tools/usr/bin/systemd-nspawn" ]; then
  ( cd "$CACHE" && apt-get download -q "systemd-container=$(dpkg-query -W -f='${Version}' systemd)" debootstrap >/dev/null 2>&1 ) || {
    apt-get update -qq && ( cd "$CACHE" && apt-get download -q "systemd-container=$(dpkg-query -W -f='${Version}' systemd)" debootstrap ); }
  for f in "$CACHE"/*.deb; do dpkg-deb -x "$f" "$CACHE/tools"; done
fi
if [ ! -x "$CACHE/rootfs/lib/systemd/systemd" ]; then
  rm -rf "$CACHE/rootfs.tmp"
  DEBOOTSTRAP_DIR=$CACHE/tools/usr/share/debootstrap timeout 900 "$CACHE/tools/usr/sbin/debootstrap" \
    --variant=minbase --include=systemd,systemd-sysv,dbus,passwd,util-linux,procps bookworm "$CACHE/rootfs.tmp" "$MIRROR" >"$STATE/debootstrap.log"
  mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
fi
[ "${1:-}" = --prepare ] && exit 0
# A writable copy per run, so what a test installs never leaks into the next run.
rm -rf "$STATE/rootfs"; cp -a "$CACHE/rootfs" "$STATE/rootfs"
# nspawn in cgroups of its own, beside (not under) the testbed's.
for h in unified systemd; do
  [ -d /sys/fs/cgroup/$h ] && mkdir -p /sys/fs/cgroup/$h/modvisor-sysmgr
done
cat >"$STATE/launch.sh" <<LAUNCH
#!/bin/bash
for h in unified systemd; do [ -d /sys/fs/cgroup/\$h/modvisor-sysmgr ] && echo \$\$ > /sys/fs/cgroup/\$h/modvisor-sysmgr/cgroup.procs; done
export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/nonexistent SYSTEMD_NSPAWN_LOCK=0
exec $CACHE/tools/usr/bin/systemd-nspawn -D $STATE/rootfs -b --machine=modvisor-sysmgr \\
  --register=no --keep-unit --private-network --link-journal=no --console=read-only
LAUNCH
chmod +x "$STATE/launch.sh"
setsid nohup "$STATE/launch.sh" >"$STATE/nspawn.log" 2>&1 </dev/null &
echo $! >"$STATE/nspawn.pid"
for _ in $(seq 100); do
  init=$(pgrep -P "$(cat "$STATE/nspawn.pid")" 2>/dev/null | head -1 || true)
  if [ -n "$init" ] && s=$(nsenter -t "$init" -a systemctl is-system-running 2>/dev/null); then :; fi
  case "${s:-}" in running|degraded) echo "$init" >"$STATE/init.pid"; echo "$init"; exit 0;; esac
  sleep 0.1
done
echo "sysmgr: the container's systemd did not come up; see $STATE/nspawn.log" >&2; exit 1
