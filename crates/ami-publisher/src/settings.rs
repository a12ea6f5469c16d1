//! What publish and every operation share, settled once from the command
//! line: how unpacker instances are named and dialed, how long each kind
//! of wait may last, and what the AMIs a run makes are given.

use std::time::Duration;

use aws_sdk_ec2::Client;
use fleet_tls::TlsFiles;
use unpacker_client as uc;

use crate::{
    keys::Keys,
    unpacker::{self, UnpackerInstance},
};

/// How long each kind of wait may last.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Instance running and its image-unpacker answering (`--unpacker-timeout`).
    pub unpacker: Duration,
    /// Volume available, attached, and seen by the unpacker (`--volume-timeout`).
    pub volume: Duration,
    /// Snapshot completed, made or copied (`--snapshot-timeout`).
    pub snapshot: Duration,
    /// AMI available, registered or copied (`--image-timeout`).
    pub image: Duration,
}

/// The unpacker fleet as this run reaches it, and its timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `Name` tag of unpacker instances (`--instance-name`).
    pub instance_name: String,
    /// The port their image-unpacker listens on (`--unpacker-port`).
    pub unpacker_port: u16,
    /// This run's client certificate, key and CA.
    pub tls: TlsFiles,
    pub timeouts: Timeouts,
    /// The KMS key of each target (`--kms-key-id`, `--target-kms-key`).
    pub keys: Keys,
    /// What every AMI a run makes gets: a deprecation time, protection.
    pub new_amis: crate::lifecycle::NewAmis,
}

impl Settings {
    /// Every unpacker instance of a target (any state).
    pub async fn unpackers(&self, ec2: &Client) -> anyhow::Result<Vec<UnpackerInstance>> {
        unpacker::find_all(ec2, &self.instance_name).await
    }

    /// Connect to an instance's image-unpacker, trying for at most `timeout`.
    pub async fn dial(&self, inst: &UnpackerInstance, timeout: Duration) -> anyhow::Result<uc::Client> {
        unpacker::dial_instance(inst, self.unpacker_port, &self.tls, timeout).await
    }
}
