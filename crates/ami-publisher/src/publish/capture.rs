//! The unpacker's part of a publish: the stream's volume brought to the
//! leaf, read back under the capture hold, and its snapshot started.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{Client, types::ResourceType};
use unpacker_client::{
    self as uc, PrepareForCaptureRequest, PrepareForUnpackRequest, Progress, ReleaseCaptureRequest,
    RenewCaptureHoldRequest, UnpackImageRequest,
};

use crate::{
    progress::Line,
    results::TargetResult,
    retry::{self},
    tags,
    targets::Target,
    unpacker, volumes,
};

use super::Options;

pub(super) fn show(line: &Line) -> impl FnMut(&Progress) + '_ {
    |p| line.bytes(&p.phase, p.done_bytes, p.total_bytes)
}

/// The unpacker part: returns the new snapshot and its size in GiB, or
/// `None` when the target has no unpacker and that is allowed.
pub(super) async fn unpack_and_snapshot(
    ec2: &Client,
    t: &Target,
    o: &Options,
    line: &Line,
    r: &mut TargetResult,
) -> anyhow::Result<Option<(String, i32)>> {
    line.step("finding the unpacker");
    let found = o.settings.unpackers(ec2).await?;
    let Some(inst) = found.first() else {
        if o.ignore_missing_unpackers {
            r.skipped = true;
            tracing::warn!("no unpacker instance; skipped");
            return Ok(None);
        }
        bail!(
            "no instance tagged Name={} in {t} (launch one, or pass --ignore-missing-unpackers to skip such targets)",
            o.settings.instance_name
        );
    };
    if found.len() > 1 {
        tracing::warn!(count = found.len(), using = %inst.instance_id, "several unpacker instances; using the first");
    }
    let inst = unpacker::ensure_running(ec2, inst, o.settings.timeouts.unpacker, |s| line.step(s)).await?;
    r.account_id = inst.account_id.clone();
    line.step(format!("connecting to {}", unpacker::address(&inst, o.settings.unpacker_port)?));
    let mut c = o.settings.dial(&inst, o.settings.timeouts.unpacker).await?;
    let spec = o.volume_spec(t);
    let volume = volumes::ensure(ec2, &mut c, &inst, &spec, line).await?;
    // This run learned the volume's id now (or made it just before): parts
    // of EC2 may not know it yet.
    let volume_learned = Instant::now();
    r.volume_id = Some(volume.clone());

    // Another publish of the stream may be using the volume: wait for it
    // (at most as long as its capture hold can last), and start again when
    // it slips in between (the unpacker says ABORTED).
    let holds = Holds { id: hold_id(), renewable: renewable(&mut c, &o.stream).await };
    let patience = o.settings.timeouts.unpacker.max(Duration::from_secs(CAPTURE_HOLD_SECONDS.into()));
    let deadline = Instant::now() + patience;
    let last = loop {
        wait_stream_idle(&mut c, &o.stream, &o.leaf, deadline, line).await?;
        match prepare_and_unpack(&mut c, o, &holds, line).await {
            Err(Step::Busy(s)) if Instant::now() < deadline => {
                line.step("the stream is busy; waiting");
                tracing::info!(stream = %o.stream, "{}; waiting", s.message());
                tokio::time::sleep(retry::STREAM_POLL).await;
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
    // The unpack took a hold: keep it short while this run works, so that
    // if the run dies, the next leaf's publish waits a minute at most.
    let renewal = holds.renewable.then(|| HoldRenewal::start(c.clone(), &o.stream, &holds.id));
    let snapped = capture_and_snapshot(ec2, &mut c, o, (&volume, volume_learned), &holds, line).await;
    drop(renewal);
    let release = ReleaseCaptureRequest { stream: o.stream.clone(), hold_id: holds.id.clone() };
    if let Err(s) = c.release_capture(release).await {
        // An older unpacker has no holds; otherwise the hold runs out by itself.
        if s.code() != tonic::Code::Unimplemented {
            tracing::warn!(stream = %o.stream, "could not release the capture hold: {}", s.message());
        }
    }
    snapped.map(Some)
}

/// How a step on the unpacker ended when it did not succeed.
pub(super) enum Step {
    /// The stream was busy with another caller's operation (ABORTED).
    Busy(tonic::Status),
    Failed(anyhow::Error),
}

pub(super) fn step<'a>(what: &'a str, o: &'a Options) -> impl Fn(tonic::Status) -> Step + 'a {
    move |s| match s.code() {
        tonic::Code::Aborted => Step::Busy(s),
        tonic::Code::DataLoss => Step::Failed(corrupt(o, &s)),
        _ => Step::Failed(anyhow::Error::new(s).context(what.to_owned())),
    }
}

/// DATA_LOSS from the unpacker: a chunk of the image failed its digest on
/// the way from the imageserver. That is permanent: it is never retried,
/// and the target's result names the image.
pub(super) fn corrupt(o: &Options, s: &tonic::Status) -> anyhow::Error {
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
pub(super) async fn prepare_and_unpack(
    c: &mut uc::Client,
    o: &Options,
    holds: &Holds,
    line: &Line,
) -> Result<Progress, Step> {
    line.step("preparing");
    let req = PrepareForUnpackRequest { stream: o.stream.clone(), skip_if_prepared: true, do_not_wait: false };
    let s = c.prepare_for_unpack(req).await.map_err(step("PrepareForUnpack", o))?.into_inner();
    uc::follow(s, show(line)).await.map_err(step("PrepareForUnpack", o))?;
    let req = UnpackImageRequest {
        stream: o.stream.clone(),
        leaf: o.leaf.clone(),
        hold_seconds: holds.after_unpack(),
        hold_id: holds.id.clone(),
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
/// snapshot; returns (snapshot id, size in GiB). `volume`: its id and when
/// this run learned it.
pub(super) async fn capture_and_snapshot(
    ec2: &Client,
    c: &mut uc::Client,
    o: &Options,
    (volume, learned): (&str, Instant),
    holds: &Holds,
    line: &Line,
) -> anyhow::Result<(String, i32)> {
    line.step("reading back");
    // Writers of other leaves wait for this leaf's hold; a scan or capture
    // by another caller may still be running (ABORTED): try again.
    let patience = volumes::Patience::new(o.settings.timeouts.unpacker);
    let cap = loop {
        let req = PrepareForCaptureRequest {
            stream: o.stream.clone(),
            hold_seconds: holds.after_read_back(),
            hold_id: holds.id.clone(),
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
        Some(learned),
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

/// The term of this publish's capture holds, renewed every
/// [`HOLD_RENEW_EVERY`] while it works: a publisher that dies leaves a hold
/// that ends within [`HOLD_TERM`] (see [`Holds`]).
pub(super) const HOLD_TERM: u32 = 60;
const HOLD_RENEW_EVERY: Duration = Duration::from_secs(20);

/// This publish's capture holds: its id, and whether the unpacker renews
/// holds (RenewCaptureHold). When it does, every hold this publish asks
/// for lasts [`HOLD_TERM`] and is renewed while the publish works; the
/// unpacker finishes an unpack or a read-back whose caller died and takes
/// the hold it asked for, so a short one is what bounds the wait of the
/// next leaf. When it does not, the long holds of before.
pub(super) struct Holds {
    pub(super) id: String,
    pub(super) renewable: bool,
}

impl Holds {
    fn after_unpack(&self) -> u32 {
        if self.renewable { HOLD_TERM } else { UNPACK_HOLD_SECONDS }
    }

    fn after_read_back(&self) -> u32 {
        if self.renewable { HOLD_TERM } else { CAPTURE_HOLD_SECONDS }
    }
}

/// Whether the unpacker renews capture holds: a renewal of a hold nobody
/// has is NOT_FOUND there, UNIMPLEMENTED on an unpacker from before.
async fn renewable(c: &mut uc::Client, stream: &str) -> bool {
    let req = RenewCaptureHoldRequest {
        stream: stream.to_owned(),
        hold_id: "ami-publisher/probe".to_owned(),
        hold_seconds: 1,
    };
    matches!(c.renew_capture_hold(req).await, Err(s) if s.code() == tonic::Code::NotFound)
}

/// Renews this publish's capture hold to [`HOLD_TERM`] until dropped.
struct HoldRenewal(tokio::task::JoinHandle<()>);

impl HoldRenewal {
    fn start(mut c: uc::Client, stream: &str, hold_id: &str) -> HoldRenewal {
        let req =
            RenewCaptureHoldRequest { stream: stream.to_owned(), hold_id: hold_id.to_owned(), hold_seconds: HOLD_TERM };
        HoldRenewal(tokio::spawn(async move {
            loop {
                if !renew_hold(&mut c, req.clone()).await {
                    return;
                }
                tokio::time::sleep(HOLD_RENEW_EVERY).await;
            }
        }))
    }
}

impl Drop for HoldRenewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renew a capture hold to [`HOLD_TERM`]; whether to go on renewing it.
async fn renew_hold(c: &mut uc::Client, req: RenewCaptureHoldRequest) -> bool {
    match c.renew_capture_hold(req).await {
        Ok(_) => true,
        // An unpacker from before RenewCaptureHold keeps the long hold.
        Err(s) if s.code() == tonic::Code::Unimplemented => false,
        Err(s) if s.code() == tonic::Code::NotFound => {
            tracing::warn!("the capture hold is gone: {}", s.message());
            false
        }
        Err(s) => {
            tracing::debug!("renewing the capture hold: {}", s.message());
            true
        }
    }
}

/// This publish's id for its capture holds: ReleaseCapture ends only its own.
pub(super) fn hold_id() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("ami-publisher/{}/{nanos:x}", std::process::id())
}

/// How long the unpacker holds a volume at the leaf after the unpack (until
/// the read-back starts) and after the read-back (until CreateSnapshot has
/// returned); released as soon as it has, and renewed to [`HOLD_TERM`]
/// meanwhile. A publisher killed in between makes a publish of another
/// leaf of the stream wait about [`HOLD_TERM`] (this long with an unpacker
/// that cannot renew); a re-run of the same leaf does not wait.
pub(super) const UNPACK_HOLD_SECONDS: u32 = 120;
pub(super) const CAPTURE_HOLD_SECONDS: u32 = 300;

/// A run that was interrupted may have left the unpacker scanning or
/// unpacking this stream (the unpacker finishes what it started), or
/// another publish may be capturing another leaf of it; wait for them.
pub(super) async fn wait_stream_idle(
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
        tokio::time::sleep(retry::STREAM_POLL).await;
    }
}
