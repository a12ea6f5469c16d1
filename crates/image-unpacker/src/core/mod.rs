//! The core of the unpacker: its state and every rule about it. The gRPC
//! layer (`service`) only converts requests and answers; everything that
//! decides lives here, split by concern:
//!
//! - `claims`: devices (found, claimed, removed), stream bindings, the
//!   set-up lease, and `ClaimedDevice`, the only `engine::DeviceWriter`, the handle the engine writes
//!   through;
//! - `holds`: capture holds, and waiting for them;
//! - `scan`: PrepareForUnpack (learning what a device holds);
//! - `unpack`: UnpackImage;
//! - `capture`: PrepareForCapture's read-back and GetRaw's stream;
//! - `status`: GetStatus and the HTTP status page.
//!
//! **Invariants:** one long operation per stream at a time (a second gets
//! [`ErrorKind::Aborted`] naming the one running); every long operation
//! runs in its own task, which owns the stream's busy mark, so a caller
//! that goes away cuts nothing short and frees nothing early; the state
//! lock is never held across I/O on a device or the network. The core
//! answers with its own [`Error`], never a tonic status.

mod capture;
mod claims;
mod holds;
mod scan;
mod status;
mod unpack;

use std::{
    collections::HashMap,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use fleet_proto::unpacker::{Progress, RawData};
use fleet_tls::TlsFiles;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    devices,
    metrics::Metrics,
    state::{Phase, State},
};

/// Progress of a long operation, ending with its result.
pub(crate) type ProgressStream = Pin<Box<dyn Stream<Item = Result<Progress, Error>> + Send>>;
/// A device's bytes, in pieces.
pub(crate) type RawStream = Pin<Box<dyn Stream<Item = Result<RawData, Error>> + Send>>;

/// Settings the service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub device_dir: PathBuf,
    pub image_server: String,
    pub tls: TlsFiles,
}

/// What kind of failure an [`Error`] is; the gRPC layer maps each to the
/// status code of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    FailedPrecondition,
    OutOfRange,
    Unimplemented,
    Aborted,
    Unavailable,
    DataLoss,
    DeadlineExceeded,
    Unauthenticated,
    Internal,
}

/// Why a request to the core failed, in words for the caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
    pub(crate) fn invalid_argument(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, m)
    }
    pub(crate) fn not_found(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, m)
    }
    pub(crate) fn already_exists(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::AlreadyExists, m)
    }
    pub(crate) fn failed_precondition(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::FailedPrecondition, m)
    }
    pub(crate) fn aborted(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::Aborted, m)
    }
    pub(crate) fn unavailable(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unavailable, m)
    }
    pub(crate) fn data_loss(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::DataLoss, m)
    }
    pub(crate) fn deadline_exceeded(m: impl Into<String>) -> Error {
        Error::new(ErrorKind::DeadlineExceeded, m)
    }
    pub(crate) fn internal(m: impl std::fmt::Display) -> Error {
        Error::new(ErrorKind::Internal, m.to_string())
    }
}

struct Inner {
    state: Mutex<State>,
    /// Streams with a long operation running, and its name.
    busy: Mutex<HashMap<String, &'static str>>,
    /// Set-up leases of streams that have no device yet: owner and end.
    /// In memory only: a restart ends them, and a publisher that then finds
    /// the stream unbound asks again.
    leases: Mutex<HashMap<String, (String, Instant)>>,
    /// Told whenever a capture hold ends.
    released: tokio::sync::Notify,
    config: ServiceConfig,
    metrics: Arc<Metrics>,
}

/// The unpacker (cheap to clone).
#[derive(Clone)]
pub struct Unpacker(Arc<Inner>);

/// A stream's busy mark; dropping it frees the stream. Only
/// [`Unpacker::mark_busy`] makes one.
pub(crate) struct BusyGuard {
    inner: Arc<Inner>,
    stream: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.inner.busy.lock().expect("busy lock").remove(&self.stream);
    }
}

fn check_stream(stream: &str) -> Result<(), Error> {
    image_format::validate_stream(stream).map_err(|e| Error::invalid_argument(e.to_string()))
}

fn check_volume(volume_id: &str) -> Result<(), Error> {
    devices::validate_volume_id(volume_id).map_err(Error::invalid_argument)
}

impl Unpacker {
    /// The unpacker over the state in `state_dir`.
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

    fn save(&self, state: &mut State) -> Result<(), Error> {
        state.touch();
        state.save().map_err(Error::internal)
    }

    fn set_phase(&self, stream: &str, phase: Phase) -> Result<(), Error> {
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

    /// Mark a stream busy with `what`, or say what it is busy with.
    fn mark_busy(&self, stream: &str, what: &'static str) -> Result<BusyGuard, Error> {
        let mut busy = self.0.busy.lock().expect("busy lock");
        if let Some(running) = busy.get(stream) {
            // ABORTED: a concurrency conflict; the caller may try again.
            return Err(Error::aborted(format!("stream {stream} is busy: {running} is running")));
        }
        busy.insert(stream.to_owned(), what);
        Ok(BusyGuard { inner: self.0.clone(), stream: stream.to_owned() })
    }

    /// Run `job` in its own task, streaming its progress and final message.
    /// The job owns the busy mark, so the stream stays busy until the job
    /// ends, whether or not anyone still listens; the mark is gone before
    /// the final message is sent.
    fn spawn_long<F, Fut>(&self, busy: BusyGuard, job: F) -> ProgressStream
    where
        F: FnOnce(Unpacker, BusyGuard, mpsc::Sender<Result<Progress, Error>>) -> Fut,
        Fut: Future<Output = Result<Progress, Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        let work = job(self.clone(), busy, tx.clone());
        tokio::spawn(async move {
            // The job's future, and the busy mark in it, is dropped when
            // this await ends.
            let result = work.await;
            let _ = tx.send(result).await;
        });
        Box::pin(ReceiverStream::new(rx))
    }
}
