//! Helpers shared by the end-to-end tests: run the publisher binary against
//! a world, add images, name targets.
#![allow(dead_code, unreachable_pub)]

use std::{path::PathBuf, process::Output, time::Duration};

use ami_publisher::results::PublishResults;
use fleet_pki::Role;
use image_format::ImageName;
use local_world::World;

pub const MIB: usize = 1 << 20;

/// Runs the publisher binary against a world.
pub struct Publisher<'w> {
    pub world: &'w World,
    pub ssl: PathBuf,
}

impl<'w> Publisher<'w> {
    pub fn new(world: &'w World) -> Publisher<'w> {
        Publisher { ssl: world.ssl_dir(Role::AmiPublisher).unwrap(), world }
    }

    /// The publisher's command line with `args`, set up for the world.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ami-publisher"));
        c.envs(self.world.aws_env())
            .env_remove("AMI_PUBLISHER_CONFIG")
            .env("HOME", self.world.path("home"))
            .arg("--ssl-dir")
            .arg(&self.ssl)
            .args(["--image-server", &self.world.imageserver_addr()])
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let t = std::time::Instant::now();
        let out = self.command(args).output().unwrap();
        eprintln!(
            "$ ami-publisher {}\n-> {} in {:.1?}\n{}{}",
            args.join(" "),
            out.status,
            t.elapsed(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The publisher started with `args`, its output to files in the world's
    /// directory (not waited for).
    pub fn spawn(&self, args: &[&str]) -> (std::process::Child, PathBuf) {
        let log = self.world.path(&format!("publisher-{}.log", nonce()));
        let file = std::fs::File::create(&log).unwrap();
        eprintln!("$ ami-publisher {} (output in {})", args.join(" "), log.display());
        let child = self.command(args).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        (child, log)
    }

    /// Publish, killing the publisher if it has not ended within `limit`
    /// (a publish that waits without end fails the test instead of hanging
    /// it); returns the exit code and the results file.
    pub fn publish_within(&self, limit: Duration, stream: &str, leaf: &str, extra: &[&str]) -> (i32, PublishResults) {
        let results = self.world.path(&format!("results-{}-{leaf}-{}.json", stream.replace('/', "_"), nonce()));
        let mut args = vec!["publish", stream, leaf, "--results", results.to_str().unwrap()];
        args.extend(extra);
        let started = std::time::Instant::now();
        let (mut child, log) = self.spawn(&args);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > limit {
                child.kill().unwrap();
                child.wait().unwrap();
                eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
                panic!("ami-publisher {} was still running after {limit:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        eprintln!("-> {status} in {:.1?}\n{}", started.elapsed(), std::fs::read_to_string(&log).unwrap_or_default());
        (status.code().unwrap_or(-1), PublishResults::read(&results).unwrap())
    }

    /// Publish; returns the exit code and the results file.
    pub fn publish(&self, stream: &str, leaf: &str, extra: &[&str]) -> (i32, PublishResults) {
        let results = self.world.path(&format!("results-{}-{leaf}-{}.json", stream.replace('/', "_"), nonce()));
        let mut args = vec!["publish", stream, leaf, "--results", results.to_str().unwrap()];
        args.extend(extra);
        let out = self.run(&args);
        (out.status.code().unwrap_or(-1), PublishResults::read(&results).unwrap())
    }
}

/// The JSON a successful `--json` run printed.
pub fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// All records of all targets of a `--json` report.
pub fn records(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v.as_array().unwrap().iter().flat_map(|r| r["records"].as_array().unwrap().clone()).collect()
}

pub fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The result for world target `i` (results are sorted by account, region).
pub fn result<'r>(r: &'r PublishResults, world: &World, i: usize) -> &'r ami_publisher::results::TargetResult {
    let t = &world.targets[i];
    r.targets.iter().find(|x| x.account == t.account && x.region == t.region).expect("a result for every target")
}

pub fn targets_of(world: &World) -> Vec<String> {
    world.targets.iter().map(|t| format!("{},{}", t.account, t.region)).collect()
}

pub fn with_targets<'a>(targets: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    for t in targets {
        v.push("--targets");
        v.push(t.as_str());
    }
    v.extend(extra);
    v
}

/// A disk-like image: noise with zero regions, written to the world's dir and
/// added to its imageserver. Returns the file.
pub async fn add_image(world: &World, stream: &str, leaf: &str, bytes: &[u8]) -> PathBuf {
    let file = world.path(&format!("{}-{leaf}.raw", stream.replace('/', "_")));
    std::fs::write(&file, bytes).unwrap();
    let builder = world.pki.role(Role::ImageBuilder).unwrap();
    let mut c = imagetool::client::connect(&world.imageserver_addr(), &builder).await.unwrap();
    let name = ImageName::new(stream, leaf).unwrap();
    imagetool::add(&mut c, &name, &file, image_format::DEFAULT_CHUNK_SIZE, imagetool::Progress::Hidden).await.unwrap();
    file
}

pub fn disk(len: usize, seed: u64) -> Vec<u8> {
    let mut d = test_support::noise(len, seed);
    // Zero regions, as a real disk has.
    for z in [len / 4..len / 4 + 3 * MIB, len - 2 * MIB..len] {
        d[z].fill(0);
    }
    d
}

/// The bytes behind a snapshot equal `image` and are zero beyond it.
/// The snapshot an AMI boots from, as EC2 describes the AMI.
pub async fn root_snapshot_of(world: &World, account: &str, region: &str, ami: &str) -> String {
    let ec2 = world.ec2(account, region).await;
    let out = ec2.describe_images().image_ids(ami).send().await.unwrap();
    let img = &out.images()[0];
    let root = img.root_device_name().expect("a root device name");
    let m = img.block_device_mappings().iter().find(|m| m.device_name() == Some(root)).expect("a root mapping");
    m.ebs().and_then(|e| e.snapshot_id()).expect("a root snapshot").to_owned()
}

pub async fn assert_snapshot_holds(world: &World, snapshot: &str, image: &std::path::Path) {
    world.check_snapshot(snapshot, image, Duration::from_secs(30)).await.unwrap();
}

/// An AMI registered by hand (as an earlier run left it, when `tags` hold
/// ManagedBy=ami-fleet), named `name` and tagged with `tags`, of a new
/// empty volume's snapshot in `zone`.
pub async fn register_by_hand(ec2: &aws_sdk_ec2::Client, zone: &str, name: &str, tags: &[(&str, &str)]) -> String {
    let vol = ec2.create_volume().availability_zone(zone).size(1).send().await.unwrap();
    let snap = loop {
        match ec2.create_snapshot().volume_id(vol.volume_id().unwrap()).send().await {
            Ok(s) => break s.snapshot_id().unwrap().to_owned(),
            // Not available yet, or not known yet (a lagging world).
            Err(e)
                if matches!(
                    aws_sdk_ec2::error::ProvideErrorMetadata::code(&e),
                    Some("IncorrectState" | "InvalidVolume.NotFound")
                ) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    register_snapshot(ec2, &snap, name, tags).await
}

/// An AMI of snapshot `snap` (its root device /dev/xvda), named `name`
/// and tagged `tags`, registered by hand.
pub async fn register_snapshot(ec2: &aws_sdk_ec2::Client, snap: &str, name: &str, tags: &[(&str, &str)]) -> String {
    let root = aws_sdk_ec2::types::BlockDeviceMapping::builder()
        .device_name("/dev/xvda")
        .ebs(aws_sdk_ec2::types::EbsBlockDevice::builder().snapshot_id(snap).build())
        .build();
    let mut spec =
        aws_sdk_ec2::types::TagSpecification::builder().resource_type(aws_sdk_ec2::types::ResourceType::Image);
    for (k, v) in tags {
        spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
    }
    let ami = ec2
        .register_image()
        .name(name)
        .root_device_name("/dev/xvda")
        .block_device_mappings(root)
        .tag_specifications(spec.build())
        .send()
        .await
        .unwrap();
    ami.image_id().unwrap().to_owned()
}

/// Each of `results` written to a file `NAME-I.json` in the world's
/// directory; their paths.
pub fn results_files(world: &World, name: &str, results: &[&PublishResults]) -> Vec<String> {
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let f = world.path(&format!("{name}-{i}.json"));
            std::fs::write(&f, serde_json::to_vec(r).unwrap()).unwrap();
            f.to_str().unwrap().to_owned()
        })
        .collect()
}

/// A customer managed KMS key in `account`/`region` with alias `alias`,
/// whose key policy lets its own account do everything and each of
/// `shared_with` use it as EBS does for a shared snapshot. Returns its ARN.
pub async fn customer_key(world: &World, account: &str, region: &str, alias: &str, shared_with: &[&str]) -> String {
    let kms = aws_sdk_kms::Client::new(&world.sdk_config(account, region).await);
    let owner =
        world.targets.iter().find(|t| t.account == account).expect("a target of that account").account_id.clone();
    let key = kms.create_key().policy(key_policy(&owner, shared_with)).send().await.unwrap();
    let meta = key.key_metadata().unwrap();
    kms.create_alias().alias_name(alias).target_key_id(meta.key_id()).send().await.unwrap();
    meta.arn().unwrap().to_owned()
}

/// A key policy: `owner` may do everything, `shared_with` what EBS needs.
pub fn key_policy(owner: &str, shared_with: &[&str]) -> String {
    let mut statements = vec![serde_json::json!({
        "Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{owner}:root")},
        "Action": "kms:*", "Resource": "*"
    })];
    if !shared_with.is_empty() {
        let principals: Vec<String> = shared_with.iter().map(|a| format!("arn:aws:iam::{a}:root")).collect();
        statements.push(serde_json::json!({
            "Sid": "SharedAccounts", "Effect": "Allow", "Principal": {"AWS": principals},
            "Action": ["kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey",
                       "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt*"],
            "Resource": "*"
        }));
    }
    serde_json::json!({"Version": "2012-10-17", "Statement": statements}).to_string()
}

