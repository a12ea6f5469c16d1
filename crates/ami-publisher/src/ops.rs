//! The lifecycle and operations subcommands. Each runs over targets
//! concurrently; what it finds or does in a target is a list of records
//! (JSON objects), and a target that fails carries its error instead.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{
    Client,
    error::ProvideErrorMetadata as _,
    types::{Filter, Tag, VolumeType},
};
use fleet_tls::TlsFiles;
use serde::Serialize;
use serde_json::{Value, json};
use unpacker_client::{self as uc, GetStatusRequest, PrepareForUnpackRequest, StreamStatus};

use crate::{
    aws::{Aws, sdk_error},
    progress::Board,
    publish::{image_available, image_named, snapshot_completed},
    results::PublishResults,
    retry,
    tags::{self, tag_filter},
    targets::Target,
    unpacker::{self, UnpackerInstance},
    volumes::{self, VolumeSpec},
};

/// What one target answered.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub account: String,
    pub region: String,
    pub records: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Shared settings of the operations.
pub struct Ctx<'a> {
    pub aws: &'a Aws,
    pub targets: Vec<Target>,
    pub max_concurrency: usize,
    pub instance_name: String,
    pub unpacker_port: u16,
    pub tls: TlsFiles,
    pub unpacker_timeout: Duration,
    pub volume_timeout: Duration,
    /// `--snapshot-timeout`: snapshot copies.
    pub snapshot_timeout: Duration,
    /// `--image-timeout`: AMI copies.
    pub image_timeout: Duration,
    pub dry_run: bool,
    pub board: Board,
}

impl Ctx<'_> {
    /// Run `f` in every target; its records or error become the report.
    pub async fn each<F, Fut>(&self, f: F) -> Vec<Report>
    where
        F: Fn(Client, Target) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<Value>>>,
    {
        let f = &f;
        crate::fanout(&self.targets, self.max_concurrency, |t| async move {
            let ec2 = self.aws.ec2(&t).await;
            let r = f(ec2, t.clone()).await;
            if let Err(e) = &r {
                tracing::error!(error = %format!("{e:#}"), "target failed");
            }
            Report {
                account: t.account.clone(),
                region: t.region.clone(),
                error: r.as_ref().err().map(|e| format!("{e:#}")),
                records: r.unwrap_or_default(),
            }
        })
        .await
    }

    /// What a destructive step says it did (or would do, with --dry-run).
    fn acted(&self, action: &str, resource: &str, detail: impl Into<String>) -> Value {
        let action = if self.dry_run { format!("would {action}") } else { action.to_owned() };
        json!({"action": action, "resource": resource, "detail": detail.into()})
    }

    async fn unpackers(&self, ec2: &Client) -> anyhow::Result<Vec<UnpackerInstance>> {
        unpacker::find_all(ec2, &self.instance_name).await
    }

    /// Every running unpacker of a target, connected, with its status.
    async fn running(
        &self,
        ec2: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(UnpackerInstance, uc::Client, unpacker_client::Status)>> {
        let mut out = Vec::new();
        for inst in self.unpackers(ec2).await?.into_iter().filter(|i| i.state == "running") {
            let mut c = self.dial(&inst, timeout).await?;
            let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
            out.push((inst, c, s));
        }
        Ok(out)
    }

    async fn dial(&self, inst: &UnpackerInstance, timeout: Duration) -> anyhow::Result<uc::Client> {
        let ip = inst.private_ip.as_deref().with_context(|| format!("{} has no private IP", inst.instance_id))?;
        unpacker::dial(&format!("{ip}:{}", self.unpacker_port), &self.tls, timeout)
            .await
            .with_context(|| format!("unpacker instance {}", inst.instance_id))
    }
}

fn state_name(s: &StreamStatus) -> String {
    s.state().as_str_name().trim_start_matches("STREAM_STATE_").to_lowercase()
}

/// `list-unpackers`: instance, state, IP, and for running ones what the
/// unpacker reports.
pub async fn list_unpackers(ctx: &Ctx<'_>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            let mut rec = json!({"instance": inst.instance_id, "state": inst.state,
                "ip": inst.private_ip.clone().unwrap_or_default()});
            if inst.state == "running" {
                match ctx.dial(&inst, Duration::from_secs(10)).await {
                    Ok(mut c) => {
                        let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
                        rec["streams"] =
                            json!(s.streams.iter().map(|s| s.stream.clone()).collect::<Vec<_>>().join(" "));
                        rec["devices"] = json!(s.devices.len());
                        rec["idle"] =
                            json!(humantime::format_duration(Duration::from_secs(s.idle_seconds)).to_string());
                        rec["idle_seconds"] = json!(s.idle_seconds);
                        rec["busy"] = json!(s.busy);
                        rec["version"] = json!(s.version);
                    }
                    Err(e) => rec["unreachable"] = json!(format!("{e:#}")),
                }
            }
            out.push(rec);
        }
        Ok(out)
    })
    .await
}

/// `list-streams`: the streams each running unpacker knows.
pub async fn list_streams(ctx: &Ctx<'_>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, _, s) in ctx.running(&ec2, Duration::from_secs(10)).await? {
            for st in &s.streams {
                let size = s.devices.iter().find(|d| d.volume_id == st.volume_id).map_or(0, |d| d.size_bytes);
                let hold = if st.hold_seconds > 0 {
                    format!("{} for {} s", st.hold_leaf, st.hold_seconds)
                } else {
                    String::new()
                };
                out.push(json!({"instance": inst.instance_id, "stream": st.stream, "state": state_name(st),
                    "leaf": st.leaf, "volume": st.volume_id, "volume_bytes": size, "image_id": st.image_id,
                    "capture_hold": hold}));
            }
        }
        Ok(out)
    })
    .await
}

/// Image filters from `--search-tags` (all must match).
fn search_filters(search: &[(String, String)]) -> Vec<Filter> {
    search.iter().map(|(k, v)| tag_filter(k, v)).collect()
}

fn excluded(tags: &[Tag], exclude: &[(String, String)]) -> bool {
    exclude.iter().any(|(k, v)| tags::value(tags, k) == Some(v.as_str()))
}

