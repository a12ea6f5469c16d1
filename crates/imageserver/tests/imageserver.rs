//! The imageserver and imagetool on loopback with real mutual TLS.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fleet_pki::{Ca, Issued, LeafSpec, Role};
use fleet_proto::imageserver::{
    CommitImageRequest, FindMissingChunksRequest, GetManifestRequest, ListImagesRequest, ListStreamsRequest,
    UploadChunk, image_server_client::ImageServerClient,
};
use fleet_tls::TlsFiles;
use image_format::{ChunkRef, Digest, ImageName, Manifest};
use imagetool::{Progress, client::Client};
use tonic::{
    Code,
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

/// Test chunk size: small, so that modest files have many chunks.
const CHUNK: u32 = 64 * 1024;

/// Where a test's imageserver keeps its images: every test of the store's
/// rules runs on both (see the end of this file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    S3,
}

/// The bucket and prefix of the S3 variant.
const BUCKET: &str = "test-images";
const PREFIX: &str = "fleet";

struct World {
    dir: tempfile::TempDir,
    ca: Ca,
    server: Option<imageserver::Running>,
    /// moto's S3, for the S3 variant.
    objects: Option<local_world::ObjectStore>,
}

impl World {
    async fn new() -> World {
        World::on(Kind::Dir).await
    }

