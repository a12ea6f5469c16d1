//! The ImageServer gRPC service. Rights are checked first in every handler;
//! store errors become `tonic::Status` in one place ([`status_of`]).

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use chunk_store::{ChunkStore, StoreError, StoredImage};
use fleet_proto::imageserver::{
    Chunk, CollectGarbageRequest, CollectGarbageResponse, CommitImageRequest, DeleteImageRequest, DeleteImageResponse,
    FetchChunksRequest, FindLatestImageRequest, FindMissingChunksRequest, FindMissingChunksResponse,
    GetManifestRequest, GetManifestResponse, ImageEvent, ImageInfo, ListImagesRequest, ListImagesResponse,
    ListStreamsRequest, ListStreamsResponse, ReplicateRequest, UploadChunk, UploadChunksResponse, WatchImagesRequest,
    image_event::Kind, image_server_server::ImageServer,
};
use fleet_tls::Right;
use futures::{Stream, StreamExt, TryStreamExt};
use image_format::{Digest, ImageName, Manifest};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream, errors::BroadcastStreamRecvError};
use tonic::{Request, Response, Status, Streaming};

use crate::Metrics;

/// Chunks read ahead of the client per FetchChunks call: bounds memory per
/// fetch to about this many chunks, while keeping the disk busy.
pub(crate) const READ_AHEAD: usize = 8;
/// Uploaded chunks verified and written at once per upload stream.
pub(crate) const UPLOAD_PARALLELISM: usize = 4;
/// Most digests one FindMissingChunks or FetchChunks request may name.
pub(crate) const MAX_DIGESTS_PER_REQUEST: usize = 1 << 20;
/// Watchers that fall this many events behind are cut off (and re-list).
const EVENT_BUFFER: usize = 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct ImageService {
    pub(crate) store: Arc<ChunkStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) events: broadcast::Sender<ImageEvent>,
    replica_of: Option<String>,
}

