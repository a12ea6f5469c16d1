//! The imageserver: image streams over mutual-TLS gRPC.
//!
//! Entry points: [`run`] (the daemon) and [`start`] (bind, then serve in the
//! background: used by tests, benchmarks and the demo). The gRPC service is in
//! `service`, replication in `replica`, where images live (a directory or a
//! bucket shared with other imageservers) and the watch that keeps readiness
//! and cross-server events in `store`, the counters and the `/status` body
//! in `metrics`; the run loop, the monitoring listener and the tracing
//! set-up are the fleet's shared ones from `fleet_daemon`. Beside its own
//! service it serves gRPC health and reflection.
//!
//! **Architecture invariants:** the server knows nothing of EC2 or block
//! devices, and of S3 only through `chunk_store_s3`; configuration,
//! certificates and the store are checked before any port is bound; a
//! replica never accepts writes; the server holds no state another
//! imageserver on the same bucket needs (any number can serve one bucket).

#![forbid(unsafe_code)]

mod metrics;
mod replica;
mod service;
mod store;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use fleet_proto::imageserver::image_server_server::ImageServerServer;
use fleet_tls::TlsFiles;
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use metrics::Metrics;
pub use service::{ImageService, RIGHTS};
pub use store::{Cache, Readiness, Store};

/// How often a server checks its store (readiness), and looks for what
/// other servers on a shared bucket committed, unless told otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_secs(5);

/// Everything the daemon needs, validated before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub store: Store,
    /// A local cache of chunks read from the store (for a bucket far away).
    pub cache: Option<Cache>,
    /// How often the store is checked and, when shared, listed.
    pub poll: Duration,
    pub tls: TlsFiles,
    pub replicate_from: Option<String>,
}

impl Config {
    /// A server on `listen` over `store`, with the defaults for the rest.
    pub fn new(listen: SocketAddr, store: Store, tls: TlsFiles) -> Config {
        Config { listen, metrics_listen: None, store, cache: None, poll: DEFAULT_POLL, tls, replicate_from: None }
    }
}

/// The full name of the service, as health and reflection know it.
const SERVICE_NAME: &str = <ImageServerServer<ImageService> as tonic::server::NamedService>::NAME;

/// A server running in the background.
pub struct Running {
    /// Where gRPC listens.
    pub addr: SocketAddr,
    /// Where /status and /metrics listen.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// Whether the server is ready (what /readyz and gRPC health say).
    pub readiness: Arc<Readiness>,
    probes: fleet_proto::probes::Probes,
    watch: tokio::task::JoinHandle<()>,
    serving: fleet_daemon::Serving,
}

impl Running {
    /// Stop serving and wait for the server to finish. Probes hear
    /// NOT_SERVING first, so balancers stop sending new calls while the
    /// ones in flight finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.watch.abort();
        self.readiness.set(Err("draining: the server is stopping".into()));
        self.probes.set(false).await;
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
    let store = store::open(&config.store, config.cache.as_ref()).await?;
    let metrics = Arc::new(Metrics::default());
    let service = ImageService::new(store.clone(), metrics.clone(), config.replicate_from.clone());
    let readiness = Arc::new(Readiness::default());
    readiness.set(Ok(()));
    let (probes, health_service, reflection) =
        fleet_proto::probes::probes(SERVICE_NAME).await.context("building the reflection service")?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match config.metrics_listen {
        Some(a) => {
            let monitor = metrics::Monitor {
                store: store.clone(),
                metrics: metrics.clone(),
                replica_of: config.replicate_from.clone(),
                readiness: readiness.clone(),
            };
            Some(fleet_daemon::serve_metrics(a, monitor).await?)
        }
        None => None,
    };
    if let Some(master) = &config.replicate_from {
        replica::spawn(master.clone(), config.tls.clone(), service.clone());
    }
    let watch = tokio::spawn(store::watch(
        service.clone(),
        readiness.clone(),
        probes.clone(),
        config.store.shared(),
        config.poll,
    ));
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
            .max_frame_size(fleet_tls::dial::MAX_FRAME)
            .tcp_nodelay(true)
            // Every call passes the rights table first: see `service::RIGHTS`.
            .layer(rights)
            .add_service(grpc)
            .add_service(health_service)
            .add_service(reflection)
            .serve_with_incoming_shutdown(fleet_tls::incoming(listener), stop)
            .await
            .context("gRPC server failed")
    });
    tracing::info!(%addr, ?metrics_addr, store = %config.store, replica_of = ?config.replicate_from, "imageserver listening");
    Ok(Running { addr, metrics_addr, metrics, readiness, probes, watch, serving })
}

/// Run the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    fleet_daemon::run_until_signal(start(config).await?).await
}
