//! The image-unpacker against a real imageserver, over real mutual TLS, on
//! loop block devices when this machine allows (root and /dev/loop-control),
//! else on sparse files; each test prints which it used.

use std::{path::PathBuf, pin::Pin, time::Duration};

use fleet_pki::{LeafSpec, Role};
use fleet_proto::imageserver::{self as is, image_server_server::ImageServer};
use fleet_tls::TlsFiles;
use futures::Stream;
use image_format::{ImageName, Manifest};
use imagetool::Progress as AddProgress;
use test_support::{Pki, ScratchDevice, noise};
use tonic::{Code, Request, Response, Status};
use unpacker_client::{
    AddDeviceRequest, AssociateRequest, ClaimDeviceRequest, Client, ForgetStreamRequest, GetRawRequest,
    GetStatusRequest, PrepareForCaptureRequest, PrepareForUnpackRequest, ReleaseCaptureRequest, RemoveDeviceRequest,
    RenewCaptureHoldRequest, StreamState, UnpackImageRequest, UnpackStats,
};

const CHUNK: u32 = 64 * 1024;
const STREAM: &str = "base/test";

struct Rig {
    dir: tempfile::TempDir,
    pki: Pki,
    server: imageserver::Running,
    unpacker: Option<image_unpacker::Running>,
    publisher: TlsFiles,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki")).unwrap();
        let server = test_support::imageserver(&pki, &dir.path().join("data")).await.unwrap();
        let publisher = pki.role(Role::AmiPublisher).unwrap();
        let mut rig = Rig { dir, pki, server, unpacker: None, publisher };
        rig.start_unpacker().await;
        rig
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start_unpacker_for(&mut self, image_server: &str) {
        let u = test_support::unpacker(
            &self.pki,
            "127.0.0.1:0".parse().unwrap(),
            &self.path("state"),
            &self.path("by-id"),
            image_server,
        )
        .await
        .unwrap();
        self.unpacker = Some(u);
    }

    async fn start_unpacker(&mut self) {
        let addr = self.server.addr.to_string();
        self.start_unpacker_for(&addr).await;
    }

    async fn stop_unpacker(&mut self) {
        self.unpacker.take().unwrap().stop().await.unwrap();
    }

    fn unpacker_addr(&self) -> String {
        self.unpacker.as_ref().unwrap().addr.to_string()
    }

    async fn client(&self) -> Client {
        unpacker_client::connect(&self.unpacker_addr(), &self.publisher).await.unwrap()
    }

    /// Add `bytes` as STREAM/leaf; returns its manifest.
    async fn add(&self, leaf: &str, bytes: &[u8]) -> Manifest {
        let file = self.path(&format!("{leaf}.raw"));
        std::fs::write(&file, bytes).unwrap();
        let builder = self.pki.role(Role::ImageBuilder).unwrap();
        let mut c = imagetool::client::connect(&self.server.addr.to_string(), &builder).await.unwrap();
        let name = ImageName::new(STREAM, leaf).unwrap();
        imagetool::add(&mut c, &name, &file, CHUNK, AddProgress::Hidden).await.unwrap();
        image_format::hash_file(&file, CHUNK, |_| {}).unwrap()
    }

    /// A scratch device claimed as `vol` and bound to STREAM.
    async fn bound_device(&self, c: &mut Client, vol: &str, size: u64, fresh: bool) -> ScratchDevice {
        let dev = ScratchDevice::new(&self.path(&format!("{vol}.img")), size).unwrap();
        eprintln!("device: {}", dev.describe());
        let req = ClaimDeviceRequest { volume_id: vol.into(), path: dev.path.display().to_string(), fresh };
        c.claim_device(req).await.unwrap();
        c.associate_stream_with_device(AssociateRequest { stream: STREAM.into(), volume_id: vol.into() })
            .await
            .unwrap();
        dev
    }
}

async fn unpack(c: &mut Client, leaf: &str) -> Result<UnpackStats, Status> {
    unpack_holding(c, leaf, 0).await
}

async fn unpack_holding(c: &mut Client, leaf: &str, hold_seconds: u32) -> Result<UnpackStats, Status> {
    let req = UnpackImageRequest { stream: STREAM.into(), leaf: leaf.into(), hold_seconds, hold_id: "test".into() };
    let s = c.unpack_image(req).await?.into_inner();
    let last = unpacker_client::follow(s, |_| {}).await?;
    Ok(last.stats.expect("the last message carries stats"))
}

async fn capture(c: &mut Client) -> Result<unpacker_client::Capture, Status> {
    let req = PrepareForCaptureRequest { stream: STREAM.into(), ..Default::default() };
    Ok(c.prepare_for_capture(req).await?.into_inner())
}

