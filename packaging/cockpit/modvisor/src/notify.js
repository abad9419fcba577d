/* global cockpit */
// Messages at the top of the page: refusals, failures, results. Never a blank page.
import { h, replace } from "./dom.js";
import { alert } from "./ui.js";
import { describeError } from "./store.js";

const _ = cockpit.gettext;
const MAX = 5;

export class Notifications {
    constructor() {
        this.el = h("div", { class: "mv-notifications", "aria-live": "polite", "data-testid": "notifications" });
        this.items = [];
        this.seq = 0;
    }

    add(variant, title, text, kind) {
        const id = ++this.seq;
        this.items.push({ id, variant, title, text, kind });
        if (this.items.length > MAX)
            this.items.shift();
        this.render();
        return id;
    }

    dismiss(id) {
        this.items = this.items.filter(i => i.id !== id);
        this.render();
    }

    /// An error from a call, as the person who clicked should read it.
    error(what, ex) {
        const d = describeError(ex);
        const variant = d.kind === "busy" ? "warning" : "danger";
        return this.add(variant, cockpit.format("$0: $1", what, d.title), d.text, d.kind);
    }

    render() {
        replace(this.el, this.items.map(i =>
            h("div", { class: "mv-notification", "data-kind": i.kind || i.variant },
              alert(i.variant, i.title, i.text, { onclose: () => this.dismiss(i.id) }))));
    }
}

/// Runs one action and reports its failure; resolves to true on success.
export async function run(notifications, what, fn) {
    try {
        await fn();
        return true;
    } catch (ex) {
        notifications.error(what, ex);
        return false;
    }
}

export const ACTION_TEXT = {
    start: _("Start"),
    stop: _("Stop"),
    restart: _("Restart"),
};
