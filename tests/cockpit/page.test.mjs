// The Cockpit page in a real Chromium against a real cockpit-ws and a real modvisord; run by
// tests/cockpit/run.sh, which sets everything up and passes it in MVCK_* variables.
// Every wait is bounded; a screenshot of each state goes to $MVCK_SHOTS.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
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

const row = name => page.locator(`tr[data-module="${name}"]`);

async function waitHealth(name, health, state) {
    await page.waitForFunction(([n, h, s]) => {
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

async function openPage(base, hash = "") {
    await page.goto(base + PAGE_PATH + hash, { timeout: T });
    await page.waitForSelector("#app[data-status=ready][data-ready=true]", { timeout: T });
    await page.evaluate(() => { window.__mvckMarker = "same document" });
}

async function sameDocument() {
    assert.equal(await page.evaluate(() => window.__mvckMarker), "same document", "the page was not reloaded");
}

before(async () => {
    fs.mkdirSync(SHOTS, { recursive: true });
    // Every module up (or failed, for the one that must) before the browser looks.
    await until("modules settled", () => {
        const s = ctl("status");
        const by = Object.fromEntries(s.modules.map(m => [m.name, m]));
        return by["mvck-svc"]?.health === "online" && by["mvck-stop"]?.health === "online" &&
            by["mvck-mem"]?.health === "degraded" && by["mvck-fail"]?.state === "failed" &&
            by["mvck-llm"]?.health === "online" && s;
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
    assert.match(await page.locator("[data-testid=counts]").innerText(), /3 online, 1 degraded, 1 offline/);
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
    assert.equal(await row("mvck-stop").locator("button[data-action=start]").isDisabled(), false);
    assert.equal(await row("mvck-stop").locator("button[data-action=stop]").isDisabled(), true);
    assert.ok(await page.evaluate(() => window.__mvck.disabled["mvck-stop"]), "buttons disabled while the stop was in flight");
    await shot("03-stopped");
    await row("mvck-stop").locator("button[data-action=start]").click();
    await waitHealth("mvck-stop", "online", "running");
    await until("the unit runs again", () => unitState(unit) === "active");
    await sameDocument();
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

test("a manifest dropped in appears live (InterfacesAdded), and goes when removed", async () => {
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
    await shot("06-activation-ok");

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
    await shot("07-activation-rolled-back");
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
    await shot("08-readonly-overview");

    // The module page: status and Explain readable, every control disabled.
    await page.goto(USER_URL + PAGE_PATH + "#/module/mvck-svc");
    await page.waitForSelector('[data-testid=module-page][data-module="mvck-svc"]');
    await page.waitForFunction(() => /native/.test(document.querySelector("[data-testid=explain]").innerText));
    for (const sel of ["button[data-action]", "select[data-testid=mode-select]", "input[data-testid=model-input]"])
        assert.equal(await page.locator(`[data-testid=module-page] ${sel}:not([disabled])`).count(), 0, sel);
    assert.match(await page.locator("[data-testid=actions-note]").innerText(), /needs root or membership/);
    await shot("09-readonly-module");

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
    await shot("10-refused");
    assert.deepEqual(problems, []);
});
