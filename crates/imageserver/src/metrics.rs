//! The imageserver's counters and what its monitoring port shows: the
//! Prometheus page and the `/status` JSON. The listener itself is
//! `fleet_daemon::serve_metrics`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use chunk_store::ChunkStore;
use fleet_daemon::{Monitored, Prometheus};

/// Counters the server keeps.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    pub chunks_served: AtomicU64,
    pub bytes_served: AtomicU64,
    pub chunks_received: AtomicU64,
    pub chunks_stored: AtomicU64,
    pub bytes_received: AtomicU64,
    pub chunks_rejected: AtomicU64,
    pub images_committed: AtomicU64,
    pub images_deleted: AtomicU64,
    pub images_replicated: AtomicU64,
    pub requests_denied: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            chunks_served: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            chunks_received: AtomicU64::new(0),
            chunks_stored: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            chunks_rejected: AtomicU64::new(0),
            images_committed: AtomicU64::new(0),
            images_deleted: AtomicU64::new(0),
            images_replicated: AtomicU64::new(0),
            requests_denied: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 10] = [
            ("imageserver_chunks_served_total", "Chunks sent to clients", &self.chunks_served),
            ("imageserver_bytes_served_total", "Compressed chunk bytes sent to clients", &self.bytes_served),
            ("imageserver_chunks_received_total", "Chunks received in uploads", &self.chunks_received),
            ("imageserver_chunks_stored_total", "Chunks newly stored", &self.chunks_stored),
            ("imageserver_bytes_received_total", "Compressed chunk bytes received", &self.bytes_received),
            (
                "imageserver_chunks_rejected_total",
                "Uploaded chunks refused (bad digest or frame)",
                &self.chunks_rejected,
            ),
            ("imageserver_images_committed_total", "Images committed", &self.images_committed),
            ("imageserver_images_deleted_total", "Images deleted", &self.images_deleted),
            ("imageserver_images_replicated_total", "Images copied from the master", &self.images_replicated),
            ("imageserver_requests_denied_total", "Requests refused for lack of a right", &self.requests_denied),
        ];
        let mut page = Prometheus::new();
        for (name, help, v) in rows {
            page.counter(name, help, v.load(Ordering::Relaxed));
        }
        page.gauge("imageserver_uptime_seconds", "Seconds since start", self.uptime_seconds() as f64);
        page.finish()
    }

    fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

/// What the monitoring port reads from.
#[derive(Clone)]
pub(crate) struct Monitor {
    pub(crate) store: Arc<ChunkStore>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) replica_of: Option<String>,
}

/// The `/status` body.
#[derive(serde::Serialize)]
pub(crate) struct Status {
    role: &'static str,
    replica_of: Option<String>,
    uptime_seconds: u64,
    streams: usize,
    images: usize,
    /// Leaves whose records failed their integrity checks (not served).
    damaged_images: usize,
}

impl Monitored for Monitor {
    type Status = Status;

    async fn status_page(&self) -> Status {
        let store = self.store.clone();
        let (streams, images, damaged_images) = tokio::task::spawn_blocking(move || {
            let all = store.list_all_images().unwrap_or_default();
            let streams =
                all.images.iter().map(|i| i.name.stream().to_owned()).collect::<std::collections::HashSet<_>>().len();
            (streams, all.images.len(), all.damaged.len())
        })
        .await
        .unwrap_or((0, 0, 0));
        Status {
            role: if self.replica_of.is_some() { "replica" } else { "master" },
            replica_of: self.replica_of.clone(),
            uptime_seconds: self.metrics.uptime_seconds(),
            streams,
            images,
            damaged_images,
        }
    }

    fn metrics_page(&self) -> String {
        self.metrics.render()
    }
}
