//! `cargo xtask world`: the local world, up until Ctrl-C, for trying every
//! ami-publisher subcommand by hand. Prints `export` lines that point the
//! AWS SDK, imagetool and ami-publisher at it; the world variables
//! (`LOCAL_WORLD_PACE`, `LOCAL_WORLD_FAULTS`, ... see docs/world.md) are
//! taken from the environment. Ctrl-C (or SIGTERM) tears it all down: moto,
//! the imageserver, the unpackers, scratch devices and the world's
//! directory.

use anyhow::{Context as _, bail};
use fleet_pki::Role;
use local_world::{Plan, World};

use crate::util;

const USAGE: &str = "usage: cargo xtask world [--regions REGION,REGION...] (default: us-east-1,eu-west-1)";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let regions: Vec<String> = match args {
        [] => vec!["us-east-1".into(), "eu-west-1".into()],
        [flag, list] if flag == "--regions" => list.split(',').map(str::trim).map(str::to_owned).collect(),
        _ => bail!("{USAGE}"),
    };
    if regions.iter().any(String::is_empty) {
        bail!("--regions: an empty region in '{}'", args.join(" "));
    }
    eprintln!("== building the workspace's binaries");
    let bins = util::build_dev()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let regions: Vec<&str> = regions.iter().map(String::as_str).collect();
        eprintln!("== starting the local world: 2 accounts x {} regions", regions.len());
        let world = World::start(&Plan::new(&regions)).await?;
        print_exports(&world, &bins)?;
        wait_for_stop().await?;
        eprintln!("\n== tearing the world down");
        drop(world);
        Ok::<_, anyhow::Error>(())
    })?;
    // Dropping the runtime drops the attacher's tasks and with them the
    // scratch devices (loop devices are detached).
    drop(rt);
    eprintln!("== done: nothing of the world is left");
    Ok(())
}

fn print_exports(world: &World, bins: &std::path::Path) -> anyhow::Result<()> {
    let publisher = world.ssl_dir(Role::AmiPublisher)?;
    let builder = world.ssl_dir(Role::ImageBuilder)?;
    let image_server = world.imageserver_addr();
    let variables: Vec<String> = local_world::WORLD_VARIABLES
        .iter()
        .filter_map(|name| world.variable(name).map(|v| format!("{name}={v}")))
        .collect();
    println!(
        "# The local world is up ({}; world variables not shown take their defaults, see docs/world.md).",
        variables.join(" ")
    );
    println!("# Paste these lines into a shell:");
    for (name, value) in world.aws_env() {
        println!("export {name}={}", quote(&value));
    }
    println!("export IMAGE_SERVER={}  # ami-publisher and imagetool", quote(&image_server));
    println!("export SSL_DIR={}  # ami-publisher's certificate", quote(&path(&publisher)?));
    println!("export BUILDER_SSL_DIR={}  # imagetool's (image-builder) certificate", quote(&path(&builder)?));
    println!("export PATH={}:\"$PATH\"", quote(&path(bins)?));
    println!("#");
    println!("# Targets (profile, account id, region, unpacker instance, private IP):");
    for t in &world.targets {
        println!("#   {:<7} {} {:<15} {} {}", t.account, t.account_id, t.region, t.instance_id, t.ip);
    }
    let mut regions: Vec<&str> = world.targets.iter().map(|t| t.region.as_str()).collect();
    regions.sort_unstable();
    regions.dedup();
    let targets: Vec<String> = regions.iter().map(|r| format!("--targets ,{r}")).collect();
    println!("#");
    println!("# Then, for example:");
    println!("#   head -c 64M /dev/urandom > disk.raw");
    println!("#   imagetool --ssl-dir \"$BUILDER_SSL_DIR\" add try/disk/1 disk.raw");
    println!("#   ami-publisher --ssl-dir \"$SSL_DIR\" {} publish try/disk 1", targets.join(" "));
    println!("#   ami-publisher --help");
    println!("# Ctrl-C here tears the world down.");
    use std::io::Write as _;
    std::io::stdout().flush().context("writing the export lines")?;
    Ok(())
}

async fn wait_for_stop() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn path(p: &std::path::Path) -> anyhow::Result<String> {
    p.to_str().map(str::to_owned).context("a non-UTF-8 path")
}

/// `value` quoted for a POSIX shell.
fn quote(value: &str) -> String {
    if value.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:,=@".contains(&b)) {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}
