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

mod attacher;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use fleet_pki::Role;
use test_support::Pki;

/// The moto release the world installs.
pub const MOTO_VERSION: &str = "5.1.22";
/// moto's default account: what static keys map to.
pub const FIRST_ACCOUNT_ID: &str = "123456789012";
/// The account `second` assumes a role in.
pub const SECOND_ACCOUNT_ID: &str = "111111111111";
/// The profiles the world writes.
pub const ACCOUNTS: [&str; 2] = ["first", "second"];
/// The port unpackers listen on (as in production).
pub const UNPACKER_PORT: u16 = image_unpacker::DEFAULT_PORT;

/// A second address octet (the world's unpackers listen on 127.OCTET.N.10)
/// that no other live world on this machine uses: worlds run at once in
/// parallel tests, the demo and benchmarks, and two on one octet would fight
/// over the unpacker port. Each world holds an exclusive lock on its
/// octet's file under target/ while it lives; the search starts at a place
/// given by the process id.
fn claim_octet() -> anyhow::Result<(u8, std::fs::File)> {
    let dir = workspace_target().join("world-octets");
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

fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Install moto into `target/moto-venv-VERSION` unless it is there; returns
/// the path of `moto_server`. Safe to call from concurrent test processes.
pub fn ensure_moto() -> anyhow::Result<PathBuf> {
    let target = workspace_target();
    std::fs::create_dir_all(&target)?;
    let venv = target.join(format!("moto-venv-{MOTO_VERSION}"));
    let server = venv.join("bin/moto_server");
    let marker = venv.join(".installed");
    let lock = std::fs::File::create(target.join("moto-venv.lock"))?;
    lock.lock()?;
    if marker.exists() && server.exists() {
        return Ok(server);
    }
    eprintln!("local-world: installing moto {MOTO_VERSION} into {} (once)", venv.display());
    let _ = std::fs::remove_dir_all(&venv);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("python3 is needed to run the moto EC2 emulator")?;
    let ok = Command::new(python).args(["-m", "venv"]).arg(&venv).status()?.success();
    if !ok {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("moto[server]=={MOTO_VERSION}"))
        .output()?;
    if !out.status.success() {
        bail!("pip install moto[server]=={MOTO_VERSION} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(&marker, MOTO_VERSION)?;
    Ok(server)
}

/// A moto server process; killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The launcher that patches moto's EC2 model before serving, and the
/// model of EC2's pace and faults it applies (see their headers).
const MOTO_LAUNCH: &str = include_str!("moto_launch.py");
const WORLD_MODEL: &str = include_str!("world_model.py");
/// The launcher's modules, one per EC2 behaviour moto lacks (`world/`).
const WORLD_MODULES: [(&str, &str); 4] = [
    ("failed_states.py", include_str!("world/failed_states.py")),
    ("snapshot_limits.py", include_str!("world/snapshot_limits.py")),
    ("tag_lag.py", include_str!("world/tag_lag.py")),
    ("volume_modifications.py", include_str!("world/volume_modifications.py")),
];

/// The world variables (see `world_model.py` and docs/world.md).
pub const WORLD_VARIABLES: [&str; 4] =
    ["LOCAL_WORLD_PACE", "LOCAL_WORLD_TIME_SCALE", "LOCAL_WORLD_FAULTS", "LOCAL_WORLD_SEED"];

/// The world variables for one world: the plan's, else the process's. A
/// seed is chosen here when none is given, so that it can be reported.
fn world_variables(plan: &impl Blueprint) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = WORLD_VARIABLES
        .iter()
        .filter_map(|name| {
            let value = plan
                .variables()
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())?;
            Some(((*name).to_owned(), value))
        })
        .collect();
    if !vars.iter().any(|(k, _)| k == "LOCAL_WORLD_SEED") {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id().rotate_left(16))
            .unwrap_or(0);
        vars.push(("LOCAL_WORLD_SEED".into(), seed.to_string()));
    }
    vars
}

