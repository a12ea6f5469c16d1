//! `expire`: everything this tool made (`ManagedBy=ami-fleet`) whose
//! `ExpiresAt` tag has passed, and its snapshots that can back nothing:
//! ended in `error`, or started with the EBS direct APIs and still pending
//! long after EBS's timeout (a publish killed before it tagged them).

use std::time::SystemTime;

use aws_sdk_ec2::types::{Filter, Tag};

use super::{
    Acted, Ctx, Report,
    images::{delete_snapshot, deregister},
    lifecycle::may_deregister,
    unpackers::terminate,
};
use crate::{errors::SdkResultExt as _, tags, unpacker, volumes};

/// Whether tags say the resource has expired (None: no ExpiresAt).
fn expired(tags: &[Tag], now: SystemTime) -> Option<bool> {
    let v = tags::value(tags, tags::EXPIRES_AT)?;
    match humantime::parse_rfc3339_weak(v) {
        Ok(t) => Some(t <= now),
        Err(_) => {
            tracing::warn!(value = v, "ExpiresAt is not an RFC 3339 time; left alone");
            Some(false)
        }
    }
}

/// Whether a resource is this tool's to expire now: its ExpiresAt has
/// passed and it carries `ManagedBy=ami-fleet`. One that has expired but was
/// not made by ami-publisher is reported kept and left alone: the IAM policy
/// would refuse it, and that refusal would stop the target's cleanup.
fn due(tags: &[Tag], now: SystemTime, id: &str, out: &mut Vec<Acted>) -> bool {
    if expired(tags, now) != Some(true) {
        return false;
    }
    if tags::value(tags, tags::MANAGED_BY) != Some(tags::MANAGED_BY_VALUE) {
        out.push(Acted::kept(id, "expired, but not made by ami-publisher (no ManagedBy=ami-fleet): left alone"));
        return false;
    }
    true
}

/// How long after its start a snapshot the EBS direct APIs were writing is
/// surely dead: EBS cancels one nobody writes to for its timeout (this
/// tool asks for 60 minutes; EBS allows at most 4320, three days).
const DIRECT_SNAPSHOT_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(4 * 24 * 3600);

/// Why one of this tool's snapshots can back nothing and goes, if it
/// cannot: it ended in `error`, or it is a snapshot of the EBS direct APIs
/// (volume `vol-ffffffff`) still pending past any EBS timeout.
fn dead(
    state: Option<&aws_sdk_ec2::types::SnapshotState>,
    volume: Option<&str>,
    started: Option<SystemTime>,
    now: SystemTime,
) -> Option<&'static str> {
    use aws_sdk_ec2::types::SnapshotState;
    match state? {
        SnapshotState::Error => Some("snapshot that ended in error"),
        SnapshotState::Pending
            if volume == Some("vol-ffffffff") && started.is_some_and(|t| t + DIRECT_SNAPSHOT_DEAD_AFTER <= now) =>
        {
            Some("snapshot left unfinished (EBS direct APIs) past EBS's longest timeout")
        }
        _ => None,
    }
}

