//! The stream's volume on an unpacker: reuse the one bound to the stream,
//! else a free one, else one of ours left over by an interrupted run, else a
//! new encrypted volume. A bound volume that is too small is grown in place
//! (ModifyVolume), so what it holds stays and the next unpack moves only what
//! changed; when EC2 refuses (a volume can be modified once in six hours),
//! it is replaced.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{
    Client,
    error::ProvideErrorMetadata as _,
    types::{ResourceType, Volume, VolumeAttachmentState, VolumeType},
};
use unpacker_client::{self as uc, AddDeviceRequest, AssociateRequest, ForgetStreamRequest, RemoveDeviceRequest};

use crate::{
    errors::SdkResultExt as _,
    errors::sdk_error,
    progress::Line,
    retry::{self, Seen},
    tags::{self, tag_filter},
    unpacker::UnpackerInstance,
};

const GIB: u64 = 1 << 30;

/// DescribeVolumesModifications' answer for a volume never modified.
const NO_MODIFICATION: &str = "InvalidVolumeModification.NotFound";

/// What a volume must be and how long to wait for it.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub stream: String,
    /// Bytes the volume must hold: image size plus `--min-free-bytes`.
    pub need_bytes: u64,
    pub volume_type: VolumeType,
    /// The key new volumes are encrypted with, as configured (None: the
    /// account's default).
    pub kms_key_id: Option<String>,
    /// That key's ARN, when known: a volume under another key is not used
    /// for the stream (its snapshots, and so the AMIs, would carry that
    /// key), but replaced.
    pub key_arn: Option<String>,
    pub instance_name: String,
    pub timeout: Duration,
}

impl VolumeSpec {
    pub fn gib(&self) -> i32 {
        i32::try_from(self.need_bytes.div_ceil(GIB).max(1)).unwrap_or(i32::MAX)
    }

    /// Whether `volume` is encrypted with another key than this spec's
    /// (false when the spec's key is not known).
    pub async fn other_key(&self, ec2: &Client, volume: &str) -> anyhow::Result<bool> {
        let Some(want) = &self.key_arn else { return Ok(false) };
        let out = retry::call(&format!("DescribeVolumes {volume}"), None, || {
            ec2.describe_volumes().volume_ids(volume).send()
        })
        .await?;
        Ok(out.volumes().first().and_then(|v| v.kms_key_id()) != Some(want.as_str()))
    }
}

/// Make sure the unpacker has a big enough volume bound to the stream;
/// returns its id.
pub async fn ensure(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    spec: &VolumeSpec,
    line: &Line,
) -> anyhow::Result<String> {
    let owner = lease_owner();
    let waiting_since = Instant::now();
    let mut renewal = None;
    let status = loop {
        let status = c.get_status(uc::GetStatusRequest {}).await.context("GetStatus")?.into_inner();
        if status.streams.iter().any(|s| s.stream == spec.stream) {
            break status;
        }
        // The stream has no volume: one publish sets one up, the others
        // wait for its binding, so two first publishes make one volume.
        match lease(c, &spec.stream, &owner, LEASE_TERM).await? {
            Setup::Ours => {
                renewal = Some(Renewal::start(c.clone(), &spec.stream, &owner));
                break status;
            }
            Setup::Bound => continue,
            Setup::HeldBy { holder, left } => {
                if waiting_since.elapsed() > spec.timeout.saturating_mul(2) {
                    bail!(
                        "{holder} has been setting up a volume for {} on the unpacker for over {}s; \
                         its lease ends in {left}s unless it renews it",
                        spec.stream,
                        waiting_since.elapsed().as_secs()
                    );
                }
                line.step(format!(
                    "waiting for {holder} to set up the stream's volume (waited {}s; its lease ends in {left}s \
                     unless renewed)",
                    waiting_since.elapsed().as_secs()
                ));
                tokio::time::sleep(LEASE_POLL).await;
            }
        }
    };
    let result = ensure_with(ec2, c, inst, spec, line, status).await;
    drop(renewal);
    if result.is_err() {
        // Let a waiting publish try at once rather than when the lease ends
        // (a binding made ends it anyway).
        let _ = c.lease_stream_setup(uc::LeaseRequest { stream: spec.stream.clone(), owner, seconds: 0 }).await;
    }
    result
}

