/* global cockpit */
// The Models tab: the model store of modvisord (org.modvisor1.Models). Its models with their
// sizes and the modules that use them; pulls with a progress bar per job, driven by the job
// object's PropertiesChanged (and its Finished signal), never by polling; removal; and
// activation of a model into a module (the Manager's ActivateModel, whose steps the module's
// page shows). Everyone may read; pulling, removing and activating need root or the group
// "modvisor", and the bus says no to anyone else whatever the page offers.
import { h, replace, patch } from "./dom.js";
import { bytes, since } from "./format.js";
import { button, card, table, row, emptyState, alert, textInput, select, checkbox, percentBar, setPercentBar } from "./ui.js";
import { run } from "./notify.js";
import { JOB_FINAL } from "./store.js";

const _ = cockpit.gettext;

const JOB_STATE_TEXT = {
    queued: _("queued"),
    running: _("downloading"),
    verifying: _("verifying"),
    completed: _("completed"),
    failed: _("failed"),
    cancelled: _("cancelled"),
};

function readOnlyWhy(ctx) {
    if (!ctx.perm.known)
        return _("Checking your permissions…");
    if (!ctx.perm.canManage)
        return _("Read-only: pulling, removing and activating models needs root or membership in the group “modvisor”.");
    return null;
}

function count(n) {
    if (!n)
        return "—";
    if (n >= 1e9)
        return (n / 1e9).toFixed(1) + " B";
    if (n >= 1e6)
        return (n / 1e6).toFixed(1) + " M";
    if (n >= 1e3)
        return (n / 1e3).toFixed(1) + " K";
    return String(n);
}

/// One pull job: built once, then updated in place from its properties.
class JobView {
    constructor(ctx, path) {
        this.ctx = ctx;
        this.path = path;
        this.title = h("span", { class: "mv-job-model", "data-testid": "job-model" });
        this.state = h("span", { class: "pf-v6-c-label pf-m-compact mv-job-state", "data-testid": "job-state" },
                       h("span", { class: "pf-v6-c-label__content" }, h("span", { class: "pf-v6-c-label__text" })));
        this.bar = percentBar(_("Download progress"), 0, "", { testid: "job-progress" });
        this.error = h("div", { "data-testid": "job-error" });
        this.cancel = button(_("Cancel"), {
            small: true,
            action: "cancel",
            onclick: () => run(ctx.notifications, cockpit.format(_("Cancel the pull of $0"), this.model || path),
                               () => ctx.store.cancelJob(path)),
        });
        this.dismiss = button(_("Dismiss"), { small: true, variant: "plain", action: "dismiss", onclick: () => ctx.store.dismissJob(path) });
        this.el = h("li", { class: "mv-job", "data-job": path },
                    h("div", { class: "mv-job-head" }, this.title, this.state, h("span", { class: "mv-job-buttons" }, this.cancel, this.dismiss)),
                    this.bar,
                    this.error);
        this.errorText = null;
    }

    update(job) {
        this.model = job.Model;
        const final = JOB_FINAL.includes(job.State);
        if (this.title.textContent !== (job.Model || _("(starting)")))
            this.title.textContent = job.Model || _("(starting)");
        this.el.dataset.state = job.State;
        this.el.dataset.model = job.Model || "";
        const label = this.state;
        label.querySelector(".pf-v6-c-label__text").textContent = JOB_STATE_TEXT[job.State] || job.State;
        for (const [cls, on] of [["pf-m-success", job.State === "completed"], ["pf-m-danger", job.State === "failed"],
            ["pf-m-blue", !final], ["pf-m-grey", job.State === "cancelled"]])
            label.classList.toggle(cls, on);
        const done = Number(job.BytesDone || 0);
        const total = Number(job.BytesTotal || 0);
        const pct = job.State === "completed" ? 100 : Number(job.Progress || 0) * 100;
        const measure = total
            ? cockpit.format(_("$0 of $1 ($2 %)"), bytes(done), bytes(total), Math.floor(pct))
            : (done ? bytes(done) : (final ? "" : _("waiting for the size…")));
        setPercentBar(this.bar, pct, measure, job.State === "completed" ? "success" : job.State === "failed" ? "danger" : null);
        const why = readOnlyWhy(this.ctx);
        this.cancel.hidden = final;
        this.cancel.disabled = !!why;
        this.cancel.title = why || "";
        this.dismiss.hidden = !final;
        const err = job.State === "failed" || (job.State === "cancelled" && job.Error) ? job.Error || _("the pull failed") : "";
        if (err !== this.errorText) {
            this.errorText = err;
            replace(this.error, err && alert(job.State === "failed" ? "danger" : "info",
                                            job.State === "failed" ? _("The pull failed") : _("The pull was cancelled"), err));
        }
    }
}

