//! Running a parsed command line: publish, or one of the operations, and
//! what is printed and returned (exit status) afterwards.

use std::{path::Path, time::SystemTime};

use anyhow::{Context as _, bail};

use crate::{
    aws::Aws,
    keys::Keys,
    progress::Board,
    publish::{self, Options},
    results::{PublishResults, write_json_atomic},
    settings::{Settings, Timeouts},
    targets::{self},
    values::{BootMode, Tpm},
};

use super::args::{Cli, Command};

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

fn bail_refused<T>(why: &str) -> anyhow::Result<T> {
    refuse(Err(anyhow::anyhow!("{why}")))
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    use crate::ops;
    if let Command::Publish { stream, leaf, force, via, blocks_in_flight, verify } = &cli.command {
        let direct = (*via == crate::values::Via::EbsDirect).then_some(usize::from(*blocks_in_flight));
        return run_publish(&cli, Asked { stream, leaf, force: *force, direct, verify: *verify }).await;
    }
    if let Command::ExportSnapshot { source: (t, id), file } = &cli.command {
        refuse(check_writable(file))?;
        let aws = refuse(Aws::new(cli.retry()).await)?;
        let board = Board::new(!cli.json, &[t.to_string()]);
        let line = board.line(&t.to_string());
        let (ec2, ebs) = (aws.ec2(t).await, aws.ebs(t).await);
        let exported = crate::export::export(&ec2, &ebs, t, id, file, &line).await;
        line.finish(match &exported {
            Ok(_) => format!("{} written", file.display()),
            Err(e) => format!("FAILED: {e:#}"),
        });
        let exported = exported?;
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&exported)?);
        } else {
            println!(
                "{}: {} ({} of {} written from {} blocks)",
                exported.snapshot,
                file.display(),
                human_bytes(exported.bytes_written),
                human_bytes(exported.size_bytes),
                exported.blocks_read
            );
        }
        return Ok(Outcome::AllSucceeded);
    }
    if let Command::IamPolicy = &cli.command {
        let keys = settings(&cli).keys;
        let policy = crate::policy::publisher_policy(&crate::policy::PolicyFor {
            instance_name: &cli.instance_name,
            kms_keys: &keys.all(),
            org_role_name: &cli.org_role_name,
            ssm_parameter: cli.ssm_parameter.as_ref(),
        });
        println!("{}", serde_json::to_string_pretty(&policy)?);
        return Ok(Outcome::AllSucceeded);
    }
    // Everything the command line names is read and checked before any AWS
    // call (a refusal exits 2, naming what was wrong).
    let inputs = refuse(read_inputs(&cli))?;
    let aws = refuse(Aws::new(cli.retry()).await)?;
    // Commands on results files take their targets from the files.
    let from_results = match &cli.command {
        Command::Deprecate { amis }
        | Command::Verify { amis, .. }
        | Command::Undeprecate { amis }
        | Command::Protect { amis }
        | Command::Unprotect { amis }
        | Command::Disable { amis }
        | Command::Enable { amis }
            if amis.leaves.is_empty() || !amis.results_files.is_empty() =>
        {
            if !amis.leaves.is_empty() {
                bail_refused(
                    "give results files or --leaf, not both: the targets come from the files, or from --targets",
                )?
            }
            Some(refuse(ops::amis_by_target(&amis.results_files))?)
        }
        Command::Delete { results_files }
        | Command::DeleteTags { results_files, .. }
        | Command::SetExclusiveTags { results_files, .. }
        | Command::LaunchInstancesForImages { results_files, .. }
        | Command::Share { results_files }
        | Command::Unshare { results_files } => Some(refuse(ops::amis_by_target(results_files))?),
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
        settings: settings(&cli),
        dry_run: cli.dry_run,
        lift_protection: cli.lift_protection,
        board: Board::new(!cli.json, &names),
    };
    let amis: std::collections::HashMap<_, _> = from_results.unwrap_or_default().into_iter().collect();
    let (json, q) = (cli.json, false);
    let outcome = match &cli.command {
        Command::Publish { .. } | Command::IamPolicy | Command::ExportSnapshot { .. } => {
            unreachable!("handled above")
        }
        Command::AddVolumes { size_gib } => {
            show(ops::add_volumes(&ctx, *size_gib, cli.volume_type.sdk()).await, json, q)
        }
        Command::CopyBootstrapImage { stream } => show(ops::copy_bootstrap_image(&ctx, stream).await, json, q),
        Command::Delete { .. } => show(ops::delete(&ctx, &amis).await, json, q),
        Command::DeleteTags { tag_key, .. } => show(ops::delete_tags(&ctx, tag_key, &amis).await, json, q),
        Command::DeleteTagsOnUnpackers { tag_key } => show(ops::tag_unpackers(&ctx, &[], Some(tag_key)).await, json, q),
        Command::Expire => show(ops::expire(&ctx, SystemTime::now()).await, json, q),
        Command::ImportKeyPair { name, .. } => {
            show(ops::import_key_pair(&ctx, name, inputs.public_key.as_deref().unwrap_or_default()).await, json, q)
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
                unused_for: usage.min_unused_age,
                pointer: cli.ssm_parameter.as_ref(),
                now: SystemTime::now(),
            };
            // The reports are read before anything is deleted; one survey
            // of images and instances serves them and the lists.
            let listing = !matches!(cli.command, Command::DeleteUnusedImages { .. });
            let csv = usage.unused_images_csv.is_some() || usage.old_image_instances_csv.is_some();
            let survey = if listing || csv { ops::image_usage(&ctx, &search).await } else { Vec::new() };
            if let Some(path) = &usage.unused_images_csv {
                let unused = ops::images::only(&survey, ops::Usage::Unused);
                ops::write_csv(path, &unused, &["ami", "name", "created", "stream"])?;
            }
            if let Some(path) = &usage.old_image_instances_csv {
                let mut used = ops::images::only(&survey, ops::Usage::Used);
                for r in &mut used {
                    r.records.retain(|u| !u.instances.is_empty());
                }
                ops::write_csv(path, &used, &["ami", "name", "created", "instances"])?;
            }
            match &cli.command {
                Command::ListUsedImages { .. } => show(ops::images::only(&survey, ops::Usage::Used), json, q),
                Command::ListUnusedImages { .. } => show(ops::images::only(&survey, ops::Usage::Unused), json, q),
                _ => show(ops::delete_unused_images(&ctx, &search).await, json, q),
            }
        }
        Command::LaunchInstances { launch, .. } | Command::LaunchInstancesForImages { launch, .. } => {
            let user_data = inputs.user_data.as_deref().map(aws_smithy_types::base64::encode);
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
        Command::Share { .. } => show(ops::share(&ctx, &cli.grantees(), &amis).await, json, q),
        Command::Verify { amis: a, sample } => {
            let images = refuse(connect_images(&cli).await)?;
            show(ops::verify(&ctx, &images, &amis, &a.leaves, *sample).await, json, q)
        }
        Command::Deprecate { amis: a } => {
            let at = SystemTime::now() + cli.deprecate_in.expect("checked in read_inputs");
            show(ops::lifecycle::change(&ctx, ops::Change::Deprecate(at), &amis, &a.leaves).await, json, q)
        }
        Command::Undeprecate { amis: a } => {
            show(ops::lifecycle::change(&ctx, ops::Change::Undeprecate, &amis, &a.leaves).await, json, q)
        }
        Command::Retire { stream, keep, deprecate_after, disable_after, delete_after, min_unused_age } => {
            let search = [(crate::tags::STREAM.to_owned(), stream.clone())];
            let q = ops::images::UsageSearch {
                search: &search,
                exclude: &[],
                min_age: std::time::Duration::ZERO,
                unused_for: *min_unused_age,
                pointer: cli.ssm_parameter.as_ref(),
                now: SystemTime::now(),
            };
            let steps = ops::lifecycle::Retire {
                keep: *keep,
                deprecate_after: *deprecate_after,
                disable_after: *disable_after,
                delete_after: *delete_after,
            };
            show(ops::lifecycle::retire(&ctx, &q, steps).await, json, false)
        }
        Command::Protect { amis: a } => {
            let mode = cli.deregistration_protection.unwrap_or(crate::lifecycle::ProtectionMode::On);
            show(ops::lifecycle::change(&ctx, ops::Change::Protect(mode), &amis, &a.leaves).await, json, q)
        }
        Command::Unprotect { amis: a } => {
            show(ops::lifecycle::change(&ctx, ops::Change::Unprotect, &amis, &a.leaves).await, json, q)
        }
        Command::Disable { amis: a } => {
            show(ops::lifecycle::change(&ctx, ops::Change::Disable, &amis, &a.leaves).await, json, q)
        }
        Command::Enable { amis: a } => {
            show(ops::lifecycle::change(&ctx, ops::Change::Enable, &amis, &a.leaves).await, json, q)
        }
        Command::Promote { stream, leaf, partial } => {
            let template = cli.ssm_parameter.as_ref().expect("checked in read_inputs");
            show(ops::promote(&ctx, template, stream, leaf, *partial).await, json, q)
        }
        Command::Rollback { stream } => {
            let template = cli.ssm_parameter.as_ref().expect("checked in read_inputs");
            show(ops::rollback(&ctx, template, stream).await, json, q)
        }
        Command::ListPointers { stream } => {
            let template = cli.ssm_parameter.as_ref().expect("checked in read_inputs");
            show(ops::list_pointers(&ctx, template, stream).await, json, q)
        }
        Command::Unshare { .. } => show(ops::unshare(&ctx, &cli.grantees(), &amis).await, json, q),
        Command::SetTagsOnUnpackers => show(ops::tag_unpackers(&ctx, &cli.tags, None).await, json, q),
        Command::StartInstances => show(ops::start_instances(&ctx).await, json, q),
        // Quiet: cron mails only what it did.
        Command::StopIdleUnpackers { max_idle_time } => {
            show(ops::stop_idle_unpackers(&ctx, *max_idle_time).await, json, true)
        }
        Command::TerminateInstances => show(ops::terminate_instances(&ctx).await, json, q),
    };
    Ok(outcome)
}

