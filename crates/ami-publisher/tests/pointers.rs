//! Issue 21: the fleet's pointer, an SSM parameter of data type
//! aws:ec2:image per target, moved by publish, promote and rollback, and
//! shown by list-pointers; on the local world, 2 accounts x 2 regions.

mod common;

use std::time::Duration;

use common::*;
use local_world::{Plan, World};
use serde_json::Value;

const POINTER: &str = "/ami-fleet/{stream}/latest";

async fn ssm(world: &World, account: &str, region: &str) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::new(&world.sdk_config(account, region).await)
}

/// Where a parameter (or `NAME:SELECTOR`) points, as Parameter Store answers.
async fn resolve(world: &World, account: &str, region: &str, name: &str) -> Option<String> {
    let got = ssm(world, account, region).await.get_parameter().name(name).send().await;
    got.ok().and_then(|o| o.parameter().and_then(|p| p.value()).map(str::to_owned))
}

async fn versions(world: &World, account: &str, region: &str, name: &str) -> Vec<String> {
    let h = ssm(world, account, region).await.get_parameter_history().name(name).send().await.unwrap();
    h.parameters().iter().map(|p| p.value().unwrap_or_default().to_owned()).collect()
}

fn puts(world: &World) -> u64 {
    world.api_calls("ami-publisher").get("PutParameter").copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleets_pointer_follows_publish_promote_and_rollback_in_every_target() {
    let world = World::start(&Plan::of(&["first", "second"], &["us-east-1", "eu-west-1"])).await.unwrap();
    let p = Publisher::new(&world);
    let targets = targets_of(&world);
    let stream = "base/fleet";
    let name = "/ami-fleet/base/fleet/latest";
    add_image(&world, stream, "1", &disk(4 * MIB, 31)).await;
    add_image(&world, stream, "2", &disk(4 * MIB, 32)).await;
    let with_pointer = with_targets(&targets, &["--ssm-parameter", POINTER]);

    // The plan names the pointer and what the run would do to it.
    let mut dry = vec!["--json", "--dry-run", "publish", stream, "1"];
    dry.extend(&with_pointer);
    let plan = json_of(&p.run(&dry));
    for t in plan.as_array().unwrap() {
        let line = t["pointer"].as_str().unwrap_or_default();
        assert!(line.starts_with(&format!("{name} is not there: would create it")), "{t}");
    }
    assert_eq!(puts(&world), 0, "a plan writes no parameter");

    // Publish leaf 1 with the pointer: it resolves to the leaf's AMI everywhere.
    let (code, one) = p.publish(stream, "1", &with_pointer);
    assert_eq!(code, 0);
    for t in &one.targets {
        let ami = t.ami_id.clone().unwrap();
        assert_eq!(t.ssm_parameter.as_deref(), Some(name), "{t:?}");
        assert_eq!(t.ssm_version, Some(1), "{t:?}");
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, Some(ami.clone()));
        assert_eq!(resolve(&world, &t.account, &t.region, &format!("{name}:leaf-1")).await, Some(ami));
        let got = ssm(&world, &t.account, &t.region).await.get_parameter().name(name).send().await.unwrap();
        assert_eq!(got.parameter().unwrap().data_type(), Some("aws:ec2:image"));
    }
    // A re-run writes no new version.
    let before = puts(&world);
    let (code, again) = p.publish(stream, "1", &with_pointer);
    assert_eq!(code, 0);
    assert!(again.targets.iter().all(|t| t.reused && t.ssm_version == Some(1)), "{again:?}");
    assert_eq!(puts(&world), before);

    // Leaf 2 published without the pointer leaves it; promote moves it.
    let (code, two) = p.publish(stream, "2", &with_targets(&targets, &[]));
    assert_eq!(code, 0);
    for t in &two.targets {
        let first = one.targets.iter().find(|o| o.account == t.account && o.region == t.region).unwrap();
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, first.ami_id);
    }
    let before = puts(&world);
    let mut promote = vec!["--json", "--dry-run", "promote", stream, "2"];
    promote.extend(&with_pointer);
    let would = records(&json_of(&p.run(&promote)));
    assert_eq!(would.iter().filter(|r| r["action"] == "would point").count(), 4, "{would:?}");
    assert_eq!(puts(&world), before, "a dry run moves nothing");
    promote.remove(1);
    let done = records(&json_of(&p.run(&promote)));
    assert_eq!(done.iter().filter(|r| r["action"] == "point").count(), 4, "{done:?}");
    for t in &two.targets {
        let (a, r) = (&t.account, &t.region);
        let first = one.targets.iter().find(|o| &o.account == a && &o.region == r).unwrap();
        assert_eq!(resolve(&world, a, r, name).await, t.ami_id);
        assert_eq!(resolve(&world, a, r, &format!("{name}:leaf-2")).await, t.ami_id);
        assert_eq!(resolve(&world, a, r, &format!("{name}:leaf-1")).await, first.ami_id, "old labels keep resolving");
        assert_eq!(versions(&world, a, r, name).await, [first.ami_id.clone().unwrap(), t.ami_id.clone().unwrap()]);
    }

    // Leaf 1 published again (reused) leaves the pointer at the newer leaf 2.
    let (code, _) = p.publish(stream, "1", &with_pointer);
    assert_eq!(code, 0);
    for t in &two.targets {
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, t.ami_id, "not moved back");
    }

    // Rollback: every target back at leaf 1, as a new version.
    let mut rollback = vec!["--json", "rollback", stream];
    rollback.extend(&with_pointer);
    let back = records(&json_of(&p.run(&rollback)));
    assert_eq!(back.iter().filter(|r| r["action"] == "point back").count(), 4, "{back:?}");
    for t in &one.targets {
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, t.ami_id);
        assert_eq!(versions(&world, &t.account, &t.region, name).await.len(), 3, "the history is kept");
    }
    // Run again (a retried job): a rollback is not rolled back.
    let again = records(&json_of(&p.run(&rollback)));
    assert!(
        again.iter().all(|r| r["action"] == "kept" && r["detail"].as_str().unwrap().starts_with("rolled back already")),
        "{again:?}"
    );
    for t in &one.targets {
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, t.ami_id);
        assert_eq!(versions(&world, &t.account, &t.region, name).await.len(), 3);
    }

    // A target without leaf 2 blocks promote, unless --partial.
    let gone = &two.targets[0];
    let home = world.ec2(&gone.account, &gone.region).await;
    home.deregister_image().image_id(gone.ami_id.as_deref().unwrap()).send().await.unwrap();
    let before = puts(&world);
    let out = p.run(&promote);
    assert_eq!(out.status.code(), Some(1));
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed: Vec<&Value> = reports.as_array().unwrap().iter().filter(|r| r["error"].is_string()).collect();
    assert_eq!(failed.len(), 1, "{reports}");
    assert!(failed[0]["error"].as_str().unwrap().contains("no AMI of base/fleet/2 here"), "{reports}");
    assert!(records(&reports).iter().all(|r| r["action"] == "kept"), "{reports}");
    assert_eq!(puts(&world), before, "nothing moved");
    promote.push("--partial");
    let out = p.run(&promote);
    assert_eq!(out.status.code(), Some(1), "the target without the leaf still fails");
    assert_eq!(records(&serde_json::from_slice(&out.stdout).unwrap()).len(), 3);
    for t in &two.targets[1..] {
        assert_eq!(resolve(&world, &t.account, &t.region, name).await, t.ami_id);
    }
    let left = one.targets.iter().find(|o| o.account == gone.account && o.region == gone.region).unwrap();
    assert_eq!(resolve(&world, &gone.account, &gone.region, name).await, left.ami_id, "left at leaf 1");

    // list-pointers: three at leaf 2, one disagreeing at leaf 1.
    let mut list = vec!["--json", "list-pointers", stream];
    list.extend(&with_pointer);
    let rows = records(&json_of(&p.run(&list)));
    assert_eq!(rows.iter().filter(|r| r["state"] == "ok" && r["leaf"] == "2").count(), 3, "{rows:?}");
    let odd: Vec<&Value> = rows.iter().filter(|r| r["leaf"] == "1").collect();
    assert_eq!(odd.len(), 1, "{rows:?}");
    assert_eq!(odd[0]["state"], "disagrees: most targets point at leaf 2");

    // A pointer at an AMI that is gone is reported, and fails its target.
    home.deregister_image().image_id(left.ami_id.as_deref().unwrap()).send().await.unwrap();
    let out = p.run(&list);
    assert_eq!(out.status.code(), Some(1));
    let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = reports.as_array().unwrap().iter().find(|r| r["error"].is_string()).unwrap();
    assert_eq!(
        (bad["account"].as_str(), bad["region"].as_str()),
        (Some(gone.account.as_str()), Some(gone.region.as_str()))
    );
    assert!(
        bad["error"].as_str().unwrap().contains(&format!("{name} points at AMI {}", left.ami_id.as_deref().unwrap())),
        "{bad}"
    );
}

