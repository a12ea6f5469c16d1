//! UnpackImage: bring a stream's device to a leaf, writing only the chunks
//! that differ from what it holds (scanning first when that is not known).
//! The unpack runs in its own task, which owns the stream's busy mark; it
//! waits for capture holds of another leaf first.
//!
//! **Invariant:** before the device is written its content record is
//! removed and the stream marked unpacking, so a crash leaves "dirty,
//! rescan", never a wrong record.

use std::sync::{Arc, atomic::Ordering};

use fleet_proto::unpacker::{Progress, UnpackImageRequest};
use image_format::{ImageName, Manifest};
use tokio::sync::mpsc;

use super::{BusyGuard, Error, ErrorKind, ProgressStream, Unpacker};
use crate::{
    engine::{self, Counters},
    metrics::Metrics,
    state::{Content, Phase},
};

/// The error for a failure talking to the imageserver at `server` while
/// doing `what`. Damaged data is DATA_LOSS (a retry gets the same bytes);
/// a connection or server failure is UNAVAILABLE (a re-run resumes); a
/// refusal keeps the imageserver's code.
fn client_error(server: &str, what: &str, e: &image_client::ClientError) -> Error {
    use image_client::ClientError as E;
    use tonic::Code;
    let msg = fleet_tls::dial::error_chain(e);
    if e.is_data_loss() {
        return Error::data_loss(format!(
            "{what}: imageserver {server} sent damaged data: {msg}; not retried: the imageserver's store needs repair \
             (imagetool verify names the damage)"
        ));
    }
    match e {
        E::Rpc { status, .. } => {
            let kind = match status.code() {
                Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted => {
                    return Error::unavailable(format!(
                        "{what} stopped: imageserver {server} failed: {msg}; a re-run resumes (what was written is kept)"
                    ));
                }
                Code::InvalidArgument => ErrorKind::InvalidArgument,
                Code::NotFound => ErrorKind::NotFound,
                Code::AlreadyExists => ErrorKind::AlreadyExists,
                Code::PermissionDenied => ErrorKind::PermissionDenied,
                Code::FailedPrecondition => ErrorKind::FailedPrecondition,
                Code::OutOfRange => ErrorKind::OutOfRange,
                Code::Unimplemented => ErrorKind::Unimplemented,
                Code::DataLoss => ErrorKind::DataLoss,
                Code::Unauthenticated => ErrorKind::Unauthenticated,
                // An error with code OK: nothing sensible to keep.
                Code::Ok => ErrorKind::Internal,
            };
            Error::new(kind, format!("{what}: imageserver {server}: {msg}"))
        }
        E::Dial(_) => Error::unavailable(format!("{what}: {msg}")),
        _ => Error::data_loss(format!("{what}: imageserver {server}: {msg}")),
    }
}

impl Unpacker {
    /// UnpackImage, once no capture hold of another leaf is in the way.
    pub(crate) fn unpack_image(&self, r: UnpackImageRequest) -> Result<ProgressStream, Error> {
        ImageName::new(&r.stream, &r.leaf).map_err(|e| Error::invalid_argument(e.to_string()))?;
        self.binding(&r.stream)?;
        let (stream, leaf) = (r.stream.clone(), r.leaf.clone());
        self.after_holds(&stream, Some(&leaf), move |me| me.start_unpack(r))
    }

    fn start_unpack(&self, r: UnpackImageRequest) -> Result<ProgressStream, Error> {
        let busy = self.mark_busy(&r.stream, "unpack")?;
        self.binding(&r.stream)?;
        let job = move |me: Unpacker, busy: BusyGuard, tx: mpsc::Sender<Result<Progress, Error>>| async move {
            let result = me.unpack(&busy, &r.leaf, &tx).await;
            match &result {
                Ok(_) => {
                    Metrics::add(&me.0.metrics.unpacks, 1);
                    // Before the busy mark goes, so no writer slips in.
                    me.hold(&r.stream, &r.leaf, &r.hold_id, r.hold_seconds);
                }
                Err(e) => {
                    Metrics::add(&me.0.metrics.unpack_failures, 1);
                    tracing::warn!(stream = %r.stream, leaf = %r.leaf, error = %e.message, "unpack failed");
                }
            }
            drop(busy);
            result
        };
        Ok(self.spawn_long(busy, job))
    }

    /// The whole of an unpack of the stream `busy` marks; progress goes to
    /// `progress`.
    async fn unpack(
        &self,
        busy: &BusyGuard,
        leaf: &str,
        progress: &mpsc::Sender<Result<Progress, Error>>,
    ) -> Result<Progress, Error> {
        let stream = busy.stream.as_str();
        let name = ImageName::new(stream, leaf).map_err(|e| Error::invalid_argument(e.to_string()))?;
        let cfg = &self.0.config;
        let what = format!("unpack of {name}");
        let fail = |e: &image_client::ClientError| client_error(&cfg.image_server, &what, e);
        let mut client = image_client::connect(&cfg.image_server, &cfg.tls).await.map_err(|e| fail(&e))?;
        let (_, manifest) = image_client::get_manifest(&mut client, &name).await.map_err(|e| fail(&e))?;
        let (bound, mut content) = self.bound_content(stream)?;
        let (volume_id, size) = (bound.volume_id, bound.size);
        if manifest.size() > size {
            return Err(Error::failed_precondition(format!(
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
            content = self.bound_content(stream)?.1;
        }
        let device = self.claim_for_write(busy)?;
        let diff = match &content {
            Content::Fresh => manifest.diff_from(None),
            Content::Known(m) => manifest.diff_from(Some(m)),
            Content::Unknown => return Err(Error::internal("device content unknown after a scan")),
        };
        let total = engine::bytes_to_write(&manifest, &diff);
        tracing::info!(image = %name, volume = %volume_id, fetch = diff.fetch.len(), zero = diff.zero.len(), "unpacking");
        {
            let mut state = self.state();
            state.set_content(&volume_id, Content::Unknown).map_err(Error::internal)?;
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
        let result = engine::apply(device, client, &manifest, &diff, counters, self.0.metrics.clone(), tick).await;
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.set_phase(stream, Phase::Dirty)?;
                return Err(match &e {
                    engine::UnpackError::Fetch(c) => fail(c),
                    engine::UnpackError::Write(_) => Error::unavailable(format!("{e} (device {volume_id})")),
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

    fn finish_unpack(&self, stream: &str, volume_id: &str, name: &ImageName, manifest: Manifest) -> Result<(), Error> {
        let mut state = self.state();
        let (id, size) = (manifest.image_id().to_hex(), manifest.size());
        state.set_content(volume_id, Content::Known(manifest)).map_err(Error::internal)?;
        if let Some(s) = state.streams.get_mut(stream) {
            s.phase = Phase::Unpacked;
            s.leaf = Some(name.leaf().to_owned());
            s.image_id = Some(id);
            s.image_size = size;
        }
        self.save(&mut state)
    }
}
