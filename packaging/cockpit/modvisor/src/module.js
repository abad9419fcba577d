/* global cockpit */
// One module: status, the Explain text, actions (start/stop/restart, mode override, model
// activation with its steps as they happen), on-demand serving and memory admission, and its
// log from the journal (trusted writers only), followed.
import { h, replace, patch } from "./dom.js";
import { bytes, since, ago, until } from "./format.js";
import { healthLabel, button, bar, card, descriptionList, emptyState, codeBlock, select, textInput, alert } from "./ui.js";
import { run } from "./notify.js";
import { actionState, actionButtons, gpuTotal } from "./overview.js";
import { followJournal } from "./journal.js";

const _ = cockpit.gettext;
const LOG_LINES = 100;

const STEP_TEXT = {
    validated: _("validated"),
    recorded: _("recorded"),
    restarting: _("restarting"),
    online: _("online"),
    failed: _("failed"),
    "rolling-back": _("rolling back"),
    "rolled-back": _("rolled back"),
    "rollback-failed": _("rollback failed"),
};

function breadcrumb(name) {
    return h("nav", { class: "pf-v6-c-breadcrumb", "aria-label": _("Breadcrumb") },
             h("ol", { class: "pf-v6-c-breadcrumb__list" },
               h("li", { class: "pf-v6-c-breadcrumb__item" },
                 h("a", {
                     href: "#/",
                     class: "pf-v6-c-breadcrumb__link",
                     "data-testid": "back",
                     onclick: ev => { ev.preventDefault(); cockpit.location.go([]) },
                 }, _("Modules"))),
               h("li", { class: "pf-v6-c-breadcrumb__item" },
                 h("span", { class: "pf-v6-c-breadcrumb__item-divider", "aria-hidden": "true" }, "›"),
                 h("span", { class: "pf-v6-c-breadcrumb__link pf-m-current", "aria-current": "page" }, name))));
}

export class ModuleView {
    constructor(ctx, name) {
        this.ctx = ctx;
        this.name = name;
        this.header = h("div", { class: "mv-module-header", "data-testid": "module-header" });
        this.buttons = h("div", { class: "mv-inline" });
        this.modeSelect = null;
        this.modelInput = null;
        this.controls = this.buildControls();
        this.status = h("div", {});
        this.serving = h("div", { "data-testid": "serving" });
        this.explainEl = codeBlock(_("Loading…"), "explain");
        this.activationEl = h("div", { "data-testid": "activation" });
        this.logEl = h("pre", { class: "mv-log", "data-testid": "log", tabindex: "0" });
        this.logNote = h("p", { class: "mv-muted mv-small", "data-testid": "log-note" });
        this.body = h("div", { class: "mv-module-body" },
                      this.header,
                      card(_("Actions"), this.controls, { testid: "actions-card" }),
                      h("div", { class: "mv-grid" },
                        card(_("Status"), this.status, { testid: "status-card" }),
                        card(_("Why this mode"), this.explainEl, { testid: "explain-card" })),
                      card(_("Connections and memory"), this.serving, { testid: "serving-card" }),
                      card(_("Model activation"), this.activationEl, { testid: "activation-card" }),
                      card(_("Log"), [this.logNote, this.logEl], { testid: "log-card" }));
        this.missing = h("div", {});
        this.el = h("div", { class: "mv-module", "data-testid": "module-page", "data-module": name },
                    breadcrumb(name), this.body, this.missing);
        this.explainKey = null;
        this.explaining = false;
        this.journal = null;
        this.startJournal();
        ctx.store.refreshModels();
    }

