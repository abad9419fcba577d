//! modvisord running as root refuses manifests that anyone but root could change, with the
//! reason in `ManifestErrors`: one reached through a symlink into a directory of a non-root
//! user, one with a write ACL entry for a user, all of them under a 0777 ancestor directory.
//! Masks (a root-owned symlink to /dev/null, an empty file) keep working.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

const OWNER: &str = "mvtest-mowner";

struct User(u32);

impl User {
    fn create() -> User {
        let exists = |u: &str| {
            Command::new("id")
                .arg(u)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists(OWNER) {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    OWNER,
                ])
                .output()
                .expect("useradd");
            assert!(out.status.success() || exists(OWNER), "useradd: {out:?}");
        }
        let u = nix::unistd::User::from_name(OWNER)
            .expect("getpwnam")
            .expect("the user exists");
        User(u.uid.as_raw())
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(OWNER).output();
    }
}

fn manifest(cmd: &str) -> String {
    format!("trusted = true\n[native]\ncommand = [\"/bin/sleep\", \"{cmd}\"]\n")
}

fn error_for<'a>(errors: &'a [(String, String)], file: &str) -> &'a str {
    errors
        .iter()
        .find(|(f, _)| f.ends_with(file))
        .map(|(_, e)| e.as_str())
        .unwrap_or_else(|| panic!("{file} is refused: {errors:?}"))
}

#[tokio::test]
async fn untrusted_manifests_are_refused_with_the_reason() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the trust check runs as root"
    );
    let user = User::create();
    let d = Daemon::start(&[("good", &manifest("1000"))]).await;
    d.wait_state("good", "running").await;
    let m = d.manager().await;

    // Through a symlink into a directory the user owns (the file itself is root's).
    let theirs = d.dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::fs::write(theirs.join("linked.toml"), manifest("1001")).expect("write");
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(user.0)), None).expect("chown");
    std::os::unix::fs::symlink(theirs.join("linked.toml"), d.modules.join("linked.toml"))
        .expect("symlink");
    // A root file with a write ACL entry for the user (mode bits alone look fine: 0664, gid 0).
    std::fs::write(d.modules.join("acl.toml"), manifest("1002")).expect("write");
    let out = Command::new("setfacl")
        .args(["-m", &format!("u:{OWNER}:rw")])
        .arg(d.modules.join("acl.toml"))
        .output()
        .expect("setfacl must be installed (Debian's acl package)");
    assert!(out.status.success(), "setfacl: {out:?}");
    // Masks: a root symlink to /dev/null and an empty file.
    std::os::unix::fs::symlink("/dev/null", d.modules.join("masked.toml")).expect("symlink");
    std::fs::write(d.modules.join("empty.toml"), "").expect("write");

    let errors = m.reload().await.expect("Reload");
    let e = error_for(&errors, "linked.toml");
    assert!(
        e.contains(&format!(
            "refusing the directory {}: owned by uid {}",
            theirs.display(),
            user.0
        )),
        "{e}"
    );
    let e = error_for(&errors, "acl.toml");
    assert!(
        e.contains(&format!("its ACL lets uid {} write", user.0)),
        "{e}"
    );
    assert_eq!(errors.len(), 2, "masks are no errors: {errors:?}");
    let names: Vec<String> = m
        .list_modules()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(names, vec!["good".to_string()]);
    assert_eq!(m.manifest_errors().await.expect("ManifestErrors").len(), 2);

    // A 0777 directory above the module directory: every manifest is refused.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let errors = m.reload().await.expect("Reload");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let e = error_for(&errors, "good.toml");
    assert!(
        e.contains(&format!(
            "refusing the directory {}: writable by others (mode 0777)",
            d.dir.path().display()
        )),
        "{e}"
    );
    // The module whose manifest became untrusted keeps running as it was.
    let (s, _, _) = d.wait_state("good", "running").await;
    assert_eq!(s, "running");
    let errors = m.reload().await.expect("Reload");
    assert_eq!(errors.len(), 2, "{errors:?}");
}
