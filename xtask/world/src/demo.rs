//! `cargo xtask demo`: the main job on the local world, as a new user would
//! run it. Brings the world up (moto with two accounts, three regions each,
//! an unpacker instance per target), adds a generated disk image to the
//! world's imageserver with `imagetool`, publishes it everywhere with
//! `ami-publisher`, checks that the bytes behind every AMI are the image's,
//! then publishes a next leaf that differs in a few percent and shows how
//! few bytes moved.

use std::{
    os::unix::fs::FileExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use fleet_pki::Role;
use local_world::{Plan, World};

use crate::util::{self, mib};

/// Size of the generated disk.
const DISK_MIB: u64 = 384;
/// Start of the one partition: 1 MiB, as partitioning tools align it.
const PART_START: u64 = 1 << 20;
/// Fraction of the disk's chunks the second leaf changes.
const CHANGE: f64 = 0.03;
/// The regions of the demo world (each account gets all three).
const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];
const STREAM: &str = "demo/debian-12";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let in_s3 = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["--store", "dir"] => false,
        ["--store", "s3"] => true,
        other => bail!("demo takes `--store dir` (the default) or `--store s3`, not {other:?}"),
    };
    let t0 = Instant::now();
    let work = util::root().join("target/demo");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    println!("== building the workspace's binaries");
    let bins = util::build_dev()?;

    let disk1 = work.join("leaf1.raw");
    let how = make_disk(&work, &disk1)?;
    println!("== generated leaf 1: {} disk ({how})", mib(DISK_MIB << 20));
    let disk2 = work.join("leaf2.raw");
    std::fs::copy(&disk1, &disk2)?;
    let changed = util::change_chunks(&disk2, CHANGE, 99)?;
    println!(
        "== generated leaf 2: leaf 1 with {} rewritten ({:.1}% of the disk)",
        mib(changed),
        100.0 * changed as f64 / (DISK_MIB << 20) as f64
    );

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        println!("== starting the local world (moto EC2/STS emulator, 2 accounts x {} regions)", REGIONS.len());
        let t = Instant::now();
        let world = World::start(&Plan::new(&REGIONS).images_in_s3(in_s3)).await?;
        if in_s3 {
            println!("   the imageserver keeps its images in s3://{}/images (moto's S3)", local_world::IMAGES_BUCKET);
        }
        println!("   up in {:.1}s; AWS profiles in {}", t.elapsed().as_secs_f64(), world.config_file.display());
        println!("   {:<8} {:<13} {:<15} {:<22} PRIVATE IP", "PROFILE", "ACCOUNT ID", "REGION", "UNPACKER INSTANCE");
        for t in &world.targets {
            println!("   {:<8} {:<13} {:<15} {:<22} {}", t.account, t.account_id, t.region, t.instance_id, t.ip);
        }
        let demo = Demo { world: &world, bins: &bins, work: &work };
        demo.add("1", &disk1)?;
        let r1 = demo.publish("1")?;
        demo.verify(&r1, &disk1).await?;
        demo.add("2", &disk2)?;
        let r2 = demo.publish("2")?;
        demo.verify(&r2, &disk2).await?;

        println!("\n== what moved for leaf 2 (changed: {}):", mib(changed));
        println!("   {:<26} {:>12} {:>12} {:>10}", "TARGET", "FETCHED", "WRITTEN", "FETCHED/CHANGED");
        let mut worst = 0f64;
        for t in &r2.targets {
            let fetched = t.bytes_fetched.unwrap_or(0);
            let ratio = fetched as f64 / changed as f64;
            worst = worst.max(ratio);
            println!(
                "   {:<26} {:>12} {:>12} {:>10.3}",
                format!("{},{}", t.account, t.region),
                mib(fetched),
                mib(t.bytes_written.unwrap_or(0)),
                ratio
            );
        }
        if worst > 1.05 {
            bail!("a target fetched {worst:.3}x the changed bytes for leaf 2 (should be at most 1.05x)");
        }

        println!("\n== publishing leaf 2 again: every target should report the AMI it has");
        let r3 = demo.publish("2")?;
        for (a, b) in r2.targets.iter().zip(&r3.targets) {
            if !b.reused || a.ami_id != b.ami_id {
                bail!("{},{}: the re-run made {:?} instead of reporting {:?}", b.account, b.region, b.ami_id, a.ami_id);
            }
        }
        println!(
            "\ndemo finished in {:.1}s: {} AMIs per leaf, bytes behind each checked; results in {}",
            t0.elapsed().as_secs_f64(),
            r2.targets.len(),
            work.display()
        );
        Ok(())
    })
}

struct Demo<'a> {
    world: &'a World,
    bins: &'a Path,
    work: &'a Path,
}

