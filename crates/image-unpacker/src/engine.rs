//! The work behind the long RPCs: scanning a device, writing a diff onto it,
//! reading it back for capture, and streaming its bytes.
//!
//! **Invariants:** a chunk reaches the device only after its digest was
//! checked (the writer takes only a `VerifiedChunk`); writes go only
//! through a [`DeviceWriter`] (`core::claims::ClaimedDevice`); memory is bounded by
//! [`WRITE_QUEUE`] chunks whatever the image size.

use std::{
    collections::HashMap,
    fs::File,
    io::Read as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_proto::unpacker::UnpackStats;
use futures::StreamExt as _;
use image_client::{Client, ClientError};
use image_format::{ChunkReader, ChunkRef, Diff, Digest, Manifest, is_zero};
use tokio::sync::mpsc;

use crate::{
    metrics::Metrics,
    verified::{self, VerifiedChunk},
};

/// Verified chunks waiting for the writer. With the fetch pipeline's own
/// read-ahead this keeps network and disk busy at once.
pub const WRITE_QUEUE: usize = 8;
/// How often progress is reported.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Size of the pieces GetRaw sends.
pub const RAW_PIECE: usize = 1 << 20;

/// Why an unpack failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Fetch(#[from] ClientError),
    #[error("writing the device failed: {0}")]
    Write(std::io::Error),
}

/// Counters shared between the writer and the reporter.
#[derive(Debug, Default)]
pub struct Counters {
    pub done_bytes: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetched_chunks: AtomicU64,
}

/// Hash what a device holds, `chunk_size` at a time, over its whole length.
pub fn scan(path: &Path, chunk_size: u32, done: &AtomicU64) -> std::io::Result<Manifest> {
    image_format::hash_file(path, chunk_size, |n| done.store(n, Ordering::Relaxed))
}

/// Bytes an unpack of `diff` writes.
pub fn bytes_to_write(target: &Manifest, diff: &Diff) -> u64 {
    diff.fetch.iter().map(|(i, _)| *i).chain(diff.zero.iter().copied()).map(|i| target.chunk_len(i) as u64).sum()
}

/// What [`apply`] writes through: verified chunks and zeros, nothing else.
/// The unpacker's one implementation, `core::claims::ClaimedDevice`, is
/// made only for a stream that is bound to the device and busy.
pub(crate) trait DeviceWriter {
    /// Write `chunk` at `offset`.
    fn write_chunk(&self, chunk: &VerifiedChunk, offset: u64) -> std::io::Result<()>;
    /// Write `len` zero bytes at `offset`.
    fn write_zeros(&mut self, offset: u64, len: usize) -> std::io::Result<()>;
    /// Flush what was written to the device.
    fn sync(&self) -> std::io::Result<()>;
}

