//! Reconcile: the pure diff of the modules the supervisor has against a fresh manifest scan.

use std::collections::BTreeMap;

use crate::manifest::{LoadResult, Module};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new manifest.
    Add(Module),
    /// The manifest is gone (not merely broken: a broken one keeps its module as it was).
    Remove(String),
    /// The manifest changed; `respawn` when what it runs changed (a running module restarts).
    Update { module: Module, respawn: bool },
}

/// The stem of a manifest file (`llama.toml` -> `llama`): a broken file keeps its module.
pub fn stem(m: &Module) -> String {
    m.source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// What to do to go from `have` (name -> module) to the scan `new`, removals first.
pub fn diff<'a>(have: impl IntoIterator<Item = &'a Module>, new: &LoadResult) -> Vec<Change> {
    let have: BTreeMap<&str, &Module> = have.into_iter().map(|m| (m.name.as_str(), m)).collect();
    let mut out: Vec<Change> = have
        .iter()
        .filter(|(n, m)| !new.modules.contains_key(**n) && !new.broken_stems.contains(&stem(m)))
        .map(|(n, _)| Change::Remove(n.to_string()))
        .collect();
    for (name, m) in &new.modules {
        match have.get(name.as_str()) {
            None => out.push(Change::Add(m.clone())),
            Some(old) if *old == m => {}
            Some(old) => out.push(Change::Update {
                module: m.clone(),
                respawn: old.run_spec_differs(m),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, file: &str, cmd: &str) -> Module {
        let src = format!("name = \"{name}\"\n[native]\ncommand = [\"{cmd}\"]\n");
        let stem = file.trim_start_matches("/m/").trim_end_matches(".toml");
        crate::manifest::parse_manifest(std::path::Path::new(file), &src, stem).expect("valid")
    }

    #[test]
    fn adds_removes_updates_and_keeps_broken() {
        let a = module("a", "/m/a.toml", "/bin/true");
        let b = module("b", "/m/b.toml", "/bin/true");
        let c = module("c", "/m/c.toml", "/bin/true");
        let mut new = LoadResult::default();
        // a: command changed; b: only the description; c: its file is broken now; d: new.
        new.modules
            .insert("a".into(), module("a", "/m/a.toml", "/bin/false"));
        let mut b2 = b.clone();
        b2.description = "changed".into();
        new.modules.insert("b".into(), b2.clone());
        new.broken_stems.insert("c".into());
        let d = module("d", "/m/d.toml", "/bin/true");
        new.modules.insert("d".into(), d.clone());
        let changes = diff([&a, &b, &c], &new);
        assert_eq!(
            changes,
            vec![
                Change::Update {
                    module: new.modules["a"].clone(),
                    respawn: true
                },
                Change::Update {
                    module: b2,
                    respawn: false
                },
                Change::Add(d),
            ]
        );
        // c's file removed entirely: removed.
        let gone = LoadResult {
            modules: new.modules.clone(),
            ..Default::default()
        };
        assert!(diff([&c], &gone).contains(&Change::Remove("c".into())));
        // Nothing changed: nothing to do.
        let mut same = LoadResult::default();
        same.modules.insert("a".into(), a.clone());
        assert!(diff([&a], &same).is_empty());
    }
}
