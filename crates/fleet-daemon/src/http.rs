//! The plain-HTTP monitoring listener: `/status` (JSON), `/metrics`
//! (OpenMetrics text, which Prometheus scrapes), and `/livez` and `/readyz`
//! for probes that cannot present a client certificate (Kubernetes HTTP
//! probes, load balancer health checks), on a port of their own.

use std::{future::Future, net::SocketAddr};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    routing::get,
};

use crate::METRICS_CONTENT_TYPE;

/// What a daemon shows its monitors. Cloned once per request.
///
/// The method names are chosen not to clash with a daemon's own `status` or
/// `metrics` methods.
pub trait Monitored: Clone + Send + Sync + 'static {
    /// The body of `/status`, serialised as JSON.
    type Status: serde::Serialize + Send;

    /// The daemon's status now. Blocking work belongs in `spawn_blocking`.
    fn status_page(&self) -> impl Future<Output = Self::Status> + Send;

    /// The body of `/metrics`: the daemon's registry as
    /// [`metrics_text`](crate::metrics_text) writes it.
    fn metrics_page(&self) -> String;

    /// Whether the daemon can do its work now (`/readyz`: 200, or 503 with
    /// the reason). Cheap: it reads a state the daemon keeps.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Bind `addr`, then serve `/status` and `/metrics` from `monitored` in the
/// background for as long as the runtime lives. Returns the bound address
/// (the real port when `addr` asked for port 0).
pub async fn serve_metrics<M: Monitored>(addr: SocketAddr, monitored: M) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<M>| async move { ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], m.metrics_page()) }),
        )
        .route("/status", get(|State(m): State<M>| async move { Json(m.status_page().await) }))
        // Alive: the process answers HTTP; restarting it would not help
        // anything /readyz reports.
        .route("/livez", get(|| async { "alive\n" }))
        .route(
            "/readyz",
            get(|State(m): State<M>| async move {
                match m.readiness() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                }
            }),
        )
        .with_state(monitored);
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
