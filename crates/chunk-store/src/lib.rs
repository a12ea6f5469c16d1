//! A content-addressed chunk store with committed images.
//!
//! What it holds: chunks, one zstd frame each, named by the BLAKE3 digest of
//! their plain bytes; and per committed leaf a record (commit time, name,
//! image id and canonical manifest under a checksum, see [`record`]). Where
//! it holds them is a [`Backend`]: a local directory ([`Dir`], layout in
//! `dir`) or an S3 bucket (crate `chunk-store-s3`).
//!
//! **Architecture invariants**, for every backend: a chunk is stored only
//! after its digest matched, and checked again when read; an image is
//! committed only when all its chunks are present with the lengths its
//! manifest gives them, and its record appears whole and at most once (the
//! backend's atomic create); a committed leaf never changes unnoticed: every
//! read of a record checks its checksum, name and image id, and a damaged
//! record is reported as damaged, never served; garbage collection keeps
//! every chunk a writer was told is there for its grace period, also when
//! the writer is another process on the same bucket.

#![forbid(unsafe_code)]

mod backend;
mod cache;
mod chunks;
mod dir;
mod gc;
mod images;
pub mod record;
mod upgrade;

pub use backend::{Backend, ChunkEntry};
pub use cache::Cached;
pub use dir::Dir;
pub use gc::{GC_MAX, GcReport};

use std::{
    collections::HashSet,
    io,
    path::{Path, PathBuf},
    sync::RwLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use image_format::{ChunkRef, Digest, ImageName, Manifest, ManifestError, NameError};
pub use record::RecordError;

pub use image_format::codec::ZSTD_LEVEL;
const LEAVES_DIR: &str = "_leaves";
/// Files in `tmp/` untouched for this long belong to no write in progress
/// (a chunk write lasts milliseconds): garbage collection removes them.
pub const STALE_TMP: Duration = Duration::from_secs(600);

/// Errors of the store. Messages name the path, digest or image concerned.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store {location}: {what}: {why}")]
    Backend { location: String, what: String, why: String },
    #[error("I/O on '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chunk {digest}: data does not match its digest")]
    DigestMismatch { digest: Digest },
    #[error("chunk {digest}: {why}")]
    BadChunk { digest: Digest, why: String },
    #[error("stored chunk {digest} is damaged: {why}")]
    Corrupt { digest: Digest, why: String },
    #[error("manifest gives chunk {digest} (index {index}) {expected} bytes but the stored chunk has {stored}")]
    ChunkLength { digest: Digest, index: u64, expected: u64, stored: u64 },
    #[error("chunk {0} is not in the store")]
    MissingChunk(Digest),
    #[error("image {0} does not exist")]
    NoSuchImage(String),
    #[error(
        "image {name} was already committed with other contents (image id {existing}); committed leaves are immutable"
    )]
    LeafExists { name: String, existing: Digest },
    #[error("cannot commit {name}: {missing} chunks are missing, first {first}")]
    ChunksMissing { name: String, missing: usize, first: Digest },
    #[error("image record of {name} (in {location}) is damaged: {why}")]
    BadRecord { name: String, location: String, why: RecordError },
    #[error("another garbage collection is running on {location} (until {until}); try again after it")]
    GcRunning { location: String, until: String },
    #[error(
        "{count} image records are damaged (first: {first}); garbage collection would lose their chunks, so it is refused until they are deleted or restored"
    )]
    DamagedRecords { count: usize, first: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// A committed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredImage {
    pub name: ImageName,
    pub manifest: Manifest,
    pub image_id: Digest,
    pub committed: SystemTime,
}

/// A leaf whose record failed its checks: listed apart, never served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedImage {
    pub name: ImageName,
    pub why: RecordError,
}

/// The images of a stream: the intact ones, oldest commit first, and the
/// damaged ones by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub images: Vec<StoredImage>,
    pub damaged: Vec<DamagedImage>,
}

/// The store. Cheap to share behind an `Arc`; all methods are blocking.
#[derive(Debug)]
pub struct ChunkStore {
    backend: Box<dyn Backend>,
    /// The directory, when the backend is one (for tests and tools that
    /// look at files).
    dir: Option<PathBuf>,
    /// Commits hold it shared, garbage collection exclusively, so a chunk a
    /// commit just checked cannot vanish under it (within this process;
    /// across processes see [`Backend::wait_for_gc`]).
    gc_lock: RwLock<()>,
    max_chunk: usize,
}

impl ChunkStore {
    /// Open (creating if needed) a store in the local directory `root`,
    /// removing leftovers of interrupted writes.
    pub fn open(root: &Path) -> Result<ChunkStore> {
        let mut store = ChunkStore::with_backend(Box::new(Dir::open(root)?))?;
        store.dir = Some(root.to_owned());
        Ok(store)
    }

    /// A store over any backend.
    pub fn with_backend(backend: Box<dyn Backend>) -> Result<ChunkStore> {
        let store = ChunkStore {
            backend,
            dir: None,
            gc_lock: RwLock::new(()),
            max_chunk: image_format::MAX_CHUNK_SIZE as usize,
        };
        if store.backend.may_hold_legacy() {
            store.upgrade_legacy_records()?;
        }
        Ok(store)
    }

    /// Where the store's objects are, for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Whether the store's objects can be reached now.
    pub fn check(&self) -> Result<()> {
        self.backend.check()
    }

    /// The directory of a store in a local directory.
    pub fn root(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    #[cfg(test)]
    fn dir(&self) -> Dir {
        Dir::at(self.root().expect("a directory store"))
    }
}

pub use image_format::codec::compress;

#[cfg(test)]
mod tests;
