//! Instances from AMIs (`launch-instances`, `launch-instances-for-images`)
//! and the SSH key pairs to reach them (`import-key-pair`).

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{Client, types::Filter};

use super::{
    Acted, Ctx, Report,
    images::{AmiMap, search_filters},
    output::row,
    unpackers::terminate,
};
use crate::{
    errors::SdkResultExt as _,
    retry,
    tags::{self, tag_filter},
    unpacker::{self, UnpackerInstance},
};

row! {
    /// An instance launched (or, under --dry-run, that would be), or one
    /// terminated because it was replaced.
    pub struct Launched {
        columns {
            action: String,
            resource: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            private_ip: Option<String>,
            detail: String,
        }
        extra {
            #[serde(skip_serializing_if = "Option::is_none")]
            image: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            instance: Option<String>,
        }
    }
}

impl From<Acted> for Launched {
    fn from(a: Acted) -> Launched {
        Launched { action: a.action, resource: a.resource, detail: a.detail, ..Launched::default() }
    }
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
pub(super) async fn newest_of_stream_in(
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
        .sdk("DescribeImages")?;
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
pub async fn launch_instances(ctx: &Ctx<'_>, boot: &BootImage<'_>, spec: &LaunchSpec) -> Vec<Report<Launched>> {
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
        let vpc =
            ec2.describe_vpcs().set_filters(Some(search_filters(&spec.vpc_search))).send().await.sdk("DescribeVpcs")?;
        let vpc_ids: Vec<String> = vpc.vpcs().iter().filter_map(|v| v.vpc_id().map(str::to_owned)).collect();
        let mut subnet_filters = search_filters(&spec.subnet_search);
        subnet_filters.push(Filter::builder().name("vpc-id").set_values(Some(vpc_ids.clone())).build());
        let subnets = ec2.describe_subnets().set_filters(Some(subnet_filters)).send().await.sdk("DescribeSubnets")?;
        let subnet = subnets
            .subnets()
            .iter()
            .max_by_key(|s| s.available_ip_address_count())
            .context("no subnet matches --subnet-search-tags in a VPC matching --vpc-search-tags")?;
        let mut groups = Vec::new();
        if !spec.security_group_search.is_empty() {
            let mut f = search_filters(&spec.security_group_search);
            f.push(tags::filter("vpc-id", subnet.vpc_id().unwrap_or_default()));
            let sg = ec2.describe_security_groups().set_filters(Some(f)).send().await.sdk("DescribeSecurityGroups")?;
            groups = sg.security_groups().iter().filter_map(|g| g.group_id().map(str::to_owned)).collect();
            if groups.is_empty() {
                bail!("no security group matches --security-group-search-tags");
            }
        }
        let name = spec.tags.first().map(|(_, v)| v.clone()).unwrap_or_default();
        let older: Vec<UnpackerInstance> = if spec.replace { unpacker::find_all(&ec2, &name).await? } else { vec![] };
        let mut out = Vec::new();
        for image in images {
            let place = format!("{} in {}", spec.instance_type, subnet.subnet_id().unwrap_or_default());
            if let Some(row) = ctx.would("launch", &image, place) {
                out.push(row.into());
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
                let img = ec2.describe_images().image_ids(&image).send().await.sdk("DescribeImages")?;
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
            let run = req.send().await.sdk(format!("RunInstances {image}"))?;
            let inst = run.instances().first().context("RunInstances returned no instance")?;
            let id = inst.instance_id().unwrap_or_default().to_owned();
            let made = Some(std::time::Instant::now());
            unpacker::wait_state(
                &ec2,
                &id,
                aws_sdk_ec2::types::InstanceStateName::Running,
                made,
                ctx.settings.timeouts.unpacker,
            )
            .await?;
            out.push(Launched {
                action: "launched".into(),
                resource: id.clone(),
                private_ip: inst.private_ip_address().map(str::to_owned),
                detail: image.clone(),
                image: Some(image),
                instance: Some(id),
            });
        }
        for old in older {
            let (ec2, id) = (&ec2, old.instance_id.as_str());
            out.push(ctx.act("terminate", id, "replaced", || terminate(ec2, id)).await?.into());
        }
        Ok(out)
    })
    .await
}

/// `import-key-pair NAME FILE`: the SSH public key in every target (a key
/// of that name already there is left as it is).
pub async fn import_key_pair(ctx: &Ctx<'_>, name: &str, key: &[u8]) -> Vec<Report<Acted>> {
    ctx.each(|ec2, _t| async move {
        if let Some(row) = ctx.would("import", name, "key pair") {
            return Ok(vec![row]);
        }
        // ImportKeyPair takes no idempotency token, and the SDK retries an
        // attempt whose answer was lost: the retry then finds the name
        // taken. The key carries a token in a tag, so that case is told
        // apart from a key that was there before.
        let token = retry::token();
        let r = ec2
            .import_key_pair()
            .key_name(name)
            .public_key_material(aws_sdk_ec2::primitives::Blob::new(key))
            .tag_specifications(tags::made(
                aws_sdk_ec2::types::ResourceType::KeyPair,
                vec![tags::tag(tags::CREATE_TOKEN, &token)],
            ))
            .send()
            .await
            .or_code(&["InvalidKeyPair.Duplicate"], "ImportKeyPair")?;
        let fingerprint = match r {
            Some(k) => k.key_fingerprint().unwrap_or_default().to_owned(),
            None => match imported_with(&ec2, name, &token).await? {
                Some(fingerprint) => fingerprint,
                None => return Ok(vec![Acted::kept(name, "a key pair of this name exists")]),
            },
        };
        Ok(vec![ctx.described("import", name, fingerprint)])
    })
    .await
}

/// The fingerprint of key pair `name` if this run's attempt tagged with
/// `token` made it.
async fn imported_with(ec2: &Client, name: &str, token: &str) -> anyhow::Result<Option<String>> {
    let out = ec2.describe_key_pairs().key_names(name).send().await.sdk(format!("DescribeKeyPairs {name}"))?;
    Ok(out.key_pairs().iter().find_map(|k| {
        let ours = k.tags().iter().any(|t| t.key() == Some(tags::CREATE_TOKEN) && t.value() == Some(token));
        ours.then(|| k.key_fingerprint().unwrap_or_default().to_owned())
    }))
}
