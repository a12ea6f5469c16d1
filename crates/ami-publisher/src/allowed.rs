//! Allowed AMIs of the accounts an AMI is shared with. An account can turn
//! on "Allowed AMIs" per region: then it sees and launches only other
//! accounts' AMIs its image criteria admit (in `audit-mode` it still sees
//! all, and DescribeImages says which would be hidden). Sharing with such
//! an account succeeds, and is of no use to it.
//!
//! Before a publish (and its plan) shares anything, each shared account
//! this run can act as (a profile, or an organization account of the
//! targets) is asked for its settings in each target's region
//! (GetAllowedImagesSettings), and the AMI to be shared is judged against
//! its criteria: `enabled` and not admitted refuses the run, before
//! anything is made; `audit-mode` and not admitted is a warning. Accounts
//! this run cannot act as are named as not checked. Organizations and OUs
//! are not checked: their accounts are not known one by one here.

use std::collections::HashMap;

use aws_sdk_ec2::types::ImageCriterion;

use crate::{aws::Aws, retry, sharing::Grantees, targets::Target, values::wildcard};

/// Whether an account's image criteria admit an AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admits {
    Yes,
    No,
    /// Only EC2 can tell, later (why).
    Depends(String),
}

/// How old an AMI is, for the criteria's age conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Age {
    /// Days since it was created (0 for one about to be made).
    pub days: f64,
    /// Days since its deprecation time, once that has passed.
    pub deprecated_days: Option<f64>,
}

impl Age {
    /// The age of an AMI that is there, as DescribeImages shows it.
    pub fn of(img: &aws_sdk_ec2::types::Image, now: std::time::SystemTime) -> Age {
        let days_since = |t: Option<&str>| {
            let t = humantime::parse_rfc3339_weak(t?.trim_end_matches('Z')).ok()?;
            Some(now.duration_since(t).ok()?.as_secs_f64() / 86400.0)
        };
        Age {
            days: days_since(img.creation_date()).unwrap_or(0.0),
            deprecated_days: days_since(img.deprecation_time()),
        }
    }
}

/// Whether `criteria` admit a new AMI owned by account `owner` and named
/// `name`, with no product codes, no watermark, not deprecated.
pub fn admits(criteria: &[ImageCriterion], owner: &str, name: &str) -> Admits {
    admits_at(criteria, owner, name, Age::default())
}

/// Whether `criteria` admit an AMI of `age`. An AMI is admitted when any
/// criterion matches it; a criterion matches when every field it sets does
/// (EC2 API reference, ImageCriterion).
pub fn admits_at(criteria: &[ImageCriterion], owner: &str, name: &str, age: Age) -> Admits {
    let mut depends = None;
    for c in criteria {
        let providers = c.image_providers();
        // `amazon`, `aws-marketplace` and `aws-backup-vault` name AMIs
        // made by AWS, `none` the account's own: none of them this one.
        if !providers.is_empty() && !providers.iter().any(|p| p == owner) {
            continue;
        }
        if !c.marketplace_product_codes().is_empty() || !c.image_watermarks().is_empty() {
            continue;
        }
        let names = c.image_names();
        if !names.is_empty() && !names.iter().any(|n| wildcard(n, name, false)) {
            continue;
        }
        if c.creation_date_condition()
            .and_then(|d| d.maximum_days_since_created())
            .is_some_and(|m| age.days > f64::from(m))
        {
            continue;
        }
        let deprecated_too_long = c.deprecation_time_condition().and_then(|d| d.maximum_days_since_deprecated());
        if let (Some(max), Some(d)) = (deprecated_too_long, age.deprecated_days)
            && d > f64::from(max)
        {
            continue;
        }
        if c.scan_result_condition().is_some() {
            depends.get_or_insert_with(|| {
                "its criterion for this owner also asks for an Amazon Inspector scan result, which only the new \
                 AMI's scan will tell"
                    .to_owned()
            });
            continue;
        }
        return Admits::Yes;
    }
    depends.map_or(Admits::No, Admits::Depends)
}

/// What one shared account's settings mean for the AMI in one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// One line for the plan and the logs.
    pub line: String,
    /// The account could neither see nor launch the AMI: the run is refused.
    pub refused: bool,
}

/// Ask every account of `shares` this run can act as for its Allowed AMIs
/// settings in `t`'s region, and judge the AMI `name` (of `age`) that
/// `t`'s account would share with it.
pub async fn check(aws: &Aws, t: &Target, name: &str, age: Age, shares: &Grantees) -> anyhow::Result<Vec<Finding>> {
    let owner = aws.account_id(&t.account).await?;
    let mut out = Vec::new();
    for account in &shares.accounts {
        if *account == owner {
            continue;
        }
        let Some(reach) = aws.reach(account).await else {
            out.push(Finding {
                line: format!(
                    "account {account}: Allowed AMIs not checked (no profile or organization account reaches it)"
                ),
                refused: false,
            });
            continue;
        };
        let ec2 = aws.ec2(&Target { account: reach.clone(), region: t.region.clone() }).await;
        let got = retry::call("GetAllowedImagesSettings", None, || ec2.get_allowed_images_settings().send()).await;
        let settings = match got {
            Ok(s) => s,
            Err(e) => {
                out.push(Finding {
                    line: format!("account {account}: Allowed AMIs not checked, as {reach}: {e:#}"),
                    refused: false,
                });
                continue;
            }
        };
        let state = settings.state().unwrap_or("disabled");
        let verdict = admits_at(settings.image_criteria(), &owner, name, age);
        let by_policy = settings.managed_by().is_some_and(|m| m.as_str() == "declarative-policy");
        let fix = if by_policy {
            format!("its organization's declarative policy must add {owner} to the image providers")
        } else {
            format!("add {owner} to its image providers (ReplaceImageCriteriaInAllowedImagesSettings)")
        };
        let region = &t.region;
        out.push(match (state, verdict) {
            ("enabled", Admits::No) => Finding {
                line: format!(
                    "account {account} has Allowed AMIs enabled in {region} and no criterion admits AMI {name} \
                     of account {owner}: it could neither see nor launch it; {fix}"
                ),
                refused: true,
            },
            ("enabled", Admits::Depends(why)) => Finding {
                line: format!("account {account} has Allowed AMIs enabled in {region}, and {why}"),
                refused: false,
            },
            ("audit-mode", Admits::No) => Finding {
                line: format!(
                    "account {account} has Allowed AMIs in audit-mode in {region} and no criterion admits AMI {name} \
                     of account {owner}: once enabled, it would hide it; {fix}"
                ),
                refused: false,
            },
            (state, _) => Finding {
                line: format!("account {account}: Allowed AMIs {state} in {region}, admitted"),
                refused: false,
            },
        });
    }
    Ok(out)
}

