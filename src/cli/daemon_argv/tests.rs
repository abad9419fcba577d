//! The reader is held to clap's reading of [`DaemonArgs`], the definition the man page is made
//! from: the same options, the same results, the same refusals, the same help.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::{CommandFactory, FromArgMatches};

use super::*;
use crate::cli::DaemonArgs;

/// A variable nobody sets, for "the environment does not name a bus".
const UNSET: &str = "MODVISOR_TEST_DAEMON_ARGV_NEVER_SET";

/// clap's reading of `argv` with `--bus-address` taken from the variable `var`.
fn by_clap(argv: &[OsString], var: &'static str) -> Result<Request, clap::error::ErrorKind> {
    let cmd = DaemonArgs::command().mut_arg("bus_address", |a| a.env(var));
    let all = std::iter::once(OsString::from("modvisord")).chain(argv.iter().cloned());
    match cmd.try_get_matches_from(all) {
        Ok(m) => {
            let a = DaemonArgs::from_arg_matches(&m).map_err(|e| e.kind())?;
            Ok(Request::Run(Args {
                config: a.config,
                bus_address: a.bus_address,
                embedded_bus: a.embedded_bus,
            }))
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => Ok(Request::Help),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayVersion => Ok(Request::Version),
        Err(e) => Err(e.kind()),
    }
}

fn mine(argv: &[OsString], var: &'static str) -> Result<Request, ArgError> {
    parse(argv.iter().cloned(), std::env::var_os(var))
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

const LINES: &[&[&str]] = &[
    &[],
    &["--config", "/etc/x.toml"],
    &["--config=/etc/x.toml"],
    &["--config", "-"],
    &["--config", "a=b"],
    &["--config=a=b"],
    &["--bus-address", "unix:path=/run/b"],
    &["--bus-address=unix:path=/run/b"],
    &["--bus-address", ""],
    &["--bus-address="],
    &["--embedded-bus"],
    &["--embedded-bus", "--config", "c", "--bus-address", "b"],
    &["--bus-address", "b", "--embedded-bus", "--config=c"],
    &["--"],
    &["--embedded-bus", "--"],
    &["--help"],
    &["-h"],
    &["--version"],
    &["-V"],
    &["--help", "--bogus"],
    &["-V", "--config"],
    &["--embedded-bus", "--help"],
    // Refused.
    &["--config"],
    &["--config="],
    &["--config", ""],
    &["--config", "a", "--config", "b"],
    &["--config", "--embedded-bus"],
    &["--bus-address"],
    &["--bus-address", "--embedded-bus"],
    &["--embedded-bus", "--embedded-bus"],
    &["--embedded-bus=yes"],
    &["--embedded-bus="],
    &["--bogus"],
    &["--bogus", "--help"],
    &["--conf", "x"],
    &["-x"],
    &["x"],
    &["-"],
    &["--", "x"],
    &["--", "--config", "c"],
];

#[test]
fn reads_every_command_line_as_clap_reads_daemon_args() {
    for var in [UNSET, "PATH"] {
        for line in LINES {
            let argv = os(line);
            let (clap, ours) = (by_clap(&argv, var), mine(&argv, var));
            match (&clap, &ours) {
                (Ok(c), Ok(o)) => assert_eq!(c, o, "{line:?} with {var}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{line:?} with {var}: clap {clap:?}, this reader {ours:?}"),
            }
        }
    }
}

#[test]
fn a_path_need_not_be_utf8_an_address_must_be() {
    let path = OsString::from_vec(b"/etc/\xffx.toml".to_vec());
    let mut inline = b"--config=".to_vec();
    inline.extend_from_slice(path.as_encoded_bytes());
    for argv in [
        vec![OsString::from("--config"), path.clone()],
        vec![OsString::from_vec(inline)],
    ] {
        assert_eq!(by_clap(&argv, UNSET).ok(), mine(&argv, UNSET).ok());
        match mine(&argv, UNSET) {
            Ok(Request::Run(a)) => assert_eq!(a.config, std::path::PathBuf::from(&path)),
            other => panic!("{other:?}"),
        }
    }
    let bad = vec![OsString::from("--bus-address"), path.clone()];
    assert!(by_clap(&bad, UNSET).is_err());
    assert_eq!(
        mine(&bad, UNSET),
        Err(ArgError(
            "invalid UTF-8 was detected in '--bus-address <ADDRESS>'".into()
        ))
    );
    // An option name that is not UTF-8 is refused, not cut in the middle of a character.
    let odd = vec![OsString::from_vec(b"--c\xffonfig=x".to_vec())];
    assert!(by_clap(&odd, UNSET).is_err());
    assert!(mine(&odd, UNSET).is_err());
}

#[test]
fn the_variable_names_the_bus_even_when_empty_and_the_option_wins() {
    let run = |argv: &[&str], env: Option<&str>| parse(os(argv), env.map(OsString::from));
    let bus = |b: Option<&str>| {
        Ok(Request::Run(Args {
            config: crate::config::DEFAULT_CONFIG.into(),
            bus_address: b.map(String::from),
            embedded_bus: false,
        }))
    };
    assert_eq!(run(&[], Some("unix:path=/e")), bus(Some("unix:path=/e")));
    assert_eq!(run(&[], Some("")), bus(Some("")));
    assert_eq!(run(&[], None), bus(None));
    assert_eq!(
        run(&["--bus-address", "unix:path=/o"], Some("unix:path=/e")),
        bus(Some("unix:path=/o"))
    );
}

#[test]
fn help_and_version_are_claps_and_refusals_say_what_clap_says() {
    for var in [UNSET, "PATH"] {
        let value = std::env::var("PATH").ok().filter(|_| var == "PATH");
        let cmd = DaemonArgs::command().mut_arg("bus_address", |a| a.env(var));
        let clap_help = cmd.clone().render_help().to_string();
        let ours = help(value.as_deref()).replace(BUS_ADDRESS_ENV, var);
        assert_eq!(ours, clap_help, "with {var}");
        assert_eq!(version(), cmd.render_version().trim_end());
    }
    let refused = |line: &[&str]| match mine(&os(line), UNSET) {
        Err(e) => e.0,
        Ok(r) => panic!("{line:?} was read as {r:?}"),
    };
    assert_eq!(
        refused(&["--config", "a", "--config", "b"]),
        "the argument '--config <FILE>' cannot be used multiple times"
    );
    assert_eq!(
        refused(&["--bus-address"]),
        "a value is required for '--bus-address <ADDRESS>' but none was supplied"
    );
    assert_eq!(refused(&["x"]), "unexpected argument 'x' found");
    assert_eq!(
        refused(&["--embedded-bus=yes"]),
        "unexpected value 'yes' for '--embedded-bus' found; no more were expected"
    );
    let shown = ArgError("unexpected argument 'x' found".into()).to_string();
    assert_eq!(
        shown,
        "error: unexpected argument 'x' found\n\nUsage: modvisord [OPTIONS]\n\nFor more information, try '--help'."
    );
}
