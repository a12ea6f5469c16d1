//! The command line of `imagetool`, shared by the binary and `cargo xtask dist`
//! (its man pages and shell completions).

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

/// Put disk images into an imageserver and read them back.
///
/// Images are named STREAM/LEAF (for example base/debian-12/2026.11.23.1).
/// `add` hashes the file locally and uploads only chunks the server lacks, so
/// re-adding a slightly changed build is cheap. Certificates come from
/// --ssl-dir (CA.pem, cert.pem, key.pem) unless --ca/--cert/--key are given.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// imageserver to talk to.
    #[arg(long, global = true, env = fleet_proto::IMAGE_SERVER_ENV, default_value_t = fleet_proto::default_image_server(), value_name = "HOST:PORT")]
    pub server: String,
    #[command(flatten)]
    pub tls: fleet_cli::TlsArgs,
    /// Print results as JSON on stdout (no progress bars).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Add FILE (raw, or qcow2/vmdk/vhd converted with qemu-img) as STREAM/LEAF.
    Add {
        /// Image name: STREAM/LEAF.
        image: String,
        /// Disk image file.
        file: PathBuf,
        /// Chunk size in bytes (a power of two, 4 KiB to 16 MiB).
        #[arg(long, default_value_t = image_format::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// Write STREAM/LEAF to OUT (appears only when complete and verified).
    Get {
        /// Image name: STREAM/LEAF.
        image: String,
        /// Output file (replaced atomically if it exists), or /dev/null to
        /// fetch and check every chunk and keep nothing.
        out: PathBuf,
    },
    /// List streams, or the images of STREAM.
    List {
        /// Stream whose images to list; without it, list streams.
        stream: Option<String>,
    },
    /// Show an image's details; STREAM alone shows its latest image.
    Show {
        /// STREAM/LEAF, or STREAM for its latest image.
        image: String,
    },
    /// Fetch every chunk of an image and check its digest.
    Verify {
        /// Image name: STREAM/LEAF.
        image: String,
    },
    /// Delete an image (chunks go at the next gc).
    Delete {
        /// Image name: STREAM/LEAF.
        image: String,
    },
    /// Remove chunks no image references.
    Gc {
        /// Keep chunks written within this time (uploads in progress).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: Duration,
        /// Report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}
