//! A module as a standalone `modvisor-NAME.service`, for a machine with systemd but without
//! modvisor: the same settings modvisord gives the module's transient unit
//! (`runtime/systemd.rs`, `transient_properties`), written as unit-file directives.
//!
//! [`MIRRORED`] lists every transient-unit property and the directive it becomes; a test reads
//! `transient_properties` and fails when modvisord sets a property this file does not write.
//! Identity, sandbox and secrets come from the one function that sets them on transient units
//! (`runtime::systemd::sandbox::properties`), converted to directives.

use std::path::Path;
use std::time::Duration;

use super::ExportError;
use crate::manifest::{Exec, Mode, Module, NativeExec};

/// (transient-unit D-Bus property, unit-file directive it is written as).
pub const MIRRORED: &[(&str, &str)] = &[
    ("Description", "Description"),
    ("ExecStart", "ExecStart"),
    ("Environment", "Environment"),
    ("LimitCORE", "LimitCORE"),
    ("LimitCORESoft", "LimitCORE"),
    ("KillMode", "KillMode"),
    ("Restart", "Restart"),
    ("RestartUSec", "RestartSec"),
    ("RestartPreventExitStatus", "RestartPreventExitStatus"),
    ("StartLimitBurst", "StartLimitBurst"),
    ("StartLimitIntervalUSec", "StartLimitIntervalSec"),
    ("TimeoutStopUSec", "TimeoutStopSec"),
    ("SyslogIdentifier", "SyslogIdentifier"),
    ("LogExtraFields", "LogExtraFields"),
    ("StandardOutput", "StandardOutput"),
    ("StandardError", "StandardError"),
    ("MemoryMax", "MemoryMax"),
    ("WorkingDirectory", "WorkingDirectory"),
];

/// The unit modvisord would create for the module (the same name, so journal lookups such as
/// `modvisorctl logs` and `_SYSTEMD_UNIT=` filters keep working).
pub fn unit_file_name(module: &str) -> String {
    crate::runtime::systemd::unit_name(module)
}

/// What the unit runs: the rendered native command (argv, environment, directory, user).
type Command = (
    Vec<String>,
    std::collections::BTreeMap<String, String>,
    Option<std::path::PathBuf>,
    Option<String>,
);

fn native_command(
    m: &Module,
    state_dir: &Path,
    model: Option<&Path>,
) -> Result<Command, ExportError> {
    if !m.modes.contains(&Mode::Native) {
        return Err(ExportError::NotExportable(format!(
            "module {} runs only in a container (runtime.modes = [\"container\"]): a unit has nothing to run; use --format kube",
            m.name
        )));
    }
    if !m.trusted {
        return Err(ExportError::NotExportable(format!(
            "module {} is not trusted (trusted = false): modvisord never runs it natively, so it is not exported as a unit",
            m.name
        )));
    }
    match m.render(Mode::Native, state_dir, model).map(|mut e| {
        e.place_gpus(&[]);
        e
    }) {
        Some(Exec::Native(NativeExec::Command {
            argv,
            environment,
            working_directory,
            privileges,
        })) => {
            // As modvisord runs it: the engine user unless the manifest names another.
            let user = privileges
                .user
                .clone()
                .or_else(|| Some(crate::manifest::DEFAULT_ENGINE_USER.to_string()));
            Ok((argv, environment, working_directory, user))
        }
        Some(Exec::Native(NativeExec::Unit(u))) => Err(ExportError::NotExportable(format!(
            "module {} supervises the existing unit {u}: there is nothing to export, that unit is already one",
            m.name
        ))),
        _ => Err(ExportError::NotExportable(format!(
            "module {} has no [native] command",
            m.name
        ))),
    }
}

