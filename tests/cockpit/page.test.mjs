// The Cockpit page in a real Chromium against a real cockpit-ws and a real modvisord; run by
// tests/cockpit/run.sh, which sets everything up and passes it in MVCK_* variables.
// Every wait is bounded; a screenshot of each state goes to $MVCK_SHOTS.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { chromium } from "playwright-core";

const env = name => {
    const v = process.env[name];
    if (!v)
        throw new Error(`${name} is not set: run tests/cockpit/run.sh`);
    return v;
};
const ROOT_URL = env("MVCK_ROOT_URL");
const USER_URL = env("MVCK_USER_URL");
const SHOTS = env("MVCK_SHOTS");
const CTL = env("MVCK_CTL");
const BUS = env("MVCK_BUS");
const WORK = env("MVCK_WORK");
const GPUS = env("MVCK_GPUS");
const FOREIGN_PID = Number(env("MVCK_FOREIGN_PID"));
const TESTUSER = env("MVCK_USER");
const PROFILE = env("MVCK_PROFILE");
const PULL_URL = env("MVCK_PULL_URL");
const PULL_SHA = env("MVCK_PULL_SHA");
const PULL_SIZE = Number(env("MVCK_PULL_SIZE"));
const HTTP_LOG = env("MVCK_HTTP_LOG");
const STORE = env("MVCK_STORE");
const OD_PORT = Number(env("MVCK_OD_PORT"));
const PAGE_PATH = "/cockpit/@localhost/modvisor/index.html";
const T = 20000; // one state change, end to end
const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let context = null;
let page = null;
const problems = []; // CSP violations and uncaught errors on the page

async function browser(profile) {
    if (context)
        await context.close();
    fs.mkdirSync(profile, { recursive: true });
    context = await chromium.launchPersistentContext(profile, {
        executablePath: "/usr/bin/chromium",
        headless: true,
        args: ARGS,
        viewport: { width: 1600, height: 1000 },
        timeout: T,
    });
    page = context.pages()[0] || await context.newPage();
    page.setDefaultTimeout(T);
    page.on("pageerror", e => problems.push("page error: " + e.message));
    page.on("console", m => {
        if (/Content Security Policy|Refused to/.test(m.text()))
            problems.push("console: " + m.text());
    });
    return page;
}

async function shot(name) {
    await page.screenshot({ path: path.join(SHOTS, name + ".png"), fullPage: true });
}

function ctl(...args) {
    const out = execFileSync(CTL, ["--bus-address", BUS, "--json", ...args], { encoding: "utf8", timeout: 10000, stdio: ["ignore", "pipe", "pipe"] });
    return JSON.parse(out);
}

function unitState(unit) {
    const call = (...a) => JSON.parse(execFileSync("busctl", ["--system", "--json=short", ...a], { encoding: "utf8", timeout: 10000, stdio: ["ignore", "pipe", "pipe"] }));
    let p;
    try {
        p = call("call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager", "GetUnit", "s", unit).data[0];
    } catch (ex) {
        return "unloaded";
    }
    return call("get-property", "org.freedesktop.systemd1", p, "org.freedesktop.systemd1.Unit", "ActiveState").data;
}

/// Polls something outside the browser (systemd, the daemon) until `fn` is true, bounded.
async function until(what, fn, ms = T) {
    const end = Date.now() + ms;
    let last;
    for (;;) {
        try {
            last = await fn();
            if (last)
                return last;
        } catch (ex) {
            last = ex;
        }
        if (Date.now() > end)
            throw new Error(`${what}: not reached within ${ms} ms (last: ${last})`);
        await new Promise(r => setTimeout(r, 100));
    }
}

const row = (name, p = page) => p.locator(`tr[data-module="${name}"]`);

async function waitHealth(name, health, state, p = page) {
    await p.waitForFunction(([n, h, s]) => {
        const r = document.querySelector(`tr[data-module="${n}"]`);
        return r && r.dataset.health === h && (!s || r.dataset.state === s) &&
            r.querySelector(".mv-health").dataset.health === h;
    }, [name, health, state], { timeout: T });
}

/// Records, inside the page, every health change of a row and whether a module's action
/// buttons were ever disabled (so a short state is not missed between two looks).
async function record() {
    await page.evaluate(() => {
        window.__mvck = { health: [], disabled: {} };
        const note = el => {
            for (const b of el.querySelectorAll ? el.querySelectorAll("button[data-action]") : []) {
                const holder = b.closest("[data-module-actions]") || b.closest("[data-module]");
                const name = holder && (holder.dataset.moduleActions || holder.dataset.module);
                if (name && b.disabled)
                    window.__mvck.disabled[name] = true;
            }
        };
        new MutationObserver(muts => {
            for (const m of muts) {
                if (m.type === "attributes" && m.attributeName === "data-health" && m.target.tagName === "TR")
                    window.__mvck.health.push([m.target.dataset.module, m.target.dataset.health]);
                else if (m.type === "attributes" && m.attributeName === "disabled")
                    note(m.target.parentElement || m.target);
                else
                    for (const n of m.addedNodes)
                        if (n.nodeType === 1)
                            note(n.parentElement || n);
            }
        }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["data-health", "disabled"] });
    });
}

