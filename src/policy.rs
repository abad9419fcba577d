//! The mode decision: a pure function of the manifest, the daemon's policy, what the host can
//! do right now and the user's override. No I/O here: the caller measures availability.

use crate::manifest::{Mode, Module};

/// The policy part of the daemon config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default_mode: Mode,
    pub allowed_modes: Vec<Mode>,
    pub docker_enabled: bool,
    pub native_enabled: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_mode: Mode::Container,
            allowed_modes: vec![Mode::Container, Mode::Native],
            docker_enabled: true,
            native_enabled: true,
        }
    }
}

/// Whether each mode can run on this host now, for this module; `Err` holds why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub native: Result<(), String>,
    pub container: Result<(), String>,
}

impl Availability {
    fn of(&self, m: Mode) -> &Result<(), String> {
        match m {
            Mode::Native => &self.native,
            Mode::Container => &self.container,
        }
    }
}

/// The outcome: the mode to run (None: nothing possible) and the reason, for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub mode: Option<Mode>,
    pub reason: String,
    /// True when the module runs in a mode other than its first choice (health: degraded).
    pub fallback: bool,
}

/// Why policy forbids a mode for this module (rule 2), or Ok.
pub fn policy_allows(module: &Module, policy: &Policy, mode: Mode) -> Result<(), String> {
    if !policy.allowed_modes.contains(&mode) {
        return Err(format!("{mode} is not in the daemon's allowed_modes"));
    }
    match mode {
        Mode::Native if !module.trusted => {
            Err("native needs trusted = true in the manifest".into())
        }
        Mode::Native if !policy.native_enabled => {
            Err("native execution is disabled (native_enabled = false)".into())
        }
        Mode::Container if !policy.docker_enabled => {
            Err("containers are disabled (docker_enabled = false)".into())
        }
        _ => Ok(()),
    }
}

/// Rules 2 and 3 for one mode.
pub fn possible(
    module: &Module,
    policy: &Policy,
    avail: &Availability,
    mode: Mode,
) -> Result<(), String> {
    if !module.modes.contains(&mode) {
        return Err(format!(
            "the manifest does not list {mode} in runtime.modes"
        ));
    }
    policy_allows(module, policy, mode)?;
    avail
        .of(mode)
        .clone()
        .map_err(|e| format!("{mode} unavailable: {e}"))
}

