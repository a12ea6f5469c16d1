//! Proof that the bytes behind an AMI are its image's: the blocks of the
//! AMI's root snapshot, read with the EBS direct APIs (ListSnapshotBlocks,
//! GetSnapshotBlock), compared with the chunk digests of the leaf its tags
//! name; and, between two leaves' snapshots of one lineage, the blocks EBS
//! lists as changed (ListChangedBlocks) against the manifests' difference.
//!
//! A block EBS does not list reads as zeros. Chunks are compared whole:
//! a chunk larger than a block is read from all its blocks, a block larger
//! than a chunk is read once for all the chunks in it. The image's bytes
//! are compared, not the volume's rest past the image's end.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    hash::BuildHasher as _,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aws_sdk_ebs::types::ValidationExceptionReason;
use aws_sdk_ec2::Client;
use futures::StreamExt as _;
use image_format::{ChunkRef, Digest, ImageName, Manifest};
use serde::Serialize;
use sha2::Digest as _;

use crate::{errors::SdkResultExt as _, tags};

/// The EBS snapshot block size.
pub const BLOCK: u64 = 524_288;
const BLOCK_BYTES: usize = 524_288;
/// Blocks read at once from one snapshot (EBS takes 1,000 GetSnapshotBlock
/// per second per snapshot).
const BLOCKS_IN_FLIGHT: usize = 32;
/// How long one block's bytes may take to arrive once EBS has answered.
const BODY_STALL: Duration = Duration::from_secs(120);
/// How long the imageserver may take to answer a manifest.
const IMAGESERVER_STALL: Duration = Duration::from_secs(120);

/// An AMI to verify: its root snapshot and the leaf its tags name.
#[derive(Debug, Clone, Serialize)]
pub struct Subject {
    pub ami: String,
    pub snapshot: String,
    pub stream: String,
    pub leaf: String,
    /// The image id (hex) the AMI is tagged with.
    pub image_id: String,
    /// The AMI's creation date, as EC2 gives it (orders two leaves).
    pub created: Option<String>,
    /// Every block of the image was written (an encrypted snapshot of the
    /// EBS direct APIs without a parent): a block EBS does not list reads
    /// as noise there, not zeros, and is a difference.
    pub written_whole: bool,
}

/// Whether `snapshot` was written whole by `publish --via ebs-direct`
/// (tagged `ImageParentSnapshot=none`).
pub async fn written_whole(ec2: &Client, snapshot: &str) -> anyhow::Result<bool> {
    let found = crate::publish::described_snapshot(ec2, snapshot).await?;
    Ok(found.is_some_and(|s| tags::value(s.tags(), tags::PARENT_SNAPSHOT) == Some("none")))
}

/// What the AMI `ami` boots from and which leaf it says it holds.
pub async fn subject(ec2: &Client, ami: &str) -> anyhow::Result<Subject> {
    let Some(img) = crate::lifecycle::images(ec2, &[ami.to_owned()]).await?.into_iter().next() else {
        bail!("{ami} is not there (deregistered, or never in this account and region)");
    };
    let tag = |k: &str| tags::value(img.tags(), k).map(str::to_owned);
    let (Some(stream), Some(leaf), Some(image_id)) = (tag(tags::STREAM), tag(tags::LEAF), tag(tags::DIGEST)) else {
        bail!(
            "{ami} carries no {}, {} and {} tags: nothing names the image its bytes should be",
            tags::STREAM,
            tags::LEAF,
            tags::DIGEST
        );
    };
    let Some(snapshot) = crate::publish::root_snapshot(&img) else {
        bail!("{ami} has no EBS snapshot behind its root device");
    };
    Ok(Subject {
        ami: ami.to_owned(),
        written_whole: written_whole(ec2, snapshot).await?,
        snapshot: snapshot.to_owned(),
        stream,
        leaf,
        image_id,
        created: img.creation_date().map(str::to_owned),
    })
}