/// A disk-like image: data, a zero run, more data, a short tail.
fn disk(seed: u64) -> Vec<u8> {
    let mut d = noise(48 * CHUNK as usize + 4321, seed);
    d[4 * CHUNK as usize..12 * CHUNK as usize].fill(0);
    d
}

fn chunk_range(i: usize) -> std::ops::Range<usize> {
    i * CHUNK as usize..(i + 1) * CHUNK as usize
}

#[tokio::test]
async fn unpacks_bit_for_bit_then_writes_only_what_changed() {
    let rig = Rig::new().await;
    let a = disk(1);
    let ma = rig.add("1", &a).await;
    let mut c = rig.client().await;
    // Not fresh: the unpacker must scan to learn the device is empty.
    let dev = rig.bound_device(&mut c, "vol-0000000000000001", 64 * CHUNK as u64, false).await;

    let s = unpack(&mut c, "1").await.unwrap();
    let data_chunks = ma.chunks().len() as u64 - ma.zero_chunks();
    assert_eq!(s.chunks_total, 49);
    assert_eq!(s.chunks_written, data_chunks, "every data chunk written once");
    assert_eq!(s.chunks_zeroed, 0, "a device that reads as zero gets no zero writes");
    assert_eq!(dev.read(a.len()).unwrap(), a, "device holds leaf 1 bit for bit");
    let cap = capture(&mut c).await.unwrap();
    assert_eq!(cap.image_id, ma.image_id().to_hex());
    assert_eq!(cap.device_digest, blake3::hash(&a).to_hex().to_string());
    assert_eq!(cap.leaf, "1");

    // Leaf 2: three chunks rewritten, two newly zero, one zero run filled.
    let mut b = a.clone();
    for i in [1, 20, 47] {
        b[chunk_range(i)].copy_from_slice(&noise(CHUNK as usize, 100 + i as u64));
    }
    for i in [30, 31] {
        b[chunk_range(i)].fill(0);
    }
    b[chunk_range(5)].copy_from_slice(&noise(CHUNK as usize, 7));
    rig.add("2", &b).await;
    let s = unpack(&mut c, "2").await.unwrap();
    assert_eq!(s.chunks_written, 4, "only the changed chunks are written");
    assert_eq!(s.chunks_zeroed, 2, "newly zero chunks are zeroed");
    assert_eq!(s.chunks_fetched, 4);
    let changed = 4 * u64::from(CHUNK);
    assert!(s.bytes_fetched <= changed * 105 / 100, "fetched {} for {changed} changed bytes", s.bytes_fetched);
    assert_eq!(s.chunks_unchanged, 49 - 6);
    assert_eq!(dev.read(b.len()).unwrap(), b, "device holds leaf 2 bit for bit");
    let cap = capture(&mut c).await.unwrap();
    assert_eq!(cap.device_digest, blake3::hash(&b).to_hex().to_string());

    // Back to leaf 1: the same delta in reverse.
    let s = unpack(&mut c, "1").await.unwrap();
    assert_eq!((s.chunks_written, s.chunks_zeroed), (5, 1), "chunks 1,20,30,31,47 rewritten; chunk 5 zero again");
    assert_eq!(dev.read(a.len()).unwrap(), a);

    // GetRaw streams exactly the image bytes.
    let mut raw = c.get_raw(GetRawRequest { stream: STREAM.into() }).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(p) = raw.message().await.unwrap() {
        assert_eq!(p.offset, got.len() as u64);
        got.extend_from_slice(&p.data);
    }
    assert_eq!(got, a);
}

