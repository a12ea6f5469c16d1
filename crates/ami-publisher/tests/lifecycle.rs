//! Issue 21: an AMI's life after publish: deprecation, deregistration
//! protection (and the commands that deregister keeping protected AMIs),
//! disabling, and usage that counts what EC2 finds referencing an AMI.

mod common;

use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Image;
use common::*;
use local_world::{Plan, World};
use serde_json::Value;

async fn image(world: &World, ami: &str) -> Option<Image> {
    let ec2 = world.ec2("first", "us-east-1").await;
    let out = ec2.describe_images().image_ids(ami).include_disabled(true).send().await.ok()?;
    out.images().first().cloned()
}

fn rows(p: &Publisher<'_>, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend(args);
    records(&json_of(&p.run(&all)))
}

fn deregisters(world: &World) -> u64 {
    world.api_calls("ami-publisher").get("DeregisterImage").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_amis_life_is_changed_and_guarded_as_asked() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let stream = "base/life";
    add_image(&world, stream, "1", &disk(4 * MIB, 41)).await;
    add_image(&world, stream, "2", &disk(4 * MIB, 42)).await;
    let target = ["--targets", "first,us-east-1"];

    // The plan says what the AMI would be given.
    let plan = json_of(
        &p.run(
            &[
                &["--json", "--dry-run", "publish", stream, "1"][..],
                &target,
                &["--deprecate-in", "30d", "--deregistration-protection"],
            ]
            .concat(),
        ),
    );
    let gives: Vec<&str> = plan[0]["gives"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(gives.len(), 2, "{plan}");
    assert!(gives[0].starts_with("deprecation at "), "{gives:?}");
    assert_eq!(gives[1], "deregistration protection on");

    // Published deprecated in 30 days, and protected.
    let before = SystemTime::now();
    let (code, one) =
        p.publish(stream, "1", &[&target[..], &["--deprecate-in", "30d", "--deregistration-protection"]].concat());
    assert_eq!(code, 0);
    let t = &one.targets[0];
    let ami = t.ami_id.clone().unwrap();
    let img = image(&world, &ami).await.unwrap();
    let shown = humantime::parse_rfc3339_weak(img.deprecation_time().unwrap().trim_end_matches('Z')).unwrap();
    let want = before + Duration::from_secs(30 * 24 * 3600);
    let off = shown.duration_since(want).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_secs(120), "deprecated at {shown:?}, asked {want:?}");
    assert_eq!(img.deregistration_protection(), Some("enabled-without-cooldown"));
    assert_eq!(t.deregistration_protection.as_deref(), Some("on"));
    assert!(t.deprecation_time.is_some());
    // A re-run keeps the time it has.
    let (code, again) = p.publish(stream, "1", &[&target[..], &["--deprecate-in", "60d"]].concat());
    assert_eq!(code, 0);
    assert!(again.targets[0].reused);
    assert_eq!(image(&world, &ami).await.unwrap().deprecation_time(), img.deprecation_time());
    let results = world.path("life-1.json");
    ami_publisher::results::write_json_atomic(&results, &one).unwrap();
    let results = results.to_str().unwrap();

    // delete keeps a protected AMI, and says why; a dry run with
    // --lift-protection says what it would do, and does nothing.
    let kept = rows(&p, &["delete", results]);
    assert!(kept.iter().any(|r| r["action"] == "kept" && r["detail"].as_str().unwrap().contains("deregistration protection is on")), "{kept:?}");
    assert_eq!(deregisters(&world), 0);
    let m = mark(&world);
    let would = rows(&p, &["--dry-run", "--lift-protection", "delete", results]);
    let actions: Vec<&str> = would.iter().filter_map(|r| r["action"].as_str()).collect();
    assert_eq!(&actions[..2], ["would unprotect", "would deregister"], "{would:?}");
    assert_eq!(writes_since(&world, &m), Vec::<String>::new());
    assert!(image(&world, &ami).await.is_some());

    // Undeprecate, disable (no launch), enable.
    let done = rows(&p, &["undeprecate", results]);
    assert_eq!(done[0]["action"], "undeprecate", "{done:?}");
    assert_eq!(image(&world, &ami).await.unwrap().deprecation_time(), None);
    assert_eq!(rows(&p, &["undeprecate", results])[0]["action"], "kept");
    // By leaf, in the targets given (results files or --leaf, not both).
    let both = p.run(&["disable", results, "--leaf", "base/life/1"]);
    assert_eq!(both.status.code(), Some(2), "{}", String::from_utf8_lossy(&both.stderr));
    assert_eq!(rows(&p, &["disable", "--leaf", "base/life/1", "--targets", "first,us-east-1"])[0]["action"], "disable");
    assert_eq!(image(&world, &ami).await.unwrap().state().map(|s| s.as_str()), Some("disabled"));
    let ec2 = world.ec2("first", "us-east-1").await;
    let subnet = world.targets[0].subnet_id.clone();
    let launch = ec2.run_instances().image_id(&ami).min_count(1).max_count(1).subnet_id(&subnet).send().await;
    assert_eq!(aws_sdk_ec2::error::ProvideErrorMetadata::code(&launch.unwrap_err()), Some("InvalidAMIID.Unavailable"));
    assert_eq!(rows(&p, &["enable", results])[0]["action"], "enable");
    assert_eq!(image(&world, &ami).await.unwrap().state().map(|s| s.as_str()), Some("available"));

    // Protection with a cooldown: expire keeps it; --lift-protection turns
    // protection off, and the cooldown still keeps it.
    let (code, two) = p.publish(
        stream,
        "2",
        &[&target[..], &["--expires-in", "1s", "--deregistration-protection=cooldown"]].concat(),
    );
    assert_eq!(code, 0);
    let ami2 = two.targets[0].ami_id.clone().unwrap();
    assert_eq!(image(&world, &ami2).await.unwrap().deregistration_protection(), Some("enabled-with-cooldown"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = rows(&p, &["--targets", "first,us-east-1", "expire"]);
    assert!(kept.iter().any(|r| r["resource"] == ami2.as_str() && r["action"] == "kept"), "{kept:?}");
    let lifted = rows(&p, &["--targets", "first,us-east-1", "--lift-protection", "expire"]);
    assert!(lifted.iter().any(|r| r["resource"] == ami2.as_str() && r["action"] == "unprotect"), "{lifted:?}");
    assert!(
        lifted.iter().any(|r| r["resource"] == ami2.as_str() && r["detail"].as_str().unwrap().contains("cooldown")),
        "{lifted:?}"
    );
    let shown = image(&world, &ami2).await.unwrap();
    assert!(shown.deregistration_protection().unwrap().starts_with("disabled after "), "{shown:?}");
    let still = rows(&p, &["--targets", "first,us-east-1", "--lift-protection", "expire"]);
    assert!(
        still.iter().any(
            |r| r["resource"] == ami2.as_str() && r["detail"].as_str().unwrap().contains("cooldown holds it until")
        ),
        "{still:?}"
    );
    assert_eq!(deregisters(&world), 0, "nothing protected was deregistered");

    // Unprotected, the first goes.
    assert_eq!(rows(&p, &["unprotect", results])[0]["action"], "unprotect");
    let gone = rows(&p, &["delete", results]);
    assert!(gone.iter().any(|r| r["action"] == "deregister"), "{gone:?}");
    assert!(image(&world, &ami).await.is_none());
}

/// An image counts as used when EC2 finds an instance, a launch template
/// or an SSM parameter referencing it, when a labelled version of the
/// fleet's pointer holds it, or when it was launched within
/// --min-unused-age; delete-unused-images removes only the rest.
#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_references_pointers_and_recent_launches() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let ec2 = world.ec2("first", "us-east-1").await;
    let ssm = aws_sdk_ssm::Client::new(&world.sdk_config("first", "us-east-1").await);
    let zone = world.targets[0].availability_zone.clone();
    let subnet = world.targets[0].subnet_id.clone();
    let stream = "base/used";
    let made = |leaf: &'static str| {
        let ec2 = ec2.clone();
        let zone = zone.clone();
        let world = &world;
        async move {
            let tags = [("ImageStream", stream), ("ImageLeaf", leaf), ("ManagedBy", "ami-fleet")];
            let ami = register_by_hand(&ec2, &zone, &format!("{stream}/{leaf}"), &tags).await;
            // Its snapshot is the tool's too, as a publish would leave it.
            let snap = root_snapshot_of(world, "first", "us-east-1", &ami).await;
            let tag = aws_sdk_ec2::types::Tag::builder().key("ManagedBy").value("ami-fleet").build();
            ec2.create_tags().resources(snap).tags(tag).send().await.unwrap();
            ami
        }
    };
    let (templated, parameter, launched, pointed, unused, guarded, old) = (
        made("1").await,
        made("2").await,
        made("3").await,
        made("4").await,
        made("5").await,
        made("6").await,
        made("7").await,
    );
    ec2.enable_image_deregistration_protection().image_id(&guarded).send().await.unwrap();
    ec2.create_launch_template()
        .launch_template_name("web")
        .launch_template_data(aws_sdk_ec2::types::RequestLaunchTemplateData::builder().image_id(&templated).build())
        .send()
        .await
        .unwrap();
    let pointer = "/ami-fleet/base/used/latest";
    // Three versions: an old leaf (labelled, but neither current nor what
    // a rollback goes back to), the rollback target, the current one.
    for (ami, label) in [(&old, "leaf-7"), (&pointed, "leaf-4"), (&parameter, "leaf-2")] {
        let put = ssm
            .put_parameter()
            .name(pointer)
            .value(ami)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .unwrap();
        ssm.label_parameter_version()
            .name(pointer)
            .parameter_version(put.version())
            .labels(label)
            .send()
            .await
            .unwrap();
    }
    let run =
        ec2.run_instances().image_id(&launched).min_count(1).max_count(1).subnet_id(&subnet).send().await.unwrap();
    let instance = run.instances()[0].instance_id().unwrap().to_owned();
    ec2.terminate_instances().instance_ids(&instance).send().await.unwrap();

    let search = [
        "--targets",
        "first,us-east-1",
        "--search-tags",
        "ImageStream=base/used",
        "--ssm-parameter",
        "/ami-fleet/{stream}/latest",
        "--min-unused-age",
        "1h",
    ];
    let used = rows(&p, &[&["list-used-images"][..], &search].concat());
    let why = |ami: &str| -> String {
        used.iter().find(|r| r["ami"] == ami).map(|r| r["used_by"].as_str().unwrap().to_owned()).unwrap_or_default()
    };
    assert!(why(&templated).starts_with("launch template lt-"), "{used:?}");
    assert!(why(&parameter).contains(&format!("parameter {pointer}")), "{used:?}");
    assert!(why(&parameter).contains(&format!("pointer {pointer} (current)")), "{used:?}");
    assert!(why(&launched).starts_with("launched "), "a terminated instance is no use; the launch is: {used:?}");
    assert_eq!(why(&pointed), format!("pointer {pointer} (what rollback goes back to)"), "{used:?}");
    let unused_rows = rows(&p, &[&["list-unused-images"][..], &search].concat());
    let mut unused_ids: Vec<&str> = unused_rows.iter().filter_map(|r| r["ami"].as_str()).collect();
    unused_ids.sort_unstable();
    let mut want = vec![unused.as_str(), guarded.as_str(), old.as_str()];
    want.sort_unstable();
    assert_eq!(unused_ids, want);
    // Without the window, the launched image counts as unused.
    let plain = rows(&p, &[&["list-unused-images"][..], &search[..6]].concat());
    let mut plain: Vec<&str> = plain.iter().filter_map(|r| r["ami"].as_str()).collect();
    plain.sort_unstable();
    let mut want = vec![launched.as_str(), unused.as_str(), guarded.as_str(), old.as_str()];
    want.sort_unstable();
    assert_eq!(plain, want);

    let m = mark(&world);
    let would = rows(&p, &[&["--dry-run", "delete-unused-images"][..], &search].concat());
    assert!(would.iter().all(|r| r["resource"] != templated.as_str()), "{would:?}");
    assert_eq!(would.iter().filter(|r| r["action"] == "would deregister").count(), 2, "{would:?}");
    assert_eq!(writes_since(&world, &m), Vec::<String>::new());
    let done = rows(&p, &[&["delete-unused-images"][..], &search].concat());
    assert_eq!(done.iter().filter(|r| r["action"] == "deregister").count(), 2, "{done:?}");
    let guard = done.iter().find(|r| r["resource"] == guarded.as_str()).unwrap();
    assert_eq!(guard["action"], "kept", "{done:?}");
    assert!(guard["detail"].as_str().unwrap().contains("deregistration protection is on"), "{guard}");
    assert!(image(&world, &unused).await.is_none());
    assert!(image(&world, &old).await.is_none(), "an old labelled pointer version holds nothing");
    for kept in [&templated, &parameter, &launched, &pointed, &guarded] {
        assert!(image(&world, kept).await.is_some(), "{kept} was deleted");
    }
}

