//! Where a store keeps its objects: the [`Backend`] trait. The store's
//! rules (digests checked before a chunk is written and when it is read,
//! records checked on every read, a leaf committed once and only when every
//! chunk is there) live in [`crate::ChunkStore`] and hold for every backend;
//! a backend only keeps bytes under names and answers what it holds.
//!
//! Two backends exist: [`crate::Dir`], a local directory (the default), and
//! an S3 bucket (crate `chunk-store-s3`), which several imageservers can
//! share. Every method blocks; callers run them off the async runtime.

use std::{fmt, time::SystemTime};

use image_format::{Digest, ImageName};

use crate::Result;

/// A stored chunk as a listing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    pub digest: Digest,
    /// Stored (compressed) bytes.
    pub bytes: u64,
    /// When it was last written (or, for a directory, last confirmed to a
    /// writer: a touch moves the file's time).
    pub written: SystemTime,
    /// The newest lease naming it, where the backend keeps leases apart
    /// from the chunk (S3: a lease object per confirmation).
    pub leased: Option<SystemTime>,
}

/// A store's objects: chunks by digest, image records by name.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where the objects are, for messages (`/var/lib/imageserver`,
    /// `s3://bucket/prefix`).
    fn location(&self) -> String;

    /// For each digest, the first `n` stored bytes of its chunk (fewer if
    /// the chunk is shorter), or `None` when it is not stored. With `n` 0
    /// only presence is asked.
    fn chunk_heads(&self, digests: &[Digest], n: usize) -> Result<Vec<Option<Vec<u8>>>>;
    /// A chunk's stored bytes, `None` when it is not stored.
    fn chunk_read(&self, d: &Digest) -> Result<Option<Vec<u8>>>;
    /// Store a chunk's bytes durably, whole or not at all. The store has
    /// checked them against the digest; writing over an existing copy is
    /// harmless (same name, same bytes).
    fn chunk_write(&self, d: &Digest, bytes: &[u8]) -> Result<()>;
    /// Every stored chunk.
    fn chunk_list(&self) -> Result<Vec<ChunkEntry>>;
    /// Remove chunks (absent ones are no error).
    fn chunk_delete(&self, digests: &[Digest]) -> Result<()>;
    /// These chunks were, or are about to be, confirmed to a writer: garbage
    /// collection keeps them for its grace period from now.
    fn touch(&self, digests: &[Digest]) -> Result<()>;
    /// Drop a local copy of a chunk that read as damaged, so the next read
    /// goes to the source; true when there was one (a cache).
    fn forget_cached(&self, _d: &Digest) -> bool {
        false
    }

    /// Wait while a garbage collection by another process runs on these
    /// objects (bounded by that collection's own deadline). Called after
    /// [`Backend::touch`] and before presence is checked, so that a
    /// collection either sees the touch or has finished deleting.
    fn wait_for_gc(&self) -> Result<()>;
    /// Claim the right to delete, until `deadline`; refused while another
    /// process holds it.
    fn begin_gc(&self, deadline: SystemTime) -> Result<()>;
    /// Give the claim of [`Backend::begin_gc`] back.
    fn end_gc(&self);
    /// Remove what interrupted writes and old confirmations left that is
    /// older than `cutoff` (temporary files, leases); returns how many.
    fn sweep(&self, cutoff: SystemTime, dry_run: bool) -> Result<u64>;

    /// A leaf's record bytes, `None` when the leaf is not committed.
    fn record_read(&self, name: &ImageName) -> Result<Option<Vec<u8>>>;
    /// Every record of a stream, by leaf.
    fn records(&self, stream: &str) -> Result<Vec<(String, Vec<u8>)>>;
    /// Create a record, atomically and only if the leaf has none: false
    /// when one is there (another commit got there first).
    fn record_create(&self, name: &ImageName, bytes: &[u8]) -> Result<bool>;
    /// Replace a record (the upgrade of old formats only).
    fn record_replace(&self, name: &ImageName, bytes: &[u8]) -> Result<()>;
    /// Remove a record: false when there was none.
    fn record_delete(&self, name: &ImageName) -> Result<bool>;
    /// Streams holding at least one record, in any order.
    fn streams(&self) -> Result<Vec<String>>;
    /// Whether the objects can be reached now (for readiness probes).
    fn check(&self) -> Result<()>;
    /// Whether records of format 1 can be here (only directories written
    /// before records checked themselves).
    fn may_hold_legacy(&self) -> bool {
        false
    }
}
