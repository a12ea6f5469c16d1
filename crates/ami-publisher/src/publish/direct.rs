//! `publish --via ebs-direct`: the leaf's snapshot made with the EBS direct
//! APIs, with no unpacker instance and no volume.
//!
//! Per target: the newest completed snapshot of an earlier leaf of the
//! stream there (found by this tool's tags, its leaf's manifest read from
//! the imageserver and its digest checked against the tag) is the parent;
//! StartSnapshot from it (or, with none, an empty snapshot encrypted under
//! the target's key); PutSnapshotBlock for exactly the chunks that differ
//! from the parent's leaf, chunks that became zero included (a never-written
//! block of an encrypted snapshot without a parent reads as noise, so
//! without a parent every chunk is written); CompleteSnapshot with the
//! block count and the LINEAR aggregate checksum. Chunks are 512 KiB, the
//! EBS block size: a leaf cut otherwise is refused.
//!
//! StartSnapshot's client token is derived from the target, the leaf and
//! the parent: a run that was interrupted and runs again gets the same
//! pending snapshot back and writes its blocks again (a write is
//! idempotent); an unfinished snapshot nobody returns to ends at its
//! timeout, and EBS removes it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aws_sdk_ebs::{
    error::ProvideErrorMetadata as _,
    primitives::ByteStream,
    types::{ChecksumAggregationMethod, ChecksumAlgorithm},
};
use aws_sdk_ec2::Client;
use futures::StreamExt as _;
use image_format::{ChunkRef, Digest, ImageName, Manifest};
use sha2::Digest as _;

use super::Options;
use crate::{
    errors::{SdkResultExt as _, sdk_error},
    progress::Line,
    results::TargetResult,
    tags,
    targets::Target,
};

/// The EBS snapshot block size, and the only chunk size this path takes.
pub const BLOCK: u32 = 524_288;
const GIB: u64 = 1 << 30;
/// Minutes a started snapshot waits for its next write (or completion)
/// before EBS ends it.
const TIMEOUT_MINUTES: i32 = 60;
/// How long a new snapshot may be unknown to PutSnapshotBlock (EBS answers
/// "does not exist" for a while after StartSnapshot).
const NOT_YET_FOR: Duration = Duration::from_secs(120);
/// Earlier snapshots of the stream looked at for a parent.
const PARENTS_TRIED: usize = 8;
/// How long the imageserver may take to answer a manifest, or to send the
/// next chunk, before the target fails.
pub(super) const IMAGESERVER_STALL: Duration = Duration::from_secs(120);
/// A StartSnapshot answer this much older than the call is the answer to
/// an earlier call with the same token, replayed: EBS then answers what it
/// answered then, not how the snapshot is now.
const REPLAYED: Duration = Duration::from_secs(60);

/// What the EBS direct path needs beyond [`Options`]: the leaf's manifest,
/// the imageserver, how many blocks each target has in flight, and the
/// chunks the targets share.
#[derive(Debug, Clone)]
pub struct Direct {
    pub manifest: std::sync::Arc<Manifest>,
    pub images: image_client::Client,
    pub blocks_in_flight: usize,
    /// The leaf's chunks, shared by every target.
    pub chunks: std::sync::Arc<super::shared::SharedChunks>,
}

/// The blocks that make a snapshot of `parent`'s leaf into one of `to`'s:
/// `(index, Some(digest))` to write a chunk's bytes, `(index, None)` to
/// write zeros. Without a parent, every chunk; with one, the chunks that
/// differ, and zeros over the parent's data past `to`'s end.
pub fn blocks_to_put(to: &Manifest, parent: Option<&Manifest>) -> Vec<(u64, Option<Digest>)> {
    let as_block = |c: &ChunkRef| match c {
        ChunkRef::Data(d) => Some(*d),
        ChunkRef::Zero => None,
    };
    let mut blocks: Vec<(u64, Option<Digest>)> = Vec::new();
    for (i, c) in to.chunks().iter().enumerate() {
        // The same chunk at the same length: a parent whose image ended in
        // a short chunk holds older bytes past that end, in the same block.
        let same = parent
            .and_then(|p| p.chunks().get(i))
            .is_some_and(|old| old == c && p_len(parent, i) == Some(to.chunk_len(i as u64)));
        if !same {
            blocks.push((i as u64, as_block(c)));
        }
    }
    if let Some(p) = parent {
        for (i, c) in p.chunks().iter().enumerate().skip(to.chunks().len()) {
            if matches!(c, ChunkRef::Data(_)) {
                blocks.push((i as u64, None));
            }
        }
    }
    blocks
}

