//! kill -9 of the image-unpacker daemon in the middle of an unpack: after a
//! restart the stream is dirty, and prepare + unpack bring the device to the
//! exact bytes of the leaf.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fleet_pki::Role;
use image_format::ImageName;
use test_support::{Pki, ScratchDevice, noise};
use unpacker_client::{
    AssociateRequest, ClaimDeviceRequest, Client, GetStatusRequest, PrepareForUnpackRequest, StreamState,
    UnpackImageRequest,
};

const STREAM: &str = "base/crash";
const SIZE: usize = 256 << 20;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(pki: &Pki, dir: &std::path::Path, port: u16, image_server: &str) -> Daemon {
    let tls = pki.role(Role::ImageUnpacker).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_image-unpacker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "off", "--image-server", image_server])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--device-dir")
        .arg(dir.join("by-id"))
        .arg("--ca")
        .arg(&tls.ca)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Daemon(child)
}

async fn connect(port: u16, pki: &Pki) -> Client {
    let tls = pki.role(Role::AmiPublisher).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match unpacker_client::connect(&format!("127.0.0.1:{port}"), &tls).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("the unpacker never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn kill_mid_unpack_then_prepare_and_unpack_recover_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("by-id")).unwrap();
    let pki = Pki::new(&dir.path().join("pki")).unwrap();
    let server = test_support::imageserver(&pki, &dir.path().join("data")).await.unwrap();
    let image = noise(SIZE, 11);
    let file = dir.path().join("leaf.raw");
    std::fs::write(&file, &image).unwrap();
    let builder = pki.role(Role::ImageBuilder).unwrap();
    let mut b = imagetool::client::connect(&server.addr.to_string(), &builder).await.unwrap();
    let name = ImageName::new(STREAM, "1").unwrap();
    imagetool::add(&mut b, &name, &file, image_format::DEFAULT_CHUNK_SIZE, imagetool::Progress::Hidden).await.unwrap();

    let port = free_port();
    let mut daemon = spawn(&pki, dir.path(), port, &server.addr.to_string());
    let mut c = connect(port, &pki).await;
    let dev = ScratchDevice::new(&dir.path().join("vol.img"), SIZE as u64 + (8 << 20)).unwrap();
    eprintln!("device: {}", dev.describe());
    let claim = ClaimDeviceRequest {
        volume_id: "vol-00000000000000c1".into(),
        path: dev.path.display().to_string(),
        fresh: true,
    };
    c.claim_device(claim).await.unwrap();
    c.associate_stream_with_device(AssociateRequest {
        stream: STREAM.into(),
        volume_id: "vol-00000000000000c1".into(),
    })
    .await
    .unwrap();
    let mut progress = c
        .unpack_image(UnpackImageRequest { stream: STREAM.into(), leaf: "1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // Kill at the first progress report that shows bytes written.
    loop {
        let p = progress.message().await.unwrap().expect("the unpack ended before it could be interrupted");
        assert!(p.stats.is_none(), "the unpack finished before it could be interrupted");
        if p.done_bytes > 0 {
            eprintln!("killing at {} of {} bytes", p.done_bytes, p.total_bytes);
            break;
        }
    }
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    drop(daemon);

    let _daemon = spawn(&pki, dir.path(), port, &server.addr.to_string());
    let mut c = connect(port, &pki).await;
    let st = c.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.streams[0].state(), StreamState::Dirty, "a cut-short unpack leaves the stream dirty");
    assert_eq!(st.streams[0].leaf, "", "a dirty stream claims no leaf");
    assert_ne!(dev.read(SIZE).unwrap(), image, "the kill really cut the unpack short");

    let p = c
        .prepare_for_unpack(PrepareForUnpackRequest {
            stream: STREAM.into(),
            skip_if_prepared: true,
            do_not_wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    let last = unpacker_client::follow(p, |_| {}).await.unwrap();
    assert_eq!(last.result.unwrap().state(), StreamState::Prepared, "skip-if-prepared still rescans a dirty device");
    let p = c
        .unpack_image(UnpackImageRequest { stream: STREAM.into(), leaf: "1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let stats = unpacker_client::follow(p, |_| {}).await.unwrap().stats.unwrap();
    assert!(stats.chunks_unchanged > 0, "chunks written before the kill are kept: {stats:?}");
    assert_eq!(dev.read(SIZE).unwrap(), image, "the device holds the exact leaf");
}
