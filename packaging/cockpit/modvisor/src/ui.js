/* global cockpit */
// PatternFly (v6) markup for the few components the page uses: its CSS only, no framework.
import { h } from "./dom.js";
import { bytes, percent } from "./format.js";

const _ = cockpit.gettext;

// `standby` is a normal state, not a failure: an on-demand module waiting for its next
// connection (after an idle stop, an eviction, or before its first connection). The Manager
// counts it as online.
const HEALTH_COLOR = { online: "pf-m-success", degraded: "pf-m-warning", offline: "pf-m-danger", standby: "pf-m-blue" };
const HEALTH_TEXT = {
    online: _("online"),
    degraded: _("degraded"),
    offline: _("offline"),
    standby: _("standby"),
    unknown: _("unknown"),
};
const HEALTH_HINT = {
    standby: _("Not running, and that is normal: it starts on the next connection."),
};

export function healthLabel(health) {
    return h("span", {
        class: ["pf-v6-c-label", "pf-m-compact", HEALTH_COLOR[health] || "", "mv-health"],
        "data-health": health,
        title: HEALTH_HINT[health],
    }, h("span", { class: "pf-v6-c-label__content" },
         h("span", { class: "pf-v6-c-label__text" }, HEALTH_TEXT[health] || health || _("unknown"))));
}

export function button(text, { variant = "secondary", small = false, disabled = false, onclick, title, action } = {}) {
    return h("button", {
        type: "button",
        class: ["pf-v6-c-button", "pf-m-" + variant, small && "pf-m-small"],
        disabled,
        "aria-disabled": disabled ? "true" : undefined,
        title,
        "data-action": action,
        onclick,
    }, h("span", { class: "pf-v6-c-button__text" }, text));
}

/// A bar of `used` against `total` ("" and no bar when there is no total).
export function bar(label, used, total, { warn = 85 } = {}) {
    if (!total) {
        return h("div", { class: "mv-bar mv-bar-nolimit" },
                 h("span", { class: "mv-bar-text" }, bytes(used)),
                 h("span", { class: "mv-muted" }, " " + _("(no limit)")));
    }
    const p = percent(used, total);
    const mod = used > total ? "pf-m-danger" : p >= warn ? "pf-m-warning" : "";
    return h("div", { class: ["pf-v6-c-progress", "pf-m-sm", "mv-bar", mod] },
             h("div", { class: "pf-v6-c-progress__status", "aria-hidden": "true" },
               h("span", { class: "pf-v6-c-progress__measure" },
                 cockpit.format(_("$0 of $1"), bytes(used), bytes(total)))),
             h("div", {
                 class: "pf-v6-c-progress__bar",
                 role: "progressbar",
                 "aria-valuemin": "0",
                 "aria-valuemax": "100",
                 "aria-valuenow": String(p),
                 "aria-label": label,
             }, h("div", { class: "pf-v6-c-progress__indicator", width: p + "%" })));
}

/// A progress bar of a percentage (0..100), labelled; `measure` is the text beside it.
export function percentBar(label, value, measure, { variant, testid } = {}) {
    const p = Math.max(0, Math.min(100, Math.round(value)));
    const el = h("div", { class: ["pf-v6-c-progress", "pf-m-sm", "mv-bar", variant && "pf-m-" + variant], "data-testid": testid },
                 h("div", { class: "pf-v6-c-progress__status", "aria-hidden": "true" },
                   h("span", { class: "pf-v6-c-progress__measure" }, measure)),
                 h("div", {
                     class: "pf-v6-c-progress__bar",
                     role: "progressbar",
                     "aria-valuemin": "0",
                     "aria-valuemax": "100",
                     "aria-valuenow": String(p),
                     "aria-label": label,
                 }, h("div", { class: "pf-v6-c-progress__indicator", width: p + "%" })));
    return el;
}

/// Updates a bar made by percentBar in place (so a change is an attribute change, not a new
/// element: nothing flickers, screen readers follow).
export function setPercentBar(el, value, measure, variant) {
    const p = Math.max(0, Math.min(100, Math.round(value)));
    const bar = el.querySelector("[role=progressbar]");
    if (bar.getAttribute("aria-valuenow") !== String(p)) {
        bar.setAttribute("aria-valuenow", String(p));
        bar.firstChild.style.width = p + "%";
    }
    const m = el.querySelector(".pf-v6-c-progress__measure");
    if (m.textContent !== measure)
        m.textContent = measure;
    for (const v of ["success", "danger", "warning"])
        el.classList.toggle("pf-m-" + v, v === variant);
}

