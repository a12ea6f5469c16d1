//! Targets from AWS Organizations: `--targets 'org:*,REGION'` means every
//! ACTIVE account of the organization, `org:r-...` every one below the
//! root, `org:ou-...` every one in that OU and the OUs below it. The
//! accounts are listed from `--org-profile` (the management account, or a
//! delegated administrator: ListAccounts, ListAccountsForParent and
//! ListOrganizationalUnitsForParent, as the Organizations API reference
//! allows them), and each is reached through the role `--org-role-name`
//! in it (default OrganizationAccountAccessRole, the role Organizations
//! makes in the accounts it creates), assumed from that profile
//! ([`crate::aws::Aws`] holds how). Accounts that are SUSPENDED (closed) or
//! PENDING_CLOSURE are not targets.

use std::fmt;

use anyhow::Context as _;
use aws_sdk_organizations::Client;

/// Which accounts of the organization.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OrgScope {
    /// `org:*`: every account.
    All,
    /// `org:r-...` or `org:ou-...`: every account below this root or OU.
    Under(String),
}

impl fmt::Display for OrgScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrgScope::All => write!(f, "org:*"),
            OrgScope::Under(id) => write!(f, "org:{id}"),
        }
    }
}

fn lower_alnum(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl OrgScope {
    /// The part after `org:`: `*`, a root id (`r-` and 4 to 32 lower-case
    /// letters or digits) or an OU id (`ou-`, 4 to 32, `-`, 8 to 32), as
    /// Organizations writes them.
    pub fn parse(s: &str) -> Option<OrgScope> {
        if s == "*" {
            return Some(OrgScope::All);
        }
        let root = s.strip_prefix("r-").is_some_and(|r| lower_alnum(r, 4..=32));
        let ou = s
            .strip_prefix("ou-")
            .and_then(|r| r.split_once('-'))
            .is_some_and(|(a, b)| lower_alnum(a, 4..=32) && lower_alnum(b, 8..=32));
        (root || ou).then(|| OrgScope::Under(s.to_owned()))
    }
}

fn active(a: &aws_sdk_organizations::types::Account) -> bool {
    #[allow(deprecated)]
    let status = a.state().map(|s| s.as_str()).or_else(|| a.status().map(|s| s.as_str()));
    status == Some("ACTIVE")
}

/// The ids of the ACTIVE accounts of `scope`, sorted.
pub async fn active_accounts(org: &Client, scope: &OrgScope) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    match scope {
        OrgScope::All => {
            let mut pages = org.list_accounts().into_paginator().send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(aws_sdk_organizations::Error::from).context("ListAccounts")?;
                out.extend(page.accounts().iter().filter(|a| active(a)).filter_map(|a| a.id().map(str::to_owned)));
            }
        }
        OrgScope::Under(top) => {
            // Depth first through the OUs below `top`.
            let mut parents = vec![top.clone()];
            while let Some(parent) = parents.pop() {
                let mut pages = org.list_accounts_for_parent().parent_id(&parent).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page
                        .map_err(aws_sdk_organizations::Error::from)
                        .with_context(|| format!("ListAccountsForParent {parent}"))?;
                    out.extend(page.accounts().iter().filter(|a| active(a)).filter_map(|a| a.id().map(str::to_owned)));
                }
                let mut pages = org.list_organizational_units_for_parent().parent_id(&parent).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page
                        .map_err(aws_sdk_organizations::Error::from)
                        .with_context(|| format!("ListOrganizationalUnitsForParent {parent}"))?;
                    parents.extend(page.organizational_units().iter().filter_map(|u| u.id().map(str::to_owned)));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_organizations_ids() {
        assert_eq!(OrgScope::parse("*"), Some(OrgScope::All));
        assert_eq!(OrgScope::parse("r-ab12"), Some(OrgScope::Under("r-ab12".into())));
        assert_eq!(OrgScope::parse("ou-ab12-cd34ef56"), Some(OrgScope::Under("ou-ab12-cd34ef56".into())));
        for bad in ["", "r-", "r-AB12", "ou-ab12", "ou-ab12-cd34", "o-abcdefghij", "123456789012", "ou-ab12-cd34ef56-x"]
        {
            assert_eq!(OrgScope::parse(bad), None, "{bad}");
        }
    }
}