    async fn on(kind: Kind) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut w = World { dir, ca: Ca::new("test CA").unwrap(), server: None, objects: None };
        let issued = w.ca.issue(&LeafSpec::for_role(Role::Imageserver)).unwrap();
        let tls = w.write_identity("server", &issued);
        let store = match kind {
            Kind::Dir => imageserver::Store::Dir(w.dir.path().join("data")),
            Kind::S3 => {
                let objects = local_world::ObjectStore::start().unwrap();
                objects.bucket(BUCKET).await.unwrap();
                let at = format!("s3://{BUCKET}/{PREFIX}").parse().unwrap();
                let store = imageserver::Store::S3 { at, aws: Some(Box::new(objects.sdk_config())) };
                w.objects = Some(objects);
                store
            }
        };
        let mut config = imageserver::Config::new("127.0.0.1:0".parse().unwrap(), store, tls);
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        w.server = Some(imageserver::start(config).await.unwrap());
        w
    }

    /// The stored bytes of an object of the store (`chunks/ab/abcd…`,
    /// `images/STREAM/_leaves/LEAF`), read behind the server's back.
    async fn object(&self, key: &str) -> Vec<u8> {
        match &self.objects {
            None => read(&self.dir.path().join("data").join(key)),
            Some(o) => o
                .client()
                .get_object()
                .bucket(BUCKET)
                .key(format!("{PREFIX}/{key}"))
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .to_vec(),
        }
    }

    /// Write an object of the store behind the server's back (damage).
    async fn put_object(&self, key: &str, bytes: &[u8]) {
        match &self.objects {
            None => {
                let p = self.dir.path().join("data").join(key);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            Some(o) => {
                o.client()
                    .put_object()
                    .bucket(BUCKET)
                    .key(format!("{PREFIX}/{key}"))
                    .body(bytes.to_vec().into())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    fn addr(&self) -> String {
        self.server.as_ref().unwrap().addr.to_string()
    }

    fn write_identity(&self, name: &str, issued: &Issued) -> TlsFiles {
        let d = self.dir.path().join("pki").join(name);
        fleet_pki::write_ssl_dir(&d, &self.ca, issued).unwrap();
        TlsFiles::from_ssl_dir(&d)
    }

    async fn client(&self, role: Role) -> Client {
        let issued = self.ca.issue(&LeafSpec::for_role(role)).unwrap();
        let tls = self.write_identity(role.name(), &issued);
        imagetool::client::connect(&self.addr(), &tls).await.unwrap()
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Deterministic bytes that do not compress much.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// A disk-like image: data, a long zero run, more data, and a size that is
/// not a multiple of the chunk size.
fn disk(seed: u64) -> Vec<u8> {
    let mut d = noise(40 * CHUNK as usize + 12_345, seed);
    d[3 * CHUNK as usize..20 * CHUNK as usize].fill(0);
    d
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

async fn round_trip_is_bit_for_bit_with_zero_regions_and_a_short_tail(store: Kind) {
    let w = World::on(store).await;
    let mut builder = w.client(Role::ImageBuilder).await;
    let data = disk(1);
    let src = w.file("disk.raw", &data);
    let name = ImageName::parse("base/debian-12/1").unwrap();
    let added = imagetool::add(&mut builder, &name, &src, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(added.zero_chunks, 17);
    assert_eq!(added.chunks_uploaded, 41 - 17);
    let local = image_format::hash_file(&src, CHUNK, |_| {}).unwrap();
    assert_eq!(added.image_id, local.image_id().to_hex());

    // A reader (the unpacker role) gets the same bytes back.
    let mut reader = w.client(Role::ImageUnpacker).await;
    let out = w.dir.path().join("out.raw");
    let got = imagetool::get(&mut reader, &name, &out, Progress::Hidden).await.unwrap();
    assert_eq!(read(&out), data);
    assert_eq!(got.image_id, added.image_id);
    assert_eq!(got.chunks_fetched, 24);
    let (info, checked) = imagetool::verify(&mut reader, &name, Progress::Hidden).await.unwrap();
    assert_eq!(checked, 24);
    // To /dev/null: every chunk fetched and checked, nothing kept, and
    // /dev/null is still the device (not replaced by a file).
    let to_null = imagetool::get(&mut reader, &name, Path::new("/dev/null"), Progress::Hidden).await.unwrap();
    assert_eq!((to_null.chunks_fetched, to_null.image_id.as_str()), (24, added.image_id.as_str()));
    let null = std::fs::metadata("/dev/null").unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&null.file_type()), "/dev/null was replaced");
    assert_eq!(info.size_bytes, data.len() as u64);

    let streams = reader.list_streams(ListStreamsRequest {}).await.unwrap().into_inner().streams;
    assert_eq!(streams, vec!["base/debian-12".to_owned()]);
}

async fn re_adding_a_changed_leaf_sends_only_changed_chunks(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let v1 = disk(2);
    let mut v2 = v1.clone();
    // Change three chunks (one of them previously zero).
    for chunk in [1usize, 5, 30] {
        let at = chunk * CHUNK as usize + 100;
        v2[at..at + 10].copy_from_slice(b"0123456789");
    }
    let f1 = w.file("v1.raw", &v1);
    let f2 = w.file("v2.raw", &v2);
    let n1 = ImageName::parse("app/1").unwrap();
    let n2 = ImageName::parse("app/2").unwrap();
    let first = imagetool::add(&mut c, &n1, &f1, CHUNK, Progress::Hidden).await.unwrap();
    let second = imagetool::add(&mut c, &n2, &f2, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(second.chunks_uploaded, 3);
    assert_eq!(second.bytes_uploaded_plain, 3 * u64::from(CHUNK));
    assert!(second.bytes_sent < first.bytes_sent / 5, "{second:?}");

    // Same leaf, same bytes: accepted, nothing sent.
    let again = imagetool::add(&mut c, &n1, &f1, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(again.chunks_uploaded, 0);
    // Same leaf, other bytes: refused, and the leaf keeps its bytes.
    let err = imagetool::add(&mut c, &n1, &f2, CHUNK, Progress::Hidden).await.unwrap_err();
    assert!(format!("{err:#}").contains("immutable"), "{err:#}");
    let out = w.dir.path().join("back.raw");
    imagetool::get(&mut c, &n1, &out, Progress::Hidden).await.unwrap();
    assert_eq!(read(&out), v1);
}

async fn raw_client(addr: &str, ca_pem: &str, identity: Option<&Issued>) -> Result<Client, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("imageserver");
    if let Some(i) = identity {
        tls = tls.identity(Identity::from_pem(&i.cert_pem, &i.key_pem));
    }
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(ImageServerClient::new(ch))
}

/// The request must fail: at the handshake, or at the first RPC (TLS 1.3
/// clients learn of a refused certificate only then).
async fn assert_refused(addr: &str, ca_pem: &str, identity: Option<&Issued>, what: &str) {
    match raw_client(addr, ca_pem, identity).await {
        Err(_) => {}
        Ok(mut c) => {
            let r = c.list_streams(ListStreamsRequest {}).await;
            assert!(r.is_err(), "{what}: request was served");
        }
    }
}

#[tokio::test]
async fn clients_without_a_valid_certificate_or_right_are_refused() {
    let w = World::new().await;
    let addr = w.addr();
    let ca_pem = w.ca.cert_pem().to_owned();
    // Sanity: a proper reader is served.
    let reader = w.ca.issue(&LeafSpec::for_role(Role::ImageUnpacker)).unwrap();
    let mut ok = raw_client(&addr, &ca_pem, Some(&reader)).await.unwrap();
    ok.list_streams(ListStreamsRequest {}).await.unwrap();

    assert_refused(&addr, &ca_pem, None, "no certificate").await;
    let other = Ca::new("someone else").unwrap();
    let foreign = other.issue(&LeafSpec::for_role(Role::ImageBuilder)).unwrap();
    assert_refused(&addr, &ca_pem, Some(&foreign), "certificate from another CA").await;
    let mut spec = LeafSpec::for_role(Role::ImageBuilder);
    spec.valid_from = time_days(-30);
    spec.valid_until = time_days(-1);
    let expired = w.ca.issue(&spec).unwrap();
    assert_refused(&addr, &ca_pem, Some(&expired), "expired certificate").await;

    // A reader may not write or replicate.
    let err = ok.find_missing_chunks(FindMissingChunksRequest { digests: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("lacks the 'write' right"), "{}", err.message());
    let err = ok.replicate(fleet_proto::imageserver::ReplicateRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("'replicate'"), "{}", err.message());
    // A certificate with no rights may not even read.
    let mut spec = LeafSpec::for_role(Role::ImageBuilder);
    spec.rights = vec![];
    let nobody = w.ca.issue(&spec).unwrap();
    let mut c = raw_client(&addr, &ca_pem, Some(&nobody)).await.unwrap();
    let err = c.list_streams(ListStreamsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("'read'"), "{}", err.message());
}

fn time_days(d: i64) -> time::Duration {
    time::Duration::days(d)
}

async fn a_corrupted_chunk_upload_is_refused_and_not_stored(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let real = noise(CHUNK as usize, 7);
    let claimed = Digest::of(&real);
    let mut tampered = real.clone();
    tampered[10] ^= 0xff;
    let upload = futures::stream::iter(vec![UploadChunk {
        digest: claimed.0.to_vec().into(),
        zstd_data: chunk_store::compress(&tampered).into(),
    }]);
    let err = c.upload_chunks(upload).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match its digest"), "{}", err.message());
    let missing = c
        .find_missing_chunks(FindMissingChunksRequest { digests: vec![claimed.0.to_vec().into()] })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing.len(), 1, "the bad chunk was stored");
    // And an image that needs it cannot be committed.
    let m = image_format::Manifest::new(CHUNK, u64::from(CHUNK), vec![image_format::ChunkRef::Data(claimed)]).unwrap();
    let err = c
        .commit_image(CommitImageRequest { stream: "s".into(), leaf: "1".into(), manifest: m.encode().into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("missing"), "{}", err.message());
}

#[tokio::test]
async fn bad_names_and_manifests_are_refused() {
    let w = World::new().await;
    let mut c = w.client(Role::ImageBuilder).await;
    for (stream, leaf) in [("../etc", "passwd"), ("/abs", "1"), ("ok", "a/b"), ("ok", ".."), ("a//b", "1")] {
        let err = c.get_manifest(GetManifestRequest { stream: stream.into(), leaf: leaf.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{stream}/{leaf}");
        assert!(err.message().contains("invalid"), "{}", err.message());
    }
    let err = c.list_images(ListImagesRequest { stream: "x/../y".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .commit_image(CommitImageRequest { stream: "s".into(), leaf: "1".into(), manifest: b"garbage".to_vec().into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("manifest"), "{}", err.message());
    let err = c.get_manifest(GetManifestRequest { stream: "s".into(), leaf: "404".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn a_replica_catches_up_and_follows_the_master(store: Kind) {
    let master = World::on(store).await;
    let mut writer = master.client(Role::ImageBuilder).await;
    let v1 = disk(3);
    let n1 = ImageName::parse("base/os/1").unwrap();
    let a1 = imagetool::add(&mut writer, &n1, &master.file("v1.raw", &v1), CHUNK, Progress::Hidden).await.unwrap();

    // The replica's certificate comes from the master's CA.
    let rdir = tempfile::tempdir().unwrap();
    let rissued = master.ca.issue(&LeafSpec::for_role(Role::Imageserver)).unwrap();
    fleet_pki::write_ssl_dir(&rdir.path().join("pki"), &master.ca, &rissued).unwrap();
    let replica = imageserver::start(imageserver::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: imageserver::Store::Dir(rdir.path().join("data")),
        cache: None,
        poll: imageserver::DEFAULT_POLL,
        tls: TlsFiles::from_ssl_dir(&rdir.path().join("pki")),
        replicate_from: Some(master.addr()),
    })
    .await
    .unwrap();
    let reader_issued = master.ca.issue(&LeafSpec::for_role(Role::ImageUnpacker)).unwrap();
    fleet_pki::write_ssl_dir(&rdir.path().join("reader"), &master.ca, &reader_issued).unwrap();
    let mut reader =
        imagetool::client::connect(&replica.addr.to_string(), &TlsFiles::from_ssl_dir(&rdir.path().join("reader")))
            .await
            .unwrap();

    let info = wait_for_image(&mut reader, &n1).await;
    assert_eq!(info, a1.image_id);

    // A new commit on the master reaches the replica within seconds, moving
    // only the chunks it lacks.
    let mut v2 = v1.clone();
    v2[100..120].fill(0xAB);
    let n2 = ImageName::parse("base/os/2").unwrap();
    let a2 = imagetool::add(&mut writer, &n2, &master.file("v2.raw", &v2), CHUNK, Progress::Hidden).await.unwrap();
    let t = Instant::now();
    assert_eq!(wait_for_image(&mut reader, &n2).await, a2.image_id);
    assert!(t.elapsed() < Duration::from_secs(10));
    let out = rdir.path().join("out.raw");
    imagetool::get(&mut reader, &n2, &out, Progress::Hidden).await.unwrap();
    assert_eq!(read(&out), v2);
    assert_eq!(replica.metrics.images_replicated.get(), 2);

    // The replica refuses writes.
    let rw = master.ca.issue(&LeafSpec::for_role(Role::ImageBuilder)).unwrap();
    fleet_pki::write_ssl_dir(&rdir.path().join("writer"), &master.ca, &rw).unwrap();
    let mut rwc =
        imagetool::client::connect(&replica.addr.to_string(), &TlsFiles::from_ssl_dir(&rdir.path().join("writer")))
            .await
            .unwrap();
    let err =
        imagetool::add(&mut rwc, &ImageName::parse("x/1").unwrap(), &out, CHUNK, Progress::Hidden).await.unwrap_err();
    assert!(format!("{err:#}").contains("read-only replica"), "{err:#}");
}

async fn wait_for_image(c: &mut Client, name: &ImageName) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(resp) =
            c.get_manifest(GetManifestRequest { stream: name.stream().into(), leaf: name.leaf().into() }).await
        {
            return resp.into_inner().info.unwrap().image_id;
        }
        assert!(Instant::now() < deadline, "{name} did not reach the replica within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics_and_status_are_served_over_plain_http(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let name = ImageName::parse("m/1").unwrap();
    imagetool::add(&mut c, &name, &w.file("d.raw", &disk(4)), CHUNK, Progress::Hidden).await.unwrap();
    let addr = w.server.as_ref().unwrap().metrics_addr.unwrap();
    let metrics =
        tokio::task::spawn_blocking(move || (http_get(addr, "/metrics"), http_get(addr, "/status"))).await.unwrap();
    assert!(metrics.0.contains("imageserver_images_committed_total 1"), "{}", metrics.0);
    assert!(metrics.0.contains("imageserver_chunks_stored_total 24"), "{}", metrics.0);
    assert!(metrics.1.contains("\"images\":1"), "{}", metrics.1);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn watchers_hear_of_new_commits_in_their_stream(store: Kind) {
    let w = World::on(store).await;
    let mut reader = w.client(Role::ImageUnpacker).await;
    let mut events = reader
        .watch_images(fleet_proto::imageserver::WatchImagesRequest { stream: "watched".into() })
        .await
        .unwrap()
        .into_inner();
    let mut c = w.client(Role::ImageBuilder).await;
    let f = w.file("d.raw", &disk(5));
    imagetool::add(&mut c, &ImageName::parse("other/1").unwrap(), &f, CHUNK, Progress::Hidden).await.unwrap();
    let added =
        imagetool::add(&mut c, &ImageName::parse("watched/7").unwrap(), &f, CHUNK, Progress::Hidden).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
    let info = ev.info.unwrap();
    assert_eq!((info.stream.as_str(), info.leaf.as_str()), ("watched", "7"), "the other stream's commit leaked");
    assert_eq!(info.image_id, added.image_id);
}

#[tokio::test]
async fn qcow2_input_is_converted_and_gives_the_same_image_as_raw() {
    let w = World::new().await;
    let mut c = w.client(Role::ImageBuilder).await;
    // qcow2 sizes are whole 512-byte sectors.
    let mut data = disk(6);
    data.truncate(data.len() / 512 * 512);
    let raw = w.file("d.raw", &data);
    let qcow = w.dir.path().join("d.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .expect("qemu-img is needed for this test (Debian package qemu-utils)");
    assert!(status.success());
    let from_qcow =
        imagetool::add(&mut c, &ImageName::parse("q/1").unwrap(), &qcow, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(from_qcow.converted_from.as_deref(), Some("qcow2"));
    let local = image_format::hash_file(&raw, CHUNK, |_| {}).unwrap();
    assert_eq!(from_qcow.image_id, local.image_id().to_hex());
    let out = w.dir.path().join("back.raw");
    imagetool::get(&mut c, &ImageName::parse("q/1").unwrap(), &out, Progress::Hidden).await.unwrap();
    assert_eq!(read(&out), data);
}

async fn deleted_images_vanish_and_gc_frees_their_chunks(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let name = ImageName::parse("tmp/1").unwrap();
    imagetool::add(&mut c, &name, &w.file("d.raw", &disk(8)), CHUNK, Progress::Hidden).await.unwrap();
    c.delete_image(fleet_proto::imageserver::DeleteImageRequest { stream: "tmp".into(), leaf: "1".into() })
        .await
        .unwrap();
    let err = c.get_manifest(GetManifestRequest { stream: "tmp".into(), leaf: "1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let gc = fleet_proto::imageserver::CollectGarbageRequest { grace_seconds: 0, dry_run: false };
    let r = c.collect_garbage(gc).await.unwrap().into_inner();
    assert_eq!(r.chunks_removed, 24);
    assert_eq!(r.chunks_kept, 0);
}

/// The key of the record of STREAM/LEAF in the store.
fn record_key(stream: &str, leaf: &str) -> String {
    format!("images/{stream}/_leaves/{leaf}")
}

/// The key of a chunk in the store.
fn chunk_key(d: &Digest) -> String {
    let hex = d.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

fn name(s: &str) -> ImageName {
    ImageName::parse(s).unwrap()
}

async fn a_damaged_record_is_refused_on_every_read_and_hides_no_other_leaf(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let f = w.file("d.raw", &disk(9));
    imagetool::add(&mut c, &name("s/1"), &f, CHUNK, Progress::Hidden).await.unwrap();
    let two = imagetool::add(&mut c, &name("s/2"), &f, CHUNK, Progress::Hidden).await.unwrap();
    // One bit of the newest leaf's size field: magic, time and name length
    // (18 bytes), the name "s/2", the image id, then the manifest whose
    // size field starts at byte 14.
    let key = record_key("s", "2");
    let mut bytes = w.object(&key).await;
    bytes[18 + 3 + 32 + 14] ^= 1;
    w.put_object(&key, &bytes).await;

    let err = c.get_manifest(GetManifestRequest { stream: "s".into(), leaf: "2".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("s/2") && err.message().contains("checksum"), "{}", err.message());
    let err = imagetool::verify(&mut c, &name("s/2"), Progress::Hidden).await.unwrap_err();
    assert!(format!("{err:#}").contains("damaged"), "{err:#}");
    let out = w.dir.path().join("out.raw");
    assert!(imagetool::get(&mut c, &name("s/2"), &out, Progress::Hidden).await.is_err());
    assert!(!out.exists());

    // The stream still lists and serves its good leaf, and names the bad.
    let l = c.list_images(ListImagesRequest { stream: "s".into() }).await.unwrap().into_inner();
    assert_eq!(l.images.iter().map(|i| i.leaf.as_str()).collect::<Vec<_>>(), ["1"]);
    assert_eq!(l.damaged.len(), 1);
    assert_eq!(l.damaged[0].leaf, "2");
    assert!(l.damaged[0].reason.contains("checksum"), "{}", l.damaged[0].reason);
    let latest = c
        .find_latest_image(fleet_proto::imageserver::FindLatestImageRequest { stream: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.leaf, "1", "the newest intact leaf");
    imagetool::verify(&mut c, &name("s/1"), Progress::Hidden).await.unwrap();
    // A re-commit over the damage is refused, not silently accepted.
    assert!(imagetool::add(&mut c, &name("s/2"), &f, CHUNK, Progress::Hidden).await.is_err());

    // Garbage collection cannot tell the damaged leaf's chunks from garbage.
    let gc = fleet_proto::imageserver::CollectGarbageRequest { grace_seconds: 0, dry_run: false };
    let err = c.collect_garbage(gc).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("damaged"), "{}", err.message());
    // Deleting the damaged leaf clears it; then it can be added again.
    c.delete_image(fleet_proto::imageserver::DeleteImageRequest { stream: "s".into(), leaf: "2".into() })
        .await
        .unwrap();
    c.collect_garbage(gc).await.unwrap();
    let again = imagetool::add(&mut c, &name("s/2"), &f, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(again.image_id, two.image_id);
}

/// Upload `plain` as one chunk; returns its digest.
async fn upload(c: &mut Client, plain: &[u8]) -> Digest {
    let d = Digest::of(plain);
    let chunk = UploadChunk { digest: d.0.to_vec().into(), zstd_data: chunk_store::compress(plain).into() };
    c.upload_chunks(futures::stream::iter(vec![chunk])).await.unwrap();
    d
}

async fn a_commit_whose_chunks_are_not_the_lengths_its_manifest_implies_is_refused(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let long = upload(&mut c, &noise(2 * CHUNK as usize, 1)).await;
    let short = upload(&mut c, &noise(CHUNK as usize / 2, 2)).await;
    let cases = [
        ("over-long", Manifest::new(CHUNK, u64::from(CHUNK), vec![ChunkRef::Data(long)]).unwrap()),
        (
            "over-short",
            Manifest::new(CHUNK, 2 * u64::from(CHUNK), vec![ChunkRef::Data(short), ChunkRef::Zero]).unwrap(),
        ),
    ];
    for (what, m) in cases {
        let err = c
            .commit_image(CommitImageRequest { stream: "s".into(), leaf: "1".into(), manifest: m.encode().into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}");
        assert!(err.message().contains("manifest gives chunk"), "{what}: {}", err.message());
    }
    assert!(c.list_streams(ListStreamsRequest {}).await.unwrap().into_inner().streams.is_empty());
    // The same chunk in a slot of its own length is fine.
    let m = Manifest::new(CHUNK, u64::from(CHUNK) + u64::from(CHUNK / 2), vec![ChunkRef::Zero, ChunkRef::Data(short)])
        .unwrap();
    c.commit_image(CommitImageRequest { stream: "s".into(), leaf: "1".into(), manifest: m.encode().into() })
        .await
        .unwrap();
}

async fn readers_refuse_a_chunk_whose_length_is_not_the_manifests(store: Kind) {
    // A leaf committed before lengths were checked (or a store altered on
    // disk): its manifest gives its chunk one length, the stored chunk has
    // another. The record itself is intact.
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let long = upload(&mut c, &noise(2 * CHUNK as usize, 3)).await;
    let short = upload(&mut c, &noise(CHUNK as usize / 2, 4)).await;
    let cases = [
        ("1", Manifest::new(CHUNK, u64::from(CHUNK), vec![ChunkRef::Data(long)]).unwrap(), 2 * CHUNK),
        (
            "2",
            Manifest::new(CHUNK, 2 * u64::from(CHUNK), vec![ChunkRef::Data(short), ChunkRef::Zero]).unwrap(),
            CHUNK / 2,
        ),
    ];
    for (leaf, m, got) in cases {
        w.put_object(&record_key("s", leaf), &chunk_store::record::encode(&name(&format!("s/{leaf}")), 1, &m)).await;
        let n = name(&format!("s/{leaf}"));
        let out = w.dir.path().join("out.raw");
        let err = imagetool::get(&mut c, &n, &out, Progress::Hidden).await.unwrap_err();
        let want = format!("is {got} bytes but the manifest gives it {CHUNK}");
        assert!(format!("{err:#}").contains(&want), "get {n}: {err:#}");
        assert!(!out.exists(), "nothing is written for {n}");
        let err = imagetool::verify(&mut c, &n, Progress::Hidden).await.unwrap_err();
        assert!(format!("{err:#}").contains(&want), "verify {n}: {err:#}");
    }
}

async fn a_chunk_damaged_at_rest_is_data_loss_for_readers(store: Kind) {
    let w = World::on(store).await;
    let mut c = w.client(Role::ImageBuilder).await;
    let plain = noise(CHUNK as usize, 5);
    let d = upload(&mut c, &plain).await;
    let mut other = plain.clone();
    other[0] ^= 1;
    w.put_object(&chunk_key(&d), &chunk_store::compress(&other)).await;
    let mut s = c
        .fetch_chunks(fleet_proto::imageserver::FetchChunksRequest { digests: vec![d.0.to_vec().into()] })
        .await
        .unwrap()
        .into_inner();
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("damaged"), "{}", err.message());
}

/// `qemu-img convert` of `raw` to qcow2 at `out`.
fn to_qcow2(raw: &Path, out: &Path) {
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out)
        .status()
        .expect("qemu-img is needed for this test (Debian package qemu-utils)")
        .success();
    assert!(ok);
}

#[tokio::test]
async fn a_truncated_or_corrupted_qcow2_is_refused() {
    let w = World::new().await;
    let mut c = w.client(Role::ImageBuilder).await;
    let mut data = disk(10);
    data.truncate(data.len() / 512 * 512);
    let raw = w.file("d.raw", &data);
    let qcow = w.dir.path().join("d.qcow2");
    to_qcow2(&raw, &qcow);
    let whole = read(&qcow);

    let cut = w.file("cut.qcow2", &whole[..whole.len() / 2]);
    let err = imagetool::add(&mut c, &name("q/1"), &cut, CHUNK, Progress::Hidden).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("cut.qcow2") && msg.contains("damaged qcow2 image") && msg.contains("corruptions"), "{msg}");

    // The first L1 entry with reserved bits set: qemu-img would read the
    // whole disk as zeros and convert it without a word.
    let mut bad = whole.clone();
    let l1 = usize::try_from(u64::from_be_bytes(bad[40..48].try_into().unwrap())).unwrap();
    bad[l1..l1 + 4].copy_from_slice(&[0xff; 4]);
    let bad = w.file("bad.qcow2", &bad);
    let err = imagetool::add(&mut c, &name("q/1"), &bad, CHUNK, Progress::Hidden).await.unwrap_err();
    assert!(format!("{err:#}").contains("damaged qcow2 image"), "{err:#}");

    assert!(c.list_streams(ListStreamsRequest {}).await.unwrap().into_inner().streams.is_empty(), "nothing added");
    // The intact file still goes in.
    imagetool::add(&mut c, &name("q/1"), &qcow, CHUNK, Progress::Hidden).await.unwrap();
}

#[tokio::test]
async fn a_refused_client_certificate_is_named_in_the_error() {
    let w = World::new().await;
    let mut spec = LeafSpec::for_role(Role::ImageBuilder);
    spec.valid_from = time_days(-30);
    spec.valid_until = time_days(-1);
    let expired = w.ca.issue(&spec).unwrap();
    let other = Ca::new("someone else").unwrap();
    let foreign = other.issue(&LeafSpec::for_role(Role::ImageBuilder)).unwrap();
    for (who, issued, want) in
        [("expired", expired, "it has expired"), ("foreign", foreign, "not signed by the CA the server trusts")]
    {
        // The client trusts the server; only its own certificate is wrong.
        let d = w.dir.path().join("pki").join(who);
        fleet_pki::write_ssl_dir(&d, &w.ca, &issued).unwrap();
        let tls = TlsFiles::from_ssl_dir(&d);
        let msg = match imagetool::client::connect(&w.addr(), &tls).await {
            Err(e) => e.to_string(),
            Ok(mut c) => c
                .list_streams(ListStreamsRequest {})
                .await
                .map_err(imagetool::client::rpc("list streams"))
                .unwrap_err()
                .to_string(),
        };
        assert!(msg.contains(want), "{who}: {msg}");
    }
}

/// Each test of the store's rules, once per store.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod dir {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Kind::Dir).await
            })*
        }
        mod s3 {
            $(#[tokio::test]
            async fn $test() {
                super::$test(super::Kind::S3).await
            })*
        }
    };
}

on_both_stores!(
    round_trip_is_bit_for_bit_with_zero_regions_and_a_short_tail,
    re_adding_a_changed_leaf_sends_only_changed_chunks,
    a_corrupted_chunk_upload_is_refused_and_not_stored,
    a_replica_catches_up_and_follows_the_master,
    metrics_and_status_are_served_over_plain_http,
    watchers_hear_of_new_commits_in_their_stream,
    deleted_images_vanish_and_gc_frees_their_chunks,
    a_damaged_record_is_refused_on_every_read_and_hides_no_other_leaf,
    a_commit_whose_chunks_are_not_the_lengths_its_manifest_implies_is_refused,
    readers_refuse_a_chunk_whose_length_is_not_the_manifests,
    a_chunk_damaged_at_rest_is_data_loss_for_readers,
);
