/* global cockpit */
const _ = cockpit.gettext;

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
    if (!Number.isFinite(n) || n <= 0)
        return "0 B";
    let i = 0;
    while (n >= 1024 && i < UNITS.length - 1) {
        n /= 1024;
        i++;
    }
    return (i === 0 ? String(n) : n.toFixed(n >= 100 ? 0 : 1)) + " " + UNITS[i];
}

export function percent(used, total) {
    if (!total)
        return 0;
    return Math.min(100, Math.round((used / total) * 100));
}

/// `Since` is µs since the epoch of the last state change (0: never).
export function since(us) {
    if (!us)
        return "—";
    const d = new Date(us / 1000);
    return d.toLocaleString();
}

export function ago(us, now) {
    if (!us)
        return "";
    const s = Math.max(0, Math.round((now - us / 1000) / 1000));
    if (s < 60)
        return cockpit.format(_("$0 s ago"), s);
    if (s < 3600)
        return cockpit.format(_("$0 min ago"), Math.floor(s / 60));
    if (s < 86400)
        return cockpit.format(_("$0 h ago"), Math.floor(s / 3600));
    return cockpit.format(_("$0 d ago"), Math.floor(s / 86400));
}

/// How far in the future `us` (µs since the epoch) is, as "in N s" (or "now").
export function until(us, now) {
    if (!us)
        return "";
    const s = Math.round((us / 1000 - now) / 1000);
    if (s <= 0)
        return _("now");
    if (s < 60)
        return cockpit.format(_("in $0 s"), s);
    if (s < 3600)
        return cockpit.format(_("in $0 min"), Math.round(s / 60));
    return cockpit.format(_("in $0 h"), Math.round(s / 3600));
}
