//! Loading manifests from the drop-in directories.
//!
//! Directories are read lowest precedence first; within a directory, files are taken in
//! byte order of their names. A `NAME.toml` in a later directory replaces the earlier one
//! whole; an empty file or a symlink to `/dev/null` masks it. Modules are then validated in
//! name order, so the result never depends on the order the kernel lists a directory in.
//!
//! What one manifest cannot see on its own is checked across modules here: a module name, and
//! a `[serve]` address that two modules would bind, are refused on the later manifest (in that
//! order), at the line and column of the value; the earlier module keeps it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::serve::{Claim, claims};
use super::trust::{Opened, Walked, open_manifest, open_manifest_in};
use super::{Containment, ManifestError, Module, ServeAddr, parse_manifest_with};

/// The winning file for a manifest stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSource {
    pub stem: String,
    pub path: PathBuf,
}

/// Everything one scan found.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Valid modules by module name.
    pub modules: BTreeMap<String, Module>,
    /// Errors, in file order.
    pub errors: Vec<ManifestError>,
    /// Stems whose manifest exists but is broken: a module of that stem keeps running as it was.
    pub broken_stems: BTreeSet<String>,
    /// Files that mask their stem (empty or symlinked to /dev/null).
    pub masked: Vec<PathBuf>,
}

/// Finds the winning file for each stem (the last directory that has `STEM.toml`). Whether
/// it masks the stem (empty, or a symlink to /dev/null) is decided when it is opened.
pub fn scan_dirs(
    dirs: &[PathBuf],
    errors: &mut Vec<ManifestError>,
) -> BTreeMap<String, ManifestSource> {
    let mut found = BTreeMap::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                errors.push(ManifestError {
                    path: dir.clone(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read directory: {e}"),
                });
                continue;
            }
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        names.sort();
        for path in names {
            if let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) {
                found.insert(stem.clone(), ManifestSource { stem, path });
            }
        }
    }
    found
}

/// Why a manifest (or a directory above it) cannot be trusted: anyone but root (and the
/// daemon's own user) could change what modvisord runs through it.
pub fn untrusted(path: &Path) -> Option<String> {
    open_manifest(path, true).err()
}

/// Scans the directories and validates every winning manifest (default containment rules).
pub fn load_dirs(dirs: &[PathBuf]) -> LoadResult {
    load_dirs_with(dirs, false, &Containment::default())
}

/// With `check_trust`, a manifest that anyone but root could change is refused with the reason.
pub fn load_dirs_checked(dirs: &[PathBuf], check_trust: bool) -> LoadResult {
    load_dirs_with(dirs, check_trust, &Containment::default())
}

/// [`load_dirs_checked`] with the daemon config's containment rules for untrusted modules.
pub fn load_dirs_with(dirs: &[PathBuf], check_trust: bool, rules: &Containment) -> LoadResult {
    let mut res = LoadResult::default();
    let found = scan_dirs(dirs, &mut res.errors);
    let mut owner: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut bound = Bound::default();
    let mut walked = Walked::default();
    for (stem, src) in found {
        let fail = |res: &mut LoadResult, e: ManifestError| {
            res.errors.push(e);
            res.broken_stems.insert(stem.clone());
        };
        let bytes = match open_manifest_in(&mut walked, &src.path, check_trust) {
            Ok(Opened::Mask) => {
                res.masked.push(src.path);
                continue;
            }
            Ok(Opened::Text(b)) => b,
            Err(why) => {
                let e = ManifestError {
                    path: src.path.clone(),
                    line: 0,
                    column: 0,
                    message: why,
                };
                fail(&mut res, e);
                continue;
            }
        };
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                let offset = e.utf8_error().valid_up_to();
                let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
                let e = ManifestError::at(&src.path, &text, offset, "expected UTF-8 text");
                fail(&mut res, e);
                continue;
            }
        };
        match parse_manifest_with(&src.path, &text, &stem, rules) {
            Ok(m) => {
                if let Some(first) = owner.get(&m.name) {
                    let msg = format!(
                        "module name \"{}\" is already defined by {}",
                        m.name,
                        first.display()
                    );
                    fail(&mut res, ManifestError::at(&src.path, &text, 0, msg));
                    continue;
                }
                let mine = match &m.serve {
                    Some(_) => claims(&text),
                    None => Vec::new(),
                };
                if let Some((c, msg)) = bound.conflict(&mine) {
                    fail(&mut res, ManifestError::at(&src.path, &text, c.offset, msg));
                    continue;
                }
                bound.take(&m.name, &src.path, &mine);
                owner.insert(m.name.clone(), src.path.clone());
                res.modules.insert(m.name.clone(), m);
            }
            Err(e) => fail(&mut res, e),
        }
    }
    res
}

