//! AMIs: `list-images`, `list-used-images`, `list-unused-images`,
//! `delete-unused-images`, and the commands on the AMIs results files name:
//! `delete`, `delete-tags`, `set-exclusive-tags`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::bail;
use aws_sdk_ec2::{
    Client,
    types::{Filter, Image, Tag},
};

use super::{Acted, Ctx, Report, output::row};
use crate::{
    errors::SdkResultExt as _,
    results::PublishResults,
    tags::{self, tag_filter},
    targets::Target,
    unpacker,
};

row! {
    /// An AMI of the account.
    pub struct ImageRow {
        columns {
            ami: String,
            name: Option<String>,
            state: Option<String>,
            stream: Option<String>,
            leaf: Option<String>,
            created: Option<String>,
            expires: Option<String>,
        }
        extra {}
    }
}

row! {
    /// An AMI old enough to be judged, and what uses it.
    pub struct UsageRow {
        columns {
            ami: String,
            name: Option<String>,
            created: Option<String>,
            stream: Option<String>,
            /// Instance ids, space-separated.
            instances: String,
            /// Why it counts as used ("" for an unused AMI): references
            /// ("instance i-1", "launch template lt-2", "parameter /a"),
            /// the fleet's pointer, a recent launch; "; "-separated.
            used_by: String,
        }
        extra {}
    }
}

/// Image filters from `--search-tags` (all must match).
pub(super) fn search_filters(search: &[(String, String)]) -> Vec<Filter> {
    search.iter().map(|(k, v)| tag_filter(k, v)).collect()
}

fn excluded(tags: &[Tag], exclude: &[(String, String)]) -> bool {
    exclude.iter().any(|(k, v)| tags::value(tags, k) == Some(v.as_str()))
}

fn owned(v: Option<&str>) -> Option<String> {
    v.map(str::to_owned)
}

/// `list-images`: this account's AMIs matching the search tags.
pub async fn list_images(
    ctx: &Ctx<'_>,
    search: &[(String, String)],
    exclude: &[(String, String)],
) -> Vec<Report<ImageRow>> {
    ctx.each(|ec2, _t| async move {
        let out = ec2
            .describe_images()
            .owners("self")
            .set_filters(Some(search_filters(search)))
            .send()
            .await
            .sdk("DescribeImages")?;
        let mut rows: Vec<ImageRow> = out
            .images()
            .iter()
            .filter(|i| !excluded(i.tags(), exclude))
            .map(|i| ImageRow {
                ami: i.image_id().unwrap_or_default().to_owned(),
                name: owned(i.name()),
                state: owned(i.state().map(|s| s.as_str())),
                stream: owned(tags::value(i.tags(), tags::STREAM)),
                leaf: owned(tags::value(i.tags(), tags::LEAF)),
                created: owned(i.creation_date()),
                expires: owned(tags::value(i.tags(), tags::EXPIRES_AT)),
            })
            .collect();
        rows.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(rows)
    })
    .await
}

/// Which rows of an [`image_usage`] survey [`only`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Used,
    Unused,
}

/// The search of the usage commands: images matching `search` (and not
/// `exclude`) created at least `min_age` before `now`; one launched within
/// `unused_for` counts as used; with `pointer`, so do the fleet's
/// pointer's current AMI and the one `rollback` would go back to.
#[derive(Debug, Clone, Copy)]
pub struct UsageSearch<'a> {
    pub search: &'a [(String, String)],
    pub exclude: &'a [(String, String)],
    pub min_age: Duration,
    pub unused_for: Duration,
    pub pointer: Option<&'a crate::pointer::Template>,
    pub now: SystemTime,
}

/// One image of a usage survey.
pub(super) struct Judged {
    pub image: Image,
    /// Instances (pending, running, stopping, stopped) launched from it.
    pub instances: Vec<String>,
    /// Everything that makes it count as used.
    pub used_by: Vec<String>,
}

