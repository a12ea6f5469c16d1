//! The unpacker's persistent record: devices, stream bindings, and what each
//! device holds.
//!
//! `STATE_DIR/state.json` holds devices and streams; `STATE_DIR/content/VOL`
//! holds the encoded manifest a device was last brought to. Both are written
//! atomically (temp file, fsync, rename). **Invariant:** before any write to
//! a device its content record is removed and its stream marked unpacking,
//! so a crash can only ever leave "unknown" (rescan), never a wrong record.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use fleet_proto::unpacker::StreamState;
use image_format::Manifest;
use serde::{Deserialize, Serialize};

use crate::blockdev::Kind;

/// What a device is known to hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Not known: a scan must come before an unpack.
    Unknown,
    /// Made empty by the caller: every byte reads as zero.
    Fresh,
    /// Exactly this manifest's bytes (from byte 0).
    Known(Manifest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub path: PathBuf,
    pub size: u64,
    pub kind: Kind,
    #[serde(default)]
    pub attach_name: Option<String>,
    /// The id of the manifest in `content/VOL`, or "fresh".
    #[serde(default)]
    pub content_id: Option<String>,
    #[serde(skip, default = "unknown")]
    pub content: Content,
}

fn unknown() -> Content {
    Content::Unknown
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Unprepared,
    Dirty,
    Prepared,
    Scanning,
    Unpacking,
    Unpacked,
    Verified,
}

impl Phase {
    pub fn proto(self) -> StreamState {
        match self {
            Phase::Unprepared => StreamState::Unprepared,
            Phase::Dirty => StreamState::Dirty,
            Phase::Prepared => StreamState::Prepared,
            Phase::Scanning => StreamState::Scanning,
            Phase::Unpacking => StreamState::Unpacking,
            Phase::Unpacked => StreamState::Unpacked,
            Phase::Verified => StreamState::Verified,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub volume_id: String,
    pub phase: Phase,
    /// The leaf on the device once unpacked.
    #[serde(default)]
    pub leaf: Option<String>,
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub image_size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub devices: BTreeMap<String, DeviceRecord>,
    pub streams: BTreeMap<String, StreamRecord>,
    /// Unix seconds of the last call that changed or used anything.
    #[serde(default)]
    pub last_used_unix: u64,
    /// Capture holds by stream (kept here so that they outlive a restart).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capture_holds: BTreeMap<String, CaptureHolds>,
    #[serde(skip)]
    dir: PathBuf,
}

/// The capture holds on one stream: all of the same leaf.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CaptureHolds {
    pub leaf: String,
    /// Hold id -> when that hold ends (Unix milliseconds).
    pub until_unix_ms: BTreeMap<String, u64>,
}

const STATE_FILE: &str = "state.json";
const CONTENT_DIR: &str = "content";

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

impl State {
    /// Load the record from `dir` (created if missing). Streams cut short
    /// by a crash become dirty and their device's content unknown.
    pub fn load(dir: &Path) -> anyhow::Result<State> {
        std::fs::create_dir_all(dir.join(CONTENT_DIR))
            .with_context(|| format!("creating the state directory '{}'", dir.display()))?;
        let path = dir.join(STATE_FILE);
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .with_context(|| format!("'{}' is not a valid unpacker state file", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                State { last_used_unix: now_unix(), ..State::default() }
            }
            Err(e) => return Err(e).with_context(|| format!("reading '{}'", path.display())),
        };
        state.dir = dir.to_owned();
        let mut repaired = false;
        for rec in state.streams.values_mut() {
            if matches!(rec.phase, Phase::Scanning | Phase::Unpacking) {
                tracing::warn!(volume = %rec.volume_id, "an unpack or scan was cut short; the device will be rescanned");
                rec.phase = Phase::Dirty;
                rec.leaf = None;
                rec.image_id = None;
                repaired = true;
            }
        }
        let dirty: Vec<String> =
            state.streams.values().filter(|s| s.phase == Phase::Dirty).map(|s| s.volume_id.clone()).collect();
        for (vol, dev) in &mut state.devices {
            dev.content = match dev.content_id.as_deref() {
                _ if dirty.contains(vol) => Content::Unknown,
                Some("fresh") => Content::Fresh,
                Some(id) => load_content(dir, vol, id),
                None => Content::Unknown,
            };
            if dev.content == Content::Unknown && dev.content_id.is_some() {
                dev.content_id = None;
                repaired = true;
            }
        }
        if repaired {
            state.save()?;
        }
        Ok(state)
    }

    /// Write `state.json` atomically.
    pub fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        fleet_fs::write_atomic(&self.dir.join(STATE_FILE), &bytes).context("saving the unpacker state")
    }

