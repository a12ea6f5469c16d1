//! moto: installing it into a venv under `target/` once per machine, and
//! starting it through the launcher (`moto_launch.py`, `world_model.py` and
//! the `world/` modules, which bring its answers towards EC2's) with the
//! world variables of one world.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::Plan;

/// The moto release the world installs.
pub const MOTO_VERSION: &str = "5.1.22";
/// Install moto into `target/moto-venv-VERSION` unless it is there; returns
/// the path of `moto_server`. Safe to call from concurrent test processes.
pub fn ensure_moto() -> anyhow::Result<PathBuf> {
    let target = workspace_target();
    std::fs::create_dir_all(&target)?;
    let venv = target.join(format!("moto-venv-{MOTO_VERSION}"));
    let server = venv.join("bin/moto_server");
    let marker = venv.join(".installed");
    let lock = std::fs::File::create(target.join("moto-venv.lock"))?;
    lock.lock()?;
    if marker.exists() && server.exists() {
        return Ok(server);
    }
    eprintln!("local-world: installing moto {MOTO_VERSION} into {} (once)", venv.display());
    let _ = std::fs::remove_dir_all(&venv);
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success()))
        .context("python3 is needed to run the moto EC2 emulator")?;
    let ok = Command::new(python).args(["-m", "venv"]).arg(&venv).status()?.success();
    if !ok {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("moto[server]=={MOTO_VERSION}"))
        .output()?;
    if !out.status.success() {
        bail!("pip install moto[server]=={MOTO_VERSION} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(&marker, MOTO_VERSION)?;
    Ok(server)
}

/// A moto server process; killed on drop.
pub(crate) struct Moto {
    pub(crate) child: Child,
    pub(crate) endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The launcher that patches moto's EC2 model before serving, and the
/// model of EC2's pace and faults it applies (see their headers).
const MOTO_LAUNCH: &str = include_str!("moto_launch.py");
const WORLD_MODEL: &str = include_str!("world_model.py");
/// The launcher's modules, one per EC2 behaviour moto lacks (`world/`).
const WORLD_MODULES: [(&str, &str); 14] = [
    ("allowed_images.py", include_str!("world/allowed_images.py")),
    ("ebs_direct.py", include_str!("world/ebs_direct.py")),
    ("failed_states.py", include_str!("world/failed_states.py")),
    ("iam_policy.py", include_str!("world/iam_policy.py")),
    ("image_attributes.py", include_str!("world/image_attributes.py")),
    ("image_lifecycle.py", include_str!("world/image_lifecycle.py")),
    ("kms_keys.py", include_str!("world/kms_keys.py")),
    ("organization.py", include_str!("world/organization.py")),
    ("s3_conditional.py", include_str!("world/s3_conditional.py")),
    ("shared_images.py", include_str!("world/shared_images.py")),
    ("snapshot_limits.py", include_str!("world/snapshot_limits.py")),
    ("ssm_images.py", include_str!("world/ssm_images.py")),
    ("tag_lag.py", include_str!("world/tag_lag.py")),
    ("volume_modifications.py", include_str!("world/volume_modifications.py")),
];

/// The world variables (see `world_model.py` and docs/world.md).
pub const WORLD_VARIABLES: [&str; 5] =
    ["LOCAL_WORLD_PACE", "LOCAL_WORLD_TIME_SCALE", "LOCAL_WORLD_FAULTS", "LOCAL_WORLD_SEED", "LOCAL_WORLD_IAM"];

/// The IAM policy the product ships, which the world enforces on
/// ami-publisher's EC2 calls (`world/iam_policy.py`) unless
/// `LOCAL_WORLD_IAM=off`.
const PUBLISHER_POLICY: &str = include_str!("../../../deploy/ami-publisher-iam-policy.json");
/// `LOCAL_WORLD_IAM` when neither the plan nor the process sets it.
pub(crate) const IAM_DEFAULT: &str = "enforce";

/// Whether the world enforces the publisher's IAM policy.
fn enforces_iam(vars: &[(String, String)]) -> anyhow::Result<bool> {
    match vars.iter().rev().find(|(k, _)| k == "LOCAL_WORLD_IAM").map_or(IAM_DEFAULT, |(_, v)| v.as_str()) {
        "enforce" => Ok(true),
        "off" => Ok(false),
        other => anyhow::bail!("LOCAL_WORLD_IAM={other}: it is enforce (the default) or off"),
    }
}

/// The world variables for one world: the plan's, else the process's. A
/// seed is chosen here when none is given, so that it can be reported.
pub(crate) fn world_variables(plan: &Plan) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = WORLD_VARIABLES
        .iter()
        .filter_map(|name| {
            let value = plan
                .variables
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(name).ok())?;
            Some(((*name).to_owned(), value))
        })
        .collect();
    if !vars.iter().any(|(k, _)| k == "LOCAL_WORLD_SEED") {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id().rotate_left(16))
            .unwrap_or(0);
        vars.push(("LOCAL_WORLD_SEED".into(), seed.to_string()));
    }
    vars
}

pub(crate) fn start_moto(dir: &Path, vars: &[(String, String)]) -> anyhow::Result<Moto> {
    let server = ensure_moto()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log_path = dir.join("moto.log");
    let log = std::fs::File::create(&log_path)?;
    // moto_server, started through a launcher that brings a few of moto's
    // EC2 answers closer to EC2's (see the file's header).
    let launcher = dir.join("moto_launch.py");
    std::fs::write(&launcher, MOTO_LAUNCH)?;
    std::fs::write(dir.join("world_model.py"), WORLD_MODEL)?;
    std::fs::create_dir_all(dir.join("world"))?;
    for (name, text) in WORLD_MODULES {
        std::fs::write(dir.join("world").join(name), text)?;
    }
    let policy = dir.join("ami-publisher-iam-policy.json");
    if enforces_iam(vars)? {
        std::fs::write(&policy, PUBLISHER_POLICY)?;
    }
    let python = server.with_file_name("python");
    let mut cmd = Command::new(python);
    cmd.arg(&launcher).env("LOCAL_WORLD_DIR", dir);
    for name in WORLD_VARIABLES {
        cmd.env_remove(name);
    }
    cmd.env_remove("LOCAL_WORLD_IAM_POLICY");
    if enforces_iam(vars)? {
        cmd.env("LOCAL_WORLD_IAM_POLICY", &policy);
    }
    let child = cmd
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting moto_server")?;
    let mut moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(s) = moto.child.try_wait()? {
            // The launcher refuses a bad world variable with one line
            // "local-world: VARIABLE: what is wrong".
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = said.lines().find_map(|l| l.strip_prefix("local-world: ")) {
                bail!("{line}");
            }
            bail!("moto_server exited ({s}); see {}", log_path.display());
        }
        if Instant::now() > deadline {
            bail!("moto_server did not listen within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(moto)
}

pub(crate) fn workspace_target() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}
