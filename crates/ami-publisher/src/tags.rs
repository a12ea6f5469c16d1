//! Tag keys the publisher writes and searches by, and tag helpers.

use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};

/// AMI and snapshot name; volume label.
pub const NAME: &str = "Name";
/// The image stream an AMI, snapshot or unpacker volume belongs to.
pub const STREAM: &str = "ImageStream";
/// The leaf (version) of the stream behind an AMI or snapshot.
pub const LEAF: &str = "ImageLeaf";
/// The image id: hex BLAKE3 digest of the image's manifest.
pub const DIGEST: &str = "ImageDigest";
/// On a snapshot made with the EBS direct APIs: the snapshot it started
/// from, or `none` (then every block of the image was written, and one
/// that was not reads as noise).
pub const PARENT_SNAPSHOT: &str = "ImageParentSnapshot";
/// RFC 3339 UTC time after which `expire` deletes the resource.
pub const EXPIRES_AT: &str = "ExpiresAt";
/// On snapshots the publisher makes (CreateSnapshot, CopySnapshot): the
/// token of the create call that made it. EC2 takes no idempotency token
/// for these calls, so a call whose answer was lost is found by this tag
/// before it is sent again (see [`crate::retry::create_untokened`]).
pub const CREATE_TOKEN: &str = "ImageCreateToken";
/// On unpacker volumes: the instance the volume was made for.
pub const UNPACKER_INSTANCE: &str = "ImageUnpackerInstance";
/// On everything ami-publisher makes, from the call that makes it
/// (TagSpecifications): `ManagedBy=ami-fleet`. The IAM policy lets the tool
/// change or delete only what carries it (`ami-publisher iam-policy`).
pub const MANAGED_BY: &str = "ManagedBy";
/// The value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "ami-fleet";

/// How long a snapshot made by a publish that has not yet registered its AMI
/// stays before `expire` may delete it. A re-run of the publish within this
/// time reuses it; registering the AMI replaces the tag.
pub const PENDING_SNAPSHOT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// The tags of a create call: `tags`, and `ManagedBy=ami-fleet` (see
/// [`MANAGED_BY`]).
pub fn spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    made(kind, tags.iter().map(|(k, v)| tag(k, v)).collect())
}

/// [`spec`] of ready-made tags. `ManagedBy=ami-fleet` replaces any
/// `ManagedBy` among them (a copy of an image something else made is this
/// tool's to delete).
pub fn made(kind: ResourceType, mut tags: Vec<Tag>) -> TagSpecification {
    tags.retain(|t| t.key() != Some(MANAGED_BY));
    tags.push(tag(MANAGED_BY, MANAGED_BY_VALUE));
    TagSpecification::builder().resource_type(kind).set_tags(Some(tags)).build()
}

pub fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// A `tag:KEY` filter.
pub fn tag_filter(key: &str, value: &str) -> Filter {
    filter(&format!("tag:{key}"), value)
}

/// `time` as RFC 3339 UTC to the second, the form of `ExpiresAt`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Parse `K=V,K2=V2` (from `--tags`) into pairs; keys may not be empty.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}': a tag is KEY=VALUE"))?;
    if k.trim().is_empty() {
        return Err(format!("'{s}': the tag key is empty"));
    }
    if k.len() > 128 || v.len() > 256 {
        return Err(format!("'{s}': EC2 tag keys are at most 128 characters, values 256"));
    }
    if k.starts_with("aws:") {
        return Err(format!("'{s}': keys starting with aws: are reserved by AWS"));
    }
    Ok((k.trim().to_owned(), v.to_owned()))
}

/// The value of `key` among `tags`.
pub fn value<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}
