//! The lifecycle and operations subcommands on the local world, checked
//! against the emulator's state afterwards.

mod common;

use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use common::*;
use local_world::{Plan, World};
use serde_json::Value;

async fn image_tags(world: &World, region: &str, ami: &str) -> Option<Vec<(String, String)>> {
    let ec2 = world.ec2("first", region).await;
    let out = ec2.describe_images().owners("self").send().await.unwrap();
    let img = out.images().iter().find(|i| i.image_id() == Some(ami))?;
    Some(img.tags().iter().map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned())).collect())
}

async fn snapshot_exists(world: &World, region: &str, snap: &str) -> bool {
    let ec2 = world.ec2("first", region).await;
    let out = ec2.describe_snapshots().owner_ids("self").send().await.unwrap();
    out.snapshots().iter().any(|s| s.snapshot_id() == Some(snap))
}

async fn instance_state(world: &World, i: usize) -> String {
    let t = &world.targets[i];
    let ec2 = world.ec2(&t.account, &t.region).await;
    let d = ec2.describe_instances().instance_ids(&t.instance_id).send().await.unwrap();
    d.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_subcommands_change_exactly_what_they_say() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1", "eu-west-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let all = with_targets(&targets, &[]);
    let stream = "ops/base";
    add_image(&world, stream, "1", &disk(8 * MIB, 1)).await;
    add_image(&world, stream, "2", &disk(8 * MIB, 2)).await;
    let (code, r1) = p.publish(stream, "1", &with_targets(&targets, &["--expires-in", "1s"]));
    assert_eq!(code, 0);
    let (code, r2) = p.publish(stream, "2", &all);
    assert_eq!(code, 0);
    let path1 = world.path("r1.json");
    let path2 = world.path("r2.json");
    ami_publisher::results::write_json_atomic(&path1, &r1).unwrap();
    ami_publisher::results::write_json_atomic(&path2, &r2).unwrap();
    let (p1, p2) = (path1.to_str().unwrap(), path2.to_str().unwrap());
    let run = |extra: &[&str]| p.run(&[&all[..], extra].concat());

    // Lists.
    let imgs = records(&json_of(&run(&["--json", "list-images"])));
    assert_eq!(imgs.len(), 4, "{imgs:?}");
    let leaf2 = records(&json_of(&run(&["--json", "list-images", "--search-tags", "ImageLeaf=2"])));
    assert_eq!(leaf2.len(), 2);
    assert!(leaf2.iter().all(|i| i["leaf"] == "2"));
    let not1 = records(&json_of(&run(&["--json", "list-images", "--exclude-search-tags", "ImageLeaf=1"])));
    assert_eq!(not1.len(), 2);
    let unpackers = records(&json_of(&run(&["--json", "list-unpackers"])));
    assert_eq!(unpackers.len(), 2);
    assert!(unpackers.iter().all(|u| u["state"] == "running" && u["streams"] == stream), "{unpackers:?}");
    let streams = records(&json_of(&run(&["--json", "list-streams"])));
    assert_eq!(streams.len(), 2, "the stream on each of the two unpackers: {streams:?}");
    assert!(streams.iter().all(|s| s["leaf"] == "2" && s["state"] == "verified"), "{streams:?}");
    // The publishes released their capture holds.
    assert!(streams.iter().all(|s| s["capture_hold"] == ""), "{streams:?}");
    let table = String::from_utf8(run(&["list-unpackers"]).stdout).unwrap();
    assert!(table.starts_with("TARGET") && table.contains(&world.targets[0].instance_id), "{table}");

    // set-exclusive-tags moves the tag from leaf 1's AMIs to leaf 2's.
    assert!(run(&["set-exclusive-tags", "Latest", "yes", p1]).status.success());
    assert!(run(&["set-exclusive-tags", "Latest", "yes", p2]).status.success());
    for (a, b) in r1.targets.iter().zip(&r2.targets) {
        let t1 = image_tags(&world, &a.region, a.ami_id.as_deref().unwrap()).await.unwrap();
        let t2 = image_tags(&world, &b.region, b.ami_id.as_deref().unwrap()).await.unwrap();
        assert!(!t1.iter().any(|(k, _)| k == "Latest"), "{t1:?}");
        assert!(t2.contains(&("Latest".into(), "yes".into())), "{t2:?}");
    }
    assert!(run(&["delete-tags", "Latest", p2]).status.success());
    let t2 = image_tags(&world, &r2.targets[0].region, r2.targets[0].ami_id.as_deref().unwrap()).await.unwrap();
    assert!(!t2.iter().any(|(k, _)| k == "Latest"), "{t2:?}");

    // expire: a dry run changes nothing; then leaf 1 (expired) goes with its
    // snapshots, leaf 2 (no ExpiresAt) stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dry = records(&json_of(&run(&["--json", "--dry-run", "expire"])));
    assert!(dry.iter().any(|a| a["action"] == "would deregister"), "{dry:?}");
    for a in &r1.targets {
        assert!(image_tags(&world, &a.region, a.ami_id.as_deref().unwrap()).await.is_some(), "dry run deleted");
    }
    let done = records(&json_of(&run(&["--json", "expire"])));
    assert!(done.iter().any(|a| a["action"] == "deregister"), "{done:?}");
    for (a, b) in r1.targets.iter().zip(&r2.targets) {
        assert!(image_tags(&world, &a.region, a.ami_id.as_deref().unwrap()).await.is_none(), "leaf 1 expired");
        assert!(!snapshot_exists(&world, &a.region, a.snapshot_id.as_deref().unwrap()).await);
        assert!(image_tags(&world, &b.region, b.ami_id.as_deref().unwrap()).await.is_some(), "leaf 2 kept");
        assert!(snapshot_exists(&world, &b.region, b.snapshot_id.as_deref().unwrap()).await);
    }

    // stop-idle-unpackers: target 0 was just used (add-volumes), target 1
    // has been idle; only target 1 is stopped, and quietly nothing when
    // nothing is idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = with_targets(&targets[..1], &[]);
    let added = records(&json_of(&p.run(&[&t0[..], &["--json", "add-volumes", "1"]].concat())));
    assert_eq!(added.len(), 1, "{added:?}");
    let quiet = run(&["stop-idle-unpackers", "--max-idle-time", "1h"]);
    assert!(quiet.status.success() && quiet.stdout.is_empty(), "{}", String::from_utf8_lossy(&quiet.stdout));
    let stopped = records(&json_of(&run(&["--json", "stop-idle-unpackers", "--max-idle-time", "3s"])));
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["resource"], world.targets[1].instance_id);
    assert_eq!(instance_state(&world, 0).await, "running");
    // EC2 answers StopInstances with the instance stopping.
    let state = instance_state(&world, 1).await;
    assert!(state == "stopping" || state == "stopped", "{state}");
    // A later publish starts it again (once it has stopped).
    add_image(&world, stream, "3", &disk(8 * MIB, 3)).await;
    let (code, r3) = p.publish(stream, "3", &with_targets(&targets[1..], &[]));
    assert_eq!(code, 0, "{r3:#?}");
    assert_eq!(instance_state(&world, 1).await, "running");

    // remove-unused-volumes deletes the added volume, not the stream's.
    let vol = added[0]["resource"].as_str().unwrap().to_owned();
    let removed = records(&json_of(&p.run(&[&t0[..], &["--json", "remove-unused-volumes"]].concat())));
    assert_eq!(removed.len(), 1, "{removed:?}");
    let ec2 = world.ec2("first", &world.targets[0].region).await;
    let vols = ec2.describe_volumes().send().await.unwrap();
    assert!(!vols.volumes().iter().any(|v| v.volume_id() == Some(vol.as_str())), "unused volume deleted");
    let stream_vol = result(&r2, &world, 0).volume_id.as_deref();
    assert!(vols.volumes().iter().any(|v| v.volume_id() == stream_vol), "stream volume kept");

    // Tags on unpackers.
    assert!(run(&["--tags", "Owner=ops", "set-tags-on-unpackers"]).status.success());
    let has_owner = |i: usize| {
        let w = &world;
        async move {
            let t = &w.targets[i];
            let ec2 = w.ec2(&t.account, &t.region).await;
            let d = ec2.describe_instances().instance_ids(&t.instance_id).send().await.unwrap();
            d.reservations()[0].instances()[0].tags().iter().any(|t| t.key() == Some("Owner"))
        }
    };
    assert!(has_owner(0).await && has_owner(1).await);
    assert!(run(&["delete-tags-on-unpackers", "Owner"]).status.success());
    assert!(!has_owner(0).await && !has_owner(1).await);

    // import-key-pair, twice.
    let key = world.path("id.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC9gjqfkoSvFBNXgqdj0ACD4TpQRPYO0hxKQQCiv0Yrq ops@example\n",
    )
    .unwrap();
    let first = records(&json_of(&run(&["--json", "import-key-pair", "ops", key.to_str().unwrap()])));
    assert_eq!(first.len(), 2, "one row per target: {first:?}");
    assert!(first.iter().all(|a| a["action"] == "import"), "{first:?}");
    let again = records(&json_of(&run(&["--json", "import-key-pair", "ops", key.to_str().unwrap()])));
    assert_eq!(again.len(), 2, "one row per target: {again:?}");
    assert!(again.iter().all(|a| a["action"] == "kept"), "{again:?}");
    let kp = ec2.describe_key_pairs().filters(Filter::builder().name("key-name").values("ops").build()).send();
    assert_eq!(kp.await.unwrap().key_pairs().len(), 1);

    // delete (dry run, then for real) and terminate-instances --dry-run.
    assert!(run(&["--dry-run", "delete", p2]).status.success());
    assert!(image_tags(&world, &r2.targets[0].region, r2.targets[0].ami_id.as_deref().unwrap()).await.is_some());
    assert!(run(&["delete", p2]).status.success());
    for b in &r2.targets {
        assert!(image_tags(&world, &b.region, b.ami_id.as_deref().unwrap()).await.is_none());
        assert!(!snapshot_exists(&world, &b.region, b.snapshot_id.as_deref().unwrap()).await);
    }
    let dry = records(&json_of(&run(&["--json", "--dry-run", "terminate-instances"])));
    assert_eq!(dry.len(), 2);
    assert_eq!(instance_state(&world, 0).await, "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_usage_and_launching_instances() {
    let world = World::start(&Plan::of(&["second"], &["us-west-2"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "apps/api";
    add_image(&world, stream, "1", &disk(4 * MIB, 5)).await;
    let (code, r1) = p.publish(stream, "1", &with_targets(&targets, &[]));
    assert_eq!(code, 0);
    let ami = r1.targets[0].ami_id.clone().unwrap();
    let rpath = world.path("r1.json");
    ami_publisher::results::write_json_atomic(&rpath, &r1).unwrap();
    let named = with_targets(&targets, &["--instance-name", "image-test"]);
    let run = |extra: &[&str]| p.run(&[&named[..], extra].concat());

    // start-instances starts a stopped unpacker; prepare-unpackers readies the stream.
    let ec2 = world.ec2("second", "us-west-2").await;
    ec2.stop_instances().instance_ids(&world.targets[0].instance_id).send().await.unwrap();
    let plain = with_targets(&targets, &[]);
    let started = records(&json_of(&p.run(&[&plain[..], &["--json", "start-instances"]].concat())));
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(instance_state(&world, 0).await, "running");
    let prepared = records(&json_of(&p.run(&[&plain[..], &["--json", "prepare-unpackers", stream]].concat())));
    assert_eq!(prepared[0]["stream"], "prepared", "{prepared:?}");

    let unused = records(&json_of(&run(&["--json", "list-unused-images", "--search-tags", "ImageStream=apps/api"])));
    assert_eq!(unused.len(), 1);
    assert_eq!(unused[0]["ami"], ami.as_str());
    // --min-image-age hides images younger than that.
    let young = records(&json_of(&run(&["--json", "list-unused-images", "--min-image-age", "1d"])));
    assert!(young.is_empty(), "{young:?}");

    // Launch an instance from the published AMI in the VPC tagged for it;
    // its results name it.
    ec2.create_tags()
        .resources(&world.targets[0].vpc_id)
        .tags(aws_sdk_ec2::types::Tag::builder().key("Purpose").value("images").build())
        .send()
        .await
        .unwrap();
    let inst_results = world.path("instances.json");
    let user_data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/image-unpacker-user-data.sh");
    let out = run(&[
        "--results",
        inst_results.to_str().unwrap(),
        "launch-instances-for-images",
        "--vpc-search-tags",
        "Purpose=images",
        "--user-data",
        user_data.to_str().unwrap(),
        rpath.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let launched: Value = serde_json::from_slice(&std::fs::read(&inst_results).unwrap()).unwrap();
    let launched = records(&launched);
    assert_eq!(launched.len(), 1, "{launched:?}");
    let instance = launched[0]["instance"].as_str().unwrap().to_owned();
    assert!(launched[0]["private_ip"].as_str().is_some_and(|ip| ip.starts_with("127.")), "{launched:?}");
    // The instance carries the unpacker user data, byte for byte.
    let attr = ec2
        .describe_instance_attribute()
        .instance_id(&instance)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let given = attr.user_data().and_then(|u| u.value()).expect("user data on the instance");
    let given = aws_smithy_types::base64::decode(given).unwrap();
    assert_eq!(given, std::fs::read(&user_data).unwrap());

    let csv = world.path("old.csv");
    let used = records(&json_of(&run(&[
        "--json",
        "list-used-images",
        "--search-tags",
        "ImageStream=apps/api",
        "--old-image-instances-csv",
        csv.to_str().unwrap(),
    ])));
    assert_eq!(used.len(), 1);
    assert!(used[0]["instances"].as_str().unwrap().contains(&instance));
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert!(csv.starts_with("account,region,ami,name,created,instances\n") && csv.contains(&instance), "{csv}");
    // A used image is not deleted.
    let none = records(&json_of(&run(&["--json", "delete-unused-images", "--search-tags", "ImageStream=apps/api"])));
    assert!(none.is_empty(), "{none:?}");

    // The instance profile reaches RunInstances: one that does not exist
    // fails the target, names the profile, and launches nothing.
    let live = || async {
        let f = Filter::builder().name("instance-state-name").values("pending").values("running").build();
        let out = ec2.describe_instances().filters(f).send().await.unwrap();
        out.reservations().iter().map(|r| r.instances().len()).sum::<usize>()
    };
    let before = live().await;
    let out = run(&["--json", "launch-instances", stream, "--iam-instance-profile", "NoSuchUnpackerProfile"]);
    assert_eq!(out.status.code(), Some(1));
    let failed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = failed[0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("NoSuchUnpackerProfile"), "{failed}");
    assert_eq!(live().await, before, "nothing launched");

    // launch-instances by stream with --replace-instances: the old one goes.
    let again = records(&json_of(&run(&["--json", "launch-instances", stream, "--replace-instances"])));
    assert!(again.iter().any(|a| a["action"] == "terminate" && a["resource"] == instance.as_str()), "{again:?}");
    let newer = again.iter().find(|a| a["action"] == "launched").unwrap()["instance"].as_str().unwrap().to_owned();
    assert!(run(&["terminate-instances"]).status.success());
    let d = ec2.describe_instances().instance_ids(&newer).send().await.unwrap();
    let state = d.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_owned();
    assert!(state == "terminated" || state == "shutting-down", "{state}");

    // Now unused: a dry run keeps it, the real run deletes AMI and snapshot.
    let dry = records(&json_of(&run(&[
        "--json",
        "--dry-run",
        "delete-unused-images",
        "--search-tags",
        "ImageStream=apps/api",
    ])));
    assert!(dry.iter().any(|a| a["action"] == "would deregister"), "{dry:?}");
    let imgs = ec2.describe_images().image_ids(&ami).send().await.unwrap();
    assert_eq!(imgs.images().len(), 1);
    assert!(run(&["delete-unused-images", "--search-tags", "ImageStream=apps/api"]).status.success());
    let imgs = ec2.describe_images().owners("self").send().await.unwrap();
    assert!(!imgs.images().iter().any(|i| i.image_id() == Some(ami.as_str())), "deleted");
}

/// The root snapshot of an AMI, as the emulator describes it.
async fn root_snapshot(ec2: &aws_sdk_ec2::Client, img: &aws_sdk_ec2::types::Image) -> aws_sdk_ec2::types::Snapshot {
    let root = img.root_device_name().unwrap();
    let m = img.block_device_mappings().iter().find(|m| m.device_name() == Some(root)).expect("a root mapping");
    let id = m.ebs().and_then(|e| e.snapshot_id()).expect("a root snapshot");
    ec2.describe_snapshots().snapshot_ids(id).send().await.unwrap().snapshots()[0].clone()
}

/// From one published AMI to every target: across a region within the
/// account (CopyImage) and into another account (shared snapshot copied and
/// re-encrypted, then registered); the share ends with the copy.
#[tokio::test(flavor = "multi_thread")]
async fn copy_bootstrap_image_fills_the_targets_without_one() {
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1", "eu-west-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "boot/unpacker";
    let image = add_image(&world, stream, "1", &disk(4 * MIB, 9)).await;
    // A UEFI image with its variable store, which a copy must carry.
    let uefi = world.path("vars.b64");
    std::fs::write(&uefi, "dmFycw==\n").unwrap();
    let boot = ["--boot-mode", "uefi", "--tpm-support", "v2.0", "--uefi-data", uefi.to_str().unwrap()];
    // Under a customer managed key the second account may use: EC2 shares no
    // snapshot encrypted with the AWS managed key.
    let second_id = world.targets.iter().find(|t| t.account == "second").unwrap().account_id.clone();
    let key = customer_key(&world, "first", "us-east-1", "alias/boot", &[&second_id]).await;
    let source_args = [&["--targets", "first,us-east-1", "--kms-key-id", key.as_str()][..], &boot[..]].concat();
    let (code, r) = p.publish(stream, "1", &source_args);
    assert_eq!(code, 0);
    let source = r.targets[0].ami_id.clone().unwrap();
    let source_snap = r.targets[0].snapshot_id.clone().unwrap();
    let all = with_targets(&targets, &[]);
    let run = |extra: &[&str]| p.run(&[&all[..], extra].concat());
    let images = |account: &'static str, region: &'static str| {
        let w = &world;
        async move {
            let ec2 = w.ec2(account, region).await;
            let f = Filter::builder().name("tag:ImageStream").values(stream).build();
            ec2.describe_images().owners("self").filters(f).send().await.unwrap().images().to_vec()
        }
    };
    // The published AMI is made of the snapshot that holds the image.
    let home = world.ec2("first", "us-east-1").await;
    let src_img = images("first", "us-east-1").await;
    assert_eq!(src_img.len(), 1);
    assert_eq!(root_snapshot(&home, &src_img[0]).await.snapshot_id(), Some(source_snap.as_str()));
    assert_snapshot_holds(&world, &source_snap, &image).await;

    let life = ["--deprecate-in", "7d", "--deregistration-protection"];
    let dry = records(&json_of(&run(&[&["--json", "--dry-run", "copy-bootstrap-image", stream][..], &life].concat())));
    assert_eq!(dry.iter().filter(|a| a["action"] == "would copy").count(), 3, "{dry:?}");
    assert_eq!(dry.iter().filter(|a| a["action"] == "would give").count(), 3, "{dry:?}");
    assert!(images("first", "eu-west-1").await.is_empty(), "a dry run copies nothing");
    assert!(images("second", "us-east-1").await.is_empty(), "a dry run copies nothing");

    let done = records(&json_of(&run(&[&["--json", "copy-bootstrap-image", stream][..], &life].concat())));
    assert_eq!(done.iter().filter(|a| a["action"] == "copy").count(), 3, "{done:?}");
    assert_eq!(done.iter().filter(|a| a["action"] == "give").count(), 3, "{done:?}");
    let second_id = world.targets.iter().find(|t| t.account == "second").unwrap().account_id.clone();
    for (account, region) in [("first", "eu-west-1"), ("second", "us-east-1"), ("second", "eu-west-1")] {
        let imgs = images(account, region).await;
        assert_eq!(imgs.len(), 1, "{account},{region}");
        let img = &imgs[0];
        let tags: Vec<(String, String)> =
            img.tags().iter().map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned())).collect();
        assert!(tags.contains(&("ImageLeaf".into(), "1".into())), "{tags:?}");
        assert!(tags.contains(&("CopiedFrom".into(), format!("us-east-1/{source}"))), "{tags:?}");
        assert_eq!(img.name(), src_img[0].name());
        assert_eq!(img.architecture(), src_img[0].architecture());
        assert_eq!(img.boot_mode().map(|m| m.as_str()), Some("uefi"), "{account},{region}");
        assert_eq!(img.tpm_support().map(|m| m.as_str()), Some("v2.0"), "{account},{region}");
        assert!(img.deprecation_time().is_some(), "{account},{region}: the copy is deprecated as asked");
        assert_eq!(img.deregistration_protection(), Some("enabled-without-cooldown"), "{account},{region}");
        let vars = world
            .ec2(account, region)
            .await
            .describe_image_attribute()
            .image_id(img.image_id().unwrap())
            .attribute(aws_sdk_ec2::types::ImageAttributeName::UefiData)
            .send()
            .await
            .unwrap();
        assert_eq!(vars.uefi_data().and_then(|v| v.value()), Some("dmFycw=="), "{account},{region}");
        // Its own snapshot, encrypted, in the target's account.
        let ec2 = world.ec2(account, region).await;
        let snap = root_snapshot(&ec2, img).await;
        assert_ne!(snap.snapshot_id(), Some(source_snap.as_str()), "{account},{region}");
        assert_eq!(snap.encrypted(), Some(true), "{account},{region}");
        // ... tagged as the AMI is, so that it is found and counted by stream.
        let snap_tags: Vec<(&str, &str)> =
            snap.tags().iter().map(|t| (t.key().unwrap_or(""), t.value().unwrap_or(""))).collect();
        assert!(snap_tags.contains(&("ImageStream", stream)), "{account},{region}: {snap_tags:?}");
        assert!(snap_tags.contains(&("ImageLeaf", "1")), "{account},{region}: {snap_tags:?}");
        // ... holding the image's bytes.
        assert_snapshot_holds(&world, snap.snapshot_id().unwrap(), &image).await;
        if account == "second" {
            assert_eq!(snap.owner_id(), Some(second_id.as_str()));
        }
    }
    // Nothing stays shared with the other account.
    let perms = home
        .describe_snapshot_attribute()
        .snapshot_id(&source_snap)
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .unwrap();
    assert!(perms.create_volume_permissions().is_empty(), "{perms:?}");

    // A copy that lacks what it was to be given (a run that stopped after
    // the copy) gets it on the next run; what has it is left alone.
    let lacking = images("second", "eu-west-1").await[0].image_id().unwrap().to_owned();
    let second_eu = world.ec2("second", "eu-west-1").await;
    second_eu.disable_image_deregistration_protection().image_id(&lacking).send().await.unwrap();
    let given = records(&json_of(&run(&[&["--json", "copy-bootstrap-image", stream][..], &life].concat())));
    let gives: Vec<&Value> = given.iter().filter(|a| a["action"] == "give").collect();
    assert_eq!(gives.len(), 1, "{given:?}");
    assert_eq!(gives[0]["resource"], lacking.as_str());
    let img = &images("second", "eu-west-1").await[0];
    assert_eq!(img.deregistration_protection(), Some("enabled-without-cooldown"));

    // A re-run is a no-op.
    let again = records(&json_of(&run(&["--json", "copy-bootstrap-image", stream])));
    assert_eq!(again.len(), done.len() - 3, "a row for each target, as before less the 3 gives: {again:?}");
    assert!(again.iter().all(|a| a["action"] == "kept"), "{again:?}");
    assert_eq!(images("second", "eu-west-1").await.len(), 1);
}

/// Every argument an operation takes is checked before any AWS call: a bad
/// one exits 2 naming it, and the emulator counts no call of the tool.
#[tokio::test(flavor = "multi_thread")]
async fn operations_refuse_bad_arguments_before_any_aws_call() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let not_a_key = world.path("not-a-key.pub");
    std::fs::write(&not_a_key, "hello\n").unwrap();
    let missing = world.path("missing");
    let no_dir = world.path("no-such-dir/out.csv");
    let (not_a_key, missing, no_dir) =
        (not_a_key.to_str().unwrap(), missing.to_str().unwrap(), no_dir.to_str().unwrap());
    let long_description = "{stream}".repeat(50);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["add-volumes", "0"], "invalid value '0' for '<SIZE_GIB>'"),
        (vec!["add-volumes", "16385"], "invalid value '16385' for '<SIZE_GIB>'"),
        (vec!["import-key-pair", "fleet", missing], "reading public key"),
        (vec!["import-key-pair", "fleet", not_a_key], "does not look like an OpenSSH public key"),
        (vec!["launch-instances", "--user-data", missing, "base/x"], "reading --user-data"),
        (vec!["set-tags-on-unpackers"], "give the tags to set with --tags"),
        (vec!["--results", no_dir, "launch-instances", "base/x"], "cannot be written"),
        (vec!["list-unused-images", "--unused-images-csv", no_dir], "cannot be written"),
        (vec!["list-used-images", "--old-image-instances-csv", no_dir], "cannot be written"),
        (vec!["delete", missing], "missing"),
        (vec!["stop-idle-unpackers", "--max-idle-time", "soon"], "--max-idle-time"),
        (vec!["--unpacker-timeout", "5 parsecs", "list-unpackers"], "--unpacker-timeout"),
        (vec!["share", missing, "--share-with-accounts", "12345"], "'12345' is not an AWS account id"),
        (vec!["share", missing, "--share-with-organizations", "o-abc"], "'o-abc' is not an organization ARN"),
        (vec!["share", missing, "--share-with-ous", "ou-ab12-cd34ef56"], "is not an OU ARN"),
        (vec!["share", missing], "share with whom?"),
        (vec!["share", "--public", missing], "give --allow-public-image as well"),
        (vec!["unshare", "--public", "--allow-public-image", missing], "cannot make an AMI with encrypted"),
        (vec!["publish", "--public", "base/x", "1"], "give --allow-public-image as well"),
        (vec!["publish", "--tpm-support", "v2.0", "base/x", "1"], "--tpm-support needs --boot-mode uefi"),
        (vec!["publish", "--tpm-support", "v1.2", "base/x", "1"], "invalid value 'v1.2' for '--tpm-support"),
        (vec!["publish", "--uefi-data", missing, "base/x", "1"], "--uefi-data needs --boot-mode uefi"),
        (vec!["publish", "--boot-mode", "uefi", "--uefi-data", missing, "base/x", "1"], "reading --uefi-data"),
        (vec!["publish", "--boot-mode", "uefi", "--uefi-data", not_a_key, "base/x", "1"], "not base64 text"),
        (vec!["publish", "--description", &long_description, "base/x", "1"], "EC2 takes at most 255"),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = ["--targets", "first,*"].iter().copied().chain(args.iter().copied()).collect();
        let out = p.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
    // `first,*` would have asked DescribeRegions.
    assert_eq!(world.api_calls("ami-publisher"), Default::default(), "refused arguments made AWS calls");
}

/// An AMI, and a volume, that someone else made (no ManagedBy), each
/// tagged as expired long ago; made with the world's own client, which
/// neither faults nor IAM touch.
async fn foreign_expired(world: &World) -> (aws_sdk_ec2::Client, String, String) {
    let ec2 = world.ec2("first", "us-east-1").await;
    let tags = [("ImageStream", "s/foreign"), ("ImageLeaf", "1"), ("ExpiresAt", "2001-01-01T00:00:00Z")];
    let ami = register_by_hand(&ec2, "us-east-1a", "someone-elses", &tags).await;
    let expired = aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(aws_sdk_ec2::types::ResourceType::Volume)
        .tags(aws_sdk_ec2::types::Tag::builder().key("ExpiresAt").value("2001-01-01T00:00:00Z").build())
        .build();
    let vol = ec2.create_volume().availability_zone("us-east-1a").size(1).tag_specifications(expired).send().await;
    let vol = vol.unwrap().volume_id().unwrap().to_owned();
    (ec2, ami, vol)
}

/// With the shipped IAM policy enforced in the world (the default),
/// `delete-unused-images` (a broad search), `delete` (a results file
/// edited by hand) and `terminate-instances` (the world's unpackers, which
/// ami-publisher did not launch) pointed at what ami-publisher did not make
/// are refused by EC2, say why, and leave it.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_tool_did_not_make_is_refused_by_iam_and_left_alone() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let (ec2, foreign, _) = foreign_expired(&world).await;
    let still_there = || async {
        let out = ec2.describe_images().image_ids(&foreign).send().await.unwrap();
        out.images().len() == 1
    };
    let refused = |out: std::process::Output, what: &str, resource: &str| {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{what}: {text}");
        assert!(text.contains("UnauthorizedOperation") && text.contains(resource), "{what}: {text}");
        assert!(text.contains("was not made by ami-publisher"), "{what}: {text}");
        let cause = format!("likely cause: {resource} does not carry the tag ManagedBy=ami-fleet");
        assert!(text.contains(&cause), "{what}: {text}");
    };
    let search = ["--targets", "first,us-east-1", "delete-unused-images", "--search-tags", "ImageStream=s/foreign"];
    refused(p.run(&search), "delete-unused-images", &foreign);
    assert!(still_there().await, "delete-unused-images left it");

    let unpacker = world.targets[0].instance_id.clone();
    refused(p.run(&["--targets", "first,us-east-1", "terminate-instances"]), "terminate-instances", &unpacker);
    let d = ec2.describe_instances().instance_ids(&unpacker).send().await.unwrap();
    let state = d.reservations()[0].instances()[0].state().and_then(|s| s.name()).map(|n| n.as_str().to_owned());
    assert_eq!(state.as_deref(), Some("running"));

    // A results file of a real publish, edited to name the foreign AMI.
    add_image(&world, "s/mine", "1", &disk(4 * MIB, 5)).await;
    let (code, r) = p.publish("s/mine", "1", &["--targets", "first,us-east-1"]);
    assert_eq!(code, 0, "{r:#?}");
    let mine = r.targets[0].ami_id.clone().unwrap();
    let edited = world.path("edited.json");
    let text = serde_json::to_string(&r).unwrap().replace(&mine, &foreign);
    std::fs::write(&edited, text).unwrap();
    refused(p.run(&["delete", edited.to_str().unwrap()]), "delete", &foreign);
    assert!(still_there().await, "delete left it");
}

