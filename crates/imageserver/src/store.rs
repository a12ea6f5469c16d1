//! Where the imageserver keeps its images ([`Store`]), opening it, and the
//! watch that keeps the serving status and, for a shared bucket, the image
//! events true ([`watch`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use chunk_store::{Cached, ChunkStore};
use chunk_store_s3::S3Location;
use fleet_proto::imageserver::image_event::Kind;
use image_format::{Digest, ImageName};

use crate::service::ImageService;

/// Where images live.
#[derive(Debug, Clone)]
pub enum Store {
    /// A local directory, this server's alone.
    Dir(PathBuf),
    /// An S3 bucket, which any number of imageservers can share. `aws` is
    /// the SDK configuration to reach it; `None` loads the standard one
    /// (environment, profiles, roles, `AWS_ENDPOINT_URL`).
    S3 { at: S3Location, aws: Option<Box<chunk_store_s3::SdkConfig>> },
}

impl Store {
    /// `s3://BUCKET/PREFIX` or a directory.
    pub fn parse(s: &str) -> Result<Store, String> {
        if s.starts_with("s3://") {
            Ok(Store::S3 { at: s.parse()?, aws: None })
        } else if s.contains("://") {
            Err(format!("'{s}': a store is a directory or s3://BUCKET/PREFIX"))
        } else {
            Ok(Store::Dir(PathBuf::from(s)))
        }
    }

    /// Whether other imageservers may write to the same objects (their
    /// commits reach this server's watchers only through [`watch`]).
    pub fn shared(&self) -> bool {
        matches!(self, Store::S3 { .. })
    }
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Dir(p) => write!(f, "{}", p.display()),
            Store::S3 { at, .. } => write!(f, "{at}"),
        }
    }
}

/// A local cache of chunks read from a bucket.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// Open the store (checking that it can be reached).
pub(crate) async fn open(store: &Store, cache: Option<&Cache>) -> anyhow::Result<Arc<ChunkStore>> {
    let backend: Box<dyn chunk_store::Backend> = match store {
        Store::Dir(dir) => {
            let dir = dir.clone();
            Box::new(
                tokio::task::spawn_blocking(move || chunk_store::Dir::open(&dir))
                    .await?
                    .with_context(|| format!("opening the data directory '{store}'"))?,
            )
        }
        Store::S3 { at, aws } => {
            let sdk = match aws {
                Some(c) => (**c).clone(),
                None => chunk_store_s3::sdk_config_from_env().await,
            };
            let client = chunk_store_s3::client(&sdk);
            Box::new(chunk_store_s3::S3::open(client, at.clone()).await.with_context(|| format!("opening {at}"))?)
        }
    };
    let backend: Box<dyn chunk_store::Backend> = match cache {
        Some(c) => {
            let c = c.clone();
            Box::new(
                tokio::task::spawn_blocking(move || Cached::new(backend, &c.dir, c.max_bytes))
                    .await?
                    .context("opening the chunk cache")?,
            )
        }
        None => backend,
    };
    let store = tokio::task::spawn_blocking(move || ChunkStore::with_backend(backend)).await??;
    Ok(Arc::new(store))
}

/// Whether the server is ready, and why not: what the readiness probes
/// (gRPC health, `/readyz`) answer.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    why_not: Mutex<String>,
}

impl Readiness {
    pub(crate) fn set(&self, r: Result<(), String>) -> bool {
        let ready = r.is_ok();
        let was = self.ready.swap(ready, Ordering::SeqCst);
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = r.err().unwrap_or_default();
        was != ready
    }

    /// `Ok` when ready, else why not.
    pub fn get(&self) -> Result<(), String> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self.why_not.lock().unwrap_or_else(|e| e.into_inner()).clone())
        }
    }
}

/// Every `every`: check that the store answers (readiness); and for a
/// shared store, list its images and announce the commits and deletions
/// other imageservers made, so this server's watchers and replicas hear of
/// them within `every` (plus one listing).
pub(crate) async fn watch(
    service: ImageService,
    readiness: Arc<Readiness>,
    probes: fleet_proto::probes::Probes,
    shared: bool,
    every: Duration,
) {
    let mut known: Option<HashMap<ImageName, Digest>> = None;
    loop {
        let store = service.store.clone();
        let listed = tokio::task::spawn_blocking(move || {
            store.check()?;
            if shared { store.list_all_images().map(Some) } else { Ok(None) }
        })
        .await;
        let result = match listed {
            Ok(Ok(listing)) => {
                if let Some(listing) = listing {
                    let now: HashMap<ImageName, Digest> =
                        listing.images.iter().map(|i| (i.name.clone(), i.image_id)).collect();
                    if known.is_none() {
                        service.known(&listing.images);
                    }
                    if let Some(before) = &known {
                        for img in &listing.images {
                            if before.get(&img.name) != Some(&img.image_id) {
                                service.announce(Kind::Committed, img);
                            }
                        }
                        for name in before.keys().filter(|n| !now.contains_key(*n)) {
                            service.announce_deleted(name, false);
                        }
                    }
                    known = Some(now);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(format!("the store cannot be reached: {e}")),
            Err(e) => Err(format!("the store check failed: {e}")),
        };
        if readiness.set(result.clone()) {
            match &result {
                Ok(()) => tracing::info!("the store answers again: serving"),
                Err(why) => tracing::error!(%why, "not serving"),
            }
        }
        probes.set(result.is_ok()).await;
        tokio::time::sleep(every).await;
    }
}
