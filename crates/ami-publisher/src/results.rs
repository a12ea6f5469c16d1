//! Results files: what a run did in each target, as JSON, written
//! atomically. Later subcommands (delete, delete-tags, set-exclusive-tags,
//! launch-instances-for-images) read them back.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One target's outcome of a publish.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TargetResult {
    /// AWS profile.
    pub account: String,
    pub region: String,
    /// The account's id (from the unpacker instance's reservation or the image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// The unpacker volume the snapshot was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// Image size in bytes.
    #[serde(default)]
    pub size_bytes: u64,
    /// The image id (hex BLAKE3 of the manifest).
    #[serde(default)]
    pub image_id: String,
    /// An AMI of this leaf already existed and was reported, not remade.
    #[serde(default)]
    pub reused: bool,
    /// No unpacker in this target and `--ignore-missing-unpackers` was given.
    #[serde(default)]
    pub skipped: bool,
    /// The KMS key (ARN) its volumes and snapshots are encrypted with, as
    /// checked before the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
    /// Whom the AMI was shared with (`--share-with-*`), for `unshare`.
    #[serde(default, skip_serializing_if = "crate::sharing::Grantees::is_empty")]
    pub shared_with: crate::sharing::Grantees,
    /// When the AMI is deprecated (--deprecate-in), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecation_time: Option<String>,
    /// Its deregistration protection (--deregistration-protection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregistration_protection: Option<String>,
    /// The fleet's pointer (--ssm-parameter) this run pointed at the AMI,
    /// and the version that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_parameter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_version: Option<i64>,
    /// Bytes the unpacker fetched from the imageserver for this publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_fetched: Option<u64>,
    /// Bytes the unpacker wrote (changed and newly zero chunks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// `publish --verify`: chunks of the image read back from the
    /// snapshot and found to be the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_chunks: Option<u64>,
    pub seconds: f64,
    /// Why this target failed; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TargetResult {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// A publish results file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PublishResults {
    pub stream: String,
    pub leaf: String,
    pub image_id: String,
    pub size_bytes: u64,
    /// RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    pub targets: Vec<TargetResult>,
}

impl PublishResults {
    /// Read a results file, naming it in any error.
    pub fn read(path: &Path) -> anyhow::Result<PublishResults> {
        let bytes = std::fs::read(path).with_context(|| format!("reading results file {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a publish results file", path.display()))
    }
}

/// Write `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` atomically and durably (see [`fleet_fs`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fleet_fs::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}
