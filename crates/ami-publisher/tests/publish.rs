//! `ami-publisher publish` end to end on the local world: the real binary,
//! the real SDK against moto, real unpackers over mutual TLS, real (loop)
//! devices behind the volumes.

mod common;

use std::time::Duration;

use ami_publisher::results::PublishResults;
use aws_sdk_ec2::types::Filter;
use common::*;
use local_world::{Plan, World};

async fn tags_of_image(world: &World, account: &str, region: &str, ami: &str) -> Vec<(String, String)> {
    let ec2 = world.ec2(account, region).await;
    let out = ec2.describe_images().image_ids(ami).send().await.unwrap();
    let img = &out.images()[0];
    img.tags().iter().map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned())).collect()
}

async fn own_images(world: &World, account: &str, region: &str) -> usize {
    let ec2 = world.ec2(account, region).await;
    ec2.describe_images().owners("self").send().await.unwrap().images().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_everywhere_then_moves_only_changes_and_reruns_idempotently() {
    let t0 = std::time::Instant::now();
    let world = World::start(&Plan::new(&["us-east-1", "eu-west-1"])).await.unwrap();
    eprintln!("world up after {:?}", t0.elapsed());
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "base/debian-12";
    let leaf1 = disk(40 * MIB, 1);
    let file1 = add_image(&world, stream, "1", &leaf1).await;
    eprintln!("image added after {:?}", t0.elapsed());

    let (code, r) =
        p.publish(stream, "1", &with_targets(&targets, &["--expires-in", "30d", "--tags", "Team=os,Tier=base"]));
    assert_eq!(code, 0, "{r:#?}");
    assert_eq!(r.targets.len(), 4);
    for t in &r.targets {
        assert!(t.ok() && !t.reused, "{t:#?}");
        let ami = t.ami_id.as_deref().unwrap();
        // The AMI boots from the snapshot, and the snapshot holds the image.
        assert_eq!(Some(root_snapshot_of(&world, &t.account, &t.region, ami).await), t.snapshot_id);
        assert_snapshot_holds(&world, t.snapshot_id.as_deref().unwrap(), &file1).await;
        let tags = tags_of_image(&world, &t.account, &t.region, ami).await;
        for (k, v) in [
            ("Name", "base/debian-12/1"),
            ("ImageStream", stream),
            ("ImageLeaf", "1"),
            ("ImageDigest", r.image_id.as_str()),
            ("Team", "os"),
            ("Tier", "base"),
        ] {
            assert!(tags.contains(&(k.to_owned(), v.to_owned())), "{ami} lacks {k}={v}: {tags:?}");
        }
        assert!(tags.iter().any(|(k, _)| k == "ExpiresAt"), "{ami} has no ExpiresAt: {tags:?}");
        // The unpacker volume is encrypted and stays attached for the next leaf.
        let ec2 = world.ec2(&t.account, &t.region).await;
        // Registered as asked: IMDSv2 required (the default), ENA not
        // claimed (--ena-support not given); the world keeps and describes
        // what RegisterImage was given.
        let d = ec2.describe_images().image_ids(ami).send().await.unwrap();
        let img = &d.images()[0];
        assert_eq!(img.ena_support(), Some(false), "{ami}");
        assert_eq!(img.imds_support(), Some(&aws_sdk_ec2::types::ImdsSupportValues::V20), "{ami}");
        let v = ec2.describe_volumes().volume_ids(t.volume_id.as_deref().unwrap()).send().await.unwrap();
        assert_eq!(v.volumes()[0].encrypted(), Some(true));
        // The fresh volume needed every non-zero chunk and nothing more.
        assert!(t.bytes_fetched.unwrap() <= leaf1.len() as u64, "{t:#?}");
    }
    let ids: std::collections::HashSet<_> = r.targets.iter().map(|t| t.account_id.clone().unwrap()).collect();
    assert_eq!(ids.len(), 2, "two accounts: {ids:?}");

    // Leaf 2 changes 3 chunks: each target fetches about that much.
    let mut leaf2 = leaf1.clone();
    let chunk = image_format::DEFAULT_CHUNK_SIZE as usize;
    for (i, at) in [3 * MIB, 17 * MIB, 30 * MIB].into_iter().enumerate() {
        leaf2[at..at + chunk].copy_from_slice(&test_support::noise(chunk, 100 + i as u64));
    }
    let changed = (3 * chunk) as u64;
    let file2 = add_image(&world, stream, "2", &leaf2).await;
    // ... registered with the boot options asked for.
    let uefi = world.path("vars.b64");
    std::fs::write(&uefi, "QU1JIFVFRkkg\nZGF0YQ==\n").unwrap();
    let boot = [
        "--boot-mode",
        "uefi",
        "--tpm-support",
        "v2.0",
        "--uefi-data",
        uefi.to_str().unwrap(),
        "--sriov-net-support",
        "--ena-support",
        "--description",
        "{stream} {leaf}: {image_id}",
    ];
    let (code, r2) = p.publish(stream, "2", &with_targets(&targets, &boot));
    assert_eq!(code, 0, "{r2:#?}");
    for (a, b) in r.targets.iter().zip(&r2.targets) {
        assert!(b.ok() && !b.reused, "{b:#?}");
        let ec2 = world.ec2(&b.account, &b.region).await;
        let ami = b.ami_id.as_deref().unwrap();
        let d = ec2.describe_images().image_ids(ami).send().await.unwrap();
        let img = &d.images()[0];
        assert_eq!(img.boot_mode().map(|m| m.as_str()), Some("uefi"), "{ami}");
        assert_eq!(img.tpm_support().map(|m| m.as_str()), Some("v2.0"), "{ami}");
        assert_eq!(img.sriov_net_support(), Some("simple"), "{ami}");
        assert_eq!(img.ena_support(), Some(true), "{ami}");
        assert_eq!(img.description(), Some(format!("{stream} 2: {}", r2.image_id).as_str()), "{ami}");
        let attr = ec2
            .describe_image_attribute()
            .image_id(ami)
            .attribute(aws_sdk_ec2::types::ImageAttributeName::UefiData)
            .send()
            .await
            .unwrap();
        assert_eq!(attr.uefi_data().and_then(|v| v.value()), Some("QU1JIFVFRkkgZGF0YQ=="), "{ami}");
        assert_eq!(a.volume_id, b.volume_id, "the stream's volume is reused");
        let fetched = b.bytes_fetched.unwrap();
        assert!(fetched as f64 <= changed as f64 * 1.05, "{}: fetched {fetched} for {changed} changed", b.region);
        assert_snapshot_holds(&world, b.snapshot_id.as_deref().unwrap(), &file2).await;
    }

    // The bytes behind the unpacker's AMIs are the images', read back with
    // the EBS direct APIs.
    let files = results_files(&world, "unpacked", &[&r, &r2]);
    let verified = json_of(&p.run(&["verify", "--json", &files[0], &files[1]]));
    for report in verified.as_array().unwrap() {
        let rows = report["records"].as_array().unwrap().clone();
        let bytes: Vec<_> = rows.iter().filter(|row| !row["bytes"].is_null()).collect();
        assert_eq!(bytes.len(), 2, "{report:#}");
        for row in bytes {
            assert_eq!(row["ok"], true, "{row:#}");
            assert_eq!(row["bytes"]["chunks_checked"], row["bytes"]["chunks"], "{row:#}");
        }
    }

    // Again: every target reports the AMI it has; nothing new is made, and
    // the re-run only reads (no EC2 call that changes anything).
    let before = own_images(&world, "first", "us-east-1").await;
    let calls_before = world.api_calls("ami-publisher");
    let out = p.run(&[&with_targets(&targets, &["--json"])[..], &["publish", stream, "2"]].concat());
    assert!(out.status.success());
    let r3: PublishResults = serde_json::from_slice(&out.stdout).unwrap();
    for (b, c) in r2.targets.iter().zip(&r3.targets) {
        assert!(c.reused, "{c:#?}");
        assert_eq!(b.ami_id, c.ami_id);
        assert_eq!(b.snapshot_id, c.snapshot_id);
    }
    assert_eq!(own_images(&world, "first", "us-east-1").await, before);
    let mut rerun = world.api_calls("ami-publisher");
    for (action, n) in &calls_before {
        *rerun.get_mut(action).unwrap() -= n;
    }
    rerun.retain(|_, n| *n > 0);
    eprintln!("EC2 calls of the re-run over {} targets: {rerun:?}", targets.len());
    assert!(!rerun.is_empty(), "the emulator counted the publisher's calls");
    let writes: Vec<_> = rerun.keys().filter(|a| !a.starts_with("Describe") && !a.starts_with("Get")).collect();
    assert!(writes.is_empty(), "a re-run changed things: {writes:?}");

    // --force makes a new one with a dated name.
    let (code, r4) = p.publish(stream, "2", &with_targets(&targets[..1], &["--force"]));
    assert_eq!(code, 0);
    assert_ne!(r4.targets[0].ami_id, r2.targets[0].ami_id);
    assert!(r4.targets[0].ami_name.as_deref().unwrap().starts_with("base/debian-12/2 "), "{r4:#?}");
    eprintln!("done after {:?}", t0.elapsed());
    drop(world);
    eprintln!("world down after {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_unpacker_fails_alone_a_stopped_instance_is_started_a_small_volume_is_grown() {
    let mut world = World::start(&Plan::of(&["first"], &["us-east-1", "us-west-2", "eu-west-1"])).await.unwrap();
    let targets = targets_of(&world);
    let stream = "apps/web";
    let file1 = add_image(&world, stream, "1", &disk(24 * MIB, 7)).await;

    // Target 0: its unpacker process is down. Target 1: its instance is stopped.
    world.stop_unpacker(0).await.unwrap();
    let t1 = &world.targets[1];
    let ec2_1 = world.ec2(&t1.account, &t1.region).await;
    ec2_1.stop_instances().instance_ids(&t1.instance_id).send().await.unwrap();

    let p = Publisher::new(&world);
    let (code, r) =
        p.publish(stream, "1", &with_targets(&targets, &["--unpacker-timeout", "3s", "--min-free-bytes", "0"]));
    assert_eq!(code, 1, "one target failed: exit status 1");
    let down = result(&r, &world, 0);
    let err = down.error.as_deref().expect("target 0 must fail");
    assert!(err.contains(&world.targets[0].unpacker_addr().to_string()), "{err}");
    assert!(err.contains(&world.targets[0].instance_id), "{err}");
    assert!(down.ami_id.is_none() && down.snapshot_id.is_none());
    for i in 1..3 {
        let t = result(&r, &world, i);
        assert!(t.ok(), "{t:#?}");
        assert_snapshot_holds(&world, t.snapshot_id.as_deref().unwrap(), &file1).await;
    }
    let state = ec2_1.describe_instances().instance_ids(&t1.instance_id).send().await.unwrap();
    let state = state.reservations()[0].instances()[0].state().unwrap().name().unwrap().as_str().to_owned();
    assert_eq!(state, "running", "the stopped unpacker instance was started");

    // Target 2's volume (1 GiB) is too small once 2 GiB must stay free: it is
    // grown in place, keeps what it holds (nothing is fetched again), and
    // the AMI still holds the image.
    let t2 = &world.targets[2];
    let ec2_2 = world.ec2(&t2.account, &t2.region).await;
    let old = result(&r, &world, 2).volume_id.clone().unwrap();
    let (code, r2) = p.publish(stream, "1", &with_targets(&targets[2..], &["--min-free-bytes", "2GiB", "--force"]));
    assert_eq!(code, 0, "{r2:#?}");
    assert_eq!(r2.targets[0].volume_id.as_deref(), Some(old.as_str()), "grown, not replaced");
    assert_eq!(r2.targets[0].bytes_fetched, Some(0), "what the volume held was kept");
    let v = ec2_2.describe_volumes().volume_ids(&old).send().await.unwrap();
    assert_eq!(v.volumes()[0].size(), Some(3));
    assert_snapshot_holds(&world, r2.targets[0].snapshot_id.as_deref().unwrap(), &file1).await;

    // Target 1: an earlier run grew its volume and died before using it.
    // Within the six hours EC2 would refuse another modification, but none
    // is needed: the volume is kept.
    let v1 = result(&r, &world, 1).volume_id.clone().unwrap();
    ec2_1.modify_volume().volume_id(&v1).size(3).send().await.unwrap();
    let (code, r1) = p.publish(stream, "1", &with_targets(&targets[1..2], &["--min-free-bytes", "2GiB", "--force"]));
    assert_eq!(code, 0, "{r1:#?}");
    assert_eq!(r1.targets[0].volume_id.as_deref(), Some(v1.as_str()), "kept, not replaced");
    assert_eq!(r1.targets[0].bytes_fetched, Some(0));

    // Again at once: EC2 allows one modification per volume in six hours,
    // so this time it is replaced and the old one deleted.
    let (code, r2) = p.publish(stream, "1", &with_targets(&targets[2..], &["--min-free-bytes", "4GiB", "--force"]));
    assert_eq!(code, 0, "{r2:#?}");
    let new = r2.targets[0].volume_id.clone().unwrap();
    assert_ne!(new, old);
    let v = ec2_2.describe_volumes().volume_ids(&new).send().await.unwrap();
    assert!(v.volumes()[0].size().unwrap() >= 5);
    let all = ec2_2.describe_volumes().send().await.unwrap();
    assert!(!all.volumes().iter().any(|v| v.volume_id() == Some(old.as_str())), "the replaced volume was deleted");
    assert_snapshot_holds(&world, r2.targets[0].snapshot_id.as_deref().unwrap(), &file1).await;

    // The unpacker is back: a re-run finishes target 0 and leaves the rest.
    world.restart_unpacker(0).await.unwrap();
    let p = Publisher::new(&world);
    let (code, r3) = p.publish(stream, "1", &with_targets(&targets, &[]));
    assert_eq!(code, 0, "{r3:#?}");
    let reused: Vec<bool> = (0..3).map(|i| result(&r3, &world, i).reused).collect();
    assert_eq!(reused, [false, true, true], "{r3:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_arguments_are_refused_before_any_resource_is_made() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    add_image(&world, "s/x", "1", &disk(4 * MIB, 3)).await;
    let p = Publisher::new(&world);
    let cases: [(&[&str], &str); 6] = [
        (&["--targets", "nobody,us-east-1", "publish", "s/x", "1"], "unknown AWS profile 'nobody'"),
        (&["--targets", "first,us-east-1,extra", "publish", "s/x", "1"], "a target is ACCOUNT,REGION"),
        (&["--targets", "first,US_EAST", "publish", "s/x", "1"], "not a valid region name"),
        (&["--targets", "first,us-east-1", "publish", "s/x", "9"], "image s/x/9 is not on the imageserver"),
        (&["publish", "s/x", "1"], "no targets"),
        (&["--targets", "first,us-east-1", "--tags", "oops", "publish", "s/x", "1"], "a tag is KEY=VALUE"),
    ];
    for (args, want) in cases {
        let out = p.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
    // Values from closed sets are checked as the command line is parsed:
    // exit 2 naming the flag and what it takes, before any AWS call.
    let before = world.api_calls("ami-publisher");
    let typed: [(&[&str], &str); 3] = [
        (&["--volume-type", "gp33"], "invalid value 'gp33' for '--volume-type"),
        (&["--architecture", "amd64"], "invalid value 'amd64' for '--architecture"),
        (&["--boot-mode", "bios"], "invalid value 'bios' for '--boot-mode"),
    ];
    for (flags, want) in typed {
        let args: Vec<&str> =
            ["--targets", "first,us-east-1"].iter().chain(flags).chain(&["publish", "s/x", "1"]).copied().collect();
        let out = p.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want) && err.contains("possible values"), "{args:?}: expected '{want}' in: {err}");
    }
    assert_eq!(world.api_calls("ami-publisher"), before, "a value refused at parse time makes no AWS call");

    // A certificate the imageserver refuses is named (under TLS 1.3 the
    // first call sees only a transport error), before any AWS call.
    for refused in world.pki.refused(fleet_pki::Role::AmiPublisher).unwrap() {
        let ssl = refused.tls.cert.parent().unwrap().to_owned();
        let out = Publisher { world: &world, ssl }.run(&["--targets", "first,us-east-1", "publish", "s/x", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", refused.who);
        assert!(err.contains(refused.named_by), "{}: {err}", refused.who);
    }
    assert_eq!(world.api_calls("ami-publisher"), before, "a refused certificate makes no AWS call");

    let ec2 = world.ec2("first", "us-east-1").await;
    let vols = ec2.describe_volumes().filters(Filter::builder().name("tag-key").values("ImageStream").build()).send();
    assert!(vols.await.unwrap().volumes().is_empty(), "no volume was made");
    assert_eq!(own_images(&world, "first", "us-east-1").await, 0, "no AMI was made");
    let snaps =
        ec2.describe_snapshots().filters(Filter::builder().name("tag-key").values("ImageStream").build()).send();
    assert!(snaps.await.unwrap().snapshots().is_empty(), "no snapshot was made");

    // `first,*`: every region enabled in the account (DescribeRegions). Only
    // us-east-1 has an unpacker; the others are skipped when asked to.
    let (code, r) =
        p.publish("s/x", "1", &["--targets", "first,*", "--ignore-missing-unpackers", "--max-concurrency", "8"]);
    assert_eq!(code, 0, "{r:#?}");
    assert!(r.targets.len() > 10, "all enabled regions: {}", r.targets.len());
    for t in &r.targets {
        assert!(t.ok(), "{t:#?}");
        assert_eq!(t.skipped, t.region != "us-east-1", "{t:#?}");
    }
    // Without --ignore-missing-unpackers such a target fails and says why.
    let (code, r) = p.publish("s/x", "1", &["--targets", "first,eu-north-1"]);
    assert_eq!(code, 1);
    let err = r.targets[0].error.as_deref().unwrap();
    assert!(err.contains("no instance tagged Name=ImageUnpacker"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_publish_is_finished_by_a_rerun_and_leaks_nothing() {
    use unpacker_client::{GetStatusRequest, StreamState};
    let world = World::start(&Plan::of(&["second"], &["eu-west-1"])).await.unwrap();
    let stream = "big/image";
    let file = add_image(&world, stream, "1", &disk(256 * MIB, 11)).await;
    let p = Publisher::new(&world);
    let targets = targets_of(&world);

    // Start a publish and kill it (SIGKILL) as soon as the unpack is under way.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ami-publisher"))
        .envs(world.aws_env())
        .env("HOME", world.path("home"))
        .arg("--ssl-dir")
        .arg(&p.ssl)
        .args(["--image-server", &world.imageserver_addr(), "--targets", &targets[0], "publish", stream, "1"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tls = fleet_tls::TlsFiles::from_ssl_dir(&p.ssl);
    let mut c = unpacker_client::connect(&world.targets[0].unpacker_addr().to_string(), &tls).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
        if let Some(s) = st.streams.iter().find(|s| s.stream == stream)
            && s.state() != StreamState::Unprepared
        {
            break s.state();
        }
        assert!(std::time::Instant::now() < deadline, "the publish never reached the unpacker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("killed the publisher with the stream {seen:?}");

    // The re-run finishes the job with what the first run made.
    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &[]));
    assert_eq!(code, 0, "{r:#?}");
    let t = &r.targets[0];
    assert_snapshot_holds(&world, t.snapshot_id.as_deref().unwrap(), &file).await;

    // Exactly one volume, one snapshot and one AMI of the stream: nothing leaked.
    let ec2 = world.ec2("second", "eu-west-1").await;
    let by_stream = || Filter::builder().name("tag:ImageStream").values(stream).build();
    let vols = ec2.describe_volumes().filters(by_stream()).send().await.unwrap();
    assert_eq!(vols.volumes().len(), 1, "{:?}", vols.volumes());
    let snaps = ec2.describe_snapshots().filters(by_stream()).send().await.unwrap();
    assert_eq!(snaps.snapshots().len(), 1, "{:?}", snaps.snapshots());
    let imgs = ec2.describe_images().owners("self").filters(by_stream()).send().await.unwrap();
    assert_eq!(imgs.images().len(), 1, "{:?}", imgs.images());
    // The snapshot backs an AMI now: its pending-expiry tag is gone.
    let snap_tags = snaps.snapshots()[0].tags();
    assert!(!snap_tags.iter().any(|t| t.key() == Some("ExpiresAt")), "{snap_tags:?}");
}

/// Two pipelines publish two leaves of one stream to one target at the same
/// time, twice: the first pair on a brand-new stream, so both want to set up
/// its volume (the unpacker's set-up lease lets one do it, the other uses
/// its volume), the second pair on that volume. One waits for the other's
/// capture, and each AMI holds exactly its own leaf (the world's snapshots,
/// like EBS's, hold the bytes of the moment CreateSnapshot was called).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishes_of_one_stream_each_capture_their_own_leaf() {
    let world = World::start(&Plan::new(&["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let stream = "apps/web";
    let target = ["--targets", "first,us-east-1"];
    let mut files = Vec::new();
    for leaf in 1..=4u64 {
        files.push(add_image(&world, stream, &leaf.to_string(), &disk(24 * MIB, 20 + leaf)).await);
    }
    let mut published = Vec::new();
    for pair in [["1", "2"], ["3", "4"]] {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| p.publish(stream, pair[0], &target));
            let b = s.spawn(|| p.publish(stream, pair[1], &target));
            (a.join().unwrap(), b.join().unwrap())
        });
        for (code, r) in [a, b] {
            assert_eq!(code, 0, "{r:#?}");
            published.push(r);
        }
    }
    let bound = {
        let ec2 = world.ec2("first", "us-east-1").await;
        let f = Filter::builder().name("tag:ImageStream").values(stream).build();
        let vols = ec2.describe_volumes().filters(f).send().await.unwrap();
        vols.volumes().iter().map(|v| v.volume_id().unwrap().to_owned()).collect::<Vec<_>>()
    };
    for r in &published {
        let t = &r.targets[0];
        let vol = t.volume_id.clone().unwrap();
        assert!(bound.contains(&vol), "{vol} not among {bound:?}");
        let ami = t.ami_id.as_deref().unwrap();
        assert_eq!(Some(root_snapshot_of(&world, "first", "us-east-1", ami).await), t.snapshot_id);
        let leaf: usize = r.leaf.parse().unwrap();
        assert_snapshot_holds(&world, t.snapshot_id.as_deref().unwrap(), &files[leaf - 1]).await;
    }
    // The stream has one volume, and every publish used it.
    assert_eq!(bound.len(), 1, "one volume for the stream: {bound:?}");
    assert_eq!(published.len(), 4, "four publishes");
    assert!(published.iter().all(|r| r.targets[0].volume_id == published[0].targets[0].volume_id));
}

async fn tagged_snapshots(world: &World, digest: &str) -> Vec<aws_sdk_ec2::types::Snapshot> {
    let ec2 = world.ec2("first", "us-east-1").await;
    let f = Filter::builder().name("tag:ImageDigest").values(digest).build();
    ec2.describe_snapshots().owner_ids("self").filters(f).send().await.unwrap().snapshots().to_vec()
}

/// The AMI name is taken: by an AMI of this very leaf that an interrupted
/// run registered but never tagged, which is adopted; or by an unrelated
/// AMI, which is refused with a way out (--force), leaking nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_ami_name_is_adopted_when_ours_and_refused_when_not() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let target = ["--targets", "first,us-east-1"];
    let ec2 = world.ec2("first", "us-east-1").await;

    // Ours: publish, then strip the AMI's tags but the ManagedBy that
    // RegisterImage sets with it, as if the run had died before tagging.
    // The re-run adopts that AMI and tags it.
    add_image(&world, "apps/own", "1", &disk(4 * MIB, 31)).await;
    let (code, r) = p.publish("apps/own", "1", &target);
    assert_eq!(code, 0, "{r:#?}");
    let ami = r.targets[0].ami_id.clone().unwrap();
    let tags = tags_of_image(&world, "first", "us-east-1", &ami).await;
    let keys: Vec<aws_sdk_ec2::types::Tag> = tags
        .iter()
        .filter(|(k, _)| k != "ManagedBy")
        .map(|(k, _)| aws_sdk_ec2::types::Tag::builder().key(k).build())
        .collect();
    ec2.delete_tags().resources(&ami).set_tags(Some(keys)).send().await.unwrap();
    assert_eq!(tags_of_image(&world, "first", "us-east-1", &ami).await.len(), 1);
    let (code, again) = p.publish("apps/own", "1", &target);
    assert_eq!(code, 0, "{again:#?}");
    assert_eq!(again.targets[0].ami_id.as_deref(), Some(ami.as_str()), "adopted, not a second AMI");
    assert_eq!(own_images(&world, "first", "us-east-1").await, 1);
    let tags = tags_of_image(&world, "first", "us-east-1", &ami).await;
    assert!(tags.contains(&("ImageDigest".to_owned(), r.image_id.clone())), "{tags:?}");

    // Not ours: an unrelated AMI already has the name apps/clash/1.
    let vol = ec2.create_volume().availability_zone("us-east-1a").size(1).send().await.unwrap();
    let snap = ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await.unwrap();
    let root = aws_sdk_ec2::types::BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(aws_sdk_ec2::types::EbsBlockDevice::builder().snapshot_id(snap.snapshot_id().unwrap()).build())
        .build();
    let foreign =
        ec2.register_image().name("apps/clash/1").root_device_name("/dev/xvda").block_device_mappings(root).send();
    let foreign = foreign.await.unwrap().image_id().unwrap().to_owned();
    add_image(&world, "apps/clash", "1", &disk(4 * MIB, 32)).await;
    let (code, r) = p.publish("apps/clash", "1", &target);
    assert_eq!(code, 1);
    let err = r.targets[0].error.as_deref().unwrap();
    assert!(err.contains(&format!("already used by {foreign}")) && err.contains("--force"), "{err}");
    // Its snapshot is kept for the next run, and expires if there is none.
    let pending = tagged_snapshots(&world, &r.image_id).await;
    assert_eq!(pending.len(), 1);
    assert!(pending[0].tags().iter().any(|t| t.key() == Some("ExpiresAt")), "{pending:?}");
    // --force remakes it under a dated name; the failed run's snapshot
    // still expires (the forced AMI's own snapshot does not).
    let (code, forced) = p.publish("apps/clash", "1", &[&target[..], &["--force"]].concat());
    assert_eq!(code, 0, "{forced:#?}");
    let t = &forced.targets[0];
    let name = t.ami_name.clone().unwrap();
    assert!(name.starts_with("apps/clash/1 ") && name.len() > "apps/clash/1 ".len(), "{name}");
    let ami = t.ami_id.as_deref().unwrap();
    assert_eq!(Some(root_snapshot_of(&world, "first", "us-east-1", ami).await), t.snapshot_id);
    for s in tagged_snapshots(&world, &r.image_id).await {
        let expires = s.tags().iter().any(|t| t.key() == Some("ExpiresAt"));
        assert_eq!(expires, s.snapshot_id() != t.snapshot_id.as_deref(), "{s:?}");
    }
}

/// Every chunk file in the world's imageserver store, replaced by another
/// valid frame: the bytes no longer match their digests.
fn damage_every_stored_chunk(world: &World) -> usize {
    let mut n = 0;
    for dir in std::fs::read_dir(world.path("images/chunks")).unwrap() {
        for f in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let chunk = test_support::noise(image_format::DEFAULT_CHUNK_SIZE as usize, n as u64);
            std::fs::write(f.unwrap().path(), image_client::compress(&chunk)).unwrap();
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_image_fails_every_target_by_name_and_leaves_nothing_that_stays() {
    let world = World::start(&Plan::new(&["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "base/damaged";
    add_image(&world, stream, "1", &disk(4 * MIB, 31)).await;
    assert!(damage_every_stored_chunk(&world) > 0);

    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &[]));
    assert_ne!(code, 0, "{r:#?}");
    assert_eq!(r.targets.len(), 2);
    for t in &r.targets {
        let e = t.error.as_deref().unwrap_or_default();
        // The unpacker's DATA_LOSS: permanent, named, not tried again.
        assert!(e.contains("image base/damaged/1") && e.contains("corrupt"), "{t:#?}");
        assert!(t.snapshot_id.is_none() && t.ami_id.is_none(), "{t:#?}");
        let ec2 = world.ec2(&t.account, &t.region).await;
        let f = Filter::builder().name("tag:ImageStream").values(stream).build();
        let snaps = ec2.describe_snapshots().owner_ids("self").filters(f).send().await.unwrap();
        assert!(snaps.snapshots().is_empty(), "{snaps:#?}");
    }

    // Via ebs-direct: the targets share the failed reads (each tries
    // again alone, none waits for ever), each fails naming the image, and
    // what was started is left to expire.
    let started = std::time::Instant::now();
    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &["--via", "ebs-direct"]));
    assert_ne!(code, 0, "{r:#?}");
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    for t in &r.targets {
        let e = t.error.as_deref().unwrap_or_default();
        assert!(e.contains("corrupt"), "{t:#?}");
        assert!(t.ami_id.is_none(), "{t:#?}");
        let ec2 = world.ec2(&t.account, &t.region).await;
        let f = Filter::builder().name("tag:ImageStream").values(stream).build();
        let snaps = ec2.describe_snapshots().owner_ids("self").filters(f).send().await.unwrap();
        for s in snaps.snapshots() {
            let expires = ami_publisher::tags::value(s.tags(), "ExpiresAt");
            assert!(expires.is_some(), "left without ExpiresAt: {s:#?}");
        }
    }
}

/// A publisher certificate the unpacker refuses is named at once, not
/// dialled again until `--unpacker-timeout` ends: no retry can cure it.
#[tokio::test(flavor = "multi_thread")]
async fn an_unpacker_that_refuses_the_certificate_is_named_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = test_support::fleet(dir.path()).await.unwrap();
    let addr = fleet.unpacker.addr.to_string();
    for refused in fleet.pki.refused(fleet_pki::Role::AmiPublisher).unwrap() {
        let t = std::time::Instant::now();
        let err = ami_publisher::unpacker::dial(&addr, &refused.tls, Duration::from_secs(120)).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(refused.named_by), "{}: {msg}", refused.who);
        assert!(t.elapsed() < Duration::from_secs(60), "{}: took {:?}", refused.who, t.elapsed());
    }
}

/// Issue 20: `publish --dry-run` says per target what the publish would do,
/// making no change (EC2's DryRun only, counted apart in the emulator's
/// log), and the real run then does exactly that: the AMI made or reused,
/// the stream's volume reused or made, the bytes written, the name, the key
/// and the shares.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_plans_what_the_real_run_then_does() {
    use local_world::CONSUMER_ACCOUNT_ID;
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "base/planned";
    let leaf1 = disk(8 * MIB, 31);
    add_image(&world, stream, "1", &leaf1).await;
    // Keys the consumer may use, one per account, from the config file.
    let mut config = String::from("[kms-keys]\n");
    for t in &world.targets {
        let key = customer_key(&world, &t.account, &t.region, "alias/planned", &[CONSUMER_ACCOUNT_ID]).await;
        config += &format!("\"{},{}\" = \"{key}\"\n", t.account, t.region);
    }
    let config_file = world.path("planned.toml");
    std::fs::write(&config_file, config).unwrap();
    let common = ["--config", config_file.to_str().unwrap(), "--share-with-accounts", CONSUMER_ACCOUNT_ID];
    // Leaf 1 in the first target only: its stream has a volume there.
    let (code, _) = p.publish(stream, "1", &[&["--targets", targets[0].as_str()][..], &common[..]].concat());
    assert_eq!(code, 0);
    let mut leaf2 = leaf1.clone();
    let chunk = image_format::DEFAULT_CHUNK_SIZE as usize;
    leaf2[2 * MIB..2 * MIB + chunk].copy_from_slice(&test_support::noise(chunk, 77));
    add_image(&world, stream, "2", &leaf2).await;

    let args: Vec<&str> =
        [&with_targets(&targets, &common)[..], &["--json", "--dry-run", "publish", stream, "2"]].concat();
    let before = mark(&world);
    let out = p.run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(writes_since(&world, &before), Vec::<String>::new(), "a dry run changed things");
    assert!(!world.api_outcomes("ami-publisher", "DryRunOperation").is_empty(), "EC2 was asked with DryRun");
    assert_eq!(plans.len(), 2);
    for plan in &plans {
        assert!(plan["error"].is_null(), "{plan}");
        assert_eq!(plan["ami"], "make", "{plan}");
        let perms: Vec<&str> = plan["permissions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(perms.iter().all(|p| p.ends_with(": allowed")), "{perms:?}");
        assert!(perms.iter().any(|p| p.starts_with("CreateSnapshot") || p.starts_with("CreateVolume")), "{perms:?}");
    }
    assert!(plans[0]["volume"].as_str().unwrap().starts_with("reuse vol-"), "{}", plans[0]);
    assert!(plans[1]["volume"].as_str().unwrap().starts_with("make "), "{}", plans[1]);

    // The real run does what the plan said.
    let real: Vec<&str> = args.iter().copied().filter(|a| *a != "--dry-run" && *a != "--json").collect();
    let results = world.path("planned-results.json");
    let out = p.run(&[&real[..], &["--results", results.to_str().unwrap()]].concat());
    assert!(out.status.success());
    let r = PublishResults::read(&results).unwrap();
    for (plan, t) in plans.iter().zip(&r.targets) {
        assert_eq!(
            (plan["account"].as_str(), plan["region"].as_str()),
            (Some(t.account.as_str()), Some(t.region.as_str()))
        );
        assert_eq!(plan["ami"] == "reuse", t.reused, "{plan} / {t:?}");
        assert_eq!(plan["ami_name"].as_str(), t.ami_name.as_deref(), "{plan} / {t:?}");
        assert_eq!(plan["kms_key"].as_str(), t.kms_key.as_deref(), "{plan} / {t:?}");
        assert_eq!(plan["bytes_to_write"].as_u64(), t.bytes_written, "{plan} / {t:?}");
        let volume = plan["volume"].as_str().unwrap();
        match volume.strip_prefix("reuse ") {
            Some(v) => assert_eq!(Some(v), t.volume_id.as_deref(), "{plan} / {t:?}"),
            None => assert!(volume.starts_with("make ") && t.volume_id.is_some(), "{plan} / {t:?}"),
        }
        let shares: Vec<&str> = plan["shares"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(
            shares,
            [
                format!("launch: account {CONSUMER_ACCOUNT_ID}"),
                format!("copy (create volumes): account {CONSUMER_ACCOUNT_ID}")
            ]
        );
        assert_eq!(t.shared_with.accounts, [CONSUMER_ACCOUNT_ID]);
    }
    // A region the account has not enabled is named in the plan.
    let out = p.run(&["--json", "--dry-run", "--targets", "first,ap-east-1", "publish", stream, "2"]);
    assert_eq!(out.status.code(), Some(1));
    let off: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(off[0]["error"].as_str().unwrap().contains("region ap-east-1 is not enabled"), "{}", off[0]);
    // Planned again: every AMI is there to reuse, with nothing left to share.
    let out = p.run(&args);
    let again: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    for (plan, t) in again.iter().zip(&r.targets) {
        assert_eq!(plan["ami"], "reuse", "{plan}");
        assert_eq!(plan["existing"].as_str(), t.ami_id.as_deref());
        assert!(plan.get("shares").is_none(), "{plan}");
    }
    // An AMI gone but its snapshot left (as an interrupted run leaves it):
    // the plan would register the snapshot, and EC2 is asked with DryRun.
    let t0 = &r.targets[0];
    let home = world.ec2(&t0.account, &t0.region).await;
    home.deregister_image().image_id(t0.ami_id.as_deref().unwrap()).send().await.unwrap();
    let before = mark(&world);
    let out = p.run(&args);
    let left: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(writes_since(&world, &before), Vec::<String>::new());
    assert_eq!(left[0]["ami"], "register", "{}", left[0]);
    assert_eq!(left[0]["existing"].as_str(), t0.snapshot_id.as_deref());
    let perms: Vec<&str> = left[0]["permissions"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(perms.contains(&"RegisterImage: allowed"), "{perms:?}");
    let out = p.run(&[&real[..], &["--json"]].concat());
    assert!(out.status.success());
    let done: PublishResults = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done.targets[0].snapshot_id, t0.snapshot_id, "the left snapshot was registered");
    assert!(!done.targets[0].reused);
}

/// A stream's volume made under one key (here the account's default) is
/// not used once the target's key is another: its snapshots, and so the
/// AMIs, would carry the old key, which the accounts shared with may not
/// use (or, aws/ebs, EC2 would not share at all). The plan says so, and the
/// run replaces the volume by one under the target's key.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_volume_under_another_key_is_replaced() {
    use local_world::CONSUMER_ACCOUNT_ID;
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let stream = "base/rekeyed";
    add_image(&world, stream, "1", &disk(4 * MIB, 41)).await;
    let (code, r1) = p.publish(stream, "1", &["--targets", "first,us-east-1"]);
    assert_eq!(code, 0);
    let old = r1.targets[0].volume_id.clone().unwrap();
    add_image(&world, stream, "2", &disk(4 * MIB, 42)).await;
    let key = customer_key(&world, "first", "us-east-1", "alias/rekeyed", &[CONSUMER_ACCOUNT_ID]).await;
    let args =
        ["--targets", "first,us-east-1", "--kms-key-id", "alias/rekeyed", "--share-with-accounts", CONSUMER_ACCOUNT_ID];
    // Leaf 1's AMI is there, under aws/ebs: asked to share it, the publish
    // says why it cannot, and shares nothing.
    let (code, again) = p.publish(stream, "1", &args);
    assert_eq!(code, 1);
    let e = again.targets[0].error.as_deref().unwrap_or_default();
    assert!(e.contains("cannot be shared as asked; nothing was shared") && e.contains("AWS managed key"), "{e}");
    let ec2 = world.ec2("first", "us-east-1").await;
    let held = ec2
        .describe_image_attribute()
        .image_id(r1.targets[0].ami_id.as_deref().unwrap())
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .unwrap();
    assert!(held.launch_permissions().is_empty(), "{held:?}");
    let out = p.run(&[&args[..], &["--json", "--dry-run", "publish", stream, "2"]].concat());
    let plans: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let volume = plans[0]["volume"].as_str().unwrap();
    assert!(volume.contains(&format!("replacing {old} (encrypted with another key)")), "{}", plans[0]);

    let (code, r2) = p.publish(stream, "2", &args);
    assert_eq!(code, 0, "{r2:#?}");
    let t = &r2.targets[0];
    assert_ne!(t.volume_id.as_deref(), Some(old.as_str()), "a new volume");
    assert_eq!(t.kms_key.as_deref(), Some(key.as_str()));
    let snap = ec2.describe_snapshots().snapshot_ids(t.snapshot_id.as_deref().unwrap()).send().await.unwrap();
    assert_eq!(snap.snapshots()[0].kms_key_id(), Some(key.as_str()));
    assert_eq!(t.shared_with.accounts, [CONSUMER_ACCOUNT_ID]);
    // The old volume is retired.
    let gone = ec2.describe_volumes().volume_ids(&old).send().await;
    assert!(gone.is_err() || gone.unwrap().volumes().iter().all(|v| v.state().map(|s| s.as_str()) == Some("deleting")));
}

/// `publish --via ebs-direct` (issue 24): no unpacker, no volume. The first
/// leaf writes every block of the image into a new encrypted snapshot per
/// target; the next leaf starts from that snapshot and writes exactly the
/// chunks that changed (one of them now zeros), counted by the world; the
/// bytes behind every AMI are the leaf's; EBS's own ListChangedBlocks
/// between the two snapshots names the changed blocks; a re-run writes
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn publishes_via_ebs_direct_writing_only_the_changed_blocks() {
    const BLOCK: usize = 524_288;
    let world = World::start(&Plan::new(&["us-east-1", "eu-west-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "apps/direct";
    let leaf1 = disk(20 * MIB, 31);
    add_image(&world, stream, "1", &leaf1).await;
    let via = ["--via", "ebs-direct"];
    let puts = || world.api_outcomes("ami-publisher", "ok").get("PutSnapshotBlock").copied().unwrap_or(0);
    let holds = |snapshot: String, image: Vec<u8>| {
        let world = &world;
        async move {
            let path = world.snapshot_bytes(&snapshot, Duration::from_secs(30)).await.unwrap();
            let bytes = std::fs::read(path).unwrap();
            assert!(bytes[..image.len()] == image[..], "{snapshot} does not hold the image");
        }
    };

    // A leaf cut in other than EBS's block size is refused before anything
    // is made; so is a plan of this way, which does not exist yet.
    let odd = world.path("odd.raw");
    std::fs::write(&odd, &leaf1).unwrap();
    let builder = world.pki.role(fleet_pki::Role::ImageBuilder).unwrap();
    let mut c = imagetool::client::connect(&world.imageserver_addr(), &builder).await.unwrap();
    let name = image_format::ImageName::new(stream, "odd").unwrap();
    imagetool::add(&mut c, &name, &odd, 1 << 20, imagetool::Progress::Hidden).await.unwrap();
    let mut args = vec!["publish", stream, "odd"];
    args.extend(with_targets(&targets, &via));
    let out = p.run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("524288-byte chunks"), "{err}");
    // The plan: no parent yet, every block to write.
    let plan = |leaf: &str| {
        let mut args = vec!["publish", stream, leaf, "--dry-run", "--json"];
        args.extend(with_targets(&targets, &via));
        json_of(&p.run(&args)).as_array().unwrap().clone()
    };
    for t in plan("1") {
        assert_eq!(t["ami"], "make", "{t:#}");
        assert!(t["parent"].as_str().unwrap().starts_with("none"), "{t:#}");
        assert_eq!(t["bytes_to_write"].as_u64(), Some(leaf1.len() as u64), "{t:#}");
    }
    assert!(!world.api_calls("ami-publisher").contains_key("StartSnapshot"), "nothing was started");

    // The bytes the imageserver sends for each distinct data chunk of an
    // image, read once for all targets.
    let once = |image: &[u8], only: &[usize]| -> u64 {
        let mut seen = std::collections::HashSet::new();
        image
            .chunks(BLOCK)
            .enumerate()
            .filter(|(i, c)| {
                (only.is_empty() || only.contains(i)) && !image_format::is_zero(c) && seen.insert(c.to_vec())
            })
            .map(|(_, c)| image_format::codec::compress(c).len() as u64)
            .sum()
    };
    let fetched = |r: &PublishResults| r.targets.iter().map(|t| t.bytes_fetched.unwrap_or(0)).sum::<u64>();
    let (code, r1) = p.publish(stream, "1", &with_targets(&targets, &via));
    assert_eq!(code, 0, "{r1:#?}");
    assert_eq!(fetched(&r1), once(&leaf1, &[]), "each chunk is read once for all four targets");
    let blocks = (leaf1.len() / BLOCK) as u64;
    assert_eq!(puts(), blocks * targets.len() as u64, "every block, zeros too, once per target");
    for t in &r1.targets {
        assert!(t.ok() && !t.reused && t.volume_id.is_none(), "{t:#?}");
        let ami = t.ami_id.as_deref().unwrap();
        assert_eq!(Some(root_snapshot_of(&world, &t.account, &t.region, ami).await), t.snapshot_id);
        assert_eq!(t.bytes_written, Some(blocks * BLOCK as u64), "{t:#?}");
        holds(t.snapshot_id.clone().unwrap(), leaf1.clone()).await;
        let ec2 = world.ec2(&t.account, &t.region).await;
        let s = ec2.describe_snapshots().snapshot_ids(t.snapshot_id.as_deref().unwrap()).send().await.unwrap();
        assert_eq!(s.snapshots()[0].encrypted(), Some(true), "{t:#?}");
    }
    let unpacker_calls: Vec<String> = world
        .api_calls("ami-publisher")
        .into_keys()
        .filter(|a| ["CreateVolume", "AttachVolume", "CreateSnapshot", "StartInstances"].contains(&a.as_str()))
        .collect();
    assert!(unpacker_calls.is_empty(), "no volume or instance is used: {unpacker_calls:?}");

    // Leaf 2: three chunks change, one of them to zeros.
    let mut leaf2 = leaf1.clone();
    let changed = [2usize, 20, 30];
    for (n, i) in changed.iter().enumerate() {
        let at = i * BLOCK;
        if n == 1 {
            leaf2[at..at + BLOCK].fill(0);
        } else {
            leaf2[at..at + BLOCK].copy_from_slice(&test_support::noise(BLOCK, 500 + n as u64));
        }
    }
    add_image(&world, stream, "2", &leaf2).await;
    // The plan names each target's leaf-1 snapshot as the parent, and the
    // three changed blocks; it starts nothing.
    let starts = || world.api_calls("ami-publisher").get("StartSnapshot").copied();
    let started = starts();
    for (t, was) in plan("2").iter().zip(&r1.targets) {
        let parent = t["parent"].as_str().unwrap();
        assert!(parent.starts_with(was.snapshot_id.as_deref().unwrap()) && parent.contains("(leaf 1)"), "{t:#}");
        assert_eq!(t["bytes_to_write"].as_u64(), Some((changed.len() * BLOCK) as u64), "{t:#}");
    }
    assert_eq!(starts(), started, "a plan starts nothing");
    let before = puts();
    // --verify reads every target's new snapshot back.
    let (code, r2) = p.publish(stream, "2", &with_targets(&targets, &["--via", "ebs-direct", "--verify"]));
    assert_eq!(code, 0, "{r2:#?}");
    assert_eq!(puts() - before, changed.len() as u64 * targets.len() as u64, "only the changed blocks");
    assert_eq!(fetched(&r2), once(&leaf2, &changed), "each changed chunk is read once for all four targets");
    for (a, b) in r1.targets.iter().zip(&r2.targets) {
        assert!(b.ok() && !b.reused, "{b:#?}");
        assert_eq!(b.verified_chunks, Some(blocks), "{b:#?}");
        assert_eq!(b.bytes_written, Some((changed.len() * BLOCK) as u64), "{b:#?}");
        holds(b.snapshot_id.clone().unwrap(), leaf2.clone()).await;
        // EBS itself: the second snapshot is the first plus the changed blocks.
        let config = world.sdk_config(&b.account, &b.region).await;
        let ebs = aws_sdk_ebs::Client::new(&config);
        let listed = ebs
            .list_changed_blocks()
            .first_snapshot_id(a.snapshot_id.as_deref().unwrap())
            .second_snapshot_id(b.snapshot_id.as_deref().unwrap())
            .send()
            .await
            .unwrap();
        let indexes: Vec<usize> = listed
            .changed_blocks()
            .iter()
            .filter_map(|c| c.block_index())
            .map(|i| usize::try_from(i).unwrap())
            .collect();
        assert_eq!(indexes, changed, "{}", b.region);
    }

    // Again: the AMIs are there; nothing is started or written.
    let before = world.api_calls("ami-publisher");
    let (code, r3) = p.publish(stream, "2", &with_targets(&targets, &via));
    assert_eq!(code, 0, "{r3:#?}");
    assert!(r3.targets.iter().all(|t| t.reused), "{r3:#?}");
    let after = world.api_calls("ami-publisher");
    for action in ["StartSnapshot", "PutSnapshotBlock", "CompleteSnapshot", "RegisterImage"] {
        assert_eq!(after.get(action), before.get(action), "a re-run called {action}");
    }

    // Leaf 3 is shorter and ends inside a block: that block is written
    // whole (the image's 100 bytes, then zeros), the parent's data past the
    // new end becomes zeros, and nothing else is written.
    let leaf3 = leaf2[..15 * MIB + 100].to_vec();
    add_image(&world, stream, "3", &leaf3).await;
    let tail_data = leaf2[31 * BLOCK..].chunks(BLOCK).filter(|c| !image_format::is_zero(c)).count() as u64;
    let before = puts();
    let (code, r3) = p.publish(stream, "3", &with_targets(&targets, &["--via", "ebs-direct", "--verify"]));
    assert_eq!(code, 0, "{r3:#?}");
    assert_eq!(puts() - before, (1 + tail_data) * targets.len() as u64, "the last block and the old tail's data");
    for t in &r3.targets {
        assert_eq!(t.verified_chunks, Some(31), "{t:#?}");
        let path = world.snapshot_bytes(t.snapshot_id.as_deref().unwrap(), Duration::from_secs(30)).await.unwrap();
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes[..leaf3.len()] == leaf3[..], "{t:#?}");
        assert!(image_format::is_zero(&bytes[leaf3.len()..leaf2.len()]), "no byte of leaf 2 past leaf 3's end");
    }

    // `verify` of both results files: every chunk of every AMI is its
    // image's, and EBS lists exactly the changed blocks between the leaves.
    let files = results_files(&world, "verify", &[&r1, &r2]);
    let rows_of = |r: &serde_json::Value| r["records"].as_array().unwrap().clone();
    let verify = |extra: &[&str]| {
        let mut args = vec!["verify", "--json"];
        args.extend(extra);
        p.run(&args)
    };
    let out = verify(&[&files[0], &files[1]]);
    let reports = json_of(&out);
    let report_of = |reports: &serde_json::Value, t: &ami_publisher::results::TargetResult| {
        let found = reports.as_array().unwrap().iter().find(|r| r["account"] == t.account && r["region"] == t.region);
        found.unwrap_or_else(|| panic!("no report of {},{}", t.account, t.region)).clone()
    };
    assert_eq!(reports.as_array().unwrap().len(), r2.targets.len());
    for t in &r2.targets {
        let r = report_of(&reports, t);
        let rows = rows_of(&r);
        assert_eq!(rows.len(), 3, "two AMIs and the change between them: {r:#}");
        for (row, leaf) in rows[..2].iter().zip(["1", "2"]) {
            assert_eq!((row["leaf"].as_str(), row["ok"].as_bool()), (Some(leaf), Some(true)), "{row:#}");
            assert_eq!(row["bytes"]["chunks_checked"], blocks, "{row:#}");
            assert!(row["bytes"]["difference"].is_null(), "{row:#}");
        }
        assert_eq!(rows[1]["ami"].as_str(), t.ami_id.as_deref());
        let compared = &rows[2]["changes"]["Compared"];
        assert_eq!((compared["listed"].as_u64(), compared["differ"].as_u64()), (Some(3), Some(3)), "{r:#}");
        assert!(compared["missing"].is_null(), "{r:#}");
    }
    // A spot check reads about its share of the blocks, chosen at random.
    let leaf2_of = format!("{stream}/2");
    let out = verify(&[&with_targets(&targets, &["--leaf", &leaf2_of, "--sample", "25"])[..]].concat());
    for r in json_of(&out).as_array().unwrap() {
        let checked = rows_of(r)[0]["bytes"]["chunks_checked"].as_u64().unwrap();
        assert_eq!(rows_of(r)[0]["ok"], true, "{r:#}");
        assert!((1..blocks).contains(&checked), "{checked} of {blocks}: {r:#}");
    }
    // A block changed behind the publisher's back is named: one byte of
    // block 7 of the first target's snapshot, and data in block 20, which
    // leaf 2 made zeros, of the second's.
    let bad = &r2.targets[..2];
    for (t, (block, byte)) in bad.iter().zip([(7usize, 1000usize), (20, 0)]) {
        let path = world.snapshot_bytes(t.snapshot_id.as_deref().unwrap(), Duration::from_secs(5)).await.unwrap();
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        use std::io::{Read as _, Seek as _, Write as _};
        let at = (block * BLOCK + byte) as u64;
        let mut b = [0u8];
        f.seek(std::io::SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(std::io::SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x5a]).unwrap();
    }
    let out = verify(&[&files[1]]);
    assert_eq!(out.status.code(), Some(1), "a changed block fails verify");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (t, says) in bad.iter().zip(["block 7 (chunk 7) differ", "block 20 (chunk 20) differ: the image has zeros"]) {
        let r = report_of(&reports, t);
        let error = r["error"].as_str().unwrap_or_default();
        assert!(error.contains(t.ami_id.as_deref().unwrap()) && error.contains(says), "{r:#}");
        assert_eq!(rows_of(&r)[0]["ok"], false, "{r:#}");
    }
    for t in &r2.targets[2..] {
        let r = report_of(&reports, t);
        assert!(r["error"].is_null() && rows_of(&r)[0]["ok"] == true, "the others are intact: {r:#}");
    }

    // `publish --verify` of the leaf again: the AMIs are there, but two
    // are not the image any more; they fail, naming the block, before
    // anything is shared or pointed at them.
    let (code, r4) = p.publish(stream, "2", &with_targets(&targets, &["--via", "ebs-direct", "--verify"]));
    assert_eq!(code, 1, "{r4:#?}");
    for (t, block) in r4.targets[..2].iter().zip(["block 7 (chunk 7)", "block 20 (chunk 20)"]) {
        let e = t.error.as_deref().unwrap_or_default();
        assert!(e.contains("--verify") && e.contains(block), "{t:#?}");
    }
    for t in &r4.targets[2..] {
        assert!(t.ok() && t.reused && t.verified_chunks == Some(blocks), "{t:#?}");
    }

    // `export-snapshot` of an AMI: its bytes, as a raw file imagetool adds
    // as a leaf of another stream, every chunk the imageserver has already.
    let t = &r2.targets[2];
    let file = world.path("exported.raw");
    let source = format!("{},{},{}", t.account, t.region, t.ami_id.as_deref().unwrap());
    let out = json_of(&p.run(&["export-snapshot", &source, file.to_str().unwrap(), "--json"]));
    assert_eq!(out["snapshot"].as_str(), t.snapshot_id.as_deref(), "{out:#}");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, out["size_bytes"].as_u64().unwrap(), "the volume's size");
    assert!(bytes[..leaf2.len()] == leaf2[..], "the exported file holds the image");
    assert!(image_format::is_zero(&bytes[leaf2.len()..]), "and zeros past it");
    assert!(!world.path(".exported.raw.part").exists(), "no partial file is left");
    let builder = world.pki.role(fleet_pki::Role::ImageBuilder).unwrap();
    let mut c = imagetool::client::connect(&world.imageserver_addr(), &builder).await.unwrap();
    let name = image_format::ImageName::new("apps/imported", "1").unwrap();
    let added = imagetool::add(&mut c, &name, &file, 524_288, imagetool::Progress::Hidden).await.unwrap();
    assert_eq!(added.bytes_sent, 0, "every chunk was there: {added:?}");
    // A snapshot that is not there is named.
    let out = p.run(&["export-snapshot", &format!("{},{},snap-0000000000000000a", t.account, t.region), "/tmp/x.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("snap-0000000000000000a"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ebs_direct_publish_killed_mid_upload_is_finished_by_a_rerun_with_one_snapshot_per_target() {
    const BLOCK: usize = 524_288;
    // At a fifth of EC2's pace, one block in flight: a write takes 16 to 40 ms.
    let world = World::start(&Plan::new(&["us-east-1"]).time_scale(0.2)).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "apps/killed";
    let image = disk(64 * MIB, 41);
    add_image(&world, stream, "1", &image).await;
    let puts = || world.api_outcomes("ami-publisher", "ok").get("PutSnapshotBlock").copied().unwrap_or(0);
    let mut args = vec!["publish", stream, "1"];
    args.extend(with_targets(&targets, &["--via", "ebs-direct", "--blocks-in-flight", "1"]));
    let (mut child, _log) = p.spawn(&args);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while puts() < 16 {
        assert!(child.try_wait().unwrap().is_none(), "the publish ended before it was killed");
        assert!(std::time::Instant::now() < deadline, "no block was written");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let written = puts();
    let blocks = (image.len() / BLOCK) as u64;
    assert!(written < blocks * targets.len() as u64, "killed after {written} writes: nothing left to resume");

    // What the killed run left: unfinished snapshots, EBS's kind.
    let digest_filter = |digest: &str| Filter::builder().name("tag:ImageDigest").values(digest).build();
    let image_id = {
        let builder = world.pki.role(fleet_pki::Role::ImageBuilder).unwrap();
        let mut c = imagetool::client::connect(&world.imageserver_addr(), &builder).await.unwrap();
        let name = image_format::ImageName::new(stream, "1").unwrap();
        image_client::get_manifest(&mut c, &name).await.unwrap().1.image_id().to_hex()
    };
    let mut left = std::collections::HashMap::new();
    for t in &world.targets {
        let ec2 = world.ec2(&t.account, &t.region).await;
        let found = ec2.describe_snapshots().owner_ids("self").filters(digest_filter(&image_id)).send().await.unwrap();
        for s in found.snapshots() {
            assert_eq!(s.state().map(|s| s.as_str()), Some("pending"), "{s:?}");
            assert_eq!(s.volume_id(), Some("vol-ffffffff"), "{s:?}");
        }
        assert!(found.snapshots().len() <= 1, "{:?}", found.snapshots());
        if let Some(s) = found.snapshots().first() {
            left.insert((t.account.clone(), t.region.clone()), s.snapshot_id().unwrap().to_owned());
        }
    }
    assert!(!left.is_empty(), "the killed run started no snapshot");

    // Meanwhile another leaf of the stream is published: a newer parent,
    // which must not keep the killed run's snapshot from being resumed.
    let mut image2 = image.clone();
    image2[..BLOCK].copy_from_slice(&test_support::noise(BLOCK, 42));
    add_image(&world, stream, "2", &image2).await;
    let (code, r2) = p.publish(stream, "2", &with_targets(&targets, &["--via", "ebs-direct"]));
    assert_eq!(code, 0, "{r2:#?}");
    let mut plan_args = vec!["publish", stream, "1", "--dry-run", "--json"];
    plan_args.extend(with_targets(&targets, &["--via", "ebs-direct"]));
    for t in json_of(&p.run(&plan_args)).as_array().unwrap() {
        if let Some(was) =
            left.get(&(t["account"].as_str().unwrap().to_owned(), t["region"].as_str().unwrap().to_owned()))
        {
            let parent = t["parent"].as_str().unwrap();
            assert!(parent.starts_with(&format!("resume {was}")) && parent.contains("(none"), "{t:#}");
        }
    }

    // The re-run finishes each target's snapshot (the same one, by its
    // client token), and leaves no other.
    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &["--via", "ebs-direct", "--verify"]));
    assert_eq!(code, 0, "{r:#?}");
    for t in &r.targets {
        assert!(t.ok() && !t.reused, "{t:#?}");
        assert_eq!(t.verified_chunks, Some(blocks), "the bytes are the image's: {t:#?}");
        if let Some(was) = left.get(&(t.account.clone(), t.region.clone())) {
            assert_eq!(t.snapshot_id.as_ref(), Some(was), "the killed run's snapshot is finished, not another");
        }
        let ec2 = world.ec2(&t.account, &t.region).await;
        let found = ec2.describe_snapshots().owner_ids("self").filters(digest_filter(&image_id)).send().await.unwrap();
        let ids: Vec<_> = found.snapshots().iter().filter_map(|s| s.snapshot_id()).collect();
        assert_eq!(ids, [t.snapshot_id.as_deref().unwrap()], "one snapshot in {},{}", t.account, t.region);
        assert_eq!(
            Some(root_snapshot_of(&world, &t.account, &t.region, t.ami_id.as_deref().unwrap()).await),
            t.snapshot_id
        );
    }
    let starts = world.api_outcomes("ami-publisher", "ok").get("StartSnapshot").copied().unwrap_or(0);
    assert!(
        starts <= (2 * targets.len() + left.len()) as u64,
        "{starts} starts: one per target and leaf, and one again per snapshot resumed"
    );
}

/// A snapshot the EBS direct APIs wrote without a parent must hold every
/// block of the image: one never written reads as noise on a volume,
/// though EBS lists nothing there. `verify` names it even where the image
/// has zeros (which an unlisted block would otherwise pass for).
#[tokio::test(flavor = "multi_thread")]
async fn verify_names_a_block_never_written_in_a_snapshot_without_a_parent() {
    use aws_sdk_ebs::{primitives::ByteStream, types::ChecksumAlgorithm};
    use sha2::Digest as _;
    const BLOCK: usize = 524_288;
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "apps/holes";
    let image = disk(8 * MIB, 51);
    add_image(&world, stream, "1", &image).await;
    let (code, r) = p.publish(stream, "1", &with_targets(&targets, &["--via", "ebs-direct", "--verify"]));
    assert_eq!(code, 0, "{r:#?}");
    let t = &r.targets[0];
    let ec2 = world.ec2(&t.account, &t.region).await;
    let snap = ec2.describe_snapshots().snapshot_ids(t.snapshot_id.as_deref().unwrap()).send().await.unwrap();
    let parent = ami_publisher::tags::value(snap.snapshots()[0].tags(), "ImageParentSnapshot");
    assert_eq!(parent, Some("none"), "the snapshot says it has no parent");

    // The same leaf written by hand as the tool, but for zero block 5.
    let skipped = 5;
    assert!(image_format::is_zero(&image[skipped * BLOCK..(skipped + 1) * BLOCK]));
    let ebs = tool_ebs(&world, &t.account, &t.region).await;
    let tag = |k: &str, v: &str| aws_sdk_ebs::types::Tag::builder().key(k).value(v).build();
    let started = ebs
        .start_snapshot()
        .volume_size(1)
        .encrypted(true)
        .client_token("holed")
        .tags(tag("ManagedBy", "ami-fleet"))
        .tags(tag("ImageParentSnapshot", "none"))
        .send()
        .await
        .unwrap();
    let holed = started.snapshot_id().unwrap().to_owned();
    for (i, block) in image.chunks(BLOCK).enumerate().filter(|(i, _)| *i != skipped) {
        let sha = sha2::Sha256::digest(block);
        once_known(|| {
            ebs.put_snapshot_block()
                .snapshot_id(&holed)
                .block_index(i32::try_from(i).unwrap())
                .data_length(524_288)
                .checksum(aws_smithy_types::base64::encode(sha))
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(block.to_vec()))
                .send()
        })
        .await;
    }
    ebs.complete_snapshot()
        .snapshot_id(&holed)
        .changed_blocks_count(i32::try_from(image.len() / BLOCK - 1).unwrap())
        .send()
        .await
        .unwrap();
    let own = world.ec2(&t.account, &t.region).await;
    {
        use aws_sdk_ec2::client::Waiters as _;
        own.wait_until_snapshot_completed().snapshot_ids(&holed).wait(Duration::from_secs(60)).await.unwrap();
    }
    register_snapshot(
        &own,
        &holed,
        "holed",
        &[("ImageStream", stream), ("ImageLeaf", "1"), ("ImageDigest", &r.image_id)],
    )
    .await;
    let out = p.run(&with_targets(&targets, &["verify", "--json", "--leaf", "apps/holes/1"]));
    assert_eq!(out.status.code(), Some(1), "a never-written block fails verify");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = reports[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("block {skipped} (chunk {skipped})")) && error.contains("never written"),
        "{reports:#}"
    );
}
