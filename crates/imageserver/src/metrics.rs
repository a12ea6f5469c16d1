//! The imageserver's counters and what its monitoring port shows: the
//! `/metrics` page and the `/status` JSON. The listener itself is
//! `fleet_daemon::serve_metrics`.

use std::{sync::Arc, time::Instant};

use chunk_store::ChunkStore;
use fleet_daemon::{Counter, Gauge, Monitored, Registry, metrics_text};

/// Counters the server keeps, each registered for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    registry: Registry,
    uptime: Gauge,
    pub chunks_served: Counter,
    pub bytes_served: Counter,
    pub chunks_received: Counter,
    pub chunks_stored: Counter,
    pub bytes_received: Counter,
    pub chunks_rejected: Counter,
    pub images_committed: Counter,
    pub images_deleted: Counter,
    pub images_replicated: Counter,
    pub requests_denied: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let c = Counter::default;
        let mut m = Metrics {
            started: Instant::now(),
            registry: Registry::default(),
            uptime: Gauge::default(),
            chunks_served: c(),
            bytes_served: c(),
            chunks_received: c(),
            chunks_stored: c(),
            bytes_received: c(),
            chunks_rejected: c(),
            images_committed: c(),
            images_deleted: c(),
            images_replicated: c(),
            requests_denied: c(),
        };
        // Each counter appears as NAME_total.
        let counters: &[(&str, &str, &Counter)] = &[
            ("imageserver_chunks_served", "Chunks sent to clients", &m.chunks_served),
            ("imageserver_bytes_served", "Compressed chunk bytes sent to clients", &m.bytes_served),
            ("imageserver_chunks_received", "Chunks received in uploads", &m.chunks_received),
            ("imageserver_chunks_stored", "Chunks newly stored", &m.chunks_stored),
            ("imageserver_bytes_received", "Compressed chunk bytes received", &m.bytes_received),
            ("imageserver_chunks_rejected", "Uploaded chunks refused (bad digest or frame)", &m.chunks_rejected),
            ("imageserver_images_committed", "Images committed", &m.images_committed),
            ("imageserver_images_deleted", "Images deleted", &m.images_deleted),
            ("imageserver_images_replicated", "Images copied from the master", &m.images_replicated),
            ("imageserver_requests_denied", "Requests refused for lack of a right", &m.requests_denied),
        ];
        m.registry = fleet_daemon::registry_of(counters, ("imageserver_uptime_seconds", &m.uptime));
        m
    }
}

impl Metrics {
    pub(crate) fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// The `/metrics` page.
    pub fn render(&self) -> String {
        self.uptime.set(i64::try_from(self.uptime_seconds()).unwrap_or(i64::MAX));
        metrics_text(&self.registry)
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
    pub(crate) readiness: Arc<crate::Readiness>,
}

/// The `/status` body.
#[derive(serde::Serialize)]
pub(crate) struct Status {
    role: &'static str,
    /// Where the images are: a directory or s3://BUCKET/PREFIX.
    store: String,
    /// Empty when ready, else why not.
    not_ready: String,
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
            store: self.store.location(),
            not_ready: self.readiness.get().err().unwrap_or_default(),
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

    fn readiness(&self) -> Result<(), String> {
        self.readiness.get()
    }
}
