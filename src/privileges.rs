//! The engine's identity: the manifest's `user`/`group` resolved to a uid, a gid and the
//! supplementary groups. These are NSS lookups (files, LDAP, sssd...) that may block: callers
//! run them in `spawn_blocking`, never on the supervisor actor.

use nix::unistd::{Gid, Group, User};

use crate::manifest::Privileges;

/// A resolved engine identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's groups, as `initgroups` would set them).
    pub groups: Vec<u32>,
    pub home: String,
}

impl Identity {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// Looks the engine's user (default `modvisor-engine`) and group up. Refuses a name other than
/// "root" that resolves to uid 0: running as root must be written as `user = "root"`.
pub fn resolve(p: &Privileges) -> Result<Identity, String> {
    let (user, gid) = user_and_group(p)?;
    let name = p.user_name();
    let cname = std::ffi::CString::new(name).map_err(|_| format!("bad user name {name}"))?;
    let groups = nix::unistd::getgrouplist(&cname, gid)
        .map_err(|e| format!("looking up the groups of {name}: {e}"))?;
    Ok(Identity {
        user: name.to_string(),
        uid: user.uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        home: user.dir.display().to_string(),
    })
}

/// What [`resolve`] refuses, without the supplementary groups: for a unit, systemd looks
/// those up itself when it starts the engine. (`getgrouplist` was the costliest lookup of a
/// start: glibc asks every NSS source, and systemd's walks its userdb directories.)
pub fn check(p: &Privileges) -> Result<(), String> {
    user_and_group(p).map(|_| ())
}

fn user_and_group(p: &Privileges) -> Result<(User, Gid), String> {
    let name = p.user_name();
    let user = User::from_name(name)
        .map_err(|e| format!("looking up user {name}: {e}"))?
        .ok_or_else(|| {
            if p.user.is_none() {
                format!(
                    "user {name} does not exist (the package creates it: systemd-sysusers /usr/lib/sysusers.d/modvisor.conf)"
                )
            } else {
                format!("user {name} (native.user) does not exist")
            }
        })?;
    if user.uid.is_root() && name != "root" {
        return Err(format!(
            "user {name} has uid 0: write user = \"root\" to run an engine as root"
        ));
    }
    let gid = match &p.group {
        None => user.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| format!("looking up group {g}: {e}"))?
                .ok_or_else(|| format!("group {g} (native.group) does not exist"))?
                .gid
        }
    };
    Ok((user, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_only_when_named() {
        let p = Privileges {
            user: Some("root".into()),
            ..Privileges::default()
        };
        let id = resolve(&p).expect("root exists");
        assert!(id.is_root());
        assert!(id.groups.contains(&0));
        let missing = Privileges {
            user: Some("no-such-user-xyz".into()),
            ..Privileges::default()
        };
        assert!(
            resolve(&missing)
                .unwrap_err()
                .contains("no-such-user-xyz (native.user) does not exist")
        );
    }

    #[test]
    fn check_refuses_what_resolve_refuses() {
        let cases = [
            (Some("root"), None, true),
            (Some("no-such-user-xyz"), None, false),
            (Some("root"), Some("no-such-group-xyz"), false),
            (Some("root"), Some("root"), true),
        ];
        for (user, group, ok) in cases {
            let p = Privileges {
                user: user.map(Into::into),
                group: group.map(Into::into),
                ..Privileges::default()
            };
            assert_eq!(check(&p).is_ok(), ok, "{user:?} {group:?}");
            assert_eq!(check(&p).err(), resolve(&p).err(), "{user:?} {group:?}");
        }
    }
}
