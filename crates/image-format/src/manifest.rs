//! Manifests: canonical encoding, validation, image ids and diffs.

use std::fmt;

use crate::{MAX_CHUNK_SIZE, MAX_IMAGE_BYTES, MIN_CHUNK_SIZE};

const MAGIC: &[u8; 8] = b"FLEETIMG";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 4 + 8 + 8;
const TAG_ZERO: u8 = 0;
const TAG_DATA: u8 = 1;

/// A BLAKE3 digest of a chunk's plain bytes or of a manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Digest, ManifestError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ManifestError::BadDigest(s.chars().take(80).collect()))?;
        Ok(Digest(out))
    }

    /// From raw bytes off the wire: exactly 32 of them.
    pub fn from_slice(b: &[u8]) -> Result<Digest, ManifestError> {
        <[u8; 32]>::try_from(b).map(Digest).map_err(|_| ManifestError::BadDigest(format!("{} bytes, want 32", b.len())))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

/// What one chunk of the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkRef {
    /// Every byte is zero: never stored, sent or written to a fresh volume.
    Zero,
    /// Plain bytes with this digest.
    Data(Digest),
}

/// Problems with a manifest or digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, too short for a header")]
    Truncated(usize),
    #[error("not a manifest (bad magic)")]
    BadMagic,
    #[error("manifest format version {0} is not supported (this build reads version 1)")]
    Version(u16),
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u32),
    #[error("image size {0} bytes exceeds the 64 TiB limit")]
    TooLarge(u64),
    #[error("manifest lists {listed} chunks but an image of {size} bytes has {expected}")]
    ChunkCount { listed: u64, expected: u64, size: u64 },
    #[error("manifest chunk {index} has unknown tag {tag}")]
    BadTag { index: u64, tag: u8 },
    #[error("manifest ends inside chunk {0}")]
    ShortBody(u64),
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
    #[error("'{0}' is not a 32-byte hex digest")]
    BadDigest(String),
    #[error(
        "chunk {digest} is both the short last chunk {last} and the full chunk {index}: one digest cannot have two lengths"
    )]
    LengthConflict { digest: Digest, index: u64, last: u64 },
}

/// A disk image's description: chunk size, byte size and one [`ChunkRef`]
/// per chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk_size: u32,
    size: u64,
    chunks: Vec<ChunkRef>,
}

/// What it takes to bring a device that holds one image to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Chunks to fetch and write: (index, digest).
    pub fetch: Vec<(u64, Digest)>,
    /// Chunks to zero (or discard).
    pub zero: Vec<u64>,
}

impl Diff {
    /// Distinct digests among the chunks to fetch, in first-use order.
    pub fn distinct_digests(&self) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        self.fetch.iter().filter(|(_, d)| seen.insert(*d)).map(|(_, d)| *d).collect()
    }
}

impl Manifest {
    /// A manifest from its parts, checked as [`Manifest::decode`] would.
    pub fn new(chunk_size: u32, size: u64, chunks: Vec<ChunkRef>) -> Result<Manifest, ManifestError> {
        check_header(chunk_size, size, chunks.len() as u64)?;
        let m = Manifest { chunk_size, size, chunks };
        m.check_lengths()?;
        Ok(m)
    }

    /// Only the last chunk may be short, so a digest used there cannot be
    /// used at a full index too (its bytes would need two lengths).
    fn check_lengths(&self) -> Result<(), ManifestError> {
        let Some((last, ChunkRef::Data(d))) = self.chunks.iter().enumerate().next_back() else { return Ok(()) };
        if self.size.is_multiple_of(u64::from(self.chunk_size)) {
            return Ok(());
        }
        match self.chunks[..last].iter().position(|c| *c == ChunkRef::Data(*d)) {
            Some(index) => Err(ManifestError::LengthConflict { digest: *d, index: index as u64, last: last as u64 }),
            None => Ok(()),
        }
    }