    buildControls() {
        const ctx = this.ctx;
        const name = this.name;
        this.modeSelect = select([
            ["", _("Automatic (policy)")],
            ["native", _("native")],
            ["container", _("container")],
        ], "", { id: "mv-mode", "aria-label": _("Mode override"), "data-testid": "mode-select" });
        const modeApply = button(_("Set mode"), {
            action: "override",
            onclick: async () => {
                const mode = this.modeSelect.querySelector("select").value;
                if (await run(ctx.notifications, cockpit.format(_("Mode override of $0"), name),
                              () => ctx.store.set_mode_override(name, mode)))
                    ctx.notifications.add("success", mode ? cockpit.format(_("$0 now runs as $1 when the policy allows it"), name, mode)
                        : cockpit.format(_("$0: mode override cleared"), name), "", "success");
            },
        });
        this.modeApply = modeApply;
        this.modelInput = textInput({ id: "mv-model", "aria-label": _("Model"), placeholder: _("model file, e.g. tiny2.gguf, or a store reference such as ollama:NAME:TAG"), "data-testid": "model-input", list: "mv-store-models" });
        // The store's models as suggestions (the Models tab lists them).
        this.modelList = h("datalist", { id: "mv-store-models" });
        const activate = h("form", {
            class: "mv-inline",
            onsubmit: ev => {
                ev.preventDefault();
                this.activate();
            },
        }, this.modelInput, this.modelList, button(_("Activate model"), { variant: "primary", action: "activate" }));
        // The form's submit button: a click or Enter in the input submits, once.
        this.activateButton = activate.querySelector("button");
        this.activateButton.type = "submit";
        return h("div", { class: "mv-controls" },
                 h("div", { class: "mv-control" }, h("span", { class: "mv-control-label" }, _("Engine")), this.buttons),
                 h("div", { class: "mv-control" }, h("label", { class: "mv-control-label", for: "mv-mode" }, _("Mode override")),
                   h("div", { class: "mv-inline" }, this.modeSelect, modeApply)),
                 h("div", { class: "mv-control" }, h("label", { class: "mv-control-label", for: "mv-model" }, _("Model")), activate),
                 this.permissionNote = h("p", { class: "mv-muted mv-small", "data-testid": "actions-note" }));
    }

    async activate() {
        const input = this.modelInput.querySelector("input");
        const model = input.value.trim();
        if (!model) {
            this.ctx.notifications.add("warning", _("Model activation"), _("Name a model file first."), "invalid");
            return;
        }
        const ok = await run(this.ctx.notifications, cockpit.format(_("Activating $0 on $1"), model, this.name),
                             () => this.ctx.store.activate_model(this.name, model));
        if (ok)
            this.ctx.notifications.add("success", cockpit.format(_("$0 now runs $1"), this.name, model), "", "success");
    }

    startJournal() {
        this.logNote.textContent = _("Following the journal…");
        this.journal = followJournal(this.name, LOG_LINES, lines => this.showLog(lines), ex => {
            this.logNote.textContent = cockpit.format(_("The journal cannot be read: $0"), ex.message || ex.problem || String(ex));
        });
    }

    showLog(lines) {
        const el = this.logEl;
        const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
        replace(el, lines.map(l => h("div", { class: ["mv-log-line", l.priority <= 3 && "mv-log-error", l.stream === "stderr" && "mv-log-stderr"] },
                                     h("span", { class: "mv-log-time" }, l.time ? new Date(l.time / 1000).toLocaleTimeString() + " " : ""),
                                     h("span", { class: "mv-log-ident" }, l.ident ? l.ident + ": " : ""),
                                     l.message)));
        this.logNote.textContent = lines.length
            ? cockpit.format(_("The last $0 lines, followed live."), lines.length)
            : _("No log lines yet (reading other users' logs needs the group “systemd-journal” or “adm”).");
        if (atBottom)
            el.scrollTop = el.scrollHeight;
    }

    refreshExplain(m) {
        const key = JSON.stringify([m.Mode, m.ModeReason, m.State, m.Health, m.HealthReason, m.Backend]);
        if (key === this.explainKey)
            return;
        this.explainKey = key;
        if (this.explaining) {
            this.explainAgain = true;
            return;
        }
        this.explaining = true;
        this.ctx.store.explain(this.name)
                .then(text => replace(this.explainEl.querySelector("code"), text))
                .catch(ex => replace(this.explainEl.querySelector("code"), cockpit.format(_("Explain failed: $0"), ex.message || String(ex))))
                .finally(() => {
                    this.explaining = false;
                    if (this.explainAgain) {
                        this.explainAgain = false;
                        this.explainKey = null;
                        const cur = this.ctx.store.modules.get(this.name);
                        if (cur)
                            this.refreshExplain(cur);
                    }
                });
    }

