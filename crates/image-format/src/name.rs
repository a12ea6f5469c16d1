//! Stream and leaf names.
//!
//! A stream is a `/`-separated path (`base/debian-12`); a leaf is one name
//! within it (`2026.11.23.1`); an image is `STREAM/LEAF`. Every component is
//! 1 to 128 characters of `A-Z a-z 0-9 . _ + -`, starting with a letter or
//! digit, so `..`, absolute paths and hidden files cannot be named.

use std::fmt;

const MAX_COMPONENT: usize = 128;
const MAX_COMPONENTS: usize = 16;
const MAX_NAME: usize = 512;

/// A bad stream, leaf or image name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name '{name}': {why}")]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

fn check_component(what: &'static str, whole: &str, c: &str) -> Result<(), NameError> {
    let err = |why| NameError { what, name: whole.chars().take(100).collect(), why };
    if c.is_empty() {
        return Err(err("empty component (leading, trailing or doubled '/')"));
    }
    if c.len() > MAX_COMPONENT {
        return Err(err("a component is longer than 128 characters"));
    }
    if !c.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(err("each component must start with a letter or digit"));
    }
    if !c.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)) {
        return Err(err("only letters, digits and . _ + - are allowed"));
    }
    Ok(())
}

/// Check a stream name.
pub fn validate_stream(stream: &str) -> Result<(), NameError> {
    if stream.len() > MAX_NAME {
        return Err(NameError {
            what: "stream",
            name: stream.chars().take(100).collect(),
            why: "longer than 512 bytes",
        });
    }
    if stream.split('/').count() > MAX_COMPONENTS {
        return Err(NameError { what: "stream", name: stream.to_owned(), why: "more than 16 components" });
    }
    stream.split('/').try_for_each(|c| check_component("stream", stream, c))
}

/// Check a leaf name.
pub fn validate_leaf(leaf: &str) -> Result<(), NameError> {
    check_component("leaf", leaf, leaf)
}

/// A validated `STREAM/LEAF`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageName {
    stream: String,
    leaf: String,
}

impl ImageName {
    pub fn new(stream: &str, leaf: &str) -> Result<ImageName, NameError> {
        validate_stream(stream)?;
        validate_leaf(leaf)?;
        Ok(ImageName { stream: stream.to_owned(), leaf: leaf.to_owned() })
    }

    /// Split `STREAM/LEAF` at the last `/`.
    pub fn parse(full: &str) -> Result<ImageName, NameError> {
        let (stream, leaf) = full.rsplit_once('/').ok_or(NameError {
            what: "image",
            name: full.chars().take(100).collect(),
            why: "expected STREAM/LEAF",
        })?;
        ImageName::new(stream, leaf)
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn leaf(&self) -> &str {
        &self.leaf
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stream, self.leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_parse() {
        let n = ImageName::parse("base/debian-12/2026.11.23.1").unwrap();
        assert_eq!(n.stream(), "base/debian-12");
        assert_eq!(n.leaf(), "2026.11.23.1");
        assert_eq!(n.to_string(), "base/debian-12/2026.11.23.1");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        for bad in ["../etc/passwd", "/abs/leaf", "a//b", "a/.hidden", "a/b c", "leafonly", "a/", "a/_x"] {
            let e = ImageName::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid"), "{bad}: {e}");
        }
        assert!(validate_stream(&"a/".repeat(20)).is_err());
        assert!(validate_leaf(&"x".repeat(129)).is_err());
        assert!(validate_stream("base/debian-12").is_ok());
    }
}
