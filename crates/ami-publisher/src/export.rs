//! `export-snapshot`: the bytes behind a snapshot (or an AMI's root
//! snapshot) read with the EBS direct APIs into a sparse raw file, for
//! `imagetool add`, so that an AMI made by other means (Packer, CreateImage
//! of a configured instance) enters an image stream and is published
//! everywhere with the delta machinery.
//!
//! Only the blocks EBS lists are read (the rest of a snapshot reads as
//! zeros, and stays a hole in the file); each is checked against the
//! SHA-256 EBS sends with it. The file is written beside its name and
//! renamed into place when complete. imagetool itself stays free of the
//! AWS SDK; the pipeline's certificate adds the image, as for any other.

use std::{
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde::Serialize;

use crate::{progress::Line, targets::Target, verify};

/// Blocks read at once.
const BLOCKS_IN_FLIGHT: usize = 32;

/// What an export read and wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    pub account: String,
    pub region: String,
    /// The AMI named, if one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ami: Option<String>,
    pub snapshot: String,
    pub file: PathBuf,
    /// The file's size: the snapshot's volume size.
    pub size_bytes: u64,
    /// Blocks EBS listed and this run read.
    pub blocks_read: u64,
    /// Bytes written to the file (listed blocks that are not all zeros).
    pub bytes_written: u64,
}

/// `ACCOUNT,REGION,ID` where ID is a snapshot or an AMI.
pub fn parse_source(s: &str) -> Result<(Target, String), String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [account, region, id] = parts[..] else {
        return Err(format!("'{s}' is not ACCOUNT,REGION,SNAPSHOT_OR_AMI_ID"));
    };
    if account.is_empty() || account == "*" || region.is_empty() || region == "*" {
        return Err(format!("'{s}': one account (a profile) and one region, not a pattern"));
    }
    if !(id.starts_with("snap-") || id.starts_with("ami-")) {
        return Err(format!("'{id}' is neither a snapshot id (snap-...) nor an AMI id (ami-...)"));
    }
    Ok((Target { account: account.to_owned(), region: region.to_owned() }, id.to_owned()))
}

/// Read `id` (a snapshot, or an AMI's root snapshot) in target `t` into
/// `out`.
pub async fn export(
    ec2: &aws_sdk_ec2::Client,
    ebs: &aws_sdk_ebs::Client,
    t: &Target,
    id: &str,
    out: &Path,
    line: &Line,
) -> anyhow::Result<Exported> {
    let (ami, snapshot) = if id.starts_with("ami-") {
        let Some(img) = crate::lifecycle::images(ec2, &[id.to_owned()]).await?.into_iter().next() else {
            bail!("{id} is not there in {t}");
        };
        let snap = crate::publish::root_snapshot(&img).with_context(|| format!("{id} has no EBS root snapshot"))?;
        (Some(id.to_owned()), snap.to_owned())
    } else {
        (None, id.to_owned())
    };
    line.step(format!("listing the blocks of {snapshot}"));
    let (listed, volume_gib) = verify::list_blocks(ebs, &snapshot).await?;
    let size = volume_gib.context("ListSnapshotBlocks gave no volume size")? << 30;
    let part =
        out.with_file_name(format!(".{}.part", out.file_name().context("the output names no file")?.to_string_lossy()));
    let file = std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let total = listed.len() as u64 * verify::BLOCK;
    let snapshot_id = snapshot.as_str();
    let reads = futures::stream::iter(listed.iter())
        .map(|(index, token)| async move {
            verify::get_block(ebs, snapshot_id, *index, token).await.map(|bytes| (*index, bytes))
        })
        .buffer_unordered(BLOCKS_IN_FLIGHT);
    let mut reads = std::pin::pin!(reads);
    let (mut read, mut written) = (0u64, 0u64);
    let done = async {
        file.set_len(size).with_context(|| format!("sizing {} to {size} bytes", part.display()))?;
        while let Some(got) = reads.next().await {
            let (index, bytes) = got?;
            read += 1;
            if !image_format::is_zero(&bytes) {
                file.write_all_at(&bytes, index * verify::BLOCK)?;
                written += bytes.len() as u64;
            }
            line.bytes("reading blocks", read * verify::BLOCK, total);
        }
        file.sync_all()?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = done {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, out).with_context(|| format!("renaming {} to {}", part.display(), out.display()))?;
    Ok(Exported {
        account: t.account.clone(),
        region: t.region.clone(),
        ami,
        snapshot: snapshot.clone(),
        file: out.to_owned(),
        size_bytes: size,
        blocks_read: read,
        bytes_written: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_one_target_and_a_snapshot_or_an_ami() {
        let (t, id) = parse_source("prod,eu-west-1,ami-0abc").unwrap();
        assert_eq!((t.account.as_str(), t.region.as_str(), id.as_str()), ("prod", "eu-west-1", "ami-0abc"));
        assert!(parse_source("prod,eu-west-1,snap-1").is_ok());
        for bad in ["prod,eu-west-1", "prod,*,snap-1", ",eu-west-1,snap-1", "prod,eu-west-1,vol-1", "a,b,c,d"] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }
}