    /// Record what a device holds (manifest file first, then the state).
    pub fn set_content(&mut self, volume_id: &str, content: Content) -> anyhow::Result<()> {
        let file = self.dir.join(CONTENT_DIR).join(volume_id);
        let id = match &content {
            Content::Unknown => None,
            Content::Fresh => Some("fresh".to_owned()),
            Content::Known(m) => {
                fleet_fs::write_atomic(&file, &m.encode()).context("saving a device's manifest")?;
                Some(m.image_id().to_hex())
            }
        };
        if let Some(dev) = self.devices.get_mut(volume_id) {
            dev.content_id = id;
            dev.content = content;
        }
        self.save()?;
        if self.devices.get(volume_id).is_some_and(|d| !matches!(d.content, Content::Known(_))) {
            let _ = std::fs::remove_file(&file);
        }
        Ok(())
    }

    /// Mark the state as used now (not saved on its own: callers save).
    pub fn touch(&mut self) {
        self.last_used_unix = now_unix();
    }

    /// The stream bound to a volume, if any.
    pub fn stream_of(&self, volume_id: &str) -> Option<&str> {
        self.streams.iter().find(|(_, s)| s.volume_id == volume_id).map(|(name, _)| name.as_str())
    }
}

fn load_content(dir: &Path, volume_id: &str, id: &str) -> Content {
    let file = dir.join(CONTENT_DIR).join(volume_id);
    match std::fs::read(&file).map_err(|e| e.to_string()).and_then(|b| Manifest::decode(&b).map_err(|e| e.to_string()))
    {
        Ok(m) if m.image_id().to_hex() == id => Content::Known(m),
        Ok(_) => {
            tracing::warn!(volume = volume_id, "content record does not match the state; the device will be rescanned");
            Content::Unknown
        }
        Err(e) => {
            tracing::warn!(volume = volume_id, error = %e, "content record unreadable; the device will be rescanned");
            Content::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use image_format::{ChunkRef, Digest};

    use super::*;

    fn device(path: &str) -> DeviceRecord {
        DeviceRecord {
            path: path.into(),
            size: 1 << 20,
            kind: Kind::File,
            attach_name: None,
            content_id: None,
            content: Content::Unknown,
        }
    }

    #[test]
    fn state_round_trips_and_cut_short_unpacks_become_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::load(dir.path()).unwrap();
        s.devices.insert("vol-00000001".into(), device("/a"));
        s.devices.insert("vol-00000002".into(), device("/b"));
        let m = Manifest::new(4096, 8192, vec![ChunkRef::Data(Digest([1; 32])), ChunkRef::Zero]).unwrap();
        s.set_content("vol-00000001", Content::Known(m.clone())).unwrap();
        s.set_content("vol-00000002", Content::Known(m.clone())).unwrap();
        let rec = |vol: &str, phase| StreamRecord {
            volume_id: vol.into(),
            phase,
            leaf: Some("1".into()),
            image_id: Some(m.image_id().to_hex()),
            image_size: 8192,
        };
        s.streams.insert("a/x".into(), rec("vol-00000001", Phase::Unpacked));
        s.streams.insert("a/y".into(), rec("vol-00000002", Phase::Unpacking));
        s.save().unwrap();

        let s = State::load(dir.path()).unwrap();
        assert_eq!(s.devices["vol-00000001"].content, Content::Known(m));
        assert_eq!(s.streams["a/x"].phase, Phase::Unpacked);
        assert_eq!(s.streams["a/y"].phase, Phase::Dirty);
        assert_eq!(s.streams["a/y"].leaf, None);
        assert_eq!(s.devices["vol-00000002"].content, Content::Unknown);
        assert_eq!(s.stream_of("vol-00000002"), Some("a/y"));
    }

    #[test]
    fn a_damaged_content_record_means_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::load(dir.path()).unwrap();
        s.devices.insert("vol-00000001".into(), device("/a"));
        let m = Manifest::new(4096, 4096, vec![ChunkRef::Data(Digest([1; 32]))]).unwrap();
        s.set_content("vol-00000001", Content::Known(m)).unwrap();
        std::fs::write(dir.path().join("content/vol-00000001"), b"garbage").unwrap();
        let s = State::load(dir.path()).unwrap();
        assert_eq!(s.devices["vol-00000001"].content, Content::Unknown);
        assert_eq!(s.devices["vol-00000001"].content_id, None);
    }

    #[test]
    fn a_bad_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = format!("{:#}", State::load(dir.path()).unwrap_err());
        assert!(err.contains("not a valid unpacker state file"), "{err}");
    }
}