async function openPage(base, hash = "", p = page) {
    await p.goto(base + PAGE_PATH + hash, { timeout: T });
    await p.waitForSelector("#app[data-status=ready][data-ready=true]", { timeout: T });
    await p.evaluate(() => { window.__mvckMarker = "same document" });
}

async function sameDocument() {
    assert.equal(await page.evaluate(() => window.__mvckMarker), "same document", "the page was not reloaded");
}

/// Back to the overview from a module's page (inside the page: no reload); nothing when it is
/// there already (so that a test that failed on a module's page does not fail the next ones).
async function toOverview() {
    if (await page.locator("[data-testid=back]").count())
        await page.locator("[data-testid=back]").click();
    await page.waitForSelector('[data-testid=modules] tr[data-module="mvck-svc"]');
    await sameDocument();
}

/// The page's own formatting of a byte count (format.js).
function bytesText(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
        n /= 1024;
        i++;
    }
    return (i === 0 ? String(n) : n.toFixed(n >= 100 ? 0 : 1)) + " " + units[i];
}

const idOf = user => Number(execFileSync("id", [user], { encoding: "utf8" }).match(/uid=(\d+)/)[1]);
const gidOf = user => Number(execFileSync("id", ["-g", user], { encoding: "utf8" }).trim());

/// Logs MODVISOR_MODULE=module and MESSAGE=text through journald's native protocol, as uid:gid
/// (root when 0), from within `cgroups` when given. The writer stays a second so that journald
/// can read its credentials and cgroup (a writer that exits at once leaves it a dead PID).
function logAs(uid, gid, cgroups, module, text) {
    const join = cgroups.map(d => `echo $$ > ${d}/cgroup.procs; `).join("");
    const py = `import socket, time; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b"MODVISOR_MODULE=${module}\\nSYSLOG_IDENTIFIER=${module}\\nMESSAGE=${text}\\n", "/run/systemd/journal/socket"); time.sleep(1)`;
    const as = uid ? `setpriv --reuid=${uid} --regid=${gid} --clear-groups ` : "";
    execFileSync("sh", ["-c", `${join}exec ${as}/usr/bin/python3 -c '${py}'`], { stdio: "ignore", timeout: 10000 });
}

/// The cgroups a user's systemd manager gives its unit `unit` (hybrid or unified hierarchy):
/// a process there is that user's unit as far as journald can tell.
function userUnitCgroups(uid, unit) {
    const rel = `user.slice/user-${uid}.slice/user@${uid}.service/app.slice/${unit}`;
    const dirs = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified"]
            .filter(root => fs.existsSync(path.join(root, "cgroup.procs")))
            .map(root => path.join(root, rel));
    assert.ok(dirs.length, "no systemd cgroup hierarchy here");
    for (const d of dirs)
        fs.mkdirSync(d, { recursive: true });
    return dirs;
}

function removeCgroups(dirs) {
    for (const d of dirs) {
        let cur = d;
        for (let i = 0; i < 4; i++) { // the unit, app.slice, user@UID.service, user-UID.slice
            try {
                fs.rmdirSync(cur);
            } catch (ex) {
                break;
            }
            cur = path.dirname(cur);
        }
    }
}

/// journalctl's verbose view of the entry with this MESSAGE, once it is there (bounded).
async function journalEntry(text) {
    return until(`the journal has ${text}`, () => {
        const out = execFileSync("journalctl", ["--no-pager", "-o", "verbose", `MESSAGE=${text}`], { encoding: "utf8", timeout: 10000 });
        return out.includes(text) && out;
    });
}

const logText = () => page.locator("[data-testid=log]").innerText();

before(async () => {
    fs.mkdirSync(SHOTS, { recursive: true });
    // Every module up (or failed, for the one that must) before the browser looks.
    await until("modules settled", () => {
        const s = ctl("status");
        const by = Object.fromEntries(s.modules.map(m => [m.name, m]));
        return by["mvck-svc"]?.health === "online" && by["mvck-stop"]?.health === "online" &&
            by["mvck-mem"]?.health === "degraded" && by["mvck-fail"]?.state === "failed" &&
            by["mvck-llm"]?.health === "online" && by["mvck-od"]?.health === "standby" && s;
    }, 40000);
    // VRAM: the stand-in GPU shows one process of mvck-mem and one of no module.
    const mem = ctl("status", "mvck-mem");
    fs.writeFileSync(GPUS + ".tmp", `gpu Stand-in_GPU GPU-c0c0-0001 8589934592 1610612736\nproc 0 ${mem.main_pid} 1073741824\nproc 0 ${FOREIGN_PID} 402653184\n`);
    fs.renameSync(GPUS + ".tmp", GPUS);
    await until("VRAM attributed", () => ctl("status", "mvck-mem").vram_bytes === 1073741824);
    await browser(path.join(PROFILE, "root"));
});

