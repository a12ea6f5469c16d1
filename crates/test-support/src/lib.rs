//! Local pieces for tests, benchmarks and the demo: a throw-away PKI, the
//! daemons on loopback, scratch block devices, and disk-like test data.
//!
//! Nothing here is mocked: daemons are the real ones with real mutual TLS,
//! and a scratch device is a real loop block device whenever the machine
//! allows it (root and `/dev/loop-control`), else a sparse file. Everything
//! is removed on drop, also when a test fails.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use fleet_pki::{Ca, LeafSpec, Role};
use fleet_tls::TlsFiles;

/// A CA in a temporary directory that issues certificates on demand.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    /// A new CA whose files go under `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        Ok(Pki { dir: dir.to_owned(), ca: Ca::new("local test CA")? })
    }

    /// Issue `spec` and write it as an ssl dir named `name`.
    pub fn issue(&self, name: &str, spec: &LeafSpec) -> anyhow::Result<TlsFiles> {
        let issued = self.ca.issue(spec)?;
        let d = self.dir.join(name);
        fleet_pki::write_ssl_dir(&d, &self.ca, &issued)?;
        Ok(TlsFiles::from_ssl_dir(&d))
    }

    /// The usual certificate of `role`.
    pub fn role(&self, role: Role) -> anyhow::Result<TlsFiles> {
        self.issue(role.name(), &LeafSpec::for_role(role))
    }

    /// Two ssl dirs of `role` that a daemon of this CA refuses, each
    /// trusting this CA (so only the client's own certificate is wrong):
    /// `expired` (ended yesterday) and `foreign` (signed by another CA);
    /// with each, the words a refusal must be named by.
    pub fn refused(&self, role: Role) -> anyhow::Result<[Refused; 2]> {
        let mut spec = LeafSpec::for_role(role);
        spec.valid_from = -time_days(30);
        spec.valid_until = -time_days(1);
        let expired = self.issue("expired", &spec)?;
        let other = Ca::new("another CA")?;
        let d = self.dir.join("foreign");
        fleet_pki::write_ssl_dir(&d, &self.ca, &other.issue(&LeafSpec::for_role(role))?)?;
        Ok([
            Refused { who: "expired", tls: expired, named_by: "it has expired" },
            Refused {
                who: "foreign",
                tls: TlsFiles::from_ssl_dir(&d),
                named_by: "not signed by the CA the server trusts",
            },
        ])
    }
}

/// A client certificate a daemon refuses (see [`Pki::refused`]).
pub struct Refused {
    pub who: &'static str,
    pub tls: TlsFiles,
    /// What an error must say to name the refusal.
    pub named_by: &'static str,
}

fn time_days(d: i64) -> fleet_pki::Duration {
    fleet_pki::Duration::days(d)
}

/// Start an imageserver on `127.0.0.1:0` with its data under `data_dir`.
pub async fn imageserver(pki: &Pki, data_dir: &Path) -> anyhow::Result<imageserver::Running> {
    imageserver_on(pki, imageserver::Store::Dir(data_dir.to_owned())).await
}

/// Start an imageserver on `127.0.0.1:0` over `store`.
pub async fn imageserver_on(pki: &Pki, store: imageserver::Store) -> anyhow::Result<imageserver::Running> {
    let mut config = imageserver::Config::new("127.0.0.1:0".parse()?, store, pki.role(Role::Imageserver)?);
    config.metrics_listen = Some("127.0.0.1:0".parse()?);
    imageserver::start(config).await
}

/// Start an image-unpacker in this process on `listen` (port 0 picks one).
pub async fn unpacker(
    pki: &Pki,
    listen: SocketAddr,
    state_dir: &Path,
    device_dir: &Path,
    image_server: &str,
) -> anyhow::Result<image_unpacker::Running> {
    std::fs::create_dir_all(device_dir)?;
    image_unpacker::start(image_unpacker::Config {
        listen,
        metrics_listen: Some(SocketAddr::new(listen.ip(), 0)),
        state_dir: state_dir.to_owned(),
        device_dir: device_dir.to_owned(),
        image_server: image_server.to_owned(),
        tls: pki.role(Role::ImageUnpacker)?,
    })
    .await
}

/// A PKI, an imageserver and an in-process unpacker that reads from it, on
/// loopback, all under one directory.
pub struct Fleet {
    pub pki: Pki,
    pub server: imageserver::Running,
    pub unpacker: image_unpacker::Running,
}

/// Start a [`Fleet`] under `dir`: the PKI in `pki/`, the imageserver's data
/// in `data/`, the unpacker's state in `state/` and its device links in
/// `by-id/`.
pub async fn fleet(dir: &Path) -> anyhow::Result<Fleet> {
    let pki = Pki::new(&dir.join("pki"))?;
    let server = imageserver(&pki, &dir.join("data")).await?;
    let unpacker =
        unpacker(&pki, "127.0.0.1:0".parse()?, &dir.join("state"), &dir.join("by-id"), &server.addr.to_string())
            .await?;
    Ok(Fleet { pki, server, unpacker })
}

/// Whether loop devices can be made here.
pub fn loop_devices_available() -> bool {
    Path::new("/dev/loop-control").exists()
        && rustix_is_root()
        && Command::new("losetup").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn rustix_is_root() -> bool {
    // The effective uid, without unsafe code: /proc/self/status "Uid:" line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// A scratch device: a loop block device over a sparse file when possible,
/// else the sparse file itself. Detached and deleted on drop.
pub struct ScratchDevice {
    /// The path to use as the device (`/dev/loopN` or the file).
    pub path: PathBuf,
    /// The sparse backing file.
    pub backing: PathBuf,
    /// Whether `path` is a loop block device.
    pub is_loop: bool,
}

impl ScratchDevice {
    /// A zero-filled device of `size` bytes backed by `backing`.
    pub fn new(backing: &Path, size: u64) -> anyhow::Result<ScratchDevice> {
        let f = std::fs::File::create(backing).with_context(|| format!("creating '{}'", backing.display()))?;
        f.set_len(size)?;
        drop(f);
        if !loop_devices_available() {
            return Ok(ScratchDevice { path: backing.to_owned(), backing: backing.to_owned(), is_loop: false });
        }
        let out = Command::new("losetup").args(["--find", "--show"]).arg(backing).output()?;
        if !out.status.success() {
            bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let dev = String::from_utf8(out.stdout)?.trim().to_owned();
        Ok(ScratchDevice { path: PathBuf::from(dev), backing: backing.to_owned(), is_loop: true })
    }

    /// Grow the device to `size` bytes (the new part reads as zeros), as an
    /// EBS volume grows after ModifyVolume: the backing file is extended
    /// and a loop device told to re-read its capacity.
    pub fn grow(&self, size: u64) -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(&self.backing)?;
        if f.metadata()?.len() >= size {
            return Ok(());
        }
        f.set_len(size)?;
        drop(f);
        if self.is_loop {
            let out = Command::new("losetup").arg("--set-capacity").arg(&self.path).output()?;
            if !out.status.success() {
                bail!("losetup --set-capacity failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(())
    }

    /// "loop device /dev/loopN" or "sparse file", for test output.
    pub fn describe(&self) -> String {
        if self.is_loop { format!("loop device {}", self.path.display()) } else { "sparse file".to_owned() }
    }

    /// The device's bytes (read through the device itself).
    pub fn read(&self, len: usize) -> anyhow::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.path)?.read_exact(&mut buf)?;
        Ok(buf)
    }
}

impl Drop for ScratchDevice {
    fn drop(&mut self) {
        if self.is_loop {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Deterministic bytes that do not compress much.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}
