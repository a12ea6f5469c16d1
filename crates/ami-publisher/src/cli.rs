//! The command line: global flags (also settable in a config file), the
//! subcommands, and what they print.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, parser::ValueSource};

use crate::{
    aws::{Aws, Retry},
    progress::Board,
    publish::{self, Options, Timeouts},
    results::{PublishResults, write_json_atomic},
    targets::{self, TargetSpec},
    values::{Architecture, BootMode, EbsType, Imds},
};

/// Publish images from the imageserver as identical, encrypted AMIs in many
/// AWS accounts and regions, through image-unpacker instances.
///
/// A target is ACCOUNT,REGION where ACCOUNT is an AWS profile (from
/// ~/.aws/config and ~/.aws/credentials, or AWS_CONFIG_FILE and
/// AWS_SHARED_CREDENTIALS_FILE; roles, SSO and endpoints as the AWS CLI has
/// them). An empty or '*' part means all: every profile, or every region
/// enabled in the account. Repeat --targets, or give several in one quoted
/// argument separated by spaces.
///
/// Each target needs an instance tagged Name=ImageUnpacker (--instance-name)
/// running image-unpacker; a stopped one is started. The publisher dials its
/// private IP with the certificate in ~/.ssl (--ssl-dir), which must carry the
/// read and drive-unpacker rights.
///
/// Every global flag can also be set in a TOML config file (--config, default
/// ~/.config/ami-publisher/config.toml when it exists) by its long name, e.g.
/// `targets = ["prod,us-east-1", "staging,"]` or `image-server = "images:6971"`;
/// the command line wins.
///
/// Exit status: 0 when every target succeeded, 1 when any target failed (the
/// results file says which), 2 when the arguments were refused before
/// anything was done.
#[derive(Parser, Debug)]
#[command(version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// Config file with defaults for the global flags.
    #[arg(long, global = true, env = "AMI_PUBLISHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Targets: ACCOUNT,REGION (empty or '*' = all).
    #[arg(long, global = true, value_name = "ACCOUNT,REGION", value_delimiter = ' ')]
    pub targets: Vec<TargetSpec>,
    /// Targets to leave out (same syntax).
    #[arg(long, global = true, value_name = "ACCOUNT,REGION", value_delimiter = ' ')]
    pub skip_targets: Vec<TargetSpec>,
    /// The imageserver to read image manifests from (the unpackers use their own setting).
    #[arg(long, global = true, env = "IMAGE_SERVER", default_value = "localhost:6971", value_name = "HOST:PORT")]
    pub image_server: String,
    /// Value of the Name tag of unpacker instances.
    #[arg(long, global = true, default_value = "ImageUnpacker", value_name = "NAME")]
    pub instance_name: String,
    /// Port image-unpacker listens on.
    #[arg(long, global = true, default_value_t = 6974, value_name = "PORT")]
    pub unpacker_port: u16,
    /// Extra tags for AMIs and snapshots: KEY=VALUE,KEY=VALUE.
    #[arg(long, global = true, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub tags: Vec<(String, String)>,
    /// Tag AMIs and snapshots with ExpiresAt = now + DURATION (e.g. 30d), for `expire`.
    #[arg(long, global = true, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub expires_in: Option<Duration>,
    /// AMI name; {stream}, {leaf} and {image_id} are replaced.
    #[arg(long, global = true, default_value = "{stream}/{leaf}", value_name = "TEMPLATE")]
    pub ami_name: String,
    /// Mark AMIs as supporting ENA (enhanced networking).
    #[arg(long, global = true)]
    pub ena_support: bool,
    /// AMI architecture.
    #[arg(long, global = true, value_enum, default_value = "x86_64")]
    pub architecture: Architecture,
    /// AMI boot mode (default: EC2's).
    #[arg(long, global = true, value_enum)]
    pub boot_mode: Option<BootMode>,
    /// Instances from the AMI require IMDSv2 ("v2.0"); "none" leaves EC2's default.
    #[arg(long, global = true, value_enum, default_value = "v2.0")]
    pub imds_support: Imds,
    /// Root device name of the AMI.
    #[arg(long, global = true, default_value = "/dev/xvda", value_name = "DEVICE")]
    pub root_device_name: String,
    /// EBS type of unpacker volumes and of the AMI's root volume.
    #[arg(long, global = true, value_enum, default_value = "gp3")]
    pub volume_type: EbsType,
    /// KMS key for new volumes (default: the account's EBS default key).
    #[arg(long, global = true, value_name = "KEY")]
    pub kms_key_id: Option<String>,
    /// Free space a stream's volume keeps beyond the image (e.g. 256MiB, 2GiB).
    #[arg(long, global = true, default_value = "256MiB", value_parser = parse_size, value_name = "BYTES")]
    pub min_free_bytes: u64,
    /// Skip targets that have no unpacker instance instead of failing them.
    #[arg(long, global = true)]
    pub ignore_missing_unpackers: bool,
    /// Targets worked on at once.
    #[arg(long, global = true, default_value_t = 32, value_name = "N")]
    pub max_concurrency: usize,
    /// Write the results (JSON, one entry per target) to FILE, atomically.
    #[arg(long, global = true, value_name = "FILE")]
    pub results: Option<PathBuf>,
    /// Print the results as JSON on stdout (no progress, no table).
    #[arg(long, global = true)]
    pub json: bool,
    /// Print what a destructive command would do, and do nothing.
    #[arg(long, global = true)]
    pub dry_run: bool,
    /// Retries of a throttled or failed AWS call (SDK standard retry mode,
    /// each target with its own retry quota; creates EC2 takes no token for
    /// are retried by the publisher, as often).
    #[arg(long, global = true, default_value_t = 8, value_name = "N")]
    pub max_retries: u32,
    /// First back-off before a retry; it grows exponentially, with jitter, up to 20 s.
    #[arg(long, global = true, default_value = "1s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub retry_wait: Duration,
    /// How long to wait for an unpacker instance to run and answer.
    #[arg(long, global = true, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub unpacker_timeout: Duration,
    /// How long to wait for a volume to be created, attached and seen.
    #[arg(long, global = true, default_value = "5m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub volume_timeout: Duration,
    /// How long to wait for a snapshot to complete.
    #[arg(long, global = true, default_value = "2h", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub snapshot_timeout: Duration,
    /// How long to wait for an AMI to become available.
    #[arg(long, global = true, default_value = "30m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub image_timeout: Duration,
    #[command(flatten)]
    pub tls: image_client::cli::TlsArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Publish STREAM/LEAF as an AMI in every target.
    ///
    /// Per target: an AMI of this leaf that is already there is reported, not
    /// remade (--force remakes it); otherwise the unpacker brings the
    /// stream's volume to the leaf (writing only changed chunks), reads it
    /// back, and the volume is snapshotted and registered. A run that was
    /// interrupted is finished by running it again.
    Publish {
        /// Image stream, e.g. base/debian-12.
        stream: String,
        /// Leaf (version) of the stream.
        leaf: String,
        /// Make a new AMI even if one of this leaf exists (dated name).
        #[arg(long)]
        force: bool,
    },
    /// Give every target that lacks an AMI of STREAM a copy of the nearest
    /// one (same account first, then the same area): CopyImage encrypted
    /// within an account; across accounts by sharing the root snapshot,
    /// copying it encrypted and registering it. Re-running is a no-op.
    CopyBootstrapImage { stream: String },
    /// Create and attach an encrypted volume of SIZE_GIB to each unpacker.
    AddVolumes { size_gib: u64 },
    /// Deregister the AMIs in results files and delete their snapshots.
    Delete {
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// Remove tag KEY from the AMIs in results files.
    DeleteTags {
        #[arg(value_name = "KEY")]
        tag_key: String,
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// Remove tag KEY from the unpacker instances.
    DeleteTagsOnUnpackers {
        #[arg(value_name = "KEY")]
        tag_key: String,
    },
    /// Delete every AMI, snapshot, volume and instance whose ExpiresAt tag is
    /// in the past (one "now" for all targets); an AMI's snapshots go with it.
    Expire,
    /// Import an SSH public key as key pair NAME into every target.
    ImportKeyPair { name: String, pubkey_file: PathBuf },
    /// Launch an instance from BOOT_IMAGE (an AMI id, or the newest AMI of
    /// that stream) in every target, tagged Name=--instance-name; with
    /// --replace-instances, older instances of that name are terminated once
    /// the new one runs. --results writes the instances (id, private IP).
    LaunchInstances {
        boot_image: String,
        #[command(flatten)]
        launch: LaunchArgs,
    },
    /// Launch an instance from every AMI in the results files.
    LaunchInstancesForImages {
        #[command(flatten)]
        launch: LaunchArgs,
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// List this account's AMIs matching --search-tags and not --exclude-search-tags.
    ListImages {
        #[command(flatten)]
        search: SearchArgs,
    },
    /// List the image streams the unpackers hold (state, leaf, volume).
    ListStreams,
    /// List images (matching the search, older than --min-image-age) that
    /// no instance uses.
    ListUnusedImages {
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// List images (matching the search, older than --min-image-age) that
    /// instances use, with those instances.
    ListUsedImages {
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// Deregister images (matching the search, older than --min-image-age)
    /// that no instance uses, and delete their snapshots.
    DeleteUnusedImages {
        #[command(flatten)]
        usage: UsageArgs,
    },
    /// List the unpacker instances (state, IP, streams, devices, idle time).
    ListUnpackers,
    /// Start and connect to every unpacker; with STREAM, learn its volume now
    /// so the next publish skips the scan.
    PrepareUnpackers { stream: Option<String> },
    /// Detach and delete the unpackers' volumes that no stream is bound to.
    RemoveUnusedVolumes,
    /// Tag the AMIs in results files KEY=VALUE and remove KEY from every other
    /// AMI of the same stream in their targets (e.g. a "Latest" marker).
    SetExclusiveTags {
        #[arg(value_name = "KEY")]
        tag_key: String,
        #[arg(value_name = "VALUE")]
        tag_value: String,
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// Put --tags on the unpacker instances.
    SetTagsOnUnpackers,
    /// Start stopped unpacker instances and wait until they run.
    StartInstances,
    /// Stop running unpackers idle for longer than --max-idle-time; busy ones
    /// stay up. Quiet unless it acts or fails: meant for cron.
    StopIdleUnpackers {
        /// Idle time after which an unpacker is stopped.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        max_idle_time: Duration,
    },
    /// Terminate the unpacker instances.
    TerminateInstances,
}

/// Where and how `launch-instances` starts instances.
#[derive(clap::Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Tags of the VPC to launch in (default: any).
    #[arg(long, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub vpc_search_tags: Vec<(String, String)>,
    /// Tags of the subnet (the one with most free addresses wins).
    #[arg(long, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub subnet_search_tags: Vec<(String, String)>,
    /// Tags of the security groups to attach (default: the VPC's default group).
    #[arg(long, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub security_group_search_tags: Vec<(String, String)>,
    #[arg(long, default_value = "t3.medium")]
    pub instance_type: String,
    /// EC2 key pair for SSH (see import-key-pair).
    #[arg(long)]
    pub ssh_key_name: Option<String>,
    /// Root volume size in GiB (default: the image's).
    #[arg(long)]
    pub root_volume_size: Option<i32>,
    /// Terminate older instances of the same name once the new one runs.
    #[arg(long)]
    pub replace_instances: bool,
    /// User data (e.g. cloud-init) for the instances; deploy/image-unpacker-user-data.sh
    /// makes an instance of a base image a working unpacker.
    #[arg(long, value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// IAM instance profile (name) for the instances, e.g. one that may read
    /// the unpacker's certificates (deploy/image-unpacker-instance-policy.json).
    #[arg(long, value_name = "NAME")]
    pub iam_instance_profile: Option<String>,
}

/// Image search by tags and age, with optional CSV reports.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageArgs {
    #[command(flatten)]
    pub search: SearchArgs,
    /// Only images created at least this long ago.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_image_age: Duration,
    /// Also write the unused images found as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub unused_images_csv: Option<PathBuf>,
    /// Also write the instances running images older than --min-image-age as CSV to FILE.
    #[arg(long, value_name = "FILE")]
    pub old_image_instances_csv: Option<PathBuf>,
}

/// Image search by tags.
#[derive(clap::Args, Debug, Clone)]
pub struct SearchArgs {
    /// Tags an image must carry: KEY=VALUE,...
    #[arg(long, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub search_tags: Vec<(String, String)>,
    /// Tags that exclude an image: KEY=VALUE,...
    #[arg(long, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub exclude_search_tags: Vec<(String, String)>,
}

/// Parse a byte count: a number with an optional K/M/G/T (powers of 1000)
/// or KiB/MiB/GiB/TiB suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 1073741824, 512MiB, 2G)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "t" | "tb" => 1000 * 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use K, M, G, T, KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("'{s}' is too large"))
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ami-publisher/config.toml"))
}

/// Parse the command line, filling global flags the command line and
/// environment leave unset from the config file.
pub fn parse_args(args: Vec<OsString>) -> Result<Cli, clap::Error> {
    let cmd = Cli::command();
    let m = cmd.clone().try_get_matches_from(&args)?;
    let explicit = m.get_one::<PathBuf>("config").cloned();
    let path = match explicit.clone().or_else(default_config_path) {
        Some(p) if explicit.is_some() || p.exists() => p,
        _ => return Cli::from_arg_matches(&m),
    };
    let fail = |msg: String| cmd.clone().error(clap::error::ErrorKind::InvalidValue, msg);
    let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("config file {}: {e}", path.display())))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(format!("config file {}: {e}", path.display())))?;
    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let Some(arg) =
            cmd.get_arguments().find(|a| a.is_global_set() && a.get_long() == Some(key.as_str()) && key != "config")
        else {
            return Err(fail(format!(
                "config file {}: unknown setting '{key}' (settings are the global flags' long names, e.g. targets, image-server)",
                path.display()
            )));
        };
        let id = arg.get_id().as_str();
        if matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &toml::Value| -> Result<String, clap::Error> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(fail(format!("config file {}: '{key}' must be a string or number", path.display()))),
            }
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    extra.push(flag);
                }
            }
            toml::Value::Array(items) => {
                for v in items {
                    extra.push(flag.clone());
                    extra.push(scalar(v)?.into());
                }
            }
            v if takes_value => {
                extra.push(flag);
                extra.push(scalar(v)?.into());
            }
            _ => return Err(fail(format!("config file {}: '{key}' is a switch: true or false", path.display()))),
        }
    }
    let mut all = vec![args.first().cloned().unwrap_or_else(|| "ami-publisher".into())];
    all.extend(extra);
    all.extend(args.into_iter().skip(1));
    Cli::try_parse_from(all)
}

