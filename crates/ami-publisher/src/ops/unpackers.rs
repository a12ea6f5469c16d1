//! Unpacker instances, the streams they hold and their volumes:
//! `list-unpackers`, `list-streams`, `stop-idle-unpackers`,
//! `start-instances`, `terminate-instances`, `prepare-unpackers`,
//! `set-tags-on-unpackers`, `delete-tags-on-unpackers`, `add-volumes`,
//! `remove-unused-volumes`.

use std::time::Duration;

use anyhow::Context as _;
use aws_sdk_ec2::{
    Client,
    types::{Tag, VolumeType},
};
use unpacker_client::{self as uc, GetStatusRequest, PrepareForUnpackRequest, StreamStatus};

use super::{Acted, Ctx, Report, output::row};
use crate::{
    errors::SdkResultExt as _,
    tags, unpacker,
    volumes::{self, VolumeSpec},
};

row! {
    /// An unpacker instance, and for a running one what its unpacker says.
    pub struct UnpackerRow {
        columns {
            instance: String,
            state: String,
            ip: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            streams: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            devices: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            idle: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            busy: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unreachable: Option<String>,
        }
        extra {
            #[serde(skip_serializing_if = "Option::is_none")]
            idle_seconds: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            version: Option<String>,
        }
    }
}

row! {
    /// A stream an unpacker holds.
    pub struct StreamRow {
        columns {
            instance: String,
            stream: String,
            state: String,
            leaf: String,
            volume: String,
            volume_bytes: u64,
            /// "LEAF for N s" while a capture hold is on, else "".
            capture_hold: String,
        }
        extra { image_id: String }
    }
}

row! {
    /// An unpacker made ready by `prepare-unpackers`.
    pub struct PreparedRow {
        columns {
            instance: String,
            ready: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            stream: Option<String>,
        }
        extra {}
    }
}

fn state_name(s: &StreamStatus) -> String {
    s.state().as_str_name().trim_start_matches("STREAM_STATE_").to_lowercase()
}

/// `list-unpackers`: instance, state, IP, and for running ones what the
/// unpacker reports.
pub async fn list_unpackers(ctx: &Ctx<'_>) -> Vec<Report<UnpackerRow>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            let mut row = UnpackerRow {
                instance: inst.instance_id.clone(),
                state: inst.state.clone(),
                ip: inst.private_ip.clone().unwrap_or_default(),
                ..UnpackerRow::default()
            };
            if inst.state == "running" {
                match ctx.settings.dial(&inst, ctx.listing_timeout()).await {
                    Ok(mut c) => {
                        let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
                        row.streams = Some(s.streams.iter().map(|s| s.stream.clone()).collect::<Vec<_>>().join(" "));
                        row.devices = Some(s.devices.len());
                        row.idle = Some(humantime::format_duration(Duration::from_secs(s.idle_seconds)).to_string());
                        row.idle_seconds = Some(s.idle_seconds);
                        row.busy = Some(s.busy);
                        row.version = Some(s.version);
                    }
                    Err(e) => row.unreachable = Some(format!("{e:#}")),
                }
            }
            out.push(row);
        }
        Ok(out)
    })
    .await
}

/// `list-streams`: the streams each running unpacker knows.
pub async fn list_streams(ctx: &Ctx<'_>) -> Vec<Report<StreamRow>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, _, s) in ctx.running(&ec2, ctx.listing_timeout()).await? {
            for st in &s.streams {
                let size = s.devices.iter().find(|d| d.volume_id == st.volume_id).map_or(0, |d| d.size_bytes);
                let hold = if st.hold_seconds > 0 {
                    format!("{} for {} s", st.hold_leaf, st.hold_seconds)
                } else {
                    String::new()
                };
                out.push(StreamRow {
                    instance: inst.instance_id.clone(),
                    stream: st.stream.clone(),
                    state: state_name(st),
                    leaf: st.leaf.clone(),
                    volume: st.volume_id.clone(),
                    volume_bytes: size,
                    capture_hold: hold,
                    image_id: st.image_id.clone(),
                });
            }
        }
        Ok(out)
    })
    .await
}

/// TerminateInstances of one instance.
pub(super) async fn terminate(ec2: &Client, id: &str) -> anyhow::Result<()> {
    ec2.terminate_instances().instance_ids(id).send().await.sdk(format!("TerminateInstances {id}"))?;
    Ok(())
}

/// `stop-idle-unpackers`: stop running unpackers idle longer than `max_idle`;
/// busy ones, and ones used more recently, stay up.
pub async fn stop_idle_unpackers(ctx: &Ctx<'_>, max_idle: Duration) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, _, s) in ctx.running(&ec2, ctx.settings.timeouts.unpacker).await? {
            let idle = Duration::from_secs(s.idle_seconds);
            if s.busy || idle < max_idle {
                tracing::info!(instance = %inst.instance_id, idle_seconds = s.idle_seconds, busy = s.busy, "in use; left running");
                continue;
            }
            let id = inst.instance_id.as_str();
            let detail = format!("idle {}", humantime::format_duration(idle));
            let ec2 = &ec2;
            out.push(
                ctx.act("stop", id, detail, || async move {
                    ec2.stop_instances().instance_ids(id).send().await.sdk(format!("StopInstances {id}"))?;
                    Ok(())
                })
                .await?,
            );
        }
        Ok(out)
    })
    .await
}