/// The images of a target the search finds, each with what uses it: what
/// EC2 finds referencing it (DescribeImageReferences: instances, launch
/// template versions, SSM parameters, Image Builder recipes), the
/// instances DescribeInstances lists, the fleet's pointer (its current
/// AMI and its rollback target), a launch within `unused_for`. Where EC2
/// does not answer DescribeImageReferences, the rest still count, and a
/// warning says so.
pub(super) async fn judged(
    ctx: &Ctx<'_>,
    ec2: &Client,
    t: &Target,
    q: &UsageSearch<'_>,
) -> anyhow::Result<Vec<Judged>> {
    let imgs = ec2
        .describe_images()
        .owners("self")
        .set_filters(Some(search_filters(q.search)))
        .include_disabled(true)
        .send()
        .await
        .sdk("DescribeImages")?;
    let mut users: HashMap<String, Vec<String>> = HashMap::new();
    let mut pages = ec2.describe_instances().filters(unpacker::live_instances()).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.sdk("DescribeInstances")?;
        for i in page.reservations().iter().flat_map(|r| r.instances()) {
            if let (Some(img), Some(id)) = (i.image_id(), i.instance_id()) {
                users.entry(img.to_owned()).or_default().push(id.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for img in imgs.images() {
        let Some(id) = img.image_id() else { continue };
        if excluded(img.tags(), q.exclude) {
            continue;
        }
        let created = img.creation_date().and_then(|d| humantime::parse_rfc3339_weak(d).ok());
        if created.is_none_or(|c| q.now.duration_since(c).unwrap_or_default() < q.min_age) {
            continue;
        }
        let instances = users.get(id).cloned().unwrap_or_default();
        out.push(Judged { image: img.clone(), instances, used_by: Vec::new() });
    }
    let ids: Vec<String> = out.iter().filter_map(|j| j.image.image_id().map(str::to_owned)).collect();
    match crate::lifecycle::references(ec2, &ids).await? {
        Some(mut refs) => {
            for j in &mut out {
                j.used_by = refs.remove(j.image.image_id().unwrap_or_default()).unwrap_or_default();
            }
        }
        None => {
            tracing::warn!(target = %t, "EC2 does not answer DescribeImageReferences here: only instances count as use")
        }
    }
    // The instances seen by DescribeInstances count whatever the references
    // say: an index that lags must not make an AMI in use deletable.
    for j in &mut out {
        for i in &j.instances {
            let row = format!("instance {i}");
            if !j.used_by.contains(&row) {
                j.used_by.push(row);
            }
        }
    }
    // The fleet's pointer holds its current AMI and the one `rollback`
    // would go back to. (Every version carries a leaf label, so "any
    // labelled version" would hold every leaf ever published.)
    if let Some(template) = q.pointer {
        let ssm = ctx.aws.ssm(t).await;
        let mut held: HashMap<String, Vec<(String, &'static str)>> = HashMap::new();
        for j in &mut out {
            let Some(stream) = tags::value(j.image.tags(), tags::STREAM) else { continue };
            let name = template
                .render(stream, "", &t.account, &t.region)
                .map_err(|e| anyhow::anyhow!("--ssm-parameter: {e}"))?;
            if !held.contains_key(&name) {
                let versions = crate::pointer::history(&ssm, &name).await?;
                let mut h = Vec::new();
                if let Some(now) = versions.last() {
                    h.push((now.value.clone(), "current"));
                }
                if let Some(back) = crate::pointer::rollback_target(&versions) {
                    h.push((back.value.clone(), "what rollback goes back to"));
                }
                held.insert(name.clone(), h);
            }
            let id = j.image.image_id().unwrap_or_default();
            for (_, why) in held[&name].iter().filter(|(value, _)| value == id) {
                j.used_by.push(format!("pointer {name} ({why})"));
            }
        }
    }
    if !q.unused_for.is_zero() {
        for j in &mut out {
            if let Some(at) = crate::lifecycle::last_launched(&j.image)
                && q.now.duration_since(at).unwrap_or_default() < q.unused_for
            {
                let when = j.image.last_launched_time().unwrap_or_default();
                j.used_by.push(format!("launched {when}"));
            }
        }
    }
    Ok(out)
}

/// The images the search finds in every target, used or not, each row
/// naming the instances that use it (one survey serves the usage lists and
/// both CSV reports; split it with [`only`]).
pub async fn image_usage(ctx: &Ctx<'_>, q: &UsageSearch<'_>) -> Vec<Report<UsageRow>> {
    ctx.each(|ec2, t| async move {
        Ok(judged(ctx, &ec2, &t, q)
            .await?
            .into_iter()
            .map(|j| UsageRow {
                ami: j.image.image_id().unwrap_or_default().to_owned(),
                name: owned(j.image.name()),
                created: owned(j.image.creation_date()),
                stream: owned(tags::value(j.image.tags(), tags::STREAM)),
                instances: j.instances.join(" "),
                used_by: j.used_by.join("; "),
            })
            .collect())
    })
    .await
}

/// `list-used-images`, `list-unused-images`: the rows of a survey whose
/// image is used (or not) by any instance.
pub fn only(survey: &[Report<UsageRow>], usage: Usage) -> Vec<Report<UsageRow>> {
    survey
        .iter()
        .map(|r| Report {
            records: r.records.iter().filter(|u| u.used_by.is_empty() == (usage == Usage::Unused)).cloned().collect(),
            ..r.clone()
        })
        .collect()
}

/// `delete-unused-images`: deregister the unused images the search finds,
/// and delete their snapshots.
pub async fn delete_unused_images(ctx: &Ctx<'_>, q: &UsageSearch<'_>) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for Judged { image: img, used_by, .. } in judged(ctx, &ec2, &t, q).await? {
            if !used_by.is_empty() {
                continue;
            }
            let id = img.image_id().unwrap_or_default();
            let ec2 = &ec2;
            if !super::lifecycle::may_deregister(ctx, ec2, &img, &mut out).await? {
                continue;
            }
            out.push(ctx.act("deregister", id, img.name().unwrap_or_default(), || deregister(ec2, id)).await?);
            for m in img.block_device_mappings() {
                if let Some(s) = m.ebs().and_then(|e| e.snapshot_id()) {
                    out.push(ctx.act("delete", s, format!("snapshot of {id}"), || delete_snapshot(ec2, s)).await?);
                }
            }
        }
        Ok(out)
    })
    .await
}

/// DeregisterImage; an AMI that is gone already counts as done (the
/// attempt whose answer was lost, or someone else, deregistered it).
pub(crate) async fn deregister(ec2: &Client, id: &str) -> anyhow::Result<()> {
    ec2.deregister_image()
        .image_id(id)
        .send()
        .await
        .or_code(&["InvalidAMIID.Unavailable", "InvalidAMIID.NotFound"], format!("DeregisterImage {id}"))?;
    Ok(())
}

/// DeleteSnapshot; a snapshot that is gone already counts as done.
pub(super) async fn delete_snapshot(ec2: &Client, id: &str) -> anyhow::Result<()> {
    ec2.delete_snapshot()
        .snapshot_id(id)
        .send()
        .await
        .or_code(&["InvalidSnapshot.NotFound"], format!("DeleteSnapshot {id}"))?;
    Ok(())
}

/// Remove tag `key` from AMIs on which it did not show (it may have been
/// set too recently to show), in calls of at most [`UNTAG_BATCH`] AMIs.
/// DeleteTags of a key a resource does not have changes nothing.
async fn untag_unseen(ec2: &Client, amis: &[String], key: &str) -> anyhow::Result<()> {
    for batch in amis.chunks(UNTAG_BATCH) {
        tracing::debug!(key, amis = batch.len(), "taking the tag off AMIs it may not show on yet");
        let done = ec2
            .delete_tags()
            .set_resources(Some(batch.to_vec()))
            .tags(Tag::builder().key(key).build())
            .send()
            .await
            .or_code(&["InvalidAMIID.NotFound"], format!("DeleteTags {key} on {} AMIs", batch.len()))?;
        if done.is_none() {
            // One of them was deregistered meanwhile: the others alone.
            untag_each(ec2, batch, key).await?;
        }
    }
    Ok(())
}

/// Each AMI alone, skipping those that are gone.
async fn untag_each(ec2: &Client, amis: &[String], key: &str) -> anyhow::Result<()> {
    for id in amis {
        ec2.delete_tags()
            .resources(id)
            .tags(Tag::builder().key(key).build())
            .send()
            .await
            .or_code(&["InvalidAMIID.NotFound"], format!("DeleteTags {key} on {id}"))?;
    }
    Ok(())
}

/// AMIs per DeleteTags call (EC2 takes up to 1,000 resource ids and
/// recommends smaller batches).
const UNTAG_BATCH: usize = 200;

/// Remove tag `key` from a resource.
async fn untag(ec2: &Client, id: &str, key: &str) -> anyhow::Result<()> {
    ec2.delete_tags()
        .resources(id)
        .tags(Tag::builder().key(key).build())
        .send()
        .await
        .sdk(format!("DeleteTags on {id}"))?;
    Ok(())
}

/// An AMI named in a results file.
#[derive(Debug, Clone)]
pub struct ListedAmi {
    pub ami: String,
    pub snapshot: Option<String>,
    pub stream: String,
    /// Whom the results file says it was shared with.
    pub shared_with: crate::sharing::Grantees,
}

/// AMIs of results files, by target.
pub type AmiMap = HashMap<Target, Vec<ListedAmi>>;

/// AMIs listed in results files, by target.
pub fn amis_by_target(files: &[PathBuf]) -> anyhow::Result<BTreeMap<Target, Vec<ListedAmi>>> {
    let mut out: BTreeMap<Target, Vec<ListedAmi>> = BTreeMap::new();
    for f in files {
        let r = PublishResults::read(f)?;
        for t in r.targets {
            if let Some(ami) = t.ami_id {
                out.entry(Target { account: t.account, region: t.region }).or_default().push(ListedAmi {
                    ami,
                    snapshot: t.snapshot_id,
                    stream: r.stream.clone(),
                    shared_with: t.shared_with,
                });
            }
        }
    }
    if out.is_empty() {
        bail!("the results files list no AMI");
    }
    Ok(out)
}

/// `delete RESULTS...`: deregister the AMIs and delete their snapshots.
pub async fn delete(ctx: &Ctx<'_>, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        let ec2 = &ec2;
        let listed = amis.get(&t).map(Vec::as_slice).unwrap_or_default();
        let ids: Vec<String> = listed.iter().map(|a| a.ami.clone()).collect();
        let found = crate::lifecycle::images(ec2, &ids).await?;
        for ListedAmi { ami, snapshot: snap, .. } in listed {
            let img = found.iter().find(|i| i.image_id() == Some(ami.as_str()));
            if let Some(img) = img
                && !super::lifecycle::may_deregister(ctx, ec2, img, &mut out).await?
            {
                continue;
            }
            out.push(ctx.act("deregister", ami, "", || deregister(ec2, ami)).await?);
            if let Some(s) = snap {
                out.push(ctx.act("delete", s, format!("snapshot of {ami}"), || delete_snapshot(ec2, s)).await?);
            }
        }
        Ok(out)
    })
    .await
}