/// How a run ended, for the exit status.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    AllSucceeded,
    SomeFailed,
}

/// An error before anything was done (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct Refused(pub anyhow::Error);

fn refuse<T>(r: anyhow::Result<T>) -> anyhow::Result<T> {
    r.map_err(|e| Refused(e).into())
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    use crate::ops;
    if let Command::Publish { stream, leaf, force } = &cli.command {
        return run_publish(&cli, stream, leaf, *force).await;
    }
    let aws = refuse(Aws::new(Retry { max_retries: cli.max_retries, wait: cli.retry_wait }).await)?;
    // Commands on results files take their targets from the files.
    let from_results = match &cli.command {
        Command::Delete { results_files }
        | Command::DeleteTags { results_files, .. }
        | Command::SetExclusiveTags { results_files, .. }
        | Command::LaunchInstancesForImages { results_files, .. } => Some(refuse(ops::amis_by_target(results_files))?),
        _ => None,
    };
    let targets = match &from_results {
        Some(m) => m.keys().cloned().collect(),
        None => refuse(resolve_targets(&cli, &aws).await)?,
    };
    let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let ctx = ops::Ctx {
        aws: &aws,
        targets,
        max_concurrency: cli.max_concurrency,
        instance_name: cli.instance_name.clone(),
        unpacker_port: cli.unpacker_port,
        tls: cli.tls.files(),
        unpacker_timeout: cli.unpacker_timeout,
        volume_timeout: cli.volume_timeout,
        snapshot_timeout: cli.snapshot_timeout,
        image_timeout: cli.image_timeout,
        dry_run: cli.dry_run,
        board: Board::new(!cli.json, &names),
    };
    let amis: std::collections::HashMap<_, _> = from_results.unwrap_or_default().into_iter().collect();
    let (json, q) = (cli.json, false);
    let outcome = match &cli.command {
        Command::Publish { .. } => unreachable!("handled above"),
        Command::AddVolumes { size_gib } => {
            if *size_gib == 0 || *size_gib > 16384 {
                return Err(Refused(anyhow::anyhow!("SIZE_GIB must be 1 to 16384, not {size_gib}")).into());
            }
            show(ops::add_volumes(&ctx, *size_gib, cli.volume_type.sdk(), cli.kms_key_id.as_deref()).await, json, q)
        }
        Command::CopyBootstrapImage { stream } => {
            show(ops::copy_bootstrap_image(&ctx, stream, cli.kms_key_id.as_deref()).await, json, q)
        }
        Command::Delete { .. } => show(ops::delete(&ctx, &amis).await, json, q),
        Command::DeleteTags { tag_key, .. } => show(ops::delete_tags(&ctx, tag_key, &amis).await, json, q),
        Command::DeleteTagsOnUnpackers { tag_key } => show(ops::tag_unpackers(&ctx, &[], Some(tag_key)).await, json, q),
        Command::Expire => show(ops::expire(&ctx, SystemTime::now()).await, json, q),
        Command::ImportKeyPair { name, pubkey_file } => {
            let key = refuse(
                std::fs::read(pubkey_file).with_context(|| format!("reading public key {}", pubkey_file.display())),
            )?;
            if !key.starts_with(b"ssh-") && !key.starts_with(b"ecdsa-") {
                return Err(Refused(anyhow::anyhow!(
                    "{} does not look like an OpenSSH public key (ssh-ed25519 ..., ssh-rsa ..., ecdsa-...)",
                    pubkey_file.display()
                ))
                .into());
            }
            show(ops::import_key_pair(&ctx, name, &key).await, json, q)
        }
        Command::ListImages { search } => {
            show(ops::list_images(&ctx, &search.search_tags, &search.exclude_search_tags).await, json, q)
        }
        Command::ListUnusedImages { usage }
        | Command::ListUsedImages { usage }
        | Command::DeleteUnusedImages { usage } => {
            let search = ops::images::UsageSearch {
                search: &usage.search.search_tags,
                exclude: &usage.search.exclude_search_tags,
                min_age: usage.min_image_age,
                now: SystemTime::now(),
            };
            // The reports are read before anything is deleted.
            if let Some(path) = &usage.unused_images_csv {
                let unused = ops::image_usage(&ctx, &search, ops::Usage::Unused).await;
                ops::write_csv(path, &unused, &["ami", "name", "created", "stream"])?;
            }
            if let Some(path) = &usage.old_image_instances_csv {
                let used = ops::image_usage(&ctx, &search, ops::Usage::Used).await;
                ops::write_csv(path, &used, &["ami", "name", "created", "instances"])?;
            }
            match &cli.command {
                Command::ListUsedImages { .. } => {
                    show(ops::image_usage(&ctx, &search, ops::Usage::Used).await, json, q)
                }
                Command::ListUnusedImages { .. } => {
                    show(ops::image_usage(&ctx, &search, ops::Usage::Unused).await, json, q)
                }
                _ => show(ops::delete_unused_images(&ctx, &search).await, json, q),
            }
        }
        Command::LaunchInstances { launch, .. } | Command::LaunchInstancesForImages { launch, .. } => {
            let user_data = match &launch.user_data {
                Some(p) => {
                    let raw = refuse(std::fs::read(p).with_context(|| format!("reading user data {}", p.display())))?;
                    Some(aws_smithy_types::base64::encode(&raw))
                }
                None => None,
            };
            let mut tags = vec![(crate::tags::NAME.to_owned(), cli.instance_name.clone())];
            tags.extend(cli.tags.iter().cloned());
            if let Some(d) = cli.expires_in {
                tags.push((crate::tags::EXPIRES_AT.to_owned(), crate::tags::rfc3339(SystemTime::now() + d)));
            }
            let spec = ops::LaunchSpec {
                vpc_search: launch.vpc_search_tags.clone(),
                subnet_search: launch.subnet_search_tags.clone(),
                security_group_search: launch.security_group_search_tags.clone(),
                instance_type: launch.instance_type.clone(),
                ssh_key_name: launch.ssh_key_name.clone(),
                root_volume_gib: launch.root_volume_size,
                replace: launch.replace_instances,
                user_data,
                instance_profile: launch.iam_instance_profile.clone(),
                tags,
            };
            let boot = match &cli.command {
                Command::LaunchInstances { boot_image, .. } => ops::BootImage::Named(boot_image),
                _ => ops::BootImage::Listed(&amis),
            };
            let reports = ops::launch_instances(&ctx, &boot, &spec).await;
            if let Some(path) = &cli.results {
                write_json_atomic(path, &reports)?;
            }
            show(reports, json, q)
        }
        Command::ListStreams => show(ops::list_streams(&ctx).await, json, q),
        Command::ListUnpackers => show(ops::list_unpackers(&ctx).await, json, q),
        Command::PrepareUnpackers { stream } => show(ops::prepare_unpackers(&ctx, stream.as_deref()).await, json, q),
        Command::RemoveUnusedVolumes => show(ops::remove_unused_volumes(&ctx).await, json, q),
        Command::SetExclusiveTags { tag_key, tag_value, .. } => {
            show(ops::set_exclusive_tags(&ctx, tag_key, tag_value, &amis).await, json, q)
        }
        Command::SetTagsOnUnpackers => {
            if cli.tags.is_empty() {
                return Err(Refused(anyhow::anyhow!("give the tags to set with --tags K=V,...")).into());
            }
            show(ops::tag_unpackers(&ctx, &cli.tags, None).await, json, q)
        }
        Command::StartInstances => show(ops::start_instances(&ctx).await, json, q),
        // Quiet: cron mails only what it did.
        Command::StopIdleUnpackers { max_idle_time } => {
            show(ops::stop_idle_unpackers(&ctx, *max_idle_time).await, json, true)
        }
        Command::TerminateInstances => show(ops::terminate_instances(&ctx).await, json, q),
    };
    Ok(outcome)
}

