//! KMS keys: which key encrypts a target's volumes, snapshots and AMIs,
//! and whether it can do what this run asks of it, checked before anything
//! is made.
//!
//! A target's key is the most specific `--target-kms-key ACCOUNT,REGION=KEY`
//! (the config file's `[kms-keys]` table) that matches it, else
//! `--kms-key-id`, else the account's EBS default key in the region
//! (GetEbsDefaultKmsKeyId). [`check`] asks KMS about it (DescribeKey): it
//! must exist, be enabled, and be a symmetric encryption key, as EBS only
//! uses those ("Amazon EBS encryption", supported KMS keys). When the AMIs
//! are shared it must be a customer managed key: EC2 does not share
//! snapshots encrypted with the AWS managed key aws/ebs (ModifySnapshotAttribute
//! in the EC2 API reference), and no other account may use that key. For
//! accounts it is shared with, the key policy (GetKeyPolicy) must let them
//! use the key as EBS does for them (the EBS User Guide's "Share the KMS
//! key used to encrypt a shared Amazon EBS snapshot": kms:CreateGrant,
//! kms:Decrypt, kms:DescribeKey, kms:GenerateDataKey,
//! kms:GenerateDataKeyWithoutPlaintext, kms:ReEncrypt*); a policy this role
//! may not read, and access for organizations and OUs, are reported as not
//! checked.

use aws_sdk_kms::{Client, error::ProvideErrorMetadata as _, types::KeyManagerType};
use serde_json::Value;

use crate::values::wildcard;
use crate::{
    sharing::Grantees,
    targets::{Target, TargetSpec},
};

/// The keys of a run: per target, and the default.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// `--kms-key-id`.
    pub default: Option<String>,
    /// `--target-kms-key` / `[kms-keys]`, in the order given.
    pub by_target: Vec<(TargetSpec, String)>,
}

impl Keys {
    /// The key configured for a target (None: the account's EBS default).
    pub fn for_target(&self, t: &Target) -> Option<&str> {
        let specificity = |s: &TargetSpec| u8::from(s.account.is_some()) * 2 + u8::from(s.region.is_some());
        let mut best: Option<(u8, &str)> = None;
        for (spec, key) in &self.by_target {
            if spec.matches(t) && best.is_none_or(|(b, _)| specificity(spec) > b) {
                best = Some((specificity(spec), key));
            }
        }
        best.map(|(_, k)| k).or(self.default.as_deref())
    }

    /// Every key configured, each once (for the IAM policy).
    pub fn all(&self) -> Vec<&str> {
        let mut v: Vec<&str> =
            self.default.iter().map(String::as_str).chain(self.by_target.iter().map(|(_, k)| k.as_str())).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Whether `s` names a KMS key as EC2 takes it: a key id, a key ARN, an
/// alias name (`alias/...`) or an alias ARN.
pub fn valid_key(s: &str) -> bool {
    let id = |k: &str| !k.is_empty() && k.len() <= 256 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let alias = |a: &str| {
        a.strip_prefix("alias/").is_some_and(|n| {
            !n.is_empty() && n.len() <= 250 && n.chars().all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        })
    };
    if let Some(rest) = s.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return parts.len() == 5
            && parts[1] == "kms"
            && !parts[2].is_empty()
            && parts[3].len() == 12
            && (parts[4].strip_prefix("key/").is_some_and(id) || alias(parts[4]));
    }
    alias(s) || id(s)
}

/// A KMS key as given on the command line (`--kms-key-id`).
pub fn parse_key(s: &str) -> Result<String, String> {
    let s = s.trim();
    if valid_key(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{s}' is not a KMS key (a key id, key ARN, alias/NAME or alias ARN, e.g. alias/ami or \
             arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab)"
        ))
    }
}

/// `ACCOUNT,REGION=KEY` (`--target-kms-key`, and the `[kms-keys]` table).
pub fn parse_target_key(s: &str) -> Result<(TargetSpec, String), String> {
    let (target, key) =
        s.split_once('=').ok_or_else(|| format!("'{s}': give ACCOUNT,REGION=KEY, e.g. prod,eu-west-1=alias/ami"))?;
    let spec: TargetSpec = target.parse().map_err(|e| format!("{e}"))?;
    if spec.org.is_some() {
        return Err(format!("'{s}': keys are given per profile or account id, not per org: scope"));
    }
    Ok((spec, parse_key(key)?))
}

