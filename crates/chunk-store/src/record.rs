//! Image records: the file `images/STREAM/_leaves/LEAF` that makes a leaf
//! committed.
//!
//! Format 2 (written since records became self-checking):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `FLEETRC2` |
//! | 8 | commit time, ms since the Unix epoch, little-endian |
//! | 2 | length N of the image name, little-endian |
//! | N | the image name `STREAM/LEAF` it was committed as |
//! | 32 | the image id (BLAKE3 of the manifest) |
//! | rest − 32 | the canonical manifest |
//! | 32 | BLAKE3 of every byte before it |
//!
//! A reader checks, in this order and each on its own: the trailing
//! checksum (any flipped bit anywhere), the name (a record copied or renamed
//! to another leaf), the manifest's validity, and that the manifest's digest
//! is the recorded image id. Format 1 (`FLEETREC`, time + manifest, no check)
//! is only read to upgrade it when a store is opened.

use image_format::{Digest, ImageName, Manifest, ManifestError};

const MAGIC_V1: &[u8; 8] = b"FLEETREC";
const MAGIC_V2: &[u8; 8] = b"FLEETRC2";
const SUM_LEN: usize = 32;
/// Magic, time, name length, image id, checksum.
const FIXED_LEN: usize = 8 + 8 + 2 + 32 + SUM_LEN;

/// Why a record cannot be trusted. Each names the first check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{0} bytes, too short for a record")]
    Truncated(usize),
    #[error("not an image record (bad magic)")]
    BadMagic,
    #[error("checksum does not match its contents (the file was altered or damaged)")]
    Checksum,
    #[error("the name stored in it is malformed")]
    BadName,
    #[error("it was committed as {recorded}, not as this leaf")]
    WrongName { recorded: String },
    #[error("its manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
    #[error("its manifest has id {computed} but the record says {recorded}")]
    IdMismatch { recorded: Digest, computed: Digest },
    #[error("format 1 record (no checksum) that was not upgraded: {0}")]
    Legacy(String),
}

/// A record's contents once every check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) committed_ms: u64,
    pub(crate) image_id: Digest,
    pub(crate) manifest: Manifest,
}

/// Encode a format 2 record.
pub fn encode(name: &ImageName, committed_ms: u64, manifest: &Manifest) -> Vec<u8> {
    let name = name.to_string();
    let name_len = u16::try_from(name.len()).expect("image names are far shorter than 64 KiB");
    let m = manifest.encode();
    let mut out = Vec::with_capacity(FIXED_LEN + name.len() + m.len());
    out.extend_from_slice(MAGIC_V2);
    out.extend_from_slice(&committed_ms.to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&Digest::of(&m).0);
    out.extend_from_slice(&m);
    let sum = Digest::of(&out);
    out.extend_from_slice(&sum.0);
    out
}

