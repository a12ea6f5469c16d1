//! The ImageServer gRPC service. Who may call which method is decided by
//! [`RIGHTS`], applied to every call by one layer around the whole server
//! (see `lib.rs`), before any handler runs; store errors become
//! `tonic::Status` in one place ([`status_of`]).

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, UNIX_EPOCH},
};

use chunk_store::{ChunkStore, StoreError, StoredImage};
use fleet_proto::imageserver::{
    Chunk, CollectGarbageRequest, CollectGarbageResponse, CommitImageRequest, DamagedImage, DeleteImageRequest,
    DeleteImageResponse, FetchChunksRequest, FindLatestImageRequest, FindMissingChunksRequest,
    FindMissingChunksResponse, GetManifestRequest, GetManifestResponse, ImageEvent, ImageInfo, ListImagesRequest,
    ListImagesResponse, ListStreamsRequest, ListStreamsResponse, ReplicateRequest, UploadChunk, UploadChunksResponse,
    WatchImagesRequest, image_event::Kind, image_server_server::ImageServer,
};
use fleet_tls::{Right, Rights};
use futures::{Stream, StreamExt, TryStreamExt};
use image_format::{Digest, ImageName, Manifest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status, Streaming};

use crate::Metrics;

/// Chunks read ahead of the client per FetchChunks call, while keeping the
/// disk busy.
pub(crate) const READ_AHEAD: usize = 8;
/// Chunks being read, or read and not yet taken by the transport, across
/// every FetchChunks call at once. This, not the number of readers, bounds
/// the server's memory for chunk data (about `READ_SLOTS` times the chunk
/// size) and its blocking threads: each read holds a slot from before it
/// starts until its chunk is handed to HTTP/2, whose send buffer per stream
/// is small and fixed.
pub(crate) const READ_SLOTS: usize = 16;
/// A fetch whose client takes no chunk for this long is ended, so that a
/// stalled reader cannot keep its slots from the others.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// Uploaded chunks verified and written at once per upload stream.
pub(crate) const UPLOAD_PARALLELISM: usize = 4;
/// Most digests one FindMissingChunks or FetchChunks request may name.
pub(crate) const MAX_DIGESTS_PER_REQUEST: usize = 1 << 20;
/// Watchers that fall this many events behind are cut off (and re-list).
const EVENT_BUFFER: usize = 1024;

/// The right each ImageServer method needs. A method missing here is refused
/// to everyone, so a new RPC needs an entry before anyone can call it.
pub const RIGHTS: Rights = Rights::new(&[
    ("/fleet.imageserver.v1.ImageServer/ListStreams", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/ListImages", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/FindLatestImage", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/GetManifest", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/FindMissingChunks", Right::Write),
    ("/fleet.imageserver.v1.ImageServer/UploadChunks", Right::Write),
    ("/fleet.imageserver.v1.ImageServer/CommitImage", Right::Write),
    ("/fleet.imageserver.v1.ImageServer/DeleteImage", Right::Write),
    ("/fleet.imageserver.v1.ImageServer/CollectGarbage", Right::Write),
    ("/fleet.imageserver.v1.ImageServer/FetchChunks", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/WatchImages", Right::Read),
    ("/fleet.imageserver.v1.ImageServer/Replicate", Right::Replicate),
]);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct ImageService {
    pub(crate) store: Arc<ChunkStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) events: broadcast::Sender<ImageEvent>,
    /// What watchers were last told of each leaf (its image id, or absent
    /// once deleted): one event per change, whether this server made it
    /// or found it made by another server on the same bucket.
    announced: Arc<Mutex<HashMap<ImageName, Digest>>>,
    replica_of: Option<String>,
    read_slots: Arc<Semaphore>,
}

/// Map a store error to a status with the message intact.
pub(crate) fn status_of(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NoSuchImage(_) | StoreError::MissingChunk(_) => Status::not_found(msg),
        StoreError::LeafExists { .. } => Status::already_exists(msg),
        StoreError::ChunksMissing { .. } | StoreError::DamagedRecords { .. } => Status::failed_precondition(msg),
        // What a caller sent does not check out.
        StoreError::DigestMismatch { .. } | StoreError::BadChunk { .. } | StoreError::ChunkLength { .. } => {
            Status::invalid_argument(msg)
        }
        StoreError::Name(_) | StoreError::Manifest(_) => Status::invalid_argument(msg),
        // What the store holds is damaged: asking again will not help.
        StoreError::Corrupt { .. } | StoreError::BadRecord { .. } => {
            tracing::error!(error = %msg, "stored data is damaged");
            Status::data_loss(msg)
        }
        StoreError::Io { .. } => {
            tracing::error!(error = %msg, "store failure");
            Status::internal(msg)
        }
        // The bucket did not answer, or answered with an error: asking
        // again later may well work.
        StoreError::Backend { .. } => {
            tracing::error!(error = %msg, "object store failure");
            Status::unavailable(msg)
        }
        StoreError::GcRunning { .. } => Status::unavailable(msg),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, StoreError> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(status_of)
}

