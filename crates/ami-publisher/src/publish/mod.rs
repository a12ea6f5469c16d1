//! `publish STREAM LEAF`: the image as an AMI in every target.
//!
//! Per target: an AMI of this leaf already there is reported, not remade
//! (unless forced); a snapshot of it left by an interrupted run is
//! registered; otherwise the unpacker instance is found (and started), the
//! stream's volume brought to the leaf writing only what changed, read back,
//! snapshotted, and the snapshot registered as an AMI. AMI and snapshot are
//! tagged with the stream, leaf and image id.
//!
//! By phase: [`existing`] (what a target already has: the AMI, or a
//! snapshot an interrupted run left), [`capture`] (the unpacker's part:
//! unpack, read back, snapshot under the capture hold), [`register`]
//! (waiting for the snapshot, registering and waiting for the AMI), and
//! [`plan`] (`--dry-run`: what each target would do, by reads and DryRun).

use std::time::{Instant, SystemTime};

use anyhow::Context as _;

use aws_sdk_ec2::{
    Client,
    types::{ArchitectureValues, BootModeValues, ImageState, ImdsSupportValues, TpmSupportValues, VolumeType},
};

use crate::{
    aws::Aws,
    errors::SdkResultExt as _,
    progress::{Board, Line},
    results::{PublishResults, TargetResult},
    retry::{self},
    settings::Settings,
    sharing::{self, Grantees},
    tags,
    targets::Target,
};

mod capture;
mod direct;
mod existing;
mod plan;
mod register;
mod shared;

pub use self::direct::{BLOCK, Direct, blocks_to_put, described as described_snapshot};
pub use self::plan::{TargetPlan, bytes_to_write, plan};
pub use self::register::{dated_name, root_snapshot};
pub use self::shared::{KEPT_BYTES, SharedChunks};

use self::{
    capture::unpack_and_snapshot,
    existing::{Tagged, find_ami, find_snapshot, find_tagged},
    register::{deregister_failed, wait_image, wait_snapshot},
};
use crate::ready::is_failed_end;

/// How many times a snapshot that ended in `error`, and an AMI that ended
/// `failed`, is made again before the target fails: a resource that fails
/// again and again points at a cause a retry does not fix (a KMS key, a
/// quota).
const FAILED_ENDS: u32 = 2;

/// Everything a publish needs to know, settled before any target starts.
#[derive(Debug, Clone)]
pub struct Options {
    pub stream: String,
    pub leaf: String,
    /// Hex image id (manifest digest), from the imageserver.
    pub image_id: String,
    pub image_size: u64,
    /// The unpackers and the timeouts, as every operation has them.
    pub settings: Settings,
    /// Extra tags for AMI and snapshot (`--tags`).
    pub tags: Vec<(String, String)>,
    /// `ExpiresAt` value, RFC 3339.
    pub expires_at: Option<String>,
    pub ami_name: String,
    pub description: String,
    pub force: bool,
    pub ena_support: bool,
    pub sriov_net_support: bool,
    pub architecture: ArchitectureValues,
    pub boot_mode: Option<BootModeValues>,
    pub tpm_support: Option<TpmSupportValues>,
    /// Base64 of the UEFI variable store (`--uefi-data`).
    pub uefi_data: Option<String>,
    pub imds_support: Option<ImdsSupportValues>,
    pub root_device_name: String,
    pub volume_type: VolumeType,
    pub min_free_bytes: u64,
    pub ignore_missing_unpackers: bool,
    /// Whom the AMI is shared with (`--share-with-*`).
    pub shares: Grantees,
    /// Each target's KMS key (ARN), as checked before the run, or why it
    /// could not be checked (the target then fails at once).
    pub keys: std::collections::HashMap<Target, Result<String, String>>,
    /// What each target's shared accounts' Allowed AMIs settings say of
    /// the AMI, as checked before the run (`crate::allowed::preflight`).
    pub allowed: std::collections::HashMap<Target, Vec<String>>,
    /// The fleet's pointer to set in each target (`--ssm-parameter`).
    pub ssm_parameter: Option<crate::pointer::Template>,
    /// `--via ebs-direct`: snapshots made with the EBS direct APIs, no
    /// unpacker.
    pub direct: Option<Direct>,
    /// `--verify`: the leaf's manifest, to read each target's snapshot
    /// back against.
    pub verify: Option<std::sync::Arc<image_format::Manifest>>,
}