/// A capture hold keeps a second writer of the stream off the device until
/// it is released (the snapshot of leaf 1 would otherwise see leaf 2's
/// bytes), and a hold nobody releases ends by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_capture_hold_keeps_writers_off_until_released() {
    let rig = Rig::new().await;
    let (a, b, third) = (disk(11), disk(12), disk(13));
    rig.add("1", &a).await;
    rig.add("2", &b).await;
    rig.add("3", &third).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-00000000000000a1", 64 * CHUNK as u64, true).await;
    unpack_holding(&mut c, "1", 600).await.unwrap();
    let status = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let st = status.streams.iter().find(|s| s.stream == STREAM).unwrap();
    assert!(st.hold_seconds > 590 && st.hold_seconds <= 600, "hold {}", st.hold_seconds);
    assert_eq!(st.hold_leaf, "1");
    assert!(status.busy, "a held unpacker is busy, so stop-idle-unpackers leaves it up");

    // Another caller's unpack of the held leaf (a re-run) goes ahead and
    // changes nothing; one of leaf 2 waits.
    let mut other = rig.client().await;
    let rerun = tokio::time::timeout(Duration::from_secs(30), unpack(&mut other, "1")).await.unwrap().unwrap();
    assert_eq!((rerun.chunks_written, rerun.chunks_zeroed), (0, 0));
    let second = tokio::spawn(async move { unpack(&mut other, "2").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!second.is_finished(), "the second unpack waits for the hold");
    // Captures are not writers: the holder reads back and extends its hold,
    // and a second caller capturing the same leaf takes a hold of its own.
    let req = PrepareForCaptureRequest { stream: STREAM.into(), hold_seconds: 600, hold_id: "test".into() };
    let cap = c.prepare_for_capture(req).await.unwrap().into_inner();
    assert_eq!(cap.leaf, "1");
    let req = PrepareForCaptureRequest { stream: STREAM.into(), hold_seconds: 600, hold_id: "again".into() };
    c.prepare_for_capture(req).await.unwrap();
    assert_eq!(dev.read(a.len()).unwrap(), a, "still leaf 1 while held");
    assert!(!second.is_finished());
    // One caller's release leaves the other's hold in place.
    c.release_capture(ReleaseCaptureRequest { stream: STREAM.into(), hold_id: "test".into() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!second.is_finished(), "the second caller's hold still keeps leaf 2 off");
    assert_eq!(dev.read(a.len()).unwrap(), a);

    c.release_capture(ReleaseCaptureRequest { stream: STREAM.into(), hold_id: "again".into() }).await.unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(60), second).await.unwrap().unwrap().unwrap();
    assert!(stats.chunks_written > 0);
    assert_eq!(dev.read(b.len()).unwrap(), b, "leaf 2 once released");
    let status = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.streams.iter().find(|s| s.stream == STREAM).unwrap().hold_seconds, 0);

    // A hold that is never released runs out.
    let req = PrepareForCaptureRequest { stream: STREAM.into(), hold_seconds: 2, hold_id: "gone".into() };
    c.prepare_for_capture(req).await.unwrap();
    let t = std::time::Instant::now();
    unpack(&mut c, "3").await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1000), "the unpack waited for the hold: {:?}", t.elapsed());
    assert_eq!(dev.read(third.len()).unwrap(), third);
}