    update(dirty) {
        const m = this.ctx.store.modules.get(this.name);
        if (!m) {
            this.body.hidden = true;
            replace(this.missing, emptyState(cockpit.format(_("No module named “$0”"), this.name),
                                             _("Its manifest is gone, or it never existed."), "module-missing"));
            return;
        }
        this.body.hidden = false;
        replace(this.missing);
        const all = !dirty || dirty.has("all");
        if (all || dirty.has("module:" + this.name) || dirty.has("manager")) {
            this.renderHeader(m);
            this.renderStatus(m);
            this.renderServing(m);
            this.renderControls(m);
            this.refreshExplain(m);
        }
        if (all || dirty.has("activation:" + this.name))
            this.renderActivation();
        if (all || dirty.has("models"))
            replace(this.modelList, (this.ctx.store.models || []).map(x => h("option", { value: x.id }, x.path || x.source)));
    }

    renderHeader(m) {
        replace(this.header,
                h("h1", { class: "pf-v6-c-title pf-m-2xl" }, m.Name, " ", healthLabel(m.Health)),
                h("p", { class: "mv-reason", "data-testid": "module-reason" },
                  h("span", { class: "mv-state", "data-state": m.State }, m.State), " — ", m.HealthReason || ""),
                m.Description && h("p", { class: "mv-muted" }, m.Description));
        this.header.dataset.health = m.Health;
        this.header.dataset.state = m.State;
    }

    renderStatus(m) {
        const vramTotal = gpuTotal(this.ctx.store.manager);
        replace(this.status, descriptionList([
            [_("State"), m.State, "state"],
            [_("Health"), h("span", {}, healthLabel(m.Health), " ", m.HealthReason || ""), "health"],
            [_("Mode"), h("span", {}, m.Mode || "—", m.ModeReason && h("div", { class: "mv-muted mv-small" }, m.ModeReason)), "mode"],
            [_("Backend"), m.Backend || "—", "backend"],
            m.Unit && [_("Unit"), h("code", {}, m.Unit), "unit"],
            m.ContainerId && [_("Container"), h("code", {}, m.ContainerId.slice(0, 12)), "container"],
            [_("Main PID"), m.MainPID ? String(m.MainPID) : "—", "pid"],
            [_("RAM"), bar(_("RAM"), Number(m.MemoryBytes || 0), Number(m.MemoryMaxBytes || 0)), "ram"],
            [_("VRAM"), vramTotal ? bar(_("VRAM"), Number(m.VramBytes || 0), vramTotal) : (m.VramBytes ? bytes(Number(m.VramBytes)) : "—"), "vram"],
            [_("Restarts"), String(m.Restarts ?? 0), "restarts"],
            [_("Since"), since(m.Since) + (m.Since ? " (" + ago(m.Since, Date.now()) + ")" : ""), "since"],
            [_("Active model"), m.ActiveModel ? h("code", {}, m.ActiveModel) : "—", "active-model"],
            [_("Manifest"), m.ManifestPath ? h("code", {}, m.ManifestPath) : "—", "manifest"],
        ]));
    }

