//! The image format: a raw disk cut into fixed-size chunks, described by a
//! canonical manifest whose BLAKE3 digest is the image id.
//!
//! **Architecture invariants:** a manifest from the network is untrusted until
//! [`Manifest::decode`] accepted it, and decoding never allocates more than the
//! input's size justifies; an all-zero chunk is recorded as [`ChunkRef::Zero`]
//! and never stored, sent or written to a fresh volume.

#![forbid(unsafe_code)]

mod chunker;
pub mod codec;
mod manifest;
mod name;

pub use chunker::{ChunkReader, hash_file, is_zero};
pub use manifest::{ChunkRef, Diff, Digest, Manifest, ManifestError};
pub use name::{ImageName, NameError, validate_leaf, validate_stream};

/// Default chunk size: 512 KiB, the EBS snapshot block size, so a changed
/// chunk is a changed snapshot block.
pub const DEFAULT_CHUNK_SIZE: u32 = 512 * 1024;
/// Smallest chunk size a manifest may declare.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size a manifest may declare.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Largest disk an image may describe: 64 TiB, the EBS volume limit.
pub const MAX_IMAGE_BYTES: u64 = 64 << 40;

#[cfg(test)]
mod length_tests {
    use super::*;

    #[test]
    fn a_digest_cannot_be_both_the_short_tail_and_a_full_chunk() {
        let d = ChunkRef::Data(Digest([3; 32]));
        let e = ChunkRef::Data(Digest([4; 32]));
        let err = Manifest::new(4096, 3 * 4096 - 10, vec![d, ChunkRef::Zero, d]).unwrap_err();
        assert_eq!(err, ManifestError::LengthConflict { digest: Digest([3; 32]), index: 0, last: 2 });
        // The same bytes through decode.
        let ok = Manifest::new(4096, 3 * 4096 - 10, vec![d, ChunkRef::Zero, e]).unwrap();
        let mut bytes = ok.encode();
        let n = bytes.len();
        bytes[n - 32..].copy_from_slice(&[3; 32]);
        assert!(matches!(Manifest::decode(&bytes), Err(ManifestError::LengthConflict { .. })));
        // Repeats are fine when every chunk is full, or the tail is unique.
        Manifest::new(4096, 3 * 4096, vec![d, ChunkRef::Zero, d]).unwrap();
        Manifest::new(4096, 3 * 4096 - 10, vec![d, d, e]).unwrap();
        assert_eq!(ok.distinct_chunks(), vec![(Digest([3; 32]), 4096), (Digest([4; 32]), 4096 - 10)]);
    }
}
