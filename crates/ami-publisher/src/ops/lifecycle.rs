//! `deprecate`, `undeprecate`, `protect`, `unprotect`, `disable` and
//! `enable` over results files, and the guard every deregistration goes
//! through: a protected AMI is kept, with a line saying why, unless
//! `--lift-protection` turns its protection off first (which a cooldown
//! still holds for 24 hours).

use std::time::SystemTime;

use aws_sdk_ec2::{Client, types::Image};

use crate::lifecycle::{self, Protection, ProtectionMode};

use super::{Acted, AmiMap, Ctx, ListedAmi, Report};

/// What to do to each AMI of the results files.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    Deprecate(SystemTime),
    Undeprecate,
    Protect(ProtectionMode),
    Unprotect,
    Disable,
    Enable,
}

/// The AMIs of target `t` in `amis` (results files), then this account's
/// AMIs of each of `leaves` there (by their tags; a leaf with none fails
/// the target).
pub(super) async fn ami_ids(
    ec2: &Client,
    amis: &AmiMap,
    t: &crate::targets::Target,
    leaves: &[(String, String)],
) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> =
        amis.get(t).map(Vec::as_slice).unwrap_or_default().iter().map(|ListedAmi { ami, .. }| ami.clone()).collect();
    for (stream, leaf) in leaves {
        let found = crate::retry::call("DescribeImages", None, || {
            ec2.describe_images()
                .owners("self")
                .filters(crate::tags::tag_filter(crate::tags::STREAM, stream))
                .filters(crate::tags::tag_filter(crate::tags::LEAF, leaf))
                .include_disabled(true)
                .send()
        })
        .await?;
        let before = ids.len();
        ids.extend(found.images().iter().filter_map(|i| i.image_id()).map(str::to_owned));
        anyhow::ensure!(ids.len() > before, "no AMI of {stream}/{leaf} here");
    }
    Ok(ids)
}

/// Apply `change` to every AMI of `amis` and of `leaves` (STREAM, LEAF:
/// this account's AMIs of the leaf in each target), skipping those
/// already so.
pub async fn change(ctx: &Ctx<'_>, change: Change, amis: &AmiMap, leaves: &[(String, String)]) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let ec2 = &ec2;
        let ids = ami_ids(ec2, amis, &t, leaves).await?;
        let found = lifecycle::images(ec2, &ids).await?;
        let mut out = Vec::new();
        for id in &ids {
            let Some(img) = found.iter().find(|i| i.image_id() == Some(id.as_str())) else {
                out.push(Acted::kept(id, "not here any more"));
                continue;
            };
            out.push(apply(ctx, ec2, img, id, change).await?);
        }
        Ok(out)
    })
    .await
}

async fn apply(ctx: &Ctx<'_>, ec2: &Client, img: &Image, id: &str, change: Change) -> anyhow::Result<Acted> {
    let disabled = img.state().is_some_and(|s| s.as_str() == "disabled");
    let protection = Protection::of(img).now(SystemTime::now());
    Ok(match change {
        Change::Deprecate(at) => {
            let when = crate::tags::rfc3339(at);
            ctx.act("deprecate", id, format!("at {when}"), || lifecycle::deprecate(ec2, id, at)).await?
        }
        Change::Undeprecate if img.deprecation_time().is_none() => Acted::kept(id, "not deprecated"),
        Change::Undeprecate => {
            let was = img.deprecation_time().unwrap_or_default().to_owned();
            ctx.act("undeprecate", id, format!("was {was}"), || lifecycle::undeprecate(ec2, id)).await?
        }
        Change::Protect(mode) if protection.satisfies(mode) => {
            Acted::kept(id, &format!("protected already ({protection})"))
        }
        Change::Protect(mode) => {
            let how = if mode == ProtectionMode::Cooldown { "with a 24-hour cooldown" } else { "without cooldown" };
            ctx.act("protect", id, how, || lifecycle::protect(ec2, id, mode)).await?
        }
        Change::Unprotect => match protection {
            Protection::Off => Acted::kept(id, "not protected"),
            Protection::Until(t) => Acted::kept(id, &format!("protection is off; its cooldown holds it until {t}")),
            Protection::On { cooldown } => {
                let detail = if cooldown { "its cooldown keeps it protected for 24 hours" } else { "" };
                ctx.act("unprotect", id, detail, || lifecycle::unprotect(ec2, id)).await?
            }
        },
        Change::Disable if disabled => Acted::kept(id, "disabled already"),
        Change::Disable => {
            ctx.act("disable", id, "no launches; launch permissions removed", || lifecycle::disable(ec2, id)).await?
        }
        Change::Enable if !disabled => Acted::kept(id, "not disabled"),
        Change::Enable => {
            ctx.act("enable", id, "launch permissions stay removed", || lifecycle::enable(ec2, id)).await?
        }
    })
}