/// Decode and check a format 2 record found at `name`'s path.
pub(crate) fn decode(name: &ImageName, bytes: &[u8]) -> Result<Record, RecordError> {
    if bytes.starts_with(MAGIC_V1) {
        return Err(RecordError::Legacy("it is checked and upgraded when the store is opened".into()));
    }
    if bytes.len() < FIXED_LEN {
        return Err(RecordError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC_V2 {
        return Err(RecordError::BadMagic);
    }
    let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if Digest::of(body).0 != sum {
        return Err(RecordError::Checksum);
    }
    let committed_ms = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let name_len = usize::from(u16::from_le_bytes([body[16], body[17]]));
    let rest = &body[18..];
    if rest.len() < name_len + 32 {
        return Err(RecordError::BadName);
    }
    let (recorded_name, rest) = rest.split_at(name_len);
    let recorded_name = std::str::from_utf8(recorded_name).map_err(|_| RecordError::BadName)?;
    if recorded_name != name.to_string() {
        return Err(RecordError::WrongName { recorded: recorded_name.chars().take(300).collect() });
    }
    let (id, manifest) = rest.split_at(32);
    let recorded = Digest::from_slice(id).expect("32 bytes");
    let manifest = Manifest::decode(manifest)?;
    let computed = manifest.image_id();
    if computed != recorded {
        return Err(RecordError::IdMismatch { recorded, computed });
    }
    Ok(Record { committed_ms, image_id: computed, manifest })
}

/// Read a format 1 record (commit time, manifest) for upgrading. `None` when
/// the bytes are not a format 1 record.
pub(crate) fn decode_legacy(bytes: &[u8]) -> Option<Result<(u64, Manifest), RecordError>> {
    if !bytes.starts_with(MAGIC_V1) {
        return None;
    }
    if bytes.len() < 16 {
        return Some(Err(RecordError::Truncated(bytes.len())));
    }
    let ms = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    Some(Manifest::decode(&bytes[16..]).map(|m| (ms, m)).map_err(RecordError::Manifest))
}

#[cfg(test)]
mod tests {
    use image_format::ChunkRef;

    use super::*;

    fn manifest() -> Manifest {
        let chunks = vec![ChunkRef::Data(Digest([1; 32])), ChunkRef::Zero, ChunkRef::Data(Digest([2; 32]))];
        Manifest::new(4096, 2 * 4096 + 100, chunks).unwrap()
    }

    fn name() -> ImageName {
        ImageName::parse("base/os/1").unwrap()
    }

    /// Replace the trailing checksum so that only the later checks can catch
    /// what a test altered.
    fn reseal(bytes: &mut Vec<u8>) {
        bytes.truncate(bytes.len() - SUM_LEN);
        let sum = Digest::of(bytes);
        bytes.extend_from_slice(&sum.0);
    }

    #[test]
    fn round_trips() {
        let m = manifest();
        let r = decode(&name(), &encode(&name(), 1234, &m)).unwrap();
        assert_eq!(r, Record { committed_ms: 1234, image_id: m.image_id(), manifest: m });
    }

    #[test]
    fn a_flipped_bit_in_any_byte_is_refused() {
        let good = encode(&name(), 1234, &manifest());
        for i in 0..good.len() {
            for bit in [0, 7] {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                let err = decode(&name(), &bad).expect_err(&format!("byte {i} bit {bit} flipped was accepted"));
                let want = if i < 8 { RecordError::BadMagic } else { RecordError::Checksum };
                assert_eq!(err, want, "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn a_record_under_another_leaf_is_refused() {
        let good = encode(&name(), 1234, &manifest());
        let other = ImageName::parse("base/os/2").unwrap();
        assert_eq!(decode(&other, &good), Err(RecordError::WrongName { recorded: "base/os/1".into() }));
        // A name length pointing past the end is malformed, not a panic.
        let mut bad = good.clone();
        bad[16..18].copy_from_slice(&u16::MAX.to_le_bytes());
        reseal(&mut bad);
        assert_eq!(decode(&name(), &bad), Err(RecordError::BadName));
    }

    #[test]
    fn the_image_id_is_checked_on_its_own() {
        // The size field of the manifest changes (one bit, still a valid
        // manifest) and the checksum is made to match: the recorded id
        // still catches it.
        let good = encode(&name(), 1234, &manifest());
        let size_at = FIXED_LEN - SUM_LEN + "base/os/1".len() + 14;
        let mut bad = good.clone();
        bad[size_at] ^= 1;
        reseal(&mut bad);
        let err = decode(&name(), &bad).unwrap_err();
        assert!(matches!(err, RecordError::IdMismatch { recorded, .. } if recorded == manifest().image_id()), "{err}");
        // A flipped bit inside a chunk digest, resealed, likewise.
        let mut bad = good.clone();
        let last = bad.len() - SUM_LEN - 1;
        bad[last] ^= 0x10;
        reseal(&mut bad);
        assert!(matches!(decode(&name(), &bad), Err(RecordError::IdMismatch { .. })));
    }

    #[test]
    fn the_manifest_is_validated_on_its_own() {
        let good = encode(&name(), 1234, &manifest());
        let mut bad = good.clone();
        // An unknown chunk tag, resealed.
        let first_tag = FIXED_LEN - SUM_LEN + "base/os/1".len() + 30;
        bad[first_tag] = 9;
        reseal(&mut bad);
        assert!(matches!(decode(&name(), &bad), Err(RecordError::Manifest(ManifestError::BadTag { .. }))));
    }

    /// Random damage (flips, cuts, extensions, random bytes) is never
    /// accepted and never panics: whatever decodes re-encodes to the very
    /// bytes it came from. `RECORD_CASES` raises the count (the benchmark
    /// runs 100,000).
    #[test]
    fn random_damage_never_passes_or_panics() {
        let cases: u64 = std::env::var("RECORD_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        let good = encode(&name(), 1234, &manifest());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for _ in 0..cases {
            let mut b = good.clone();
            match next() % 4 {
                0 => {
                    let i = usize::try_from(next() % b.len() as u64).unwrap();
                    b[i] ^= 1 << (next() % 8);
                }
                1 => b.truncate(usize::try_from(next() % b.len() as u64).unwrap()),
                2 => b.extend((0..next() % 40).map(|_| next().to_le_bytes()[0])),
                _ => b = (0..next() % 200).map(|_| next().to_le_bytes()[0]).collect(),
            }
            if let Ok(r) = decode(&name(), &b) {
                assert_eq!(encode(&name(), r.committed_ms, &r.manifest), b, "accepted bytes are canonical");
                accepted += 1;
            }
        }
        // Extending by zero bytes is the only mutation that can leave the
        // record intact.
        assert!(accepted < cases / 10, "{accepted} of {cases} mutations accepted");
    }

    #[test]
    fn short_and_legacy_records_are_named() {
        let good = encode(&name(), 1234, &manifest());
        assert_eq!(decode(&name(), &good[..FIXED_LEN - 1]), Err(RecordError::Truncated(FIXED_LEN - 1)));
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&99u64.to_le_bytes());
        v1.extend_from_slice(&manifest().encode());
        assert!(matches!(decode(&name(), &v1), Err(RecordError::Legacy(_))));
        assert_eq!(decode_legacy(&v1), Some(Ok((99, manifest()))));
        assert_eq!(decode_legacy(&good), None);
        assert_eq!(decode_legacy(&v1[..12]), Some(Err(RecordError::Truncated(12))));
    }
}