/// Parameter Store checks an aws:ec2:image value after PutParameter has
/// answered, and drops one that is no AMI of the account: the pointer
/// reports it instead of taking the answer for success, and the parameter
/// keeps what it held.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_parameter_store_drops_after_answering_is_reported() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let config = world.sdk_config_as("ami-publisher", "first", "us-east-1").await.unwrap();
    let client = aws_sdk_ssm::Client::new(&config);
    let name = "/ami-fleet/checked/latest";
    let wait = Duration::from_secs(15);
    let err = ami_publisher::pointer::point(&client, name, "ami-0123456789abcdef0", "1", wait).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("did not accept ami-0123456789abcdef0 as version 1"), "{text}");
    assert_eq!(resolve(&world, "first", "us-east-1", name).await, None, "never created");
    // An AMI of the account is taken, then a wrong one leaves it in place.
    let ec2 = world.ec2("first", "us-east-1").await;
    let zone = world.targets[0].availability_zone.clone();
    let ami = register_by_hand(&ec2, &zone, "pointer-check", &[("Purpose", "pointer-check")]).await;
    let ok = ami_publisher::pointer::point(&client, name, &ami, "1", wait).await.unwrap();
    assert!(ok.wrote);
    let err = ami_publisher::pointer::point(&client, name, "ami-0fedcba9876543210", "2", wait).await.unwrap_err();
    assert!(format!("{err:#}").contains("did not accept"), "{err:#}");
    assert_eq!(resolve(&world, "first", "us-east-1", name).await, Some(ami.clone()));
    assert_eq!(resolve(&world, "first", "us-east-1", &format!("{name}:leaf-1")).await, Some(ami));
}

