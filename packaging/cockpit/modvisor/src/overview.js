/* global cockpit */
// The Overview tab: every module (mode, backend, state, health and reason, RAM and VRAM
// against their limits, restarts, since), the GPUs with foreign processes, manifest errors.
import { h, replace, patch } from "./dom.js";
import { bytes, since, ago } from "./format.js";
import { healthLabel, button, bar, card, table, row, emptyState, alert } from "./ui.js";
import { run, ACTION_TEXT } from "./notify.js";

const _ = cockpit.gettext;

export function gpuTotal(manager) {
    return (manager.Gpus || []).reduce((sum, g) => sum + Number(g[3] || 0), 0);
}

/// What the action buttons of a module may do now; shared with the module page.
export function actionState(ctx, m) {
    const name = m.Name;
    const busy = ctx.store.isBusy(name);
    const op = ctx.store.ops.get(name);
    let why = null;
    if (!ctx.perm.canManage)
        why = _("Read-only: changing modules needs root or membership in the group “modvisor”.");
    else if (busy)
        why = op ? cockpit.format(_("$0 is in progress"), op) : _("modvisord is busy with this module");
    const active = m.State === "running" || m.State === "starting";
    return {
        why,
        start: !why && !active,
        stop: !why && active,
        restart: !why,
        op,
        busy,
    };
}

export function actionButtons(ctx, m, small) {
    const name = m.Name;
    const s = actionState(ctx, m);
    const mk = (action, method, variant) => button(ACTION_TEXT[action], {
        variant,
        small,
        action,
        disabled: !s[action],
        title: s.why || undefined,
        onclick: () => run(ctx.notifications, cockpit.format("$0 $1", ACTION_TEXT[action], name),
                           () => ctx.store[method](name)),
    });
    return h("div", { class: "mv-actions", "data-module-actions": name },
             mk("start", "start_module", "secondary"),
             mk("stop", "stop_module", "secondary"),
             mk("restart", "restart_module", "secondary"));
}

function moduleLink(ctx, name) {
    return h("a", {
        href: "#/module/" + encodeURIComponent(name),
        class: "mv-module-link",
        onclick: ev => {
            ev.preventDefault();
            cockpit.location.go(["module", name]);
        },
    }, name);
}

const COLUMNS = () => [_("Module"), _("Mode"), _("State"), _("Health"), _("RAM"), _("VRAM"), _("Restarts"), _("Since"), _("Actions")];

/// The cells of a module's row, each with the key that says when it must be built again.
function moduleCells(ctx, m, vramTotal, now) {
    const s = actionState(ctx, m);
    const mem = [Number(m.MemoryBytes || 0), Number(m.MemoryMaxBytes || 0)];
    const vram = [Number(m.VramBytes || 0), vramTotal];
    const sinceText = ago(m.Since, now) || "—";
    return [
        [[m.Description], () => [moduleLink(ctx, m.Name), m.Description && h("div", { class: "mv-muted mv-small" }, m.Description)]],
        [[m.Mode, m.Backend], () => [h("div", { "data-field": "mode" }, m.Mode || "—"),
                                     h("div", { class: "mv-muted mv-small", "data-field": "backend", title: _("Backend") }, m.Backend || "—")]],
        [[m.State, s.op], () => h("span", { class: "mv-state", "data-state": m.State }, m.State,
                                  s.op && h("span", { class: "mv-muted" }, " (" + s.op + "…)"))],
        [[m.Health, m.HealthReason], () => h("div", { class: "mv-health-cell" }, healthLabel(m.Health),
                                             h("div", { class: "mv-reason mv-small" }, m.HealthReason || ""))],
        [mem, () => bar(_("RAM"), mem[0], mem[1])],
        [vram, () => vramTotal ? bar(_("VRAM"), vram[0], vramTotal) : (vram[0] ? bytes(vram[0]) : "—")],
        [[m.Restarts], () => String(m.Restarts ?? 0)],
        [[m.Since, sinceText], () => h("span", { title: since(m.Since) }, sinceText)],
        [[s.start, s.stop, s.restart, s.why], () => actionButtons(ctx, m, true)],
    ];
}

function moduleRow(ctx, tr, m, vramTotal, now) {
    const cols = COLUMNS();
    for (const [k, v] of [["module", m.Name], ["health", m.Health], ["state", m.State]])
        if (tr.dataset[k] !== v)
            tr.dataset[k] = v;
    patch(tr, moduleCells(ctx, m, vramTotal, now).map(([key, build], i) => ({
        id: i,
        key: JSON.stringify(key),
        build: () => h("td", { class: "pf-v6-c-table__td", "data-label": cols[i] }, build()),
    })));
}

