//! [`Dir`]: a store's objects in a local directory.
//!
//! Layout under the root:
//! - `chunks/ab/abcdef…`: one file per chunk, named by its digest;
//! - `images/STREAM/_leaves/LEAF`: a leaf's record; `_` cannot start a valid
//!   name component, so records never collide with streams;
//! - `tmp/`: files being written; emptied on open, and of stale files by
//!   garbage collection.
//!
//! Every file appears by rename (or, for records, by hard link, which never
//! replaces) after its bytes were fsynced, so a crash leaves no torn chunk
//! and no half record. One process serves a directory: garbage collection
//! is excluded by the store's own lock, so [`Backend::wait_for_gc`] and
//! [`Backend::begin_gc`] have nothing to do here.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use image_format::{Digest, ImageName};

use crate::{Backend, ChunkEntry, LEAVES_DIR, Result, io_err};

/// A local directory holding a store.
#[derive(Debug)]
pub struct Dir {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl Dir {
    /// Open (creating if needed) the directory, removing leftovers of
    /// interrupted writes.
    pub fn open(root: &Path) -> Result<Dir> {
        for d in ["chunks", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            let _ = fs::remove_file(&path);
        }
        Ok(Dir { root: root.to_owned(), tmp_seq: AtomicU64::new(0) })
    }

    /// The directory as it is (tests look at its files).
    #[cfg(test)]
    pub(crate) fn at(root: &Path) -> Dir {
        Dir { root: root.to_owned(), tmp_seq: AtomicU64::new(1 << 32) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file of a chunk.
    pub fn chunk_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn leaves_dir(&self, stream: &str) -> PathBuf {
        let mut p = self.root.join("images");
        p.extend(stream.split('/'));
        p.join(LEAVES_DIR)
    }

    /// The file of a leaf's record.
    pub fn record_path(&self, name: &ImageName) -> PathBuf {
        self.leaves_dir(name.stream()).join(name.leaf())
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root.join("tmp").join(format!("{}.{n}", std::process::id()))
    }

    /// Write `bytes` to a fsynced temporary file.
    fn staged(&self, bytes: &[u8]) -> Result<PathBuf> {
        let tmp = self.tmp_path();
        fleet_fs::write_synced(&tmp, bytes).map_err(io_err(&tmp))?;
        Ok(tmp)
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fleet_fs::sync_dir(dir).map_err(io_err(dir))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn read_head(path: &Path, n: usize) -> Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut head = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut head).map_err(io_err(path))?;
    Ok(Some(head))
}

impl Backend for Dir {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn chunk_heads(&self, digests: &[Digest], n: usize) -> Result<Vec<Option<Vec<u8>>>> {
        digests
            .iter()
            .map(|d| {
                let p = self.chunk_path(d);
                if n == 0 { Ok(p.is_file().then(Vec::new)) } else { read_head(&p, n) }
            })
            .collect()
    }

    fn chunk_read(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        read_opt(&self.chunk_path(d))
    }

    fn chunk_write(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.chunk_path(d);
        let dir = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.staged(bytes)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(dir)
    }

    fn chunk_list(&self) -> Result<Vec<ChunkEntry>> {
        let chunks = self.root.join("chunks");
        let mut out = Vec::new();
        for sub in fs::read_dir(&chunks).map_err(io_err(&chunks))? {
            let sub = sub.map_err(io_err(&chunks))?.path();
            for entry in fs::read_dir(&sub).map_err(io_err(&sub))? {
                let entry = entry.map_err(io_err(&sub))?;
                let Ok(digest) = Digest::from_hex(&entry.file_name().to_string_lossy()) else { continue };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed since the listing: not stored any more.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&entry.path())(e)),
                };
                // A time that cannot be read counts as now: kept.
                let written = meta.modified().unwrap_or_else(|_| SystemTime::now());
                out.push(ChunkEntry { digest, bytes: meta.len(), written, leased: None });
            }
        }
        Ok(out)
    }

    fn chunk_delete(&self, digests: &[Digest]) -> Result<()> {
        for d in digests {
            let p = self.chunk_path(d);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }

    fn touch(&self, digests: &[Digest]) -> Result<()> {
        let now = SystemTime::now();
        for d in digests {
            // An absent chunk has nothing to keep: it will be uploaded.
            if let Ok(f) = File::options().append(true).open(self.chunk_path(d)) {
                let _ = f.set_modified(now);
            }
        }
        Ok(())
    }

    fn wait_for_gc(&self) -> Result<()> {
        Ok(())
    }

    fn begin_gc(&self, _deadline: SystemTime) -> Result<()> {
        Ok(())
    }

    fn end_gc(&self) {}

    fn sweep(&self, cutoff: SystemTime, dry_run: bool) -> Result<u64> {
        let tmp = self.root.join("tmp");
        let mut n = 0;
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let stale = entry.metadata().and_then(|m| m.modified()).map(|m| m < cutoff).unwrap_or(false);
            if stale {
                if !dry_run {
                    let _ = fs::remove_file(entry.path());
                }
                n += 1;
            }
        }
        Ok(n)
    }

    fn record_read(&self, name: &ImageName) -> Result<Option<Vec<u8>>> {
        read_opt(&self.record_path(name))
    }

    fn records(&self, stream: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let dir = self.leaves_dir(stream);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let leaf = entry.file_name().to_string_lossy().into_owned();
            if let Some(bytes) = read_opt(&entry.path())? {
                out.push((leaf, bytes));
            }
        }
        Ok(out)
    }

    fn record_create(&self, name: &ImageName, bytes: &[u8]) -> Result<bool> {
        let path = self.record_path(name);
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.staged(bytes)?;
        // A hard link never replaces an existing file: two racing commits of
        // one leaf cannot both win.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        }
        sync_dir(dir)?;
        Ok(true)
    }

    fn record_replace(&self, name: &ImageName, bytes: &[u8]) -> Result<()> {
        let path = self.record_path(name);
        fleet_fs::write_atomic(&path, bytes).map_err(io_err(&path))
    }

    fn record_delete(&self, name: &ImageName) -> Result<bool> {
        let path = self.record_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
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
        Ok(true)
    }

    fn streams(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        walk_streams(&self.root.join("images"), "", &mut out)?;
        Ok(out)
    }

    fn may_hold_legacy(&self) -> bool {
        true
    }

    fn check(&self) -> Result<()> {
        let images = self.root.join("images");
        fs::read_dir(&images).map(drop).map_err(io_err(&images))
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

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0)
}