/// How often a publish waiting for another's volume set-up looks again.
const LEASE_POLL: Duration = Duration::from_secs(1);

/// How long a set-up lease lasts unless renewed. The holder renews it every
/// third of that while it works, so a publisher that was killed (a
/// cancelled CI job) holds up the next one for at most this long, and a
/// live one keeps it however long EC2 takes.
const LEASE_TERM: Duration = Duration::from_secs(45);

/// Renews this publish's set-up lease until dropped.
struct Renewal(tokio::task::JoinHandle<()>);

impl Renewal {
    fn start(mut c: uc::Client, stream: &str, owner: &str) -> Renewal {
        let (stream, owner) = (stream.to_owned(), owner.to_owned());
        Renewal(tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_TERM / 3).await;
                match lease(&mut c, &stream, &owner, LEASE_TERM).await {
                    Ok(Setup::Ours) => {}
                    // Bound meanwhile: the lease has ended.
                    Ok(Setup::Bound) => return,
                    Ok(Setup::HeldBy { holder, .. }) => {
                        tracing::warn!(%stream, %holder, "the set-up lease ran out and another publish took it");
                        return;
                    }
                    Err(e) => tracing::debug!(%stream, "renewing the set-up lease: {e:#}"),
                }
            }
        }))
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a set-up lease request found.
enum Setup {
    /// This publish sets the stream's volume up (also when the unpacker
    /// predates leases: it then behaves as before them).
    Ours,
    /// The stream got a volume meanwhile.
    Bound,
    /// Another publish is setting it up.
    HeldBy { holder: String, left: u32 },
}

fn lease_owner() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("ami-publisher/{}/{nanos:x}", std::process::id())
}

async fn lease(c: &mut uc::Client, stream: &str, owner: &str, lasting: Duration) -> anyhow::Result<Setup> {
    let seconds = u32::try_from(lasting.as_secs()).unwrap_or(u32::MAX);
    let req = uc::LeaseRequest { stream: stream.to_owned(), owner: owner.to_owned(), seconds };
    match c.lease_stream_setup(req).await {
        Ok(r) => {
            let r = r.into_inner();
            Ok(if r.granted {
                Setup::Ours
            } else if !r.bound_volume_id.is_empty() {
                Setup::Bound
            } else {
                Setup::HeldBy { holder: r.holder, left: r.seconds_left }
            })
        }
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(Setup::Ours),
        Err(s) => Err(anyhow::Error::new(s).context(format!("asking to set up a volume for {stream}"))),
    }
}