/// The unit file's text.
pub fn render(m: &Module, state_dir: &Path, model: Option<&Path>) -> Result<String, ExportError> {
    let (argv, environment, working_directory, user) = native_command(m, state_dir, model)?;
    let mut u = Unit::default();
    u.header(m, model);
    u.section("Unit");
    u.set("Description", &description(m));
    // Measured on systemd 252: StartLimitBurst=N allows N automatic restarts, as modvisord relies on.
    u.set("StartLimitBurst", &m.restart.max.to_string());
    u.set("StartLimitIntervalSec", &timespan(m.restart.window));
    u.section("Service");
    u.set("Type", "simple");
    let words: Vec<String> = argv.iter().map(|a| exec_word(a)).collect();
    u.set("ExecStart", &words.join(" "));
    for (k, v) in environment.iter() {
        u.set("Environment", &env_assignment(k, v));
    }
    u.set("Environment", &env_assignment("MODVISOR_MODULE", &m.name));
    if let Some(w) = working_directory {
        u.set(
            "WorkingDirectory",
            &w.display().to_string().replace('%', "%%"),
        );
    }
    if let NativeOrNone::Privileges(p) = privileges_of(m) {
        sandbox_directives(&mut u, &p, state_dir);
    } else if let Some(user) = user {
        u.set("User", &user);
    }
    u.comment("No core dumps of engines holding gigabytes of weights (soft and hard limit).");
    u.set("LimitCORE", "0");
    u.comment("Stopping stops everything the engine forked.");
    u.set("KillMode", "control-group");
    u.set("Restart", m.restart.policy.as_str());
    u.set("RestartSec", &timespan(m.restart.delay));
    u.comment("126/127: the command could not run; restarting cannot help.");
    u.set("RestartPreventExitStatus", "126 127");
    u.set("TimeoutStopSec", &timespan(m.stop_timeout));
    if let Some(max) = m.resources.memory_max {
        u.set("MemoryMax", &max.to_string());
    }
    u.set("SyslogIdentifier", &m.name);
    u.set("LogExtraFields", &format!("MODVISOR_MODULE={}", m.name));
    u.set("StandardOutput", "journal");
    u.set("StandardError", "journal");
    u.section("Install");
    u.set("WantedBy", "multi-user.target");
    Ok(u.text)
}

#[derive(Default)]
struct Unit {
    text: String,
}

impl Unit {
    fn header(&mut self, m: &Module, model: Option<&Path>) {
        let name = unit_file_name(&m.name);
        self.comment(&format!(
            "{name}: module {} exported by `modvisorctl export --format systemd` from {},",
            m.name,
            m.source.display()
        ));
        self.comment("with the settings modvisord gives its transient unit. Install it with:");
        self.comment(&format!(
            "  cp {name} /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now {name}"
        ));
        if let Some(p) = model {
            self.comment(&format!("Model: {}", p.display()));
        }
        self.comment(
            "Not here: health probes and RAM/VRAM thresholds (modvisord's own); systemd restarts on exit only.",
        );
    }
    fn comment(&mut self, c: &str) {
        self.text.push_str("# ");
        self.text.push_str(c);
        self.text.push('\n');
    }
    fn section(&mut self, s: &str) {
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        self.text.push_str(&format!("[{s}]\n"));
    }
    fn set(&mut self, k: &str, v: &str) {
        self.text.push_str(&format!("{k}={v}\n"));
    }
}

/// `modvisor module NAME: DESCRIPTION`, as the transient unit's. `%` is a specifier, and a
/// trailing backslash would continue the line: neither may reach the file as it is.
fn description(m: &Module) -> String {
    let d = if m.description.is_empty() {
        format!("modvisor module {}", m.name)
    } else {
        format!("modvisor module {}: {}", m.name, m.description)
    };
    d.trim_end_matches('\\').trim_end().replace('%', "%%")
}

/// A duration in systemd's time syntax, exact: "2s", "500ms", "1500us", "0".
pub fn timespan(d: Duration) -> String {
    if d.is_zero() {
        "0".into()
    } else if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros().max(1))
    }
}

/// One word of `ExecStart=`: `%` and `$` doubled (systemd expands specifiers and `$VAR`; the
/// engine must get the argv the manifest wrote, as modvisord's `$$` escaping ensures), quoted
/// with C escapes when it holds a blank, a quote, a backslash or `;`, or is empty.
pub fn exec_word(a: &str) -> String {
    let a = a.replace('%', "%%").replace('$', "$$");
    let plain = !a.is_empty()
        && a.chars()
            .all(|c| !c.is_whitespace() && !"\"'\\;".contains(c));
    if plain { a } else { quoted(&a) }
}