after(async () => {
    if (context)
        await context.close();
});

test("the page is in Cockpit's shell and loads ../base1/cockpit.js", async () => {
    const loaded = [];
    page.on("response", r => loaded.push([r.url(), r.status()]));
    await page.goto(ROOT_URL + "/modvisor", { timeout: T });
    await page.waitForSelector('a[href="/modvisor"]', { timeout: T });
    assert.match(await page.locator('a[href="/modvisor"]').first().innerText(), /AI engines/);
    const frame = page.frameLocator('iframe[name="cockpit1:localhost/modvisor"]');
    await frame.locator("#app[data-status=ready]").waitFor({ timeout: T });
    await frame.locator('tr[data-module="mvck-svc"]').waitFor({ timeout: T });
    const f = page.frames().find(x => x.url().includes("/modvisor/index.html"));
    assert.ok(f, "the page's frame");
    assert.equal(await f.evaluate(() => typeof window.cockpit === "object" && typeof window.cockpit.dbus), "function");
    assert.deepEqual(await f.evaluate(() => [...document.scripts].map(s => s.getAttribute("src"))),
                     ["../base1/cockpit.js", "../*/po.js", "modvisor.js"]);
    assert.equal(await f.evaluate(() => [...document.scripts].filter(s => !s.src).length), 0, "no inline script");
    const cockpitJs = loaded.find(([u]) => u.endsWith("/base1/cockpit.js"));
    assert.ok(cockpitJs && cockpitJs[1] === 200, "../base1/cockpit.js answered 200: " + JSON.stringify(cockpitJs));
    await shot("01-shell");
    assert.deepEqual(problems, []);
});

test("the overview lists every module with the health modvisord reports", async () => {
    await openPage(ROOT_URL);
    await record();
    const status = ctl("status");
    for (const m of status.modules.filter(x => x.name.startsWith("mvck-"))) {
        await waitHealth(m.name, m.health);
        const r = row(m.name);
        assert.equal(await r.locator(".mv-state").first().getAttribute("data-state"), m.state, m.name);
        assert.equal(await r.locator("[data-field=mode]").innerText(), m.mode, m.name);
        assert.equal(await r.locator("[data-field=backend]").innerText(), m.backend, m.name);
        assert.equal((await r.locator(".mv-reason").innerText()).trim(), m.health_reason.trim(), m.name);
    }
    assert.equal(await row("mvck-fail").locator(".mv-health").innerText(), "offline");
    assert.equal(await row("mvck-mem").locator(".mv-health").innerText(), "degraded");
    // RAM against memory_max, VRAM against the GPU's memory.
    const ram = row("mvck-mem").locator("td").nth(4).locator("[role=progressbar]");
    assert.ok(Number(await ram.getAttribute("aria-valuenow")) >= 1);
    assert.match(await row("mvck-mem").locator("td").nth(4).innerText(), /of 64\.0 MiB/);
    await page.waitForFunction(() => /1\.0 GiB of 8\.0 GiB/.test(document.querySelector('tr[data-module="mvck-mem"] td:nth-child(6)').innerText), null, { timeout: T });
    // GPUs, the process of no module, the broken manifest with file:line:col.
    const gpu = page.locator('[data-testid=gpus] tr[data-gpu="0"]');
    assert.match(await gpu.innerText(), /Stand-in GPU/);
    assert.match(await gpu.innerText(), /1\.5 GiB of 8\.0 GiB/);
    const foreign = page.locator(`[data-testid=foreign-gpu] tr[data-pid="${FOREIGN_PID}"]`);
    assert.match(await foreign.innerText(), /llama-server/);
    assert.match(await foreign.innerText(), /384 MiB/);
    const bad = path.join(WORK, "modules.d/mvck-bad.toml");
    const err = page.locator(`[data-testid=manifest-errors] li[data-file="${bad}"]`);
    assert.match(await err.innerText(), new RegExp(bad.replace(/[.]/g, "\\.") + ":4:1: "));
    // A module in standby counts as online (the Manager's ModulesOnline), not as offline.
    assert.match(await page.locator("[data-testid=counts]").innerText(), /4 online, 1 degraded, 1 offline/);
    const standby = row("mvck-od").locator(".mv-health");
    assert.equal(await standby.innerText(), "standby");
    assert.match(await standby.getAttribute("class"), /pf-m-blue/);
    assert.match(await standby.getAttribute("title"), /starts on the next connection/);
    assert.match(await row("mvck-od").locator(".mv-reason").innerText(), new RegExp(`127\\.0\\.0\\.1:${OD_PORT}`));
    // root may act: nothing is read-only.
    assert.equal(await page.locator("[data-testid=read-only]").count(), 0);
    assert.equal(await row("mvck-svc").locator("button[data-action=restart]").isDisabled(), false);
    await shot("02-overview");
    assert.deepEqual(problems, []);
});