/// `list-images`: this account's AMIs matching the search tags.
pub async fn list_images(ctx: &Ctx<'_>, search: &[(String, String)], exclude: &[(String, String)]) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let out = ec2
            .describe_images()
            .owners("self")
            .set_filters(Some(search_filters(search)))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", e))?;
        let mut recs: Vec<Value> = out
            .images()
            .iter()
            .filter(|i| !excluded(i.tags(), exclude))
            .map(|i| {
                json!({"ami": i.image_id(), "name": i.name(), "state": i.state().map(|s| s.as_str()),
                    "created": i.creation_date(), "stream": tags::value(i.tags(), tags::STREAM),
                    "leaf": tags::value(i.tags(), tags::LEAF), "expires": tags::value(i.tags(), tags::EXPIRES_AT)})
            })
            .collect();
        recs.sort_by(|a, b| a["created"].as_str().cmp(&b["created"].as_str()));
        Ok(recs)
    })
    .await
}

/// Which images `image_usage` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Used,
    Unused,
    DeleteUnused,
}

/// `list-used-images`, `list-unused-images`, `delete-unused-images`: images
/// matching the search (and not the exclusions) created more than `min_age`
/// ago, used or not by any instance (pending, running, stopping, stopped).
/// Used images' records name the instances using them.
pub async fn image_usage(
    ctx: &Ctx<'_>,
    search: &[(String, String)],
    exclude: &[(String, String)],
    min_age: Duration,
    usage: Usage,
    now: SystemTime,
) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let imgs = ec2
            .describe_images()
            .owners("self")
            .set_filters(Some(search_filters(search)))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", e))?;
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        let mut pages = ec2.describe_instances().filters(unpacker::live_instances()).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("DescribeInstances", e))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                if let (Some(img), Some(id)) = (i.image_id(), i.instance_id()) {
                    users.entry(img.to_owned()).or_default().push(id.to_owned());
                }
            }
        }
        let mut out = Vec::new();
        for img in imgs.images() {
            let Some(id) = img.image_id() else { continue };
            if excluded(img.tags(), exclude) {
                continue;
            }
            let created = img.creation_date().and_then(|d| humantime::parse_rfc3339_weak(d).ok());
            let old_enough = created.is_some_and(|c| now.duration_since(c).unwrap_or_default() >= min_age);
            if !old_enough {
                continue;
            }
            let using = users.get(id).cloned().unwrap_or_default();
            let rec = json!({"ami": id, "name": img.name(), "created": img.creation_date(),
                "stream": tags::value(img.tags(), tags::STREAM), "instances": using.join(" ")});
            match (usage, using.is_empty()) {
                (Usage::Used, false) | (Usage::Unused, true) => out.push(rec),
                (Usage::DeleteUnused, true) => {
                    out.push(ctx.acted("deregister", id, img.name().unwrap_or_default()));
                    if !ctx.dry_run {
                        deregister(&ec2, id).await?;
                    }
                    for m in img.block_device_mappings() {
                        if let Some(s) = m.ebs().and_then(|e| e.snapshot_id()) {
                            out.push(ctx.acted("delete", s, format!("snapshot of {id}")));
                            if !ctx.dry_run {
                                delete_snapshot(&ec2, s).await?;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    })
    .await
}

/// Write `columns` of every record (after account and region) as CSV, atomically.
pub fn write_csv(path: &std::path::Path, reports: &[Report], columns: &[&str]) -> anyhow::Result<()> {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
    };
    let mut text = format!("account,region,{}\n", columns.join(","));
    for r in reports {
        for rec in &r.records {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| match &rec[*c] {
                    Value::String(s) => quote(s),
                    Value::Null => String::new(),
                    v => quote(&v.to_string()),
                })
                .collect();
            text += &format!("{},{},{}\n", quote(&r.account), quote(&r.region), cells.join(","));
        }
    }
    crate::results::write_atomic(path, text.as_bytes())
}

/// How `launch-instances` places and shapes instances.
#[derive(Debug, Clone, Default)]
pub struct LaunchSpec {
    pub vpc_search: Vec<(String, String)>,
    pub subnet_search: Vec<(String, String)>,
    pub security_group_search: Vec<(String, String)>,
    pub instance_type: String,
    pub ssh_key_name: Option<String>,
    pub root_volume_gib: Option<i32>,
    pub replace: bool,
    pub user_data: Option<String>,
    pub instance_profile: Option<String>,
    /// Tags for the instances (Name first).
    pub tags: Vec<(String, String)>,
}

/// What to boot in each target.
pub enum BootImage<'a> {
    /// An AMI id, or the newest AMI tagged with this stream.
    Named(&'a str),
    /// The AMIs of results files.
    Listed(&'a AmiMap),
}

/// The newest available AMI of a stream in a target, if any.
async fn newest_of_stream(ec2: &Client, stream: &str) -> anyhow::Result<Option<aws_sdk_ec2::types::Image>> {
    Ok(newest_of_stream_in(ec2, stream, &["available"]).await?.pop().flatten())
}

/// The newest AMI of a stream in a target in each of `states`, in order
/// (one DescribeImages).
async fn newest_of_stream_in(
    ec2: &Client,
    stream: &str,
    states: &[&str],
) -> anyhow::Result<Vec<Option<aws_sdk_ec2::types::Image>>> {
    let state_filter =
        Filter::builder().name("state").set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()));
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(tag_filter(tags::STREAM, stream))
        .filters(state_filter.build())
        .send()
        .await
        .map_err(|e| sdk_error("DescribeImages", e))?;
    let newest = |state: &str| {
        out.images()
            .iter()
            .filter(|i| i.state().is_some_and(|s| s.as_str() == state))
            .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
            .cloned()
    };
    Ok(states.iter().map(|s| newest(s)).collect())
}

