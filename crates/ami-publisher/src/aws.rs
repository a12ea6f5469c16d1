//! AWS access: profiles from the standard profile files, one SDK
//! configuration (and so one credentials cache) per profile or account of
//! the organization (reached by a role from `--org-profile`), one EC2
//! client per target. Endpoints, roles (`role_arn` + `source_profile`), SSO and
//! credential processes are aws-config's business; retries use the SDK's
//! standard retry mode, with a retry quota per target (see [`Aws::ec2`]).
//! What the SDK cannot retry on its own is in [`crate::retry`].

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use aws_config::{
    BehaviorVersion, Region, SdkConfig, meta::region::RegionProviderChain, profile::ProfileFileRegionProvider,
    retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_ec2::{
    Client,
    config::retry::{RetryPartition, TokenBucket},
};
use tokio::sync::{Mutex, OnceCell};

use crate::{org::OrgScope, targets::Target};

/// How API calls are retried, and how long they may take.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First back-off; it grows exponentially (with jitter) up to 20 s.
    pub wait: Duration,
    /// Longest one attempt may take, from sending to the whole answer
    /// (`--call-timeout`). An answer that never comes is then a timeout,
    /// which the SDK retries like a lost answer.
    pub attempt_timeout: Duration,
    /// Longest one call may take with all its retries (`--operation-timeout`).
    pub operation_timeout: Duration,
}

/// Longest wait for a connection to an endpoint: a TCP and TLS handshake
/// with a regional endpoint takes milliseconds; one that has not connected
/// in this time is as good as lost, and the attempt is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared AWS state for one run.
pub struct Aws {
    profiles: Vec<String>,
    retry: Retry,
    http: aws_types::sdk_config::SharedHttpClient,
    /// One configuration per profile, loaded once, profiles in parallel.
    configs: Mutex<HashMap<String, Arc<OnceCell<SdkConfig>>>>,
    /// Accounts found in the organization, by id: how each is reached.
    org_accounts: std::sync::Mutex<HashMap<String, Reach>>,
    partitions: Mutex<HashMap<Target, RetryPartition>>,
    /// Each account's (profile's or organization account's) id, asked once.
    ids: Mutex<HashMap<String, Arc<AccountId>>>,
}

/// An account's id once asked (GetCallerIdentity), or why it could not be.
type AccountId = OnceCell<Result<String, String>>;

/// How an account found in the organization is reached.
#[derive(Debug, Clone)]
enum Reach {
    /// As the profile that listed it (the account it is in).
    Profile(String),
    /// Through this role, assumed from that profile.
    Role { from: String, role_arn: String },
}

/// Retry tokens of one target's quota. The SDK's standard mode spends 5 on
/// a retry after throttling or an error and 10 after a timeout, and earns
/// some back with successes; its default quota is 500 per service and region,
/// shared by every client in the process, so the two accounts of a region
/// (or a 24-target fan-out under throttling) drain one quota together and
/// then fail at once. EC2 throttles per account and region, so each target
/// gets its own quota, large enough that a whole publish throttled at every
/// other call stays within it; it still stops retries when a target's
/// endpoint fails call after call.
const RETRY_QUOTA_PER_TARGET: usize = 2500;

/// Profile names from the standard profile files: `AWS_CONFIG_FILE` (else
/// `~/.aws/config`), where a profile is `[default]` or `[profile NAME]`, and
/// `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/credentials`), where it is
/// `[NAME]`. A file that does not exist has no profiles. Everything inside
/// a profile (regions, roles, SSO, processes) is left to aws-config, which
/// reads the same files when a profile is used; aws-config offers no
/// public way to list them.
pub fn profile_names() -> anyhow::Result<Vec<String>> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| -> Option<PathBuf> {
        match std::env::var(var) {
            Ok(p) if p == "~" || p.starts_with("~/") => home.as_ref().map(|h| h.join(p.trim_start_matches(['~', '/']))),
            Ok(p) => Some(PathBuf::from(p)),
            Err(_) => home.as_ref().map(|h| h.join(default)),
        }
    };
    let mut names = std::collections::BTreeSet::new();
    for (path, config) in [
        (file("AWS_CONFIG_FILE", ".aws/config"), true),
        (file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"), false),
    ] {
        let Some(path) = path else { continue };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the AWS profile file {}", path.display())),
        };
        names.extend(sections(&text, config));
    }
    Ok(names.into_iter().collect())
}

