//! What the data path costs (`cargo xtask bench --only datapath`): CPU
//! seconds per GiB of the image-unpacker, of `imagetool get` to /dev/null
//! and of dd onto the same device, each pinned to one core with the
//! imageserver pinned to the other; get and unpack from an imageserver on
//! S3 (the world's moto) against one on a directory; and the imageserver's
//! peak RSS with 64 readers on each store.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    bench::Row,
    util::{self, Daemon, mib},
};

pub(crate) const TITLE: &str = "data path";

/// What the figures above rest on, written under the table.
pub(crate) const NOTE: &str = "\
What cut the fetch path's kernel time (issue 22), measured by hand on this machine with the imageserver \
pinned to core 0 and `imagetool get` of a 256 MiB image to /dev/null pinned to core 1, three runs each: \
the system time was not the socket layer but page faults. glibc's malloc gave chunk-sized buffers back \
to the kernel (per-thread arenas trimmed with madvise) and faulted them in again: 100,000 to 120,000 minor \
faults per 256 MiB, 0.32 to 0.37 s of system time. With mimalloc as the allocator of imagetool and the \
image-unpacker: about 420 faults and 0.04 to 0.05 s (wall 0.58 s to 0.34 s). The protocol changes cut \
system calls: HTTP/2 frames of up to 1 MiB instead of 16 KiB, so a 512 KiB chunk is one DATA frame (the \
client's futex calls 75,589 to 6,399, the server's writev 16,905 to 4,617), and reads buffered 256 KiB \
beneath TLS, as rustls reads one record per call (the client's recvfrom 17,010 to 1,138). Before all \
three, this benchmark's first run gave get 2.28 CPU-s/GiB (user 0.88, system 1.40) and unpack 1.88 \
(user 1.00, system 0.88) for 256 MiB. The imageserver keeps glibc's malloc: with mimalloc its peak RSS \
with 64 readers rose from about 106 MiB to 178 MiB (directory) and 618 MiB (S3).\n\n";

/// The core the imageserver runs on; the client of each measure runs on
/// the other.
const SERVER_CORE: usize = 0;
const CLIENT_CORE: usize = 1;

/// Pin every thread of a running process (and those it starts later) to
/// one core.
fn pin(pid: u32, core: usize) -> anyhow::Result<()> {
    let s = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("taskset (util-linux) is needed for the data path benchmark")?;
    if !s.success() {
        bail!("taskset -p {pid} failed ({s})");
    }
    Ok(())
}

/// User and system CPU seconds a process has used so far.
fn cpu_of(pid: u32) -> anyhow::Result<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').context("bad /proc stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = clock_ticks()?;
    Ok(Cpu { user: f[11].parse::<f64>()? / ticks, sys: f[12].parse::<f64>()? / ticks })
}

fn clock_ticks() -> anyhow::Result<f64> {
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn minus(self, before: Cpu) -> Cpu {
        Cpu { user: self.user - before.user, sys: self.sys - before.sys }
    }

    fn total(self) -> f64 {
        self.user + self.sys
    }

    /// Per GiB of `bytes`: "2.40 (user 1.02, system 1.38)".
    fn per_gib(self, bytes: u64) -> String {
        let g = bytes as f64 / (1u64 << 30) as f64;
        format!("{:.2} (user {:.2}, system {:.2})", self.total() / g, self.user / g, self.sys / g)
    }
}

/// Run `cmd` pinned to the client core; its wall seconds and the CPU it
/// (and its children) used, as the shell's `times` reports it.
fn pinned(cmd: &[&str]) -> anyhow::Result<(f64, Cpu)> {
    let t = Instant::now();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("taskset -c {CLIENT_CORE} \"$@\" >/dev/null || exit 1; times"))
        .arg("pinned")
        .args(cmd)
        .output()?;
    let wall = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // `times`: the shell's own user and system time, then its children's.
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).context("no `times` line for the children")?;
    let secs = |s: &str| -> anyhow::Result<f64> {
        let (m, rest) = s.split_once('m').context("bad times field")?;
        Ok(m.parse::<f64>()? * 60.0 + rest.trim_end_matches('s').parse::<f64>()?)
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    Ok((wall, Cpu { user: secs(f[0])?, sys: secs(f[1])? }))
}

fn unpacker_tool(bins: &Path, u: SocketAddr, ssl: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    util::json_tool(bins, "unpacker-tool", "--unpacker", u, ssl, args)
}

/// A full unpack of `stream`/`leaf` onto a device declared fresh; its
/// wall seconds.
fn full_unpack(bins: &Path, u: SocketAddr, ssl: &Path, dev: &Path, stream: &str, leaf: &str) -> anyhow::Result<f64> {
    let devpath = dev.to_str().context("utf-8")?;
    let _ = unpacker_tool(bins, u, ssl, &["forget-stream", stream]);
    let _ = unpacker_tool(bins, u, ssl, &["remove-device", "vol-000000000000d0a7"]);
    unpacker_tool(bins, u, ssl, &["claim-device", "vol-000000000000d0a7", devpath, "--fresh"])?;
    unpacker_tool(bins, u, ssl, &["associate", stream, "vol-000000000000d0a7"])?;
    let t = Instant::now();
    let r = unpacker_tool(bins, u, ssl, &["unpack-image", stream, leaf])?;
    let secs = t.elapsed().as_secs_f64();
    if r["bytes_written"].as_u64().is_none_or(|b| b == 0) {
        bail!("the unpack wrote nothing: {r}");
    }
    Ok(secs)
}

