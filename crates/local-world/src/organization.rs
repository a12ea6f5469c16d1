//! The world's AWS Organization (when the plan asks for one): `first` is
//! its management account, and its accounts are laid out so that every
//! way of finding targets in an organization meets something:
//!
//! ```text
//! root
//! ├── first (management, 123456789012)
//! ├── OU publishers
//! │   ├── second (111111111111)
//! │   └── OU publishers-eu
//! │       └── nested (444444444444)
//! ├── OU consumers
//! │   └── consumer (222222222222)
//! └── closed (555555555555, SUSPENDED)
//! ```
//!
//! and 666666666666 joined and then left it (not listed at all).

use std::collections::BTreeMap;

use anyhow::Context as _;
use aws_sdk_organizations::Client;

use crate::{CONSUMER_ACCOUNT_ID, SECOND_ACCOUNT_ID};

/// An account in an OU below another OU.
pub const NESTED_ACCOUNT_ID: &str = "444444444444";
/// A closed (SUSPENDED) account.
pub const CLOSED_ACCOUNT_ID: &str = "555555555555";
/// An account that left the organization.
pub const DEPARTED_ACCOUNT_ID: &str = "666666666666";

/// What the world's organization is.
#[derive(Debug, Clone)]
pub struct Organization {
    pub id: String,
    pub arn: String,
    pub root_id: String,
    /// OU name -> (id, ARN).
    pub ous: BTreeMap<String, (String, String)>,
}

impl Organization {
    /// An OU's id.
    pub fn ou(&self, name: &str) -> &str {
        &self.ous[name].0
    }

    /// An OU's ARN.
    pub fn ou_arn(&self, name: &str) -> &str {
        &self.ous[name].1
    }
}

async fn account(org: &Client, id: &str, name: &str) -> anyhow::Result<()> {
    org.create_account()
        .account_name(name)
        .email(format!("{id}@accounts.local-world.invalid"))
        .send()
        .await
        .with_context(|| format!("creating account {id}"))?;
    Ok(())
}

async fn ou(org: &Client, parent: &str, name: &str) -> anyhow::Result<(String, String)> {
    let out = org
        .create_organizational_unit()
        .parent_id(parent)
        .name(name)
        .send()
        .await
        .with_context(|| format!("creating OU {name}"))?;
    let ou = out.organizational_unit().context("no OU")?;
    Ok((ou.id().unwrap_or_default().to_owned(), ou.arn().unwrap_or_default().to_owned()))
}

async fn move_to(org: &Client, id: &str, from: &str, to: &str) -> anyhow::Result<()> {
    org.move_account()
        .account_id(id)
        .source_parent_id(from)
        .destination_parent_id(to)
        .send()
        .await
        .with_context(|| format!("moving account {id}"))?;
    Ok(())
}

/// Make the organization, as the management account `first` does.
pub(crate) async fn create(config: &aws_config::SdkConfig) -> anyhow::Result<Organization> {
    let org = Client::new(config);
    let made = org
        .create_organization()
        .feature_set(aws_sdk_organizations::types::OrganizationFeatureSet::All)
        .send()
        .await
        .context("creating the organization")?;
    let o = made.organization().context("no organization")?;
    let (id, arn) = (o.id().unwrap_or_default().to_owned(), o.arn().unwrap_or_default().to_owned());
    let roots = org.list_roots().send().await.context("listing roots")?;
    let root_id = roots.roots().first().and_then(|r| r.id()).context("no root")?.to_owned();
    let mut ous = BTreeMap::new();
    let publishers = ou(&org, &root_id, "publishers").await?;
    let publishers_eu = ou(&org, &publishers.0, "publishers-eu").await?;
    let consumers = ou(&org, &root_id, "consumers").await?;
    for (account_id, name) in [
        (SECOND_ACCOUNT_ID, "second"),
        (NESTED_ACCOUNT_ID, "nested"),
        (CONSUMER_ACCOUNT_ID, "consumer"),
        (CLOSED_ACCOUNT_ID, "closed"),
        (DEPARTED_ACCOUNT_ID, "departed"),
    ] {
        account(&org, account_id, name).await?;
    }
    move_to(&org, SECOND_ACCOUNT_ID, &root_id, &publishers.0).await?;
    move_to(&org, NESTED_ACCOUNT_ID, &root_id, &publishers_eu.0).await?;
    move_to(&org, CONSUMER_ACCOUNT_ID, &root_id, &consumers.0).await?;
    org.close_account().account_id(CLOSED_ACCOUNT_ID).send().await.context("closing an account")?;
    org.remove_account_from_organization()
        .account_id(DEPARTED_ACCOUNT_ID)
        .send()
        .await
        .context("removing an account")?;
    ous.insert("publishers".to_owned(), publishers);
    ous.insert("publishers-eu".to_owned(), publishers_eu);
    ous.insert("consumers".to_owned(), consumers);
    Ok(Organization { id, arn, root_id, ous })
}
