//! Devices and bindings: finding or claiming a device (AddDevice,
//! ClaimDevice), removing it, binding a stream to it and forgetting that
//! binding, the set-up lease of a stream that has no device yet, and
//! [`ClaimedDevice`], the one handle a device is written through.
//!
//! **Invariants:** a device is bound to at most one stream and a stream to
//! at most one device; a stream with no device has at most one caller
//! setting one up at a time (the lease, ended by the binding); a
//! [`ClaimedDevice`] is made only here, for a stream that is bound and
//! marked busy, through `blockdev::open_for_write`. Nothing here writes a
//! device.

use std::{
    fs::File,
    os::unix::fs::FileExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use fleet_proto::unpacker::{
    AddDeviceRequest, AssociateRequest, ClaimDeviceRequest, Device, Lease, LeaseRequest, StreamStatus,
};

use super::{BusyGuard, Error, Unpacker, check_stream, check_volume};
use crate::{
    blockdev, devices,
    state::{Content, DeviceRecord, Phase, State, StreamRecord},
    verified::VerifiedChunk,
};

/// How long AddDevice waits when the caller gives no timeout.
pub(crate) const DEFAULT_ADD_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest AddDevice waits whatever the caller asks.
pub(crate) const MAX_ADD_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest set-up lease granted, whatever the caller asks.
pub(crate) const MAX_LEASE: Duration = Duration::from_secs(900);

/// A device open for writing, claimed exclusively (see
/// `blockdev::open_for_write`) for a stream that is bound to it and busy
/// with the operation that writes. It writes only verified chunks and
/// zeros. Only [`Unpacker::claim_for_write`] makes one.
pub(crate) struct ClaimedDevice {
    file: File,
    zeros: Vec<u8>,
}

impl crate::engine::DeviceWriter for ClaimedDevice {
    fn write_chunk(&self, chunk: &VerifiedChunk, offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(chunk.bytes(), offset)
    }

    fn write_zeros(&mut self, offset: u64, len: usize) -> std::io::Result<()> {
        if self.zeros.len() < len {
            self.zeros.resize(len, 0);
        }
        self.file.write_all_at(&self.zeros[..len], offset)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

pub(super) fn device_error(e: blockdev::DeviceError) -> Error {
    match e {
        blockdev::DeviceError::Io { .. } | blockdev::DeviceError::NotADevice(_) => Error::not_found(e.to_string()),
        _ => Error::failed_precondition(e.to_string()),
    }
}

/// The device a stream is bound to, as the state records it.
pub(super) struct Binding {
    pub(super) volume_id: String,
    pub(super) path: PathBuf,
    pub(super) size: u64,
}

impl Unpacker {
    /// Open the device bound to the stream `busy` marks, for writing.
    pub(super) fn claim_for_write(&self, busy: &BusyGuard) -> Result<ClaimedDevice, Error> {
        let path = self.binding(&busy.stream)?.path;
        let file = blockdev::open_for_write(&path).map_err(device_error)?;
        Ok(ClaimedDevice { file, zeros: Vec::new() })
    }

    /// The device a stream is bound to (not what it holds: see
    /// [`Unpacker::bound_content`]).
    pub(super) fn binding(&self, stream: &str) -> Result<Binding, Error> {
        let state = self.state();
        let (rec, dev) = Self::bound(&state, stream)?;
        Ok(Binding { volume_id: rec.volume_id.clone(), path: dev.path.clone(), size: dev.size })
    }

    /// The stream's binding and what its device holds (a copy of the
    /// manifest, when known: taken once per call that needs it).
    pub(super) fn bound_content(&self, stream: &str) -> Result<(Binding, Content), Error> {
        let state = self.state();
        let (rec, dev) = Self::bound(&state, stream)?;
        let b = Binding { volume_id: rec.volume_id.clone(), path: dev.path.clone(), size: dev.size };
        Ok((b, dev.content.clone()))
    }

    /// Whether what the stream's device holds is known (a scan or an
    /// unpack said), without copying it.
    pub(super) fn knows_content(&self, stream: &str) -> Result<bool, Error> {
        let state = self.state();
        Ok(Self::bound(&state, stream)?.1.content != Content::Unknown)
    }

    fn bound<'a>(state: &'a State, stream: &str) -> Result<(&'a StreamRecord, &'a DeviceRecord), Error> {
        let rec = state.streams.get(stream).ok_or_else(|| {
            Error::failed_precondition(format!("stream {stream} is not associated with a device; associate it first"))
        })?;
        let dev = state.devices.get(&rec.volume_id).ok_or_else(|| {
            Error::failed_precondition(format!("device {} of stream {stream} was removed", rec.volume_id))
        })?;
        Ok((rec, dev))
    }

    /// AddDevice: wait for the volume to appear under the device directory,
    /// then record it.
    pub(crate) async fn add_device(&self, r: AddDeviceRequest) -> Result<Device, Error> {
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
                return Err(Error::deadline_exceeded(format!(
                    "volume {} did not appear under '{}' (as {}) within {}s",
                    r.volume_id,
                    dir.display(),
                    devices::nitro_name(&r.volume_id),
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.record_device(&r.volume_id, path, attach, r.fresh)
    }

    /// ClaimDevice: record the device at the path given.
    pub(crate) fn claim_device(&self, r: ClaimDeviceRequest) -> Result<Device, Error> {
        check_volume(&r.volume_id)?;
        if r.path.is_empty() {
            return Err(Error::invalid_argument("claim-device needs the device's path"));
        }
        let path =
            std::fs::canonicalize(&r.path).map_err(|e| Error::not_found(format!("device path '{}': {e}", r.path)))?;
        self.record_device(&r.volume_id, path, None, r.fresh)
    }

    /// RemoveDevice: forget an unbound device.
    pub(crate) fn remove_device(&self, volume_id: &str) -> Result<(), Error> {
        check_volume(volume_id)?;
        let mut state = self.state();
        if !state.devices.contains_key(volume_id) {
            return Err(Error::not_found(format!("device {volume_id} is not recorded")));
        }
        if let Some(s) = state.stream_of(volume_id) {
            return Err(Error::failed_precondition(format!(
                "device {volume_id} is bound to stream {s}; forget the stream first"
            )));
        }
        state.set_content(volume_id, Content::Unknown).map_err(Error::internal)?;
        state.devices.remove(volume_id);
        self.save(&mut state)?;
        tracing::info!(volume = %volume_id, "device removed");
        Ok(())
    }

    /// Record a device found at `path`.
    fn record_device(
        &self,
        volume_id: &str,
        path: PathBuf,
        attach_name: Option<String>,
        fresh: bool,
    ) -> Result<Device, Error> {
        let (kind, size) = blockdev::inspect(&path).map_err(device_error)?;
        let mut state = self.state();
        if let Some((other, _)) = state.devices.iter().find(|(v, d)| d.path == path && v.as_str() != volume_id) {
            return Err(Error::already_exists(format!("'{}' is already recorded as {other}", path.display())));
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
                return Err(Error::failed_precondition(format!(
                    "{volume_id} is bound to stream {s}; it cannot be declared fresh"
                )));
            }
            state.devices.insert(
                volume_id.to_owned(),
                DeviceRecord { path, size, kind, attach_name, content_id: None, content: Content::Unknown },
            );
            state
                .set_content(volume_id, if fresh { Content::Fresh } else { Content::Unknown })
                .map_err(Error::internal)?;
        }
        self.save(&mut state)?;
        let d = &state.devices[volume_id];
        tracing::info!(volume = volume_id, path = %d.path.display(), size = d.size, fresh, "device recorded");
        Ok(Self::device_proto(&state, volume_id, d))
    }

    /// LeaseStreamSetup: grant, extend, report or end the set-up lease of a
    /// stream with no device.
    pub(crate) fn lease_stream_setup(&self, r: LeaseRequest) -> Result<Lease, Error> {
        check_stream(&r.stream)?;
        if r.owner.is_empty() {
            return Err(Error::invalid_argument("a set-up lease needs an owner"));
        }
        if let Some(s) = self.state().streams.get(&r.stream) {
            return Ok(Lease { bound_volume_id: s.volume_id.clone(), ..Default::default() });
        }
        let mut leases = self.0.leases.lock().expect("lease lock");
        let now = Instant::now();
        leases.retain(|_, (_, end)| *end > now);
        match leases.get(&r.stream) {
            Some((owner, end)) if *owner != r.owner => {
                let left = u32::try_from(end.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX);
                return Ok(Lease { holder: owner.clone(), seconds_left: left.max(1), ..Default::default() });
            }
            _ => {}
        }
        if r.seconds == 0 {
            leases.remove(&r.stream);
            return Ok(Lease::default());
        }
        let seconds = Duration::from_secs(u64::from(r.seconds)).min(MAX_LEASE);
        leases.insert(r.stream.clone(), (r.owner.clone(), now + seconds));
        tracing::info!(stream = %r.stream, owner = %r.owner, ?seconds, "stream set-up leased");
        let left = u32::try_from(seconds.as_secs()).unwrap_or(u32::MAX);
        Ok(Lease { granted: true, holder: r.owner, seconds_left: left, ..Default::default() })
    }

    /// AssociateStreamWithDevice: bind a stream to a recorded device; this
    /// ends the stream's set-up lease.
    pub(crate) fn associate(&self, r: AssociateRequest) -> Result<StreamStatus, Error> {
        check_stream(&r.stream)?;
        check_volume(&r.volume_id)?;
        let _busy = self.mark_busy(&r.stream, "associate")?;
        let mut state = self.state();
        let Some(dev) = state.devices.get(&r.volume_id) else {
            return Err(Error::failed_precondition(format!("device {} is not recorded; add it first", r.volume_id)));
        };
        let known = dev.content != Content::Unknown;
        match state.stream_of(&r.volume_id) {
            Some(s) if s == r.stream => return Ok(Self::stream_status(&state, &r.stream)),
            Some(s) => {
                return Err(Error::failed_precondition(format!(
                    "device {} is bound to stream {s}; forget that stream first",
                    r.volume_id
                )));
            }
            None => {}
        }
        if let Some(s) = state.streams.get(&r.stream) {
            return Err(Error::failed_precondition(format!(
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
        Ok(Self::stream_status(&state, &r.stream))
    }

    /// ForgetStream: unbind a stream once no capture hold is on it.
    pub(crate) async fn forget_stream(&self, stream: &str) -> Result<(), Error> {
        check_stream(stream)?;
        self.wait_unheld(stream, None, |_| {}).await;
        let _busy = self.mark_busy(stream, "forget-stream")?;
        let mut state = self.state();
        if state.streams.remove(stream).is_none() {
            return Err(Error::not_found(format!("stream {stream} is not associated")));
        }
        self.save(&mut state)?;
        tracing::info!(stream, "stream forgotten");
        Ok(())
    }
}
