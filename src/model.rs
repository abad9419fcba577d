//! Models: validating a requested model against the module's `model.directory`, and recording
//! the active one in the state directory (atomically: write temp, fsync, rename).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::manifest::ModelSpec;

mod start;
pub use start::check_for_start;

/// Checks a requested model: inside `model.directory` (after resolving symlinks, so no link
/// can lead out of it), a readable regular file, and for `.gguf` files the GGUF magic bytes.
/// Returns the canonical path. A path outside the directory gets the same answer whether it
/// exists or not: this is no oracle for the rest of the file system.
pub fn validate(spec: Option<&ModelSpec>, requested: &str) -> Result<PathBuf, String> {
    let dir = spec
        .and_then(|s| s.directory.as_ref())
        .ok_or("the module has no model.directory: ActivateModel only accepts models inside it")?;
    if requested.is_empty() || requested.contains('\0') {
        return Err("expected a model path".into());
    }
    let p = Path::new(requested);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    let canon_dir = std::fs::canonicalize(dir)
        .map_err(|e| format!("model.directory {}: {e}", dir.display()))?;
    let canon = resolve_inside(&joined, &canon_dir, dir)?;
    let meta = std::fs::metadata(&canon).map_err(|e| format!("{}: {e}", canon.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", canon.display()));
    }
    let mut f =
        File::open(&canon).map_err(|e| format!("{} is not readable: {e}", canon.display()))?;
    check_magic(&mut f, &canon)?;
    Ok(canon)
}

/// Canonicalizes `path`, which must lie inside `canon_dir`. For a path that does not exist,
/// the longest prefix that does is resolved: "no such file" is only said when that prefix is
/// inside the directory; anything leading outside is "not inside", existing or not.
fn resolve_inside(path: &Path, canon_dir: &Path, dir: &Path) -> Result<PathBuf, String> {
    let outside = || {
        format!(
            "{} is not inside model.directory {}",
            path.display(),
            dir.display()
        )
    };
    for prefix in path.ancestors() {
        let Ok(canon) = std::fs::canonicalize(prefix) else {
            continue;
        };
        let rest = path.strip_prefix(prefix).map_err(|_| outside())?;
        if !canon.starts_with(canon_dir)
            || rest
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(outside());
        }
        if rest.as_os_str().is_empty() {
            return Ok(canon);
        }
        return Err(format!(
            "{}: no such file in model.directory {}",
            path.display(),
            dir.display()
        ));
    }
    Err(outside())
}

fn check_magic(f: &mut File, path: &Path) -> Result<(), String> {
    if path
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
    {
        let mut magic = [0u8; 4];
        if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(format!(
                "{} is not a GGUF file (no GGUF magic bytes)",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Writes `text` to `path` atomically: a temp file in the same directory, fsync, rename, and
/// fsync of the directory.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Records the active model (and the one it replaced) for a module.
pub fn record(state_dir: &Path, active: &Path, previous: Option<&Path>) -> io::Result<()> {
    if let Some(p) = previous {
        write_atomic(
            &state_dir.join("previous-model"),
            &format!("{}\n", p.display()),
        )?;
    }
    write_atomic(
        &state_dir.join("active-model"),
        &format!("{}\n", active.display()),
    )
}

/// The engine's own last error line from its recent output, with the line before it when
/// that one names the cause (llama-server: "... failed to load model ...", then "exiting due
/// to model loading error").
pub fn last_error_line(lines: &[String]) -> Option<String> {
    let i = lines
        .iter()
        .rposition(|l| l.to_ascii_lowercase().contains("error"))?;
    if i > 0 && lines[i].to_ascii_lowercase().contains("exiting") {
        Some(format!("{} / {}", lines[i - 1].trim(), lines[i].trim()))
    } else {
        Some(lines[i].trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> ModelSpec {
        ModelSpec {
            default: None,
            directory: Some(dir.to_path_buf()),
        }
    }

    #[test]
    fn validation() {
        let t = tempfile::tempdir().expect("tempdir");
        let models = t.path().join("models");
        std::fs::create_dir_all(&models).expect("mkdir");
        std::fs::write(models.join("good.gguf"), b"GGUF\x03\x00\x00\x00rest").expect("write");
        std::fs::write(models.join("bad.gguf"), b"NOPE").expect("write");
        std::fs::write(t.path().join("outside.gguf"), b"GGUF").expect("write");
        std::os::unix::fs::symlink(t.path().join("outside.gguf"), models.join("link.gguf"))
            .expect("symlink");
        let s = spec(&models);
        assert!(validate(Some(&s), models.join("good.gguf").to_str().unwrap_or("")).is_ok());
        assert!(
            validate(Some(&s), "good.gguf").is_ok(),
            "relative to the directory"
        );
        assert!(
            validate(Some(&s), "bad.gguf")
                .unwrap_err()
                .contains("no GGUF magic")
        );
        assert!(
            validate(Some(&s), "../outside.gguf")
                .unwrap_err()
                .contains("not inside")
        );
        assert!(
            validate(Some(&s), "link.gguf")
                .unwrap_err()
                .contains("not inside"),
            "symlinks cannot lead out"
        );
        assert!(
            validate(Some(&s), "missing.gguf")
                .unwrap_err()
                .contains("no such file in model.directory")
        );
        // No oracle: outside, existing or not, the same answer (up to the path asked).
        let outside = |p: &str| validate(Some(&s), p).unwrap_err().replace(p, "P");
        assert_eq!(outside("/etc/passwd"), outside("/etc/no-such-file"));
        assert_eq!(outside("../outside.gguf"), outside("../no-such.gguf"));
        let via_link = format!("{}/link.gguf/x", models.display());
        assert_eq!(outside(&via_link), outside("/nonexistent/dir/x"));
        assert!(
            validate(Some(&s), models.to_str().unwrap_or(""))
                .unwrap_err()
                .contains("not a regular file")
        );
        assert!(validate(None, "x").is_err());
    }

    #[test]
    fn atomic_record() {
        let t = tempfile::tempdir().expect("tempdir");
        record(
            t.path(),
            Path::new("/m/b.gguf"),
            Some(Path::new("/m/a.gguf")),
        )
        .expect("record");
        assert_eq!(
            std::fs::read_to_string(t.path().join("active-model")).expect("read"),
            "/m/b.gguf\n"
        );
        assert_eq!(
            std::fs::read_to_string(t.path().join("previous-model")).expect("read"),
            "/m/a.gguf\n"
        );
        let names: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temp file left: {names:?}");
    }

    #[test]
    fn error_lines() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            last_error_line(&l(&["loading", "llama_model_load: error loading model: truncated", "exiting due to model loading error"])),
            Some("llama_model_load: error loading model: truncated / exiting due to model loading error".into())
        );
        assert_eq!(last_error_line(&l(&["ok"])), None);
    }
}
