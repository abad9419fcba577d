//! Who may change things: root, or a member of the `modvisor` group, identified by the bus.

use zbus::Connection;
use zbus::message::Header;
use zbus::names::BusName;

use super::ADMIN_GROUP;
use super::error::Error;

/// Decides whether the caller of a mutating method may act: root, or a member of the
/// `modvisor` group. The caller is identified by the bus (its credentials), never by our pid.
pub async fn authorize(conn: &Connection, hdr: &Header<'_>, what: &str) -> Result<(), Error> {
    let sender = hdr
        .sender()
        .ok_or_else(|| Error::NotAllowed("the call has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    let creds = dbus
        .get_connection_credentials(BusName::from(sender.to_owned()))
        .await
        .map_err(|e| Error::NotAllowed(format!("cannot identify the caller: {e}")))?;
    let uid = creds
        .unix_user_id()
        .ok_or_else(|| Error::NotAllowed("the bus did not say who the caller is".into()))?;
    if uid == 0 {
        return Ok(());
    }
    let admin_gid = nix::unistd::Group::from_name(ADMIN_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if let Some(gid) = admin_gid {
        let in_group = match creds.unix_group_ids() {
            Some(gids) => gids.contains(&gid),
            None => user_in_group(uid, gid),
        };
        if in_group {
            return Ok(());
        }
    }
    // A caller decides how often this happens: at most 5 lines per 10 s.
    static DENIED: super::ratelimit::RateLimit =
        super::ratelimit::RateLimit::new(std::time::Duration::from_secs(10), 5);
    if let Some(left_out) = DENIED.check(std::time::Instant::now()) {
        tracing::warn!(
            caller_uid = uid,
            "denied {what} to uid {uid}{}",
            match left_out {
                0 => String::new(),
                n => format!(" ({n} refusals before this one not logged)"),
            }
        );
    }
    Err(Error::NotAllowed(format!(
        "not allowed: only root and members of group {ADMIN_GROUP} may call {what} (caller uid {uid})"
    )))
}

fn user_in_group(uid: u32, gid: u32) -> bool {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|gs| gs.iter().any(|g| g.as_raw() == gid))
        .unwrap_or(false)
}
