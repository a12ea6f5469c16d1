//! The world's model of EC2 (crates/local-world/src/world_model.py), seen
//! through the real SDK as a tool sees it: pending states, eventual
//! consistency, request throttling, lost answers and client tokens, and the
//! refusal of bad world variables.

use std::{
    future::Future,
    io::Write as _,
    time::{Duration, Instant},
};

use aws_config::retry::RetryConfig;
use aws_sdk_ec2::{error::ProvideErrorMetadata, types::Filter};
use fleet_pki::Role;
use local_world::{Plan, World};
use unpacker_client::AddDeviceRequest;

/// The app name the tests call as (the model applies to it, not to the
/// world's own `local-world` calls).
const APP: &str = "world-test";

fn one_target() -> Plan {
    Plan::of(&["first"], &["us-east-1"])
}

/// An EC2 client of the world's only target that calls as [`APP`] and never
/// retries, so every answer of the world is seen.
async fn bare_client(world: &World) -> aws_sdk_ec2::Client {
    let t = &world.targets[0];
    let config = world.sdk_config_as(APP, &t.account, &t.region).await.unwrap();
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&config).retry_config(RetryConfig::disabled()).build(),
    )
}

/// The states `state` goes through until `done` (each once, in order).
async fn states<F, Fut>(what: &str, done: &str, mut state: F) -> Vec<String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = String>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<String> = Vec::new();
    loop {
        let s = state().await;
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == done {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what} never became {done}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The time a new snapshot of `volume` stays pending, from its
/// CreateSnapshot (asked again while EC2 refuses a second snapshot of the
/// volume within 15 s of its last).
async fn pending_for(ec2: &aws_sdk_ec2::Client, volume: &str) -> (String, Duration) {
    let snap = loop {
        match ec2.create_snapshot().volume_id(volume).send().await {
            Ok(snap) => break snap,
            Err(e) if e.code() == Some("SnapshotCreationPerVolumeRateExceeded") => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let started = Instant::now();
    assert_eq!(snap.state().map(|s| s.as_str()), Some("pending"));
    let id = snap.snapshot_id().unwrap().to_owned();
    let seen = states("snapshot", "completed", || async {
        let d = ec2.describe_snapshots().snapshot_ids(&id).send().await.unwrap();
        d.snapshots()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen, ["pending", "completed"]);
    (id, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn resources_pass_through_their_pending_states_as_in_ec2() {
    let world = World::start(&one_target().pace("aws").time_scale(0.05)).await.unwrap();
    let t = &world.targets[0];
    let ec2 = world.ec2_as(APP, &t.account, &t.region).await.unwrap();

    // A new volume is `creating`, then `available`.
    let vol = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    assert_eq!(vol.state().map(|s| s.as_str()), Some("creating"));
    let id = vol.volume_id().unwrap().to_owned();
    let seen = states("volume", "available", || async {
        let d = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
        d.volumes()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen, ["creating", "available"]);

    // An attachment is `attaching`, then `attached`; the device shows then.
    ec2.attach_volume().volume_id(&id).instance_id(&t.instance_id).device("/dev/sdf").send().await.unwrap();
    let seen = states("attachment", "attached", || async {
        let d = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
        d.volumes()[0].attachments()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen, ["attaching", "attached"]);
    let publisher = fleet_tls::TlsFiles::from_ssl_dir(&world.ssl_dir(Role::AmiPublisher).unwrap());
    let mut c = unpacker_client::connect(&t.unpacker_addr().to_string(), &publisher).await.unwrap();
    let dev = c
        .add_device(AddDeviceRequest { volume_id: id.clone(), timeout_seconds: 20, ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // Snapshots are incremental: the first, after a byte was written into
    // every 512 KiB block, stays pending longer than the next one, of the
    // unchanged volume.
    let mut f = std::fs::OpenOptions::new().write(true).open(&dev.path).unwrap();
    for block in 0..(dev.size_bytes / (512 << 10)) {
        use std::io::{Seek as _, SeekFrom};
        f.seek(SeekFrom::Start(block * (512 << 10) + 7)).unwrap();
        f.write_all(b"x").unwrap();
    }
    f.sync_all().unwrap();
    let (_, full) = pending_for(&ec2, &id).await;
    let (unchanged, incremental) = pending_for(&ec2, &id).await;
    eprintln!("first snapshot pending {full:?}, the unchanged volume's next one {incremental:?}");
    assert!(full > incremental, "first {full:?}, next {incremental:?}");

    // An AMI is `pending` until its snapshot has completed.
    let snap = loop {
        match ec2.create_snapshot().volume_id(&id).send().await {
            Ok(s) => break s.snapshot_id().unwrap().to_owned(),
            Err(e) if e.code() == Some("SnapshotCreationPerVolumeRateExceeded") => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    let ami = ec2
        .register_image()
        .name("pending-states")
        .root_device_name("/dev/xvda")
        .block_device_mappings(
            aws_sdk_ec2::types::BlockDeviceMapping::builder()
                .device_name("/dev/xvda")
                .ebs(aws_sdk_ec2::types::EbsBlockDevice::builder().snapshot_id(&snap).build())
                .build(),
        )
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let seen = states("AMI", "available", || async {
        let image = ec2.describe_images().image_ids(&ami).send().await.unwrap().images()[0].clone();
        let state = image.state().unwrap().as_str().to_owned();
        if state == "available" {
            let s = ec2.describe_snapshots().snapshot_ids(&snap).send().await.unwrap();
            assert_eq!(s.snapshots()[0].state().unwrap().as_str(), "completed", "an AMI available before its snapshot");
        }
        state
    })
    .await;
    assert_eq!(seen, ["pending", "available"]);
    assert_ne!(unchanged, snap);

    // A detach is `detaching` (the volume still in use, so not deletable),
    // then the volume is `available`.
    ec2.detach_volume().volume_id(&id).instance_id(&t.instance_id).send().await.unwrap();
    let refused = ec2.delete_volume().volume_id(&id).send().await.unwrap_err();
    assert_eq!(refused.code(), Some("VolumeInUse"));
    let seen = states("volume", "available", || async {
        let d = ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
        d.volumes()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    // The refused delete above proves the detach was under way; whether a
    // describe still catches it depends on how loaded the machine is.
    assert_eq!(seen.last().map(String::as_str), Some("available"), "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|s| s == "in-use"), "{seen:?}");

    // The instance is `stopping`, then `stopped`; `pending`, then `running`;
    // between states it can be neither started nor stopped.
    let instance_state = || async {
        let d = ec2.describe_instances().instance_ids(&t.instance_id).send().await.unwrap();
        d.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_owned()
    };
    ec2.stop_instances().instance_ids(&t.instance_id).send().await.unwrap();
    let refused = ec2.start_instances().instance_ids(&t.instance_id).send().await.unwrap_err();
    assert_eq!(refused.code(), Some("IncorrectInstanceState"));
    assert_eq!(states("instance", "stopped", instance_state).await, ["stopping", "stopped"]);
    ec2.start_instances().instance_ids(&t.instance_id).send().await.unwrap();
    assert_eq!(states("instance", "running", instance_state).await, ["pending", "running"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_resource_is_not_found_until_ec2_has_caught_up() {
    // Seed 10 gives the volume about 1.9 s of lag (of at most 2 s).
    let world = World::start(&one_target().faults("lag=2s").seed(10)).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let id = ec2
        .create_volume()
        .size(1)
        .availability_zone(&t.availability_zone)
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_owned();

    let describe = ec2.describe_volumes().volume_ids(&id).send().await.unwrap_err();
    assert_eq!(describe.code(), Some("InvalidVolume.NotFound"), "{describe:?}");
    let tagging = ec2.create_tags().resources(&id).tags(tag("Purpose", "lag")).send().await.unwrap_err();
    assert_eq!(tagging.code(), Some("InvalidVolume.NotFound"), "{tagging:?}");
    let listed = ec2.describe_volumes().send().await.unwrap();
    assert!(listed.volumes().iter().all(|v| v.volume_id() != Some(id.as_str())), "listed while unknown");
    // The world's own view (the hypervisor's) has it all along.
    let own = world.ec2(&t.account, &t.region).await;
    own.describe_volumes().volume_ids(&id).send().await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut not_found = 0;
    loop {
        match ec2.describe_volumes().volume_ids(&id).send().await {
            Ok(_) => break,
            Err(e) => assert_eq!(e.code(), Some("InvalidVolume.NotFound"), "{e:?}"),
        }
        not_found += 1;
        assert!(Instant::now() < deadline, "the volume stayed unknown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{id}: NotFound {not_found} more times, then found");
    ec2.create_tags().resources(&id).tags(tag("Purpose", "lag")).send().await.unwrap();
    assert!(ec2.describe_volumes().send().await.unwrap().volumes().iter().any(|v| v.volume_id() == Some(id.as_str())));
    assert!(world.api_outcomes(APP, "lag").get("DescribeVolumes").copied().unwrap_or(0) >= 2);
}

fn tag(key: &str, value: &str) -> aws_sdk_ec2::types::Tag {
    aws_sdk_ec2::types::Tag::builder().key(key).value(value).build()
}

/// The indices of the calls of `n` DescribeVolumes (filtered, so within
/// their bucket) that were refused as throttled.
async fn throttled_calls(world: &World, n: usize) -> Vec<usize> {
    let ec2 = bare_client(world).await;
    let mut refused = Vec::new();
    for i in 0..n {
        let call =
            ec2.describe_volumes().filters(Filter::builder().name("status").values("available").build()).send().await;
        if let Err(e) = call {
            assert_eq!(e.code(), Some("RequestLimitExceeded"), "{e:?}");
            assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(503));
            refused.push(i);
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_refuses_the_configured_share_and_replays_with_its_seed() {
    let plan = one_target().faults("throttle=0.2").seed(12);
    let world = World::start(&plan).await.unwrap();
    let refused = throttled_calls(&world, 100).await;
    eprintln!("{} of 100 calls throttled: {refused:?}", refused.len());
    assert!((10..=30).contains(&refused.len()), "{} of 100 throttled at throttle=0.2", refused.len());
    assert_eq!(world.api_outcomes(APP, "throttle").get("DescribeVolumes").copied(), Some(refused.len() as u64));
    // The same seed, the same calls: the same decisions.
    drop(world);
    let again = World::start(&plan).await.unwrap();
    assert_eq!(throttled_calls(&again, 100).await, refused);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_beyond_an_actions_token_bucket_is_throttled_until_it_refills() {
    let world = World::start(&one_target().pace("aws")).await.unwrap();
    let ec2 = bare_client(&world).await;
    // DescribeVolumes without filters: EC2's bucket for unfiltered,
    // unpaginated calls of the big listings holds 50 calls and refills 10
    // a second.
    let mut answers = Vec::new();
    for _ in 0..120 {
        answers.push(ec2.describe_volumes().send().await.map_err(|e| e.code().map(str::to_owned)));
    }
    assert!(answers[..50].iter().all(Result::is_ok), "refused within the bucket: {answers:?}");
    let refused =
        answers[50..].iter().filter(|a| a.as_ref().err() == Some(&Some("RequestLimitExceeded".into()))).count();
    assert!(refused >= 20, "only {refused} of 70 calls past the bucket were refused");
    assert_eq!(world.api_outcomes(APP, "bucket").get("DescribeVolumes").copied(), Some(refused as u64));
    // Other actions have buckets of their own, and a listing EC2 does not
    // name among the big ones keeps the bucket of 100 unfiltered.
    for i in 0..80 {
        let vpcs = ec2.describe_vpcs().send().await;
        assert!(vpcs.is_ok(), "DescribeVpcs {i} refused: {vpcs:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ec2.describe_volumes().send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mutating_actions_share_ec2s_smaller_bucket_and_tags_have_a_bigger_one() {
    let world = World::start(&one_target().pace("aws")).await.unwrap();
    let ec2 = bare_client(&world).await;
    // A mutating action with no bucket of its own: 50 calls, 5 a second.
    let mut deletes = Vec::new();
    for i in 0..60 {
        deletes.push(
            ec2.delete_key_pair().key_name(format!("none-{i}")).send().await.map_err(|e| e.code().map(str::to_owned)),
        );
    }
    assert!(deletes[..50].iter().all(Result::is_ok), "refused within the bucket: {deletes:?}");
    let refused = deletes[50..].iter().filter(|a| a.is_err()).count();
    assert!(refused >= 5, "only {refused} of 10 DeleteKeyPair past a bucket of 50 were refused");
    // CreateTags: 100 calls, 10 a second.
    let vpc = ec2.describe_vpcs().send().await.unwrap().vpcs()[0].vpc_id().unwrap().to_owned();
    for i in 0..90 {
        let tagged = ec2.create_tags().resources(&vpc).tags(tag("n", &i.to_string())).send().await;
        assert!(tagged.is_ok(), "CreateTags {i} refused: {tagged:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_retried_after_its_answer_was_lost_makes_one_resource_with_a_client_token() {
    // Seed 195 at lost=0.5 (found by replaying world_model.py's draws):
    // the first CreateVolume's answer is lost and its retry answered; the
    // next two are answered; the fourth's is lost and its retry answered.
    // The first CreateSnapshot's answer is lost after the snapshot was
    // made, and its retry meets the volume's snapshot rate.
    let world = World::start(&one_target().faults("lost=0.5").seed(195)).await.unwrap();
    let t = &world.targets[0];
    let app_config = world.sdk_config_as(APP, &t.account, &t.region).await.unwrap();
    // The SDK's standard retries, as a tool has them.
    let ec2 = aws_sdk_ec2::Client::new(&app_config);
    let own = world.ec2(&t.account, &t.region).await;
    let volumes = || async {
        let d = own.describe_volumes().send().await.unwrap();
        let mut ids: Vec<String> = d
            .volumes()
            .iter()
            .filter_map(|v| v.volume_id().map(str::to_owned))
            .filter(|id| !t.root_volumes.contains(id))
            .collect();
        ids.sort();
        ids
    };
    let lost = |action: &str| world.api_outcomes(APP, "lost").get(action).copied().unwrap_or(0);

    let made = ec2
        .create_volume()
        .size(1)
        .availability_zone(&t.availability_zone)
        .client_token("one-volume")
        .send()
        .await
        .unwrap();
    let id = made.volume_id().unwrap().to_owned();
    assert_eq!(lost("CreateVolume"), 1);
    assert_eq!(volumes().await, std::slice::from_ref(&id));
    // The same token and parameters later: the same volume, nothing made.
    let again = ec2
        .create_volume()
        .size(1)
        .availability_zone(&t.availability_zone)
        .client_token("one-volume")
        .send()
        .await
        .unwrap();
    assert_eq!(again.volume_id(), Some(id.as_str()));
    assert_eq!(volumes().await.len(), 1);
    // The same token with other parameters is refused.
    let other = ec2
        .create_volume()
        .size(2)
        .availability_zone(&t.availability_zone)
        .client_token("one-volume")
        .send()
        .await
        .unwrap_err();
    assert_eq!(other.code(), Some("IdempotentParameterMismatch"), "{other:?}");
    // Without a token of the caller's: the SDK fills ClientToken itself
    // (EC2's model marks it an idempotency token) and keeps it for its
    // retries, so the retried create makes one volume too.
    let untokened = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    assert_eq!(lost("CreateVolume"), 2);
    let all = volumes().await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all.iter().any(|v| Some(v.as_str()) == untokened.volume_id()));

    // CreateSnapshot takes no ClientToken: the SDK's retry of a snapshot
    // whose answer was lost after EC2 made it would make a second one, but
    // EC2 refuses a snapshot of a volume within 15 s of its last: the retry
    // is refused, and the caller has to look for what the lost call made.
    let retried = ec2.create_snapshot().volume_id(&id).send().await.unwrap_err();
    assert_eq!(retried.code(), Some("SnapshotCreationPerVolumeRateExceeded"), "{retried:?}");
    assert_eq!(lost("CreateSnapshot"), 1);
    let snaps =
        own.describe_snapshots().filters(Filter::builder().name("volume-id").values(&id).build()).send().await.unwrap();
    let ids: Vec<&str> = snaps.snapshots().iter().filter_map(|s| s.snapshot_id()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_never_modified_has_no_modification_and_one_in_six_hours_is_allowed() {
    let world = World::start(&one_target()).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let made = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    let id = made.volume_id().unwrap().to_owned();
    // As EC2 answers it (aws-sdk-rust#1346), not an empty list.
    let never = ec2.describe_volumes_modifications().volume_ids(&id).send().await.unwrap_err();
    assert_eq!(never.code(), Some("InvalidVolumeModification.NotFound"), "{never:?}");
    assert!(never.message().unwrap_or_default().contains(&id), "{never:?}");
    // A filter that matches nothing is no error.
    let by_filter = Filter::builder().name("volume-id").values(&id).build();
    let none = ec2.describe_volumes_modifications().filters(by_filter).send().await.unwrap();
    assert!(none.volumes_modifications().is_empty());
    ec2.modify_volume().volume_id(&id).size(2).send().await.unwrap();
    let one = ec2.describe_volumes_modifications().volume_ids(&id).send().await.unwrap();
    assert_eq!(one.volumes_modifications().len(), 1);
    assert_eq!(one.volumes_modifications()[0].target_size(), Some(2));
    let again = ec2.modify_volume().volume_id(&id).size(3).send().await.unwrap_err();
    assert_eq!(again.code(), Some("VolumeModificationRateExceeded"), "{again:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_snapshot_of_a_volume_within_15_seconds_is_refused() {
    let world = World::start(&one_target()).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let vol = |c: &aws_sdk_ec2::Client| c.create_volume().size(1).availability_zone(&t.availability_zone).send();
    let id = vol(&ec2).await.unwrap().volume_id().unwrap().to_owned();
    let other = vol(&ec2).await.unwrap().volume_id().unwrap().to_owned();
    ec2.create_snapshot().volume_id(&id).send().await.unwrap();
    let refused = ec2.create_snapshot().volume_id(&id).send().await.unwrap_err();
    assert_eq!(refused.code(), Some("SnapshotCreationPerVolumeRateExceeded"), "{refused:?}");
    assert_eq!(refused.raw_response().map(|r| r.status().as_u16()), Some(400));
    assert_eq!(world.api_outcomes(APP, "SnapshotCreationPerVolumeRateExceeded").get("CreateSnapshot"), Some(&1));
    // The limit is per volume: another volume's snapshot is made.
    ec2.create_snapshot().volume_id(&other).send().await.unwrap();
    // Nothing was made by the refusal.
    let own = world.ec2(&t.account, &t.region).await;
    let of_id = Filter::builder().name("volume-id").values(&id).build();
    assert_eq!(own.describe_snapshots().filters(of_id).send().await.unwrap().snapshots().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_or_an_ami_can_end_failed_after_its_pending_time() {
    // Every snapshot fails: pending, then `error` for good.
    let world = World::start(&one_target().faults("fail=1@CreateSnapshot")).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let vol = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let snap = snap.snapshot_id().unwrap().to_owned();
    let seen = states("snapshot", "error", || async {
        let d = ec2.describe_snapshots().snapshot_ids(&snap).send().await.unwrap();
        d.snapshots()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen, ["pending", "error"]);
    drop(world);

    // Only AMIs fail: the snapshot completes, the AMI made of it fails.
    let world = World::start(&one_target().faults("fail=1@RegisterImage")).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let vol = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let snap = snap.snapshot_id().unwrap().to_owned();
    let seen = states("snapshot", "completed", || async {
        let d = ec2.describe_snapshots().snapshot_ids(&snap).send().await.unwrap();
        d.snapshots()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen.last().map(String::as_str), Some("completed"));
    let root = aws_sdk_ec2::types::BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(aws_sdk_ec2::types::EbsBlockDevice::builder().snapshot_id(&snap).build())
        .build();
    let ami = ec2
        .register_image()
        .name("fails")
        .root_device_name("/dev/xvda")
        .block_device_mappings(root)
        .virtualization_type("hvm")
        .send()
        .await
        .unwrap();
    let ami = ami.image_id().unwrap().to_owned();
    let seen = states("AMI", "failed", || async {
        let d = ec2.describe_images().image_ids(&ami).send().await.unwrap();
        d.images()[0].state().unwrap().as_str().to_owned()
    })
    .await;
    assert_eq!(seen, ["pending", "failed"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_shortages_and_sts_throttling_refuse_with_ec2s_and_stss_codes() {
    let world = World::start(&one_target().faults("capacity=1,throttle=1@GetCallerIdentity")).await.unwrap();
    let t = &world.targets[0];
    let ec2 = bare_client(&world).await;
    let refused = ec2.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap_err();
    assert_eq!(refused.code(), Some("InsufficientVolumeCapacity"), "{refused:?}");
    assert_eq!(refused.raw_response().map(|r| r.status().as_u16()), Some(500));
    assert!(data_volumes(&world).await.is_empty(), "a refused CreateVolume made a volume");
    // Other actions have no capacity to lack.
    ec2.describe_volumes().send().await.unwrap();
    assert_eq!(world.api_outcomes(APP, "capacity").get("CreateVolume"), Some(&1));

    let config = world.sdk_config_as(APP, &t.account, &t.region).await.unwrap();
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&config).retry_config(RetryConfig::disabled()).build(),
    );
    let throttled = sts.get_caller_identity().send().await.unwrap_err();
    assert_eq!(throttled.code(), Some("Throttling"), "{throttled:?}");
    assert_eq!(throttled.raw_response().map(|r| r.status().as_u16()), Some(400));
    assert_eq!(world.api_outcomes(APP, "throttle").get("GetCallerIdentity"), Some(&1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_background_load_leaves_a_tool_part_of_each_bucket() {
    // Other tools of the account take 60% of every bucket: of the 50 calls
    // of the unfiltered DescribeVolumes bucket, 20 are left.
    let world = World::start(&one_target().pace("aws").faults("load=0.6")).await.unwrap();
    let ec2 = bare_client(&world).await;
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(ec2.describe_volumes().send().await.is_ok());
    }
    assert!(answers[..19].iter().all(|ok| *ok), "refused within what the load leaves: {answers:?}");
    let refused = answers[20..].iter().filter(|ok| !**ok).count();
    assert!(refused >= 15, "only {refused} of 20 calls past the 20 left were refused");
}

/// A client of the world's only target that calls as [`APP`], never
/// retries, and gives up on an attempt after `timeout`.
async fn impatient_client(world: &World, timeout: Duration) -> aws_sdk_ec2::Client {
    let t = &world.targets[0];
    let config = world.sdk_config_as(APP, &t.account, &t.region).await.unwrap();
    let timeouts = aws_config::timeout::TimeoutConfig::builder().operation_attempt_timeout(timeout).build();
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&config)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .build(),
    )
}

/// The volumes of the world's only target but its instances' roots.
async fn data_volumes(world: &World) -> Vec<String> {
    let t = &world.targets[0];
    let own = world.ec2(&t.account, &t.region).await;
    let d = own.describe_volumes().send().await.unwrap();
    d.volumes()
        .iter()
        .filter_map(|v| v.volume_id().map(str::to_owned))
        .filter(|v| !t.root_volumes.contains(v))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_withheld_answer_never_comes_whether_ec2_acted_or_not() {
    let world = World::start(&one_target().faults("hang=1").seed(8)).await.unwrap();
    let t = &world.targets[0];
    let ec2 = impatient_client(&world, Duration::from_millis(500)).await;
    let n = 8;
    for i in 0..n {
        let call = ec2.create_volume().size(1).availability_zone(&t.availability_zone).client_token(format!("w{i}"));
        let e = call.send().await.unwrap_err();
        assert!(matches!(e, aws_sdk_ec2::error::SdkError::TimeoutError(_)), "{e:?}");
    }
    assert_eq!(world.api_outcomes(APP, "hang").get("CreateVolume"), Some(&n));
    // Some were carried out before their answer was held back, some not.
    let made = data_volumes(&world).await.len() as u64;
    eprintln!("{made} of {n} withheld creates were carried out");
    assert!(made > 0 && made < n, "{made} of {n}");
}

#[tokio::test(flavor = "multi_thread")]
async fn any_mutating_call_can_lose_its_answer_before_or_after_acting() {
    let world = World::start(&one_target().faults("lost=1").seed(9)).await.unwrap();
    let t = &world.targets[0];
    let own = world.ec2(&t.account, &t.region).await;
    let made = own.create_volume().size(1).availability_zone(&t.availability_zone).send().await.unwrap();
    let id = made.volume_id().unwrap().to_owned();
    let ec2 = bare_client(&world).await;
    let n = 9;
    for i in 0..n {
        ec2.create_tags().resources(&id).tags(tag(&format!("k{i}"), "v")).send().await.unwrap_err();
    }
    assert_eq!(world.api_outcomes(APP, "lost").get("CreateTags"), Some(&n));
    // Reads keep their answers.
    ec2.describe_volumes().volume_ids(&id).send().await.unwrap();
    let d = own.describe_volumes().volume_ids(&id).send().await.unwrap();
    let applied = d.volumes()[0].tags().len() as u64;
    eprintln!("{applied} of {n} CreateTags whose answers were lost were carried out");
    assert!(applied > 0 && applied < n, "{applied} of {n}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_world_variables_are_refused_naming_the_variable() {
    let cases = [
        ("LOCAL_WORLD_FAULTS", "throttle=0.2,slow=1", "unknown fault 'slow'"),
        ("LOCAL_WORLD_FAULTS", "throttle=1.5", "throttle=1.5 is not a share between 0 and 1"),
        ("LOCAL_WORLD_FAULTS", "error=-0.1", "error=-0.1 is not a share between 0 and 1"),
        ("LOCAL_WORLD_FAULTS", "lost=0.5@create-volume", "lost=...@create-volume is not a list of actions"),
        ("LOCAL_WORLD_FAULTS", "lag=2 seconds", "lag=2 seconds is not a duration"),
        ("LOCAL_WORLD_FAULTS", "lost", "'lost' needs a value"),
        ("LOCAL_WORLD_PACE", "fast", "unknown pace 'fast'"),
        ("LOCAL_WORLD_TIME_SCALE", "0", "'0' is not a factor above 0"),
        ("LOCAL_WORLD_SEED", "seven", "'seven' is not a non-negative integer"),
    ];
    for (name, value, says) in cases {
        let err = match World::start(&one_target().with(name, value)).await {
            Ok(_) => panic!("{name}={value} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.starts_with(&format!("{name}: ")), "{name}={value}: {err}");
        assert!(err.contains(says), "{name}={value}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_changes_are_seen_late_by_every_read_and_then_seen() {
    // Seed 17 (found by replaying world_model.py's draws): the CreateTags
    // is seen after 8.4 s, the DeleteTags after 6.6 s. New ids are known at
    // once: the lag is limited to the tag actions.
    let world = World::start(&one_target().faults("lag=20s@CreateTags+DeleteTags").seed(17)).await.unwrap();
    let t = &world.targets[0];
    let own = world.ec2(&t.account, &t.region).await;
    let volume = |key: &str| {
        own.create_volume()
            .size(1)
            .availability_zone(&t.availability_zone)
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Volume)
                    .tags(tag(key, "1"))
                    .build(),
            )
            .send()
    };
    let changed = volume("a").await.unwrap().volume_id().unwrap().to_owned();
    let removed = volume("c").await.unwrap().volume_id().unwrap().to_owned();
    let ec2 = bare_client(&world).await;
    let started = Instant::now();
    ec2.create_tags().resources(&changed).tags(tag("a", "2")).tags(tag("b", "new")).send().await.unwrap();
    ec2.delete_tags()
        .resources(&removed)
        .tags(aws_sdk_ec2::types::Tag::builder().key("c").build())
        .send()
        .await
        .unwrap();

    let tags_of = |c: &aws_sdk_ec2::Client, id: &str| {
        let (c, id) = (c.clone(), id.to_owned());
        async move {
            let out = c.describe_tags().filters(Filter::builder().name("resource-id").values(&id).build()).send().await;
            let mut tags: Vec<String> =
                out.unwrap().tags().iter().map(|t| format!("{}={}", t.key().unwrap(), t.value().unwrap())).collect();
            tags.sort();
            tags
        }
    };
    let with = |c: &aws_sdk_ec2::Client, name: &str, value: &str| {
        let f = Filter::builder().name(name).values(value).build();
        let c = c.clone();
        async move {
            let out = c.describe_volumes().filters(f).send().await.unwrap();
            let mut ids: Vec<String> = out.volumes().iter().filter_map(|v| v.volume_id().map(str::to_owned)).collect();
            ids.sort();
            ids
        }
    };
    // The tool sees the tags as they were, by every way of reading them.
    assert_eq!(tags_of(&ec2, &changed).await, ["a=1"]);
    assert_eq!(tags_of(&ec2, &removed).await, ["c=1"]);
    assert_eq!(with(&ec2, "tag:a", "2").await, Vec::<String>::new());
    assert_eq!(with(&ec2, "tag:a", "1").await, [changed.as_str()]);
    assert_eq!(with(&ec2, "tag-key", "b").await, Vec::<String>::new());
    assert_eq!(with(&ec2, "tag-key", "c").await, [removed.as_str()]);
    let listed = ec2.describe_volumes().volume_ids(&changed).send().await.unwrap();
    let set: Vec<_> = listed.volumes()[0].tags().iter().map(|t| t.key().unwrap().to_owned()).collect();
    assert_eq!(set, ["a"], "the TagSet lags too");
    // The world's own calls see the truth.
    assert_eq!(tags_of(&own, &changed).await, ["a=2", "b=new"]);
    assert_eq!(tags_of(&own, &removed).await, Vec::<String>::new());

    // Then each change is seen, after its own lag.
    let seen_after = |id: String, want: Vec<&'static str>| {
        let ec2 = ec2.clone();
        async move {
            loop {
                if tags_of(&ec2, &id).await == want {
                    return started.elapsed();
                }
                assert!(started.elapsed() < Duration::from_secs(25), "{id} never showed {want:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let (a, c) = tokio::join!(seen_after(changed.clone(), vec!["a=2", "b=new"]), seen_after(removed.clone(), vec![]));
    eprintln!("CreateTags seen after {a:.1?}, DeleteTags after {c:.1?}");
    assert!(a > Duration::from_secs(7) && a < Duration::from_secs(10), "{a:?}");
    assert!(c > Duration::from_secs(5) && c < Duration::from_secs(8), "{c:?}");
    assert_eq!(with(&ec2, "tag:a", "2").await, [changed]);
    assert_eq!(world.tags_seen_late(), Some(3), "a, b and c");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_resources_tags_go_with_it_seen_late_like_any_tag_change() {
    // Seed 1 (found by replaying world_model.py's draws): the DeleteVolume's
    // tag removal is seen after 8.0 s.
    let world = World::start(&one_target().faults("lag=20s@DeleteVolume").seed(1)).await.unwrap();
    let t = &world.targets[0];
    let own = world.ec2(&t.account, &t.region).await;
    let ec2 = bare_client(&world).await;
    let made = ec2
        .create_volume()
        .size(1)
        .availability_zone(&t.availability_zone)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Volume)
                .tags(tag("Stream", "s"))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let id = made.volume_id().unwrap().to_owned();
    let listed = |c: &aws_sdk_ec2::Client| {
        let c = c.clone();
        async move {
            let f = Filter::builder().name("key").values("Stream").build();
            let out = c.describe_tags().filters(f).send().await.unwrap();
            out.tags().iter().filter_map(|t| t.resource_id().map(str::to_owned)).collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(&ec2).await, [id.as_str()]);
    // Not yet available: wait, as a tool would, then delete.
    states("the volume", "available", || {
        let own = own.clone();
        let id = id.clone();
        async move {
            let d = own.describe_volumes().volume_ids(&id).send().await.unwrap();
            d.volumes()[0].state().unwrap().as_str().to_owned()
        }
    })
    .await;
    let started = Instant::now();
    ec2.delete_volume().volume_id(&id).send().await.unwrap();
    // EC2 itself has dropped them (the world's own view)...
    assert_eq!(listed(&own).await, Vec::<String>::new());
    // ... but a tool's DescribeTags still names the deleted volume, whose
    // describe answers NotFound.
    assert_eq!(listed(&ec2).await, [id.as_str()]);
    let e = ec2.describe_volumes().volume_ids(&id).send().await.unwrap_err();
    assert_eq!(e.code(), Some("InvalidVolume.NotFound"));
    while !listed(&ec2).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(20), "the deleted volume's tags never went");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = started.elapsed();
    assert!(gone > Duration::from_secs(7) && gone < Duration::from_secs(10), "{gone:?}");
}

/// An EBS client of the world's only target that calls as [`APP`] and
/// never retries.
async fn bare_ebs(world: &World) -> aws_sdk_ebs::Client {
    let t = &world.targets[0];
    let config = world.sdk_config_as(APP, &t.account, &t.region).await.unwrap();
    aws_sdk_ebs::Client::from_conf(
        aws_sdk_ebs::config::Builder::from(&config).retry_config(RetryConfig::disabled()).build(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ebs_calls_meet_the_pace_and_faults_and_a_new_snapshot_is_not_known_at_once() {
    use aws_sdk_ebs::{primitives::ByteStream, types::ChecksumAlgorithm};
    use sha2::Digest as _;
    // At half EC2's pace: a write takes 40 to 100 ms.
    let plan = one_target().pace("aws").time_scale(0.5).faults("throttle=0.2,error=0.1,lost=0.2,lag=3s").seed(24);
    let world = World::start(&plan).await.unwrap();
    let ebs = bare_ebs(&world).await;
    // StartSnapshot, with its token, until one is answered.
    let started = Instant::now();
    let snapshot = loop {
        match ebs.start_snapshot().volume_size(1).encrypted(true).client_token("model-1").send().await {
            Ok(out) => break out.snapshot_id().unwrap().to_owned(),
            Err(e) => eprintln!("StartSnapshot: {:?}", e.code()),
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no StartSnapshot answered");
    };
    let known = Instant::now();
    let data = vec![7u8; 524_288];
    let checksum = aws_smithy_types::base64::encode(sha2::Sha256::digest(&data));
    let put = |index: i32| {
        ebs.put_snapshot_block()
            .snapshot_id(&snapshot)
            .block_index(index)
            .data_length(524_288)
            .checksum(&checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(data.clone()))
            .send()
    };
    // Not known to writes at first; known within the lag.
    let mut codes = Vec::new();
    loop {
        let t = Instant::now();
        let answer = put(0).await;
        let took = t.elapsed();
        match answer {
            Ok(_) => break,
            Err(e) => codes.push(e.code().map(str::to_owned)),
        }
        assert!(took >= Duration::from_millis(40), "a write took {took:?}: no latency ({codes:?})");
        assert!(known.elapsed() < Duration::from_secs(10), "still unknown after {:?}: {codes:?}", known.elapsed());
    }
    assert_eq!(codes.first(), Some(&Some("ResourceNotFoundException".to_owned())), "{codes:?}");
    // Writes meet throttling, server errors and lost answers, each in
    // EBS's shape; every fault is in the log.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for i in 1..60 {
        if let Err(e) = put(i).await {
            *seen.entry(e.code().unwrap_or("no answer").to_owned()).or_default() += 1;
        }
    }
    eprintln!("{seen:?}");
    for code in ["RequestThrottledException", "InternalServerException"] {
        assert!(seen.get(code).is_some_and(|n| *n > 0), "no {code}: {seen:?}");
    }
    let log = |outcome| world.api_outcomes(APP, outcome).get("PutSnapshotBlock").copied().unwrap_or(0);
    assert!(log("throttle") > 0 && log("error") > 0 && log("lost") > 0, "{seen:?}");
    let not_found = codes.iter().filter(|c| c.as_deref() == Some("ResourceNotFoundException")).count();
    assert_eq!(log("ResourceNotFoundException"), not_found as u64, "{codes:?}");
}