impl Demo<'_> {
    fn add(&self, leaf: &str, disk: &Path) -> anyhow::Result<()> {
        let image = format!("{STREAM}/{leaf}");
        println!("\n== imagetool add {image} {}", disk.display());
        let ssl = self.world.ssl_dir(Role::ImageBuilder)?;
        let addr = self.world.imageserver.addr;
        let r = util::imagetool(self.bins, addr, &ssl, &["add", &image, path(disk)?])?;
        println!(
            "   image {}: {} chunks, {} uploaded, {} already on the server, {} sent",
            r["image_id"].as_str().unwrap_or("?"),
            r["chunks"],
            r["chunks_uploaded"],
            r["chunks_reused"],
            mib(r["bytes_sent"].as_u64().unwrap_or(0))
        );
        Ok(())
    }

    /// Run `ami-publisher publish` to every profile in the demo regions, as a
    /// pipeline would; returns its results file.
    fn publish(&self, leaf: &str) -> anyhow::Result<ami_publisher::results::PublishResults> {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let results = self.work.join(format!("results-{run}-leaf{leaf}.json"));
        let mut cmd = Command::new(self.bins.join("ami-publisher"));
        cmd.envs(self.world.aws_env())
            .arg("--ssl-dir")
            .arg(self.world.ssl_dir(Role::AmiPublisher)?)
            .args(["--image-server", &self.world.imageserver_addr()]);
        // ",REGION": every account (profile) in that region.
        for r in REGIONS {
            cmd.args(["--targets", &format!(",{r}")]);
        }
        cmd.args(["--expires-in", "7d", "--tags", "Pipeline=demo", "--results", path(&results)?]);
        cmd.args(["publish", STREAM, leaf]);
        println!("\n== ami-publisher --targets ,{} publish {STREAM} {leaf}", REGIONS.join(" --targets ,"));
        let t = Instant::now();
        let status = cmd.stdin(Stdio::null()).status().context("running ami-publisher")?;
        let r = ami_publisher::results::PublishResults::read(&results)?;
        if !status.success() {
            bail!("ami-publisher publish {STREAM} {leaf} failed ({status}); see {}", results.display());
        }
        println!("   {} targets in {:.1}s", r.targets.len(), t.elapsed().as_secs_f64());
        Ok(r)
    }

    /// The bytes behind every snapshot are the image's.
    async fn verify(&self, r: &ami_publisher::results::PublishResults, disk: &Path) -> anyhow::Result<()> {
        for t in &r.targets {
            let snap = t.snapshot_id.as_deref().context("a result without a snapshot")?;
            self.world
                .check_snapshot(snap, disk, Duration::from_secs(60))
                .await
                .with_context(|| format!("{},{}: {}", t.account, t.region, t.ami_id.as_deref().unwrap_or("?")))?;
        }
        println!("   checked: the bytes behind all {} AMIs equal {}", r.targets.len(), disk.display());
        Ok(())
    }
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// A partitioned disk: an MBR with one Linux partition at 1 MiB holding an
/// ext4 file system filled from a generated tree (`mkfs.ext4 -d`). Without
/// mkfs.ext4, the partition holds generated data with zero gaps instead.
fn make_disk(work: &Path, disk: &Path) -> anyhow::Result<&'static str> {
    let size = DISK_MIB << 20;
    let f = std::fs::File::create(disk)?;
    f.set_len(size)?;
    f.write_all_at(&mbr(size), 0)?;
    drop(f);
    if util::have("mkfs.ext4") {
        let tree = work.join("rootfs");
        populate(&tree)?;
        let part_kib = (size - PART_START) / 1024;
        let status = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "demo-root", "-E"])
            .arg(format!("offset={PART_START}"))
            .arg("-d")
            .arg(&tree)
            .arg(disk)
            .arg(format!("{part_kib}k"))
            .status()
            .context("running mkfs.ext4")?;
        if !status.success() {
            bail!("mkfs.ext4 failed ({status})");
        }
        Ok("MBR + ext4 made with mkfs.ext4 -d")
    } else {
        let f = std::fs::OpenOptions::new().write(true).open(disk)?;
        let mut noise = util::Noise::new(5);
        let mut buf = vec![0u8; 1 << 20];
        // Data in two thirds of the partition, in 8 MiB runs with gaps.
        let mut at = PART_START;
        while at + (8 << 20) < size * 2 / 3 {
            for i in 0..8 {
                noise.fill(&mut buf);
                f.write_all_at(&buf, at + i * (1 << 20))?;
            }
            at += 12 << 20;
        }
        Ok("MBR + generated data; mkfs.ext4 not found")
    }
}

/// A DOS partition table with one bootable Linux (0x83) partition from
/// `PART_START` to the end of the disk.
fn mbr(size: u64) -> [u8; 512] {
    let mut m = [0u8; 512];
    let start = u32::try_from(PART_START / 512).expect("small");
    let sectors = u32::try_from((size - PART_START) / 512).unwrap_or(u32::MAX);
    let e = &mut m[446..462];
    e[0] = 0x80;
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    m[440..444].copy_from_slice(&0x2026_1124u32.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// A small root tree: binaries-like noise and compressible text, ~200 MiB.
fn populate(tree: &Path) -> anyhow::Result<()> {
    for dir in ["usr/bin", "usr/lib", "usr/share/doc", "etc", "var/log"] {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    for i in 0..24u64 {
        util::write_noise(&tree.join(format!("usr/lib/lib{i}.so")), (4 + i % 5) << 20, i)?;
    }
    for i in 0..16u64 {
        util::write_noise(&tree.join(format!("usr/bin/tool{i}")), (1 + i % 3) << 20, 100 + i)?;
    }
    let text: String =
        (0..200_000).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    for i in 0..4 {
        std::fs::write(tree.join(format!("usr/share/doc/manual{i}.txt")), &text)?;
    }
    std::fs::write(tree.join("etc/hostname"), "demo\n")?;
    std::fs::write(tree.join("etc/os-release"), "NAME=\"Demo Linux\"\nVERSION_ID=12\n")?;
    Ok(())
}