/// Launch instances (one per image) and report their ids and private IPs.
pub async fn launch_instances(ctx: &Ctx<'_>, boot: &BootImage<'_>, spec: &LaunchSpec) -> Vec<Report> {
    ctx.each(|ec2, t| async move {
        let images: Vec<String> = match boot {
            BootImage::Named(n) if n.starts_with("ami-") => vec![(*n).to_owned()],
            BootImage::Named(stream) => {
                let newest = newest_of_stream(&ec2, stream).await?;
                let image = newest.and_then(|i| i.image_id().map(str::to_owned));
                vec![image.with_context(|| format!("no available AMI of stream {stream} in this target"))?]
            }
            BootImage::Listed(m) => m.get(&t).map(|v| v.iter().map(|a| a.ami.clone()).collect()).unwrap_or_default(),
        };
        let vpc = ec2
            .describe_vpcs()
            .set_filters(Some(search_filters(&spec.vpc_search)))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeVpcs", e))?;
        let vpc_ids: Vec<String> = vpc.vpcs().iter().filter_map(|v| v.vpc_id().map(str::to_owned)).collect();
        let mut subnet_filters = search_filters(&spec.subnet_search);
        subnet_filters.push(Filter::builder().name("vpc-id").set_values(Some(vpc_ids.clone())).build());
        let subnets = ec2
            .describe_subnets()
            .set_filters(Some(subnet_filters))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeSubnets", e))?;
        let subnet = subnets
            .subnets()
            .iter()
            .max_by_key(|s| s.available_ip_address_count())
            .context("no subnet matches --subnet-search-tags in a VPC matching --vpc-search-tags")?;
        let mut groups = Vec::new();
        if !spec.security_group_search.is_empty() {
            let mut f = search_filters(&spec.security_group_search);
            f.push(tags::filter("vpc-id", subnet.vpc_id().unwrap_or_default()));
            let sg = ec2
                .describe_security_groups()
                .set_filters(Some(f))
                .send()
                .await
                .map_err(|e| sdk_error("DescribeSecurityGroups", e))?;
            groups = sg.security_groups().iter().filter_map(|g| g.group_id().map(str::to_owned)).collect();
            if groups.is_empty() {
                bail!("no security group matches --security-group-search-tags");
            }
        }
        let name = spec.tags.first().map(|(_, v)| v.clone()).unwrap_or_default();
        let older: Vec<UnpackerInstance> = if spec.replace { unpacker::find_all(&ec2, &name).await? } else { vec![] };
        let mut out = Vec::new();
        for image in images {
            if ctx.dry_run {
                out.push(ctx.acted(
                    "launch",
                    &image,
                    format!("{} in {}", spec.instance_type, subnet.subnet_id().unwrap_or_default()),
                ));
                continue;
            }
            // A token per launch: the SDK's retry of an attempt whose answer
            // was lost gets that attempt's instance, not a second one; a
            // second launch-instances is meant to launch again.
            let mut req = ec2
                .run_instances()
                .client_token(retry::token())
                .image_id(&image)
                .min_count(1)
                .max_count(1)
                .instance_type(spec.instance_type.as_str().into())
                .subnet_id(subnet.subnet_id().unwrap_or_default())
                .set_security_group_ids((!groups.is_empty()).then(|| groups.clone()))
                .set_key_name(spec.ssh_key_name.clone())
                .tag_specifications(tags::spec(aws_sdk_ec2::types::ResourceType::Instance, &spec.tags))
                .metadata_options(
                    aws_sdk_ec2::types::InstanceMetadataOptionsRequest::builder()
                        .http_tokens(aws_sdk_ec2::types::HttpTokensState::Required)
                        .build(),
                );
            if let Some(ud) = &spec.user_data {
                req = req.user_data(ud);
            }
            if let Some(name) = &spec.instance_profile {
                req = req.iam_instance_profile(
                    aws_sdk_ec2::types::IamInstanceProfileSpecification::builder().name(name).build(),
                );
            }
            if let Some(gib) = spec.root_volume_gib {
                let img =
                    ec2.describe_images().image_ids(&image).send().await.map_err(|e| sdk_error("DescribeImages", e))?;
                let root = img.images().first().and_then(|i| i.root_device_name()).unwrap_or("/dev/xvda").to_owned();
                req = req.block_device_mappings(
                    aws_sdk_ec2::types::BlockDeviceMapping::builder()
                        .device_name(root)
                        .ebs(
                            aws_sdk_ec2::types::EbsBlockDevice::builder()
                                .volume_size(gib)
                                .delete_on_termination(true)
                                .encrypted(true)
                                .build(),
                        )
                        .build(),
                );
            }
            let run = req.send().await.map_err(|e| sdk_error(&format!("RunInstances {image}"), e))?;
            let inst = run.instances().first().context("RunInstances returned no instance")?;
            let id = inst.instance_id().unwrap_or_default().to_owned();
            let made = Some(std::time::Instant::now());
            unpacker::wait_state(&ec2, &id, aws_sdk_ec2::types::InstanceStateName::Running, made, ctx.unpacker_timeout)
                .await?;
            out.push(json!({"action": "launched", "resource": id, "detail": image,
                "image": image, "instance": id, "private_ip": inst.private_ip_address()}));
        }
        for old in older {
            out.push(ctx.acted("terminate", &old.instance_id, "replaced"));
            if !ctx.dry_run {
                terminate(&ec2, &old.instance_id).await?;
            }
        }
        Ok(out)
    })
    .await
}

/// An AMI of a stream in some target, a candidate source for bootstrapping.
#[derive(Debug, Clone)]
struct SourceAmi {
    target: Target,
    image: aws_sdk_ec2::types::Image,
}

/// The part of a region name that says where it is (us, eu, ap, ...).
fn area(region: &str) -> &str {
    region.split('-').next().unwrap_or(region)
}

