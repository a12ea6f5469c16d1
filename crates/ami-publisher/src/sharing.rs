//! Who may use an AMI besides its owner: launch permissions for accounts,
//! organizations and organizational units (ModifyImageAttribute
//! `launchPermission`), and, for accounts, read access to its snapshots
//! (ModifySnapshotAttribute `createVolumePermission`) so that they can copy
//! it. EC2 has no way to let an organization or OU read a snapshot: their
//! accounts can launch the AMI but not copy it.
//!
//! Publish shares what it made (or found) with the grantees of
//! `--share-with-*`; `share` and `unshare` do it to the AMIs of results
//! files. Both first read what is held ([`held`]) and change only what
//! differs, so a re-run changes nothing, and `unshare` takes back exactly
//! the permissions named, leaving any other.
//!
//! Adding or removing a permission that is already so is harmless in EC2,
//! so the SDK's own retries are safe here.

use std::{fmt, time::Instant};

use aws_sdk_ec2::{
    Client,
    types::{
        CreateVolumePermission, CreateVolumePermissionModifications, ImageAttributeName, LaunchPermission,
        LaunchPermissionModifications, SnapshotAttributeName,
    },
};
use serde::{Deserialize, Serialize};

use crate::retry;

/// Whom an AMI is shared with (`--share-with-accounts`,
/// `--share-with-organizations`, `--share-with-ous`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grantees {
    /// 12-digit AWS account ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    /// Organization ARNs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<String>,
    /// Organizational unit ARNs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ous: Vec<String>,
}

/// One account, organization or OU an AMI can be shared with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grantee {
    Account(String),
    Organization(String),
    Ou(String),
}

impl fmt::Display for Grantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grantee::Account(a) => write!(f, "account {a}"),
            Grantee::Organization(o) => write!(f, "organization {o}"),
            Grantee::Ou(o) => write!(f, "OU {o}"),
        }
    }
}

impl Grantee {
    fn launch_permission(&self) -> LaunchPermission {
        let p = LaunchPermission::builder();
        match self {
            Grantee::Account(a) => p.user_id(a),
            Grantee::Organization(o) => p.organization_arn(o),
            Grantee::Ou(o) => p.organizational_unit_arn(o),
        }
        .build()
    }

    fn of(p: &LaunchPermission) -> Option<Grantee> {
        p.user_id()
            .map(|a| Grantee::Account(a.to_owned()))
            .or_else(|| p.organization_arn().map(|o| Grantee::Organization(o.to_owned())))
            .or_else(|| p.organizational_unit_arn().map(|o| Grantee::Ou(o.to_owned())))
    }
}