/// `start-instances`: start stopped unpacker instances and wait for them.
pub async fn start_instances(ctx: &Ctx<'_>) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            if inst.state == "running" {
                continue;
            }
            let (ec2, i) = (&ec2, &inst);
            out.push(
                ctx.act("start", &inst.instance_id, inst.state.clone(), || async move {
                    unpacker::ensure_running(ec2, i, ctx.settings.timeouts.unpacker, |_| {}).await.map(drop)
                })
                .await?,
            );
        }
        Ok(out)
    })
    .await
}

/// `terminate-instances`: terminate the unpacker instances.
pub async fn terminate_instances(ctx: &Ctx<'_>) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            let (ec2, id) = (&ec2, inst.instance_id.as_str());
            out.push(ctx.act("terminate", id, inst.state.clone(), || terminate(ec2, id)).await?);
        }
        Ok(out)
    })
    .await
}

/// `prepare-unpackers [STREAM]`: start and connect to every unpacker; with a
/// stream, have each unpacker that holds it learn its volume now (scan), so
/// the next publish starts unpacking at once.
pub async fn prepare_unpackers(ctx: &Ctx<'_>, stream: Option<&str>) -> Vec<Report<PreparedRow>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            let inst = unpacker::ensure_running(&ec2, &inst, ctx.settings.timeouts.unpacker, |_| {}).await?;
            let mut c = ctx.settings.dial(&inst, ctx.settings.timeouts.unpacker).await?;
            let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
            let mut row = PreparedRow { instance: inst.instance_id.clone(), ready: true, stream: None };
            if let Some(stream) = stream {
                if s.streams.iter().any(|st| st.stream == stream) {
                    let req = PrepareForUnpackRequest {
                        stream: stream.to_owned(),
                        skip_if_prepared: true,
                        do_not_wait: false,
                    };
                    let p = c.prepare_for_unpack(req).await.context("PrepareForUnpack")?.into_inner();
                    uc::follow(p, |_| {}).await.context("PrepareForUnpack")?;
                    row.stream = Some("prepared".into());
                } else {
                    row.stream = Some("not on this unpacker (the next publish creates its volume)".into());
                }
            }
            out.push(row);
        }
        Ok(out)
    })
    .await
}

/// `set-tags-on-unpackers` / `delete-tags-on-unpackers`.
pub async fn tag_unpackers(ctx: &Ctx<'_>, set: &[(String, String)], delete: Option<&str>) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            let (ec2, id) = (&ec2, inst.instance_id.as_str());
            let row = if let Some(key) = delete {
                ctx.act("delete tag", id, key, || async move {
                    ec2.delete_tags()
                        .resources(id)
                        .tags(Tag::builder().key(key).build())
                        .send()
                        .await
                        .sdk("DeleteTags")?;
                    Ok(())
                })
                .await?
            } else {
                let what: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
                ctx.act("tag", id, what.join(","), || async move {
                    let tags = set.iter().map(|(k, v)| tags::tag(k, v)).collect();
                    ec2.create_tags().resources(id).set_tags(Some(tags)).send().await.sdk("CreateTags")?;
                    Ok(())
                })
                .await?
            };
            out.push(row);
        }
        Ok(out)
    })
    .await
}

/// `add-volumes SIZE_GIB`: a new encrypted volume on every running unpacker.
pub async fn add_volumes(ctx: &Ctx<'_>, gib: u64, volume_type: VolumeType) -> Vec<Report<Acted>> {
    let volume_type = &volume_type;
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for inst in ctx.settings.unpackers(&ec2).await? {
            let inst = unpacker::ensure_running(&ec2, &inst, ctx.settings.timeouts.unpacker, |_| {}).await?;
            // The volume's id is known only once it is made.
            if let Some(row) = ctx.would("add", &inst.instance_id, format!("{gib} GiB volume")) {
                out.push(row);
                continue;
            }
            let mut c = ctx.settings.dial(&inst, ctx.settings.timeouts.unpacker).await?;
            let spec = VolumeSpec {
                stream: String::new(),
                need_bytes: gib << 30,
                volume_type: volume_type.clone(),
                kms_key_id: ctx.settings.keys.for_target(&t).map(str::to_owned),
                key_arn: None,
                instance_name: ctx.settings.instance_name.clone(),
                timeout: ctx.settings.timeouts.volume,
            };
            let line = ctx.board.line(&t.to_string());
            let v = volumes::create_and_add(&ec2, &mut c, &inst, &spec, &line).await?;
            line.finish(format!("added {v}"));
            out.push(ctx.described("add", &v, format!("{gib} GiB volume on {}", inst.instance_id)));
        }
        Ok(out)
    })
    .await
}

/// `remove-unused-volumes`: detach and delete every volume an unpacker holds
/// that no stream is bound to.
pub async fn remove_unused_volumes(ctx: &Ctx<'_>) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, mut c, s) in ctx.running(&ec2, ctx.settings.timeouts.unpacker).await? {
            for d in s.devices.iter().filter(|d| d.stream.is_empty()) {
                let (ec2, c, id, vol) = (&ec2, &mut c, inst.instance_id.as_str(), d.volume_id.as_str());
                let detail = format!("unused volume on {id}");
                out.push(
                    ctx.act("delete", vol, detail, || volumes::remove(ec2, c, id, vol, ctx.settings.timeouts.volume))
                        .await?,
                );
            }
        }
        Ok(out)
    })
    .await
}
