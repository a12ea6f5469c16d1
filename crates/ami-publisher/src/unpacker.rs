//! Unpacker instances: find the one tagged `Name=<instance name>` in a
//! target, start it when stopped, and dial its image-unpacker on the private
//! IP until it answers.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::{
    Client,
    types::{Filter, Instance, InstanceStateName},
};
use fleet_tls::{TlsFiles, UNPACKER_TLS_NAME, dial};
use unpacker_client::{self as uc, GetStatusRequest};

use crate::{
    errors::SdkResultExt as _,
    retry::{self, Seen},
};

/// An unpacker instance as EC2 describes it.
#[derive(Debug, Clone)]
pub struct UnpackerInstance {
    pub instance_id: String,
    pub state: String,
    pub private_ip: Option<String>,
    pub availability_zone: String,
    pub account_id: Option<String>,
    pub root_device_name: Option<String>,
    /// Device names in use (root and attached volumes).
    pub device_names: Vec<String>,
    /// Volumes attached other than the root volume.
    pub data_volumes: Vec<String>,
}

fn describe(i: &Instance, owner: Option<&str>) -> UnpackerInstance {
    let root = i.root_device_name().map(str::to_owned);
    let mut device_names = Vec::new();
    let mut data_volumes = Vec::new();
    for m in i.block_device_mappings() {
        let name = m.device_name().unwrap_or_default().to_owned();
        if Some(name.as_str()) != root.as_deref()
            && let Some(v) = m.ebs().and_then(|e| e.volume_id())
        {
            data_volumes.push(v.to_owned());
        }
        device_names.push(name);
    }
    UnpackerInstance {
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        state: i.state().and_then(|s| s.name()).map(|n| n.as_str().to_owned()).unwrap_or_default(),
        private_ip: i.private_ip_address().map(str::to_owned),
        availability_zone: i.placement().and_then(|p| p.availability_zone()).unwrap_or_default().to_owned(),
        account_id: owner.map(str::to_owned),
        root_device_name: root,
        device_names,
        data_volumes,
    }
}

/// A DescribeInstances filter for instances that are not terminated or on
/// their way out.
pub fn live_instances() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(["pending", "running", "stopping", "stopped"].iter().map(|s| (*s).to_owned()).collect()))
        .build()
}

/// Every instance tagged `Name=<name>` that is not terminated or on its way
/// out, running ones first.
pub async fn find_all(ec2: &Client, name: &str) -> anyhow::Result<Vec<UnpackerInstance>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(Filter::builder().name("tag:Name").values(name).build())
        .filters(live_instances())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.sdk("DescribeInstances")?;
        for r in page.reservations() {
            for i in r.instances() {
                out.push(describe(i, r.owner_id()));
            }
        }
    }
    out.sort_by_key(|u| (u.state != "running", u.instance_id.clone()));
    Ok(out)
}

/// Describe one instance again; `learned`: when this run learned its id.
pub async fn refresh(ec2: &Client, instance_id: &str, learned: Option<Instant>) -> anyhow::Result<UnpackerInstance> {
    let out = retry::call(&format!("DescribeInstances {instance_id}"), learned, || {
        ec2.describe_instances().instance_ids(instance_id).send()
    })
    .await?;
    for r in out.reservations() {
        if let Some(i) = r.instances().first() {
            return Ok(describe(i, r.owner_id()));
        }
    }
    bail!("instance {instance_id} has disappeared")
}

/// Make sure the instance is running (starting it if stopped), within `timeout`.
pub async fn ensure_running(
    ec2: &Client,
    inst: &UnpackerInstance,
    timeout: Duration,
    mut note: impl FnMut(&str),
) -> anyhow::Result<UnpackerInstance> {
    let id = inst.instance_id.as_str();
    // The instance was listed just now: NotFound on it is "not yet".
    let learned = Some(Instant::now());
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    if inst.state == "running" {
        return Ok(inst.clone());
    }
    if inst.state == InstanceStateName::Stopping.as_str() {
        note("waiting for the instance to stop");
        wait_state(ec2, id, InstanceStateName::Stopped, learned, left()).await?;
    }
    if inst.state != InstanceStateName::Pending.as_str() {
        note("starting the instance");
        tracing::info!(instance = id, "starting stopped unpacker instance");
        let started =
            retry::call(&format!("StartInstances {id}"), learned, || ec2.start_instances().instance_ids(id).send())
                .await;
        if let Err(e) = started {
            // The SDK's retry of an attempt whose answer was lost finds the
            // instance starting already (IncorrectInstanceState): fine.
            let now = refresh(ec2, id, learned).await?;
            if !matches!(now.state.as_str(), "pending" | "running") {
                return Err(e);
            }
        }
    }
    note("waiting for the instance to run");
    wait_state(ec2, id, InstanceStateName::Running, learned, left()).await?;
    refresh(ec2, id, learned).await
}

