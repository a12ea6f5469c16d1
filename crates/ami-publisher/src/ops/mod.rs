//! The lifecycle and operations subcommands, by domain. Each runs over
//! targets concurrently; what it finds or does in a target is a list of
//! typed rows ([`output::Row`]), and a target that fails carries its error
//! instead. Every change goes through [`Ctx::act`], which describes it and
//! makes it unless `--dry-run`.
//!
//! - [`images`]: AMIs: listing, usage, and what results files name
//!   (delete, tags);
//! - [`expire`]: everything whose `ExpiresAt` has passed;
//! - [`launch`]: instances from AMIs, and SSH key pairs;
//! - [`lifecycle`]: deprecation, protection, disabling; the guard before a deregistration;
//! - [`bootstrap`]: copying a stream's AMI into targets that lack one;
//! - [`share`]: sharing AMIs of results files, and taking it back;
//! - [`pointers`]: the fleet's pointer: promote, rollback, list;
//! - [`unpackers`]: unpacker instances, their streams and volumes;
//! - [`verify`]: the bytes behind AMIs against their images;
//! - [`output`]: rows, tables, JSON and CSV.
//!
//! Must not: talk to an unpacker except through [`crate::unpacker`], or
//! print anywhere but [`output`].

pub mod bootstrap;
pub mod expire;
pub mod images;
pub mod launch;
pub mod lifecycle;
pub mod output;
pub mod pointers;
pub mod share;
pub mod unpackers;
pub mod verify;

use std::{future::Future, time::Duration};

use anyhow::Context as _;
use aws_sdk_ec2::Client;
use serde::Serialize;
use unpacker_client::{self as uc, GetStatusRequest};

pub use self::{
    bootstrap::copy_bootstrap_image,
    expire::expire,
    images::{
        AmiMap, ListedAmi, Usage, amis_by_target, delete, delete_tags, delete_unused_images, image_usage, list_images,
        set_exclusive_tags,
    },
    launch::{BootImage, LaunchSpec, import_key_pair, launch_instances},
    lifecycle::Change,
    output::{Acted, Row, print, write_csv},
    pointers::{list_pointers, promote, rollback},
    share::{share, unshare},
    unpackers::{
        add_volumes, list_streams, list_unpackers, prepare_unpackers, remove_unused_volumes, start_instances,
        stop_idle_unpackers, tag_unpackers, terminate_instances,
    },
    verify::verify,
};
use crate::{aws::Aws, progress::Board, settings::Settings, targets::Target, unpacker::UnpackerInstance};

/// What one target answered.
#[derive(Debug, Clone, Serialize)]
pub struct Report<R> {
    pub account: String,
    pub region: String,
    pub records: Vec<R>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Shared settings of the operations.
pub struct Ctx<'a> {
    pub aws: &'a Aws,
    pub targets: Vec<Target>,
    pub max_concurrency: usize,
    /// The unpackers and the timeouts, as publish has them.
    pub settings: Settings,
    pub dry_run: bool,
    /// Turn deregistration protection off before deregistering.
    pub lift_protection: bool,
    pub board: Board,
}

impl Ctx<'_> {
    /// Run `f` in every target; its rows or error become the report.
    pub async fn each<R, F, Fut>(&self, f: F) -> Vec<Report<R>>
    where
        F: Fn(Client, Target) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<R>>>,
    {
        let f = &f;
        crate::fanout(&self.targets, self.max_concurrency, |t| async move {
            let ec2 = self.aws.ec2(&t).await;
            let r = f(ec2.clone(), t.clone()).await;
            let mut error = r.as_ref().err().map(|e| format!("{e:#}"));
            if let Some(e) = &mut error {
                if let Some(cause) = crate::errors::unauthorized_cause(&ec2, e).await {
                    *e = format!("{e}; likely cause: {cause}");
                }
                tracing::error!(error = %e, "target failed");
            }
            Report { account: t.account.clone(), region: t.region.clone(), error, records: r.unwrap_or_default() }
        })
        .await
    }

    /// The row of a change: `verb` done to `resource`, or "would `verb`"
    /// under --dry-run.
    fn described(&self, verb: &str, resource: &str, detail: impl Into<String>) -> Acted {
        let action = if self.dry_run { format!("would {verb}") } else { verb.to_owned() };
        Acted { action, resource: resource.to_owned(), detail: detail.into() }
    }

    /// A change: described, then made by `doing` unless --dry-run. Its row
    /// says what was done (or would be).
    async fn act<Fut>(
        &self,
        verb: &str,
        resource: &str,
        detail: impl Into<String>,
        doing: impl FnOnce() -> Fut,
    ) -> anyhow::Result<Acted>
    where
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let row = self.described(verb, resource, detail);
        if !self.dry_run {
            doing().await?;
        }
        Ok(row)
    }

    /// Under --dry-run, the row of a change that would be made (the caller
    /// then stops); otherwise None and the caller makes it.
    fn would(&self, verb: &str, resource: &str, detail: impl Into<String>) -> Option<Acted> {
        self.dry_run.then(|| self.described(verb, resource, detail))
    }

    /// How long a listing waits for an unpacker to answer: the
    /// `--unpacker-timeout` flag, but at most 10 s (a list reports an
    /// unpacker that does not answer rather than hang on it).
    fn listing_timeout(&self) -> Duration {
        self.settings.timeouts.unpacker.min(Duration::from_secs(10))
    }

    /// Every running unpacker of a target, connected, with its status.
    async fn running(
        &self,
        ec2: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(UnpackerInstance, uc::Client, uc::Status)>> {
        let mut out = Vec::new();
        for inst in self.settings.unpackers(ec2).await?.into_iter().filter(|i| i.state == "running") {
            let mut c = self.settings.dial(&inst, timeout).await?;
            let s = c.get_status(GetStatusRequest {}).await.context("GetStatus")?.into_inner();
            out.push((inst, c, s));
        }
        Ok(out)
    }
}