test("stopping a module from the page stops the real unit; the badge follows live", async () => {
    const unit = "modvisor-mvck-stop.service";
    assert.equal(unitState(unit), "active");
    await row("mvck-stop").locator("button[data-action=stop]").click();
    await waitHealth("mvck-stop", "offline", "inactive");
    await until("the unit is stopped", () => ["inactive", "unloaded"].includes(unitState(unit)));
    // The buttons follow StopModule's reply, the badge follows PropertiesChanged: two paths
    // whose order on the bus is not fixed. Wait (bounded) for the reply, do not assume it came first.
    await row("mvck-stop").locator("button[data-action=start]:enabled").waitFor({ timeout: T });
    assert.equal(await row("mvck-stop").locator("button[data-action=stop]").isDisabled(), true);
    assert.ok(await page.evaluate(() => window.__mvck.disabled["mvck-stop"]), "buttons disabled while the stop was in flight");
    await shot("03-stopped");
    await row("mvck-stop").locator("button[data-action=start]").click();
    await waitHealth("mvck-stop", "online", "running");
    await until("the unit runs again", () => unitState(unit) === "active");
    await sameDocument();
});

/// A second tab whose Cockpit socket passes through here, so that a test decides the order in
/// which the page hears things: the reply to a call of `method` is held back (every other
/// message goes on) until `release()`. Cockpit frames are "channel\n{json}".
async function tabHoldingReplyOf(method) {
    const tab = await context.newPage();
    const held = { id: null, release: null };
    await tab.routeWebSocket(/\/cockpit\/socket$/, ws => {
        const server = ws.connectToServer();
        const frame = m => {
            const text = typeof m === "string" ? m : m.toString("utf8");
            const nl = text.indexOf("\n");
            try {
                return JSON.parse(text.slice(nl + 1));
            } catch {
                return null;
            }
        };
        ws.onMessage(m => {
            const f = frame(m);
            if (f && Array.isArray(f.call) && f.call[2] === method)
                held.id = f.id;
            server.send(m);
        });
        server.onMessage(m => {
            const f = frame(m);
            if (held.id !== null && f && f.id === held.id && ("reply" in f || "error" in f)) {
                held.release = () => ws.send(m);
                return;
            }
            ws.send(m);
        });
    });
    return { tab, held };
}

test("the buttons follow the operation, not the badge: a StopModule answered after the badge turned keeps them disabled until it is", async () => {
    const unit = "modvisor-mvck-stop.service";
    assert.equal(unitState(unit), "active");
    const { tab, held } = await tabHoldingReplyOf("StopModule");
    try {
        await openPage(ROOT_URL, "", tab);
        const r = row("mvck-stop", tab);
        await r.locator("button[data-action=stop]").click();
        // The unit stops and the badge turns while the reply is held.
        await until("the reply to StopModule arrived and is held", () => held.release !== null);
        await until("the unit is stopped", () => ["inactive", "unloaded"].includes(unitState(unit)));
        await waitHealth("mvck-stop", "offline", "inactive", tab);
        assert.equal(await r.locator("button[data-action=start]").isDisabled(), true, "start waits for the reply");
        assert.equal(await r.locator("button[data-action=restart]").isDisabled(), true);
        assert.match(await r.locator(".mv-state").innerText(), /\(stop…\)/);
        held.release();
        await r.locator("button[data-action=start]:enabled").waitFor({ timeout: T });
        assert.doesNotMatch(await r.locator(".mv-state").innerText(), /…/);
        await r.locator("button[data-action=start]").click();
        await waitHealth("mvck-stop", "online", undefined, tab);
        await until("the unit runs again", () => unitState(unit) === "active");
    } finally {
        await tab.close();
    }
    await waitHealth("mvck-stop", "online", "running");
});

test("kill -9 of an engine from outside: offline, then online again, without a reload", async () => {
    const before = ctl("status", "mvck-svc");
    assert.ok(before.main_pid > 0);
    await page.evaluate(() => { window.__mvck.health = [] });
    process.kill(before.main_pid, "SIGKILL");
    await waitHealth("mvck-svc", "offline");
    assert.match(await row("mvck-svc").locator(".mv-reason").innerText(), /signal KILL/);
    await shot("04-killed-offline");
    await waitHealth("mvck-svc", "online", "running");
    const after = ctl("status", "mvck-svc");
    assert.notEqual(after.main_pid, before.main_pid);
    assert.equal(await row("mvck-svc").locator("td").nth(6).innerText(), String(after.restarts));
    const seen = (await page.evaluate(() => window.__mvck.health)).filter(([n]) => n === "mvck-svc").map(([, h]) => h)
            .filter((h, i, all) => i === 0 || all[i - 1] !== h);
    assert.deepEqual(seen, ["offline", "online"], "the badge went offline, then online: " + JSON.stringify(seen));
    await shot("05-killed-online");
    await sameDocument();
});

