//! A content-addressed chunk store with committed images.
//!
//! Layout under the root directory:
//! - `chunks/ab/abcdef…`: one zstd frame per chunk, named by the BLAKE3 digest
//!   of its plain bytes;
//! - `images/STREAM/_leaves/LEAF`: a committed image record (commit time and
//!   canonical manifest); `_` cannot start a valid name component, so records
//!   never collide with streams;
//! - `tmp/`: files being written; emptied on open.
//!
//! **Architecture invariants:** every file appears by rename (or hard link for
//! no-clobber) after its bytes were fsynced, so a crash leaves no torn chunk
//! and no half image; a chunk is stored only after its digest matched, and
//! checked again when read; an image is committed only when all its chunks are
//! present, and a committed leaf never changes.

#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use image_format::{Digest, ImageName, Manifest, ManifestError, NameError};

/// zstd level used when this crate compresses (fast; chunks are small).
pub const ZSTD_LEVEL: i32 = 1;
const RECORD_MAGIC: &[u8; 8] = b"FLEETREC";
const LEAVES_DIR: &str = "_leaves";

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
    #[error("image record '{path}' is corrupt: {why}")]
    BadRecord { path: PathBuf, why: String },
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

/// Result of a garbage collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_kept: u64,
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
        Ok(ChunkStore {
            root: root.to_owned(),
            gc_lock: RwLock::new(()),
            tmp_seq: AtomicU64::new(0),
            max_chunk: image_format::MAX_CHUNK_SIZE as usize,
        })
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
        let plain = self.decompress(d, zstd_data)?;
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

    fn decompress(&self, d: &Digest, zstd_data: &[u8]) -> Result<Vec<u8>> {
        zstd::bulk::decompress(zstd_data, self.max_chunk)
            .map_err(|e| StoreError::BadChunk { digest: *d, why: format!("not a zstd frame of at most 16 MiB: {e}") })
    }

    /// The stored zstd frame of a chunk, after checking that it decompresses
    /// to bytes with the right digest.
    pub fn get_compressed(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.chunk_path(d);
        let z = match fs::read(&p) {
            Ok(z) => z,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::MissingChunk(*d)),
            Err(e) => return Err(io_err(&p)(e)),
        };
        let plain = self.decompress(d, &z)?;
        if Digest::of(&plain) != *d {
            return Err(StoreError::DigestMismatch { digest: *d });
        }
        Ok(z)
    }

    /// The plain bytes of a chunk, digest checked.
    pub fn get_plain(&self, d: &Digest) -> Result<Vec<u8>> {
        let z = self.get_compressed(d)?;
        self.decompress(d, &z)
    }

    fn record_path(&self, name: &ImageName) -> PathBuf {
        let mut p = self.root.join("images");
        p.extend(name.stream().split('/'));
        p.join(LEAVES_DIR).join(name.leaf())
    }

    /// Commit an image: refused while any chunk is missing; re-committing the
    /// same manifest is a no-op, other contents are refused. Returns the
    /// stored image and whether it was new.
    pub fn commit(&self, name: &ImageName, manifest: &Manifest) -> Result<(StoredImage, bool)> {
        let _guard = self.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<Digest> = manifest.distinct_digests().into_iter().filter(|d| !self.has(d)).collect();
        if let Some(first) = missing.first() {
            return Err(StoreError::ChunksMissing { name: name.to_string(), missing: missing.len(), first: *first });
        }
        let path = self.record_path(name);
        if let Some(existing) = self.get_image_opt(name)? {
            return if existing.image_id == manifest.image_id() {
                Ok((existing, false))
            } else {
                Err(StoreError::LeafExists { name: name.to_string(), existing: existing.image_id })
            };
        }
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let committed = SystemTime::now();
        let ms = u64::try_from(committed.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0);
        let mut rec = Vec::with_capacity(16 + manifest.chunks().len() * 33);
        rec.extend_from_slice(RECORD_MAGIC);
        rec.extend_from_slice(&ms.to_le_bytes());
        rec.extend_from_slice(&manifest.encode());
        let tmp = self.tmp_path();
        write_synced(&tmp, &rec)?;
        // A hard link never replaces an existing file: two racing commits of
        // one leaf cannot both win.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let existing = self.get_image(name)?;
                return if existing.image_id == manifest.image_id() {
                    Ok((existing, false))
                } else {
                    Err(StoreError::LeafExists { name: name.to_string(), existing: existing.image_id })
                };
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
        let bad = |why: String| StoreError::BadRecord { path: path.clone(), why };
        if bytes.len() < 16 || &bytes[..8] != RECORD_MAGIC {
            return Err(bad("bad header".into()));
        }
        let ms = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let manifest = Manifest::decode(&bytes[16..]).map_err(|e| bad(e.to_string()))?;
        Ok(Some(StoredImage {
            name: name.clone(),
            image_id: manifest.image_id(),
            manifest,
            committed: UNIX_EPOCH + Duration::from_millis(ms),
        }))
    }

    /// Delete a committed image (its chunks go at the next garbage collection).
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

    /// Images of a stream, oldest commit first.
    pub fn list_images(&self, stream: &str) -> Result<Vec<StoredImage>> {
        image_format::validate_stream(stream)?;
        let mut dir = self.root.join("images");
        dir.extend(stream.split('/'));
        let dir = dir.join(LEAVES_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let leaf = entry.file_name().to_string_lossy().into_owned();
            let Ok(name) = ImageName::new(stream, &leaf) else { continue };
            if let Some(img) = self.get_image_opt(&name)? {
                out.push(img);
            }
        }
        out.sort_by(|a, b| a.committed.cmp(&b.committed).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Every committed image of every stream.
    pub fn list_all_images(&self) -> Result<Vec<StoredImage>> {
        let mut out = Vec::new();
        for s in self.list_streams()? {
            out.extend(self.list_images(&s)?);
        }
        Ok(out)
    }

    /// Remove chunks no committed image references and that were not written
    /// or confirmed within `grace` (uploads of images not yet committed).
    pub fn collect_garbage(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _guard = self.gc_lock.write().unwrap_or_else(|e| e.into_inner());
        let mut live = HashSet::new();
        for img in self.list_all_images()? {
            live.extend(img.manifest.distinct_digests());
        }
        let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let mut report = GcReport::default();
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

/// Compress a chunk for storage or the wire.
pub fn compress(plain: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(plain, ZSTD_LEVEL).expect("zstd compression of an in-memory buffer cannot fail")
}

/// Write `bytes` to a new file at `path` and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// fsync a directory so a rename or link in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io_err(dir))
}

/// Write a file atomically: temp file beside it, fsync, rename, fsync the
/// directory. Readers see the old or the new contents, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })?;
    sync_dir(dir)
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
        assert!(matches!(s.get_compressed(&d), Err(StoreError::DigestMismatch { .. })));
    }

    #[test]
    fn commit_needs_every_chunk_and_leaves_are_immutable() {
        let (_d, s) = store();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        let da = Digest::of(&a);
        let db = Digest::of(&b);
        let m1 = Manifest::new(4096, 8192 + 100, vec![ChunkRef::Data(da), ChunkRef::Zero, ChunkRef::Data(db)]).unwrap();
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
        let m2 = Manifest::new(4096, 8192 + 100, vec![ChunkRef::Data(db), ChunkRef::Zero, ChunkRef::Data(da)]).unwrap();
        assert!(matches!(s.commit(&name, &m2), Err(StoreError::LeafExists { .. })));
        assert_eq!(s.get_image(&name).unwrap().manifest, m1);
        assert_eq!(s.list_streams().unwrap(), vec!["base/os".to_owned()]);
        assert_eq!(s.list_images("base/os").unwrap().len(), 1);
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
