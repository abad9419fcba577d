#!/usr/bin/python3
"""modvisor adoption at scale (P6): --bulk engines running as units, modvisord killed with SIGKILL and
started again, --reps times; samples "label<TAB>unit<TAB>value" to stdout, notes to stderr.

The daemon (--modvisord --config, whose modules dir holds --bulk enabled manifests PREFIX-<i>) is started
once and waited for (all modules running). Then, per round: every unit's MainPID and NRestarts are read
from systemd; modvisord gets SIGKILL; t0; it is started again; ListModules is polled every 10 ms until
all --bulk modules are running (t1); MainPID and NRestarts are read again. Samples: t0 -> org.modvisor1
answers, t0 -> all running, and how many units changed MainPID or NRestarts (the goal: none; an engine
restarted by modvisor or by systemd would show in one of them). The daemon is stopped at the end (its
units survive it: they are stopped here).
"""
import argparse, os, signal, subprocess, sys, time
import dbus
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sdbus import Systemd, unit_path, now_ns
from mvbus import MV, MV_PATH, MGR_IF

ap = argparse.ArgumentParser()
ap.add_argument('--bulk', type=int, default=200)
ap.add_argument('--reps', type=int, default=3)
ap.add_argument('--prefix', default='mvbench-adopt-')
ap.add_argument('--modvisord', required=True)
ap.add_argument('--config', required=True)
ap.add_argument('--piddir', required=True)
ap.add_argument('--log', default='/dev/null')
ap.add_argument('--timeout', type=float, default=120)
a = ap.parse_args()
sd = Systemd()
SVC = 'org.freedesktop.systemd1.Service'
mods = ['%s%d' % (a.prefix, i) for i in range(a.bulk)]
units = ['modvisor-%s.service' % m for m in mods]


def emit(label, unit, v):
    print('%s\t%s\t%.4f' % (label, unit, v), flush=True)


def note(*x):
    print('#', *x, file=sys.stderr, flush=True)


def running_count():
    """Modules of ours in state running, or None while modvisord does not answer."""
    try:
        rows = dbus.SystemBus().get_object(MV, MV_PATH, introspect=False).ListModules(dbus_interface=MGR_IF)
    except dbus.DBusException:
        return None
    want = set(mods)
    return sum(1 for r in rows if str(r[0]) in want and str(r[2]) == 'running')


def start_daemon():
    p = subprocess.Popen([a.modvisord, '--config', a.config], stdin=subprocess.DEVNULL,
                         stdout=open(a.log, 'a'), stderr=subprocess.STDOUT)
    open(os.path.join(a.piddir, 'daemon.%d' % p.pid), 'w').write(a.config + '\n')
    return p


def forget(p):
    try:
        os.unlink(os.path.join(a.piddir, 'daemon.%d' % p.pid))
    except FileNotFoundError:
        pass


def wait_all_running(p, t0):
    """(t owned, t all running) in ns, polling every 10 ms."""
    owned = None
    end = time.monotonic() + a.timeout
    while time.monotonic() < end:
        if p.poll() is not None:
            raise SystemExit('modvisord exited with %s: see %s' % (p.returncode, a.log))
        n = running_count()
        t = now_ns()
        if n is not None and owned is None:
            owned = t
        if n == a.bulk:
            return owned, t
        time.sleep(0.01)
    raise SystemExit('only %s of %d modules running %g s after the start: see %s'
                     % (running_count(), a.bulk, a.timeout, a.log))


def unit_figures():
    return {u: (int(sd.get(unit_path(u), SVC, 'MainPID')), int(sd.get(unit_path(u), SVC, 'NRestarts')))
            for u in units}


p = start_daemon()
try:
    wait_all_running(p, now_ns())
    note('P6: %d modules running; kill -9 and restart, %d rounds' % (a.bulk, a.reps))
    for r in range(a.reps):
        before = unit_figures()
        p.send_signal(signal.SIGKILL)
        p.wait()
        forget(p)
        t0 = now_ns()
        p = start_daemon()
        owned, done = wait_all_running(p, t0)
        after = unit_figures()
        emit('P6 modvisor: kill -9, exec -> org.modvisor1 answers (%d running units)' % a.bulk, 'ms',
             (owned - t0) / 1e6)
        emit('P6 modvisor: kill -9, exec -> %d modules running (adopted)' % a.bulk, 'ms', (done - t0) / 1e6)
        emit('P6 modvisor: adopted units whose MainPID changed', 'count',
             sum(1 for u in units if after[u][0] != before[u][0]))
        emit('P6 modvisor: adopted units whose NRestarts grew', 'count',
             sum(1 for u in units if after[u][1] != before[u][1]))
finally:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    forget(p)