test("a module's log shows only trusted writers: a non-root process or user unit setting MODVISOR_MODULE does not appear", async () => {
    const name = "mvck-svc";
    const unit = `modvisor-${name}.service`;
    const uid = idOf(TESTUSER);
    const gid = gidOf(TESTUSER);
    const tag = `${process.pid}-${Date.now()}`;
    const spoofProc = `spoof-process-${tag}`;
    const spoofUnit = `spoof-user-unit-${tag}`;
    const trusted = `trusted-root-${tag}`;
    await toOverview();
    // A non-root user's process that sets the field itself, and a non-root user's own unit
    // named like the module's; then what modvisord does (root forwarding a line).
    logAs(uid, gid, [], name, spoofProc);
    const cg = userUnitCgroups(uid, unit);
    try {
        logAs(uid, gid, cg, name, spoofUnit);
    } finally {
        removeCgroups(cg);
    }
    logAs(0, 0, [], name, trusted);
    // The forgeries reached the journal as meant (so the old matches would have shown them).
    let e = await journalEntry(spoofProc);
    assert.ok(e.includes(`MODVISOR_MODULE=${name}`) && e.includes(`_UID=${uid}`), e);
    e = await journalEntry(spoofUnit);
    assert.ok(e.includes(`_SYSTEMD_USER_UNIT=${unit}`) && e.includes(`_UID=${uid}`), e);
    await journalEntry(trusted);

    await row(name).locator("a.mv-module-link").click();
    await page.waitForSelector(`[data-testid=module-page][data-module="${name}"]`);
    await page.waitForFunction(t => document.querySelector("[data-testid=log]").innerText.includes(t), trusted);
    assert.match(await logText(), /mvck-svc up/, "the unit's own output is shown");
    // Live, while the page follows the journal: another forgery, then a trusted line.
    const spoofLive = `spoof-live-${tag}`;
    const trustedLive = `trusted-live-${tag}`;
    logAs(uid, gid, [], name, spoofLive);
    await journalEntry(spoofLive);
    logAs(0, 0, [], name, trustedLive);
    await page.waitForFunction(t => document.querySelector("[data-testid=log]").innerText.includes(t), trustedLive);
    const text = await logText();
    for (const spoof of [spoofProc, spoofUnit, spoofLive])
        assert.ok(!text.includes(spoof), `${spoof} is not the module's: ${text}`);
    // The same lines as `modvisorctl logs NAME`.
    const ctlText = execFileSync(CTL, ["logs", name, "-n", "1000"], { encoding: "utf8", timeout: 10000 });
    assert.ok(ctlText.includes(trusted) && ctlText.includes(trustedLive), ctlText);
    for (const spoof of [spoofProc, spoofUnit, spoofLive])
        assert.ok(!ctlText.includes(spoof), `modvisorctl logs: ${spoof}`);
    await shot("06-log-trusted-only");
    await toOverview();
    assert.deepEqual(problems, []);
});

test("an on-demand module: standby, started by a connection (Connections), idle-stopped back to standby, live", async () => {
    const name = "mvck-od";
    await toOverview();
    await waitHealth(name, "standby", "inactive");
    await row(name).locator("a.mv-module-link").click();
    await page.waitForSelector(`[data-testid=module-page][data-module="${name}"]`);
    const serving = page.locator("[data-testid=serving-card]");
    const field = f => serving.locator(`[data-testid=${f}] dd`).innerText();
    await page.waitForFunction(() => document.querySelector("[data-testid=module-header]").dataset.health === "standby");
    assert.equal(await page.locator("[data-testid=module-header] .mv-health").innerText(), "standby");
    assert.match(await field("on-demand"), /^yes/);
    assert.equal(await field("connections"), "0");
    assert.equal(await field("priority"), "7");
    assert.match(await field("idle-stop"), /not armed/);
    assert.match(await field("eviction"), /not evictable now/);
    await shot("07-on-demand-standby");

    // A client connects and keeps its connection open: the engine starts for it.
    const sock = net.connect(OD_PORT, "127.0.0.1");
    sock.on("error", () => {});
    try {
        await page.waitForFunction(() => {
            const hd = document.querySelector("[data-testid=module-header]");
            const sv = document.querySelector("[data-testid=serving]");
            return hd.dataset.health === "online" && sv.dataset.connections === "1";
        }, null, { timeout: 30000 });
        assert.equal(await field("connections"), "1");
        assert.match(await field("idle-stop"), /connections are open/);
        assert.notEqual(await field("last-activity"), "—");
        assert.ok(ctl("status", name).main_pid > 0);
        await shot("08-on-demand-serving");
    } finally {
        sock.destroy();
    }
    // The connection closed: the idle stop is armed, fires after 3 s, standby again.
    await page.waitForFunction(() => {
        const sv = document.querySelector("[data-testid=serving]");
        return sv.dataset.connections === "0" && Number(sv.dataset.idleStopAt) > 0;
    });
    assert.match(await field("idle-stop"), /^at .*\((in \d+ s|now)\)/);
    await page.waitForFunction(() => {
        const hd = document.querySelector("[data-testid=module-header]");
        return hd.dataset.health === "standby" && hd.dataset.state === "inactive";
    });
    assert.match(await page.locator("[data-testid=module-reason]").innerText(), /idle/);
    assert.equal(ctl("status", name).health, "standby");
    await shot("09-on-demand-idle-stopped");
    await sameDocument();
    await toOverview();
    assert.deepEqual(problems, []);
});

