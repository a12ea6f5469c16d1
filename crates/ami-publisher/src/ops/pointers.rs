//! `promote`, `rollback` and `list-pointers`: the fleet's pointer (an SSM
//! parameter per target, [`crate::pointer`]) moved to a leaf, moved back,
//! and shown. Each move writes a new version labelled with its leaf, so
//! the history stays and `NAME:leaf-LEAF` keeps resolving.

use std::{collections::BTreeMap, time::Duration};

use aws_sdk_ec2::{Client, types::Image};

use crate::{
    ops::output::row,
    pointer::{self, Template},
    retry, tags,
    targets::Target,
};

use super::{Acted, Ctx, Report};

/// How long Parameter Store may take to accept a new version.
const ACCEPTED_WITHIN: Duration = Duration::from_secs(120);

/// The newest available AMI of `stream`/`leaf` this account owns here.
async fn leaf_ami(ec2: &Client, stream: &str, leaf: &str) -> anyhow::Result<Option<String>> {
    let found = retry::call("DescribeImages", None, || {
        ec2.describe_images()
            .owners("self")
            .filters(tags::tag_filter(tags::STREAM, stream))
            .filters(tags::tag_filter(tags::LEAF, leaf))
            .filters(aws_sdk_ec2::types::Filter::builder().name("state").values("available").build())
            .send()
    })
    .await?;
    let mut images: Vec<&Image> = found.images().iter().collect();
    images.sort_by(|a, b| a.creation_date().cmp(&b.creation_date()));
    Ok(images.last().and_then(|i| i.image_id()).map(str::to_owned))
}

/// The AMI `ami` if this account can see it here (disabled or
/// deprecated too), with its tags.
async fn image(ec2: &Client, ami: &str) -> anyhow::Result<Option<Image>> {
    Ok(crate::lifecycle::images(ec2, &[ami.to_owned()]).await?.into_iter().next())
}

fn name_in(template: &Template, stream: &str, leaf: &str, t: &Target) -> anyhow::Result<String> {
    template.render(stream, leaf, &t.account, &t.region).map_err(|e| anyhow::anyhow!("--ssm-parameter: {e}"))
}

/// `promote STREAM LEAF`: point every target's pointer at its AMI of the
/// leaf. First every target's AMI is found; when one lacks it, nothing
/// changes anywhere (the targets that lack it fail, the others say they
/// were kept), unless `partial`.
pub async fn promote(
    ctx: &Ctx<'_>,
    template: &Template,
    stream: &str,
    leaf: &str,
    partial: bool,
) -> Vec<Report<Acted>> {
    let found = ctx
        .each(|ec2, _t| async move {
            match leaf_ami(&ec2, stream, leaf).await? {
                Some(ami) => Ok(vec![ami]),
                None => anyhow::bail!("no AMI of {stream}/{leaf} here: publish or copy it first"),
            }
        })
        .await;
    let lacking = found.iter().filter(|r| r.error.is_some()).count();
    if lacking > 0 && !partial {
        return found
            .into_iter()
            .map(|r| Report {
                records: r
                    .records
                    .iter()
                    .map(|ami| {
                        let why =
                            format!("not promoted: {lacking} target(s) lack the leaf (--partial promotes the others)");
                        Acted::kept(ami, &why)
                    })
                    .collect(),
                account: r.account,
                region: r.region,
                error: r.error,
            })
            .collect();
    }
    let amis: BTreeMap<(String, String), String> = found
        .iter()
        .filter_map(|r| r.records.first().map(|a| ((r.account.clone(), r.region.clone()), a.clone())))
        .collect();
    let amis = &amis;
    let mut promoted = ctx
        .each(|_ec2, t| async move {
            let Some(ami) = amis.get(&(t.account.clone(), t.region.clone())) else {
                anyhow::bail!("no AMI of {stream}/{leaf} here: left as it was")
            };
            let name = name_in(template, stream, leaf, &t)?;
            let at = &name;
            let ssm = ctx.aws.ssm(&t).await;
            let ssm = &ssm;
            let now = pointer::current(ssm, &name).await?;
            if now.as_ref().is_some_and(|v| &v.value == ami) {
                let row = ctx
                    .act("label", &name, format!("{ami} already; labelled {}", pointer::label(leaf)), || async move {
                        pointer::point(ssm, at, ami, leaf, ACCEPTED_WITHIN).await.map(drop)
                    })
                    .await?;
                return Ok(vec![row]);
            }
            let from = now.map_or_else(|| "nothing".to_owned(), |v| v.value);
            let row = ctx
                .act("point", &name, format!("{ami} (was {from}), labelled {}", pointer::label(leaf)), || async move {
                    pointer::point(ssm, at, ami, leaf, ACCEPTED_WITHIN).await.map(drop)
                })
                .await?;
            Ok(vec![row])
        })
        .await;
    // Under --partial the targets that lack the leaf keep the reason.
    for r in &mut promoted {
        if let Some(f) = found.iter().find(|f| f.account == r.account && f.region == r.region && f.error.is_some()) {
            r.error.clone_from(&f.error);
        }
    }
    promoted
}

