//! Targets: (account, region) pairs. An account is an AWS profile name, or
//! the id of an account found in the organization.
//!
//! `--targets ACCOUNT,REGION`: an empty (or `*`) account means every profile
//! in the profile files; `org:*`, `org:ROOT_ID` or `org:OU_ID` means the
//! ACTIVE accounts of the organization, or of that root or OU and those
//! below it ([`crate::org`]); an empty (or `*`) region means every region
//! enabled in that account (DescribeRegions). `--skip-targets` takes the
//! same syntax and removes what it matches from the expanded list.

use std::{collections::BTreeSet, fmt, str::FromStr};

use anyhow::Context as _;

use crate::org::OrgScope;

/// One `ACCOUNT,REGION` pattern from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// `None`: every account.
    pub account: Option<String>,
    /// `None`: every enabled region.
    pub region: Option<String>,
    /// `org:...`: the accounts of the organization (then `account` is None).
    pub org: Option<OrgScope>,
}

/// Why a target pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("'{0}': a target is ACCOUNT,REGION (either part may be empty or '*' for all)")]
    Syntax(String),
    #[error("'{spec}': '{part}' is not a valid {what}")]
    BadPart { spec: String, part: String, what: &'static str },
}

fn wildcard(s: &str) -> bool {
    s.is_empty() || s == "*"
}

fn valid_profile(s: &str) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@+=/".contains(c))
}

fn valid_region(s: &str) -> bool {
    s.len() <= 32
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.contains('-')
        && !s.starts_with('-')
}

impl FromStr for TargetSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<TargetSpec, SpecError> {
        let mut parts = spec.split(',');
        let (Some(account), region, None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SpecError::Syntax(spec.to_owned()));
        };
        let region = region.unwrap_or("").trim();
        let account = account.trim();
        if !wildcard(region) && !valid_region(region) {
            return Err(SpecError::BadPart { spec: spec.into(), part: region.into(), what: "region name" });
        }
        if let Some(scope) = account.strip_prefix("org:") {
            let Some(org) = OrgScope::parse(scope) else {
                return Err(SpecError::BadPart {
                    spec: spec.into(),
                    part: account.into(),
                    what: "organization scope (org:*, org:r-ROOT or org:ou-OU)",
                });
            };
            return Ok(TargetSpec {
                account: None,
                region: (!wildcard(region)).then(|| region.to_owned()),
                org: Some(org),
            });
        }
        if !wildcard(account) && !valid_profile(account) {
            return Err(SpecError::BadPart { spec: spec.into(), part: account.into(), what: "profile name" });
        }
        if !wildcard(region) && !valid_region(region) {
            return Err(SpecError::BadPart { spec: spec.into(), part: region.into(), what: "region name" });
        }
        Ok(TargetSpec {
            account: (!wildcard(account)).then(|| account.to_owned()),
            region: (!wildcard(region)).then(|| region.to_owned()),
            org: None,
        })
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let region = self.region.as_deref().unwrap_or("*");
        match &self.org {
            Some(org) => write!(f, "{org},{region}"),
            None => write!(f, "{},{region}", self.account.as_deref().unwrap_or("*")),
        }
    }
}

impl TargetSpec {
    /// Whether this pattern matches a concrete target (an `org:` pattern
    /// matches nothing until [`expand`] has replaced it by its accounts).
    pub fn matches(&self, t: &Target) -> bool {
        self.org.is_none()
            && self.account.as_ref().is_none_or(|a| *a == t.account)
            && self.region.as_ref().is_none_or(|r| *r == t.region)
    }
}

/// A concrete target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub account: String,
    pub region: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.account, self.region)
    }
}