    /// On demand / idle stop ([serve]) and admission (footprint, priority, pinned, evictable).
    renderServing(m) {
        const now = Date.now();
        const yes = v => v ? _("yes") : _("no");
        const has = k => m[k] !== undefined;
        const onDemand = has("OnDemand")
            ? h("span", {}, yes(m.OnDemand), m.OnDemand && h("span", { class: "mv-muted" }, " — " + _("started by the first connection to its listen address, not at boot")))
            : "—";
        const idle = !m.IdleStopAt
            ? h("span", { class: "mv-muted" }, m.Connections ? _("not armed: connections are open") : _("not armed"))
            : h("span", { title: since(m.IdleStopAt) },
                cockpit.format(_("at $0 ($1)"), new Date(m.IdleStopAt / 1000).toLocaleTimeString(), until(m.IdleStopAt, now)));
        const ram = Number(m.RamPeakBytes || 0);
        const vram = Number(m.VramPeakBytes || 0);
        const source = m.FootprintSource || "";
        const SOURCE = { measured: _("measured peaks"), declared: _("declared in the manifest (memory_max, vram)") };
        const footprint = source || ram || vram
            ? h("span", {}, cockpit.format(_("RAM $0, VRAM $1"), ram ? bytes(ram) : "—", vram ? bytes(vram) : "—"),
                h("span", { class: "mv-muted" }, " (" + (SOURCE[source] || source || _("unknown")) + ")"))
            : h("span", { class: "mv-muted" }, _("not known yet: nothing measured or declared, starts are admitted without a check"));
        let eviction;
        if (m.Pinned)
            eviction = _("pinned: never evicted");
        else if (m.Evictable)
            eviction = _("evictable now: running and idle, may be stopped to make room for another module");
        else
            eviction = _("not evictable now (only a running, idle module is)");
        replace(this.serving, descriptionList([
            [_("On demand"), onDemand, "on-demand"],
            [_("Connections"), has("Connections") ? String(m.Connections) : "—", "connections"],
            [_("Last activity"), m.LastActivity ? h("span", { title: since(m.LastActivity) }, ago(m.LastActivity, now)) : "—", "last-activity"],
            [_("Idle stop"), has("IdleStopAt") ? idle : "—", "idle-stop"],
            [_("Footprint"), has("FootprintSource") ? footprint : "—", "footprint"],
            [_("Priority"), has("Priority") ? String(m.Priority) : "—", "priority"],
            [_("Eviction"), has("Evictable") ? eviction : "—", "eviction"],
        ]));
        this.serving.dataset.onDemand = String(!!m.OnDemand);
        this.serving.dataset.connections = String(m.Connections ?? "");
        this.serving.dataset.idleStopAt = String(m.IdleStopAt ?? "");
        this.serving.dataset.pinned = String(!!m.Pinned);
        this.serving.dataset.evictable = String(!!m.Evictable);
    }

    renderControls(m) {
        const s = actionState(this.ctx, m);
        patch(this.buttons, [{ id: "b", key: JSON.stringify([s.start, s.stop, s.restart, s.why]), build: () => actionButtons(this.ctx, m, false) }]);
        const off = !!s.why;
        for (const el of [this.modeSelect.querySelector("select"), this.modeApply,
            this.modelInput.querySelector("input"), this.activateButton]) {
            el.disabled = off;
            el.title = s.why || "";
        }
        this.permissionNote.textContent = s.why || "";
        if (!this.modelInput.querySelector("input").placeholder.includes("/") && m.ActiveModel)
            this.modelInput.querySelector("input").placeholder = m.ActiveModel;
    }

    renderActivation() {
        const rec = this.ctx.store.activations.get(this.name);
        if (!rec) {
            replace(this.activationEl, h("p", { class: "mv-muted" },
                                         _("Activating a model restarts the engine with it, waits until it is online, and rolls back to the previous model if it is not.")));
            return;
        }
        const steps = h("ol", { class: "mv-steps", "data-testid": "activation-steps" },
                        rec.steps.map(s => h("li", { class: "mv-step", "data-step": s.step },
                                             h("span", { class: "mv-step-name" }, STEP_TEXT[s.step] || s.step),
                                             s.detail && h("span", { class: "mv-step-detail" }, " — " + s.detail))));
        let result = null;
        if (rec.status === "running")
            result = h("p", { class: "mv-muted", "data-testid": "activation-running" }, cockpit.format(_("Activating $0…"), rec.model));
        else if (rec.status === "ok")
            result = h("div", { "data-testid": "activation-result", "data-result": "ok" },
                       alert("success", cockpit.format(_("$0 is active and online"), rec.model)));
        else {
            const rolled = rec.steps.find(s => s.step === "rolled-back");
            const failed = rec.steps.find(s => s.step === "failed");
            const text = rec.error ? rec.error.text : (failed && failed.detail) || "";
            result = h("div", { "data-testid": "activation-result", "data-result": "failed" },
                       alert("danger", rolled ? cockpit.format(_("Activating $0 failed; rolled back"), rec.model)
                           : cockpit.format(_("Activating $0 failed"), rec.model),
                             h("div", {}, h("p", { "data-testid": "rollback-reason" }, text),
                               rolled && rolled.detail && rolled.detail !== text && h("p", { class: "mv-muted" }, rolled.detail))));
        }
        replace(this.activationEl, h("p", {}, _("Model: "), h("code", {}, rec.model)), steps, result);
    }

    destroy() {
        if (this.journal)
            this.journal.stop();
        this.journal = null;
    }
}