/// [`ensure`] once the stream is bound, or this publish may set it up.
async fn ensure_with(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    spec: &VolumeSpec,
    line: &Line,
    status: uc::Status,
) -> anyhow::Result<String> {
    let size_of = |vol: &str| status.devices.iter().find(|d| d.volume_id == vol).map_or(0, |d| d.size_bytes);
    if let Some(bound) = status.streams.iter().find(|s| s.stream == spec.stream) {
        let have = size_of(&bound.volume_id);
        let other_key = spec.other_key(ec2, &bound.volume_id).await?;
        if !other_key && have >= spec.need_bytes {
            return Ok(bound.volume_id.clone());
        }
        if !other_key && grow(ec2, c, inst, &bound.volume_id, spec, line).await? {
            return Ok(bound.volume_id.clone());
        }
        if other_key {
            line.step(format!("replacing {} (encrypted with another key)", bound.volume_id));
            tracing::info!(volume = %bound.volume_id, "stream volume under another KMS key; replacing it");
        } else {
            line.step(format!("replacing {} ({} GiB is too small)", bound.volume_id, have / GIB));
            tracing::info!(volume = %bound.volume_id, have, need = spec.need_bytes, "stream volume too small; replacing it");
        }
        let new = create_and_add(ec2, c, inst, spec, line).await?;
        forget(c, &spec.stream, spec.timeout).await?;
        associate(c, &spec.stream, &new, spec.timeout).await?;
        retire(ec2, c, &inst.instance_id, &bound.volume_id, spec.timeout).await;
        return Ok(new);
    }
    let mut status = status;
    let mut taken = Vec::new();
    loop {
        let chosen = choose(ec2, c, inst, spec, line, &status, &taken).await?;
        let Err(e) = associate(c, &spec.stream, &chosen, spec.timeout).await else { return Ok(chosen) };
        // Publishes running at once: another one may have bound our stream
        // to a volume of its own (use that one; ours stays on the unpacker
        // as a free volume, reused next or removed by remove-unused-volumes),
        // or bound the free volume we chose to its stream (choose again).
        status = c.get_status(uc::GetStatusRequest {}).await.context("GetStatus")?.into_inner();
        let size_of = |vol: &str| status.devices.iter().find(|d| d.volume_id == vol).map_or(0, |d| d.size_bytes);
        if let Some(b) = status.streams.iter().find(|s| s.stream == spec.stream)
            && b.volume_id != chosen
            && size_of(&b.volume_id) >= spec.need_bytes
        {
            tracing::info!(ours = %chosen, theirs = %b.volume_id, "another publish bound the stream first");
            line.step(format!("using {}, bound by another publish", b.volume_id));
            return Ok(b.volume_id.clone());
        }
        let bound_elsewhere = status.devices.iter().any(|d| d.volume_id == chosen && !d.stream.is_empty());
        if !bound_elsewhere || taken.len() >= 3 {
            return Err(e);
        }
        tracing::info!(volume = %chosen, "another publish took the free volume; choosing again");
        taken.push(chosen);
    }
}

/// Grow `volume` to the spec's size and wait until the unpacker sees the
/// new size. `false` when EC2 refuses the modification (the caller then
/// replaces the volume).
async fn grow(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    volume: &str,
    spec: &VolumeSpec,
    line: &Line,
) -> anyhow::Result<bool> {
    use aws_sdk_ec2::types::VolumeModificationState as M;
    let gib = spec.gib();
    line.step(format!("growing {volume} to {gib} GiB"));
    // Learned from the unpacker just now: EC2 may not know it everywhere yet.
    let learned = Some(Instant::now());
    let v =
        retry::call(&format!("DescribeVolumes {volume}"), learned, || ec2.describe_volumes().volume_ids(volume).send())
            .await?;
    let size_now = v.volumes().first().and_then(Volume::size).unwrap_or(0);
    let device = v.volumes().first().and_then(|v| attachment_here(v, &inst.instance_id)).unwrap_or_default();
    // EC2 lets the instance use the new size once the modification is
    // optimizing (or completed). One that an earlier, interrupted run (or
    // another publish) asked for counts: EC2 is asked only when none is.
    let deadline = Instant::now() + spec.timeout;
    let mut asked = false;
    // When EC2 said a modification is under way already: ours, if the
    // answer to our ModifyVolume was lost and the SDK asked again, or
    // another one. It is looked for a while before the volume is replaced.
    let mut under_way: Option<Instant> = None;
    loop {
        let mods = modifications(ec2, volume).await?;
        let latest = mods.iter().rev().find(|m| m.target_size().is_some_and(|t| t >= gib));
        match latest.and_then(|m| m.modification_state()) {
            Some(M::Optimizing | M::Completed) => break,
            // No modification to wait for: it was this size already.
            None if size_now >= gib => break,
            None | Some(M::Failed) if !asked => {
                match ec2.modify_volume().volume_id(volume).size(gib).send().await {
                    Ok(_) => {}
                    // Once in six hours per volume; but the SDK's retry of
                    // our own attempt whose answer was lost meets this too.
                    Err(e) if crate::errors::code(&e) == Some("VolumeModificationRateExceeded") => {
                        if modifying_to(ec2, volume, gib).await? {
                            tracing::info!(volume, "our modification, whose answer was lost, is under way");
                        } else {
                            tracing::warn!(volume, "{}; replacing the volume instead", sdk_error("ModifyVolume", e));
                            return Ok(false);
                        }
                    }
                    Err(e) if crate::errors::code(&e) == Some("IncorrectModificationState") => {
                        tracing::info!(volume, "{}; looking for it", sdk_error("ModifyVolume", e));
                        under_way = Some(Instant::now());
                    }
                    Err(e) => return Err(sdk_error(&format!("ModifyVolume {volume}"), e)),
                }
                asked = true;
            }
            None if under_way.is_some_and(|t| t.elapsed() > retry::LOOK_FOR) => {
                tracing::warn!(volume, "a modification to another size is under way; replacing the volume instead");
                return Ok(false);
            }
            Some(M::Failed) => {
                let why = latest.and_then(|m| m.status_message()).unwrap_or("no reason given");
                bail!("growing {volume} to {gib} GiB failed: {why}");
            }
            _ if Instant::now() > deadline => {
                bail!("{volume} was not grown to {gib} GiB within {:?}", spec.timeout);
            }
            _ => tokio::time::sleep(retry::MODIFICATION_POLL).await,
        }
    }
    // The kernel, then the unpacker, see the new size shortly after.
    loop {
        let req = AddDeviceRequest {
            volume_id: volume.to_owned(),
            attach_name: device.clone(),
            timeout_seconds: 60,
            fresh: false,
        };
        let d = c.add_device(req).await.with_context(|| format!("refreshing {volume} on the unpacker"))?.into_inner();
        if d.size_bytes >= spec.need_bytes {
            tracing::info!(volume, gib, "volume grown in place");
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("the unpacker still sees {volume} as {} bytes after growing it to {gib} GiB", d.size_bytes);
        }
        tokio::time::sleep(retry::MODIFICATION_POLL).await;
    }
}

