//! Chunks: one zstd frame each, named by the BLAKE3 digest of their plain
//! bytes; a chunk is stored only after its digest matched, and checked again
//! when read.

use super::*;

/// The largest zstd frame header: enough to read a frame's content size.
const FRAME_HEADER_MAX: usize = 18;

impl ChunkStore {
    /// Whether the chunk is stored.
    pub fn has(&self, d: &Digest) -> Result<bool> {
        Ok(self.backend.chunk_heads(std::slice::from_ref(d), 0)?[0].is_some())
    }

    /// The digests of `wanted` that are not stored, in their order. Those
    /// that are stay for garbage collection's grace period (a writer was
    /// just told it need not upload them): they are touched first, then,
    /// once no collection is running, looked for, so a collection elsewhere
    /// either sees the touch or has finished deleting before the look.
    pub fn find_missing(&self, wanted: &[Digest]) -> Result<Vec<Digest>> {
        let _guard = self.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        self.backend.touch(wanted)?;
        self.backend.wait_for_gc()?;
        let heads = self.backend.chunk_heads(wanted, 0)?;
        Ok(wanted.iter().zip(heads).filter(|(_, h)| h.is_none()).map(|(d, _)| *d).collect())
    }

    /// Store a chunk given as a zstd frame. The frame is decompressed (never
    /// beyond the largest chunk size) and its digest checked before anything
    /// is written. Returns false when the chunk was already present.
    pub fn put_compressed(&self, d: &Digest, zstd_data: &[u8]) -> Result<bool> {
        let plain = self.decompress(zstd_data).map_err(|why| StoreError::BadChunk { digest: *d, why })?;
        if Digest::of(&plain) != *d {
            return Err(StoreError::DigestMismatch { digest: *d });
        }
        if self.has(d)? {
            return Ok(false);
        }
        self.backend.chunk_write(d, zstd_data)?;
        Ok(true)
    }

    /// Store plain bytes (compressing them). Returns the digest.
    pub fn put_plain(&self, plain: &[u8]) -> Result<Digest> {
        let d = Digest::of(plain);
        if !self.has(&d)? {
            self.backend.chunk_write(&d, &compress(plain))?;
        }
        Ok(d)
    }

    pub(crate) fn decompress(&self, zstd_data: &[u8]) -> Result<Vec<u8>, String> {
        zstd::bulk::decompress(zstd_data, self.max_chunk)
            .map_err(|e| format!("not a zstd frame of at most 16 MiB: {e}"))
    }

    /// The stored zstd frame of a chunk, after checking that it decompresses
    /// to bytes with the right digest. A stored chunk that fails is
    /// [`StoreError::Corrupt`]: damage at rest, not a caller's mistake. A
    /// damaged copy in a local cache is dropped and the source read once.
    pub fn get_compressed(&self, d: &Digest) -> Result<Vec<u8>> {
        match self.get_compressed_once(d) {
            Err(StoreError::Corrupt { .. }) if self.backend.forget_cached(d) => self.get_compressed_once(d),
            r => r,
        }
    }

    fn get_compressed_once(&self, d: &Digest) -> Result<Vec<u8>> {
        let z = self.read_chunk(d)?;
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
            let mut dec = zstd::bulk::Decompressor::new()
                .map_err(|e| StoreError::Corrupt { digest: *d, why: format!("no zstd decoder: {e}") })?;
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

    fn read_chunk(&self, d: &Digest) -> Result<Vec<u8>> {
        self.backend.chunk_read(d)?.ok_or(StoreError::MissingChunk(*d))
    }

    /// The plain bytes of a chunk, digest checked.
    pub fn get_plain(&self, d: &Digest) -> Result<Vec<u8>> {
        let z = self.read_chunk(d)?;
        let plain = self.decompress(&z).map_err(|why| StoreError::Corrupt { digest: *d, why })?;
        if Digest::of(&plain) != *d {
            return Err(StoreError::Corrupt { digest: *d, why: "its bytes do not match its digest".into() });
        }
        Ok(plain)
    }

    /// The plain length of a stored chunk (see [`ChunkStore::chunk_lens`]).
    pub fn chunk_len(&self, d: &Digest) -> Result<u64> {
        self.chunk_lens(std::slice::from_ref(d)).map(|l| l[0])
    }

    /// The plain lengths of stored chunks: from their zstd frame headers when
    /// the frame records it (every frame this store and its clients make
    /// does; zstd checks it when decompressing, and uploads were
    /// decompressed and hashed before being stored), else by decompressing.
    pub fn chunk_lens(&self, ds: &[Digest]) -> Result<Vec<u64>> {
        let heads = self.backend.chunk_heads(ds, FRAME_HEADER_MAX)?;
        ds.iter()
            .zip(heads)
            .map(|(d, head)| {
                let head = head.ok_or(StoreError::MissingChunk(*d))?;
                match zstd::zstd_safe::get_frame_content_size(&head) {
                    Ok(Some(len)) => Ok(len),
                    _ => Ok(self.get_plain(d)?.len() as u64),
                }
            })
            .collect()
    }
}