/// The files a command reads, read before any AWS call.
#[derive(Default)]
struct Inputs {
    /// `import-key-pair`'s public key.
    public_key: Option<Vec<u8>>,
    /// `launch-instances`' `--user-data`.
    user_data: Option<Vec<u8>>,
}

/// Read and check what the command line names beyond what clap checks:
/// files to read, files to write, and flags a command needs.
fn read_inputs(cli: &Cli) -> anyhow::Result<Inputs> {
    let mut inputs = Inputs::default();
    if let Some(p) = &cli.results {
        check_writable(p)?;
    }
    match &cli.command {
        Command::ImportKeyPair { pubkey_file, .. } => {
            let key =
                std::fs::read(pubkey_file).with_context(|| format!("reading public key {}", pubkey_file.display()))?;
            if !key.starts_with(b"ssh-") && !key.starts_with(b"ecdsa-") {
                bail!(
                    "{} does not look like an OpenSSH public key (ssh-ed25519 ..., ssh-rsa ..., ecdsa-...)",
                    pubkey_file.display()
                );
            }
            inputs.public_key = Some(key);
        }
        Command::LaunchInstances { launch, .. } | Command::LaunchInstancesForImages { launch, .. } => {
            if let Some(p) = &launch.user_data {
                inputs.user_data =
                    Some(std::fs::read(p).with_context(|| format!("reading --user-data {}", p.display()))?);
            }
        }
        Command::SetTagsOnUnpackers if cli.tags.is_empty() => bail!("give the tags to set with --tags K=V,..."),
        Command::Share { .. } => {
            refuse_public(cli)?;
            if cli.grantees().is_empty() {
                bail!("share with whom? give --share-with-accounts, --share-with-organizations or --share-with-ous");
            }
        }
        Command::Unshare { .. } => refuse_public(cli)?,
        Command::Retire { deprecate_after: None, disable_after: None, delete_after: None, .. } => {
            bail!("retire how? give --deprecate-after, --disable-after or --delete-after")
        }
        Command::Deprecate { .. } if cli.deprecate_in.is_none() => {
            bail!("deprecate when? give --deprecate-in DURATION (e.g. 90d)")
        }
        Command::ListUsedImages { .. }
        | Command::ListUnusedImages { .. }
        | Command::DeleteUnusedImages { .. }
        | Command::Retire { .. }
            if cli.ssm_parameter.as_ref().is_some_and(crate::pointer::Template::uses_leaf) =>
        {
            bail!("--ssm-parameter: a pointer that moves between leaves cannot be named by {{leaf}}")
        }
        Command::Promote { .. } | Command::Rollback { .. } | Command::ListPointers { .. } => {
            let Some(template) = &cli.ssm_parameter else {
                bail!("which pointer? give --ssm-parameter TEMPLATE (e.g. /ami-fleet/{{stream}}/latest)")
            };
            if template.uses_leaf() && !matches!(cli.command, Command::Promote { .. }) {
                bail!("--ssm-parameter {template}: a pointer that moves between leaves cannot be named by {{leaf}}");
            }
        }
        _ => {}
    }
    if let Command::ListUnusedImages { usage }
    | Command::ListUsedImages { usage }
    | Command::DeleteUnusedImages { usage } = &cli.command
    {
        for p in [&usage.unused_images_csv, &usage.old_image_instances_csv].into_iter().flatten() {
            check_writable(p)?;
        }
    }
    Ok(inputs)
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
    let targets = targets::expand(
        &cli.targets,
        &cli.skip_targets,
        aws.profiles(),
        |a| async move { aws.enabled_regions(&a).await },
        |scope| async move { aws.org_accounts(&cli.org_profile, &cli.org_role_name, &scope).await },
    )
    .await?;
    if targets.is_empty() {
        bail!("the --targets given, minus --skip-targets, leave no target");
    }
    Ok(targets)
}