fn p_len(parent: Option<&Manifest>, i: usize) -> Option<usize> {
    parent.filter(|p| i < p.chunks().len()).map(|p| p.chunk_len(i as u64))
}

/// SHA-256 over the blocks' SHA-256 digests in block order: CompleteSnapshot's
/// LINEAR aggregate checksum (as coldsnap computes it).
pub(super) fn linear_checksum(digests: &std::collections::BTreeMap<u64, [u8; 32]>) -> String {
    let mut h = sha2::Sha256::new();
    for d in digests.values() {
        h.update(d);
    }
    aws_smithy_types::base64::encode(h.finalize())
}

/// A block to put: its index, and the chunk (digest, length) it takes,
/// or None for zeros.
type Wanted = (u64, Option<(Digest, usize)>);

/// An earlier leaf's snapshot to start from.
pub(super) struct Parent {
    pub(super) snapshot: String,
    pub(super) leaf: String,
    pub(super) manifest: Manifest,
    gib: i64,
}

/// The newest completed snapshot in the target of another leaf of the
/// stream, under the target's key, whose leaf the imageserver still has
/// with the digest the snapshot's tag names, cut in 512 KiB chunks.
pub(super) async fn find_parent(
    ec2: &Client,
    d: &Direct,
    o: &Options,
    key: Option<&str>,
) -> anyhow::Result<Option<Parent>> {
    let found: Vec<aws_sdk_ec2::types::Snapshot> = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(tags::filter(&format!("tag:{}", tags::STREAM), &o.stream))
        .filters(tags::filter("status", "completed"))
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .context("DescribeSnapshots of the stream")?;
    let mut found: Vec<_> = found
        .into_iter()
        .filter(|s| tags::value(s.tags(), tags::DIGEST).is_some_and(|digest| digest != o.image_id))
        .filter(|s| s.encrypted() == Some(true) && (key.is_none() || s.kms_key_id() == key))
        .collect();
    found.sort_by_key(|s| std::cmp::Reverse(s.start_time().map(|t| (t.secs(), t.subsec_nanos()))));
    for s in found.iter().take(PARENTS_TRIED) {
        if let Some(p) = usable(d, o, s).await? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// `s` as a parent: its leaf, as its tags name it, still on the imageserver
/// with the digest the tag gives, cut in 512 KiB chunks.
async fn usable(d: &Direct, o: &Options, s: &aws_sdk_ec2::types::Snapshot) -> anyhow::Result<Option<Parent>> {
    let (Some(id), Some(leaf), Some(digest)) =
        (s.snapshot_id(), tags::value(s.tags(), tags::LEAF), tags::value(s.tags(), tags::DIGEST))
    else {
        return Ok(None);
    };
    let Ok(name) = ImageName::new(&o.stream, leaf) else { return Ok(None) };
    let mut images = d.images.clone();
    let asked = tokio::time::timeout(IMAGESERVER_STALL, image_client::get_manifest(&mut images, &name)).await;
    let asked =
        asked.map_err(|_| anyhow::anyhow!("the imageserver did not answer for {name} within {IMAGESERVER_STALL:?}"))?;
    let manifest = match asked {
        Ok((_, m)) => m,
        Err(image_client::ClientError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
            tracing::debug!(snapshot = id, %name, "not a parent: its leaf is gone from the imageserver");
            return Ok(None);
        }
        Err(e) => return Err(e).context(format!("reading the manifest of {name}")),
    };
    if manifest.image_id().to_hex() != digest || manifest.chunk_size() != BLOCK {
        tracing::debug!(snapshot = id, %name, "not a parent: its leaf's image differs from its tag, or its chunks");
        return Ok(None);
    }
    Ok(Some(Parent {
        snapshot: id.to_owned(),
        leaf: leaf.to_owned(),
        manifest,
        gib: i64::from(s.volume_size().unwrap_or(0)),
    }))
}

/// The parent an unfinished snapshot of an earlier run was started from,
/// by its `ImageParentSnapshot` tag: `Some(None)` for none, `Some(parent)`
/// when that parent is still completed and usable; None when that cannot
/// be told (the run then looks for the newest parent, and a new snapshot
/// is started if it differs).
pub(super) async fn tagged_parent(
    ec2: &Client,
    d: &Direct,
    o: &Options,
    unfinished: &str,
) -> anyhow::Result<Option<Option<Parent>>> {
    let Some(u) = described(ec2, unfinished).await? else { return Ok(None) };
    match tags::value(u.tags(), tags::PARENT_SNAPSHOT) {
        None => Ok(None),
        Some("none") => Ok(Some(None)),
        Some(id) => match described(ec2, id).await? {
            Some(p) if p.state() == Some(&aws_sdk_ec2::types::SnapshotState::Completed) => {
                Ok(usable(d, o, &p).await?.map(Some))
            }
            _ => Ok(None),
        },
    }
}

/// StartSnapshot's client token: the same for the same target, leaf,
/// parent and attempt, 64 hex digits.
fn client_token(t: &Target, o: &Options, parent: Option<&str>, attempt: u32) -> String {
    let mut h = sha2::Sha256::new();
    for part in
        ["ami-fleet ebs-direct 1", &t.account, &t.region, &o.stream, &o.leaf, &o.image_id, parent.unwrap_or("-")]
    {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(attempt.to_le_bytes());
    hex::encode(h.finalize())
}

/// Make the leaf's snapshot in target `t`; returns its id and size in GiB
/// once CompleteSnapshot has accepted it (the caller waits for it).
/// `attempt` names the client token; it moves on past a snapshot that is
/// gone or ended `error`. `resume`: an unfinished snapshot an earlier run
/// left, whose parent is used again.
#[allow(clippy::too_many_arguments)]
pub(super) async fn snapshot(
    ebs: &aws_sdk_ebs::Client,
    ec2: &Client,
    d: &Direct,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
    attempt: &mut u32,
    resume: Option<&str>,
) -> anyhow::Result<(String, i32)> {
    let m = &d.manifest;
    if m.chunk_size() != BLOCK {
        bail!(
            "--via ebs-direct needs an image cut in {BLOCK}-byte chunks (the EBS block size); {}/{} has {}-byte chunks",
            o.stream,
            o.leaf,
            m.chunk_size()
        );
    }
    let key = o.key_arn(t);
    line.step("looking for a parent snapshot");
    // An earlier run's unfinished snapshot is resumed from the parent it
    // was started from (the same client token), though a newer one may
    // have appeared since.
    let tagged = match resume {
        Some(u) => tagged_parent(ec2, d, o, u).await?,
        None => None,
    };
    let parent = match tagged {
        Some(p) => p,
        None => find_parent(ec2, d, o, key.as_deref()).await?,
    };
    let need = o.image_size.saturating_add(o.min_free_bytes).div_ceil(GIB).max(1);
    let gib = i64::try_from(need).unwrap_or(i64::MAX).max(parent.as_ref().map_or(0, |p| p.gib));
    let blocks = blocks_to_put(m, parent.as_ref().map(|p| &p.manifest));
    let parent_id = parent.as_ref().map(|p| p.snapshot.clone());
    // The same tags on every run of this leaf (a client token's request
    // must not change); ExpiresAt, which does, is tagged after the start.
    let mut snap_tags = vec![(tags::NAME.to_owned(), o.ami_name.clone())];
    snap_tags.extend(o.identity_tags());
    snap_tags.retain(|(k, _)| k != tags::MANAGED_BY);
    snap_tags.push((tags::MANAGED_BY.to_owned(), tags::MANAGED_BY_VALUE.to_owned()));
    snap_tags.push((tags::PARENT_SNAPSHOT.to_owned(), parent_id.clone().unwrap_or_else(|| "none".to_owned())));
    let ebs_tags: Vec<aws_sdk_ebs::types::Tag> =
        snap_tags.iter().map(|(k, v)| aws_sdk_ebs::types::Tag::builder().key(k).value(v).build()).collect();

    // The same token answers the same snapshot, as it was when first
    // started (EBS replays its first answer): a replayed answer is checked
    // against EC2, and a snapshot since completed is used, one still
    // pending is written again and completed, and one gone or `error`
    // moves on to the next token.
    let (started, snap, resumed) = loop {
        let token = client_token(t, o, parent_id.as_deref(), *attempt);
        let mut req = ebs
            .start_snapshot()
            .volume_size(gib)
            .client_token(token)
            .timeout(TIMEOUT_MINUTES)
            .description(&o.description)
            .set_tags(Some(ebs_tags.clone()));
        req = match &parent_id {
            Some(p) => req.parent_snapshot_id(p),
            None => req.encrypted(true).set_kms_key_arn(key.clone()),
        };
        line.step(match &parent_id {
            Some(p) => format!("starting a snapshot from {p}"),
            None => "starting a snapshot (no parent)".to_owned(),
        });
        let asked = std::time::SystemTime::now();
        let out = match req.send().await {
            Ok(out) => out,
            // An earlier run asked with other tags (--tags changed): its
            // snapshot is left to time out, and this run starts its own.
            Err(e) if e.code() == Some("ConflictException") && *attempt < 8 => {
                *attempt += 1;
                continue;
            }
            Err(e) => return Err(sdk_error("StartSnapshot", e)),
        };
        let snap = out.snapshot_id().context("StartSnapshot answered no snapshot id")?.to_owned();
        let replayed = out
            .start_time()
            .and_then(|t| std::time::SystemTime::try_from(*t).ok())
            .is_some_and(|t| t + REPLAYED < asked);
        if !replayed {
            break (out, snap, false);
        }
        match now_state(ec2, &snap).await? {
            Some(aws_sdk_ec2::types::SnapshotState::Completed) => {
                r.snapshot_id = Some(snap.clone());
                let size = i32::try_from(out.volume_size().unwrap_or(gib)).unwrap_or(i32::MAX);
                return Ok((snap, size));
            }
            Some(aws_sdk_ec2::types::SnapshotState::Pending) => break (out, snap, true),
            _ if *attempt < 8 => *attempt += 1,
            other => bail!("{snap}, started by an earlier run, is {other:?}; eight tokens are spent"),
        }
    };
    if started.block_size() != Some(BLOCK as i32) {
        bail!("StartSnapshot of {snap} answered a block size of {:?}, not {BLOCK}", started.block_size());
    }
    r.snapshot_id = Some(snap.clone());
    let size = i32::try_from(started.volume_size().unwrap_or(gib)).unwrap_or(i32::MAX);
    if resumed {
        tracing::info!(snapshot = %snap, "writing again a snapshot an earlier run left unfinished");
    }
    tracing::info!(snapshot = %snap, parent = ?parent_id, blocks = blocks.len(), "snapshot started");
    // Until an AMI uses it, the snapshot expires: a run that is never
    // repeated leaves nothing behind for good.
    let expires = tags::rfc3339(std::time::SystemTime::now() + tags::PENDING_SNAPSHOT_LIFETIME);
    crate::retry::call(&format!("CreateTags {snap}"), Some(Instant::now()), || {
        ec2.create_tags().resources(&snap).tags(tags::tag(tags::EXPIRES_AT, &expires)).send()
    })
    .await?;

    let total = blocks.len() as u64 * u64::from(BLOCK);
    let learned = Instant::now();
    // Data chunks in block order, a window at a time from the chunks all
    // targets share (each read from the imageserver once, when targets
    // run together), the next window read while this one is put; zero
    // blocks need no read. Memory holds the windows and the puts in
    // flight, and the shared chunks kept.
    let zero = super::shared::block_of(Vec::new());
    let window = d.blocks_in_flight.clamp(1, 32);
    let todo: Vec<Vec<Wanted>> = blocks
        .iter()
        .map(|(i, digest)| (*i, digest.map(|digest| (digest, m.chunk_len(*i)))))
        .collect::<Vec<_>>()
        .chunks(window)
        .map(<[_]>::to_vec)
        .collect();
    let fetched_bytes = std::sync::atomic::AtomicU64::new(0);
    let fetched_bytes = &fetched_bytes;
    let source = futures::stream::iter(todo)
        .map(|w| {
            let zero = zero.clone();
            async move {
                let data: Vec<(Digest, usize)> = w.iter().filter_map(|(_, x)| *x).collect();
                let (got, n) = d.chunks.window(&data).await.map_err(|e| read_failed(e, o))?;
                fetched_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                let mut got = got.into_iter();
                let items: Vec<anyhow::Result<(u64, super::shared::Block)>> = w
                    .into_iter()
                    .map(|(i, x)| match x {
                        None => Ok((i, zero.clone())),
                        Some(_) => got.next().map(|b| (i, b)).context("a window came back short"),
                    })
                    .collect();
                anyhow::Ok(items)
            }
        })
        .buffered(2)
        .flat_map(|w| match w {
            Ok(items) => futures::stream::iter(items).left_stream(),
            Err(e) => futures::stream::iter(vec![Err(e)]).right_stream(),
        });
    let puts = source
        .map(|item| async {
            let (index, block) = item?;
            put_block(ebs, &snap, index, block.data, block.sha, learned).await.map(|n| (index, block.sha, n))
        })
        .buffer_unordered(d.blocks_in_flight.max(1));
    let mut puts = std::pin::pin!(puts);
    let mut digests = std::collections::BTreeMap::new();
    let mut put_bytes = 0u64;
    while let Some(done) = puts.next().await {
        let (index, sha, n) = done?;
        digests.insert(index, sha);
        put_bytes += n;
        line.bytes("writing blocks", put_bytes, total);
    }
    r.bytes_written = Some(put_bytes);
    r.bytes_fetched = Some(fetched_bytes.load(std::sync::atomic::Ordering::Relaxed));
    line.step("completing the snapshot");
    let count = i32::try_from(digests.len()).context("too many blocks for one snapshot")?;
    let checksum = linear_checksum(&digests);
    let mut pause = Duration::from_millis(500);
    let done = loop {
        let sent = ebs
            .complete_snapshot()
            .snapshot_id(&snap)
            .changed_blocks_count(count)
            .checksum(&checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
            .send()
            .await;
        match sent {
            Ok(done) => break done,
            // With no block to put, the snapshot may still be new to EBS.
            Err(e) if e.code() == Some("ResourceNotFoundException") && learned.elapsed() < NOT_YET_FOR => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(sdk_error(&format!("CompleteSnapshot of {snap}"), e)),
        }
    };
    tracing::info!(snapshot = %snap, blocks = count, status = ?done.status(), "snapshot completed");
    Ok((snap.clone(), size))
}

/// A failed read of the image's chunks, naming the image; a chunk that
/// failed its digest (DATA_LOSS) is permanent, as on the unpacker's way.
fn read_failed(e: anyhow::Error, o: &Options) -> anyhow::Error {
    let lost = e.chain().any(|c| c.downcast_ref::<image_client::ClientError>().is_some_and(|c| c.is_data_loss()));
    let what = if lost {
        format!(
            "image {}/{} (image id {}) is corrupt on the imageserver, not retried; its store needs repair (imagetool verify names the damage)",
            o.stream, o.leaf, o.image_id
        )
    } else {
        format!("reading the chunks of image {}/{} from the imageserver", o.stream, o.leaf)
    };
    e.context(what)
}

/// One PutSnapshotBlock; the SDK retries throttling and errors, this
/// retries "does not exist" while the snapshot is new. Returns the bytes
/// written.
async fn put_block(
    ebs: &aws_sdk_ebs::Client,
    snap: &str,
    index: u64,
    data: bytes::Bytes,
    sha: [u8; 32],
    learned: Instant,
) -> anyhow::Result<u64> {
    let block = i32::try_from(index).context("block index beyond EBS's range")?;
    let checksum = aws_smithy_types::base64::encode(sha);
    let mut pause = Duration::from_millis(500);
    loop {
        let sent = ebs
            .put_snapshot_block()
            .snapshot_id(snap)
            .block_index(block)
            .data_length(BLOCK as i32)
            .checksum(&checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(data.clone()))
            .send()
            .await;
        match sent {
            Ok(_) => return Ok(u64::from(BLOCK)),
            Err(e) if e.code() == Some("ResourceNotFoundException") && learned.elapsed() < NOT_YET_FOR => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(sdk_error(&format!("PutSnapshotBlock {block} of {snap}"), e)),
        }
    }
}

/// A snapshot as EC2 describes it now; None when it is gone.
pub async fn described(ec2: &Client, snap: &str) -> anyhow::Result<Option<aws_sdk_ec2::types::Snapshot>> {
    let out = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(tags::filter("snapshot-id", snap))
        .send()
        .await
        .sdk(format!("DescribeSnapshots {snap}"))?;
    Ok(out.snapshots().first().cloned())
}

/// A snapshot's state as EC2 describes it now; None when it is gone.
async fn now_state(ec2: &Client, snap: &str) -> anyhow::Result<Option<aws_sdk_ec2::types::SnapshotState>> {
    Ok(described(ec2, snap).await?.and_then(|s| s.state().cloned()))
}

/// Whether `snap` is a snapshot the EBS direct APIs were writing when an
/// earlier run stopped: pending, with the volume id EC2 shows for them.
pub(super) async fn unfinished(ec2: &Client, snap: &str) -> anyhow::Result<bool> {
    Ok(described(ec2, snap).await?.is_some_and(|s| {
        s.state() == Some(&aws_sdk_ec2::types::SnapshotState::Pending) && s.volume_id() == Some("vol-ffffffff")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(chunks: Vec<ChunkRef>) -> Manifest {
        let size = chunks.len() as u64 * u64::from(BLOCK);
        Manifest::new(BLOCK, size, chunks).unwrap()
    }

    fn d(n: u8) -> ChunkRef {
        ChunkRef::Data(Digest([n; 32]))
    }

    #[test]
    fn without_a_parent_every_chunk_is_written_zeros_too() {
        let to = m(vec![d(1), ChunkRef::Zero, d(2)]);
        assert_eq!(blocks_to_put(&to, None), [(0, Some(Digest([1; 32]))), (1, None), (2, Some(Digest([2; 32])))]);
    }

    #[test]
    fn over_a_parent_only_what_differs_is_written() {
        let parent = m(vec![d(1), d(5), d(2), ChunkRef::Zero, d(7), d(8)]);
        let to = m(vec![d(1), ChunkRef::Zero, d(3), ChunkRef::Zero, d(7)]);
        // 1 became zero, 2 changed, 5 is past the new end and held data.
        assert_eq!(blocks_to_put(&to, Some(&parent)), [(1, None), (2, Some(Digest([3; 32]))), (5, None)]);
        let grown = m(vec![d(1), d(5), d(2), ChunkRef::Zero, d(7), d(8), ChunkRef::Zero, d(9)]);
        assert_eq!(blocks_to_put(&grown, Some(&parent)), [(6, None), (7, Some(Digest([9; 32])))]);
        assert!(blocks_to_put(&parent, Some(&parent)).is_empty());
    }

    #[test]
    fn a_parents_short_last_chunk_is_written_again_at_full_length() {
        // The parent's image ended 100 bytes into a zero chunk: the rest
        // of that block holds whatever an older leaf left there.
        let parent = Manifest::new(BLOCK, u64::from(BLOCK) + 100, vec![d(1), ChunkRef::Zero]).unwrap();
        let to = m(vec![d(1), ChunkRef::Zero]);
        assert_eq!(blocks_to_put(&to, Some(&parent)), [(1, None)]);
    }

    #[test]
    fn the_linear_checksum_is_over_raw_digests_in_block_order() {
        let mut digests = std::collections::BTreeMap::new();
        digests.insert(9, [2u8; 32]);
        digests.insert(1, [1u8; 32]);
        let mut joined = vec![1u8; 32];
        joined.extend([2u8; 32]);
        assert_eq!(linear_checksum(&digests), aws_smithy_types::base64::encode(sha2::Sha256::digest(&joined)));
    }
}
