//! kill -9 of the imageserver binary in the middle of an upload: after a
//! restart no chunk is torn, no half image is visible, and the re-run upload
//! sends only what is still missing.

use std::{
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use chunk_store::ChunkStore;
use fleet_pki::{Ca, LeafSpec, Role};
use fleet_tls::TlsFiles;
use image_format::{Digest, ImageName};
use imagetool::Progress;

const CHUNK: u32 = 64 * 1024;

fn start(dir: &Path, addr: &str) -> Child {
    let pki = dir.join("server");
    let child = Command::new(env!("CARGO_BIN_EXE_imageserver"))
        .args(["--listen", addr, "--metrics-listen", "off", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--ca")
        .arg(pki.join("CA.pem"))
        .arg("--cert")
        .arg(pki.join("cert.pem"))
        .arg("--key")
        .arg(pki.join("key.pem"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "imageserver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn chunk_files(data: &Path) -> Vec<Digest> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(data.join("chunks")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            out.push(Digest::from_hex(&f.unwrap().file_name().to_string_lossy()).unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_upload_leaves_no_torn_chunk_and_no_half_image() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("crash test").unwrap();
    fleet_pki::write_ssl_dir(
        &dir.path().join("server"),
        &ca,
        &ca.issue(&LeafSpec::for_role(Role::Imageserver)).unwrap(),
    )
    .unwrap();
    let ssl = dir.path().join("client");
    fleet_pki::write_ssl_dir(&ssl, &ca, &ca.issue(&LeafSpec::for_role(Role::ImageBuilder)).unwrap()).unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();

    // 1024 distinct chunks of noise: long enough to be killed mid-way.
    let mut data = vec![0u8; 1024 * CHUNK as usize];
    blake3::Hasher::new().update(b"crash test").finalize_xof().fill(&mut data);
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, &data).unwrap();
    let name = ImageName::parse("crash/1").unwrap();

    let mut server = start(dir.path(), &addr);
    let tls = TlsFiles::from_ssl_dir(&ssl);
    let mut client = imagetool::client::connect(&addr, &tls).await.unwrap();
    let (n, f) = (name.clone(), file.clone());
    let upload = tokio::spawn(async move { imagetool::add(&mut client, &n, &f, CHUNK, Progress::Hidden).await });
    let data_dir = dir.path().join("data");
    let deadline = Instant::now() + Duration::from_secs(60);
    while chunk_files(&data_dir).len() < 100 {
        assert!(Instant::now() < deadline, "upload did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    assert!(upload.await.unwrap().is_err(), "the upload cannot have succeeded");

    let stored = chunk_files(&data_dir);
    assert!(stored.len() < 1024, "the kill came too late to test anything");
    // Every chunk file that exists is whole and matches its name.
    let store = ChunkStore::open(&data_dir).unwrap();
    for d in &stored {
        store.get_plain(d).unwrap_or_else(|e| panic!("torn chunk after kill -9: {e}"));
    }
    assert!(store.list_streams().unwrap().is_empty(), "a half image is visible");
    drop(store);

    // Restart; re-running the add uploads only what is missing.
    let mut server = start(dir.path(), &addr);
    let mut client = imagetool::client::connect(&addr, &tls).await.unwrap();
    let r = imagetool::add(&mut client, &name, &file, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(r.chunks_reused, stored.len() as u64);
    assert_eq!(r.chunks_uploaded, 1024 - stored.len() as u64);
    let out = dir.path().join("back.raw");
    imagetool::get(&mut client, &name, &out, Progress::Hidden).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    server.kill().unwrap();
    let _ = server.wait();
}
