//! Loading manifests from the drop-in directories.
//!
//! Directories are read lowest precedence first; within a directory, files are taken in
//! byte order of their names. A `NAME.toml` in a later directory replaces the earlier one
//! whole; an empty file or a symlink to `/dev/null` masks it. Modules are then validated in
//! name order, so the result never depends on the order the kernel lists a directory in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::trust::{Opened, open_manifest};
use super::{Containment, ManifestError, Module, parse_manifest_with};

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
    for (stem, src) in found {
        let fail = |res: &mut LoadResult, e: ManifestError| {
            res.errors.push(e);
            res.broken_stems.insert(stem.clone());
        };
        let bytes = match open_manifest(&src.path, check_trust) {
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
                owner.insert(m.name.clone(), src.path.clone());
                res.modules.insert(m.name.clone(), m);
            }
            Err(e) => fail(&mut res, e),
        }
    }
    res
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