/// [`check`] for every target, before a publish makes anything. Err: the
/// AMI would be useless to an account it is shared with in some target,
/// one line each: the run is refused. Ok: each target's findings, for the
/// plan (warnings are logged). A target whose own account id cannot be
/// asked is not checked (a warning): its publish fails on its own calls.
pub async fn preflight(
    aws: &Aws,
    targets: &[Target],
    name: &str,
    shares: &Grantees,
    max_concurrency: usize,
) -> anyhow::Result<HashMap<Target, Vec<Finding>>> {
    if shares.accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let checked = crate::fanout(targets, max_concurrency, |t| async move {
        let r = check(aws, &t, name, Age::default(), shares).await;
        (t, r)
    })
    .await;
    let mut refused = Vec::new();
    let mut out = HashMap::new();
    for (t, r) in checked {
        let findings = match r {
            Ok(f) => f,
            Err(e) => vec![Finding { line: format!("Allowed AMIs not checked: {e:#}"), refused: false }],
        };
        for f in &findings {
            if f.refused {
                refused.push(format!("  {t}: {}", f.line));
            } else if !f.line.ends_with(", admitted") {
                tracing::warn!(target = %t, "{}", f.line);
            }
        }
        out.insert(t, findings);
    }
    if !refused.is_empty() {
        anyhow::bail!(
            "nothing was made: {} shared account(s) could not use the AMI\n{}",
            refused.len(),
            refused.join("\n")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{CreationDateCondition, ScanResultCondition};

    fn providers(p: &[&str]) -> ImageCriterion {
        ImageCriterion::builder().set_image_providers(Some(p.iter().map(|s| s.to_string()).collect())).build()
    }

    #[test]
    fn an_ami_is_admitted_when_one_criterion_matches_in_every_field_it_sets() {
        let owner = "111111111111";
        let name = "web-2026-12-06";
        assert_eq!(admits(&[], owner, name), Admits::No, "enabled with no criteria admits no one");
        assert_eq!(admits(&[providers(&["amazon", "none", "aws-marketplace"])], owner, name), Admits::No);
        assert_eq!(admits(&[providers(&["amazon"]), providers(&["222222222222", owner])], owner, name), Admits::Yes);
        let named = |n: &str| ImageCriterion::builder().image_providers(owner).image_names(n).build();
        assert_eq!(admits(&[named("web-*")], owner, name), Admits::Yes);
        assert_eq!(admits(&[named("db-*")], owner, name), Admits::No);
        assert_eq!(admits(&[named("WEB-*")], owner, name), Admits::No, "names match case and all");
        let names_only = ImageCriterion::builder().image_names("web-????-12-0?").build();
        assert_eq!(admits(&[names_only], owner, name), Admits::Yes, "a criterion without providers admits any owner");
        let coded = ImageCriterion::builder().image_providers(owner).marketplace_product_codes("abc123").build();
        assert_eq!(admits(&[coded], owner, name), Admits::No, "this AMI has no product code");
        let young = ImageCriterion::builder()
            .image_providers(owner)
            .creation_date_condition(CreationDateCondition::builder().maximum_days_since_created(1).build())
            .build();
        assert_eq!(admits(std::slice::from_ref(&young), owner, name), Admits::Yes, "a new AMI meets any age limit");
        let old = Age { days: 10.0, deprecated_days: None };
        assert_eq!(admits_at(&[young], owner, name, old), Admits::No, "one 10 days old does not");
        let fresh_deprecation = ImageCriterion::builder()
            .image_providers(owner)
            .deprecation_time_condition(
                aws_sdk_ec2::types::DeprecationTimeCondition::builder().maximum_days_since_deprecated(2).build(),
            )
            .build();
        let long_deprecated = Age { days: 30.0, deprecated_days: Some(5.0) };
        assert_eq!(admits_at(std::slice::from_ref(&fresh_deprecation), owner, name, long_deprecated), Admits::No);
        assert_eq!(
            admits_at(&[fresh_deprecation], owner, name, Age { days: 30.0, deprecated_days: None }),
            Admits::Yes
        );
        let scanned = ImageCriterion::builder()
            .image_providers(owner)
            .scan_result_condition(ScanResultCondition::builder().build())
            .build();
        assert!(matches!(admits(std::slice::from_ref(&scanned), owner, name), Admits::Depends(_)));
        assert_eq!(admits(&[scanned, providers(&[owner])], owner, name), Admits::Yes, "another criterion admits it");
    }
}