impl Options {
    /// Tags that identify this leaf's AMI and snapshot.
    fn identity_tags(&self) -> Vec<(String, String)> {
        let mut t = vec![
            (tags::STREAM.to_owned(), self.stream.clone()),
            (tags::LEAF.to_owned(), self.leaf.clone()),
            (tags::DIGEST.to_owned(), self.image_id.clone()),
        ];
        t.extend(self.tags.iter().cloned());
        t
    }

    /// The key (ARN) checked for `t` before the run, if its check passed.
    fn key_arn(&self, t: &Target) -> Option<String> {
        self.keys.get(t).and_then(|k| k.as_ref().ok()).cloned()
    }

    /// What the stream's volume in `t` must be.
    fn volume_spec(&self, t: &Target) -> crate::volumes::VolumeSpec {
        crate::volumes::VolumeSpec {
            stream: self.stream.clone(),
            need_bytes: self.image_size.saturating_add(self.min_free_bytes),
            volume_type: self.volume_type.clone(),
            kms_key_id: self.settings.keys.for_target(t).map(str::to_owned),
            key_arn: self.key_arn(t),
            instance_name: self.settings.instance_name.clone(),
            timeout: self.settings.timeouts.volume,
        }
    }

    /// All tags of the finished AMI and snapshot.
    fn final_tags(&self, name: &str) -> Vec<(String, String)> {
        let mut t = vec![(tags::NAME.to_owned(), name.to_owned())];
        t.extend(self.identity_tags());
        if let Some(e) = &self.expires_at {
            t.push((tags::EXPIRES_AT.to_owned(), e.clone()));
        }
        t
    }
}

/// Publish to every target, at most `max_concurrency` at once.
pub async fn publish(
    aws: &Aws,
    targets: &[Target],
    opts: &Options,
    max_concurrency: usize,
    board: &Board,
) -> PublishResults {
    let started = SystemTime::now();
    let results = crate::fanout(targets, max_concurrency, |t| async move {
        let line = board.line(&t.to_string());
        let ec2 = aws.ec2(&t).await;
        let kms = aws.kms(&t).await;
        let ssm = aws.ssm(&t).await;
        let ebs = if opts.direct.is_some() || opts.verify.is_some() { Some(aws.ebs(&t).await) } else { None };
        let mut r = publish_one(&ec2, ebs.as_ref(), &kms, &ssm, &t, opts, &line).await;
        if let Some(e) = &mut r.error
            && let Some(cause) = crate::errors::unauthorized_cause(&ec2, e).await
        {
            *e = format!("{e}; likely cause: {cause}");
        }
        match &r.error {
            None if r.skipped => line.finish("skipped: no unpacker"),
            None => line.finish(format!(
                "{} {}",
                r.ami_id.as_deref().unwrap_or("?"),
                if r.reused { "(already there)" } else { "done" }
            )),
            Some(e) => {
                tracing::error!(error = %e, "target failed");
                line.finish(format!("FAILED: {e}"));
            }
        }
        r
    })
    .await;
    PublishResults {
        stream: opts.stream.clone(),
        leaf: opts.leaf.clone(),
        image_id: opts.image_id.clone(),
        size_bytes: opts.image_size,
        started_at: tags::rfc3339(started),
        finished_at: tags::rfc3339(SystemTime::now()),
        targets: results,
    }
}

