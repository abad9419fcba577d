//! The command lines of `modvisord` and `modvisorctl` (clap), shared with the generator of
//! man pages and shell completions (`examples/gen-docs.rs`). modvisord itself reads its three
//! options with [`daemon_argv`], checked against [`DaemonArgs`] by its tests.

pub mod daemon_argv;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// modvisord: supervisor for local AI inference engines.
#[derive(Parser)]
#[command(name = "modvisord", version, about)]
pub struct DaemonArgs {
    /// Daemon config file.
    #[arg(long, value_name = "FILE", default_value = crate::config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Serve on this D-Bus address instead of the system or embedded bus.
    #[arg(long, value_name = "ADDRESS", env = "MODVISOR_BUS_ADDRESS")]
    pub bus_address: Option<String>,
    /// Always use the embedded bus (RUNTIME/bus), even when a system bus exists.
    #[arg(long)]
    pub embedded_bus: bool,
}

#[derive(Parser)]
#[command(
    name = "modvisorctl",
    version,
    about = "Control modvisord, the supervisor for local AI inference engines"
)]
pub struct Cli {
    /// Print machine-readable JSON (read commands).
    #[arg(long, global = true)]
    pub json: bool,
    /// D-Bus address of the daemon's bus (default: system bus, else the embedded bus).
    #[arg(long, global = true, value_name = "ADDRESS")]
    pub bus_address: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Show all modules, or one module in detail.
    Status { name: Option<String> },
    /// List modules, one line each.
    List,
    /// Start a module.
    Start { name: String },
    /// Stop a module (waits until it is stopped).
    Stop { name: String },
    /// Restart a module.
    Restart { name: String },
    /// Re-read the manifests; prints manifest errors.
    Reload,
    /// Explain the mode decision of a module.
    Explain { name: String },
    /// Switch a module's active model (a transaction with rollback). MODEL is a path or a
    /// store reference (ollama:NAME:TAG, hf:ORG/REPO@REV:FILE, sha256:HEX).
    Activate {
        name: String,
        model: String,
        /// Pull the reference into the store first.
        #[arg(long)]
        pull: bool,
        /// Confirm a pull above models.confirm_above.
        #[arg(long)]
        yes: bool,
    },
    /// Pull a model into the store: ollama:NAME[:TAG], hf:ORG/REPO[@REV] or https://…/FILE#sha256=HEX.
    Pull {
        source: String,
        /// The sha256 of a URL source (instead of #sha256=).
        #[arg(long)]
        sha256: Option<String>,
        /// Files of an hf: repository to pull (glob; repeatable; default: all).
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Confirm a pull above models.confirm_above.
        #[arg(long)]
        yes: bool,
    },
    /// List the models in the store, with the modules using them.
    Models,
    /// Remove a model from the store (refused while a running module uses it).
    Rm {
        model: String,
        /// Remove it even while a running module uses it.
        #[arg(long)]
        force: bool,
    },
    /// Set or clear ("") the mode override of a module.
    Override { name: String, mode: String },
    /// Show a module's journal.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
        /// Number of lines to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
    },
    /// Check manifest files (or directories of them) without a daemon.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Follow module changes live.
    Watch,
    /// Export modules as a Kubernetes Deployment + Service or a standalone systemd unit,
    /// from their manifests (no daemon needed).
    Export {
        /// The module to export (required unless --all or --manifest).
        #[arg(required_unless_present_any = ["all", "manifest"], conflicts_with = "all")]
        name: Option<String>,
        /// Every valid module of the config's manifest directories.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Daemon config: its [paths] modules directories (precedence and masking as the
        /// daemon's) and state directory (for ${state_dir}).
        #[arg(long, value_name = "FILE", default_value = crate::config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Export the module of this manifest file instead of the config's directories.
        #[arg(long, value_name = "FILE", conflicts_with = "all")]
        manifest: Option<PathBuf>,
        /// The model to render ${model} and ${model_file} with (default: model.default).
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
        /// Write each export to DIR (NAME.yaml, modvisor-NAME.service) instead of stdout.
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
    },
}

/// What `modvisorctl export` writes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A Kubernetes Deployment and Service (YAML).
    Kube,
    /// A systemd service unit, modvisor-NAME.service.
    Systemd,
}