/// `copy-bootstrap-image STREAM`: every target without an AMI of the stream
/// gets a copy of the nearest one (same account first, then the same area
/// of the world): CopyImage within an account (encrypted), or across
/// accounts by sharing the root snapshot, copying it encrypted, and
/// registering it. Targets that have one are skipped.
pub async fn copy_bootstrap_image(ctx: &Ctx<'_>, stream: &str, kms_key_id: Option<&str>) -> Vec<Report> {
    // First, who has one: the newest available AMI of the stream, or a
    // copy still pending (from an earlier run that did not wait it out).
    let found = crate::fanout(&ctx.targets, ctx.max_concurrency, |t| async move {
        let ec2 = ctx.aws.ec2(&t).await;
        let mut newest =
            newest_of_stream_in(&ec2, stream, &["available", "pending"]).await.map_err(|e| format!("{e:#}"))?;
        let pending = newest.pop().flatten();
        Ok::<_, String>((newest.pop().flatten(), pending))
    })
    .await;
    let sources: Vec<SourceAmi> = found
        .iter()
        .zip(&ctx.targets)
        .filter_map(|(r, t)| {
            r.as_ref().ok().and_then(|(a, _)| a.clone()).map(|image| SourceAmi { target: t.clone(), image })
        })
        .collect();
    let pending: HashMap<Target, String> = found
        .iter()
        .zip(&ctx.targets)
        .filter_map(|(r, t)| {
            let p = r.as_ref().ok().and_then(|(_, p)| p.as_ref()).and_then(|i| i.image_id());
            p.map(|id| (t.clone(), id.to_owned()))
        })
        .collect();
    let pending = &pending;
    let sources = &sources;
    let failed: HashMap<Target, String> =
        found.iter().zip(&ctx.targets).filter_map(|(r, t)| r.as_ref().err().map(|e| (t.clone(), e.clone()))).collect();
    let failed = &failed;
    let shares = &Shares::default();
    ctx.each(|ec2, t| async move {
        if let Some(e) = failed.get(&t) {
            bail!("{e}");
        }
        if let Some(s) = sources.iter().find(|s| s.target == t) {
            let id = s.image.image_id().unwrap_or_default();
            return Ok(vec![json!({"action": "kept", "resource": id, "detail": "already has an AMI of the stream"})]);
        }
        if let Some(id) = pending.get(&t) {
            return Ok(vec![json!({"action": "kept", "resource": id, "detail": "a copy is still pending"})]);
        }
        let Some(src) = sources.iter().min_by_key(|s| {
            (s.target.account != t.account, area(&s.target.region) != area(&t.region), s.target.region.clone())
        }) else {
            bail!("no target among --targets has an available AMI of {stream} to copy");
        };
        let src_ami = src.image.image_id().unwrap_or_default();
        let name = src.image.name().unwrap_or(stream).to_owned();
        let what = format!("{src_ami} from {}", src.target);
        if ctx.dry_run {
            return Ok(vec![ctx.acted("copy", &name, what)]);
        }
        // Tagged as it is made, so a re-run finds it even if this one stops
        // before the copy is available.
        let mut copy_tags = identity_tags(&src.image);
        copy_tags.push(tags::tag("CopiedFrom", &format!("{}/{src_ami}", src.target.region)));
        let tagging = aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Image)
            .set_tags(Some(copy_tags))
            .build();
        let new_ami = if src.target.account == t.account {
            // A token per copy: the SDK's retry of an attempt whose answer
            // was lost gets that attempt's copy. A re-run finds a copy by
            // its tags instead (a token of a deregistered copy would hand
            // back a dead AMI).
            let out = ec2
                .copy_image()
                .client_token(retry::token())
                .source_region(&src.target.region)
                .source_image_id(src_ami)
                .name(&name)
                .set_description(src.image.description().map(str::to_owned))
                .encrypted(true)
                .set_kms_key_id(kms_key_id.map(str::to_owned))
                .tag_specifications(tagging)
                .send()
                .await
                .map_err(|e| sdk_error(&format!("CopyImage {what}"), e))?;
            out.image_id().context("CopyImage returned no image id")?.to_owned()
        } else {
            let dest = CopyDest { ec2: &ec2, target: &t, name: &name, kms_key_id, tagging };
            copy_across_accounts(ctx, shares, src, dest).await?
        };
        let made = Some(std::time::Instant::now());
        image_available(&ec2, &new_ami, made, ctx.image_timeout)
            .await
            .context("the copy is tagged: a re-run reports it, and copies nothing while it is pending")?;
        Ok(vec![ctx.acted("copy", &new_ami, what)])
    })
    .await
}

/// The tags a copy of an AMI (or of its snapshots) carries from it: all but
/// AWS's own and the expiry.
fn identity_tags(image: &aws_sdk_ec2::types::Image) -> Vec<Tag> {
    image
        .tags()
        .iter()
        .filter(|t| t.key().is_some_and(|k| !k.starts_with("aws:") && k != tags::EXPIRES_AT))
        .cloned()
        .collect()
}

/// The account id behind a target's profile.
async fn account_id(ctx: &Ctx<'_>, t: &Target) -> anyhow::Result<String> {
    let sts = ctx.aws.sts(t).await;
    let me = sts.get_caller_identity().send().await.map_err(|e| anyhow::anyhow!("GetCallerIdentity: {e}"))?;
    me.account().map(str::to_owned).context("GetCallerIdentity returned no account")
}

/// Snapshots shared with other accounts for the length of a copy, counted
/// so that concurrent copies into one account (its regions) share a snapshot
/// once and stop sharing it after the last copy is made.
#[derive(Default)]
struct Shares(tokio::sync::Mutex<HashMap<(String, String), Share>>);

/// One snapshot shared with one account for copies under way.
#[derive(Default)]
struct Share {
    copies: usize,
    /// Whether this run added the permission (one that was there before
    /// stays after the copies).
    added: bool,
}

impl Shares {
    async fn share(&self, src: &Client, snap: &str, account: &str) -> anyhow::Result<()> {
        use aws_sdk_ec2::types::SnapshotAttributeName as A;
        let mut held = self.0.lock().await;
        let share = held.entry((snap.to_owned(), account.to_owned())).or_default();
        if share.copies == 0 {
            let now = src
                .describe_snapshot_attribute()
                .snapshot_id(snap)
                .attribute(A::CreateVolumePermission)
                .send()
                .await
                .map_err(|e| sdk_error(&format!("DescribeSnapshotAttribute {snap}"), e))?;
            let already = now.create_volume_permissions().iter().any(|p| p.user_id() == Some(account));
            if !already {
                src.modify_snapshot_attribute()
                    .snapshot_id(snap)
                    .attribute(A::CreateVolumePermission)
                    .operation_type(aws_sdk_ec2::types::OperationType::Add)
                    .user_ids(account)
                    .send()
                    .await
                    .map_err(|e| sdk_error(&format!("sharing {snap} with account {account}"), e))
                    .context(
                        "note: a snapshot encrypted with the account's default aws/ebs key cannot be shared; \
                         publish the source with --kms-key-id of a customer-managed key the destination may use",
                    )?;
            }
            share.added = !already;
        }
        share.copies += 1;
        Ok(())
    }

    async fn unshare(&self, src: &Client, snap: &str, account: &str) {
        let mut held = self.0.lock().await;
        let key = (snap.to_owned(), account.to_owned());
        let Some(share) = held.get_mut(&key) else { return };
        share.copies -= 1;
        if share.copies > 0 {
            return;
        }
        let added = share.added;
        held.remove(&key);
        if !added {
            return;
        }
        let r = src
            .modify_snapshot_attribute()
            .snapshot_id(snap)
            .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
            .operation_type(aws_sdk_ec2::types::OperationType::Remove)
            .user_ids(account)
            .send()
            .await;
        if let Err(e) = r {
            tracing::warn!(snapshot = snap, account, "could not stop sharing the snapshot: {}", sdk_error("", e));
        }
    }
}

