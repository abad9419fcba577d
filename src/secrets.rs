//! Secrets of a module (`[native] environment_file`, `credentials`): files that must be owned
//! by root and readable by nobody else (mode 0600 or stricter), checked at every start. No
//! message here ever contains a secret's value, only paths and line numbers.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The largest secret file read (an environment file or one credential).
const MAX_BYTES: u64 = 1 << 20;

/// Opens a secret file without following a symlink and checks it: a regular file, owned by
/// root, no permission bits for group or others.
pub fn open_checked(path: &Path, what: &str) -> Result<File, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !m.is_file() {
        return Err(format!("{what} {} is not a regular file", path.display()));
    }
    if m.uid() != 0 {
        return Err(format!(
            "{what} {} must be owned by root (owner uid {})",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {} must be mode 0600 or stricter (is {:04o}): it holds secrets",
            path.display(),
            m.mode() & 0o7777
        ));
    }
    if m.len() > MAX_BYTES {
        return Err(format!("{what} {} is larger than 1 MiB", path.display()));
    }
    Ok(f)
}

/// Reads a checked secret file whole.
pub fn read_checked(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let mut f = open_checked(path, what)?;
    let mut buf = Vec::new();
    f.by_ref()
        .take(MAX_BYTES)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    Ok(buf)
}

/// Parses an environment file as systemd's `EnvironmentFile=` does for the common cases:
/// `KEY=VALUE` lines, blank lines and lines starting with `#` or `;` ignored, an optional
/// `export ` prefix, one pair of surrounding single or double quotes removed.
pub fn parse_environment(text: &str, path: &Path) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        // Never echo the line: it holds a secret.
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("{}:{}: expected KEY=VALUE", path.display(), i + 1));
        };
        let k = k.trim_end();
        let key_ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(format!(
                "{}:{}: invalid variable name, expected letters, digits and '_'",
                path.display(),
                i + 1
            ));
        }
        let v = v.trim();
        let v = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(a, b)| {
                v.strip_prefix(*a)
                    .and_then(|r| r.strip_suffix(*b))
                    .filter(|_| v.len() >= 2)
            })
            .unwrap_or(v);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Reads and parses a checked environment file.
pub fn environment_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let bytes = read_checked(path, "environment_file")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("environment_file {} is not UTF-8", path.display()))?;
    parse_environment(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_without_echoing_values() {
        let p = Path::new("/x.env");
        let env = parse_environment("# c\n\nA=1\nexport B = \"two words\"\nC='x'\n;d\nD=\n", p)
            .expect("valid");
        assert_eq!(
            env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "two words".into()),
                ("C".into(), "x".into()),
                ("D".into(), "".into())
            ]
        );
        let e = parse_environment("TOKEN_hunter2\n", p).unwrap_err();
        assert_eq!(e, "/x.env:1: expected KEY=VALUE");
        assert!(!e.contains("hunter2"));
        let e = parse_environment("1X=hunter2\n", p).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn mode_and_symlinks_checked() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join("s.env");
        std::fs::write(&f, "A=1\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = open_checked(&f, "environment_file").unwrap_err();
        assert!(e.contains("must be mode 0600 or stricter (is 0640)"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(
                environment_file(&f).expect("ok"),
                vec![("A".into(), "1".into())]
            );
        }
        let l = t.path().join("link.env");
        std::os::unix::fs::symlink(&f, &l).expect("symlink");
        assert!(open_checked(&l, "environment_file").is_err(), "no symlinks");
    }
}
