//! `unpacker-tool`: every image-unpacker RPC from the command line.

use std::{io::Write as _, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use fleet_proto::unpacker_view::{DeviceView, StatusView, StreamView, state_name};
use fleet_tls::{
    TlsFiles, UNPACKER_TLS_NAME,
    dial::{self, DialError},
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use unpacker_client::{
    AddDeviceRequest, AssociateRequest, ClaimDeviceRequest, Device, ForgetStreamRequest, GetRawRequest,
    GetStatusRequest, PrepareForCaptureRequest, PrepareForUnpackRequest, Progress, ReleaseCaptureRequest,
    RemoveDeviceRequest, RenewCaptureHoldRequest, StreamStatus, UnpackImageRequest,
};
use unpacker_tool::cli::{Cli, Cmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    fleet_cli::init_tracing("warn", false);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unpacker-tool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A hold as whole seconds (at least 1 when asked for at all).
fn hold_seconds(hold: Option<Duration>) -> u32 {
    hold.map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX))
}

fn device_json(d: &Device) -> serde_json::Value {
    serde_json::to_value(DeviceView::from(d)).expect("a device as JSON")
}

fn stream_json(s: &StreamStatus) -> serde_json::Value {
    serde_json::to_value(StreamView::from(s)).expect("a stream as JSON")
}

fn bar(json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:10} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

fn show_progress(b: &ProgressBar) -> impl FnMut(&Progress) + '_ {
    |p| {
        if p.detail.is_empty() {
            b.set_message(p.phase.clone());
        } else {
            b.set_message(format!("{}: {}", p.phase, p.detail));
        }
        b.set_length(p.total_bytes);
        b.set_position(p.done_bytes);
    }
}

/// Run the command; a failure says what lies under a transport error, and
/// names a certificate the unpacker refuses.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = cli.tls.files();
    let addr = cli.unpacker.clone();
    let e = match command(cli, &tls).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if e.downcast_ref::<DialError>().is_some() {
        // Not connected: the error says why (an alert is named there).
        return Err(e);
    }
    // A status from the unpacker: its code and message, with what lies
    // under a transport error.
    let e = match e.downcast::<tonic::Status>() {
        Ok(s) => anyhow::anyhow!("{} ({:?})", dial::describe_status(&s), s.code()),
        Err(e) => e,
    };
    match dial::unnamed_refusal(&format!("{e:#}"), &addr, &tls, UNPACKER_TLS_NAME).await {
        Some(why) => Err(e.context(why)),
        None => Err(e),
    }
}