/// `retire` takes each old AMI of a stream through the steps its age calls
/// for, leaving the newest and any in use; its --dry-run plan is what the
/// real run then does.
#[tokio::test(flavor = "multi_thread")]
async fn retire_plans_what_it_then_does_and_spares_the_newest_and_the_used() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let ec2 = world.ec2("first", "us-east-1").await;
    let zone = world.targets[0].availability_zone.clone();
    let stream = "base/old";
    let mut amis = Vec::new();
    for leaf in ["1", "2", "3", "4"] {
        let tags = [("ImageStream", stream), ("ImageLeaf", leaf), ("ManagedBy", "ami-fleet")];
        let ami = register_by_hand(&ec2, &zone, &format!("{stream}/{leaf}"), &tags).await;
        let snap = root_snapshot_of(&world, "first", "us-east-1", &ami).await;
        let tag = aws_sdk_ec2::types::Tag::builder().key("ManagedBy").value("ami-fleet").build();
        ec2.create_tags().resources(snap).tags(tag).send().await.unwrap();
        amis.push(ami);
        // Creation times are to the second: one each.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (old, used, older, newest) = (&amis[0], &amis[1], &amis[2], &amis[3]);
    ec2.create_launch_template()
        .launch_template_name("still-used")
        .launch_template_data(aws_sdk_ec2::types::RequestLaunchTemplateData::builder().image_id(used).build())
        .send()
        .await
        .unwrap();
    let target = ["--targets", "first,us-east-1"];
    let plan_and_run = |steps: &[&str]| {
        let mut dry = vec!["--dry-run", "retire", stream];
        dry.extend(&target);
        dry.extend(steps);
        let m = mark(&world);
        let plan = rows(&p, &dry);
        assert_eq!(writes_since(&world, &m), Vec::<String>::new(), "the plan changed things");
        let run = rows(&p, &dry[1..]);
        let strip = |r: &Value| {
            let a = r["action"].as_str().unwrap();
            (a.strip_prefix("would ").unwrap_or(a).to_owned(), r["resource"].as_str().unwrap().to_owned())
        };
        assert_eq!(plan.iter().map(strip).collect::<Vec<_>>(), run.iter().map(strip).collect::<Vec<_>>());
        run
    };
    let acted = |rows: &[Value], action: &str| -> Vec<String> {
        let mut v: Vec<String> =
            rows.iter().filter(|r| r["action"] == action).map(|r| r["resource"].as_str().unwrap().to_owned()).collect();
        v.sort();
        v
    };
    let mut stale = vec![old.clone(), older.clone()];
    stale.sort();

    let run = plan_and_run(&["--keep", "1", "--deprecate-after", "0s", "--delete-after", "1d"]);
    assert_eq!(acted(&run, "deprecate"), stale, "{run:?}");
    let kept =
        |ami: &str| run.iter().find(|r| r["resource"] == ami && r["action"] == "kept").map(|r| r["detail"].clone());
    assert_eq!(kept(newest), Some(Value::from("one of the 1 newest")));
    assert!(kept(used).unwrap().as_str().unwrap().starts_with("in use: launch template"), "{run:?}");
    for a in &stale {
        assert!(image(&world, a).await.unwrap().deprecation_time().is_some());
    }

    let run = plan_and_run(&["--keep", "1", "--disable-after", "0s"]);
    assert_eq!(acted(&run, "disable"), stale, "{run:?}");
    let run = plan_and_run(&["--keep", "1", "--delete-after", "0s"]);
    assert_eq!(acted(&run, "deregister"), stale, "{run:?}");
    for a in &stale {
        assert!(image(&world, a).await.is_none(), "{a} is still there");
    }
    for a in [newest, used] {
        assert_eq!(image(&world, a).await.unwrap().state().map(|s| s.as_str()), Some("available"));
    }
}
