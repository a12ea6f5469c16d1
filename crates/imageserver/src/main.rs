//! `imageserver`: serves image streams over mutual-TLS gRPC.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

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
    /// Where chunks and image records live, when --store is not given.
    #[arg(long, default_value = "/var/lib/imageserver")]
    data_dir: PathBuf,
    /// Where images live: a directory, or s3://BUCKET/PREFIX, a bucket any
    /// number of imageservers can serve at once. The bucket is reached
    /// with the standard AWS configuration (AWS_PROFILE, AWS_REGION,
    /// AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for MinIO and the like,
    /// instance roles). The identity needs s3:GetObject, PutObject,
    /// DeleteObject and ListBucket on it.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX", value_parser = imageserver::Store::parse, conflicts_with = "data_dir")]
    store: Option<imageserver::Store>,
    /// Keep a local copy of chunks read from the store here (for a server
    /// far from its bucket); needs --cache-size.
    #[arg(long, value_name = "DIR", requires = "cache_size")]
    cache_dir: Option<PathBuf>,
    /// The most bytes the cache may hold (e.g. 20GiB); the least recently
    /// read chunks go first.
    #[arg(long, value_name = "BYTES", value_parser = fleet_cli::parse_size, requires = "cache_dir")]
    cache_size: Option<u64>,
    /// How often the store is checked (readiness) and, for a bucket, listed
    /// for images other servers committed or deleted, which this server's
    /// watchers hear of within this time.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    poll: Duration,
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
        store: args.store.unwrap_or(imageserver::Store::Dir(args.data_dir)),
        cache: args.cache_dir.zip(args.cache_size).map(|(dir, max_bytes)| imageserver::Cache { dir, max_bytes }),
        poll: args.poll,
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
