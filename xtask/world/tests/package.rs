//! `cargo xtask package` (issue 23): what the packages hold, and the
//! image-unpacker .deb installed, run, upgraded, removed and purged on this
//! machine with dpkg.
//!
//! The packages are made from the binaries this test run was built with
//! (`--binaries-from`, the dev profile), with light compression: the
//! packaging is the same as for a release build, only the binaries differ.
//! These tests need cargo-deb, cargo-generate-rpm and rpm (`.ci/run`
//! installs them) and fail, naming what is missing, without them. The
//! install test also needs root and dpkg, and is skipped (saying so)
//! elsewhere.

use std::{
    collections::BTreeSet,
    fs,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use fleet_pki::Role;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_owned()
}

/// The directory holding this build's binaries (the workspace's, when the
/// tests run with --workspace, as the README's command does).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_xtask-world")).parent().unwrap().to_owned()
}

fn require(cmd: &str, args: &[&str], install: &str) {
    let ok = Command::new(cmd).args(args).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{cmd} is needed to check the packages: {install}");
}

fn require_tools() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    require(&cargo, &["deb", "--version"], "cargo install --locked cargo-deb");
    require(&cargo, &["generate-rpm", "--version"], "cargo install --locked cargo-generate-rpm");
    require("rpm", &["--version"], "apt-get install rpm");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// `cargo xtask package` into `out`; returns the files SHA256SUMS names,
/// after `sha256sum -c` has checked them.
fn package(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask-world"));
    cmd.arg("package").arg("--binaries-from").arg(bin_dir()).arg("--fast").arg("--out").arg(out).args(extra);
    run(&mut cmd);
    run(Command::new("sha256sum").arg("-c").arg("--strict").arg("SHA256SUMS").current_dir(out));
    fs::read_to_string(out.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| l.split_once("  ").expect("HASH  NAME").1.to_owned())
        .collect()
}

/// The paths a .deb installs (files only), as absolute paths.
fn deb_files(deb: &Path) -> BTreeSet<String> {
    stdout(Command::new("dpkg-deb").arg("--contents").arg(deb))
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| l.rsplit(' ').next().unwrap().trim_start_matches('.').to_owned())
        .collect()
}

fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    stdout(Command::new("rpm").args(["-q", "-p"]).args(args).arg(rpm))
}

/// `(binary, environment files)` of a unit's ExecStart= and EnvironmentFile=.
fn unit_paths(unit: &str) -> (String, Vec<String>) {
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart=");
    let env = unit
        .lines()
        .filter_map(|l| l.strip_prefix("EnvironmentFile="))
        .map(|p| p.trim_start_matches('-').to_owned())
        .collect();
    (exec.split_whitespace().next().unwrap().to_owned(), env)
}

fn man_pages_expected() -> BTreeSet<String> {
    // One page per tool and per subcommand, from the tools' --help.
    let mut pages = BTreeSet::new();
    for tool in ["ami-publisher", "imagetool", "unpacker-tool"] {
        pages.insert(format!("/usr/share/man/man1/{tool}.1"));
        let help = stdout(Command::new(bin_dir().join(tool)).arg("--help"));
        let commands = help.split("Commands:\n").nth(1).expect("a Commands: section");
        for line in commands.lines().take_while(|l| l.starts_with("  ")) {
            let sub = line.split_whitespace().next().unwrap();
            if sub != "help" {
                pages.insert(format!("/usr/share/man/man1/{tool}-{sub}.1"));
            }
        }
    }
    pages
}

