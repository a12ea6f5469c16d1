//! `cargo xtask mutants`: mutation testing (cargo-mutants) of the modules
//! that guard integrity: does the test suite notice when a check in them is
//! changed? Also keeps its section of docs/benchmarks.md through `cargo
//! xtask bench`.
//!
//! Each module gets its own cargo-mutants run, and each mutant is tested
//! with the tests of the packages that exercise that module (its own, and
//! for the rights check and the chunk store the imageserver's, which use
//! them through real RPCs over TLS), so nothing here builds the AWS SDK. Builds go to `target/mutants/build`,
//! kept between runs and shared by the modules, so dependencies are built
//! once.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

/// An integrity-critical module and the packages whose tests exercise it.
struct Module {
    name: &'static str,
    package: &'static str,
    file: &'static str,
    tested_by: &'static [&'static str],
}

const MODULES: &[Module] = &[
    Module {
        name: "manifest",
        package: "image-format",
        file: "crates/image-format/src/manifest.rs",
        tested_by: &["image-format"],
    },
    Module {
        name: "chunk-store",
        package: "chunk-store",
        file: "crates/chunk-store/src/lib.rs",
        tested_by: &["chunk-store", "imageserver"],
    },
    Module {
        name: "records",
        package: "chunk-store",
        file: "crates/chunk-store/src/record.rs",
        tested_by: &["chunk-store", "imageserver"],
    },
    Module {
        name: "engine",
        package: "image-unpacker",
        file: "crates/image-unpacker/src/engine.rs",
        tested_by: &["image-unpacker"],
    },
    Module {
        name: "blockdev",
        package: "image-unpacker",
        file: "crates/image-unpacker/src/blockdev.rs",
        tested_by: &["image-unpacker"],
    },
    Module {
        name: "rights",
        package: "fleet-tls",
        file: "crates/fleet-tls/src/lib.rs",
        tested_by: &["fleet-tls", "imageserver"],
    },
    Module {
        name: "rights-layer",
        package: "fleet-tls",
        file: "crates/fleet-tls/src/rights.rs",
        tested_by: &["fleet-tls", "image-unpacker"],
    },
];

/// What cargo-mutants found, per outcome file it writes.
const OUTCOMES: [&str; 4] = ["caught", "missed", "unviable", "timeout"];

pub(crate) const USAGE: &str = "\
cargo xtask mutants [--only NAME,...] [--list] [-- CARGO-MUTANTS-ARGS]

