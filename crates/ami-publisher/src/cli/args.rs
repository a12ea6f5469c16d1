//! The arguments: global flags, subcommands and their own flags, and the
//! values they take, all checked as the command line is parsed.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    sharing,
    targets::TargetSpec,
    values::{Architecture, BootMode, EbsType, Imds, Tpm},
};

/// Publish images from the imageserver as identical, encrypted AMIs in many
/// AWS accounts and regions, through image-unpacker instances.
///
/// A target is ACCOUNT,REGION where ACCOUNT is an AWS profile (from
/// ~/.aws/config and ~/.aws/credentials, or AWS_CONFIG_FILE and
/// AWS_SHARED_CREDENTIALS_FILE; roles, SSO and endpoints as the AWS CLI has
/// them). An empty or '*' part means all: every profile, or every region
/// enabled in the account. ACCOUNT may also be org:* (every ACTIVE account
/// of the organization), org:r-ROOT or org:ou-OU (the accounts below it),
/// listed from --org-profile and reached through --org-role-name. Repeat
/// --targets, or give several in one quoted argument separated by spaces.
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
    /// The profile that lists the organization's accounts for `org:`
    /// targets (its management account, or a delegated administrator).
    #[arg(long, global = true, default_value = "default", value_name = "PROFILE")]
    pub org_profile: String,
    /// The role assumed in each account of an `org:` target, from
    /// --org-profile.
    #[arg(long, global = true, default_value = "OrganizationAccountAccessRole", value_parser = parse_role_name, value_name = "NAME")]
    pub org_role_name: String,
    /// The imageserver to read image manifests from (the unpackers use their own setting).
    #[arg(long, global = true, env = fleet_proto::IMAGE_SERVER_ENV, default_value_t = fleet_proto::default_image_server(), value_name = "HOST:PORT")]
    pub image_server: String,
    /// Value of the Name tag of unpacker instances.
    #[arg(long, global = true, default_value = "ImageUnpacker", value_name = "NAME")]
    pub instance_name: String,
    /// Port image-unpacker listens on.
    #[arg(long, global = true, default_value_t = fleet_proto::UNPACKER_PORT, value_name = "PORT")]
    pub unpacker_port: u16,
    /// Extra tags for AMIs and snapshots: KEY=VALUE,KEY=VALUE.
    #[arg(long, global = true, value_delimiter = ',', value_parser = crate::tags::parse_pair, value_name = "K=V,...")]
    pub tags: Vec<(String, String)>,
    /// Tag AMIs and snapshots with ExpiresAt = now + DURATION (e.g. 30d), for `expire`.
    #[arg(long, global = true, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub expires_in: Option<Duration>,
    /// Deprecate AMIs at now + DURATION (EnableImageDeprecation; at most
    /// 10 years): other accounts no longer list them, launches by id still
    /// work. On publish (an AMI already there keeps a time it has),
    /// copy-bootstrap-image and `deprecate`.
    #[arg(long, global = true, value_parser = parse_deprecate_in, value_name = "DURATION")]
    pub deprecate_in: Option<Duration>,
    /// Protect AMIs from deregistration (publish, copy-bootstrap-image,
    /// `protect`); `=cooldown` keeps them protected for 24 hours after
    /// protection is turned off.
    #[arg(long, global = true, value_enum, num_args = 0..=1, default_missing_value = "on", require_equals = true, value_name = "MODE")]
    pub deregistration_protection: Option<crate::lifecycle::ProtectionMode>,
    /// `expire`, `delete` and `delete-unused-images`: turn deregistration
    /// protection off first, instead of keeping protected AMIs. An AMI
    /// protected with a cooldown is kept for its 24 hours all the same.
    #[arg(long, global = true)]
    pub lift_protection: bool,
    /// AMI name; {stream}, {leaf} and {image_id} are replaced.
    #[arg(long, global = true, default_value = "{stream}/{leaf}", value_name = "TEMPLATE")]
    pub ami_name: String,
    /// Mark AMIs as supporting ENA (enhanced networking).
    #[arg(long, global = true)]
    pub ena_support: bool,
    /// AMI architecture.
    #[arg(long, global = true, value_enum, default_value = "x86_64")]
    pub architecture: Architecture,
    /// Mark AMIs as supporting Intel 82599 VF enhanced networking
    /// (SriovNetSupport=simple), for instance types that use it.
    #[arg(long, global = true)]
    pub sriov_net_support: bool,
    /// AMI boot mode (default: EC2's).
    #[arg(long, global = true, value_enum)]
    pub boot_mode: Option<BootMode>,
    /// NitroTPM for instances of the AMI ("v2.0"); needs --boot-mode uefi.
    #[arg(long, global = true, value_enum)]
    pub tpm_support: Option<Tpm>,
    /// The AMI's UEFI variable store: a file holding its base64 text (as
    /// python-uefivars writes it), at most 64000 characters; needs --boot-mode uefi
    /// or uefi-preferred.
    #[arg(long, global = true, value_name = "FILE")]
    pub uefi_data: Option<PathBuf>,
    /// AMI description; {stream}, {leaf} and {image_id} are replaced (at
    /// most 255 characters).
    #[arg(
        long,
        global = true,
        default_value = "{stream}/{leaf} (image {image_id}), published by ami-publisher",
        value_name = "TEMPLATE"
    )]
    pub description: String,
    /// Instances from the AMI require IMDSv2 ("v2.0"); "none" leaves EC2's default.
    #[arg(long, global = true, value_enum, default_value = "v2.0")]
    pub imds_support: Imds,
    /// Root device name of the AMI.
    #[arg(long, global = true, default_value = "/dev/xvda", value_name = "DEVICE")]
    pub root_device_name: String,
    /// EBS type of unpacker volumes and of the AMI's root volume.
    #[arg(long, global = true, value_enum, default_value = "gp3")]
    pub volume_type: EbsType,
    /// KMS key for new volumes, snapshot copies and AMI copies (default:
    /// the account's EBS default key in each region). Checked with KMS
    /// before anything is made; AMIs shared with other accounts need a
    /// customer managed key they may use.
    #[arg(long, global = true, value_parser = crate::keys::parse_key, value_name = "KEY")]
    pub kms_key_id: Option<String>,
    /// The KMS key of some targets: ACCOUNT,REGION=KEY (either part of the
    /// target may be '*'; the most specific match wins over --kms-key-id).
    /// In the config file: a table `[kms-keys]` of "ACCOUNT,REGION" = "KEY".
    #[arg(long, global = true, value_parser = crate::keys::parse_target_key, value_name = "ACCOUNT,REGION=KEY")]
    pub target_kms_key: Vec<(TargetSpec, String)>,
    /// The fleet's pointer: an SSM parameter (data type aws:ec2:image) per
    /// target that `publish` and `promote` point at the leaf's AMI, and
    /// `rollback` points back. The name may hold {stream}, {leaf},
    /// {account} and {region}, e.g. /ami-fleet/{stream}/latest. Each
    /// version is labelled leaf-LEAF, so NAME:leaf-LEAF resolves to a leaf.
    #[arg(long, global = true, value_parser = crate::pointer::Template::parse, value_name = "TEMPLATE")]
    pub ssm_parameter: Option<crate::pointer::Template>,
    /// Share AMIs with these AWS accounts: they may launch them, and read
    /// their snapshots so that they can copy them.
    #[arg(long, global = true, value_delimiter = ',', value_parser = sharing::parse_account, value_name = "ID,...")]
    pub share_with_accounts: Vec<String>,
    /// Share AMIs with every account of these organizations (launch only:
    /// EC2 cannot share snapshots with an organization).
    #[arg(long, global = true, value_delimiter = ',', value_parser = sharing::parse_organization, value_name = "ARN,...")]
    pub share_with_organizations: Vec<String>,
    /// Share AMIs with every account of these organizational units and the
    /// OUs below them (launch only).
    #[arg(long, global = true, value_delimiter = ',', value_parser = sharing::parse_ou, value_name = "ARN,...")]
    pub share_with_ous: Vec<String>,
    /// Make AMIs public (launchable by every AWS account). Refused unless
    /// --allow-public-image is given too; and refused then as well, as
    /// the AMIs ami-publisher makes are encrypted, which EC2 cannot make
    /// public.
    #[arg(long, global = true)]
    pub public: bool,
    /// Confirms that --public is meant.
    #[arg(long, global = true)]
    pub allow_public_image: bool,
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
    /// Print what a command would do, and do nothing: for publish, a plan
    /// per target (AMI reused or made, the stream's volume, bytes to write,
    /// name, key, shares) with EC2's DryRun answer for each write.
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
    /// Longest one attempt of an AWS call may take before it is given up
    /// and retried (an answer that never comes: a create that timed out is
    /// looked for, not repeated). EC2 answers in well under a second, so
    /// the default leaves room for a slow network.
    #[arg(long, global = true, default_value = "30s", value_parser = positive_duration, value_name = "DURATION")]
    pub call_timeout: Duration,
    /// Longest one AWS call may take with all its retries and back-offs.
    #[arg(long, global = true, default_value = "5m", value_parser = positive_duration, value_name = "DURATION")]
    pub operation_timeout: Duration,
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
    pub tls: fleet_cli::TlsArgs,
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
    /// back, and the volume is snapshotted and registered. With --via
    /// ebs-direct there is no unpacker: the snapshot is made with the EBS
    /// direct APIs from the newest snapshot of an earlier leaf in the
    /// target, writing only the blocks that differ. A run that was
    /// interrupted is finished by running it again.
    Publish {
        /// Image stream, e.g. base/debian-12.
        stream: String,
        /// Leaf (version) of the stream.
        leaf: String,
        /// Make a new AMI even if one of this leaf exists (dated name).
        #[arg(long)]
        force: bool,
        /// How each target's snapshot is made.
        #[arg(long, value_enum, default_value = "unpacker")]
        via: crate::values::Via,
        /// --via ebs-direct: PutSnapshotBlock calls in flight per target
        /// (EBS takes 1,000 per second per snapshot).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1000), value_name = "N")]
        blocks_in_flight: u16,
        /// Then read every target's new snapshot back with the EBS direct
        /// APIs and compare it with the image (as `verify` does); a target
        /// whose bytes differ fails.
        #[arg(long)]
        verify: bool,
    },
    /// Give every target that lacks an AMI of STREAM a copy of the nearest
    /// one (same account first, then the same area): CopyImage encrypted
    /// within an account; across accounts by sharing the root snapshot,
    /// copying it encrypted and registering it. Re-running is a no-op.
    CopyBootstrapImage { stream: String },
    /// Share the AMIs in results files (and, with accounts, their
    /// snapshots) with the accounts, organizations and OUs of
    /// --share-with-accounts, --share-with-organizations and
    /// --share-with-ous. What is shared already is left as it is.
    Share {
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// Point every target's --ssm-parameter at the AMI of STREAM/LEAF (a
    /// new version, labelled leaf-LEAF). When a target has no AMI of the
    /// leaf, nothing changes anywhere, unless --partial.
    Promote {
        stream: String,
        leaf: String,
        /// Promote in the targets that have the leaf, though others lack it.
        #[arg(long)]
        partial: bool,
    },
    /// Point every target's --ssm-parameter back at the AMI it held before
    /// its current one (a new version; the history is kept).
    Rollback { stream: String },
    /// Where every target's --ssm-parameter points: version, AMI, leaf;
    /// flags pointers at AMIs that are gone and targets that disagree.
    ListPointers { stream: String },
    /// Take back what `share` or `publish --share-with-*` gave the AMIs in
    /// results files: the grantees of the --share-with-* flags, or, with
    /// none, those each results file says its AMIs were shared with.
    /// Other permissions are left as they are.
    Unshare {
        #[arg(required = true)]
        results_files: Vec<PathBuf>,
    },
    /// Create and attach an encrypted volume of SIZE_GIB to each unpacker.
    AddVolumes {
        /// 1 to 16384 (EBS's largest gp3 volume, 16 TiB).
        #[arg(value_parser = clap::value_parser!(u64).range(1..=16384))]
        size_gib: u64,
    },
    /// Retire a stream's old AMIs in steps, by age: deprecate, disable,
    /// then delete (with snapshots). The --keep newest, and any AMI in use
    /// (referenced by an instance, launch template or SSM parameter, held
    /// by a labelled version of --ssm-parameter, or launched within
    /// --min-unused-age), are left alone; protected AMIs are kept.
    /// --dry-run shows the plan.
    Retire {
        stream: String,
        /// Leave this many of the newest AMIs alone.
        #[arg(long, default_value_t = 1)]
        keep: usize,
        /// Deprecate AMIs older than this.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        deprecate_after: Option<Duration>,
        /// Disable AMIs older than this.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        disable_after: Option<Duration>,
        /// Delete AMIs (and their snapshots) older than this.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        delete_after: Option<Duration>,
        /// An AMI launched within this long counts as in use.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
        min_unused_age: Duration,
    },
    /// Prove the bytes behind AMIs (of results files, or --leaf) are their
    /// image's: the blocks of each AMI's root snapshot, read with the EBS
    /// direct APIs, against the chunk digests of the leaf its tags name on
    /// the imageserver; and, for two leaves of one stream in a target, the
    /// blocks EBS lists as changed between their snapshots against the
    /// leaves' difference. Exit 1 names the first block that differs.
    Verify {
        #[command(flatten)]
        amis: AmiArgs,
        /// Read about PERCENT of each image's blocks, chosen at random on
        /// each run (a spot check); 100 reads every one.
        #[arg(long, default_value = "100", value_parser = parse_sample, value_name = "PERCENT")]
        sample: crate::verify::Sample,
    },
    /// Write the bytes behind a snapshot, or behind an AMI's root
    /// snapshot, to a sparse raw FILE, read with the EBS direct APIs (only
    /// the blocks EBS lists; each checked against its SHA-256). Then
    /// `imagetool add STREAM/LEAF FILE` makes it a leaf (sending only the
    /// chunks the imageserver lacks), and `publish` puts it everywhere: an
    /// AMI built by other means (Packer, CreateImage) enters a stream. The
    /// role needs ebs:ListSnapshotBlocks and ebs:GetSnapshotBlock on the
    /// snapshot (the shipped policy allows them on this tool's snapshots
    /// only).
    ExportSnapshot {
        /// ACCOUNT,REGION,ID: a profile, a region, and a snapshot or AMI id.
        #[arg(value_parser = crate::export::parse_source, value_name = "ACCOUNT,REGION,ID")]
        source: (crate::targets::Target, String),
        /// The raw image file to write (replaced whole when complete).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Deprecate AMIs (of results files, or --leaf) at now + --deprecate-in.
    Deprecate {
        #[command(flatten)]
        amis: AmiArgs,
    },
    /// Take the deprecation time off AMIs (of results files, or --leaf).
    Undeprecate {
        #[command(flatten)]
        amis: AmiArgs,
    },
    /// Protect AMIs (of results files, or --leaf) from deregistration
    /// (--deregistration-protection=cooldown for the 24-hour cooldown).
    Protect {
        #[command(flatten)]
        amis: AmiArgs,
    },
    /// Turn deregistration protection off (AMIs of results files, or --leaf).
    Unprotect {
        #[command(flatten)]
        amis: AmiArgs,
    },
    /// Disable AMIs (of results files, or --leaf): no launches, no launch
    /// permissions (enabling gives none back; share again after).
    Disable {
        #[command(flatten)]
        amis: AmiArgs,
    },
    /// Make disabled AMIs (of results files, or --leaf) available again.
    Enable {
        #[command(flatten)]
        amis: AmiArgs,
    },
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
    /// Delete every AMI, snapshot, volume and instance ami-publisher made
    /// (tagged ManagedBy=ami-fleet) whose ExpiresAt tag is in the past (one
    /// "now" for all targets); an AMI's snapshots go with it. Expired
    /// resources it did not make are listed as kept and left alone.
    Expire,
    /// Import an SSH public key as key pair NAME into every target.
    ImportKeyPair { name: String, pubkey_file: PathBuf },
    /// Print the IAM policy this tool needs, for the unpackers named by
    /// --instance-name and the key of --kms-key-id: reads anywhere; creates
    /// only with the tag ManagedBy=ami-fleet in the same call; changes and
    /// deletes only of what carries that tag (and of the unpacker
    /// instances); the key only through EC2. Calls no AWS.
    IamPolicy,
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

/// The AMIs a lifecycle subcommand changes: those of results files, and
/// those of leaves in every target (--targets).
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = true)]
pub struct AmiArgs {
    /// Results files of publish runs.
    pub results_files: Vec<PathBuf>,
    /// The AMIs of STREAM/LEAF in every target (repeatable).
    #[arg(long = "leaf", value_name = "STREAM/LEAF", value_parser = parse_leaf)]
    pub leaves: Vec<(String, String)>,
}