/// `delete-tags KEY RESULTS...`: remove a tag from the AMIs.
pub async fn delete_tags(ctx: &Ctx<'_>, key: &str, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        let ec2 = &ec2;
        for ListedAmi { ami, .. } in amis.get(&t).map(Vec::as_slice).unwrap_or_default() {
            out.push(ctx.act("delete tag", ami, key, || untag(ec2, ami, key)).await?);
        }
        Ok(out)
    })
    .await
}

/// `set-exclusive-tags KEY VALUE RESULTS...`: tag these AMIs and take KEY off
/// every other AMI of the same stream in the target.
///
/// EC2's tags are eventually consistent: a KEY that a run set seconds ago
/// (the previous `set-exclusive-tags` of a pipeline that tags twice in a
/// row) may not show yet in the TagSet or a `tag-key` filter. So the other
/// AMIs of the stream are found by the stream's tag (set when each was
/// registered, long before) and KEY is deleted from every one of them,
/// showing or not; the rows name those on which it showed.
pub async fn set_exclusive_tags(ctx: &Ctx<'_>, key: &str, value: &str, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        let ec2 = &ec2;
        let ours = amis.get(&t).map(Vec::as_slice).unwrap_or_default();
        let mut streams: Vec<&str> = ours.iter().map(|a| a.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            let mut unseen = Vec::new();
            let mut pages =
                ec2.describe_images().owners("self").filters(tag_filter(tags::STREAM, stream)).into_paginator().send();
            while let Some(page) = pages.next().await {
                for img in page.sdk("DescribeImages")?.images() {
                    let Some(id) = img.image_id() else { continue };
                    if ours.iter().any(|a| a.ami == id) {
                        continue;
                    }
                    if tags::value(img.tags(), key).is_some() {
                        out.push(ctx.act("delete tag", id, key, || untag(ec2, id, key)).await?);
                    } else {
                        unseen.push(id.to_owned());
                    }
                }
            }
            if !ctx.dry_run {
                untag_unseen(ec2, &unseen, key).await?;
            }
        }
        for ListedAmi { ami, .. } in ours {
            out.push(
                ctx.act("tag", ami, format!("{key}={value}"), || async move {
                    ec2.create_tags()
                        .resources(ami)
                        .tags(tags::tag(key, value))
                        .send()
                        .await
                        .sdk(format!("CreateTags on {ami}"))?;
                    Ok(())
                })
                .await?,
            );
        }
        Ok(out)
    })
    .await
}
