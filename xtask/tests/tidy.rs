//! Checks on the codebase itself: architecture invariants that a compiler
//! does not enforce.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

fn crate_dirs() -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(root().join("crates")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// The daemons that run near data and devices know nothing of AWS; the
/// imageserver reaches S3 only through chunk-store-s3, and never EC2.
#[test]
fn no_aws_crate_in_the_daemons_dependency_graphs() {
    let tree_of = |krate: &str| {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", krate])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(out.status.success(), "cargo tree -p {krate}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let server = tree_of("imageserver");
    assert!(server.lines().any(|l| l.starts_with("aws-sdk-s3 ")), "the imageserver's S3 store is gone?");
    assert!(!server.lines().any(|l| l.starts_with("aws-sdk-ec2 ")), "the imageserver links the EC2 SDK");
    let manifest = std::fs::read_to_string(root().join("crates/imageserver/Cargo.toml")).unwrap();
    let normal = manifest.split("[dev-dependencies]").next().unwrap();
    assert!(!normal.lines().any(|l| l.starts_with("aws-")), "the imageserver names an AWS crate itself");
    for krate in ["image-unpacker", "imagetool", "unpacker-tool"] {
        let tree = tree_of(krate);
        let aws: Vec<_> = tree.lines().filter(|l| l.starts_with("aws-")).collect();
        assert!(aws.is_empty(), "{krate} depends on {aws:?}");
        assert!(tree.lines().count() > 10, "cargo tree printed too little for {krate}");
    }
}

/// Each crate depends (normal dependencies) only on the workspace crates
/// docs/ARCHITECTURE.md's "Crate graph" allows it; a crate missing from the
/// table below fails, so a new crate needs a decision.
#[test]
fn crate_graph_follows_the_architecture() {
    const FORMAT: &[&str] = &["image-format", "fleet-proto", "fleet-tls"];
    let allowed: &[(&str, &[&str])] = &[
        ("fleet-proto", &[]),
        ("fleet-tls", &[]),
        ("fleet-fs", &[]),
        ("fleet-daemon", &[]),
        ("fleet-cli", &["fleet-tls"]),
        ("image-format", &[]),
        ("fleet-pki", &["fleet-tls"]),
        ("chunk-store", &["image-format", "fleet-fs"]),
        ("chunk-store-s3", &["chunk-store", "image-format"]),
        ("image-client", FORMAT),
        ("unpacker-client", &["fleet-proto", "fleet-tls"]),
        (
            "imageserver",
            &[
                "fleet-cli",
                "chunk-store",
                "chunk-store-s3",
                "image-client",
                "fleet-daemon",
                "image-format",
                "fleet-proto",
                "fleet-tls",
            ],
        ),
        (
            "image-unpacker",
            &["fleet-cli", "image-client", "fleet-daemon", "fleet-fs", "image-format", "fleet-proto", "fleet-tls"],
        ),
        ("imagetool", &["fleet-cli", "image-client", "fleet-fs", "image-format", "fleet-proto", "fleet-tls"]),
        ("unpacker-tool", &["fleet-cli", "unpacker-client", "fleet-fs", "image-format", "fleet-proto", "fleet-tls"]),
        (
            "ami-publisher",
            &["fleet-cli", "unpacker-client", "image-client", "fleet-fs", "image-format", "fleet-proto", "fleet-tls"],
        ),
        ("local-world", &["*"]),
        ("test-support", &["*"]),
    ];
    let ours: Vec<String> =
        crate_dirs().iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert!(ours.len() >= 15, "crates/ holds the workspace's crates: {ours:?}");
    // The manifests as cargo reads them, not as text.
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--offline", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    for name in &ours {
        let Some((_, may)) = allowed.iter().find(|(k, _)| k == name) else {
            panic!("crate {name} is not in the crate graph of docs/ARCHITECTURE.md (and this test)");
        };
        let package = packages.iter().find(|p| p["name"] == name.as_str()).expect("a workspace member");
        let normal = package["dependencies"].as_array().unwrap().iter().filter(|d| d["kind"].is_null());
        for dep in normal.filter_map(|d| d["name"].as_str()) {
            if ours.iter().any(|o| o == dep) {
                assert!(may.contains(&"*") || may.contains(&dep), "{name} may not depend on {dep}");
            }
        }
    }
}

/// Every member takes each dependency from `[workspace.dependencies]`
/// (`name.workspace = true`, features added at most), so that one version
/// and one set of default features is decided in one place.
#[test]
fn every_dependency_comes_from_the_workspace_table() {
    let workspace: toml::Table = fs::read_to_string(root().join("Cargo.toml")).unwrap().parse().unwrap();
    let table = workspace["workspace"]["dependencies"].as_table().unwrap();
    let mut manifests: Vec<PathBuf> = crate_dirs().iter().map(|d| d.join("Cargo.toml")).collect();
    manifests.extend([root().join("xtask/Cargo.toml"), root().join("xtask/world/Cargo.toml")]);
    let mut strays = Vec::new();
    for manifest in &manifests {
        let doc: toml::Table = fs::read_to_string(manifest).unwrap().parse().unwrap();
        let mut sections: Vec<&toml::Table> = Vec::new();
        for kind in ["dependencies", "dev-dependencies", "build-dependencies"] {
            sections.extend(doc.get(kind).and_then(toml::Value::as_table));
            // [target.'cfg(...)'.dependencies] too.
            for t in doc.get("target").and_then(toml::Value::as_table).into_iter().flat_map(|t| t.values()) {
                sections.extend(t.get(kind).and_then(toml::Value::as_table));
            }
        }
        for (name, spec) in sections.iter().flat_map(|s| s.iter()) {
            let inherited = spec.get("workspace").and_then(toml::Value::as_bool) == Some(true);
            if !inherited || !table.contains_key(name) {
                strays.push(format!("{}: {name}", manifest.strip_prefix(root()).unwrap().display()));
            }
        }
    }
    assert!(strays.is_empty(), "dependencies not taken from [workspace.dependencies]: {strays:?}");
    assert!(manifests.len() >= 17, "{manifests:?}");
}

/// Every module says what it is for.
#[test]
fn every_source_file_starts_with_a_module_doc() {
    let mut files = Vec::new();
    for c in crate_dirs() {
        rust_files(&c.join("src"), &mut files);
    }
    rust_files(&root().join("xtask/src"), &mut files);
    rust_files(&root().join("xtask/world/src"), &mut files);
    assert!(files.len() > 10);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .map(|f| f.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! module doc: {missing:?}");
}

/// Every unsafe block explains why it is sound.
#[test]
fn every_unsafe_block_has_a_safety_comment() {
    let mut files = Vec::new();
    for c in crate_dirs() {
        rust_files(&c.join("src"), &mut files);
    }
    let mut bad = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let code = l.split("//").next().unwrap_or("");
            if code.contains("unsafe {") || code.trim_start().starts_with("unsafe {") {
                let window = &lines[i.saturating_sub(4)..i];
                if !window.iter().any(|w| w.contains("SAFETY:")) {
                    bad.push(format!("{}:{}", f.strip_prefix(root()).unwrap().display(), i + 1));
                }
            }
        }
    }
    assert!(bad.is_empty(), "unsafe blocks without a // SAFETY: comment: {bad:?}");
}

