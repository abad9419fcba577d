//! D-Bus strings may not contain NUL: a message carrying one is invalid, and the bus
//! disconnects whoever sends it (modvisord would lose the bus). Text that comes from outside
//! (manifests, engines' output, error messages quoting either) passes through [`clean`] on its
//! way onto the bus.

/// `s` with every NUL replaced by U+FFFD (the replacement character).
pub fn clean(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character() {
        assert_eq!(clean("a\0b\0"), "a\u{fffd}b\u{fffd}");
        assert_eq!(clean("plain"), "plain");
    }
}
