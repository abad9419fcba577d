//! Writes man pages (OUT/man/*.8, *.1) and shell completions (OUT/completions/) generated from
//! the clap definitions. Usage: cargo run --example gen-docs -- OUT
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use modvisor::cli::{Cli, DaemonArgs};

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/docs".into()),
    );
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    for (cmd, section) in [(DaemonArgs::command(), "8"), (Cli::command(), "1")] {
        let name = cmd.get_name().to_string();
        let page = clap_mangen::Man::new(cmd.clone()).section(section);
        let mut buf = Vec::new();
        page.render(&mut buf)?;
        std::fs::write(man.join(format!("{name}.{section}")), buf)?;
    }
    let mut ctl = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut ctl, "modvisorctl", &comp)?;
    }
    println!("{}", out.display());
    Ok(())
}
