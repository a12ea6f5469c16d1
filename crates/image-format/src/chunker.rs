//! Cutting a raw disk file into chunks and hashing them.

use std::{
    fs::File,
    io::{self, Read},
    path::Path,
};

use crate::{ChunkRef, Digest, Manifest};

/// Whether every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (chunks, rest) = buf.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&b| b == 0)
}

/// Reads a file chunk by chunk into one reused buffer.
pub struct ChunkReader<R> {
    inner: R,
    buf: Vec<u8>,
    index: u64,
}

impl<R: Read> ChunkReader<R> {
    pub fn new(inner: R, chunk_size: u32) -> ChunkReader<R> {
        ChunkReader { inner, buf: vec![0; chunk_size as usize], index: 0 }
    }

    /// The next chunk's index and bytes, or `None` at end of input. Only the
    /// last chunk may be shorter than the chunk size.
    pub fn next_chunk(&mut self) -> io::Result<Option<(u64, &[u8])>> {
        let mut filled = 0;
        while filled < self.buf.len() {
            match self.inner.read(&mut self.buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        let index = self.index;
        self.index += 1;
        Ok(Some((index, &self.buf[..filled])))
    }
}

/// Hash a raw disk file into a manifest. `progress` is called with the bytes
/// hashed so far after every chunk. `path` may be a block device.
pub fn hash_file(path: &Path, chunk_size: u32, mut progress: impl FnMut(u64)) -> io::Result<Manifest> {
    let mut file = File::open(path)?;
    // A seek to the end gives the length of files and block devices alike.
    let size = io::Seek::seek(&mut file, io::SeekFrom::End(0))?;
    io::Seek::seek(&mut file, io::SeekFrom::Start(0))?;
    let mut reader = ChunkReader::new(io::BufReader::with_capacity(chunk_size as usize, file), chunk_size);
    let mut chunks = Vec::with_capacity(usize::try_from(size.div_ceil(u64::from(chunk_size))).unwrap_or(0));
    let mut done = 0u64;
    while let Some((_, buf)) = reader.next_chunk()? {
        done += buf.len() as u64;
        chunks.push(if is_zero(buf) { ChunkRef::Zero } else { ChunkRef::Data(Digest::of(buf)) });
        progress(done);
    }
    if done != size {
        return Err(io::Error::other(format!("'{}' changed size while being hashed", path.display())));
    }
    Manifest::new(chunk_size, size, chunks).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zero_detection_looks_at_every_byte() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        buf[4098] = 1;
        assert!(!is_zero(&buf));
        buf[4098] = 0;
        buf[17] = 1;
        assert!(!is_zero(&buf));
    }

    #[test]
    fn hashing_marks_zero_chunks_and_a_short_tail() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 4096 * 3 + 10];
        data[5000] = 9;
        data[4096 * 3 + 3] = 1;
        f.write_all(&data).unwrap();
        let m = hash_file(f.path(), 4096, |_| {}).unwrap();
        assert_eq!(m.size(), data.len() as u64);
        assert_eq!(m.chunks().len(), 4);
        assert_eq!(m.chunks()[0], ChunkRef::Zero);
        assert_eq!(m.chunks()[1], ChunkRef::Data(Digest::of(&data[4096..8192])));
        assert_eq!(m.chunks()[2], ChunkRef::Zero);
        assert_eq!(m.chunks()[3], ChunkRef::Data(Digest::of(&data[4096 * 3..])));
    }
}
