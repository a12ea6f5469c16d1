//! `imageserver`: serves image streams over mutual-TLS gRPC.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use fleet_tls::TlsFiles;

/// Serve disk-image streams (manifests and content-addressed chunks) to
/// clients holding a certificate from the configured CA. What a client may do
/// (read, write, replicate) comes from rights in its certificate.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address for gRPC over mutual TLS.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], fleet_proto::IMAGESERVER_PORT)))]
    listen: SocketAddr,
    /// Address for plain-HTTP /status and /metrics (Prometheus); "off" disables.
    #[arg(long, default_value = "127.0.0.1:6972", value_parser = fleet_daemon::parse_metrics_listen)]
    metrics_listen: std::option::Option<SocketAddr>,
    /// Where chunks and image records live.
    #[arg(long, default_value = "/var/lib/imageserver")]
    data_dir: PathBuf,
    /// CA certificate that signs every client (and the master, for replicas).
    #[arg(long, default_value = "/etc/ssl/CA.pem")]
    ca: PathBuf,
    /// This server's certificate.
    #[arg(long, default_value = "/etc/ssl/imageserver/cert.pem")]
    cert: PathBuf,
    /// This server's private key.
    #[arg(long, default_value = "/etc/ssl/imageserver/key.pem")]
    key: PathBuf,
    /// Run as a replica of this master (HOST:PORT): copy every image it has,
    /// keep following it, and refuse writes.
    #[arg(long, value_name = "HOST:PORT")]
    replicate_from: Option<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Threads for blocking chunk reads and writes.
const MAX_BLOCKING_THREADS: usize = 32;

fn main() -> ExitCode {
    let args = Args::parse();
    fleet_cli::init_tracing("info", args.log_json);
    let config = imageserver::Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        data_dir: args.data_dir,
        tls: TlsFiles { ca: args.ca, cert: args.cert, key: args.key },
        replicate_from: args.replicate_from,
    };
    // Blocking threads do chunk I/O; a modest cap bounds the memory their
    // allocator arenas keep, without starving the read-ahead.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .expect("tokio runtime");
    match rt.block_on(imageserver::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
