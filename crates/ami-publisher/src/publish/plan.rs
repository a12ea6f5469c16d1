//! `publish --dry-run`: what a publish would do in each target, found by
//! reads only, with EC2's DryRun asking whether each write it would make
//! is allowed. Nothing is made, started, attached, bound or shared.
//!
//! Per target: the key (checked before, as for a real run); the AMI of
//! this leaf that would be reused, or the snapshot an interrupted run left
//! that would be registered, or else the unpacker (reachable?), the
//! stream's volume (reused, grown, a free one, or made) and the bytes the
//! unpacker would write (from the manifests of the leaf the volume holds
//! and of this one); the AMI name; the permissions sharing would add. A
//! real run right after does what the plan says (a test holds them equal).

use serde::Serialize;

use aws_sdk_ec2::{Client, types::ResourceType};
use image_format::{ImageName, Manifest};
use unpacker_client as uc;

use crate::{progress::Line, sharing, tags, targets::Target};

use super::{
    Options,
    existing::{find_ami, find_snapshot, find_tagged},
};

/// What a publish would do in one target.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TargetPlan {
    pub account: String,
    pub region: String,
    /// The key (ARN) volumes and snapshots would be encrypted with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<String>,
    /// `reuse` (an AMI of the leaf is there), `register` (a snapshot an
    /// interrupted run left), `make`, or `skip` (no unpacker, and allowed).
    pub ami: String,
    /// The AMI reused, or the snapshot registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<String>,
    /// The unpacker instance and what it would need: `running`, `start`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unpacker: Option<String>,
    /// `--via ebs-direct`: the snapshot the new one would start from (or
    /// none), or the unfinished one it would resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// `reuse VOL`, `grow VOL to N GiB`, `use free VOL`, `make N GiB`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Bytes the unpacker (or, with --via ebs-direct, PutSnapshotBlock)
    /// would write (changed chunks and chunks that become zero); None when
    /// the volume's content is not known (it is scanned first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_write: Option<u64>,
    /// The name the AMI would get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ami_name: Option<String>,
    /// Permissions sharing would add ("launch: account ...").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<String>,
    /// What the Allowed AMIs settings of each account it would be shared
    /// with say of the AMI.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_amis: Vec<String>,
    /// What the AMI would be given (--deprecate-in, --deregistration-protection).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gives: Vec<String>,
    /// The fleet's pointer (--ssm-parameter): where it points now, and
    /// whether the run would move it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// Each write EC2 was asked about with DryRun: "CreateVolume: allowed".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// Why this target could not be planned (or would fail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The plan of every target, at most `max_concurrency` at once.
pub async fn plan(
    aws: &crate::aws::Aws,
    targets: &[Target],
    o: &Options,
    manifest: &Manifest,
    images: &image_client::Client,
    max_concurrency: usize,
    board: &crate::progress::Board,
) -> Vec<TargetPlan> {
    crate::fanout(targets, max_concurrency, |t| async move {
        let line = board.line(&t.to_string());
        let ec2 = aws.ec2(&t).await;
        let mut p = TargetPlan { account: t.account.clone(), region: t.region.clone(), ..TargetPlan::default() };
        match o.keys.get(&t) {
            Some(Err(e)) => p.error = Some(e.clone()),
            _ => {
                p.kms_key = o.key_arn(&t);
                p.allowed_amis = o.allowed.get(&t).cloned().unwrap_or_default();
                // The region must be enabled in the account (DescribeRegions
                // lists those), or every call there fails.
                let enabled = match aws.enabled_regions(&t.account).await {
                    Ok(regions) if regions.contains(&t.region) => Ok(()),
                    Ok(_) => Err(anyhow::anyhow!("region {} is not enabled in this account", t.region)),
                    Err(e) => Err(e),
                };
                let planned = match enabled {
                    Ok(()) => plan_one(&ec2, &t, o, manifest, images.clone(), &line, &mut p).await,
                    Err(e) => Err(e),
                };
                if planned.is_ok() && p.ami != "skip" {
                    p.gives = gives(o, p.ami == "reuse");
                }
                let planned = match (planned, &o.ssm_parameter) {
                    (Ok(()), Some(template)) if p.ami != "skip" => plan_pointer(aws, &t, o, template, &mut p).await,
                    (planned, _) => planned,
                };
                if let Err(e) = planned {
                    p.error = Some(format!("{e:#}"));
                }
            }
        }
        line.finish(match &p.error {
            None => format!("would {}", p.ami),
            Some(e) => format!("FAILED: {e}"),
        });
        p
    })
    .await
}