/// Write `diff` onto `device` so that it holds `target`: zero chunks first
/// (local work while the first fetches travel), then fetched chunks as they
/// arrive. Flushes the device before returning.
pub(crate) async fn apply(
    mut device: impl DeviceWriter + Send + 'static,
    client: Client,
    target: &Manifest,
    diff: &Diff,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
    mut tick: impl FnMut(),
) -> Result<UnpackStats, UnpackError> {
    let started = Instant::now();
    let mut wanted: HashMap<Digest, Vec<u64>> = HashMap::new();
    for (i, d) in &diff.fetch {
        wanted.entry(*d).or_default().push(*i);
    }
    let zero: Vec<(u64, usize)> = diff.zero.iter().map(|&i| (target.offset(i), target.chunk_len(i))).collect();
    let offsets: HashMap<u64, u64> = diff.fetch.iter().map(|(i, _)| (*i, target.offset(*i))).collect();

    let (tx, mut rx) = mpsc::channel::<(Vec<u64>, verified::VerifiedChunk)>(WRITE_QUEUE);
    let writer_counters = counters.clone();
    let writer_metrics = metrics.clone();
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, u64)> {
        let mut written = 0u64;
        for (offset, len) in &zero {
            device.write_zeros(*offset, *len)?;
            writer_counters.done_bytes.fetch_add(*len as u64, Ordering::Relaxed);
        }
        Metrics::add(&writer_metrics.chunks_zeroed, zero.len() as u64);
        while let Some((indices, chunk)) = rx.blocking_recv() {
            let len = chunk.bytes().len() as u64;
            for i in indices {
                device.write_chunk(&chunk, offsets[&i])?;
                written += 1;
                writer_counters.done_bytes.fetch_add(len, Ordering::Relaxed);
                Metrics::add(&writer_metrics.bytes_written, len);
                Metrics::add(&writer_metrics.chunks_written, 1);
            }
        }
        device.sync()?;
        Ok((written, zero.len() as u64))
    });

    // Each distinct digest with the length of its first place in `target`
    // (a manifest gives one digest one length), checked by the fetch.
    let mut seen = std::collections::HashSet::new();
    let wanted_chunks: Vec<(Digest, usize)> =
        diff.fetch.iter().filter(|(_, d)| seen.insert(*d)).map(|(i, d)| (*d, target.chunk_len(*i))).collect();
    let mut fetched = verified::fetch(client, wanted_chunks);
    let mut last = Instant::now();
    let mut fetch_error = None;
    while let Some(item) = fetched.next().await {
        let chunk = match item {
            Ok(c) => c,
            Err(e) => {
                fetch_error = Some(e);
                break;
            }
        };
        counters.fetched_chunks.fetch_add(1, Ordering::Relaxed);
        counters.fetched_bytes.fetch_add(chunk.compressed_len() as u64, Ordering::Relaxed);
        Metrics::add(&metrics.chunks_fetched, 1);
        Metrics::add(&metrics.bytes_fetched, chunk.compressed_len() as u64);
        let indices = wanted.remove(chunk.digest()).unwrap_or_default();
        if tx.send((indices, chunk)).await.is_err() {
            break; // the writer failed; its error is reported below
        }
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            tick();
        }
    }
    drop(tx);
    drop(fetched);
    let written = writer.await.expect("the device writer does not panic");
    if let Some(e) = fetch_error {
        return Err(e.into());
    }
    let (chunks_written, chunks_zeroed) = written.map_err(UnpackError::Write)?;
    let total = target.chunks().len() as u64;
    Ok(UnpackStats {
        chunks_fetched: counters.fetched_chunks.load(Ordering::Relaxed),
        bytes_fetched: counters.fetched_bytes.load(Ordering::Relaxed),
        chunks_written,
        bytes_written: counters.done_bytes.load(Ordering::Relaxed),
        chunks_zeroed,
        chunks_unchanged: total - chunks_written - chunks_zeroed,
        chunks_total: total,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What reading a device back found.
#[derive(Debug)]
pub enum ReadBack {
    /// Every chunk matched; BLAKE3 of all `size` bytes.
    Matches(blake3::Hash),
    /// The first chunk that differs.
    Differs { index: u64, offset: u64 },
}

/// Flush, drop the cache, and read the device's first `m.size()` bytes,
/// checking each chunk against the manifest.
pub fn read_back(path: &Path, m: &Manifest, done: &AtomicU64) -> std::io::Result<ReadBack> {
    let file = File::open(path)?;
    file.sync_all()?;
    crate::blockdev::drop_cache(&file);
    let mut reader = ChunkReader::new(std::io::BufReader::with_capacity(1 << 20, file.take(m.size())), m.chunk_size());
    let mut whole = blake3::Hasher::new();
    let mut count = 0u64;
    while let Some((index, buf)) = reader.next_chunk()? {
        let ok = match m.chunks().get(usize::try_from(index).unwrap_or(usize::MAX)) {
            Some(ChunkRef::Zero) => is_zero(buf),
            Some(ChunkRef::Data(d)) => Digest::of(buf) == *d,
            None => false,
        };
        if !ok || buf.len() != m.chunk_len(index) {
            return Ok(ReadBack::Differs { index, offset: m.offset(index) });
        }
        whole.update(buf);
        count += 1;
        done.fetch_add(buf.len() as u64, Ordering::Relaxed);
    }
    if count != m.chunks().len() as u64 {
        return Ok(ReadBack::Differs { index: count, offset: m.offset(count.min(m.chunks().len() as u64)) });
    }
    Ok(ReadBack::Matches(whole.finalize()))
}

/// Send the device's first `size` bytes in [`RAW_PIECE`] pieces.
pub(crate) fn send_raw<E>(
    path: &Path,
    size: u64,
    tx: &mpsc::Sender<Result<fleet_proto::unpacker::RawData, E>>,
) -> std::io::Result<()> {
    let mut file = File::open(path)?.take(size);
    let mut offset = 0u64;
    let mut buf = vec![0u8; RAW_PIECE];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        let msg = fleet_proto::unpacker::RawData {
            offset,
            data: buf[..filled].to_vec().into(),
            total: if offset == 0 { size } else { 0 },
        };
        if tx.blocking_send(Ok(msg)).is_err() {
            break; // the caller went away
        }
        offset += filled as u64;
    }
    if offset != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the device ended after {offset} of {size} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use image_format::ChunkRef;

    use super::*;

    const CHUNK: u32 = 4096;
    const CS: usize = CHUNK as usize;

    /// Three full chunks (the second all zero) and a short last one.
    fn image() -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..3 * CS + 1000).map(|i| u8::try_from(i % 251).unwrap() + 1).collect();
        bytes[CS..2 * CS].fill(0);
        bytes
    }

    fn manifest_of(bytes: &[u8]) -> Manifest {
        let chunks =
            bytes.chunks(CS).map(|c| if is_zero(c) { ChunkRef::Zero } else { ChunkRef::Data(Digest::of(c)) }).collect();
        Manifest::new(CHUNK, bytes.len() as u64, chunks).unwrap()
    }

    /// Read back a device holding `device` against `m`; also the bytes counted.
    fn read_back_of(device: &[u8], m: &Manifest) -> (ReadBack, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, device).unwrap();
        let done = AtomicU64::new(0);
        let found = read_back(&path, m, &done).unwrap();
        (found, done.load(Ordering::Relaxed))
    }

    fn differs_at(found: &ReadBack) -> Option<(u64, u64)> {
        match found {
            ReadBack::Differs { index, offset } => Some((*index, *offset)),
            ReadBack::Matches(_) => None,
        }
    }

    #[test]
    fn a_device_holding_the_image_matches() {
        let bytes = image();
        let m = manifest_of(&bytes);
        let (found, done) = read_back_of(&bytes, &m);
        assert!(matches!(found, ReadBack::Matches(h) if h == blake3::hash(&bytes)), "{found:?}");
        assert_eq!(done, bytes.len() as u64);
        // A device larger than the image: only the image's bytes are read.
        let mut larger = bytes.clone();
        larger.extend_from_slice(&[0xee; 5000]);
        let (found, done) = read_back_of(&larger, &m);
        assert!(matches!(found, ReadBack::Matches(h) if h == blake3::hash(&bytes)), "{found:?}");
        assert_eq!(done, bytes.len() as u64);
    }

    #[test]
    fn a_chunk_with_the_right_length_and_wrong_bytes_differs() {
        let bytes = image();
        let m = manifest_of(&bytes);
        for (index, at) in [(0u64, 17usize), (2, 2 * CS + 4000), (3, 3 * CS + 999)] {
            let mut device = bytes.clone();
            device[at] ^= 0x40;
            let (found, _) = read_back_of(&device, &m);
            assert_eq!(differs_at(&found), Some((index, index * u64::from(CHUNK))), "byte {at} changed");
        }
    }

    #[test]
    fn a_zero_chunk_holding_data_differs() {
        let bytes = image();
        let m = manifest_of(&bytes);
        let mut device = bytes.clone();
        device[2 * CS - 1] = 1;
        let (found, done) = read_back_of(&device, &m);
        assert_eq!(differs_at(&found), Some((1, u64::from(CHUNK))));
        assert_eq!(done, u64::from(CHUNK), "only the first chunk was read as good");
    }

    #[test]
    fn a_short_device_differs() {
        let bytes = image();
        let m = manifest_of(&bytes);
        // Ending inside the last chunk, at a chunk boundary, and empty.
        let (found, _) = read_back_of(&bytes[..bytes.len() - 10], &m);
        assert_eq!(differs_at(&found), Some((3, 3 * u64::from(CHUNK))));
        let (found, _) = read_back_of(&bytes[..2 * CS], &m);
        assert_eq!(differs_at(&found), Some((2, 2 * u64::from(CHUNK))));
        let (found, _) = read_back_of(&[], &m);
        assert_eq!(differs_at(&found), Some((0, 0)));
    }

    /// A short last chunk that should be zero: its bytes are all zero, only
    /// its length tells that the device ended early.
    #[test]
    fn a_short_device_ending_in_a_zero_chunk_differs() {
        let mut bytes = image();
        bytes[3 * CS..].fill(0);
        let m = manifest_of(&bytes);
        assert_eq!(m.chunks()[3], ChunkRef::Zero);
        let (found, _) = read_back_of(&bytes[..bytes.len() - 1], &m);
        assert_eq!(differs_at(&found), Some((3, 3 * u64::from(CHUNK))));
        let (found, _) = read_back_of(&bytes, &m);
        assert!(matches!(found, ReadBack::Matches(_)), "{found:?}");
    }

    #[test]
    fn scan_hashes_the_whole_device() {
        let bytes = image();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, &bytes).unwrap();
        let done = AtomicU64::new(0);
        assert_eq!(scan(&path, CHUNK, &done).unwrap(), manifest_of(&bytes));
        assert_eq!(done.load(Ordering::Relaxed), bytes.len() as u64);
    }

    #[test]
    fn bytes_to_write_counts_fetched_and_zeroed_chunks_at_their_lengths() {
        let bytes = image();
        let target = manifest_of(&bytes);
        let mut old = bytes.clone();
        old[CS] = 9; // chunk 1 must be zeroed
        old[3 * CS] ^= 1; // the short last chunk must be fetched
        let diff = target.diff_from(Some(&manifest_of(&old)));
        assert_eq!((diff.fetch.len(), diff.zero.len()), (1, 1));
        assert_eq!(bytes_to_write(&target, &diff), u64::from(CHUNK) + 1000);
        // A fresh device: every data chunk, no zeroing.
        assert_eq!(bytes_to_write(&target, &target.diff_from(None)), 2 * u64::from(CHUNK) + 1000);
    }

    #[test]
    fn send_raw_sends_the_first_bytes_in_pieces() {
        let bytes: Vec<u8> = (0..RAW_PIECE * 2 + 300).map(|i| u8::try_from(i % 253).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, &bytes).unwrap();
        let size = bytes.len() as u64 - 100;
        let (tx, mut rx) = mpsc::channel(8);
        send_raw::<()>(&path, size, &tx).unwrap();
        drop(tx);
        let mut got = Vec::new();
        let mut pieces = Vec::new();
        while let Some(msg) = rx.blocking_recv() {
            let msg = msg.unwrap();
            assert_eq!(msg.offset, got.len() as u64);
            pieces.push((msg.data.len(), msg.total));
            got.extend_from_slice(&msg.data);
        }
        assert_eq!(pieces, vec![(RAW_PIECE, size), (RAW_PIECE, 0), (200, 0)]);
        assert_eq!(got, bytes[..bytes.len() - 100]);

        // A device shorter than asked for is an error that says so.
        let (tx, _rx) = mpsc::channel(8);
        let err = send_raw::<()>(&path, bytes.len() as u64 + 5, &tx).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(err.to_string(), format!("the device ended after {} of {} bytes", bytes.len(), bytes.len() + 5));
    }
}