/// Where snapshot copies go: the target's client and account, the key to
/// encrypt with, and how long a copy may take (`--snapshot-timeout`).
#[derive(Clone, Copy)]
struct SnapshotDest<'a> {
    ec2: &'a Client,
    account: &'a str,
    kms_key_id: Option<&'a str>,
    timeout: Duration,
}

/// Copy one snapshot of `src` into the target's account and region
/// (encrypted), sharing it for the length of the copy.
async fn copy_shared_snapshot(
    shares: &Shares,
    src_ec2: &Client,
    src: &SourceAmi,
    snap: &str,
    dest: &SnapshotDest<'_>,
) -> anyhow::Result<String> {
    let SnapshotDest { ec2, account: dest_account, kms_key_id, timeout } = *dest;
    shares.share(src_ec2, snap, dest_account).await?;
    let copied = async {
        // CopySnapshot takes no idempotency token: the copy carries one in
        // a tag, so an attempt whose answer was lost is found, not repeated.
        let token = retry::token();
        let mut copy_tags = identity_tags(&src.image);
        copy_tags.push(tags::tag(tags::CREATE_TOKEN, &token));
        let tagging = aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
            .set_tags(Some(copy_tags))
            .build();
        let description = format!("copied from {}/{snap} for an AMI of {}", src.target, src.image.name().unwrap_or(""));
        let (new_snap, _) = retry::create_untokened(
            ec2,
            &format!("CopySnapshot {snap} from {}", src.target),
            None,
            || {
                let req = ec2
                    .copy_snapshot()
                    .source_region(&src.target.region)
                    .source_snapshot_id(snap)
                    .encrypted(true)
                    .set_kms_key_id(kms_key_id.map(str::to_owned))
                    .description(&description)
                    .tag_specifications(tagging.clone())
                    .customize()
                    .config_override(retry::once());
                async move { req.send().await.map(|out| (out.snapshot_id().unwrap_or_default().to_owned(), 0)) }
            },
            || retry::snapshot_with_token(ec2, &token),
        )
        .await?;
        if new_snap.is_empty() {
            bail!("CopySnapshot {snap} returned no snapshot id");
        }
        let made = Some(std::time::Instant::now());
        if let Err(e) = snapshot_completed(ec2, &new_snap, made, timeout).await {
            if let Err(d) = delete_snapshot(ec2, &new_snap).await {
                tracing::warn!("{d:#}");
            }
            return Err(e.context(format!("copied snapshot {new_snap}")));
        }
        anyhow::Ok(new_snap)
    }
    .await;
    shares.unshare(src_ec2, snap, dest_account).await;
    copied
}

/// Where a cross-account copy goes, and what it is called and tagged.
struct CopyDest<'a> {
    ec2: &'a Client,
    target: &'a Target,
    name: &'a str,
    kms_key_id: Option<&'a str>,
    tagging: aws_sdk_ec2::types::TagSpecification,
}

