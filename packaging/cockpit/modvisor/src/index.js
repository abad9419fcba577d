/* global cockpit */
// modvisor's Cockpit page: org.modvisor1 on the system bus, with the logged-in user's own
// credentials (the bus policy and modvisord decide what that user may change).
import "./modvisor.css";
import { h, replace } from "./dom.js";
import { Store } from "./store.js";
import { detectPermission, ADMIN_GROUP } from "./permission.js";
import { Notifications } from "./notify.js";
import { OverviewView } from "./overview.js";
import { ModuleView } from "./module.js";
import { ModelsView } from "./models.js";
import { healthLabel, alert, emptyState } from "./ui.js";

const _ = cockpit.gettext;

// The page's tabs; the module page is a drill-down from the overview. A tab is an id, a
// label and a view ({ el, update(dirty), destroy() }).
const TABS = [
    { id: "overview", label: () => _("Overview"), view: ctx => new OverviewView(ctx) },
    { id: "models", label: () => _("Models"), view: ctx => new ModelsView(ctx) },
];

class App {
    constructor(root) {
        this.root = root;
        this.store = new Store();
        this.notifications = new Notifications();
        this.perm = { canManage: false, known: false };
        this.ctx = { store: this.store, notifications: this.notifications, perm: this.perm };
        this.summary = h("div", { class: "mv-summary", "data-testid": "summary" });
        this.permBanner = h("div", { "data-testid": "permission" });
        this.tabs = h("div", {});
        this.main = h("div", { class: "mv-main" });
        this.view = null;
        this.route = null;
        replace(root,
                h("header", { class: "mv-header" },
                  h("h1", { class: "pf-v6-c-title pf-m-xl" }, _("AI engines")),
                  this.summary),
                this.permBanner,
                this.notifications.el,
                this.tabs,
                this.main);
        root.removeAttribute("aria-busy");
    }

    start() {
        this.store.on(dirty => this.update(dirty));
        // A module stopped to make room for another (admission): a notice, not an error.
        this.store.onNotice(n => {
            if (n.kind === "evicted")
                this.notifications.add("info", cockpit.format(_("$0 was stopped to make room for $1"), n.name, n.by),
                                       n.reason, "evicted");
        });
        cockpit.addEventListener("locationchanged", () => this.navigate());
        detectPermission()
                .then(p => Object.assign(this.perm, p, { known: true }))
                .catch(ex => Object.assign(this.perm, { known: true, canManage: false, error: ex.message || String(ex) }))
                .finally(() => {
                    this.renderPermission();
                    this.update(new Set(["all", "perm"]));
                });
        this.store.start();
        this.navigate();
    }

    navigate() {
        const path = cockpit.location.path;
        const key = JSON.stringify(path);
        if (key === this.route)
            return;
        this.route = key;
        if (this.view)
            this.view.destroy();
        this.view = null;
        if (path[0] === "module" && path[1]) {
            this.tab = null;
            this.viewFactory = () => new ModuleView(this.ctx, path[1]);
        } else {
            const tab = TABS.find(t => t.id === path[0]) || TABS[0];
            this.tab = tab.id;
            this.viewFactory = () => tab.view(this.ctx);
        }
        this.renderTabs();
        this.update(new Set(["all"]));
    }

    renderTabs() {
        replace(this.tabs, h("div", { class: "pf-v6-c-tabs mv-tabs", role: "region" },
                             h("ul", { class: "pf-v6-c-tabs__list", role: "tablist" },
                               TABS.map(t => h("li", { class: ["pf-v6-c-tabs__item", (this.tab === t.id || (!this.tab && t.id === "overview")) && "pf-m-current"], role: "presentation" },
                                               h("button", {
                                                   type: "button",
                                                   class: "pf-v6-c-tabs__link",
                                                   role: "tab",
                                                   "data-tab": t.id,
                                                   "aria-selected": this.tab === t.id ? "true" : "false",
                                                   onclick: () => cockpit.location.go(t.id === "overview" ? [] : [t.id]),
                                               }, h("span", { class: "pf-v6-c-tabs__item-text" }, t.label())))))));
    }

    renderPermission() {
        const p = this.perm;
        if (!p.known || p.canManage) {
            replace(this.permBanner);
            return;
        }
        const who = p.user ? cockpit.format(_("You ($0) are"), p.user) : _("You are");
        replace(this.permBanner, alert("info", _("Read-only"),
                                       cockpit.format(_("$0 neither root nor in the group “$1”: you see everything, but starting, stopping, mode overrides and model activation are for root and members of that group (an administrator adds you with “usermod -aG $1 USER”, then you log in again)."), who, ADMIN_GROUP),
                                       { testid: "read-only" }));
    }

    renderSummary() {
        const s = this.store;
        const m = s.manager;
        this.root.dataset.status = s.status;
        if (s.status !== "ready") {
            replace(this.summary);
            return;
        }
        replace(this.summary,
                h("span", { class: "mv-summary-item" }, _("Overall: "), healthLabel(m.Health || "unknown")),
                h("span", { class: "mv-summary-item", "data-testid": "counts" },
                  cockpit.format(_("$0 online, $1 degraded, $2 offline"), m.ModulesOnline ?? 0, m.ModulesDegraded ?? 0, m.ModulesOffline ?? 0)),
                h("span", { class: "mv-summary-item" }, _("Native: "), m.NativeBackend || _("unavailable")),
                h("span", { class: "mv-summary-item" }, _("Containers: "), m.ContainerEngine || _("no engine")),
                h("span", { class: "mv-summary-item mv-muted" }, "modvisord " + (m.Version || "")));
    }

    update(dirty) {
        this.renderSummary();
        const s = this.store;
        if (s.status !== "ready") {
            if (this.view)
                this.view.destroy();
            this.view = null;
            this.readyView = false;
            if (s.status === "connecting")
                replace(this.main, h("p", { class: "mv-muted", "data-testid": "connecting" }, _("Connecting to modvisord…")));
            else if (s.status === "absent")
                replace(this.main, emptyState(_("modvisord is not running"),
                                              _("Nothing owns org.modvisor1 on the system bus. Start it with “systemctl start modvisord”; this page follows it when it appears."),
                                              "absent"));
            else
                replace(this.main, alert("danger", _("Cannot talk to modvisord"), s.problem, { testid: "bus-error" }));
            return;
        }
        if (!this.view) {
            this.view = this.viewFactory();
            replace(this.main, this.view.el);
            dirty = new Set(["all"]);
        }
        this.view.update(dirty);
        this.root.dataset.ready = this.perm.known ? "true" : "false";
    }
}

function main() {
    cockpit.translate();
    new App(document.getElementById("app")).start();
}

if (document.readyState === "loading")
    document.addEventListener("DOMContentLoaded", main);
else
    main();