/// What a run would give the AMI: a deprecation time and protection.
fn gives(o: &Options, reused: bool) -> Vec<String> {
    let n = &o.settings.new_amis;
    let mut out = Vec::new();
    if let Some(d) = n.deprecate_in {
        let at = crate::tags::rfc3339(std::time::SystemTime::now() + d);
        out.push(if reused {
            format!("deprecation at {at}, unless it has a time")
        } else {
            format!("deprecation at {at}")
        });
    }
    if let Some(mode) = n.protection {
        let wanted = crate::lifecycle::Protection::On { cooldown: mode == crate::lifecycle::ProtectionMode::Cooldown };
        out.push(format!("deregistration protection {wanted}"));
    }
    out
}

/// Where the fleet's pointer is, and what the run would do to it.
async fn plan_pointer(
    aws: &crate::aws::Aws,
    t: &Target,
    o: &Options,
    template: &crate::pointer::Template,
    p: &mut TargetPlan,
) -> anyhow::Result<()> {
    let name = template.render(&o.stream, &o.leaf, &t.account, &t.region).map_err(anyhow::Error::msg)?;
    let now = crate::pointer::current(&aws.ssm(t).await, &name).await?;
    let label = crate::pointer::label(&o.leaf);
    p.pointer = Some(match (now, p.existing.as_deref()) {
        (Some(v), Some(ami)) if p.ami == "reuse" && v.value == ami => {
            format!("{name} holds {ami} already (version {}); would label it {label}", v.version)
        }
        (Some(v), _) => {
            format!("{name} at {} (version {}): would point at the AMI, labelled {label}", v.value, v.version)
        }
        (None, _) => format!("{name} is not there: would create it, pointing at the AMI, labelled {label}"),
    });
    Ok(())
}

/// Whether EC2 says a DryRun request would be allowed.
fn dry_run_answer<E: aws_sdk_ec2::error::ProvideErrorMetadata>(action: &str, r: Result<impl Sized, E>) -> String {
    match r {
        Ok(_) => format!("{action}: allowed (EC2 acted on a DryRun?)"),
        Err(e) => match e.code() {
            Some("DryRunOperation") => format!("{action}: allowed"),
            Some("UnauthorizedOperation") => format!("{action}: REFUSED by IAM"),
            other => format!("{action}: not known ({})", other.unwrap_or("no answer")),
        },
    }
}

