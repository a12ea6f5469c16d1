//! Waiting for a snapshot or an AMI to reach its end, and finding an AMI
//! by name: what publish and the operations (bootstrap copies) share.

use std::time::{Duration, Instant};

use aws_sdk_ec2::{
    Client,
    types::{Image, ImageState, SnapshotState},
};

use crate::{
    errors::SdkResultExt as _,
    retry::{self, Seen},
    tags,
};

/// A snapshot that ended in `error`, or an AMI that ended `failed`: it will
/// never be ready, and is replaced (EC2 documents no other way out).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FailedEnd(String);

/// Whether `e` is (or was caused by) a [`FailedEnd`].
pub fn is_failed_end(e: &anyhow::Error) -> bool {
    e.downcast_ref::<FailedEnd>().is_some()
}

/// Wait for a snapshot to complete, at most `timeout`; `fresh`: when this
/// run made it.
pub async fn snapshot_completed(
    ec2: &Client,
    snapshot: &str,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<()> {
    retry::wait(&format!("snapshot {snapshot} to complete"), timeout, fresh, move || async move {
        let out = match ec2.describe_snapshots().snapshot_ids(snapshot).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        Ok(match out.snapshots().first() {
            Some(s) if s.state() == Some(&SnapshotState::Completed) => Seen::Ready(()),
            Some(s) if s.state() == Some(&SnapshotState::Error) => Seen::Failed(anyhow::Error::new(FailedEnd(
                format!("snapshot {snapshot} failed: {}", s.state_message().unwrap_or("no reason given")),
            ))),
            Some(s) => {
                Seen::NotYet(format!("{} {}", s.state().map_or("?", |s| s.as_str()), s.progress().unwrap_or_default()))
            }
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("snapshot {snapshot} is gone")),
        })
    })
    .await
}

/// Wait for an AMI to be available, at most `timeout`; `fresh`: when this
/// run registered (or copied) it.
pub async fn image_available(ec2: &Client, ami: &str, fresh: Option<Instant>, timeout: Duration) -> anyhow::Result<()> {
    retry::wait(&format!("AMI {ami} to be available"), timeout, fresh, move || async move {
        let out = match ec2.describe_images().image_ids(ami).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        Ok(match out.images().first() {
            Some(i) if i.state() == Some(&ImageState::Available) => Seen::Ready(()),
            Some(i) if i.state() == Some(&ImageState::Pending) => Seen::NotYet("pending".to_owned()),
            Some(i) if matches!(i.state(), Some(ImageState::Failed | ImageState::Error)) => {
                Seen::Failed(anyhow::Error::new(FailedEnd(format!(
                    "AMI {ami} failed: {}",
                    i.state_reason().and_then(|r| r.message()).unwrap_or("no reason given")
                ))))
            }
            Some(i) => Seen::Failed(anyhow::anyhow!(
                "AMI {ami} is {}: {}",
                i.state().map_or("?", |s| s.as_str()),
                i.state_reason().and_then(|r| r.message()).unwrap_or("no reason given")
            )),
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("AMI {ami} is gone")),
        })
    })
    .await
}

/// This account's AMI called `name`, if EC2 lists one.
pub async fn image_named(ec2: &Client, name: &str) -> anyhow::Result<Option<Image>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(tags::filter("name", name))
        .send()
        .await
        .sdk("DescribeImages by name")?;
    Ok(out.images().first().cloned())
}
