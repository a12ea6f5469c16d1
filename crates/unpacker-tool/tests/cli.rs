//! unpacker-tool as a user runs it: the binary against a real unpacker and
//! imageserver, JSON output checked.

use std::process::Command;

use fleet_pki::Role;
use test_support::{ScratchDevice, noise};

fn tool(addr: &str, ssl: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_unpacker-tool"))
        .args(["--unpacker", addr, "--json", "--ssl-dir"])
        .arg(ssl)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "unpacker-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn drives_an_unpacker_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let test_support::Fleet { pki, server, unpacker: u } = test_support::fleet(dir.path()).await.unwrap();
    let addr = u.addr.to_string();
    let image = noise(3 << 20, 5);
    let file = dir.path().join("a.raw");
    std::fs::write(&file, &image).unwrap();
    let builder = pki.role(Role::ImageBuilder).unwrap();
    let mut b = imagetool::client::connect(&server.addr.to_string(), &builder).await.unwrap();
    let name = image_format::ImageName::parse("apps/web/7").unwrap();
    let added = imagetool::add(&mut b, &name, &file, 1 << 19, imagetool::Progress::Hidden).await.unwrap();
    pki.role(Role::AmiPublisher).unwrap();
    let ssl = dir.path().join("pki").join("ami-publisher");
    let dev = ScratchDevice::new(&dir.path().join("vol.img"), 4 << 20).unwrap();
    let devpath = dev.path.display().to_string();

    let run = |args: &[&str]| {
        let addr = addr.clone();
        let ssl = ssl.clone();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            tool(&addr, &ssl, &a)
        })
    };
    let d = run(&["claim-device", "vol-0000000000000a01", &devpath]).await.unwrap();
    assert_eq!(d["size_bytes"], 4 << 20);
    let s = run(&["associate", "apps/web", "vol-0000000000000a01"]).await.unwrap();
    assert_eq!(s["state"], "unprepared");
    let s = run(&["prepare-for-unpack", "apps/web"]).await.unwrap();
    assert_eq!(s["state"], "prepared");
    let r = run(&["unpack-image", "apps/web", "7"]).await.unwrap();
    assert_eq!(r["chunks_written"], 6);
    assert_eq!(r["image_id"], added.image_id.as_str());
    let cap = run(&["prepare-for-capture", "apps/web", "--hold", "10m"]).await.unwrap();
    assert_eq!(cap["device_digest"], blake3::hash(&image).to_hex().as_str());
    let st = run(&["get-status"]).await.unwrap();
    assert!(st["streams"][0]["hold_seconds"].as_u64().unwrap() > 500, "{st}");
    run(&["renew-capture-hold", "apps/web", "30s"]).await.unwrap();
    let st = run(&["get-status"]).await.unwrap();
    assert!(st["streams"][0]["hold_seconds"].as_u64().unwrap() <= 30, "{st}");
    run(&["release-capture", "apps/web"]).await.unwrap();
    let st = run(&["get-status"]).await.unwrap();
    assert_eq!(st["streams"][0]["hold_seconds"], 0, "{st}");
    let out = dir.path().join("back.raw");
    run(&["get-raw", "apps/web", &out.display().to_string()]).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image);
    let st = run(&["get-status"]).await.unwrap();
    assert_eq!(st["streams"][0]["state"], "verified");
    assert_eq!(st["devices"][0]["stream"], "apps/web");

    // A clear error, and a non-zero exit, for a stream that is not bound.
    let out = Command::new(env!("CARGO_BIN_EXE_unpacker-tool"))
        .args(["--unpacker", &addr, "--ssl-dir"])
        .arg(&ssl)
        .args(["unpack-image", "other/stream", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not associated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every command names a client certificate the unpacker refuses (an
/// expired one, one from another CA), whatever the transport made of the
/// refusal, and the refused commands change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn every_command_names_a_refused_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let test_support::Fleet { pki, server: _server, unpacker: u } = test_support::fleet(dir.path()).await.unwrap();
    let addr = u.addr.to_string();
    let good = pki.role(Role::AmiPublisher).unwrap();
    let dev = ScratchDevice::new(&dir.path().join("vol.img"), 4 << 20).unwrap();
    let devpath = dev.path.display().to_string();
    tool(&addr, good.cert.parent().unwrap(), &["claim-device", "vol-0000000000000a01", &devpath]);
    tool(&addr, good.cert.parent().unwrap(), &["associate", "apps/web", "vol-0000000000000a01"]);
    let before = tool(&addr, good.cert.parent().unwrap(), &["get-status"]);
    let out = dir.path().join("back.raw").display().to_string();
    let commands: [&[&str]; 12] = [
        &["get-status"],
        &["add-device", "vol-0000000000000b02", "--timeout", "1s"],
        &["remove-device", "vol-0000000000000a01"],
        &["claim-device", "vol-0000000000000c03", &devpath],
        &["associate", "apps/db", "vol-0000000000000a01"],
        &["prepare-for-unpack", "apps/web"],
        &["unpack-image", "apps/web", "7"],
        &["prepare-for-capture", "apps/web"],
        &["release-capture", "apps/web"],
        &["renew-capture-hold", "apps/web", "1m"],
        &["forget-stream", "apps/web"],
        &["get-raw", "apps/web", &out],
    ];
    for refused in pki.refused(Role::AmiPublisher).unwrap() {
        let ssl = refused.tls.cert.parent().unwrap().to_owned();
        for args in commands {
            let (addr, ssl) = (addr.clone(), ssl.clone());
            let owned: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
            let out = tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_unpacker-tool"))
                    .args(["--unpacker", &addr, "--ssl-dir"])
                    .arg(&ssl)
                    .args(&owned)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains(refused.named_by),
                "{} certificate, {args:?}: {err}",
                refused.who
            );
        }
    }
    let after = tool(&addr, good.cert.parent().unwrap(), &["get-status"]);
    assert_eq!((&after["devices"], &after["streams"]), (&before["devices"], &before["streams"]), "nothing changed");
    assert!(!std::path::Path::new(&out).exists(), "no output file was written");
}
