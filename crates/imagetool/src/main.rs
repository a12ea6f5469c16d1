//! `imagetool`: the build pipeline's client of the imageserver.

/// See the workspace manifest: glibc's malloc cost a page fault per few KiB moved.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use fleet_proto::imageserver::{
    CollectGarbageRequest, DeleteImageRequest, FindLatestImageRequest, ImageInfo, ListImagesRequest, ListStreamsRequest,
};
use fleet_tls::{IMAGESERVER_TLS_NAME, TlsFiles};
use image_format::ImageName;
use imagetool::{
    Progress,
    cli::{Cli, Cmd},
    client::{ClientError, rpc},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet_cli::init_tracing("warn", false);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imagetool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(serde::Serialize)]
struct InfoJson {
    image: String,
    image_id: String,
    size_bytes: u64,
    chunk_size: u32,
    chunk_count: u64,
    zero_chunks: u64,
    stored_bytes: u64,
    committed: String,
}

#[derive(serde::Serialize)]
struct DamagedJson {
    image: String,
    /// Which integrity check its record failed.
    damaged: String,
}

fn info_json(i: &ImageInfo) -> InfoJson {
    let committed = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(i.committed_unix_ms).unwrap_or(0));
    InfoJson {
        image: format!("{}/{}", i.stream, i.leaf),
        image_id: i.image_id.clone(),
        size_bytes: i.size_bytes,
        chunk_size: i.chunk_size,
        chunk_count: i.chunk_count,
        zero_chunks: i.zero_chunks,
        stored_bytes: i.stored_bytes,
        committed: humantime::format_rfc3339_seconds(committed).to_string(),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Run the command; a failure after connecting names a certificate the
/// imageserver refuses.
async fn run(cli: Cli) -> anyhow::Result<()> {
    // Names are checked before anything touches the network.
    let name = match &cli.command {
        Cmd::Add { image, .. } | Cmd::Get { image, .. } | Cmd::Verify { image } | Cmd::Delete { image } => {
            Some(ImageName::parse(image)?)
        }
        Cmd::Show { image } if image.contains('/') && ImageName::parse(image).is_ok() => Some(ImageName::parse(image)?),
        _ => None,
    };
    let tls = cli.tls.files();
    let server = cli.server.clone();
    let e = match command(cli, name, &tls).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if matches!(e.downcast_ref::<ClientError>(), Some(ClientError::Dial(_))) {
        // Not connected: the error says why (an alert is named there).
        return Err(e);
    }
    match fleet_tls::dial::unnamed_refusal(&format!("{e:#}"), &server, &tls, IMAGESERVER_TLS_NAME).await {
        Some(why) => Err(e.context(why)),
        None => Err(e),
    }
}

async fn command(cli: Cli, name: Option<ImageName>, tls: &TlsFiles) -> anyhow::Result<()> {
    let progress = if cli.json { Progress::Hidden } else { Progress::Bars };
    let mut client = imagetool::client::connect(&cli.server, tls).await?;
    match cli.command {
        Cmd::Add { file, chunk_size, .. } => {
            let name = name.expect("parsed above");
            let t = std::time::Instant::now();
            let r = imagetool::add(&mut client, &name, &file, chunk_size, progress).await?;
            if cli.json {
                print_json(&r)?;
            } else {
                println!(
                    "added {} ({})\n  image id {}\n  hashed {} in {:.1?}; {} of {} distinct chunks reused; uploaded {} chunks, {} sent ({} plain)",
                    r.image,
                    mib(r.size_bytes),
                    r.image_id,
                    mib(r.bytes_hashed),
                    t.elapsed(),
                    r.chunks_reused,
                    r.distinct_chunks,
                    r.chunks_uploaded,
                    mib(r.bytes_sent),
                    mib(r.bytes_uploaded_plain)
                );
            }
        }
        Cmd::Get { out, .. } => {
            let name = name.expect("parsed above");
            let r = imagetool::get(&mut client, &name, &out, progress).await?;
            if cli.json {
                print_json(&r)?;
            } else {
                println!(
                    "wrote {} to '{}' ({}; {} chunks fetched, {} received)",
                    r.image,
                    out.display(),
                    mib(r.size_bytes),
                    r.chunks_fetched,
                    mib(r.bytes_received)
                );
            }
        }
        Cmd::List { stream: None } => {
            let r = client.list_streams(ListStreamsRequest {}).await.map_err(rpc("list streams"))?.into_inner();
            if cli.json {
                print_json(&r.streams)?;
            } else {
                r.streams.iter().for_each(|s| println!("{s}"));
            }
        }
        Cmd::List { stream: Some(stream) } => {
            image_format::validate_stream(&stream)?;
            let r = client
                .list_images(ListImagesRequest { stream: stream.clone() })
                .await
                .map_err(rpc(format!("list images of {stream}")))?
                .into_inner();
            let rows: Vec<InfoJson> = r.images.iter().map(info_json).collect();
            let damaged: Vec<DamagedJson> = r
                .damaged
                .iter()
                .map(|d| DamagedJson { image: format!("{stream}/{}", d.leaf), damaged: d.reason.clone() })
                .collect();
            if cli.json {
                // Damaged leaves are rows too, told apart by their
                // "damaged" field, so a script cannot miss them.
                let mut all: Vec<serde_json::Value> =
                    rows.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
                all.extend(damaged.iter().map(serde_json::to_value).collect::<Result<Vec<_>, _>>()?);
                print_json(&all)?;
            } else {
                println!("{:<40} {:>12} {:<20} IMAGE ID", "IMAGE", "SIZE", "COMMITTED");
                for i in rows {
                    println!("{:<40} {:>12} {:<20} {}", i.image, mib(i.size_bytes), i.committed, &i.image_id[..16]);
                }
                for d in &damaged {
                    println!("{:<40} DAMAGED: {}", d.image, d.damaged);
                }
            }
            if !damaged.is_empty() {
                eprintln!(
                    "imagetool: {} image records of {stream} are damaged and not served; delete them \
                     (imagetool delete) or restore them from a replica",
                    damaged.len()
                );
            }
        }
        Cmd::Show { image } => {
            // STREAM/LEAF first; if no such image, the name may be a stream
            // whose latest image is wanted.
            let exact = match &name {
                Some(n) => match imagetool::client::get_manifest(&mut client, n).await {
                    Ok((info, _)) => Some(info),
                    Err(imagetool::client::ClientError::Rpc { status, .. })
                        if status.code() == tonic::Code::NotFound =>
                    {
                        None
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            };
            let info = match exact {
                Some(info) => info,
                None => {
                    image_format::validate_stream(&image)?;
                    client
                        .find_latest_image(FindLatestImageRequest { stream: image.clone() })
                        .await
                        .map_err(rpc(format!("find {image} (as an image, or the latest image of that stream)")))?
                        .into_inner()
                }
            };
            let j = info_json(&info);
            if cli.json {
                print_json(&j)?;
            } else {
                println!(
                    "image:        {}\nimage id:     {}\nsize:         {} ({} bytes)\nchunks:       {} of {} bytes, {} zero\nstored bytes: {}\ncommitted:    {}",
                    j.image,
                    j.image_id,
                    mib(j.size_bytes),
                    j.size_bytes,
                    j.chunk_count,
                    j.chunk_size,
                    j.zero_chunks,
                    mib(j.stored_bytes),
                    j.committed
                );
            }
        }
        Cmd::Verify { .. } => {
            let name = name.expect("parsed above");
            let (info, n) = imagetool::verify(&mut client, &name, progress).await?;
            if cli.json {
                print_json(
                    &serde_json::json!({"image": name.to_string(), "image_id": info.image_id, "chunks_verified": n, "ok": true}),
                )?;
            } else {
                println!("{name}: all {n} chunks match their digests (image id {})", info.image_id);
            }
        }
        Cmd::Delete { .. } => {
            let name = name.expect("parsed above");
            client
                .delete_image(DeleteImageRequest { stream: name.stream().to_owned(), leaf: name.leaf().to_owned() })
                .await
                .map_err(rpc(format!("delete {name}")))?;
            if cli.json {
                print_json(&serde_json::json!({"deleted": name.to_string()}))?;
            } else {
                println!("deleted {name}");
            }
        }
        Cmd::Gc { grace, dry_run } => {
            let r = client
                .collect_garbage(CollectGarbageRequest { grace_seconds: grace.as_secs(), dry_run })
                .await
                .map_err(rpc("collect garbage"))?
                .into_inner();
            if cli.json {
                print_json(&serde_json::json!({
                    "chunks_removed": r.chunks_removed,
                    "bytes_removed": r.bytes_removed,
                    "chunks_kept": r.chunks_kept,
                    "kept_referenced": r.kept_referenced,
                    "kept_recent": r.kept_recent,
                    "kept_leased": r.kept_leased,
                    "stale_temp_files": r.stale_temp_files,
                    "stopped_early": r.stopped_early,
                    "dry_run": dry_run,
                }))?;
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!(
                    "{verb} {} chunks ({}) and {} leftovers of interrupted writes or expired leases",
                    r.chunks_removed,
                    mib(r.bytes_removed),
                    r.stale_temp_files,
                );
                println!(
                    "kept {} chunks: {} named by committed images, {} written within the grace period, {} confirmed to uploads in flight",
                    r.chunks_kept, r.kept_referenced, r.kept_recent, r.kept_leased
                );
                if r.stopped_early {
                    println!("stopped at its time limit: run it again for the rest");
                }
            }
        }
    }
    Ok(())
}
