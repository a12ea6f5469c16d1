//! PrepareForUnpack: learn what a stream's device holds, by a scan (hashing
//! the whole device) unless it is known already and the caller allows
//! skipping. A scan resets what the stream is known to hold, so it waits
//! for capture holds. The scan runs in its own task, which owns the
//! stream's busy mark; it only reads the device.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use fleet_proto::unpacker::{PrepareForUnpackRequest, Progress};
use image_format::DEFAULT_CHUNK_SIZE;
use tokio::sync::mpsc;

use super::{BusyGuard, Error, ProgressStream, Unpacker, check_stream, claims::Binding};
use crate::{
    engine,
    metrics::Metrics,
    state::{Content, Phase},
};

impl Unpacker {
    /// PrepareForUnpack, once no capture hold is in the way (unless the
    /// content is known and may be kept, which needs no wait).
    pub(crate) fn prepare_for_unpack(&self, r: PrepareForUnpackRequest) -> Result<ProgressStream, Error> {
        check_stream(&r.stream)?;
        if r.skip_if_prepared && self.knows_content(&r.stream)? {
            return self.start_prepare(r);
        }
        let stream = r.stream.clone();
        self.after_holds(&stream, None, move |me| me.start_prepare(r))
    }

    fn start_prepare(&self, r: PrepareForUnpackRequest) -> Result<ProgressStream, Error> {
        let busy = self.mark_busy(&r.stream, "prepare-for-unpack")?;
        let (_, content) = self.bound_content(&r.stream)?;
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
        let job = move |me: Unpacker, busy: BusyGuard, tx: mpsc::Sender<Result<Progress, Error>>| async move {
            let _busy = busy;
            me.scan(&stream, chunk_size, &tx).await?;
            let state = me.state();
            Ok(Progress {
                phase: "done".into(),
                result: Some(Self::stream_status(&state, &stream)),
                ..Default::default()
            })
        };
        let progress = self.spawn_long(busy, job);
        if r.do_not_wait {
            let started = Progress { phase: "scanning".into(), ..Default::default() };
            return Ok(Box::pin(futures::stream::iter([Ok(started)])));
        }
        Ok(progress)
    }

    /// Scan the stream's device and record what it holds. The caller holds
    /// the stream's busy mark.
    pub(super) async fn scan(
        &self,
        stream: &str,
        chunk_size: u32,
        progress: &mpsc::Sender<Result<Progress, Error>>,
    ) -> Result<(), Error> {
        let Binding { volume_id, path, size } = self.binding(stream)?;
        {
            let mut state = self.state();
            state.set_content(&volume_id, Content::Unknown).map_err(Error::internal)?;
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
                state.set_content(&volume_id, Content::Known(m)).map_err(Error::internal)?;
                drop(state);
                Metrics::add(&self.0.metrics.scans, 1);
                self.set_phase(stream, Phase::Prepared)
            }
            Err(e) => {
                self.set_phase(stream, Phase::Dirty)?;
                Err(Error::unavailable(format!("scanning device {volume_id} failed: {e}")))
            }
        }
    }
}