fn start_moto(dir: &Path, vars: &[(String, String)]) -> anyhow::Result<Moto> {
    let server = ensure_moto()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log_path = dir.join("moto.log");
    let log = std::fs::File::create(&log_path)?;
    // moto_server, started through a launcher that brings a few of moto's
    // EC2 answers closer to EC2's (see the file's header).
    let launcher = dir.join("moto_launch.py");
    std::fs::write(&launcher, MOTO_LAUNCH)?;
    std::fs::write(dir.join("world_model.py"), WORLD_MODEL)?;
    std::fs::create_dir_all(dir.join("world"))?;
    for (name, text) in WORLD_MODULES {
        std::fs::write(dir.join("world").join(name), text)?;
    }
    let python = server.with_file_name("python");
    let mut cmd = Command::new(python);
    cmd.arg(&launcher).env("LOCAL_WORLD_DIR", dir);
    for name in WORLD_VARIABLES {
        cmd.env_remove(name);
    }
    let child = cmd
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting moto_server")?;
    let mut moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = moto.child.try_wait()? {
            // The launcher refuses a bad world variable with one line
            // "local-world: VARIABLE: what is wrong".
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = said.lines().find_map(|l| l.strip_prefix("local-world: ")) {
                bail!("{line}");
            }
            bail!("moto_server exited ({s}); see {}", log_path.display());
        }
        if Instant::now() > deadline {
            bail!("moto_server did not listen within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(moto)
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
    pub config_file: PathBuf,
    pub credentials_file: PathBuf,
    /// Snapshot id -> copy of the bytes behind it.
    pub snapshots: Arc<Mutex<HashMap<String, SnapshotCopy>>>,
    attacher: tokio::task::JoinHandle<()>,
    moto: Moto,
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
    /// How many snapshots and AMIs the `fail` fault made fail, if any.
    pub fn failed(&self) -> Option<usize> {
        let log = std::fs::read_to_string(self.dir.path().join("failed.log")).ok()?;
        Some(log.lines().count()).filter(|n| *n > 0)
    }

    /// How many tag changes the `lag` fault had seen late, if any.
    pub fn tags_seen_late(&self) -> Option<usize> {
        let log = std::fs::read_to_string(self.dir.path().join("tag-lag.log")).ok()?;
        Some(log.lines().count()).filter(|n| *n > 0)
    }

    /// How many calls each fault answered, of every tool: "throttle 12,
    /// lost 3" (for a run's log, so that a replay can be told what to
    /// expect).
    pub fn struck(&self) -> String {
        const FAULTS: [&str; 7] = ["bucket", "throttle", "error", "lag", "lost", "hang", "capacity"];
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        let counts: Vec<String> = FAULTS
            .iter()
            .map(|f| (f, log.lines().filter(|l| l.split(' ').nth(3) == Some(*f)).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(f, n)| format!("{f} {n}"))
            .chain(self.failed().into_iter().map(|n| format!("fail {n}")))
            .chain(self.tags_seen_late().into_iter().map(|n| format!("tag changes seen late {n}")))
            .collect();
        if counts.is_empty() { "none".to_owned() } else { counts.join(", ") }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Plan {
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
}

impl Plan {
    /// Both accounts in `regions`.
    pub fn new(regions: &[&str]) -> Plan {
        Plan {
            accounts: ACCOUNTS.iter().map(|s| (*s).to_owned()).collect(),
            regions: regions.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// This plan with world variable `name` (one of [`WORLD_VARIABLES`]) set
    /// to `value` for this world only.
    pub fn with(self, name: &str, value: &str) -> PlanWith {
        PlanWith { plan: self, variables: Vec::new() }.with(name, value)
    }

    /// This plan with `LOCAL_WORLD_PACE`.
    pub fn pace(self, pace: &str) -> PlanWith {
        self.with("LOCAL_WORLD_PACE", pace)
    }

    /// This plan with `LOCAL_WORLD_TIME_SCALE`.
    pub fn time_scale(self, scale: f64) -> PlanWith {
        self.with("LOCAL_WORLD_TIME_SCALE", &scale.to_string())
    }

    /// This plan with `LOCAL_WORLD_FAULTS`.
    pub fn faults(self, faults: &str) -> PlanWith {
        self.with("LOCAL_WORLD_FAULTS", faults)
    }

    /// This plan with `LOCAL_WORLD_SEED`.
    pub fn seed(self, seed: u64) -> PlanWith {
        self.with("LOCAL_WORLD_SEED", &seed.to_string())
    }
}

/// A plan with world variables of its own, over the process's.
#[derive(Debug, Clone)]
pub struct PlanWith {
    pub plan: Plan,
    pub variables: Vec<(String, String)>,
}

impl PlanWith {
    /// Also set world variable `name` to `value` (a later value wins).
    #[must_use]
    pub fn with(mut self, name: &str, value: &str) -> PlanWith {
        self.variables.retain(|(k, _)| k != name);
        self.variables.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Also set `LOCAL_WORLD_PACE`.
    #[must_use]
    pub fn pace(self, pace: &str) -> PlanWith {
        self.with("LOCAL_WORLD_PACE", pace)
    }

    /// Also set `LOCAL_WORLD_TIME_SCALE`.
    #[must_use]
    pub fn time_scale(self, scale: f64) -> PlanWith {
        self.with("LOCAL_WORLD_TIME_SCALE", &scale.to_string())
    }

    /// Also set `LOCAL_WORLD_FAULTS`.
    #[must_use]
    pub fn faults(self, faults: &str) -> PlanWith {
        self.with("LOCAL_WORLD_FAULTS", faults)
    }

    /// Also set `LOCAL_WORLD_SEED`.
    #[must_use]
    pub fn seed(self, seed: u64) -> PlanWith {
        self.with("LOCAL_WORLD_SEED", &seed.to_string())
    }
}

/// What [`World::start`] takes: a [`Plan`], or a [`PlanWith`] its own variables.
pub trait Blueprint {
    fn plan(&self) -> &Plan;
    /// World variables for this world only.
    fn variables(&self) -> &[(String, String)];
}

impl Blueprint for Plan {
    fn plan(&self) -> &Plan {
        self
    }
    fn variables(&self) -> &[(String, String)] {
        &[]
    }
}

impl Blueprint for PlanWith {
    fn plan(&self) -> &Plan {
        &self.plan
    }
    fn variables(&self) -> &[(String, String)] {
        &self.variables
    }
}

fn write_profiles(dir: &Path, endpoint: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let aws = dir.join("aws");
    std::fs::create_dir_all(&aws)?;
    let config = aws.join("config");
    let credentials = aws.join("credentials");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile first]\nregion = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile second]\nregion = us-east-1\nendpoint_url = {endpoint}\n\
             role_arn = arn:aws:iam::{SECOND_ACCOUNT_ID}:role/AmiPublisher\nsource_profile = first\n"
        ),
    )?;
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = AKIALOCALWORLD000001\naws_secret_access_key = local-world-secret\n\n\
         [first]\naws_access_key_id = AKIALOCALWORLD000001\naws_secret_access_key = local-world-secret\n",
    )?;
    Ok((config, credentials))
}

impl World {
    /// Bring the world up: moto, profiles, an imageserver, and per target a
    /// VPC, subnet, unpacker instance and unpacker process; then the attacher.
    /// A bad world variable is refused here, named in the error.
    pub async fn start(blueprint: &impl Blueprint) -> anyhow::Result<World> {
        let plan = blueprint.plan();
        let dir = tempfile::Builder::new().prefix("local-world-").tempdir()?;
        let variables = world_variables(blueprint);
        let moto = start_moto(dir.path(), &variables)?;
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
        let (config_file, credentials_file) = write_profiles(dir.path(), &moto.endpoint)?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let imageserver = test_support::imageserver(&pki, &dir.path().join("images")).await?;
        let mut world = World {
            pki,
            imageserver,
            targets: Vec::new(),
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
        world.attacher = attacher::spawn(&world);
        Ok(world)
    }

    /// The EC2 (and STS) calls a tool made so far, by action: counted by
    /// the emulator from the `app/NAME` part of the caller's User-Agent
    /// (ami-publisher sends `app/ami-publisher`).
    pub fn api_calls(&self, app: &str) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        for line in log.lines() {
            let mut f = line.split(' ');
            if let (Some(_service), Some(action), Some(who)) = (f.next(), f.next(), f.next())
                && who == app
            {
                *out.entry(action.to_owned()).or_default() += 1;
            }
        }
        out
    }

    /// The calls of a tool that the world answered with `outcome`, by
    /// action: "ok", or the fault that answered instead of EC2 ("bucket":
    /// the action's request token bucket was empty; "throttle", "error",
    /// "lag": NotFound for a resource too new; "lost": the answer of a
    /// mutating call was lost; "hang": the answer never came), or, for an
    /// error EC2 itself gives (a state refusal, a limit), its code, like
    /// "SnapshotCreationPerVolumeRateExceeded". See `moto_launch.py`.
    pub fn api_outcomes(&self, app: &str, outcome: &str) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        for line in log.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if let [_service, action, who, said, ..] = f[..]
                && who == app
                && said == outcome
            {
                *out.entry(action.to_owned()).or_default() += 1;
            }
        }
        out
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

/// SDK configuration from explicit profile files (the world's own clients).
pub async fn sdk_config(config: &Path, credentials: &Path, profile: &str, region: &str) -> aws_config::SdkConfig {
    let loader = load_profile(config, credentials, profile, region);
    if profile != "second" {
        return loader.load().await;
    }
    // The world's own AssumeRole into the second account names its session
    // WORLD_SESSION, so the launcher serves it as the world's (no faults):
    // aws-config's provider calls STS without the app name.
    let first = load_profile(config, credentials, "first", region).load().await;
    let role =
        aws_config::sts::AssumeRoleProvider::builder(format!("arn:aws:iam::{SECOND_ACCOUNT_ID}:role/AmiPublisher"))
            .session_name(WORLD_SESSION)
            .configure(&first)
            .build()
            .await;
    loader.credentials_provider(role).load().await
}

/// The session name of the world's own AssumeRole calls (moto_launch.py
/// knows it too).
pub const WORLD_SESSION: &str = "local-world";

fn load_profile(config: &Path, credentials: &Path, profile: &str, region: &str) -> aws_config::ConfigLoader {
    use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
    let files = EnvConfigFiles::builder()
        .with_file(EnvConfigFileKind::Config, config)
        .with_file(EnvConfigFileKind::Credentials, credentials)
        .build();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .profile_files(files)
        .profile_name(profile)
        .region(Region::new(region.to_owned()))
        .app_name(aws_config::AppName::new("local-world").expect("a valid app name"))
}
