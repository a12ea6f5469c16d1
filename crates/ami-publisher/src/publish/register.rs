//! From snapshot to AMI: waiting for the snapshot, RegisterImage (found
//! by name when an answer was lost), waiting for the AMI.

use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use aws_sdk_ec2::{
    Client,
    types::{BlockDeviceMapping, EbsBlockDevice, Image, ResourceType},
};

use crate::{
    errors::SdkResultExt as _,
    progress::Line,
    ready::{image_available, image_named, is_failed_end, snapshot_completed},
    retry, tags,
};

use super::Options;

/// Wait for a snapshot to complete; `fresh`: when this run made it.
pub(super) async fn wait_snapshot(
    ec2: &Client,
    snapshot: &str,
    fresh: Option<Instant>,
    timeout: Duration,
    line: &Line,
) -> anyhow::Result<()> {
    line.step(format!("waiting for {snapshot}"));
    snapshot_completed(ec2, snapshot, fresh, timeout).await
}

/// Wait for an AMI to be available; `fresh`: when this run registered it.
pub(super) async fn wait_image(
    ec2: &Client,
    ami: &str,
    fresh: Option<Instant>,
    timeout: Duration,
    line: &Line,
) -> anyhow::Result<()> {
    line.step(format!("waiting for {ami}"));
    image_available(ec2, ami, fresh, timeout).await
}

/// What one RegisterImage attempt came to.
#[derive(Clone)]
pub(super) enum Registered {
    Made(String),
    /// The name is taken (by an AMI of this attempt whose answer was lost,
    /// of an interrupted run, or by anything else).
    NameTaken,
}

/// The AMI a publish ends with.
pub(super) struct Ami {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) owner: Option<String>,
    /// The snapshot it boots from: the one registered, or, when an AMI of
    /// this leaf that another run registered was adopted, that AMI's.
    pub(super) snapshot: String,
}

/// The name of a remade AMI: `base` and the time, as names are unique per
/// account and region (`--force`, or an AMI that failed).
pub fn dated_name(base: &str) -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    crate::ami_name_chars(&format!("{base} {}", now.trim_end_matches('Z').replace(':', ".")))
}

/// Deregister an AMI that failed. NotFound: deregistered already (by an
/// attempt whose answer was lost).
pub(super) async fn deregister_failed(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    deregister(ec2, ami).await?;
    tracing::warn!(%ami, "deregistered an AMI that failed");
    Ok(())
}

/// DeregisterImage; NotFound: deregistered already (by an attempt whose
/// answer was lost).
async fn deregister(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    ec2.deregister_image()
        .image_id(ami)
        .send()
        .await
        .or_code(&["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"], format!("DeregisterImage {ami}"))?;
    Ok(())
}

/// The leaf's one AMI, when two runs of it made one each.
///
/// The AMI's name serialises two runs of a leaf (the second's RegisterImage
/// is refused, and it adopts the first's AMI), but not when one run's AMI
/// failed and was made again under a dated name while the other run
/// registered the name the failed one had given up. So each run, once its
/// AMI (`ours`, made from `snapshot` when it is this run's) is available,
/// looks for the leaf's AMIs: the one made first (then the lowest id) is
/// the leaf's. A run whose AMI is not that one waits for it, deregisters
/// its own, and uses that one; should that one fail instead, its run makes
/// it again under a later date, and this run's stays the leaf's.
pub(super) async fn settle(ec2: &Client, o: &Options, ours: Ami, snapshot: &str, line: &Line) -> anyhow::Result<Ami> {
    let tagged = super::existing::find_tagged(ec2, o).await?;
    let Some(first) = super::existing::first_ami(ec2, o, &tagged).await? else { return Ok(ours) };
    let Some(id) = first.image_id().filter(|id| *id != ours.id) else { return Ok(ours) };
    tracing::info!(ami = %id, ours = %ours.id, "another run made an AMI of this leaf first");
    line.step(format!("using {id}, made first by another run"));
    if first.state() == Some(&aws_sdk_ec2::types::ImageState::Pending) {
        match wait_image(ec2, id, Some(tagged.learned), o.settings.timeouts.image, line).await {
            Ok(()) => {}
            Err(e) if is_failed_end(&e) => return Ok(ours),
            Err(e) => return Err(e),
        }
    }
    let Some(root) = root_snapshot(&first) else { return Ok(ours) };
    if ours.snapshot == snapshot {
        deregister(ec2, &ours.id).await?;
        tracing::info!(ami = %ours.id, "deregistered this run's AMI of the leaf: another run's was made first");
    }
    Ok(Ami {
        id: id.to_owned(),
        name: first.name().unwrap_or_default().to_owned(),
        owner: first.owner_id().map(str::to_owned),
        snapshot: root.to_owned(),
    })
}

