//! Property tests of manifest decoding, the first thing an untrusted
//! manifest meets: random bytes and mutated valid manifests never make it
//! panic, and whatever it accepts is internally consistent.
//!
//! The suite runs 1,000 cases per property; `PROPTEST_CASES=100000` (read
//! by proptest) runs more, as `cargo xtask bench` does.

use image_format::{ChunkRef, Digest, MAX_CHUNK_SIZE, MAX_IMAGE_BYTES, MIN_CHUNK_SIZE, Manifest, ManifestError};
use proptest::{prelude::*, strategy::ValueTree as _};

const MAGIC: &[u8; 8] = b"FLEETIMG";
const HEADER_LEN: usize = 30;

fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 1000;
    }
    config
}

/// The format, written out from its description (magic, version 1, chunk
/// size, byte size, count, then a tag and maybe a digest per chunk)
/// independently of `Manifest::encode`.
fn encode_parts(chunk_size: u32, size: u64, count: u64, chunks: &[ChunkRef]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&chunk_size.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for c in chunks {
        match c {
            ChunkRef::Zero => out.push(0),
            ChunkRef::Data(d) => {
                out.push(1);
                out.extend_from_slice(&d.0);
            }
        }
    }
    out
}

/// What every accepted manifest must satisfy.
fn check_accepted(bytes: &[u8], m: &Manifest) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.encode(), bytes, "an accepted manifest is its canonical encoding");
    prop_assert_eq!(m.image_id(), Digest::of(bytes));
    let chunk_size = m.chunk_size();
    prop_assert!(chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size));
    prop_assert!(m.size() <= MAX_IMAGE_BYTES);
    let count = m.chunks().len() as u64;
    prop_assert_eq!(count, m.size().div_ceil(u64::from(chunk_size)));
    let lengths: u64 = (0..count).map(|i| m.chunk_len(i) as u64).sum();
    prop_assert_eq!(lengths, m.size());
    let rebuilt = Manifest::new(chunk_size, m.size(), m.chunks().to_vec());
    prop_assert_eq!(rebuilt.as_ref(), Ok(m));
    Ok(())
}

fn decode_and_check(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = Manifest::decode(bytes) {
        check_accepted(bytes, &m)?;
    }
    Ok(())
}

fn chunk_ref() -> impl Strategy<Value = ChunkRef> {
    // Few distinct digests, so repeats are common.
    prop_oneof![Just(ChunkRef::Zero), (0u8..4).prop_map(|n| ChunkRef::Data(Digest([n; 32])))]
}