/// The `[serve]` addresses of the modules accepted so far: (module, its manifest, listen?).
#[derive(Default)]
struct Bound(BTreeMap<ServeAddr, (String, PathBuf, bool)>);

impl Bound {
    /// The first address of `mine` that another module already binds: modvisord cannot listen
    /// where it already listens for another module, nor where another module's engine
    /// listens; an engine cannot listen where modvisord does. (Two engines on one upstream
    /// are not refused here: only one of them can run at a time.)
    fn conflict(&self, mine: &[Claim]) -> Option<(Claim, String)> {
        mine.iter().find_map(|c| {
            let (module, path, listen) = self.0.get(&c.addr)?;
            let (key, addr, path) = (
                if c.listen {
                    "serve.listen"
                } else {
                    "serve.upstream"
                },
                &c.addr,
                path.display(),
            );
            let msg = match (c.listen, *listen) {
                (true, true) => format!(
                    "{key}: {addr} is already a listen address of module \"{module}\" ({path})"
                ),
                (true, false) => format!(
                    "{key}: {addr} is the upstream of module \"{module}\" ({path}): its engine listens there"
                ),
                (false, true) => format!(
                    "{key}: {addr} is a listen address of module \"{module}\" ({path}): modvisord listens there, the engine needs another"
                ),
                (false, false) => return None,
            };
            Some((c.clone(), msg))
        })
    }

    fn take(&mut self, module: &str, path: &Path, mine: &[Claim]) {
        for c in mine {
            self.0
                .entry(c.addr.clone())
                .or_insert_with(|| (module.to_string(), path.to_path_buf(), c.listen));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::create_dir_all(dir).expect("mkdir");
        fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn precedence_and_masking() {
        let t = tempfile::tempdir().expect("tempdir");
        let (lib, etc, run) = (
            t.path().join("lib"),
            t.path().join("etc"),
            t.path().join("run"),
        );
        write(
            &lib,
            "a.toml",
            "description = \"lib a\"\n[native]\ncommand = [\"/bin/a\"]\n",
        );
        write(
            &etc,
            "a.toml",
            "description = \"etc a\"\n[native]\ncommand = [\"/bin/a\"]\n",
        );
        write(&lib, "b.toml", "[native]\ncommand = [\"/bin/b\"]\n");
        write(&etc, "b.toml", "");
        write(&lib, "c.toml", "[native]\ncommand = [\"/bin/c\"]\n");
        fs::create_dir_all(&run).expect("mkdir");
        std::os::unix::fs::symlink("/dev/null", run.join("c.toml")).expect("symlink");
        write(&run, "d.toml", "[native]\ncommand = [\"/bin/d\"]\n");
        write(&run, "notes.txt", "ignored");
        let r = load_dirs(&[lib, etc.clone(), run]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            r.modules.keys().cloned().collect::<Vec<_>>(),
            vec!["a", "d"]
        );
        assert_eq!(r.modules["a"].description, "etc a");
        assert_eq!(r.modules["a"].source, etc.join("a.toml"));
        assert_eq!(r.masked.len(), 2);
    }

    #[test]
    fn later_file_replaces_whole_even_when_broken() {
        let t = tempfile::tempdir().expect("tempdir");
        let (lib, etc) = (t.path().join("lib"), t.path().join("etc"));
        write(&lib, "a.toml", "[native]\ncommand = [\"/bin/a\"]\n");
        write(&etc, "a.toml", "[native]\ncommand = 5\n");
        let r = load_dirs(&[lib, etc]);
        assert!(r.modules.is_empty());
        assert_eq!(r.errors.len(), 1);
        assert!(r.broken_stems.contains("a"));
    }

    #[test]
    fn duplicate_names_rejected() {
        let t = tempfile::tempdir().expect("tempdir");
        write(
            t.path(),
            "a.toml",
            "name = \"x\"\n[native]\ncommand = [\"/bin/a\"]\n",
        );
        write(
            t.path(),
            "b.toml",
            "name = \"x\"\n[native]\ncommand = [\"/bin/b\"]\n",
        );
        let r = load_dirs(&[t.path().to_path_buf()]);
        assert_eq!(r.modules.len(), 1);
        assert!(
            r.errors[0].message.contains("already defined by"),
            "{}",
            r.errors[0]
        );
    }

    fn served(listen: &str, upstream: &str) -> String {
        format!(
            "description = \"x\"\n[native]\ncommand = [\"/bin/e\"]\n[serve]\nlisten = [\"127.0.0.1:7001\", {listen}]\nupstream = {upstream}\n"
        )
    }

    #[test]
    fn a_listen_address_of_another_module_is_refused_at_its_line_and_column() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        write(
            dir,
            "a.toml",
            &served("\"127.0.0.1:8080\"", "\"127.0.0.1:18080\""),
        );
        // Same port on another loopback address: no conflict.
        write(
            dir,
            "b.toml",
            &served("\"127.0.0.2:8080\"", "\"127.0.0.1:18081\""),
        );
        // Its second listen address is a's.
        let c = served("\"127.0.0.1:8080\"", "\"127.0.0.1:18082\"").replace("7001", "7003");
        write(dir, "c.toml", &c);
        let r = load_dirs(&[dir.to_path_buf()]);
        // b and c repeat a's 127.0.0.1:7001 too: b is refused for it, c for the first one.
        assert_eq!(r.modules.keys().collect::<Vec<_>>(), vec!["a"]);
        let shown: Vec<String> = r.errors.iter().map(|e| e.to_string()).collect();
        let a = dir.join("a.toml");
        assert_eq!(
            shown,
            vec![
                format!(
                    "{}:5:11: serve.listen: 127.0.0.1:7001 is already a listen address of module \"a\" ({})",
                    dir.join("b.toml").display(),
                    a.display()
                ),
                format!(
                    "{}:5:29: serve.listen: 127.0.0.1:8080 is already a listen address of module \"a\" ({})",
                    dir.join("c.toml").display(),
                    a.display()
                ),
            ]
        );
        assert!(r.broken_stems.contains("b") && r.broken_stems.contains("c"));
    }

    #[test]
    fn listen_and_upstream_of_two_modules_must_not_meet() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let one = |l: u16, u: u16| {
            format!(
                "[native]\ncommand = [\"/bin/e\"]\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\n"
            )
        };
        write(dir, "a.toml", &one(8080, 18080));
        // Listens where a's engine listens.
        write(dir, "b.toml", &one(18080, 18090));
        // Its engine would listen where modvisord listens for a.
        write(dir, "c.toml", &one(8081, 8080));
        // Another module with a's upstream and no conflict otherwise: two engines that cannot
        // run at once, not refused.
        write(dir, "d.toml", &one(8082, 18080));
        // A module without [serve] claims nothing.
        write(dir, "e.toml", "[native]\ncommand = [\"/bin/e\"]\n");
        let r = load_dirs(&[dir.to_path_buf()]);
        assert_eq!(
            r.modules.keys().collect::<Vec<_>>(),
            vec!["a", "d", "e"],
            "{:?}",
            r.errors
        );
        let a = dir.join("a.toml").display().to_string();
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        assert_eq!(
            r.errors[0].to_string(),
            format!(
                "{}:4:11: serve.listen: 127.0.0.1:18080 is the upstream of module \"a\" ({a}): its engine listens there",
                dir.join("b.toml").display()
            )
        );
        assert_eq!(
            r.errors[1].to_string(),
            format!(
                "{}:5:12: serve.upstream: 127.0.0.1:8080 is a listen address of module \"a\" ({a}): modvisord listens there, the engine needs another",
                dir.join("c.toml").display()
            )
        );
    }