pub(super) fn render_name(template: &str, stream: &str, leaf: &str, image_id: &str) -> anyhow::Result<String> {
    let raw = template.replace("{stream}", stream).replace("{leaf}", leaf).replace("{image_id}", image_id);
    let name = crate::ami_name_chars(&raw);
    if !(3..=128).contains(&name.len()) {
        bail!("AMI name '{name}' (from --ami-name '{template}') must be 3 to 128 characters");
    }
    Ok(name)
}

/// The AMI description from its template (`--description`).
fn render_description(template: &str, stream: &str, leaf: &str, image_id: &str) -> anyhow::Result<String> {
    let d = template.replace("{stream}", stream).replace("{leaf}", leaf).replace("{image_id}", image_id);
    if d.chars().count() > 255 {
        bail!(
            "the AMI description from --description '{template}' is {} characters; EC2 takes at most 255",
            d.chars().count()
        );
    }
    Ok(d)
}

/// Boot options read from files.
struct BootOptions {
    uefi_data: Option<String>,
}

/// Check the boot options against each other (as RegisterImage would,
/// but before any snapshot exists) and read --uefi-data.
fn boot_options(cli: &Cli) -> anyhow::Result<BootOptions> {
    let uefi = matches!(cli.boot_mode, Some(BootMode::Uefi));
    if cli.tpm_support.is_some() && !uefi {
        bail!("--tpm-support needs --boot-mode uefi (NitroTPM is only offered to UEFI instances)");
    }
    let uefi_data = match &cli.uefi_data {
        None => None,
        Some(_) if !matches!(cli.boot_mode, Some(BootMode::Uefi | BootMode::UefiPreferred)) => {
            bail!("--uefi-data needs --boot-mode uefi or uefi-preferred (a legacy BIOS boot reads no UEFI variables)")
        }
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading --uefi-data {}", p.display()))?;
            let data: String = text.split_whitespace().collect();
            let base64 = data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
            if data.is_empty() || !base64 || !data.len().is_multiple_of(4) {
                bail!("--uefi-data {}: not base64 text (the variable store as python-uefivars writes it)", p.display());
            }
            if data.len() > 64_000 {
                bail!("--uefi-data {}: {} characters; EC2 takes at most 64000", p.display(), data.len());
            }
            Some(data)
        }
    };
    Ok(BootOptions { uefi_data })
}