impl Grantees {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.organizations.is_empty() && self.ous.is_empty()
    }

    /// Every grantee, accounts first, each once.
    pub fn each(&self) -> Vec<Grantee> {
        let mut out: Vec<Grantee> = self
            .accounts
            .iter()
            .map(|a| Grantee::Account(a.clone()))
            .chain(self.organizations.iter().map(|o| Grantee::Organization(o.clone())))
            .chain(self.ous.iter().map(|o| Grantee::Ou(o.clone())))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// A short phrase for tables: "2 accounts, 1 OU".
    pub fn summary(&self) -> String {
        let part = |n: usize, one: &str, many: &str| match n {
            0 => None,
            1 => Some(format!("1 {one}")),
            n => Some(format!("{n} {many}")),
        };
        [
            part(self.accounts.len(), "account", "accounts"),
            part(self.organizations.len(), "organization", "organizations"),
            part(self.ous.len(), "OU", "OUs"),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// A 12-digit AWS account id (`--share-with-accounts`).
pub fn parse_account(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not an AWS account id (12 digits, e.g. 123456789012)"))
    }
}

fn valid_org_id(s: &str) -> bool {
    s.strip_prefix("o-").is_some_and(|r| {
        (10..=32).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

fn lower_alnum(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `arn:aws:organizations::MANAGEMENT_ACCOUNT:organization/o-...`, as
/// AWS Organizations writes an organization's ARN.
pub fn parse_organization(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = s.strip_prefix("arn:").and_then(|r| r.split_once(":organizations::")).and_then(|(partition, r)| {
        let (account, org) = r.split_once(":organization/")?;
        (!partition.is_empty() && parse_account(account).is_ok() && valid_org_id(org)).then_some(())
    });
    ok.map(|()| s.to_owned()).ok_or_else(|| {
        format!("'{s}' is not an organization ARN (arn:aws:organizations::123456789012:organization/o-exampleorgid)")
    })
}

/// `arn:aws:organizations::MANAGEMENT_ACCOUNT:ou/o-.../ou-...`, as AWS
/// Organizations writes an OU's ARN.
pub fn parse_ou(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = s.strip_prefix("arn:").and_then(|r| r.split_once(":organizations::")).and_then(|(partition, r)| {
        let (account, path) = r.split_once(":ou/")?;
        let (org, ou) = path.split_once('/')?;
        let (root, rest) = ou.strip_prefix("ou-")?.split_once('-')?;
        (!partition.is_empty()
            && parse_account(account).is_ok()
            && valid_org_id(org)
            && lower_alnum(root, 4..=32)
            && lower_alnum(rest, 8..=32))
        .then_some(())
    });
    ok.map(|()| s.to_owned()).ok_or_else(|| {
        format!("'{s}' is not an OU ARN (arn:aws:organizations::123456789012:ou/o-exampleorgid/ou-ab12-cd34ef56)")
    })
}

/// One permission on one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// Launch permission on the AMI.
    Launch { ami: String, grantee: Grantee },
    /// createVolumePermission on a snapshot of the AMI, for an account.
    CreateVolume { snapshot: String, account: String },
}

impl Permission {
    /// The resource it is on.
    pub fn resource(&self) -> &str {
        match self {
            Permission::Launch { ami, .. } => ami,
            Permission::CreateVolume { snapshot, .. } => snapshot,
        }
    }

    /// What it lets whom do, for rows and logs.
    pub fn detail(&self) -> String {
        match self {
            Permission::Launch { grantee, .. } => format!("launch: {grantee}"),
            Permission::CreateVolume { account, .. } => format!("copy (create volumes): account {account}"),
        }
    }
}

/// Every permission `grantees` need on an AMI and its snapshots, each with
/// whether it is held now. Snapshots come before the AMI: an account can
/// then copy the AMI as soon as it may launch it.
pub async fn held(
    ec2: &Client,
    ami: &str,
    snapshots: &[String],
    grantees: &Grantees,
    fresh: Option<Instant>,
) -> anyhow::Result<Vec<(Permission, bool)>> {
    let mut out = Vec::new();
    if !grantees.accounts.is_empty() {
        for snapshot in snapshots {
            let now = volume_permissions(ec2, snapshot, fresh).await?;
            for account in grantees.each().into_iter().filter_map(|g| match g {
                Grantee::Account(a) => Some(a),
                _ => None,
            }) {
                let holds = now.contains(&account);
                out.push((Permission::CreateVolume { snapshot: snapshot.clone(), account }, holds));
            }
        }
    }
    let now = launch_permissions(ec2, ami, fresh).await?;
    for grantee in grantees.each() {
        let holds = now.contains(&grantee);
        out.push((Permission::Launch { ami: ami.to_owned(), grantee }, holds));
    }
    Ok(out)
}

/// The accounts, organizations and OUs that may launch an AMI.
pub async fn launch_permissions(ec2: &Client, ami: &str, fresh: Option<Instant>) -> anyhow::Result<Vec<Grantee>> {
    let out = retry::call(&format!("DescribeImageAttribute launchPermission of {ami}"), fresh, || {
        ec2.describe_image_attribute().image_id(ami).attribute(ImageAttributeName::LaunchPermission).send()
    })
    .await?;
    Ok(out.launch_permissions().iter().filter_map(Grantee::of).collect())
}

/// The accounts that may create volumes from (and so copy) a snapshot.
pub async fn volume_permissions(ec2: &Client, snapshot: &str, fresh: Option<Instant>) -> anyhow::Result<Vec<String>> {
    let out = retry::call(&format!("DescribeSnapshotAttribute createVolumePermission of {snapshot}"), fresh, || {
        ec2.describe_snapshot_attribute()
            .snapshot_id(snapshot)
            .attribute(SnapshotAttributeName::CreateVolumePermission)
            .send()
    })
    .await?;
    Ok(out.create_volume_permissions().iter().filter_map(|p| p.user_id().map(str::to_owned)).collect())
}

/// Give (`add`) or take back one permission; with `dry_run`, only ask EC2
/// whether it would be allowed (it then answers DryRunOperation, an error).
pub async fn change(
    ec2: &Client,
    p: &Permission,
    add: bool,
    fresh: Option<Instant>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let verb = if add { "add" } else { "remove" };
    match p {
        Permission::Launch { ami, grantee } => {
            let one = vec![grantee.launch_permission()];
            let m = if add {
                LaunchPermissionModifications::builder().set_add(Some(one)).build()
            } else {
                LaunchPermissionModifications::builder().set_remove(Some(one)).build()
            };
            retry::call(&format!("ModifyImageAttribute {ami} ({verb} launch permission for {grantee})"), fresh, || {
                ec2.modify_image_attribute().image_id(ami).launch_permission(m.clone()).dry_run(dry_run).send()
            })
            .await?;
        }
        Permission::CreateVolume { snapshot, account } => {
            let one = vec![CreateVolumePermission::builder().user_id(account).build()];
            let m = if add {
                CreateVolumePermissionModifications::builder().set_add(Some(one)).build()
            } else {
                CreateVolumePermissionModifications::builder().set_remove(Some(one)).build()
            };
            retry::call(
                &format!("ModifySnapshotAttribute {snapshot} ({verb} createVolumePermission for {account})"),
                fresh,
                || {
                    ec2.modify_snapshot_attribute()
                        .snapshot_id(snapshot)
                        .create_volume_permission(m.clone())
                        .dry_run(dry_run)
                        .send()
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// Share an AMI and its snapshots with `grantees`, changing only what is
/// not so yet. Returns the permissions it added.
pub async fn share(
    ec2: &Client,
    ami: &str,
    snapshots: &[String],
    grantees: &Grantees,
    fresh: Option<Instant>,
) -> anyhow::Result<Vec<Permission>> {
    let mut added = Vec::new();
    for (p, holds) in held(ec2, ami, snapshots, grantees, fresh).await? {
        if !holds {
            change(ec2, &p, true, fresh, false).await?;
            tracing::info!(resource = p.resource(), "shared: {}", p.detail());
            added.push(p);
        }
    }
    Ok(added)
}
