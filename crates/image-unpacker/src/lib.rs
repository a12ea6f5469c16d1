//! The image-unpacker: an agent on an EC2 instance that brings attached
//! volumes to any leaf of an image stream, writing only what changed.
//!
//! Entry points: [`run`] (the daemon) and [`start`] (bind, then serve in the
//! background: used by tests, benchmarks and the local world). Modules:
//!
//! - `service`: the gRPC layer, a thin shell that converts requests and
//!   answers (and the [`RIGHTS`] table); no state, no rules;
//! - `core`: [`Unpacker`], the state and every rule, split into `claims`
//!   (devices, bindings, set-up lease, the claimed device the engine writes
//!   through), `holds` (capture holds), `scan`, `unpack`, `capture`
//!   (read-back and GetRaw) and `status`; it answers with its own errors;
//! - [`engine`]: the device work (scan, apply a diff, read back, raw
//!   streaming), with no knowledge of streams or state;
//! - `verified`: chunks whose digest was checked, the only chunks written;
//! - [`blockdev`]: the device safety checks; [`devices`]: finding volumes;
//!   [`state`]: the persisted record; `metrics`: /status and /metrics;
//!
//! **Architecture invariants:** the unpacker knows nothing of AWS; only a
//! certificate with the drive-unpacker right may call it; a device is written
//! only while bound to a stream and free (see `blockdev`); a chunk is written
//! only after its digest was checked.

#![forbid(unsafe_code)]

pub mod blockdev;
mod core;
pub mod devices;
pub mod engine;
mod metrics;
mod service;
pub mod state;
mod verified;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use fleet_proto::unpacker::image_unpacker_server::ImageUnpackerServer;
use fleet_tls::TlsFiles;
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use crate::core::{ServiceConfig, Unpacker};
pub use metrics::Metrics;
pub use service::RIGHTS;

/// Everything the daemon needs, validated before any port is bound.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub device_dir: PathBuf,
    pub image_server: String,
    pub tls: TlsFiles,
}

/// An unpacker running in the background.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub unpacker: Unpacker,
    probes: fleet_proto::probes::Probes,
    serving: fleet_daemon::Serving,
}

impl Running {
    /// Stop serving and wait for the server to finish; gRPC health says
    /// NOT_SERVING first (a drain).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.probes.set(false).await;
        fleet_daemon::Daemon::stop(self.serving).await
    }

    /// Wait until the server fails or is stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.serving.wait().await
    }
}

/// Bind the ports and serve in the background.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let tls = config.tls.server_config().context("loading the unpacker's TLS files")?;
    // The client side is checked now too: a bad file should stop the start,
    // not the first unpack.
    config.tls.client_config(fleet_tls::IMAGESERVER_TLS_NAME).context("loading the unpacker's TLS files")?;
    let metrics = Arc::new(Metrics::default());
    let denied = metrics.clone();
    let service_config = ServiceConfig {
        device_dir: config.device_dir.clone(),
        image_server: config.image_server.clone(),
        tls: config.tls.clone(),
    };
    let unpacker = Unpacker::new(&config.state_dir, service_config, metrics)
        .with_context(|| format!("opening the state directory '{}'", config.state_dir.display()))?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics_addr = match config.metrics_listen {
        Some(a) => Some(fleet_daemon::serve_metrics(a, unpacker.clone()).await?),
        None => None,
    };
    let rights = RIGHTS.layer(move || Metrics::add(&denied.requests_denied, 1));
    let grpc = ImageUnpackerServer::new(unpacker.clone())
        .max_decoding_message_size(fleet_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(fleet_proto::MAX_MESSAGE_BYTES);
    let name = <ImageUnpackerServer<Unpacker> as tonic::server::NamedService>::NAME;
    let (probes, health, reflection) =
        fleet_proto::probes::probes(name).await.context("building the reflection service")?;
    let serving = fleet_daemon::Serving::spawn(|stop| async move {
        Server::builder()
            .tls_config(tls)?
            .tcp_nodelay(true)
            // Every call passes the rights table first: see `service::RIGHTS`.
            .layer(rights)
            .add_service(grpc)
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming_shutdown(fleet_tls::incoming(listener), stop)
            .await
            .context("gRPC server failed")
    });
    tracing::info!(%addr, ?metrics_addr, state_dir = %config.state_dir.display(),
        device_dir = %config.device_dir.display(), image_server = %config.image_server, "image-unpacker listening");
    Ok(Running { addr, metrics_addr, unpacker, probes, serving })
}

/// Run the daemon until SIGINT or SIGTERM (or until its server fails).
pub async fn run(config: Config) -> anyhow::Result<()> {
    fleet_daemon::run_until_signal(start(config).await?).await
}

impl fleet_daemon::Daemon for Running {
    async fn stop(self) -> anyhow::Result<()> {
        Running::stop(self).await
    }

    async fn ended(&mut self) -> anyhow::Error {
        self.serving.ended().await
    }
}