/// A percentage above 0 and at most 100.
fn parse_sample(s: &str) -> Result<crate::verify::Sample, String> {
    let p: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a percentage"))?;
    crate::verify::Sample::percent(p)
}

/// STREAM/LEAF: the stream is everything before the last `/`.
fn parse_leaf(s: &str) -> Result<(String, String), String> {
    let name = image_format::ImageName::parse(s).map_err(|e| format!("'{s}' is not STREAM/LEAF: {e}"))?;
    Ok((name.stream().to_owned(), name.leaf().to_owned()))
}

/// Image search by tags and age, with optional CSV reports.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageArgs {
    #[command(flatten)]
    pub search: SearchArgs,
    /// Only images created at least this long ago.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_image_age: Duration,
    /// An image launched within this long counts as used, though nothing
    /// references it now (EC2's lastLaunchedTime, which may lag a launch
    /// by up to 24 hours). 0s: its last launch does not count.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_unused_age: Duration,
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

pub use fleet_cli::parse_size;

/// An IAM role name (with an optional path): up to 64 characters of
/// letters, digits and `+=,.@_-` (IAM's rule), path parts separated by `/`.
pub fn parse_role_name(s: &str) -> Result<String, String> {
    let name = s.rsplit('/').next().unwrap_or(s);
    let ok = !name.is_empty()
        && name.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c))
        && !s.starts_with('/');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not an IAM role name (letters, digits and +=,.@_-, at most 64)"))
    }
}

/// Parse a duration that is more than zero (a zero timeout would fail
/// every call at once).
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("'{s}' is zero; give a time like 30s or 2m")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("'{s}': {e} (a time like 30s or 2m)")),
    }
}

impl Cli {
    /// The grantees of the --share-with-* flags.
    pub fn grantees(&self) -> sharing::Grantees {
        sharing::Grantees {
            accounts: self.share_with_accounts.clone(),
            organizations: self.share_with_organizations.clone(),
            ous: self.share_with_ous.clone(),
        }
    }

    /// How AWS calls are retried and bounded in time.
    pub fn retry(&self) -> crate::aws::Retry {
        crate::aws::Retry {
            max_retries: self.max_retries,
            wait: self.retry_wait,
            attempt_timeout: self.call_timeout,
            operation_timeout: self.operation_timeout,
        }
    }
}

/// `--deprecate-in`: more than nothing, and at most EC2's 10 years.
fn parse_deprecate_in(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("a deprecation time must be ahead: give more than 0s".into());
    }
    if d > crate::lifecycle::MAX_DEPRECATE_IN {
        return Err("EC2 takes a deprecation time at most 10 years ahead".into());
    }
    Ok(d)
}
