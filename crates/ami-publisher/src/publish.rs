//! `publish STREAM LEAF`: the image as an AMI in every target.
//!
//! Per target: an AMI of this leaf already there is reported, not remade
//! (unless forced); a snapshot of it left by an interrupted run is
//! registered; otherwise the unpacker instance is found (and started), the
//! stream's volume brought to the leaf writing only what changed, read back,
//! snapshotted, and the snapshot registered as an AMI. AMI and snapshot are
//! tagged with the stream, leaf and image id.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{
    Client,
    types::{
        ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Image, ImageState, ImdsSupportValues,
        ResourceType, SnapshotState, VolumeType,
    },
};
use fleet_tls::TlsFiles;
use unpacker_client::{
    self as uc, PrepareForCaptureRequest, PrepareForUnpackRequest, Progress, ReleaseCaptureRequest, UnpackImageRequest,
};

use crate::{
    aws::Aws,
    aws::SdkResultExt as _,
    progress::{Board, Line},
    results::{PublishResults, TargetResult},
    retry::{self, Seen},
    tags,
    targets::Target,
    unpacker,
    volumes::{self, VolumeSpec},
};

/// How long each kind of wait may last.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Instance running and its image-unpacker answering.
    pub unpacker: Duration,
    /// Volume available, attached, and seen by the unpacker.
    pub volume: Duration,
    /// Snapshot completed.
    pub snapshot: Duration,
    /// AMI available.
    pub image: Duration,
}

