//! The local world: everything the publisher meets in AWS, on one machine.
//!
//! - [`ensure_moto`] installs the moto server (pinned [`MOTO_VERSION`]) from
//!   PyPI into a venv under `target/`, once per machine;
//! - [`World::start`] starts moto on loopback (through `moto_launch.py`,
//!   which makes RegisterImage keep the snapshots it is given, CopyImage copy
//!   them, and CopySnapshot read snapshots shared by another account, as EC2
//!   does, honours ClientToken, and applies `world_model.py`: EC2's latency,
//!   pending states, request token buckets and faults, as the world
//!   variables [`WORLD_VARIABLES`] ask; see docs/world.md), writes AWS
//!   profile files for
//!   two accounts (`first` with static keys, `second` reached by assume-role
//!   from `first`), an imageserver, and per (account, region) target a VPC
//!   and subnet in 127.0.0.0/8, an instance tagged `Name=ImageUnpacker` with a
//!   loopback private IP, and a real image-unpacker listening on that IP;
//! - the attacher (a background task) makes every volume attached to an
//!   unpacker instance appear in that unpacker's device directory as Nitro
//!   shows it, backed by a loop device when possible, else a sparse file, and
//!   copies a volume's bytes when a snapshot of it is taken.
//!
//! The SDK is pointed at moto only through standard settings: the profile
//! files carry `endpoint_url`, and child processes get `AWS_ENDPOINT_URL`,
//! `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` ([`World::aws_env`]).
//! Everything is torn down on drop, also when a test fails.
//!
//! Rooms: `moto` (installing and starting it with the world variables),
//! `plan` ([`Plan`]: accounts, regions, variables), `profiles` (the profile
//! files and SDK configurations from them), `calls` (the call log and the
//! faults that struck), `attacher`; this file holds the world itself.

mod attacher;
mod calls;
mod moto;
mod organization;
mod plan;
mod profiles;
mod s3;

pub use moto::{MOTO_VERSION, WORLD_VARIABLES, ensure_moto};
pub use organization::{CLOSED_ACCOUNT_ID, DEPARTED_ACCOUNT_ID, NESTED_ACCOUNT_ID, Organization};
pub use plan::Plan;
pub use s3::ObjectStore;

/// The bucket of the world's imageserver when its images are in S3
/// ([`Plan::images_in_s3`]).
pub const IMAGES_BUCKET: &str = "fleet-images";
pub use profiles::{WORLD_SESSION, sdk_config};

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use fleet_pki::Role;
use test_support::Pki;

/// moto's default account: what static keys map to.
pub const FIRST_ACCOUNT_ID: &str = "123456789012";
/// The account `second` assumes a role in.
pub const SECOND_ACCOUNT_ID: &str = "111111111111";
/// An account that publishes nothing and has no unpacker: it only uses
/// what the others share with it. No profile names it; the world's own
/// clients reach it (`world.ec2(CONSUMER, region)`) by a role from `first`.
pub const CONSUMER: &str = "consumer";
/// The consumer's account id.
pub const CONSUMER_ACCOUNT_ID: &str = "222222222222";
/// The profiles the world writes.
pub const ACCOUNTS: [&str; 2] = ["first", "second"];
/// The port unpackers listen on (as in production).
pub const UNPACKER_PORT: u16 = fleet_proto::UNPACKER_PORT;

/// A second address octet (the world's unpackers listen on 127.OCTET.N.10)
/// that no other live world on this machine uses: worlds run at once in
/// parallel tests, the demo and benchmarks, and two on one octet would fight
/// over the unpacker port. Each world holds an exclusive lock on its
/// octet's file under target/ while it lives; the search starts at a place
/// given by the process id.
fn claim_octet() -> anyhow::Result<(u8, std::fs::File)> {
    let dir = moto::workspace_target().join("world-octets");
    std::fs::create_dir_all(&dir)?;
    let start = std::process::id() % 200;
    for i in 0..200 {
        let octet = 2 + u8::try_from((start + i) % 200).expect("below 200");
        let f = std::fs::File::create(dir.join(octet.to_string()))?;
        if f.try_lock().is_ok() {
            return Ok((octet, f));
        }
    }
    anyhow::bail!("no free address octet for a local world: 200 worlds are running on this machine")
}

