//! Reading a device back: PrepareForCapture (read the whole image back,
//! check every chunk against the manifest, then mark the stream verified
//! and hold it for the snapshot) and GetRaw (stream the image's bytes).
//!
//! Both run in their own task, which owns the stream's busy mark: a caller
//! that goes away does not free the stream while its device is still being
//! read. Nothing here writes a device.

use std::sync::atomic::AtomicU64;

use fleet_proto::unpacker::{Capture, PrepareForCaptureRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{BusyGuard, Error, RawStream, Unpacker, check_stream, claims::Binding};
use crate::{
    engine::{self, ReadBack},
    metrics::Metrics,
    state::{Content, Phase},
};

impl Unpacker {
    /// PrepareForCapture. The read-back runs in a task of its own; the
    /// returned future only waits for its result, and dropping it leaves
    /// the read-back (and the stream's busy mark) to finish.
    pub(crate) async fn prepare_for_capture(&self, r: PrepareForCaptureRequest) -> Result<Capture, Error> {
        check_stream(&r.stream)?;
        let busy = self.mark_busy(&r.stream, "prepare-for-capture")?;
        let me = self.clone();
        let task = tokio::spawn(async move { me.capture(busy, r).await });
        task.await.map_err(|e| Error::internal(format!("the read-back task failed: {e}")))?
    }

    async fn capture(&self, busy: BusyGuard, r: PrepareForCaptureRequest) -> Result<Capture, Error> {
        let (Binding { volume_id, path, .. }, content) = self.bound_content(&r.stream)?;
        let (leaf, phase) = {
            let state = self.state();
            let s = &state.streams[&r.stream];
            (s.leaf.clone(), s.phase)
        };
        let (Some(leaf), Content::Known(m), Phase::Unpacked | Phase::Verified) = (leaf, content, phase) else {
            return Err(Error::failed_precondition(format!(
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
            .map_err(|e| Error::unavailable(format!("reading device {volume_id} back failed: {e}")))?;
        let result = match read {
            ReadBack::Matches(digest) => {
                Metrics::add(&self.0.metrics.captures, 1);
                self.set_phase(&r.stream, Phase::Verified)?;
                // Before the busy mark goes, so no writer slips in.
                self.hold(&r.stream, &leaf, &r.hold_id, r.hold_seconds);
                Ok(Capture {
                    stream: r.stream,
                    leaf,
                    image_id: m.image_id().to_hex(),
                    image_size: m.size(),
                    device_digest: digest.to_hex().to_string(),
                    volume_id,
                })
            }
            ReadBack::Differs { index, offset } => {
                Metrics::add(&self.0.metrics.capture_mismatches, 1);
                self.release_all(&r.stream);
                self.state().set_content(&volume_id, Content::Unknown).map_err(Error::internal)?;
                self.set_phase(&r.stream, Phase::Dirty)?;
                Err(Error::data_loss(format!(
                    "device {volume_id} does not hold {}/{leaf}: chunk {index} (offset {offset}) differs; \
                     the stream is dirty and the next unpack rescans",
                    r.stream
                )))
            }
        };
        drop(busy);
        result
    }

    /// GetRaw: the image's bytes as the device holds them, read in a task
    /// of its own that ends when the caller stops listening.
    pub(crate) fn get_raw(&self, stream: &str) -> Result<RawStream, Error> {
        check_stream(stream)?;
        let busy = self.mark_busy(stream, "get-raw")?;
        let (Binding { volume_id, path, .. }, content) = self.bound_content(stream)?;
        let Content::Known(m) = content else {
            return Err(Error::failed_precondition(format!(
                "what device {volume_id} holds is not known; prepare and unpack first"
            )));
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = engine::send_raw(&path, m.size(), &tx) {
                let _ = tx.blocking_send(Err(Error::unavailable(format!("reading device {volume_id}: {e}"))));
            }
            drop(busy);
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}
