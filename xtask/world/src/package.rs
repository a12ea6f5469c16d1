//! `cargo xtask package`: the .deb and .rpm packages an ops team installs,
//! a release archive per package, and `SHA256SUMS`, all from one build.
//!
//! The packages are described where cargo-deb and cargo-generate-rpm look
//! for them, in the `[package.metadata.deb]` and
//! `[package.metadata.generate-rpm]` tables of image-unpacker, imageserver
//! and ami-publisher (which carries the `ami-fleet-tools` package: the
//! three tools with their man pages and completions). Their version is the
//! workspace's. This task builds once, stages the binaries (without debug
//! sections, symbols kept for backtraces) and the generated man pages and
//! completions in a private target directory, and runs both tools over it
//! without building again.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use sha2::Digest as _;

use crate::util;

pub(crate) const USAGE: &str = "\
usage: cargo xtask package [--out DIR] [--revision N] [--fast]
                           [--binaries-from DIR | --profile PROFILE]

Builds the five binaries once (release profile unless --profile), then
writes to DIR (default target/packages):
  image-unpacker, imageserver, ami-fleet-tools: one .deb and one .rpm each
  (cargo-deb, cargo-generate-rpm), and a .tar.zst archive each;
  SHA256SUMS over them (sha256sum -c SHA256SUMS checks it).
--revision N     the package revision (.deb -N, .rpm release N; default 1)
--fast           light compression (a quick local check)
--binaries-from  package binaries already built in DIR (no build), e.g.
                 target/debug after `cargo nextest run --workspace`
Needs cargo-deb and cargo-generate-rpm: cargo install --locked cargo-deb cargo-generate-rpm";

/// The binaries every package set is made of.
const BINARIES: [&str; 5] = ["image-unpacker", "imageserver", "ami-publisher", "imagetool", "unpacker-tool"];

/// One package: the crate whose manifest describes it, its name, and what
/// its release archive holds besides the binaries (paths from the
/// workspace root; `dist/` is the generated man pages and completions).
struct Set {
    krate: &'static str,
    name: &'static str,
    bins: &'static [&'static str],
    files: &'static [&'static str],
}

const SETS: [Set; 3] = [
    Set {
        krate: "image-unpacker",
        name: "image-unpacker",
        bins: &["image-unpacker"],
        files: &[
            "deploy/image-unpacker.service",
            "deploy/image-unpacker.env",
            "deploy/image-unpacker-instance-policy.json",
            "deploy/image-unpacker-user-data.sh",
            "docs/operations.md",
        ],
    },
    Set {
        krate: "imageserver",
        name: "imageserver",
        bins: &["imageserver"],
        files: &[
            "deploy/imageserver.service",
            "deploy/imageserver.env",
            "deploy/imageserver-bucket-policy.json",
            "docs/operations.md",
        ],
    },
    Set {
        krate: "ami-publisher",
        name: "ami-fleet-tools",
        bins: &["ami-publisher", "imagetool", "unpacker-tool"],
        files: &[
            "deploy/ami-publisher-iam-policy.json",
            "deploy/stop-idle-unpackers.cron",
            "docs/operations.md",
            "dist/",
        ],
    },
];

struct Options {
    out: PathBuf,
    revision: u32,
    fast: bool,
    binaries_from: Option<PathBuf>,
    profile: String,
}

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        out: util::root().join("target/packages"),
        revision: 1,
        fast: false,
        binaries_from: None,
        profile: "release".to_owned(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().with_context(|| format!("{a} needs {what}\n\n{USAGE}")).cloned();
        match a.as_str() {
            "--out" => o.out = PathBuf::from(value("a directory")?),
            "--revision" => {
                let v = value("a number")?;
                o.revision =
                    v.parse().ok().filter(|r| *r >= 1).with_context(|| {
                        format!("--revision {v}: not a revision (a whole number from 1)\n\n{USAGE}")
                    })?;
            }
            "--fast" => o.fast = true,
            "--binaries-from" => o.binaries_from = Some(PathBuf::from(value("a directory")?)),
            "--profile" => o.profile = value("a profile name")?,
            "--help" | "-h" => bail!("{USAGE}"),
            other => bail!("unknown argument {other}\n\n{USAGE}"),
        }
    }
    if o.binaries_from.is_some() && args.iter().any(|a| a == "--profile") {
        bail!("--binaries-from and --profile exclude each other: the binaries are built already\n\n{USAGE}");
    }
    Ok(o)
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let o = parse(args)?;
    for (tool, sub) in [("cargo-deb", "deb"), ("cargo-generate-rpm", "generate-rpm")] {
        let found = util::cargo().args([sub, "--version"]).output().is_ok_and(|out| out.status.success());
        if !found {
            bail!("{tool} is not installed: cargo install --locked cargo-deb cargo-generate-rpm");
        }
    }
    let bin_dir = match &o.binaries_from {
        Some(dir) => dir.clone(),
        None => build(&o.profile)?,
    };
    fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let out = o.out.canonicalize()?;
    // cargo-deb and cargo-generate-rpm read `target/release/...` in the
    // manifests as "the target directory's release profile": pointed at
    // this stage, they take exactly the staged files.
    let stage = out.join(".stage");
    let release = stage.join("release");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    fs::create_dir_all(&release)?;
    for bin in BINARIES {
        let from = bin_dir.join(bin);
        if !from.is_file() {
            bail!("{} is missing: build the workspace's binaries first (cargo build --workspace)", from.display());
        }
        let to = release.join(bin);
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(&from)
            .status()
            .context("running strip (binutils)")?;
        if !status.success() {
            bail!("strip --strip-debug {} failed ({status})", from.display());
        }
    }
    crate::dist::generate(&release.join("dist"))?;

    let version = env!("CARGO_PKG_VERSION");
    let mut made = Vec::new();
    for set in &SETS {
        made.push(deb(set, &o, &stage, &out)?);
        made.push(rpm(set, &o, &stage, &out)?);
        made.push(archive(set, version, &release, &out, if o.fast { 3 } else { 19 })?);
    }
    fs::remove_dir_all(&stage)?;
    let sums = checksums(&made, &out)?;
    for path in &made {
        let len = fs::metadata(path)?.len();
        println!("{:>10}  {}", util::mib(len), path.display());
    }
    println!("            {}", sums.display());
    Ok(())
}

