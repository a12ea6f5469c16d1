//! The EBS attacher: the one simulated piece of the world.
//!
//! One task reads the emulator's view of every account and region
//! (`GET /_world/attachments`, added by `moto_launch.py`: volumes with the
//! instance each is attached to, and snapshots with their volumes) every
//! 100 ms while things change, backing off to 800 ms while idle, and hands
//! it to a task per target. There, a newly attached volume gets a scratch
//! device (a loop device when possible, else a sparse file) of the volume's
//! size, kept for as long as the volume exists so that its bytes survive
//! detach and re-attach, and a Nitro-style link
//! `nvme-Amazon_Elastic_Block_Store_vol…` in the instance's device
//! directory. A detached volume's link goes away. moto (through
//! `moto_launch.py`) copies a volume's backing file when a snapshot of it is
//! created, so a snapshot holds the bytes of that moment as in EBS; the
//! attacher records those copies so tests can check what is behind an AMI.
//!
//! One cheap view instead of DescribeVolumes and DescribeSnapshots per
//! target: polling through the EC2 API made the single emulator process
//! busier serving the attacher than serving the tool under test.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;
use test_support::ScratchDevice;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{SnapshotCopy, World};

struct Watched {
    account_id: String,
    region: String,
    instance_id: String,
    root_volumes: Vec<String>,
    device_dir: PathBuf,
}

