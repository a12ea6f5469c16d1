//! How a chunk travels and rests: one zstd frame of its bytes. Writers
//! (imagetool, the imageserver's replicas) compress with [`compress`];
//! readers decompress into exactly the length the manifest gives.

/// zstd level used when chunks are compressed (fast; chunks are small).
pub const ZSTD_LEVEL: i32 = 1;

/// Compress a chunk for storage or the wire: one zstd frame.
pub fn compress(plain: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(plain, ZSTD_LEVEL).expect("zstd compression of an in-memory buffer cannot fail")
}
