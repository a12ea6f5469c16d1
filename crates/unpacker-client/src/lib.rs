//! The client side of the image-unpacker protocol: dialling an unpacker
//! over mutual TLS, following its progress streams, and the messages
//! (re-exported from `fleet-proto`). ami-publisher and unpacker-tool use
//! this crate instead of linking the daemon.
//!
//! **Must not** depend on the daemon (`image-unpacker`) or on anything that
//! touches block devices.

#![forbid(unsafe_code)]

use fleet_proto::unpacker::image_unpacker_client::ImageUnpackerClient;
use fleet_tls::{
    TlsFiles, UNPACKER_TLS_NAME,
    dial::{DialError, connect_channel},
};
use tonic::transport::Channel;

pub use fleet_proto::unpacker::*;

/// A connected unpacker client.
pub type Client = ImageUnpackerClient<Channel>;

/// Connect to an unpacker at `addr` (`HOST:PORT`) over mutual TLS; its
/// certificate must name `image-unpacker`.
pub async fn connect(addr: &str, tls: &TlsFiles) -> Result<Client, DialError> {
    let channel = connect_channel(addr, tls, UNPACKER_TLS_NAME).await?;
    Ok(Client::new(channel)
        .max_decoding_message_size(fleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleet_proto::MAX_MESSAGE_BYTES))
}

/// Follow a progress stream to its end, calling `each` on every message;
/// returns the last one (which carries the stats and result).
pub async fn follow(
    mut stream: tonic::Streaming<Progress>,
    mut each: impl FnMut(&Progress),
) -> Result<Progress, tonic::Status> {
    let mut last = None;
    while let Some(p) = stream.message().await? {
        each(&p);
        last = Some(p);
    }
    last.ok_or_else(|| tonic::Status::unavailable("the unpacker closed the stream without a result"))
}