/// One account and region as the emulator sees it.
#[derive(Debug, Deserialize, PartialEq)]
struct RegionView {
    account: String,
    region: String,
    volumes: Vec<VolumeView>,
    snapshots: Vec<SnapshotView>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct VolumeView {
    id: String,
    /// GiB.
    size: u64,
    /// The instance it is attached to (state `attached`), if any.
    instance: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct SnapshotView {
    id: String,
    volume: String,
}

type View = Arc<Vec<RegionView>>;

pub(crate) fn spawn(world: &World) -> tokio::task::JoinHandle<()> {
    let endpoint = world.moto.endpoint.clone();
    let volumes_dir = world.dir.path().join("volumes");
    let snapshots_dir = world.dir.path().join("snapshots");
    let _ = std::fs::create_dir_all(&volumes_dir);
    let _ = std::fs::create_dir_all(&snapshots_dir);
    let watched: Vec<Watched> = world
        .targets
        .iter()
        .map(|t| Watched {
            account_id: t.account_id.clone(),
            region: t.region.clone(),
            instance_id: t.instance_id.clone(),
            root_volumes: t.root_volumes.clone(),
            device_dir: t.device_dir.clone(),
        })
        .collect();
    let snapshots = world.snapshots.clone();
    // One task per target; aborting the parent's set aborts them all.
    tokio::spawn(async move {
        let (tx, rx) = tokio::sync::watch::channel::<View>(Arc::default());
        let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut set = tokio::task::JoinSet::new();
        for w in watched {
            let mut state = AttachState {
                devices: HashMap::new(),
                volumes_dir: volumes_dir.clone(),
                snapshots_dir: snapshots_dir.clone(),
                snapshots: snapshots.clone(),
            };
            let (mut rx, changed_tx) = (rx.clone(), changed_tx.clone());
            set.spawn(async move {
                while rx.changed().await.is_ok() {
                    let view = rx.borrow_and_update().clone();
                    let Some(mine) = view.iter().find(|r| r.account == w.account_id && r.region == w.region) else {
                        continue;
                    };
                    match state.sync(&w, mine).await {
                        Ok(true) => {
                            let _ = changed_tx.send(());
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, region = %w.region, "attacher: sync failed"),
                    }
                }
            });
        }
        // Poll fast while the view changes, back off while idle.
        let mut wait = FAST;
        let mut last: Option<View> = None;
        loop {
            match read_view(&endpoint).await {
                Ok(view) => {
                    let view = Arc::new(view);
                    let changed = last.as_ref() != Some(&view);
                    if changed {
                        last = Some(view.clone());
                        let _ = tx.send(view);
                        wait = FAST;
                    } else {
                        wait = (wait * 2).min(IDLE);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "attacher: view unreadable"),
            }
            // A target that acted (made a device or a link) wants a quick
            // second look, as it may have raced a change.
            while changed_rx.try_recv().is_ok() {
                wait = FAST;
            }
            tokio::time::sleep(wait).await;
        }
    })
}

/// GET the emulator's view (HTTP/1.0: the server closes after answering).
async fn read_view(endpoint: &str) -> anyhow::Result<Vec<RegionView>> {
    let host = endpoint.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(host).await?;
    conn.write_all(format!("GET /_world/attachments HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").context("no HTTP header end")?;
    let (head, body) = answer.split_at(split + 4);
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(head)
    );
    Ok(serde_json::from_slice(body)?)
}

const FAST: Duration = Duration::from_millis(100);
const IDLE: Duration = Duration::from_millis(800);

struct AttachState {
    /// Volume id -> its scratch device (this target's volumes only).
    devices: HashMap<String, ScratchDevice>,
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
    snapshots: Arc<Mutex<HashMap<String, SnapshotCopy>>>,
}

impl AttachState {
    /// One poll; returns whether anything changed.
    async fn sync(&mut self, w: &Watched, view: &RegionView) -> anyhow::Result<bool> {
        let mut changed = false;
        let mut present = HashSet::new();
        let mut existing = HashSet::new();
        for v in &view.volumes {
            let id = v.id.as_str();
            existing.insert(id.to_owned());
            // The device is there once the attachment is `attached` (not
            // while `attaching`), and gone once a detach has begun.
            let attached_here = v.instance.as_deref() == Some(w.instance_id.as_str());
            if w.root_volumes.iter().any(|r| r == id) || !attached_here {
                continue;
            }
            present.insert(id.to_owned());
            let size = v.size.max(1) << 30;
            match self.devices.get(id) {
                None => {
                    let dev = ScratchDevice::new(&self.volumes_dir.join(format!("{id}.img")), size)?;
                    tracing::info!(volume = id, device = %dev.describe(), "attacher: new volume");
                    self.devices.insert(id.to_owned(), dev);
                }
                // ModifyVolume grew it: so does the device, as on Nitro.
                Some(dev) if std::fs::metadata(&dev.backing).is_ok_and(|m| m.len() < size) => {
                    dev.grow(size)?;
                    tracing::info!(volume = id, size, "attacher: volume grown");
                    changed = true;
                }
                Some(_) => {}
            }
            let link = w.device_dir.join(image_unpacker::devices::nitro_name(id));
            if std::fs::symlink_metadata(&link).is_err() {
                std::fs::create_dir_all(&w.device_dir)?;
                std::os::unix::fs::symlink(&self.devices[id].path, &link)?;
                changed = true;
            }
        }
        // Links of volumes no longer attached here go away.
        if let Ok(entries) = std::fs::read_dir(&w.device_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(raw) = name.strip_prefix(image_unpacker::devices::NITRO_PREFIX) else { continue };
                let id = raw.replacen("vol", "vol-", 1);
                if !present.contains(&id) {
                    let _ = std::fs::remove_file(e.path());
                    changed = true;
                }
            }
        }
        // Volumes deleted from the emulator lose their scratch devices.
        let before = self.devices.len();
        self.devices.retain(|k, _| existing.contains(k));
        changed |= self.devices.len() != before;
        if self.devices.is_empty() {
            return Ok(changed);
        }
        // Snapshots of volumes we hold: copy the bytes once.
        for s in &view.snapshots {
            let (sid, vid) = (s.id.as_str(), s.volume.as_str());
            if self.snapshots.lock().expect("snapshots lock").contains_key(sid) {
                continue;
            }
            let Some(dev) = self.devices.get(vid) else { continue };
            let copy = self.snapshots_dir.join(format!("{sid}.img"));
            // moto's CreateSnapshot copied the bytes as it answered (see
            // moto_launch.py), as EBS snapshots a volume at that moment.
            // Failing that (an old launcher), copy them now: the backing
            // file, not the loop device, since it is sparse.
            let made = copy.exists() || {
                tracing::warn!(snapshot = sid, "attacher: moto made no copy at CreateSnapshot; copying now");
                tokio::process::Command::new("cp")
                    .arg("--sparse=always")
                    .arg(&dev.backing)
                    .arg(&copy)
                    .status()
                    .await?
                    .success()
            };
            if made {
                tracing::info!(snapshot = sid, volume = vid, "attacher: snapshot bytes kept");
                self.snapshots
                    .lock()
                    .expect("snapshots lock")
                    .insert(sid.to_owned(), SnapshotCopy { volume_id: vid.to_owned(), path: copy });
                changed = true;
            }
        }
        Ok(changed)
    }
}