fn name_of(stream: &str, leaf: &str) -> Result<ImageName, Status> {
    ImageName::new(stream, leaf).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn digests_of(raw: &[tonic::codegen::Bytes]) -> Result<Vec<Digest>, Status> {
    if raw.len() > MAX_DIGESTS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "{} digests in one request; at most {MAX_DIGESTS_PER_REQUEST}",
            raw.len()
        )));
    }
    raw.iter().map(|b| Digest::from_slice(b).map_err(|e| Status::invalid_argument(e.to_string()))).collect()
}

/// Describe a stored image for the wire.
pub(crate) fn info_of(img: &StoredImage) -> ImageInfo {
    let m = &img.manifest;
    ImageInfo {
        stream: img.name.stream().to_owned(),
        leaf: img.name.leaf().to_owned(),
        image_id: img.image_id.to_hex(),
        size_bytes: m.size(),
        chunk_size: m.chunk_size(),
        chunk_count: m.chunks().len() as u64,
        zero_chunks: m.zero_chunks(),
        stored_bytes: m.stored_bytes(),
        committed_unix_ms: i64::try_from(img.committed.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis())
            .unwrap_or(i64::MAX),
    }
}

impl ImageService {
    pub(crate) fn new(store: Arc<ChunkStore>, metrics: Arc<Metrics>, replica_of: Option<String>) -> ImageService {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        ImageService {
            store,
            metrics,
            events,
            announced: Arc::default(),
            replica_of,
            read_slots: Arc::new(Semaphore::new(READ_SLOTS)),
        }
    }

    fn refuse_if_replica(&self) -> Result<(), Status> {
        match &self.replica_of {
            Some(master) => Err(Status::failed_precondition(format!(
                "this imageserver is a read-only replica of {master}; write to the master"
            ))),
            None => Ok(()),
        }
    }

    /// Tell watchers of a commit (or, with `Kind::Deleted`, a deletion) of
    /// `img`, unless they were already told.
    pub(crate) fn announce(&self, kind: Kind, img: &StoredImage) {
        let changed = {
            let mut told = self.announced.lock().unwrap_or_else(|e| e.into_inner());
            match kind {
                // A leaf this server deletes is news even if it was
                // committed before the server started.
                Kind::Deleted => {
                    told.remove(&img.name);
                    true
                }
                _ => told.insert(img.name.clone(), img.image_id) != Some(img.image_id),
            }
        };
        if changed {
            let _ = self.events.send(ImageEvent { kind: kind as i32, info: Some(info_of(img)) });
        }
    }

    /// Tell watchers that `name` was deleted when its record could not be
    /// read first (damaged, or deleted by another server): `always`, or
    /// only if they were told of it.
    pub(crate) fn announce_deleted(&self, name: &ImageName, always: bool) {
        if self.announced.lock().unwrap_or_else(|e| e.into_inner()).remove(name).is_some() || always {
            let info =
                ImageInfo { stream: name.stream().to_owned(), leaf: name.leaf().to_owned(), ..Default::default() };
            let _ = self.events.send(ImageEvent { kind: Kind::Deleted as i32, info: Some(info) });
        }
    }

    /// Take the images there are now as known, without telling anyone.
    pub(crate) fn known(&self, images: &[StoredImage]) {
        let mut told = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        told.extend(images.iter().map(|i| (i.name.clone(), i.image_id)));
    }
}

