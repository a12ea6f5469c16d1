//! Several imageservers on one S3 bucket (moto's, with S3's atomic
//! conditional writes): what one commits the others serve and announce;
//! one leaf is committed once; garbage collection on one keeps what another
//! promised an upload in flight; a collection elsewhere holds writers; a
//! server killed mid-upload leaves no half image; an unreachable bucket
//! gives clear errors and readiness says so, and service resumes. And the
//! probes: gRPC health and reflection, `/livez` and `/readyz`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fleet_pki::{Ca, LeafSpec, Role};
use fleet_proto::imageserver::{
    CollectGarbageRequest, CommitImageRequest, DeleteImageRequest, FindMissingChunksRequest, ListStreamsRequest,
    UploadChunk, WatchImagesRequest,
};
use fleet_tls::TlsFiles;
use image_format::{ChunkRef, Digest, ImageName, Manifest};
use imagetool::{Progress, client::Client};
use local_world::ObjectStore;
use tonic::Code;

const CHUNK: u32 = 64 * 1024;
const BUCKET: &str = "shared-images";
const PREFIX: &str = "fleet";
/// How often the test servers look at the bucket.
const POLL: Duration = Duration::from_millis(200);

struct Shared {
    dir: tempfile::TempDir,
    ca: Ca,
    objects: ObjectStore,
    servers: Vec<imageserver::Running>,
}

impl Shared {
    async fn new() -> Shared {
        let objects = ObjectStore::start().unwrap();
        objects.bucket(BUCKET).await.unwrap();
        Shared { dir: tempfile::tempdir().unwrap(), ca: Ca::new("shared bucket CA").unwrap(), objects, servers: vec![] }
    }

    fn identity(&self, name: &str, spec: &LeafSpec) -> TlsFiles {
        let d = self.dir.path().join("pki").join(name);
        if !d.exists() {
            fleet_pki::write_ssl_dir(&d, &self.ca, &self.ca.issue(spec).unwrap()).unwrap();
        }
        TlsFiles::from_ssl_dir(&d)
    }

    fn store(&self, endpoint: &str) -> imageserver::Store {
        let aws = self.objects.sdk_config().into_builder().endpoint_url(endpoint).build();
        imageserver::Store::S3 { at: format!("s3://{BUCKET}/{PREFIX}").parse().unwrap(), aws: Some(Box::new(aws)) }
    }

    /// Another imageserver on the bucket (through `endpoint`, moto's
    /// unless a test puts something between); returns its index.
    async fn server_via(&mut self, endpoint: &str) -> usize {
        let tls = self.identity("server", &LeafSpec::for_role(Role::Imageserver));
        let mut config = imageserver::Config::new("127.0.0.1:0".parse().unwrap(), self.store(endpoint), tls);
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        config.poll = POLL;
        self.servers.push(imageserver::start(config).await.unwrap());
        self.servers.len() - 1
    }

    async fn server(&mut self) -> usize {
        let endpoint = self.objects.endpoint().to_owned();
        self.server_via(&endpoint).await
    }