/// Modules into which model `m` is being activated now (by this page or anyone else).
function activating(store, m) {
    return [...store.activations].filter(([, r]) => r.status === "running" && (r.model === m.id || r.model === m.path)).map(([n]) => n);
}

export class ModelsView {
    constructor(ctx) {
        this.ctx = ctx;
        this.note = h("p", { class: "mv-muted mv-small", "data-testid": "models-note" });
        this.form = this.buildForm();
        this.jobsEl = h("ul", { class: "mv-jobs", "data-testid": "pull-jobs" });
        this.jobViews = new Map();
        this.listEl = h("div", {});
        this.tbody = null;
        this.confirming = null; // the model id whose removal asks for confirmation
        this.targets = new Map(); // model id -> the module chosen to activate it into (kept across rebuilds)
        this.el = h("div", { class: "mv-models", "data-testid": "models-page" },
                    card(_("Pull a model"), [this.form, this.note, this.jobsEl], { testid: "pull-card" }),
                    card(_("Models in the store"), this.listEl, { testid: "models-card" }));
        ctx.store.refreshModels();
    }

    buildForm() {
        const ctx = this.ctx;
        this.source = textInput({ id: "mv-pull-source", "aria-label": _("Source"), placeholder: "ollama:llama3.2:1b, hf:ORG/REPO, https://…/FILE.gguf#sha256=…", "data-testid": "pull-source" });
        this.sha = textInput({ id: "mv-pull-sha256", "aria-label": _("sha256"), placeholder: _("sha256 of a URL source (64 hex digits), unless in the URL"), "data-testid": "pull-sha256" });
        this.include = textInput({ id: "mv-pull-include", "aria-label": _("Include"), placeholder: _("hf: only: files to take, e.g. *Q4_K_M.gguf"), "data-testid": "pull-include" });
        this.yes = checkbox(_("Confirm a large download (above models.confirm_above)"), { id: "mv-pull-yes", "data-testid": "pull-yes" });
        this.pullButton = button(_("Pull"), { variant: "primary", action: "pull" });
        this.pullButton.type = "submit";
        return h("form", {
            class: "mv-controls",
            "data-testid": "pull-form",
            onsubmit: ev => {
                ev.preventDefault();
                this.pull();
            },
        },
                 h("label", { class: "mv-control-label", for: "mv-pull-source" }, _("Source")), this.source,
                 h("label", { class: "mv-control-label", for: "mv-pull-sha256" }, _("sha256")), this.sha,
                 h("label", { class: "mv-control-label", for: "mv-pull-include" }, _("Include")), this.include,
                 h("span", {}), this.yes,
                 h("span", {}), h("div", { class: "mv-inline" }, this.pullButton,
                                  h("span", { class: "mv-muted mv-small" }, _("The download runs in modvisord as an unprivileged user, is checked against its sha256, and lands in the store atomically."))));
    }

