//! An AMI's life after it is made, in EC2's own terms: a deprecation time,
//! deregistration protection, disabling, when it was last launched, and
//! what references it (EC2 API reference: EnableImageDeprecation,
//! EnableImageDeregistrationProtection, DisableImage, DescribeImageReferences,
//! the Image type).
//!
//! - Deprecation: EC2 rounds the time to the minute and refuses one in the
//!   past or more than 10 years ahead; a deprecated AMI is hidden from
//!   other accounts' listings (not from its owner, nor from a launch by id).
//! - Protection: no one may deregister a protected AMI. With the cooldown,
//!   it stays protected for 24 hours after protection is turned off
//!   (shown as `disabled after TIME`).
//! - Disabling: the AMI can no longer be launched, loses every launch
//!   permission (enabling it again gives none back), and is left out of
//!   listings unless asked for.
//! - References: the instances, launch template versions and SSM
//!   parameters that name an AMI, 10 AMIs a call.
//!
//! Each change is idempotent in EC2, so the SDK's retries are safe.

use std::{collections::HashMap, time::SystemTime};

use aws_sdk_ec2::{
    Client,
    types::{Image, ImageReferenceOptionName, ResourceTypeRequest},
};

use crate::{errors::SdkResultExt as _, retry};

/// The furthest ahead EC2 takes a deprecation time.
pub const MAX_DEPRECATE_IN: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// `--deregistration-protection[=cooldown]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtectionMode {
    /// Protected until protection is turned off.
    On,
    /// And for 24 hours after protection is turned off.
    Cooldown,
}

/// Deregistration protection as DescribeImages shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    Off,
    On {
        cooldown: bool,
    },
    /// Turned off with the cooldown: protected until then.
    Until(String),
}

impl Protection {
    pub fn of(img: &Image) -> Protection {
        match img.deregistration_protection().unwrap_or("disabled") {
            "disabled" | "" => Protection::Off,
            "enabled-with-cooldown" => Protection::On { cooldown: true },
            s => match s.strip_prefix("disabled after ") {
                Some(t) => Protection::Until(t.to_owned()),
                None => Protection::On { cooldown: false },
            },
        }
    }

    pub fn protects(&self) -> bool {
        *self != Protection::Off
    }

    /// Whether protection `mode` holds already: protection with the
    /// cooldown is at least protection without it.
    pub fn satisfies(&self, mode: ProtectionMode) -> bool {
        match self {
            Protection::On { cooldown } => *cooldown || mode == ProtectionMode::On,
            _ => false,
        }
    }

    /// A cooldown whose end has passed no longer protects (EC2 may still
    /// show it for a moment).
    pub fn now(self, now: SystemTime) -> Protection {
        match &self {
            Protection::Until(t) => match humantime::parse_rfc3339_weak(t.trim_end_matches('Z')) {
                Ok(end) if end <= now => Protection::Off,
                _ => self,
            },
            _ => self,
        }
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Protection::Off => f.write_str("off"),
            Protection::On { cooldown: false } => f.write_str("on"),
            Protection::On { cooldown: true } => f.write_str("on, with a 24-hour cooldown"),
            Protection::Until(t) => write!(f, "off, but protected until {t} (cooldown)"),
        }
    }
}

/// What every AMI a run makes (or finds, for a leaf published before) is
/// given: `--deprecate-in`, `--deregistration-protection`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewAmis {
    pub deprecate_in: Option<std::time::Duration>,
    pub protection: Option<ProtectionMode>,
}

impl NewAmis {
    pub fn any(&self) -> bool {
        self.deprecate_in.is_some() || self.protection.is_some()
    }
}

/// What an AMI was given, for results files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Given {
    pub deprecation_time: Option<String>,
    pub protection: Option<String>,
}

