//! Chunks: stored as one zstd frame each under `chunks/`, named by the
//! BLAKE3 digest of their plain bytes; a chunk is stored only after its
//! digest matched, and checked again when read.

use super::*;

impl ChunkStore {
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

    pub(crate) fn write_chunk_file(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.chunk_path(d);
        let dir = path.parent().expect("chunk path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path();
        write_synced(&tmp, bytes)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        sync_dir(dir)
    }

    pub(crate) fn decompress(&self, zstd_data: &[u8]) -> Result<Vec<u8>, String> {
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

    pub(crate) fn read_chunk_file(&self, d: &Digest) -> Result<Vec<u8>> {
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
