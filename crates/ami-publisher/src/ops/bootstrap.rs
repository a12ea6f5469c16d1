//! `copy-bootstrap-image STREAM`: bringing a stream's AMI (an unpacker's
//! boot image, typically) into every target that lacks one, from the
//! nearest target that has it: CopyImage within an account, or, across
//! accounts, sharing the root snapshot, copying it encrypted and
//! registering the copy.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{
    Client,
    types::{ImageAttributeName, Tag},
};

use super::{Acted, Ctx, Report, images::delete_snapshot, launch::newest_of_stream_in};
use crate::{
    errors::SdkResultExt as _,
    ready::{image_available, image_named, snapshot_completed},
    retry,
    sharing::{self, Permission},
    tags,
    targets::Target,
};

/// An AMI of a stream in some target, a candidate source for bootstrapping.
#[derive(Debug, Clone)]
struct SourceAmi {
    target: Target,
    image: aws_sdk_ec2::types::Image,
}

/// The part of a region name that says where it is (us, eu, ap, ...).
fn area(region: &str) -> &str {
    region.split('-').next().unwrap_or(region)
}

/// `copy-bootstrap-image STREAM`: every target without an AMI of the stream
/// gets a copy of the nearest one (same account first, then the same area
/// of the world): CopyImage within an account (encrypted), or across
/// accounts by sharing the root snapshot, copying it encrypted, and
/// registering it. Targets that have one are skipped.
pub async fn copy_bootstrap_image(ctx: &Ctx<'_>, stream: &str) -> Vec<Report<Acted>> {
    // First, who has one: the newest available AMI of the stream, or a
    // copy still pending (from an earlier run that did not wait it out).
    let found = crate::fanout(&ctx.targets, ctx.max_concurrency, |t| async move {
        let ec2 = ctx.aws.ec2(&t).await;
        let mut newest =
            newest_of_stream_in(&ec2, stream, &["available", "pending"]).await.map_err(|e| format!("{e:#}"))?;
        let pending = newest.pop().flatten();
        Ok::<_, String>((newest.pop().flatten(), pending))
    })
    .await;
    let sources: Vec<SourceAmi> = found
        .iter()
        .zip(&ctx.targets)
        .filter_map(|(r, t)| {
            r.as_ref().ok().and_then(|(a, _)| a.clone()).map(|image| SourceAmi { target: t.clone(), image })
        })
        .collect();
    let pending: HashMap<Target, String> = found
        .iter()
        .zip(&ctx.targets)
        .filter_map(|(r, t)| {
            let p = r.as_ref().ok().and_then(|(_, p)| p.as_ref()).and_then(|i| i.image_id());
            p.map(|id| (t.clone(), id.to_owned()))
        })
        .collect();
    let pending = &pending;
    let sources = &sources;
    let failed: HashMap<Target, String> =
        found.iter().zip(&ctx.targets).filter_map(|(r, t)| r.as_ref().err().map(|e| (t.clone(), e.clone()))).collect();
    let failed = &failed;
    let shares = &Shares::default();
    ctx.each(|ec2, t| async move {
        if let Some(e) = failed.get(&t) {
            bail!("{e}");
        }
        if let Some(s) = sources.iter().find(|s| s.target == t) {
            let id = s.image.image_id().unwrap_or_default();
            let mut rows = vec![Acted::kept(id, "already has an AMI of the stream")];
            // A copy an earlier run made, that stopped before giving it
            // what it was asked to: given now (AMIs published here are
            // left as publish made them).
            let n = &ctx.settings.new_amis;
            let copied = tags::value(s.image.tags(), "CopiedFrom").is_some();
            // Only what it lacks: a deprecation time it has is kept.
            let missing = crate::lifecycle::NewAmis {
                deprecate_in: n.deprecate_in.filter(|_| s.image.deprecation_time().is_none()),
                protection: n.protection.filter(|m| !crate::lifecycle::Protection::of(&s.image).satisfies(*m)),
            };
            if copied && missing.any() {
                let ec2 = &ec2;
                rows.push(
                    ctx.act("give", id, gifts(&missing), || async move {
                        crate::lifecycle::give(ec2, id, Some(&s.image), None, n).await.map(drop)
                    })
                    .await?,
                );
            }
            return Ok(rows);
        }
        if let Some(id) = pending.get(&t) {
            return Ok(vec![Acted::kept(id, "a copy is still pending")]);
        }
        let Some(src) = sources.iter().min_by_key(|s| {
            (s.target.account != t.account, area(&s.target.region) != area(&t.region), s.target.region.clone())
        }) else {
            bail!("no target among --targets has an available AMI of {stream} to copy");
        };
        let src_ami = src.image.image_id().unwrap_or_default();
        let name = src.image.name().unwrap_or(stream).to_owned();
        let what = format!("{src_ami} from {}", src.target);
        if let Some(row) = ctx.would("copy", &name, what.clone()) {
            let mut rows = vec![row];
            let n = &ctx.settings.new_amis;
            if n.any() {
                rows.extend(ctx.would("give", &name, gifts(n)));
            }
            return Ok(rows);
        }
        // Tagged as it is made, so a re-run finds it even if this one stops
        // before the copy is available.
        let mut copy_tags = identity_tags(&src.image);
        copy_tags.push(tags::tag("CopiedFrom", &format!("{}/{src_ami}", src.target.region)));
        let tagging = tags::made(aws_sdk_ec2::types::ResourceType::Image, copy_tags.clone());
        let kms_key_id = ctx.settings.keys.for_target(&t);
        let new_ami = if src.target.account == t.account {
            // A token per copy: the SDK's retry of an attempt whose answer
            // was lost gets that attempt's copy. A re-run finds a copy by
            // its tags instead (a token of a deregistered copy would hand
            // back a dead AMI).
            let out = ec2
                .copy_image()
                .client_token(retry::token())
                .source_region(&src.target.region)
                .source_image_id(src_ami)
                .name(&name)
                .set_description(src.image.description().map(str::to_owned))
                .encrypted(true)
                .set_kms_key_id(kms_key_id.map(str::to_owned))
                .tag_specifications(tagging)
                // The copy's snapshots too: EC2 tags every new snapshot
                // with these, so none is left in the account unattributed.
                .tag_specifications(tags::made(aws_sdk_ec2::types::ResourceType::Snapshot, copy_tags))
                .send()
                .await
                .sdk(format!("CopyImage {what}"))?;
            out.image_id().context("CopyImage returned no image id")?.to_owned()
        } else {
            let dest = CopyDest { ec2: &ec2, target: &t, name: &name, kms_key_id, tagging };
            copy_across_accounts(ctx, shares, src, dest).await?
        };
        let made = Some(std::time::Instant::now());
        image_available(&ec2, &new_ami, made, ctx.settings.timeouts.image)
            .await
            .context("the copy is tagged: a re-run reports it, and copies nothing while it is pending")?;
        let mut rows = vec![ctx.described("copy", &new_ami, what)];
        let n = &ctx.settings.new_amis;
        if n.any() {
            let given = crate::lifecycle::give(&ec2, &new_ami, None, made, n).await?;
            let parts: Vec<String> = [
                given.deprecation_time.map(|t| format!("deprecated at {t}")),
                given.protection.map(|p| format!("deregistration protection {p}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            rows.push(ctx.described("give", &new_ami, parts.join("; ")));
        }
        Ok(rows)
    })
    .await
}

/// What a copy would be given (`--deprecate-in`, `--deregistration-protection`).
fn gifts(n: &crate::lifecycle::NewAmis) -> String {
    let mut parts = Vec::new();
    if let Some(d) = n.deprecate_in {
        parts.push(format!("deprecated at {}", tags::rfc3339(std::time::SystemTime::now() + d)));
    }
    if let Some(mode) = n.protection {
        let p = crate::lifecycle::Protection::On { cooldown: mode == crate::lifecycle::ProtectionMode::Cooldown };
        parts.push(format!("deregistration protection {p}"));
    }
    parts.join("; ")
}

/// The tags a copy of an AMI (or of its snapshots) carries from it: all but
/// AWS's own and the expiry.
fn identity_tags(image: &aws_sdk_ec2::types::Image) -> Vec<Tag> {
    image
        .tags()
        .iter()
        .filter(|t| t.key().is_some_and(|k| !k.starts_with("aws:") && k != tags::EXPIRES_AT))
        .cloned()
        .collect()
}

/// The account id behind a target's profile.
async fn account_id(ctx: &Ctx<'_>, t: &Target) -> anyhow::Result<String> {
    let sts = ctx.aws.sts(t).await;
    let me = sts.get_caller_identity().send().await.map_err(|e| anyhow::anyhow!("GetCallerIdentity: {e}"))?;
    me.account().map(str::to_owned).context("GetCallerIdentity returned no account")
}

/// Snapshots shared with other accounts for the length of a copy, counted
/// so that concurrent copies into one account (its regions) share a snapshot
/// once and stop sharing it after the last copy is made.
#[derive(Default)]
struct Shares(tokio::sync::Mutex<HashMap<(String, String), Share>>);

/// One snapshot shared with one account for copies under way.
#[derive(Default)]
struct Share {
    copies: usize,
    /// Whether this run added the permission (one that was there before
    /// stays after the copies).
    added: bool,
}

impl Shares {
    async fn share(&self, src: &Client, snap: &str, account: &str) -> anyhow::Result<()> {
        let mut held = self.0.lock().await;
        let share = held.entry((snap.to_owned(), account.to_owned())).or_default();
        if share.copies == 0 {
            let already = sharing::volume_permissions(src, snap, None).await?.iter().any(|a| a == account);
            if !already {
                sharing::change(src, &Self::permission(snap, account), true, None, false).await.with_context(|| {
                    format!(
                        "the source snapshot {snap} cannot be shared with account {account} for the copy (one \
                         encrypted with the AWS managed key aws/ebs never can: publish the source with a customer \
                         managed key the destination may use, --kms-key-id)"
                    )
                })?;
            }
            share.added = !already;
        }
        share.copies += 1;
        Ok(())
    }

    fn permission(snap: &str, account: &str) -> Permission {
        Permission::CreateVolume { snapshot: snap.to_owned(), account: account.to_owned() }
    }

    async fn unshare(&self, src: &Client, snap: &str, account: &str) {
        let mut held = self.0.lock().await;
        let key = (snap.to_owned(), account.to_owned());
        let Some(share) = held.get_mut(&key) else { return };
        share.copies -= 1;
        if share.copies > 0 {
            return;
        }
        let added = share.added;
        held.remove(&key);
        if !added {
            return;
        }
        if let Err(e) = sharing::change(src, &Self::permission(snap, account), false, None, false).await {
            tracing::warn!(snapshot = snap, account, "could not stop sharing the snapshot: {e:#}");
        }
    }
}

/// Where snapshot copies go: the target's client and account, the key to
/// encrypt with, and how long a copy may take (`--snapshot-timeout`).
#[derive(Clone, Copy)]
struct SnapshotDest<'a> {
    ec2: &'a Client,
    account: &'a str,
    kms_key_id: Option<&'a str>,
    timeout: Duration,
}

/// Copy one snapshot of `src` into the target's account and region
/// (encrypted), sharing it for the length of the copy.
async fn copy_shared_snapshot(
    shares: &Shares,
    src_ec2: &Client,
    src: &SourceAmi,
    snap: &str,
    dest: &SnapshotDest<'_>,
) -> anyhow::Result<String> {
    let SnapshotDest { ec2, account: dest_account, kms_key_id, timeout } = *dest;
    shares.share(src_ec2, snap, dest_account).await?;
    let copied = async {
        // CopySnapshot takes no idempotency token: the copy carries one in
        // a tag, so an attempt whose answer was lost is found, not repeated.
        let token = retry::token();
        let mut copy_tags = identity_tags(&src.image);
        copy_tags.push(tags::tag(tags::CREATE_TOKEN, &token));
        let tagging = tags::made(aws_sdk_ec2::types::ResourceType::Snapshot, copy_tags);
        let description = format!("copied from {}/{snap} for an AMI of {}", src.target, src.image.name().unwrap_or(""));
        let (new_snap, _) = retry::create_untokened(
            ec2,
            &format!("CopySnapshot {snap} from {}", src.target),
            None,
            || {
                let req = ec2
                    .copy_snapshot()
                    .source_region(&src.target.region)
                    .source_snapshot_id(snap)
                    .encrypted(true)
                    .set_kms_key_id(kms_key_id.map(str::to_owned))
                    .description(&description)
                    .tag_specifications(tagging.clone())
                    .customize()
                    .config_override(retry::once());
                async move { req.send().await.map(|out| (out.snapshot_id().unwrap_or_default().to_owned(), 0)) }
            },
            || retry::snapshot_with_token(ec2, &token),
        )
        .await?;
        if new_snap.is_empty() {
            bail!("CopySnapshot {snap} returned no snapshot id");
        }
        let made = Some(std::time::Instant::now());
        if let Err(e) = snapshot_completed(ec2, &new_snap, made, timeout).await {
            if let Err(d) = delete_snapshot(ec2, &new_snap).await {
                tracing::warn!("{d:#}");
            }
            return Err(e.context(format!("copied snapshot {new_snap}")));
        }
        anyhow::Ok(new_snap)
    }
    .await;
    shares.unshare(src_ec2, snap, dest_account).await;
    copied
}

/// Where a cross-account copy goes, and what it is called and tagged.
struct CopyDest<'a> {
    ec2: &'a Client,
    target: &'a Target,
    name: &'a str,
    kms_key_id: Option<&'a str>,
    tagging: aws_sdk_ec2::types::TagSpecification,
}

/// Across accounts: copy each of the source AMI's snapshots into the
/// target (shared for the length of the copy, re-encrypted), then register
/// an AMI with the source's attributes on the copies. A failure deletes the
/// copies made so far.
async fn copy_across_accounts(
    ctx: &Ctx<'_>,
    shares: &Shares,
    src: &SourceAmi,
    dest: CopyDest<'_>,
) -> anyhow::Result<String> {
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice};
    let CopyDest { ec2, target: t, name, kms_key_id, tagging } = dest;
    let dest_account = account_id(ctx, t).await?;
    let root = src.image.root_device_name().context("the source AMI has no root device name")?;
    let src_ec2 = ctx.aws.ec2(&src.target).await;
    let mut copies: Vec<String> = Vec::new();
    let mut mappings = Vec::new();
    let mut failure = None;
    let mut uefi_data = None;
    for m in src.image.block_device_mappings() {
        let Some(snap) = m.ebs().and_then(|e| e.snapshot_id()) else {
            // An empty volume or an instance store: as it is, but a KMS key
            // of the source account means nothing here (the target account's
            // key, or its default, applies).
            let mut m = m.clone();
            if let Some(e) = m.ebs.as_mut() {
                e.kms_key_id = kms_key_id.map(str::to_owned);
            }
            mappings.push(m);
            continue;
        };
        let to = SnapshotDest { ec2, account: &dest_account, kms_key_id, timeout: ctx.settings.timeouts.snapshot };
        match copy_shared_snapshot(shares, &src_ec2, src, snap, &to).await {
            Ok(new_snap) => {
                let ebs = m.ebs().cloned().unwrap_or_else(|| EbsBlockDevice::builder().build());
                let on_termination = ebs.delete_on_termination().unwrap_or(true);
                let copied = EbsBlockDevice::builder()
                    .snapshot_id(&new_snap)
                    .set_volume_size(ebs.volume_size())
                    .set_volume_type(ebs.volume_type().cloned())
                    .set_iops(ebs.iops())
                    .set_throughput(ebs.throughput())
                    .delete_on_termination(on_termination)
                    .build();
                mappings.push(
                    BlockDeviceMapping::builder()
                        .set_device_name(m.device_name().map(str::to_owned))
                        .ebs(copied)
                        .build(),
                );
                copies.push(new_snap);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() && copies.is_empty() {
        failure = Some(anyhow::anyhow!("the source AMI has no EBS snapshot to copy"));
    }
    let copies_made = Some(std::time::Instant::now());
    // The UEFI variable store is not in DescribeImages; CopyImage carries
    // it, and so does a copy across accounts.
    if failure.is_none() && src.image.boot_mode().is_some() {
        let id = src.image.image_id().unwrap_or_default();
        match retry::call(&format!("DescribeImageAttribute uefiData of {id}"), None, || {
            src_ec2.describe_image_attribute().image_id(id).attribute(ImageAttributeName::UefiData).send()
        })
        .await
        {
            Ok(out) => uefi_data = out.uefi_data().and_then(|v| v.value()).map(str::to_owned),
            Err(e) => failure = Some(e),
        }
    }
    let registered = match failure {
        Some(e) => Err(e),
        None => {
            register_copy(
                ec2,
                name,
                copies_made,
                &copies,
                ec2.register_image()
                    .name(name)
                    .set_description(src.image.description().map(str::to_owned))
                    .set_architecture(src.image.architecture().cloned())
                    .root_device_name(root)
                    .set_block_device_mappings(Some(mappings))
                    .virtualization_type("hvm")
                    .set_ena_support(src.image.ena_support())
                    .set_sriov_net_support(src.image.sriov_net_support().map(str::to_owned))
                    .set_boot_mode(src.image.boot_mode().map(|b| b.as_str().into()))
                    .set_tpm_support(src.image.tpm_support().map(|b| b.as_str().into()))
                    .set_uefi_data(uefi_data)
                    .set_imds_support(src.image.imds_support().map(|b| b.as_str().into()))
                    .tag_specifications(tagging),
            )
            .await
        }
    };
    if registered.is_err() {
        for c in &copies {
            if let Err(d) = delete_snapshot(ec2, c).await {
                tracing::warn!("{d:#} (a copy left behind after a failed bootstrap copy)");
            }
        }
    }
    registered
}

/// RegisterImage of copied snapshots (made at `made`). EC2 takes no
/// idempotency token for it: an attempt whose answer was lost is found by
/// its name (unique per account and region) and the copies it uses.
async fn register_copy(
    ec2: &Client,
    name: &str,
    made: Option<std::time::Instant>,
    copies: &[String],
    req: aws_sdk_ec2::operation::register_image::builders::RegisterImageFluentBuilder,
) -> anyhow::Result<String> {
    let id = retry::create_untokened(
        ec2,
        &format!("RegisterImage {name}"),
        made,
        || {
            let req = req.clone().customize().config_override(retry::once());
            async move { req.send().await.map(|out| out.image_id().unwrap_or_default().to_owned()) }
        },
        || async {
            // AMI names are unique per account and region.
            let named = image_named(ec2, name).await?;
            let uses_copies = |i: &&aws_sdk_ec2::types::Image| {
                i.block_device_mappings()
                    .iter()
                    .any(|m| m.ebs().and_then(|e| e.snapshot_id()).is_some_and(|s| copies.iter().any(|c| c == s)))
            };
            anyhow::Ok(named.as_ref().filter(uses_copies).and_then(|i| i.image_id().map(str::to_owned)))
        },
    )
    .await?;
    if id.is_empty() {
        bail!("RegisterImage {name} returned no image id");
    }
    Ok(id)
}