/// Whether a modification of `volume` to at least `gib` GiB is under way or
/// done, as EC2 says now.
async fn modifying_to(ec2: &Client, volume: &str, gib: i32) -> anyhow::Result<bool> {
    use aws_sdk_ec2::types::VolumeModificationState as M;
    Ok(modifications(ec2, volume)
        .await?
        .iter()
        .any(|m| m.target_size().is_some_and(|t| t >= gib) && m.modification_state().is_some_and(|s| *s != M::Failed)))
}

/// The modifications of `volume` EC2 knows of. EC2 answers
/// InvalidVolumeModification.NotFound for a volume that was never modified
/// (aws-sdk-rust#1346): none.
async fn modifications(ec2: &Client, volume: &str) -> anyhow::Result<Vec<aws_sdk_ec2::types::VolumeModification>> {
    let out = ec2
        .describe_volumes_modifications()
        .volume_ids(volume)
        .send()
        .await
        .or_code(&[NO_MODIFICATION], format!("DescribeVolumesModifications {volume}"))?;
    Ok(out.map(|o| o.volumes_modifications().to_vec()).unwrap_or_default())
}

/// A volume for a stream that has none: a free one, else one of ours left
/// over by an interrupted run, else a new one.
async fn choose(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    spec: &VolumeSpec,
    line: &Line,
    status: &uc::Status,
    taken: &[String],
) -> anyhow::Result<String> {
    let mut free: Vec<_> = status
        .devices
        .iter()
        .filter(|d| d.stream.is_empty() && d.size_bytes >= spec.need_bytes && !taken.contains(&d.volume_id))
        .collect();
    free.sort_by_key(|d| d.size_bytes);
    for d in free {
        if !spec.other_key(ec2, &d.volume_id).await? {
            line.step(format!("using free volume {}", d.volume_id));
            return Ok(d.volume_id.clone());
        }
    }
    if let Some(v) = adopt(ec2, c, inst, spec, line).await? {
        return Ok(v);
    }
    create_and_add(ec2, c, inst, spec, line).await
}