/// Everything a publish needs to know, settled before any target starts.
#[derive(Debug, Clone)]
pub struct Options {
    pub stream: String,
    pub leaf: String,
    /// Hex image id (manifest digest), from the imageserver.
    pub image_id: String,
    pub image_size: u64,
    pub instance_name: String,
    pub unpacker_port: u16,
    pub tls: TlsFiles,
    /// Extra tags for AMI and snapshot (`--tags`).
    pub tags: Vec<(String, String)>,
    /// `ExpiresAt` value, RFC 3339.
    pub expires_at: Option<String>,
    pub ami_name: String,
    pub description: String,
    pub force: bool,
    pub ena_support: bool,
    pub architecture: ArchitectureValues,
    pub boot_mode: Option<BootModeValues>,
    pub imds_support: Option<ImdsSupportValues>,
    pub root_device_name: String,
    pub volume_type: VolumeType,
    pub kms_key_id: Option<String>,
    pub min_free_bytes: u64,
    pub ignore_missing_unpackers: bool,
    pub timeouts: Timeouts,
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
        let r = publish_one(&ec2, &t, opts, &line).await;
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
pub async fn publish_one(ec2: &Client, t: &Target, o: &Options, line: &Line) -> TargetResult {
    let start = Instant::now();
    let mut r = TargetResult {
        account: t.account.clone(),
        region: t.region.clone(),
        size_bytes: o.image_size,
        image_id: o.image_id.clone(),
        ..TargetResult::default()
    };
    if let Err(e) = run(ec2, t, o, line, &mut r).await {
        r.error = Some(format!("{e:#}"));
    }
    r.seconds = start.elapsed().as_secs_f64();
    r
}

async fn run(ec2: &Client, t: &Target, o: &Options, line: &Line, r: &mut TargetResult) -> anyhow::Result<()> {
    let tagged = if o.force {
        Tagged::default()
    } else {
        line.step("looking for an existing AMI");
        find_tagged(ec2, o).await?
    };
    if let Some(img) = find_ami(ec2, o, &tagged).await? {
        let id = img.image_id().unwrap_or_default().to_owned();
        if img.state() == Some(&ImageState::Pending) {
            wait_image(ec2, &id, None, o.timeouts.image, line).await?;
        }
        r.reused = true;
        r.ami_id = Some(id);
        r.ami_name = img.name().map(str::to_owned);
        r.account_id = img.owner_id().map(str::to_owned);
        r.snapshot_id = find_snapshot(ec2, o, &tagged).await?.map(|(s, _)| s);
        tracing::info!(ami = ?r.ami_id, "an AMI of this leaf is already there");
        return Ok(());
    }
    let left_over = find_snapshot(ec2, o, &tagged).await?;
    // When this run made the snapshot: EC2 may not know its id everywhere yet.
    let (snapshot, volume_gib, snap_made) = match left_over {
        Some((snap, gib)) => {
            tracing::info!(snapshot = %snap, "registering a snapshot left by an earlier run");
            (snap, gib, None)
        }
        None => {
            let Some((snap, gib)) = unpack_and_snapshot(ec2, t, o, line, r).await? else {
                return Ok(());
            };
            (snap, gib, Some(Instant::now()))
        }
    };
    r.snapshot_id = Some(snapshot.clone());
    wait_snapshot(ec2, &snapshot, snap_made, o.timeouts.snapshot, line).await?;
    line.step("registering the AMI");
    let (ami, name, owner) = register(ec2, o, &snapshot, snap_made, volume_gib).await?;
    let ami_made = Some(Instant::now());
    r.ami_id = Some(ami.clone());
    r.ami_name = Some(name.clone());
    if r.account_id.is_none() {
        r.account_id = owner;
    }
    wait_image(ec2, &ami, ami_made, o.timeouts.image, line).await?;
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

/// AMIs and snapshots tagged with this image id, found with one
/// DescribeTags call (cheap, whatever the number of AMIs in the account).
#[derive(Default)]
struct Tagged {
    images: Vec<String>,
    snapshots: Vec<String>,
}

async fn find_tagged(ec2: &Client, o: &Options) -> anyhow::Result<Tagged> {
    let mut found = Tagged::default();
    let mut pages = ec2
        .describe_tags()
        .filters(tags::filter("key", tags::DIGEST))
        .filters(tags::filter("value", &o.image_id))
        .filters(aws_sdk_ec2::types::Filter::builder().name("resource-type").values("image").values("snapshot").build())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.sdk("DescribeTags")?;
        for t in page.tags() {
            let Some(id) = t.resource_id() else { continue };
            match t.resource_type().map(|r| r.as_str()) {
                Some("image") => found.images.push(id.to_owned()),
                Some("snapshot") => found.snapshots.push(id.to_owned()),
                _ => {}
            }
        }
    }
    Ok(found)
}

/// An AMI (available or on its way) tagged with this leaf and image id.
async fn find_ami(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Option<Image>> {
    if tagged.images.is_empty() {
        return Ok(None);
    }
    let out = ec2.describe_images().set_image_ids(Some(tagged.images.clone())).send().await.sdk("DescribeImages")?;
    let mut found: Vec<Image> = out
        .images()
        .iter()
        .filter(|i| matches!(i.state(), Some(ImageState::Available | ImageState::Pending)))
        .filter(|i| {
            tags::value(i.tags(), tags::STREAM) == Some(o.stream.as_str())
                && tags::value(i.tags(), tags::LEAF) == Some(o.leaf.as_str())
        })
        .cloned()
        .collect();
    found.sort_by(|a, b| b.creation_date().cmp(&a.creation_date()));
    Ok(found.into_iter().next())
}

/// A snapshot of this leaf (completed or pending) and its size in GiB.
async fn find_snapshot(ec2: &Client, o: &Options, tagged: &Tagged) -> anyhow::Result<Option<(String, i32)>> {
    if tagged.snapshots.is_empty() {
        return Ok(None);
    }
    let out = ec2
        .describe_snapshots()
        .set_snapshot_ids(Some(tagged.snapshots.clone()))
        .send()
        .await
        .sdk("DescribeSnapshots")?;
    Ok(out
        .snapshots()
        .iter()
        .filter(|s| matches!(s.state(), Some(SnapshotState::Completed | SnapshotState::Pending)))
        .filter(|s| {
            tags::value(s.tags(), tags::STREAM) == Some(o.stream.as_str())
                && tags::value(s.tags(), tags::LEAF) == Some(o.leaf.as_str())
        })
        .max_by(|a, b| a.start_time().map(|t| t.secs()).cmp(&b.start_time().map(|t| t.secs())))
        .and_then(|s| Some((s.snapshot_id()?.to_owned(), s.volume_size().unwrap_or(1)))))
}

fn show(line: &Line) -> impl FnMut(&Progress) + '_ {
    |p| line.bytes(&p.phase, p.done_bytes, p.total_bytes)
}

/// The unpacker part: returns the new snapshot and its size in GiB, or
/// `None` when the target has no unpacker and that is allowed.
async fn unpack_and_snapshot(
    ec2: &Client,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<Option<(String, i32)>> {
    line.step("finding the unpacker");
    let found = unpacker::find_all(ec2, &o.instance_name).await?;
    let Some(inst) = found.first() else {
        if o.ignore_missing_unpackers {
            r.skipped = true;
            tracing::warn!("no unpacker instance; skipped");
            return Ok(None);
        }
        bail!(
            "no instance tagged Name={} in {t} (launch one, or pass --ignore-missing-unpackers to skip such targets)",
            o.instance_name
        );
    };
    if found.len() > 1 {
        tracing::warn!(count = found.len(), using = %inst.instance_id, "several unpacker instances; using the first");
    }
    let inst = unpacker::ensure_running(ec2, inst, o.timeouts.unpacker, |s| line.step(s)).await?;
    r.account_id = inst.account_id.clone();
    line.step(format!("connecting to {}", unpacker::address(&inst, o.unpacker_port)?));
    let mut c = unpacker::dial_instance(&inst, o.unpacker_port, &o.tls, o.timeouts.unpacker).await?;
    let spec = VolumeSpec {
        stream: o.stream.clone(),
        need_bytes: o.image_size.saturating_add(o.min_free_bytes),
        volume_type: o.volume_type.clone(),
        kms_key_id: o.kms_key_id.clone(),
        instance_name: o.instance_name.clone(),
        timeout: o.timeouts.volume,
    };
    let volume = volumes::ensure(ec2, &mut c, &inst, &spec, line).await?;
    r.volume_id = Some(volume.clone());

    // Another publish of the stream may be using the volume: wait for it
    // (at most as long as its capture hold can last), and start again when
    // it slips in between (the unpacker says ABORTED).
    let hold_id = hold_id();
    let patience = o.timeouts.unpacker.max(Duration::from_secs(CAPTURE_HOLD_SECONDS.into()));
    let deadline = Instant::now() + patience;
    let last = loop {
        wait_stream_idle(&mut c, &o.stream, &o.leaf, deadline, line).await?;
        match prepare_and_unpack(&mut c, o, &hold_id, line).await {
            Err(Step::Busy(s)) if Instant::now() < deadline => {
                line.step("the stream is busy; waiting");
                tracing::info!(stream = %o.stream, "{}; waiting", s.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(Step::Busy(s)) => bail!("{} (gave up after {patience:?})", s.message()),
            Err(Step::Failed(e)) => return Err(e),
            Ok(last) => break last,
        }
    };
    if let Some(st) = last.stats {
        r.bytes_fetched = Some(st.bytes_fetched);
        r.bytes_written = Some(st.bytes_written);
        tracing::info!(fetched = st.bytes_fetched, written = st.bytes_written, seconds = st.seconds, "unpacked");
    }
    let snapped = capture_and_snapshot(ec2, &mut c, o, &volume, &hold_id, line).await;
    let release = ReleaseCaptureRequest { stream: o.stream.clone(), hold_id: hold_id.clone() };
    if let Err(s) = c.release_capture(release).await {
        // An older unpacker has no holds; otherwise the hold runs out by itself.
        if s.code() != tonic::Code::Unimplemented {
            tracing::warn!(stream = %o.stream, "could not release the capture hold: {}", s.message());
        }
    }
    snapped.map(Some)
}

/// How a step on the unpacker ended when it did not succeed.
enum Step {
    /// The stream was busy with another caller's operation (ABORTED).
    Busy(tonic::Status),
    Failed(anyhow::Error),
}

fn step<'a>(what: &'a str, o: &'a Options) -> impl Fn(tonic::Status) -> Step + 'a {
    move |s| match s.code() {
        tonic::Code::Aborted => Step::Busy(s),
        tonic::Code::DataLoss => Step::Failed(corrupt(o, &s)),
        _ => Step::Failed(anyhow::Error::new(s).context(what.to_owned())),
    }
}

/// DATA_LOSS from the unpacker: a chunk of the image failed its digest on
/// the way from the imageserver. That is permanent: it is never retried,
/// and the target's result names the image.
fn corrupt(o: &Options, s: &tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "image {}/{} (image id {}) is corrupt on the imageserver, not retried: {}",
        o.stream,
        o.leaf,
        o.image_id,
        s.message()
    )
}

/// Prepare the stream (a no-op when its device's content is known) and
/// unpack the leaf. The unpacker then holds the device at this leaf until
/// the snapshot is started, so a concurrent publish of the same stream
/// cannot write it in between.
async fn prepare_and_unpack(c: &mut uc::Client, o: &Options, hold_id: &str, line: &Line) -> Result<Progress, Step> {
    line.step("preparing");
    let req = PrepareForUnpackRequest { stream: o.stream.clone(), skip_if_prepared: true, do_not_wait: false };
    let s = c.prepare_for_unpack(req).await.map_err(step("PrepareForUnpack", o))?.into_inner();
    uc::follow(s, show(line)).await.map_err(step("PrepareForUnpack", o))?;
    let req = UnpackImageRequest {
        stream: o.stream.clone(),
        leaf: o.leaf.clone(),
        hold_seconds: UNPACK_HOLD_SECONDS,
        hold_id: hold_id.to_owned(),
    };
    let s = c.unpack_image(req).await.map_err(step("UnpackImage", o))?.into_inner();
    let what = format!("unpacking {}/{}", o.stream, o.leaf);
    uc::follow(s, show(line)).await.map_err(|e| match step(&what, o)(e) {
        // Busy is only for before the unpack starts.
        Step::Busy(s) => Step::Failed(anyhow::Error::new(s).context(what.clone())),
        failed => failed,
    })
}

/// Read the volume back (it must hold exactly the leaf), then start its
/// snapshot; returns (snapshot id, size in GiB).
async fn capture_and_snapshot(
    ec2: &Client,
    c: &mut uc::Client,
    o: &Options,
    volume: &str,
    hold_id: &str,
    line: &Line,
) -> anyhow::Result<(String, i32)> {
    line.step("reading back");
    // Writers of other leaves wait for this leaf's hold; a scan or capture
    // by another caller may still be running (ABORTED): try again.
    let patience = volumes::Patience::new(o.timeouts.unpacker);
    let cap = loop {
        let req = PrepareForCaptureRequest {
            stream: o.stream.clone(),
            hold_seconds: CAPTURE_HOLD_SECONDS,
            hold_id: hold_id.to_owned(),
        };
        let r = c.prepare_for_capture(req).await;
        if !patience.again(&r).await {
            break r.context("PrepareForCapture")?.into_inner();
        }
        line.step("the stream is busy; waiting to read back");
    };
    if cap.volume_id != volume {
        bail!("the unpacker read back {}, not {volume}, for {}; not snapshotting", cap.volume_id, o.stream);
    }
    if cap.image_id != o.image_id || cap.leaf != o.leaf {
        bail!(
            "the unpacker's volume holds {}/{} (image {}), not {}/{} (image {}); not snapshotting it",
            cap.stream,
            cap.leaf,
            cap.image_id,
            o.stream,
            o.leaf,
            o.image_id
        );
    }
    line.step(format!("snapshotting {volume}"));
    let mut snap_tags = vec![(tags::NAME.to_owned(), o.ami_name.clone())];
    snap_tags.extend(o.identity_tags());
    // Until an AMI uses it, the snapshot expires: an interrupted run that is
    // never repeated leaves nothing behind for good.
    snap_tags.push((tags::EXPIRES_AT.to_owned(), tags::rfc3339(SystemTime::now() + tags::PENDING_SNAPSHOT_LIFETIME)));
    // CreateSnapshot takes no idempotency token: the snapshot carries one
    // in a tag, so an attempt whose answer was lost is found, not repeated.
    let token = retry::token();
    snap_tags.push((tags::CREATE_TOKEN.to_owned(), token.clone()));
    let spec = tags::spec(ResourceType::Snapshot, &snap_tags);
    let (snap, gib) = retry::create_untokened(
        ec2,
        &format!("CreateSnapshot of {volume}"),
        None,
        || {
            let req = ec2
                .create_snapshot()
                .volume_id(volume)
                .description(&o.description)
                .tag_specifications(spec.clone())
                .customize()
                .config_override(retry::once());
            async move {
                let out = match req.send().await {
                    Ok(out) => out,
                    Err(e) => return Err(e),
                };
                Ok((out.snapshot_id().unwrap_or_default().to_owned(), out.volume_size().unwrap_or(1)))
            }
        },
        || retry::snapshot_with_token(ec2, &token),
    )
    .await?;
    if snap.is_empty() {
        bail!("CreateSnapshot of {volume} returned no snapshot id");
    }
    tracing::info!(snapshot = %snap, %volume, device_digest = %cap.device_digest, "snapshot started");
    Ok((snap, gib))
}

/// This publish's id for its capture holds: ReleaseCapture ends only its own.
fn hold_id() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("ami-publisher/{}/{nanos:x}", std::process::id())
}

/// How long the unpacker holds a volume at the leaf after the unpack (until
/// the read-back starts) and after the read-back (until CreateSnapshot has
/// returned); released as soon as it has. A publisher killed in between
/// makes a publish of another leaf of the stream wait at most this long; a
/// re-run of the same leaf does not wait.
const UNPACK_HOLD_SECONDS: u32 = 120;
const CAPTURE_HOLD_SECONDS: u32 = 300;

/// A run that was interrupted may have left the unpacker scanning or
/// unpacking this stream (the unpacker finishes what it started), or
/// another publish may be capturing another leaf of it; wait for them.
async fn wait_stream_idle(
    c: &mut uc::Client,
    stream: &str,
    leaf: &str,
    deadline: Instant,
    line: &Line,
) -> anyhow::Result<()> {
    use unpacker_client::StreamState;
    loop {
        let status = c.get_status(uc::GetStatusRequest {}).await.context("GetStatus")?.into_inner();
        let Some(s) = status.streams.iter().find(|s| s.stream == stream) else { return Ok(()) };
        let state = s.state();
        // Held at another leaf: another publish is capturing it.
        let held = s.hold_seconds > 0 && s.hold_leaf != leaf;
        if !held && !matches!(state, StreamState::Scanning | StreamState::Unpacking) {
            return Ok(());
        }
        if Instant::now() > deadline && held {
            bail!("gave up waiting for another publish's capture of {stream}/{} to end", s.hold_leaf);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for the unpacker to finish an earlier {state:?} of {stream}");
        }
        if held {
            line.step(format!("waiting for another capture of {stream} ({} s left of its hold)", s.hold_seconds));
        } else {
            line.step(format!(
                "waiting for an earlier {} to finish",
                state.as_str_name().trim_start_matches("STREAM_STATE_").to_lowercase()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wait for a snapshot to complete; `fresh`: when this run made it.
async fn wait_snapshot(
    ec2: &Client,
    snapshot: &str,
    fresh: Option<Instant>,
    timeout: Duration,
    line: &Line,
) -> anyhow::Result<()> {
    line.step(format!("waiting for {snapshot}"));
    snapshot_completed(ec2, snapshot, fresh, timeout).await
}

/// Wait for a snapshot to complete, at most `timeout`; `fresh`: when this
/// run made it.
pub(crate) async fn snapshot_completed(
    ec2: &Client,
    snapshot: &str,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<()> {
    retry::wait(&format!("snapshot {snapshot} to complete"), timeout, fresh, move || async move {
        let out = match ec2.describe_snapshots().snapshot_ids(snapshot).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        Ok(match out.snapshots().first() {
            Some(s) if s.state() == Some(&SnapshotState::Completed) => Seen::Ready(()),
            Some(s) if s.state() == Some(&SnapshotState::Error) => Seen::Failed(anyhow::anyhow!(
                "snapshot {snapshot} failed: {}",
                s.state_message().unwrap_or("no reason given")
            )),
            Some(s) => {
                Seen::NotYet(format!("{} {}", s.state().map_or("?", |s| s.as_str()), s.progress().unwrap_or_default()))
            }
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("snapshot {snapshot} is gone")),
        })
    })
    .await
}

/// Wait for an AMI to be available; `fresh`: when this run registered it.
async fn wait_image(
    ec2: &Client,
    ami: &str,
    fresh: Option<Instant>,
    timeout: Duration,
    line: &Line,
) -> anyhow::Result<()> {
    line.step(format!("waiting for {ami}"));
    image_available(ec2, ami, fresh, timeout).await
}

/// Wait for an AMI to be available, at most `timeout`; `fresh`: when this
/// run registered (or copied) it.
pub(crate) async fn image_available(
    ec2: &Client,
    ami: &str,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<()> {
    retry::wait(&format!("AMI {ami} to be available"), timeout, fresh, move || async move {
        let out = match ec2.describe_images().image_ids(ami).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        Ok(match out.images().first() {
            Some(i) if i.state() == Some(&ImageState::Available) => Seen::Ready(()),
            Some(i) if i.state() == Some(&ImageState::Pending) => Seen::NotYet("pending".to_owned()),
            Some(i) => Seen::Failed(anyhow::anyhow!(
                "AMI {ami} is {}: {}",
                i.state().map_or("?", |s| s.as_str()),
                i.state_reason().and_then(|r| r.message()).unwrap_or("no reason given")
            )),
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("AMI {ami} is gone")),
        })
    })
    .await
}

/// What one RegisterImage attempt came to.
#[derive(Clone)]
enum Registered {
    Made(String),
    /// The name is taken (by an AMI of this attempt whose answer was lost,
    /// of an interrupted run, or by anything else).
    NameTaken,
}

/// RegisterImage; returns (AMI id, name, owner). `snap_made`: when this run
/// made the snapshot. EC2 takes no idempotency token for it, but a name is
/// unique per account and region: an attempt whose answer was lost is found
/// by the name and the snapshot. When the name is taken by an AMI of this
/// very leaf (a run interrupted before tagging), that AMI is adopted; when
/// it is taken by anything else, the error says so.
async fn register(
    ec2: &Client,
    o: &Options,
    snapshot: &str,
    snap_made: Option<Instant>,
    gib: i32,
) -> anyhow::Result<(String, String, Option<String>)> {
    let name = if o.force {
        // Names are unique per account and region: a forced remake is told
        // apart by the time.
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        crate::ami_name_chars(&format!("{} {}", o.ami_name, now.trim_end_matches('Z').replace(':', ".")))
    } else {
        o.ami_name.clone()
    };
    let root = BlockDeviceMapping::builder()
        .device_name(&o.root_device_name)
        .ebs(
            EbsBlockDevice::builder()
                .snapshot_id(snapshot)
                .volume_size(gib)
                .volume_type(o.volume_type.clone())
                .delete_on_termination(true)
                .build(),
        )
        .build();
    let req = ec2
        .register_image()
        .name(&name)
        .description(&o.description)
        .architecture(o.architecture.clone())
        .root_device_name(&o.root_device_name)
        .block_device_mappings(root)
        .virtualization_type("hvm")
        .ena_support(o.ena_support)
        .set_boot_mode(o.boot_mode.clone())
        .set_imds_support(o.imds_support.clone())
        .tag_specifications(tags::spec(ResourceType::Image, &o.final_tags(&name)));
    let uses_snapshot = |img: &Image| {
        img.block_device_mappings().iter().any(|m| m.ebs().and_then(|e| e.snapshot_id()) == Some(snapshot))
    };
    let sent = retry::create_untokened(
        ec2,
        &format!("RegisterImage {name}"),
        snap_made,
        || {
            let req = req.clone().customize().config_override(retry::once());
            async move {
                match req.send().await {
                    Ok(out) => Ok(Registered::Made(out.image_id().unwrap_or_default().to_owned())),
                    Err(e) if retry::code(&e) == Some("InvalidAMIName.Duplicate") => Ok(Registered::NameTaken),
                    Err(e) => Err(e),
                }
            }
        },
        || async {
            let img = image_named(ec2, &name).await?;
            anyhow::Ok(
                img.filter(|i| uses_snapshot(i)).and_then(|i| i.image_id().map(|id| Registered::Made(id.to_owned()))),
            )
        },
    )
    .await?;
    match sent {
        Registered::Made(id) if !id.is_empty() => {
            tracing::info!(ami = %id, %name, "registered");
            Ok((id, name, None))
        }
        Registered::Made(_) => bail!("RegisterImage {name} returned no image id"),
        Registered::NameTaken => {
            // The AMI holding the name may be new enough not to be listed yet.
            let deadline = Instant::now() + retry::LOOK_FOR;
            let img = loop {
                if let Some(img) = image_named(ec2, &name).await? {
                    break img;
                }
                if Instant::now() > deadline {
                    bail!("RegisterImage {name}: the name is taken, but no AMI of this account has it");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            let ours = tags::value(img.tags(), tags::DIGEST) == Some(o.image_id.as_str()) || uses_snapshot(&img);
            let id = img.image_id().unwrap_or_default().to_owned();
            if !ours {
                bail!(
                    "the AMI name '{name}' is already used by {id}, which is not an AMI of {}/{}; \
                     choose another --ami-name, or --force to make a new AMI with a dated name",
                    o.stream,
                    o.leaf
                );
            }
            tracing::info!(ami = %id, "adopting the AMI an interrupted run registered");
            Ok((id, name, img.owner_id().map(str::to_owned)))
        }
    }
}

/// This account's AMI called `name`, if EC2 lists one.
pub(crate) async fn image_named(ec2: &Client, name: &str) -> anyhow::Result<Option<Image>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(tags::filter("name", name))
        .send()
        .await
        .sdk("DescribeImages by name")?;
    Ok(out.images().first().cloned())
}
