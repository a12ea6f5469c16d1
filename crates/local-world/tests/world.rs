//! The local world comes up, looks like AWS to the real SDK, and its
//! attacher behaves like EBS on Nitro.

use std::{io::Write as _, time::Duration};

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use fleet_pki::Role;
use local_world::{FIRST_ACCOUNT_ID, Plan, SECOND_ACCOUNT_ID, World};
use unpacker_client::{AddDeviceRequest, GetStatusRequest};

#[tokio::test(flavor = "multi_thread")]
async fn world_starts_with_two_accounts_and_attaches_volumes_like_nitro() {
    let t = std::time::Instant::now();
    let world = World::start(&Plan::new(&["us-east-1", "eu-west-1"])).await.unwrap();
    eprintln!("world up in {:.1?} with {} targets", t.elapsed(), world.targets.len());
    assert_eq!(world.targets.len(), 4);

    // Accounts: static keys land in moto's default account; `second` is
    // reached by assuming a role, through the profile files alone.
    let ids: Vec<(&str, &str)> = world.targets.iter().map(|t| (t.account.as_str(), t.account_id.as_str())).collect();
    assert!(ids.contains(&("first", FIRST_ACCOUNT_ID)), "{ids:?}");
    assert!(ids.contains(&("second", SECOND_ACCOUNT_ID)), "{ids:?}");

    // Each unpacker instance answers on its loopback private IP.
    let publisher = fleet_tls::TlsFiles::from_ssl_dir(&world.ssl_dir(Role::AmiPublisher).unwrap());
    for t in &world.targets {
        let ec2 = world.ec2(&t.account, &t.region).await;
        let d = ec2.describe_instances().instance_ids(&t.instance_id).send().await.unwrap();
        let inst = &d.reservations()[0].instances()[0];
        assert_eq!(inst.private_ip_address(), Some(t.ip.to_string().as_str()));
        let mut c = unpacker_client::connect(&t.unpacker_addr().to_string(), &publisher).await.unwrap();
        c.get_status(GetStatusRequest {}).await.unwrap();
    }

    // A volume attached to the instance appears to its unpacker, Nitro-style.
    let t = &world.targets[1];
    let ec2 = world.ec2(&t.account, &t.region).await;
    let vol = ec2
        .create_volume()
        .size(1)
        .encrypted(true)
        .availability_zone(&t.availability_zone)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Volume)
                .tags(Tag::builder().key("Purpose").value("world-test").build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let vol_id = vol.volume_id().unwrap().to_owned();
    ec2.attach_volume().volume_id(&vol_id).instance_id(&t.instance_id).device("/dev/sdf").send().await.unwrap();
    let mut c = unpacker_client::connect(&t.unpacker_addr().to_string(), &publisher).await.unwrap();
    let dev = c
        .add_device(AddDeviceRequest { volume_id: vol_id.clone(), timeout_seconds: 20, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dev.size_bytes, 1 << 30);
    eprintln!("volume {vol_id} appeared as {} ({})", dev.path, dev.kind);

    // A snapshot keeps the bytes the volume held.
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev.path).unwrap();
    f.write_all(b"bytes behind the snapshot").unwrap();
    f.sync_all().unwrap();
    let snap = ec2.create_snapshot().volume_id(&vol_id).send().await.unwrap();
    let copy = world.snapshot_bytes(snap.snapshot_id().unwrap(), Duration::from_secs(20)).await.unwrap();
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(bytes.len(), 1 << 30);
    assert!(bytes.starts_with(b"bytes behind the snapshot"));

    // Detach: the device link goes away.
    ec2.detach_volume().volume_id(&vol_id).instance_id(&t.instance_id).send().await.unwrap();
    let link = t.device_dir.join(image_unpacker::devices::nitro_name(&vol_id));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while link.exists() {
        assert!(std::time::Instant::now() < deadline, "the device link outlived the detach");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The world's IAM evaluator (src/world/iam_policy.py) passes its own tests
/// (allow, explicit deny, resource ARNs, a missing tag, a wrong value, the
/// condition operators, tagging on create), and loads the shipped policy.
#[test]
fn the_iam_evaluator_passes_its_own_tests() {
    let python = local_world::ensure_moto().unwrap().with_file_name("python");
    let out = std::process::Command::new(python)
        .args(["-m", "unittest", "-v", "test_iam_policy"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/world"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SHIPPED_POLICY", concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ami-publisher-iam-policy.json"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && report.contains("\nOK"), "{report}");
    assert!(report.contains("Ran 19 tests"), "{report}");
}

/// With the shipped policy enforced (the default), ami-publisher may not
/// delete a snapshot it did not make, nor make a volume without its tag;
/// it may delete what carries ManagedBy=ami-fleet. Refusals are EC2's
/// UnauthorizedOperation, naming the action and the resource.
#[tokio::test(flavor = "multi_thread")]
async fn the_world_enforces_the_publishers_iam_policy() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let t = &world.targets[0];
    let own = aws_sdk_ec2::Client::new(&world.sdk_config(&t.account, &t.region).await);
    let config = world.sdk_config_as("ami-publisher", &t.account, &t.region).await.unwrap();
    let publisher = aws_sdk_ec2::Client::new(&config);
    let zone = format!("{}a", t.region);
    let tagged = |kind: ResourceType, tags: &[(&str, &str)]| {
        TagSpecification::builder()
            .resource_type(kind)
            .set_tags(Some(tags.iter().map(|(k, v)| Tag::builder().key(*k).value(*v).build()).collect()))
            .build()
    };
    // Made by someone else (the world's own client): untagged.
    let vol = own.create_volume().availability_zone(&zone).size(1).send().await.unwrap();
    let snap = own.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let foreign = snap.snapshot_id().unwrap();
    let err = publisher.delete_snapshot().snapshot_id(foreign).send().await.unwrap_err();
    let err = err.into_service_error();
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&err), Some("UnauthorizedOperation"));
    let message = aws_sdk_ec2::error::ProvideErrorMetadata::message(&err).unwrap_or_default();
    assert!(message.contains("ec2:DeleteSnapshot") && message.contains(foreign), "{message}");
    assert_eq!(own.describe_snapshots().snapshot_ids(foreign).send().await.unwrap().snapshots().len(), 1);

    // A create without the tag is refused; with it, allowed, and what it
    // made may be deleted.
    let err = publisher.create_volume().availability_zone(&zone).size(1).send().await.unwrap_err();
    assert_eq!(
        aws_sdk_ec2::error::ProvideErrorMetadata::code(&err.into_service_error()),
        Some("UnauthorizedOperation")
    );
    let made = publisher
        .create_volume()
        .availability_zone(&zone)
        .size(1)
        .tag_specifications(tagged(ResourceType::Volume, &[("ManagedBy", "ami-fleet")]))
        .send()
        .await
        .unwrap();
    let made = made.volume_id().unwrap();
    // A volume is `creating` for a while; delete once it is available.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match publisher.delete_volume().volume_id(made).send().await {
            Ok(_) => break,
            Err(e) => {
                let e = e.into_service_error();
                let code = aws_sdk_ec2::error::ProvideErrorMetadata::code(&e).unwrap_or_default().to_owned();
                assert_ne!(code, "UnauthorizedOperation", "{e:?}");
                assert!(std::time::Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // The EBS direct APIs too: reading a snapshot it did not make, or
    // starting one without the tag, is refused (AccessDeniedException,
    // naming the action and the snapshot); started with the tag, it may
    // write to it.
    use aws_sdk_ebs::error::ProvideErrorMetadata as _;
    let ebs = aws_sdk_ebs::Client::new(&config);
    let err = ebs.list_snapshot_blocks().snapshot_id(foreign).send().await.unwrap_err();
    assert_eq!(err.code(), Some("AccessDeniedException"), "{err:?}");
    assert!(err.message().unwrap_or_default().contains("ebs:ListSnapshotBlocks"), "{err:?}");
    let err = ebs.start_snapshot().volume_size(1).encrypted(true).send().await.unwrap_err();
    assert_eq!(err.code(), Some("AccessDeniedException"), "{err:?}");
    let ours = ebs
        .start_snapshot()
        .volume_size(1)
        .encrypted(true)
        .tags(aws_sdk_ebs::types::Tag::builder().key("ManagedBy").value("ami-fleet").build())
        .send()
        .await
        .unwrap();
    let ours = ours.snapshot_id().unwrap();
    let done = ebs.complete_snapshot().snapshot_id(ours).changed_blocks_count(0).send().await;
    assert!(done.is_ok(), "{done:?}");
    assert_eq!(world.api_outcomes("ami-publisher", "AccessDeniedException").values().sum::<u64>(), 2);

    // The same world with enforcement off lets anything through.
    let open = World::start(&Plan::of(&["first"], &["us-east-1"]).iam("off")).await.unwrap();
    let config = open.sdk_config_as("ami-publisher", &t.account, &t.region).await.unwrap();
    aws_sdk_ec2::Client::new(&config).create_volume().availability_zone(&zone).size(1).send().await.unwrap();
}

/// RegisterImage's attributes are kept and described, as EC2 does (moto
/// dropped them, and answered DescribeImageAttribute of tpmSupport with a
/// 500), and a CopyImage copy has its source's.
#[tokio::test(flavor = "multi_thread")]
async fn registered_image_attributes_are_kept_described_and_copied() {
    use aws_sdk_ec2::types::{
        BlockDeviceMapping, BootModeValues, EbsBlockDevice, ImageAttributeName, ImdsSupportValues, TpmSupportValues,
    };
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let ec2 = world.ec2("first", "us-east-1").await;
    let vol = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.unwrap();
    let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let root = BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(EbsBlockDevice::builder().snapshot_id(snap.snapshot_id().unwrap()).build())
        .build();
    let ami = ec2
        .register_image()
        .name("attrs")
        .root_device_name("/dev/xvda")
        .block_device_mappings(root)
        .ena_support(true)
        .sriov_net_support("simple")
        .tpm_support(TpmSupportValues::V20)
        .uefi_data("QU1aTlVFRkk=")
        .imds_support(ImdsSupportValues::V20)
        .boot_mode(BootModeValues::Uefi)
        .send()
        .await
        .unwrap();
    let ami = ami.image_id().unwrap().to_owned();
    let copy = ec2.copy_image().source_region("us-east-1").source_image_id(&ami).name("attrs-copy").send().await;
    let copy = copy.unwrap().image_id().unwrap().to_owned();
    for id in [&ami, &copy] {
        let d = ec2.describe_images().image_ids(id).send().await.unwrap();
        let i = &d.images()[0];
        assert_eq!(i.ena_support(), Some(true), "{id}: {i:?}");
        assert_eq!(i.sriov_net_support(), Some("simple"), "{id}");
        assert_eq!(i.tpm_support(), Some(&TpmSupportValues::V20), "{id}");
        assert_eq!(i.imds_support(), Some(&ImdsSupportValues::V20), "{id}");
        assert_eq!(i.boot_mode(), Some(&BootModeValues::Uefi), "{id}");
        let attr = |name: ImageAttributeName| ec2.describe_image_attribute().image_id(id).attribute(name).send();
        let tpm = attr(ImageAttributeName::TpmSupport).await.unwrap();
        assert_eq!(tpm.tpm_support().and_then(|v| v.value()), Some("v2.0"), "{id}");
        let uefi = attr(ImageAttributeName::UefiData).await.unwrap();
        assert_eq!(uefi.uefi_data().and_then(|v| v.value()), Some("QU1aTlVFRkk="), "{id}");
        let imds = attr(ImageAttributeName::ImdsSupport).await.unwrap();
        assert_eq!(imds.imds_support().and_then(|v| v.value()), Some("v2.0"), "{id}");
    }
    // An AMI never given TpmSupport answers it empty, not with an error.
    let plain = ec2.describe_images().owners("amazon").send().await.unwrap();
    if let Some(base) = plain.images().first().and_then(|i| i.image_id()) {
        let tpm = ec2.describe_image_attribute().image_id(base).attribute(ImageAttributeName::TpmSupport).send();
        assert!(tpm.await.unwrap().tpm_support().and_then(|v| v.value()).is_none());
    }
}

/// The keys EBS uses, as EC2 and KMS describe them: the account's default
/// is the AWS managed aws/ebs until changed, a snapshot carries its
/// volume's key, a volume shows its key's ARN, and a snapshot under the
/// AWS managed key cannot be shared with another account (moto lacked
/// GetEbsDefaultKmsKeyId, called every key customer managed, gave
/// snapshots no key and shared anything).
#[tokio::test(flavor = "multi_thread")]
async fn ebs_keys_are_described_carried_and_aws_managed_ones_never_shared() {
    use aws_sdk_ec2::types::{CreateVolumePermission, CreateVolumePermissionModifications};
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let ec2 = world.ec2("first", "us-east-1").await;
    let kms = aws_sdk_kms::Client::new(&world.sdk_config("first", "us-east-1").await);
    let default = ec2.get_ebs_default_kms_key_id().send().await.unwrap();
    assert_eq!(default.kms_key_id(), Some("alias/aws/ebs"));
    let snapshot_under = |key: Option<String>| {
        let ec2 = ec2.clone();
        async move {
            let vol = ec2
                .create_volume()
                .availability_zone("us-east-1a")
                .size(1)
                .encrypted(true)
                .set_kms_key_id(key)
                .send()
                .await
                .unwrap();
            let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
            let d = ec2.describe_snapshots().snapshot_ids(snap.snapshot_id().unwrap()).send().await.unwrap();
            (vol.kms_key_id().map(str::to_owned), d.snapshots()[0].clone())
        }
    };
    let share = |snapshot: String| {
        let ec2 = ec2.clone();
        async move {
            let add = CreateVolumePermission::builder().user_id(SECOND_ACCOUNT_ID).build();
            ec2.modify_snapshot_attribute()
                .snapshot_id(snapshot)
                .create_volume_permission(CreateVolumePermissionModifications::builder().add(add).build())
                .send()
                .await
        }
    };
    // Under the default key: the AWS managed aws/ebs, and never shared.
    let aws_ebs = kms.describe_key().key_id("alias/aws/ebs").send().await.unwrap();
    let aws_ebs = aws_ebs.key_metadata().unwrap();
    assert_eq!(aws_ebs.key_manager(), Some(&aws_sdk_kms::types::KeyManagerType::Aws));
    let (_, snap) = snapshot_under(None).await;
    assert_eq!(snap.kms_key_id(), aws_ebs.arn());
    let refused = share(snap.snapshot_id().unwrap().to_owned()).await.unwrap_err();
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused), Some("InvalidParameter"), "{refused:?}");
    let held = ec2
        .describe_snapshot_attribute()
        .snapshot_id(snap.snapshot_id().unwrap())
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .unwrap();
    assert!(held.create_volume_permissions().is_empty(), "{held:?}");
    // Under a customer managed key named by its alias: the ARN everywhere, and shared.
    let key = kms.create_key().send().await.unwrap();
    let key = key.key_metadata().unwrap();
    assert_eq!(key.key_manager(), Some(&aws_sdk_kms::types::KeyManagerType::Customer));
    kms.create_alias().alias_name("alias/images").target_key_id(key.key_id()).send().await.unwrap();
    let (volume_key, snap) = snapshot_under(Some("alias/images".to_owned())).await;
    assert_eq!(volume_key.as_deref(), key.arn());
    assert_eq!(snap.kms_key_id(), key.arn());
    share(snap.snapshot_id().unwrap().to_owned()).await.unwrap();
    // The account's default, once changed, is that key.
    ec2.modify_ebs_default_kms_key_id().kms_key_id(key.key_id()).send().await.unwrap();
    let default = ec2.get_ebs_default_kms_key_id().send().await.unwrap();
    assert_eq!(default.kms_key_id(), key.arn());
}

/// Launch permissions for an organization or an OU let exactly the accounts
/// in it (an OU's: also in the OUs below it) see and launch the AMI, as
/// EC2's "Share an AMI with organizations or OUs" describes.
#[tokio::test(flavor = "multi_thread")]
async fn organization_and_ou_launch_permissions_reach_their_accounts() {
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, LaunchPermission, LaunchPermissionModifications};
    use local_world::CONSUMER;
    let world = World::start(&Plan::of(&["first"], &["us-east-1"]).with_organization()).await.unwrap();
    let org = world.organization.clone().unwrap();
    let ec2 = world.ec2("first", "us-east-1").await;
    let vol = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.unwrap();
    let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let root = BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(EbsBlockDevice::builder().snapshot_id(snap.snapshot_id().unwrap()).build())
        .build();
    let ami = ec2.register_image().name("org-shared").root_device_name("/dev/xvda").block_device_mappings(root);
    let ami = ami.send().await.unwrap().image_id().unwrap().to_owned();
    let set = |p: LaunchPermission, add: bool| {
        let (ec2, ami) = (ec2.clone(), ami.clone());
        async move {
            let m = if add {
                LaunchPermissionModifications::builder().add(p).build()
            } else {
                LaunchPermissionModifications::builder().remove(p).build()
            };
            ec2.modify_image_attribute().image_id(ami).launch_permission(m).send().await.unwrap();
        }
    };
    let seen_by = |who: &'static str| {
        let (w, ami) = (&world, ami.clone());
        async move {
            let c = w.ec2(who, "us-east-1").await;
            c.describe_images()
                .owners(FIRST_ACCOUNT_ID)
                .send()
                .await
                .unwrap()
                .images()
                .iter()
                .any(|i| i.image_id() == Some(&ami))
        }
    };
    let second = "second";
    assert!(!seen_by(CONSUMER).await && !seen_by(second).await, "not shared yet");
    // The consumers' OU: the consumer, not the second account.
    let consumers = LaunchPermission::builder().organizational_unit_arn(org.ou_arn("consumers")).build();
    set(consumers.clone(), true).await;
    assert!(seen_by(CONSUMER).await && !seen_by(second).await);
    set(consumers, false).await;
    // The publishers' OU reaches the second account (directly in it).
    let publishers = LaunchPermission::builder().organizational_unit_arn(org.ou_arn("publishers")).build();
    set(publishers.clone(), true).await;
    assert!(!seen_by(CONSUMER).await && seen_by(second).await);
    set(publishers, false).await;
    // The organization reaches both.
    set(LaunchPermission::builder().organization_arn(&org.arn).build(), true).await;
    assert!(seen_by(CONSUMER).await && seen_by(second).await);
    // Launching is not copying: without read access to the snapshot the
    // consumer's CopyImage is refused, and makes nothing.
    let consumer = world.ec2(CONSUMER, "us-east-1").await;
    let refused = consumer.copy_image().source_image_id(&ami).source_region("us-east-1").name("copy").send().await;
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused.unwrap_err()), Some("InvalidSnapshot.NotFound"));
    let own = consumer.describe_images().owners("self").send().await.unwrap();
    assert!(own.images().is_empty(), "{own:?}");
}

