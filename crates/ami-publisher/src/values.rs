//! The closed sets of values the command line takes, checked when it is
//! parsed: a wrong value exits 2 naming the flag and the values it takes,
//! before any AWS call (never at RegisterImage, after a snapshot exists).
//! Each converts to the AWS SDK's own type only where a request is built.
//! Also [`wildcard`]: the `*`/`?` patterns of IAM actions and EC2 names.

use aws_sdk_ec2::types::{ArchitectureValues, BootModeValues, ImdsSupportValues, TpmSupportValues, VolumeType};
use clap::ValueEnum;

/// The AMI's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Architecture {
    #[value(name = "x86_64")]
    X86_64,
    Arm64,
    I386,
}

impl Architecture {
    pub fn sdk(self) -> ArchitectureValues {
        match self {
            Architecture::X86_64 => ArchitectureValues::X8664,
            Architecture::Arm64 => ArchitectureValues::Arm64,
            Architecture::I386 => ArchitectureValues::I386,
        }
    }
}

/// The AMI's boot mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootMode {
    LegacyBios,
    Uefi,
    UefiPreferred,
}

impl BootMode {
    pub fn sdk(self) -> BootModeValues {
        match self {
            BootMode::LegacyBios => BootModeValues::LegacyBios,
            BootMode::Uefi => BootModeValues::Uefi,
            BootMode::UefiPreferred => BootModeValues::UefiPreferred,
        }
    }
}

/// Whether instances of the AMI must use IMDSv2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Imds {
    /// Require IMDSv2 (session tokens).
    #[value(name = "v2.0")]
    V2,
    /// Leave EC2's default.
    None,
}

impl Imds {
    pub fn sdk(self) -> Option<ImdsSupportValues> {
        match self {
            Imds::V2 => Some(ImdsSupportValues::V20),
            Imds::None => None,
        }
    }
}

/// NitroTPM support of the AMI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tpm {
    /// TPM 2.0 (needs UEFI boot).
    #[value(name = "v2.0")]
    V2,
}

impl Tpm {
    pub fn sdk(self) -> TpmSupportValues {
        match self {
            Tpm::V2 => TpmSupportValues::V20,
        }
    }
}

/// How `publish` makes a leaf's snapshot in a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// The target's image-unpacker brings the stream's volume to the leaf
    /// (writing only what changed), and the volume is snapshotted.
    Unpacker,
    /// The EBS direct APIs: a snapshot started from the newest snapshot of
    /// an earlier leaf of the stream there, given only the blocks that
    /// differ. No instance or volume is needed (the image's chunks must be
    /// 512 KiB, EBS's block size).
    EbsDirect,
}

/// EBS types a stream's volume and an AMI's root volume can have: the boot
/// volume types that need no provisioned IOPS (io1 and io2 do, and the
/// publisher sets none; st1 and sc1 cannot boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EbsType {
    Gp3,
    Gp2,
    /// Previous-generation magnetic.
    Standard,
}

impl EbsType {
    pub fn sdk(self) -> VolumeType {
        match self {
            EbsType::Gp3 => VolumeType::Gp3,
            EbsType::Gp2 => VolumeType::Gp2,
            EbsType::Standard => VolumeType::Standard,
        }
    }
}

/// Whether `value` matches `pattern`, where `*` stands for any run of
/// characters and `?` for one, as IAM actions and EC2 image names are
/// written; `fold_case`: ASCII letters match either case (IAM actions do,
/// EC2 names do not).
pub fn wildcard(pattern: &str, value: &str, fold_case: bool) -> bool {
    let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
    let same = |a: char, b: char| a == b || (fold_case && a.eq_ignore_ascii_case(&b));
    // Greedy, going back to the last `*` on a mismatch: linear in practice.
    let (mut pi, mut vi) = (0, 0);
    let mut last_star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == '*' {
            last_star = Some((pi, vi));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || same(p[pi], v[vi])) {
            pi += 1;
            vi += 1;
        } else if let Some((star, from)) = last_star {
            pi = star + 1;
            vi = from + 1;
            last_star = Some((star, from + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names on the command line are EC2's own names for the values.
    #[test]
    fn command_line_names_are_ec2_names() {
        for a in Architecture::value_variants() {
            assert_eq!(a.to_possible_value().unwrap().get_name(), a.sdk().as_str());
        }
        for b in BootMode::value_variants() {
            assert_eq!(b.to_possible_value().unwrap().get_name(), b.sdk().as_str());
        }
        for t in EbsType::value_variants() {
            assert_eq!(t.to_possible_value().unwrap().get_name(), t.sdk().as_str());
        }
        assert_eq!(Imds::V2.sdk().unwrap().as_str(), "v2.0");
        assert_eq!(Imds::None.sdk(), None);
        for t in Tpm::value_variants() {
            assert_eq!(t.to_possible_value().unwrap().get_name(), t.sdk().as_str());
        }
    }

    #[test]
    fn wildcards_match_as_aws_writes_them() {
        assert!(wildcard("kms:*", "kms:Decrypt", true));
        assert!(wildcard("KMS:decrypt", "kms:Decrypt", true));
        assert!(!wildcard("KMS:decrypt", "kms:Decrypt", false));
        assert!(wildcard("web-?-*", "web-1-2026", false));
        assert!(!wildcard("web-?-*", "web-12-2026", false));
        assert!(wildcard("*a*b", "xaxxab", false));
        assert!(!wildcard("*a*b", "xaxxa", false));
        assert!(wildcard("[x] *", "[x] 1", false), "brackets stand for themselves");
        assert!(!wildcard("[x] *", "x 1", false));
        assert!(wildcard("", "", false) && !wildcard("", "a", false) && wildcard("*", "", false));
        assert!(!wildcard(&"*a".repeat(40), &"a".repeat(39), false));
    }
}