/// The leaf's manifest from the imageserver, checked against the image id
/// the AMI is tagged with.
pub async fn manifest(images: &image_client::Client, s: &Subject) -> anyhow::Result<Manifest> {
    let name = ImageName::new(&s.stream, &s.leaf).with_context(|| format!("{} names no valid leaf", s.ami))?;
    let mut images = images.clone();
    let asked = tokio::time::timeout(IMAGESERVER_STALL, image_client::get_manifest(&mut images, &name))
        .await
        .map_err(|_| anyhow::anyhow!("the imageserver did not answer for {name} within {IMAGESERVER_STALL:?}"))?;
    let (_, m) = match asked {
        Ok(got) => got,
        Err(image_client::ClientError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
            bail!("{name}, which {} is tagged with, is not on the imageserver: nothing to compare with", s.ami)
        }
        Err(e) => return Err(e).context(format!("reading the manifest of {name}")),
    };
    if m.image_id().to_hex() != s.image_id {
        bail!(
            "{name} on the imageserver is image {}, but {} is tagged as image {}: the leaf was replaced",
            m.image_id().to_hex(),
            s.ami,
            s.image_id
        );
    }
    Ok(m)
}

/// How much of an image to read: every chunk, or about this percent of
/// them, chosen at random on each run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample(f64);

impl Sample {
    pub const ALL: Sample = Sample(100.0);

    /// A percentage above 0 and at most 100.
    pub fn percent(p: f64) -> Result<Sample, String> {
        if p > 0.0 && p <= 100.0 {
            Ok(Sample(p))
        } else {
            Err(format!("a sample is a percentage above 0 and at most 100, not {p}"))
        }
    }

    /// The units (of `of`) to read: all, or a random choice of about the
    /// percentage, never none.
    fn choose(self, of: u64) -> Vec<u64> {
        if self.0 >= 100.0 || of == 0 {
            return (0..of).collect();
        }
        let seed = std::collections::hash_map::RandomState::new();
        // 0 < percent < 100: the product is within u64's range.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let cut = (self.0 / 100.0 * u64::MAX as f64) as u64;
        let mut chosen: Vec<u64> = (0..of).filter(|u| seed.hash_one(u) <= cut).collect();
        if chosen.is_empty() {
            chosen.push(seed.hash_one("one at least") % of);
        }
        chosen
    }
}

/// Where an AMI's bytes first differ from its image's.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    /// The first block of the differing chunk, and its last.
    pub block: u64,
    pub last_block: u64,
    pub chunk: u64,
    /// What the chunk should be ("data <blake3>" or "zeros"), and what the
    /// snapshot holds.
    pub expected: String,
    pub found: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let blocks = if self.last_block == self.block {
            format!("block {}", self.block)
        } else {
            format!("blocks {} to {}", self.block, self.last_block)
        };
        write!(
            f,
            "{blocks} (chunk {}) differ: the image has {}, the snapshot {}",
            self.chunk, self.expected, self.found
        )
    }
}

/// What reading an AMI's snapshot found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Checked {
    /// Chunks compared, of how many in the image.
    pub chunks_checked: u64,
    pub chunks: u64,
    /// GetSnapshotBlock calls made.
    pub blocks_read: u64,
    /// The first chunk (in image order) whose bytes differ; None: all
    /// compared chunks are the image's.
    pub difference: Option<Difference>,
}

