//! `share` and `unshare` over results files: launch permissions on the
//! AMIs, and read access to their snapshots for accounts. The calls are
//! [`crate::sharing`]'s; here is which permissions each target's AMIs get
//! or lose, as rows.

use crate::sharing::{self, Grantees, Permission};

use super::{Acted, AmiMap, Ctx, Report, images::ListedAmi};

/// `share RESULTS...`: give every AMI (and, for accounts, its snapshot)
/// the permissions `grantees` need that it lacks.
pub async fn share(ctx: &Ctx<'_>, grantees: &Grantees, amis: &AmiMap) -> Vec<Report<Acted>> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for a in amis.get(&t).map(Vec::as_slice).unwrap_or_default() {
            for (p, holds) in sharing::held(&ec2, &a.ami, &snapshots(a), grantees, None).await? {
                out.push(if holds {
                    already(&p, "shared already")
                } else {
                    ctx.act("share", p.resource(), p.detail(), || sharing::change(&ec2, &p, true, None)).await?
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
                    ctx.act("unshare", p.resource(), p.detail(), || sharing::change(&ec2, &p, false, None)).await?
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
