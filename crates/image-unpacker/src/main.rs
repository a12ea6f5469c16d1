//! `image-unpacker`: the agent daemon.

/// See the workspace manifest: glibc's malloc cost a page fault per few KiB moved.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use fleet_tls::TlsFiles;

/// Bring attached block devices (EBS volumes) to any leaf of an image stream,
/// writing only the chunks that differ from what the device holds.
///
/// Devices are found by EBS volume id in --device-dir (Nitro udev names),
/// NVMe serials, or Xen names. Only clients whose certificate carries the
/// drive-unpacker right (the ami-publisher role) may call it; images are read
/// from --image-server with this daemon's own certificate. A device that is
/// mounted, holds /, or is in use is never written.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address for gRPC over mutual TLS.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], fleet_proto::UNPACKER_PORT)))]
    listen: SocketAddr,
    /// Address for plain-HTTP /status and /metrics (Prometheus); "off" disables.
    #[arg(long, default_value = "127.0.0.1:6975", value_parser = fleet_daemon::parse_metrics_listen)]
    metrics_listen: std::option::Option<SocketAddr>,
    /// Where the record of devices, streams and device contents lives.
    #[arg(long, default_value = "/var/lib/image-unpacker")]
    state_dir: PathBuf,
    /// The imageserver to read images from (HOST:PORT).
    #[arg(long, env = fleet_proto::IMAGE_SERVER_ENV, default_value_t = fleet_proto::default_image_server(), value_name = "HOST:PORT")]
    image_server: String,
    /// Directory of device links named by volume id (Nitro: nvme-Amazon_Elastic_Block_Store_vol…).
    #[arg(long, default_value = "/dev/disk/by-id")]
    device_dir: PathBuf,
    /// CA certificate that signs every client and the imageserver.
    #[arg(long, default_value = "/etc/ssl/CA.pem")]
    ca: PathBuf,
    /// This daemon's certificate (served, and shown to the imageserver).
    #[arg(long, default_value = "/etc/ssl/image-unpacker/cert.pem")]
    cert: PathBuf,
    /// This daemon's private key.
    #[arg(long, default_value = "/etc/ssl/image-unpacker/key.pem")]
    key: PathBuf,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

/// Threads for device I/O: an unpack uses one writer and a few verifiers.
const MAX_BLOCKING_THREADS: usize = 8;

fn main() -> ExitCode {
    let args = Args::parse();
    fleet_cli::init_tracing("info", args.log_json);
    let config = image_unpacker::Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        state_dir: args.state_dir,
        device_dir: args.device_dir,
        image_server: args.image_server,
        tls: TlsFiles { ca: args.ca, cert: args.cert, key: args.key },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .expect("tokio runtime");
    match rt.block_on(image_unpacker::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