test("a manifest dropped in appears live (InterfacesAdded), and goes when removed", async () => {
    await toOverview();
    const file = path.join(WORK, "modules.d/mvck-new.toml");
    fs.writeFileSync(file + ".tmp", 'description = "dropped in while the page is open"\ntrusted = true\n[native]\ncommand = ["/bin/sh", "-c", "exec sleep 100000"]\n');
    fs.renameSync(file + ".tmp", file);
    await waitHealth("mvck-new", "online", "running");
    assert.equal(await row("mvck-new").locator(".mv-muted").first().innerText(), "dropped in while the page is open");
    fs.unlinkSync(file);
    await page.waitForFunction(() => !document.querySelector('tr[data-module="mvck-new"]'), null, { timeout: T });
    await until("its unit is gone", () => ["inactive", "unloaded"].includes(unitState("modvisor-mvck-new.service")));
    await sameDocument();
});

test("model activation shows its steps as they happen, and the rollback reason", async () => {
    await toOverview();
    await row("mvck-llm").locator("a.mv-module-link").click();
    await page.waitForSelector('[data-testid=module-page][data-module="mvck-llm"]');
    await sameDocument(); // navigation inside the page, no reload
    assert.match(await page.evaluate(() => window.location.hash), /module\/mvck-llm/);
    await page.waitForFunction(() => /native/.test(document.querySelector("[data-testid=explain]").innerText));
    await page.waitForFunction(() => /serving .*good\.gguf/.test(document.querySelector("[data-testid=log]").innerText));
    await record();
    const input = page.locator("input[data-testid=model-input]");

    // A good model: validated, recorded, restarting, online.
    await input.fill("good2.gguf");
    await page.locator("button[data-action=activate]").click();
    await page.waitForSelector("[data-testid=activation-result][data-result=ok]");
    const steps = async () => page.locator("[data-testid=activation-steps] li").evaluateAll(ls => ls.map(l => l.dataset.step));
    assert.deepEqual(await steps(), ["validated", "recorded", "restarting", "online"]);
    await page.waitForFunction(() => /good2\.gguf/.test(document.querySelector("[data-testid=active-model]").innerText));
    assert.ok(await page.evaluate(() => window.__mvck.disabled["mvck-llm"]), "actions disabled during the activation");
    await page.waitForFunction(() => /serving .*good2\.gguf/.test(document.querySelector("[data-testid=log]").innerText));
    await shot("10-activation-ok");

    // A broken one: the engine exits 1, modvisord rolls back to good2.gguf.
    await page.evaluate(() => { window.__mvck.disabled = {} });
    await input.fill("broken.gguf");
    await page.locator("button[data-action=activate]").click();
    await page.waitForSelector("[data-testid=activation-running]");
    assert.equal(await page.locator("button[data-action=activate]").isDisabled(), true);
    assert.equal(await page.locator("[data-module-actions=mvck-llm] button[data-action=restart]").isDisabled(), true);
    await page.waitForSelector("[data-testid=activation-result][data-result=failed]", { timeout: 40000 });
    const s = await steps();
    assert.deepEqual(s.slice(0, 3), ["validated", "recorded", "restarting"]);
    assert.ok(s.includes("failed") && s.includes("rolling-back"), JSON.stringify(s));
    assert.equal(s[s.length - 1], "rolled-back");
    const reason = await page.locator("[data-testid=rollback-reason]").innerText();
    assert.match(reason, /activating .*broken\.gguf failed/);
    assert.match(reason, /rolled back to .*good2\.gguf, which is online/);
    assert.match(reason, /error loading model|exiting due to model loading error/);
    assert.equal(ctl("status", "mvck-llm").active_model, path.join(WORK, "models/good2.gguf"));
    await page.waitForFunction(() => document.querySelector("[data-testid=module-header]").dataset.health === "online");
    assert.equal(await page.locator("button[data-action=activate]").isDisabled(), false);
    await shot("11-activation-rolled-back");
    assert.deepEqual(problems, []);
});