async fn plan_one(
    ec2: &Client,
    t: &Target,
    o: &Options,
    manifest: &Manifest,
    mut images: image_client::Client,
    line: &Line,
    p: &mut TargetPlan,
) -> anyhow::Result<()> {
    line.step("looking for an existing AMI");
    let tagged = if o.force { super::existing::Tagged::default() } else { find_tagged(ec2, o).await? };
    if let Some(img) = find_ami(ec2, o, &tagged).await? {
        let ami = img.image_id().unwrap_or_default().to_owned();
        p.ami = "reuse".into();
        p.existing = Some(ami.clone());
        p.ami_name = img.name().map(str::to_owned);
        let snap = match super::register::root_snapshot(&img) {
            Some(s) => Some(s.to_owned()),
            None => find_snapshot(ec2, o, &tagged).await?.map(|(s, _)| s),
        };
        return plan_shares(ec2, o, &ami, snap, p).await;
    }
    p.ami_name = Some(if o.force { super::register::dated_name(&o.ami_name) } else { o.ami_name.clone() });
    let left_over = find_snapshot(ec2, o, &tagged).await?;
    if let (Some(d), Some((snap, _))) = (&o.direct, &left_over)
        && super::direct::unfinished(ec2, snap).await?
    {
        // The real run resumes it by its client token and writes every
        // block it needs again.
        p.ami = "make".into();
        p.existing = Some(snap.clone());
        plan_direct(ec2, t, o, d, Some(snap), p).await?;
        p.parent =
            Some(format!("resume {snap}, left unfinished by an earlier run ({})", p.parent.take().unwrap_or_default()));
        return plan_shares_new(o, p);
    }
    if let Some((snap, gib)) = left_over {
        p.ami = "register".into();
        let name = p.ami_name.clone().unwrap_or_default();
        let r = super::register::request(ec2, o, &name, &snap, gib).dry_run(true).send().await;
        p.permissions.push(dry_run_answer("RegisterImage", r));
        p.existing = Some(snap);
        return plan_shares_new(o, p);
    }
    if let Some(d) = &o.direct {
        p.ami = "make".into();
        line.step("looking for a parent snapshot");
        plan_direct(ec2, t, o, d, None, p).await?;
        return plan_shares_new(o, p);
    }
    line.step("finding the unpacker");
    let found = o.settings.unpackers(ec2).await?;
    let Some(inst) = found.first() else {
        if o.ignore_missing_unpackers {
            p.ami = "skip".into();
            return Ok(());
        }
        anyhow::bail!("no instance tagged Name={} in {t}", o.settings.instance_name);
    };
    p.ami = "make".into();
    if inst.state != "running" {
        p.unpacker = Some(format!("start {}", inst.instance_id));
        let r = ec2.start_instances().instance_ids(&inst.instance_id).dry_run(true).send().await;
        p.permissions.push(dry_run_answer("StartInstances", r));
        // A stopped unpacker cannot be asked what it holds.
        p.volume = Some("known once the unpacker runs".into());
        return plan_shares_new(o, p);
    }
    p.unpacker = Some(format!("running {}", inst.instance_id));
    line.step("asking the unpacker");
    let mut c = o.settings.dial(inst, o.settings.timeouts.unpacker.min(std::time::Duration::from_secs(30))).await?;
    let status = c.get_status(uc::GetStatusRequest {}).await?.into_inner();
    let spec = o.volume_spec(t);
    let size_of = |vol: &str| status.devices.iter().find(|d| d.volume_id == vol).map_or(0, |d| d.size_bytes);
    let mut bound = status.streams.iter().find(|s| s.stream == o.stream);
    let mut replaced = None;
    if let Some(b) = bound
        && spec.other_key(ec2, &b.volume_id).await?
    {
        // Replaced by a new volume under the target's key, as the real run does.
        replaced = Some(b.volume_id.clone());
        bound = None;
    }
    let mut free = Vec::new();
    for d in status.devices.iter().filter(|d| d.stream.is_empty() && d.size_bytes >= spec.need_bytes) {
        if replaced.is_none() && !spec.other_key(ec2, &d.volume_id).await? {
            free.push(d);
        }
    }
    let volume = match bound {
        Some(b) if size_of(&b.volume_id) >= spec.need_bytes => {
            p.volume = Some(format!("reuse {}", b.volume_id));
            Some(b.volume_id.clone())
        }
        Some(b) => {
            p.volume = Some(format!("grow {} to {} GiB", b.volume_id, spec.gib()));
            Some(b.volume_id.clone())
        }
        None => match free.into_iter().min_by_key(|d| d.size_bytes) {
            Some(free) => {
                p.volume = Some(format!("use free {}", free.volume_id));
                Some(free.volume_id.clone())
            }
            None => {
                p.volume = Some(match &replaced {
                    Some(old) => format!("make {} GiB, replacing {old} (encrypted with another key)", spec.gib()),
                    None => format!("make {} GiB", spec.gib()),
                });
                let r = ec2
                    .create_volume()
                    .availability_zone(&inst.availability_zone)
                    .size(spec.gib())
                    .volume_type(spec.volume_type.clone())
                    .encrypted(true)
                    .set_kms_key_id(spec.kms_key_id.clone())
                    .tag_specifications(tags::spec(
                        ResourceType::Volume,
                        &[(tags::STREAM.to_owned(), o.stream.clone())],
                    ))
                    .dry_run(true)
                    .send()
                    .await;
                p.permissions.push(dry_run_answer("CreateVolume", r));
                None
            }
        },
    };
    // What the unpacker would write: from the leaf the volume holds (a new
    // volume holds zeros; a free one is scanned first, so not known).
    p.bytes_to_write = match bound {
        Some(b) if !b.leaf.is_empty() => {
            let held = ImageName::new(&o.stream, &b.leaf)?;
            let (_, old) = image_client::get_manifest(&mut images, &held).await?;
            Some(bytes_to_write(manifest, Some(&old)))
        }
        Some(_) => None,
        None if volume.is_none() => Some(bytes_to_write(manifest, None)),
        None => None,
    };
    if let Some(v) = &volume {
        let r = ec2
            .create_snapshot()
            .volume_id(v)
            .tag_specifications(tags::spec(ResourceType::Snapshot, &o.identity_tags()))
            .dry_run(true)
            .send()
            .await;
        p.permissions.push(dry_run_answer("CreateSnapshot", r));
    }
    plan_shares_new(o, p)
}

