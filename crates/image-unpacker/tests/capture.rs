//! PrepareForCapture's read-back runs in a task of its own: a caller that
//! goes away in the middle of it does not free the stream, and the capture
//! still completes and is recorded. Needs a loop device (root and
//! /dev/loop-control): a sparse file reads back too quickly to catch the
//! read in flight.

use std::{
    io::Read as _,
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

use fleet_pki::Role;
use image_format::ImageName;
use imagetool::Progress as AddProgress;
use test_support::{ScratchDevice, noise};
use tonic::Code;
use unpacker_client::{
    AssociateRequest, ClaimDeviceRequest, Client, GetStatusRequest, PrepareForCaptureRequest, StreamState,
    UnpackImageRequest,
};

const CHUNK: u32 = 64 * 1024;
const STREAM: &str = "base/capture";
/// Large enough that reading it back takes a good fraction of a second on
/// a loop device; mostly zero, so adding and unpacking it is quick.
const SIZE: u64 = 768 << 20;

async fn capture(c: &mut Client) -> Result<unpacker_client::Capture, tonic::Status> {
    let req = PrepareForCaptureRequest { stream: STREAM.into(), ..Default::default() };
    Ok(c.prepare_for_capture(req).await?.into_inner())
}

async fn busy(c: &mut Client) -> bool {
    c.get_status(GetStatusRequest {}).await.unwrap().into_inner().busy
}

/// BLAKE3 of a file, read a piece at a time.
fn hash_file(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_that_goes_away_mid_capture_leaves_the_stream_busy_until_the_read_back_ends() {
    if !test_support::loop_devices_available() {
        eprintln!("skipped: needs loop devices (root and /dev/loop-control)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let test_support::Fleet { pki, server, unpacker: running } = test_support::fleet(dir.path()).await.unwrap();

    // A sparse image with data at both ends.
    let raw = dir.path().join("1.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&noise(3 * CHUNK as usize, 1), 0).unwrap();
    f.write_all_at(&noise(2 * CHUNK as usize, 2), SIZE - 2 * u64::from(CHUNK)).unwrap();
    drop(f);
    let builder = pki.role(Role::ImageBuilder).unwrap();
    let mut b = imagetool::client::connect(&server.addr.to_string(), &builder).await.unwrap();
    imagetool::add(&mut b, &ImageName::new(STREAM, "1").unwrap(), &raw, CHUNK, AddProgress::Hidden).await.unwrap();
    let want = hash_file(&raw);

    let publisher = pki.role(Role::AmiPublisher).unwrap();
    let addr = running.addr.to_string();
    let mut c = unpacker_client::connect(&addr, &publisher).await.unwrap();
    let mut other = unpacker_client::connect(&addr, &publisher).await.unwrap();
    let dev = ScratchDevice::new(&dir.path().join("vol.img"), SIZE).unwrap();
    eprintln!("device: {}", dev.describe());
    let vol = "vol-00000000000000c1";
    let req = ClaimDeviceRequest { volume_id: vol.into(), path: dev.path.display().to_string(), fresh: true };
    c.claim_device(req).await.unwrap();
    c.associate_stream_with_device(AssociateRequest { stream: STREAM.into(), volume_id: vol.into() }).await.unwrap();
    let unpack = UnpackImageRequest { stream: STREAM.into(), leaf: "1".into(), ..Default::default() };
    let s = c.unpack_image(unpack.clone()).await.unwrap().into_inner();
    unpacker_client::follow(s, |_| {}).await.unwrap();

    // A whole capture, to know how long a read-back takes.
    let started = Instant::now();
    let first = capture(&mut c).await.unwrap();
    let full = started.elapsed();
    eprintln!("a read-back of {} MiB took {full:?}", SIZE >> 20);
    assert_eq!(first.device_digest, want);
    let captures = &running.unpacker.metrics().captures;
    assert_eq!(captures.get(), 1);

    // Another capture whose caller gives up after a few milliseconds.
    let started = Instant::now();
    let gone = tokio::time::timeout(Duration::from_millis(20), capture(&mut c)).await;
    assert!(gone.is_err(), "the capture ended within 20 ms: {gone:?}");
    // Time for the cancellation to reach the unpacker.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = match other.unpack_image(unpack.clone()).await {
        Ok(_) => panic!("an unpack was let in while the abandoned capture was still reading the device"),
        Err(e) => e,
    };
    let asked = started.elapsed();
    assert!(
        asked < full / 2,
        "the check came {asked:?} after the start, too late to tell (a read-back takes {full:?})"
    );
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("prepare-for-capture is running"), "{}", refused.message());

    // The read-back goes on to the end, then frees the stream.
    let deadline = Instant::now() + Duration::from_secs(120);
    while busy(&mut other).await {
        assert!(Instant::now() < deadline, "the stream is still busy after two minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the stream was busy for {:?} after the caller left", started.elapsed());
    assert_eq!(captures.get(), 2, "the abandoned capture was completed and counted");
    let status = other.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let st = status.streams.iter().find(|s| s.stream == STREAM).unwrap();
    assert_eq!(st.state(), StreamState::Verified);
    assert_eq!(st.leaf, "1");

    // And a capture now agrees with the first.
    let again = capture(&mut other).await.unwrap();
    assert_eq!(again.device_digest, first.device_digest);
    assert_eq!(again.image_id, first.image_id);
    assert_eq!(captures.get(), 3);
    drop(dev);
    running.stop().await.unwrap();
}