/// `expire`: delete every AMI, snapshot, volume and instance whose ExpiresAt
/// is in the past (one `now` for all targets). An AMI's snapshots go with it.
pub async fn expire(ctx: &Ctx<'_>, now: SystemTime) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        let ec2 = &ec2;
        let has_expiry = || Filter::builder().name("tag-key").values(tags::EXPIRES_AT).build();
        let images = ec2
            .describe_images()
            .owners("self")
            .filters(has_expiry())
            .include_disabled(true)
            .send()
            .await
            .sdk("DescribeImages")?;
        let mut gone_snapshots = Vec::new();
        let mut kept_snapshots: Vec<(String, String)> = Vec::new();
        for img in images.images() {
            let Some(id) = img.image_id() else { continue };
            if !due(img.tags(), now, id, &mut out) {
                continue;
            }
            let snaps: Vec<String> = img
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
                .collect();
            if !may_deregister(ctx, ec2, img, &mut out).await? {
                // Its snapshots stay with it (a plan and a run say the same).
                kept_snapshots.extend(snaps.into_iter().map(|s| (s, id.to_owned())));
                continue;
            }
            out.push(ctx.act("deregister", id, img.name().unwrap_or_default(), || deregister(ec2, id)).await?);
            for s in snaps {
                out.push(ctx.act("delete", &s, format!("snapshot of {id}"), || delete_snapshot(ec2, &s)).await?);
                gone_snapshots.push(s);
            }
        }
        let snaps =
            ec2.describe_snapshots().owner_ids("self").filters(has_expiry()).send().await.sdk("DescribeSnapshots")?;
        for s in snaps.snapshots() {
            let Some(id) = s.snapshot_id() else { continue };
            if gone_snapshots.iter().any(|g| g == id) || !due(s.tags(), now, id, &mut out) {
                continue;
            }
            if let Some((_, ami)) = kept_snapshots.iter().find(|(k, _)| k == id) {
                out.push(Acted::kept(id, &format!("snapshot of {ami}, which is kept")));
                continue;
            }
            if let Some(row) = ctx.would("delete", id, "snapshot") {
                out.push(row);
                continue;
            }
            match ec2.delete_snapshot().snapshot_id(id).send().await {
                // Or deleted by an attempt whose answer was lost.
                Ok(_) => out.push(ctx.described("delete", id, "snapshot")),
                Err(e) if crate::errors::code(&e) == Some("InvalidSnapshot.NotFound") => {
                    out.push(ctx.described("delete", id, "snapshot"));
                }
                // Still backing an AMI that has not expired: keep it.
                Err(e) if crate::errors::code(&e) == Some("InvalidSnapshot.InUse") => {
                    out.push(Acted::kept(id, "in use by an AMI"));
                }
                Err(e) => return Err(crate::errors::sdk_error(&format!("DeleteSnapshot {id}"), e)),
            }
        }
        let ours: Vec<aws_sdk_ec2::types::Snapshot> = ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(tags::filter(&format!("tag:{}", tags::MANAGED_BY), tags::MANAGED_BY_VALUE))
            .filters(Filter::builder().name("status").values("error").values("pending").build())
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<_>, _>>()
            .await
            .sdk("DescribeSnapshots")?;
        for s in &ours {
            let Some(id) = s.snapshot_id() else { continue };
            let started = s.start_time().and_then(|t| SystemTime::try_from(*t).ok());
            let Some(why) = dead(s.state(), s.volume_id(), started, now) else { continue };
            if gone_snapshots.iter().any(|g| g == id) {
                continue;
            }
            if let Some(row) = ctx.would("delete", id, why) {
                out.push(row);
                continue;
            }
            match ec2.delete_snapshot().snapshot_id(id).send().await {
                // Or deleted by an attempt whose answer was lost.
                Ok(_) => out.push(ctx.described("delete", id, why)),
                Err(e) if crate::errors::code(&e) == Some("InvalidSnapshot.NotFound") => {
                    out.push(ctx.described("delete", id, why));
                }
                Err(e) if crate::errors::code(&e) == Some("InvalidSnapshot.InUse") => {
                    out.push(Acted::kept(id, "in use by an AMI"));
                }
                Err(e) => return Err(crate::errors::sdk_error(&format!("DeleteSnapshot {id}"), e)),
            }
        }
        let vols = ec2.describe_volumes().filters(has_expiry()).send().await.sdk("DescribeVolumes")?;
        for v in vols.volumes() {
            let Some(id) = v.volume_id() else { continue };
            if !due(v.tags(), now, id, &mut out) {
                continue;
            }
            let attached = v.attachments().iter().find_map(|a| a.instance_id());
            out.push(
                ctx.act("delete", id, "volume", || async move {
                    match attached {
                        Some(inst) => volumes::detach_and_delete(ec2, inst, id, ctx.settings.timeouts.volume).await,
                        // Or deleted by an attempt whose answer was lost.
                        None => ec2
                            .delete_volume()
                            .volume_id(id)
                            .send()
                            .await
                            .or_code(&["InvalidVolume.NotFound"], format!("DeleteVolume {id}"))
                            .map(drop),
                    }
                })
                .await?,
            );
        }
        let insts = ec2
            .describe_instances()
            .filters(has_expiry())
            .filters(unpacker::live_instances())
            .send()
            .await
            .sdk("DescribeInstances")?;
        for i in insts.reservations().iter().flat_map(|r| r.instances()) {
            let Some(id) = i.instance_id() else { continue };
            if !due(i.tags(), now, id, &mut out) {
                continue;
            }
            out.push(ctx.act("terminate", id, "instance", || terminate(ec2, id)).await?);
        }
        Ok(out)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use aws_sdk_ec2::types::SnapshotState;

    use super::*;

    #[test]
    fn a_snapshot_is_dead_when_it_failed_or_an_unfinished_direct_one_outlived_any_timeout() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10 * 24 * 3600);
        let day = Duration::from_secs(24 * 3600);
        let direct = Some("vol-ffffffff");
        assert!(dead(Some(&SnapshotState::Error), Some("vol-1"), Some(now), now).is_some());
        assert!(dead(Some(&SnapshotState::Pending), direct, Some(now - 5 * day), now).is_some());
        // Young, from a volume, or completed: kept.
        assert!(dead(Some(&SnapshotState::Pending), direct, Some(now - day), now).is_none());
        assert!(dead(Some(&SnapshotState::Pending), Some("vol-1"), Some(now - 5 * day), now).is_none());
        assert!(dead(Some(&SnapshotState::Pending), direct, None, now).is_none());
        assert!(dead(Some(&SnapshotState::Completed), direct, Some(now - 5 * day), now).is_none());
    }
}
