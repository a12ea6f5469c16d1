//! Replication: follow a master's Replicate feed and copy each image,
//! fetching only chunks this server lacks. Reconnects with back-off forever.

use std::time::Duration;

use fleet_proto::imageserver::{ImageEvent, ImageInfo, ReplicateRequest, image_event::Kind};
use fleet_tls::TlsFiles;
use futures::StreamExt;
use image_client::Client;
use image_format::ImageName;

use crate::{Metrics, service::ImageService};

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub(crate) fn spawn(master: String, tls: TlsFiles, service: ImageService) {
    tokio::spawn(async move {
        let mut wait = RETRY_MIN;
        loop {
            match follow(&master, &tls, &service).await {
                Ok(()) => {
                    tracing::warn!(%master, "master closed the replication stream; reconnecting");
                    wait = RETRY_MIN;
                }
                Err(e) => {
                    tracing::warn!(%master, error = %fleet_tls::dial::error_chain(&*e), retry_in = ?wait, "replication interrupted");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    });
}

async fn follow(
    master: &str,
    tls: &TlsFiles,
    service: &ImageService,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut client = image_client::connect(master, tls).await?;
    let mut events = client
        .replicate(ReplicateRequest {})
        .await
        .map_err(image_client::rpc(format!("subscribe to {master}")))?
        .into_inner();
    tracing::info!(%master, "following master");
    while let Some(ev) = events.next().await {
        let ev: ImageEvent = ev.map_err(image_client::rpc("replication stream"))?;
        let Some(info) = ev.info else { continue };
        let name = ImageName::new(&info.stream, &info.leaf)?;
        if ev.kind == Kind::Committed as i32 {
            copy_image(&mut client, service, &name, &info).await?;
        } else if ev.kind == Kind::Deleted as i32 {
            delete_image(service, &name, &info).await?;
        }
    }
    Ok(())
}

async fn copy_image(
    client: &mut Client,
    service: &ImageService,
    name: &ImageName,
    info: &ImageInfo,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = service.store.clone();
    let n = name.clone();
    let have = tokio::task::spawn_blocking(move || store.get_image(&n).ok()).await?;
    if have.as_ref().is_some_and(|h| h.image_id.to_hex() == info.image_id) {
        return Ok(());
    }
    let (_, manifest) = image_client::get_manifest(client, name).await?;
    let store = service.store.clone();
    let wanted = manifest.distinct_chunks();
    let missing = tokio::task::spawn_blocking(move || {
        let digests: Vec<_> = wanted.iter().map(|(d, _)| *d).collect();
        let absent: std::collections::HashSet<_> = store.find_missing(&digests)?.into_iter().collect();
        Ok::<_, chunk_store::StoreError>(wanted.into_iter().filter(|(d, _)| absent.contains(d)).collect::<Vec<_>>())
    })
    .await??;
    let fetched = missing.len();
    let mut chunks = image_client::fetch_chunks(client.clone(), missing);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let store = service.store.clone();
        tokio::task::spawn_blocking(move || store.put_compressed(chunk.digest(), chunk.zstd())).await??;
    }
    let store = service.store.clone();
    let n = name.clone();
    let m = manifest.clone();
    let (img, new) = tokio::task::spawn_blocking(move || store.commit(&n, &m)).await??;
    if new {
        Metrics::add(&service.metrics.images_replicated, 1);
        tracing::info!(image = %name, id = %img.image_id, chunks_fetched = fetched, "image replicated");
        service.announce(Kind::Committed, &img);
    }
    Ok(())
}

async fn delete_image(
    service: &ImageService,
    name: &ImageName,
    info: &ImageInfo,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = service.store.clone();
    let n = name.clone();
    let id = info.image_id.clone();
    let deleted = tokio::task::spawn_blocking(move || match store.get_image(&n) {
        Ok(img) if img.image_id.to_hex() == id => store.delete_image(&n).map(|()| Some(img)),
        _ => Ok(None),
    })
    .await??;
    if let Some(img) = deleted {
        tracing::info!(image = %name, "image deleted on master; deleted here");
        service.announce(Kind::Deleted, &img);
    }
    Ok(())
}