/// Give `ami` what `n` asks. `found`: the AMI as DescribeImages showed it,
/// when it was there before this run: a deprecation time it has is kept
/// (a re-run does not push it later), and protection it has is left.
/// `made`: when this run made it (ids it just learned may not be known
/// everywhere yet).
pub async fn give(
    ec2: &Client,
    ami: &str,
    found: Option<&Image>,
    made: Option<std::time::Instant>,
    n: &NewAmis,
) -> anyhow::Result<Given> {
    let mut given = Given::default();
    if let Some(d) = n.deprecate_in {
        match found.and_then(Image::deprecation_time) {
            Some(t) => given.deprecation_time = Some(t.to_owned()),
            None => {
                let at = SystemTime::now() + d;
                deprecate_fresh(ec2, ami, at, made).await?;
                given.deprecation_time = Some(crate::tags::rfc3339(at));
            }
        }
    }
    if let Some(mode) = n.protection {
        let held = found.map_or(Protection::Off, Protection::of);
        let wanted = Protection::On { cooldown: mode == ProtectionMode::Cooldown };
        if !held.satisfies(mode) {
            protect_fresh(ec2, ami, mode, made).await?;
        }
        given.protection = Some(if held.satisfies(mode) { held.to_string() } else { wanted.to_string() });
    }
    Ok(given)
}

/// Deprecate `ami` at `at`.
pub async fn deprecate(ec2: &Client, ami: &str, at: SystemTime) -> anyhow::Result<()> {
    deprecate_fresh(ec2, ami, at, None).await
}

async fn deprecate_fresh(
    ec2: &Client,
    ami: &str,
    at: SystemTime,
    made: Option<std::time::Instant>,
) -> anyhow::Result<()> {
    let at = aws_smithy_types::DateTime::from(at);
    retry::call(&format!("EnableImageDeprecation {ami}"), made, || {
        ec2.enable_image_deprecation().image_id(ami).deprecate_at(at).send()
    })
    .await?;
    Ok(())
}

/// Take `ami`'s deprecation time away.
pub async fn undeprecate(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    retry::call(&format!("DisableImageDeprecation {ami}"), None, || {
        ec2.disable_image_deprecation().image_id(ami).send()
    })
    .await?;
    Ok(())
}

/// Turn deregistration protection on.
pub async fn protect(ec2: &Client, ami: &str, mode: ProtectionMode) -> anyhow::Result<()> {
    protect_fresh(ec2, ami, mode, None).await
}

async fn protect_fresh(
    ec2: &Client,
    ami: &str,
    mode: ProtectionMode,
    made: Option<std::time::Instant>,
) -> anyhow::Result<()> {
    retry::call(&format!("EnableImageDeregistrationProtection {ami}"), made, || {
        ec2.enable_image_deregistration_protection()
            .image_id(ami)
            .with_cooldown(mode == ProtectionMode::Cooldown)
            .send()
    })
    .await?;
    Ok(())
}

/// Turn deregistration protection off (a cooldown then runs its 24 hours).
pub async fn unprotect(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    retry::call(&format!("DisableImageDeregistrationProtection {ami}"), None, || {
        ec2.disable_image_deregistration_protection().image_id(ami).send()
    })
    .await?;
    Ok(())
}

/// Disable `ami`: no launches, no launch permissions.
pub async fn disable(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    retry::call(&format!("DisableImage {ami}"), None, || ec2.disable_image().image_id(ami).send()).await?;
    Ok(())
}

/// Make a disabled `ami` available again.
pub async fn enable(ec2: &Client, ami: &str) -> anyhow::Result<()> {
    retry::call(&format!("EnableImage {ami}"), None, || ec2.enable_image().image_id(ami).send()).await?;
    Ok(())
}

/// The AMIs of `ids` as their owner sees them, disabled ones included.
pub async fn images(ec2: &Client, ids: &[String]) -> anyhow::Result<Vec<Image>> {
    // Gone ids answer NotFound for the whole call: None.
    let describe = |ids: Vec<String>| async move {
        let what = format!("DescribeImages {}", ids.join(" "));
        ec2.describe_images()
            .set_image_ids(Some(ids))
            .include_disabled(true)
            .include_deprecated(true)
            .send()
            .await
            .or_code(&["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"], what)
    };
    let mut out = Vec::new();
    for chunk in ids.chunks(100) {
        match describe(chunk.to_vec()).await? {
            Some(f) => out.extend(f.images().iter().cloned()),
            // One id of the chunk is gone: ask one by one.
            None if chunk.len() > 1 => {
                for id in chunk {
                    out.extend(describe(vec![id.clone()]).await?.iter().flat_map(|o| o.images().iter().cloned()));
                }
            }
            None => {}
        }
    }
    Ok(out)
}

/// When an instance was last launched from `img`, as DescribeImages says
/// (EC2 may report a launch up to 24 hours late).
pub fn last_launched(img: &Image) -> Option<SystemTime> {
    img.last_launched_time().and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
}

