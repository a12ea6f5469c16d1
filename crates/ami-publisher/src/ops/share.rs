//! `share` and `unshare` over results files: launch permissions on the
//! AMIs, and read access to their snapshots for accounts. The calls are
//! [`crate::sharing`]'s; here is which permissions each target's AMIs get
//! or lose, as rows.

use anyhow::Context as _;

use crate::{
    allowed, keys, retry,
    sharing::{self, Grantees, Permission},
};

use super::{Acted, AmiMap, Ctx, Report, images::ListedAmi};

/// `share RESULTS...`: give every AMI (and, for accounts, its snapshot)
/// the permissions `grantees` need that it lacks.
///
/// Each snapshot's key is checked first ([`keys::check`]): a target whose
/// AMIs are under the AWS managed key, or under a key whose policy does not
/// let the accounts use it, fails before anything in it changes; so does
/// one whose AMIs an account's Allowed AMIs settings would hide from it
/// ([`allowed::check`]).
pub async fn share(ctx: &Ctx<'_>, grantees: &Grantees, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        let listed = amis.get(&t).map(Vec::as_slice).unwrap_or_default();
        let kms = ctx.aws.kms(&t).await;
        if !grantees.accounts.is_empty() && !listed.is_empty() {
            let ids: Vec<String> = listed.iter().map(|a| a.ami.clone()).collect();
            let found =
                retry::call("DescribeImages", None, || ec2.describe_images().set_image_ids(Some(ids.clone())).send())
                    .await?;
            for img in found.images() {
                let (id, name) = (img.image_id().unwrap_or_default(), img.name().unwrap_or_default());
                let age = allowed::Age::of(img, std::time::SystemTime::now());
                for f in allowed::check(ctx.aws, &t, name, age, grantees).await? {
                    anyhow::ensure!(!f.refused, "{id} cannot be shared as asked; nothing was changed here: {}", f.line);
                    if !f.line.ends_with(", admitted") {
                        tracing::warn!(ami = %id, "{}", f.line);
                    }
                }
            }
        }
        for a in listed {
            for snapshot in snapshots(a) {
                let found = retry::call(&format!("DescribeSnapshots {snapshot}"), None, || {
                    ec2.describe_snapshots().snapshot_ids(&snapshot).send()
                })
                .await?;
                let Some(key) = found.snapshots().first().and_then(|s| s.kms_key_id()) else { continue };
                let checked = keys::check(&kms, key, grantees)
                    .await
                    .map_err(anyhow::Error::new)
                    .with_context(|| format!("{} cannot be shared as asked; nothing was changed here", a.ami))?;
                for u in checked.unchecked {
                    tracing::warn!(ami = %a.ami, "{u}");
                }
            }
        }
        for a in listed {
            for (p, holds) in sharing::held(&ec2, &a.ami, &snapshots(a), grantees, None).await? {
                out.push(if holds {
                    already(&p, "shared already")
                } else {
                    ctx.act("share", p.resource(), p.detail(), || sharing::change(&ec2, &p, true, None, false)).await?
                });
            }
        }
        Ok(out)
    })
    .await
}

/// `unshare RESULTS...`: take back the permissions of `grantees`, or, when
/// none are given, those each results file says its AMI was shared with.
/// Permissions given to anyone else stay.
pub async fn unshare(ctx: &Ctx<'_>, grantees: &Grantees, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for a in amis.get(&t).map(Vec::as_slice).unwrap_or_default() {
            let whom = if grantees.is_empty() { &a.shared_with } else { grantees };
            if whom.is_empty() {
                out.push(Acted {
                    action: "nothing to take back".to_owned(),
                    resource: a.ami.clone(),
                    detail: "the results file records no sharing; name the grantees with --share-with-*".to_owned(),
                });
                continue;
            }
            // The AMI first: no one launches it while its snapshot is still readable.
            let mut held = sharing::held(&ec2, &a.ami, &snapshots(a), whom, None).await?;
            held.sort_by_key(|(p, _)| matches!(p, Permission::CreateVolume { .. }));
            for (p, holds) in held {
                out.push(if holds {
                    ctx.act("unshare", p.resource(), p.detail(), || sharing::change(&ec2, &p, false, None, false))
                        .await?
                } else {
                    already(&p, "not shared")
                });
            }
        }
        Ok(out)
    })
    .await
}

fn snapshots(a: &ListedAmi) -> Vec<String> {
    a.snapshot.iter().cloned().collect()
}

fn already(p: &Permission, what: &str) -> Acted {
    Acted { action: what.to_owned(), resource: p.resource().to_owned(), detail: p.detail() }
}
