//! The fleet's pointer: per target, an SSM parameter of data type
//! `aws:ec2:image` whose value is the AMI the fleet should launch. Launch
//! templates (`resolve:ssm:NAME`), Auto Scaling, CloudFormation and
//! Terraform resolve it; each version is labelled with the leaf it points
//! at (`leaf-LEAF`), so `NAME:leaf-LEAF` resolves to that leaf's AMI.
//!
//! What Systems Manager does that shapes this (PutParameter and
//! LabelParameterVersion in its API reference; "Parameter data types" and
//! "Working with parameter labels" in the Parameter Store guide):
//! - An `aws:ec2:image` value is validated after PutParameter has answered
//!   with the new version: a value that fails (not an AMI available in the
//!   account) is dropped, "the parameter will not be created or updated".
//!   So a version counts only once GetParameter finds it ([`point`] waits,
//!   bounded, and reports a refusal).
//! - A parameter keeps 100 versions; a put that would drop the oldest fails
//!   (ParameterMaxVersionLimitExceeded) while that version has a label: its
//!   labels are taken off first, and the run says so.
//! - A label names one version of a parameter at a time (labelling another
//!   version moves it); it may not start with a digit, `aws` or `ssm`, and
//!   holds letters, digits, `.`, `-` and `_` (up to 100).
//!
//! PutParameter has no client token: a retried put whose first answer was
//! lost makes two versions of the same value, which is harmless (the label
//! goes on the one this run saw). A put is skipped when the parameter
//! already holds the AMI.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_ssm::{Client, error::ProvideErrorMetadata as _, types::ParameterType};

use crate::retry;

/// The data type of the parameters this tool writes.
pub const DATA_TYPE: &str = "aws:ec2:image";

/// The placeholders a parameter name template may hold.
const PLACEHOLDERS: [&str; 4] = ["{stream}", "{leaf}", "{account}", "{region}"];

/// `--ssm-parameter TEMPLATE`: the parameter's name in each target, with
/// `{stream}`, `{leaf}`, `{account}` (the target's profile or account id)
/// and `{region}` filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(String);

impl Template {
    /// Check a template as it is parsed: a name Parameter Store takes once
    /// filled in (with sample values for the placeholders).
    pub fn parse(s: &str) -> Result<Template, String> {
        let t = Template(s.to_owned());
        let mut rest = s.to_owned();
        for p in PLACEHOLDERS {
            rest = rest.replace(p, "");
        }
        if rest.contains('{') || rest.contains('}') {
            return Err(format!("'{s}': the only placeholders are {}", PLACEHOLDERS.join(", ")));
        }
        t.render("stream/name", "leaf", "account", "us-east-1")?;
        Ok(t)
    }

    /// The names this template can give, as an IAM resource pattern after
    /// `parameter` in an SSM parameter ARN (each placeholder a `*`).
    pub fn iam_pattern(&self) -> String {
        let mut p = self.0.clone();
        for ph in PLACEHOLDERS {
            p = p.replace(ph, "*");
        }
        if p.starts_with('/') { p } else { format!("/{p}") }
    }

    pub fn uses_leaf(&self) -> bool {
        self.0.contains("{leaf}")
    }

