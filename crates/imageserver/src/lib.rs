//! The imageserver: image streams over mutual-TLS gRPC.
//!
//! Entry points: [`run`] (the daemon) and [`start`] (bind, then serve in the
//! background: used by tests, benchmarks and the demo). The gRPC service is in
//! `service`, replication in `replica`, the counters and the `/status` body
//! in `metrics`; the run loop, the monitoring listener and the tracing
//! set-up are the fleet's shared ones from `fleet_daemon`.
//!
//! **Architecture invariants:** the server knows nothing of AWS or block
//! devices; configuration and certificates are checked before any port is
//! bound; a replica never accepts writes.

#![forbid(unsafe_code)]

mod metrics;
mod replica;
mod service;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use chunk_store::ChunkStore;
use fleet_proto::imageserver::image_server_server::ImageServerServer;
use fleet_tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

pub use metrics::Metrics;
pub use service::{ImageService, RIGHTS};

/// Everything the daemon needs, validated before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub replicate_from: Option<String>,
}

/// A server running in the background.
pub struct Running {
    /// Where gRPC listens.
    pub addr: SocketAddr,
    /// Where /status and /metrics listen.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    serving: fleet_daemon::Serving,
}

impl Running {
    /// Stop serving and wait for the server to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        fleet_daemon::Daemon::stop(self.serving).await
    }

    /// Wait until the server fails or is stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.serving.wait().await
    }
}

impl fleet_daemon::Daemon for Running {
    async fn stop(self) -> anyhow::Result<()> {
        Running::stop(self).await
    }

    async fn ended(&mut self) -> anyhow::Error {
        self.serving.ended().await
    }
}

/// Bind the ports and serve in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let tls = config.tls.server_config().context("loading the server's TLS files")?;
    let store = Arc::new(
        ChunkStore::open(&config.data_dir)
            .with_context(|| format!("opening the data directory '{}'", config.data_dir.display()))?,
    );
    let metrics = Arc::new(Metrics::default());
    let service = ImageService::new(store.clone(), metrics.clone(), config.replicate_from.clone());
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match config.metrics_listen {
        Some(a) => {
            let monitor = metrics::Monitor {
                store: store.clone(),
                metrics: metrics.clone(),
                replica_of: config.replicate_from.clone(),
            };
            Some(fleet_daemon::serve_metrics(a, monitor).await?)
        }
        None => None,
    };
    if let Some(master) = &config.replicate_from {
        replica::spawn(master.clone(), config.tls.clone(), service.clone());
    }
    let denied = metrics.clone();
    let rights = RIGHTS.layer(move || Metrics::add(&denied.requests_denied, 1));
    let grpc = ImageServerServer::new(service)
        .max_decoding_message_size(fleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleet_proto::MAX_MESSAGE_BYTES);
    let serving = fleet_daemon::Serving::spawn(|stop| async move {
        Server::builder()
            .tls_config(tls)?
            .initial_stream_window_size(fleet_tls::dial::STREAM_WINDOW)
            .initial_connection_window_size(fleet_tls::dial::CONNECTION_WINDOW)
            .tcp_nodelay(true)
            // Every call passes the rights table first: see `service::RIGHTS`.
            .layer(rights)
            .add_service(grpc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
            .await
            .context("gRPC server failed")
    });
    tracing::info!(%addr, ?metrics_addr, data_dir = %config.data_dir.display(), replica_of = ?config.replicate_from, "imageserver listening");
    Ok(Running { addr, metrics_addr, metrics, serving })
}

/// Run the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    fleet_daemon::run_until_signal(start(config).await?).await
}
