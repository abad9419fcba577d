//! Every bad manifest in tests/fixtures/bad gives exactly the message in its `.expected` file,
//! and every manifest in config/ and tests/fixtures/good is valid.
//! `MODVISOR_BLESS=1` rewrites the `.expected` files (review the diff before committing).

use std::path::{Path, PathBuf};

use modvisor::manifest::parse_manifest;

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

#[test]
fn bad_manifests_give_exact_messages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bad");
    let files = toml_files(&dir);
    assert!(
        files.len() >= 25,
        "at least 25 bad fixtures, found {}",
        files.len()
    );
    let bless = std::env::var_os("MODVISOR_BLESS").is_some();
    let mut failures = Vec::new();
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.trim_end_matches(".toml");
        let src = std::fs::read_to_string(&f).expect("read fixture");
        let got = match parse_manifest(Path::new(&name), &src, stem) {
            Ok(_) => format!("{name}: unexpectedly valid"),
            Err(e) => e.to_string(),
        };
        let exp_path = f.with_extension("expected");
        if bless {
            std::fs::write(&exp_path, format!("{got}\n")).expect("write expected");
            continue;
        }
        let want = std::fs::read_to_string(&exp_path).unwrap_or_default();
        if want.trim_end() != got {
            failures.push(format!(
                "{name}\n  want: {}\n  got:  {got}",
                want.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn shipped_and_good_manifests_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["config/modules.d", "config/examples", "tests/fixtures/good"] {
        for f in toml_files(&root.join(dir)) {
            let src = std::fs::read_to_string(&f).expect("read");
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if let Err(e) = parse_manifest(&f, &src, &stem) {
                panic!("{e}");
            }
        }
    }
}
