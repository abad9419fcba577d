"""Bus timestamps for the latency rows: `busctl monitor` (systemd's C client, doing nothing
else) records when dbus-daemon passed each message on, with the kernel's receive time
(SO_TIMESTAMP, CLOCK_REALTIME, µs). The Python client that drives a benchmark takes its own
timestamps only when its main loop gets to a message, after it has decoded the ones before:
0.3-0.7 ms late for a signal that follows another, which penalizes whatever is announced
second (modvisord's signals come after systemd's). Rows from here time a call's arrival at the
bus to a signal's, both on the bus's side, for the anchor and modvisor alike."""
import json, subprocess, threading, time

RULES = ("type='method_call',member='StartTransientUnit'", "type='method_call',member='StartModule'",
         "type='signal',member='ModuleChanged'",
         # Only the interfaces the rows read: a Service's PropertiesChanged carries dozens of
         # properties, and formatting them would load the machine being measured.
         "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
         "arg0='org.freedesktop.systemd1.Unit'",
         "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
         "arg0='org.modvisor1.Module'")


class BusMonitor:
    def __init__(self):
        cmd = ['stdbuf', '-oL', 'busctl', '--system', 'monitor', '--json=short']
        cmd += ['--match=' + r for r in RULES]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.msgs = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)   # BecomeMonitor done before the first sample

    def _read(self):
        for line in self.p.stdout:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.msgs.append(m)

    def find(self, pred, timeout=3.0):
        """The timestamp (µs, realtime) of the last message matching pred, waiting for it."""
        end = time.time() + timeout
        while True:
            with self.lock:
                hit = [m for m in self.msgs if pred(m)]
            if hit:
                return hit[-1]['timestamp-realtime']
            if time.time() > end:
                return None
            time.sleep(0.01)

    def first_after(self, t_us, pred, timeout=3.0):
        """The timestamp of the first message after t_us matching pred, waiting for it."""
        return self.find_first(lambda m: m['timestamp-realtime'] >= t_us and pred(m), timeout)

    def find_first(self, pred, timeout=3.0):
        end = time.time() + timeout
        while True:
            with self.lock:
                hit = next((m for m in self.msgs if pred(m)), None)
            if hit:
                return hit['timestamp-realtime']
            if time.time() > end:
                return None
            time.sleep(0.01)

    def forget(self):
        with self.lock:
            self.msgs.clear()

    def close(self):
        self.p.terminate()
        self.p.wait(5)


def data(m):
    return (m.get('payload') or {}).get('data') or []


def call_of(member, first_arg):
    return lambda m: m.get('type') == 'method_call' and m.get('member') == member and data(m)[:1] == [first_arg]


def prop_is(path, name, value):
    """A PropertiesChanged on path whose changed properties hold name = value."""
    def pred(m):
        d = data(m)
        return (m.get('member') == 'PropertiesChanged' and m.get('path') == path and len(d) > 1
                and (d[1].get(name) or {}).get('data') == value)
    return pred


def module_changed(name, state):
    return lambda m: m.get('member') == 'ModuleChanged' and data(m)[:2] == [name, state]