    async pull() {
        const ctx = this.ctx;
        const source = this.source.querySelector("input").value.trim();
        const sha256 = this.sha.querySelector("input").value.trim().toLowerCase();
        const include = this.include.querySelector("input").value.trim();
        const yes = this.yes.querySelector("input").checked;
        if (!source) {
            ctx.notifications.add("warning", _("Pull"), _("Name a source first."), "invalid");
            return;
        }
        const ok = await run(ctx.notifications, cockpit.format(_("Pull $0"), source),
                             () => ctx.store.pull(source, { sha256, yes, include: include ? include.split(/[\s,]+/).filter(Boolean) : [] }));
        if (ok)
            for (const el of [this.source, this.sha, this.include])
                el.querySelector("input").value = "";
    }

    update(dirty) {
        const all = !dirty || dirty.has("all");
        this.renderControls();
        if (all || dirty.has("jobs") || dirty.has("perm"))
            this.renderJobs();
        if (all || dirty.has("models") || dirty.has("modules") || dirty.has("perm"))
            this.renderList();
    }

    renderControls() {
        const why = readOnlyWhy(this.ctx);
        for (const el of [this.source, this.sha, this.include, this.yes].map(e => e.querySelector("input")).concat([this.pullButton])) {
            el.disabled = !!why;
            el.title = why || "";
        }
        this.note.textContent = why || "";
    }

    renderJobs() {
        const jobs = [...this.ctx.store.jobs.values()].sort((a, b) => b.seq - a.seq);
        for (const path of [...this.jobViews.keys()])
            if (!this.ctx.store.jobs.has(path))
                this.jobViews.delete(path);
        patch(this.jobsEl, jobs.map(j => ({
            id: j.path,
            key: "",
            build: () => {
                const v = new JobView(this.ctx, j.path);
                this.jobViews.set(j.path, v);
                return v.el;
            },
        })));
        for (const j of jobs) {
            let v = this.jobViews.get(j.path);
            if (!v || v.el !== this.jobsEl._mvKeyed.get(j.path).el) {
                v = new JobView(this.ctx, j.path);
                this.jobViews.set(j.path, v);
            }
            v.update(j);
        }
    }

    renderList() {
        const { store } = this.ctx;
        if (store.modelsProblem) {
            this.tbody = null;
            const p = store.modelsProblem;
            replace(this.listEl, p.kind === "unsupported"
                ? emptyState(_("No model store"), _("This modvisord has no model store (org.modvisor1.Models)."), "models-unsupported")
                : alert("danger", cockpit.format(_("The model list cannot be read: $0"), p.title), p.text, { testid: "models-error" }));
            return;
        }
        if (store.models === null) {
            this.tbody = null;
            replace(this.listEl, h("p", { class: "mv-muted" }, _("Loading…")));
            return;
        }
        if (!store.models.length) {
            this.tbody = null;
            replace(this.listEl, emptyState(_("No models yet"),
                                            _("Pull one above, or with “modvisorctl pull SOURCE”."), "models-empty"));
            return;
        }
        const cols = [_("Model"), _("Size"), _("Details"), _("Pulled"), _("Used by"), _("Activate into a module"), _("Remove")];
        if (!this.tbody) {
            this.tbody = h("tbody", { class: "pf-v6-c-table__tbody" });
            replace(this.listEl,
                    h("table", { class: "pf-v6-c-table pf-m-compact pf-m-grid-lg", role: "grid", "aria-label": _("Models"), "data-testid": "models-table" },
                      h("thead", { class: "pf-v6-c-table__thead" },
                        h("tr", { class: "pf-v6-c-table__tr" }, cols.map(c => h("th", { class: "pf-v6-c-table__th", scope: "col" }, c)))),
                      this.tbody));
        }
        const why = readOnlyWhy(this.ctx);
        const names = [...store.modules.keys()].sort();
        patch(this.tbody, store.models.map(m => {
            const key = JSON.stringify([m, why, names, this.confirming === m.id, activating(store, m)]);
            return { id: m.id, key, build: () => this.modelRow(m, cols, why, names) };
        }));
    }