/// Map a store error to a status with the message intact.
pub(crate) fn status_of(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NoSuchImage(_) | StoreError::MissingChunk(_) => Status::not_found(msg),
        StoreError::LeafExists { .. } => Status::already_exists(msg),
        StoreError::ChunksMissing { .. } => Status::failed_precondition(msg),
        StoreError::DigestMismatch { .. } | StoreError::BadChunk { .. } => Status::invalid_argument(msg),
        StoreError::Name(_) | StoreError::Manifest(_) => Status::invalid_argument(msg),
        StoreError::Io { .. } | StoreError::BadRecord { .. } => {
            tracing::error!(error = %msg, "store failure");
            Status::internal(msg)
        }
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
        ImageService { store, metrics, events, replica_of }
    }

    fn require<T>(&self, req: &Request<T>, right: Right) -> Result<(), Status> {
        fleet_tls::require(req, right).map(|_| ()).inspect_err(|_| Metrics::add(&self.metrics.requests_denied, 1))
    }

    fn refuse_if_replica(&self) -> Result<(), Status> {
        match &self.replica_of {
            Some(master) => Err(Status::failed_precondition(format!(
                "this imageserver is a read-only replica of {master}; write to the master"
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn publish(&self, kind: Kind, img: &StoredImage) {
        let _ = self.events.send(ImageEvent { kind: kind as i32, info: Some(info_of(img)) });
    }
}

#[tonic::async_trait]
impl ImageServer for ImageService {
    async fn list_streams(&self, req: Request<ListStreamsRequest>) -> Result<Response<ListStreamsResponse>, Status> {
        self.require(&req, Right::Read)?;
        let store = self.store.clone();
        let streams = blocking(move || store.list_streams()).await?;
        Ok(Response::new(ListStreamsResponse { streams }))
    }

    async fn list_images(&self, req: Request<ListImagesRequest>) -> Result<Response<ListImagesResponse>, Status> {
        self.require(&req, Right::Read)?;
        let stream = req.into_inner().stream;
        image_format::validate_stream(&stream).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = self.store.clone();
        let images = blocking(move || store.list_images(&stream)).await?;
        Ok(Response::new(ListImagesResponse { images: images.iter().map(info_of).collect() }))
    }

    async fn find_latest_image(&self, req: Request<FindLatestImageRequest>) -> Result<Response<ImageInfo>, Status> {
        self.require(&req, Right::Read)?;
        let stream = req.into_inner().stream;
        image_format::validate_stream(&stream).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let store = self.store.clone();
        let s = stream.clone();
        let images = blocking(move || store.list_images(&s)).await?;
        let latest = images.last().ok_or_else(|| Status::not_found(format!("stream {stream} has no images")))?;
        Ok(Response::new(info_of(latest)))
    }

    async fn get_manifest(&self, req: Request<GetManifestRequest>) -> Result<Response<GetManifestResponse>, Status> {
        self.require(&req, Right::Read)?;
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
        self.require(&req, Right::Write)?;
        self.refuse_if_replica()?;
        let digests = digests_of(&req.into_inner().digests)?;
        let store = self.store.clone();
        let missing = blocking(move || {
            Ok(digests.into_iter().filter(|d| !store.has_and_touch(d)).map(|d| d.0.to_vec().into()).collect())
        })
        .await?;
        Ok(Response::new(FindMissingChunksResponse { missing }))
    }

    async fn upload_chunks(
        &self,
        req: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadChunksResponse>, Status> {
        self.require(&req, Right::Write)?;
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
        self.require(&req, Right::Write)?;
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
            self.publish(Kind::Committed, &img);
        }
        Ok(Response::new(info_of(&img)))
    }

    async fn delete_image(&self, req: Request<DeleteImageRequest>) -> Result<Response<DeleteImageResponse>, Status> {
        self.require(&req, Right::Write)?;
        self.refuse_if_replica()?;
        let r = req.into_inner();
        let name = name_of(&r.stream, &r.leaf)?;
        let store = self.store.clone();
        let img = blocking(move || {
            let img = store.get_image(&name)?;
            store.delete_image(&name)?;
            Ok(img)
        })
        .await?;
        Metrics::add(&self.metrics.images_deleted, 1);
        tracing::info!(image = %img.name, "image deleted");
        self.publish(Kind::Deleted, &img);
        Ok(Response::new(DeleteImageResponse {}))
    }

    async fn collect_garbage(
        &self,
        req: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        self.require(&req, Right::Write)?;
        let r = req.into_inner();
        let store = self.store.clone();
        let report = blocking(move || store.collect_garbage(Duration::from_secs(r.grace_seconds), r.dry_run)).await?;
        Ok(Response::new(CollectGarbageResponse {
            chunks_removed: report.chunks_removed,
            bytes_removed: report.bytes_removed,
            chunks_kept: report.chunks_kept,
        }))
    }

    type FetchChunksStream = BoxStream<Chunk>;

    async fn fetch_chunks(
        &self,
        req: Request<FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        self.require(&req, Right::Read)?;
        let digests = digests_of(&req.into_inner().digests)?;
        let (tx, rx) = mpsc::channel(2);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut reads = futures::stream::iter(digests)
                .map(|d| {
                    let store = store.clone();
                    async move { blocking(move || store.get_compressed(&d).map(|z| (d, z))).await }
                })
                .buffered(READ_AHEAD);
            while let Some(item) = reads.next().await {
                let item = item.map(|(d, z)| {
                    Metrics::add(&metrics.chunks_served, 1);
                    Metrics::add(&metrics.bytes_served, z.len() as u64);
                    Chunk { digest: d.0.to_vec().into(), zstd_data: z.into() }
                });
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchImagesStream = BoxStream<ImageEvent>;

    async fn watch_images(
        &self,
        req: Request<WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        self.require(&req, Right::Read)?;
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

    async fn replicate(&self, req: Request<ReplicateRequest>) -> Result<Response<Self::ReplicateStream>, Status> {
        self.require(&req, Right::Replicate)?;
        // Subscribe before listing so nothing committed in between is missed;
        // replicas apply events idempotently.
        let live = event_stream(self.events.subscribe());
        let store = self.store.clone();
        let all = blocking(move || store.list_all_images()).await?;
        let snapshot = futures::stream::iter(
            all.into_iter().map(|img| Ok(ImageEvent { kind: Kind::Committed as i32, info: Some(info_of(&img)) })),
        );
        Ok(Response::new(Box::pin(snapshot.chain(live))))
    }
}

fn event_stream(rx: broadcast::Receiver<ImageEvent>) -> impl Stream<Item = Result<ImageEvent, Status>> + Send {
    BroadcastStream::new(rx).map(|r| {
        r.map_err(|BroadcastStreamRecvError::Lagged(n)| {
            Status::resource_exhausted(format!("watcher fell {n} events behind; list again and re-watch"))
        })
    })
}