/// The RegisterImage request of an AMI named `name` on `snapshot` (the
/// root volume `gib` GiB), as publish sends it and its plan asks with
/// DryRun.
pub(super) fn request(
    ec2: &Client,
    o: &Options,
    name: &str,
    snapshot: &str,
    gib: i32,
) -> aws_sdk_ec2::operation::register_image::builders::RegisterImageFluentBuilder {
    let root = BlockDeviceMapping::builder()
        .device_name(&o.root_device_name)
        .ebs(
            EbsBlockDevice::builder()
                .snapshot_id(snapshot)
                .volume_size(gib)
                .volume_type(o.volume_type.clone())
                .delete_on_termination(true)
                .build(),
        )
        .build();
    ec2.register_image()
        .name(name)
        .description(&o.description)
        .architecture(o.architecture.clone())
        .root_device_name(&o.root_device_name)
        .block_device_mappings(root)
        .virtualization_type("hvm")
        .ena_support(o.ena_support)
        .set_sriov_net_support(o.sriov_net_support.then(|| "simple".to_owned()))
        .set_boot_mode(o.boot_mode.clone())
        .set_tpm_support(o.tpm_support.clone())
        .set_uefi_data(o.uefi_data.clone())
        .set_imds_support(o.imds_support.clone())
        .tag_specifications(tags::spec(ResourceType::Image, &o.final_tags(name)))
}

/// RegisterImage as `name`; returns the AMI. `snap_made`: when this run
/// made (or learned) the snapshot. EC2 takes no idempotency token for it,
/// but a name is unique per account and region: an attempt whose answer
/// was lost is found by the name and the snapshot. When the name is taken
/// by an AMI of this very leaf (a run interrupted before tagging), that
/// AMI is adopted (the caller's wait finds out if it failed, and deregisters
/// it). When the name is taken by anything else, the error says so.
pub(super) async fn register(
    ec2: &Client,
    o: &Options,
    name: &str,
    snapshot: &str,
    snap_made: Option<Instant>,
    gib: i32,
) -> anyhow::Result<Ami> {
    let name = name.to_owned();
    let req = request(ec2, o, &name, snapshot, gib);
    let uses_snapshot = |img: &Image| {
        img.block_device_mappings().iter().any(|m| m.ebs().and_then(|e| e.snapshot_id()) == Some(snapshot))
    };
    let sent = retry::create_untokened(
        ec2,
        &format!("RegisterImage {name}"),
        snap_made,
        || {
            let req = req.clone().customize().config_override(retry::once());
            async move {
                match req.send().await {
                    Ok(out) => Ok(Registered::Made(out.image_id().unwrap_or_default().to_owned())),
                    Err(e) if crate::errors::code(&e) == Some("InvalidAMIName.Duplicate") => Ok(Registered::NameTaken),
                    Err(e) => Err(e),
                }
            }
        },
        || async {
            let img = image_named(ec2, &name).await?;
            anyhow::Ok(
                img.filter(|i| uses_snapshot(i)).and_then(|i| i.image_id().map(|id| Registered::Made(id.to_owned()))),
            )
        },
    )
    .await?;
    match sent {
        Registered::Made(id) if !id.is_empty() => {
            tracing::info!(ami = %id, %name, "registered");
            Ok(Ami { id, name, owner: None, snapshot: snapshot.to_owned() })
        }
        Registered::Made(_) => bail!("RegisterImage {name} returned no image id"),
        Registered::NameTaken => {
            // The AMI holding the name may be new enough not to be listed yet.
            let Some(img) = retry::look_for(|| image_named(ec2, &name)).await? else {
                bail!("RegisterImage {name}: the name is taken, but no AMI of this account has it");
            };
            let ours = tags::value(img.tags(), tags::DIGEST) == Some(o.image_id.as_str()) || uses_snapshot(&img);
            let id = img.image_id().unwrap_or_default().to_owned();
            if !ours {
                bail!(
                    "the AMI name '{name}' is already used by {id}, which is not an AMI of {}/{}; \
                     choose another --ami-name, or --force to make a new AMI with a dated name",
                    o.stream,
                    o.leaf
                );
            }
            let Some(root) = root_snapshot(&img) else {
                bail!("the AMI {id} of {}/{} that holds the name '{name}' has no root snapshot", o.stream, o.leaf);
            };
            tracing::info!(ami = %id, snapshot = %root, "adopting the AMI an interrupted or concurrent run registered");
            Ok(Ami { id, name, owner: img.owner_id().map(str::to_owned), snapshot: root.to_owned() })
        }
    }
}

/// The snapshot an AMI boots from, as EC2 describes the AMI.
pub fn root_snapshot(img: &Image) -> Option<&str> {
    let root = img.root_device_name()?;
    img.block_device_mappings().iter().find(|m| m.device_name() == Some(root))?.ebs()?.snapshot_id()
}
