//! The store's unit tests.

use super::*;
use image_format::ChunkRef;
use std::fs::{self, File};

fn store() -> (tempfile::TempDir, ChunkStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = ChunkStore::open(dir.path()).unwrap();
    (dir, s)
}

#[test]
fn chunk_with_wrong_digest_is_never_stored() {
    let (_d, s) = store();
    let good = vec![7u8; 4096];
    let wrong = Digest::of(b"something else");
    let err = s.put_compressed(&wrong, &compress(&good)).unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!s.has(&wrong).unwrap());
    let err = s.put_compressed(&wrong, b"not zstd").unwrap_err();
    assert!(err.to_string().contains("not a zstd frame"), "{err}");
    let d = Digest::of(&good);
    assert!(s.put_compressed(&d, &compress(&good)).unwrap());
    assert!(!s.put_compressed(&d, &compress(&good)).unwrap());
    assert_eq!(s.get_plain(&d).unwrap(), good);
}

#[test]
fn corruption_at_rest_is_detected_on_read() {
    let (_d, s) = store();
    let d = s.put_plain(&[3u8; 5000]).unwrap();
    fs::write(s.dir().chunk_path(&d), compress(&[4u8; 5000])).unwrap();
    assert!(matches!(s.get_compressed(&d), Err(StoreError::Corrupt { .. })));
    fs::write(s.dir().chunk_path(&d), b"not zstd").unwrap();
    assert!(matches!(s.get_plain(&d), Err(StoreError::Corrupt { .. })));
}

#[test]
fn commit_needs_every_chunk_and_leaves_are_immutable() {
    let (_d, s) = store();
    let a = vec![1u8; 4096];
    let b = vec![2u8; 4096];
    let da = Digest::of(&a);
    let db = Digest::of(&b);
    let m1 = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(da), ChunkRef::Zero, ChunkRef::Data(db)]).unwrap();
    let name = ImageName::parse("base/os/1").unwrap();
    s.put_plain(&a).unwrap();
    let err = s.commit(&name, &m1).unwrap_err();
    assert!(err.to_string().contains("1 chunks are missing"), "{err}");
    assert!(s.list_streams().unwrap().is_empty());
    s.put_plain(&b).unwrap();
    let (img, new) = s.commit(&name, &m1).unwrap();
    assert!(new);
    assert_eq!(img.image_id, m1.image_id());
    assert!(!s.commit(&name, &m1).unwrap().1, "same bytes again is a no-op");
    let m2 = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(db), ChunkRef::Zero, ChunkRef::Data(da)]).unwrap();
    assert!(matches!(s.commit(&name, &m2), Err(StoreError::LeafExists { .. })));
    assert_eq!(s.get_image(&name).unwrap().manifest, m1);
    assert_eq!(s.list_streams().unwrap(), vec!["base/os".to_owned()]);
    assert_eq!(s.list_images("base/os").unwrap().images.len(), 1);
}

/// A store holding chunks of 4096 bytes `a` and `b` and a 3-chunk image
/// `base/os/1` of them, plus a second leaf `base/os/2`.
fn store_with_images() -> (tempfile::TempDir, ChunkStore, Manifest) {
    let (d, s) = store();
    let da = s.put_plain(&[1u8; 4096]).unwrap();
    let db = s.put_plain(&[2u8; 4096]).unwrap();
    let m = Manifest::new(4096, 3 * 4096, vec![ChunkRef::Data(da), ChunkRef::Zero, ChunkRef::Data(db)]).unwrap();
    s.commit(&ImageName::parse("base/os/1").unwrap(), &m).unwrap();
    s.commit(&ImageName::parse("base/os/2").unwrap(), &m).unwrap();
    (d, s, m)
}

#[test]
fn a_record_altered_on_disk_is_reported_and_the_rest_of_the_stream_served() {
    let (_d, s, m) = store_with_images();
    let one = ImageName::parse("base/os/1").unwrap();
    let path = s.dir().record_path(&one);
    let good = fs::read(&path).unwrap();
    // One flipped bit in each field: time, name, id, the manifest's size
    // field and a chunk digest.
    let name_at = 18;
    let id_at = name_at + "base/os/1".len();
    let manifest_at = id_at + 32;
    for (field, at) in [
        ("time", 9),
        ("name", name_at + 2),
        ("id", id_at + 5),
        ("size", manifest_at + 14),
        ("digest", manifest_at + 31 + 7),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        fs::write(&path, &bad).unwrap();
        let err = s.get_image(&one).unwrap_err();
        assert!(matches!(err, StoreError::BadRecord { .. }), "{field}: {err}");
        assert!(err.to_string().contains("base/os/1"), "{field}: {err}");
        let l = s.list_images("base/os").unwrap();
        assert_eq!(l.images.len(), 1, "{field}: the good leaf is still listed");
        assert_eq!(l.images[0].name.leaf(), "2");
        assert_eq!(l.damaged.len(), 1, "{field}");
        assert_eq!(l.damaged[0].name, one);
        assert!(matches!(s.commit(&one, &m), Err(StoreError::BadRecord { .. })), "{field}: no commit over damage");
    }
    // Garbage collection would not know the damaged leaf's chunks.
    let err = s.collect_garbage(Duration::ZERO, false).unwrap_err();
    assert!(matches!(err, StoreError::DamagedRecords { count: 1, .. }), "{err}");
    assert_eq!(s.list_all_images().unwrap().images.len(), 1);
    // A damaged leaf can be deleted, and then gc runs again.
    s.delete_image(&one).unwrap();
    assert!(s.list_images("base/os").unwrap().damaged.is_empty());
    s.collect_garbage(Duration::ZERO, false).unwrap();
}

