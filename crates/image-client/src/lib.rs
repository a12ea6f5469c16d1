//! Client side of the imageserver protocol, shared by imagetool, replicas and
//! the image-unpacker.
//!
//! **Architecture invariant:** nothing leaves this module unverified: a
//! manifest's id is recomputed, and every fetched chunk is decompressed (with
//! a size limit) and hashed before it is handed on.

#![forbid(unsafe_code)]

use fleet_proto::imageserver::{FetchChunksRequest, GetManifestRequest, ImageInfo, image_server_client};
use fleet_tls::{
    IMAGESERVER_TLS_NAME, TlsFiles,
    dial::{DialError, connect_channel, describe_status},
};
use futures::{Stream, StreamExt};
use image_format::{Digest, ImageName, Manifest, ManifestError};
use tonic::transport::Channel;

pub use fleet_proto::imageserver;

/// A connected imageserver client.
pub type Client = image_server_client::ImageServerClient<Channel>;

/// How many chunks a fetch keeps being verified at once.
pub const VERIFY_PARALLELISM: usize = 2;
/// Digests per FetchChunks request: bounds request size, not memory.
pub const FETCH_BATCH: usize = 16 * 1024;

/// Errors talking to an imageserver.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection: the address, or this client's certificate files.
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("{what}: {} ({:?})", describe_status(.status), .status.code())]
    Rpc { what: String, status: tonic::Status },
    #[error("manifest of {name} from the server is invalid: {source}")]
    BadManifest { name: String, source: ManifestError },
    #[error("manifest of {name} has id {got} but the server said {claimed}")]
    IdMismatch { name: String, got: Digest, claimed: String },
    #[error("chunk {0} from the server does not match its digest; refused")]
    DigestMismatch(Digest),
    #[error("chunk {expected} expected but the server sent {got}")]
    OutOfOrder { expected: Digest, got: String },
    #[error("chunk {digest} from the server is not a valid zstd frame: {why}")]
    BadChunk { digest: Digest, why: String },
    #[error("chunk {digest} from the server is {got} bytes but the manifest gives it {expected}; refused")]
    WrongLength { digest: Digest, expected: usize, got: String },
    #[error("the server ended the chunk stream early ({received} of {wanted} chunks)")]
    ShortStream { received: usize, wanted: usize },
}

