//! The command line of `unpacker-tool`, shared by the binary and `cargo xtask
//! dist` (its man pages and shell completions).

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

/// Drive an image-unpacker by hand.
///
/// The usual sequence for a new volume: add-device (or claim-device), associate
/// STREAM VOL, prepare-for-unpack STREAM, unpack-image STREAM LEAF,
/// prepare-for-capture STREAM. The client certificate must carry the
/// drive-unpacker right (the ami-publisher role); it is read from --ssl-dir
/// (CA.pem, cert.pem, key.pem) unless --ca/--cert/--key are given.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
pub struct Cli {
    /// The unpacker to drive.
    #[arg(long, global = true, env = "IMAGE_UNPACKER", default_value_t = fleet_proto::default_unpacker(), value_name = "HOST:PORT")]
    pub unpacker: String,
    #[command(flatten)]
    pub tls: fleet_cli::TlsArgs,
    /// Print results as JSON on stdout (no progress bars).
    #[arg(long, global = true)]
    pub json: bool,
    /// Whose capture hold --hold takes and release-capture ends (other
    /// callers' holds on the stream are left alone).
    #[arg(long, global = true, default_value = "unpacker-tool", value_name = "ID")]
    pub hold_id: String,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Devices, streams, and how long the unpacker has been idle.
    GetStatus,
    /// Wait for an attached volume to appear, then record it.
    AddDevice {
        /// EBS volume id (vol-…).
        volume_id: String,
        /// Device name given at attach time (e.g. /dev/sdf), for Xen instances.
        #[arg(long)]
        attach_name: Option<String>,
        /// How long to wait for the volume to appear.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The volume was just created empty: skip the scan, write no zeros.
        #[arg(long)]
        fresh: bool,
    },
    /// Forget a device (do this before detaching it).
    RemoveDevice { volume_id: String },
    /// Record the device at PATH as volume VOLUME_ID.
    ClaimDevice {
        volume_id: String,
        path: PathBuf,
        /// The device is empty: skip the scan, write no zeros.
        #[arg(long)]
        fresh: bool,
    },
    /// Bind STREAM to a device; only that stream may write it.
    Associate { stream: String, volume_id: String },
    /// Learn what the stream's device holds (scan unless known).
    PrepareForUnpack {
        stream: String,
        /// Do nothing if the device's content is already known.
        #[arg(long)]
        skip_if_prepared: bool,
        /// Start the scan and return at once.
        #[arg(long)]
        do_not_wait: bool,
    },
    /// Bring the stream's device to LEAF, writing only what differs.
    UnpackImage {
        stream: String,
        leaf: String,
        /// Then hold the device at LEAF for this long (writers wait) so it
        /// can be captured; end it with release-capture.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        hold: Option<Duration>,
    },
    /// Flush and read the device back; prints the image id and device digest.
    PrepareForCapture {
        stream: String,
        /// Then hold the device for this long (writers wait) while a snapshot
        /// is started; end it with release-capture.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        hold: Option<Duration>,
    },
    /// End a capture hold on STREAM.
    ReleaseCapture { stream: String },
    /// Make this --hold-id's capture hold on STREAM end DURATION from now
    /// (sooner or later than it did).
    RenewCaptureHold {
        stream: String,
        #[arg(value_parser = humantime::parse_duration, value_name = "DURATION")]
        hold: Duration,
    },
    /// Unbind a stream from its device.
    ForgetStream { stream: String },
    /// Copy the image bytes on the stream's device to OUT (written atomically).
    GetRaw { stream: String, out: PathBuf },
}