async fn command(cli: Cli, tls: &TlsFiles) -> anyhow::Result<()> {
    let mut c = unpacker_client::connect(&cli.unpacker, tls).await?;
    let out = |v: serde_json::Value, text: String| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        } else {
            println!("{text}");
        }
    };
    match cli.command {
        Cmd::GetStatus => {
            let s = c.get_status(GetStatusRequest {}).await?.into_inner();
            let v = serde_json::to_value(StatusView::from(&s)).expect("the status as JSON");
            let mut t = format!(
                "image-unpacker {} (imageserver {}); idle {}s{}\nDEVICES\n",
                s.version,
                s.image_server,
                s.idle_seconds,
                if s.busy { "; busy" } else { "" }
            );
            for d in &s.devices {
                t += &format!("  {:24} {:40} {:>14} {:5} {}\n", d.volume_id, d.path, d.size_bytes, d.kind, d.stream);
            }
            t += "STREAMS\n";
            for st in &s.streams {
                let state = state_name(st.state());
                t += &format!("  {:30} {:24} {:10} {} {}\n", st.stream, st.volume_id, state, st.leaf, st.image_id);
            }
            out(v, t.trim_end().to_owned());
        }
        Cmd::AddDevice { volume_id, attach_name, timeout, fresh } => {
            let req = AddDeviceRequest {
                volume_id,
                attach_name: attach_name.unwrap_or_default(),
                timeout_seconds: u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX),
                fresh,
            };
            let d = c.add_device(req).await?.into_inner();
            out(device_json(&d), format!("added {} at {} ({} bytes)", d.volume_id, d.path, d.size_bytes));
        }
        Cmd::RemoveDevice { volume_id } => {
            c.remove_device(RemoveDeviceRequest { volume_id: volume_id.clone() }).await?;
            out(json!({"removed": volume_id}), format!("removed {volume_id}"));
        }
        Cmd::ClaimDevice { volume_id, path, fresh } => {
            let req = ClaimDeviceRequest { volume_id, path: path.display().to_string(), fresh };
            let d = c.claim_device(req).await?.into_inner();
            out(device_json(&d), format!("claimed {} at {} ({} bytes)", d.volume_id, d.path, d.size_bytes));
        }
        Cmd::Associate { stream, volume_id } => {
            let s = c.associate_stream_with_device(AssociateRequest { stream, volume_id }).await?.into_inner();
            out(stream_json(&s), format!("{} bound to {} ({})", s.stream, s.volume_id, state_name(s.state())));
        }
        Cmd::PrepareForUnpack { stream, skip_if_prepared, do_not_wait } => {
            let req = PrepareForUnpackRequest { stream, skip_if_prepared, do_not_wait };
            let b = bar(cli.json);
            let last =
                unpacker_client::follow(c.prepare_for_unpack(req).await?.into_inner(), show_progress(&b)).await?;
            b.finish_and_clear();
            match last.result {
                Some(s) => {
                    out(stream_json(&s), format!("{} on {}: {}", s.stream, s.volume_id, state_name(s.state())));
                }
                None => out(json!({"phase": last.phase}), format!("{} (not waiting)", last.phase)),
            }
        }
        Cmd::UnpackImage { stream, leaf, hold } => {
            let b = bar(cli.json);
            let req =
                UnpackImageRequest { stream, leaf, hold_seconds: hold_seconds(hold), hold_id: cli.hold_id.clone() };
            let last = unpacker_client::follow(c.unpack_image(req).await?.into_inner(), show_progress(&b)).await?;
            b.finish_and_clear();
            let stats = last.stats.unwrap_or_default();
            let s = last.result.unwrap_or_default();
            let v = json!({"stream": s.stream, "leaf": s.leaf, "image_id": s.image_id, "volume_id": s.volume_id,
                "chunks_total": stats.chunks_total, "chunks_written": stats.chunks_written,
                "chunks_zeroed": stats.chunks_zeroed, "chunks_unchanged": stats.chunks_unchanged,
                "chunks_fetched": stats.chunks_fetched, "bytes_fetched": stats.bytes_fetched,
                "bytes_written": stats.bytes_written, "seconds": stats.seconds});
            out(v, format!("{}/{} on {}: {}", s.stream, s.leaf, s.volume_id, stats));
        }
        Cmd::PrepareForCapture { stream, hold } => {
            let req =
                PrepareForCaptureRequest { stream, hold_seconds: hold_seconds(hold), hold_id: cli.hold_id.clone() };
            let cap = c.prepare_for_capture(req).await?.into_inner();
            let v = json!({"stream": cap.stream, "leaf": cap.leaf, "image_id": cap.image_id,
                "image_size": cap.image_size, "device_digest": cap.device_digest, "volume_id": cap.volume_id});
            out(
                v,
                format!(
                    "{}/{} on {} verified\n  image id {}\n  device digest {}",
                    cap.stream, cap.leaf, cap.volume_id, cap.image_id, cap.device_digest
                ),
            );
        }
        Cmd::ReleaseCapture { stream } => {
            c.release_capture(ReleaseCaptureRequest { stream: stream.clone(), hold_id: cli.hold_id.clone() }).await?;
            out(json!({"released": stream}), format!("released the capture hold on {stream}"));
        }
        Cmd::RenewCaptureHold { stream, hold } => {
            let seconds = hold_seconds(Some(hold));
            let req =
                RenewCaptureHoldRequest { stream: stream.clone(), hold_id: cli.hold_id.clone(), hold_seconds: seconds };
            c.renew_capture_hold(req).await?;
            out(
                json!({"renewed": stream, "hold_seconds": seconds}),
                format!("the capture hold on {stream} ends in {seconds} s"),
            );
        }
        Cmd::ForgetStream { stream } => {
            c.forget_stream(ForgetStreamRequest { stream: stream.clone() }).await?;
            out(json!({"forgotten": stream}), format!("forgot {stream}"));
        }
        Cmd::GetRaw { stream, out: path } => {
            let mut tmp = fleet_fs::AtomicFile::new(&path)?;
            let mut s = c.get_raw(GetRawRequest { stream }).await?.into_inner();
            let b = bar(cli.json);
            b.set_message("reading");
            let mut total = 0u64;
            let mut expected = None;
            while let Some(piece) = s.message().await? {
                if piece.offset == 0 {
                    expected = Some(piece.total);
                    b.set_length(piece.total);
                }
                anyhow::ensure!(
                    piece.offset == total,
                    "the unpacker sent offset {} where {total} was due",
                    piece.offset
                );
                tmp.file().write_all(&piece.data)?;
                total += piece.data.len() as u64;
                b.set_position(total);
            }
            b.finish_and_clear();
            anyhow::ensure!(expected.unwrap_or(0) == total, "the unpacker sent {total} of {expected:?} bytes");
            tmp.commit().with_context(|| format!("writing '{}'", path.display()))?;
            out(json!({"out": path, "bytes": total}), format!("wrote {total} bytes to '{}'", path.display()));
        }
    }
    Ok(())
}
