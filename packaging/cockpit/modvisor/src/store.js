/* global cockpit */
// modvisord's state as this page knows it, kept current from the bus alone: one load
// (GetManagedObjects + the Manager's properties) when the daemon appears, then signals only —
// PropertiesChanged on the module objects, the manager and pull jobs, the ObjectManager's
// InterfacesAdded/InterfacesRemoved, ModuleChanged, ModuleEvicted, ModelActivation and a
// job's Finished. No polling: the model list is read again only when something that changes
// it happened (a pull finished, a removal, a module's active model changed).

const _ = cockpit.gettext;

export const BUS_NAME = "org.modvisor1";
export const MANAGER_PATH = "/org/modvisor1";
export const MANAGER_IFACE = "org.modvisor1.Manager";
export const MODULE_IFACE = "org.modvisor1.Module";
export const MODELS_PATH = "/org/modvisor1/models";
export const MODELS_IFACE = "org.modvisor1.Models";
export const JOB_IFACE = "org.modvisor1.Job";
const JOB_PREFIX = "/org/modvisor1/job/";
// A job's states after which nothing changes any more.
export const JOB_FINAL = ["completed", "failed", "cancelled"];
const OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager";
const PROPERTIES = "org.freedesktop.DBus.Properties";

export const ERR = {
    accessDenied: "org.freedesktop.DBus.Error.AccessDenied",
    notAllowed: "org.modvisor1.Error.NotAllowed",
    busy: "org.modvisor1.Error.Busy",
    invalid: "org.modvisor1.Error.InvalidArgument",
    noSuchModule: "org.modvisor1.Error.NoSuchModule",
    failed: "org.modvisor1.Error.Failed",
};

// Steps of ModelActivation after which an activation is over.
const FINAL_STEPS = { online: "ok", "rolled-back": "failed", "rollback-failed": "failed" };
// How long a Busy answer keeps a module's buttons disabled when nothing else is heard of it.
const BUSY_HOLD_MS = 15000;

function unwrap(props) {
    const o = {};
    for (const [k, v] of Object.entries(props || {}))
        o[k] = v !== null && typeof v === "object" && "v" in v ? v.v : v;
    return o;
}

function absent(ex) {
    const n = (ex && ex.name) || "";
    return n === "org.freedesktop.DBus.Error.ServiceUnknown" ||
        n === "org.freedesktop.DBus.Error.NameHasNoOwner" ||
        (ex && ex.problem === "not-found");
}

/// What an error from a call means for the person who clicked.
export function describeError(ex) {
    const name = (ex && ex.name) || "";
    const message = (ex && (ex.message || ex.problem)) || String(ex);
    if (name === ERR.accessDenied)
        return {
            kind: "denied",
            title: _("Not permitted"),
            text: _("The system bus refused the call: only root and members of the group “modvisor” may change modules.") + " (" + message + ")",
        };
    if (name === ERR.notAllowed)
        return { kind: "denied", title: _("Not permitted"), text: cockpit.format(_("modvisord refused: $0"), message) };
    if (name === ERR.busy)
        return { kind: "busy", title: _("Busy"), text: message };
    if (name === "org.freedesktop.DBus.Error.UnknownMethod" || name === "org.freedesktop.DBus.Error.UnknownObject" ||
        name === "org.freedesktop.DBus.Error.UnknownInterface")
        return { kind: "unsupported", title: _("Not supported by this modvisord"), text: message };
    if (name === ERR.invalid)
        return { kind: "invalid", title: _("Invalid argument"), text: message };
    if (name === ERR.noSuchModule)
        return { kind: "missing", title: _("No such module"), text: message };
    if (name === ERR.failed)
        return { kind: "failed", title: _("Failed"), text: message };
    return { kind: "other", title: _("Error"), text: name ? name + ": " + message : message };
}

export class Store {
    constructor() {
        this.status = "connecting"; // connecting | ready | absent | error
        this.problem = "";
        this.manager = {};
        this.modules = new Map(); // name -> Module properties (+ path)
        this.names = new Map(); // object path -> name
        this.activations = new Map(); // name -> { model, steps, status, error, own }
        this.ops = new Map(); // name -> operation this page has in flight
        this.busy = new Map(); // name -> timer: modvisord answered Busy
        this.listeners = new Set();
        this.dirty = new Set();
        this.generation = 0;
        this.owner = undefined;
        this.managerRefresh = null;
        // The model store (org.modvisor1.Models): its list, its problem, pull jobs by path.
        this.models = null; // null: not read yet; else [{ id, source, revision, path, size, ... }]
        this.modelsProblem = null; // { kind, title, text } when List failed
        this.modelsRefresh = null;
        this.jobs = new Map(); // job path -> { path, Model, State, BytesDone, BytesTotal, Progress, Error, own, seq }
        this.jobSeq = 0;
        this.noticeListeners = new Set();
    }