/// `rollback STREAM`: point every target's pointer back at the AMI it held
/// before its current one: the newest older version with another value.
pub async fn rollback(ctx: &Ctx<'_>, template: &Template, stream: &str) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let name = name_in(template, stream, "", &t)?;
        let ssm = ctx.aws.ssm(&t).await;
        let ssm = &ssm;
        let versions = pointer::history(ssm, &name).await?;
        let Some(now) = versions.last() else { anyhow::bail!("{name} is not there: nothing to roll back") };
        // A rollback is not rolled back: run twice (a retried job), it
        // would put back what the first took away.
        if let Some(from) = now.rolled_back_from() {
            let why = format!("rolled back already (from {from}); `promote` moves it on");
            return Ok(vec![Acted::kept(&name, &why)]);
        }
        let Some(before) = pointer::rollback_target(&versions) else {
            anyhow::bail!("{name} has pointed at {} in every version: nothing to roll back to", now.value)
        };
        let ami = before.value.clone();
        let Some(img) = image(&ec2, &ami).await? else {
            anyhow::bail!("{name} version {} points at {ami}, which is no longer here: not rolled back", before.version)
        };
        let leaf = tags::value(img.tags(), tags::LEAF).map(str::to_owned);
        let description = format!("{}{}", pointer::ROLLBACK_FROM, now.value);
        let (ami, leaf, at, description) = (&ami, leaf.as_deref(), &name, &description);
        let detail =
            format!("{ami} (leaf {}, version {}), from {}", leaf.unwrap_or("unknown"), before.version, now.value);
        let row = ctx
            .act("point back", &name, detail, || async move {
                pointer::point_as(ssm, at, ami, leaf, Some(description), ACCEPTED_WITHIN).await.map(drop)
            })
            .await?;
        Ok(vec![row])
    })
    .await
}

row! {
    /// Where one target's pointer is.
    pub struct PointerRow {
        columns { parameter: String, version: Option<u64>, ami: Option<String>, leaf: Option<String>, state: String }
        extra { labels: Vec<String> }
    }
}

/// `list-pointers STREAM`: every target's pointer: its version, AMI and
/// leaf (from the AMI's tags). A pointer at an AMI that is gone fails its
/// target; a target whose leaf differs from the one most targets point at
/// says so.
pub async fn list_pointers(ctx: &Ctx<'_>, template: &Template, stream: &str) -> Vec<Report<PointerRow>> {
    let mut reports = ctx
        .each(|ec2, t| async move {
            let name = name_in(template, stream, "", &t)?;
            let ssm = ctx.aws.ssm(&t).await;
            let versions = pointer::history(&ssm, &name).await?;
            let Some(now) = versions.last() else {
                return Ok(vec![PointerRow { parameter: name, state: "not set".into(), ..PointerRow::default() }]);
            };
            let img = image(&ec2, &now.value).await?;
            let leaf = img.as_ref().and_then(|i| tags::value(i.tags(), tags::LEAF)).map(str::to_owned);
            let state = match &img {
                None => format!("AMI {} is not here", now.value),
                Some(i) if i.state().map(|s| s.as_str()) != Some("available") => {
                    format!("AMI is {}", i.state().map_or("unknown", |s| s.as_str()))
                }
                Some(_) => "ok".into(),
            };
            Ok(vec![PointerRow {
                parameter: name,
                version: u64::try_from(now.version).ok(),
                ami: Some(now.value.clone()),
                leaf,
                state,
                labels: now.labels.clone(),
            }])
        })
        .await;
    // The leaf most targets point at; the others disagree.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &reports {
        for row in r.records.iter().filter(|row| row.state == "ok") {
            *counts.entry(row.leaf.clone().unwrap_or_default()).or_default() += 1;
        }
    }
    let most = counts.iter().max_by_key(|(_, n)| **n).map(|(l, _)| l.clone());
    for r in &mut reports {
        for row in &mut r.records {
            if row.state == "ok"
                && counts.len() > 1
                && row.leaf.clone().unwrap_or_default() != most.clone().unwrap_or_default()
            {
                row.state = format!("disagrees: most targets point at leaf {}", most.as_deref().unwrap_or("?"));
            }
            if row.state.starts_with("AMI ") && r.error.is_none() {
                r.error = Some(format!("{} points at {}", row.parameter, row.state));
            }
        }
    }
    reports
}
