//! `cargo xtask demo`: the main job on the local world, as a new user would
//! run it. Starts an imageserver with generated certificates, adds a
//! generated disk image and a next leaf that differs in a few percent, reads
//! both back, verifies them and prints what moved.

use std::{os::unix::fs::FileExt, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::util::{self, mib};

/// Size of the generated disk.
const DISK_MIB: u64 = 384;
/// Start of the one partition: 1 MiB, as partitioning tools align it.
const PART_START: u64 = 1 << 20;
/// Fraction of the disk's chunks the second leaf changes.
const CHANGE: f64 = 0.03;

pub(crate) fn run() -> anyhow::Result<()> {
    let t0 = Instant::now();
    let work = util::root().join("target/demo");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    println!("== building imageserver and imagetool");
    let bins = util::build(&["imageserver", "imagetool"], false)?;

    println!("== generating a CA and role certificates in {}", work.join("pki").display());
    let pki = work.join("pki");
    fleet_pki::write_pki(&pki)?;
    let builder_ssl = work.join("ssl-image-builder");
    util::ssl_dir(&pki, "image-builder", &builder_ssl)?;
    let reader_ssl = work.join("ssl-image-unpacker");
    util::ssl_dir(&pki, "image-unpacker", &reader_ssl)?;

    let (_server, addr) = util::start_imageserver(&bins, &pki, &work.join("data"), &work.join("imageserver.log"))?;
    println!("== imageserver listening on {addr} (mutual TLS; log in {})", work.join("imageserver.log").display());

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

    let mut rows = Vec::new();
    for (leaf, disk) in [("1", &disk1), ("2", &disk2)] {
        let image = format!("demo/debian-12/{leaf}");
        let t = Instant::now();
        let r = util::imagetool(&bins, addr, &builder_ssl, &["add", &image, path(disk)?])?;
        let add_secs = t.elapsed().as_secs_f64();
        let out = work.join(format!("readback{leaf}.raw"));
        let t = Instant::now();
        let g = util::imagetool(&bins, addr, &reader_ssl, &["get", &image, path(&out)?])?;
        let get_secs = t.elapsed().as_secs_f64();
        if !util::same_bytes(disk, &out)? {
            bail!("{image}: the bytes read back differ from {}", disk.display());
        }
        if g["image_id"] != r["image_id"] {
            bail!("{image}: image id read back {} differs from the one added {}", g["image_id"], r["image_id"]);
        }
        rows.push((image, r, add_secs, g, get_secs));
    }

    println!(
        "\n{:<20} {:>10} {:>9} {:>9} {:>12} {:>8} {:>8}",
        "IMAGE", "SIZE", "UPLOADED", "REUSED", "BYTES SENT", "ADD", "GET"
    );
    for (image, r, add_secs, _g, get_secs) in &rows {
        println!(
            "{:<20} {:>10} {:>9} {:>9} {:>12} {:>7.1}s {:>7.1}s",
            image,
            mib(r["size_bytes"].as_u64().unwrap_or(0)),
            r["chunks_uploaded"].as_u64().unwrap_or(0),
            r["chunks_reused"].as_u64().unwrap_or(0),
            mib(r["bytes_sent"].as_u64().unwrap_or(0)),
            add_secs,
            get_secs
        );
    }
    let second = &rows[1].1;
    println!(
        "\nleaf 2 changed {} of the disk; adding it sent {} ({} chunks), {:.2}x the changed bytes.",
        mib(changed),
        mib(second["bytes_sent"].as_u64().unwrap_or(0)),
        second["chunks_uploaded"],
        second["bytes_sent"].as_u64().unwrap_or(0) as f64 / changed as f64
    );
    println!("both leaves read back bit for bit with matching image ids:");
    for (image, r, ..) in &rows {
        println!("  {image}  {}", r["image_id"].as_str().unwrap_or("?"));
    }
    println!("demo finished in {:.1}s; files in {}", t0.elapsed().as_secs_f64(), work.display());
    Ok(())
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
