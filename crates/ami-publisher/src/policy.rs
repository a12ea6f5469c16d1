//! `ami-publisher iam-policy`: the IAM policy that lets the publisher touch
//! only what it made. deploy/ami-publisher-iam-policy.json is its output
//! with the default options (a tidy test keeps them equal), and the local
//! world enforces that file on the publisher's calls.
//!
//! - Reads stay broad: EC2's Describe calls cannot be scoped by resource.
//! - Every create carries `ManagedBy=ami-fleet` in the same call
//!   (TagSpecifications) and the policy requires it (`aws:RequestTag`);
//!   CreateTags is allowed on a new resource only as part of the create
//!   (`ec2:CreateAction`).
//! - Every change (tags, delete, deregister, attach, detach, modify, share,
//!   start, stop, terminate) is allowed only on resources that carry
//!   `ManagedBy=ami-fleet` (`aws:ResourceTag`), and on the unpacker
//!   instances by their `Name` tag.
//!
//! Sources: EC2's "Actions, resources, and condition keys" (which resources
//! each action is authorized on) and "Grant permission to tag resources
//! during creation".

use serde_json::{Value, json};

use crate::tags::{MANAGED_BY, MANAGED_BY_VALUE};

/// The creates the publisher makes, each with its tags in the call.
const CREATES: [&str; 8] = [
    "CopyImage",
    "CopySnapshot",
    "CreateSnapshot",
    "CreateVolume",
    "ImportKeyPair",
    "RegisterImage",
    "RunInstances",
    "StartSnapshot",
];

fn ec2(actions: &[&str]) -> Vec<String> {
    actions.iter().map(|a| format!("ec2:{a}")).collect()
}

/// A statement allowing `actions` to make `resource` only with the tag.
fn created(sid: &str, actions: &[&str], resource: &str) -> Value {
    json!({
        "Sid": sid,
        "Effect": "Allow",
        "Action": ec2(actions),
        "Resource": resource,
        "Condition": { "StringEquals": { format!("aws:RequestTag/{MANAGED_BY}"): MANAGED_BY_VALUE } }
    })
}

/// What a customer managed KMS key (`--kms-key-id`) needs the caller to be
/// allowed, only through EC2 and EBS (`kms:ViaService`): EBS asks KMS on
/// the caller's behalf for a data key and a grant for each encrypted
/// volume, snapshot copy and AMI copy ("Amazon EBS encryption", permissions
/// for IAM users), and, for `--via ebs-direct`, to encrypt the blocks of a
/// snapshot started under the key or from a parent under it (the EBS user
/// guide's "Control access to EBS direct APIs using IAM" lists Encrypt,
/// Decrypt, GenerateDataKey, GenerateDataKeyWithoutPlaintext, ReEncrypt*,
/// CreateGrant and DescribeKey, with no condition). EBS documents no
/// `kms:ViaService` value for its direct APIs; this policy assumes their
/// regional endpoint's name, `ebs.REGION.amazonaws.com` (not checked
/// against AWS). An alias is matched by `kms:ResourceAliases`; the default
/// key aws/ebs needs nothing here (its key policy allows EBS's callers).
fn key_statement(key: &str) -> Value {
    let via_ec2 = json!({ "StringLike": { "kms:ViaService": ["ec2.*.amazonaws.com", "ebs.*.amazonaws.com"] } });
    let (resource, condition) = if key.starts_with("arn:aws:kms:") && key.contains(":alias/") {
        let alias = &key[key.find("alias/").unwrap_or(0)..];
        ("arn:aws:kms:*:*:key/*".to_owned(), Some(alias.to_owned()))
    } else if key.starts_with("arn:") {
        (key.to_owned(), None)
    } else if key.starts_with("alias/") {
        ("arn:aws:kms:*:*:key/*".to_owned(), Some(key.to_owned()))
    } else {
        (format!("arn:aws:kms:*:*:key/{key}"), None)
    };
    let mut condition_block = via_ec2;
    if let Some(alias) = condition {
        condition_block["ForAnyValue:StringEquals"] = json!({ "kms:ResourceAliases": alias });
    }
    json!({
        "Sid": "EncryptWithTheConfiguredKey",
        "Effect": "Allow",
        "Action": [
            "kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey",
            "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom", "kms:ReEncryptTo"
        ],
        "Resource": resource,
        "Condition": condition_block
    })
}

/// Where the publisher's role is: the unpacker instances are tagged
/// `Name=<instance_name>`, the customer managed keys are `kms_keys` (none:
/// the accounts' default keys), and accounts of `org:` targets are reached
/// through role `org_role_name` in them; the fleet's pointers are named by
/// `ssm_parameter` (None: any parameter).
pub struct PolicyFor<'a> {
    pub instance_name: &'a str,
    pub kms_keys: &'a [&'a str],
    pub org_role_name: &'a str,
    pub ssm_parameter: Option<&'a crate::pointer::Template>,
}