    /// Distinct digests of non-zero chunks with their plain length, in
    /// first-use order: what a reader must receive for each.
    pub fn distinct_chunks(&self) -> Vec<(Digest, usize)> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                ChunkRef::Data(d) if seen.insert(*d) => Some((*d, self.chunk_len(i as u64))),
                _ => None,
            })
            .collect()
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Byte offset of chunk `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * u64::from(self.chunk_size)
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = self.offset(index);
        let len = (self.size - start).min(u64::from(self.chunk_size));
        usize::try_from(len).expect("chunk length fits usize")
    }

    /// Number of zero chunks.
    pub fn zero_chunks(&self) -> u64 {
        self.chunks.iter().filter(|c| matches!(c, ChunkRef::Zero)).count() as u64
    }

    /// Bytes of distinct non-zero chunks: what a store holds for the image.
    pub fn stored_bytes(&self) -> u64 {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match c {
                ChunkRef::Data(d) if seen.insert(*d) => Some(self.chunk_len(i as u64) as u64),
                _ => None,
            })
            .sum()
    }

    /// Distinct digests of non-zero chunks, in first-use order.
    pub fn distinct_digests(&self) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .filter_map(|c| match c {
                ChunkRef::Data(d) if seen.insert(*d) => Some(*d),
                _ => None,
            })
            .collect()
    }

    /// The canonical encoding: magic, version, chunk size, byte size, chunk
    /// count, then per chunk a tag byte and, for data, the 32-byte digest.
    pub fn encode(&self) -> Vec<u8> {
        let data = self.chunks.iter().filter(|c| matches!(c, ChunkRef::Data(_))).count();
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() + 32 * data);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            match c {
                ChunkRef::Zero => out.push(TAG_ZERO),
                ChunkRef::Data(d) => {
                    out.push(TAG_DATA);
                    out.extend_from_slice(&d.0);
                }
            }
        }
        out
    }

    /// The image id: digest of the canonical encoding.
    pub fn image_id(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// Parse and validate an untrusted manifest. Sizes and counts are checked
    /// against the input's length before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(ManifestError::Version(version));
        }
        let chunk_size = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes"));
        let size = u64::from_le_bytes(bytes[14..22].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(bytes[22..30].try_into().expect("8 bytes"));
        check_header(chunk_size, size, count)?;
        let body = &bytes[HEADER_LEN..];
        // Every chunk takes at least one byte, so `count` is bounded by the
        // input before we allocate for it.
        if count > body.len() as u64 {
            return Err(ManifestError::ShortBody(body.len() as u64));
        }
        let mut chunks = Vec::with_capacity(usize::try_from(count).map_err(|_| ManifestError::ShortBody(0))?);
        let mut pos = 0usize;
        for index in 0..count {
            let tag = *body.get(pos).ok_or(ManifestError::ShortBody(index))?;
            pos += 1;
            match tag {
                TAG_ZERO => chunks.push(ChunkRef::Zero),
                TAG_DATA => {
                    let d = body.get(pos..pos + 32).ok_or(ManifestError::ShortBody(index))?;
                    chunks.push(ChunkRef::Data(Digest(d.try_into().expect("32 bytes"))));
                    pos += 32;
                }
                tag => return Err(ManifestError::BadTag { index, tag }),
            }
        }
        if pos != body.len() {
            return Err(ManifestError::Trailing(body.len() - pos));
        }
        let m = Manifest { chunk_size, size, chunks };
        m.check_lengths()?;
        Ok(m)
    }

    /// What to fetch and zero to turn a device holding `from` into `self`.
    /// `None` means a fresh (all-zero) device: nothing is zeroed. A device
    /// whose content is unknown must be scanned first, never passed as fresh.
    pub fn diff_from(&self, from: Option<&Manifest>) -> Diff {
        let mut diff = Diff::default();
        let comparable = from.filter(|f| f.chunk_size == self.chunk_size);
        for (index, c) in self.chunks.iter().enumerate() {
            let i = index as u64;
            let old = match (from, comparable) {
                (None, _) => Some(ChunkRef::Zero),
                // A chunk of another length (the old image ended inside
                // it) says nothing of the bytes past the old end: they hold
                // whatever an older, longer image left there.
                (Some(_), Some(f)) => f.chunks.get(index).copied().filter(|_| f.chunk_len(i) == self.chunk_len(i)),
                (Some(_), None) => None,
            };
            match (c, old) {
                (ChunkRef::Zero, Some(ChunkRef::Zero)) => {}
                (ChunkRef::Zero, _) => diff.zero.push(i),
                (ChunkRef::Data(d), Some(ChunkRef::Data(o))) if *d == o => {}
                (ChunkRef::Data(d), _) => diff.fetch.push((i, *d)),
            }
        }
        diff
    }
}

fn check_header(chunk_size: u32, size: u64, count: u64) -> Result<(), ManifestError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ManifestError::ChunkSize(chunk_size));
    }
    if size > MAX_IMAGE_BYTES {
        return Err(ManifestError::TooLarge(size));
    }
    let expected = size.div_ceil(u64::from(chunk_size));
    if count != expected {
        return Err(ManifestError::ChunkCount { listed: count, expected, size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> ChunkRef {
        ChunkRef::Data(Digest([n; 32]))
    }

    fn m(chunks: Vec<ChunkRef>) -> Manifest {
        let size = chunks.len() as u64 * 4096 - 100;
        Manifest::new(4096, size, chunks).unwrap()
    }

    #[test]
    fn encoding_round_trips_and_id_is_stable() {
        let a = m(vec![d(1), ChunkRef::Zero, d(1), d(2)]);
        let bytes = a.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), a);
        assert_eq!(a.image_id(), Digest::of(&bytes));
        assert_ne!(a.image_id(), m(vec![d(1), ChunkRef::Zero, d(1), d(3)]).image_id());
        assert_eq!(a.chunk_len(3), 4096 - 100);
        // A repeated digest is stored once.
        assert_eq!(a.stored_bytes(), 4096 + (4096 - 100));
    }

    #[test]
    fn bad_manifests_are_clear_errors() {
        let good = m(vec![d(1), ChunkRef::Zero]).encode();
        assert_eq!(Manifest::decode(&good[..10]), Err(ManifestError::Truncated(10)));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::BadMagic));
        let mut bad = good.clone();
        bad[10..14].copy_from_slice(&3000u32.to_le_bytes());
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::ChunkSize(3000)));
        // A claimed count of 2^40 chunks must fail before allocating.
        let mut bad = good.clone();
        bad[14..22].copy_from_slice(&(4096u64 << 40).to_le_bytes());
        assert!(matches!(Manifest::decode(&bad), Err(ManifestError::TooLarge(_))));
        let mut bad = good.clone();
        bad[14..22].copy_from_slice(&(4096u64 << 20).to_le_bytes());
        bad[22..30].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(Manifest::decode(&bad), Err(ManifestError::ShortBody(_))));
        let mut bad = good.clone();
        bad[HEADER_LEN] = 7;
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::BadTag { index: 0, tag: 7 }));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(Manifest::decode(&bad), Err(ManifestError::Trailing(1)));
        assert_eq!(Manifest::decode(&good[..good.len() - 1]), Err(ManifestError::ShortBody(1)));
    }

    /// A header (and an all-zero body) saying what the arguments say.
    fn raw(version: u16, chunk_size: u32, size: u64, count: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&chunk_size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out
    }

    /// `raw` with `count` zero tags after the header.
    fn zeros(chunk_size: u32, size: u64, count: u64) -> Vec<u8> {
        let mut out = raw(VERSION, chunk_size, size, count);
        out.resize(out.len() + usize::try_from(count).unwrap(), TAG_ZERO);
        out
    }

    #[test]
    fn the_header_is_30_bytes_and_an_empty_image_is_exactly_one() {
        assert_eq!(HEADER_LEN, 30);
        let empty = Manifest::new(4096, 0, vec![]).unwrap();
        let bytes = empty.encode();
        assert_eq!(bytes, raw(VERSION, 4096, 0, 0));
        assert_eq!(Manifest::decode(&bytes), Ok(empty));
        assert_eq!(Manifest::decode(&bytes[..HEADER_LEN - 1]), Err(ManifestError::Truncated(HEADER_LEN - 1)));
        assert_eq!(Manifest::decode(&[]), Err(ManifestError::Truncated(0)));
    }

    #[test]
    fn only_version_1_is_read() {
        assert_eq!(Manifest::decode(&raw(0, 4096, 0, 0)), Err(ManifestError::Version(0)));
        assert_eq!(Manifest::decode(&raw(2, 4096, 0, 0)), Err(ManifestError::Version(2)));
        assert_eq!(Manifest::decode(&raw(0x0100, 4096, 0, 0)), Err(ManifestError::Version(0x0100)));
        assert!(Manifest::decode(&raw(1, 4096, 0, 0)).is_ok());
    }

    #[test]
    fn chunk_sizes_are_powers_of_two_from_4_kib_to_16_mib() {
        for ok in [MIN_CHUNK_SIZE, 8192, 512 << 10, MAX_CHUNK_SIZE] {
            assert_eq!(check_header(ok, 0, 0), Ok(()), "{ok}");
            let one = Manifest::new(ok, u64::from(ok), vec![ChunkRef::Zero]).unwrap();
            assert_eq!(Manifest::decode(&zeros(ok, u64::from(ok), 1)), Ok(one));
        }
        // One power of two beyond each end, sizes in range that are not
        // powers of two, and the extremes.
        for bad in [
            MIN_CHUNK_SIZE / 2,
            MAX_CHUNK_SIZE * 2,
            MIN_CHUNK_SIZE + 1,
            3 * MIN_CHUNK_SIZE,
            MAX_CHUNK_SIZE - 1,
            0,
            1,
            u32::MAX,
        ] {
            assert_eq!(check_header(bad, 0, 0), Err(ManifestError::ChunkSize(bad)), "{bad}");
            assert_eq!(Manifest::new(bad, 0, vec![]), Err(ManifestError::ChunkSize(bad)));
            assert_eq!(Manifest::decode(&raw(VERSION, bad, 0, 0)), Err(ManifestError::ChunkSize(bad)));
        }
    }

    #[test]
    fn image_size_is_at_most_64_tib() {
        let max_chunks = MAX_IMAGE_BYTES / u64::from(MAX_CHUNK_SIZE);
        assert_eq!(check_header(MAX_CHUNK_SIZE, MAX_IMAGE_BYTES, max_chunks), Ok(()));
        assert_eq!(
            check_header(MAX_CHUNK_SIZE, MAX_IMAGE_BYTES + 1, max_chunks + 1),
            Err(ManifestError::TooLarge(MAX_IMAGE_BYTES + 1))
        );
        assert_eq!(
            check_header(MIN_CHUNK_SIZE, u64::MAX, u64::MAX / u64::from(MIN_CHUNK_SIZE) + 1),
            Err(ManifestError::TooLarge(u64::MAX))
        );
        // Decode refuses the size before it looks at the body.
        assert_eq!(
            Manifest::decode(&raw(VERSION, MAX_CHUNK_SIZE, MAX_IMAGE_BYTES + 1, max_chunks + 1)),
            Err(ManifestError::TooLarge(MAX_IMAGE_BYTES + 1))
        );
        // At the limit the header is fine, so the (absent) body is what is wrong.
        assert_eq!(
            Manifest::decode(&raw(VERSION, MAX_CHUNK_SIZE, MAX_IMAGE_BYTES, max_chunks)),
            Err(ManifestError::ShortBody(0))
        );
    }

    #[test]
    fn the_chunk_count_is_exactly_what_the_size_implies() {
        // (size, chunks) at and around chunk boundaries.
        for (size, expected) in [(0, 0), (1, 1), (4095, 1), (4096, 1), (4097, 2), (3 * 4096, 3), (3 * 4096 + 1, 4)] {
            assert_eq!(check_header(4096, size, expected), Ok(()), "{size}");
            assert_eq!(Manifest::decode(&zeros(4096, size, expected)).map(|m| m.chunks().len() as u64), Ok(expected));
            for listed in [expected + 1, expected.wrapping_sub(1)] {
                let err = ManifestError::ChunkCount { listed, expected, size };
                assert_eq!(check_header(4096, size, listed), Err(err.clone()), "{size} {listed}");
                // Decode refuses the header before it looks at the body.
                assert_eq!(Manifest::decode(&raw(VERSION, 4096, size, listed)), Err(err.clone()));
                if listed <= 8 {
                    let n = usize::try_from(listed).unwrap();
                    assert_eq!(Manifest::new(4096, size, vec![ChunkRef::Zero; n]), Err(err.clone()));
                    assert_eq!(Manifest::decode(&zeros(4096, size, listed)), Err(err));
                }
            }
        }
    }

    #[test]
    fn the_body_holds_exactly_the_chunks_listed() {
        // All zero chunks: one byte each, so the body is exactly `count` bytes.
        let three = zeros(4096, 3 * 4096, 3);
        assert_eq!(Manifest::decode(&three).unwrap().zero_chunks(), 3);
        assert_eq!(Manifest::decode(&three[..three.len() - 1]), Err(ManifestError::ShortBody(2)));
        let mut longer = three.clone();
        longer.extend_from_slice(&[0; 5]);
        assert_eq!(Manifest::decode(&longer), Err(ManifestError::Trailing(5)));
        // A data chunk needs its 32 digest bytes.
        let m = Manifest::new(4096, 2 * 4096, vec![ChunkRef::Zero, d(9)]).unwrap();
        let bytes = m.encode();
        assert_eq!(bytes.len(), HEADER_LEN + 1 + 33);
        assert_eq!(Manifest::decode(&bytes), Ok(m));
        for cut in 1..=33 {
            assert_eq!(Manifest::decode(&bytes[..bytes.len() - cut]), Err(ManifestError::ShortBody(1)), "{cut}");
        }
        // Far more chunks than bytes: refused before allocating.
        assert_eq!(
            Manifest::decode(&zeros(4096, 4096 << 30, 0)).err(),
            Some(ManifestError::ChunkCount { listed: 0, expected: 1 << 30, size: 4096 << 30 })
        );
        let mut huge = raw(VERSION, 4096, 4096 << 30, 1 << 30);
        huge.extend_from_slice(&[0; 10]);
        assert_eq!(Manifest::decode(&huge), Err(ManifestError::ShortBody(10)));
        // Every tag but 0 and 1 is refused, naming the chunk.
        for tag in [2u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[HEADER_LEN + 1] = tag;
            assert_eq!(Manifest::decode(&bad), Err(ManifestError::BadTag { index: 1, tag }));
        }
    }

    #[test]
    fn chunks_have_offsets_and_lengths_with_a_short_tail() {
        let a = Manifest::new(8192, 2 * 8192 + 5, vec![d(1), ChunkRef::Zero, d(2)]).unwrap();
        assert_eq!([a.offset(0), a.offset(1), a.offset(2)], [0, 8192, 16384]);
        assert_eq!([a.chunk_len(0), a.chunk_len(1), a.chunk_len(2)], [8192, 8192, 5]);
        assert_eq!((a.chunk_size(), a.size(), a.zero_chunks()), (8192, 2 * 8192 + 5, 1));
        let full = Manifest::new(8192, 2 * 8192, vec![d(1), d(2)]).unwrap();
        assert_eq!(full.chunk_len(1), 8192);
        assert_eq!(full.zero_chunks(), 0);
    }

    #[test]
    fn distinct_digests_are_in_first_use_order() {
        let a = m(vec![d(3), ChunkRef::Zero, d(1), d(3), d(2), d(1), d(4)]);
        assert_eq!(a.distinct_digests(), vec![Digest([3; 32]), Digest([1; 32]), Digest([2; 32]), Digest([4; 32])]);
        // Four distinct digests; the last chunk is 100 bytes short.
        assert_eq!(a.stored_bytes(), 3 * 4096 + (4096 - 100));
        let b = m(vec![d(3), d(2), d(3), d(5)]);
        assert_eq!(b.stored_bytes(), 2 * 4096 + (4096 - 100));
        let diff = b.diff_from(None);
        assert_eq!(diff.distinct_digests(), vec![Digest([3; 32]), Digest([2; 32]), Digest([5; 32])]);
    }

    #[test]
    fn digests_parse_from_hex_and_bytes_only_at_32_bytes() {
        let hex = "00".repeat(31) + "ab";
        let mut bytes = [0u8; 32];
        bytes[31] = 0xab;
        assert_eq!(Digest::from_hex(&hex), Ok(Digest(bytes)));
        assert_eq!(Digest(bytes).to_hex(), hex);
        assert_eq!(Digest(bytes).to_string(), hex);
        assert_eq!(format!("{:?}", Digest(bytes)), "Digest(0000000000000000)");
        assert_eq!(format!("{:?}", Digest([0xcd; 32])), "Digest(cdcdcdcdcdcdcdcd)");
        assert_eq!(Digest::from_hex(&hex[..62]), Err(ManifestError::BadDigest(hex[..62].into())));
        assert_eq!(
            Digest::from_hex(&("zz".to_owned() + &hex[2..])),
            Err(ManifestError::BadDigest("zz".to_owned() + &hex[2..]))
        );
        // A long bad input is named by its first 80 characters only.
        let long = "x".repeat(200);
        assert_eq!(Digest::from_hex(&long), Err(ManifestError::BadDigest("x".repeat(80))));
        assert_eq!(Digest::from_slice(&bytes), Ok(Digest(bytes)));
        assert_eq!(Digest::from_slice(&bytes[..31]), Err(ManifestError::BadDigest("31 bytes, want 32".into())));
        assert_eq!(Digest::from_slice(&[0; 33]), Err(ManifestError::BadDigest("33 bytes, want 32".into())));
        assert_eq!(Digest::of(b"abc"), Digest(*blake3::hash(b"abc").as_bytes()));
    }

    #[test]
    fn diff_against_another_chunk_size_or_a_shorter_image_rewrites_what_it_cannot_compare() {
        let b = m(vec![d(1), ChunkRef::Zero, d(2)]);
        // Another chunk size: nothing can be compared, so every chunk is written.
        let other = Manifest::new(8192, 8192, vec![d(1)]).unwrap();
        let diff = b.diff_from(Some(&other));
        assert_eq!(diff.fetch, vec![(0, Digest([1; 32])), (2, Digest([2; 32]))]);
        assert_eq!(diff.zero, vec![1]);
        // A shorter image: chunks past its end are written, and so is the
        // chunk it ended in (its last 100 bytes were not its).
        let short = m(vec![d(1)]);
        let diff = b.diff_from(Some(&short));
        assert_eq!(diff.fetch, vec![(0, Digest([1; 32])), (2, Digest([2; 32]))]);
        assert_eq!(diff.zero, vec![1]);
    }

    #[test]
    fn a_zero_chunk_the_old_image_ended_in_is_zeroed_whole() {
        // The old image ended 100 bytes into a zero chunk: the rest of it
        // on the device holds an older image's bytes.
        let old = Manifest::new(4096, 4096 + 100, vec![d(1), ChunkRef::Zero]).unwrap();
        let new = Manifest::new(4096, 3 * 4096, vec![d(1), ChunkRef::Zero, ChunkRef::Zero]).unwrap();
        let diff = new.diff_from(Some(&old));
        assert!(diff.fetch.is_empty());
        assert_eq!(diff.zero, vec![1, 2]);
        // The same length: nothing to do.
        assert!(old.diff_from(Some(&old)).zero.is_empty());
    }

    #[test]
    fn diff_fetches_changed_and_zeroes_newly_zero() {
        let a = m(vec![d(1), d(2), d(3), ChunkRef::Zero]);
        let b = m(vec![d(1), ChunkRef::Zero, d(4), d(5)]);
        let diff = b.diff_from(Some(&a));
        assert_eq!(diff.fetch, vec![(2, Digest([4; 32])), (3, Digest([5; 32]))]);
        assert_eq!(diff.zero, vec![1]);
        // A fresh device gets no zero writes.
        let fresh = b.diff_from(None);
        assert!(fresh.zero.is_empty());
        assert_eq!(fresh.fetch.len(), 3);
        assert!(b.diff_from(Some(&b)).fetch.is_empty());
    }
}
