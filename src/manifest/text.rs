//! Text a manifest may contain: no NUL or other control characters in any string (they cannot
//! cross D-Bus, an argv or a unit property; a NUL sent to the bus disconnects the daemon).

use toml::de::{DeTable, DeValue};

/// The byte offset of the first string value (or key) holding a control character other
/// than tab, newline or carriage return, with its dotted key.
pub fn first_control_char(src: &str) -> Option<(usize, String)> {
    let table = DeTable::parse(src).ok()?;
    walk_table(table.get_ref(), "")
}

fn bad(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
}

fn walk_table(t: &DeTable<'_>, prefix: &str) -> Option<(usize, String)> {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        if bad(k.get_ref()) {
            return Some((k.span().start, key));
        }
        if let Some(found) = walk_value(v.get_ref(), v.span().start, &key) {
            return Some(found);
        }
    }
    None
}

fn walk_value(v: &DeValue<'_>, at: usize, key: &str) -> Option<(usize, String)> {
    match v {
        DeValue::String(s) if bad(s) => Some((at, key.to_string())),
        DeValue::Array(items) => items
            .iter()
            .find_map(|i| walk_value(i.get_ref(), i.span().start, key)),
        DeValue::Table(t) => walk_table(t, key),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_control_characters_with_their_key() {
        assert_eq!(
            first_control_char("a = \"ok\\tfine\"\n[b]\nc = [\"x\"]\n"),
            None
        );
        let src = "a = \"ok\"\n[native]\ncommand = [\"x\", \"y\\u0000\"]\n";
        let (at, key) = first_control_char(src).expect("found");
        assert_eq!(key, "native.command");
        assert_eq!(&src[at..at + 1], "\"");
        assert!(first_control_char("d = \"\\u001b[31m\"\n").is_some(), "ESC");
    }
}