/// Print an operation's reports; whether every target succeeded.
fn show<R: crate::ops::Row>(reports: Vec<crate::ops::Report<R>>, json: bool, quiet: bool) -> Outcome {
    crate::ops::print(&reports, json, quiet);
    if reports.iter().all(|r| r.error.is_none()) { Outcome::AllSucceeded } else { Outcome::SomeFailed }
}

/// Expand --targets / --skip-targets (a refusal when there are none).
async fn resolve_targets(cli: &Cli, aws: &Aws) -> anyhow::Result<Vec<targets::Target>> {
    if cli.targets.is_empty() {
        bail!("no targets: give --targets ACCOUNT,REGION (or `targets` in the config file)");
    }
    let targets =
        targets::expand(
            &cli.targets,
            &cli.skip_targets,
            aws.profiles(),
            |a| async move { aws.enabled_regions(&a).await },
        )
        .await?;
    if targets.is_empty() {
        bail!("the --targets given, minus --skip-targets, leave no target");
    }
    Ok(targets)
}

fn render_name(template: &str, stream: &str, leaf: &str, image_id: &str) -> anyhow::Result<String> {
    let raw = template.replace("{stream}", stream).replace("{leaf}", leaf).replace("{image_id}", image_id);
    let name = crate::ami_name_chars(&raw);
    if !(3..=128).contains(&name.len()) {
        bail!("AMI name '{name}' (from --ami-name '{template}') must be 3 to 128 characters");
    }
    Ok(name)
}