/// One target; never fails, the error goes into the result.
pub async fn publish_one(
    ec2: &Client,
    ebs: Option<&aws_sdk_ebs::Client>,
    kms: &aws_sdk_kms::Client,
    ssm: &aws_sdk_ssm::Client,
    t: &Target,
    o: &Options,
    line: &Line,
) -> TargetResult {
    let start = Instant::now();
    let mut r = TargetResult {
        account: t.account.clone(),
        region: t.region.clone(),
        kms_key: o.key_arn(t),
        size_bytes: o.image_size,
        image_id: o.image_id.clone(),
        ..TargetResult::default()
    };
    let mut done = match o.keys.get(t) {
        Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
        _ => run(ec2, ebs, t, o, line, &mut r).await,
    };
    if done.is_ok() && !o.shares.is_empty() {
        done = share(ec2, kms, o, line, &mut r).await;
    }
    if done.is_ok()
        && o.settings.new_amis.any()
        && let Some(ami) = r.ami_id.clone()
    {
        done = give(ec2, &ami, o, line, &mut r).await;
    }
    if done.is_ok()
        && o.ssm_parameter.is_some()
        && let Some(ami) = r.ami_id.clone()
    {
        done = point(ec2, ssm, &ami, t, o, line, &mut r).await;
    }
    if let Err(e) = done {
        r.error = Some(format!("{e:#}"));
    }
    r.seconds = start.elapsed().as_secs_f64();
    r
}

