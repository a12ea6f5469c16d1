//! A content-addressed chunk store with committed images.
//!
//! Layout under the root directory:
//! - `chunks/ab/abcdef…`: one zstd frame per chunk, named by the BLAKE3 digest
//!   of its plain bytes;
//! - `images/STREAM/_leaves/LEAF`: a committed image record (commit time,
//!   name, image id and canonical manifest under a checksum, see [`record`]);
//!   `_` cannot start a valid name component, so records never collide with
//!   streams;
//! - `tmp/`: files being written; emptied on open, and of stale files by
//!   garbage collection.
//!
//! **Architecture invariants:** every file appears by rename (or hard link for
//! no-clobber) after its bytes were fsynced, so a crash leaves no torn chunk
//! and no half image; a chunk is stored only after its digest matched, and
//! checked again when read; an image is committed only when all its chunks are
//! present with the lengths its manifest gives them; a committed leaf never
//! changes unnoticed: every read of a record checks its checksum, name and
//! image id, and a damaged record is reported as damaged, never served.

#![forbid(unsafe_code)]

mod chunks;
mod gc;
mod images;
pub mod record;
mod upgrade;

pub use gc::GcReport;

use std::{
    collections::HashSet,
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
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
    #[error("image record of {name} ('{path}') is damaged: {why}")]
    BadRecord { name: String, path: PathBuf, why: RecordError },
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
    root: PathBuf,
    /// Commits hold it shared, garbage collection exclusively, so a chunk a
    /// commit just checked cannot vanish under it.
    gc_lock: RwLock<()>,
    tmp_seq: AtomicU64,
    max_chunk: usize,
}
impl ChunkStore {
    /// Open (creating if needed) a store rooted at `root`, removing
    /// leftovers of interrupted writes.
    pub fn open(root: &Path) -> Result<ChunkStore> {
        for d in ["chunks", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            let _ = fs::remove_file(&path);
        }
        let store = ChunkStore {
            root: root.to_owned(),
            gc_lock: RwLock::new(()),
            tmp_seq: AtomicU64::new(0),
            max_chunk: image_format::MAX_CHUNK_SIZE as usize,
        };
        store.upgrade_legacy_records()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}.{n}", std::process::id()))
    }
}

pub use image_format::codec::compress;

/// Write `bytes` to a new file at `path` and fsync it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    fleet_fs::write_synced(path, bytes).map_err(io_err(path))
}

/// fsync a directory so a rename or link in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fleet_fs::sync_dir(dir).map_err(io_err(dir))
}

/// Write a file atomically (see [`fleet_fs::write_atomic`]).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fleet_fs::write_atomic(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests;