    /// The parameter's name for one target and leaf.
    pub fn render(&self, stream: &str, leaf: &str, account: &str, region: &str) -> Result<String, String> {
        let name = self
            .0
            .replace("{stream}", stream)
            .replace("{leaf}", leaf)
            .replace("{account}", account)
            .replace("{region}", region);
        valid_name(&name)?;
        Ok(name)
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parameter name as Parameter Store takes it: letters, digits and
/// `_ . - /`, at most 1011 characters; a name with `/` starts with one and
/// has at most 15 levels; no name starts with `aws` or `ssm`.
fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 1011 {
        return Err(format!("parameter name '{name}' must be 1 to 1011 characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.-/".contains(*c))) {
        return Err(format!("parameter name '{name}' holds '{c}': only letters, digits and _ . - / are allowed"));
    }
    if name.contains('/') && !name.starts_with('/') {
        return Err(format!("parameter name '{name}' is a path and must start with '/'"));
    }
    if name.contains("//") || (name.len() > 1 && name.ends_with('/')) {
        return Err(format!("parameter name '{name}' has an empty level"));
    }
    if name.matches('/').count() > 15 {
        return Err(format!("parameter name '{name}' has more than 15 levels"));
    }
    let first = name.trim_start_matches('/').to_ascii_lowercase();
    if first.starts_with("aws") || first.starts_with("ssm") {
        return Err(format!("parameter name '{name}' may not start with 'aws' or 'ssm'"));
    }
    Ok(())
}

/// The label of the versions that point at `leaf`: `leaf-` and the leaf,
/// each character other than a letter, a digit, `.`, `-` or `_` written
/// as `_`, cut to 100 characters.
pub fn label(leaf: &str) -> String {
    let mut l: String = format!("leaf-{leaf}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' })
        .collect();
    l.truncate(100);
    l
}

/// The leaf a label names, if it is one of this tool's.
pub fn leaf_of_label(label: &str) -> Option<&str> {
    label.strip_prefix("leaf-")
}

/// One version of a parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: i64,
    pub value: String,
    pub labels: Vec<String>,
    /// The version's description: `rollback from AMI` for a rollback.
    pub description: Option<String>,
}

impl Version {
    /// The AMI this version rolled back from, if it is a rollback.
    pub fn rolled_back_from(&self) -> Option<&str> {
        self.description.as_deref().and_then(|d| d.strip_prefix(ROLLBACK_FROM))
    }
}

/// The description of a version `rollback` writes, before the AMI it left.
pub const ROLLBACK_FROM: &str = "rollback from ";

/// The version a rollback goes back to: the newest before the current one
/// with another value. None when every version holds the current value.
pub fn rollback_target(versions: &[Version]) -> Option<&Version> {
    let now = versions.last()?;
    versions.iter().rev().find(|v| v.version < now.version && v.value != now.value)
}

/// The parameter's current version, or None when there is none.
pub async fn current(ssm: &Client, name: &str) -> anyhow::Result<Option<Version>> {
    let got = retry::call(&format!("GetParameter {name}"), None, || ssm.get_parameter().name(name).send()).await;
    match got {
        Ok(out) => Ok(out.parameter().map(|p| Version {
            version: p.version(),
            value: p.value().unwrap_or_default().to_owned(),
            labels: Vec::new(),
            description: None,
        })),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("ParameterNotFound") || text.contains("ParameterVersionNotFound")
}

/// Every version of the parameter, oldest first, with their labels.
pub async fn history(ssm: &Client, name: &str) -> anyhow::Result<Vec<Version>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = retry::call(&format!("GetParameterHistory {name}"), None, || {
            ssm.get_parameter_history().name(name).max_results(50).set_next_token(token.clone()).send()
        })
        .await;
        let page = match page {
            Ok(p) => p,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        out.extend(page.parameters().iter().map(|p| Version {
            version: p.version(),
            value: p.value().unwrap_or_default().to_owned(),
            labels: p.labels().to_vec(),
            description: p.description().map(str::to_owned),
        }));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}

/// What [`point`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointed {
    /// The version that holds the AMI.
    pub version: i64,
    /// Whether this call wrote it (false: the parameter held the AMI).
    pub wrote: bool,
    /// Labels taken off the oldest version to make room, if any.
    pub unlabelled: Vec<String>,
}

/// Point parameter `name` at `ami`, the AMI of `leaf`, and label that
/// version with the leaf. Waits (up to `wait`) until Parameter Store has
/// accepted the value; a value it drops is an error saying so.
pub async fn point(ssm: &Client, name: &str, ami: &str, leaf: &str, wait: Duration) -> anyhow::Result<Pointed> {
    point_as(ssm, name, ami, Some(leaf), None, wait).await
}

/// [`point`], with the version's label optional (an AMI whose leaf is not
/// known gets none) and a description for a new version.
pub async fn point_as(
    ssm: &Client,
    name: &str,
    ami: &str,
    leaf: Option<&str>,
    description: Option<&str>,
    wait: Duration,
) -> anyhow::Result<Pointed> {
    let held = current(ssm, name).await?;
    let mut unlabelled = Vec::new();
    let (version, wrote) = match held {
        Some(v) if v.value == ami => (v.version, false),
        _ => {
            let put = || {
                ssm.put_parameter()
                    .name(name)
                    .value(ami)
                    .r#type(ParameterType::String)
                    .data_type(DATA_TYPE)
                    .set_description(description.map(str::to_owned))
                    .overwrite(true)
                    .send()
            };
            let out = match put().await {
                Err(e) if e.code() == Some("ParameterMaxVersionLimitExceeded") => {
                    unlabelled = unlabel_oldest(ssm, name).await?;
                    put().await
                }
                other => other,
            }
            .with_context(|| format!("PutParameter {name}"))?;
            accepted(ssm, name, out.version(), ami, wait).await?;
            (out.version(), true)
        }
    };
    if let Some(leaf) = leaf {
        let l = label(leaf);
        let labelled = retry::call(&format!("LabelParameterVersion {name}"), None, || {
            ssm.label_parameter_version().name(name).parameter_version(version).labels(&l).send()
        })
        .await?;
        if !labelled.invalid_labels().is_empty() {
            anyhow::bail!("{name}: Parameter Store refused label {:?} on version {version}", labelled.invalid_labels());
        }
    }
    Ok(Pointed { version, wrote, unlabelled })
}

/// Wait until version `version` of `name` is there with `ami`.
async fn accepted(ssm: &Client, name: &str, version: i64, ami: &str, wait: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    let at = format!("{name}:{version}");
    let mut pause = Duration::from_millis(250);
    loop {
        let got = retry::call(&format!("GetParameter {at}"), None, || ssm.get_parameter().name(&at).send()).await;
        match got {
            Ok(out) if out.parameter().and_then(|p| p.value()) == Some(ami) => return Ok(()),
            Ok(out) => {
                anyhow::bail!("{at} holds {}, not {ami}", out.parameter().and_then(|p| p.value()).unwrap_or("nothing"))
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "Parameter Store did not accept {ami} as version {version} of {name} within {}: it checks an \
                 {DATA_TYPE} value after PutParameter answers, and drops one that is not an AMI available in \
                 this account",
                humantime::format_duration(wait)
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Take the labels off the oldest version of `name`, so that a new version
/// can push it out (Parameter Store keeps 100).
async fn unlabel_oldest(ssm: &Client, name: &str) -> anyhow::Result<Vec<String>> {
    let all = history(ssm, name).await?;
    let Some(oldest) = all.first() else { return Ok(Vec::new()) };
    if oldest.labels.is_empty() {
        return Ok(Vec::new());
    }
    retry::call(&format!("UnlabelParameterVersion {name}"), None, || {
        ssm.unlabel_parameter_version()
            .name(name)
            .parameter_version(oldest.version)
            .set_labels(Some(oldest.labels.clone()))
            .send()
    })
    .await?;
    tracing::warn!(
        parameter = name,
        "labels {} taken off version {}, the oldest of 100: Parameter Store keeps no more",
        oldest.labels.join(","),
        oldest.version
    );
    Ok(oldest.labels.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_become_names_parameter_store_takes() {
        let t = Template::parse("/ami-fleet/{stream}/latest").unwrap();
        assert_eq!(t.render("base/web", "7", "prod", "eu-west-1").unwrap(), "/ami-fleet/base/web/latest");
        assert!(!t.uses_leaf());
        assert!(Template::parse("/fleet/{stream}/{leaf}/{account}-{region}").unwrap().uses_leaf());
        for bad in
            ["/aws/fleet/{stream}", "ssm-fleet", "fleet/{stream}", "/fleet/{branch}", "/fleet x/{stream}", "/f//x"]
        {
            assert!(Template::parse(bad).is_err(), "{bad} was taken");
        }
        let deep = format!("/{}", ["a"; 16].join("/"));
        assert!(Template::parse(&deep).is_err());
        assert!(Template::parse("plain-name").is_ok());
        assert_eq!(t.iam_pattern(), "/ami-fleet/*/latest");
        assert_eq!(Template::parse("plain-{region}").unwrap().iam_pattern(), "/plain-*");
        assert!(Template::parse("plain-{stream}").is_err(), "a stream holds a slash: the name is a path");
        // A stream with a character names cannot hold is refused when filled in.
        assert!(t.render("base/we b", "1", "prod", "eu-west-1").is_err());
    }

    #[test]
    fn labels_name_leaves_as_labels_may_be_written() {
        assert_eq!(label("7"), "leaf-7");
        assert_eq!(label("2026-12-06.1"), "leaf-2026-12-06.1");
        assert_eq!(label("a+b c"), "leaf-a_b_c");
        assert_eq!(label(&"x".repeat(200)).len(), 100);
        assert_eq!(leaf_of_label("leaf-7"), Some("7"));
        assert_eq!(leaf_of_label("prod"), None);
    }
}
