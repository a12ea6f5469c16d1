//! What a target already has of the leaf: its AMI, or a snapshot an
//! interrupted run left, found by their tags (or the AMI's name).

use aws_sdk_ec2::{
    Client,
    types::{Image, ImageState, SnapshotState},
};

use std::time::Instant;

use crate::{errors::SdkResultExt as _, tags};

use super::Options;

/// AMIs and snapshots tagged with this image id, found with one
/// DescribeTags call (cheap, whatever the number of AMIs in the account).
/// The ids are this run's to ask about from `learned` on: NotFound on one
/// of them is "not yet" for a while (EC2's tag index and its resource
/// describes catch up separately).
pub(super) struct Tagged {
    images: Vec<String>,
    snapshots: Vec<String>,
    pub(super) learned: Instant,
}

impl Default for Tagged {
    fn default() -> Tagged {
        Tagged { images: Vec::new(), snapshots: Vec::new(), learned: Instant::now() }
    }
}

pub(super) async fn find_tagged(ec2: &Client, o: &Options) -> anyhow::Result<Tagged> {
    let mut found = Tagged::default();
    let mut pages = ec2
        .describe_tags()
        .filters(tags::filter("key", tags::DIGEST))
        .filters(tags::filter("value", &o.image_id))
        .filters(aws_sdk_ec2::types::Filter::builder().name("resource-type").values("image").values("snapshot").build())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.sdk("DescribeTags")?;
        for t in page.tags() {
            let Some(id) = t.resource_id() else { continue };
            match t.resource_type().map(|r| r.as_str()) {
                Some("image") => found.images.push(id.to_owned()),
                Some("snapshot") => found.snapshots.push(id.to_owned()),
                _ => {}
            }
        }
    }
    found.learned = Instant::now();
    Ok(found)
}

/// An AMI (available or on its way) tagged with this leaf and image id.
pub(super) async fn find_ami(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Option<Image>> {
    Ok(of_leaf(ec2, o, tagged).await?.into_iter().max_by(|a, b| a.creation_date().cmp(&b.creation_date())))
}

/// The tagged AMIs of this leaf that are available or on their way.
async fn of_leaf(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Vec<Image>> {
    if tagged.images.is_empty() {
        return Ok(Vec::new());
    }
    // By a filter, not by ids: DescribeTags may still list an AMI that was
    // deregistered (EC2 drops a gone resource's tags eventually), and an id
    // that does not exist fails a describe by ids as a whole.
    let ids = filter("image-id", &tagged.images);
    let out = ec2.describe_images().owners("self").filters(ids).send().await.sdk("DescribeImages")?;
    Ok(out
        .images()
        .iter()
        .filter(|i| matches!(i.state(), Some(ImageState::Available | ImageState::Pending)))
        .filter(|i| {
            tags::value(i.tags(), tags::STREAM) == Some(o.stream.as_str())
                && tags::value(i.tags(), tags::LEAF) == Some(o.leaf.as_str())
        })
        .cloned()
        .collect())
}

/// The AMI of this leaf (available or on its way) made first, then with
/// the lowest id: the leaf's one AMI when two runs each made one.
pub(super) async fn first_ami(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Option<Image>> {
    Ok(of_leaf(ec2, o, tagged)
        .await?
        .into_iter()
        .min_by(|a, b| a.creation_date().cmp(&b.creation_date()).then(a.image_id().cmp(&b.image_id()))))
}

/// A snapshot of this leaf (completed or pending) and its size in GiB.
pub(super) async fn find_snapshot(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Option<(String, i32)>> {
    if tagged.snapshots.is_empty() {
        return Ok(None);
    }
    // By a filter, not by ids (see `of_leaf`): a deleted snapshot (one that
    // failed, or that backs nothing) may still be listed by DescribeTags.
    let ids = filter("snapshot-id", &tagged.snapshots);
    let out = ec2.describe_snapshots().owner_ids("self").filters(ids).send().await.sdk("DescribeSnapshots")?;
    Ok(out
        .snapshots()
        .iter()
        .filter(|s| matches!(s.state(), Some(SnapshotState::Completed | SnapshotState::Pending)))
        .filter(|s| {
            tags::value(s.tags(), tags::STREAM) == Some(o.stream.as_str())
                && tags::value(s.tags(), tags::LEAF) == Some(o.leaf.as_str())
        })
        .max_by(|a, b| a.start_time().map(|t| t.secs()).cmp(&b.start_time().map(|t| t.secs())))
        .and_then(|s| Some((s.snapshot_id()?.to_owned(), s.volume_size().unwrap_or(1)))))
}

fn filter(name: &str, values: &[String]) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder().name(name).set_values(Some(values.to_vec())).build()
}
