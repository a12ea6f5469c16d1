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

pub mod record;

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

/// Result of a garbage collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_kept: u64,
    /// Files of interrupted writes removed from `tmp/`.
    pub stale_temp_files: u64,
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

    /// Rewrite format 1 records (no checksum) as format 2, each only after
    /// its manifest decoded and every chunk it names is stored with the
    /// length the manifest gives it; a record that fails stays as it is and
    /// reads as damaged.
    fn upgrade_legacy_records(&self) -> Result<()> {
        for stream in self.list_streams()? {
            let dir = self.leaves_dir(&stream);
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.map_err(io_err(&dir))?.path();
                let leaf = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let Ok(name) = ImageName::new(&stream, &leaf) else { continue };
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                let Some(legacy) = record::decode_legacy(&bytes) else { continue };
                let checked = legacy
                    .map_err(|e| e.to_string())
                    .and_then(|(ms, m)| self.check_chunks(&name, &m).map(|()| (ms, m)).map_err(|e| e.to_string()));
                match checked {
                    Ok((ms, m)) => {
                        write_atomic(&path, &record::encode(&name, ms, &m))?;
                        tracing::info!(image = %name, "image record upgraded to format 2");
                    }
                    Err(why) => {
                        tracing::error!(image = %name, %why, "format 1 image record failed its checks; left as it is")
                    }
                }
            }
        }
        Ok(())
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

    /// Whether the chunk is stored.
    pub fn has(&self, d: &Digest) -> bool {
        self.chunk_path(d).is_file()
    }

    /// Like [`ChunkStore::has`], and marks a present chunk as recently used so
    /// garbage collection keeps it for the grace period (a client was just
    /// told it need not upload it).
    pub fn has_and_touch(&self, d: &Digest) -> bool {
        let p = self.chunk_path(d);
        match File::options().append(true).open(&p) {
            Ok(f) => {
                let _ = f.set_modified(SystemTime::now());
                true
            }
            Err(_) => false,
        }
    }

    /// Store a chunk given as a zstd frame. The frame is decompressed (never
    /// beyond the largest chunk size) and its digest checked before anything
    /// is written. Returns false when the chunk was already present.
    pub fn put_compressed(&self, d: &Digest, zstd_data: &[u8]) -> Result<bool> {
        let plain = self.decompress(zstd_data).map_err(|why| StoreError::BadChunk { digest: *d, why })?;
        if Digest::of(&plain) != *d {
            return Err(StoreError::DigestMismatch { digest: *d });
        }
        if self.has(d) {
            return Ok(false);
        }
        self.write_chunk_file(d, zstd_data)?;
        Ok(true)
    }

    /// Store plain bytes (compressing them). Returns the digest.
    pub fn put_plain(&self, plain: &[u8]) -> Result<Digest> {
        let d = Digest::of(plain);
        if !self.has(&d) {
            let z = compress(plain);
            self.write_chunk_file(&d, &z)?;
        }
        Ok(d)
    }

    fn write_chunk_file(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.chunk_path(d);
        let dir = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path();
        write_synced(&tmp, bytes)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(dir)
    }

    fn decompress(&self, zstd_data: &[u8]) -> Result<Vec<u8>, String> {
        zstd::bulk::decompress(zstd_data, self.max_chunk)
            .map_err(|e| format!("not a zstd frame of at most 16 MiB: {e}"))
    }

    /// The stored zstd frame of a chunk, after checking that it decompresses
    /// to bytes with the right digest. A stored chunk that fails is
    /// [`StoreError::Corrupt`]: damage at rest, not a caller's mistake.
    pub fn get_compressed(&self, d: &Digest) -> Result<Vec<u8>> {
        let z = self.read_chunk_file(d)?;
        // Checked in a buffer each thread keeps: serving a chunk allocates
        // only the frame that is sent (this is the imageserver's hot path,
        // and per-chunk buffers on many threads fragment the heap).
        thread_local! {
            static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let max = self.max_chunk;
        PLAIN.with_borrow_mut(|plain| {
            plain.clear();
            let want = match zstd::zstd_safe::get_frame_content_size(&z) {
                Ok(Some(n)) => usize::try_from(n).unwrap_or(usize::MAX).min(max),
                _ => max,
            };
            plain.reserve(want);
            let mut dec = zstd::bulk::Decompressor::new().map_err(|e| io_err(&self.root)(e))?;
            dec.decompress_to_buffer(&z, plain).map_err(|e| StoreError::Corrupt {
                digest: *d,
                why: format!("not a zstd frame of at most {} bytes: {e}", want),
            })?;
            if Digest::of(plain) != *d {
                return Err(StoreError::Corrupt { digest: *d, why: "its bytes do not match its digest".into() });
            }
            if plain.capacity() > 2 * want.max(1 << 20) {
                plain.shrink_to(want);
            }
            Ok(())
        })?;
        Ok(z)
    }

    fn read_chunk_file(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.chunk_path(d);
        match fs::read(&p) {
            Ok(z) => Ok(z),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::MissingChunk(*d)),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// The plain bytes of a chunk, digest checked.
    pub fn get_plain(&self, d: &Digest) -> Result<Vec<u8>> {
        let z = self.read_chunk_file(d)?;
        let plain = self.decompress(&z).map_err(|why| StoreError::Corrupt { digest: *d, why })?;
        if Digest::of(&plain) != *d {
            return Err(StoreError::Corrupt { digest: *d, why: "its bytes do not match its digest".into() });
        }
        Ok(plain)
    }

    /// The plain length of a stored chunk: from its zstd frame header when
    /// the frame records it (every frame this store and its clients make
    /// does; zstd checks it when decompressing, and uploads were
    /// decompressed and hashed before being stored), else by decompressing.
    pub fn chunk_len(&self, d: &Digest) -> Result<u64> {
        let p = self.chunk_path(d);
        let mut head = [0u8; 18]; // the largest zstd frame header
        let n = match File::open(&p).and_then(|f| read_up_to(&f, &mut head)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::MissingChunk(*d)),
            Err(e) => return Err(io_err(&p)(e)),
        };
        match zstd::zstd_safe::get_frame_content_size(&head[..n]) {
            Ok(Some(len)) => Ok(len),
            _ => Ok(self.get_plain(d)?.len() as u64),
        }
    }

    /// Every chunk `m` (of image `name`) names is stored, with the length
    /// `m` gives it.
    fn check_chunks(&self, name: &ImageName, m: &Manifest) -> Result<()> {
        let mut expected: std::collections::HashMap<Digest, u64> = std::collections::HashMap::new();
        for (index, c) in m.chunks().iter().enumerate() {
            if let ChunkRef::Data(d) = c {
                expected.entry(*d).or_insert(index as u64);
            }
        }
        let mut order: Vec<(u64, Digest)> = expected.into_iter().map(|(d, i)| (i, d)).collect();
        order.sort_unstable();
        let missing: Vec<Digest> = order.iter().filter(|(_, d)| !self.has(d)).map(|(_, d)| *d).collect();
        if let Some(first) = missing.first() {
            return Err(StoreError::ChunksMissing { name: name.to_string(), missing: missing.len(), first: *first });
        }
        for (index, d) in order {
            let want = m.chunk_len(index) as u64;
            let stored = self.chunk_len(&d)?;
            if stored != want {
                return Err(StoreError::ChunkLength { digest: d, index, expected: want, stored });
            }
        }
        Ok(())
    }

    fn leaves_dir(&self, stream: &str) -> PathBuf {
        let mut p = self.root.join("images");
        p.extend(stream.split('/'));
        p.join(LEAVES_DIR)
    }

    fn record_path(&self, name: &ImageName) -> PathBuf {
        self.leaves_dir(name.stream()).join(name.leaf())
    }

    /// Commit an image: refused while any chunk is missing or has another
    /// length than the manifest gives it; re-committing the same manifest is
    /// a no-op, other contents are refused. Returns the stored image and
    /// whether it was new.
    pub fn commit(&self, name: &ImageName, manifest: &Manifest) -> Result<(StoredImage, bool)> {
        let _guard = self.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        self.check_chunks(name, manifest)?;
        let path = self.record_path(name);
        if let Some(existing) = self.get_image_opt(name)? {
            return already_committed(name, existing, manifest);
        }
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let committed = SystemTime::now();
        let ms = u64::try_from(committed.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0);
        let rec = record::encode(name, ms, manifest);
        let tmp = self.tmp_path();
        write_synced(&tmp, &rec)?;
        // A hard link never replaces an existing file: two racing commits of
        // one leaf cannot both win.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another commit of the leaf got there first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return already_committed(name, self.get_image(name)?, manifest);
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        sync_dir(dir)?;
        let stored = StoredImage {
            name: name.clone(),
            image_id: manifest.image_id(),
            manifest: manifest.clone(),
            committed: UNIX_EPOCH + Duration::from_millis(ms),
        };
        Ok((stored, true))
    }

    /// A committed image.
    pub fn get_image(&self, name: &ImageName) -> Result<StoredImage> {
        self.get_image_opt(name)?.ok_or_else(|| StoreError::NoSuchImage(name.to_string()))
    }

    fn get_image_opt(&self, name: &ImageName) -> Result<Option<StoredImage>> {
        let path = self.record_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let r = record::decode(name, &bytes).map_err(|why| StoreError::BadRecord {
            name: name.to_string(),
            path: path.clone(),
            why,
        })?;
        Ok(Some(StoredImage {
            name: name.clone(),
            image_id: r.image_id,
            manifest: r.manifest,
            committed: UNIX_EPOCH + Duration::from_millis(r.committed_ms),
        }))
    }

    /// Delete a committed image (its chunks go at the next garbage
    /// collection). A damaged record can be deleted too.
    pub fn delete_image(&self, name: &ImageName) -> Result<()> {
        let path = self.record_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NoSuchImage(name.to_string())),
            Err(e) => return Err(io_err(&path)(e)),
        }
        let dir = path.parent().expect("record path has a parent");
        sync_dir(dir)?;
        // Prune empty directories up to images/, so empty streams vanish.
        let images = self.root.join("images");
        let mut d = dir.to_owned();
        while d != images && fs::remove_dir(&d).is_ok() {
            d.pop();
        }
        Ok(())
    }

    /// Streams that hold at least one image, sorted.
    pub fn list_streams(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let images = self.root.join("images");
        walk_streams(&images, "", &mut out)?;
        out.sort();
        Ok(out)
    }

    /// Images of a stream, oldest commit first, and apart from them the
    /// leaves whose records are damaged (one bad record hides no other).
    pub fn list_images(&self, stream: &str) -> Result<Listing> {
        image_format::validate_stream(stream)?;
        let dir = self.leaves_dir(stream);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Listing::default();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let leaf = entry.file_name().to_string_lossy().into_owned();
            let Ok(name) = ImageName::new(stream, &leaf) else { continue };
            match self.get_image_opt(&name) {
                Ok(Some(img)) => out.images.push(img),
                Ok(None) => {}
                Err(StoreError::BadRecord { why, .. }) => {
                    tracing::error!(image = %name, %why, "image record is damaged; not served");
                    out.damaged.push(DamagedImage { name, why });
                }
                Err(e) => return Err(e),
            }
        }
        out.images.sort_by(|a, b| a.committed.cmp(&b.committed).then_with(|| a.name.cmp(&b.name)));
        out.damaged.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every committed image of every stream, and the damaged ones apart.
    pub fn list_all_images(&self) -> Result<Listing> {
        let mut out = Listing::default();
        for s in self.list_streams()? {
            let l = self.list_images(&s)?;
            out.images.extend(l.images);
            out.damaged.extend(l.damaged);
        }
        Ok(out)
    }

    /// Remove chunks no committed image references and that were not written
    /// or confirmed within `grace` (uploads of images not yet committed).
    /// Refused while any record is damaged: the chunks it names cannot be
    /// told apart from garbage. Also removes files of interrupted writes
    /// from `tmp/` that are older than [`STALE_TMP`] and `grace`.
    pub fn collect_garbage(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _guard = self.gc_lock.write().unwrap_or_else(|e| e.into_inner());
        let all = self.list_all_images()?;
        if let Some(first) = all.damaged.first() {
            return Err(StoreError::DamagedRecords { count: all.damaged.len(), first: first.name.to_string() });
        }
        let mut live = HashSet::new();
        for img in all.images {
            live.extend(img.manifest.distinct_digests());
        }
        let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let mut report = GcReport::default();
        let tmp_cutoff = SystemTime::now().checked_sub(grace.max(STALE_TMP)).unwrap_or(UNIX_EPOCH);
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let stale = entry.metadata().and_then(|m| m.modified()).map(|m| m < tmp_cutoff).unwrap_or(false);
            if stale {
                if !dry_run {
                    let _ = fs::remove_file(entry.path());
                }
                report.stale_temp_files += 1;
            }
        }
        let chunks = self.root.join("chunks");
        for sub in fs::read_dir(&chunks).map_err(io_err(&chunks))? {
            let sub = sub.map_err(io_err(&chunks))?.path();
            for entry in fs::read_dir(&sub).map_err(io_err(&sub))? {
                let entry = entry.map_err(io_err(&sub))?;
                let name = entry.file_name();
                let Ok(d) = Digest::from_hex(&name.to_string_lossy()) else { continue };
                let meta = entry.metadata().map_err(io_err(&entry.path()))?;
                let recent = meta.modified().map(|m| m > cutoff).unwrap_or(true);
                if live.contains(&d) || recent {
                    report.chunks_kept += 1;
                    continue;
                }
                if !dry_run {
                    fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                }
                report.chunks_removed += 1;
                report.bytes_removed += meta.len();
            }
        }
        tracing::info!(?report, dry_run, "garbage collection done");
        Ok(report)
    }
}

