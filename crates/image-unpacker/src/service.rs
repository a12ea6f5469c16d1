//! The gRPC service: every RPC of `proto/unpacker.proto`.
//!
//! **Invariants:** every call needs the drive-unpacker right ([`RIGHTS`],
//! applied to every call by one layer around the whole server, see
//! `lib.rs`, before any handler runs); one long
//! operation per stream at a time (a second gets ABORTED naming the one
//! running, and may try again); a long operation runs in its own task, so a caller that
//! goes away does not cut an unpack short; the state lock is never held
//! across I/O on a device or the network.
//!
//! **Capture holds:** an unpack or capture may ask to hold the device at its
//! leaf for a while, so that the caller can start a snapshot before anything
//! else writes it (an EBS snapshot is of the moment it is started). Each
//! hold has an owner (the caller's hold id): several callers capturing the
//! same leaf each hold it, and ReleaseCapture ends only the caller's own. While
//! any hold lasts, an unpack of another leaf, a scan and ForgetStream wait for
//! all of them to end (released, or their time runs out). Reads, captures and
//! an unpack of the held leaf itself (which changes nothing, and is what a
//! re-run of an interrupted publish does) go ahead.

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_proto::unpacker::{
    AddDeviceRequest, AssociateRequest, Capture, ClaimDeviceRequest, Device, Empty, ForgetStreamRequest, GetRawRequest,
    GetStatusRequest, Lease, LeaseRequest, PrepareForCaptureRequest, PrepareForUnpackRequest, Progress, RawData,
    ReleaseCaptureRequest, RemoveDeviceRequest, Status as UnpackerStatus, StreamStatus, UnpackImageRequest,
    UnpackStats, image_unpacker_server::ImageUnpacker,
};
use fleet_tls::{Right, Rights, TlsFiles};
use futures::{Stream, StreamExt as _};
use image_format::{DEFAULT_CHUNK_SIZE, ImageName, Manifest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    blockdev, devices,
    engine::{self, Counters, ReadBack},
    metrics::Metrics,
    state::{CaptureHolds, Content, DeviceRecord, Phase, State, StreamRecord, now_unix, now_unix_ms},
};

/// How long AddDevice waits when the caller gives no timeout.
pub(crate) const DEFAULT_ADD_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest AddDevice waits whatever the caller asks.
pub(crate) const MAX_ADD_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest capture hold granted, whatever the caller asks.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(900);
/// The longest set-up lease granted, whatever the caller asks.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(900);
/// How often a caller waiting for a capture hold is told it still waits.
pub(crate) const WAIT_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The right each ImageUnpacker method needs: all of them need
/// drive-unpacker. A method missing here is refused to everyone, so a new
/// RPC needs an entry before anyone can call it.
pub const RIGHTS: Rights = Rights::new(&[
    ("/fleet.unpacker.v1.ImageUnpacker/GetStatus", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/AddDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/RemoveDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ClaimDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/AssociateStreamWithDevice", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/LeaseStreamSetup", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/PrepareForUnpack", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/UnpackImage", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/PrepareForCapture", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ReleaseCapture", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/ForgetStream", Right::DriveUnpacker),
    ("/fleet.unpacker.v1.ImageUnpacker/GetRaw", Right::DriveUnpacker),
]);

type ProgressStream = Pin<Box<dyn Stream<Item = Result<Progress, Status>> + Send>>;
type RawStream = Pin<Box<dyn Stream<Item = Result<RawData, Status>> + Send>>;

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub device_dir: PathBuf,
    pub image_server: String,
    pub tls: TlsFiles,
}

struct Inner {
    state: Mutex<State>,
    busy: Mutex<HashMap<String, &'static str>>,
    /// Set-up leases of streams that have no device yet: owner and end.
    /// In memory only: a restart ends them, and a publisher that then finds
    /// the stream unbound asks again.
    leases: Mutex<HashMap<String, (String, Instant)>>,
    released: tokio::sync::Notify,
    config: ServiceConfig,
    metrics: Arc<Metrics>,
}

/// The unpacker service (cheap to clone).
#[derive(Clone)]
pub struct Unpacker(Arc<Inner>);