#[test]
fn commit_refuses_chunks_of_another_length_than_the_manifest_says() {
    let (_d, s) = store();
    let long = s.put_plain(&[5u8; 8192]).unwrap();
    let short = s.put_plain(&[6u8; 1000]).unwrap();
    let name = ImageName::parse("base/os/1").unwrap();
    // An over-long chunk in a full slot of a 4 KiB-chunk image.
    let m = Manifest::new(4096, 4096, vec![ChunkRef::Data(long)]).unwrap();
    let err = s.commit(&name, &m).unwrap_err();
    assert!(matches!(err, StoreError::ChunkLength { index: 0, expected: 4096, stored: 8192, .. }), "{err}");
    // An over-short chunk in a full slot.
    let m = Manifest::new(4096, 8192, vec![ChunkRef::Zero, ChunkRef::Data(short)]).unwrap();
    let err = s.commit(&name, &m).unwrap_err();
    assert!(matches!(err, StoreError::ChunkLength { index: 1, expected: 4096, stored: 1000, .. }), "{err}");
    // A right-length short tail is fine.
    let m = Manifest::new(4096, 5096, vec![ChunkRef::Zero, ChunkRef::Data(short)]).unwrap();
    s.commit(&name, &m).unwrap();
    assert!(s.list_streams().unwrap().len() == 1);
}

#[test]
fn chunk_len_reads_frames_with_and_without_a_recorded_size() {
    let (_d, s) = store();
    let d = s.put_plain(&[9u8; 3000]).unwrap();
    assert_eq!(s.chunk_len(&d).unwrap(), 3000);
    // A frame that does not record its size (a streaming encoder's).
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut enc, &[8u8; 2000]).unwrap();
    let frame = enc.finish().unwrap();
    assert!(matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)));
    let d = Digest::of(&[8u8; 2000]);
    s.put_compressed(&d, &frame).unwrap();
    assert_eq!(s.chunk_len(&d).unwrap(), 2000);
    assert!(matches!(s.chunk_len(&Digest::of(b"absent")), Err(StoreError::MissingChunk(_))));
}

#[test]
fn format_1_records_are_upgraded_only_when_they_check_out() {
    let (dir, s, m) = store_with_images();
    let one = ImageName::parse("base/os/1").unwrap();
    let two = ImageName::parse("base/os/2").unwrap();
    let legacy = |m: &Manifest| {
        let mut v = b"FLEETREC".to_vec();
        v.extend_from_slice(&77u64.to_le_bytes());
        v.extend_from_slice(&m.encode());
        v
    };
    fs::write(s.dir().record_path(&one), legacy(&m)).unwrap();
    // Leaf 2's old record had one bit of its size flipped: the last
    // chunk's length no longer matches the stored chunk.
    let wrong = Manifest::new(4096, 3 * 4096 - 1, m.chunks().to_vec()).unwrap();
    fs::write(s.dir().record_path(&two), legacy(&wrong)).unwrap();
    drop(s);
    let s = ChunkStore::open(dir.path()).unwrap();
    let img = s.get_image(&one).unwrap();
    assert_eq!((img.manifest, img.committed), (m.clone(), UNIX_EPOCH + Duration::from_millis(77)));
    assert!(fs::read(s.dir().record_path(&one)).unwrap().starts_with(b"FLEETRC2"));
    let err = s.get_image(&two).unwrap_err();
    assert!(matches!(err, StoreError::BadRecord { why: RecordError::Legacy(_), .. }), "{err}");
}

#[test]
fn gc_removes_stale_temporary_files_only() {
    let (_d, s) = store();
    let stale = s.root().unwrap().join("tmp").join("1.0");
    let fresh = s.root().unwrap().join("tmp").join("1.1");
    fs::write(&stale, b"half a chunk").unwrap();
    fs::write(&fresh, b"a write in progress").unwrap();
    let old = SystemTime::now() - STALE_TMP - Duration::from_secs(5);
    File::options().append(true).open(&stale).unwrap().set_modified(old).unwrap();
    let r = s.collect_garbage(Duration::ZERO, true).unwrap();
    assert_eq!(r.stale_temp_files, 1);
    assert!(stale.exists(), "dry run");
    let r = s.collect_garbage(Duration::ZERO, false).unwrap();
    assert_eq!(r.stale_temp_files, 1);
    assert!(!stale.exists());
    assert!(fresh.exists());
}

#[test]
fn gc_removes_only_unreferenced_chunks_past_grace() {
    let (_d, s) = store();
    let keep = s.put_plain(&[1u8; 4096]).unwrap();
    let drop = s.put_plain(&[2u8; 4096]).unwrap();
    let name = ImageName::parse("s/1").unwrap();
    s.commit(&name, &Manifest::new(4096, 4096, vec![ChunkRef::Data(keep)]).unwrap()).unwrap();
    let r = s.collect_garbage(Duration::from_secs(3600), false).unwrap();
    assert_eq!(r.chunks_removed, 0, "recent uploads are kept");
    let r = s.collect_garbage(Duration::ZERO, true).unwrap();
    assert_eq!(r.chunks_removed, 1);
    assert!(s.has(&drop).unwrap(), "dry run removes nothing");
    s.collect_garbage(Duration::ZERO, false).unwrap();
    assert!(s.has(&keep).unwrap());
    assert!(!s.has(&drop).unwrap());
    s.delete_image(&name).unwrap();
    assert!(s.list_streams().unwrap().is_empty());
    s.collect_garbage(Duration::ZERO, false).unwrap();
    assert!(!s.has(&keep).unwrap());
}

#[test]
fn reopening_clears_interrupted_writes() {
    let (d, s) = store();
    fs::write(s.root().unwrap().join("tmp").join("half"), b"torn").unwrap();
    drop(s);
    ChunkStore::open(d.path()).unwrap();
    assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
}
