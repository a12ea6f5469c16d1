//! `cargo xtask`: project automation (see `cargo xtask help`).
//!
//! This binary is light on purpose: `pki` and `mutants` build without the
//! AWS SDK. The commands that stand up the local world or need the tools'
//! CLI definitions (demo, world, bench, soak, dist, package) are handed to
//! `xtask-world` (xtask/world), which this process becomes (exec), so that
//! Ctrl-C and exit codes reach the user unchanged.

mod mutants;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

const HELP: &str = "\
cargo xtask COMMAND

Commands:
  pki --out DIR   write a local CA (DIR/CA.pem) and, for each role
                  (imageserver, image-unpacker, ami-publisher, image-builder),
                  DIR/ROLE/cert.pem and DIR/ROLE/key.pem
  demo            the main job on the local world: moto with two accounts and
                  three regions each, an unpacker per target; add a generated
                  disk image, publish it everywhere with ami-publisher, check
                  the bytes behind every AMI, publish a next leaf differing in
                  a few percent and show how few bytes moved; --store s3:
                  the imageserver keeps its images in the world's S3
  world           the local world (moto as EC2, two accounts, an unpacker per
                  target) kept up until Ctrl-C, with export lines for trying
                  ami-publisher by hand (docs/world.md); --regions R,R...
  dist [--out DIR] shell completions (bash, zsh, fish) and man pages for
                  ami-publisher, imagetool and unpacker-tool, generated
                  from their CLI definitions (default DIR: target/dist)
  package         one release build, then .deb and .rpm packages
                  (image-unpacker, imageserver, ami-fleet-tools), a .tar.zst
                  archive each and SHA256SUMS in target/packages; needs
                  cargo-deb and cargo-generate-rpm; --help for more
  bench           build release binaries, run the benchmarks and write the
                  figures to docs/benchmarks.md; --quick: smaller sizes;
                  --only publisher: just the publisher's 1 vs 24 targets;
                  --only imageserver-memory: peak RSS with 4, 16, 64 readers;
                  --only datapath: CPU seconds per GiB of unpack, get and
                  dd on pinned cores, the S3 store against the directory;
                  --only decode-fuzz: 100,000 cases per property test;
                  --only ebs-direct: bytes put by --via ebs-direct for a
                  2%-changed leaf of 1 GiB against a whole upload, and its
                  time against the unpacker's way;
                  --only soak: just the soak below
  soak            20 publishes of one stream to 6 targets under every fault
                  the world models (leaves that grow and shrink, one leaf
                  twice at once, a publisher killed mid-run), side by side
                  with the same steps fault-free; counts every resource
                  after each step and writes leaks, failures by cause and
                  the time ratio to docs/benchmarks.md; --steps N
  mutants         mutation testing (cargo-mutants) of the integrity-critical
                  modules; `cargo xtask mutants --help` for more
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("pki") => pki(&args[1..]),
        Some("demo" | "bench" | "soak" | "dist" | "package" | "world") => Err(world_tasks(&args)),
        Some("mutants") if args.iter().take_while(|a| *a != "--").any(|a| a == "--help" || a == "-h") => {
            println!("{}", mutants::USAGE);
            return ExitCode::SUCCESS;
        }
        Some("mutants") => mutants::run(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprint!("unknown command '{other}'\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_owned()
}

/// Build the workspace's binaries, xtask-world among them, and become
/// xtask-world (returns only if that fails).
///
/// The whole workspace, so that features resolve once, as in the tests, and
/// the binaries xtask-world starts are built with it. Not `cargo run`: that
/// would hand xtask-world the variables cargo sets for what it runs, and
/// xtask-world starts cargo itself.
fn world_tasks(args: &[String]) -> anyhow::Error {
    let built = without_run_vars(&mut Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())))
        .current_dir(root())
        .args(["build", "--workspace", "--bins"])
        .status();
    match built {
        Ok(s) if s.success() => {}
        Ok(s) => return anyhow::anyhow!("cargo build --workspace --bins failed ({s})"),
        Err(e) => return anyhow::anyhow!("running cargo build: {e}"),
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    let exe =
        std::path::absolute(target.join("debug/xtask-world")).unwrap_or_else(|_| target.join("debug/xtask-world"));
    let e = without_run_vars(&mut Command::new(&exe)).args(args).exec();
    anyhow::anyhow!("running {}: {e}", exe.display())
}

/// Leave out of a command's environment the variables that `cargo run` and
/// test harnesses set for the program they start (`CARGO_PKG_NAME`,
/// `CARGO_MANIFEST_DIR`...). A cargo started with them sees another
/// environment than a shell's, and build scripts that ask to rerun when one
/// changes (ring's) run again: the next build from a shell compiles the TLS
/// stack and all above it anew.
pub(crate) fn without_run_vars(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_run = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if set_by_cargo_run {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn pki(args: &[String]) -> anyhow::Result<()> {
    let out = match args {
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => anyhow::bail!("usage: cargo xtask pki --out DIR"),
    };
    fleet_pki::write_pki(&out)?;
    println!(
        "wrote {}/CA.pem and certificates for imageserver, image-unpacker, ami-publisher, image-builder",
        out.display()
    );
    Ok(())
}