function manifestErrorsCard(ctx) {
    const errors = ctx.store.manager.ManifestErrors || [];
    if (!errors.length)
        return null;
    return h("div", { class: "mv-section", "data-testid": "manifest-errors" },
             alert("warning", cockpit.format(cockpit.ngettext("$0 manifest has errors", "$0 manifests have errors", errors.length), errors.length),
                   h("ul", { class: "mv-errors" },
                     errors.map(([file, error]) => h("li", { "data-file": file },
                                                       h("code", {}, error.startsWith(file) ? error : file + ": " + error))))));
}

function gpuCard(ctx) {
    const gpus = ctx.store.manager.Gpus || [];
    const foreign = ctx.store.manager.ForeignGpuProcesses || [];
    const body = [];
    if (gpus.length) {
        const cols = [_("GPU"), _("Name"), _("UUID"), _("Memory")];
        body.push(table(cols, gpus.map(([index, name, uuid, total, used]) =>
            row(cols, [String(index), name, h("code", {}, uuid), bar(_("GPU memory"), Number(used), Number(total))],
                { "data-gpu": String(index) })), { testid: "gpus", label: _("GPUs") }));
    } else {
        body.push(h("p", { class: "mv-muted", "data-testid": "no-gpus" }, _("No GPU is seen (no NVIDIA driver, or NVML is not available).")));
    }
    if (foreign.length) {
        const cols = [_("PID"), _("Command"), _("VRAM")];
        body.push(h("h3", { class: "mv-subtitle" }, _("GPU processes of no module")),
                  h("p", { class: "mv-muted mv-small" }, _("Usually an engine left over from an earlier run, holding VRAM.")),
                  table(cols, foreign.map(([pid, command, used]) => row(cols, [String(pid), h("code", {}, command), bytes(Number(used))],
                                                                       { "data-pid": String(pid) })),
                        { testid: "foreign-gpu", label: _("GPU processes of no module") }));
    }
    return card(_("GPUs"), body, { testid: "gpus-card" });
}

export class OverviewView {
    constructor(ctx) {
        this.ctx = ctx;
        this.errors = h("div", {});
        this.modulesBody = h("div", {});
        this.gpus = h("div", {});
        this.el = h("div", { class: "mv-overview", "data-testid": "overview" },
                    this.errors,
                    card(_("Modules"), this.modulesBody, { testid: "modules-card" }),
                    this.gpus);
        this.tbody = null;
    }

    update(dirty) {
        const all = !dirty || dirty.has("all");
        if (all || dirty.has("manager")) {
            replace(this.errors, manifestErrorsCard(this.ctx));
            replace(this.gpus, gpuCard(this.ctx));
        }
        this.updateModules();
    }

    updateModules() {
        const { store } = this.ctx;
        const mods = [...store.modules.values()].sort((a, b) => a.Name.localeCompare(b.Name));
        if (!mods.length) {
            this.tbody = null;
            replace(this.modulesBody, emptyState(_("No modules"),
                                                 _("Drop a manifest into /etc/modvisor/modules.d: modvisord picks it up at once."),
                                                 "no-modules"));
            return;
        }
        if (!this.tbody) {
            this.tbody = h("tbody", { class: "pf-v6-c-table__tbody" });
            replace(this.modulesBody,
                    h("table", { class: "pf-v6-c-table pf-m-compact pf-m-grid-lg", role: "grid", "aria-label": _("Modules"), "data-testid": "modules" },
                      h("thead", { class: "pf-v6-c-table__thead" },
                        h("tr", { class: "pf-v6-c-table__tr" },
                          COLUMNS().map(c => h("th", { class: "pf-v6-c-table__th", scope: "col" }, c)))),
                      this.tbody));
        }
        const now = Date.now();
        const vramTotal = gpuTotal(store.manager);
        patch(this.tbody, mods.map(m => ({
            id: m.Name,
            key: "",
            build: () => h("tr", { class: "pf-v6-c-table__tr" }),
        })));
        for (const m of mods)
            moduleRow(this.ctx, this.tbody._mvKeyed.get(m.Name).el, m, vramTotal, now);
    }

    destroy() {}
}
