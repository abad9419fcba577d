//! modvisord's command line, read without clap. The daemon has three options and reads them
//! once; clap's parser, help and error rendering were ~160 KiB of code, most of it resident in
//! every modvisord for that one call. [`super::DaemonArgs`] stays the definition the man page
//! and the completions are made from, and the tests below hold this reader to it: the same
//! results for the same command lines (errors included), and the same help text.

use std::ffi::OsString;
use std::path::PathBuf;

/// The variable `--bus-address` is read from when it is not given.
pub const BUS_ADDRESS_ENV: &str = "MODVISOR_BUS_ADDRESS";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Run(Args),
    Help,
    Version,
}

/// The daemon's options (the fields of [`super::DaemonArgs`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: PathBuf,
    pub bus_address: Option<String>,
    pub embedded_bus: bool,
}

/// A command line refused: what is wrong with it, worded as clap words it.
#[derive(Debug, PartialEq, Eq)]
pub struct ArgError(pub String);

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "error: {}\n\nUsage: modvisord [OPTIONS]\n\nFor more information, try '--help'.",
            self.0
        )
    }
}

const CONFIG: &str = "--config <FILE>";
const BUS: &str = "--bus-address <ADDRESS>";

/// Reads the arguments after the program's name; `env` is the value of [`BUS_ADDRESS_ENV`].
/// Like clap: an option at most once, `--opt VALUE` or `--opt=VALUE`, a value never starting
/// with `-` (but `-` itself), `--` ends the options, help and version win over what follows.
pub fn parse(
    argv: impl IntoIterator<Item = OsString>,
    env: Option<OsString>,
) -> Result<Request, ArgError> {
    let mut config: Option<PathBuf> = None;
    let mut bus: Option<String> = None;
    let mut embedded = false;
    let mut argv = argv.into_iter().peekable();
    let mut options_end = false;
    while let Some(arg) = argv.next() {
        let text = arg.to_string_lossy().into_owned();
        if options_end || !text.starts_with('-') || text == "-" {
            return Err(unexpected(&text));
        }
        let (name, inline) = split_inline(&arg);
        match name.as_str() {
            "--" => options_end = true,
            "-h" | "--help" => return Ok(Request::Help),
            "-V" | "--version" => return Ok(Request::Version),
            "--embedded-bus" => {
                if let Some(v) = inline {
                    return Err(ArgError(format!(
                        "unexpected value '{}' for '--embedded-bus' found; no more were expected",
                        v.to_string_lossy()
                    )));
                }
                once(embedded, "--embedded-bus")?;
                embedded = true;
            }
            "--config" => {
                once(config.is_some(), CONFIG)?;
                // A path may not be empty (clap's PathBuf parser).
                let v = take_value(inline, &mut argv).filter(|v| !v.is_empty());
                config = Some(v.ok_or_else(|| no_value(CONFIG))?.into());
            }
            "--bus-address" => {
                once(bus.is_some(), BUS)?;
                let v = take_value(inline, &mut argv).ok_or_else(|| no_value(BUS))?;
                bus = Some(utf8(v, BUS)?);
            }
            _ => return Err(unexpected(&text)),
        }
    }
    // Set, even empty, the variable counts (as with clap).
    let bus = match (bus, env) {
        (Some(b), _) => Some(b),
        (None, Some(e)) => Some(utf8(e, BUS)?),
        (None, None) => None,
    };
    Ok(Request::Run(Args {
        config: config.unwrap_or_else(|| crate::config::DEFAULT_CONFIG.into()),
        bus_address: bus,
        embedded_bus: embedded,
    }))
}

/// `--name=value` into the name and the value (its bytes kept: a path need not be UTF-8);
/// anything else is all name.
fn split_inline(arg: &OsString) -> (String, Option<OsString>) {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(i) if bytes.starts_with(b"--") && i > 2 => (
            String::from_utf8_lossy(&bytes[..i]).into_owned(),
            Some(OsString::from_vec(bytes[i + 1..].to_vec())),
        ),
        _ => (arg.to_string_lossy().into_owned(), None),
    }
}

/// The option's value: given inline (`--opt=` gives an empty one), else the next argument
/// unless it is an option.
fn take_value(
    inline: Option<OsString>,
    argv: &mut std::iter::Peekable<impl Iterator<Item = OsString>>,
) -> Option<OsString> {
    match inline {
        Some(v) => Some(v),
        None => match argv.peek() {
            Some(next) if next == "-" || !next.to_string_lossy().starts_with('-') => argv.next(),
            _ => None,
        },
    }
}

fn no_value(option: &str) -> ArgError {
    ArgError(format!(
        "a value is required for '{option}' but none was supplied"
    ))
}

fn once(seen: bool, option: &str) -> Result<(), ArgError> {
    if seen {
        return Err(ArgError(format!(
            "the argument '{option}' cannot be used multiple times"
        )));
    }
    Ok(())
}

fn utf8(v: OsString, option: &str) -> Result<String, ArgError> {
    v.into_string()
        .map_err(|_| ArgError(format!("invalid UTF-8 was detected in '{option}'")))
}

fn unexpected(arg: &str) -> ArgError {
    ArgError(format!("unexpected argument '{arg}' found"))
}

/// `modvisord --version`.
pub fn version() -> String {
    format!("modvisord {}", env!("CARGO_PKG_VERSION"))
}

/// `modvisord --help`: clap's layout of [`super::DaemonArgs`], `env` the variable's value.
pub fn help(env: Option<&str>) -> String {
    let env = env.unwrap_or("");
    format!(
        "{about}

Usage: modvisord [OPTIONS]

Options:
      --config <FILE>          Daemon config file [default: {config}]
      --bus-address <ADDRESS>  Serve on this D-Bus address instead of the system or embedded bus [env: {BUS_ADDRESS_ENV}={env}]
      --embedded-bus           Always use the embedded bus (RUNTIME/bus), even when a system bus exists
  -h, --help                   Print help
  -V, --version                Print version
",
        about = env!("CARGO_PKG_DESCRIPTION"),
        config = crate::config::DEFAULT_CONFIG,
    )
}

#[cfg(test)]
mod tests;
