//! Who may call what, on both daemons, over real mutual TLS.
//!
//! Every RPC of the imageserver and the image-unpacker is called by every
//! role's certificate (and by a certificate with no rights at all): a caller
//! whose role holds the right the daemon's rights table names must get past
//! the check (any answer but PERMISSION_DENIED), every other caller must be
//! refused with PERMISSION_DENIED. The methods come from the tables, and the
//! tables must name exactly the RPCs declared in `proto/`, so an RPC added
//! without an entry fails here as well as being refused by the daemon.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    time::Duration,
};

use fleet_pki::{LeafSpec, Role};
use fleet_tls::{Right, Rights, TlsFiles};
use test_support::Pki;
use tonic::{Code, codegen::http::uri::PathAndQuery, transport::Channel};

/// Every `/package.Service/Method` declared in a `.proto` file, grouped by
/// service (`package.Service`). Comments are skipped; the parse knows only
/// what these files use: `package`, `service NAME {`, `rpc NAME(...)`.
fn rpcs_declared_in(file: &str) -> BTreeMap<String, BTreeSet<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut code = String::new();
    for line in text.lines() {
        code.push_str(line.split("//").next().unwrap_or(""));
        code.push('\n');
    }
    let spaced: String =
        code.chars().flat_map(|c| if "{}();".contains(c) { vec![' ', c, ' '] } else { vec![c] }).collect();
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let (mut package, mut service, mut depth) = (None::<String>, None::<String>, 0usize);
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, t) in tokens.iter().enumerate() {
        match *t {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    service = None;
                }
            }
            "package" if depth == 0 => package = Some(tokens[i + 1].trim_end_matches(';').to_owned()),
            "service" if depth == 0 => {
                let name = format!("{}.{}", package.as_deref().expect("package before service"), tokens[i + 1]);
                found.entry(name.clone()).or_default();
                service = Some(name);
            }
            "rpc" if depth == 1 => {
                let service = service.as_ref().expect("rpc inside a service");
                found.get_mut(service).unwrap().insert(format!("/{service}/{}", tokens[i + 1]));
            }
            _ => {}
        }
    }
    assert!(!found.is_empty(), "no service found in {}", path.display());
    found
}

/// Check that `rights` names each RPC of `file` once and nothing else, and
/// that the generated server serves the service the file declares.
fn assert_table_covers(rights: Rights, file: &str, generated_service: &str) {
    let declared = rpcs_declared_in(file);
    assert_eq!(
        declared.keys().map(String::as_str).collect::<Vec<_>>(),
        [generated_service],
        "{file} declares other services than the generated server serves"
    );
    let declared: BTreeSet<String> = declared.into_values().flatten().collect();
    let listed: Vec<&str> = rights.entries().iter().map(|(p, _)| *p).collect();
    let unique: BTreeSet<String> = listed.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(unique.len(), listed.len(), "a method is listed twice in the rights table of {file}");
    let missing: Vec<_> = declared.difference(&unique).collect();
    let extra: Vec<_> = unique.difference(&declared).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the rights table of {file} does not match its RPCs: no entry for {missing:?}; entries for unknown methods {extra:?}"
    );
}

#[test]
fn each_table_names_exactly_the_rpcs_of_its_service() {
    assert_table_covers(
        imageserver::RIGHTS,
        "imageserver.proto",
        fleet_proto::imageserver::image_server_server::SERVICE_NAME,
    );
    assert_table_covers(
        image_unpacker::RIGHTS,
        "unpacker.proto",
        fleet_proto::unpacker::image_unpacker_server::SERVICE_NAME,
    );
}

/// The rights each method needed when every handler checked its own; the
/// tables must not loosen (or tighten) any of them without this test being
/// changed on purpose.
#[test]
fn tables_keep_the_rights_the_handlers_used_to_check() {
    let imageserver: &[(&str, Right)] = &[
        ("ListStreams", Right::Read),
        ("ListImages", Right::Read),
        ("FindLatestImage", Right::Read),
        ("GetManifest", Right::Read),
        ("FetchChunks", Right::Read),
        ("WatchImages", Right::Read),
        ("FindMissingChunks", Right::Write),
        ("UploadChunks", Right::Write),
        ("CommitImage", Right::Write),
        ("DeleteImage", Right::Write),
        ("CollectGarbage", Right::Write),
        ("Replicate", Right::Replicate),
    ];
    for (method, right) in imageserver {
        let path = format!("/fleet.imageserver.v1.ImageServer/{method}");
        assert_eq!(imageserver::RIGHTS.needed(&path), Some(*right), "{path}");
    }
    assert_eq!(imageserver::RIGHTS.entries().len(), imageserver.len());
    for (path, right) in image_unpacker::RIGHTS.entries() {
        assert_eq!(*right, Right::DriveUnpacker, "every unpacker call needs drive-unpacker, {path} does not");
    }
}