/// What KMS says about a target's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    /// The key's ARN.
    pub arn: String,
    /// As configured, or the account's default.
    pub named: String,
    /// Customer managed (not the AWS managed aws/ebs).
    pub customer_managed: bool,
    /// What could not be checked.
    pub unchecked: Vec<String>,
}

/// The actions EBS needs an account to be allowed on the key of a snapshot
/// shared with it (see the module's documentation).
pub const SHARED_ACCOUNT_ACTIONS: [&str; 6] = [
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
];

/// Why a key check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key cannot serve this run (what KMS said of it).
    #[error("{0}")]
    Refused(String),
    /// A call failed (after the SDK's retries): nothing is known of the key.
    #[error("{0:#}")]
    Call(anyhow::Error),
}

macro_rules! refuse {
    ($($arg:tt)*) => { return Err(KeyError::Refused(format!($($arg)*))) };
}

/// Check a target's key for this run: usable for EBS, and, when the AMIs
/// are shared, shareable with `shares`. `named`: the key configured, or the
/// account's default as EC2 reported it.
pub async fn check(kms: &Client, named: &str, shares: &Grantees) -> Result<KeyCheck, KeyError> {
    let described = match kms.describe_key().key_id(named).send().await {
        Ok(d) => d,
        Err(e) => {
            let e = aws_sdk_kms::Error::from(e.into_service_error());
            match e.code() {
                Some("NotFoundException") => refuse!("KMS key {named} does not exist here"),
                Some("AccessDeniedException") => refuse!(
                    "this role may not DescribeKey {named}, so it cannot be checked (or, likely, used): allow \
                     kms:DescribeKey on it"
                ),
                _ => return Err(KeyError::Call(anyhow::Error::new(e).context(format!("DescribeKey {named}")))),
            }
        }
    };
    let Some(meta) = described.key_metadata() else { refuse!("DescribeKey {named} answered no key") };
    let arn = meta.arn().unwrap_or(meta.key_id()).to_owned();
    let state = meta.key_state().map(|s| s.as_str().to_owned()).unwrap_or_default();
    if state != "Enabled" {
        refuse!("KMS key {named} ({arn}) is {state}, not Enabled: EBS cannot encrypt with it");
    }
    let spec = meta.key_spec().map(|s| s.as_str()).unwrap_or("SYMMETRIC_DEFAULT");
    let usage = meta.key_usage().map(|s| s.as_str()).unwrap_or("ENCRYPT_DECRYPT");
    if spec != "SYMMETRIC_DEFAULT" || usage != "ENCRYPT_DECRYPT" {
        refuse!(
            "KMS key {named} is {spec} for {usage}: EBS only encrypts with symmetric encryption keys \
             (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)"
        );
    }
    let customer_managed = meta.key_manager() != Some(&KeyManagerType::Aws);
    let mut out = KeyCheck { arn: arn.clone(), named: named.to_owned(), customer_managed, unchecked: Vec::new() };
    if shares.is_empty() {
        return Ok(out);
    }
    if !customer_managed {
        refuse!(
            "the AMIs would be encrypted with the AWS managed key {named} ({arn}), which cannot be shared: EC2 \
             refuses to share its snapshots and no other account may use it. Give a customer managed key \
             (--kms-key-id, or [kms-keys] per target) whose key policy lets {} use it",
            shares.summary()
        );
    }
    if !shares.accounts.is_empty() {
        match kms.get_key_policy().key_id(&arn).policy_name("default").send().await {
            Ok(p) => {
                let policy: Value = match serde_json::from_str(p.policy().unwrap_or("{}")) {
                    Ok(v) => v,
                    Err(e) => refuse!("the key policy of {arn} is not JSON: {e}"),
                };
                let refused: Vec<&str> =
                    shares.accounts.iter().map(String::as_str).filter(|a| !allows(&policy, a)).collect();
                if !refused.is_empty() {
                    refuse!(
                        "the key policy of {named} ({arn}) does not let account(s) {} use the key, so they could \
                         neither launch nor copy the AMIs: allow them {}",
                        refused.join(", "),
                        SHARED_ACCOUNT_ACTIONS.join(", ")
                    );
                }
            }
            Err(e) => {
                let e = aws_sdk_kms::Error::from(e.into_service_error());
                out.unchecked.push(format!(
                    "the key policy of {arn} could not be read ({}), so whether the accounts shared with may use \
                     the key is not checked",
                    e.code().unwrap_or("error")
                ));
            }
        }
    }
    if !shares.organizations.is_empty() || !shares.ous.is_empty() {
        out.unchecked.push(format!(
            "whether the organizations and OUs shared with may use {arn} is not checked (allow them in its key \
             policy, e.g. with aws:PrincipalOrgID)"
        ));
    }
    Ok(out)
}

