//! `publish --via ebs-direct` against the ways it replaces
//! (`cargo xtask bench --only ebs-direct`): for a 2%-changed leaf of a
//! 1 GiB disk-like image, the bytes put to a target against a whole-image
//! upload as coldsnap does it (every block that is not all zeros), and the
//! publish time against the unpacker's way for the same leaf, both on the
//! local world at AWS's own durations, one target, in one run.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use fleet_pki::Role;
use local_world::{Plan, World};

use crate::{bench::Row, util};

pub(crate) const TITLE: &str = "publishing without an unpacker (EBS direct APIs)";
const BLOCK: u64 = 512 * 1024;

/// A publish's results and wall time.
struct Published {
    secs: f64,
    target: ami_publisher::results::TargetResult,
}

fn publish(
    world: &World,
    bins: &Path,
    work: &Path,
    stream: &str,
    leaf: &str,
    extra: &[&str],
) -> anyhow::Result<Published> {
    let name = format!("{}-{leaf}", stream.replace('/', "-"));
    let results = work.join(format!("direct-{name}.json"));
    let log = std::fs::File::create(work.join(format!("direct-{name}.log")))?;
    let mut cmd = Command::new(bins.join("ami-publisher"));
    cmd.envs(world.aws_env())
        .arg("--ssl-dir")
        .arg(world.ssl_dir(Role::AmiPublisher)?)
        .args(["--image-server", &world.imageserver_addr(), "--min-free-bytes", "0", "--targets", "first,us-east-1"])
        .arg("--results")
        .arg(&results)
        .args(["publish", stream, leaf])
        .args(extra)
        .env("RUST_LOG", "ami_publisher=info")
        .stdout(Stdio::null())
        .stderr(log)
        .stdin(Stdio::null());
    let t = Instant::now();
    let status = cmd.status().context("running ami-publisher")?;
    let secs = t.elapsed().as_secs_f64();
    let r = ami_publisher::results::PublishResults::read(&results)?;
    let target = r.targets.into_iter().next().context("no target in the results")?;
    if !status.success() || !target.ok() || target.reused {
        bail!("publish {stream}/{leaf} {extra:?} did not make a new AMI ({status}): {:?}", target.error);
    }
    Ok(Published { secs, target })
}

/// Blocks of `path` that are not all zeros: what coldsnap uploads.
fn nonzero_blocks(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; usize::try_from(BLOCK)?];
    let mut n = 0;
    loop {
        let mut got = 0;
        while got < buf.len() {
            let k = f.read(&mut buf[got..])?;
            if k == 0 {
                break;
            }
            got += k;
        }
        if got == 0 {
            return Ok(n);
        }
        if buf[..got].iter().any(|&b| b != 0) {
            n += 1;
        }
        if got < buf.len() {
            return Ok(n);
        }
    }
}

/// Zero a quarter of the image in runs, as a disk's free space is.
fn zero_regions(path: &Path, len: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let run = vec![0u8; 8 << 20];
    let mut at = len / 8;
    while at + run.len() as u64 <= len {
        f.write_all_at(&run, at)?;
        at += 32 << 20;
    }
    f.sync_all()?;
    Ok(())
}

pub(crate) fn run(work: &Path, image_mib: u64) -> anyhow::Result<Vec<Row>> {
    println!("== ebs-direct: building ami-publisher and imagetool (dev profile)");
    let bins = util::build_dev()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let world = World::start(&Plan::of(&["first"], &["us-east-1"]).time_scale(1.0)).await?;
        let builder = world.ssl_dir(Role::ImageBuilder)?;
        let len = image_mib << 20;
        let one = work.join("direct-1.raw");
        util::write_noise(&one, len, 61)?;
        zero_regions(&one, len)?;
        let two = work.join("direct-2.raw");
        std::fs::copy(&one, &two)?;
        let changed = util::change_chunks(&two, 0.02, 62)?;
        for stream in ["bench/direct", "bench/unpacked"] {
            for (leaf, file) in [("1", &one), ("2", &two)] {
                let name = format!("{stream}/{leaf}");
                util::imagetool(&bins, world.imageserver.addr, &builder, &["add", &name, file.to_str().context("utf-8")?])?;
            }
        }
        let whole = nonzero_blocks(&two)? * BLOCK;
        println!("== ebs-direct: leaf 1 both ways");
        let direct1 = publish(&world, &bins, work, "bench/direct", "1", &["--via", "ebs-direct"])?;
        let unpacked1 = publish(&world, &bins, work, "bench/unpacked", "1", &[])?;
        println!("== ebs-direct: leaf 2 (2% changed) both ways");
        let direct2 = publish(&world, &bins, work, "bench/direct", "2", &["--via", "ebs-direct"])?;
        let unpacked2 = publish(&world, &bins, work, "bench/unpacked", "2", &[])?;
        let t = Instant::now();
        let verified = publish_verify(&world, &bins, work)?;
        let verify_secs = t.elapsed().as_secs_f64();
        let put = direct2.target.bytes_written.context("no bytes_written")?;
        let ratio = put as f64 / whole as f64;
        let time_ratio = direct2.secs / unpacked2.secs;
        Ok(vec![
            Row {
                what: format!(
                    "publish --via ebs-direct of a 2%-changed leaf of a {image_mib} MiB disk-like image (a quarter \
                     zeros): bytes put to the target / a whole-image upload as coldsnap does it (every block not all zeros)"
                ),
                figure: format!(
                    "{ratio:.4} ({} put for {} changed; coldsnap {}); first leaf: {} put (every block, zeros too)",
                    util::mib(put),
                    util::mib(changed),
                    util::mib(whole),
                    util::mib(direct1.target.bytes_written.unwrap_or(0)),
                ),
                goal: "<= 0.05".into(),
                met: Some(ratio <= 0.05),
            },
            Row {
                what: "the same leaf's publish time via ebs-direct / via the unpacker (its volume at leaf 1 already), \
                       one target, the world at AWS's own durations"
                    .into(),
                figure: format!(
                    "{time_ratio:.2} (ebs-direct {:.1} s, unpacker {:.1} s); first leaf: ebs-direct {:.1} s, unpacker \
                     {:.1} s (new volume, full unpack)",
                    direct2.secs, unpacked2.secs, direct1.secs, unpacked1.secs
                ),
                goal: "reported".into(),
                met: None,
            },
            Row {
                what: format!("`verify` of both leaves' AMIs ({image_mib} MiB each, every block read back)"),
                figure: format!("{verify_secs:.1} s ({verified} chunks compared)"),
                goal: "reported".into(),
                met: None,
            },
        ])
    })
}

/// `verify --leaf` of both leaves of the ebs-direct stream; the chunks
/// compared.
fn publish_verify(world: &World, bins: &Path, work: &Path) -> anyhow::Result<u64> {
    let out = Command::new(bins.join("ami-publisher"))
        .envs(world.aws_env())
        .arg("--ssl-dir")
        .arg(world.ssl_dir(Role::AmiPublisher)?)
        .args(["--image-server", &world.imageserver_addr(), "--targets", "first,us-east-1", "--json"])
        .args(["verify", "--leaf", "bench/direct/1", "--leaf", "bench/direct/2"])
        .stderr(std::fs::File::create(work.join("direct-verify.log"))?)
        .output()
        .context("running ami-publisher verify")?;
    if !out.status.success() {
        bail!("verify failed: {}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .context("verify's JSON")?
        .iter()
        .flat_map(|r| r["records"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row["bytes"]["chunks_checked"].as_u64())
        .sum())
}
