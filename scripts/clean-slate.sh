#!/bin/bash
# Removes, before the tests, everything modvisor, `make run` or an earlier test run can leave
# outside the checkout, so that a leftover can never make a red suite look green. Logs each
# removal. Run as root after testbed/up.sh (it asks the testbed's Podman and Docker for
# containers). Caches (/var/cache/modvisor-test, /var/cache/modvisor-sysmgr) are kept: they
# hold what the tests build, not what they assert on.
set -uo pipefail
removed=0
say() { echo "clean-slate: $*"; removed=$((removed + 1)); }

# The package, and what its maintainer scripts made.
if dpkg-query -W -f='${Status}' modvisor 2>/dev/null | grep -q 'install ok'; then
  say "purging the installed modvisor package"
  dpkg --purge modvisor >/dev/null 2>&1 || echo "clean-slate: dpkg --purge modvisor failed" >&2
fi

# A modvisord left running from this checkout (make run) or by a test, by PID and program.
for p in $(pgrep -x modvisord 2>/dev/null; pgrep -f '^/usr/local/libexec/modvisor-test/' 2>/dev/null); do
  say "stopping modvisord pid $p ($(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null))"
  kill -TERM "$p" 2>/dev/null
done

for d in /run/modvisor /var/lib/modvisor /var/log/modvisor /etc/modvisor \
  /usr/local/libexec/modvisor-test /srv/models/modvisor-test; do
  if [ -e "$d" ] || [ -L "$d" ]; then
    say "removing $d"
    rm -rf --one-file-system "$d"
  fi
done
for f in /usr/share/dbus-1/system.d/org.modvisor1.conf /etc/dbus-1/system.d/org.modvisor1.conf \
  /etc/systemd/system/modvisord.service /usr/lib/systemd/system/modvisord.service; do
  [ -e "$f" ] && { say "removing $f"; rm -f "$f"; }
done
# Unit files a test wrote for the testbed's user manager.
for f in /root/.config/systemd/user/mvharden-*.service /root/.config/systemd/user/mvtest-*.service \
  /root/.config/systemd/user/modvisor-*.service; do
  [ -e "$f" ] && { say "removing $f"; rm -f "$f"; }
done

# Test users and groups (tests create them with these prefixes), and the package's.
for u in $(getent passwd | cut -d: -f1 | grep -E '^(mvtest-|modvisor-engine$)'); do
  say "removing user $u"
  userdel -r "$u" >/dev/null 2>&1 || userdel "$u" >/dev/null 2>&1
done
for g in $(getent group | cut -d: -f1 | grep -E '^(mvtest-|modvisor$|modvisor-engine$)'); do
  say "removing group $g"
  groupdel "$g" >/dev/null 2>&1
done

# Transient units of a modvisord in the testbed's manager (a fresh testbed has none; an old
# one that survived would).
if [ -n "${XDG_RUNTIME_DIR:-}" ] && systemctl --user is-system-running >/dev/null 2>&1; then
  for u in $(systemctl --user list-units --all --plain --no-legend 'modvisor-*.service' 'mvtest-*.service' 'mvharden-*.service' 2>/dev/null | awk '{print $1}'); do
    say "stopping unit $u"
    systemctl --user stop "$u" >/dev/null 2>&1
    systemctl --user reset-failed "$u" >/dev/null 2>&1
  done
fi

# Containers with modvisor's labels, in both engines.
for c in $(podman ps -aq --filter label=org.modvisor.module 2>/dev/null); do
  say "removing podman container $c"
  podman rm -f -t 1 "$c" >/dev/null 2>&1
done
if [ -n "${DOCKER_HOST:-}" ]; then
  for c in $(docker ps -aq --filter label=org.modvisor.module 2>/dev/null); do
    say "removing docker container $c"
    docker rm -f "$c" >/dev/null 2>&1
  done
fi
echo "clean-slate: $removed leftovers removed"