/// The key a target's new volumes would be encrypted with: the configured
/// one, else the account's EBS default in the region.
pub async fn target_key(ec2: &aws_sdk_ec2::Client, configured: Option<&str>) -> anyhow::Result<String> {
    if let Some(k) = configured {
        return Ok(k.to_owned());
    }
    let out = crate::retry::call("GetEbsDefaultKmsKeyId", None, || ec2.get_ebs_default_kms_key_id().send()).await?;
    out.kms_key_id().map(str::to_owned).ok_or_else(|| anyhow::anyhow!("GetEbsDefaultKmsKeyId answered no key"))
}

/// Check every target's key before a publish makes anything (see
/// [`check`]), all targets at once. Err: every target whose key cannot
/// serve, one line each: the run is refused. A target whose checks could
/// not be made (a call that failed after its retries) is that target's
/// failure alone: its entry holds the error, and the others go on.
pub async fn preflight(
    aws: &crate::aws::Aws,
    targets: &[Target],
    keys: &Keys,
    shares: &Grantees,
    max_concurrency: usize,
) -> anyhow::Result<Vec<(Target, Result<KeyCheck, String>)>> {
    let checked = crate::fanout(targets, max_concurrency, |t| async move {
        let ec2 = aws.ec2(&t).await;
        let r = match target_key(&ec2, keys.for_target(&t)).await {
            Ok(named) => check(&aws.kms(&t).await, &named, shares).await,
            Err(e) => Err(KeyError::Call(e.context("finding the account's default EBS key"))),
        };
        (t, r)
    })
    .await;
    let mut refused = Vec::new();
    let mut out = Vec::new();
    for (t, r) in checked {
        match r {
            Ok(c) => {
                for u in &c.unchecked {
                    tracing::warn!(target = %t, "{u}");
                }
                out.push((t, Ok(c)));
            }
            Err(KeyError::Refused(why)) => refused.push(format!("  {t}: {why}")),
            Err(KeyError::Call(e)) => out.push((t, Err(format!("checking the KMS key: {e:#}")))),
        }
    }
    if !refused.is_empty() {
        anyhow::bail!(
            "nothing was made: the KMS key of {} target(s) cannot serve\n{}",
            refused.len(),
            refused.join("\n")
        );
    }
    Ok(out)
}

