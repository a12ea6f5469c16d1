//! Helpers shared by the demo and the benchmarks: building and starting the
//! workspace's binaries, generating disk images.

use std::{
    fs::File,
    io::{BufWriter, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    // xtask/world -> the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("xtask/world is two levels down").to_owned()
}

/// A `cargo` command run from the workspace root. `cargo xtask` starts this
/// program without the variables `cargo run` sets (see xtask's
/// `without_run_vars`), so the builds it starts share a shell's artifacts.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Build every binary of the workspace (dev profile) and return the
/// directory holding them. The whole workspace, not the binaries a task
/// uses: dependencies' features then resolve as in `cargo build` and
/// `cargo nextest run --workspace`, so the demo, the world and the tests
/// share one build instead of compiling the TLS stack and the SDK's HTTP
/// client once per feature set. `cargo xtask` has built them already; this
/// finds nothing to do then.
pub(crate) fn build_dev() -> anyhow::Result<PathBuf> {
    run_build(cargo().args(["build", "--workspace", "--bins"]))?;
    Ok(target_dir().join("debug"))
}

/// Build the named binaries with the release profile (the benchmarks of the
/// daemons and tools that link no AWS SDK) and return their directory.
pub(crate) fn build_release(bins: &[&str]) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--release"]);
    for b in bins {
        cmd.args(["-p", b]);
    }
    run_build(&mut cmd)?;
    Ok(target_dir().join("release"))
}

fn run_build(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// A free loopback port (the kernel picks one; we release it for the child).
pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A child process that is killed when dropped.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) name: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Peak resident memory of the process so far (VmHWM), in bytes.
    pub(crate) fn peak_rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM in /proc status")?;
        let kib: u64 = line.split_whitespace().nth(1).context("bad VmHWM line")?.parse()?;
        Ok(kib * 1024)
    }
}

/// Start an imageserver (from `bin_dir`) on a free loopback port with the
/// certificate in `pki/imageserver/`, storing in `data`, logging to `log`;
/// returns once it listens.
pub(crate) fn start_imageserver(
    bin_dir: &Path,
    pki: &Path,
    data: &Path,
    log: &Path,
) -> anyhow::Result<(Daemon, SocketAddr)> {
    start_daemon(bin_dir, "imageserver", pki, &["--data-dir".as_ref(), data.as_os_str()], log)
}

/// Start daemon `name` (from `bin_dir`) on a free loopback port with
/// `args`, the certificate in `pki/NAME/` and no metrics listener, logging
/// to `log`; returns once it listens.
pub(crate) fn start_daemon(
    bin_dir: &Path,
    name: &str,
    pki: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
) -> anyhow::Result<(Daemon, SocketAddr)> {
    let addr = free_addr()?;
    let child = Command::new(bin_dir.join(name))
        .arg("--listen")
        .arg(addr.to_string())
        .args(["--metrics-listen", "off"])
        .args(args)
        .arg("--ca")
        .arg(pki.join("CA.pem"))
        .arg("--cert")
        .arg(pki.join(name).join("cert.pem"))
        .arg("--key")
        .arg(pki.join(name).join("key.pem"))
        .stdout(Stdio::null())
        .stderr(File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    wait_listening(Daemon { child, name: name.into() }, addr, log)
}

/// Wait until a freshly started daemon accepts connections on `addr`.
pub(crate) fn wait_listening(mut d: Daemon, addr: SocketAddr, log: &Path) -> anyhow::Result<(Daemon, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = d.child.try_wait()? {
            bail!("{} exited ({status}); see {}", d.name, log.display());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 20 s; see {}", d.name, log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((d, addr))
}

/// Make `DIR` hold CA.pem, cert.pem and key.pem of `role` (the ~/.ssl layout).
pub(crate) fn ssl_dir(pki: &Path, role: &str, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(pki.join("CA.pem"), dir.join("CA.pem"))?;
    std::fs::copy(pki.join(role).join("cert.pem"), dir.join("cert.pem"))?;
    std::fs::copy(pki.join(role).join("key.pem"), dir.join("key.pem"))?;
    Ok(())
}

/// Run imagetool with `--json` and parse its output.
pub(crate) fn imagetool(
    bin_dir: &Path,
    server: SocketAddr,
    ssl: &Path,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    json_tool(bin_dir, "imagetool", "--server", server, ssl, args)
}

/// Run one of the workspace's tools (`imagetool`, `unpacker-tool`) with
/// `--json` against the daemon at `addr` (given with `addr_flag`); its JSON.
pub(crate) fn json_tool(
    bin_dir: &Path,
    tool: &str,
    addr_flag: &str,
    addr: SocketAddr,
    ssl: &Path,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(bin_dir.join(tool))
        .arg(addr_flag)
        .arg(addr.to_string())
        .arg("--ssl-dir")
        .arg(ssl)
        .arg("--json")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} {} failed ({})", args.join(" "), out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing {tool} --json output"))
}

/// Fast deterministic noise (xorshift64), written in 1 MiB pieces.
pub(crate) struct Noise(u64);

impl Noise {
    pub(crate) fn new(seed: u64) -> Noise {
        Noise(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
}

/// Write `len` bytes of noise to `path`.
pub(crate) fn write_noise(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut n = Noise::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let take = usize::try_from(left.min(buf.len() as u64)).expect("at most 1 MiB");
        n.fill(&mut buf[..take]);
        w.write_all(&buf[..take])?;
        left -= take as u64;
    }
    w.flush()?;
    Ok(())
}

/// Overwrite `count` evenly spread 512 KiB chunks of `path` with new noise,
/// skipping all-zero chunks when `only_data` is set. Returns bytes changed.
pub(crate) fn change_chunks(path: &Path, fraction: f64, seed: u64) -> anyhow::Result<u64> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 512 * 1024;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let chunks = f.metadata()?.len() / CHUNK;
    // A fraction of a count of chunks, rounded up; at least one.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let want = ((chunks as f64 * fraction.clamp(0.0, 1.0)).ceil() as u64).max(1);
    let step = (chunks / want).max(1);
    let mut n = Noise::new(seed);
    let mut buf = vec![0u8; usize::try_from(CHUNK)?];
    let mut changed = 0;
    for i in (0..chunks).step_by(usize::try_from(step)?).take(usize::try_from(want)?) {
        n.fill(&mut buf);
        f.write_all_at(&buf, i * CHUNK)?;
        changed += CHUNK;
    }
    f.sync_all()?;
    Ok(changed)
}

/// Whether two files hold the same bytes.
pub(crate) fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        Ok(got)
    }
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

pub(crate) fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