export function checkbox(label, attrs) {
    const id = attrs.id;
    return h("span", { class: "mv-check" },
             h("input", { type: "checkbox", ...attrs }),
             h("label", { for: id }, label));
}

const ALERT_TITLE = {
    danger: _("Danger alert:"),
    warning: _("Warning alert:"),
    info: _("Info alert:"),
    success: _("Success alert:"),
};

export function alert(variant, title, body, { onclose, testid } = {}) {
    return h("div", { class: ["pf-v6-c-alert", "pf-m-inline", "pf-m-" + variant], "data-testid": testid, role: variant === "danger" ? "alert" : undefined },
             h("div", { class: "pf-v6-c-alert__icon", "aria-hidden": "true" }, h("span", { class: "mv-alert-glyph mv-glyph-" + variant })),
             h("p", { class: "pf-v6-c-alert__title" },
               h("span", { class: "pf-v6-screen-reader" }, ALERT_TITLE[variant] || ""),
               title),
             onclose && h("div", { class: "pf-v6-c-alert__action" },
                          h("button", { type: "button", class: "pf-v6-c-button pf-m-plain", "aria-label": _("Close"), onclick: onclose },
                            h("span", { class: "pf-v6-c-button__text" }, "×"))),
             body && h("div", { class: "pf-v6-c-alert__description" }, body));
}

export function card(title, body, { testid, actions } = {}) {
    return h("section", { class: "pf-v6-c-card mv-card", "data-testid": testid },
             h("div", { class: "pf-v6-c-card__header" },
               actions && h("div", { class: "pf-v6-c-card__actions" }, actions),
               h("div", { class: "pf-v6-c-card__title" },
                 h("h2", { class: "pf-v6-c-card__title-text" }, title))),
             h("div", { class: "pf-v6-c-card__body" }, body));
}

export function descriptionList(rows) {
    return h("dl", { class: "pf-v6-c-description-list pf-m-horizontal pf-m-compact" },
             rows.filter(Boolean).map(([term, value, testid]) =>
                 h("div", { class: "pf-v6-c-description-list__group", "data-testid": testid },
                   h("dt", { class: "pf-v6-c-description-list__term" },
                     h("span", { class: "pf-v6-c-description-list__text" }, term)),
                   h("dd", { class: "pf-v6-c-description-list__description" },
                     h("div", { class: "pf-v6-c-description-list__text" }, value)))));
}

export function emptyState(title, body, testid) {
    return h("div", { class: "pf-v6-c-empty-state", "data-testid": testid },
             h("div", { class: "pf-v6-c-empty-state__content" },
               h("div", { class: "pf-v6-c-empty-state__header" },
                 h("div", { class: "pf-v6-c-empty-state__title" },
                   h("h2", { class: "pf-v6-c-empty-state__title-text" }, title))),
               body && h("div", { class: "pf-v6-c-empty-state__body" }, body)));
}

export function table(columns, rows, { testid, label } = {}) {
    return h("table", { class: "pf-v6-c-table pf-m-compact pf-m-grid-lg", role: "grid", "aria-label": label, "data-testid": testid },
             h("thead", { class: "pf-v6-c-table__thead" },
               h("tr", { class: "pf-v6-c-table__tr" },
                 columns.map(c => h("th", { class: "pf-v6-c-table__th", scope: "col" }, c)))),
             h("tbody", { class: "pf-v6-c-table__tbody" }, rows));
}

export function row(columns, cells, attrs) {
    return h("tr", { class: "pf-v6-c-table__tr", ...attrs },
             cells.map((c, i) => h("td", { class: "pf-v6-c-table__td", "data-label": columns[i] }, c)));
}

export function codeBlock(text, testid) {
    return h("div", { class: "pf-v6-c-code-block", "data-testid": testid },
             h("div", { class: "pf-v6-c-code-block__content" },
               h("pre", { class: "pf-v6-c-code-block__pre" },
                 h("code", { class: "pf-v6-c-code-block__code" }, text))));
}

export function select(options, value, attrs) {
    return h("span", { class: "pf-v6-c-form-control" },
             h("select", attrs, options.map(([v, text]) => h("option", { value: v, selected: v === value }, text))),
             h("span", { class: "pf-v6-c-form-control__utilities" },
               h("span", { class: "pf-v6-c-form-control__toggle-icon", "aria-hidden": "true" }, "▾")));
}

export function textInput(attrs) {
    return h("span", { class: "pf-v6-c-form-control" }, h("input", { type: "text", ...attrs }));
}