/// How long a call on a busy stream is tried again: the unpacker answers
/// ABORTED while another caller's operation on the stream runs.
pub(crate) struct Patience(Instant);

impl Patience {
    pub(crate) fn new(limit: Duration) -> Patience {
        Patience(Instant::now() + limit)
    }

    /// Whether to try `r`'s call again: it was ABORTED and there is time
    /// left (after a short pause).
    pub(crate) async fn again<T>(&self, r: &Result<T, tonic::Status>) -> bool {
        let busy = matches!(r, Err(s) if s.code() == tonic::Code::Aborted);
        if busy && Instant::now() < self.0 {
            tokio::time::sleep(retry::BUSY_PAUSE).await;
            return true;
        }
        false
    }
}

/// Unbind the stream, waiting out another caller's operation on it for up
/// to `patience` (`--volume-timeout`).
async fn forget(c: &mut uc::Client, stream: &str, patience: Duration) -> anyhow::Result<()> {
    let patience = Patience::new(patience);
    loop {
        let r = c.forget_stream(ForgetStreamRequest { stream: stream.to_owned() }).await;
        if !patience.again(&r).await {
            r.with_context(|| format!("unbinding {stream} on the unpacker"))?;
            return Ok(());
        }
    }
}

/// Bind the stream to the volume, waiting out another caller's operation
/// on the stream for up to `patience` (`--volume-timeout`).
async fn associate(c: &mut uc::Client, stream: &str, volume: &str, patience: Duration) -> anyhow::Result<()> {
    let patience = Patience::new(patience);
    loop {
        let req = AssociateRequest { stream: stream.to_owned(), volume_id: volume.to_owned() };
        let r = c.associate_stream_with_device(req).await;
        if !patience.again(&r).await {
            r.with_context(|| format!("binding {stream} to {volume} on the unpacker"))?;
            return Ok(());
        }
    }
}

/// A volume made for this stream and instance by an earlier, interrupted
/// run: attached but never added to the unpacker, or created but never
/// attached. Added without `fresh`, so the unpacker scans what it holds.
async fn adopt(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    spec: &VolumeSpec,
    line: &Line,
) -> anyhow::Result<Option<String>> {
    let out = ec2
        .describe_volumes()
        .filters(tag_filter(tags::STREAM, &spec.stream))
        .filters(tag_filter(tags::UNPACKER_INSTANCE, &inst.instance_id))
        .send()
        .await
        .sdk("DescribeVolumes")?;
    let listed = Some(Instant::now());
    for v in out.volumes() {
        let Some(id) = v.volume_id() else { continue };
        let size = u64::try_from(v.size().unwrap_or(0)).unwrap_or(0) * GIB;
        if size < spec.need_bytes {
            continue;
        }
        let attached = attachment_here(v, &inst.instance_id);
        let state = v.state().map(|s| s.as_str().to_owned()).unwrap_or_default();
        let device = match attached {
            Some(dev) => dev,
            None if state == "available" => {
                line.step(format!("attaching left-over volume {id}"));
                attach(ec2, inst, id, listed, spec.timeout).await?
            }
            None => continue,
        };
        line.step(format!("adding left-over volume {id}"));
        add(c, id, &device, false, spec.timeout).await?;
        tracing::info!(volume = id, "reusing a volume left by an earlier run");
        return Ok(Some(id.to_owned()));
    }
    Ok(None)
}

fn attachment_here(v: &Volume, instance_id: &str) -> Option<String> {
    v.attachments()
        .iter()
        .find(|a| {
            a.instance_id() == Some(instance_id)
                && a.state()
                    .is_some_and(|s| *s == VolumeAttachmentState::Attached || *s == VolumeAttachmentState::Attaching)
        })
        .map(|a| a.device().unwrap_or_default().to_owned())
}

async fn add(c: &mut uc::Client, volume: &str, device: &str, fresh: bool, timeout: Duration) -> anyhow::Result<()> {
    let req = AddDeviceRequest {
        volume_id: volume.to_owned(),
        attach_name: device.to_owned(),
        timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX).min(600),
        fresh,
    };
    c.add_device(req).await.with_context(|| format!("adding {volume} ({device}) to the unpacker"))?;
    Ok(())
}

