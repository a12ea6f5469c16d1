//! [`Cached`]: a bounded local copy of the chunks read from another
//! backend, for an imageserver far from its bucket. Only reads of chunk
//! bytes are served from it; whether a chunk is stored, and everything
//! about records, leases and collections, is always asked of the source,
//! so a cached copy can never make a writer believe the source holds a
//! chunk. A copy is checked like any read (digest), and a damaged one is
//! dropped and read again from the source ([`Backend::forget_cached`]).
//! Least recently read copies go first once the bytes exceed the bound.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use image_format::{Digest, ImageName};

use crate::{Backend, ChunkEntry, Result, io_err};

/// A backend with a local chunk cache in front.
#[derive(Debug)]
pub struct Cached {
    source: Box<dyn Backend>,
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
}

#[derive(Debug, Default)]
struct Index {
    /// Digest -> (last read, bytes).
    entries: HashMap<Digest, (u64, u64)>,
    by_use: BTreeMap<u64, Digest>,
    bytes: u64,
    tick: u64,
}

impl Index {
    fn insert(&mut self, d: Digest, len: u64) {
        self.remove(&d);
        self.tick += 1;
        self.entries.insert(d, (self.tick, len));
        self.by_use.insert(self.tick, d);
        self.bytes += len;
    }

    fn remove(&mut self, d: &Digest) -> bool {
        match self.entries.remove(d) {
            Some((t, len)) => {
                self.by_use.remove(&t);
                self.bytes -= len;
                true
            }
            None => false,
        }
    }
}

impl Cached {
    /// Put a cache of at most `max_bytes` in `dir` (created if needed;
    /// copies already there are kept, oldest first to go) in front of
    /// `source`.
    pub fn new(source: Box<dyn Backend>, dir: &Path, max_bytes: u64) -> Result<Cached> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(d) = Digest::from_hex(&name) else {
                // A copy whose write was interrupted.
                let _ = fs::remove_file(entry.path());
                continue;
            };
            let meta = entry.metadata().map_err(io_err(&entry.path()))?;
            found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), d, meta.len()));
        }
        found.sort();
        let cache =
            Cached { source, dir: dir.to_owned(), max_bytes, index: Mutex::default(), tmp_seq: AtomicU64::new(0) };
        for (_, d, len) in found {
            cache.index().insert(d, len);
        }
        cache.evict();
        Ok(cache)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.to_hex())
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> u64 {
        self.index().bytes
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut ix = self.index();
                if ix.bytes <= self.max_bytes {
                    return;
                }
                let Some((_, d)) = ix.by_use.pop_first() else { return };
                let (_, len) = ix.entries.remove(&d).expect("indexed both ways");
                ix.bytes -= len;
                d
            };
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    fn keep(&self, d: &Digest, bytes: &[u8]) {
        if bytes.len() as u64 > self.max_bytes {
            return;
        }
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp.{}.{n}", std::process::id()));
        // No fsync: a copy torn by a crash fails its digest check and is
        // read again from the source.
        if fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, self.path(d))).is_err() {
            let _ = fs::remove_file(&tmp);
            return;
        }
        self.index().insert(*d, bytes.len() as u64);
        self.evict();
    }
}

impl Backend for Cached {
    fn location(&self) -> String {
        format!("{} (cached in {})", self.source.location(), self.dir.display())
    }

    fn chunk_heads(&self, digests: &[Digest], n: usize) -> Result<Vec<Option<Vec<u8>>>> {
        self.source.chunk_heads(digests, n)
    }

    fn chunk_read(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        let cached = self.index().entries.contains_key(d);
        if cached {
            match fs::read(self.path(d)) {
                Ok(bytes) => {
                    self.index().insert(*d, bytes.len() as u64);
                    return Ok(Some(bytes));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.index().remove(d);
                }
                Err(e) => return Err(io_err(&self.path(d))(e)),
            }
        }
        let bytes = self.source.chunk_read(d)?;
        if let Some(b) = &bytes {
            self.keep(d, b);
        }
        Ok(bytes)
    }

    fn chunk_write(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        self.source.chunk_write(d, bytes)
    }

    fn chunk_list(&self) -> Result<Vec<ChunkEntry>> {
        self.source.chunk_list()
    }

    fn chunk_delete(&self, digests: &[Digest]) -> Result<()> {
        self.source.chunk_delete(digests)?;
        for d in digests {
            self.forget_cached(d);
        }
        Ok(())
    }

    fn touch(&self, digests: &[Digest]) -> Result<()> {
        self.source.touch(digests)
    }

    fn forget_cached(&self, d: &Digest) -> bool {
        let had = self.index().remove(d);
        let _ = fs::remove_file(self.path(d));
        had
    }

    fn wait_for_gc(&self) -> Result<()> {
        self.source.wait_for_gc()
    }

    fn begin_gc(&self, deadline: SystemTime) -> Result<()> {
        self.source.begin_gc(deadline)
    }

    fn end_gc(&self) {
        self.source.end_gc()
    }

    fn sweep(&self, cutoff: SystemTime, dry_run: bool) -> Result<u64> {
        self.source.sweep(cutoff, dry_run)
    }

    fn record_read(&self, name: &ImageName) -> Result<Option<Vec<u8>>> {
        self.source.record_read(name)
    }

    fn records(&self, stream: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.source.records(stream)
    }

    fn record_create(&self, name: &ImageName, bytes: &[u8]) -> Result<bool> {
        self.source.record_create(name, bytes)
    }

    fn record_replace(&self, name: &ImageName, bytes: &[u8]) -> Result<()> {
        self.source.record_replace(name, bytes)
    }

    fn record_delete(&self, name: &ImageName) -> Result<bool> {
        self.source.record_delete(name)
    }

    fn streams(&self) -> Result<Vec<String>> {
        self.source.streams()
    }

    fn may_hold_legacy(&self) -> bool {
        self.source.may_hold_legacy()
    }

    fn check(&self) -> Result<()> {
        self.source.check()
    }
}