/// One `Environment=` assignment: quoted, `%` doubled (no `$` expansion happens there).
pub fn env_assignment(k: &str, v: &str) -> String {
    quoted(&format!("{k}={v}").replace('%', "%%"))
}

/// Double-quoted with C escapes for `\` and `"` (specifiers are the caller's to escape).
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

enum NativeOrNone {
    Privileges(Box<crate::manifest::Privileges>),
    None,
}

fn privileges_of(m: &Module) -> NativeOrNone {
    match &m.native {
        Some(NativeExec::Command { privileges, .. }) => {
            NativeOrNone::Privileges(Box::new(privileges.clone()))
        }
        _ => NativeOrNone::None,
    }
}

/// Identity, sandbox and secrets exactly as modvisord sets them on its transient unit under a
/// system manager (`runtime::systemd::sandbox::properties`), written as unit-file directives.
fn sandbox_directives(u: &mut Unit, p: &crate::manifest::Privileges, state_dir: &Path) {
    use crate::runtime::systemd::sandbox::{self, Host, ManagerKind};
    let mgr = ManagerKind {
        system: true,
        uid: 0,
    };
    let host = Host {
        nvidia_devices: if p.gpu {
            sandbox::nvidia_devices()
        } else {
            Vec::new()
        },
        gpu_groups: if p.gpu {
            vec!["video".into(), "render".into()]
        } else {
            Vec::new()
        },
    };
    u.comment("The engine's identity and sandbox, as modvisord sets them on its transient unit.");
    for (name, value) in sandbox::properties(p, mgr, state_dir, &host) {
        let Some(v) = value else { continue };
        for line in directive_values(name, &v) {
            u.set(directive_name(name), &line);
        }
    }
}

fn directive_name(property: &str) -> &str {
    match property {
        "EnvironmentFiles" => "EnvironmentFile",
        p => p,
    }
}