/// Every package holds its files where the units and the docs expect them,
/// in both formats; the archives hold the binaries and their files;
/// SHA256SUMS covers exactly what was made.
#[test]
fn packages_hold_what_the_units_and_docs_expect() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("packages");
    let made = package(&out, &[]);
    let version = env!("CARGO_PKG_VERSION");
    let arch = std::env::consts::ARCH;
    let expected: BTreeSet<String> = ["image-unpacker", "imageserver", "ami-fleet-tools"]
        .iter()
        .flat_map(|n| {
            [
                format!("{n}_{version}-1_amd64.deb"),
                format!("{n}-{version}-1.{arch}.rpm"),
                format!("{n}-{version}-{arch}-linux.tar.zst"),
            ]
        })
        .collect();
    assert_eq!(made.iter().cloned().collect::<BTreeSet<_>>(), expected, "SHA256SUMS names what was made");

    for daemon in ["image-unpacker", "imageserver"] {
        let unit_src = fs::read_to_string(root().join(format!("deploy/{daemon}.service"))).unwrap();
        let (exec, env_files) = unit_paths(&unit_src);
        let unit_path = format!("/usr/lib/systemd/system/{daemon}.service");

        let deb = out.join(format!("{daemon}_{version}-1_amd64.deb"));
        let files = deb_files(&deb);
        for want in
            [&exec, &unit_path, &format!("/etc/default/{daemon}"), &format!("/usr/share/doc/{daemon}/operations.md")]
        {
            assert!(files.contains(want.as_str()), "{daemon}.deb lacks {want}: {files:?}");
        }
        assert!(env_files.contains(&format!("/etc/default/{daemon}")), "the unit reads /etc/default/{daemon}");
        let control = stdout(Command::new("dpkg-deb").arg("--field").arg(&deb).args(["Package", "Version"]));
        assert!(control.contains(&format!("Package: {daemon}\nVersion: {version}-1")), "{control}");
        let info = tempfile::tempdir().unwrap();
        run(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(info.path()));
        assert_eq!(
            fs::read_to_string(info.path().join("conffiles")).unwrap().trim(),
            format!("/etc/default/{daemon}"),
            "the flags file is a conffile (kept on upgrade and removal)"
        );
        let postinst = fs::read_to_string(info.path().join("postinst")).unwrap();
        assert!(postinst.contains(&format!("deb-systemd-helper enable {daemon}.service")), "{postinst}");
        assert!(postinst.contains("enabled, but not started"), "{postinst}");
        assert!(!postinst.contains("deb-systemd-invoke start"), "the service is not started on install: {postinst}");
        assert!(postinst.contains(&format!("deb-systemd-invoke try-restart {daemon}.service")), "{postinst}");
        // cargo-deb's steps stand once each, where the marker line was, and
        // nothing of the marker is left.
        for (script, step) in [("postinst", "deb-systemd-helper unmask"), ("postrm", "deb-systemd-helper purge")] {
            let text = fs::read_to_string(info.path().join(script)).unwrap();
            assert_eq!(text.matches(step).count(), 1, "{daemon} {script}: {text}");
            assert!(!text.contains("DEBHELPER"), "{daemon} {script}: {text}");
        }
        let postrm = fs::read_to_string(info.path().join("postrm")).unwrap();
        assert!(postrm.contains("\"$1\" = purge") && postrm.contains(&format!("/var/lib/{daemon}")), "{postrm}");
        for script in ["postinst", "postrm", "prerm"] {
            run(Command::new("sh").arg("-n").arg(info.path().join(script)));
        }
        // The unit is deploy/'s (which the tidy test verifies); the install
        // test verifies it as installed, beside its binary.
        let tree = tempfile::tempdir().unwrap();
        run(Command::new("dpkg-deb").arg("--extract").arg(&deb).arg(tree.path()));
        assert_eq!(fs::read_to_string(tree.path().join(&unit_path[1..])).unwrap(), unit_src);

        let rpm = out.join(format!("{daemon}-{version}-1.{arch}.rpm"));
        let listed: BTreeSet<String> = rpm_query(&rpm, &["--list"]).lines().map(str::to_owned).collect();
        for want in [&exec, &unit_path, &format!("/etc/sysconfig/{daemon}")] {
            assert!(listed.contains(want.as_str()), "{daemon}.rpm lacks {want}: {listed:?}");
        }
        assert!(env_files.contains(&format!("/etc/sysconfig/{daemon}")), "the unit reads /etc/sysconfig/{daemon}");
        assert_eq!(rpm_query(&rpm, &["--configfiles"]).trim(), format!("/etc/sysconfig/{daemon}"));
        assert_eq!(
            rpm_query(&rpm, &["--queryformat", "%{NAME} %{VERSION}-%{RELEASE}"]),
            format!("{daemon} {version}-1")
        );
        let scripts = rpm_query(&rpm, &["--scripts"]);
        // `rpm --scripts`: "NAME scriptlet:" (or "NAME scriptlet (using
        // /bin/sh):") and the script, for each.
        let mut parts: Vec<(String, String)> = Vec::new();
        for line in scripts.lines() {
            match line.split_once(" scriptlet") {
                Some((name, rest)) if rest.ends_with(':') && !name.contains(' ') => {
                    parts.push((name.to_owned(), String::new()));
                }
                _ => {
                    let (_, body) = parts.last_mut().expect("a scriptlet header first");
                    body.push_str(line);
                    body.push('\n');
                }
            }
        }
        let part = |name: &str| -> String {
            parts.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} scriptlet: {scripts}")).1.clone()
        };
        let post = part("postinstall");
        assert!(post.contains(&format!("systemctl enable {daemon}.service")), "{post}");
        assert!(post.contains("enabled, but not started"), "{post}");
        let starts = |l: &&str| l.contains(" start ") || l.contains("restart") || l.contains("--now");
        let calls: Vec<&str> = post.lines().map(str::trim).filter(|l| l.starts_with("systemctl")).collect();
        assert!(!calls.iter().any(starts), "the service is not started on install: {post}");
        let preun = part("preuninstall");
        assert!(preun.contains(&format!("disable --now {daemon}.service")) && preun.contains("-eq 0"), "{preun}");
        let postun = part("postuninstall");
        assert!(postun.contains(&format!("try-restart {daemon}.service")) && postun.contains("-ge 1"), "{postun}");
        for (name, body) in [("postinstall", post), ("preuninstall", preun), ("postuninstall", postun)] {
            let out = Command::new("sh").args(["-n", "-c", &body]).output().unwrap();
            assert!(out.status.success(), "{daemon}.rpm {name} is not valid sh: {body}");
        }
    }

    // Built on this machine, the binaries install on Amazon Linux 2023 and
    // RHEL 9 (glibc 2.34) and anything newer.
    for rpm in made.iter().filter(|f| f.ends_with(".rpm")) {
        let requires = rpm_query(&out.join(rpm), &["--requires"]);
        let newest = requires
            .lines()
            .filter_map(|l| l.split("(GLIBC_").nth(1)?.split(')').next())
            .map(|v| v.split('.').map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>())
            .max()
            .unwrap_or_else(|| panic!("{rpm} names no glibc requirement: {requires}"));
        assert!(newest <= vec![2, 34], "{rpm} needs glibc {newest:?}, newer than Amazon Linux 2023's 2.34");
    }

    // The tools: binaries, a man page per command, completions, the policy.
    let pages = man_pages_expected();
    assert!(pages.len() > 30, "ami-publisher alone has more than 23 subcommands: {pages:?}");
    let tools_deb = deb_files(&out.join(format!("ami-fleet-tools_{version}-1_amd64.deb")));
    let tools_rpm: BTreeSet<String> =
        rpm_query(&out.join(format!("ami-fleet-tools-{version}-1.{arch}.rpm")), &["--list"])
            .lines()
            .map(str::to_owned)
            .collect();
    for (format, files, zsh) in
        [("deb", &tools_deb, "/usr/share/zsh/vendor-completions"), ("rpm", &tools_rpm, "/usr/share/zsh/site-functions")]
    {
        let man: BTreeSet<String> = files.iter().filter(|f| f.starts_with("/usr/share/man/")).cloned().collect();
        assert_eq!(man, pages, "ami-fleet-tools.{format}: man pages");
        for tool in ["ami-publisher", "imagetool", "unpacker-tool"] {
            for want in [
                format!("/usr/bin/{tool}"),
                format!("/usr/share/bash-completion/completions/{tool}"),
                format!("{zsh}/_{tool}"),
                format!("/usr/share/fish/vendor_completions.d/{tool}.fish"),
            ] {
                assert!(files.contains(&want), "ami-fleet-tools.{format} lacks {want}");
            }
        }
        assert!(files.contains("/usr/share/doc/ami-fleet-tools/ami-publisher-iam-policy.json"), "{format}");
        assert!(files.contains("/usr/share/doc/ami-fleet-tools/examples/stop-idle-unpackers.cron"), "{format}");
        assert!(!files.iter().any(|f| f.starts_with("/etc/")), "the cron example is not installed as a cron job");
    }

    // The archives: binaries that run, and their files.
    for (name, bins, file) in [
        ("image-unpacker", &["image-unpacker"][..], "image-unpacker.service"),
        ("imageserver", &["imageserver"][..], "imageserver.service"),
        ("ami-fleet-tools", &["ami-publisher", "imagetool", "unpacker-tool"][..], "man/ami-publisher-publish.1"),
    ] {
        let path = out.join(format!("{name}-{version}-{arch}-linux.tar.zst"));
        let unpacked = dir.path().join(format!("unpacked-{name}"));
        let decoder = zstd::Decoder::new(fs::File::open(&path).unwrap()).unwrap();
        tar::Archive::new(decoder).unpack(&unpacked).unwrap();
        let top = unpacked.join(format!("{name}-{version}"));
        for bin in bins {
            let exe = top.join("bin").join(bin);
            assert_eq!(fs::metadata(&exe).unwrap().permissions().mode() & 0o777, 0o755, "{}", exe.display());
            let v = stdout(Command::new(&exe).arg("--version"));
            assert!(v.contains(version), "{bin} --version: {v}");
        }
        assert!(top.join(file).is_file(), "{name} archive lacks {file}");
        assert!(top.join("operations.md").is_file(), "{name} archive lacks operations.md");
    }
}