    /// `fn(notice)` for events worth a message: { kind: "evicted", name, by, reason }.
    onNotice(fn) {
        this.noticeListeners.add(fn);
        return () => this.noticeListeners.delete(fn);
    }

    notice(n) {
        for (const fn of this.noticeListeners)
            fn(n);
    }

    on(fn) {
        this.listeners.add(fn);
        return () => this.listeners.delete(fn);
    }

    /// Coalesces changes into one notification per turn of the event loop.
    changed(...what) {
        for (const w of what)
            this.dirty.add(w);
        if (this.scheduled)
            return;
        this.scheduled = true;
        Promise.resolve().then(() => {
            this.scheduled = false;
            const dirty = this.dirty;
            this.dirty = new Set();
            for (const fn of this.listeners)
                fn(dirty);
        });
    }

    start() {
        const c = this.client = cockpit.dbus(BUS_NAME, { bus: "system" });
        c.addEventListener("owner", (_ev, owner) => {
            if (owner === this.owner)
                return;
            this.owner = owner;
            if (owner)
                this.load();
            else
                this.gone();
        });
        c.addEventListener("close", (_ev, options) => {
            this.generation++;
            this.status = "error";
            this.problem = (options && (options.message || options.problem)) || _("the connection to the system bus closed");
            this.changed("all");
        });
        const on = (match, fn) => c.subscribe(match, (path, iface, member, args) => fn(path, args));
        on({ path: MANAGER_PATH, interface: OBJECT_MANAGER, member: "InterfacesAdded" },
           (_p, [path, ifaces]) => {
               if (ifaces && ifaces[MODULE_IFACE])
                   this.setModule(path, unwrap(ifaces[MODULE_IFACE]));
           });
        on({ path: MANAGER_PATH, interface: OBJECT_MANAGER, member: "InterfacesRemoved" },
           (_p, [path, ifaces]) => {
               if (ifaces && ifaces.includes(MODULE_IFACE))
                   this.removeModule(path);
           });
        on({ path_namespace: MANAGER_PATH, interface: PROPERTIES, member: "PropertiesChanged" },
           (path, [iface, props]) => {
               if (iface === MODULE_IFACE)
                   this.updateModule(path, unwrap(props));
               else if (iface === JOB_IFACE && path.startsWith(JOB_PREFIX))
                   this.updateJob(path, unwrap(props));
               else if (iface === MANAGER_IFACE && path === MANAGER_PATH) {
                   Object.assign(this.manager, unwrap(props));
                   this.changed("manager");
               }
           });
        on({ path: MANAGER_PATH, interface: MANAGER_IFACE, member: "ModuleChanged" },
           (_p, [name, state, health, reason]) => this.moduleChanged(name, state, health, reason));
        on({ path: MANAGER_PATH, interface: MANAGER_IFACE, member: "ModelActivation" },
           (_p, [name, model, step, detail]) => this.activationStep(name, model, step, detail));
        on({ path: MANAGER_PATH, interface: MANAGER_IFACE, member: "ModuleEvicted" },
           (_p, [name, by, reason]) => this.notice({ kind: "evicted", name, by, reason }));
        on({ path_namespace: "/org/modvisor1/job", interface: JOB_IFACE, member: "Finished" },
           (path, [state, error]) => this.updateJob(path, { State: state, Error: error }));
        // The owner event comes once the bridge resolved the name; load now as well, so that
        // a daemon that is not there shows at once.
        this.load();
    }

    async load() {
        const gen = ++this.generation;
        try {
            const [objects] = await this.client.call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects", [], { type: "" });
            if (gen !== this.generation)
                return;
            this.modules.clear();
            this.names.clear();
            for (const [path, ifaces] of Object.entries(objects))
                if (ifaces[MODULE_IFACE])
                    this.setModule(path, unwrap(ifaces[MODULE_IFACE]), true);
            const [props] = await this.client.call(MANAGER_PATH, PROPERTIES, "GetAll", [MANAGER_IFACE], { type: "s" });
            if (gen !== this.generation)
                return;
            this.manager = unwrap(props);
            this.status = "ready";
            this.problem = "";
            this.refreshModels();
        } catch (ex) {
            if (gen !== this.generation)
                return;
            this.status = absent(ex) ? "absent" : "error";
            this.problem = (ex && ex.message) || String(ex);
        }
        this.changed("all");
    }

    gone() {
        this.generation++;
        this.status = "absent";
        this.problem = "";
        this.modules.clear();
        this.names.clear();
        this.models = null;
        this.jobs.clear();
        this.changed("all");
    }

    setModule(path, props, quiet) {
        const name = props.Name;
        if (!name)
            return;
        this.names.set(path, name);
        this.modules.set(name, { ...props, path });
        if (!quiet) {
            this.changed("modules", "module:" + name);
            this.refreshModels();
        }
    }