/// The unit-file value(s) of one transient-unit property.
fn directive_values(name: &str, v: &zbus::OwnedVariant) -> Vec<String> {
    use zbus::Variant as Value;
    match &**v {
        Value::Bool(b) => vec![if *b { "yes" } else { "no" }.to_string()],
        Value::Str(s) => vec![s.to_string()],
        // CapabilityBoundingSet=0 as a mask is the empty set.
        Value::U64(0) if name == "CapabilityBoundingSet" => vec![String::new()],
        Value::U64(n) => vec![n.to_string()],
        Value::Array(a) => a
            .iter()
            .map(|item| match item {
                Value::Str(s) => s.to_string(),
                Value::Structure(st) => {
                    let f = st.fields();
                    let text = |x: &Value<'_>| match x {
                        Value::Str(s) => s.to_string(),
                        Value::Bool(b) => b.to_string(),
                        other => format!("{other:?}"),
                    };
                    match (name, f.first(), f.get(1)) {
                        ("DeviceAllow", Some(a), Some(b)) => format!("{} {}", text(a), text(b)),
                        ("LoadCredential", Some(a), Some(b)) => format!("{}:{}", text(a), text(b)),
                        // (path, ignore errors)
                        ("EnvironmentFiles", Some(a), Some(Value::Bool(true))) => {
                            format!("-{}", text(a))
                        }
                        (_, Some(a), _) => text(a),
                        _ => String::new(),
                    }
                }
                other => format!("{other:?}"),
            })
            .collect(),
        other => vec![format!("{other:?}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_manifest;

    fn module(src: &str) -> Module {
        parse_manifest(Path::new("/etc/modvisor/modules.d/x.toml"), src, "x").expect("valid")
    }

    fn unit(src: &str) -> String {
        let m = module(src);
        render(&m, Path::new("/var/lib/modvisor/modules/x"), None).expect("exportable")
    }

    const FULL: &str = r#"
description = "50% of a GPU"
trusted = true
[runtime]
stop_timeout = "1500ms"
[native]
command = ["/usr/bin/engine", "--name", "${name}", "--state", "${state_dir}", "two words", "$HOME", "100%", "a\"b", "c\\d", ";", ""]
environment = { B = "x y", A = "$NOT_EXPANDED %h \"q\"" }
working_directory = "${state_dir}/work"
user = "engine"
[resources]
memory_max = "512M"
[restart]
policy = "always"
delay = "250ms"
max = 3
window = "1m"
"#;

    #[test]
    fn every_transient_unit_setting_is_a_directive() {
        let u = unit(FULL);
        for line in [
            "Description=modvisor module x: 50%% of a GPU",
            "StartLimitBurst=3",
            "StartLimitIntervalSec=60s",
            r#"ExecStart=/usr/bin/engine --name x --state /var/lib/modvisor/modules/x "two words" $$HOME 100%% "a\"b" "c\\d" ";" """#,
            r#"Environment="A=$NOT_EXPANDED %%h \"q\"""#,
            r#"Environment="B=x y""#,
            r#"Environment="MODVISOR_MODULE=x""#,
            "WorkingDirectory=/var/lib/modvisor/modules/x/work",
            "User=engine",
            "LimitCORE=0",
            "KillMode=control-group",
            "Restart=always",
            "RestartSec=250ms",
            "RestartPreventExitStatus=126 127",
            "TimeoutStopSec=1500ms",
            "MemoryMax=536870912",
            "SyslogIdentifier=x",
            "LogExtraFields=MODVISOR_MODULE=x",
            "StandardOutput=journal",
            "StandardError=journal",
            "WantedBy=multi-user.target",
        ] {
            assert!(u.lines().any(|l| l == line), "{line} in\n{u}");
        }
        assert_eq!(u, unit(FULL), "deterministic");
    }

    #[test]
    fn a_directive_for_every_property_modvisord_sets() {
        // The transient unit's properties, read from the function that sets them: a property
        // added there (sandboxing, ...) without a mapping here fails this test.
        let src = include_str!("../runtime/systemd.rs");
        let body = src
            .split("fn transient_properties")
            .nth(1)
            .and_then(|b| b.split("\n    }\n").next())
            .expect("transient_properties in runtime/systemd.rs");
        // Every `("Name", value)` tuple, on one line or several.
        let mut props = Vec::new();
        let quoted: Vec<&str> = body.split('"').collect();
        for i in (1..quoted.len()).step_by(2) {
            let name = quoted[i];
            let before = quoted[i - 1].trim_end();
            let after = quoted.get(i + 1).copied().unwrap_or("");
            if before.ends_with('(')
                && after.starts_with(',')
                && name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric())
            {
                props.push(name.to_string());
            }
        }
        for (p, _) in MIRRORED {
            assert!(
                props.iter().any(|q| q == p),
                "{p} is exported but no longer set on transient units: {props:?}"
            );
        }
        let u = unit(FULL);
        for p in &props {
            let directive = MIRRORED
                .iter()
                .find(|(d, _)| d == p)
                .map(|(_, f)| *f)
                .unwrap_or_else(|| panic!("{p} is set on transient units but not exported"));
            assert!(
                u.lines().any(|l| l.starts_with(&format!("{directive}="))),
                "{directive}= (for {p}) in\n{u}"
            );
        }
    }

    #[test]
    fn what_cannot_be_a_unit_says_why() {
        let why = |src: &str| {
            render(&module(src), Path::new("/s"), None)
                .expect_err("not exportable")
                .to_string()
        };
        let e = why("[container]\nimage = \"i\"\n");
        assert!(e.contains("runs only in a container"), "{e}");
        let e = why("[native]\ncommand = [\"/bin/true\"]\n");
        assert!(e.contains("not trusted"), "{e}");
        let e = why("trusted = true\n[native]\nunit = \"ollama.service\"\n");
        assert!(e.contains("existing unit ollama.service"), "{e}");
    }

    #[test]
    fn timespans_are_exact() {
        assert_eq!(timespan(Duration::from_secs(600)), "600s");
        assert_eq!(timespan(Duration::from_millis(200)), "200ms");
        assert_eq!(timespan(Duration::from_micros(1500)), "1500us");
        assert_eq!(timespan(Duration::ZERO), "0");
    }

    #[test]
    fn exec_words() {
        assert_eq!(exec_word("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(exec_word("${x}"), "$${x}");
        assert_eq!(exec_word("it's"), r#""it's""#);
        assert_eq!(exec_word("tab\there"), "\"tab\there\"");
        assert_eq!(env_assignment("K", r"a\b"), r#""K=a\\b""#);
    }
}