/// Parts of a manifest that is valid or nearly so: a chunk size near the
/// allowed ones, a size of up to 40 chunks, and a chunk list that usually
/// has the right length.
fn parts() -> impl Strategy<Value = (u32, u64, Vec<ChunkRef>)> {
    let chunk_size = prop_oneof![
        8 => (12u32..=24).prop_map(|shift| 1u32 << shift),
        1 => Just(MIN_CHUNK_SIZE / 2),
        1 => Just(MAX_CHUNK_SIZE * 2),
        1 => MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE,
    ];
    (chunk_size, 0u64..=40, any::<u32>(), -1i64..=1, 1u8..=10).prop_flat_map(|(chunk_size, full, tail, skew, p)| {
        let cs = u64::from(chunk_size);
        let size = full * cs + u64::from(tail) % cs;
        let count = size.div_ceil(cs).saturating_add_signed(if p == 1 { skew } else { 0 });
        (Just(chunk_size), Just(size), prop::collection::vec(chunk_ref(), usize::try_from(count).unwrap()))
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
    /// A header field (chunk size, size, count) set to an edge value.
    Field(usize, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let edge = prop_oneof![
        any::<u64>(),
        Just(0u64),
        Just(u64::MAX),
        Just(MAX_IMAGE_BYTES),
        Just(MAX_IMAGE_BYTES + 1),
        Just(u64::from(MIN_CHUNK_SIZE)),
        Just(u64::from(MAX_CHUNK_SIZE)),
        0u64..100,
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::SetByte(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Remove),
        (0usize..3, edge).prop_map(|(field, v)| Mutation::Field(field, v)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match *m {
        Mutation::FlipBit(at, bit) => bytes[at % len] ^= 1 << bit,
        Mutation::SetByte(at, b) => bytes[at % len] = b,
        Mutation::Truncate(at) => bytes.truncate(at % (len + 1)),
        Mutation::Insert(at, b) => bytes.insert(at % (len + 1), b),
        Mutation::Remove(at) => {
            bytes.remove(at % len);
        }
        // The chunk size field takes the value's low 4 bytes.
        Mutation::Field(0, v) => bytes[10..14].copy_from_slice(&v.to_le_bytes()[..4]),
        Mutation::Field(1, v) => bytes[14..22].copy_from_slice(&v.to_le_bytes()),
        Mutation::Field(_, v) => bytes[22..30].copy_from_slice(&v.to_le_bytes()),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        decode_and_check(&bytes)?;
    }

    /// A valid magic and version in front, so the header checks are reached.
    #[test]
    fn random_headers_and_bodies_never_panic(
        rest in prop::collection::vec(any::<u8>(), 0..200),
        body in prop::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..100),
    ) {
        let mut bytes = encode_parts(0, 0, 0, &[]);
        bytes.truncate(10);
        bytes.extend_from_slice(&rest);
        bytes.extend_from_slice(&body);
        decode_and_check(&bytes)?;
    }

    /// Decoding the format written from parts agrees with building the
    /// manifest from those parts.
    #[test]
    fn decode_agrees_with_new((chunk_size, size, chunks) in parts()) {
        let bytes = encode_parts(chunk_size, size, chunks.len() as u64, &chunks);
        let built = Manifest::new(chunk_size, size, chunks);
        let decoded = Manifest::decode(&bytes);
        prop_assert_eq!(&decoded, &built);
        if let Ok(m) = &decoded {
            check_accepted(&bytes, m)?;
        }
    }

    #[test]
    fn mutated_manifests_never_panic(
        (chunk_size, size, chunks) in parts(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = encode_parts(chunk_size, size, chunks.len() as u64, &chunks);
        for m in &mutations {
            if bytes.is_empty() {
                break;
            }
            if matches!(m, Mutation::Field(..)) && bytes.len() < HEADER_LEN {
                continue;
            }
            mutate(&mut bytes, m);
        }
        decode_and_check(&bytes)?;
    }
}

/// The generators reach both sides: many cases are accepted, many refused,
/// for each reason.
#[test]
fn the_generators_reach_every_outcome() {
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    let strategy = (parts(), prop::collection::vec(mutation(), 0..3));
    for _ in 0..5000 {
        let ((chunk_size, size, chunks), mutations) = strategy.new_tree(&mut runner).unwrap().current();
        let mut bytes = encode_parts(chunk_size, size, chunks.len() as u64, &chunks);
        for m in &mutations {
            if bytes.len() >= HEADER_LEN {
                mutate(&mut bytes, m);
            }
        }
        let outcome = match Manifest::decode(&bytes) {
            Ok(_) => "accepted",
            Err(ManifestError::Truncated(_)) => "truncated",
            Err(ManifestError::BadMagic) => "magic",
            Err(ManifestError::Version(_)) => "version",
            Err(ManifestError::ChunkSize(_)) => "chunk size",
            Err(ManifestError::TooLarge(_)) => "too large",
            Err(ManifestError::ChunkCount { .. }) => "count",
            Err(ManifestError::BadTag { .. }) => "tag",
            Err(ManifestError::ShortBody(_)) => "short",
            Err(ManifestError::Trailing(_)) => "trailing",
            Err(ManifestError::LengthConflict { .. }) => "length conflict",
            Err(_) => "other",
        };
        seen.insert(outcome);
    }
    for outcome in [
        "accepted",
        "truncated",
        "magic",
        "version",
        "chunk size",
        "too large",
        "count",
        "tag",
        "short",
        "trailing",
        "length conflict",
    ] {
        assert!(seen.contains(outcome), "no generated manifest was {outcome}: {seen:?}");
    }
}