/// `expire` acts only on what ami-publisher made: an expired AMI and
/// volume without ManagedBy=ami-fleet are listed as kept and left, whether
/// or not IAM would refuse them (here it is off), and the run succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn expire_leaves_what_the_tool_did_not_make_even_where_iam_would_allow_it() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"]).iam("off")).await.unwrap();
    let p = Publisher::new(&world);
    let (ec2, ami, vol) = foreign_expired(&world).await;
    let out = p.run(&["--targets", "first,us-east-1", "--json", "expire"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = records(&json_of(&out));
    for id in [&ami, &vol] {
        let row = rows.iter().find(|r| r["resource"] == id.as_str()).unwrap_or_else(|| panic!("{id}: {rows:?}"));
        assert_eq!(row["action"], "kept", "{row}");
        assert!(row["detail"].as_str().unwrap().contains("not made by ami-publisher"), "{row}");
    }
    assert_eq!(ec2.describe_images().image_ids(&ami).send().await.unwrap().images().len(), 1);
    assert_eq!(ec2.describe_volumes().volume_ids(&vol).send().await.unwrap().volumes().len(), 1);
}
/// A snapshot of this tool's that ended in `error` backs nothing: `expire`
/// deletes it (after a dry run that only says so); one that is not the
/// tool's is left alone.
#[tokio::test(flavor = "multi_thread")]
async fn expire_deletes_the_tools_snapshots_that_ended_in_error() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let t = &world.targets[0];
    // Started and completed wrongly (a block count it did not write), as
    // the tool (its tag) and as someone else.
    let failed = |ebs: aws_sdk_ebs::Client, tagged: bool| async move {
        let mut start = ebs.start_snapshot().volume_size(1).encrypted(true).client_token(format!("failed-{tagged}"));
        if tagged {
            start = start.tags(aws_sdk_ebs::types::Tag::builder().key("ManagedBy").value("ami-fleet").build());
        }
        let id = start.send().await.unwrap().snapshot_id().unwrap().to_owned();
        once_known(|| ebs.complete_snapshot().snapshot_id(&id).changed_blocks_count(3).send()).await;
        id
    };
    let ours = failed(tool_ebs(&world, &t.account, &t.region).await, true).await;
    let theirs = failed(aws_sdk_ebs::Client::new(&world.sdk_config(&t.account, &t.region).await), false).await;
    let ec2 = world.ec2(&t.account, &t.region).await;
    let state = |id: String| {
        let ec2 = ec2.clone();
        async move {
            let found = ec2.describe_snapshots().snapshot_ids(&id).send().await;
            found.ok().and_then(|f| f.snapshots().first().and_then(|s| s.state().map(|s| s.as_str().to_owned())))
        }
    };
    assert_eq!(state(ours.clone()).await.as_deref(), Some("error"));

    let planned = records(&json_of(&p.run(&["--targets", "first,us-east-1", "--json", "--dry-run", "expire"])));
    let row = planned.iter().find(|r| r["resource"] == ours.as_str()).unwrap_or_else(|| panic!("{planned:?}"));
    assert_eq!(row["action"], "would delete", "{row}");
    assert!(row["detail"].as_str().unwrap().contains("ended in error"), "{row}");
    assert_eq!(state(ours.clone()).await.as_deref(), Some("error"), "a dry run deletes nothing");

    let done = records(&json_of(&p.run(&["--targets", "first,us-east-1", "--json", "expire"])));
    assert!(done.iter().any(|r| r["resource"] == ours.as_str() && r["action"] == "delete"), "{done:?}");
    assert!(!done.iter().any(|r| r["resource"] == theirs.as_str()), "{done:?}");
    assert_eq!(state(ours).await, None, "deleted");
    assert_eq!(state(theirs).await.as_deref(), Some("error"), "not the tool's: left alone");
}