Mutation testing of the integrity-critical modules with cargo-mutants
(installed with `cargo install --locked cargo-mutants` if missing):
  manifest     crates/image-format/src/manifest.rs     (image-format's tests)
  chunk-store  crates/chunk-store/src/lib.rs           (chunk-store's and imageserver's tests)
  records      crates/chunk-store/src/record.rs        (chunk-store's and imageserver's tests)
  engine       crates/image-unpacker/src/engine.rs     (image-unpacker's tests)
  blockdev     crates/image-unpacker/src/blockdev.rs   (image-unpacker's tests)
  rights       crates/fleet-tls/src/lib.rs             (fleet-tls's and imageserver's tests)
  rights-layer crates/fleet-tls/src/rights.rs          (fleet-tls's and image-unpacker's tests,
               whose tests/rights.rs walks every role and RPC of both daemons)
Results: target/mutants/NAME/mutants.out (missed.txt lists the survivors); a
summary per module is printed. Arguments after `--` go to cargo mutants, e.g.
`-- --cargo-arg=--lib` to test with unit tests only (faster, fewer caught).
It takes long (minutes per module): run it under `nice` in the background.";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let (ours, passed) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut only: Option<Vec<String>> = None;
    let mut list = false;
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--only" => {
                let names = it.next().context("--only needs a list of module names")?;
                only = Some(names.split(',').map(str::to_owned).collect());
            }
            "--list" => list = true,
            other => bail!("unknown argument '{other}'\n\n{USAGE}"),
        }
    }
    let root = crate::root();
    let modules = select(only.as_deref(), &root)?;
    ensure_installed()?;

    let out = root.join("target/mutants");
    let started = Instant::now();
    let mut table =
        String::from("| module | file | caught | missed | unviable | timeouts |\n|---|---|---|---|---|---|\n");
    for m in &modules {
        let mut cmd = Command::new("cargo");
        crate::without_run_vars(&mut cmd).current_dir(&root).env("CARGO_TARGET_DIR", out.join("build")).args([
            "mutants",
            "--no-shuffle",
            "--package",
            m.package,
            "--file",
            m.file,
        ]);
        for p in m.tested_by {
            cmd.args(["--test-package", p]);
        }
        if m.tested_by.iter().any(|p| *p != m.package) {
            // The baseline runs only the module's own package's tests and
            // sets the timeout from them; the other packages' take longer.
            cmd.args(["--minimum-test-timeout", "300"]);
        }
        if list {
            cmd.arg("--list");
        } else {
            // cargo-mutants makes the output directory, not its parents.
            std::fs::create_dir_all(out.join(m.name))
                .with_context(|| format!("creating {}", out.join(m.name).display()))?;
            cmd.arg("--output").arg(out.join(m.name));
        }
        cmd.args(passed);
        println!("== {}: {cmd:?}", m.name);
        // cargo-mutants exits non-zero when mutants survive; the table says so.
        let status = cmd.status().context("running cargo mutants")?;
        if list {
            if !status.success() {
                bail!("cargo mutants --list failed for {}: {status}", m.name);
            }
            continue;
        }
        let results = out.join(m.name).join("mutants.out");
        if !results.join("caught.txt").exists() {
            bail!(
                "cargo mutants wrote no results for {} ({status}); see {}",
                m.name,
                results.join("debug.log").display()
            );
        }
        let counts = count(&results)?;
        table.push_str(&format!(
            "| {} | `{}` | {} | {} | {} | {} |\n",
            m.name, m.file, counts[0], counts[1], counts[2], counts[3]
        ));
        println!(
            "{}: caught {}, missed {} (see {})",
            m.name,
            counts[0],
            counts[1],
            results.join("missed.txt").display()
        );
    }
    if !list {
        println!("\n{table}\n{:.0} min", started.elapsed().as_secs_f64() / 60.0);
    }
    Ok(())
}

/// The modules named by `--only` (all by default) whose file exists.
fn select(only: Option<&[String]>, root: &Path) -> anyhow::Result<Vec<&'static Module>> {
    if let Some(names) = only
        && let Some(bad) = names.iter().find(|n| !MODULES.iter().any(|m| m.name == n.as_str()))
    {
        bail!("no module '{bad}'; known: {}", MODULES.iter().map(|m| m.name).collect::<Vec<_>>().join(", "));
    }
    let chosen: Vec<_> = MODULES
        .iter()
        .filter(|m| only.is_none_or(|names| names.iter().any(|n| n == m.name)))
        .filter(|m| {
            let there = root.join(m.file).exists();
            if !there {
                eprintln!("skipping {}: {} does not exist", m.name, m.file);
            }
            there
        })
        .collect();
    if chosen.is_empty() {
        bail!("no module to test");
    }
    Ok(chosen)
}

fn ensure_installed() -> anyhow::Result<()> {
    let have = Command::new("cargo").args(["mutants", "--version"]).output().is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    println!("== cargo install --locked cargo-mutants");
    let status = Command::new("cargo").args(["install", "--locked", "cargo-mutants"]).status()?;
    if !status.success() {
        bail!("installing cargo-mutants failed: {status}");
    }
    Ok(())
}

/// How many mutants had each of [`OUTCOMES`] (one line each in its file).
fn count(results: &Path) -> anyhow::Result<[usize; 4]> {
    let mut counts = [0; 4];
    for (k, outcome) in OUTCOMES.iter().enumerate() {
        let text = std::fs::read_to_string(results.join(format!("{outcome}.txt")))
            .with_context(|| format!("reading {outcome}.txt in {}", results.display()))?;
        counts[k] = text.lines().filter(|l| !l.trim().is_empty()).count();
    }
    Ok(counts)
}