/// Before an AMI is deregistered: whether it may be (true), with the rows
/// of what was done or why it is kept pushed to `out`. A protected AMI is
/// kept unless `--lift-protection`; a cooldown keeps it either way.
pub async fn may_deregister(ctx: &Ctx<'_>, ec2: &Client, img: &Image, out: &mut Vec<Acted>) -> anyhow::Result<bool> {
    let id = img.image_id().unwrap_or_default();
    match Protection::of(img).now(SystemTime::now()) {
        Protection::Off => Ok(true),
        Protection::Until(t) => {
            out.push(Acted::kept(id, &format!("deregistration protection's cooldown holds it until {t}")));
            Ok(false)
        }
        Protection::On { .. } if !ctx.lift_protection => {
            out.push(Acted::kept(
                id,
                "deregistration protection is on: `unprotect` it first, or give --lift-protection",
            ));
            Ok(false)
        }
        Protection::On { cooldown: true } => {
            out.push(ctx.act("unprotect", id, "--lift-protection", || lifecycle::unprotect(ec2, id)).await?);
            out.push(Acted::kept(id, "its 24-hour cooldown keeps it protected: run again after it"));
            Ok(false)
        }
        Protection::On { cooldown: false } => {
            out.push(ctx.act("unprotect", id, "--lift-protection", || lifecycle::unprotect(ec2, id)).await?);
            Ok(true)
        }
    }
}

/// `retire STREAM`: each AMI of the stream takes the steps its age calls
/// for: deprecated after `deprecate_after`, disabled after
/// `disable_after`, deleted (with its snapshots) after `delete_after`. The
/// `keep` newest are left alone, and so is any AMI something uses (see
/// [`super::images::UsageSearch`]: references, the pointer's labelled
/// versions, recent launches); protected AMIs are kept as everywhere.
#[derive(Debug, Clone, Copy)]
pub struct Retire {
    pub keep: usize,
    pub deprecate_after: Option<std::time::Duration>,
    pub disable_after: Option<std::time::Duration>,
    pub delete_after: Option<std::time::Duration>,
}

pub async fn retire(ctx: &Ctx<'_>, q: &super::images::UsageSearch<'_>, r: Retire) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let ec2 = &ec2;
        let mut judged = super::images::judged(ctx, ec2, &t, q).await?;
        // Newest first (RFC 3339 times of one form sort as text).
        judged.sort_by(|a, b| b.image.creation_date().cmp(&a.image.creation_date()));
        let mut out = Vec::new();
        for (i, j) in judged.iter().enumerate() {
            let img = &j.image;
            let id = img.image_id().unwrap_or_default();
            if i < r.keep {
                out.push(Acted::kept(id, &format!("one of the {} newest", r.keep)));
                continue;
            }
            if !j.used_by.is_empty() {
                out.push(Acted::kept(id, &format!("in use: {}", j.used_by.join("; "))));
                continue;
            }
            let created = img.creation_date().and_then(|d| humantime::parse_rfc3339_weak(d.trim_end_matches('Z')).ok());
            let age = created.map_or(std::time::Duration::ZERO, |c| q.now.duration_since(c).unwrap_or_default());
            let due = |after: Option<std::time::Duration>| after.is_some_and(|d| age >= d);
            if due(r.delete_after) {
                if may_deregister(ctx, ec2, img, &mut out).await? {
                    let name = img.name().unwrap_or_default();
                    out.push(ctx.act("deregister", id, name, || super::images::deregister(ec2, id)).await?);
                    for s in img.block_device_mappings().iter().filter_map(|m| m.ebs().and_then(|e| e.snapshot_id())) {
                        let detail = format!("snapshot of {id}");
                        out.push(ctx.act("delete", s, detail, || super::images::delete_snapshot(ec2, s)).await?);
                    }
                }
                continue;
            }
            let before = out.len();
            let deprecated = img
                .deprecation_time()
                .and_then(|d| humantime::parse_rfc3339_weak(d.trim_end_matches('Z')).ok())
                .is_some_and(|d| d <= q.now + std::time::Duration::from_secs(120));
            if due(r.deprecate_after) && !deprecated {
                // A minute ahead: EC2 refuses a time in the past, and rounds.
                let at = q.now + std::time::Duration::from_secs(60);
                out.push(ctx.act("deprecate", id, "now", || lifecycle::deprecate(ec2, id, at)).await?);
            }
            let disabled = img.state().is_some_and(|s| s.as_str() == "disabled");
            if due(r.disable_after) && !disabled {
                out.push(ctx.act("disable", id, "no launches", || lifecycle::disable(ec2, id)).await?);
            }
            if out.len() == before {
                out.push(Acted::kept(id, "nothing due"));
            }
        }
        Ok(out)
    })
    .await
}