    modelRow(m, cols, why, names) {
        const { store, notifications } = this.ctx;
        const details = [m.architecture, m.fileType, m.parameters ? cockpit.format(_("$0 parameters"), count(m.parameters)) : "",
            m.contextLength ? cockpit.format(_("context $0"), m.contextLength) : ""].filter(Boolean).join(", ");
        const users = m.users.length
            ? m.users.map((u, i) => [i ? ", " : "", h("a", {
                href: "#/module/" + encodeURIComponent(u),
                class: "mv-module-link",
                "data-user": u,
                onclick: ev => { ev.preventDefault(); cockpit.location.go(["module", u]) },
            }, u)])
            : h("span", { class: "mv-muted" }, "—");
        const now = activating(store, m);
        // Activation: a module and a button; the module's page shows the steps.
        const target = select([["", _("Choose a module")]].concat(names.map(n => [n, n])), this.targets.get(m.id) || "",
                              {
                                  "aria-label": cockpit.format(_("Module to activate $0 into"), m.id),
                                  "data-testid": "activate-target",
                                  disabled: !!why,
                                  title: why || undefined,
                                  onchange: ev => this.targets.set(m.id, ev.target.value),
                              });
        const activate = button(_("Activate"), {
            small: true,
            action: "activate-model",
            disabled: !!why,
            title: why || undefined,
            onclick: async () => {
                const name = target.querySelector("select").value;
                if (!name) {
                    notifications.add("warning", _("Activate"), _("Choose the module to activate the model into."), "invalid");
                    return;
                }
                if (store.isBusy(name)) {
                    notifications.add("warning", cockpit.format(_("Activate $0 into $1"), m.id, name), _("An operation on this module is in progress."), "busy");
                    return;
                }
                const ok = await run(notifications, cockpit.format(_("Activate $0 into $1"), m.id, name),
                                     () => store.activate_model(name, m.id));
                if (ok)
                    notifications.add("success", cockpit.format(_("$0 now runs $1"), name, m.id), "", "success");
            },
        });
        let remove;
        if (this.confirming === m.id) {
            remove = h("div", { class: "mv-inline", "data-testid": "remove-confirm" },
                       h("span", {}, m.users.length ? cockpit.format(_("Used by $0. Remove anyway?"), m.users.join(", ")) : _("Remove it?")),
                       button(_("Remove"), {
                           small: true,
                           variant: "danger",
                           action: "remove-confirm",
                           disabled: !!why,
                           onclick: async () => {
                               this.confirming = null;
                               await run(notifications, cockpit.format(_("Remove $0"), m.id), () => store.removeModel(m.id, false));
                               this.renderList();
                           },
                       }),
                       button(_("Cancel"), { small: true, variant: "link", action: "remove-cancel", onclick: () => { this.confirming = null; this.renderList() } }));
        } else {
            remove = button(_("Remove"), {
                small: true,
                action: "remove",
                disabled: !!why,
                title: why || undefined,
                onclick: () => { this.confirming = m.id; this.renderList() },
            });
        }
        return row(cols, [
            [h("code", { class: "mv-model-id" }, m.id), m.source && m.source !== m.id && h("div", { class: "mv-muted mv-small" }, m.source),
                m.path && h("div", { class: "mv-muted mv-small", title: m.path }, m.path)],
            h("span", { "data-field": "size", title: cockpit.format(_("$0 bytes"), m.size) }, bytes(m.size)),
            details || "—",
            m.date ? since(m.date * 1e6) : "—",
            h("span", {}, h("span", { "data-field": "users" }, users),
              now.length > 0 && h("div", { class: "mv-muted mv-small", "data-testid": "activating" },
                                  cockpit.format(_("being activated into $0…"), now.join(", ")))),
            h("div", { class: "mv-inline" }, target, activate),
            remove,
        ], { "data-model": m.id });
    }

    destroy() {}
}
