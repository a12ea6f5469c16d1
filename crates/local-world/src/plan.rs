//! What world to build: accounts, regions, and world variables of its own.

use crate::ACCOUNTS;

/// What to build: `Plan::of(&["first"], &["us-east-1"])`, then world
/// variables of this world's own (over the process's) with the builder
/// methods: `.pace("aws").faults("throttle=0.2").seed(7)`.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
    /// World variables for this world only, in the order given (a later
    /// value of a name wins).
    pub variables: Vec<(String, String)>,
    /// Whether the world has an AWS Organization (see [`crate::Organization`]).
    pub organization: bool,
    /// Whether the world's imageserver keeps its images in a bucket of the
    /// world's S3 (else in a directory).
    pub images_in_s3: bool,
}

impl Plan {
    /// These accounts (profiles of [`ACCOUNTS`]) in these regions.
    pub fn of(accounts: &[&str], regions: &[&str]) -> Plan {
        Plan {
            accounts: accounts.iter().map(|s| (*s).to_owned()).collect(),
            regions: regions.iter().map(|s| (*s).to_owned()).collect(),
            variables: Vec::new(),
            organization: false,
            images_in_s3: false,
        }
    }

    /// Both accounts in `regions`.
    pub fn new(regions: &[&str]) -> Plan {
        Plan::of(&ACCOUNTS, regions)
    }

    /// This plan with world variable `name` (one of
    /// [`crate::WORLD_VARIABLES`]) set to `value` for this world only.
    #[must_use]
    pub fn with(mut self, name: &str, value: &str) -> Plan {
        self.variables.retain(|(k, _)| k != name);
        self.variables.push((name.to_owned(), value.to_owned()));
        self
    }

    /// This plan with an AWS Organization, `first` its management account.
    #[must_use]
    pub fn with_organization(mut self) -> Plan {
        self.organization = true;
        self
    }

    /// This plan with the imageserver's images in the world's S3
    /// (bucket [`crate::IMAGES_BUCKET`]).
    #[must_use]
    pub fn images_in_s3(mut self, yes: bool) -> Plan {
        self.images_in_s3 = yes;
        self
    }

    /// This plan with `LOCAL_WORLD_PACE`.
    #[must_use]
    pub fn pace(self, pace: &str) -> Plan {
        self.with("LOCAL_WORLD_PACE", pace)
    }

    /// This plan with `LOCAL_WORLD_TIME_SCALE`.
    #[must_use]
    pub fn time_scale(self, scale: f64) -> Plan {
        self.with("LOCAL_WORLD_TIME_SCALE", &scale.to_string())
    }

    /// This plan with `LOCAL_WORLD_FAULTS`.
    #[must_use]
    pub fn faults(self, faults: &str) -> Plan {
        self.with("LOCAL_WORLD_FAULTS", faults)
    }

    /// This plan with `LOCAL_WORLD_IAM` (`enforce`, the default, or `off`).
    #[must_use]
    pub fn iam(self, iam: &str) -> Plan {
        self.with("LOCAL_WORLD_IAM", iam)
    }

    /// This plan with `LOCAL_WORLD_SEED`.
    #[must_use]
    pub fn seed(self, seed: u64) -> Plan {
        self.with("LOCAL_WORLD_SEED", &seed.to_string())
    }
}
