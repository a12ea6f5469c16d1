//! `cargo xtask dist`: shell completions and man pages for ami-publisher,
//! generated from the same clap definition the binary parses with.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::CommandFactory as _;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let out = match args {
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        [] => crate::util::root().join("target/dist"),
        _ => anyhow::bail!("usage: cargo xtask dist [--out DIR]"),
    };
    let completions = out.join("completions");
    let man = out.join("man");
    std::fs::create_dir_all(&completions)?;
    std::fs::create_dir_all(&man)?;
    let mut cmd = ami_publisher::cli::Cli::command();
    cmd.build();
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "ami-publisher", &completions)
            .with_context(|| format!("writing {shell} completions"))?;
        println!("wrote {}", path.display());
    }
    // One page for the command, one per subcommand (ami-publisher-publish.1, ...).
    clap_mangen::generate_to(cmd, &man).context("writing man pages")?;
    let pages = std::fs::read_dir(&man)?.count();
    println!("wrote {pages} man pages in {}", man.display());
    Ok(())
}
