/* global cockpit */
// A module's log from the journal, followed, from trusted writers only: the same matches as
// `modvisorctl logs NAME` (src/journal.rs `trusted_matches`, which
// tests/cockpit/page.test.mjs checks against real journald):
//   - entries with MODVISOR_MODULE=NAME written by root (_UID=0: modvisord forwarding the
//     output of direct children and containers), never by another process that sets the
//     field itself;
//   - the output of the module's system unit (_SYSTEMD_UNIT: only root makes system units);
//   - the module's unit under a user manager only when that manager is root's (_UID=0, as in
//     the testbed), never another user's unit of the same name.
// Fields starting with "_" are journald's own, not the writer's. Terms of one group are
// ANDed; "+" separates the alternatives.

const KEEP = 1000;

/// modvisor's module names (src/manifest/validate.rs `validate_name`); anything else (a name
/// typed into the page's address) never reaches journalctl, as in `modvisorctl logs`.
export function validName(name) {
    return typeof name === "string" && /^[a-z0-9][a-z0-9_-]{0,62}$/.test(name);
}

export function trustedMatches(name) {
    if (!validName(name))
        throw new Error(cockpit.format(cockpit.gettext("invalid module name “$0”"), String(name)));
    const unit = `modvisor-${name}.service`;
    return [
        `MODVISOR_MODULE=${name}`, "_UID=0",
        "+", `_SYSTEMD_UNIT=${unit}`,
        "+", `_SYSTEMD_USER_UNIT=${unit}`, "_UID=0",
    ];
}

export function journalArgs(name, lines) {
    return [
        "journalctl", "--no-pager", "--follow", "--lines", String(lines),
        "--output", "json", "--output-fields", "MESSAGE,PRIORITY,SYSLOG_IDENTIFIER,MODVISOR_STREAM",
        ...trustedMatches(name),
    ];
}

function message(entry) {
    const m = entry.MESSAGE;
    if (Array.isArray(m)) // not UTF-8: the journal gives bytes
        return new TextDecoder().decode(new Uint8Array(m));
    return m === undefined || m === null ? "" : String(m);
}

/// Follows the journal of module `name`; `onLines(lines)` gets the whole kept tail (at most
/// KEEP entries) after every chunk. Returns a handle with stop().
export function followJournal(name, lines, onLines, onError) {
    if (!validName(name)) {
        onError(new Error(cockpit.format(cockpit.gettext("invalid module name “$0”"), String(name))));
        return { stop() {} };
    }
    const proc = cockpit.spawn(journalArgs(name, lines), { err: "message", environ: ["LC_ALL=C.UTF-8"] });
    const kept = [];
    let buf = "";
    let stopped = false;
    proc.stream(data => {
        buf += data;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i);
            buf = buf.slice(i + 1);
            if (!line.trim())
                continue;
            try {
                const e = JSON.parse(line);
                kept.push({
                    time: Number(e.__REALTIME_TIMESTAMP || 0),
                    priority: Number(e.PRIORITY === undefined ? 6 : e.PRIORITY),
                    ident: e.SYSLOG_IDENTIFIER || "",
                    stream: e.MODVISOR_STREAM || "",
                    message: message(e),
                });
            } catch (ex) {
                kept.push({ time: 0, priority: 6, ident: "", stream: "", message: line });
            }
        }
        if (kept.length > KEEP)
            kept.splice(0, kept.length - KEEP);
        onLines(kept);
    });
    proc.catch(ex => {
        if (!stopped)
            onError(ex);
    });
    return {
        stop() {
            stopped = true;
            proc.close("terminated");
        },
    };
}