/// Across accounts: copy each of the source AMI's snapshots into the
/// target (shared for the length of the copy, re-encrypted), then register
/// an AMI with the source's attributes on the copies. A failure deletes the
/// copies made so far.
async fn copy_across_accounts(
    ctx: &Ctx<'_>,
    shares: &Shares,
    src: &SourceAmi,
    dest: CopyDest<'_>,
) -> anyhow::Result<String> {
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice};
    let CopyDest { ec2, target: t, name, kms_key_id, tagging } = dest;
    let dest_account = account_id(ctx, t).await?;
    let root = src.image.root_device_name().context("the source AMI has no root device name")?;
    let src_ec2 = ctx.aws.ec2(&src.target).await;
    let mut copies: Vec<String> = Vec::new();
    let mut mappings = Vec::new();
    let mut failure = None;
    for m in src.image.block_device_mappings() {
        let Some(snap) = m.ebs().and_then(|e| e.snapshot_id()) else {
            // An empty volume or an instance store: as it is, but a KMS key
            // of the source account means nothing here (the target account's
            // key, or its default, applies).
            let mut m = m.clone();
            if let Some(e) = m.ebs.as_mut() {
                e.kms_key_id = kms_key_id.map(str::to_owned);
            }
            mappings.push(m);
            continue;
        };
        let to = SnapshotDest { ec2, account: &dest_account, kms_key_id, timeout: ctx.snapshot_timeout };
        match copy_shared_snapshot(shares, &src_ec2, src, snap, &to).await {
            Ok(new_snap) => {
                let ebs = m.ebs().cloned().unwrap_or_else(|| EbsBlockDevice::builder().build());
                let on_termination = ebs.delete_on_termination().unwrap_or(true);
                let copied = EbsBlockDevice::builder()
                    .snapshot_id(&new_snap)
                    .set_volume_size(ebs.volume_size())
                    .set_volume_type(ebs.volume_type().cloned())
                    .set_iops(ebs.iops())
                    .set_throughput(ebs.throughput())
                    .delete_on_termination(on_termination)
                    .build();
                mappings.push(
                    BlockDeviceMapping::builder()
                        .set_device_name(m.device_name().map(str::to_owned))
                        .ebs(copied)
                        .build(),
                );
                copies.push(new_snap);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if failure.is_none() && copies.is_empty() {
        failure = Some(anyhow::anyhow!("the source AMI has no EBS snapshot to copy"));
    }
    let copies_made = Some(std::time::Instant::now());
    let registered = match failure {
        Some(e) => Err(e),
        None => {
            register_copy(
                ec2,
                name,
                copies_made,
                &copies,
                ec2.register_image()
                    .name(name)
                    .set_description(src.image.description().map(str::to_owned))
                    .set_architecture(src.image.architecture().cloned())
                    .root_device_name(root)
                    .set_block_device_mappings(Some(mappings))
                    .virtualization_type("hvm")
                    .set_ena_support(src.image.ena_support())
                    .set_sriov_net_support(src.image.sriov_net_support().map(str::to_owned))
                    .set_boot_mode(src.image.boot_mode().map(|b| b.as_str().into()))
                    .set_tpm_support(src.image.tpm_support().map(|b| b.as_str().into()))
                    .set_imds_support(src.image.imds_support().map(|b| b.as_str().into()))
                    .tag_specifications(tagging),
            )
            .await
        }
    };
    if registered.is_err() {
        for c in &copies {
            if let Err(d) = delete_snapshot(ec2, c).await {
                tracing::warn!("{d:#} (a copy left behind after a failed bootstrap copy)");
            }
        }
    }
    registered
}

/// RegisterImage of copied snapshots (made at `made`). EC2 takes no
/// idempotency token for it: an attempt whose answer was lost is found by
/// its name (unique per account and region) and the copies it uses.
async fn register_copy(
    ec2: &Client,
    name: &str,
    made: Option<std::time::Instant>,
    copies: &[String],
    req: aws_sdk_ec2::operation::register_image::builders::RegisterImageFluentBuilder,
) -> anyhow::Result<String> {
    let id = retry::create_untokened(
        ec2,
        &format!("RegisterImage {name}"),
        made,
        || {
            let req = req.clone().customize().config_override(retry::once());
            async move { req.send().await.map(|out| out.image_id().unwrap_or_default().to_owned()) }
        },
        || async {
            // AMI names are unique per account and region.
            let named = image_named(ec2, name).await?;
            let uses_copies = |i: &&aws_sdk_ec2::types::Image| {
                i.block_device_mappings()
                    .iter()
                    .any(|m| m.ebs().and_then(|e| e.snapshot_id()).is_some_and(|s| copies.iter().any(|c| c == s)))
            };
            anyhow::Ok(named.as_ref().filter(uses_copies).and_then(|i| i.image_id().map(str::to_owned)))
        },
    )
    .await?;
    if id.is_empty() {
        bail!("RegisterImage {name} returned no image id");
    }
    Ok(id)
}

/// DeregisterImage; an AMI that is gone already counts as done (the
/// attempt whose answer was lost, or someone else, deregistered it).
async fn deregister(ec2: &Client, id: &str) -> anyhow::Result<()> {
    match ec2.deregister_image().image_id(id).send().await {
        Ok(_) => Ok(()),
        Err(e) if matches!(retry::code(&e), Some("InvalidAMIID.Unavailable" | "InvalidAMIID.NotFound")) => Ok(()),
        Err(e) => Err(sdk_error(&format!("DeregisterImage {id}"), e)),
    }
}

fn expired(tags: &[Tag], now: SystemTime) -> Option<bool> {
    let v = tags::value(tags, tags::EXPIRES_AT)?;
    match humantime::parse_rfc3339_weak(v) {
        Ok(t) => Some(t <= now),
        Err(_) => {
            tracing::warn!(value = v, "ExpiresAt is not an RFC 3339 time; left alone");
            Some(false)
        }
    }
}

/// `expire`: delete every AMI, snapshot, volume and instance whose ExpiresAt
/// is in the past (one `now` for all targets). An AMI's snapshots go with it.
pub async fn expire(ctx: &Ctx<'_>, now: SystemTime) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        let has_expiry = || Filter::builder().name("tag-key").values(tags::EXPIRES_AT).build();
        let images = ec2
            .describe_images()
            .owners("self")
            .filters(has_expiry())
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", e))?;
        let mut gone_snapshots = Vec::new();
        for img in images.images() {
            let Some(id) = img.image_id() else { continue };
            if expired(img.tags(), now) != Some(true) {
                continue;
            }
            let snaps: Vec<String> = img
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
                .collect();
            out.push(ctx.acted("deregister", id, img.name().unwrap_or_default()));
            if !ctx.dry_run {
                deregister(&ec2, id).await?;
            }
            for s in snaps {
                out.push(ctx.acted("delete", &s, format!("snapshot of {id}")));
                if !ctx.dry_run {
                    delete_snapshot(&ec2, &s).await?;
                }
                gone_snapshots.push(s);
            }
        }
        let snaps = ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(has_expiry())
            .send()
            .await
            .map_err(|e| sdk_error("DescribeSnapshots", e))?;
        for s in snaps.snapshots() {
            let Some(id) = s.snapshot_id() else { continue };
            if expired(s.tags(), now) != Some(true) || gone_snapshots.iter().any(|g| g == id) {
                continue;
            }
            if ctx.dry_run {
                out.push(ctx.acted("delete", id, "snapshot"));
                continue;
            }
            match ec2.delete_snapshot().snapshot_id(id).send().await {
                Ok(_) => out.push(ctx.acted("delete", id, "snapshot")),
                // Deleted by an attempt whose answer was lost.
                Err(e) if retry::code(&e) == Some("InvalidSnapshot.NotFound") => {
                    out.push(ctx.acted("delete", id, "snapshot"));
                }
                // Still backing an AMI that has not expired: keep it.
                Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("InvalidSnapshot.InUse") => {
                    out.push(json!({"action": "kept", "resource": id, "detail": "in use by an AMI"}));
                }
                Err(e) => return Err(sdk_error(&format!("DeleteSnapshot {id}"), e)),
            }
        }
        let vols =
            ec2.describe_volumes().filters(has_expiry()).send().await.map_err(|e| sdk_error("DescribeVolumes", e))?;
        for v in vols.volumes() {
            let Some(id) = v.volume_id() else { continue };
            if expired(v.tags(), now) != Some(true) {
                continue;
            }
            out.push(ctx.acted("delete", id, "volume"));
            if ctx.dry_run {
                continue;
            }
            match v.attachments().iter().find_map(|a| a.instance_id()) {
                Some(inst) => volumes::detach_and_delete(&ec2, inst, id, ctx.volume_timeout).await?,
                None => match ec2.delete_volume().volume_id(id).send().await {
                    Ok(_) => {}
                    // Deleted by an attempt whose answer was lost.
                    Err(e) if retry::code(&e) == Some("InvalidVolume.NotFound") => {}
                    Err(e) => return Err(sdk_error(&format!("DeleteVolume {id}"), e)),
                },
            }
        }
        let insts = ec2
            .describe_instances()
            .filters(has_expiry())
            .filters(unpacker::live_instances())
            .send()
            .await
            .map_err(|e| sdk_error("DescribeInstances", e))?;
        for i in insts.reservations().iter().flat_map(|r| r.instances()) {
            let Some(id) = i.instance_id() else { continue };
            if expired(i.tags(), now) != Some(true) {
                continue;
            }
            out.push(ctx.acted("terminate", id, "instance"));
            if !ctx.dry_run {
                terminate(&ec2, id).await?;
            }
        }
        Ok(out)
    })
    .await
}

async fn terminate(ec2: &Client, id: &str) -> anyhow::Result<()> {
    ec2.terminate_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(|e| sdk_error(&format!("TerminateInstances {id}"), e))?;
    Ok(())
}