/// One (account, region) with its unpacker instance.
pub struct Target {
    /// Profile name.
    pub account: String,
    pub account_id: String,
    pub region: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub availability_zone: String,
    pub instance_id: String,
    pub ip: Ipv4Addr,
    /// Volumes the instance booted with (never shown to the unpacker).
    pub root_volumes: Vec<String>,
    /// Where the attacher puts device links for this instance.
    pub device_dir: PathBuf,
    pub state_dir: PathBuf,
    unpacker: Option<image_unpacker::Running>,
}

impl Target {
    /// `HOST:PORT` of this target's unpacker.
    pub fn unpacker_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), UNPACKER_PORT)
    }
}

/// What the attacher recorded of a snapshot: a copy of its volume's bytes.
#[derive(Debug, Clone)]
pub struct SnapshotCopy {
    pub volume_id: String,
    pub path: PathBuf,
}

/// The world. Drop it to tear everything down.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub imageserver: imageserver::Running,
    pub targets: Vec<Target>,
    /// The world's AWS Organization, when the plan asked for one.
    pub organization: Option<Organization>,
    pub config_file: PathBuf,
    pub credentials_file: PathBuf,
    /// Snapshot id -> copy of the bytes behind it.
    pub snapshots: Arc<Mutex<HashMap<String, SnapshotCopy>>>,
    attacher: tokio::task::JoinHandle<()>,
    moto: moto::Moto,
    variables: Vec<(String, String)>,
    /// The lock on this world's address octet, held while it lives.
    _octet: std::fs::File,
}

impl Drop for World {
    fn drop(&mut self) {
        self.attacher.abort();
        if self.variable("LOCAL_WORLD_FAULTS").is_some_and(|f| !f.trim().is_empty()) {
            eprintln!("local-world: faults that struck: {}", self.struck());
        }
    }
}

impl World {
    /// Bring the world up: moto, profiles, an imageserver, and per target a
    /// VPC, subnet, unpacker instance and unpacker process; then the attacher.
    /// A bad world variable is refused here, named in the error.
    pub async fn start(plan: &Plan) -> anyhow::Result<World> {
        let dir = tempfile::Builder::new().prefix("local-world-").tempdir()?;
        let variables = moto::world_variables(plan);
        let moto = moto::start_moto(dir.path(), &variables)?;
        let said = |name: &str| variables.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        if said("LOCAL_WORLD_FAULTS").is_some_and(|f| !f.trim().is_empty()) {
            // Whoever reads a failure learns how to replay it.
            eprintln!(
                "local-world: faults {} with LOCAL_WORLD_SEED={} (set it to replay this run's decisions)",
                said("LOCAL_WORLD_FAULTS").unwrap_or_default(),
                said("LOCAL_WORLD_SEED").unwrap_or_default()
            );
        }
        let (base, octet_lock) = claim_octet()?;
        let (config_file, credentials_file) = profiles::write_profiles(dir.path(), &moto.endpoint)?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let store = if plan.images_in_s3 {
            let sdk = s3::sdk_config_for(&moto.endpoint);
            s3::create_bucket(&sdk, IMAGES_BUCKET).await?;
            let at = format!("s3://{IMAGES_BUCKET}/images").parse().map_err(anyhow::Error::msg)?;
            imageserver::Store::S3 { at, aws: Some(Box::new(sdk)) }
        } else {
            imageserver::Store::Dir(dir.path().join("images"))
        };
        let imageserver = test_support::imageserver_on(&pki, store).await?;
        let mut world = World {
            pki,
            imageserver,
            targets: Vec::new(),
            organization: None,
            config_file,
            credentials_file,
            snapshots: Arc::default(),
            attacher: tokio::spawn(async {}),
            moto,
            variables,
            dir,
            _octet: octet_lock,
        };
        let mut n = 0u8;
        for account in &plan.accounts {
            for region in &plan.regions {
                n += 1;
                let t = world
                    .add_target(account, region, base, n)
                    .await
                    .with_context(|| format!("target {account},{region}"))?;
                world.targets.push(t);
            }
        }
        if plan.organization {
            let config = world.sdk_config("first", "us-east-1").await;
            world.organization = Some(organization::create(&config).await.context("the world's organization")?);
        }
        world.attacher = attacher::spawn(&world);
        Ok(world)
    }