/// Holds a stream's "busy" mark; dropping it frees the stream.
struct BusyGuard {
    inner: Arc<Inner>,
    stream: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.inner.busy.lock().expect("busy lock").remove(&self.stream);
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn check_stream(stream: &str) -> Result<(), Status> {
    image_format::validate_stream(stream).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn check_volume(volume_id: &str) -> Result<(), Status> {
    devices::validate_volume_id(volume_id).map_err(Status::invalid_argument)
}

fn device_error(e: blockdev::DeviceError) -> Status {
    match e {
        blockdev::DeviceError::Io { .. } | blockdev::DeviceError::NotADevice(_) => Status::not_found(e.to_string()),
        _ => Status::failed_precondition(e.to_string()),
    }
}

/// The status for a failure talking to the imageserver at `server` while
/// doing `what`. Damaged data is DATA_LOSS (a retry gets the same bytes);
/// a connection or server failure is UNAVAILABLE (a re-run resumes); a
/// refusal keeps the imageserver's code.
fn client_error(server: &str, what: &str, e: &image_client::ClientError) -> Status {
    use image_client::ClientError as E;
    use tonic::Code;
    let msg = image_client::error_chain(e);
    if e.is_data_loss() {
        return Status::data_loss(format!(
            "{what}: imageserver {server} sent damaged data: {msg}; not retried: the imageserver's store needs repair \
             (imagetool verify names the damage)"
        ));
    }
    match e {
        E::Rpc { status, .. } => match status.code() {
            Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted => Status::unavailable(format!(
                "{what} stopped: imageserver {server} failed: {msg}; a re-run resumes (what was written is kept)"
            )),
            code => Status::new(code, format!("{what}: imageserver {server}: {msg}")),
        },
        E::Connect { .. } | E::Tls(_) => Status::unavailable(format!("{what}: {msg}")),
        _ => Status::data_loss(format!("{what}: imageserver {server}: {msg}")),
    }
}

impl Unpacker {
    /// The service over the state in `state_dir`.
    pub fn new(state_dir: &std::path::Path, config: ServiceConfig, metrics: Arc<Metrics>) -> anyhow::Result<Unpacker> {
        let state = State::load(state_dir)?;
        Ok(Unpacker(Arc::new(Inner {
            state: Mutex::new(state),
            busy: Mutex::default(),
            leases: Mutex::default(),
            released: tokio::sync::Notify::new(),
            config,
            metrics,
        })))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().expect("state lock")
    }

    /// Hold `stream`'s device at `leaf` for `seconds` (capped at
    /// [`MAX_HOLD`]) for the caller `id`; that caller's hold is only ever
    /// extended. Holds of another leaf cannot be current (an unpack of
    /// another leaf waits for them), so any left are stale and dropped.
    /// Recorded in the state file, so a restart keeps them.
    fn hold(&self, stream: &str, leaf: &str, id: &str, seconds: u32) {
        if seconds == 0 {
            return;
        }
        let span = Duration::from_secs(u64::from(seconds)).min(MAX_HOLD);
        let until = now_unix_ms().saturating_add(u64::try_from(span.as_millis()).unwrap_or(u64::MAX));
        let mut state = self.state();
        let h = state.capture_holds.entry(stream.to_owned()).or_default();
        if h.leaf != leaf {
            *h = CaptureHolds { leaf: leaf.to_owned(), ..Default::default() };
        }
        let end = h.until_unix_ms.entry(id.to_owned()).or_insert(until);
        *end = (*end).max(until);
        if let Err(e) = state.save() {
            tracing::warn!(stream, "capture hold not saved (it lasts until a restart): {e:#}");
        }
        tracing::info!(stream, leaf, hold = id, seconds, "device held for capture");
    }

    /// Time left of the holds on `stream` and the leaf they hold, if any
    /// (expired holds are dropped).
    fn holds_left(state: &mut State, stream: &str) -> Option<(Duration, String)> {
        let now = now_unix_ms();
        let h = state.capture_holds.get_mut(stream)?;
        h.until_unix_ms.retain(|id, until| {
            let live = *until > now;
            if !live {
                tracing::warn!(stream, hold = %id, "capture hold ran out without a release");
            }
            live
        });
        let Some(left) = h.until_unix_ms.values().map(|u| u - now).max() else {
            state.capture_holds.remove(stream);
            return None;
        };
        Some((Duration::from_millis(left), h.leaf.clone()))
    }

    fn hold_left(&self, stream: &str) -> Option<(Duration, String)> {
        Self::holds_left(&mut self.state(), stream)
    }

    /// End the caller `id`'s hold on `stream` (others' holds stay).
    fn release(&self, stream: &str, id: &str) {
        let mut state = self.state();
        if let Some(h) = state.capture_holds.get_mut(stream)
            && h.until_unix_ms.remove(id).is_some()
        {
            tracing::info!(stream, hold = id, "capture hold released");
            if h.until_unix_ms.is_empty() {
                state.capture_holds.remove(stream);
            }
            if let Err(e) = state.save() {
                tracing::warn!(stream, "capture hold release not saved: {e:#}");
            }
        }
        drop(state);
        self.0.released.notify_waiters();
    }

    /// Drop every hold on `stream` (its device no longer holds the leaf).
    fn release_all(&self, stream: &str) {
        let mut state = self.state();
        if state.capture_holds.remove(stream).is_some()
            && let Err(e) = state.save()
        {
            tracing::warn!(stream, "capture hold release not saved: {e:#}");
        }
        drop(state);
        self.0.released.notify_waiters();
    }

    /// What blocks `stream` for a writer of `leaf` (`None`: a scan): a
    /// capture hold of another leaf, with the time it has left.
    fn blocking_hold(&self, stream: &str, leaf: Option<&str>) -> Option<(Duration, String)> {
        self.hold_left(stream).filter(|(_, held)| leaf != Some(held.as_str()))
    }

    /// Wait until no capture hold is on `stream`, unless the hold is of
    /// `leaf` (the caller would write what is already there). `waiting` is
    /// told what is waited for at once and then every [`WAIT_REPORT_EVERY`].
    async fn wait_unheld(&self, stream: &str, leaf: Option<&str>, mut waiting: impl FnMut(String)) {
        let mut said = false;
        loop {
            // Registered before the check, so a release in between is seen.
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let Some((left, held)) = self.blocking_hold(stream, leaf) else { return };
            if !said {
                tracing::info!(stream, left = ?left, "waiting for a capture hold to end");
                said = true;
            }
            waiting(format!(
                "stream {stream} is held for the capture of leaf {held} by another caller ({}s left at most)",
                left.as_secs()
            ));
            tokio::select! {
                () = &mut released => {}
                () = tokio::time::sleep(left.min(WAIT_REPORT_EVERY)) => {}
            }
        }
    }

    /// `start` once no capture hold blocks `stream` for `leaf`: at once when
    /// none does, else in a task that tells the caller what it waits for
    /// (phase "waiting") and then passes on `start`'s progress. The wait
    /// and what follows go on if the caller goes away, as every long
    /// operation does.
    fn after_holds(
        &self,
        stream: &str,
        leaf: Option<&str>,
        start: impl FnOnce(Unpacker) -> Result<ProgressStream, Status> + Send + 'static,
    ) -> Result<ProgressStream, Status> {
        if self.blocking_hold(stream, leaf).is_none() {
            return start(self.clone());
        }
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        let (stream, leaf) = (stream.to_owned(), leaf.map(str::to_owned));
        tokio::spawn(async move {
            let tell = |detail: String| {
                let _ = tx.try_send(Ok(Progress { phase: "waiting".into(), detail, ..Default::default() }));
            };
            me.wait_unheld(&stream, leaf.as_deref(), tell).await;
            match start(me) {
                Ok(mut progress) => {
                    while let Some(p) = progress.next().await {
                        let _ = tx.send(p).await;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Mark a stream busy with `what`, or say what it is busy with.
    fn claim(&self, stream: &str, what: &'static str) -> Result<BusyGuard, Status> {
        let mut busy = self.0.busy.lock().expect("busy lock");
        if let Some(running) = busy.get(stream) {
            // ABORTED: a concurrency conflict; the caller may try again.
            return Err(Status::aborted(format!("stream {stream} is busy: {running} is running")));
        }
        busy.insert(stream.to_owned(), what);
        Ok(BusyGuard { inner: self.0.clone(), stream: stream.to_owned() })
    }

    fn save(&self, state: &mut State) -> Result<(), Status> {
        state.touch();
        state.save().map_err(internal)
    }

    fn stream_status(state: &State, name: &str) -> StreamStatus {
        let Some(s) = state.streams.get(name) else {
            return StreamStatus { stream: name.to_owned(), ..Default::default() };
        };
        StreamStatus {
            stream: name.to_owned(),
            volume_id: s.volume_id.clone(),
            device_path: state.devices.get(&s.volume_id).map(|d| d.path.display().to_string()).unwrap_or_default(),
            state: s.phase.proto().into(),
            leaf: s.leaf.clone().unwrap_or_default(),
            image_id: s.image_id.clone().unwrap_or_default(),
            image_size: s.image_size,
            // Filled in by `status`, which sees the holds.
            hold_seconds: 0,
            hold_leaf: String::new(),
        }
    }

    fn device_proto(state: &State, volume_id: &str, d: &DeviceRecord) -> Device {
        Device {
            volume_id: volume_id.to_owned(),
            path: d.path.display().to_string(),
            size_bytes: d.size,
            kind: d.kind.as_str().to_owned(),
            stream: state.stream_of(volume_id).unwrap_or_default().to_owned(),
        }
    }

    /// Devices, streams and idle time.
    pub fn status(&self) -> UnpackerStatus {
        let mut state = self.state();
        let names: Vec<String> = state.streams.keys().cloned().collect();
        let streams: Vec<StreamStatus> = names
            .iter()
            .map(|s| {
                let (left, leaf) = Self::holds_left(&mut state, s).unwrap_or_default();
                let secs = if left.is_zero() { 0 } else { u32::try_from(left.as_secs().max(1)).unwrap_or(u32::MAX) };
                StreamStatus { hold_seconds: secs, hold_leaf: leaf, ..Self::stream_status(&state, s) }
            })
            .collect();
        let held = streams.iter().any(|s| s.hold_seconds > 0);
        let busy = held || !self.0.busy.lock().expect("busy lock").is_empty();
        UnpackerStatus {
            devices: state.devices.iter().map(|(v, d)| Self::device_proto(&state, v, d)).collect(),
            streams,
            idle_seconds: if busy { 0 } else { now_unix().saturating_sub(state.last_used_unix) },
            busy,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            image_server: self.0.config.image_server.clone(),
        }
    }

    /// [`Unpacker::status`] as JSON, for the HTTP status page.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.status();
        serde_json::json!({
            "version": s.version,
            "image_server": s.image_server,
            "idle_seconds": s.idle_seconds,
            "busy": s.busy,
            "devices": s.devices.iter().map(|d| serde_json::json!({
                "volume_id": d.volume_id, "path": d.path, "size_bytes": d.size_bytes, "kind": d.kind, "stream": d.stream,
            })).collect::<Vec<_>>(),
            "streams": s.streams.iter().map(|t| serde_json::json!({
                "stream": t.stream, "volume_id": t.volume_id, "state": t.state().as_str_name(),
                "leaf": t.leaf, "image_id": t.image_id, "image_size": t.image_size, "hold_seconds": t.hold_seconds, "hold_leaf": t.hold_leaf,
            })).collect::<Vec<_>>(),
        })
    }

    /// Record a device found at `path`.
    fn record_device(
        &self,
        volume_id: &str,
        path: PathBuf,
        attach_name: Option<String>,
        fresh: bool,
    ) -> Result<Device, Status> {
        let (kind, size) = blockdev::inspect(&path).map_err(device_error)?;
        let mut state = self.state();
        if let Some((other, _)) = state.devices.iter().find(|(v, d)| d.path == path && v.as_str() != volume_id) {
            return Err(Status::already_exists(format!("'{}' is already recorded as {other}", path.display())));
        }
        let old = state.devices.get(volume_id);
        let grown = old.is_some_and(|d| d.path == path && size > d.size);
        let changed = old.is_none_or(|d| d.path != path || d.size != size);
        if grown && !fresh {
            // Grown in place (ModifyVolume): the bytes are where they were and
            // the new part reads as zeros, so what it holds is still known.
            tracing::info!(volume = volume_id, size, "device grew");
            if let Some(d) = state.devices.get_mut(volume_id) {
                d.size = size;
            }
        } else if changed || fresh {
            let stream = state.stream_of(volume_id).map(str::to_owned);
            if let Some(s) = stream.filter(|_| fresh) {
                return Err(Status::failed_precondition(format!(
                    "{volume_id} is bound to stream {s}; it cannot be declared fresh"
                )));
            }
            state.devices.insert(
                volume_id.to_owned(),
                DeviceRecord { path, size, kind, attach_name, content_id: None, content: Content::Unknown },
            );
            state.set_content(volume_id, if fresh { Content::Fresh } else { Content::Unknown }).map_err(internal)?;
        }
        self.save(&mut state)?;
        let d = &state.devices[volume_id];
        tracing::info!(volume = volume_id, path = %d.path.display(), size = d.size, fresh, "device recorded");
        Ok(Self::device_proto(&state, volume_id, d))
    }

    /// Look up a stream's device: (volume id, path, size, content).
    fn binding(&self, stream: &str) -> Result<(String, PathBuf, u64, Content), Status> {
        let state = self.state();
        let rec = state.streams.get(stream).ok_or_else(|| {
            Status::failed_precondition(format!("stream {stream} is not associated with a device; associate it first"))
        })?;
        let dev = state.devices.get(&rec.volume_id).ok_or_else(|| {
            Status::failed_precondition(format!("device {} of stream {stream} was removed", rec.volume_id))
        })?;
        Ok((rec.volume_id.clone(), dev.path.clone(), dev.size, dev.content.clone()))
    }

    fn set_phase(&self, stream: &str, phase: Phase) -> Result<(), Status> {
        let mut state = self.state();
        if let Some(s) = state.streams.get_mut(stream) {
            s.phase = phase;
            if matches!(phase, Phase::Dirty | Phase::Scanning | Phase::Unpacking) {
                s.leaf = None;
                s.image_id = None;
                s.image_size = 0;
            }
        }
        self.save(&mut state)
    }

    /// Scan the stream's device and record what it holds.
    async fn scan(
        &self,
        stream: &str,
        chunk_size: u32,
        progress: &mpsc::Sender<Result<Progress, Status>>,
    ) -> Result<(), Status> {
        let (volume_id, path, size, _) = self.binding(stream)?;
        {
            let mut state = self.state();
            state.set_content(&volume_id, Content::Unknown).map_err(internal)?;
        }
        self.set_phase(stream, Phase::Scanning)?;
        tracing::info!(stream, volume = %volume_id, "scanning the device");
        let done = Arc::new(AtomicU64::new(0));
        let job = {
            let done = done.clone();
            tokio::task::spawn_blocking(move || engine::scan(&path, chunk_size, &done))
        };
        let mut job = std::pin::pin!(job);
        let result = loop {
            tokio::select! {
                r = &mut job => break r.expect("scan does not panic"),
                () = tokio::time::sleep(engine::PROGRESS_EVERY) => {
                    let p = Progress { phase: "scanning".into(), done_bytes: done.load(Ordering::Relaxed), total_bytes: size, ..Default::default() };
                    let _ = progress.try_send(Ok(p));
                }
            }
        };
        match result {
            Ok(m) => {
                let mut state = self.state();
                state.set_content(&volume_id, Content::Known(m)).map_err(internal)?;
                drop(state);
                Metrics::add(&self.0.metrics.scans, 1);
                self.set_phase(stream, Phase::Prepared)
            }
            Err(e) => {
                self.set_phase(stream, Phase::Dirty)?;
                Err(Status::unavailable(format!("scanning device {volume_id} failed: {e}")))
            }
        }
    }

    /// The whole of an unpack; progress goes to `progress`.
    async fn unpack(
        &self,
        stream: &str,
        leaf: &str,
        progress: &mpsc::Sender<Result<Progress, Status>>,
    ) -> Result<Progress, Status> {
        let name = ImageName::new(stream, leaf).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let cfg = &self.0.config;
        let what = format!("unpack of {name}");
        let fail = |e: &image_client::ClientError| client_error(&cfg.image_server, &what, e);
        let mut client = image_client::connect(&cfg.image_server, &cfg.tls).await.map_err(|e| fail(&e))?;
        let (_, manifest) = image_client::get_manifest(&mut client, &name).await.map_err(|e| fail(&e))?;
        let (volume_id, path, size, mut content) = self.binding(stream)?;
        if manifest.size() > size {
            return Err(Status::failed_precondition(format!(
                "{name} needs {} bytes but device {volume_id} holds only {size}",
                manifest.size()
            )));
        }
        let comparable = match &content {
            Content::Known(m) => m.chunk_size() == manifest.chunk_size(),
            Content::Fresh => true,
            Content::Unknown => false,
        };
        if !comparable {
            self.scan(stream, manifest.chunk_size(), progress).await?;
            content = self.binding(stream)?.3;
        }
        let file = blockdev::open_for_write(&path).map_err(device_error)?;
        let diff = match &content {
            Content::Fresh => manifest.diff_from(None),
            Content::Known(m) => manifest.diff_from(Some(m)),
            Content::Unknown => return Err(Status::internal("device content unknown after a scan")),
        };
        let total = engine::bytes_to_write(&manifest, &diff);
        tracing::info!(image = %name, volume = %volume_id, fetch = diff.fetch.len(), zero = diff.zero.len(), "unpacking");
        {
            let mut state = self.state();
            state.set_content(&volume_id, Content::Unknown).map_err(internal)?;
        }
        self.set_phase(stream, Phase::Unpacking)?;
        let counters = Arc::new(Counters::default());
        let tick = {
            let counters = counters.clone();
            let progress = progress.clone();
            move || {
                let p = Progress {
                    phase: "writing".into(),
                    done_bytes: counters.done_bytes.load(Ordering::Relaxed),
                    total_bytes: total,
                    ..Default::default()
                };
                let _ = progress.try_send(Ok(p));
            }
        };
        let result = engine::apply(file, client, &manifest, &diff, counters, self.0.metrics.clone(), tick).await;
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.set_phase(stream, Phase::Dirty)?;
                return Err(match &e {
                    engine::UnpackError::Fetch(c) => fail(c),
                    engine::UnpackError::Write(_) => Status::unavailable(format!("{e} (device {volume_id})")),
                });
            }
        };
        self.finish_unpack(stream, &volume_id, &name, manifest)?;
        tracing::info!(image = %name, volume = %volume_id, written = stats.chunks_written, zeroed = stats.chunks_zeroed,
            fetched_bytes = stats.bytes_fetched, seconds = stats.seconds, "unpacked");
        let state = self.state();
        Ok(Progress {
            phase: "done".into(),
            done_bytes: total,
            total_bytes: total,
            stats: Some(stats),
            result: Some(Self::stream_status(&state, stream)),
            ..Default::default()
        })
    }

    fn finish_unpack(&self, stream: &str, volume_id: &str, name: &ImageName, manifest: Manifest) -> Result<(), Status> {
        let mut state = self.state();
        let (id, size) = (manifest.image_id().to_hex(), manifest.size());
        state.set_content(volume_id, Content::Known(manifest)).map_err(internal)?;
        if let Some(s) = state.streams.get_mut(stream) {
            s.phase = Phase::Unpacked;
            s.leaf = Some(name.leaf().to_owned());
            s.image_id = Some(id);
            s.image_size = size;
        }
        self.save(&mut state)
    }

    /// PrepareForUnpack once no capture hold is in the way.
    fn start_prepare(&self, r: PrepareForUnpackRequest) -> Result<ProgressStream, Status> {
        let guard = self.claim(&r.stream, "prepare-for-unpack")?;
        let (_, _, _, content) = self.binding(&r.stream)?;
        let stream = r.stream.clone();
        if r.skip_if_prepared && content != Content::Unknown {
            let mut state = self.state();
            if let Some(s) = state.streams.get_mut(&stream).filter(|s| matches!(s.phase, Phase::Unprepared)) {
                s.phase = Phase::Prepared;
            }
            self.save(&mut state)?;
            let done = Progress {
                phase: "done".into(),
                result: Some(Self::stream_status(&state, &stream)),
                ..Default::default()
            };
            return Ok(Box::pin(futures::stream::iter([Ok(done)])));
        }
        let chunk_size = match &content {
            Content::Known(m) => m.chunk_size(),
            _ => DEFAULT_CHUNK_SIZE,
        };
        let job = move |me: Unpacker, tx: mpsc::Sender<Result<Progress, Status>>| async move {
            me.scan(&stream, chunk_size, &tx).await?;
            let state = me.state();
            Ok(Progress {
                phase: "done".into(),
                result: Some(Self::stream_status(&state, &stream)),
                ..Default::default()
            })
        };
        let progress = self.spawn_long(guard, job);
        if r.do_not_wait {
            let started = Progress { phase: "scanning".into(), ..Default::default() };
            return Ok(Box::pin(futures::stream::iter([Ok(started)])));
        }
        Ok(progress)
    }

    /// UnpackImage once no capture hold of another leaf is in the way.
    fn start_unpack(&self, r: UnpackImageRequest) -> Result<ProgressStream, Status> {
        let guard = self.claim(&r.stream, "unpack")?;
        self.binding(&r.stream)?;
        let job = move |me: Unpacker, tx: mpsc::Sender<Result<Progress, Status>>| async move {
            let result = me.unpack(&r.stream, &r.leaf, &tx).await;
            match &result {
                Ok(_) => {
                    Metrics::add(&me.0.metrics.unpacks, 1);
                    // Before the busy mark goes, so no writer slips in.
                    me.hold(&r.stream, &r.leaf, &r.hold_id, r.hold_seconds);
                }
                Err(e) => {
                    Metrics::add(&me.0.metrics.unpack_failures, 1);
                    tracing::warn!(stream = %r.stream, leaf = %r.leaf, error = %e.message(), "unpack failed");
                }
            }
            result
        };
        Ok(self.spawn_long(guard, job))
    }

    /// Run `job` in its own task, streaming its progress and final message.
    fn spawn_long<F, Fut>(&self, guard: BusyGuard, job: F) -> ProgressStream
    where
        F: FnOnce(Unpacker, mpsc::Sender<Result<Progress, Status>>) -> Fut,
        Fut: Future<Output = Result<Progress, Status>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        let work = job(self.clone(), tx.clone());
        tokio::spawn(async move {
            let result = work.await;
            drop(guard);
            let _ = tx.send(result).await;
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl ImageUnpacker for Unpacker {
    async fn get_status(&self, _req: Request<GetStatusRequest>) -> Result<Response<UnpackerStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn add_device(&self, req: Request<AddDeviceRequest>) -> Result<Response<Device>, Status> {
        let r = req.into_inner();
        check_volume(&r.volume_id)?;
        let timeout = match r.timeout_seconds {
            0 => DEFAULT_ADD_TIMEOUT,
            s => Duration::from_secs(u64::from(s)).min(MAX_ADD_TIMEOUT),
        };
        let attach = Some(r.attach_name.clone()).filter(|a| !a.is_empty());
        let deadline = Instant::now() + timeout;
        let dir = self.0.config.device_dir.clone();
        let path = loop {
            if let Some(p) = devices::find_volume(&dir, &r.volume_id, attach.as_deref()) {
                break p;
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "volume {} did not appear under '{}' (as {}) within {}s",
                    r.volume_id,
                    dir.display(),
                    devices::nitro_name(&r.volume_id),
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Response::new(self.record_device(&r.volume_id, path, attach, r.fresh)?))
    }

    async fn remove_device(&self, req: Request<RemoveDeviceRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        check_volume(&r.volume_id)?;
        let mut state = self.state();
        if !state.devices.contains_key(&r.volume_id) {
            return Err(Status::not_found(format!("device {} is not recorded", r.volume_id)));
        }
        if let Some(s) = state.stream_of(&r.volume_id) {
            return Err(Status::failed_precondition(format!(
                "device {} is bound to stream {s}; forget the stream first",
                r.volume_id
            )));
        }
        state.set_content(&r.volume_id, Content::Unknown).map_err(internal)?;
        state.devices.remove(&r.volume_id);
        self.save(&mut state)?;
        tracing::info!(volume = %r.volume_id, "device removed");
        Ok(Response::new(Empty {}))
    }

    async fn claim_device(&self, req: Request<ClaimDeviceRequest>) -> Result<Response<Device>, Status> {
        let r = req.into_inner();
        check_volume(&r.volume_id)?;
        if r.path.is_empty() {
            return Err(Status::invalid_argument("claim-device needs the device's path"));
        }
        let path =
            std::fs::canonicalize(&r.path).map_err(|e| Status::not_found(format!("device path '{}': {e}", r.path)))?;
        Ok(Response::new(self.record_device(&r.volume_id, path, None, r.fresh)?))
    }

    async fn lease_stream_setup(&self, req: Request<LeaseRequest>) -> Result<Response<Lease>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        if r.owner.is_empty() {
            return Err(Status::invalid_argument("a set-up lease needs an owner"));
        }
        if let Some(s) = self.state().streams.get(&r.stream) {
            return Ok(Response::new(Lease { bound_volume_id: s.volume_id.clone(), ..Default::default() }));
        }
        let mut leases = self.0.leases.lock().expect("lease lock");
        let now = Instant::now();
        leases.retain(|_, (_, end)| *end > now);
        match leases.get(&r.stream) {
            Some((owner, end)) if *owner != r.owner => {
                let left = u32::try_from(end.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX);
                return Ok(Response::new(Lease {
                    holder: owner.clone(),
                    seconds_left: left.max(1),
                    ..Default::default()
                }));
            }
            _ => {}
        }
        if r.seconds == 0 {
            leases.remove(&r.stream);
            return Ok(Response::new(Lease::default()));
        }
        let seconds = Duration::from_secs(u64::from(r.seconds)).min(MAX_LEASE);
        leases.insert(r.stream.clone(), (r.owner.clone(), now + seconds));
        tracing::info!(stream = %r.stream, owner = %r.owner, ?seconds, "stream set-up leased");
        let left = u32::try_from(seconds.as_secs()).unwrap_or(u32::MAX);
        Ok(Response::new(Lease { granted: true, holder: r.owner, seconds_left: left, ..Default::default() }))
    }

    async fn associate_stream_with_device(
        &self,
        req: Request<AssociateRequest>,
    ) -> Result<Response<StreamStatus>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        check_volume(&r.volume_id)?;
        let _busy = self.claim(&r.stream, "associate")?;
        let mut state = self.state();
        let Some(dev) = state.devices.get(&r.volume_id) else {
            return Err(Status::failed_precondition(format!("device {} is not recorded; add it first", r.volume_id)));
        };
        let known = dev.content != Content::Unknown;
        match state.stream_of(&r.volume_id) {
            Some(s) if s == r.stream => return Ok(Response::new(Self::stream_status(&state, &r.stream))),
            Some(s) => {
                return Err(Status::failed_precondition(format!(
                    "device {} is bound to stream {s}; forget that stream first",
                    r.volume_id
                )));
            }
            None => {}
        }
        if let Some(s) = state.streams.get(&r.stream) {
            return Err(Status::failed_precondition(format!(
                "stream {} is bound to device {}; forget the stream first",
                r.stream, s.volume_id
            )));
        }
        self.0.leases.lock().expect("lease lock").remove(&r.stream);
        state.streams.insert(
            r.stream.clone(),
            StreamRecord {
                volume_id: r.volume_id.clone(),
                phase: if known { Phase::Prepared } else { Phase::Unprepared },
                leaf: None,
                image_id: None,
                image_size: 0,
            },
        );
        self.save(&mut state)?;
        tracing::info!(stream = %r.stream, volume = %r.volume_id, "stream associated");
        Ok(Response::new(Self::stream_status(&state, &r.stream)))
    }

    type PrepareForUnpackStream = ProgressStream;

    async fn prepare_for_unpack(
        &self,
        req: Request<PrepareForUnpackRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        // A scan resets what the stream is known to hold: not under a hold.
        let (_, _, _, known) = self.binding(&r.stream)?;
        if r.skip_if_prepared && known != Content::Unknown {
            return Ok(Response::new(self.start_prepare(r)?));
        }
        let stream = r.stream.clone();
        Ok(Response::new(self.after_holds(&stream, None, move |me| me.start_prepare(r))?))
    }

    type UnpackImageStream = ProgressStream;

    async fn unpack_image(&self, req: Request<UnpackImageRequest>) -> Result<Response<ProgressStream>, Status> {
        let r = req.into_inner();
        ImageName::new(&r.stream, &r.leaf).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.binding(&r.stream)?;
        let (stream, leaf) = (r.stream.clone(), r.leaf.clone());
        Ok(Response::new(self.after_holds(&stream, Some(&leaf), move |me| me.start_unpack(r))?))
    }

    async fn prepare_for_capture(&self, req: Request<PrepareForCaptureRequest>) -> Result<Response<Capture>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        let _guard = self.claim(&r.stream, "prepare-for-capture")?;
        let (volume_id, path, _, content) = self.binding(&r.stream)?;
        let (leaf, phase) = {
            let state = self.state();
            let s = &state.streams[&r.stream];
            (s.leaf.clone(), s.phase)
        };
        let (Some(leaf), Content::Known(m), Phase::Unpacked | Phase::Verified) = (leaf, content, phase) else {
            return Err(Status::failed_precondition(format!(
                "stream {} holds no unpacked image (state {}); unpack a leaf first",
                r.stream,
                phase.proto().as_str_name()
            )));
        };
        let done = AtomicU64::new(0);
        let (m2, p2) = (m.clone(), path.clone());
        let read = tokio::task::spawn_blocking(move || engine::read_back(&p2, &m2, &done))
            .await
            .expect("read-back does not panic")
            .map_err(|e| Status::unavailable(format!("reading device {volume_id} back failed: {e}")))?;
        match read {
            ReadBack::Matches(digest) => {
                Metrics::add(&self.0.metrics.captures, 1);
                self.set_phase(&r.stream, Phase::Verified)?;
                self.hold(&r.stream, &leaf, &r.hold_id, r.hold_seconds);
                Ok(Response::new(Capture {
                    stream: r.stream,
                    leaf,
                    image_id: m.image_id().to_hex(),
                    image_size: m.size(),
                    device_digest: digest.to_hex().to_string(),
                    volume_id,
                }))
            }
            ReadBack::Differs { index, offset } => {
                Metrics::add(&self.0.metrics.capture_mismatches, 1);
                self.release_all(&r.stream);
                self.state().set_content(&volume_id, Content::Unknown).map_err(internal)?;
                self.set_phase(&r.stream, Phase::Dirty)?;
                Err(Status::data_loss(format!(
                    "device {volume_id} does not hold {}/{leaf}: chunk {index} (offset {offset}) differs; \
                     the stream is dirty and the next unpack rescans",
                    r.stream
                )))
            }
        }
    }

    async fn forget_stream(&self, req: Request<ForgetStreamRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        self.wait_unheld(&r.stream, None, |_| {}).await;
        let _guard = self.claim(&r.stream, "forget-stream")?;
        let mut state = self.state();
        if state.streams.remove(&r.stream).is_none() {
            return Err(Status::not_found(format!("stream {} is not associated", r.stream)));
        }
        self.save(&mut state)?;
        tracing::info!(stream = %r.stream, "stream forgotten");
        Ok(Response::new(Empty {}))
    }

    async fn release_capture(&self, req: Request<ReleaseCaptureRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        self.release(&r.stream, &r.hold_id);
        Ok(Response::new(Empty {}))
    }

    type GetRawStream = RawStream;

    async fn get_raw(&self, req: Request<GetRawRequest>) -> Result<Response<RawStream>, Status> {
        let r = req.into_inner();
        check_stream(&r.stream)?;
        let guard = self.claim(&r.stream, "get-raw")?;
        let (volume_id, path, _, content) = self.binding(&r.stream)?;
        let Content::Known(m) = content else {
            return Err(Status::failed_precondition(format!(
                "what device {volume_id} holds is not known; prepare and unpack first"
            )));
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = engine::send_raw(&path, m.size(), &tx) {
                let _ = tx.blocking_send(Err(Status::unavailable(format!("reading device {volume_id}: {e}"))));
            }
            drop(guard);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Summed progress of an unpack, for clients.
pub fn stats_line(s: &UnpackStats) -> String {
    format!(
        "{} of {} chunks written, {} zeroed, {} unchanged; {} compressed bytes fetched in {:.1}s",
        s.chunks_written, s.chunks_total, s.chunks_zeroed, s.chunks_unchanged, s.bytes_fetched, s.seconds
    )
}