/// Read the blocks behind `s` (a sample of them) and compare them with the
/// chunks of `m`; stops at the first difference.
pub async fn bytes(ebs: &aws_sdk_ebs::Client, s: &Subject, m: &Manifest, sample: Sample) -> anyhow::Result<Checked> {
    let (listed, _) = list_blocks(ebs, &s.snapshot).await?;
    // A unit is read at once: a chunk (and its blocks), or a block (and
    // the chunks in it); chunk sizes are powers of two, so units align.
    let unit = u64::from(m.chunk_size()).max(BLOCK);
    let units = m.size().div_ceil(unit);
    let chosen = sample.choose(units);
    let image_end = m.size();
    let per_unit = usize::try_from(unit / BLOCK)?;
    let mut out = Checked { chunks_checked: 0, chunks: m.chunks().len() as u64, blocks_read: 0, difference: None };
    if s.written_whole {
        // Every block of the image was written: one EBS does not list was
        // not, and reads as noise on a volume.
        for &u in &chosen {
            let (first, last) = (u * unit / BLOCK, ((u * unit + unit).min(image_end) - 1) / BLOCK);
            if let Some(b) = (first..=last).find(|b| !listed.contains_key(b)) {
                out.difference = Some(Difference {
                    block: b,
                    last_block: b,
                    chunk: b * BLOCK / u64::from(m.chunk_size()),
                    expected: "a written block".to_owned(),
                    found: "none (never written: it reads as noise, the snapshot having no parent)".to_owned(),
                });
                return Ok(out);
            }
        }
    }
    let reads = futures::stream::iter(chosen)
        .map(|u| {
            let listed = &listed;
            async move {
                let start = u * unit;
                let end = (start + unit).min(image_end);
                let first = start / BLOCK;
                let last = (end - 1) / BLOCK;
                let mut data = Vec::with_capacity(per_unit * BLOCK_BYTES);
                let mut read = 0u64;
                let blocks = futures::future::try_join_all((first..=last).map(|b| async move {
                    match listed.get(&b) {
                        Some(token) => get_block(ebs, &s.snapshot, b, token).await.map(Some),
                        None => Ok(None),
                    }
                }))
                .await?;
                for b in blocks {
                    match b {
                        Some(bytes) => {
                            read += 1;
                            data.extend_from_slice(&bytes);
                        }
                        None => data.resize(data.len() + BLOCK_BYTES, 0),
                    }
                }
                anyhow::Ok((u, data, read))
            }
        })
        .buffered((BLOCKS_IN_FLIGHT / per_unit).max(1));
    let mut reads = std::pin::pin!(reads);
    while let Some(read) = reads.next().await {
        let (u, data, n) = read?;
        out.blocks_read += n;
        let (checked, difference) = check_unit(m, u * unit, &data)?;
        out.chunks_checked += checked;
        if difference.is_some() {
            out.difference = difference;
            break;
        }
    }
    Ok(out)
}

/// The chunks of `m` in the unit read from byte `start` (`data`, whole
/// blocks, zeros where none is listed) compared with their digests: how
/// many were compared, and the first that differs.
fn check_unit(m: &Manifest, start: u64, data: &[u8]) -> anyhow::Result<(u64, Option<Difference>)> {
    let cs = u64::from(m.chunk_size());
    let end = (start + data.len() as u64).min(m.size());
    let mut checked = 0;
    for i in start / cs..=(end - 1) / cs {
        let at = usize::try_from(m.offset(i) - start)?;
        let got = &data[at..at + m.chunk_len(i)];
        checked += 1;
        let (ok, expected) = match &m.chunks()[usize::try_from(i)?] {
            ChunkRef::Data(d) => (Digest::of(got) == *d, format!("data {}", &d.to_hex()[..16])),
            ChunkRef::Zero => (image_format::is_zero(got), "zeros".to_owned()),
        };
        if !ok {
            let found = if image_format::is_zero(got) {
                "zeros".to_owned()
            } else {
                format!("data {}", &Digest::of(got).to_hex()[..16])
            };
            let block = m.offset(i) / BLOCK;
            let last_block = (m.offset(i) + m.chunk_len(i) as u64 - 1) / BLOCK;
            return Ok((checked, Some(Difference { block, last_block, chunk: i, expected, found })));
        }
    }
    Ok((checked, None))
}

/// A snapshot's listed blocks and their tokens, and its volume's size in GiB.
pub(crate) async fn list_blocks(
    ebs: &aws_sdk_ebs::Client,
    snapshot: &str,
) -> anyhow::Result<(BTreeMap<u64, String>, Option<u64>)> {
    let mut out = BTreeMap::new();
    let mut gib = None;
    let mut next: Option<String> = None;
    loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .max_results(10_000)
            .set_next_token(next.take())
            .send()
            .await
            .sdk(format!("ListSnapshotBlocks of {snapshot}"))?;
        if page.block_size().is_some_and(|b| i64::from(b) != BLOCK as i64) {
            bail!("{snapshot} has {:?}-byte blocks, not {BLOCK}", page.block_size());
        }
        gib = page.volume_size().and_then(|g| u64::try_from(g).ok()).or(gib);
        for b in page.blocks() {
            if let (Some(i), Some(token)) = (b.block_index(), b.block_token()) {
                out.insert(u64::try_from(i).context("a negative block index")?, token.to_owned());
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => return Ok((out, gib)),
        }
    }
}

