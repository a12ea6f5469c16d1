//! Capture holds: an unpack or capture may ask to hold the device at its
//! leaf for a while, so that the caller can start a snapshot before anything
//! else writes it (an EBS snapshot is of the moment it is started).
//!
//! Each hold has an owner (the caller's hold id): several callers capturing
//! the same leaf each hold it, and ReleaseCapture ends only the caller's
//! own, and RenewCaptureHold sets when the caller's own ends (a caller
//! keeps its hold short and renews it while it works, so that the hold of
//! a caller that died ends soon). While any hold lasts, an unpack of another leaf, a scan and
//! ForgetStream wait for all of them to end (released, or their time runs
//! out). Reads, captures and an unpack of the held leaf itself (which
//! changes nothing, and is what a re-run of an interrupted publish does) go
//! ahead. Holds are kept in the state file, so a restart keeps them.
//!
//! This module only keeps and waits for holds; it never touches a device.

use std::time::Duration;

use fleet_proto::unpacker::Progress;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Error, ProgressStream, Unpacker, check_stream};
use crate::state::{CaptureHolds, State, now_unix_ms};

/// The longest capture hold granted, whatever the caller asks.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(900);
/// How often a caller waiting for a capture hold is told it still waits.
pub(crate) const WAIT_REPORT_EVERY: Duration = Duration::from_secs(5);

impl Unpacker {
    /// Hold `stream`'s device at `leaf` for `seconds` (capped at
    /// [`MAX_HOLD`]) for the caller `id`; that caller's hold is only ever
    /// extended. Holds of another leaf cannot be current (an unpack of
    /// another leaf waits for them), so any left are stale and dropped.
    pub(super) fn hold(&self, stream: &str, leaf: &str, id: &str, seconds: u32) {
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
    pub(super) fn holds_left(state: &mut State, stream: &str) -> Option<(Duration, String)> {
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

    /// ReleaseCapture: end the caller `id`'s hold on `stream` (others'
    /// holds stay).
    pub(crate) fn release_capture(&self, stream: &str, id: &str) -> Result<(), Error> {
        check_stream(stream)?;
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
        Ok(())
    }

    /// RenewCaptureHold: the caller `id`'s hold on `stream` ends `seconds`
    /// from now (capped at [`MAX_HOLD`]; at least 1 s), sooner or later than
    /// it did. NOT_FOUND when the caller holds nothing there (its hold ran
    /// out, or it never took one).
    pub(crate) fn renew_capture_hold(&self, stream: &str, id: &str, seconds: u32) -> Result<(), Error> {
        check_stream(stream)?;
        let span = Duration::from_secs(u64::from(seconds.max(1))).min(MAX_HOLD);
        let until = now_unix_ms().saturating_add(u64::try_from(span.as_millis()).unwrap_or(u64::MAX));
        let mut state = self.state();
        Self::holds_left(&mut state, stream);
        let Some(end) = state.capture_holds.get_mut(stream).and_then(|h| h.until_unix_ms.get_mut(id)) else {
            return Err(Error::not_found(format!("no capture hold {id} on {stream} (it ran out, or was never taken)")));
        };
        let shorter = until < *end;
        *end = until;
        if let Err(e) = state.save() {
            tracing::warn!(stream, "capture hold renewal not saved: {e:#}");
        }
        drop(state);
        if shorter {
            // A waiter may now be due sooner than it thinks.
            self.0.released.notify_waiters();
        }
        Ok(())
    }

    /// Drop every hold on `stream` (its device no longer holds the leaf).
    pub(super) fn release_all(&self, stream: &str) {
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
    pub(super) fn blocking_hold(&self, stream: &str, leaf: Option<&str>) -> Option<(Duration, String)> {
        self.hold_left(stream).filter(|(_, held)| leaf != Some(held.as_str()))
    }

    /// Wait until no capture hold is on `stream`, unless the hold is of
    /// `leaf` (the caller would write what is already there). `waiting` is
    /// told what is waited for at once and then every [`WAIT_REPORT_EVERY`].
    pub(super) async fn wait_unheld(&self, stream: &str, leaf: Option<&str>, mut waiting: impl FnMut(String)) {
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
    pub(super) fn after_holds(
        &self,
        stream: &str,
        leaf: Option<&str>,
        start: impl FnOnce(Unpacker) -> Result<ProgressStream, Error> + Send + 'static,
    ) -> Result<ProgressStream, Error> {
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
}