/// Create an encrypted volume in the instance's zone, attach it, and add it
/// to the unpacker as fresh (no scan, no zero writes).
pub async fn create_and_add(
    ec2: &Client,
    c: &mut uc::Client,
    inst: &UnpackerInstance,
    spec: &VolumeSpec,
    line: &Line,
) -> anyhow::Result<String> {
    line.step(format!("creating a {} GiB encrypted volume", spec.gib()));
    let labels = [
        (tags::NAME.to_owned(), format!("{} {}", spec.instance_name, spec.stream)),
        (tags::STREAM.to_owned(), spec.stream.clone()),
        (tags::UNPACKER_INSTANCE.to_owned(), inst.instance_id.clone()),
    ];
    // The SDK sends the same token on each of its retries: a retry after a
    // lost answer returns the volume the first attempt made.
    let out = ec2
        .create_volume()
        .client_token(retry::token())
        .availability_zone(&inst.availability_zone)
        .size(spec.gib())
        .volume_type(spec.volume_type.clone())
        .encrypted(true)
        .set_kms_key_id(spec.kms_key_id.clone())
        .tag_specifications(tags::spec(ResourceType::Volume, &labels))
        .send()
        .await
        .sdk("CreateVolume")?;
    let id = out.volume_id().context("CreateVolume returned no volume id")?.to_owned();
    let made = Some(Instant::now());
    tracing::info!(volume = %id, gib = spec.gib(), "created volume");
    wait_available(ec2, &id, made, spec.timeout).await?;
    line.step(format!("attaching {id}"));
    let device = attach(ec2, inst, &id, made, spec.timeout).await?;
    line.step(format!("waiting for {id} to appear"));
    add(c, &id, &device, true, spec.timeout).await?;
    Ok(id)
}

/// Wait until EC2 says `volume` is available; `fresh`: when this run made it.
async fn wait_available(ec2: &Client, volume: &str, fresh: Option<Instant>, timeout: Duration) -> anyhow::Result<()> {
    use aws_sdk_ec2::types::VolumeState;
    retry::wait(&format!("volume {volume} to be available"), timeout, fresh, move || async move {
        let out = match ec2.describe_volumes().volume_ids(volume).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        Ok(match out.volumes().first().and_then(Volume::state) {
            Some(VolumeState::Available) => Seen::Ready(()),
            Some(s @ (VolumeState::Error | VolumeState::Deleting | VolumeState::Deleted)) => {
                Seen::Failed(anyhow::anyhow!("volume {volume} is {}", s.as_str()))
            }
            Some(s) => Seen::NotYet(s.as_str().to_owned()),
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("volume {volume} is gone")),
        })
    })
    .await
}