fn start_unpacker(bins: &Path, pki: &Path, work: &Path, server: SocketAddr) -> anyhow::Result<(Daemon, SocketAddr)> {
    let server = server.to_string();
    let state = work.join("dp-unpacker-state");
    let _ = std::fs::remove_dir_all(&state);
    let args = [
        "--image-server".as_ref(),
        server.as_ref(),
        "--state-dir".as_ref(),
        state.as_os_str(),
        "--device-dir".as_ref(),
        work.as_os_str(),
    ];
    util::start_daemon(bins, "image-unpacker", pki, &args, &work.join("dp-unpacker.log"))
}

/// An imageserver over `s3://BUCKET/PREFIX` of the store at `objects`.
fn start_s3_imageserver(
    bins: &Path,
    pki: &Path,
    objects: &local_world::ObjectStore,
    at: &str,
    log: &Path,
) -> anyhow::Result<(Daemon, SocketAddr)> {
    let addr = util::free_addr()?;
    let child = Command::new(bins.join("imageserver"))
        .args(["--listen", &addr.to_string(), "--metrics-listen", "off", "--store", at])
        .arg("--ca")
        .arg(pki.join("CA.pem"))
        .arg("--cert")
        .arg(pki.join("imageserver/cert.pem"))
        .arg("--key")
        .arg(pki.join("imageserver/key.pem"))
        .envs(objects.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()?;
    util::wait_listening(Daemon { child, name: "imageserver".into() }, addr, log)
}

pub(crate) fn run(bins: &Path, pki: &Path, work: &Path, quick: bool) -> anyhow::Result<Vec<Row>> {
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let readers_size: u64 = if quick { 32 << 20 } else { 128 << 20 };
    let ssl = work.join("ssl");
    util::ssl_dir(pki, "image-builder", &ssl)?;
    let publisher = work.join("ssl-publisher");
    util::ssl_dir(pki, "ami-publisher", &publisher)?;
    let mut rows = Vec::new();

    let raw = work.join("dp.raw");
    util::write_noise(&raw, size, 31)?;
    let raw_s = raw.to_str().context("utf-8")?;
    let dev = test_support::ScratchDevice::new(&work.join("dp-vol.img"), size)?;
    let kind = dev.describe();
    let (server, addr) = util::start_imageserver(bins, pki, &work.join("dp-data"), &work.join("dp-imageserver.log"))?;
    util::imagetool(bins, addr, &ssl, &["add", "bench/dp/1", raw_s])?;
    pin(server.child.id(), SERVER_CORE)?;
    let addr_s = addr.to_string();
    let ssl_s = ssl.to_str().context("utf-8")?;
    let imagetool = bins.join("imagetool");
    let imagetool_s = imagetool.to_str().context("utf-8")?;

    // 1. imagetool get to /dev/null, pinned.
    let get = || pinned(&[imagetool_s, "--server", &addr_s, "--ssl-dir", ssl_s, "get", "bench/dp/1", "/dev/null"]);
    get()?; // warm the page cache of the server's chunks
    let s0 = cpu_of(server.child.id())?;
    let (get_wall, get_cpu) = get()?;
    let get_server = cpu_of(server.child.id())?.minus(s0);

    // 2. dd of the raw file onto the device, pinned.
    let dev_s = dev.path.to_str().context("utf-8")?;
    let (dd_wall, dd_cpu) =
        pinned(&["dd", &format!("if={raw_s}"), &format!("of={dev_s}"), "bs=4M", "conv=fsync,notrunc", "status=none"])?;

    // 3. A full unpack by the daemon, pinned.
    let (unpacker, u) = start_unpacker(bins, pki, work, addr)?;
    pin(unpacker.child.id(), CLIENT_CORE)?;
    full_unpack(bins, u, &publisher, &dev.path, "bench/dp", "1")?; // warm-up
    let (u0, s0) = (cpu_of(unpacker.child.id())?, cpu_of(server.child.id())?);
    let unpack_wall = full_unpack(bins, u, &publisher, &dev.path, "bench/dp", "1")?;
    let unpack_cpu = cpu_of(unpacker.child.id())?.minus(u0);
    let unpack_server = cpu_of(server.child.id())?.minus(s0);
    let goal = get_cpu.total() + dd_cpu.total();
    rows.push(Row {
        what: format!(
            "CPU seconds per GiB, client pinned to core {CLIENT_CORE} and imageserver to core {SERVER_CORE}: image-unpacker's full unpack onto a {kind}, `imagetool get` to /dev/null, dd (bs=4M, conv=fsync) onto the device"
        ),
        figure: format!(
            "unpack {}; get {}; dd {}; the imageserver meanwhile: {} for the unpack, {} for the get",
            unpack_cpu.per_gib(size),
            get_cpu.per_gib(size),
            dd_cpu.per_gib(size),
            unpack_server.per_gib(size),
            get_server.per_gib(size),
        ),
        goal: "unpack <= get + dd".into(),
        met: Some(unpack_cpu.total() <= goal),
    });
    let rate = |secs: f64| size as f64 / 1048576.0 / secs;
    rows.push(Row {
        what: format!("pinned wall times for {}", mib(size)),
        figure: format!(
            "unpack {unpack_wall:.2} s ({:.0} MiB/s); get {get_wall:.2} s ({:.0} MiB/s); dd {dd_wall:.2} s ({:.0} MiB/s)",
            rate(unpack_wall),
            rate(get_wall),
            rate(dd_wall)
        ),
        goal: "reported".into(),
        met: None,
    });
    drop(unpacker);

    // 4. The same image from an imageserver on S3 (moto), unpinned, against
    // the directory's server in the same way.
    let (local_get, _) = get_unpinned(bins, addr, &ssl, "bench/dp/1")?;
    let objects = local_world::ObjectStore::start()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(objects.bucket("bench"))?;
    let (s3_server, s3_addr) =
        start_s3_imageserver(bins, pki, &objects, "s3://bench/images", &work.join("dp-s3-imageserver.log"))?;
    util::imagetool(bins, s3_addr, &ssl, &["add", "bench/dp/1", raw_s])?;
    let (s3_get, _) = get_unpinned(bins, s3_addr, &ssl, "bench/dp/1")?;
    let (unpacker, u) = start_unpacker(bins, pki, work, addr)?;
    let local_unpack = full_unpack(bins, u, &publisher, &dev.path, "bench/dp", "1")?;
    drop(unpacker);
    let (unpacker, u) = start_unpacker(bins, pki, work, s3_addr)?;
    let s3_unpack = full_unpack(bins, u, &publisher, &dev.path, "bench/dp", "1")?;
    drop(unpacker);
    rows.push(Row {
        what: format!(
            "get (to /dev/null) and full unpack of {} from an imageserver on S3 (the world's moto on loopback), as a ratio to the same from one on a directory",
            mib(size)
        ),
        figure: format!(
            "get {:.2} ({s3_get:.2} s = {:.0} MiB/s vs {local_get:.2} s); unpack {:.2} ({s3_unpack:.2} s vs {local_unpack:.2} s); moto, one Python process, is the bucket",
            local_get / s3_get,
            rate(s3_get),
            local_unpack / s3_unpack
        ),
        goal: "reported".into(),
        met: None,
    });

    // 5. Peak RSS with 64 readers, on each store: fresh servers (the peak
    // is the process's whole life), over the stores filled above.
    let small = work.join("dp-readers.raw");
    util::write_noise(&small, readers_size, 32)?;
    let small_s = small.to_str().context("utf-8")?;
    util::imagetool(bins, addr, &ssl, &["add", "bench/dpr/1", small_s])?;
    util::imagetool(bins, s3_addr, &ssl, &["add", "bench/dpr/1", small_s])?;
    drop(server);
    drop(s3_server);
    let mut figures = Vec::new();
    let mut worst = 0;
    for what in ["directory", "S3"] {
        let (srv, a) = if what == "S3" {
            start_s3_imageserver(bins, pki, &objects, "s3://bench/images", &work.join("dp-s3-rss.log"))?
        } else {
            util::start_imageserver(bins, pki, &work.join("dp-data"), &work.join("dp-rss.log"))?
        };
        let before = srv.peak_rss()?;
        let t = Instant::now();
        let clients: Vec<_> = (0..64)
            .map(|_| {
                Command::new(&imagetool)
                    .args(["--server", &a.to_string(), "--ssl-dir", ssl_s, "--json", "verify", "bench/dpr/1"])
                    .stdout(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        for mut c in clients {
            if !c.wait()?.success() {
                bail!("a reader of the {what} store failed");
            }
        }
        let peak = srv.peak_rss()?;
        worst = worst.max(peak);
        figures.push(format!("{what}: {} (idle {}; {:.1} s)", mib(peak), mib(before), t.elapsed().as_secs_f64()));
    }
    rows.push(Row {
        what: format!(
            "imageserver peak RSS while 64 clients verify a {} image at once, on each store",
            mib(readers_size)
        ),
        figure: figures.join("; "),
        goal: "< 128 MiB".into(),
        met: Some(worst < 128 << 20),
    });
    std::fs::remove_file(&small)?;
    std::fs::remove_file(&raw)?;
    drop(dev);
    Ok(rows)
}

/// `imagetool get` to /dev/null, unpinned: wall seconds (best of 2).
fn get_unpinned(bins: &Path, addr: SocketAddr, ssl: &Path, image: &str) -> anyhow::Result<(f64, ())> {
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        util::imagetool(bins, addr, ssl, &["get", image, "/dev/null"])?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, ()))
}