/// One block's bytes, checked against the SHA-256 EBS sends with them.
pub(crate) async fn get_block(
    ebs: &aws_sdk_ebs::Client,
    snapshot: &str,
    index: u64,
    token: &str,
) -> anyhow::Result<Vec<u8>> {
    let what = format!("GetSnapshotBlock {index} of {snapshot}");
    let out = ebs
        .get_snapshot_block()
        .snapshot_id(snapshot)
        .block_index(i32::try_from(index).context("block index beyond EBS's range")?)
        .block_token(token)
        .send()
        .await
        .sdk(what.clone())?;
    let checksum = out.checksum().map(str::to_owned);
    let body = tokio::time::timeout(BODY_STALL, out.block_data.collect())
        .await
        .map_err(|_| anyhow::anyhow!("{what}: the bytes did not arrive within {BODY_STALL:?}"))?
        .with_context(|| format!("{what}: reading the bytes"))?
        .into_bytes();
    if body.len() as u64 != BLOCK {
        bail!("{what} answered {} bytes, not {BLOCK}", body.len());
    }
    let sha = aws_smithy_types::base64::encode(sha2::Sha256::digest(&body));
    if checksum.as_deref() != Some(sha.as_str()) {
        bail!("{what}: the bytes do not match the checksum EBS sent with them ({checksum:?}); read again");
    }
    Ok(body.to_vec())
}

/// Two leaves' snapshots against their manifests' difference.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub enum Changes {
    /// EBS does not know them as one lineage: nothing to compare.
    Unrelated,
    /// Not both cut in 512 KiB chunks: blocks and chunks do not map.
    NotBlockSized,
    Compared {
        /// Blocks EBS lists as changed, and blocks whose chunks differ.
        listed: u64,
        differ: u64,
        /// The first block whose chunk differs but EBS does not list: the
        /// newer snapshot holds the older leaf's bytes there.
        missing: Option<u64>,
        /// Blocks listed whose chunks are the same (written again, or
        /// changed by a leaf in between).
        unchanged_listed: u64,
    },
}