/// The EBS direct APIs answer as EBS does (world/ebs_direct.py), to the
/// real SDK: 512 KiB blocks checked against their SHA-256 before anything
/// is written; the snapshot an EC2 snapshot, pending until completed, with
/// the account's default key; client tokens; never-written blocks of an
/// encrypted snapshot without a parent reading as noise; a child reading
/// as its parent plus its own blocks; changed blocks along a lineage; a
/// wrong block count ending the snapshot `error`; StartSnapshot's quota.
#[tokio::test(flavor = "multi_thread")]
async fn ebs_direct_apis_answer_as_ebs_does() {
    use aws_sdk_ebs::{
        error::ProvideErrorMetadata as _,
        primitives::ByteStream,
        types::{ChecksumAggregationMethod, ChecksumAlgorithm, Status},
    };
    use sha2::Digest as _;
    const BLOCK: usize = 524_288;
    const LEN: i32 = 524_288;
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    // As a tool calls (the quotas apply); EC2 is asked as the world.
    let config = world.sdk_config_as("ebs-test", "first", "us-east-1").await.unwrap();
    let ebs = aws_sdk_ebs::Client::new(&config);
    let ec2 = world.ec2("first", "us-east-1").await;
    let b64 = |d: &[u8]| aws_smithy_types::base64::encode(d);
    let sha = |d: &[u8]| sha2::Sha256::digest(d).to_vec();
    let put = |snapshot: String, index: i32, data: Vec<u8>, checksum: String, length: i32| {
        let ebs = ebs.clone();
        async move {
            ebs.put_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index)
                .data_length(length)
                .checksum(checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(data))
                .send()
                .await
        }
    };
    let state = |snapshot: String| {
        let ec2 = ec2.clone();
        async move {
            let d = ec2.describe_snapshots().snapshot_ids(snapshot).send().await.unwrap();
            d.snapshots()[0].clone()
        }
    };
    let completed = |snapshot: String| {
        let state = &state;
        async move {
            for _ in 0..600 {
                let s = state(snapshot.clone()).await;
                if s.state() != Some(&aws_sdk_ec2::types::SnapshotState::Pending) {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{snapshot} still pending after 60 s");
        }
    };
    let tag = aws_sdk_ebs::types::Tag::builder().key("ManagedBy").value("ami-fleet").build();

    // Encrypted, without a parent; the same token answers the same snapshot.
    let start = || ebs.start_snapshot().volume_size(1).encrypted(true).client_token("first-leaf").tags(tag.clone());
    let started = start().send().await.unwrap();
    assert_eq!((started.block_size(), started.status()), (Some(524_288), Some(&Status::Pending)));
    let snap = started.snapshot_id().unwrap().to_owned();
    assert_eq!(start().send().await.unwrap().snapshot_id(), Some(snap.as_str()), "the same token, the same snapshot");
    let conflict = ebs.start_snapshot().volume_size(2).client_token("first-leaf").send().await.unwrap_err();
    assert_eq!(conflict.code(), Some("ConflictException"), "{conflict:?}");
    let shown = state(snap.clone()).await;
    assert_eq!(shown.state(), Some(&aws_sdk_ec2::types::SnapshotState::Pending));
    assert_eq!(shown.volume_id(), Some("vol-ffffffff"));
    assert!(shown.encrypted().unwrap_or(false) && shown.kms_key_id().is_some_and(|k| k.starts_with("arn:aws:kms:")));
    assert!(shown.tags().iter().any(|t| t.key() == Some("ManagedBy")), "{shown:?}");

    // Blocks are checked before anything is written.
    let data = test_support::noise(BLOCK, 7);
    let wrong = put(snap.clone(), 1, data.clone(), b64(&sha(&[0u8; 8])), LEN).await.unwrap_err();
    assert_eq!(wrong.code(), Some("ValidationException"), "a wrong checksum: {wrong:?}");
    let short = put(snap.clone(), 1, data[..4096].to_vec(), b64(&sha(&data[..4096])), 4096).await.unwrap_err();
    assert_eq!(short.code(), Some("ValidationException"), "a block of 4096 bytes: {short:?}");
    put(snap.clone(), 0, data.clone(), b64(&sha(&data)), LEN).await.unwrap();
    let zeros = vec![0u8; BLOCK];
    put(snap.clone(), 2, zeros.clone(), b64(&sha(&zeros)), LEN).await.unwrap();
    let aggregate = b64(&sha(&[sha(&data), sha(&zeros)].concat()));
    let done = ebs
        .complete_snapshot()
        .snapshot_id(&snap)
        .changed_blocks_count(2)
        .checksum(aggregate)
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), Some(&Status::Pending));
    assert_eq!(completed(snap.clone()).await.state(), Some(&aws_sdk_ec2::types::SnapshotState::Completed));
    let late = put(snap.clone(), 3, data.clone(), b64(&sha(&data)), LEN).await.unwrap_err();
    assert_eq!(late.code(), Some("ValidationException"), "a write after completion: {late:?}");

    // What it holds: the blocks written, noise where none was.
    let bytes = std::fs::read(world.snapshot_bytes(&snap, Duration::from_secs(5)).await.unwrap()).unwrap();
    assert_eq!(bytes.len(), 1 << 30);
    assert_eq!(&bytes[..BLOCK], &data[..]);
    assert!(bytes[BLOCK..2 * BLOCK].iter().any(|b| *b != 0), "a never-written block of an encrypted snapshot is noise");
    assert!(bytes[2 * BLOCK..3 * BLOCK].iter().all(|b| *b == 0));
    let listed = ebs.list_snapshot_blocks().snapshot_id(&snap).send().await.unwrap();
    let indexes: Vec<i32> = listed.blocks().iter().filter_map(|b| b.block_index()).collect();
    assert_eq!((indexes, listed.block_size()), (vec![0, 2], Some(524_288)));
    let got = ebs
        .get_snapshot_block()
        .snapshot_id(&snap)
        .block_index(0)
        .block_token(listed.blocks()[0].block_token().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(got.checksum(), Some(b64(&sha(&data)).as_str()));
    assert_eq!(got.block_data.collect().await.unwrap().into_bytes().as_ref(), &data[..]);

    // A child: its parent's bytes and key, plus its own blocks.
    let refused = ebs.start_snapshot().volume_size(1).parent_snapshot_id(&snap).encrypted(true).send().await;
    assert_eq!(refused.unwrap_err().code(), Some("ValidationException"), "Encrypted with a parent");
    let child = ebs.start_snapshot().volume_size(1).parent_snapshot_id(&snap).send().await.unwrap();
    let child = child.snapshot_id().unwrap().to_owned();
    let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
    put(child.clone(), 2, other.clone(), b64(&sha(&other)), LEN).await.unwrap();
    ebs.complete_snapshot().snapshot_id(&child).changed_blocks_count(1).send().await.unwrap();
    let shown = completed(child.clone()).await;
    assert_eq!(shown.kms_key_id(), state(snap.clone()).await.kms_key_id(), "a child is under its parent's key");
    let child_bytes = std::fs::read(world.snapshot_bytes(&child, Duration::from_secs(5)).await.unwrap()).unwrap();
    assert_eq!(&child_bytes[..2 * BLOCK], &bytes[..2 * BLOCK]);
    assert_eq!(&child_bytes[2 * BLOCK..3 * BLOCK], &other[..]);
    let changed = ebs.list_changed_blocks().first_snapshot_id(&snap).second_snapshot_id(&child).send().await.unwrap();
    let changed: Vec<(Option<i32>, bool)> =
        changed.changed_blocks().iter().map(|c| (c.block_index(), c.first_block_token().is_some())).collect();
    assert_eq!(changed, [(Some(2), true)]);
    let listed = ebs.list_snapshot_blocks().snapshot_id(&child).send().await.unwrap();
    assert_eq!(listed.blocks().iter().filter_map(|b| b.block_index()).collect::<Vec<_>>(), [0, 2]);

    // A wrong block count: the snapshot ends `error`.
    let bad = ebs.start_snapshot().volume_size(1).send().await.unwrap().snapshot_id().unwrap().to_owned();
    put(bad.clone(), 0, data.clone(), b64(&sha(&data)), LEN).await.unwrap();
    ebs.complete_snapshot().snapshot_id(&bad).changed_blocks_count(3).send().await.unwrap();
    assert_eq!(completed(bad).await.state(), Some(&aws_sdk_ec2::types::SnapshotState::Error));

    // StartSnapshot: 10 per second per account and region.
    let eager = aws_sdk_ebs::Client::from_conf(
        aws_sdk_ebs::config::Builder::from(&config)
            .retry_config(aws_sdk_ebs::config::retry::RetryConfig::disabled())
            .build(),
    );
    let starts = (0..30).map(|_| {
        let eager = eager.clone();
        async move { eager.start_snapshot().volume_size(1).send().await }
    });
    let answers = futures::future::join_all(starts).await;
    let throttled =
        answers.iter().filter(|a| a.as_ref().err().and_then(|e| e.code()) == Some("RequestThrottledException")).count();
    assert!(throttled >= 10, "{throttled} of 30 StartSnapshot at once throttled");
}