/// A commit of `name` that finds `existing` there: a no-op when it is the
/// same image, else refused (a committed leaf never changes). The one rule
/// for both the plain re-commit and the lost race for the name.
fn already_committed(name: &ImageName, existing: StoredImage, manifest: &Manifest) -> Result<(StoredImage, bool)> {
    if existing.image_id == manifest.image_id() {
        Ok((existing, false))
    } else {
        Err(StoreError::LeafExists { name: name.to_string(), existing: existing.image_id })
    }
}

fn walk_streams(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if !entry.file_type().map_err(io_err(dir))?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LEAVES_DIR {
            if fs::read_dir(entry.path()).map(|mut e| e.next().is_some()).unwrap_or(false) && !prefix.is_empty() {
                out.push(prefix.to_owned());
            }
            continue;
        }
        let child = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        walk_streams(&entry.path(), &child, out)?;
    }
    Ok(())
}

fn read_up_to(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read as _;
    let mut filled = 0;
    let mut f = f;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub use image_format::codec::compress;

/// Write `bytes` to a new file at `path` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    fleet_fs::write_synced(path, bytes).map_err(io_err(path))
}

/// fsync a directory so a rename or link in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fleet_fs::sync_dir(dir).map_err(io_err(dir))
}

/// Write a file atomically (see [`fleet_fs::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fleet_fs::write_atomic(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_format::ChunkRef;

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn chunk_with_wrong_digest_is_never_stored() {
        let (_d, s) = store();
        let good = vec![7u8; 4096];
        let wrong = Digest::of(b"something else");
        let err = s.put_compressed(&wrong, &compress(&good)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!s.has(&wrong));
        let err = s.put_compressed(&wrong, b"not zstd").unwrap_err();
        assert!(err.to_string().contains("not a zstd frame"), "{err}");
        let d = Digest::of(&good);
        assert!(s.put_compressed(&d, &compress(&good)).unwrap());
        assert!(!s.put_compressed(&d, &compress(&good)).unwrap());
        assert_eq!(s.get_plain(&d).unwrap(), good);
    }

    #[test]
    fn corruption_at_rest_is_detected_on_read() {
        let (_d, s) = store();
        let d = s.put_plain(&[3u8; 5000]).unwrap();
        fs::write(s.chunk_path(&d), compress(&[4u8; 5000])).unwrap();
        assert!(matches!(s.get_compressed(&d), Err(StoreError::Corrupt { .. })));
        fs::write(s.chunk_path(&d), b"not zstd").unwrap();
        assert!(matches!(s.get_plain(&d), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn commit_needs_every_chunk_and_leaves_are_immutable() {
        let (_d, s) = store();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let da = Digest::of(&a);
        let db = Digest::of(&b);
        let m1 = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(da), ChunkRef::Zero, ChunkRef::Data(db)]).unwrap();
        let name = ImageName::parse("base/os/1").unwrap();
        s.put_plain(&a).unwrap();
        let err = s.commit(&name, &m1).unwrap_err();
        assert!(err.to_string().contains("1 chunks are missing"), "{err}");
        assert!(s.list_streams().unwrap().is_empty());
        s.put_plain(&b).unwrap();
        let (img, new) = s.commit(&name, &m1).unwrap();
        assert!(new);
        assert_eq!(img.image_id, m1.image_id());
        assert!(!s.commit(&name, &m1).unwrap().1, "same bytes again is a no-op");
        let m2 = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(db), ChunkRef::Zero, ChunkRef::Data(da)]).unwrap();
        assert!(matches!(s.commit(&name, &m2), Err(StoreError::LeafExists { .. })));
        assert_eq!(s.get_image(&name).unwrap().manifest, m1);
        assert_eq!(s.list_streams().unwrap(), vec!["base/os".to_owned()]);
        assert_eq!(s.list_images("base/os").unwrap().images.len(), 1);
    }

    /// A store holding chunks of 4096 bytes `a` and `b` and a 3-chunk image
    /// `base/os/1` of them, plus a second leaf `base/os/2`.
    fn store_with_images() -> (tempfile::TempDir, ChunkStore, Manifest) {
        let (d, s) = store();
        let da = s.put_plain(&[1u8; 4096]).unwrap();
        let db = s.put_plain(&[2u8; 4096]).unwrap();
        let m = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(da), ChunkRef::Zero, ChunkRef::Data(db)]).unwrap();
        s.commit(&ImageName::parse("base/os/1").unwrap(), &m).unwrap();
        s.commit(&ImageName::parse("base/os/2").unwrap(), &m).unwrap();
        (d, s, m)
    }

    #[test]
    fn a_record_altered_on_disk_is_reported_and_the_rest_of_the_stream_served() {
        let (_d, s, m) = store_with_images();
        let one = ImageName::parse("base/os/1").unwrap();
        let path = s.record_path(&one);
        let good = fs::read(&path).unwrap();
        // One flipped bit in each field: time, name, id, the manifest's size
        // field and a chunk digest.
        let name_at = 18;
        let id_at = name_at + "base/os/1".len();
        let manifest_at = id_at + 32;
        for (field, at) in [
            ("time", 9),
            ("name", name_at + 2),
            ("id", id_at + 5),
            ("size", manifest_at + 14),
            ("digest", manifest_at + 31 + 7),
        ] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            fs::write(&path, &bad).unwrap();
            let err = s.get_image(&one).unwrap_err();
            assert!(matches!(err, StoreError::BadRecord { .. }), "{field}: {err}");
            assert!(err.to_string().contains("base/os/1"), "{field}: {err}");
            let l = s.list_images("base/os").unwrap();
            assert_eq!(l.images.len(), 1, "{field}: the good leaf is still listed");
            assert_eq!(l.images[0].name.leaf(), "2");
            assert_eq!(l.damaged.len(), 1, "{field}");
            assert_eq!(l.damaged[0].name, one);
            assert!(matches!(s.commit(&one, &m), Err(StoreError::BadRecord { .. })), "{field}: no commit over damage");
        }
        // Garbage collection would not know the damaged leaf's chunks.
        let err = s.collect_garbage(Duration::ZERO, false).unwrap_err();
        assert!(matches!(err, StoreError::DamagedRecords { count: 1, .. }), "{err}");
        assert_eq!(s.list_all_images().unwrap().images.len(), 1);
        // A damaged leaf can be deleted, and then gc runs again.
        s.delete_image(&one).unwrap();
        assert!(s.list_images("base/os").unwrap().damaged.is_empty());
        s.collect_garbage(Duration::ZERO, false).unwrap();
    }

    #[test]
    fn commit_refuses_chunks_of_another_length_than_the_manifest_says() {
        let (_d, s) = store();
        let long = s.put_plain(&[5u8; 8192]).unwrap();
        let short = s.put_plain(&[6u8; 1000]).unwrap();
        let name = ImageName::parse("base/os/1").unwrap();
        // An over-long chunk in a full slot of a 4 KiB-chunk image.
        let m = Manifest::new(4096, 4096, vec![ChunkRef::Data(long)]).unwrap();
        let err = s.commit(&name, &m).unwrap_err();
        assert!(matches!(err, StoreError::ChunkLength { index: 0, expected: 4096, stored: 8192, .. }), "{err}");
        // An over-short chunk in a full slot.
        let m = Manifest::new(4096, 8192, vec![ChunkRef::Zero, ChunkRef::Data(short)]).unwrap();
        let err = s.commit(&name, &m).unwrap_err();
        assert!(matches!(err, StoreError::ChunkLength { index: 1, expected: 4096, stored: 1000, .. }), "{err}");
        // A right-length short tail is fine.
        let m = Manifest::new(4096, 5096, vec![ChunkRef::Zero, ChunkRef::Data(short)]).unwrap();
        s.commit(&name, &m).unwrap();
        assert!(s.list_streams().unwrap().len() == 1);
    }

    #[test]
    fn chunk_len_reads_frames_with_and_without_a_recorded_size() {
        let (_d, s) = store();
        let d = s.put_plain(&[9u8; 3000]).unwrap();
        assert_eq!(s.chunk_len(&d).unwrap(), 3000);
        // A frame that does not record its size (a streaming encoder's).
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &[8u8; 2000]).unwrap();
        let frame = enc.finish().unwrap();
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)));
        let d = Digest::of(&[8u8; 2000]);
        s.put_compressed(&d, &frame).unwrap();
        assert_eq!(s.chunk_len(&d).unwrap(), 2000);
        assert!(matches!(s.chunk_len(&Digest::of(b"absent")), Err(StoreError::MissingChunk(_))));
    }

    #[test]
    fn format_1_records_are_upgraded_only_when_they_check_out() {
        let (dir, s, m) = store_with_images();
        let one = ImageName::parse("base/os/1").unwrap();
        let two = ImageName::parse("base/os/2").unwrap();
        let legacy = |m: &Manifest| {
            let mut v = b"FLEETREC".to_vec();
            v.extend_from_slice(&77u64.to_le_bytes());
            v.extend_from_slice(&m.encode());
            v
        };
        fs::write(s.record_path(&one), legacy(&m)).unwrap();
        // Leaf 2's old record had one bit of its size flipped: the last
        // chunk's length no longer matches the stored chunk.
        let wrong = Manifest::new(4096, 3 * 4096 - 1, m.chunks().to_vec()).unwrap();
        fs::write(s.record_path(&two), legacy(&wrong)).unwrap();
        drop(s);
        let s = ChunkStore::open(dir.path()).unwrap();
        let img = s.get_image(&one).unwrap();
        assert_eq!((img.manifest, img.committed), (m.clone(), UNIX_EPOCH + Duration::from_millis(77)));
        assert!(fs::read(s.record_path(&one)).unwrap().starts_with(b"FLEETRC2"));
        let err = s.get_image(&two).unwrap_err();
        assert!(matches!(err, StoreError::BadRecord { why: RecordError::Legacy(_), .. }), "{err}");
    }

    #[test]
    fn gc_removes_stale_temporary_files_only() {
        let (_d, s) = store();
        let stale = s.root().join("tmp").join("1.0");
        let fresh = s.root().join("tmp").join("1.1");
        fs::write(&stale, b"half a chunk").unwrap();
        fs::write(&fresh, b"a write in progress").unwrap();
        let old = SystemTime::now() - STALE_TMP - Duration::from_secs(5);
        File::options().append(true).open(&stale).unwrap().set_modified(old).unwrap();
        let r = s.collect_garbage(Duration::ZERO, true).unwrap();
        assert_eq!(r.stale_temp_files, 1);
        assert!(stale.exists(), "dry run");
        let r = s.collect_garbage(Duration::ZERO, false).unwrap();
        assert_eq!(r.stale_temp_files, 1);
        assert!(!stale.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn gc_removes_only_unreferenced_chunks_past_grace() {
        let (_d, s) = store();
        let keep = s.put_plain(&[1u8; 4096]).unwrap();
        let drop = s.put_plain(&[2u8; 4096]).unwrap();
        let name = ImageName::parse("s/1").unwrap();
        s.commit(&name, &Manifest::new(4096, 4096, vec![ChunkRef::Data(keep)]).unwrap()).unwrap();
        let r = s.collect_garbage(Duration::from_secs(3600), false).unwrap();
        assert_eq!(r.chunks_removed, 0, "recent uploads are kept");
        let r = s.collect_garbage(Duration::ZERO, true).unwrap();
        assert_eq!(r.chunks_removed, 1);
        assert!(s.has(&drop), "dry run removes nothing");
        s.collect_garbage(Duration::ZERO, false).unwrap();
        assert!(s.has(&keep));
        assert!(!s.has(&drop));
        s.delete_image(&name).unwrap();
        assert!(s.list_streams().unwrap().is_empty());
        s.collect_garbage(Duration::ZERO, false).unwrap();
        assert!(!s.has(&keep));
    }

    #[test]
    fn reopening_clears_interrupted_writes() {
        let (d, s) = store();
        fs::write(s.root().join("tmp").join("half"), b"torn").unwrap();
        drop(s);
        ChunkStore::open(d.path()).unwrap();
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }
}