/// The README's two set-up commands are the ones CI runs.
#[test]
fn readme_commands_are_what_ci_runs() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let ci = fs::read_to_string(root().join(".ci/run")).unwrap();
    let block = readme.split("```sh").nth(1).unwrap().split("```").next().unwrap();
    let cmds: Vec<&str> =
        block.lines().map(|l| l.split('#').next().unwrap().trim()).filter(|l| !l.is_empty()).collect();
    assert_eq!(cmds, ["cargo xtask demo", "cargo nextest run --workspace"]);
    for c in cmds {
        assert!(ci.contains(c), ".ci/run does not run '{c}'");
    }
}

/// The systemd units in deploy/ pass `systemd-analyze verify` (with the
/// binaries swapped for /bin/true, since they are not installed here), and
/// every flag they pass exists in the daemon's CLI.
#[test]
fn deploy_units_verify() {
    let deploy = root().join("deploy");
    let tmp = std::env::temp_dir().join(format!("units-{}", std::process::id()));
    fs::create_dir_all(&tmp).unwrap();
    let mut units = Vec::new();
    for e in fs::read_dir(&deploy).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "service") {
            let text = fs::read_to_string(&p).unwrap();
            let exec = text.lines().find(|l| l.starts_with("ExecStart=")).expect("an ExecStart line");
            let src =
                fs::read_to_string(root().join("crates").join(p.file_stem().unwrap()).join("src/main.rs")).unwrap();
            for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
                let field = flag.trim_start_matches("--").replace('-', "_");
                assert!(src.contains(&format!("    {field}: ")), "{}: {flag} is not a flag of the daemon", p.display());
            }
            let bin = exec.trim_start_matches("ExecStart=").split_whitespace().next().unwrap();
            let out = tmp.join(p.file_name().unwrap());
            fs::write(&out, text.replace(bin, "/bin/true")).unwrap();
            units.push(out);
        }
    }
    assert!(units.len() >= 2, "deploy/ holds the imageserver and image-unpacker units");
    // Absent, the units would go unchecked and the test pass all the same:
    // it fails instead (.ci/run installs it).
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().unwrap_or_else(|e| {
        panic!(
            "systemd-analyze cannot be run ({e}): install systemd (apt-get install systemd) to verify deploy/'s units"
        )
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let _ = fs::remove_dir_all(&tmp);
}

/// The unpacker user data is valid sh, installs the image-unpacker package
/// (which brings the unit) rather than a unit of its own, writes the flags
/// where the unit reads them, passes only flags the daemon has, and reads
/// its certificates from where the instance policy lets it.
#[test]
fn unpacker_user_data_matches_the_unit_and_the_instance_policy() {
    let deploy = root().join("deploy");
    let script_path = deploy.join("image-unpacker-user-data.sh");
    let script = fs::read_to_string(&script_path).unwrap();
    assert!(script.starts_with("#!/bin/sh\n"), "cloud-init runs user data that starts with #!");
    let out = Command::new("sh").arg("-n").arg(&script_path).output().unwrap();
    assert!(out.status.success(), "sh -n: {}", String::from_utf8_lossy(&out.stderr));

    assert!(!script.contains("[Service]"), "the package installs the unit; the user data writes none");
    let unit = fs::read_to_string(deploy.join("image-unpacker.service")).unwrap();
    for family in ["flags=/etc/default/image-unpacker", "flags=/etc/sysconfig/image-unpacker"] {
        let path = family.trim_start_matches("flags=");
        assert!(script.contains(family), "the user data does not write {path}");
        assert!(unit.contains(&format!("EnvironmentFile=-{path}\n")), "the unit does not read {path}");
    }
    for install in ["apt-get install -y -q \"$pkg\"", "install -y -q \"$pkg\"", "apt-get install -y -q image-unpacker"]
    {
        assert!(script.contains(install), "the user data does not run {install}");
    }
    assert!(script.contains("sha256sum -c"), "a downloaded package is checked before it is installed");

    let src = fs::read_to_string(root().join("crates/image-unpacker/src/main.rs")).unwrap();
    let args = script.lines().find(|l| l.starts_with("UNPACKER_ARGS=")).expect("an UNPACKER_ARGS line");
    for flag in args.split(|c: char| c.is_whitespace() || c == '"').filter(|w| w.starts_with("--")) {
        let field = flag.trim_start_matches("--").replace('-', "_");
        assert!(src.contains(&format!("    {field}: ")), "{flag} is not a flag of image-unpacker");
    }

    let prefix = script
        .lines()
        .find_map(|l| l.strip_prefix("SSM_PREFIX=\""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("an SSM_PREFIX setting");
    let policy: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(deploy.join("image-unpacker-instance-policy.json")).unwrap()).unwrap();
    let resources: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Action"] == "ssm:GetParameter")
        .filter_map(|s| s["Resource"].as_str())
        .collect();
    assert_eq!(resources, [format!("arn:aws:ssm:*:*:parameter{prefix}/*")], "policy and user data disagree");
}

/// EC2 actions the publisher's code calls: `.describe_images()` and the
/// like, and SDK waiters (which poll a Describe action).
fn ec2_actions_in_code() -> std::collections::BTreeSet<String> {
    const VERBS: [&str; 18] = [
        "describe",
        "enable",
        "disable",
        "get_ebs",
        "get_allowed",
        "create",
        "delete",
        "attach",
        "detach",
        "start",
        "stop",
        "terminate",
        "register",
        "deregister",
        "import",
        "copy",
        "modify",
        "run",
    ];
    // The KMS operations the publisher calls (its keys are checked).
    const KMS_ACTIONS: [&str; 2] = ["describe_key", "get_key_policy"];
    // The SSM operations (the fleet's pointer).
    const SSM_ACTIONS: [&str; 5] = [
        "get_parameter",
        "get_parameter_history",
        "label_parameter_version",
        "put_parameter",
        "unlabel_parameter_version",
    ];
    // The EBS direct operations (publish --via ebs-direct).
    const EBS_ACTIONS: [&str; 6] = [
        "complete_snapshot",
        "get_snapshot_block",
        "list_changed_blocks",
        "list_snapshot_blocks",
        "put_snapshot_block",
        "start_snapshot",
    ];
    // Getters that look like operations.
    const NOT_ACTIONS: [&str; 3] = ["start_time", "delete_on_termination", "create_volume_permissions"];
    let mut files = Vec::new();
    rust_files(&root().join("crates/ami-publisher/src"), &mut files);
    let mut out = std::collections::BTreeSet::new();
    let pascal =
        |snake: &str| -> String { snake.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect::<String>() };
    for f in files {
        let text = fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices('.') {
            let rest = &text[i + 1..];
            let ident: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
            if !rest[ident.len()..].starts_with("()") || NOT_ACTIONS.contains(&ident.as_str()) {
                continue;
            }
            if let Some(w) = ident.strip_prefix("wait_until_") {
                let noun = ["instance", "volume", "snapshot", "image"].into_iter().find(|n| w.starts_with(n));
                out.insert(format!(
                    "ec2:Describe{}s",
                    pascal(noun.unwrap_or_else(|| panic!("unknown waiter {ident}")))
                ));
            } else if KMS_ACTIONS.contains(&ident.as_str()) {
                out.insert(format!("kms:{}", pascal(&ident)));
            } else if SSM_ACTIONS.contains(&ident.as_str()) {
                out.insert(format!("ssm:{}", pascal(&ident)));
            } else if EBS_ACTIONS.contains(&ident.as_str()) {
                out.insert(format!("ebs:{}", pascal(&ident)));
            } else if VERBS.iter().any(|v| ident.starts_with(&format!("{v}_"))) {
                out.insert(format!("ec2:{}", pascal(&ident)));
            }
        }
    }
    out
}

/// deploy/ami-publisher-iam-policy.json lists exactly the EC2, KMS, SSM and EBS
/// actions the publisher calls: least privilege, kept in step with the code.
#[test]
fn iam_policy_lists_exactly_the_ec2_actions_the_publisher_calls() {
    let code = ec2_actions_in_code();
    assert!(code.contains("ec2:RegisterImage") && code.contains("ec2:DescribeInstances"), "{code:?}");
    let path = root().join("deploy/ami-publisher-iam-policy.json");
    let policy: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let mut listed = std::collections::BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        for a in st["Action"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            if ["ec2:", "kms:", "ssm:", "ebs:"].iter().any(|p| a.starts_with(p)) {
                listed.insert(a.to_owned());
            }
        }
    }
    // Read by EC2 with the caller's rights for DescribeImageReferences, not
    // called by the code (policy.rs, LetEc2FindWhatReferencesAnImage).
    for a in [
        "ec2:DescribeLaunchTemplateVersions",
        "ec2:DescribeLaunchTemplates",
        "ssm:DescribeParameters",
        "ssm:GetParameters",
    ] {
        assert!(listed.remove(a), "{a} is no longer in the policy: take it off this list");
    }
    let missing: Vec<_> = code.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&code).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{}: missing {missing:?}, not called {extra:?}", path.display());
}