#[tonic::async_trait]
impl ImageServer for ImageService {
    async fn list_streams(&self, _req: Request<ListStreamsRequest>) -> Result<Response<ListStreamsResponse>, Status> {
        let store = self.store.clone();
        let streams = blocking(move || store.list_streams()).await?;
        Ok(Response::new(ListStreamsResponse { streams }))
    }

    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        let stream = req.into_inner().stream;
        image_format::validate_stream(&stream).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = self.store.clone();
        let listing = blocking(move || store.list_images(&stream)).await?;
        Ok(Response::new(ListImagesResponse {
            images: listing.images.iter().map(info_of).collect(),
            damaged: listing
                .damaged
                .iter()
                .map(|d| DamagedImage { leaf: d.name.leaf().to_owned(), reason: d.why.to_string() })
                .collect(),
        }))
    }

    async fn find_latest_image(&self, req: Request<FindLatestImageRequest>) -> Result<Response<ImageInfo>, Status> {
        let stream = req.into_inner().stream;
        image_format::validate_stream(&stream).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = self.store.clone();
        let s = stream.clone();
        let listing = blocking(move || store.list_images(&s)).await?;
        let latest =
            listing.images.last().ok_or_else(|| Status::not_found(format!("stream {stream} has no intact images")))?;
        Ok(Response::new(info_of(latest)))
    }

    async fn get_manifest(&self, req: Request<GetManifestRequest>) -> Result<Response<GetManifestResponse>, Status> {
        let r = req.into_inner();
        let name = name_of(&r.stream, &r.leaf)?;
        let store = self.store.clone();
        let img = blocking(move || store.get_image(&name)).await?;
        Ok(Response::new(GetManifestResponse { info: Some(info_of(&img)), manifest: img.manifest.encode().into() }))
    }

    async fn find_missing_chunks(
        &self,
        req: Request<FindMissingChunksRequest>,
    ) -> Result<Response<FindMissingChunksResponse>, Status> {
        self.refuse_if_replica()?;
        let digests = digests_of(&req.into_inner().digests)?;
        let store = self.store.clone();
        let missing =
            blocking(move || Ok(store.find_missing(&digests)?.into_iter().map(|d| d.0.to_vec().into()).collect()))
                .await?;
        Ok(Response::new(FindMissingChunksResponse { missing }))
    }

    async fn upload_chunks(
        &self,
        req: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadChunksResponse>, Status> {
        self.refuse_if_replica()?;
        let metrics = self.metrics.clone();
        let store = self.store.clone();
        let results = req
            .into_inner()
            .map_ok(move |chunk| {
                let store = store.clone();
                let metrics = metrics.clone();
                async move {
                    let digest =
                        Digest::from_slice(&chunk.digest).map_err(|e| Status::invalid_argument(e.to_string()))?;
                    let len = chunk.zstd_data.len() as u64;
                    Metrics::add(&metrics.chunks_received, 1);
                    Metrics::add(&metrics.bytes_received, len);
                    let stored =
                        blocking(move || store.put_compressed(&digest, &chunk.zstd_data)).await.inspect_err(|e| {
                            Metrics::add(&metrics.chunks_rejected, 1);
                            tracing::warn!(%digest, error = %e.message(), "upload refused");
                        })?;
                    if stored {
                        Metrics::add(&metrics.chunks_stored, 1);
                    }
                    Ok::<_, Status>((stored, len))
                }
            })
            .try_buffer_unordered(UPLOAD_PARALLELISM);
        let resp = results
            .try_fold(UploadChunksResponse::default(), |mut acc, (stored, len)| async move {
                if stored {
                    acc.stored += 1;
                } else {
                    acc.already_present += 1;
                }
                acc.received_bytes += len;
                Ok(acc)
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn commit_image(&self, req: Request<CommitImageRequest>) -> Result<Response<ImageInfo>, Status> {
        self.refuse_if_replica()?;
        let r = req.into_inner();
        let name = name_of(&r.stream, &r.leaf)?;
        let manifest =
            Manifest::decode(&r.manifest).map_err(|e| Status::invalid_argument(format!("manifest of {name}: {e}")))?;
        let store = self.store.clone();
        let (img, new) = blocking(move || store.commit(&name, &manifest)).await?;
        if new {
            Metrics::add(&self.metrics.images_committed, 1);
            tracing::info!(image = %img.name, id = %img.image_id, "image committed");
            self.announce(Kind::Committed, &img);
        }
        Ok(Response::new(info_of(&img)))
    }

    async fn delete_image(&self, req: Request<DeleteImageRequest>) -> Result<Response<DeleteImageResponse>, Status> {
        self.refuse_if_replica()?;
        let r = req.into_inner();
        let name = name_of(&r.stream, &r.leaf)?;
        let store = self.store.clone();
        let n = name.clone();
        let img = blocking(move || {
            // A damaged record can be deleted: that is how an operator
            // clears it.
            let img = match store.get_image(&n) {
                Ok(img) => Some(img),
                Err(StoreError::BadRecord { .. }) => None,
                Err(e) => return Err(e),
            };
            store.delete_image(&n)?;
            Ok(img)
        })
        .await?;
        Metrics::add(&self.metrics.images_deleted, 1);
        tracing::info!(image = %name, "image deleted");
        match &img {
            Some(img) => self.announce(Kind::Deleted, img),
            None => self.announce_deleted(&name, true),
        }
        Ok(Response::new(DeleteImageResponse {}))
    }

    async fn collect_garbage(
        &self,
        req: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let report = blocking(move || store.collect_garbage(Duration::from_secs(r.grace_seconds), r.dry_run)).await?;
        Ok(Response::new(CollectGarbageResponse {
            chunks_removed: report.chunks_removed,
            bytes_removed: report.bytes_removed,
            chunks_kept: report.chunks_kept,
            stale_temp_files: report.stale_temp_files,
            kept_referenced: report.kept_referenced,
            kept_recent: report.kept_recent,
            kept_leased: report.kept_leased,
            stopped_early: report.stopped_early,
        }))
    }

    type FetchChunksStream = BoxStream<Chunk>;

    async fn fetch_chunks(
        &self,
        req: Request<FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let digests = digests_of(&req.into_inner().digests)?;
        let (tx, rx) = mpsc::channel::<Result<(Chunk, OwnedSemaphorePermit), Status>>(1);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let slots = self.read_slots.clone();
        tokio::spawn(async move {
            // Slots are taken in request order, one at a time, so a fetch
            // never holds later chunks' slots while waiting for an earlier
            // one's: every fetch holding a slot can finish its next chunk.
            let reads = futures::stream::iter(digests)
                .then(move |d| take_slot(slots.clone(), d))
                .map(move |(d, slot)| read_chunk(store.clone(), d, slot))
                .buffered(READ_AHEAD);
            let mut reads = std::pin::pin!(reads);
            while let Some(item) = reads.next().await {
                let item = item.map(|((d, z), slot)| {
                    Metrics::add(&metrics.chunks_served, 1);
                    Metrics::add(&metrics.bytes_served, z.len() as u64);
                    (Chunk { digest: d.0.to_vec().into(), zstd_data: z.into() }, slot)
                });
                let failed = item.is_err();
                match tokio::time::timeout(SEND_TIMEOUT, tx.send(item)).await {
                    Ok(Ok(())) if !failed => {}
                    Ok(_) => break,
                    Err(_) => {
                        tracing::warn!("a fetch's client took no chunk for {SEND_TIMEOUT:?}; ending it");
                        let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
                            "this client took no chunk for {}s; fetch again",
                            SEND_TIMEOUT.as_secs()
                        ))));
                        break;
                    }
                }
            }
        });
        // The slot goes when the transport takes the chunk.
        let chunks = ReceiverStream::new(rx).map(|item| item.map(|(chunk, _slot)| chunk));
        Ok(Response::new(Box::pin(chunks)))
    }

    type WatchImagesStream = BoxStream<ImageEvent>;

    async fn watch_images(
        &self,
        req: Request<WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        let stream = req.into_inner().stream;
        if !stream.is_empty() {
            image_format::validate_stream(&stream).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let events = event_stream(self.events.subscribe()).try_filter(move |ev| {
            let keep = ev.kind == Kind::Committed as i32
                && (stream.is_empty() || ev.info.as_ref().is_some_and(|i| i.stream == stream));
            futures::future::ready(keep)
        });
        Ok(Response::new(Box::pin(events)))
    }

    type ReplicateStream = BoxStream<ImageEvent>;

    async fn replicate(&self, _req: Request<ReplicateRequest>) -> Result<Response<Self::ReplicateStream>, Status> {
        // Subscribe before listing so nothing committed in between is missed;
        // replicas apply events idempotently.
        let live = event_stream(self.events.subscribe());
        let store = self.store.clone();
        let all = blocking(move || store.list_all_images()).await?;
        let snapshot = futures::stream::iter(
            all.images
                .into_iter()
                .map(|img| Ok(ImageEvent { kind: Kind::Committed as i32, info: Some(info_of(&img)) })),
        );
        Ok(Response::new(Box::pin(snapshot.chain(live))))
    }
}

/// A read slot for chunk `d` (waiting for one to be free).
async fn take_slot(slots: Arc<Semaphore>, d: Digest) -> (Digest, OwnedSemaphorePermit) {
    (d, slots.acquire_owned().await.expect("the read slots are never closed"))
}

/// Read and check chunk `d` on a blocking thread, keeping its slot.
async fn read_chunk(
    store: Arc<ChunkStore>,
    d: Digest,
    slot: OwnedSemaphorePermit,
) -> Result<((Digest, Vec<u8>), OwnedSemaphorePermit), Status> {
    let z = blocking(move || store.get_compressed(&d)).await?;
    Ok(((d, z), slot))
}

fn event_stream(rx: broadcast::Receiver<ImageEvent>) -> impl Stream<Item = Result<ImageEvent, Status>> + Send {
    BroadcastStream::new(rx).map(|r| {
        r.map_err(|BroadcastStreamRecvError::Lagged(n)| {
            Status::resource_exhausted(format!("watcher fell {n} events behind; list again and re-watch"))
        })
    })
}