/// One `cargo build` of every packaged binary; returns their directory.
fn build(profile: &str) -> anyhow::Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.args(["build", "--locked", "--profile", profile]);
    for bin in BINARIES {
        cmd.args(["-p", bin]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(util::target_dir().join(dir))
}

/// Run a packaging tool with its output in a fresh directory, and move the
/// one file it made into `out`.
fn run_tool(what: &str, mut cmd: Command, out: &Path) -> anyhow::Result<PathBuf> {
    let tmp = out.join(format!(".{what}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    cmd.arg("--output").arg(&tmp);
    let output = cmd.output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let files: Vec<PathBuf> = fs::read_dir(&tmp)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    let [file] = files.as_slice() else {
        bail!("{what} made {} files in {}, not one", files.len(), tmp.display());
    };
    let dest = out.join(file.file_name().expect("a file name"));
    fs::rename(file, &dest)?;
    fs::remove_dir(&tmp)?;
    Ok(dest)
}

fn deb(set: &Set, o: &Options, stage: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.env("CARGO_TARGET_DIR", stage)
        .args(["deb", "--package", set.krate, "--no-build", "--no-strip", "--locked"])
        .args(["--deb-revision", &o.revision.to_string()]);
    if o.fast {
        cmd.arg("--fast");
    }
    run_tool(&format!("cargo-deb {}", set.name), cmd, out)
}

fn rpm(set: &Set, o: &Options, stage: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.args(["generate-rpm", "--package", &format!("crates/{}", set.krate), "--target-dir"])
        .arg(stage)
        .args(["--set-metadata", &format!("release = \"{}\"", o.revision)])
        .args(["--payload-compress", if o.fast { "none" } else { "zstd" }]);
    run_tool(&format!("cargo-generate-rpm {}", set.name), cmd, out)
}

/// `NAME-VERSION-x86_64-linux.tar.zst`, holding `NAME-VERSION/bin/...` and
/// the set's files, every entry owned by root with a fixed time, so that
/// the same inputs make the same archive.
fn archive(set: &Set, version: &str, release: &Path, out: &Path, level: i32) -> anyhow::Result<PathBuf> {
    let top = format!("{}-{version}", set.name);
    let path = out.join(format!("{top}-{}-linux.tar.zst", std::env::consts::ARCH));
    let root = util::root();
    let mut entries: Vec<(PathBuf, String, u32)> = Vec::new();
    for bin in set.bins {
        entries.push((release.join(bin), format!("{top}/bin/{bin}"), 0o755));
    }
    for file in set.files {
        if let Some(dir) = file.strip_suffix('/') {
            let base = release.join(dir);
            let mut found = Vec::new();
            walk(&base, &mut found)?;
            for f in found {
                let rel = f.strip_prefix(&base)?.to_string_lossy().into_owned();
                entries.push((f, format!("{top}/{rel}"), 0o644));
            }
        } else {
            let name = Path::new(file).file_name().expect("a file name").to_string_lossy().into_owned();
            entries.push((root.join(file), format!("{top}/{name}"), 0o644));
        }
    }
    entries.sort_by(|a, b| a.1.cmp(&b.1));
    let mut atomic = fleet_fs::AtomicFile::new(&path)?;
    let encoder = zstd::Encoder::new(atomic.file(), level)?;
    let mut tar = tar::Builder::new(encoder);
    for (src, name, mode) in &entries {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data.as_slice())?;
    }
    tar.into_inner()?.finish()?;
    atomic.commit()?;
    Ok(path)
}

fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() { walk(&p, found)? } else { found.push(p) }
    }
    Ok(())
}

/// `SHA256SUMS` beside the files, in `sha256sum` format, written atomically.
fn checksums(files: &[PathBuf], out: &Path) -> anyhow::Result<PathBuf> {
    let mut text = String::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut hasher = sha2::Sha256::new();
        let mut reader = fs::File::open(f)?;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let name = f.file_name().expect("a file name").to_string_lossy();
        text.push_str(&format!("{}  {name}\n", hex::encode(hasher.finalize())));
    }
    let path = out.join("SHA256SUMS");
    fleet_fs::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