/// docs/world.md's conformance table has one row for every action of the
/// publisher's IAM policy (EC2 actions by their bare name, others with
/// their service prefix), and no row for an EC2 action the policy lacks.
#[test]
fn the_conformance_table_has_a_row_for_each_action_of_the_iam_policy() {
    let doc = fs::read_to_string(root().join("docs/world.md")).unwrap();
    let section = doc.split("## Conformance").nth(1).expect("docs/world.md has no Conformance section");
    let section = section.split("\n## ").next().unwrap();
    let mut rows = std::collections::BTreeSet::new();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let name = line.split('|').nth(1).unwrap().trim();
        if name == "action" || name.starts_with("---") {
            continue;
        }
        let name = if name.contains(':') { name.to_owned() } else { format!("ec2:{name}") };
        assert!(rows.insert(name.clone()), "docs/world.md: two conformance rows for {name}");
    }
    let policy: serde_json::Value =
        serde_json::from_slice(&fs::read(root().join("deploy/ami-publisher-iam-policy.json")).unwrap()).unwrap();
    let mut listed = std::collections::BTreeSet::new();
    for st in policy["Statement"].as_array().unwrap() {
        for a in st["Action"].as_array().unwrap() {
            listed.insert(a.as_str().unwrap().to_owned());
        }
    }
    assert!(listed.len() > 20, "{listed:?}");
    let missing: Vec<_> = listed.difference(&rows).collect();
    // STS calls need no permission in this policy (the roles' trust
    // policies grant them), but a publish makes them: they have rows too.
    let extra: Vec<_> = rows.difference(&listed).filter(|r| !r.starts_with("sts:")).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/world.md conformance rows: missing {missing:?}, not in the policy {extra:?}"
    );
}