test("the Models tab: a pull's progress bar reaches 100 %, the model is listed with its size and users, activated into a module, removed", async () => {
    await page.goto(ROOT_URL + PAGE_PATH + "#/models", { timeout: T });
    await page.waitForSelector("#app[data-status=ready][data-ready=true]");
    await page.evaluate(() => { window.__mvckMarker = "same document" });
    await page.waitForSelector("[data-testid=models-page] [data-testid=models-empty]");
    assert.equal(await page.locator("button[data-tab=models]").getAttribute("aria-selected"), "true");
    // Every value the progress bar shows, as it shows it (changed in place, or rebuilt).
    await page.evaluate(() => {
        window.__mvckProgress = [];
        const look = () => {
            const b = document.querySelector("[data-testid=pull-jobs] [role=progressbar]");
            const v = b && Number(b.getAttribute("aria-valuenow"));
            const seen = window.__mvckProgress;
            if (b && seen[seen.length - 1] !== v)
                seen.push(v);
        };
        new MutationObserver(look).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["aria-valuenow"] });
    });
    await page.locator("input[data-testid=pull-source]").fill(PULL_URL);
    await page.locator("input[data-testid=pull-sha256]").fill(PULL_SHA);
    await page.locator("button[data-action=pull]").click();
    const job = page.locator("[data-testid=pull-jobs] li[data-job]");
    await job.waitFor();
    await page.waitForSelector("[data-testid=pull-jobs] li[data-job][data-state=running]");
    await shot("12-pull-running");
    await page.waitForSelector("[data-testid=pull-jobs] li[data-job][data-state=completed]", { timeout: 40000 });
    const bar = job.locator("[role=progressbar]");
    await page.waitForFunction(() => document.querySelector("[data-testid=pull-jobs] [role=progressbar]").getAttribute("aria-valuenow") === "100");
    assert.equal(await job.getAttribute("data-model"), `sha256:${PULL_SHA}`);
    const size = bytesText(PULL_SIZE);
    assert.equal(await job.locator(".pf-v6-c-progress__measure").innerText(), `${size} of ${size} (100 %)`);
    assert.equal(await job.locator("[data-testid=job-state]").innerText(), "completed");
    assert.match(await job.locator(".pf-v6-c-progress").getAttribute("class"), /pf-m-success/);
    const seen = await page.evaluate(() => window.__mvckProgress);
    assert.equal(seen[seen.length - 1], 100, JSON.stringify(seen));
    assert.ok(seen.some(v => v > 0 && v < 100), "the bar moved between 0 and 100 %: " + JSON.stringify(seen));
    assert.deepEqual([...seen].sort((a, b) => a - b), seen, "it never went back: " + JSON.stringify(seen));
    assert.match(fs.readFileSync(HTTP_LOG, "utf8"), /^GET \/tiny\.gguf /m, "modvisord downloaded it from the local server");
    await shot("13-pull-100");

    // Listed (the list is read again when the job completed), with its size, used by nobody.
    const id = `sha256:${PULL_SHA}`;
    const model = page.locator(`[data-testid=models-table] tr[data-model="${id}"]`);
    await model.waitFor();
    assert.equal(await model.locator("[data-field=size]").innerText(), size);
    assert.equal(await model.locator("[data-field=users]").innerText(), "—");
    const file = path.join(STORE, "url", PULL_SHA, "tiny.gguf");
    assert.equal(crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex"), PULL_SHA);

    // Activated into the stand-in engine: "used by" follows its ActiveModel, live.
    await model.locator("select[data-testid=activate-target]").selectOption("mvck-llm");
    await model.locator("button[data-action=activate-model]").click();
    await page.waitForFunction(i => /mvck-llm/.test(document.querySelector(`[data-testid=models-table] tr[data-model="${i}"] [data-field=users]`)?.innerText || ""), id, { timeout: 40000 });
    await page.locator("[data-testid=notifications] [data-kind=success]").last().waitFor();
    assert.equal(ctl("status", "mvck-llm").active_model, file);
    await until("mvck-llm online with the pulled model", () => ctl("status", "mvck-llm").health === "online");

    // Removing it while a running module uses it: refused, and the page says why.
    await model.locator("button[data-action=remove]").click();
    assert.match(await model.locator("[data-testid=remove-confirm]").innerText(), /Used by mvck-llm/);
    await model.locator("button[data-action=remove-confirm]").click();
    const busy = page.locator("[data-testid=notifications] [data-kind=busy]");
    await busy.waitFor();
    assert.match(await busy.innerText(), /active model of running module\(s\) mvck-llm/);
    assert.ok(fs.existsSync(file));
    await shot("14-models-remove-refused");

    // Once the module runs another model, the removal goes through and the row goes.
    execFileSync(CTL, ["--bus-address", BUS, "activate", "mvck-llm", "good2.gguf"], { stdio: "ignore", timeout: 40000 });
    await page.waitForFunction(i => document.querySelector(`[data-testid=models-table] tr[data-model="${i}"] [data-field=users]`)?.innerText === "—", id);
    await model.locator("button[data-action=remove]").click();
    await model.locator("button[data-action=remove-confirm]").click();
    await page.waitForSelector("[data-testid=models-page] [data-testid=models-empty]");
    assert.ok(!fs.existsSync(file), "the file left the store");

    // A pull cancelled from the page: the job ends "cancelled", nothing is listed.
    await page.locator("[data-testid=pull-jobs] li[data-job] button[data-action=dismiss]").click();
    await page.locator("input[data-testid=pull-source]").fill(`${PULL_URL}#sha256=${PULL_SHA}`);
    await page.locator("button[data-action=pull]").click();
    const again = page.locator("[data-testid=pull-jobs] li[data-job]");
    await page.waitForSelector("[data-testid=pull-jobs] li[data-job][data-state=running]");
    await again.locator("button[data-action=cancel]").click();
    await page.waitForSelector("[data-testid=pull-jobs] li[data-job][data-state=cancelled]");
    assert.equal(await again.locator("[data-testid=job-state]").innerText(), "cancelled");
    assert.equal(await again.locator("button[data-action=cancel]").isVisible(), false);
    assert.equal(await page.locator("[data-testid=models-page] [data-testid=models-empty]").count(), 1);
    assert.ok(!fs.existsSync(file), "a cancelled pull installs nothing");
    await sameDocument();
    assert.deepEqual(problems, []);
});

