//! The leaf's chunks, read from the imageserver once for every target of
//! `publish --via ebs-direct`.
//!
//! Targets ask for their blocks in block order, a window at a time. A
//! chunk another target has read, or is reading, is shared (its bytes, as
//! a 512 KiB block with its SHA-256, are reference-counted); a chunk
//! nobody has is read by the target that asks first, in one FetchChunks
//! stream for its window, on a task of its own, so that no target waits
//! for another target's pace. Read chunks are kept, newest last, up to a
//! bound in bytes ([`KEPT_BYTES`]); targets that run together (the usual
//! case: the same changed chunks, in the same order) read each chunk once.
//! A target that falls far behind reads again what was dropped. A read
//! that fails (or whose target gave up) is read again by whoever waits
//! for it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _, future::Shared};
use image_format::Digest;
use sha2::Digest as _;
use tokio::sync::oneshot;

use super::direct::BLOCK;

/// Bytes of read chunks kept for targets that ask later (512 blocks).
pub const KEPT_BYTES: usize = 256 << 20;

/// A chunk as a whole block (zeros past a short chunk's end) and the
/// SHA-256 PutSnapshotBlock needs.
#[derive(Clone)]
pub struct Block {
    pub data: Bytes,
    pub sha: [u8; 32],
}

type Waiting = Shared<oneshot::Receiver<Result<Block, String>>>;
/// A chunk to read, and where its block goes.
type ToRead = (Digest, usize, oneshot::Sender<Result<Block, String>>);

#[derive(Default)]
struct State {
    kept: HashMap<Digest, Block>,
    order: VecDeque<Digest>,
    kept_bytes: usize,
    reading: HashMap<Digest, Waiting>,
}

/// The chunks every target of one publish shares.
pub struct SharedChunks {
    images: image_client::Client,
    state: Mutex<State>,
    kept_limit: usize,
    /// Bytes read from the imageserver (zstd, as sent), by all targets.
    read_bytes: AtomicU64,
}

impl std::fmt::Debug for SharedChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedChunks").field("read_bytes", &self.read_bytes.load(Ordering::Relaxed)).finish()
    }
}

/// Where each chunk of a window comes from.
enum Source {
    Kept(Block),
    Waiting(Waiting),
}

impl SharedChunks {
    pub fn new(images: image_client::Client, kept_limit: usize) -> Arc<SharedChunks> {
        Arc::new(SharedChunks {
            images,
            state: Mutex::new(State::default()),
            kept_limit,
            read_bytes: AtomicU64::new(0),
        })
    }

    /// The blocks of `window` (digest and plain length, in order), as they
    /// come; the second value counts the bytes this call read from the
    /// imageserver itself.
    pub async fn window(self: &Arc<Self>, window: &[(Digest, usize)]) -> anyhow::Result<(Vec<Block>, u64)> {
        let mut mine: Vec<ToRead> = Vec::new();
        let sources: Vec<Source> = {
            let mut s = self.state.lock().expect("shared chunks lock");
            window
                .iter()
                .map(|&(d, len)| {
                    if let Some(b) = s.kept.get(&d) {
                        return Source::Kept(b.clone());
                    }
                    if let Some(w) = s.reading.get(&d) {
                        return Source::Waiting(w.clone());
                    }
                    let (tx, rx) = oneshot::channel();
                    let w = rx.shared();
                    s.reading.insert(d, w.clone());
                    mine.push((d, len, tx));
                    Source::Waiting(w)
                })
                .collect()
        };
        let mut read = 0u64;
        if !mine.is_empty() {
            // Read on a task of its own: other targets may be waiting for
            // these chunks whatever this one does next.
            let me = Arc::clone(self);
            let task = tokio::spawn(async move { me.read(mine).await });
            read = task.await.unwrap_or_else(|e| {
                // Its senders are gone: the waiters read for themselves.
                tracing::warn!("a chunk reader ended abnormally: {e}");
                0
            });
        }
        let mut out = Vec::with_capacity(window.len());
        for (source, &(d, len)) in sources.into_iter().zip(window) {
            out.push(match source {
                Source::Kept(b) => b,
                Source::Waiting(w) => match w.await {
                    Ok(Ok(b)) => b,
                    // Its reader failed or gave up: read it here.
                    _ => {
                        let (b, n) = self.read_one(d, len).await?;
                        read += n;
                        b
                    }
                },
            });
        }
        Ok((out, read))
    }