/// Attach `volume` to the instance under a free device name; wait until
/// EC2 says attached. Returns the device name. `fresh`: when this run made
/// the volume.
async fn attach(
    ec2: &Client,
    inst: &UnpackerInstance,
    volume: &str,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut last_err = None;
    let mut not_yet = retry::NotYet::new(fresh);
    for letter in 'f'..='z' {
        let device = format!("/dev/sd{letter}");
        let xvd = format!("/dev/xvd{letter}");
        if inst.device_names.iter().any(|d| *d == device || *d == xvd) {
            continue;
        }
        let e = loop {
            match ec2.attach_volume().volume_id(volume).instance_id(&inst.instance_id).device(&device).send().await {
                Ok(_) => {
                    wait_attached(ec2, volume, &inst.instance_id, fresh, timeout).await?;
                    return Ok(device);
                }
                Err(e) if not_yet.again("AttachVolume", &e).await => {}
                Err(e) => break e,
            }
        };
        // The SDK's retry of an attempt whose answer was lost finds the
        // volume attached already: that attempt's device is the one.
        if let Some(dev) = attached_to(ec2, volume, &inst.instance_id).await? {
            wait_attached(ec2, volume, &inst.instance_id, fresh, timeout).await?;
            return Ok(dev);
        }
        // Another publish took this name since we looked: try the next.
        if e.as_service_error().and_then(|s| s.message()).is_some_and(|m| m.contains("in use")) {
            last_err = Some(sdk_error("AttachVolume", e));
            continue;
        }
        return Err(sdk_error(&format!("AttachVolume {volume} to {}", inst.instance_id), e));
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no free device name /dev/sdf..sdz on {}", inst.instance_id)))
}

/// The device under which `volume` is attached (or attaching) to the
/// instance, as EC2 says now.
async fn attached_to(ec2: &Client, volume: &str, instance_id: &str) -> anyhow::Result<Option<String>> {
    let out = ec2.describe_volumes().volume_ids(volume).send().await.sdk(format!("DescribeVolumes {volume}"))?;
    Ok(out.volumes().first().and_then(|v| attachment_here(v, instance_id)))
}

async fn wait_attached(
    ec2: &Client,
    volume: &str,
    instance_id: &str,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let what = format!("volume {volume} to be attached to {instance_id}");
    retry::wait(&what, timeout, fresh, move || async move {
        let out = match ec2.describe_volumes().volume_ids(volume).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        let state = out.volumes().first().and_then(|v| {
            v.attachments().iter().find(|a| a.instance_id() == Some(instance_id)).and_then(|a| a.state().cloned())
        });
        Ok(match state {
            Some(VolumeAttachmentState::Attached) => Seen::Ready(()),
            Some(s) => Seen::NotYet(s.as_str().to_owned()),
            None => Seen::NotYet("no attachment yet".to_owned()),
        })
    })
    .await
}

/// Take a volume out of service: the unpacker forgets it, EC2 detaches and
/// deletes it.
pub async fn remove(
    ec2: &Client,
    c: &mut uc::Client,
    instance_id: &str,
    volume: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    c.remove_device(RemoveDeviceRequest { volume_id: volume.to_owned() }).await.context("RemoveDevice")?;
    detach_and_delete(ec2, instance_id, volume, timeout).await
}

/// Detach a volume from an instance (always naming the instance) and delete it.
pub async fn detach_and_delete(ec2: &Client, instance_id: &str, volume: &str, timeout: Duration) -> anyhow::Result<()> {
    match ec2.detach_volume().volume_id(volume).instance_id(instance_id).send().await {
        Ok(_) => {}
        // Detached already: by the first attempt of this call (its answer
        // lost, the SDK asked again), or by someone else.
        Err(e)
            if crate::errors::code(&e) == Some("IncorrectState")
                && attached_to(ec2, volume, instance_id).await?.is_none() => {}
        Err(e) => return Err(sdk_error(&format!("DetachVolume {volume}"), e)),
    }
    wait_available(ec2, volume, None, timeout).await.with_context(|| format!("detaching {volume}"))?;
    match ec2.delete_volume().volume_id(volume).send().await {
        Ok(_) => Ok(()),
        // Deleted by an attempt whose answer was lost.
        Err(e) if crate::errors::code(&e) == Some("InvalidVolume.NotFound") => Ok(()),
        Err(e) => Err(sdk_error(&format!("DeleteVolume {volume}"), e)),
    }
}

/// Retire a replaced volume. Failure is not the publish's failure: the
/// volume is then tagged to expire now, so `expire` removes it.
async fn retire(ec2: &Client, c: &mut uc::Client, instance_id: &str, volume: &str, timeout: Duration) {
    match remove(ec2, c, instance_id, volume, timeout).await {
        Ok(()) => tracing::info!(volume, "deleted the replaced volume"),
        Err(e) => {
            tracing::warn!(volume, error = %format!("{e:#}"), "could not delete the replaced volume; tagging it to expire");
            let _ = ec2
                .create_tags()
                .resources(volume)
                .tags(tags::tag(tags::EXPIRES_AT, &tags::rfc3339(SystemTime::now())))
                .send()
                .await;
        }
    }
}