    updateModule(path, props) {
        const name = this.names.get(path);
        const m = name && this.modules.get(name);
        if (!m)
            return; // InterfacesAdded (or the load) brings the whole object
        Object.assign(m, props);
        this.changed("modules", "module:" + name);
        if ("VramBytes" in props || "MemoryBytes" in props)
            this.refreshManager();
        if ("ActiveModel" in props)
            this.refreshModels(); // "used by" of the store's models
    }

    removeModule(path) {
        const name = this.names.get(path);
        if (!name)
            return;
        this.names.delete(path);
        this.modules.delete(name);
        this.changed("modules", "module:" + name);
        this.refreshModels();
    }

    moduleChanged(name, state, health, reason) {
        const m = this.modules.get(name);
        if (m) {
            Object.assign(m, { State: state, Health: health, HealthReason: reason });
            this.changed("modules", "module:" + name);
        } else if (this.status === "ready" && !reason.startsWith("removed:")) {
            this.fetchModule(name);
        }
        this.unbusy(name);
        // The manager's GPU figures are not announced by PropertiesChanged: read them again
        // when a module moves (an event, not a timer).
        this.refreshManager();
    }

    async fetchModule(name) {
        const gen = this.generation;
        try {
            const [path] = await this.client.call(MANAGER_PATH, MANAGER_IFACE, "GetModule", [name], { type: "s" });
            const [props] = await this.client.call(path, PROPERTIES, "GetAll", [MODULE_IFACE], { type: "s" });
            if (gen === this.generation && !this.modules.has(name))
                this.setModule(path, unwrap(props));
        } catch (ex) {
            // Gone again before we asked: InterfacesRemoved says so too.
        }
    }

    refreshManager() {
        if (this.status !== "ready")
            return;
        if (this.managerRefresh) {
            this.managerRefresh.again = true;
            return;
        }
        const gen = this.generation;
        const run = this.managerRefresh = { again: false };
        this.client.call(MANAGER_PATH, PROPERTIES, "GetAll", [MANAGER_IFACE], { type: "s" })
                .then(([props]) => {
                    if (gen === this.generation) {
                        this.manager = unwrap(props);
                        this.changed("manager");
                    }
                })
                .catch(() => {})
                .finally(() => {
                    this.managerRefresh = null;
                    if (run.again)
                        this.refreshManager();
                });
    }

    activationStep(name, model, step, detail) {
        let rec = this.activations.get(name);
        if (!rec || (rec.status !== "running" && step === "validated")) {
            // An activation this page did not start (modvisorctl, another browser).
            rec = { model, steps: [], status: "running", error: null, own: false };
            this.activations.set(name, rec);
        }
        rec.steps.push({ step, detail, model, time: Date.now() });
        if (step in FINAL_STEPS && !rec.own)
            rec.status = FINAL_STEPS[step];
        this.changed("activation:" + name, "module:" + name, "modules");
    }

    /// True while this module cannot take another operation: one of ours is in flight, an
    /// activation (anyone's) is under way, or modvisord just answered Busy.
    isBusy(name) {
        const a = this.activations.get(name);
        return this.ops.has(name) || this.busy.has(name) || !!(a && a.status === "running");
    }

    markBusy(name) {
        this.unbusy(name);
        this.busy.set(name, window.setTimeout(() => this.unbusy(name), BUSY_HOLD_MS));
        this.changed("modules", "module:" + name);
    }

    unbusy(name) {
        if (!this.busy.has(name))
            return;
        window.clearTimeout(this.busy.get(name));
        this.busy.delete(name);
        this.changed("modules", "module:" + name);
    }

    /// Calls a mutating Manager method for one module; the module counts as busy meanwhile.
    async act(name, op, method, args, signature) {
        if (this.ops.has(name))
            throw Object.assign(new Error(_("another operation on this module is in flight")), { name: ERR.busy });
        this.ops.set(name, op);
        this.changed("modules", "module:" + name);
        try {
            return await this.client.call(MANAGER_PATH, MANAGER_IFACE, method, args, { type: signature });
        } catch (ex) {
            if (ex && ex.name === ERR.busy)
                this.markBusy(name);
            throw ex;
        } finally {
            this.ops.delete(name);
            this.changed("modules", "module:" + name);
        }
    }

    start_module(name) { return this.act(name, "start", "StartModule", [name], "s") }
    stop_module(name) { return this.act(name, "stop", "StopModule", [name], "s") }
    restart_module(name) { return this.act(name, "restart", "RestartModule", [name], "s") }
    set_mode_override(name, mode) { return this.act(name, "override", "SetModeOverride", [name, mode], "ss") }

