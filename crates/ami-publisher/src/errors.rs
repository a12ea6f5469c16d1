//! What an EC2 error answer means: its code, whether it says an id is
//! unknown, that EC2 refused for its rate, or that the call may or may not
//! have acted; and how it reads in a message. Below [`crate::aws`] (which
//! builds the clients) and [`crate::retry`] (which acts on these).

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

/// EC2 error codes that say an id does not exist (or not yet, when fresh).
const NOT_FOUND: &[&str] = &[
    "InvalidVolume.NotFound",
    "InvalidSnapshot.NotFound",
    "InvalidAMIID.NotFound",
    "InvalidInstanceID.NotFound",
    "InvalidAttachment.NotFound",
];

/// Error codes by which EC2 refuses a call for its rate, without acting.
const THROTTLED: &[&str] =
    &["RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled", "RequestThrottledException"];

/// Error codes of a failure on EC2's side: the call may or may not have acted.
const SERVER_FAULT: &[&str] = &["InternalError", "InternalFailure", "Unavailable", "ServiceUnavailable"];

/// A failed SDK call.
pub type Failed<E> = SdkError<E>;

/// The EC2 error code of a failed call.
pub fn code<E: ProvideErrorMetadata>(e: &Failed<E>) -> Option<&str> {
    e.as_service_error().and_then(ProvideErrorMetadata::code)
}

/// Whether the call failed because one of the ids it names does not exist.
pub fn is_not_found<E: ProvideErrorMetadata>(e: &Failed<E>) -> bool {
    code(e).is_some_and(|c| NOT_FOUND.contains(&c))
}

/// Whether EC2 refused the call for its rate (nothing was done).
pub fn is_throttled<E: ProvideErrorMetadata>(e: &Failed<E>) -> bool {
    code(e).is_some_and(|c| THROTTLED.contains(&c))
}

/// Whether the call failed in a way that may not last (throttling, a
/// server fault, a timeout, a lost connection).
pub fn is_transient<E: ProvideErrorMetadata>(e: &Failed<E>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        SdkError::ServiceError(s) => {
            is_throttled(e) || s.raw().status().is_server_error() || code(e).is_some_and(|c| SERVER_FAULT.contains(&c))
        }
        _ => false,
    }
}

/// Context for the result of an SDK call.
pub trait SdkResultExt<T> {
    /// Its error as one line naming what was asked ([`sdk_error`]).
    fn sdk(self, what: impl std::fmt::Display) -> anyhow::Result<T>;
    /// As [`SdkResultExt::sdk`], but an error with one of `codes` is a fine
    /// answer: `Ok(None)` (a delete of what is already gone, a duplicate
    /// that is already there).
    fn or_code(self, codes: &[&str], what: impl std::fmt::Display) -> anyhow::Result<Option<T>>;
}

impl<T, E> SdkResultExt<T> for Result<T, aws_sdk_ec2::error::SdkError<E>>
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    fn sdk(self, what: impl std::fmt::Display) -> anyhow::Result<T> {
        self.map_err(|e| sdk_error(&what.to_string(), e))
    }

    fn or_code(self, codes: &[&str], what: impl std::fmt::Display) -> anyhow::Result<Option<T>> {
        match self {
            Ok(t) => Ok(Some(t)),
            Err(e) if code(&e).is_some_and(|c| codes.contains(&c)) => Ok(None),
            Err(e) => Err(sdk_error(&what.to_string(), e)),
        }
    }
}

/// The error of an SDK call as one line: code, message, and what was asked.
pub fn sdk_error<E, R>(what: &str, e: aws_sdk_ec2::error::SdkError<E, R>) -> anyhow::Error
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    anyhow::anyhow!("{what}: {}", sdk_detail(&e))
}

/// The error of an SDK call as one line: its code and message, or what
/// went wrong on the way.
pub fn sdk_detail<E, R>(e: &aws_sdk_ec2::error::SdkError<E, R>) -> String
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match e.as_service_error() {
        Some(s) => {
            let code = s.code().unwrap_or("error");
            format!("{code}: {}{}", s.message().unwrap_or(""), hint(code))
        }
        None => fleet_tls::dial::error_chain(e),
    }
}

/// What a user can do about an EC2 error code that says little by itself.
fn hint(code: &str) -> &'static str {
    if code == "UnauthorizedOperation" {
        // EC2's own message is encoded (sts:DecodeAuthorizationMessage).
        " (the IAM policy this tool ships, `ami-publisher iam-policy`, lets it change only resources tagged \
         ManagedBy=ami-fleet, which ami-publisher puts on everything it makes, and the unpacker instances by \
         their Name tag: a resource without that tag was not made by ami-publisher; if it was made by an \
         older version, tag it ManagedBy=ami-fleet)"
    } else if code.starts_with("Insufficient") && code.ends_with("Capacity") {
        // A server error the SDK retried: the shortage outlasted them.
        " (EC2 is short of capacity in this Availability Zone now; publish again later, \
         or use an unpacker instance in another zone)"
    } else {
        ""
    }
}

/// The first EC2 resource id (`ami-`, `snap-`, `vol-`, `i-` and hex) in
/// `text`.
fn resource_id_in(text: &str) -> Option<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).find(|w| {
        ["ami-", "snap-", "vol-", "i-"]
            .iter()
            .any(|p| w.strip_prefix(p).is_some_and(|hex| hex.len() >= 8 && hex.chars().all(|c| c.is_ascii_hexdigit())))
    })
}

/// For a target that failed with `UnauthorizedOperation`: the likely cause,
/// from the tags of the first resource the error names (DescribeTags, which
/// the policy allows everywhere): it does not carry `ManagedBy=ami-fleet`
/// (not made by ami-publisher), carries another `ManagedBy`, or carries
/// ours (then the policy in use is not the one the tool prints).
pub async fn unauthorized_cause(ec2: &aws_sdk_ec2::Client, error: &str) -> Option<String> {
    if !error.contains("UnauthorizedOperation") {
        return None;
    }
    let id = resource_id_in(error)?;
    let out = ec2.describe_tags().filters(crate::tags::filter("resource-id", id)).send().await.ok()?;
    let managed = out.tags().iter().find(|t| t.key() == Some(crate::tags::MANAGED_BY)).and_then(|t| t.value());
    Some(match managed {
        Some(crate::tags::MANAGED_BY_VALUE) => format!(
            "{id} carries ManagedBy=ami-fleet, so the IAM policy in use is not the one `ami-publisher iam-policy` \
             prints for these options"
        ),
        Some(other) => format!("{id} carries ManagedBy={other}: another tool made it, not ami-publisher"),
        None => format!("{id} does not carry the tag ManagedBy=ami-fleet: it was not made by ami-publisher"),
    })
}

#[cfg(test)]
mod cause_tests {
    use super::resource_id_in;

    #[test]
    fn the_first_resource_id_of_a_message_is_found() {
        assert_eq!(resource_id_in("DeregisterImage ami-0123abcd: Unauthorized"), Some("ami-0123abcd"));
        assert_eq!(
            resource_id_in("on resource: arn:aws:ec2:us-east-1::snapshot/snap-0123456789abcdef0 because"),
            Some("snap-0123456789abcdef0")
        );
        assert_eq!(resource_id_in("instance/i-0aa11bb22cc33dd44."), Some("i-0aa11bb22cc33dd44"));
        assert_eq!(resource_id_in("ami-fleet and vol-xyz and i-12"), None);
    }
}