/// A caller's certificate: one of the roles, or one with no rights.
struct Caller {
    name: &'static str,
    rights: Vec<Right>,
    tls: TlsFiles,
}

fn callers(pki: &Pki) -> Vec<Caller> {
    let mut callers: Vec<Caller> = Role::ALL
        .into_iter()
        .map(|role| Caller { name: role.name(), rights: role.rights().to_vec(), tls: pki.role(role).unwrap() })
        .collect();
    let mut none = LeafSpec::for_role(Role::ImageBuilder);
    none.common_name = "no-rights".to_owned();
    none.rights = vec![];
    callers.push(Caller { name: "no-rights", rights: vec![], tls: pki.issue("no-rights", &none).unwrap() });
    callers
}

/// Call `path` with one empty message (every field at its default, which
/// decodes as any request type) and return the status the server answered
/// with, or OK when it started a response.
async fn call(channel: Channel, path: &'static str) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let request = tonic::Request::new(tokio_stream::once(()));
    let answer =
        tokio::time::timeout(Duration::from_secs(30), grpc.streaming(request, PathAndQuery::from_static(path), codec))
            .await
            .unwrap_or_else(|_| panic!("{path} did not answer within 30s"));
    match answer {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// Call every method of `rights` as every caller; return the failures.
async fn check_matrix(
    daemon: &str,
    rights: Rights,
    addr: &str,
    server_name: &str,
    callers: &[Caller],
) -> (Vec<String>, u64) {
    let mut failures = Vec::new();
    let mut refusals = 0;
    for caller in callers {
        let channel = fleet_tls::dial::connect_channel(addr, &caller.tls, server_name).await.unwrap();
        for (path, right) in rights.entries() {
            let (code, message) = call(channel.clone(), path).await;
            let allowed = caller.rights.contains(right);
            let what = format!("{daemon}: {} calling {path} (needs '{right}')", caller.name);
            if allowed && code == Code::PermissionDenied {
                failures.push(format!("{what} was refused: {message}"));
            }
            if !allowed {
                refusals += 1;
                let expected = format!("certificate '{}' lacks the '{right}' right", caller.name);
                if code != Code::PermissionDenied || message != expected {
                    failures.push(format!("{what} got {code:?} '{message}', not PERMISSION_DENIED '{expected}'"));
                }
            }
        }
    }
    (failures, refusals)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_role_against_every_rpc_of_both_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let test_support::Fleet { pki, server, unpacker } = test_support::fleet(dir.path()).await.unwrap();
    let callers = callers(&pki);

    // Every right is held by some caller and lacked by another, so every
    // method is tried from both sides.
    for right in Right::ALL {
        assert!(callers.iter().any(|c| c.rights.contains(&right)), "no caller holds '{right}'");
        assert!(callers.iter().any(|c| !c.rights.contains(&right)), "every caller holds '{right}'");
    }

    let (mut failures, server_refusals) = check_matrix(
        "imageserver",
        imageserver::RIGHTS,
        &server.addr.to_string(),
        fleet_tls::IMAGESERVER_TLS_NAME,
        &callers,
    )
    .await;
    let (more, unpacker_refusals) = check_matrix(
        "image-unpacker",
        image_unpacker::RIGHTS,
        &unpacker.addr.to_string(),
        fleet_tls::UNPACKER_TLS_NAME,
        &callers,
    )
    .await;
    failures.extend(more);
    assert!(failures.is_empty(), "{} wrong answers:\n{}", failures.len(), failures.join("\n"));

    // Each refusal was counted, and nothing else was.
    assert_eq!(server.metrics.requests_denied.get(), server_refusals);
    assert_eq!(unpacker.unpacker.metrics().requests_denied.get(), unpacker_refusals);

    unpacker.stop().await.unwrap();
    server.stop().await.unwrap();
}

/// A method the server does not serve (and so has no entry for) is refused
/// before routing, even to a caller with every right the roles have.
#[tokio::test(flavor = "multi_thread")]
async fn a_method_without_an_entry_is_refused_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki")).unwrap();
    let server = test_support::imageserver(&pki, &dir.path().join("data")).await.unwrap();
    let mut spec = LeafSpec::for_role(Role::ImageBuilder);
    spec.common_name = "everything".to_owned();
    spec.rights = Right::ALL.to_vec();
    let tls = pki.issue("everything", &spec).unwrap();
    let channel = fleet_tls::dial::connect_channel(&server.addr.to_string(), &tls, fleet_tls::IMAGESERVER_TLS_NAME)
        .await
        .unwrap();
    let (code, message) = call(channel, "/fleet.imageserver.v1.ImageServer/NotARealMethod").await;
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("'/fleet.imageserver.v1.ImageServer/NotARealMethod' has no entry"), "{message}");
    server.stop().await.unwrap();
}