/// A caller renews its hold to a short term: when it is gone (a killed
/// publisher), its hold ends that soon, and a waiting unpack of another
/// leaf goes ahead. Renewing a hold the caller does not have is NOT_FOUND.
#[tokio::test(flavor = "multi_thread")]
async fn a_hold_renewed_to_a_short_term_ends_then_and_lets_a_waiting_unpack_go() {
    let rig = Rig::new().await;
    let (a, b) = (disk(53), disk(54));
    rig.add("1", &a).await;
    rig.add("2", &b).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-00000000000000c2", 64 * CHUNK as u64, true).await;
    unpack_holding(&mut c, "1", 600).await.unwrap();
    let mut other = rig.client().await;
    let second = tokio::spawn(async move { unpack(&mut other, "2").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!second.is_finished(), "the 600 s hold keeps leaf 2 off");
    let renew = |id: &str, seconds: u32| RenewCaptureHoldRequest {
        stream: STREAM.into(),
        hold_id: id.into(),
        hold_seconds: seconds,
    };
    let e = c.renew_capture_hold(renew("someone-else", 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let t = std::time::Instant::now();
    c.renew_capture_hold(renew("test", 2)).await.unwrap();
    let status = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let st = status.streams.iter().find(|s| s.stream == STREAM).unwrap();
    assert!(st.hold_seconds <= 2, "the hold now ends in 2 s: {st:?}");
    tokio::time::timeout(Duration::from_secs(30), second).await.unwrap().unwrap().unwrap();
    assert!(t.elapsed() >= Duration::from_millis(1500), "not before the renewed hold ended: {:?}", t.elapsed());
    assert_eq!(dev.read(b.len()).unwrap(), b);
    let e = c.renew_capture_hold(renew("test", 60)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "a hold that ran out is not renewed: {e:?}");
}

/// A capture hold outlives a restart of the daemon (say, a crash between a
/// publisher's read-back and its CreateSnapshot).
#[tokio::test(flavor = "multi_thread")]
async fn a_capture_hold_outlives_a_restart() {
    let mut rig = Rig::new().await;
    let (a, b) = (disk(51), disk(52));
    rig.add("1", &a).await;
    rig.add("2", &b).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-00000000000000c1", 64 * CHUNK as u64, true).await;
    unpack_holding(&mut c, "1", 600).await.unwrap();
    rig.stop_unpacker().await;
    rig.start_unpacker().await;
    let mut c = rig.client().await;
    let status = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    let st = status.streams.iter().find(|s| s.stream == STREAM).unwrap();
    assert!(st.hold_seconds > 500 && st.hold_leaf == "1", "{st:?}");
    let mut other = rig.client().await;
    let second = tokio::spawn(async move { unpack(&mut other, "2").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!second.is_finished(), "the hold still keeps leaf 2 off");
    assert_eq!(dev.read(a.len()).unwrap(), a);
    c.release_capture(ReleaseCaptureRequest { stream: STREAM.into(), hold_id: "test".into() }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), second).await.unwrap().unwrap().unwrap();
    assert_eq!(dev.read(b.len()).unwrap(), b);
}

/// A device grown in place (ModifyVolume) keeps what it holds: it can be
/// captured at once, and a larger image fits without a rescan.
#[tokio::test]
async fn a_grown_device_keeps_what_it_holds() {
    let rig = Rig::new().await;
    let a = disk(41);
    rig.add("1", &a).await;
    let mut big = disk(42);
    big.extend(noise(40 * CHUNK as usize, 43));
    rig.add("big", &big).await;
    let mut c = rig.client().await;
    let vol = "vol-00000000000000b1";
    let dev = rig.bound_device(&mut c, vol, 64 * CHUNK as u64, true).await;
    unpack(&mut c, "1").await.unwrap();
    assert_eq!(unpack(&mut c, "big").await.unwrap_err().code(), Code::FailedPrecondition, "too big at first");
    unpack(&mut c, "1").await.unwrap();

    dev.grow(128 * CHUNK as u64).unwrap();
    let d = c
        .claim_device(ClaimDeviceRequest { volume_id: vol.into(), path: dev.path.display().to_string(), fresh: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.size_bytes, 128 * u64::from(CHUNK));
    assert_eq!(d.stream, STREAM, "still bound");
    let cap = capture(&mut c).await.expect("what the device holds is still known");
    assert_eq!(cap.leaf, "1");
    let s = unpack(&mut c, "big").await.unwrap();
    assert!(s.chunks_unchanged > 0, "leaf 1's chunks that big shares were kept: {s:?}");
    assert_eq!(dev.read(big.len()).unwrap(), big);
}

#[tokio::test]
async fn a_fresh_volume_is_not_scanned_and_gets_no_zero_writes() {
    let rig = Rig::new().await;
    let a = disk(2);
    rig.add("1", &a).await;
    let mut c = rig.client().await;
    let _dev = rig.bound_device(&mut c, "vol-0000000000000002", 64 * CHUNK as u64, true).await;
    let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.streams[0].state(), StreamState::Prepared, "a fresh device needs no prepare");
    let s = unpack(&mut c, "1").await.unwrap();
    assert_eq!(s.chunks_zeroed, 0);
    let metrics = http_get(rig.unpacker.as_ref().unwrap().metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("unpacker_scans_total 0"), "{metrics}");
    assert!(metrics.contains("unpacker_unpacks_total 1"), "{metrics}");
    let status = http_get(rig.unpacker.as_ref().unwrap().metrics_addr.unwrap(), "/status").await;
    assert!(status.contains("vol-0000000000000002") && status.contains("\"unpacked\""), "{status}");
}

#[tokio::test]
async fn state_survives_a_restart() {
    let mut rig = Rig::new().await;
    let a = disk(3);
    let ma = rig.add("1", &a).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-0000000000000003", 64 * CHUNK as u64, true).await;
    unpack(&mut c, "1").await.unwrap();
    capture(&mut c).await.unwrap();
    rig.stop_unpacker().await;
    rig.start_unpacker().await;

    let mut c = rig.client().await;
    let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.devices.len(), 1);
    assert_eq!(st.devices[0].stream, STREAM);
    let s = &st.streams[0];
    assert_eq!((s.state(), s.leaf.as_str(), s.image_id.clone()), (StreamState::Verified, "1", ma.image_id().to_hex()));
    // Prepared from the record: no scan.
    let p = c
        .prepare_for_unpack(PrepareForUnpackRequest {
            stream: STREAM.into(),
            skip_if_prepared: true,
            do_not_wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    unpacker_client::follow(p, |_| {}).await.unwrap();
    let mut b = a.clone();
    b[chunk_range(0)].copy_from_slice(&noise(CHUNK as usize, 9));
    rig.add("2", &b).await;
    let s = unpack(&mut c, "2").await.unwrap();
    assert_eq!(s.chunks_written, 1, "the delta after a restart is still just the change");
    assert_eq!(dev.read(b.len()).unwrap(), b);
    let metrics = http_get(rig.unpacker.as_ref().unwrap().metrics_addr.unwrap(), "/metrics").await;
    assert!(metrics.contains("unpacker_scans_total 0"), "{metrics}");
}

#[tokio::test]
async fn devices_are_found_by_volume_id_and_bindings_are_enforced() {
    let rig = Rig::new().await;
    let mut c = rig.client().await;
    let vol = "vol-0abcdef012345678";
    let dev = ScratchDevice::new(&rig.path("late.img"), 8 * CHUNK as u64).unwrap();
    // The volume appears a little after the request, as an attach does.
    let link = rig.path("by-id").join(image_unpacker::devices::nitro_name(vol));
    let target = dev.path.clone();
    let appear = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        std::os::unix::fs::symlink(target, link).unwrap();
    });
    let d = c
        .add_device(AddDeviceRequest { volume_id: vol.into(), timeout_seconds: 10, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    appear.await.unwrap();
    assert_eq!(d.path, std::fs::canonicalize(&dev.path).unwrap().display().to_string());
    assert_eq!(d.size_bytes, 8 * u64::from(CHUNK));

    let e = c
        .add_device(AddDeviceRequest {
            volume_id: "vol-0fff00000000000f".into(),
            timeout_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(e.message().contains("vol-0fff00000000000f") && e.message().contains("within 1s"), "{}", e.message());
    let e = c.add_device(AddDeviceRequest { volume_id: "vol-../../x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Unbound: unpack is refused and names what to do.
    let e = unpack(&mut c, "1").await.unwrap_err();
    assert!(e.message().contains("not associated"), "{}", e.message());
    c.associate_stream_with_device(AssociateRequest { stream: STREAM.into(), volume_id: vol.into() }).await.unwrap();
    let e = c
        .associate_stream_with_device(AssociateRequest { stream: "other/stream".into(), volume_id: vol.into() })
        .await
        .unwrap_err();
    assert!(e.message().contains("bound to stream base/test"), "{}", e.message());
    // Nor is a bound stream moved to another device behind its back.
    let other_dev = ScratchDevice::new(&rig.path("other.img"), 8 * CHUNK as u64).unwrap();
    let other = "vol-0abcdef012345679";
    let req = ClaimDeviceRequest { volume_id: other.into(), path: other_dev.path.display().to_string(), fresh: true };
    c.claim_device(req).await.unwrap();
    let e = c
        .associate_stream_with_device(AssociateRequest { stream: STREAM.into(), volume_id: other.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&format!("bound to device {vol}")), "{}", e.message());
    c.remove_device(RemoveDeviceRequest { volume_id: other.into() }).await.unwrap();
    let e = c.remove_device(RemoveDeviceRequest { volume_id: vol.into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.forget_stream(ForgetStreamRequest { stream: STREAM.into() }).await.unwrap();
    c.remove_device(RemoveDeviceRequest { volume_id: vol.into() }).await.unwrap();
    let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.devices.is_empty() && st.streams.is_empty());
    // An image larger than the device is refused before anything is written.
    rig.add("big", &noise(9 * CHUNK as usize, 4)).await;
    let _small = rig.bound_device(&mut c, "vol-0000000000000009", 8 * CHUNK as u64, true).await;
    let e = unpack(&mut c, "big").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("holds only"), "{}", e.message());
}

#[tokio::test]
async fn unauthorized_clients_are_refused() {
    let rig = Rig::new().await;
    // The builder role may read and write images but not drive unpackers.
    let builder = rig.pki.role(Role::ImageBuilder).unwrap();
    let mut c = unpacker_client::connect(&rig.unpacker_addr(), &builder).await.unwrap();
    let e = c.get_status(GetStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("drive-unpacker"), "{}", e.message());
    // A certificate from another CA fails the handshake.
    let other = Pki::new(&rig.path("other-pki")).unwrap();
    let stranger = other.role(Role::AmiPublisher).unwrap();
    let mixed = TlsFiles { ca: rig.publisher.ca.clone(), ..stranger };
    let refused = match unpacker_client::connect(&rig.unpacker_addr(), &mixed).await {
        Err(_) => true,
        Ok(mut c) => c.get_status(GetStatusRequest {}).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");
    // An expired publisher certificate is refused too.
    let mut spec = LeafSpec::for_role(Role::AmiPublisher);
    spec.valid_from = time_days(-30);
    spec.valid_until = time_days(-1);
    let expired = rig.pki.issue("expired", &spec).unwrap();
    let refused = match unpacker_client::connect(&rig.unpacker_addr(), &expired).await {
        Err(_) => true,
        Ok(mut c) => c.get_status(GetStatusRequest {}).await.is_err(),
    };
    assert!(refused, "an expired certificate must be refused");
}

fn time_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

#[tokio::test]
async fn a_corrupt_chunk_from_a_misbehaving_server_is_never_written() {
    let mut rig = Rig::new().await;
    let a = disk(5);
    let ma = rig.add("1", &a).await;
    // A server with the right certificate that serves the real manifest but
    // flips a bit in every chunk it sends.
    let liar = Liar { manifest: ma.clone() };
    let tls = rig.pki.role(Role::Imageserver).unwrap().server_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar_addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(is::image_server_server::ImageServerServer::new(liar))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    rig.stop_unpacker().await;
    rig.start_unpacker_for(&liar_addr.to_string()).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-0000000000000005", 64 * CHUNK as u64, true).await;
    let e = unpack(&mut c, "1").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("does not match its digest"), "{}", e.message());
    assert!(dev.read(64 * CHUNK as usize).unwrap().iter().all(|&b| b == 0), "nothing was written");
    let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.streams[0].state(), StreamState::Dirty);
    let e = capture(&mut c).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_mounted_device_is_never_touched() {
    if !test_support::loop_devices_available() {
        eprintln!("SKIPPED: mounting needs root and loop devices; the lock check below still runs");
        let rig = Rig::new().await;
        rig.add("1", &disk(6)).await;
        let mut c = rig.client().await;
        let dev = rig.bound_device(&mut c, "vol-0000000000000006", 64 * CHUNK as u64, true).await;
        let held = std::fs::OpenOptions::new().write(true).open(&dev.path).unwrap();
        held.lock().unwrap();
        let e = unpack(&mut c, "1").await.unwrap_err();
        assert!(e.message().contains("in use"), "{}", e.message());
        return;
    }
    let rig = Rig::new().await;
    rig.add("1", &disk(6)).await;
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-0000000000000006", 64 * CHUNK as u64, true).await;
    assert!(std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.path).status().unwrap().success());
    let mnt = rig.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Read-only: mounted read-write, the kernel itself writes to the device
    // after mounting (ext4lazyinit zeroes inode tables in the background),
    // which would blur what the unpacker did. The unpacker refuses any
    // mounted device, whatever its options.
    assert!(
        std::process::Command::new("mount").args(["-o", "ro"]).arg(&dev.path).arg(&mnt).status().unwrap().success()
    );
    let before = blake3::hash(&dev.read(64 * CHUNK as usize).unwrap());
    let e = unpack(&mut c, "1").await.unwrap_err();
    let after = blake3::hash(&dev.read(64 * CHUNK as usize).unwrap());
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is mounted on"), "{}", e.message());
    assert_eq!(before, after, "the mounted device's bytes are unchanged");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// An imageserver that serves a real manifest and corrupted chunks.
struct Liar {
    manifest: Manifest,
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn no<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this test server"))
}

#[tonic::async_trait]
impl ImageServer for Liar {
    async fn list_streams(
        &self,
        _: Request<is::ListStreamsRequest>,
    ) -> Result<Response<is::ListStreamsResponse>, Status> {
        no()
    }
    async fn list_images(&self, _: Request<is::ListImagesRequest>) -> Result<Response<is::ListImagesResponse>, Status> {
        no()
    }
    async fn find_latest_image(
        &self,
        _: Request<is::FindLatestImageRequest>,
    ) -> Result<Response<is::ImageInfo>, Status> {
        no()
    }
    async fn get_manifest(
        &self,
        _: Request<is::GetManifestRequest>,
    ) -> Result<Response<is::GetManifestResponse>, Status> {
        let info = is::ImageInfo { image_id: self.manifest.image_id().to_hex(), ..Default::default() };
        Ok(Response::new(is::GetManifestResponse { info: Some(info), manifest: self.manifest.encode().into() }))
    }
    async fn find_missing_chunks(
        &self,
        _: Request<is::FindMissingChunksRequest>,
    ) -> Result<Response<is::FindMissingChunksResponse>, Status> {
        no()
    }
    async fn upload_chunks(
        &self,
        _: Request<tonic::Streaming<is::UploadChunk>>,
    ) -> Result<Response<is::UploadChunksResponse>, Status> {
        no()
    }
    async fn commit_image(&self, _: Request<is::CommitImageRequest>) -> Result<Response<is::ImageInfo>, Status> {
        no()
    }
    async fn delete_image(
        &self,
        _: Request<is::DeleteImageRequest>,
    ) -> Result<Response<is::DeleteImageResponse>, Status> {
        no()
    }
    async fn collect_garbage(
        &self,
        _: Request<is::CollectGarbageRequest>,
    ) -> Result<Response<is::CollectGarbageResponse>, Status> {
        no()
    }
    type FetchChunksStream = Boxed<is::Chunk>;
    async fn fetch_chunks(
        &self,
        req: Request<is::FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        let chunks: Vec<Result<is::Chunk, Status>> = req
            .into_inner()
            .digests
            .into_iter()
            .map(|d| {
                let mut bad = noise(CHUNK as usize, 99);
                bad[0] ^= 1;
                Ok(is::Chunk { digest: d, zstd_data: image_client::compress(&bad).into() })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
    type WatchImagesStream = Boxed<is::ImageEvent>;
    async fn watch_images(
        &self,
        _: Request<is::WatchImagesRequest>,
    ) -> Result<Response<Self::WatchImagesStream>, Status> {
        no()
    }
    type ReplicateStream = Boxed<is::ImageEvent>;
    async fn replicate(&self, _: Request<is::ReplicateRequest>) -> Result<Response<Self::ReplicateStream>, Status> {
        no()
    }
}

impl Rig {
    async fn builder(&self) -> imagetool::client::Client {
        let builder = self.pki.role(Role::ImageBuilder).unwrap();
        imagetool::client::connect(&self.server.addr.to_string(), &builder).await.unwrap()
    }

    /// Store `plain` as a chunk on the imageserver; returns its digest.
    async fn upload(&self, plain: &[u8]) -> image_format::Digest {
        let d = image_format::Digest::of(plain);
        let chunk = is::UploadChunk { digest: d.0.to_vec().into(), zstd_data: image_client::compress(plain).into() };
        self.builder().await.upload_chunks(futures::stream::iter(vec![chunk])).await.unwrap();
        d
    }

    /// The imageserver's file for chunk `d`.
    fn chunk_file(&self, d: &image_format::Digest) -> PathBuf {
        let hex = d.to_hex();
        self.path("data/chunks").join(&hex[..2]).join(hex)
    }
}

#[tokio::test]
async fn a_chunk_damaged_on_the_imageserver_is_data_loss_and_never_written() {
    let rig = Rig::new().await;
    let a = disk(21);
    let ma = rig.add("1", &a).await;
    // Damage one stored chunk at rest: another valid frame in its place.
    let image_format::ChunkRef::Data(d) = ma.chunks()[0] else { panic!("chunk 0 holds data") };
    std::fs::write(rig.chunk_file(&d), image_client::compress(&noise(CHUNK as usize, 1))).unwrap();
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-0000000000000021", 64 * CHUNK as u64, true).await;
    let e = unpack(&mut c, "1").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    let server = rig.server.addr.to_string();
    assert!(e.message().contains(&server) && e.message().contains("damaged"), "{}", e.message());
    assert!(dev.read(CHUNK as usize).unwrap().iter().all(|&b| b == 0), "the damaged chunk was not written");
}

#[tokio::test]
async fn a_chunk_longer_than_its_manifest_says_is_never_written() {
    let rig = Rig::new().await;
    // A committed leaf (from before lengths were checked, or altered on
    // disk) whose manifest says one chunk of CHUNK bytes, while the stored
    // chunk is twice as long. Its record is intact.
    let long = rig.upload(&noise(2 * CHUNK as usize, 22)).await;
    let m = Manifest::new(CHUNK, u64::from(CHUNK), vec![image_format::ChunkRef::Data(long)]).unwrap();
    let name = ImageName::new(STREAM, "1").unwrap();
    let record = rig.path("data/images").join(STREAM).join("_leaves").join("1");
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, chunk_store::record::encode(&name, 1, &m)).unwrap();
    let mut c = rig.client().await;
    let dev = rig.bound_device(&mut c, "vol-0000000000000022", 4 * CHUNK as u64, true).await;
    let e = unpack(&mut c, "1").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("manifest gives it"), "{}", e.message());
    assert!(
        dev.read(4 * CHUNK as usize).unwrap().iter().all(|&b| b == 0),
        "nothing written, past the end least of all"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_waiting_for_a_capture_hold_says_what_it_waits_for() {
    let rig = Rig::new().await;
    rig.add("1", &disk(23)).await;
    let mut c = rig.client().await;
    let _dev = rig.bound_device(&mut c, "vol-0000000000000023", 64 * CHUNK as u64, true).await;
    unpack_holding(&mut c, "1", 600).await.unwrap();
    let req = PrepareForUnpackRequest { stream: STREAM.into(), ..Default::default() };
    let mut s = tokio::time::timeout(Duration::from_secs(5), c.prepare_for_unpack(req))
        .await
        .expect("PrepareForUnpack answers at once, not after the hold")
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), s.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.phase, "waiting");
    assert!(first.detail.contains("capture of leaf 1") && first.detail.contains("s left"), "{}", first.detail);
    let mut other = rig.client().await;
    other.release_capture(ReleaseCaptureRequest { stream: STREAM.into(), hold_id: "test".into() }).await.unwrap();
    let last =
        tokio::time::timeout(Duration::from_secs(60), unpacker_client::follow(s, |_| {})).await.unwrap().unwrap();
    assert_eq!(last.phase, "done", "the scan ran once the hold was released");
}

/// A publish that dies while setting up a stream's volume never ends its
/// lease: the lease runs out by itself, and a lease is never longer than
/// the unpacker's cap whatever a caller asks.
#[tokio::test]
async fn a_set_up_lease_whose_holder_went_away_runs_out() {
    use unpacker_client::LeaseRequest;
    let rig = Rig::new().await;
    let mut c = rig.client().await;
    let ask = |owner: &str, seconds: u32| LeaseRequest { stream: STREAM.into(), owner: owner.into(), seconds };
    assert!(c.lease_stream_setup(ask("gone", 1)).await.unwrap().into_inner().granted);
    let refused = c.lease_stream_setup(ask("next", 60)).await.unwrap().into_inner();
    assert!(!refused.granted && refused.holder == "gone", "{refused:?}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let next = c.lease_stream_setup(ask("next", u32::MAX)).await.unwrap().into_inner();
    assert!(next.granted, "the lease of a holder that went away ran out: {next:?}");
    assert_eq!(next.seconds_left, 900, "a lease is capped at the unpacker's 15 minutes: {next:?}");
}

#[tokio::test]
async fn one_caller_at_a_time_sets_up_a_new_streams_volume() {
    use unpacker_client::LeaseRequest;
    let rig = Rig::new().await;
    let mut c = rig.client().await;
    let ask = |owner: &str, seconds: u32| LeaseRequest { stream: STREAM.into(), owner: owner.into(), seconds };
    let a = c.lease_stream_setup(ask("a", 60)).await.unwrap().into_inner();
    assert!(a.granted && a.seconds_left == 60, "{a:?}");
    let b = c.lease_stream_setup(ask("b", 60)).await.unwrap().into_inner();
    assert!(!b.granted && b.holder == "a" && b.seconds_left > 0, "{b:?}");
    assert!(c.lease_stream_setup(ask("a", 60)).await.unwrap().into_inner().granted, "the holder may ask again");
    // Another caller cannot release it; its holder can.
    c.lease_stream_setup(ask("b", 0)).await.unwrap();
    assert!(!c.lease_stream_setup(ask("b", 60)).await.unwrap().into_inner().granted);
    c.lease_stream_setup(ask("a", 0)).await.unwrap();
    assert!(c.lease_stream_setup(ask("b", 60)).await.unwrap().into_inner().granted, "released by its holder");
    // Binding the stream ends the lease: there is nothing left to set up.
    let _dev = rig.bound_device(&mut c, "vol-0000000000000024", 64 * CHUNK as u64, true).await;
    let after = c.lease_stream_setup(ask("a", 60)).await.unwrap().into_inner();
    assert!(!after.granted && after.bound_volume_id == "vol-0000000000000024", "{after:?}");
    let e = c.lease_stream_setup(ask("", 60)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn health_and_reflection_answer_any_certified_client_and_drain_on_stop() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut rig = Rig::new().await;
    // The imageserver's certificate grants no right on an unpacker: the
    // probes answer it, the service does not.
    let tls = rig.pki.role(Role::Imageserver).unwrap();
    let ch = fleet_tls::dial::connect_channel(&rig.unpacker_addr(), &tls, fleet_tls::UNPACKER_TLS_NAME).await.unwrap();
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "fleet.unpacker.v1.ImageUnpacker"] {
        let s = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(s, ServingStatus::Serving as i32, "{service:?}");
    }
    let err = fleet_proto::unpacker::image_unpacker_client::ImageUnpackerClient::new(ch.clone())
        .get_status(GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(ch)
        .server_reflection_info(futures::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"fleet.unpacker.v1.ImageUnpacker") && names.contains(&"grpc.health.v1.Health"),
        "{names:?}"
    );
    assert!(!names.contains(&"fleet.imageserver.v1.ImageServer"), "{names:?}");

    // Stopping: a watcher of its health hears NOT_SERVING before the end.
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let stop = tokio::spawn(async move { rig.stop_unpacker().await });
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap();
    assert_eq!(next.unwrap().unwrap().status, ServingStatus::NotServing as i32);
    drop(watch);
    stop.await.unwrap();
}