    /// Read `chunks` in one stream, handing each to whoever waits for it;
    /// the bytes read.
    async fn read(&self, chunks: Vec<ToRead>) -> u64 {
        let wanted: Vec<(Digest, usize)> = chunks.iter().map(|(d, len, _)| (*d, *len)).collect();
        let mut fetched = image_client::fetch_chunks(self.images.clone(), wanted);
        let mut read = 0u64;
        let mut chunks = chunks.into_iter();
        while let Some((d, _, tx)) = chunks.next() {
            let next = tokio::time::timeout(super::direct::IMAGESERVER_STALL, fetched.next()).await;
            let got = match next {
                Ok(Some(Ok(chunk))) => {
                    let n = chunk.zstd().len() as u64;
                    read += n;
                    self.read_bytes.fetch_add(n, Ordering::Relaxed);
                    Ok(block_of(chunk.into_parts().1))
                }
                Ok(Some(Err(e))) => Err(format!("{e}")),
                Ok(None) => Err("the imageserver's chunk stream ended early".to_owned()),
                Err(_) => {
                    Err(format!("no chunk came from the imageserver within {:?}", super::direct::IMAGESERVER_STALL))
                }
            };
            let failed = got.is_err();
            self.settle(d, got, tx);
            if failed {
                for (d, _, tx) in chunks.by_ref() {
                    self.settle(d, Err("an earlier chunk of its read failed".to_owned()), tx);
                }
            }
        }
        read
    }

    /// One chunk read alone, for a target whose chunk's reader failed.
    async fn read_one(&self, d: Digest, len: usize) -> anyhow::Result<(Block, u64)> {
        let mut fetched = image_client::fetch_chunks(self.images.clone(), vec![(d, len)]);
        let stall = super::direct::IMAGESERVER_STALL;
        match tokio::time::timeout(stall, fetched.next()).await {
            Ok(Some(Ok(chunk))) => {
                let n = chunk.zstd().len() as u64;
                self.read_bytes.fetch_add(n, Ordering::Relaxed);
                let b = block_of(chunk.into_parts().1);
                self.keep(d, b.clone());
                Ok((b, n))
            }
            Ok(Some(Err(e))) => Err(anyhow::Error::new(e).context("reading the image's chunks")),
            Ok(None) => anyhow::bail!("the imageserver's chunk stream ended early"),
            Err(_) => anyhow::bail!("no chunk came from the imageserver within {stall:?}"),
        }
    }

    /// A read ended: kept when it succeeded, no longer being read, and
    /// handed to its waiters.
    fn settle(&self, d: Digest, got: Result<Block, String>, tx: oneshot::Sender<Result<Block, String>>) {
        if let Ok(b) = &got {
            self.keep(d, b.clone());
        }
        self.state.lock().expect("shared chunks lock").reading.remove(&d);
        let _ = tx.send(got);
    }

    fn keep(&self, d: Digest, b: Block) {
        let mut s = self.state.lock().expect("shared chunks lock");
        if s.kept.insert(d, b).is_none() {
            s.order.push_back(d);
            s.kept_bytes += BLOCK as usize;
        }
        while s.kept_bytes > self.kept_limit
            && let Some(old) = s.order.pop_front()
        {
            s.kept.remove(&old);
            s.kept_bytes -= BLOCK as usize;
        }
    }

    /// Bytes read from the imageserver by every target so far.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }
}

/// A chunk's plain bytes as a whole block, with its SHA-256.
pub(super) fn block_of(mut plain: Vec<u8>) -> Block {
    plain.resize(BLOCK as usize, 0);
    let sha: [u8; 32] = sha2::Sha256::digest(&plain).into();
    Block { data: Bytes::from(plain), sha }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks shared through an imageserver nobody listens at: every
    /// read fails at once.
    fn unreachable(kept_limit: usize) -> Arc<SharedChunks> {
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        SharedChunks::new(image_client::Client::new(channel), kept_limit)
    }

    fn digest(n: u8) -> Digest {
        Digest([n; 32])
    }

    #[tokio::test]
    async fn kept_chunks_are_served_without_a_read_and_the_oldest_go_first() {
        let shared = unreachable(2 * BLOCK as usize);
        for n in 1..=3 {
            shared.keep(digest(n), block_of(vec![n; 10]));
        }
        // The two newest are kept; the first went.
        let (got, read) = shared.window(&[(digest(3), 10), (digest(2), 10), (digest(3), 10)]).await.unwrap();
        assert_eq!(read, 0);
        assert_eq!(got.iter().map(|b| b.data[0]).collect::<Vec<_>>(), [3, 2, 3]);
        assert_eq!(got[0].data.len(), BLOCK as usize, "a whole block, zeros past the chunk");
        assert!(shared.window(&[(digest(1), 10)]).await.is_err(), "dropped, read again, and the read fails");
        assert_eq!(shared.state.lock().unwrap().kept_bytes, 2 * BLOCK as usize);
    }

    #[tokio::test]
    async fn a_failed_read_fails_every_target_waiting_for_it_and_leaves_nothing_reading() {
        let shared = unreachable(KEPT_BYTES);
        let want = [(digest(7), 100), (digest(8), 100)];
        let (a, b) = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            futures::future::join(shared.window(&want), shared.window(&want)),
        )
        .await
        .expect("no target waits for ever");
        assert!(a.is_err() && b.is_err());
        let s = shared.state.lock().unwrap();
        assert!(s.reading.is_empty() && s.kept.is_empty());
        assert_eq!(shared.read_bytes(), 0);
    }
}