    async activate_model(name, model) {
        const rec = { model, steps: [], status: "running", error: null, own: true };
        this.activations.set(name, rec);
        this.changed("activation:" + name, "module:" + name, "modules");
        try {
            await this.act(name, "activate", "ActivateModel", [name, model], "ss");
            rec.status = "ok";
        } catch (ex) {
            rec.status = "failed";
            rec.error = describeError(ex);
            throw ex;
        } finally {
            this.changed("activation:" + name, "module:" + name, "modules");
        }
    }

    // --- the model store

    /// Reads Models.List again (coalesced: one call in flight, one more after it if asked).
    refreshModels() {
        if (this.status !== "ready" && this.status !== "connecting")
            return;
        if (this.modelsRefresh) {
            this.modelsRefresh.again = true;
            return;
        }
        const gen = this.generation;
        const run = this.modelsRefresh = { again: false };
        this.client.call(MODELS_PATH, MODELS_IFACE, "List", [], { type: "" })
                .then(([rows]) => {
                    if (gen !== this.generation)
                        return;
                    this.models = rows.map(([id, source, revision, path, size, date, architecture, fileType, parameters, contextLength, users]) =>
                        ({ id, source, revision, path, size: Number(size), date: Number(date), architecture, fileType, parameters: Number(parameters), contextLength: Number(contextLength), users }));
                    this.models.sort((a, b) => a.id.localeCompare(b.id));
                    this.modelsProblem = null;
                    this.changed("models");
                })
                .catch(ex => {
                    if (gen !== this.generation)
                        return;
                    this.models = null;
                    this.modelsProblem = describeError(ex);
                    this.changed("models");
                })
                .finally(() => {
                    this.modelsRefresh = null;
                    if (run.again)
                        this.refreshModels();
                });
    }

    /// A job's properties, from PropertiesChanged, Finished, or a GetAll after Pull.
    updateJob(path, props) {
        let job = this.jobs.get(path);
        const fresh = !job;
        if (fresh) {
            job = { path, Model: "", State: "queued", BytesDone: 0, BytesTotal: 0, Progress: 0, Error: "", own: false, seq: ++this.jobSeq };
            this.jobs.set(path, job);
        }
        const wasFinal = JOB_FINAL.includes(job.State);
        if (wasFinal && props.State !== undefined && !JOB_FINAL.includes(props.State))
            return; // an answer older than the end it already knows
        for (const [k, v] of Object.entries(props))
            if (k in job && k !== "path" && k !== "own" && k !== "seq")
                job[k] = typeof job[k] === "number" ? Number(v) : v;
        if (fresh && !job.Model)
            this.readJob(path); // a pull someone else started: its Model is const, not announced
        this.changed("jobs", "job:" + path);
        if (!wasFinal && job.State === "completed")
            this.refreshModels();
    }

    readJob(path) {
        const gen = this.generation;
        this.client.call(path, PROPERTIES, "GetAll", [JOB_IFACE], { type: "s" })
                .then(([props]) => {
                    if (gen === this.generation && this.jobs.has(path))
                        this.updateJob(path, unwrap(props));
                })
                .catch(() => {}); // gone already (5 minutes after it finished)
    }

    /// Starts a pull; resolves to the job's path. Options: sha256 (string), yes (bool),
    /// include (strings: globs of the files of an hf: source).
    async pull(source, { sha256, yes, include } = {}) {
        const options = {};
        if (sha256)
            options.sha256 = { t: "s", v: sha256 };
        if (yes)
            options.yes = { t: "b", v: true };
        if (include && include.length)
            options.include = { t: "as", v: include };
        const [path] = await this.client.call(MODELS_PATH, MODELS_IFACE, "Pull", [source, options], { type: "sa{sv}" });
        const job = this.jobs.get(path);
        if (job)
            job.own = true;
        else
            this.jobs.set(path, { path, Model: "", State: "queued", BytesDone: 0, BytesTotal: 0, Progress: 0, Error: "", own: true, seq: ++this.jobSeq });
        // What was announced before this page knew the path is in the signals it already
        // handled; the GetAll covers a job that was joined, or signals that came first.
        this.readJob(path);
        this.changed("jobs", "job:" + path);
        return path;
    }

    cancelJob(path) {
        return this.client.call(path, JOB_IFACE, "Cancel", [], { type: "" });
    }

    dismissJob(path) {
        this.jobs.delete(path);
        this.changed("jobs");
    }

    async removeModel(id, force = false) {
        try {
            await this.client.call(MODELS_PATH, MODELS_IFACE, "Remove", [id, force], { type: "sb" });
        } finally {
            this.refreshModels();
        }
    }

    explain(name) {
        return this.client.call(MANAGER_PATH, MANAGER_IFACE, "Explain", [name], { type: "s" }).then(([text]) => text);
    }
}