/// Check that FILE can be written, before a long run (and leave no trace).
fn check_writable(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".results-check-")
        .tempfile_in(dir)
        .with_context(|| format!("the results file {} cannot be written in {}", path.display(), dir.display()))?;
    Ok(())
}

async fn run_publish(cli: &Cli, stream: &str, leaf: &str, force: bool) -> anyhow::Result<Outcome> {
    // Everything that can be refused is refused before any AWS resource is made.
    let (opts, targets, aws) = refuse(prepare_publish(cli, stream, leaf, force).await)?;
    let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let board = Board::new(!cli.json, &names);
    tracing::info!(targets = targets.len(), stream, leaf, image_id = %opts.image_id, "publishing");
    let results = publish::publish(&aws, &targets, &opts, cli.max_concurrency, &board).await;
    if let Some(path) = &cli.results {
        write_json_atomic(path, &results)?;
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", table(&results));
    }
    Ok(if results.targets.iter().all(|t| t.ok()) { Outcome::AllSucceeded } else { Outcome::SomeFailed })
}

async fn prepare_publish(
    cli: &Cli,
    stream: &str,
    leaf: &str,
    force: bool,
) -> anyhow::Result<(Options, Vec<targets::Target>, Aws)> {
    let name = image_format::ImageName::new(stream, leaf).context("bad image name")?;
    if cli.targets.is_empty() {
        bail!("no targets: give --targets ACCOUNT,REGION (or `targets` in the config file)");
    }
    if let Some(p) = &cli.results {
        check_writable(p)?;
    }
    let tls = cli.tls.files();
    let mut images = image_client::connect(&cli.image_server, &tls).await.context("connecting to the imageserver")?;
    let (info, manifest) = image_client::get_manifest(&mut images, &name).await.map_err(|e| match &e {
        image_client::ClientError::Rpc { status, .. } if status.code() == tonic::Code::NotFound => {
            anyhow::anyhow!("image {name} is not on the imageserver at {}", cli.image_server)
        }
        _ => anyhow::Error::new(e),
    })?;
    let image_id = manifest.image_id().to_hex();
    let ami_name = render_name(&cli.ami_name, stream, leaf, &image_id)?;
    let aws = Aws::new(Retry { max_retries: cli.max_retries, wait: cli.retry_wait }).await?;
    let targets = resolve_targets(cli, &aws).await?;
    let opts = Options {
        stream: stream.to_owned(),
        leaf: leaf.to_owned(),
        image_id: image_id.clone(),
        image_size: info.size_bytes,
        instance_name: cli.instance_name.clone(),
        unpacker_port: cli.unpacker_port,
        tls,
        tags: cli.tags.clone(),
        expires_at: cli.expires_in.map(|d| crate::tags::rfc3339(SystemTime::now() + d)),
        description: format!("{stream}/{leaf} (image {}), published by ami-publisher", &image_id[..16]),
        ami_name,
        force,
        ena_support: cli.ena_support,
        architecture: cli.architecture.sdk(),
        boot_mode: cli.boot_mode.map(BootMode::sdk),
        imds_support: cli.imds_support.sdk(),
        root_device_name: cli.root_device_name.clone(),
        volume_type: cli.volume_type.sdk(),
        kms_key_id: cli.kms_key_id.clone(),
        min_free_bytes: cli.min_free_bytes,
        ignore_missing_unpackers: cli.ignore_missing_unpackers,
        timeouts: Timeouts {
            unpacker: cli.unpacker_timeout,
            volume: cli.volume_timeout,
            snapshot: cli.snapshot_timeout,
            image: cli.image_timeout,
        },
    };
    Ok((opts, targets, aws))
}