/// `--verify`: the target's snapshot read back and compared with the
/// image, before an AMI of it is registered (or, for an AMI that was there,
/// before it is shared, given or pointed at).
async fn verify(
    ec2: &Client,
    ebs: Option<&aws_sdk_ebs::Client>,
    snapshot: &str,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<()> {
    let (Some(m), Some(ebs)) = (&o.verify, ebs) else { return Ok(()) };
    line.step(format!("verifying the bytes of {snapshot}"));
    // What this run knows of the leaf, not the AMI's tags (there may be no
    // AMI yet, and EC2 may not show new tags yet).
    let s = crate::verify::Subject {
        ami: r.ami_id.clone().unwrap_or_default(),
        snapshot: snapshot.to_owned(),
        stream: o.stream.clone(),
        leaf: o.leaf.clone(),
        image_id: o.image_id.clone(),
        created: None,
        written_whole: crate::verify::written_whole(ec2, snapshot).await?,
    };
    let c = crate::verify::bytes(ebs, &s, m, crate::verify::Sample::ALL).await?;
    if let Some(d) = c.difference {
        anyhow::bail!("--verify: {snapshot} is not the image: {d}");
    }
    r.verified_chunks = Some(c.chunks_checked);
    tracing::info!(%snapshot, chunks = c.chunks_checked, blocks = c.blocks_read, "verified");
    Ok(())
}

/// Give the target's AMI its deprecation time and protection. A reused AMI
/// keeps a deprecation time it has.
async fn give(ec2: &Client, ami: &str, o: &Options, line: &Line, r: &mut TargetResult) -> anyhow::Result<()> {
    line.step("deprecation and protection");
    let found =
        if r.reused { crate::lifecycle::images(ec2, &[ami.to_owned()]).await?.into_iter().next() } else { None };
    let made = (!r.reused).then(Instant::now);
    let given = crate::lifecycle::give(ec2, ami, found.as_ref(), made, &o.settings.new_amis).await?;
    r.deprecation_time = given.deprecation_time;
    r.deregistration_protection = given.protection;
    Ok(())
}

/// How long Parameter Store may take to accept a new `aws:ec2:image`
/// version (it checks the AMI after PutParameter answers; seconds, as a
/// rule).
const POINTER_ACCEPTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// Point the fleet's pointer in this target at its AMI of the leaf.
async fn point(
    ec2: &Client,
    ssm: &aws_sdk_ssm::Client,
    ami: &str,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<()> {
    let Some(template) = &o.ssm_parameter else { return Ok(()) };
    let name = template.render(&o.stream, &o.leaf, &t.account, &t.region).map_err(anyhow::Error::msg)?;
    line.step(format!("pointing {name} at {ami}"));
    // Recorded first: a pointer that fails part-way is still named.
    r.ssm_parameter = Some(name.clone());
    // Publishing an older leaf again (to fill a new target, say) does not
    // move the fleet back: a pointer at a newer AMI of the stream stays.
    if r.reused
        && let Some(now) = crate::pointer::current(ssm, &name).await?
        && now.value != ami
    {
        let mut found = crate::lifecycle::images(ec2, &[now.value.clone(), ami.to_owned()]).await?;
        found.sort_by(|a, b| a.image_id().cmp(&b.image_id()));
        let held = found.iter().find(|i| i.image_id() == Some(now.value.as_str()));
        let ours = found.iter().find(|i| i.image_id() == Some(ami));
        if let (Some(held), Some(ours)) = (held, ours)
            && crate::tags::value(held.tags(), crate::tags::STREAM) == Some(o.stream.as_str())
            && held.creation_date() > ours.creation_date()
        {
            tracing::warn!(parameter = %name, held = %now.value, "left at a newer AMI of the stream; `promote` moves it");
            r.ssm_version = Some(now.version);
            return Ok(());
        }
    }
    let pointed = crate::pointer::point(ssm, &name, ami, &o.leaf, POINTER_ACCEPTED_WITHIN).await?;
    r.ssm_version = Some(pointed.version);
    tracing::info!(parameter = %name, version = pointed.version, wrote = pointed.wrote, %ami, "pointer set");
    Ok(())
}

/// Share the target's AMI (and its snapshot, with accounts) as
/// `--share-with-*` asks; only what is not shared yet is changed.
///
/// The key checked before the run is the one new volumes get; an AMI of
/// the leaf that was there already (or a snapshot an earlier run left) may
/// be under another, so the snapshot's own key is checked first when it
/// differs, and nothing is changed when it cannot be shared.
async fn share(
    ec2: &Client,
    kms: &aws_sdk_kms::Client,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<()> {
    let Some(ami) = r.ami_id.clone() else { return Ok(()) };
    line.step(format!("sharing with {}", o.shares.summary()));
    // An AMI this run made was seen available just now; EC2 may still be
    // catching up elsewhere.
    let fresh = (!r.reused).then(Instant::now);
    let snapshots: Vec<String> = r.snapshot_id.iter().cloned().collect();
    for snapshot in &snapshots {
        let found = retry::call(&format!("DescribeSnapshots {snapshot}"), fresh, || {
            ec2.describe_snapshots().snapshot_ids(snapshot).send()
        })
        .await?;
        let Some(key) = found.snapshots().first().and_then(|s| s.kms_key_id()).map(str::to_owned) else { continue };
        if r.kms_key.as_deref() != Some(key.as_str()) {
            crate::keys::check(kms, &key, &o.shares).await.map_err(anyhow::Error::new).with_context(|| {
                format!("{ami} is encrypted with {key}, not the target's key, and cannot be shared as asked; nothing was shared")
            })?;
            r.kms_key = Some(key);
        }
    }
    // Recorded before sharing: a share that fails part-way is still taken
    // back by `unshare` of this results file.
    r.shared_with = o.shares.clone();
    let added = sharing::share(ec2, &ami, &snapshots, &o.shares, fresh).await?;
    tracing::info!(%ami, added = added.len(), "shared with {}", o.shares.summary());
    Ok(())
}

async fn run(
    ec2: &Client,
    ebs: Option<&aws_sdk_ebs::Client>,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<()> {
    let tagged = if o.force {
        Tagged::default()
    } else {
        line.step("looking for an existing AMI");
        find_tagged(ec2, o).await?
    };
    let found = find_ami(ec2, o, &tagged).await?;
    if let Some(img) = found {
        let id = img.image_id().unwrap_or_default().to_owned();
        if img.state() == Some(&ImageState::Pending) {
            match wait_image(ec2, &id, Some(tagged.learned), o.settings.timeouts.image, line).await {
                Ok(()) => {}
                // It failed: made again below, from its snapshot.
                Err(e) if is_failed_end(&e) => {
                    tracing::warn!("{e:#}");
                    deregister_failed(ec2, &id).await?;
                    return made(ec2, ebs, t, o, line, r, &tagged).await;
                }
                Err(e) => return Err(e),
            }
        }
        r.reused = true;
        r.ami_id = Some(id);
        r.ami_name = img.name().map(str::to_owned);
        r.account_id = img.owner_id().map(str::to_owned);
        // The snapshot it boots from (a tagged one may be another run's).
        r.snapshot_id = match register::root_snapshot(&img) {
            Some(s) => Some(s.to_owned()),
            None => find_snapshot(ec2, o, &tagged).await?.map(|(s, _)| s),
        };
        tracing::info!(ami = ?r.ami_id, "an AMI of this leaf is already there");
        if let Some(snap) = r.snapshot_id.clone() {
            verify(ec2, ebs, &snap, o, line, r).await?;
        }
        return Ok(());
    }
    made(ec2, ebs, t, o, line, r, &tagged).await
}

/// The leaf's AMI made: from a snapshot an earlier run left, or from a new
/// one.
async fn made(
    ec2: &Client,
    ebs: Option<&aws_sdk_ebs::Client>,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
    tagged: &Tagged,
) -> anyhow::Result<()> {
    let mut left_over = find_snapshot(ec2, o, tagged).await?;
    // An earlier run's snapshot that the EBS direct APIs were still writing
    // is not waited for (nobody would complete it): the direct way starts
    // it again by its client token and finishes it.
    let mut resume = None;
    if o.direct.is_some()
        && let Some((snap, _)) = &left_over
        && direct::unfinished(ec2, snap).await?
    {
        tracing::info!(snapshot = %snap, "resuming a snapshot an earlier run left unfinished");
        resume = left_over.take().map(|(snap, _)| snap);
    }
    // A snapshot that ends in `error` is deleted and taken again (the
    // volume still holds the leaf), at most FAILED_ENDS times.
    let mut failed = 0;
    // The direct way's attempt, which names its client token: a new one
    // for each snapshot given up.
    let mut direct_attempt = 0;
    let (snapshot, volume_gib, snap_made) = loop {
        // When this run made the snapshot: EC2 may not know its id everywhere yet.
        let (snap, gib, made) = match left_over.take() {
            Some((snap, gib)) => {
                tracing::info!(snapshot = %snap, "registering a snapshot left by an earlier run");
                (snap, gib, Some(tagged.learned))
            }
            None => {
                let made_here = match (&o.direct, ebs) {
                    (Some(d), Some(ebs)) => {
                        let resuming = resume.take();
                        Some(
                            direct::snapshot(ebs, ec2, d, t, o, line, r, &mut direct_attempt, resuming.as_deref())
                                .await?,
                        )
                    }
                    _ => unpack_and_snapshot(ec2, t, o, line, r).await?,
                };
                let Some((snap, gib)) = made_here else {
                    return Ok(());
                };
                (snap, gib, Some(Instant::now()))
            }
        };
        r.snapshot_id = Some(snap.clone());
        match wait_snapshot(ec2, &snap, made, o.settings.timeouts.snapshot, line).await {
            Ok(()) => break (snap, gib, made),
            Err(e) if is_failed_end(&e) && failed < FAILED_ENDS => {
                failed += 1;
                direct_attempt += 1;
                tracing::warn!(snapshot = %snap, "{e:#}; deleting it and taking another");
                discard_snapshot(ec2, &snap).await;
            }
            Err(e) => return Err(e),
        }
    };
    // The snapshot's bytes proved first (--verify): one that is not the
    // image is never registered; it expires by its tag.
    verify(ec2, ebs, &snapshot, o, line, r)
        .await
        .map_err(|e| e.context(format!("{snapshot} is left unregistered (it expires by its ExpiresAt tag)")))?;
    // An AMI that ends `failed` is deregistered and registered again under
    // a dated name (the failed one may keep its name for a while), at most
    // FAILED_ENDS times; one never adopts it.
    let mut name = if o.force { dated_name(&o.ami_name) } else { o.ami_name.clone() };
    let mut failed = 0;
    let (registered, ami_made) = loop {
        line.step("registering the AMI");
        let attempt = match register::register(ec2, o, &name, &snapshot, snap_made, volume_gib).await {
            Ok(registered) => {
                let ami_made = Instant::now();
                match wait_image(ec2, &registered.id, Some(ami_made), o.settings.timeouts.image, line).await {
                    Ok(()) => Ok((registered, ami_made)),
                    Err(e) if is_failed_end(&e) => {
                        deregister_failed(ec2, &registered.id).await?;
                        Err(e)
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(done) => break done,
            Err(e) if is_failed_end(&e) && failed < FAILED_ENDS => {
                failed += 1;
                name = dated_name(&o.ami_name);
                tracing::warn!("{e:#}; registering again as '{name}'");
            }
            Err(e) => return Err(e),
        }
    };
    let ami_made = Some(ami_made);
    // A forced publish makes an AMI of its own, beside the leaf's others.
    let registered = if o.force { registered } else { register::settle(ec2, o, registered, &snapshot, line).await? };
    let (ami, name) = (registered.id, registered.name);
    r.ami_id = Some(ami.clone());
    r.ami_name = Some(name.clone());
    if r.account_id.is_none() {
        r.account_id = registered.owner;
    }
    if registered.snapshot != snapshot {
        // Another run of this leaf registered its AMI first (two pipelines,
        // or a re-run while the first still ran): that AMI is the leaf's,
        // and the snapshot this run made backs nothing.
        discard_snapshot(ec2, &snapshot).await;
        r.snapshot_id = Some(registered.snapshot.clone());
    }
    let snapshot = registered.snapshot;
    line.step("tagging");
    let final_tags: Vec<_> = o.final_tags(&name).iter().map(|(k, v)| tags::tag(k, v)).collect();
    retry::call(&format!("CreateTags on {ami} and {snapshot}"), ami_made, || {
        ec2.create_tags().resources(&ami).resources(&snapshot).set_tags(Some(final_tags.clone())).send()
    })
    .await?;
    if o.expires_at.is_none() {
        // The snapshot's pending-expiry marker goes: it now backs an AMI.
        retry::call(&format!("DeleteTags ExpiresAt on {snapshot}"), snap_made, || {
            ec2.delete_tags()
                .resources(&snapshot)
                .tags(aws_sdk_ec2::types::Tag::builder().key(tags::EXPIRES_AT).build())
                .send()
        })
        .await?;
    }
    tracing::info!(%ami, %snapshot, "published");
    Ok(())
}

/// Delete a snapshot of this leaf that no AMI uses (this run's, when
/// another run's AMI of the leaf won, or one that ended in `error`). EC2
/// has shown its state, so it knows it: NotFound means deleted already (by
/// an attempt whose answer was lost).
/// Failure is not the publish's: the snapshot still carries its
/// pending-expiry tag, so `expire` removes it.
async fn discard_snapshot(ec2: &Client, snapshot: &str) {
    let r = ec2
        .delete_snapshot()
        .snapshot_id(snapshot)
        .send()
        .await
        .or_code(&["InvalidSnapshot.NotFound"], format!("DeleteSnapshot {snapshot}"));
    match r {
        Ok(_) => tracing::info!(%snapshot, "deleted this run's snapshot: another run's AMI of the leaf is used"),
        Err(e) => tracing::warn!(%snapshot, "{e:#}; it expires by its tag instead"),
    }
}