/// Parameter Store keeps 100 versions of a parameter and refuses a 101st
/// while the oldest carries a label: the pointer takes that label off and
/// writes, and says so in its log.
#[tokio::test(flavor = "multi_thread")]
async fn a_pointer_with_a_hundred_versions_makes_room_for_the_next() {
    let world = World::start(&Plan::of(&["first"], &["us-east-1"])).await.unwrap();
    let ec2 = world.ec2("first", "us-east-1").await;
    let zone = world.targets[0].availability_zone.clone();
    let (a, b) = (
        register_by_hand(&ec2, &zone, "hundred-a", &[("Purpose", "pointer")]).await,
        register_by_hand(&ec2, &zone, "hundred-b", &[("Purpose", "pointer")]).await,
    );
    let name = "/ami-fleet/full/latest";
    let world_ssm = ssm(&world, "first", "us-east-1").await;
    for i in 0..100 {
        let value = if i % 2 == 0 { &a } else { &b };
        world_ssm
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(i > 0)
            .send()
            .await
            .unwrap();
    }
    world_ssm.label_parameter_version().name(name).parameter_version(1).labels("leaf-old").send().await.unwrap();
    let config = world.sdk_config_as("ami-publisher", "first", "us-east-1").await.unwrap();
    let client = aws_sdk_ssm::Client::new(&config);
    // The parameter holds b (version 100): pointing at a needs a 101st.
    let pointed = ami_publisher::pointer::point(&client, name, &a, "new", Duration::from_secs(30)).await.unwrap();
    assert!(pointed.wrote);
    assert_eq!(pointed.version, 101);
    assert_eq!(pointed.unlabelled, ["leaf-old"]);
    assert_eq!(resolve(&world, "first", "us-east-1", name).await, Some(a.clone()));
    assert_eq!(resolve(&world, "first", "us-east-1", &format!("{name}:leaf-new")).await, Some(a));
    assert_eq!(resolve(&world, "first", "us-east-1", &format!("{name}:leaf-old")).await, None, "the old label went");
}