/// The publisher's calls so far, to compare with later ([`writes_since`]).
pub struct Mark {
    calls: std::collections::BTreeMap<String, u64>,
    dry_runs: std::collections::BTreeMap<String, u64>,
}

pub fn mark(world: &World) -> Mark {
    Mark { calls: world.api_calls("ami-publisher"), dry_runs: world.api_outcomes("ami-publisher", "DryRunOperation") }
}

/// The publisher's calls since `before` that change something: not a
/// Describe, Get or List, nor a DryRun (which EC2 answers DryRunOperation).
pub fn writes_since(world: &World, before: &Mark) -> Vec<String> {
    let now = mark(world);
    let delta = |m: &std::collections::BTreeMap<String, u64>, b: &std::collections::BTreeMap<String, u64>, a: &str| {
        m.get(a).copied().unwrap_or(0) - b.get(a).copied().unwrap_or(0)
    };
    now.calls
        .keys()
        .filter(|a| delta(&now.calls, &before.calls, a) > delta(&now.dry_runs, &before.dry_runs, a))
        .filter(|a| !a.starts_with("Describe") && !a.starts_with("Get") && !a.starts_with("List"))
        .cloned()
        .collect()
}

/// An EBS client that calls as the tool (`app/ami-publisher`, so the world
/// gives it its pace, faults and IAM) and retries as patiently as the
/// tool does.
pub async fn tool_ebs(world: &World, account: &str, region: &str) -> aws_sdk_ebs::Client {
    let config = world.sdk_config_as("ami-publisher", account, region).await.unwrap();
    aws_sdk_ebs::Client::from_conf(
        aws_sdk_ebs::config::Builder::from(&config)
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(10))
            .build(),
    )
}

/// `call` again while EBS does not know a snapshot just started (it
/// answers ResourceNotFoundException for a while; the world's `lag=`), for
/// up to a minute.
pub async fn once_known<T, E, F, Fut>(mut call: F) -> T
where
    E: aws_sdk_ebs::error::ProvideErrorMetadata + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.code() == Some("ResourceNotFoundException") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}