/// `--via ebs-direct`: the snapshot the new one would start from, and the
/// bytes it would put. EBS's direct APIs have no DryRun: whether IAM allows
/// them is not asked.
async fn plan_direct(
    ec2: &Client,
    t: &Target,
    o: &Options,
    d: &super::Direct,
    resume: Option<&str>,
    p: &mut TargetPlan,
) -> anyhow::Result<()> {
    let key = o.key_arn(t);
    let tagged = match resume {
        Some(u) => super::direct::tagged_parent(ec2, d, o, u).await?,
        None => None,
    };
    let parent = match tagged {
        Some(parent) => parent,
        None => super::direct::find_parent(ec2, d, o, key.as_deref()).await?,
    };
    let blocks = super::direct::blocks_to_put(&d.manifest, parent.as_ref().map(|pa| &pa.manifest));
    p.bytes_to_write = Some(blocks.len() as u64 * u64::from(super::direct::BLOCK));
    p.parent = Some(match &parent {
        Some(pa) => format!("{} (leaf {}): only the blocks that differ", pa.snapshot, pa.leaf),
        None => "none: a new snapshot under the target's key, every block written".to_owned(),
    });
    Ok(())
}

/// Bytes an unpack writes to turn a device holding `from` (None: zeros)
/// into `to`: the chunks it fetches, and those that become zero.
pub fn bytes_to_write(to: &Manifest, from: Option<&Manifest>) -> u64 {
    let diff = to.diff_from(from);
    diff.fetch.iter().map(|(i, _)| *i).chain(diff.zero.iter().copied()).map(|i| to.chunk_len(i) as u64).sum()
}

/// Every permission sharing would add to an AMI made by this run.
fn plan_shares_new(o: &Options, p: &mut TargetPlan) -> anyhow::Result<()> {
    for g in o.shares.each() {
        p.shares.push(format!("launch: {g}"));
        if let sharing::Grantee::Account(a) = g {
            p.shares.push(format!("copy (create volumes): account {a}"));
        }
    }
    Ok(())
}

/// The permissions sharing would add to an AMI that is there, and whether
/// EC2 would allow each change (DryRun).
async fn plan_shares(
    ec2: &Client,
    o: &Options,
    ami: &str,
    snap: Option<String>,
    p: &mut TargetPlan,
) -> anyhow::Result<()> {
    if o.shares.is_empty() {
        return Ok(());
    }
    let snaps: Vec<String> = snap.into_iter().collect();
    for (perm, holds) in sharing::held(ec2, ami, &snaps, &o.shares, None).await? {
        if holds {
            continue;
        }
        p.shares.push(perm.detail());
        let action = match perm {
            sharing::Permission::Launch { .. } => "ModifyImageAttribute",
            sharing::Permission::CreateVolume { .. } => "ModifySnapshotAttribute",
        };
        let answer = match sharing::change(ec2, &perm, true, None, true).await {
            Ok(()) => format!("{action} on {}: allowed (EC2 acted on a DryRun?)", perm.resource()),
            Err(e) => {
                let text = format!("{e:#}");
                if text.contains("DryRunOperation") {
                    format!("{action} on {}: allowed", perm.resource())
                } else if text.contains("UnauthorizedOperation") {
                    format!("{action} on {}: REFUSED by IAM", perm.resource())
                } else {
                    format!("{action} on {}: not known ({text})", perm.resource())
                }
            }
        };
        p.permissions.push(answer);
    }
    Ok(())
}