fn listed(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Whether a statement's principal names `account` (its root, any of its
/// principals, or everyone).
fn names_account(st: &Value, account: &str) -> bool {
    let principal = &st["Principal"];
    if principal.as_str() == Some("*") {
        return true;
    }
    listed(&principal["AWS"]).iter().any(|p| {
        *p == "*" || *p == account || p.strip_prefix("arn:").is_some_and(|r| r.split(':').nth(3) == Some(account))
    })
}

/// Whether a key policy lets `account` do everything EBS needs with the
/// key for a shared snapshot. Conditions on an Allow are taken as met (they
/// cannot be judged from here); a Deny without conditions wins.
pub fn allows(policy: &Value, account: &str) -> bool {
    let statements: Vec<&Value> = match &policy["Statement"] {
        Value::Array(a) => a.iter().collect(),
        s @ Value::Object(_) => vec![s],
        _ => Vec::new(),
    };
    SHARED_ACCOUNT_ACTIONS.iter().all(|action| {
        let matching =
            |st: &&Value| names_account(st, account) && listed(&st["Action"]).iter().any(|a| wildcard(a, action, true));
        let allowed = statements.iter().filter(|s| s["Effect"] == "Allow").any(&matching);
        let denied = statements.iter().filter(|s| s["Effect"] == "Deny" && s.get("Condition").is_none()).any(matching);
        allowed && !denied
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_most_specific_configured_key_wins() {
        let keys = Keys {
            default: Some("alias/all".into()),
            by_target: vec![
                ("prod,*".parse().unwrap(), "alias/prod".into()),
                ("prod,eu-west-1".parse().unwrap(), "alias/prod-eu".into()),
                ("*,ap-south-1".parse().unwrap(), "alias/india".into()),
            ],
        };
        let t = |a: &str, r: &str| Target { account: a.into(), region: r.into() };
        assert_eq!(keys.for_target(&t("prod", "eu-west-1")), Some("alias/prod-eu"));
        assert_eq!(keys.for_target(&t("prod", "us-east-1")), Some("alias/prod"));
        assert_eq!(keys.for_target(&t("prod", "ap-south-1")), Some("alias/prod"), "an account beats a region");
        assert_eq!(keys.for_target(&t("dev", "ap-south-1")), Some("alias/india"));
        assert_eq!(keys.for_target(&t("dev", "us-east-1")), Some("alias/all"));
        assert_eq!(Keys::default().for_target(&t("dev", "us-east-1")), None);
        assert_eq!(keys.all(), ["alias/all", "alias/india", "alias/prod", "alias/prod-eu"]);
    }

    #[test]
    fn keys_are_checked_as_ec2_names_them() {
        for ok in [
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "alias/ami",
            "alias/team/ami_keys-1",
            "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/ami",
        ] {
            assert!(parse_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "alias/", "key with spaces", "arn:aws:kms:us-east-1:1234:key/x", "arn:aws:s3:::bucket"] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
        let (spec, key) = parse_target_key("prod,eu-west-1=alias/ami").unwrap();
        assert_eq!((spec.to_string(), key.as_str()), ("prod,eu-west-1".to_owned(), "alias/ami"));
        assert!(parse_target_key("prod,eu-west-1").unwrap_err().contains("ACCOUNT,REGION=KEY"));
        assert!(parse_target_key("prod,EU=alias/x").is_err());
        assert!(parse_target_key("prod,eu-west-1=not a key").unwrap_err().contains("is not a KMS key"));
        assert!(parse_target_key("org:*,eu-west-1=alias/ami").unwrap_err().contains("not per org: scope"));
    }

    #[test]
    fn a_key_policy_allows_an_account_only_with_every_action_ebs_needs() {
        let owner = json!({"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111111111111:root"},
                           "Action": "kms:*", "Resource": "*"});
        let policy = |extra: Vec<Value>| {
            let mut s = vec![owner.clone()];
            s.extend(extra);
            json!({"Version": "2012-10-17", "Statement": s})
        };
        assert!(allows(&policy(vec![]), "111111111111"));
        assert!(!allows(&policy(vec![]), "222222222222"));
        let shared = json!({"Effect": "Allow", "Principal": {"AWS": ["arn:aws:iam::222222222222:root"]},
                            "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:CreateGrant", "kms:GenerateDataKey*",
                                       "kms:ReEncrypt*"], "Resource": "*"});
        assert!(allows(&policy(vec![shared.clone()]), "222222222222"));
        assert!(!allows(&policy(vec![shared.clone()]), "333333333333"));
        let mut partial = shared.clone();
        partial["Action"] = json!(["kms:Decrypt", "kms:DescribeKey"]);
        assert!(!allows(&policy(vec![partial]), "222222222222"), "CreateGrant and the rest are missing");
        let deny = json!({"Effect": "Deny", "Principal": {"AWS": "222222222222"}, "Action": "kms:CreateGrant",
                          "Resource": "*"});
        assert!(!allows(&policy(vec![shared.clone(), deny]), "222222222222"));
        let everyone = json!({"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"});
        assert!(allows(&policy(vec![everyone]), "333333333333"));
    }
}