/// Decides the mode, in the contract's order: the manifest's modes (preferred first), policy,
/// availability, the override; if the first choice is impossible, `default_mode`, then the
/// first possible mode.
pub fn decide(
    module: &Module,
    policy: &Policy,
    avail: &Availability,
    override_mode: Option<Mode>,
) -> Decision {
    let first = module.modes[0];
    if let Some(o) = override_mode {
        match possible(module, policy, avail, o) {
            Ok(()) => {
                return Decision {
                    mode: Some(o),
                    reason: format!("{o}: set by override"),
                    fallback: false,
                };
            }
            Err(why) => {
                let mut d = decide(module, policy, avail, None);
                d.reason = format!("{} (override {o} ignored: {why})", d.reason);
                return d;
            }
        }
    }
    let first_why = match possible(module, policy, avail, first) {
        Ok(()) => {
            let how = if module.preferred == Some(first) {
                "preferred by the manifest"
            } else if module.modes.len() == 1 {
                "the only mode of the module"
            } else {
                "first in runtime.modes"
            };
            return Decision {
                mode: Some(first),
                reason: format!("{first}: {how}"),
                fallback: false,
            };
        }
        Err(why) => why,
    };
    let d = policy.default_mode;
    if d != first && possible(module, policy, avail, d).is_ok() {
        return Decision {
            mode: Some(d),
            reason: format!("{d}: fallback to the daemon's default_mode, because {first_why}"),
            fallback: true,
        };
    }
    for &m in &module.modes[1..] {
        if possible(module, policy, avail, m).is_ok() {
            return Decision {
                mode: Some(m),
                reason: format!("{m}: fallback to the next possible mode, because {first_why}"),
                fallback: true,
            };
        }
    }
    let whys: Vec<String> = module
        .modes
        .iter()
        .map(|&m| possible(module, policy, avail, m).err().unwrap_or_default())
        .collect();
    Decision {
        mode: None,
        reason: format!("no mode possible: {}", whys.join("; ")),
        fallback: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifest;
    use std::path::Path;

    fn module(trusted: bool, modes: &str, preferred: Option<&str>) -> Module {
        let pref = preferred
            .map(|p| format!("preferred = \"{p}\"\n"))
            .unwrap_or_default();
        let src = format!(
            "trusted = {trusted}\n[runtime]\nmodes = {modes}\n{pref}[native]\ncommand = [\"/bin/true\"]\n[container]\nimage = \"x\"\n"
        );
        parse_manifest(Path::new("t.toml"), &src, "t").expect("valid")
    }

    fn ok() -> Result<(), String> {
        Ok(())
    }
    fn no(s: &str) -> Result<(), String> {
        Err(s.into())
    }

    /// One row per rule and fallback of the contract.
    #[test]
    fn decision_table() {
        let both = r#"["native", "container"]"#;
        let cont_first = r#"["container", "native"]"#;
        let p = Policy::default();
        let p_native_default = Policy {
            default_mode: Mode::Native,
            ..Policy::default()
        };
        let p_no_native = Policy {
            native_enabled: false,
            ..Policy::default()
        };
        let p_no_docker = Policy {
            docker_enabled: false,
            ..Policy::default()
        };
        let p_only_container = Policy {
            allowed_modes: vec![Mode::Container],
            ..Policy::default()
        };
        let all = Availability {
            native: ok(),
            container: ok(),
        };
        let no_engine = Availability {
            native: ok(),
            container: no("no container engine answers"),
        };
        let no_native = Availability {
            native: no("no native backend"),
            container: ok(),
        };
        let nothing = Availability {
            native: no("no native backend"),
            container: no("no container engine answers"),
        };
        type Row<'a> = (
            &'a str,
            Module,
            &'a Policy,
            &'a Availability,
            Option<Mode>,
            Option<Mode>,
            &'a str,
            bool,
        );
        let rows: Vec<Row> = vec![
            (
                "1: first listed mode",
                module(true, both, None),
                &p,
                &all,
                None,
                Some(Mode::Native),
                "native: first in runtime.modes",
                false,
            ),
            (
                "1: preferred goes first",
                module(true, both, Some("container")),
                &p,
                &all,
                None,
                Some(Mode::Container),
                "container: preferred by the manifest",
                false,
            ),
            (
                "1: only mode",
                module(true, r#"["native"]"#, None),
                &p,
                &all,
                None,
                Some(Mode::Native),
                "native: the only mode of the module",
                false,
            ),
            (
                "2: untrusted never native",
                module(false, both, Some("native")),
                &p,
                &all,
                None,
                Some(Mode::Container),
                "container: fallback to the daemon's default_mode, because native needs trusted = true in the manifest",
                true,
            ),
            (
                "2: untrusted native-only",
                module(false, r#"["native"]"#, None),
                &p,
                &all,
                None,
                None,
                "no mode possible: native needs trusted = true in the manifest",
                false,
            ),
            (
                "2: native disabled",
                module(true, both, None),
                &p_no_native,
                &all,
                None,
                Some(Mode::Container),
                "container: fallback to the daemon's default_mode, because native execution is disabled (native_enabled = false)",
                true,
            ),
            (
                "2: docker disabled",
                module(true, cont_first, None),
                &p_no_docker,
                &all,
                None,
                Some(Mode::Native),
                "native: fallback to the next possible mode, because containers are disabled (docker_enabled = false)",
                true,
            ),
            (
                "2: not in allowed_modes",
                module(true, both, None),
                &p_only_container,
                &all,
                None,
                Some(Mode::Container),
                "container: fallback to the daemon's default_mode, because native is not in the daemon's allowed_modes",
                true,
            ),
            (
                "3: no engine",
                module(true, cont_first, None),
                &p,
                &no_engine,
                None,
                Some(Mode::Native),
                "native: fallback to the next possible mode, because container unavailable: no container engine answers",
                true,
            ),
            (
                "3: no native backend",
                module(true, both, None),
                &p,
                &no_native,
                None,
                Some(Mode::Container),
                "container: fallback to the daemon's default_mode, because native unavailable: no native backend",
                true,
            ),
            (
                "3: nothing available",
                module(true, both, None),
                &p,
                &nothing,
                None,
                None,
                "no mode possible: native unavailable: no native backend; container unavailable: no container engine answers",
                false,
            ),
            (
                "4: override honoured",
                module(true, both, None),
                &p,
                &all,
                Some(Mode::Container),
                Some(Mode::Container),
                "container: set by override",
                false,
            ),
            (
                "4: override must pass policy",
                module(false, both, Some("container")),
                &p,
                &all,
                Some(Mode::Native),
                Some(Mode::Container),
                "container: preferred by the manifest (override native ignored: native needs trusted = true in the manifest)",
                false,
            ),
            (
                "4: override must pass availability",
                module(true, both, None),
                &p,
                &no_engine,
                Some(Mode::Container),
                Some(Mode::Native),
                "native: first in runtime.modes (override container ignored: container unavailable: no container engine answers)",
                false,
            ),
            (
                "4: override of unlisted mode",
                module(true, r#"["native"]"#, None),
                &p,
                &all,
                Some(Mode::Container),
                Some(Mode::Native),
                "native: the only mode of the module (override container ignored: the manifest does not list container in runtime.modes)",
                false,
            ),
            (
                "fallback: default_mode before list order",
                module(true, r#"["container", "native"]"#, None),
                &p_native_default,
                &no_engine,
                None,
                Some(Mode::Native),
                "native: fallback to the daemon's default_mode, because container unavailable: no container engine answers",
                true,
            ),
        ];
        for (what, m, pol, av, ov, want_mode, want_reason, want_fb) in rows {
            let d = decide(&m, pol, av, ov);
            assert_eq!(d.mode, want_mode, "{what}: {}", d.reason);
            assert_eq!(d.reason, want_reason, "{what}");
            assert_eq!(d.fallback, want_fb, "{what}");
        }
    }
}
