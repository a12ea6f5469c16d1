//! The imagetool binary as a pipeline runs it, against a real imageserver.

use std::{path::Path, process::Command};

use fleet_pki::{Ca, LeafSpec, Role};
use fleet_tls::TlsFiles;

fn imagetool(server: &str, ssl: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imagetool"))
        .arg("--server")
        .arg(server)
        .arg("--ssl-dir")
        .arg(ssl)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_adds_lists_shows_gets_verifies_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli test").unwrap();
    let server_ssl = dir.path().join("server");
    fleet_pki::write_ssl_dir(&server_ssl, &ca, &ca.issue(&LeafSpec::for_role(Role::Imageserver)).unwrap()).unwrap();
    let ssl = dir.path().join("builder");
    fleet_pki::write_ssl_dir(&ssl, &ca, &ca.issue(&LeafSpec::for_role(Role::ImageBuilder)).unwrap()).unwrap();
    let server = imageserver::start(imageserver::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        store: imageserver::Store::Dir(dir.path().join("data")),
        cache: None,
        poll: imageserver::DEFAULT_POLL,
        tls: TlsFiles::from_ssl_dir(&server_ssl),
        replicate_from: None,
    })
    .await
    .unwrap();
    let addr = server.addr.to_string();

    let mut data = vec![0u8; 3 * 512 * 1024 + 777];
    for (i, b) in data.iter_mut().enumerate().take(600_000) {
        *b = u8::try_from(i * 7 % 251).expect("below 251");
    }
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, &data).unwrap();
    let f = file.to_str().unwrap();

    let run = |args: Vec<String>| {
        let addr = addr.clone();
        let ssl = ssl.clone();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            imagetool(&addr, &ssl, &a)
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let (ok, out, err) = run(s(&["--json", "add", "base/debian-12/1", f])).await.unwrap();
    assert!(ok, "{err}");
    let added = json(&out);
    assert_eq!(added["chunks"], 4);
    assert_eq!(added["zero_chunks"], 2);
    assert_eq!(added["chunks_uploaded"], 2);

    let (ok, out, _) = run(s(&["--json", "list"])).await.unwrap();
    assert!(ok);
    assert_eq!(json(&out), serde_json::json!(["base/debian-12"]));
    let (ok, out, _) = run(s(&["list", "base/debian-12"])).await.unwrap();
    assert!(ok && out.contains("base/debian-12/1"), "{out}");

    // `show STREAM` shows the latest image of a stream even when the stream
    // name also parses as STREAM/LEAF.
    let (ok, out, err) = run(s(&["--json", "show", "base/debian-12"])).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(json(&out)["image_id"], added["image_id"]);
    let (ok, out, _) = run(s(&["show", "base/debian-12/1"])).await.unwrap();
    assert!(ok && out.contains(added["image_id"].as_str().unwrap()), "{out}");

    let back = dir.path().join("back.raw");
    let (ok, _, err) = run(s(&["get", "base/debian-12/1", back.to_str().unwrap()])).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let (ok, out, _) = run(s(&["--json", "verify", "base/debian-12/1"])).await.unwrap();
    assert!(ok);
    assert_eq!(json(&out)["chunks_verified"], 2);

    // Errors name what was wrong and exit non-zero.
    let (ok, _, err) = run(s(&["get", "../etc/passwd", "x"])).await.unwrap();
    assert!(!ok && err.contains("invalid stream name '../etc'"), "{err}");
    let (ok, _, err) = run(s(&["get", "base/debian-12/404", "x"])).await.unwrap();
    assert!(!ok && err.contains("does not exist"), "{err}");
    let (ok, _, err) = run(s(&["add", "base/debian-12/2", "/no/such/file"])).await.unwrap();
    assert!(!ok && err.contains("/no/such/file"), "{err}");
    let no_certs = dir.path().join("empty");
    let (ok, _, err) = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || imagetool(&addr, &no_certs, &["list"])).await.unwrap()
    };
    assert!(!ok && err.contains("CA.pem"), "{err}");

    let (ok, _, _) = run(s(&["delete", "base/debian-12/1"])).await.unwrap();
    assert!(ok);
    let (ok, out, _) = run(s(&["--json", "gc", "--grace", "0s", "--dry-run"])).await.unwrap();
    assert!(ok);
    assert_eq!(json(&out)["chunks_removed"], 2);
    let (_, out, _) = run(s(&["--json", "list"])).await.unwrap();
    assert_eq!(json(&out), serde_json::json!([]));
}

/// Every command names a client certificate the imageserver refuses (an
/// expired one, one from another CA), whatever the transport made of the
/// refusal, and the refused commands change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_names_a_refused_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = test_support::Pki::new(&dir.path().join("pki")).unwrap();
    let server = test_support::imageserver(&pki, &dir.path().join("data")).await.unwrap();
    let addr = server.addr.to_string();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, test_support::noise(1 << 20, 3)).unwrap();
    let builder = pki.role(Role::ImageBuilder).unwrap();
    let mut c = imagetool::client::connect(&addr, &builder).await.unwrap();
    let name = image_format::ImageName::parse("s/1").unwrap();
    imagetool::add(&mut c, &name, &file, 1 << 19, imagetool::Progress::Hidden).await.unwrap();
    let (f, out) = (file.to_str().unwrap(), dir.path().join("out.raw"));
    let out = out.to_str().unwrap();
    let commands: [&[&str]; 9] = [
        &["add", "s/2", f],
        &["get", "s/1", out],
        &["list"],
        &["list", "s"],
        &["show", "s/1"],
        &["show", "s"],
        &["verify", "s/1"],
        &["delete", "s/1"],
        &["gc"],
    ];
    for refused in pki.refused(Role::ImageBuilder).unwrap() {
        let ssl = refused.tls.cert.parent().unwrap().to_owned();
        for args in commands {
            let (addr, ssl) = (addr.clone(), ssl.clone());
            let owned: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
            let (ok, _, err) = tokio::task::spawn_blocking(move || {
                imagetool(&addr, &ssl, &owned.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .await
            .unwrap();
            assert!(!ok && err.contains(refused.named_by), "{} certificate, {args:?}: {err}", refused.who);
        }
    }
    let (ok, stdout, _) = imagetool(&addr, builder.cert.parent().unwrap(), &["--json", "list", "s"]);
    let images = json(&stdout);
    assert!(ok && images.as_array().map(Vec::len) == Some(1), "nothing changed: {stdout}");
    assert!(!Path::new(out).exists(), "no output file was written");
}
