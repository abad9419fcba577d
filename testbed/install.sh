#!/bin/bash
# Installs, from Debian's packages, what the testbed starts: container engines, runc, a static busybox
# for the local test image, and the supervisord peer used by benchmarks. Idempotent; run as root.
set -euo pipefail
need=()
for p in podman runc docker.io busybox-static curl bc jq python3-dbus dbus-daemon dbus systemd iproute2 supervisor python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "testbed packages present"