/// `--public` is refused: without --allow-public-image, as a guard; with
/// it, because EC2 does not make an AMI with encrypted volumes public (EC2
/// User Guide, "Make your AMI publicly available", its limitations), and
/// every AMI this tool makes is encrypted.
fn refuse_public(cli: &Cli) -> anyhow::Result<()> {
    if cli.public && !cli.allow_public_image {
        bail!(
            "--public makes an AMI launchable by every AWS account: give --allow-public-image as well if that is meant"
        );
    }
    if cli.public {
        bail!(
            "--public: the AMIs ami-publisher makes are encrypted, and EC2 cannot make an AMI with encrypted \
             snapshots public; share them with accounts, organizations or OUs instead (--share-with-*)"
        );
    }
    Ok(())
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
        .with_context(|| format!("{} cannot be written: no file can be made in {}", path.display(), dir.display()))?;
    Ok(())
}

/// What `publish` was asked, beyond the global flags.
#[derive(Clone, Copy)]
struct Asked<'a> {
    stream: &'a str,
    leaf: &'a str,
    force: bool,
    /// `--via ebs-direct`'s blocks in flight per target.
    direct: Option<usize>,
    verify: bool,
}

/// `publish`.
async fn run_publish(cli: &Cli, asked: Asked<'_>) -> anyhow::Result<Outcome> {
    let Asked { stream, leaf, .. } = asked;
    // Everything that can be refused is refused before any AWS resource is made.
    let Prepared { opts, targets, aws, manifest, images } = refuse(prepare_publish(cli, asked).await)?;
    let names: Vec<String> = targets.iter().map(ToString::to_string).collect();
    let board = Board::new(!cli.json, &names);
    if cli.dry_run {
        let plans = publish::plan(&aws, &targets, &opts, &manifest, &images, cli.max_concurrency, &board).await;
        if let Some(path) = &cli.results {
            // A plan is not a results file: `delete`, `unshare` and the
            // others read that file (it may be set in the config file).
            tracing::warn!("--dry-run: {} is left as it is (use --json for the plan)", path.display());
        }
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&plans)?);
        } else {
            print!("{}", plan_table(&opts, &plans));
        }
        return Ok(if plans.iter().all(|p| p.error.is_none()) { Outcome::AllSucceeded } else { Outcome::SomeFailed });
    }
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

