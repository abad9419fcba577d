/* global cockpit */
// Who the logged-in user is, for the page's own gating of the actions. The real gate is on
// the bus (the policy answers AccessDenied, modvisord NotAllowed); this only decides what the
// page offers. The groups are those of the session's bridge process (`id -Gn`), which are the
// credentials the bus sees on its calls; cockpit.user()'s list is the fallback.

export const ADMIN_GROUP = "modvisor";

export async function detectPermission() {
    const user = await cockpit.user();
    let groups = null;
    try {
        const out = await cockpit.spawn(["id", "-Gn"], { err: "message" });
        groups = out.trim().split(/\s+/).filter(Boolean);
    } catch (ex) {
        groups = Array.isArray(user.groups) ? user.groups : [];
    }
    const root = user.id === 0;
    const member = groups.includes(ADMIN_GROUP);
    return { user: user.name, uid: user.id, groups, root, member, canManage: root || member };
}