/// `ami-publisher iam-policy` prints the policy deploy/ ships (with the
/// default options), as JSON, without any AWS call or configuration.
#[test]
fn the_printed_iam_policy_is_the_one_in_deploy() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ami-publisher"))
        .arg("iam-policy")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ami-publisher-iam-policy.json");
    let shipped: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(printed, shipped);
    let other = std::process::Command::new(env!("CARGO_BIN_EXE_ami-publisher"))
        .args(["--instance-name", "Unpacker2", "iam-policy"])
        .output()
        .unwrap();
    let other: Value = serde_json::from_slice(&other.stdout).unwrap();
    assert!(other.to_string().contains("\"aws:ResourceTag/Name\":\"Unpacker2\""), "{other}");
}

/// The grantees an AMI's launch permission names, as its owner sees them.
async fn launch_permissions(ec2: &aws_sdk_ec2::Client, ami: &str) -> Vec<String> {
    let out = ec2
        .describe_image_attribute()
        .image_id(ami)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap();
    let mut v: Vec<String> = out
        .launch_permissions()
        .iter()
        .map(|p| {
            p.user_id()
                .or(p.organization_arn())
                .or(p.organizational_unit_arn())
                .or(p.group().map(|g| g.as_str()))
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    v.sort();
    v
}

/// The accounts a snapshot's createVolumePermission names.
async fn volume_permissions(ec2: &aws_sdk_ec2::Client, snapshot: &str) -> Vec<String> {
    let out = ec2
        .describe_snapshot_attribute()
        .snapshot_id(snapshot)
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .unwrap();
    out.create_volume_permissions().iter().filter_map(|p| p.user_id().map(str::to_owned)).collect()
}

/// Issue 20: publish shares each target's AMI with the consumer account (and
/// an organization), encrypted with each target's own customer managed key
/// (`[kms-keys]` in the config file). Sharing under the AWS managed key,
/// or under a key whose policy does not let the consumer use it, is refused
/// before anything is made. The consumer then sees, launches and copies
/// the AMIs. A re-run changes nothing; `share` of what is shared changes
/// nothing; `unshare` takes back exactly what the results file says was
/// given, leaving a permission someone else gave, after which the consumer
/// can neither see nor launch the AMIs.
#[tokio::test(flavor = "multi_thread")]
async fn shared_amis_are_used_by_the_consumer_and_unshare_takes_back_exactly_that() {
    use local_world::{CONSUMER, CONSUMER_ACCOUNT_ID};
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "base/shared";
    add_image(&world, stream, "1", &disk(4 * MIB, 20)).await;
    let org = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
    let share = ["--share-with-accounts", CONSUMER_ACCOUNT_ID, "--share-with-organizations", org];
    let publish_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["publish", stream, "1"].iter().map(|s| (*s).to_owned()).collect();
        v.extend(with_targets(&targets, &share).iter().map(|s| (*s).to_owned()));
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let refused = |extra: &[&str], want: &str| {
        let before = mark(&world);
        let args = publish_args(extra);
        let out = p.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "expected '{want}' in: {err}");
        assert!(err.contains("nothing was made"), "{err}");
        assert_eq!(writes_since(&world, &before), Vec::<String>::new(), "a refused publish changed things");
        err
    };

    // Under each account's default key (aws/ebs): refused, nothing made.
    refused(&[], "AWS managed key alias/aws/ebs");
    // Each target its own key; the second's policy does not let the consumer in.
    let first_key = customer_key(&world, "first", "us-east-1", "alias/ami-shared", &[CONSUMER_ACCOUNT_ID]).await;
    let second_key = customer_key(&world, "second", "us-east-1", "alias/ami-other", &[]).await;
    let config = world.path("keys.toml");
    std::fs::write(
        &config,
        format!("[kms-keys]\n\"first,us-east-1\" = \"alias/ami-shared\"\n\"second,*\" = \"{second_key}\"\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let err = refused(&["--config", config], &format!("does not let account(s) {CONSUMER_ACCOUNT_ID} use the key"));
    assert!(err.contains("second,us-east-1") && !err.contains("first,us-east-1:"), "only the second's key: {err}");
    let second_id = world.targets.iter().find(|t| t.account == "second").unwrap().account_id.clone();
    aws_sdk_kms::Client::new(&world.sdk_config("second", "us-east-1").await)
        .put_key_policy()
        .key_id(&second_key)
        .policy_name("default")
        .policy(key_policy(&second_id, &[CONSUMER_ACCOUNT_ID]))
        .send()
        .await
        .unwrap();

    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &[&share[..], &["--config", config]].concat()));
    assert_eq!(code, 0);
    for t in &r.targets {
        assert_eq!(t.shared_with.accounts, [CONSUMER_ACCOUNT_ID], "{t:?}");
        assert_eq!(t.shared_with.organizations, [org], "{t:?}");
        let owner = world.ec2(&t.account, &t.region).await;
        let (ami, snap) = (t.ami_id.as_deref().unwrap(), t.snapshot_id.as_deref().unwrap());
        // The target's own key is on its volume and its snapshot.
        let key = if t.account == "first" { &first_key } else { &second_key };
        assert_eq!(t.kms_key.as_ref(), Some(key), "{t:?}");
        let v = owner.describe_volumes().volume_ids(t.volume_id.as_deref().unwrap()).send().await.unwrap();
        assert_eq!(v.volumes()[0].kms_key_id(), Some(key.as_str()), "{t:?}");
        let s = owner.describe_snapshots().snapshot_ids(snap).send().await.unwrap();
        assert_eq!(s.snapshots()[0].kms_key_id(), Some(key.as_str()), "{t:?}");
        let mut want = vec![CONSUMER_ACCOUNT_ID.to_owned(), org.to_owned()];
        want.sort();
        assert_eq!(launch_permissions(&owner, ami).await, want);
        assert_eq!(volume_permissions(&owner, snap).await, [CONSUMER_ACCOUNT_ID]);
    }

    // The consumer sees both AMIs, launches one and copies the other.
    let consumer = world.ec2(CONSUMER, "us-east-1").await;
    let amis: Vec<String> = r.targets.iter().map(|t| t.ami_id.clone().unwrap()).collect();
    let seen = consumer.describe_images().executable_users("self").send().await.unwrap();
    let mut seen: Vec<&str> = seen.images().iter().filter_map(|i| i.image_id()).collect();
    seen.sort_unstable();
    let mut want: Vec<&str> = amis.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(seen, want, "the consumer sees exactly the AMIs shared with it");
    let subnet = consumer.describe_subnets().send().await.unwrap().subnets()[0].subnet_id().unwrap().to_owned();
    let launched = consumer
        .run_instances()
        .image_id(&amis[0])
        .min_count(1)
        .max_count(1)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .subnet_id(&subnet)
        .send()
        .await
        .unwrap();
    assert_eq!(launched.instances()[0].image_id(), Some(amis[0].as_str()));
    let copy = consumer
        .copy_image()
        .source_image_id(&amis[1])
        .source_region("us-east-1")
        .name("consumer's copy")
        .encrypted(true)
        .send()
        .await
        .unwrap();
    let copied = consumer.describe_images().image_ids(copy.image_id().unwrap()).send().await.unwrap();
    assert_eq!(copied.images()[0].owner_id(), Some(CONSUMER_ACCOUNT_ID), "the copy is the consumer's own");

    // A re-run and `share` of what is shared change nothing; a dry run neither.
    let before = world.api_calls("ami-publisher");
    let (code, again) = p.publish(stream, "1", &with_targets(&targets, &[&share[..], &["--config", config]].concat()));
    assert_eq!(code, 0);
    assert!(again.targets.iter().all(|t| t.reused), "{again:?}");
    let results = world.path("shared-results.json");
    ami_publisher::results::write_json_atomic(&results, &r).unwrap();
    let results = results.to_str().unwrap();
    let kept = records(&json_of(&p.run(&[&["--json", "share", results][..], &share[..]].concat())));
    assert_eq!(kept.len(), 6, "2 AMIs x (snapshot, account, organization): {kept:?}");
    assert!(kept.iter().all(|a| a["action"] == "shared already"), "{kept:?}");
    let after = world.api_calls("ami-publisher");
    for action in ["ModifyImageAttribute", "ModifySnapshotAttribute"] {
        assert_eq!(after.get(action), before.get(action), "{action} called though all was shared");
    }

    // Someone else shares the first AMI with another account too.
    let other = "333333333333";
    let home = world.ec2("first", "us-east-1").await;
    home.modify_image_attribute()
        .image_id(&amis[0])
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(aws_sdk_ec2::types::LaunchPermission::builder().user_id(other).build())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let dry = records(&json_of(&p.run(&["--json", "--dry-run", "unshare", results])));
    assert_eq!(dry.iter().filter(|a| a["action"] == "would unshare").count(), 6, "{dry:?}");
    assert_eq!(world.api_calls("ami-publisher").get("ModifyImageAttribute"), before.get("ModifyImageAttribute"));

    let done = records(&json_of(&p.run(&["--json", "unshare", results])));
    assert_eq!(done.iter().filter(|a| a["action"] == "unshare").count(), 6, "{done:?}");
    for t in &r.targets {
        let owner = world.ec2(&t.account, &t.region).await;
        let (ami, snap) = (t.ami_id.as_deref().unwrap(), t.snapshot_id.as_deref().unwrap());
        let left = if t.account == "first" { vec![other.to_owned()] } else { vec![] };
        assert_eq!(launch_permissions(&owner, ami).await, left, "{}: only what was given is taken back", t.account);
        assert!(volume_permissions(&owner, snap).await.is_empty());
    }
    // The consumer no longer sees or launches them.
    let seen = consumer.describe_images().executable_users("self").send().await.unwrap();
    assert!(seen.images().is_empty(), "{seen:?}");
    let refused = consumer
        .run_instances()
        .image_id(&amis[1])
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .send()
        .await
        .unwrap_err();
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused), Some("InvalidAMIID.NotFound"));
    // Again: nothing left to take back.
    let again = records(&json_of(&p.run(&["--json", "unshare", results])));
    assert!(again.iter().all(|a| a["action"] == "not shared"), "{again:?}");

    // `share` with an account the keys' policies do not let in: refused in
    // each target before anything there changes.
    let before = mark(&world);
    let out = p.run(&["--json", "share", results, "--share-with-accounts", other]);
    assert_eq!(out.status.code(), Some(1));
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in reports.as_array().unwrap() {
        let e = r["error"].as_str().unwrap_or_default();
        assert!(e.contains(&format!("does not let account(s) {other} use the key")), "{r}");
        assert!(e.contains("nothing was changed here"), "{r}");
    }
    assert_eq!(writes_since(&world, &before), Vec::<String>::new());
}

