//! The EBS attacher: the one simulated piece of the world.
//!
//! Per target, a task asks the emulator which volumes are attached to the
//! unpacker instance (every 100 ms while things change, backing off to
//! 800 ms while idle). A newly attached volume gets a scratch device
//! (a loop device when possible, else a sparse file) of the volume's size,
//! kept for as long as the volume exists so that its bytes survive detach and
//! re-attach, and a Nitro-style link `nvme-Amazon_Elastic_Block_Store_vol…` in
//! the instance's device directory. A detached volume's link goes away.
//! moto (through `moto_launch.py`) copies a volume's backing file when a
//! snapshot of it is created, so a snapshot holds the bytes of that moment
//! as in EBS; the attacher records those copies so tests can check what is
//! behind an AMI.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_sdk_ec2::types::Filter;
use test_support::ScratchDevice;

use crate::{SnapshotCopy, World};

struct Watched {
    account: String,
    region: String,
    instance_id: String,
    root_volumes: Vec<String>,
    device_dir: PathBuf,
}

pub(crate) fn spawn(world: &World) -> tokio::task::JoinHandle<()> {
    let (config, credentials) = (world.config_file.clone(), world.credentials_file.clone());
    let volumes_dir = world.dir.path().join("volumes");
    let snapshots_dir = world.dir.path().join("snapshots");
    let _ = std::fs::create_dir_all(&volumes_dir);
    let _ = std::fs::create_dir_all(&snapshots_dir);
    let watched: Vec<Watched> = world
        .targets
        .iter()
        .map(|t| Watched {
            account: t.account.clone(),
            region: t.region.clone(),
            instance_id: t.instance_id.clone(),
            root_volumes: t.root_volumes.clone(),
            device_dir: t.device_dir.clone(),
        })
        .collect();
    let snapshots = world.snapshots.clone();
    // One task per target; aborting the parent's set aborts them all.
    tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for w in watched {
            let cfg = crate::sdk_config(&config, &credentials, &w.account, &w.region).await;
            let ec2 = aws_sdk_ec2::Client::new(&cfg);
            let mut state = AttachState {
                devices: HashMap::new(),
                volumes_dir: volumes_dir.clone(),
                snapshots_dir: snapshots_dir.clone(),
                snapshots: snapshots.clone(),
            };
            set.spawn(async move {
                // Poll fast while things change, back off to 1 s while idle:
                // moto is one process serving every target.
                let mut wait = FAST;
                loop {
                    match state.sync(&w, &ec2).await {
                        Ok(true) => wait = FAST,
                        Ok(false) => wait = (wait * 2).min(IDLE),
                        Err(e) => tracing::debug!(error = %e, region = %w.region, "attacher poll failed"),
                    }
                    tokio::time::sleep(wait).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
    })
}

const FAST: Duration = Duration::from_millis(300);
const IDLE: Duration = Duration::from_millis(1500);

struct AttachState {
    /// Volume id -> its scratch device (this target's volumes only).
    devices: HashMap<String, ScratchDevice>,
    volumes_dir: PathBuf,
    snapshots_dir: PathBuf,
    snapshots: Arc<Mutex<HashMap<String, SnapshotCopy>>>,
}

impl AttachState {
    /// One poll; returns whether anything changed.
    async fn sync(&mut self, w: &Watched, ec2: &aws_sdk_ec2::Client) -> anyhow::Result<bool> {
        let mut changed = false;
        let all = ec2.describe_volumes().send().await?;
        let mut present = HashSet::new();
        let mut existing = HashSet::new();
        for v in all.volumes() {
            let Some(id) = v.volume_id() else { continue };
            existing.insert(id.to_owned());
            // The device is there once the attachment is `attached` (not
            // while `attaching`), and gone once a detach has begun.
            let attached_here = v.attachments().iter().any(|a| {
                a.instance_id() == Some(w.instance_id.as_str())
                    && a.state().is_some_and(|s| matches!(s.as_str(), "attached" | "busy"))
            });
            if w.root_volumes.iter().any(|r| r == id) || !attached_here {
                continue;
            }
            present.insert(id.to_owned());
            let size = u64::try_from(v.size().unwrap_or(1)).unwrap_or(1) << 30;
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
        let snaps = ec2
            .describe_snapshots()
            .filters(
                Filter::builder().name("volume-id").set_values(Some(self.devices.keys().cloned().collect())).build(),
            )
            .send()
            .await?;
        for s in snaps.snapshots() {
            let (Some(sid), Some(vid)) = (s.snapshot_id(), s.volume_id()) else { continue };
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