/// The image-unpacker .deb on this machine: install (enabled, not started,
/// saying so), the daemon run from the installed unit's command line and
/// flags file serving an unpack, an upgrade that keeps its state and
/// capture hold across the restart, then remove (state and flags kept) and
/// purge (both gone).
#[test]
fn unpacker_deb_installs_serves_an_unpack_upgrades_and_purges() {
    require_tools();
    let is_root = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !is_root || Command::new("dpkg").arg("--version").output().is_err() {
        eprintln!("SKIPPED: installing packages needs root and dpkg");
        return;
    }
    const MARK: &str = "# written by the package test";
    for pkg in ["image-unpacker", "ami-fleet-tools"] {
        let installed = Command::new("dpkg-query").args(["-W", "-f", "${Status}", pkg]).output().unwrap();
        if String::from_utf8_lossy(&installed.stdout).contains("installed") {
            // Only a copy an earlier run of this test left may go: its
            // flags are this test's, or still the package's own.
            let flags = fs::read_to_string("/etc/default/image-unpacker").unwrap_or_default();
            let packaged = fs::read_to_string(root().join("deploy/image-unpacker.env")).unwrap();
            assert!(
                pkg != "image-unpacker" || flags.contains(MARK) || flags == packaged,
                "{pkg} is installed on this machine; this test would replace it"
            );
            run(Command::new("dpkg").args(["--purge", pkg]));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1");
    let v2 = dir.path().join("v2");
    package(&v1, &[]);
    package(&v2, &["--revision", "2"]);
    let version = env!("CARGO_PKG_VERSION");
    let deb = |dir: &Path, name: &str, rev: u32| dir.join(format!("{name}_{version}-{rev}_amd64.deb"));

    run(Command::new("dpkg").arg("--install").arg(deb(&v1, "ami-fleet-tools", 1)));
    let installed = run(Command::new("dpkg").arg("--install").arg(deb(&v1, "image-unpacker", 1)));
    let said = String::from_utf8_lossy(&installed.stdout);
    let complained = String::from_utf8_lossy(&installed.stderr);
    assert!(!complained.contains("not found") && !complained.contains("error"), "{complained}");
    assert!(said.contains("image-unpacker is installed and enabled, but not started"), "{said}");
    assert_eq!(fs::metadata("/var/lib/image-unpacker").unwrap().permissions().mode() & 0o777, 0o700);
    let wants = Path::new("/etc/systemd/system/multi-user.target.wants/image-unpacker.service");
    // Enabled: the link deb-systemd-helper made (to /lib or /usr/lib).
    let link = fs::read_link(wants).unwrap();
    assert!(link.ends_with("systemd/system/image-unpacker.service") && link.exists(), "{}", link.display());
    let unit_path = Path::new("/usr/lib/systemd/system/image-unpacker.service");
    let verify = run(Command::new("systemd-analyze").arg("verify").arg(unit_path));
    assert!(String::from_utf8_lossy(&verify.stderr).trim().is_empty());
    assert!(Path::new("/usr/share/man/man1/ami-publisher-publish.1").is_file());

    // The world: a PKI, an imageserver on loopback with one image, added
    // by the installed imagetool.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pki = test_support::Pki::new(&dir.path().join("pki")).unwrap();
    let server = rt.block_on(test_support::imageserver(&pki, &dir.path().join("data"))).unwrap();
    let unpacker_tls = pki.role(Role::ImageUnpacker).unwrap();
    pki.role(Role::AmiPublisher).unwrap();
    pki.role(Role::ImageBuilder).unwrap();
    let image = test_support::noise(3 << 20, 23);
    let image_file = dir.path().join("image.raw");
    fs::write(&image_file, &image).unwrap();
    let ssl = |role: &str| dir.path().join("pki").join(role);
    run(Command::new("/usr/bin/imagetool")
        .args(["--server", &server.addr.to_string(), "--ssl-dir"])
        .arg(ssl("image-builder"))
        .args(["add", "apps/web/1"])
        .arg(&image_file));

    // The daemon's flags, as an operator writes them.
    let listen = free_port();
    let by_id = dir.path().join("by-id");
    fs::create_dir_all(&by_id).unwrap();
    fs::write(
        "/etc/default/image-unpacker",
        format!(
            "{MARK}\nUNPACKER_ARGS=\"--image-server {} --listen {listen} --metrics-listen off --device-dir {} --ca {} --cert {} --key {}\"\nRUST_LOG=info\n",
            server.addr,
            by_id.display(),
            unpacker_tls.ca.display(),
            unpacker_tls.cert.display(),
            unpacker_tls.key.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("unpacker.log");
    let mut daemon = Daemon::start(unit_path, &log, listen);

    let dev = test_support::ScratchDevice::new(&dir.path().join("vol.img"), 4 << 20).unwrap();
    let tool = |args: &[&str]| -> serde_json::Value {
        let out = run(Command::new("/usr/bin/unpacker-tool")
            .args(["--unpacker", &listen.to_string(), "--json", "--ssl-dir"])
            .arg(ssl("ami-publisher"))
            .args(args));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    tool(&["claim-device", "vol-0000000000000a01", &dev.path.display().to_string(), "--fresh"]);
    tool(&["associate", "apps/web", "vol-0000000000000a01"]);
    tool(&["prepare-for-unpack", "apps/web"]);
    let unpacked = tool(&["unpack-image", "apps/web", "1"]);
    assert_eq!(unpacked["chunks_written"], 6, "{unpacked}");
    tool(&["prepare-for-capture", "apps/web", "--hold", "10m"]);
    assert_eq!(dev.read(image.len()).unwrap(), image, "the installed daemon wrote the image");

    // Upgrade to revision 2 while it runs; then restart it as the
    // package's try-restart does under systemd.
    let upgraded = run(Command::new("dpkg").arg("--install").arg(deb(&v2, "image-unpacker", 2)));
    let said = String::from_utf8_lossy(&upgraded.stdout);
    let complained = String::from_utf8_lossy(&upgraded.stderr);
    assert!(!complained.contains("not found") && !complained.contains("error"), "{complained}");
    assert!(!said.contains("not started"), "the first-install note is not repeated on upgrade: {said}");
    let status = stdout(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "image-unpacker"]));
    assert_eq!(status, format!("{version}-2"));
    assert!(fs::read_to_string("/etc/default/image-unpacker").unwrap().contains(MARK), "the flags survive");
    daemon.stop();
    daemon = Daemon::start(unit_path, &log, listen);
    let st = tool(&["get-status"]);
    let stream = &st["streams"][0];
    assert_eq!((stream["stream"].as_str(), stream["leaf"].as_str()), (Some("apps/web"), Some("1")), "{st}");
    assert!(stream["hold_seconds"].as_u64().unwrap() > 500, "the capture hold survives: {st}");
    let again = tool(&["unpack-image", "apps/web", "1"]);
    assert_eq!(again["chunks_written"], 0, "the restarted daemon knows what the device holds: {again}");
    daemon.stop();

    // Remove: the program goes, state and flags stay. Purge: all goes.
    run(Command::new("dpkg").args(["--remove", "image-unpacker"]));
    assert!(!Path::new("/usr/bin/image-unpacker").exists());
    assert!(Path::new("/var/lib/image-unpacker/state.json").is_file(), "remove keeps the state");
    assert!(Path::new("/etc/default/image-unpacker").is_file(), "remove keeps the flags");
    run(Command::new("dpkg").args(["--purge", "image-unpacker"]));
    assert!(!Path::new("/var/lib/image-unpacker").exists(), "purge removes the state");
    assert!(!Path::new("/etc/default/image-unpacker").exists(), "purge removes the flags");
    assert!(!wants.exists() && wants.symlink_metadata().is_err(), "purge removes the enablement");
    run(Command::new("dpkg").args(["--purge", "ami-fleet-tools"]));
    assert!(!Path::new("/usr/bin/ami-publisher").exists());
    drop(server);
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The daemon started as systemd would start the installed unit: its
/// ExecStart= with `$VAR` split into words from its EnvironmentFile=s
/// (missing ones skipped, as their `-` prefix says), with that environment.
struct Daemon(Child);

impl Daemon {
    fn start(unit_path: &Path, log: &Path, listen: SocketAddr) -> Daemon {
        let unit = fs::read_to_string(unit_path).unwrap();
        let (_, env_files) = unit_paths(&unit);
        let mut env = Vec::new();
        for file in env_files {
            let Ok(text) = fs::read_to_string(&file) else { continue };
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let (k, v) = line.split_once('=').unwrap();
                env.push((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
        let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
        let mut words = Vec::new();
        for w in exec.split_whitespace() {
            match w.strip_prefix('$') {
                Some(var) => {
                    let v = &env.iter().find(|(k, _)| k == var).unwrap_or_else(|| panic!("{var} is not set")).1;
                    words.extend(v.split_whitespace().map(str::to_owned));
                }
                None => words.push(w.to_owned()),
            }
        }
        let child = Command::new(&words[0])
            .args(&words[1..])
            .envs(env)
            .stderr(fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {words:?}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(listen).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not listen on {listen}: {}", read(log));
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon(child)
    }

    fn stop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    let _ = fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s));
    s
}