/// Wait until the instance is in `state`, at most `timeout`; `fresh`: when
/// this run launched it. A terminated instance fails the wait; a stopped
/// one does not (right after StartInstances, EC2 may still say stopped).
pub async fn wait_state(
    ec2: &Client,
    id: &str,
    state: InstanceStateName,
    fresh: Option<Instant>,
    timeout: Duration,
) -> anyhow::Result<()> {
    use InstanceStateName as S;
    let what = format!("instance {id} to be {}", state.as_str());
    let want = &state;
    retry::wait(&what, timeout, fresh, move || async move {
        let out = match ec2.describe_instances().instance_ids(id).send().await {
            Ok(out) => out,
            Err(e) => return Err(e),
        };
        let now = out.reservations().iter().flat_map(|r| r.instances()).find_map(|i| i.state()?.name().cloned());
        Ok(match now {
            Some(s) if s == *want => Seen::Ready(()),
            Some(s @ (S::Terminated | S::ShuttingDown)) => {
                Seen::Failed(anyhow::anyhow!("instance {id} is {}", s.as_str()))
            }
            Some(s) => Seen::NotYet(s.as_str().to_owned()),
            None if retry::still_fresh(fresh) => Seen::NotYet("not listed yet".to_owned()),
            None => Seen::Failed(anyhow::anyhow!("instance {id} is gone")),
        })
    })
    .await
}

/// The address (`IP:PORT`) of an instance's unpacker.
pub fn address(inst: &UnpackerInstance, port: u16) -> anyhow::Result<String> {
    let ip = inst.private_ip.as_deref().with_context(|| format!("instance {} has no private IP", inst.instance_id))?;
    Ok(format!("{ip}:{port}"))
}

/// Dial an instance's unpacker (see [`dial`]); errors name the instance.
pub async fn dial_instance(
    inst: &UnpackerInstance,
    port: u16,
    tls: &TlsFiles,
    timeout: Duration,
) -> anyhow::Result<uc::Client> {
    dial(&address(inst, port)?, tls, timeout).await.with_context(|| format!("unpacker instance {}", inst.instance_id))
}

/// Dial the unpacker at `addr` until it answers GetStatus, or `timeout`.
pub async fn dial(addr: &str, tls: &TlsFiles, timeout: Duration) -> anyhow::Result<uc::Client> {
    let deadline = Instant::now() + timeout;
    let mut wait = retry::DIAL_FIRST_WAIT;
    loop {
        let err = match uc::connect(addr, tls).await {
            Ok(mut c) => match c.get_status(GetStatusRequest {}).await {
                Ok(_) => return Ok(c),
                Err(s) if s.code() == tonic::Code::PermissionDenied || s.code() == tonic::Code::Unauthenticated => {
                    bail!("the image-unpacker at {addr} refused this certificate: {}", s.message())
                }
                Err(s) => {
                    // A certificate the unpacker refuses stays refused:
                    // say so now rather than dial until the timeout.
                    if dial::may_be_refusal(&s)
                        && let Some(why) = dial::refusal(addr, tls, UNPACKER_TLS_NAME).await
                    {
                        bail!("{why}");
                    }
                    format!("{}: {}", s.code(), dial::describe_status(&s))
                }
            },
            Err(e @ dial::DialError::Tls(_)) => {
                return Err(e).context("loading this publisher's certificates");
            }
            Err(e) => dial::error_chain(&e),
        };
        if Instant::now() + wait > deadline {
            return Err(anyhow::anyhow!("{err}"))
                .with_context(|| format!("waiting for the image-unpacker at {addr} to answer (timeout {timeout:?})"));
        }
        tracing::debug!(addr, error = %err, "unpacker not answering yet");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(retry::DIAL_MAX_WAIT);
    }
}