/// The imageserver of --image-server.
async fn connect_images(cli: &Cli) -> anyhow::Result<image_client::Client> {
    image_client::connect(&cli.image_server, &cli.tls.files()).await.context("connecting to the imageserver")
}

/// A publish ready to run: everything checked that can be before it acts.
struct Prepared {
    opts: Options,
    targets: Vec<targets::Target>,
    aws: Aws,
    /// The leaf's manifest, and the imageserver (for a plan's other leaves).
    manifest: image_format::Manifest,
    images: image_client::Client,
}

async fn prepare_publish(cli: &Cli, asked: Asked<'_>) -> anyhow::Result<Prepared> {
    let Asked { stream, leaf, force, direct, verify } = asked;
    let name = image_format::ImageName::new(stream, leaf).context("bad image name")?;
    let boot = boot_options(cli)?;
    refuse_public(cli)?;
    // The description's length, checked before the image id is known (every one is 64 hex digits).
    render_description(&cli.description, stream, leaf, &"0".repeat(64))?;
    if cli.targets.is_empty() {
        bail!("no targets: give --targets ACCOUNT,REGION (or `targets` in the config file)");
    }
    if let Some(p) = &cli.results {
        check_writable(p)?;
    }
    let tls = cli.tls.files();
    let mut images = connect_images(cli).await?;
    let (info, manifest) = match image_client::get_manifest(&mut images, &name).await {
        Ok(got) => got,
        Err(image_client::ClientError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
            bail!("image {name} is not on the imageserver at {}", cli.image_server)
        }
        Err(e) => {
            // Under TLS 1.3 a certificate the imageserver refuses shows up
            // here, as a transport error: name it.
            let message = fleet_tls::dial::error_chain(&e);
            let server = fleet_tls::IMAGESERVER_TLS_NAME;
            let why = fleet_tls::dial::unnamed_refusal(&message, &cli.image_server, &tls, server).await;
            return Err(match why {
                Some(why) => anyhow::Error::new(e).context(why),
                None => e.into(),
            });
        }
    };
    if direct.is_some() && manifest.chunk_size() != publish::BLOCK {
        bail!(
            "--via ebs-direct needs {name} cut in {}-byte chunks (EBS's block size), not {}: add it with --chunk-size {}",
            publish::BLOCK,
            manifest.chunk_size(),
            publish::BLOCK
        );
    }
    let image_id = manifest.image_id().to_hex();
    let ami_name = render_name(&cli.ami_name, stream, leaf, &image_id)?;
    let description = render_description(&cli.description, stream, leaf, &image_id)?;
    let aws = Aws::new(cli.retry()).await?;
    let targets = resolve_targets(cli, &aws).await?;
    if let Some(template) = &cli.ssm_parameter {
        for t in &targets {
            template
                .render(stream, leaf, &t.account, &t.region)
                .map_err(|e| anyhow::anyhow!("--ssm-parameter: {e}"))?;
        }
    }
    let settings = settings(cli);
    let keys = crate::keys::preflight(&aws, &targets, &settings.keys, &cli.grantees(), cli.max_concurrency).await?;
    let shared_name = if force { publish::dated_name(&ami_name) } else { ami_name.clone() };
    let allowed = crate::allowed::preflight(&aws, &targets, &shared_name, &cli.grantees(), cli.max_concurrency).await?;
    let opts = Options {
        stream: stream.to_owned(),
        leaf: leaf.to_owned(),
        image_id: image_id.clone(),
        image_size: info.size_bytes,
        settings,
        tags: cli.tags.clone(),
        expires_at: cli.expires_in.map(|d| crate::tags::rfc3339(SystemTime::now() + d)),
        description,
        ami_name,
        force,
        ena_support: cli.ena_support,
        sriov_net_support: cli.sriov_net_support,
        architecture: cli.architecture.sdk(),
        boot_mode: cli.boot_mode.map(BootMode::sdk),
        tpm_support: cli.tpm_support.map(Tpm::sdk),
        uefi_data: boot.uefi_data,
        imds_support: cli.imds_support.sdk(),
        root_device_name: cli.root_device_name.clone(),
        volume_type: cli.volume_type.sdk(),
        min_free_bytes: cli.min_free_bytes,
        ignore_missing_unpackers: cli.ignore_missing_unpackers,
        shares: cli.grantees(),
        keys: keys.into_iter().map(|(t, c)| (t, c.map(|c| c.arn))).collect(),
        allowed: allowed.into_iter().map(|(t, f)| (t, f.into_iter().map(|f| f.line).collect())).collect(),
        ssm_parameter: cli.ssm_parameter.clone(),
        direct: direct.map(|blocks_in_flight| publish::Direct {
            manifest: std::sync::Arc::new(manifest.clone()),
            images: images.clone(),
            blocks_in_flight,
            chunks: publish::SharedChunks::new(images.clone(), publish::KEPT_BYTES),
        }),
        verify: verify.then(|| std::sync::Arc::new(manifest.clone())),
    };
    Ok(Prepared { opts, targets, aws, manifest, images })
}