/// Issue 20: targets from the world's AWS Organization. `org:*` is every
/// ACTIVE account (a closed one and one that left are not targets), an OU
/// is followed down to the OUs below it, `--skip-targets` removes an
/// account by its id, and each account is reached through the role in it;
/// a publish over an OU makes the AMI in its accounts that have an
/// unpacker, named by account id in the results.
#[tokio::test(flavor = "multi_thread")]
async fn targets_come_from_the_organization() {
    use local_world::{CONSUMER_ACCOUNT_ID, FIRST_ACCOUNT_ID, NESTED_ACCOUNT_ID, SECOND_ACCOUNT_ID};
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1"]).with_organization()).await.unwrap();
    let org = world.organization.clone().unwrap();
    let p = Publisher::new(&world);
    let listed = |targets: &[&str]| {
        let mut args = vec!["--json", "list-unpackers"];
        for t in targets {
            if t.starts_with("--") {
                args.push(t);
            } else {
                args.extend(["--targets", t]);
            }
        }
        let v = json_of(&p.run(&args));
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r["error"].is_null(), "{r}");
                (r["account"].as_str().unwrap().to_owned(), r["records"].as_array().unwrap().len())
            })
            .collect::<Vec<_>>()
    };
    // Every ACTIVE account; the two with unpackers list one each.
    let all = listed(&["org:*,us-east-1"]);
    let want: Vec<(String, usize)> = vec![
        (SECOND_ACCOUNT_ID.to_owned(), 1),
        (FIRST_ACCOUNT_ID.to_owned(), 1),
        (CONSUMER_ACCOUNT_ID.to_owned(), 0),
        (NESTED_ACCOUNT_ID.to_owned(), 0),
    ];
    let mut all_sorted = all.clone();
    all_sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(all_sorted, want_sorted, "closed and departed accounts are not targets");
    // An OU and the OU below it; the root; a skipped account.
    let publishers = format!("org:{},us-east-1", org.ou("publishers"));
    let ids = |v: Vec<(String, usize)>| v.into_iter().map(|(a, _)| a).collect::<Vec<_>>();
    assert_eq!(ids(listed(&[&publishers])), [SECOND_ACCOUNT_ID, NESTED_ACCOUNT_ID]);
    assert_eq!(ids(listed(&[&format!("org:{},us-east-1", org.root_id)])).len(), 4);
    let skip = format!("--skip-targets={NESTED_ACCOUNT_ID},*");
    let skipped = listed(&[&publishers, &skip]);
    assert_eq!(ids(skipped), [SECOND_ACCOUNT_ID]);

    // A publish over the OU: the second account's unpacker makes its AMI.
    add_image(&world, "base/org", "1", &disk(4 * MIB, 21)).await;
    let (code, r) = p.publish("base/org", "1", &["--targets", &publishers, "--ignore-missing-unpackers"]);
    assert_eq!(code, 0, "{r:#?}");
    let by_account: Vec<(&str, bool)> = r.targets.iter().map(|t| (t.account.as_str(), t.skipped)).collect();
    assert_eq!(by_account, [(SECOND_ACCOUNT_ID, false), (NESTED_ACCOUNT_ID, true)]);
    let made = r.targets[0].ami_id.as_deref().unwrap();
    let second = world.ec2("second", "us-east-1").await;
    assert_eq!(second.describe_images().image_ids(made).send().await.unwrap().images().len(), 1);

    // Wrong scopes and role names are refused by name, before any call.
    let before = world.api_calls("ami-publisher");
    for (args, want) in [
        (vec!["--targets", "org:o-abcdefghij,us-east-1", "list-unpackers"], "organization scope"),
        (
            vec!["--targets", "org:*,us-east-1", "--org-role-name", "no spaces", "list-unpackers"],
            "not an IAM role name",
        ),
    ] {
        let out = p.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(world.api_calls("ami-publisher"), before);
    // A profile that cannot list the organization's accounts is named.
    let out = p.run(&["--targets", "org:*,us-east-1", "--org-profile", "second", "list-unpackers"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("as profile second"), "{err}");
}

/// Allowed AMIs in an account a publish shares with: `enabled` with
/// criteria that leave the owner out refuses the plan, the publish and
/// `share` before anything changes; `audit-mode` lets it go on with a
/// warning; criteria that admit the owner let the account see and launch
/// the AMI. An account no profile reaches is named as not checked.
#[tokio::test(flavor = "multi_thread")]
async fn allowed_amis_of_a_shared_account_are_judged_before_anything_is_made() {
    use aws_sdk_ec2::types::{AllowedImagesSettingsEnabledState as State, ImageCriterionRequest};
    use local_world::CONSUMER_ACCOUNT_ID;
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let id_of = |a: &str| world.targets.iter().find(|t| t.account == a).unwrap().account_id.clone();
    let (owner, second_id) = (id_of("first"), id_of("second"));
    let stream = "base/allowed";
    add_image(&world, stream, "1", &disk(4 * MIB, 21)).await;
    customer_key(&world, "first", "us-east-1", "alias/ami-allowed", &[&second_id, CONSUMER_ACCOUNT_ID]).await;
    let grantees = format!("{second_id},{CONSUMER_ACCOUNT_ID}");
    let args: Vec<&str> =
        vec!["--targets", "first,us-east-1", "--kms-key-id", "alias/ami-allowed", "--share-with-accounts", &grantees];
    let second = world.ec2("second", "us-east-1").await;
    let criteria = |providers: &[&str], names: &[&str]| {
        let mut c = ImageCriterionRequest::builder();
        for p in providers {
            c = c.image_providers(*p);
        }
        for n in names {
            c = c.image_names(*n);
        }
        c.build()
    };
    let set = |state: State, c: ImageCriterionRequest| {
        let second = second.clone();
        async move {
            second.replace_image_criteria_in_allowed_images_settings().image_criteria(c).send().await.unwrap();
            second.enable_allowed_images_settings().allowed_images_settings_state(state).send().await.unwrap();
        }
    };

    // Enabled, and only Amazon's AMIs: the plan and the publish are refused.
    set(State::Enabled, criteria(&["amazon"], &[])).await;
    for dry in [true, false] {
        let before = mark(&world);
        let mut run = vec!["publish", stream, "1"];
        if dry {
            run.insert(0, "--dry-run");
        }
        run.extend(&args);
        let out = p.run(&run);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("nothing was made"), "{err}");
        assert!(err.contains(&format!("account {second_id} has Allowed AMIs enabled in us-east-1")), "{err}");
        assert!(err.contains("could neither see nor launch it") && err.contains(&format!("add {owner}")), "{err}");
        assert_eq!(writes_since(&world, &before), Vec::<String>::new(), "a refused publish changed things");
    }

    // Audit mode: the publish goes on, and says what enabling would do.
    set(State::AuditMode, criteria(&["amazon"], &[])).await;
    let results = world.path("allowed-results.json");
    let mut run = vec!["publish", stream, "1", "--results", results.to_str().unwrap()];
    run.extend(&args);
    let out = p.run(&run);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("account {second_id} has Allowed AMIs in audit-mode")), "{err}");
    assert!(err.contains(&format!("account {CONSUMER_ACCOUNT_ID}: Allowed AMIs not checked")), "{err}");
    let r = ami_publisher::results::PublishResults::read(&results).unwrap();
    let ami = r.targets[0].ami_id.clone().unwrap();
    let seen = second.describe_images().image_ids(&ami).send().await.unwrap();
    assert_eq!(seen.images()[0].image_allowed(), Some(false), "the account's audit says the same");

    // Enabled, the owner admitted by name: the plan says so, and the
    // account sees and launches the AMI.
    let name = seen.images()[0].name().unwrap().to_owned();
    let prefix = format!("{}*", &name[..name.len() / 2]);
    set(State::Enabled, criteria(&[&owner], &[&prefix])).await;
    let mut run = vec!["--json", "--dry-run", "publish", stream, "1"];
    run.extend(&args);
    let plan = json_of(&p.run(&run));
    let lines: Vec<&str> = plan[0]["allowed_amis"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(
        lines,
        [
            format!("account {second_id}: Allowed AMIs enabled in us-east-1, admitted"),
            format!(
                "account {CONSUMER_ACCOUNT_ID}: Allowed AMIs not checked (no profile or organization account reaches it)"
            ),
        ]
    );
    assert_eq!(second.describe_images().image_ids(&ami).send().await.unwrap().images().len(), 1);
    let subnet = second.describe_subnets().send().await.unwrap().subnets()[0].subnet_id().unwrap().to_owned();
    let launch = || {
        second
            .run_instances()
            .image_id(&ami)
            .min_count(1)
            .max_count(1)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .subnet_id(&subnet)
            .send()
    };
    assert_eq!(launch().await.unwrap().instances()[0].image_id(), Some(ami.as_str()));

    // Another name: hidden from the account, and `share` refuses to add to it.
    set(State::Enabled, criteria(&[&owner], &["another-*"])).await;
    let hidden = second.describe_images().image_ids(&ami).send().await.unwrap_err();
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&hidden), Some("InvalidAMIID.NotFound"));
    let refused = launch().await.unwrap_err();
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&refused), Some("InvalidAMIID.NotFound"));
    let before = mark(&world);
    let out = p.run(&["--json", "share", results.to_str().unwrap(), "--share-with-accounts", &second_id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = report[0]["error"].as_str().unwrap_or_default();
    assert!(failed.contains(&format!("{ami} cannot be shared as asked")), "{report}");
    assert!(failed.contains("no criterion admits"), "{report}");
    assert_eq!(writes_since(&world, &before), Vec::<String>::new());
}
