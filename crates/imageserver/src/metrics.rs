//! Plain-HTTP `/status` (JSON) and `/metrics` (Prometheus text) on their own
//! port, so monitoring needs no client certificate.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, routing::get};
use chunk_store::ChunkStore;

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
        let mut out = String::new();
        for (name, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP imageserver_uptime_seconds Seconds since start\n# TYPE imageserver_uptime_seconds gauge\nimageserver_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        out
    }
}

#[derive(Clone)]
struct Ctx {
    store: Arc<ChunkStore>,
    metrics: Arc<Metrics>,
    replica_of: Option<String>,
}

#[derive(serde::Serialize)]
struct Status {
    role: &'static str,
    replica_of: Option<String>,
    uptime_seconds: u64,
    streams: usize,
    images: usize,
    /// Leaves whose records failed their integrity checks (not served).
    damaged_images: usize,
}

/// Serve /status and /metrics on `addr`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    store: Arc<ChunkStore>,
    metrics: Arc<Metrics>,
    replica_of: Option<String>,
) -> anyhow::Result<SocketAddr> {
    let ctx = Ctx { store, metrics, replica_of };
    let app = Router::new()
        .route("/metrics", get(|State(c): State<Ctx>| async move { c.metrics.render() }))
        .route("/status", get(status))
        .with_state(ctx);
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics port {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}

async fn status(State(c): State<Ctx>) -> Json<Status> {
    let store = c.store.clone();
    let (streams, images, damaged_images) = tokio::task::spawn_blocking(move || {
        let all = store.list_all_images().unwrap_or_default();
        let streams =
            all.images.iter().map(|i| i.name.stream().to_owned()).collect::<std::collections::HashSet<_>>().len();
        (streams, all.images.len(), all.damaged.len())
    })
    .await
    .unwrap_or((0, 0, 0));
    Json(Status {
        role: if c.replica_of.is_some() { "replica" } else { "master" },
        replica_of: c.replica_of.clone(),
        uptime_seconds: c.metrics.started.elapsed().as_secs(),
        streams,
        images,
        damaged_images,
    })
}