/// The profile names a profile file's section headers declare.
fn sections(text: &str, config: bool) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix('[')?.split_once(']').map(|(h, _)| h.trim()))
        .filter_map(|h| {
            if !config {
                return Some(h);
            }
            if h == "default" {
                return Some(h);
            }
            // `[profile NAME]`; other kinds (`sso-session`, `services`) are
            // not profiles.
            h.strip_prefix("profile").filter(|r| r.starts_with([' ', '\t'])).map(str::trim)
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Aws {
    pub async fn new(retry: Retry) -> anyhow::Result<Aws> {
        let profiles = profile_names()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        Ok(Aws {
            profiles,
            retry,
            http,
            configs: Mutex::default(),
            org_accounts: std::sync::Mutex::default(),
            partitions: Mutex::default(),
            ids: Mutex::default(),
        })
    }

    /// Known profile names.
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    async fn config(&self, profile: &str) -> SdkConfig {
        let cell = self.configs.lock().await.entry(profile.to_owned()).or_default().clone();
        cell.get_or_init(|| self.load_config(profile)).await.clone()
    }

    async fn load_config(&self, account: &str) -> SdkConfig {
        let reach = self.org_accounts.lock().expect("not poisoned").get(account).cloned();
        match reach {
            None => self.loader(account).load().await,
            Some(Reach::Profile(p)) => self.loader(&p).load().await,
            Some(Reach::Role { from, role_arn }) => {
                let source = self.loader(&from).load().await;
                let role = aws_config::sts::AssumeRoleProvider::builder(role_arn)
                    .session_name("ami-publisher")
                    .configure(&source)
                    .build()
                    .await;
                self.loader(&from).credentials_provider(role).load().await
            }
        }
    }

    /// The ids of the ACTIVE accounts of `scope`, listed from profile
    /// `from`; each is then reached through role `role_name` in it (the
    /// account `from` is in, as `from` itself).
    pub async fn org_accounts(&self, from: &str, role_name: &str, scope: &OrgScope) -> anyhow::Result<Vec<String>> {
        if !self.profiles.iter().any(|p| p == from) {
            anyhow::bail!(
                "--org-profile '{from}' is not a profile in the AWS profile files (found: {})",
                self.profiles.join(", ")
            );
        }
        let config = self.config(from).await;
        let own = aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send()
            .await
            .with_context(|| format!("GetCallerIdentity of profile {from}"))?
            .account
            .unwrap_or_default();
        // Organizations answers in us-east-1 for the aws partition.
        let org = aws_sdk_organizations::Client::from_conf(
            aws_sdk_organizations::config::Builder::from(&config).region(Region::from_static("us-east-1")).build(),
        );
        let ids = crate::org::active_accounts(&org, scope)
            .await
            .with_context(|| format!("listing the organization's accounts as profile {from}"))?;
        let mut known = self.org_accounts.lock().expect("not poisoned");
        for id in &ids {
            let reach = if *id == own {
                Reach::Profile(from.to_owned())
            } else {
                Reach::Role { from: from.to_owned(), role_arn: format!("arn:aws:iam::{id}:role/{role_name}") }
            };
            known.insert(id.clone(), reach);
        }
        Ok(ids)
    }

    /// The SDK configuration loader of a profile, with this run's HTTP
    /// client, retries and timeouts.
    fn loader(&self, profile: &str) -> aws_config::ConfigLoader {
        let retry = RetryConfig::standard()
            .with_max_attempts(self.retry.max_retries.saturating_add(1))
            .with_initial_backoff(self.retry.wait);
        // Every call is bounded in time, each attempt and the whole: EC2
        // (or the network) can keep an answer back for ever, before or
        // after acting.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT.min(self.retry.attempt_timeout))
            .operation_attempt_timeout(self.retry.attempt_timeout)
            .operation_timeout(self.retry.operation_timeout)
            .build();
        // The profile's own region (where account-wide questions such as
        // DescribeRegions are asked), else us-east-1; never AWS_REGION,
        // which names no account's home.
        let home = RegionProviderChain::first_try(ProfileFileRegionProvider::builder().profile_name(profile).build())
            .or_else(Region::from_static("us-east-1"));
        aws_config::defaults(BehaviorVersion::latest())
            .http_client(self.http.clone())
            .profile_name(profile)
            .region(home)
            // In the User-Agent: lets CloudTrail (and the local world) tell
            // this tool's calls apart.
            .app_name(aws_config::AppName::new("ami-publisher").expect("a valid app name"))
            .retry_config(retry)
            .timeout_config(timeouts)
    }

    /// An EC2 client for a target. Every client of a target shares the
    /// target's retry quota ([`RETRY_QUOTA_PER_TARGET`]).
    pub async fn ec2(&self, target: &Target) -> Client {
        let c = self.config(&target.account).await;
        let partition = self
            .partitions
            .lock()
            .await
            .entry(target.clone())
            .or_insert_with(|| {
                RetryPartition::custom(format!("ec2-{}-{}", target.account, target.region))
                    .token_bucket(TokenBucket::builder().capacity(RETRY_QUOTA_PER_TARGET).build())
                    .build()
            })
            .clone();
        let conf = aws_sdk_ec2::config::Builder::from(&c)
            .region(Region::new(target.region.clone()))
            .retry_partition(partition)
            .build();
        Client::from_conf(conf)
    }

    /// A KMS client for a target (its keys are checked before use).
    pub async fn kms(&self, target: &Target) -> aws_sdk_kms::Client {
        let c = self.config(&target.account).await;
        let conf = aws_sdk_kms::config::Builder::from(&c).region(Region::new(target.region.clone())).build();
        aws_sdk_kms::Client::from_conf(conf)
    }

    /// An EBS client for a target (`publish --via ebs-direct`), with a
    /// retry quota of its own (EBS throttles per snapshot and account, not
    /// as EC2 does), so that one target's throttled puts cannot spend
    /// every other target's retries.
    pub async fn ebs(&self, target: &Target) -> aws_sdk_ebs::Client {
        let c = self.config(&target.account).await;
        let partition = RetryPartition::custom(format!("ebs-{}-{}", target.account, target.region))
            .token_bucket(TokenBucket::builder().capacity(RETRY_QUOTA_PER_TARGET).build())
            .build();
        let conf = aws_sdk_ebs::config::Builder::from(&c)
            .region(Region::new(target.region.clone()))
            .retry_partition(partition)
            .build();
        aws_sdk_ebs::Client::from_conf(conf)
    }

    /// An SSM client for a target (the fleet's pointer).
    pub async fn ssm(&self, target: &Target) -> aws_sdk_ssm::Client {
        let c = self.config(&target.account).await;
        let conf = aws_sdk_ssm::config::Builder::from(&c).region(Region::new(target.region.clone())).build();
        aws_sdk_ssm::Client::from_conf(conf)
    }

    /// An STS client for a target (the caller's identity).
    pub async fn sts(&self, target: &Target) -> aws_sdk_sts::Client {
        let c = self.config(&target.account).await;
        let conf = aws_sdk_sts::config::Builder::from(&c).region(Region::new(target.region.clone())).build();
        aws_sdk_sts::Client::from_conf(conf)
    }

    /// The 12-digit id of an account (a profile, or an organization
    /// account's id), from GetCallerIdentity, asked once per run.
    pub async fn account_id(&self, account: &str) -> anyhow::Result<String> {
        let cell = self.ids.lock().await.entry(account.to_owned()).or_default().clone();
        let id = cell
            .get_or_init(|| async {
                let config = self.config(account).await;
                match aws_sdk_sts::Client::new(&config).get_caller_identity().send().await {
                    Ok(out) => out.account.ok_or_else(|| "GetCallerIdentity answered no account".to_owned()),
                    Err(e) => {
                        Err(format!("{:#}", anyhow::Error::new(e).context(format!("GetCallerIdentity of {account}"))))
                    }
                }
            })
            .await;
        id.clone().map_err(anyhow::Error::msg)
    }

    /// How this run can act as account `id`: as an organization account
    /// listed for the targets, else as the first profile whose identity is
    /// in it. None: no profile or listed account reaches it (profiles whose
    /// identity cannot be asked are passed over).
    pub async fn reach(&self, id: &str) -> Option<String> {
        if self.org_accounts.lock().expect("not poisoned").contains_key(id) {
            return Some(id.to_owned());
        }
        for p in &self.profiles {
            match self.account_id(p).await {
                Ok(a) if a == id => return Some(p.clone()),
                Ok(_) => {}
                Err(e) => tracing::debug!("profile {p} passed over: {e:#}"),
            }
        }
        None
    }

    /// Regions enabled in an account (asked in the profile's own region).
    pub async fn enabled_regions(&self, profile: &str) -> anyhow::Result<Vec<String>> {
        let c = self.config(profile).await;
        let out = Client::new(&c).describe_regions().send().await.context("DescribeRegions")?;
        let mut regions: Vec<String> = out
            .regions()
            .iter()
            .filter(|r| r.opt_in_status().is_none_or(|s| s != "not-opted-in"))
            .filter_map(|r| r.region_name().map(str::to_owned))
            .collect();
        regions.sort();
        Ok(regions)
    }
}

#[cfg(test)]
mod tests {
    use super::sections;

    #[test]
    fn profile_names_come_from_section_headers() {
        let config = "# comment\n[default]\nregion = us-east-1\n[profile first]\nregion=eu-west-1\n\
                      [ profile  second ]\n[sso-session corp]\n[services local]\n[profiles x]\n; [profile hidden]\n";
        assert_eq!(sections(config, true), ["default", "first", "second"]);
        let credentials = "[default]\naws_access_key_id = A\n[first]\n[ third ]\n# [fourth]\n";
        assert_eq!(sections(credentials, false), ["default", "first", "third"]);
    }
}
