// A tiny DOM builder. Text always goes in as text nodes (reasons, log lines and error messages
// come from engines and users: never parsed as HTML), and no style attribute is ever written:
// Cockpit's content security policy blocks them (widths are set through the CSSOM instead).

export function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
        if (v === undefined || v === null || v === false)
            continue;
        if (k === "class")
            el.className = Array.isArray(v) ? v.filter(Boolean).join(" ") : v;
        else if (k.startsWith("on") && typeof v === "function")
            el.addEventListener(k.slice(2), v);
        else if (k === "width")
            el.style.width = v; // CSSOM: allowed by the CSP, unlike a style attribute
        else if (k === "value")
            el.value = v;
        else if (v === true)
            el.setAttribute(k, "");
        else
            el.setAttribute(k, String(v));
    }
    append(el, children);
    return el;
}

function append(el, children) {
    for (const c of children) {
        if (c === undefined || c === null || c === false)
            continue;
        if (Array.isArray(c))
            append(el, c);
        else if (c instanceof Node)
            el.appendChild(c);
        else
            el.appendChild(document.createTextNode(String(c)));
    }
}

export function replace(el, ...children) {
    el.replaceChildren();
    append(el, children);
}

/// Makes `parent`'s children the elements of `items` ({ id, key, build }) in that order,
/// keeping an element whose id and key are unchanged (so a button under the pointer, or an
/// input with focus, survives an update of something else).
export function patch(parent, items) {
    const old = parent._mvKeyed || new Map();
    const next = new Map();
    items.forEach((it, i) => {
        let cur = old.get(it.id);
        if (!cur || cur.key !== it.key)
            cur = { el: it.build(), key: it.key };
        next.set(it.id, cur);
        const at = parent.children[i];
        if (at !== cur.el)
            parent.insertBefore(cur.el, at || null);
    });
    while (parent.children.length > items.length)
        parent.lastElementChild.remove();
    parent._mvKeyed = next;
}
