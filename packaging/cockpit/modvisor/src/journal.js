/* global cockpit */
// A module's log from the journal, followed: the same matches as `modvisorctl logs NAME`
// (its forwarded output, its transient unit under a system or a user manager).

const KEEP = 1000;

export function journalArgs(name, lines) {
    const unit = `modvisor-${name}.service`;
    return [
        "journalctl", "--no-pager", "--follow", "--lines", String(lines),
        "--output", "json", "--output-fields", "MESSAGE,PRIORITY,SYSLOG_IDENTIFIER,MODVISOR_STREAM",
        `MODVISOR_MODULE=${name}`, "+", `_SYSTEMD_UNIT=${unit}`, "+", `_SYSTEMD_USER_UNIT=${unit}`,
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
