//! Generated gRPC types and services of the image fleet. The `.proto` files in
//! the workspace's `proto/` directory are the one source of the protocol.

#![allow(unreachable_pub, clippy::all, clippy::pedantic)]

/// The imageserver protocol.
pub mod imageserver {
    tonic::include_proto!("fleet.imageserver.v1");
}

/// The image-unpacker protocol.
pub mod unpacker {
    tonic::include_proto!("fleet.unpacker.v1");
}

pub mod probes;
pub mod unpacker_view;

/// The encoded descriptors of both protocols (with their comments), which
/// the daemons serve through gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fleet_descriptor");

/// Largest gRPC message either side accepts: a chunk is at most
/// `image_format::MAX_CHUNK_SIZE` plus framing, and manifests of large disks
/// run to a few MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The port an imageserver listens on unless told otherwise.
pub const IMAGESERVER_PORT: u16 = 6971;

/// The port an image-unpacker listens on unless told otherwise.
pub const UNPACKER_PORT: u16 = 6974;

/// The environment variable every program reads the imageserver's address
/// from (imagetool, image-unpacker, ami-publisher).
pub const IMAGE_SERVER_ENV: &str = "IMAGE_SERVER";

/// The imageserver address a client uses unless told otherwise.
pub fn default_image_server() -> String {
    format!("localhost:{IMAGESERVER_PORT}")
}

/// The image-unpacker address unpacker-tool uses unless told otherwise.
pub fn default_unpacker() -> String {
    format!("localhost:{UNPACKER_PORT}")
}

impl std::fmt::Display for unpacker::UnpackStats {
    /// One line: what an unpack wrote, zeroed and left alone.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} chunks written, {} zeroed, {} unchanged; {} compressed bytes fetched in {:.1}s",
            self.chunks_written,
            self.chunks_total,
            self.chunks_zeroed,
            self.chunks_unchanged,
            self.bytes_fetched,
            self.seconds
        )
    }
}
