//! The image-unpacker's benchmarks: a full unpack onto a block device as a
//! ratio to `dd` of the same bytes with fsync, a 2%-changed leaf, and the
//! daemon's peak memory during a large unpack.

use std::{net::SocketAddr, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    bench::Row,
    util::{self, Daemon, mib},
};

/// Run unpacker-tool with `--json` against `unpacker`.
fn tool(bins: &Path, unpacker: SocketAddr, ssl: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    util::json_tool(bins, "unpacker-tool", "--unpacker", unpacker, ssl, args)
}

fn start_unpacker(
    bins: &Path,
    pki: &Path,
    work: &Path,
    image_server: SocketAddr,
) -> anyhow::Result<(Daemon, SocketAddr)> {
    let server = image_server.to_string();
    let state = work.join("unpacker-state");
    let args = [
        "--image-server".as_ref(),
        server.as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--device-dir".as_ref(),
        work.as_os_str(),
    ];
    util::start_daemon(bins, "image-unpacker", pki, &args, &work.join("unpacker.log"))
}

fn dd(src: &Path, dev: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let status = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dev.display()))
        .args(["bs=4M", "conv=fsync,notrunc", "status=none"])
        .status()?;
    if !status.success() {
        bail!("dd failed ({status})");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Unpack `leaf` of `stream`; returns (seconds, unpacker-tool's JSON).
fn unpack(
    bins: &Path,
    u: SocketAddr,
    ssl: &Path,
    stream: &str,
    leaf: &str,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let r = tool(bins, u, ssl, &["unpack-image", stream, leaf])?;
    Ok((t.elapsed().as_secs_f64(), r))
}

pub(crate) fn run(
    bins: &Path,
    pki: &Path,
    work: &Path,
    server: SocketAddr,
    size: u64,
    rss_size: u64,
) -> anyhow::Result<(Vec<Row>, String)> {
    let builder = work.join("ssl");
    let publisher = work.join("ssl-publisher");
    util::ssl_dir(pki, "ami-publisher", &publisher)?;
    let (unpacker, u) = start_unpacker(bins, pki, work, server)?;
    let mut rows = Vec::new();

    let img = work.join("u1.raw");
    util::write_noise(&img, size, 21)?;
    util::imagetool(bins, server, &builder, &["add", "bench/u/1", img.to_str().context("utf-8")?])?;
    let dev = test_support::ScratchDevice::new(&work.join("u-vol.img"), size)?;
    let kind = dev.describe();
    println!("== unpacker: device is a {kind}");
    let devpath = dev.path.to_str().context("utf-8")?.to_owned();
    tool(bins, u, &publisher, &["claim-device", "vol-00000000000000b1", &devpath, "--fresh"])?;
    tool(bins, u, &publisher, &["associate", "bench/u", "vol-00000000000000b1"])?;

    // 1. Full unpack vs dd, best of two each, alternating.
    let (mut best_dd, mut best_unpack) = (f64::MAX, f64::MAX);
    for round in 0..2 {
        best_dd = best_dd.min(dd(&img, &dev.path)?);
        // Re-declare the device fresh so every chunk is written again.
        tool(bins, u, &publisher, &["forget-stream", "bench/u"])?;
        tool(bins, u, &publisher, &["claim-device", "vol-00000000000000b1", &devpath, "--fresh"])?;
        tool(bins, u, &publisher, &["associate", "bench/u", "vol-00000000000000b1"])?;
        let (secs, r) = unpack(bins, u, &publisher, "bench/u", "1")?;
        if r["bytes_written"].as_u64() != Some(size) {
            bail!("round {round}: the full unpack wrote {} of {size} bytes", r["bytes_written"]);
        }
        best_unpack = best_unpack.min(secs);
    }
    let cap = tool(bins, u, &publisher, &["prepare-for-capture", "bench/u"])?;
    let ratio = best_dd / best_unpack;
    rows.push(Row {
        what: format!("full unpack of {} onto a {kind}, as a ratio to dd (bs=4M, conv=fsync) of the raw file", mib(size)),
        figure: format!(
            "{ratio:.2} (unpack {best_unpack:.2} s = {:.0} MiB/s; dd {best_dd:.2} s; best of 2 each; read back and verified)",
            size as f64 / 1048576.0 / best_unpack
        ),
        goal: ">= 0.9".into(),
        met: Some(ratio >= 0.9),
    });
    if cap["image_size"].as_u64() != Some(size) {
        bail!("prepare-for-capture reported {}", cap["image_size"]);
    }

    // 2. A 2%-changed leaf.
    let changed = util::change_chunks(&img, 0.02, 22)?;
    util::imagetool(bins, server, &builder, &["add", "bench/u/2", img.to_str().context("utf-8")?])?;
    let (secs, r) = unpack(bins, u, &publisher, "bench/u", "2")?;
    let fetched = r["bytes_fetched"].as_u64().context("bytes_fetched")?;
    let ratio = fetched as f64 / changed as f64;
    rows.push(Row {
        what: "unpack of a 2%-changed leaf: bytes fetched / bytes changed".into(),
        figure: format!(
            "{ratio:.3} ({} fetched for {} changed; {} chunks written)",
            mib(fetched),
            mib(changed),
            r["chunks_written"]
        ),
        goal: "<= 1.05".into(),
        met: Some(ratio <= 1.05),
    });
    rows.push(Row {
        what: "unpack of a 2%-changed leaf: time as a ratio to the full unpack".into(),
        figure: format!("{:.3} ({secs:.2} s vs {best_unpack:.2} s)", secs / best_unpack),
        goal: "reported".into(),
        met: None,
    });
    std::fs::remove_file(&img)?;
    tool(bins, u, &publisher, &["forget-stream", "bench/u"])?;
    tool(bins, u, &publisher, &["remove-device", "vol-00000000000000b1"])?;
    drop(dev);

    // 3. Peak RSS during a large unpack.
    let big = work.join("u-big.raw");
    util::write_noise(&big, rss_size, 23)?;
    util::imagetool(bins, server, &builder, &["add", "bench/ubig/1", big.to_str().context("utf-8")?])?;
    std::fs::remove_file(&big)?;
    let dev = test_support::ScratchDevice::new(&work.join("u-big.img"), rss_size)?;
    let devpath = dev.path.to_str().context("utf-8")?.to_owned();
    tool(bins, u, &publisher, &["claim-device", "vol-00000000000000b2", &devpath, "--fresh"])?;
    tool(bins, u, &publisher, &["associate", "bench/ubig", "vol-00000000000000b2"])?;
    let before = unpacker.peak_rss()?;
    let (secs, _) = unpack(bins, u, &publisher, "bench/ubig", "1")?;
    let peak = unpacker.peak_rss()?;
    rows.push(Row {
        what: format!("image-unpacker peak RSS during a {} unpack", mib(rss_size)),
        figure: format!("{} (before {}; unpack {secs:.1} s)", mib(peak), mib(before)),
        goal: "< 64 MiB".into(),
        met: Some(peak < 64 << 20),
    });
    drop(dev);
    drop(unpacker);
    Ok((rows, kind))
}
