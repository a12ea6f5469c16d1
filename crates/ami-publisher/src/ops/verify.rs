//! `verify`: the bytes behind each AMI of results files (or of `--leaf`)
//! against its image's chunks, and each pair of leaves of one stream in a
//! target against their manifests' difference ([`crate::verify`]).

use crate::verify::{self, Changes, Checked, Sample, Subject};

use super::{AmiMap, Ctx, Report, output::row};

row! {
    /// One AMI's bytes against its image, or two leaves' snapshots
    /// against their manifests' difference.
    pub struct VerifyRow {
        columns {
            ami: String,
            leaf: String,
            snapshot: String,
            checked: String,
            result: String,
        }
        extra {
            stream: String,
            /// False when the bytes differ, a block is missing from the
            /// changes, or the AMI could not be read.
            ok: bool,
            bytes: Option<Checked>,
            changes: Option<Changes>,
        }
    }
}

/// Verify every AMI of `amis` and of `leaves` in each target; a target
/// with any AMI that fails verification fails, naming the first.
pub async fn verify(
    ctx: &Ctx<'_>,
    images: &image_client::Client,
    amis: &AmiMap,
    leaves: &[(String, String)],
    sample: Sample,
) -> Vec<Report<VerifyRow>> {
    let mut reports = ctx
        .each(|ec2, t| async move {
            let ebs = ctx.aws.ebs(&t).await;
            let mut ids = super::lifecycle::ami_ids(&ec2, amis, &t, leaves).await?;
            let mut seen = std::collections::HashSet::new();
            ids.retain(|id| seen.insert(id.clone()));
            let mut rows = Vec::new();
            let mut read: Vec<(Subject, image_format::Manifest)> = Vec::new();
            for id in &ids {
                let line = ctx.board.line(&format!("{t} {id}"));
                line.step("reading its snapshot's blocks");
                let checked = async {
                    let s = verify::subject(&ec2, id).await?;
                    let m = verify::manifest(images, &s).await?;
                    let c = verify::bytes(&ebs, &s, &m, sample).await;
                    anyhow::Ok((s, m, c?))
                }
                .await;
                let row = match checked {
                    Ok((s, m, c)) => {
                        let row = bytes_row(&s, &c);
                        read.push((s, m));
                        row
                    }
                    Err(e) => VerifyRow { ami: id.clone(), result: format!("FAILED: {e:#}"), ..VerifyRow::default() },
                };
                line.finish(row.result.clone());
                rows.push(row);
            }
            // Leaves of one stream, oldest AMI first: each against the next.
            read.sort_by(|a, b| (&a.0.stream, &a.0.created).cmp(&(&b.0.stream, &b.0.created)));
            for pair in read.windows(2).filter(|p| p[0].0.stream == p[1].0.stream && p[0].0.image_id != p[1].0.image_id)
            {
                let ((o, om), (n, nm)) = (&pair[0], &pair[1]);
                let row = match verify::changes(&ebs, (o, om), (n, nm)).await {
                    Ok(c) => changes_row(o, n, c),
                    Err(e) => VerifyRow {
                        ami: n.ami.clone(),
                        leaf: format!("{} -> {}", o.leaf, n.leaf),
                        result: format!("FAILED: {e:#}"),
                        stream: n.stream.clone(),
                        ..VerifyRow::default()
                    },
                };
                rows.push(row);
            }
            Ok(rows)
        })
        .await;
    for r in &mut reports {
        if r.error.is_none()
            && let Some(bad) = r.records.iter().find(|row| !row.ok)
        {
            r.error = Some(format!("{} ({}): {}", bad.ami, bad.leaf, bad.result));
        }
    }
    reports
}

fn bytes_row(s: &Subject, c: &Checked) -> VerifyRow {
    let result = match &c.difference {
        None => "ok: the image's bytes".to_owned(),
        Some(d) => format!("DIFFERS: {d}"),
    };
    VerifyRow {
        ami: s.ami.clone(),
        leaf: s.leaf.clone(),
        snapshot: s.snapshot.clone(),
        checked: format!("{} of {} chunks, {} blocks read", c.chunks_checked, c.chunks, c.blocks_read),
        result,
        stream: s.stream.clone(),
        ok: c.difference.is_none(),
        bytes: Some(c.clone()),
        changes: None,
    }
}

fn changes_row(o: &Subject, n: &Subject, c: Changes) -> VerifyRow {
    let (checked, result, ok) = match &c {
        Changes::Unrelated => {
            (String::new(), "changes not compared: EBS knows them as unrelated snapshots".into(), true)
        }
        Changes::NotBlockSized => (String::new(), "changes not compared: chunks are not 512 KiB blocks".into(), true),
        Changes::Compared { listed, differ, missing, unchanged_listed } => (
            format!("{listed} blocks listed as changed, {differ} differ"),
            match missing {
                None => format!("ok: every differing block is listed ({unchanged_listed} listed are unchanged)"),
                Some(b) => format!("MISSING: block {b} differs between the leaves, but EBS lists it as unchanged"),
            },
            missing.is_none(),
        ),
    };
    VerifyRow {
        ami: n.ami.clone(),
        leaf: format!("{} -> {}", o.leaf, n.leaf),
        snapshot: format!("{} -> {}", o.snapshot, n.snapshot),
        checked,
        result,
        stream: n.stream.clone(),
        ok,
        bytes: None,
        changes: Some(c),
    }
}
