//! ami-publisher: the controller. It turns an image from the imageserver into
//! identical, encrypted AMIs in every (account, region) target, through the
//! image-unpacker instance in each target, and writes results files.
//!
//! - [`targets`]: `ACCOUNT,REGION` patterns and their expansion;
//! - [`org`]: targets from AWS Organizations (Organizations calls);
//! - [`errors`]: what an EC2 error answer means, and how it reads;
//! - [`aws`]: profiles, SDK configuration, retries;
//! - [`retry`]: what the SDK cannot retry: fresh ids, untokened creates, waits;
//! - [`unpacker`]: finding, starting and dialing unpacker instances;
//! - [`settings`]: the unpackers, keys and timeouts publish and the operations share;
//! - [`keys`]: each target's KMS key, and whether it can serve (KMS calls);
//! - [`allowed`]: whether accounts an AMI is shared with may use it (their Allowed AMIs);
//! - [`lifecycle`]: an AMI's deprecation, deregistration protection, disabling, references;
//! - [`ready`]: waits for snapshots and AMIs, and AMIs by name;
//! - [`volumes`]: the stream's volume on an unpacker;
//! - [`publish`]: the publish of one leaf to one target, and to all;
//! - [`results`]: results files;
//! - [`verify`]: the bytes behind an AMI against its image (EBS direct reads);
//! - [`export`]: a snapshot's bytes into a raw file, for `imagetool add`;
//! - [`sharing`]: who may launch and copy an AMI (accounts, organizations, OUs);
//! - [`pointer`]: the fleet's pointer, an SSM parameter per target (SSM calls);
//! - [`ops`]: the lifecycle and operations subcommands (expire, lists, tags, ...);
//! - [`policy`]: the IAM policy that lets the tool touch only what it made;
//! - [`cli`]: the command line, its config file, and the final table.

pub mod allowed;
pub mod aws;
pub mod cli;
pub mod errors;
pub mod export;
pub mod keys;
pub mod lifecycle;
pub mod ops;
pub mod org;
pub mod pointer;
pub mod policy;
pub mod progress;
pub mod publish;
pub mod ready;
pub mod results;
pub mod retry;
pub mod settings;
pub mod sharing;
pub mod tags;
pub mod targets;
pub mod unpacker;
pub mod values;
pub mod verify;
pub mod volumes;

use futures::StreamExt as _;
use tracing::Instrument as _;

use crate::targets::Target;

/// Run `f` for every target, at most `max` at once, each in a tracing span
/// naming its account and region; results come back in target order.
pub async fn fanout<'a, T, F, Fut>(targets: &'a [Target], max: usize, f: F) -> Vec<T>
where
    F: Fn(Target) -> Fut + 'a,
    Fut: std::future::Future<Output = T> + 'a,
{
    let f = &f;
    let mut out: Vec<(usize, T)> = futures::stream::iter(targets.iter().cloned().enumerate())
        .map(|(i, t)| {
            let span = tracing::info_span!("target", account = %t.account, region = %t.region);
            async move { (i, f(t).await) }.instrument(span)
        })
        .buffer_unordered(max.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, t)| t).collect()
}

/// Replace characters EC2 does not allow in AMI names with `_`.
pub fn ami_name_chars(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) { c } else { '_' }).collect()
}