/// The table of a `publish --dry-run`.
fn plan_table(o: &Options, plans: &[publish::TargetPlan]) -> String {
    let mut s = format!("plan for {}/{} (image {}), nothing done:\n", o.stream, o.leaf, &o.image_id[..16]);
    for p in plans {
        s += &format!("{},{}\n", p.account, p.region);
        if let Some(e) = &p.error {
            s += &format!("  FAILED: {e}\n");
            continue;
        }
        let mut item = |k: &str, v: &str| s += &format!("  {k:<16} {v}\n");
        item("AMI", &format!("{}{}", p.ami, p.existing.as_deref().map(|e| format!(" {e}")).unwrap_or_default()));
        if let Some(n) = &p.ami_name {
            item("name", n);
        }
        if let Some(k) = &p.kms_key {
            item("key", k);
        }
        if let Some(u) = &p.unpacker {
            item("unpacker", u);
        }
        if let Some(pa) = &p.parent {
            item("parent snapshot", pa);
        }
        if let Some(v) = &p.volume {
            item("volume", v);
        }
        if let Some(b) = p.bytes_to_write {
            item("bytes to write", &human_bytes(b));
        }
        for sh in &p.shares {
            item("share", sh);
        }
        for perm in &p.permissions {
            item("permission", perm);
        }
        for a in &p.allowed_amis {
            item("allowed AMIs", a);
        }
        for g in &p.gives {
            item("give", g);
        }
        if let Some(ptr) = &p.pointer {
            item("pointer", ptr);
        }
    }
    s
}

/// The unpackers and timeouts of this run, for publish and the operations.
fn settings(cli: &Cli) -> Settings {
    Settings {
        instance_name: cli.instance_name.clone(),
        unpacker_port: cli.unpacker_port,
        tls: cli.tls.files(),
        timeouts: Timeouts {
            unpacker: cli.unpacker_timeout,
            volume: cli.volume_timeout,
            snapshot: cli.snapshot_timeout,
            image: cli.image_timeout,
        },
        keys: Keys { default: cli.kms_key_id.clone(), by_target: cli.target_kms_key.clone() },
        new_amis: crate::lifecycle::NewAmis {
            deprecate_in: cli.deprecate_in,
            protection: cli.deregistration_protection,
        },
    }
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