/// What references each of `ids` ([`counted`]), as "instance i-...",
/// "launch template lt-...", "parameter /name". None: EC2 does not know
/// the action here (an older partition or endpoint): the caller falls
/// back and says so. A refusal by IAM is an error, not a fallback.
pub async fn references(ec2: &Client, ids: &[String]) -> anyhow::Result<Option<HashMap<String, Vec<String>>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in ids.chunks(10) {
        let mut token = None;
        loop {
            let page = ec2
                .describe_image_references()
                .set_image_ids(Some(chunk.to_vec()))
                .set_resource_types(Some(counted()))
                .set_next_token(token.clone())
                .send()
                .await;
            let page = match page {
                Ok(p) => p,
                Err(e) if matches!(crate::errors::code(&e), Some("InvalidAction" | "UnsupportedOperation")) => {
                    return Ok(None);
                }
                Err(e) => return Err(crate::errors::sdk_error("DescribeImageReferences", e)),
            };
            for r in page.image_references() {
                let (Some(ami), Some(arn)) = (r.image_id(), r.arn()) else { continue };
                let kind = r.resource_type().map(|t| t.as_str()).unwrap_or("resource");
                out.entry(ami.to_owned()).or_default().push(describe_reference(kind, arn));
            }
            token = page.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
    Ok(Some(out))
}

/// "instance i-1", "launch template lt-2", "parameter /a/b" from an ARN.
fn describe_reference(kind: &str, arn: &str) -> String {
    let resource = arn.splitn(6, ':').nth(5).unwrap_or(arn);
    match kind {
        "ec2:Instance" => format!("instance {}", resource.trim_start_matches("instance/")),
        "ec2:LaunchTemplate" => format!("launch template {}", resource.trim_start_matches("launch-template/")),
        "ssm:Parameter" => format!("parameter {}", resource.trim_start_matches("parameter")),
        other => format!("{other} {resource}"),
    }
}

/// The kinds of reference that count as use: instances that are not
/// terminated or shutting down, launch templates (EC2 looks at their 10
/// newest versions), SSM parameters and Image Builder recipes.
fn counted() -> Vec<ResourceTypeRequest> {
    use aws_sdk_ec2::types::{ImageReferenceResourceType as Kind, ResourceTypeOption};
    let live = ResourceTypeOption::builder()
        .option_name(ImageReferenceOptionName::StateName)
        .set_option_values(Some(["pending", "running", "stopping", "stopped"].iter().map(|s| s.to_string()).collect()))
        .build();
    let mut out =
        vec![ResourceTypeRequest::builder().resource_type(Kind::Ec2Instance).resource_type_options(live).build()];
    for kind in
        [Kind::Ec2LaunchTemplate, Kind::SsmParameter, Kind::ImageBuilderImageRecipe, Kind::ImageBuilderContainerRecipe]
    {
        out.push(ResourceTypeRequest::builder().resource_type(kind).build());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_reads_as_describe_images_shows_it() {
        let img = |s: &str| Image::builder().deregistration_protection(s).build();
        assert_eq!(Protection::of(&img("disabled")), Protection::Off);
        assert_eq!(Protection::of(&Image::builder().build()), Protection::Off);
        assert_eq!(Protection::of(&img("enabled-without-cooldown")), Protection::On { cooldown: false });
        assert_eq!(Protection::of(&img("enabled-with-cooldown")), Protection::On { cooldown: true });
        let until = Protection::of(&img("disabled after 2026-12-07T10:00:00.000Z"));
        assert_eq!(until, Protection::Until("2026-12-07T10:00:00.000Z".into()));
        assert!(until.protects() && !Protection::Off.protects());
    }

    #[test]
    fn references_read_as_what_they_are() {
        assert_eq!(describe_reference("ec2:Instance", "arn:aws:ec2:eu-west-1:1:instance/i-1"), "instance i-1");
        assert_eq!(
            describe_reference("ec2:LaunchTemplate", "arn:aws:ec2:eu-west-1:1:launch-template/lt-2"),
            "launch template lt-2"
        );
        assert_eq!(describe_reference("ssm:Parameter", "arn:aws:ssm:eu-west-1:1:parameter/a/b"), "parameter /a/b");
    }
}