test("a user outside group modvisor reads everything, the actions are disabled, a forced call is refused", async () => {
    await browser(path.join(PROFILE, "user"));
    await openPage(USER_URL);
    for (const m of ctl("status").modules.filter(x => x.name.startsWith("mvck-")))
        await waitHealth(m.name, m.health);
    const banner = page.locator("[data-testid=read-only]");
    assert.match(await banner.innerText(), new RegExp(`${TESTUSER}.*neither root nor in the group “modvisor”`, "s"));
    const buttons = page.locator("[data-testid=modules] button[data-action]");
    assert.ok(await buttons.count() >= 15);
    assert.equal(await page.locator("[data-testid=modules] button[data-action]:not([disabled])").count(), 0);
    await shot("15-readonly-overview");

    // The module page: status and Explain readable, every control disabled.
    await page.goto(USER_URL + PAGE_PATH + "#/module/mvck-svc");
    await page.waitForSelector('[data-testid=module-page][data-module="mvck-svc"]');
    await page.waitForFunction(() => /native/.test(document.querySelector("[data-testid=explain]").innerText));
    for (const sel of ["button[data-action]", "select[data-testid=mode-select]", "input[data-testid=model-input]"])
        assert.equal(await page.locator(`[data-testid=module-page] ${sel}:not([disabled])`).count(), 0, sel);
    assert.match(await page.locator("[data-testid=actions-note]").innerText(), /needs root or membership/);
    await shot("16-readonly-module");

    // Force a call past the page's own gating: the bus refuses, the page says so.
    const pid = ctl("status", "mvck-svc").main_pid;
    // (In one step: an update of the row between two steps would bring the gating back.)
    await page.evaluate(() => {
        const b = document.querySelector("[data-module-actions=mvck-svc] button[data-action=stop]");
        b.disabled = false;
        b.removeAttribute("aria-disabled");
        b.click();
    });
    const refusal = page.locator("[data-testid=notifications] [data-kind=denied]");
    await refusal.waitFor({ timeout: T });
    const text = await refusal.innerText();
    assert.match(text, /Not permitted/);
    assert.match(text, /AccessDenied|Rejected send message|refused/);
    assert.equal(ctl("status", "mvck-svc").main_pid, pid, "nothing was stopped");
    assert.equal(unitState("modvisor-mvck-svc.service"), "active");
    await shot("17-refused");

    // The Models tab: readable, the pull disabled with the reason; a forced pull is refused.
    await page.locator("button[data-tab=models]").click();
    await page.waitForSelector("[data-testid=models-page] [data-testid=models-empty]");
    for (const sel of ["input[data-testid=pull-source]", "input[data-testid=pull-sha256]", "button[data-action=pull]"])
        assert.equal(await page.locator(sel).isDisabled(), true, sel);
    assert.match(await page.locator("[data-testid=models-note]").innerText(), /needs root or membership in the group “modvisor”/);
    await page.evaluate(([url, sha]) => {
        for (const [sel, v] of [["input[data-testid=pull-source]", url], ["input[data-testid=pull-sha256]", sha]]) {
            const i = document.querySelector(sel);
            i.disabled = false;
            i.value = v;
        }
        const b = document.querySelector("button[data-action=pull]");
        b.disabled = false;
        b.click();
    }, [PULL_URL, PULL_SHA]);
    const pullRefusal = page.locator("[data-testid=notifications] [data-kind=denied]").last();
    await page.waitForFunction(() => [...document.querySelectorAll("[data-testid=notifications] [data-kind=denied]")].some(e => /Pull/.test(e.innerText)));
    assert.match(await pullRefusal.innerText(), /Pull .*Not permitted/s);
    assert.equal(await page.locator("[data-testid=pull-jobs] li").count(), 0, "no job was started");
    await shot("18-readonly-models-refused");
    assert.deepEqual(problems, []);
});