    async fn client(&self, server: usize, role: Role) -> Client {
        let tls = self.identity(role.name(), &LeafSpec::for_role(role));
        imagetool::client::connect(&self.servers[server].addr.to_string(), &tls).await.unwrap()
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Keys under the store's prefix that start with `under`.
    async fn keys(&self, under: &str) -> Vec<String> {
        let out = self
            .objects
            .client()
            .list_objects_v2()
            .bucket(BUCKET)
            .prefix(format!("{PREFIX}/{under}"))
            .send()
            .await
            .unwrap();
        out.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect()
    }

    async fn put(&self, key: &str, body: &[u8]) {
        let c = self.objects.client();
        c.put_object().bucket(BUCKET).key(format!("{PREFIX}/{key}")).body(body.to_vec().into()).send().await.unwrap();
    }
}

/// Deterministic bytes that do not compress much.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

fn name(s: &str) -> ImageName {
    ImageName::parse(s).unwrap()
}

fn manifest_of(path: &std::path::Path) -> Manifest {
    image_format::hash_file(path, CHUNK, |_| {}).unwrap()
}

#[tokio::test]
async fn what_one_server_commits_the_others_serve_and_announce() {
    let mut w = Shared::new().await;
    let (a, b) = (w.server().await, w.server().await);
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let mut on_b = w.client(b, Role::ImageBuilder).await;
    let mut events = on_b.watch_images(WatchImagesRequest { stream: "base/os".into() }).await.unwrap().into_inner();
    let data = noise(20 * CHUNK as usize + 999, 1);
    let f = w.file("d.raw", &data);
    let t = Instant::now();
    let added = imagetool::add(&mut on_a, &name("base/os/1"), &f, CHUNK, Progress::Hidden).await.unwrap();

    // B's watcher hears of A's commit within its poll (plus a listing).
    let ev = tokio::time::timeout(Duration::from_secs(10), events.message()).await.unwrap().unwrap().unwrap();
    let info = ev.info.unwrap();
    assert_eq!((info.leaf.as_str(), info.image_id.as_str()), ("1", added.image_id.as_str()));
    assert!(t.elapsed() < Duration::from_secs(5), "heard after {:?}", t.elapsed());

    // B lists and serves it bit for bit.
    let streams = on_b.list_streams(ListStreamsRequest {}).await.unwrap().into_inner().streams;
    assert_eq!(streams, ["base/os"]);
    let out = w.dir.path().join("out.raw");
    imagetool::get(&mut on_b, &name("base/os/1"), &out, Progress::Hidden).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    // Adding the same image through B moves nothing.
    let again = imagetool::add(&mut on_b, &name("base/os/1"), &f, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(again.chunks_uploaded, 0);

    // A deletion through B: A's readers no longer find it.
    on_b.delete_image(DeleteImageRequest { stream: "base/os".into(), leaf: "1".into() }).await.unwrap();
    let err = imagetool::get(&mut on_a, &name("base/os/1"), &out, Progress::Hidden).await.unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

/// Commit `manifest` as `leaf` of stream `race` through `c`.
async fn commit(c: &mut Client, leaf: &str, m: &Manifest) -> Result<String, tonic::Status> {
    let req = CommitImageRequest { stream: "race".into(), leaf: leaf.into(), manifest: m.encode().into() };
    c.commit_image(req).await.map(|r| r.into_inner().image_id)
}

async fn upload(c: &mut Client, plain: &[u8]) -> Digest {
    let d = Digest::of(plain);
    let chunk = UploadChunk { digest: d.0.to_vec().into(), zstd_data: chunk_store::compress(plain).into() };
    c.upload_chunks(futures::stream::iter(vec![chunk])).await.unwrap();
    d
}

#[tokio::test]
async fn one_leaf_committed_through_two_servers_at_once_is_committed_once() {
    let mut w = Shared::new().await;
    let (a, b) = (w.server().await, w.server().await);
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let mut on_b = w.client(b, Role::ImageBuilder).await;
    let x = upload(&mut on_a, &noise(CHUNK as usize, 10)).await;
    let y = upload(&mut on_a, &noise(CHUNK as usize, 11)).await;
    let mx = Manifest::new(CHUNK, u64::from(CHUNK), vec![ChunkRef::Data(x)]).unwrap();
    let my = Manifest::new(CHUNK, u64::from(CHUNK), vec![ChunkRef::Data(y)]).unwrap();
    for leaf in 0..12 {
        let leaf = leaf.to_string();
        let (ra, rb) = tokio::join!(commit(&mut on_a, &leaf, &mx), commit(&mut on_b, &leaf, &my));
        let won: Vec<&String> = [&ra, &rb].into_iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "leaf {leaf}: {ra:?} {rb:?}");
        let lost = [&ra, &rb].into_iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(lost.code(), Code::AlreadyExists, "leaf {leaf}: {lost:?}");
        // Both servers now serve the winner.
        for c in [&mut on_a, &mut on_b] {
            let (info, _) = image_client::get_manifest(c, &name(&format!("race/{leaf}"))).await.unwrap();
            assert_eq!(&info.image_id, won[0]);
        }
    }
    // The same image through both at once: both succeed.
    let (ra, rb) = tokio::join!(commit(&mut on_a, "same", &mx), commit(&mut on_b, "same", &mx));
    assert_eq!(ra.unwrap(), rb.unwrap());
}

#[tokio::test]
async fn gc_on_one_server_keeps_what_another_promised_an_upload_in_flight() {
    let mut w = Shared::new().await;
    let (a, b) = (w.server().await, w.server().await);
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let mut on_b = w.client(b, Role::ImageBuilder).await;
    // Image 1 through A, then deleted: its 16 chunks are garbage once older
    // than the grace period.
    let v1 = noise(16 * CHUNK as usize, 20);
    let f1 = w.file("v1.raw", &v1);
    imagetool::add(&mut on_a, &name("s/1"), &f1, CHUNK, Progress::Hidden).await.unwrap();
    on_a.delete_image(DeleteImageRequest { stream: "s".into(), leaf: "1".into() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;

    // An upload of image 2 through B: 12 chunks as in image 1, 4 new. B
    // answers that the 12 are stored (and leases them); the upload has not
    // sent its 4 yet when A collects garbage with a 2 s grace.
    let mut v2 = v1.clone();
    v2[12 * CHUNK as usize..].copy_from_slice(&noise(4 * CHUNK as usize, 21));
    let f2 = w.file("v2.raw", &v2);
    let m2 = manifest_of(&f2);
    let digests: Vec<_> = m2.distinct_digests().into_iter().map(|d| d.0.to_vec().into()).collect();
    let missing = on_b.find_missing_chunks(FindMissingChunksRequest { digests }).await.unwrap().into_inner().missing;
    assert_eq!(missing.len(), 4);
    let gc = CollectGarbageRequest { grace_seconds: 2, dry_run: false };
    let r = on_a.collect_garbage(gc).await.unwrap().into_inner();
    assert_eq!((r.chunks_removed, r.kept_leased, r.kept_referenced, r.kept_recent), (4, 12, 0, 0), "{r:?}");
    assert_eq!(r.chunks_kept, 12);

    // B's upload finishes sending only its 4 chunks, and the image is whole
    // through A.
    let added = imagetool::add(&mut on_b, &name("s/2"), &f2, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!((added.chunks_reused, added.chunks_uploaded), (12, 4));
    let out = w.dir.path().join("out.raw");
    imagetool::get(&mut on_a, &name("s/2"), &out, Progress::Hidden).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == v2);

    // Once the leases are older than the grace period too, they go, and
    // what image 2 names stays for that reason alone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = on_a.collect_garbage(gc).await.unwrap().into_inner();
    assert_eq!((r.chunks_removed, r.kept_referenced, r.kept_leased), (0, 16, 0), "{r:?}");
}

#[tokio::test]
async fn a_collection_elsewhere_holds_writers_and_an_abandoned_claim_is_cleared() {
    let mut w = Shared::new().await;
    let a = w.server().await;
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let d = upload(&mut on_a, &noise(CHUNK as usize, 30)).await;
    let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();

    // Another process's collection holds the claim for 30 s.
    w.put("gc-claim", format!("{} elsewhere\n", ms(SystemTime::now() + Duration::from_secs(30))).as_bytes()).await;
    let gc = CollectGarbageRequest { grace_seconds: 3600, dry_run: false };
    let err = on_a.collect_garbage(gc).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("another garbage collection is running"), "{}", err.message());
    // A writer's question waits until that collection gives the claim back.
    let objects = w.objects.client();
    let give_back = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        objects.delete_object().bucket(BUCKET).key(format!("{PREFIX}/gc-claim")).send().await.unwrap();
    });
    let t = Instant::now();
    let req = FindMissingChunksRequest { digests: vec![d.0.to_vec().into()] };
    let missing = on_a.find_missing_chunks(req).await.unwrap().into_inner().missing;
    assert!(missing.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(1400), "answered after {:?}, while a collection ran", t.elapsed());
    give_back.await.unwrap();

    // A claim past its deadline (its holder died) is cleared by the next
    // collection, which gives its own back.
    w.put("gc-claim", format!("{} dead\n", ms(SystemTime::now() - Duration::from_secs(1))).as_bytes()).await;
    let r = on_a.collect_garbage(gc).await.unwrap().into_inner();
    assert_eq!(r.kept_recent, 1, "{r:?}");
    assert!(w.keys("gc-claim").await.is_empty());
    // And writers do not wait for a dead claim.
    w.put("gc-claim", format!("{} dead\n", ms(SystemTime::now() - Duration::from_secs(1))).as_bytes()).await;
    let t = Instant::now();
    let req = FindMissingChunksRequest { digests: vec![d.0.to_vec().into()] };
    on_a.find_missing_chunks(req).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

fn start_binary(w: &Shared, addr: &str) -> Child {
    let pki = w.dir.path().join("pki/server");
    let child = Command::new(env!("CARGO_BIN_EXE_imageserver"))
        .args(["--listen", addr, "--metrics-listen", "off", "--store", &format!("s3://{BUCKET}/{PREFIX}")])
        .arg("--ca")
        .arg(pki.join("CA.pem"))
        .arg("--cert")
        .arg(pki.join("cert.pem"))
        .arg("--key")
        .arg(pki.join("key.pem"))
        .envs(w.objects.env())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(w.dir.path().join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        let log = || std::fs::read_to_string(w.dir.path().join("server.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "imageserver did not listen: {}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test]
async fn a_server_killed_mid_upload_leaves_no_half_image_and_the_re_add_finishes() {
    let mut w = Shared::new().await;
    let b = w.server().await; // in process: the survivor
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut killed = start_binary(&w, &addr);
    let tls = w.identity(Role::ImageBuilder.name(), &LeafSpec::for_role(Role::ImageBuilder));
    let mut client = imagetool::client::connect(&addr, &tls).await.unwrap();
    let data = noise(400 * CHUNK as usize, 40);
    let f = w.file("d.raw", &data);
    let upload = {
        let f = f.clone();
        tokio::spawn(async move { imagetool::add(&mut client, &name("crash/1"), &f, CHUNK, Progress::Hidden).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.keys("chunks/").await.len() < 40 {
        assert!(Instant::now() < deadline, "the upload did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    assert!(upload.await.unwrap().is_err(), "the upload cannot have succeeded");
    let stored = w.keys("chunks/").await.len();
    assert!(stored < 400, "the kill came too late to test anything");

    // The survivor shows no half image, and the re-add through it sends
    // only what is missing; every chunk reads back whole.
    let mut on_b = w.client(b, Role::ImageBuilder).await;
    assert!(on_b.list_streams(ListStreamsRequest {}).await.unwrap().into_inner().streams.is_empty());
    assert!(w.keys("images/").await.is_empty());
    let r = imagetool::add(&mut on_b, &name("crash/1"), &f, CHUNK, Progress::Hidden).await.unwrap();
    assert_eq!(r.chunks_reused + r.chunks_uploaded, 400);
    assert_eq!(r.chunks_reused, stored as u64);
    let out = w.dir.path().join("back.raw");
    imagetool::get(&mut on_b, &name("crash/1"), &out, Progress::Hidden).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

/// A TCP forwarder that can be cut: while down, it drops every connection.
struct Cable {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
}

impl Cable {
    async fn to(target: SocketAddr) -> Cable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let cut = down.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is reset
                }
                let cut = cut.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        while !cut.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, () = watch => {} }
                });
            }
        });
        Cable { addr, down }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn readyz(metrics: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || http_get(metrics, "/readyz")).await.unwrap()
}

async fn health(w: &Shared, server: usize, service: &str) -> Result<i32, tonic::Status> {
    let tls = w.identity("probe", &LeafSpec { rights: vec![], ..LeafSpec::for_role(Role::ImageBuilder) });
    let ch = fleet_tls::dial::connect_channel(&w.servers[server].addr.to_string(), &tls, "imageserver").await.unwrap();
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    c.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.map(|r| r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

#[tokio::test]
async fn an_unreachable_bucket_gives_clear_errors_and_not_ready_then_service_resumes() {
    let mut w = Shared::new().await;
    let moto: SocketAddr = w.objects.endpoint().trim_start_matches("http://").parse().unwrap();
    let cable = Cable::to(moto).await;
    let a = w.server_via(&format!("http://{}", cable.addr)).await;
    let metrics = w.servers[a].metrics_addr.unwrap();
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let data = noise(8 * CHUNK as usize, 50);
    let f = w.file("d.raw", &data);
    imagetool::add(&mut on_a, &name("s/1"), &f, CHUNK, Progress::Hidden).await.unwrap();
    assert!(readyz(metrics).await.starts_with("HTTP/1.1 200"));
    assert_eq!(health(&w, a, "fleet.imageserver.v1.ImageServer").await.unwrap(), SERVING);

    cable.set_down(true);
    let out = w.dir.path().join("out.raw");
    let err = imagetool::get(&mut on_a, &name("s/1"), &out, Progress::Hidden).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains(&format!("object store s3://{BUCKET}/{PREFIX}")), "{text}");
    assert!(!out.exists());
    let err = on_a.list_streams(ListStreamsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // Readiness follows within the poll: /readyz says why, gRPC health
    // says NOT_SERVING for the service and the server.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = readyz(metrics).await;
        if r.starts_with("HTTP/1.1 503") {
            assert!(r.contains("the store cannot be reached"), "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready: {r}");
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(health(&w, a, "fleet.imageserver.v1.ImageServer").await.unwrap(), NOT_SERVING);
    assert_eq!(health(&w, a, "").await.unwrap(), NOT_SERVING);
    let live = tokio::task::spawn_blocking(move || http_get(metrics, "/livez")).await.unwrap();
    assert!(live.starts_with("HTTP/1.1 200"), "alive while the bucket is away: {live}");

    // The bucket is back: ready again, and nothing was lost.
    cable.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !readyz(metrics).await.starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < deadline, "not ready again");
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(health(&w, a, "").await.unwrap(), SERVING);
    imagetool::get(&mut on_a, &name("s/1"), &out, Progress::Hidden).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test]
async fn probes_answer_any_certified_client_and_reflection_names_the_services() {
    let mut w = Shared::new().await;
    let a = w.server().await;
    // A certificate with no rights: the probes answer, the service refuses.
    assert_eq!(health(&w, a, "").await.unwrap(), SERVING);
    assert_eq!(health(&w, a, "fleet.imageserver.v1.ImageServer").await.unwrap(), SERVING);
    assert_eq!(health(&w, a, "no.such.Service").await.unwrap_err().code(), Code::NotFound);
    let tls = w.identity("probe", &LeafSpec { rights: vec![], ..LeafSpec::for_role(Role::ImageBuilder) });
    let ch = fleet_tls::dial::connect_channel(&w.servers[a].addr.to_string(), &tls, "imageserver").await.unwrap();
    let err = fleet_proto::imageserver::image_server_client::ImageServerClient::new(ch.clone())
        .list_streams(ListStreamsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
    let mut answers = r
        .server_reflection_info(futures::stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("fleet.imageserver.v1.ImageServer".into())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["fleet.imageserver.v1.ImageServer", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    assert!(!names.contains(&"fleet.unpacker.v1.ImageUnpacker"), "a service this server does not serve: {names:?}");
    let Some(MessageResponse::FileDescriptorResponse(fd)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor")
    };
    assert!(!fd.file_descriptor_proto.is_empty());

    let metrics = w.servers[a].metrics_addr.unwrap();
    let (live, ready) =
        tokio::task::spawn_blocking(move || (http_get(metrics, "/livez"), http_get(metrics, "/readyz"))).await.unwrap();
    assert!(live.starts_with("HTTP/1.1 200") && live.ends_with("alive\n"), "{live}");
    assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with("ready\n"), "{ready}");

    // Stopping: NOT_SERVING first (a drain), then gone.
    let server = w.servers.pop().unwrap();
    let readiness = server.readiness.clone();
    server.stop().await.unwrap();
    assert!(readiness.get().unwrap_err().contains("draining"));
}

/// Fetch chunks by digest; their zstd frames, or the first error.
async fn fetch(c: &mut Client, digests: &[Digest]) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let req =
        fleet_proto::imageserver::FetchChunksRequest { digests: digests.iter().map(|d| d.0.to_vec().into()).collect() };
    let mut s = c.fetch_chunks(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await? {
        out.push(chunk.zstd_data.to_vec());
    }
    Ok(out)
}

#[tokio::test]
async fn a_server_far_from_its_bucket_reads_chunks_from_a_bounded_cache() {
    let mut w = Shared::new().await;
    let a = w.server().await;
    let mut on_a = w.client(a, Role::ImageBuilder).await;
    let plains: Vec<Vec<u8>> = (0..8).map(|i| noise(CHUNK as usize, 60 + i)).collect();
    let mut digests = Vec::new();
    for p in &plains {
        digests.push(upload(&mut on_a, p).await);
    }
    // A regional server through a cable, with a cache of about 5 chunks.
    let moto: SocketAddr = w.objects.endpoint().trim_start_matches("http://").parse().unwrap();
    let cable = Cable::to(moto).await;
    let cache_dir = w.dir.path().join("cache");
    let tls = w.identity("server", &LeafSpec::for_role(Role::Imageserver));
    let frame = chunk_store::compress(&plains[0]).len() as u64;
    let mut config =
        imageserver::Config::new("127.0.0.1:0".parse().unwrap(), w.store(&format!("http://{}", cable.addr)), tls);
    config.cache = Some(imageserver::Cache { dir: cache_dir.clone(), max_bytes: 5 * frame + frame / 2 });
    w.servers.push(imageserver::start(config).await.unwrap());
    let mut far = w.client(w.servers.len() - 1, Role::ImageUnpacker).await;
    let cached = || std::fs::read_dir(&cache_dir).unwrap().count();

    // All 8 read through it, one by one: the cache keeps the last 5 read.
    for d in &digests {
        assert_eq!(fetch(&mut far, std::slice::from_ref(d)).await.unwrap().len(), 1);
    }
    assert_eq!(cached(), 5);
    // The bucket away: the cached ones are still served, checked; the
    // others fail with the store named.
    cable.set_down(true);
    let got = fetch(&mut far, &digests[3..]).await.unwrap();
    for (z, p) in got.iter().zip(&plains[3..]) {
        assert!(&zstd::bulk::decompress(z, 1 << 20).unwrap() == p);
    }
    let err = fetch(&mut far, &digests[..1]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // A damaged copy in the cache is never served: it is dropped and read
    // again from the bucket (once the bucket is back).
    cable.set_down(false);
    let copy = cache_dir.join(digests[7].to_hex());
    std::fs::write(&copy, chunk_store::compress(&noise(CHUNK as usize, 99))).unwrap();
    let got = fetch(&mut far, &digests[7..]).await.unwrap();
    assert!(zstd::bulk::decompress(&got[0], 1 << 20).unwrap() == plains[7]);
    assert!(std::fs::read(&copy).unwrap() == got[0], "the copy was replaced by the bucket's");
    // Whether a chunk is stored is never answered from the cache: a chunk
    // removed from the bucket is missing for writers though still cached.
    let key = format!("{PREFIX}/chunks/{}/{}", &digests[7].to_hex()[..2], digests[7].to_hex());
    w.objects.client().delete_object().bucket(BUCKET).key(key).send().await.unwrap();
    let mut writer = w.client(w.servers.len() - 1, Role::ImageBuilder).await;
    let req = FindMissingChunksRequest { digests: vec![digests[7].0.to_vec().into()] };
    assert_eq!(writer.find_missing_chunks(req).await.unwrap().into_inner().missing.len(), 1);
}

#[tokio::test]
async fn a_bucket_that_does_not_exist_is_named_before_anything_is_served() {
    let w = Shared::new().await;
    let tls = w.identity("server", &LeafSpec::for_role(Role::Imageserver));
    let aws = w.objects.sdk_config();
    let store = imageserver::Store::S3 { at: "s3://no-such-bucket/x".parse().unwrap(), aws: Some(Box::new(aws)) };
    let err =
        imageserver::start(imageserver::Config::new("127.0.0.1:0".parse().unwrap(), store, tls)).await.err().unwrap();
    let text = format!("{err:#}");
    assert!(text.contains("s3://no-such-bucket/x") && text.contains("the bucket does not exist"), "{text}");
}