/// `cargo xtask dist` writes completions and man pages that know every
/// subcommand.
#[test]
fn dist_writes_completions_and_man_pages() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_xtask")).args(["dist", "--out"]).arg(out.path()).status().unwrap();
    assert!(status.success());
    let bash = fs::read_to_string(out.path().join("completions/ami-publisher.bash")).unwrap();
    for sub in ["publish", "expire", "stop-idle-unpackers", "set-exclusive-tags"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
        let page = out.path().join(format!("man/ami-publisher-{sub}.1"));
        assert!(fs::read_to_string(&page).unwrap().contains(".SH NAME"), "{}", page.display());
    }
    assert!(out.path().join("completions/_ami-publisher").exists());
    assert!(out.path().join("completions/ami-publisher.fish").exists());
    for (tool, sub) in [("imagetool", "add"), ("unpacker-tool", "unpack-image")] {
        let bash = fs::read_to_string(out.path().join(format!("completions/{tool}.bash"))).unwrap();
        assert!(bash.contains(sub), "{tool}'s bash completion lacks {sub}");
        assert!(out.path().join(format!("man/{tool}-{sub}.1")).is_file(), "no man page of {tool} {sub}");
    }
    // clap's `help` subcommand only repeats --help: no pages of its own.
    let help_pages: Vec<_> = fs::read_dir(out.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-help"))
        .collect();
    assert!(help_pages.is_empty(), "{help_pages:?}");
}