    #[test]
    fn a_refused_module_claims_no_address() {
        // b is refused for its name; c may then use b's listen address.
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        let one = |name: &str, l: u16, u: u16| {
            format!(
                "name = \"{name}\"\n[native]\ncommand = [\"/bin/e\"]\n[serve]\nlisten = [\"127.0.0.1:{l}\"]\nupstream = \"127.0.0.1:{u}\"\n"
            )
        };
        write(dir, "a.toml", &one("a", 8080, 18080));
        write(dir, "b.toml", &one("a", 8081, 18081));
        write(dir, "c.toml", &one("c", 8081, 18082));
        let r = load_dirs(&[dir.to_path_buf()]);
        assert_eq!(r.modules.keys().collect::<Vec<_>>(), vec!["a", "c"]);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].message.contains("already defined by"));
    }

    #[test]
    fn manifests_writable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        write(t.path(), "a.toml", "[native]\ncommand = [\"/bin/a\"]\n");
        write(t.path(), "b.toml", "[native]\ncommand = [\"/bin/b\"]\n");
        std::fs::set_permissions(
            t.path().join("b.toml"),
            std::fs::Permissions::from_mode(0o666),
        )
        .expect("chmod");
        let r = load_dirs_checked(&[t.path().to_path_buf()], true);
        assert_eq!(r.modules.keys().cloned().collect::<Vec<_>>(), vec!["a"]);
        assert!(
            r.errors[0]
                .message
                .contains("writable by others (mode 0666)"),
            "{}",
            r.errors[0]
        );
        // A world-writable directory taints every manifest in it.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let r = load_dirs_checked(&[t.path().to_path_buf()], true);
        assert!(r.modules.is_empty());
        assert!(
            r.errors
                .iter()
                .all(|e| e.message.contains("refusing the directory")),
            "{:?}",
            r.errors
        );
    }

    #[test]
    fn missing_directories_are_fine() {
        let r = load_dirs(&[PathBuf::from("/nonexistent/modvisor/x")]);
        assert!(r.errors.is_empty() && r.modules.is_empty());
    }
}