async fn delete_snapshot(ec2: &Client, id: &str) -> anyhow::Result<()> {
    match ec2.delete_snapshot().snapshot_id(id).send().await {
        Ok(_) => Ok(()),
        Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("InvalidSnapshot.NotFound") => Ok(()),
        Err(e) => Err(sdk_error(&format!("DeleteSnapshot {id}"), e)),
    }
}

/// `stop-idle-unpackers`: stop running unpackers idle longer than `max_idle`;
/// busy ones, and ones used more recently, stay up.
pub async fn stop_idle_unpackers(ctx: &Ctx<'_>, max_idle: Duration) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, _, s) in ctx.running(&ec2, Duration::from_secs(30)).await? {
            let idle = Duration::from_secs(s.idle_seconds);
            if s.busy || idle < max_idle {
                tracing::info!(instance = %inst.instance_id, idle_seconds = s.idle_seconds, busy = s.busy, "in use; left running");
                continue;
            }
            out.push(ctx.acted("stop", &inst.instance_id, format!("idle {}", humantime::format_duration(idle))));
            if !ctx.dry_run {
                ec2.stop_instances()
                    .instance_ids(&inst.instance_id)
                    .send()
                    .await
                    .map_err(|e| sdk_error(&format!("StopInstances {}", inst.instance_id), e))?;
            }
        }
        Ok(out)
    })
    .await
}

/// `start-instances`: start stopped unpacker instances and wait for them.
pub async fn start_instances(ctx: &Ctx<'_>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            if inst.state == "running" {
                continue;
            }
            out.push(ctx.acted("start", &inst.instance_id, inst.state.clone()));
            if !ctx.dry_run {
                unpacker::ensure_running(&ec2, &inst, ctx.unpacker_timeout, |_| {}).await?;
            }
        }
        Ok(out)
    })
    .await
}

/// `terminate-instances`: terminate the unpacker instances.
pub async fn terminate_instances(ctx: &Ctx<'_>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            out.push(ctx.acted("terminate", &inst.instance_id, inst.state.clone()));
            if !ctx.dry_run {
                terminate(&ec2, &inst.instance_id).await?;
            }
        }
        Ok(out)
    })
    .await
}

/// `prepare-unpackers [STREAM]`: start and connect to every unpacker; with a
/// stream, have each unpacker that holds it learn its volume now (scan), so
/// the next publish starts unpacking at once.
pub async fn prepare_unpackers(ctx: &Ctx<'_>, stream: Option<&str>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            let inst = unpacker::ensure_running(&ec2, &inst, ctx.unpacker_timeout, |_| {}).await?;
            let mut c = ctx.dial(&inst, ctx.unpacker_timeout).await?;
            let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
            let mut rec = json!({"instance": inst.instance_id, "ready": true});
            if let Some(stream) = stream {
                if s.streams.iter().any(|st| st.stream == stream) {
                    let req = PrepareForUnpackRequest {
                        stream: stream.to_owned(),
                        skip_if_prepared: true,
                        do_not_wait: false,
                    };
                    let p = c.prepare_for_unpack(req).await.context("PrepareForUnpack")?.into_inner();
                    uc::follow(p, |_| {}).await.context("PrepareForUnpack")?;
                    rec["stream"] = json!("prepared");
                } else {
                    rec["stream"] = json!("not on this unpacker (the next publish creates its volume)");
                }
            }
            out.push(rec);
        }
        Ok(out)
    })
    .await
}

/// `set-tags-on-unpackers` / `delete-tags-on-unpackers`.
pub async fn tag_unpackers(ctx: &Ctx<'_>, set: &[(String, String)], delete: Option<&str>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            let id = inst.instance_id.as_str();
            if let Some(key) = delete {
                out.push(ctx.acted("delete tag", id, key));
                if !ctx.dry_run {
                    ec2.delete_tags()
                        .resources(id)
                        .tags(Tag::builder().key(key).build())
                        .send()
                        .await
                        .map_err(|e| sdk_error("DeleteTags", e))?;
                }
            } else {
                let what: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push(ctx.acted("tag", id, what.join(",")));
                if !ctx.dry_run {
                    ec2.create_tags()
                        .resources(id)
                        .set_tags(Some(set.iter().map(|(k, v)| tags::tag(k, v)).collect()))
                        .send()
                        .await
                        .map_err(|e| sdk_error("CreateTags", e))?;
                }
            }
        }
        Ok(out)
    })
    .await
}

/// `add-volumes SIZE_GIB`: a new encrypted volume on every running unpacker.
pub async fn add_volumes(ctx: &Ctx<'_>, gib: u64, volume_type: VolumeType, kms_key_id: Option<&str>) -> Vec<Report> {
    let volume_type = &volume_type;
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for inst in ctx.unpackers(&ec2).await? {
            let inst = unpacker::ensure_running(&ec2, &inst, ctx.unpacker_timeout, |_| {}).await?;
            if ctx.dry_run {
                out.push(ctx.acted("add", &inst.instance_id, format!("{gib} GiB volume")));
                continue;
            }
            let mut c = ctx.dial(&inst, ctx.unpacker_timeout).await?;
            let spec = VolumeSpec {
                stream: String::new(),
                need_bytes: gib << 30,
                volume_type: volume_type.clone(),
                kms_key_id: kms_key_id.map(str::to_owned),
                instance_name: ctx.instance_name.clone(),
                timeout: ctx.volume_timeout,
            };
            let line = ctx.board.line(&t.to_string());
            let v = volumes::create_and_add(&ec2, &mut c, &inst, &spec, &line).await?;
            line.finish(format!("added {v}"));
            out.push(ctx.acted("add", &v, format!("{gib} GiB volume on {}", inst.instance_id)));
        }
        Ok(out)
    })
    .await
}

/// `remove-unused-volumes`: detach and delete every volume an unpacker holds
/// that no stream is bound to.
pub async fn remove_unused_volumes(ctx: &Ctx<'_>) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        let mut out = Vec::new();
        for (inst, mut c, s) in ctx.running(&ec2, Duration::from_secs(30)).await? {
            for d in s.devices.iter().filter(|d| d.stream.is_empty()) {
                out.push(ctx.acted("delete", &d.volume_id, format!("unused volume on {}", inst.instance_id)));
                if !ctx.dry_run {
                    volumes::remove(&ec2, &mut c, &inst.instance_id, &d.volume_id, ctx.volume_timeout).await?;
                }
            }
        }
        Ok(out)
    })
    .await
}