/// Expand patterns into concrete targets, in a stable order, minus the
/// skipped ones. `profiles` lists the known profiles; `regions_of` answers
/// "which regions are enabled in this account" (called once per account that
/// needs it); `org_accounts` answers "which accounts are in this part of the
/// organization" (called once per `org:` scope).
pub async fn expand<F, Fut, G, GFut>(
    specs: &[TargetSpec],
    skip: &[TargetSpec],
    profiles: &[String],
    mut regions_of: F,
    mut org_accounts: G,
) -> anyhow::Result<Vec<Target>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<String>>>,
    G: FnMut(OrgScope) -> GFut,
    GFut: std::future::Future<Output = anyhow::Result<Vec<String>>>,
{
    // `org:` patterns become one pattern per account of theirs.
    let mut found: std::collections::HashMap<OrgScope, Vec<String>> = Default::default();
    let mut org_ids = BTreeSet::new();
    for s in specs.iter().chain(skip) {
        if let Some(scope) = &s.org
            && !found.contains_key(scope)
        {
            let ids = org_accounts(scope.clone()).await.with_context(|| format!("listing the accounts of {scope}"))?;
            org_ids.extend(ids.iter().cloned());
            found.insert(scope.clone(), ids);
        }
    }
    let concrete = |list: &[TargetSpec]| -> Vec<TargetSpec> {
        list.iter()
            .flat_map(|s| match &s.org {
                None => vec![s.clone()],
                Some(scope) => found[scope]
                    .iter()
                    .map(|a| TargetSpec { account: Some(a.clone()), region: s.region.clone(), org: None })
                    .collect(),
            })
            .collect()
    };
    let (specs, skip) = (concrete(specs), concrete(skip));
    // A skipped account id that is not (or no longer) a target is skipped
    // anyway; an unknown profile name is refused, as it is likely a typo.
    let an_account_id = |a: &str| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit());
    for (s, skipping) in specs.iter().map(|s| (s, false)).chain(skip.iter().map(|s| (s, true))) {
        if let Some(a) = &s.account
            && !profiles.contains(a)
            && !org_ids.contains(a)
            && !(skipping && an_account_id(a))
        {
            anyhow::bail!(
                "unknown AWS profile '{a}' in target '{s}' (profiles found: {}; they come from \
                 AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE or ~/.aws/config and ~/.aws/credentials)",
                if profiles.is_empty() { "none".to_owned() } else { profiles.join(", ") }
            );
        }
    }
    // Every profile, but `default` only when it is the only one (it usually
    // repeats another profile's account).
    let all_accounts: Vec<String> = if profiles.iter().any(|p| p != "default") {
        profiles.iter().filter(|p| *p != "default").cloned().collect()
    } else {
        profiles.to_vec()
    };
    let mut out = BTreeSet::new();
    let mut regions_cache: std::collections::HashMap<String, Vec<String>> = Default::default();
    for s in &specs {
        let accounts = match &s.account {
            Some(a) => vec![a.clone()],
            None => all_accounts.clone(),
        };
        for a in accounts {
            let regions = match &s.region {
                Some(r) => vec![r.clone()],
                None => {
                    if !regions_cache.contains_key(&a) {
                        let r = regions_of(a.clone()).await.with_context(|| format!("listing the regions of {a}"))?;
                        regions_cache.insert(a.clone(), r);
                    }
                    regions_cache[&a].clone()
                }
            };
            for r in regions {
                out.insert(Target { account: a.clone(), region: r });
            }
        }
    }
    Ok(out.into_iter().filter(|t| !skip.iter().any(|s| s.matches(t))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_refuse_nonsense() {
        let t: TargetSpec = "prod,us-east-1".parse().unwrap();
        assert_eq!(t.account.as_deref(), Some("prod"));
        assert_eq!(t.region.as_deref(), Some("us-east-1"));
        let t: TargetSpec = ",eu-west-1".parse().unwrap();
        assert_eq!(t.account, None);
        let t: TargetSpec = "prod,*".parse().unwrap();
        assert_eq!(t.region, None);
        let t: TargetSpec = "prod".parse().unwrap();
        assert_eq!(t.region, None);
        assert!(matches!("a,b,c".parse::<TargetSpec>(), Err(SpecError::Syntax(_))));
        assert!(matches!("prod,US_EAST".parse::<TargetSpec>(), Err(SpecError::BadPart { what: "region name", .. })));
        assert!(matches!("pr od,us-east-1".parse::<TargetSpec>(), Err(SpecError::BadPart { .. })));
    }

    #[tokio::test]
    async fn expansion_fills_wildcards_and_skips() {
        let profiles = vec!["default".to_owned(), "a".to_owned(), "b".to_owned()];
        let specs: Vec<TargetSpec> = vec!["*,r-1".parse().unwrap(), "a,".parse().unwrap()];
        let skip: Vec<TargetSpec> = vec!["b,r-1".parse().unwrap()];
        let mut asked = Vec::new();
        let got = expand(
            &specs,
            &skip,
            &profiles,
            |a| {
                asked.push(a.clone());
                async move { Ok(vec!["r-1".to_owned(), "r-2".to_owned()]) }
            },
            |_| async { Ok(vec![]) },
        )
        .await
        .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["a,r-1", "a,r-2"]);
        assert_eq!(asked, ["a"]);
        let bad: Vec<TargetSpec> = vec!["nobody,r-1".parse().unwrap()];
        let e = expand(&bad, &[], &profiles, |_| async { Ok(vec![]) }, |_| async { Ok(vec![]) }).await.unwrap_err();
        assert!(e.to_string().contains("unknown AWS profile 'nobody'"), "{e}");
    }

    #[tokio::test]
    async fn organization_scopes_become_their_accounts_and_can_be_skipped() {
        let profiles = vec!["default".to_owned()];
        let specs: Vec<TargetSpec> = vec!["org:ou-ab12-cd34ef56,r-1".parse().unwrap(), "org:*,r-2".parse().unwrap()];
        let skip: Vec<TargetSpec> = vec!["222222222222,*".parse().unwrap(), "999999999999,*".parse().unwrap()];
        let mut asked = Vec::new();
        let got = expand(
            &specs,
            &skip,
            &profiles,
            |_| async { Ok(vec![]) },
            |scope| {
                asked.push(scope.to_string());
                async move {
                    Ok(match scope {
                        OrgScope::All => vec!["111111111111".to_owned(), "222222222222".to_owned()],
                        OrgScope::Under(_) => vec!["111111111111".to_owned()],
                    })
                }
            },
        )
        .await
        .unwrap();
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, ["111111111111,r-1", "111111111111,r-2"]);
        assert_eq!(asked, ["org:ou-ab12-cd34ef56", "org:*"]);
        assert!(matches!("org:nope,r-1".parse::<TargetSpec>(), Err(SpecError::BadPart { .. })));
        assert_eq!("org:r-ab12,".parse::<TargetSpec>().unwrap().to_string(), "org:r-ab12,*");
    }
}