/// An RPC error with what was being done.
pub fn rpc(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> ClientError {
    let what = what.into();
    move |status| ClientError::Rpc { what, status }
}

/// Connect to an imageserver.
pub async fn connect(addr: &str, tls: &TlsFiles) -> Result<Client, ClientError> {
    let channel = connect_channel(addr, tls, IMAGESERVER_TLS_NAME).await?;
    Ok(Client::new(channel)
        .max_decoding_message_size(fleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleet_proto::MAX_MESSAGE_BYTES))
}

/// An image's manifest, with its id checked against what the server claims.
pub async fn get_manifest(client: &mut Client, name: &ImageName) -> Result<(ImageInfo, Manifest), ClientError> {
    let resp = client
        .get_manifest(GetManifestRequest { stream: name.stream().to_owned(), leaf: name.leaf().to_owned() })
        .await
        .map_err(rpc(format!("get manifest of {name}")))?
        .into_inner();
    let manifest = Manifest::decode(&resp.manifest)
        .map_err(|source| ClientError::BadManifest { name: name.to_string(), source })?;
    let info = resp.info.unwrap_or_default();
    let id = manifest.image_id();
    if id.to_hex() != info.image_id {
        return Err(ClientError::IdMismatch { name: name.to_string(), got: id, claimed: info.image_id });
    }
    Ok((info, manifest))
}

/// Decompress a chunk that the manifest says is `expected` bytes long
/// (never beyond that), and check its length and digest.
pub fn verify_chunk(digest: &Digest, expected: usize, zstd_data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let wrong = |got: String| ClientError::WrongLength { digest: *digest, expected, got };
    // A frame that records its size is judged before any decompression.
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(zstd_data)
        && n != expected as u64
    {
        return Err(wrong(n.to_string()));
    }
    let plain = zstd::bulk::decompress(zstd_data, expected).map_err(|e| {
        // Decompressing into exactly `expected` bytes fails for a longer
        // chunk; say so rather than blame the frame.
        match zstd::bulk::decompress(zstd_data, image_format::MAX_CHUNK_SIZE as usize) {
            Ok(p) if p.len() != expected => wrong(p.len().to_string()),
            _ => ClientError::BadChunk { digest: *digest, why: e.to_string() },
        }
    })?;
    if plain.len() != expected {
        return Err(wrong(plain.len().to_string()));
    }
    if Digest::of(&plain) != *digest {
        return Err(ClientError::DigestMismatch(*digest));
    }
    Ok(plain)
}

impl ClientError {
    /// The data the server sent is wrong (a digest, length or frame that
    /// does not check out): trying again gets the same bytes, so callers
    /// must not retry; an operator must repair the server's store.
    pub fn is_data_loss(&self) -> bool {
        match self {
            ClientError::BadManifest { .. }
            | ClientError::IdMismatch { .. }
            | ClientError::DigestMismatch(_)
            | ClientError::BadChunk { .. }
            | ClientError::WrongLength { .. } => true,
            ClientError::Rpc { status, .. } => status.code() == tonic::Code::DataLoss,
            _ => false,
        }
    }
}

/// Fetched chunk: digest, plain bytes (verified) and its wire size.
#[derive(Debug)]
pub struct FetchedChunk {
    digest: Digest,
    plain: Vec<u8>,
    zstd: Vec<u8>,
}

/// Only [`fetch_chunks`] makes a `FetchedChunk`, after checking its length
/// and digest: holding one means the bytes are the ones the digest names.
impl FetchedChunk {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The chunk's bytes.
    pub fn plain(&self) -> &[u8] {
        &self.plain
    }

    /// The zstd frame it came in.
    pub fn zstd(&self) -> &[u8] {
        &self.zstd
    }

    /// The digest and the bytes, for keeping.
    pub fn into_parts(self) -> (Digest, Vec<u8>) {
        (self.digest, self.plain)
    }
}

/// Fetch `chunks` (digest and the plain length the manifest gives it) in
/// order. The server reads ahead; here chunks are verified (length and
/// digest) on blocking threads a few at a time, so memory stays bounded by
/// the HTTP/2 windows and [`VERIFY_PARALLELISM`].
pub fn fetch_chunks(
    client: Client,
    chunks: Vec<(Digest, usize)>,
) -> futures::stream::BoxStream<'static, Result<FetchedChunk, ClientError>> {
    let batches: Vec<Vec<(Digest, usize)>> = chunks.chunks(FETCH_BATCH).map(<[_]>::to_vec).collect();
    futures::stream::iter(batches)
        .map(move |batch| fetch_batch(client.clone(), batch))
        .flatten()
        .map(|item| async move {
            let (digest, expected, zstd) = item?;
            tokio::task::spawn_blocking(move || {
                let plain = verify_chunk(&digest, expected, &zstd)?;
                Ok(FetchedChunk { digest, plain, zstd })
            })
            .await
            .expect("chunk verification does not panic")
        })
        .buffered(VERIFY_PARALLELISM)
        .boxed()
}

enum FetchState {
    Start(Client, Vec<(Digest, usize)>),
    Running(tonic::Streaming<imageserver::Chunk>, Vec<(Digest, usize)>, usize),
    Done,
}

/// One FetchChunks call as a stream of (digest, expected length, zstd
/// frame), checking that chunks come in request order and that none is left
/// out.
fn fetch_batch(
    client: Client,
    batch: Vec<(Digest, usize)>,
) -> impl Stream<Item = Result<(Digest, usize, Vec<u8>), ClientError>> + Send {
    futures::stream::unfold(FetchState::Start(client, batch), |state| async move {
        let (mut inner, batch, n) = match state {
            FetchState::Done => return None,
            FetchState::Running(inner, batch, n) => (inner, batch, n),
            FetchState::Start(mut client, batch) => {
                let req = FetchChunksRequest { digests: batch.iter().map(|(d, _)| d.0.to_vec().into()).collect() };
                match client.fetch_chunks(req).await {
                    Ok(resp) => (resp.into_inner(), batch, 0),
                    Err(status) => return Some((Err(rpc("fetch chunks")(status)), FetchState::Done)),
                }
            }
        };
        if n == batch.len() {
            return None;
        }
        match inner.message().await {
            Ok(Some(chunk)) if chunk.digest.as_ref() == batch[n].0.0 => {
                let (d, len) = batch[n];
                Some((Ok((d, len, chunk.zstd_data.to_vec())), FetchState::Running(inner, batch, n + 1)))
            }
            Ok(Some(chunk)) => {
                let got = chunk.digest.iter().take(8).map(|x| format!("{x:02x}")).collect();
                Some((Err(ClientError::OutOfOrder { expected: batch[n].0, got }), FetchState::Done))
            }
            Ok(None) => Some((Err(ClientError::ShortStream { received: n, wanted: batch.len() }), FetchState::Done)),
            Err(status) => Some((Err(rpc("fetch chunks")(status)), FetchState::Done)),
        }
    })
}

pub use image_format::codec::compress;