/// `import-key-pair NAME FILE`: the SSH public key in every target (a key
/// of that name already there is left as it is).
pub async fn import_key_pair(ctx: &Ctx<'_>, name: &str, key: &[u8]) -> Vec<Report> {
    ctx.each(|ec2, _t| async move {
        if ctx.dry_run {
            return Ok(vec![ctx.acted("import", name, "key pair")]);
        }
        let r = ec2
            .import_key_pair()
            .key_name(name)
            .public_key_material(aws_sdk_ec2::primitives::Blob::new(key))
            .send()
            .await;
        match r {
            Ok(k) => Ok(vec![ctx.acted("import", name, k.key_fingerprint().unwrap_or_default())]),
            Err(e) if e.as_service_error().and_then(|s| s.code()) == Some("InvalidKeyPair.Duplicate") => {
                Ok(vec![json!({"action": "kept", "resource": name, "detail": "a key pair of this name exists"})])
            }
            Err(e) => Err(sdk_error("ImportKeyPair", e)),
        }
    })
    .await
}

/// An AMI named in a results file.
#[derive(Debug, Clone)]
pub struct ListedAmi {
    pub ami: String,
    pub snapshot: Option<String>,
    pub stream: String,
}

/// AMIs of results files, by target.
pub type AmiMap = HashMap<Target, Vec<ListedAmi>>;

/// AMIs listed in results files, by target.
pub fn amis_by_target(files: &[PathBuf]) -> anyhow::Result<BTreeMap<Target, Vec<ListedAmi>>> {
    let mut out: BTreeMap<Target, Vec<ListedAmi>> = BTreeMap::new();
    for f in files {
        let r = PublishResults::read(f)?;
        for t in r.targets {
            if let Some(ami) = t.ami_id {
                out.entry(Target { account: t.account, region: t.region }).or_default().push(ListedAmi {
                    ami,
                    snapshot: t.snapshot_id,
                    stream: r.stream.clone(),
                });
            }
        }
    }
    if out.is_empty() {
        bail!("the results files list no AMI");
    }
    Ok(out)
}

/// `delete RESULTS...`: deregister the AMIs and delete their snapshots.
pub async fn delete(ctx: &Ctx<'_>, amis: &AmiMap) -> Vec<Report> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for ListedAmi { ami, snapshot: snap, .. } in amis.get(&t).map(Vec::as_slice).unwrap_or_default() {
            out.push(ctx.acted("deregister", ami, ""));
            if !ctx.dry_run {
                deregister(&ec2, ami).await?;
            }
            if let Some(s) = snap {
                out.push(ctx.acted("delete", s, format!("snapshot of {ami}")));
                if !ctx.dry_run {
                    delete_snapshot(&ec2, s).await?;
                }
            }
        }
        Ok(out)
    })
    .await
}

/// `delete-tags KEY RESULTS...`: remove a tag from the AMIs.
pub async fn delete_tags(ctx: &Ctx<'_>, key: &str, amis: &AmiMap) -> Vec<Report> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        for ListedAmi { ami, .. } in amis.get(&t).map(Vec::as_slice).unwrap_or_default() {
            out.push(ctx.acted("delete tag", ami, key));
            if !ctx.dry_run {
                ec2.delete_tags()
                    .resources(ami)
                    .tags(Tag::builder().key(key).build())
                    .send()
                    .await
                    .map_err(|e| sdk_error(&format!("DeleteTags on {ami}"), e))?;
            }
        }
        Ok(out)
    })
    .await
}

/// `set-exclusive-tags KEY VALUE RESULTS...`: tag these AMIs and take KEY off
/// every other AMI of the same stream in the target.
pub async fn set_exclusive_tags(ctx: &Ctx<'_>, key: &str, value: &str, amis: &AmiMap) -> Vec<Report> {
    ctx.each(|ec2, t| async move {
        let mut out = Vec::new();
        let ours = amis.get(&t).map(Vec::as_slice).unwrap_or_default();
        let mut streams: Vec<&str> = ours.iter().map(|a| a.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        for stream in streams {
            let others = ec2
                .describe_images()
                .owners("self")
                .filters(tag_filter(tags::STREAM, stream))
                .filters(Filter::builder().name("tag-key").values(key).build())
                .send()
                .await
                .map_err(|e| sdk_error("DescribeImages", e))?;
            for img in others.images() {
                let Some(id) = img.image_id() else { continue };
                if ours.iter().any(|a| a.ami == id) {
                    continue;
                }
                out.push(ctx.acted("delete tag", id, key));
                if !ctx.dry_run {
                    ec2.delete_tags()
                        .resources(id)
                        .tags(Tag::builder().key(key).build())
                        .send()
                        .await
                        .map_err(|e| sdk_error(&format!("DeleteTags on {id}"), e))?;
                }
            }
        }
        for ListedAmi { ami, .. } in ours {
            out.push(ctx.acted("tag", ami, format!("{key}={value}")));
            if !ctx.dry_run {
                ec2.create_tags()
                    .resources(ami)
                    .tags(tags::tag(key, value))
                    .send()
                    .await
                    .map_err(|e| sdk_error(&format!("CreateTags on {ami}"), e))?;
            }
        }
        Ok(out)
    })
    .await
}

/// Print reports: JSON, or a table with `columns` (after TARGET) and one row
/// per record; failed targets are listed after. `quiet`: print nothing when
/// no target has a record or an error (for cron).
pub fn print(reports: &[Report], columns: &[&str], json: bool, quiet: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(reports).expect("json"));
        return;
    }
    let any = reports.iter().any(|r| !r.records.is_empty() || r.error.is_some());
    if quiet && !any {
        return;
    }
    let cell = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows =
        vec![std::iter::once("TARGET".to_owned()).chain(columns.iter().map(|c| c.to_uppercase())).collect::<Vec<_>>()];
    for r in reports {
        for rec in &r.records {
            let mut row = vec![format!("{},{}", r.account, r.region)];
            row.extend(columns.iter().map(|c| cell(&rec[*c])));
            rows.push(row);
        }
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    if rows.len() > 1 || !quiet {
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
    for r in reports.iter().filter(|r| r.error.is_some()) {
        println!("{},{}: FAILED: {}", r.account, r.region, r.error.as_deref().unwrap_or(""));
    }
}