    /// The value this world runs with of a world variable (the seed is
    /// always set: chosen at start when not given).
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.variables.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The moto server's process id (for CPU accounting in benchmarks).
    pub fn moto_pid(&self) -> u32 {
        self.moto.child.id()
    }

    /// The moto endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.moto.endpoint
    }

    /// SDK configuration for a profile and region, through the profile files.
    pub async fn sdk_config(&self, profile: &str, region: &str) -> aws_config::SdkConfig {
        sdk_config(&self.config_file, &self.credentials_file, profile, region).await
    }

    /// An EC2 client for a profile and region. It calls as the world
    /// itself (`app/local-world`), which the emulator serves without
    /// latency, faults or pending states: for setting up and checking.
    pub async fn ec2(&self, profile: &str, region: &str) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk_config(profile, region).await)
    }

    /// An EC2 client that calls as tool `app`, so the world's model of EC2
    /// (latency, pending states, faults) applies to it as to ami-publisher.
    pub async fn ec2_as(&self, app: &str, profile: &str, region: &str) -> anyhow::Result<aws_sdk_ec2::Client> {
        Ok(aws_sdk_ec2::Client::new(&self.sdk_config_as(app, profile, region).await?))
    }

    /// SDK configuration for a profile and region, calling as tool `app`.
    pub async fn sdk_config_as(&self, app: &str, profile: &str, region: &str) -> anyhow::Result<aws_config::SdkConfig> {
        let name = aws_config::AppName::new(app.to_owned()).with_context(|| format!("'{app}' is not an app name"))?;
        let config = self.sdk_config(profile, region).await;
        Ok(config.into_builder().app_name(name).build())
    }

    /// Environment for a child process (ami-publisher) to reach this world.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.moto.endpoint.clone()),
            ("AWS_CONFIG_FILE".into(), self.config_file.display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), self.credentials_file.display().to_string()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    async fn add_target(&self, account: &str, region: &str, base: u8, n: u8) -> anyhow::Result<Target> {
        let ec2 = self.ec2(account, region).await;
        let sts = aws_sdk_sts::Client::new(&self.sdk_config(account, region).await);
        let account_id =
            sts.get_caller_identity().send().await.context("sts get-caller-identity")?.account.unwrap_or_default();
        let vpc = ec2.create_vpc().cidr_block(format!("127.{base}.0.0/16")).send().await.context("create vpc")?;
        let vpc_id = vpc.vpc.and_then(|v| v.vpc_id).context("no vpc id")?;
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("127.{base}.{n}.0/24"))
            .send()
            .await
            .context("create subnet")?
            .subnet
            .context("no subnet")?;
        let ami = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .context("describe images")?
            .images
            .unwrap_or_default()
            .into_iter()
            .find_map(|i| i.image_id)
            .context("moto offers no base image in this region")?;
        let ip = Ipv4Addr::new(127, base, n, 10);
        let run = ec2
            .run_instances()
            .image_id(ami)
            .min_count(1)
            .max_count(1)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
            .subnet_id(subnet.subnet_id().unwrap_or_default())
            .private_ip_address(ip.to_string())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(Tag::builder().key("Name").value("ImageUnpacker").build())
                    .build(),
            )
            .send()
            .await
            .context("run instances")?;
        let instance_id = run.instances().first().and_then(|i| i.instance_id.clone()).context("no instance")?;
        let root_volumes = ec2
            .describe_volumes()
            .filters(aws_sdk_ec2::types::Filter::builder().name("attachment.instance-id").values(&instance_id).build())
            .send()
            .await?
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.volume_id)
            .collect();
        let tdir = self.dir.path().join("targets").join(format!("{account}-{region}"));
        let mut t = Target {
            account: account.to_owned(),
            account_id,
            region: region.to_owned(),
            vpc_id,
            subnet_id: subnet.subnet_id.clone().unwrap_or_default(),
            availability_zone: subnet.availability_zone.clone().unwrap_or_default(),
            instance_id,
            ip,
            root_volumes,
            device_dir: tdir.join("by-id"),
            state_dir: tdir.join("state"),
            unpacker: None,
        };
        self.start_unpacker(&mut t).await?;
        Ok(t)
    }

    async fn start_unpacker(&self, t: &mut Target) -> anyhow::Result<()> {
        let u = test_support::unpacker(
            &self.pki,
            t.unpacker_addr(),
            &t.state_dir,
            &t.device_dir,
            &self.imageserver.addr.to_string(),
        )
        .await?;
        t.unpacker = Some(u);
        Ok(())
    }

    /// Stop target `i`'s unpacker process (its instance stays "running").
    pub async fn stop_unpacker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(u) = self.targets[i].unpacker.take() {
            u.stop().await?;
        }
        Ok(())
    }

    /// Start target `i`'s unpacker process again (same state and devices).
    pub async fn restart_unpacker(&mut self, i: usize) -> anyhow::Result<()> {
        let mut t = std::mem::replace(&mut self.targets[i], placeholder());
        let r = self.start_unpacker(&mut t).await;
        self.targets[i] = t;
        r
    }

    /// Certificates of `role` as an ssl dir (`CA.pem`, `cert.pem`, `key.pem`).
    pub fn ssl_dir(&self, role: Role) -> anyhow::Result<PathBuf> {
        self.pki.role(role)?;
        Ok(self.pki.dir.join(role.name()))
    }

    /// The imageserver's `HOST:PORT`.
    pub fn imageserver_addr(&self) -> String {
        self.imageserver.addr.to_string()
    }

    /// The copy of the bytes behind a snapshot, once the attacher made it.
    pub async fn snapshot_bytes(&self, snapshot_id: &str, timeout: Duration) -> anyhow::Result<PathBuf> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.snapshots.lock().expect("snapshots lock").get(snapshot_id) {
                return Ok(c.path.clone());
            }
            // Made by moto itself: at CreateSnapshot, or a copy's at CopySnapshot.
            let kept = self.dir.path().join("snapshots").join(format!("{snapshot_id}.img"));
            if kept.exists() {
                return Ok(kept);
            }
            if Instant::now() > deadline {
                bail!("the attacher made no copy of {snapshot_id} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Check that the bytes behind `snapshot_id` are exactly `image`'s,
    /// followed by zeros only (the volume is bigger than the image). Waits
    /// up to `timeout` for the attacher's copy.
    pub async fn check_snapshot(&self, snapshot_id: &str, image: &Path, timeout: Duration) -> anyhow::Result<()> {
        let copy = self.snapshot_bytes(snapshot_id, timeout).await?;
        let image = image.to_owned();
        let id = snapshot_id.to_owned();
        tokio::task::spawn_blocking(move || holds_image(&copy, &image).with_context(|| format!("snapshot {id}")))
            .await?
    }

    /// Directory for scratch files that live as long as the world.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn placeholder() -> Target {
    Target {
        account: String::new(),
        account_id: String::new(),
        region: String::new(),
        vpc_id: String::new(),
        subnet_id: String::new(),
        availability_zone: String::new(),
        instance_id: String::new(),
        ip: Ipv4Addr::LOCALHOST,
        root_volumes: Vec::new(),
        device_dir: PathBuf::new(),
        state_dir: PathBuf::new(),
        unpacker: None,
    }
}

/// `copy` starts with the bytes of `image` and holds only zeros after them.
/// The copy is sparse: past the image only its data extents are read.
fn holds_image(copy: &Path, image: &Path) -> anyhow::Result<()> {
    use rustix::fs::{SeekFrom as Extent, seek};
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut f = std::fs::File::open(copy).with_context(|| format!("opening {}", copy.display()))?;
    let mut img = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let len = img.metadata()?.len();
    let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from((len - at).min(a.len() as u64))?;
        img.read_exact(&mut a[..n])?;
        f.read_exact(&mut b[..n]).with_context(|| format!("the bytes end before the image does ({len} bytes)"))?;
        if a[..n] != b[..n] {
            let first = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap_or(0);
            bail!("the bytes differ from {} at offset {}", image.display(), at + first as u64);
        }
        at += n as u64;
    }
    let mut pos = len;
    loop {
        let data = match seek(&f, Extent::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("looking for data in {}", copy.display())),
        };
        let hole = seek(&f, Extent::Hole(data))?;
        f.seek(SeekFrom::Start(data))?;
        let mut left = hole - data;
        while left > 0 {
            let n = usize::try_from(left.min(b.len() as u64))?;
            f.read_exact(&mut b[..n])?;
            if !image_format::is_zero(&b[..n]) {
                bail!("non-zero bytes after the image's end, in {data}..{hole}");
            }
            left -= n as u64;
        }
        pos = hole;
    }
}