fn human_bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

/// The final table of a publish.
pub fn table(r: &PublishResults) -> String {
    let mut s = format!(
        "{}/{} (image {}, {})\n{:<28} {:<13} {:<22} {:<24} {:>10} {:>8}  {}\n",
        r.stream,
        r.leaf,
        &r.image_id[..r.image_id.len().min(16)],
        human_bytes(r.size_bytes),
        "TARGET",
        "ACCOUNT ID",
        "AMI",
        "SNAPSHOT",
        "FETCHED",
        "TIME",
        "STATUS"
    );
    for t in &r.targets {
        let status = match (&t.error, t.reused, t.skipped) {
            (Some(e), _, _) => format!("FAILED: {e}"),
            (None, _, true) => "skipped (no unpacker)".to_owned(),
            (None, true, _) => "already published".to_owned(),
            (None, false, false) => "published".to_owned(),
        };
        s += &format!(
            "{:<28} {:<13} {:<22} {:<24} {:>10} {:>7.1}s  {}\n",
            format!("{},{}", t.account, t.region),
            t.account_id.as_deref().unwrap_or("-"),
            t.ami_id.as_deref().unwrap_or("-"),
            t.snapshot_id.as_deref().unwrap_or("-"),
            t.bytes_fetched.map_or("-".to_owned(), human_bytes),
            t.seconds,
            status
        );
    }
    let failed = r.targets.iter().filter(|t| !t.ok()).count();
    s += &format!("{} targets, {} failed\n", r.targets.len(), failed);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2_000_000_000);
        assert!(parse_size("2 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn names_render_and_are_checked() {
        assert_eq!(render_name("{stream}/{leaf}", "base/deb", "7", "ab").unwrap(), "base/deb/7");
        assert_eq!(render_name("x:{leaf}", "s", "1", "ab").unwrap(), "x_1");
        assert!(render_name("{leaf}", "s", "1", "ab").unwrap_err().to_string().contains("3 to 128"));
    }

    #[test]
    fn config_file_fills_unset_flags_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "targets = [\"a,r-1\", \"b,\"]\nimage-server = \"img:1\"\nena-support = true\nmax-concurrency = 3\n",
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut v: Vec<OsString> = vec!["ami-publisher".into(), "--config".into(), cfg.clone().into()];
            v.extend(extra.iter().map(OsString::from));
            v
        };
        let cli = parse_args(args(&["publish", "s", "1"])).unwrap();
        assert_eq!(cli.targets.len(), 2);
        assert_eq!(cli.image_server, "img:1");
        assert!(cli.ena_support);
        assert_eq!(cli.max_concurrency, 3);
        let cli = parse_args(args(&["--targets", "c,r-2", "publish", "s", "1", "--image-server", "other:2"])).unwrap();
        assert_eq!(cli.targets, vec!["c,r-2".parse::<TargetSpec>().unwrap()]);
        assert_eq!(cli.image_server, "other:2");
        std::fs::write(&cfg, "no-such-flag = 1\n").unwrap();
        let e = parse_args(args(&["publish", "s", "1"])).unwrap_err().to_string();
        assert!(e.contains("unknown setting 'no-such-flag'"), "{e}");
    }
}