/// ListChangedBlocks from `older` to `newer`, against the difference of
/// their manifests.
pub async fn changes(
    ebs: &aws_sdk_ebs::Client,
    older: (&Subject, &Manifest),
    newer: (&Subject, &Manifest),
) -> anyhow::Result<Changes> {
    let (o, om) = older;
    let (n, nm) = newer;
    if om.chunk_size() as u64 != BLOCK || nm.chunk_size() as u64 != BLOCK {
        return Ok(Changes::NotBlockSized);
    }
    let differ: BTreeSet<u64> = crate::publish::blocks_to_put(nm, Some(om)).into_iter().map(|(i, _)| i).collect();
    let mut listed = BTreeSet::new();
    let mut next: Option<String> = None;
    loop {
        let asked = ebs
            .list_changed_blocks()
            .first_snapshot_id(&o.snapshot)
            .second_snapshot_id(&n.snapshot)
            .max_results(10_000)
            .set_next_token(next.take())
            .send()
            .await;
        let page = match asked {
            Ok(page) => page,
            Err(e)
                if e.as_service_error().is_some_and(|se| {
                    matches!(se, aws_sdk_ebs::operation::list_changed_blocks::ListChangedBlocksError::ValidationException(v)
                        if v.reason() == Some(&ValidationExceptionReason::UnrelatedSnapshots))
                }) =>
            {
                return Ok(Changes::Unrelated);
            }
            Err(e) => return Err(crate::errors::sdk_error(&format!("ListChangedBlocks {} to {}", o.snapshot, n.snapshot), e)),
        };
        for b in page.changed_blocks() {
            if let Some(i) = b.block_index() {
                listed.insert(u64::try_from(i).context("a negative block index")?);
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => next = Some(t.to_owned()),
            _ => break,
        }
    }
    Ok(compare(&listed, &differ))
}

/// The blocks EBS lists as changed against those whose chunks differ.
fn compare(listed: &BTreeSet<u64>, differ: &BTreeSet<u64>) -> Changes {
    Changes::Compared {
        listed: listed.len() as u64,
        differ: differ.len() as u64,
        missing: differ.difference(listed).next().copied(),
        unchanged_listed: listed.difference(differ).count() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_about_its_percentage_and_never_empty() {
        assert_eq!(Sample::ALL.choose(5), [0, 1, 2, 3, 4]);
        let some = Sample::percent(10.0).unwrap().choose(10_000);
        assert!((700..1300).contains(&some.len()), "{}", some.len());
        assert_eq!(Sample::percent(0.001).unwrap().choose(3).len(), 1);
        assert!(Sample::percent(0.0).is_err() && Sample::percent(100.5).is_err() && Sample::percent(f64::NAN).is_err());
    }

    #[test]
    fn a_differing_block_ebs_does_not_list_is_missing() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        let ok = compare(&set(&[2, 5, 9]), &set(&[2, 9]));
        assert_eq!(ok, Changes::Compared { listed: 3, differ: 2, missing: None, unchanged_listed: 1 });
        let bad = compare(&set(&[2]), &set(&[2, 7, 9]));
        assert_eq!(bad, Changes::Compared { listed: 1, differ: 3, missing: Some(7), unchanged_listed: 0 });
    }

    /// A manifest of `image` cut in `chunk`-byte chunks.
    fn manifest_of(image: &[u8], chunk: usize) -> Manifest {
        let chunks = image
            .chunks(chunk)
            .map(|c| if image_format::is_zero(c) { ChunkRef::Zero } else { ChunkRef::Data(Digest::of(c)) })
            .collect();
        Manifest::new(u32::try_from(chunk).unwrap(), image.len() as u64, chunks).unwrap()
    }

    #[test]
    fn chunks_larger_and_smaller_than_a_block_are_compared_whole() {
        let mut image: Vec<u8> = (0..4 * BLOCK_BYTES + 1000).map(|i| u8::try_from(i % 251).unwrap()).collect();
        image[BLOCK_BYTES..2 * BLOCK_BYTES].fill(0);
        // Whole blocks as read, zeros past the image's end.
        let read = |from: usize, blocks: usize| {
            let mut d = image[from..(from + blocks * BLOCK_BYTES).min(image.len())].to_vec();
            d.resize(blocks * BLOCK_BYTES, 0);
            d
        };
        // 1 MiB chunks: a unit is two blocks, one chunk.
        let big = manifest_of(&image, 2 * BLOCK_BYTES);
        assert_eq!(check_unit(&big, 0, &read(0, 2)).unwrap(), (1, None));
        assert_eq!(check_unit(&big, 4 * BLOCK, &read(4 * BLOCK_BYTES, 2)).unwrap(), (1, None));
        let mut bad = read(2 * BLOCK_BYTES, 2);
        bad[BLOCK_BYTES + 7] ^= 1;
        let (n, d) = check_unit(&big, 2 * BLOCK, &bad).unwrap();
        assert_eq!((n, d.map(|d| (d.block, d.last_block, d.chunk))), (1, Some((2, 3, 1))));
        // 64 KiB chunks: a unit is one block, eight chunks; the one that
        // differs is named, with the block it is in.
        let small = manifest_of(&image, 65_536);
        assert_eq!(check_unit(&small, BLOCK, &read(BLOCK_BYTES, 1)).unwrap(), (8, None));
        let mut bad = read(BLOCK_BYTES, 1);
        bad[3 * 65_536 + 5] = 9;
        let (n, d) = check_unit(&small, BLOCK, &bad).unwrap();
        let d = d.unwrap();
        assert_eq!((n, d.block, d.last_block, d.chunk), (4, 1, 1, 11));
        assert_eq!((d.expected.as_str(), d.found.starts_with("data ")), ("zeros", true));
        // The last, short chunk: only the image's bytes count.
        let (n, d) = check_unit(&small, 4 * BLOCK, &read(4 * BLOCK_BYTES, 1)).unwrap();
        assert_eq!((n, d), (1, None));
    }

    #[test]
    fn a_difference_names_its_blocks() {
        let d = Difference { block: 8, last_block: 15, chunk: 1, expected: "zeros".into(), found: "data ab".into() };
        assert_eq!(d.to_string(), "blocks 8 to 15 (chunk 1) differ: the image has zeros, the snapshot data ab");
        let one = Difference { last_block: 8, ..d };
        assert!(one.to_string().starts_with("block 8 (chunk 1)"));
    }
}