/// The publisher's policy (see [`PolicyFor`]). The organization statement
/// matters only where `--org-profile` runs: it lists the organization's
/// accounts and assumes the role in each.
pub fn publisher_policy(to: &PolicyFor<'_>) -> Value {
    let PolicyFor { instance_name, kms_keys, org_role_name, ssm_parameter } = *to;
    let parameters = ssm_parameter.map_or_else(|| "*".to_owned(), crate::pointer::Template::iam_pattern);
    let ours = json!({ "StringEquals": { format!("aws:ResourceTag/{MANAGED_BY}"): MANAGED_BY_VALUE } });
    let (volume, snapshot, image, instance, key_pair) = (
        "arn:aws:ec2:*:*:volume/*",
        "arn:aws:ec2:*::snapshot/*",
        "arn:aws:ec2:*::image/*",
        "arn:aws:ec2:*:*:instance/*",
        "arn:aws:ec2:*:*:key-pair/*",
    );
    let mut policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadFleetState",
                "Effect": "Allow",
                "Action": ec2(&[
                    "DescribeImageAttribute", "DescribeImages", "DescribeInstances", "DescribeKeyPairs", "DescribeRegions",
                    "DescribeSecurityGroups", "DescribeSnapshotAttribute", "DescribeSnapshots", "DescribeSubnets",
                    "DescribeTags", "DescribeVolumes", "DescribeVolumesModifications", "DescribeVpcs",
                    "DescribeImageReferences", "GetAllowedImagesSettings", "GetEbsDefaultKmsKeyId",
                ]),
                "Resource": "*"
            },
            {
                // DescribeImageReferences looks through these with the
                // caller's own rights (the AWS managed policy
                // AmazonEC2ImageReferencesAccessPolicy exists for it): read
                // only, so that no reference is missed for want of a right.
                "Sid": "LetEc2FindWhatReferencesAnImage",
                "Effect": "Allow",
                "Action": [
                    "ec2:DescribeLaunchTemplateVersions", "ec2:DescribeLaunchTemplates",
                    "imagebuilder:GetContainerRecipe", "imagebuilder:GetImageRecipe",
                    "imagebuilder:ListContainerRecipes", "imagebuilder:ListImageRecipes",
                    "ssm:DescribeParameters", "ssm:GetParameters"
                ],
                "Resource": "*"
            },
            {
                // Each target's key is checked before anything is made:
                // what it is, and whom its policy lets use it.
                "Sid": "CheckTheKeys",
                "Effect": "Allow",
                "Action": ["kms:DescribeKey", "kms:GetKeyPolicy"],
                "Resource": "arn:aws:kms:*:*:key/*"
            },
            // Each create on the kind it makes only: the request's tags are
            // in the context of every resource a call names, so a create
            // allowed on "volume/*" would let CreateSnapshot read any volume.
            created("CreateTaggedVolumes", &["CreateVolume"], volume),
            created("CreateTaggedSnapshots", &["CopySnapshot", "CreateSnapshot"], snapshot),
            created("CreateTaggedImages", &["CopyImage", "RegisterImage"], image),
            created("LaunchTaggedInstances", &["RunInstances"], instance),
            created("ImportTaggedKeyPairs", &["ImportKeyPair"], key_pair),
            {
                // publish --via ebs-direct: a snapshot started with the tag
                // in the call, then written and completed only while it
                // carries it.
                "Sid": "StartTaggedSnapshotsDirectly",
                "Effect": "Allow",
                "Action": ["ebs:StartSnapshot"],
                "Resource": snapshot,
                "Condition": { "StringEquals": { format!("aws:RequestTag/{MANAGED_BY}"): MANAGED_BY_VALUE } }
            },
            {
                "Sid": "WriteOnlySnapshotsItMade",
                "Effect": "Allow",
                "Action": ["ebs:CompleteSnapshot", "ebs:PutSnapshotBlock"],
                "Resource": snapshot,
                "Condition": ours
            },
            {
                // `verify` and `publish --verify`: the blocks of snapshots
                // it made, read back.
                "Sid": "ReadOnlySnapshotsItMade",
                "Effect": "Allow",
                "Action": ["ebs:GetSnapshotBlock", "ebs:ListChangedBlocks", "ebs:ListSnapshotBlocks"],
                "Resource": snapshot,
                "Condition": ours
            },
            {
                "Sid": "TagOnlyWhileCreating",
                "Effect": "Allow",
                "Action": ec2(&["CreateTags"]),
                "Resource": [volume, snapshot, image, instance, key_pair],
                "Condition": { "StringEquals": { "ec2:CreateAction": CREATES } }
            },
            {
                "Sid": "ChangeOnlyWhatItMade",
                "Effect": "Allow",
                "Action": ec2(&[
                    "AttachVolume", "CreateSnapshot", "CreateTags", "DeleteSnapshot", "DeleteTags", "DeleteVolume",
                    "DeregisterImage", "DetachVolume", "ModifyImageAttribute", "ModifySnapshotAttribute", "ModifyVolume",
                    "RegisterImage",
                    "DisableImage", "DisableImageDeprecation", "DisableImageDeregistrationProtection", "EnableImage",
                    "EnableImageDeprecation", "EnableImageDeregistrationProtection",
                    "StartInstances", "StopInstances", "TerminateInstances",
                ]),
                "Resource": [volume, snapshot, image, instance],
                "Condition": ours
            },
            {
                "Sid": "DriveTheUnpackers",
                "Effect": "Allow",
                "Action": ec2(&[
                    "AttachVolume", "CreateTags", "DeleteTags", "DetachVolume", "StartInstances", "StopInstances",
                ]),
                "Resource": instance,
                "Condition": { "StringEquals": { "aws:ResourceTag/Name": instance_name } }
            },
            {
                "Sid": "LaunchFromAnyImageIntoTheNetwork",
                "Effect": "Allow",
                "Action": ec2(&["RunInstances"]),
                "Resource": [
                    image,
                    "arn:aws:ec2:*:*:subnet/*",
                    "arn:aws:ec2:*:*:security-group/*",
                    "arn:aws:ec2:*:*:network-interface/*",
                    volume,
                    key_pair
                ]
            },
            {
                "Sid": "ListTheOrganizationsAccounts",
                "Effect": "Allow",
                "Action": [
                    "organizations:ListAccounts", "organizations:ListAccountsForParent",
                    "organizations:ListOrganizationalUnitsForParent"
                ],
                "Resource": "*"
            },
            {
                "Sid": "ReachTheOrganizationsAccounts",
                "Effect": "Allow",
                "Action": ["sts:AssumeRole"],
                "Resource": format!("arn:aws:iam::*:role/{org_role_name}")
            },
            {
                // The fleet's pointer: read, moved, labelled; nothing else.
                "Sid": "MoveTheFleetsPointer",
                "Effect": "Allow",
                "Action": [
                    "ssm:GetParameter", "ssm:GetParameterHistory", "ssm:LabelParameterVersion", "ssm:PutParameter",
                    "ssm:UnlabelParameterVersion"
                ],
                "Resource": format!("arn:aws:ssm:*:*:parameter{parameters}")
            },
            {
                "Sid": "PassTheUnpackerRole",
                "Effect": "Allow",
                "Action": ["iam:PassRole"],
                "Resource": "arn:aws:iam::*:role/ImageUnpacker",
                "Condition": { "StringEquals": { "iam:PassedToService": "ec2.amazonaws.com" } }
            }
        ]
    });
    if let Some(statements) = policy["Statement"].as_array_mut() {
        for (i, key) in kms_keys.iter().enumerate() {
            let mut s = key_statement(key);
            if i > 0 {
                s["Sid"] = json!(format!("EncryptWithTheConfiguredKey{}", i + 1));
            }
            statements.push(s);
        }
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_is_the_default_output() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/ami-publisher-iam-policy.json");
        let shipped: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            shipped,
            publisher_policy(&PolicyFor {
                instance_name: "ImageUnpacker",
                kms_keys: &[],
                org_role_name: "OrganizationAccountAccessRole",
                ssm_parameter: None,
            }),
            "deploy/ami-publisher-iam-policy.json is `ami-publisher iam-policy` (write it again from that)"
        );
    }

    #[test]
    fn a_configured_key_is_allowed_only_through_ec2() {
        let statement = |key: &str| {
            let p = publisher_policy(&PolicyFor {
                instance_name: "U",
                kms_keys: &[key],
                org_role_name: "R",
                ssm_parameter: None,
            });
            p["Statement"].as_array().unwrap().last().unwrap().clone()
        };
        let arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let s = statement(arn);
        assert_eq!(s["Resource"], arn);
        assert_eq!(
            s["Condition"]["StringLike"]["kms:ViaService"],
            json!(["ec2.*.amazonaws.com", "ebs.*.amazonaws.com"])
        );
        assert!(s["Condition"].get("ForAnyValue:StringEquals").is_none());
        let s = statement("alias/images");
        assert_eq!(s["Resource"], "arn:aws:kms:*:*:key/*");
        assert_eq!(s["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"], "alias/images");
        let s = statement("arn:aws:kms:eu-west-1:123456789012:alias/images");
        assert_eq!(s["Condition"]["ForAnyValue:StringEquals"]["kms:ResourceAliases"], "alias/images");
        assert_eq!(statement("1234abcd")["Resource"], "arn:aws:kms:*:*:key/1234abcd");
        assert!(
            publisher_policy(&PolicyFor { instance_name: "U", kms_keys: &[], org_role_name: "R", ssm_parameter: None })
                ["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["Sid"] != "EncryptWithTheConfiguredKey")
        );
    }
}
