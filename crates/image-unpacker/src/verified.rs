//! Chunks whose length and digest were checked: a [`VerifiedChunk`] can
//! only be made by [`fetch`], which hands on what
//! `image_client::fetch_chunks` verified (decompressed into exactly the
//! length the manifest gives, then hashed and compared). A
//! [`crate::engine::DeviceWriter`] (the unpacker's `ClaimedDevice`) writes nothing else, so the compiler
//! rejects writing an unchecked chunk. This module must not offer any other
//! way to make one.

use futures::{StreamExt as _, stream::BoxStream};
use image_client::{Client, ClientError};
use image_format::Digest;

/// A chunk's plain bytes, known to hash to its digest.
#[derive(Debug)]
pub(crate) struct VerifiedChunk {
    digest: Digest,
    plain: Vec<u8>,
    compressed_len: usize,
}

impl VerifiedChunk {
    pub(crate) fn digest(&self) -> &Digest {
        &self.digest
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.plain
    }

    /// How many compressed bytes came over the wire for it.
    pub(crate) fn compressed_len(&self) -> usize {
        self.compressed_len
    }
}

/// Fetch `chunks` (digest and the plain length the manifest gives it) in
/// order, each checked before it is handed on.
pub(crate) fn fetch(
    client: Client,
    chunks: Vec<(Digest, usize)>,
) -> BoxStream<'static, Result<VerifiedChunk, ClientError>> {
    image_client::fetch_chunks(client, chunks)
        .map(|item| {
            item.map(|c| {
                let compressed_len = c.zstd().len();
                let (digest, plain) = c.into_parts();
                VerifiedChunk { digest, compressed_len, plain }
            })
        })
        .boxed()
}
