//! `cargo xtask dist`: shell completions and man pages for the tools
//! (ami-publisher, imagetool, unpacker-tool), generated from the same clap
//! definitions their binaries parse with. `cargo xtask package` puts them
//! into the ami-fleet-tools package.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;

/// The tools and their command lines, by binary name.
pub(crate) fn tools() -> [(&'static str, clap::Command); 3] {
    [
        ("ami-publisher", ami_publisher::cli::Cli::command()),
        ("imagetool", imagetool::cli::Cli::command()),
        ("unpacker-tool", unpacker_tool::cli::Cli::command()),
    ]
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let out = match args {
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        [] => crate::util::root().join("target/dist"),
        _ => anyhow::bail!("usage: cargo xtask dist [--out DIR]"),
    };
    let (completions, pages) = generate(&out)?;
    println!("wrote {completions} completion scripts in {}", out.join("completions").display());
    println!("wrote {pages} man pages in {}", out.join("man").display());
    Ok(())
}

/// Write `OUT/completions/` (bash: `NAME.bash`, zsh: `_NAME`, fish:
/// `NAME.fish`) and `OUT/man/` (`NAME.1` and one page per subcommand,
/// `NAME-SUB.1`), replacing what was there. Returns how many completion
/// scripts and man pages it wrote.
pub(crate) fn generate(out: &Path) -> anyhow::Result<(usize, usize)> {
    let completions = out.join("completions");
    let man = out.join("man");
    for dir in [&completions, &man] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (name, mut cmd) in tools() {
        cmd.build();
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            clap_complete::generate_to(shell, &mut cmd, name, &completions)
                .with_context(|| format!("writing {shell} completions of {name}"))?;
        }
    }
    // No pages for clap's `help` subcommand: it only repeats --help.
    for (name, cmd) in tools() {
        clap_mangen::generate_to(cmd.disable_help_subcommand(true), &man)
            .with_context(|| format!("writing the man pages of {name}"))?;
    }
    let count = |dir: &Path| std::fs::read_dir(dir).map(Iterator::count);
    Ok((count(&completions)?, count(&man)?))
}
