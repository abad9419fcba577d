//! D-Bus object path elements, escaped as systemd escapes unit names (the D-Bus face names
//! module objects this way, the systemd backend reads unit objects this way).

/// Escapes a module name into one object path element, as systemd does for unit names:
/// everything but `[A-Za-z0-9]` becomes `_XX` (hex).
pub fn escape_path_element(name: &str) -> String {
    if name.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(name.len() * 2);
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() && !(i == 0 && b.is_ascii_digit()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}
