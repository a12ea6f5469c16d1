//! `cargo xtask soak`: one image stream published step after step to 6
//! targets (2 accounts x 3 regions) on a world with every fault it models
//! at once, and the same steps side by side on a fault-free world. Leaves
//! grow and shrink, one leaf is published twice at once, and a publisher is
//! killed (SIGKILL) mid-run and run again. After every step the emulator's
//! resources are counted, as EC2 holds them (the world's own calls, which
//! no lag or fault touches).
//!
//! A leak is a resource of the stream that backs nothing and is not set to
//! expire (a snapshot no AMI boots from, a second AMI of a leaf, a failed
//! AMI, a volume besides the stream's own), an instance besides the
//! unpacker, or anything untagged that was not there before. A snapshot or
//! volume that a killed or failed run left with its `ExpiresAt` tag is not
//! a leak: `ami-publisher expire` removes it; it is counted apart.
//!
//! A target that fails is published again once, as a pipeline would re-run
//! its job; the failure's cause (its EC2 error code) is counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use fleet_pki::Role;
use local_world::{Plan, World};

use crate::{bench::Row, util};

const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];
/// Every fault the world models, at the levels of CI's faults run, and tag
/// changes seen up to 2 s late with new ids.
pub(crate) const FAULTS: &str = "throttle=0.2,load=0.3,error=0.02,lag=2s,lost=0.02,hang=0.002,\
                                 fail=0.05@CreateSnapshot+RegisterImage,capacity=0.05";
const SEED: u64 = 2612;
/// AWS's own durations: at the suite's scale the fault-free publish takes a
/// few seconds, and the real-sized back-offs of a retry would dominate any
/// ratio.
const TIME_SCALE: f64 = 1.0;
const STREAM: &str = "soak/base";
const MIB: u64 = 1 << 20;
const SMALL: u64 = 16 * MIB;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A new leaf, a few percent changed.
    Next,
    /// A new leaf larger than the stream's volume: it must grow (or, once
    /// grown within 6 hours, be replaced).
    Grow,
    /// A new leaf back to the small size.
    Shrink,
    /// The previous leaf again: every target has it.
    Again,
    /// A new leaf by two publishers at once.
    Twice,
    /// A new leaf whose publisher is killed mid-run, then run again.
    Killed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Next => "next leaf",
            Kind::Grow => "grow",
            Kind::Shrink => "shrink",
            Kind::Again => "same leaf again",
            Kind::Twice => "twice at once",
            Kind::Killed => "killed and re-run",
        }
    }
}

/// The 20 steps (repeated when more are asked).
const STEPS: [Kind; 20] = {
    use Kind::{Again, Grow, Killed, Next, Shrink, Twice};
    [
        Next, Next, Twice, Next, Killed, Grow, Shrink, Next, Again, Twice, // the first ten
        Next, Killed, Grow, Shrink, Next, Twice, Next, Killed, Next, Next, // and ten more
    ]
};

/// `cargo xtask soak [--steps N]`: the soak alone; its rows replace the
/// soak section of docs/benchmarks.md.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let steps = match args.windows(2).find(|w| w[0] == "--steps") {
        Some(w) => w[1].parse().with_context(|| format!("--steps {}: not a number", w[1]))?,
        None => STEPS.len(),
    };
    let work = util::root().join("target/soak");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let rows = rows(&work, steps)?;
    crate::bench::put_section(&util::root().join("docs/benchmarks.md"), TITLE, &section(&rows))
}

/// The section's title in docs/benchmarks.md.
pub(crate) const TITLE: &str = "soak";

pub(crate) fn section(rows: &[Row]) -> String {
    let mut md = String::new();
    crate::bench::table(&mut md, TITLE, rows);
    md.push_str(
        "`cargo xtask soak` (also run by `cargo xtask bench`): each step runs on both worlds at once, so that \
         the machine's load falls on both alike. Dev-profile builds; time scale 1 (AWS's own durations).\n\n",
    );
    md
}

/// One world and what the soak has seen of it.
struct Side {
    name: &'static str,
    world: World,
    /// Untagged resources the world held before the first step, by target.
    before: BTreeMap<String, BTreeSet<String>>,
    /// Seconds per step.
    secs: Vec<f64>,
    /// Failed target-runs by cause.
    causes: BTreeMap<String, u64>,
    /// Targets still failed after their re-run.
    still_failed: Vec<String>,
    reruns: u64,
    /// Leaked resource ids, with what they are.
    leaks: BTreeMap<String, String>,
    /// Resources left to `expire` at the last count.
    to_expire: usize,
    /// Both publishers of a leaf at once named different AMIs or snapshots.
    disagreements: Vec<String>,
}

pub(crate) fn rows(work: &Path, steps: usize) -> anyhow::Result<Vec<Row>> {
    println!("== soak: building the workspace (dev profile)");
    let bins = util::build_dev()?;
    let rt = tokio::runtime::Runtime::new()?;
    let clean = rt.block_on(World::start(&Plan::new(&REGIONS).time_scale(TIME_SCALE)))?;
    let faulty = rt.block_on(World::start(&Plan::new(&REGIONS).time_scale(TIME_SCALE).faults(FAULTS).seed(SEED)))?;
    let mut sides = Vec::new();
    for (name, world) in [("fault-free", clean), ("faulty", faulty)] {
        let before = rt.block_on(untagged(&world))?;
        sides.push(Side {
            name,
            world,
            before,
            secs: Vec::new(),
            causes: BTreeMap::new(),
            still_failed: Vec::new(),
            reruns: 0,
            leaks: BTreeMap::new(),
            to_expire: 0,
            disagreements: Vec::new(),
        });
    }
    let plan: Vec<Kind> = STEPS.iter().copied().cycle().take(steps).collect();
    let image = work.join("image.raw");
    util::write_noise(&image, SMALL, 1)?;
    let mut leaf = 0u32;
    for (i, kind) in plan.iter().enumerate() {
        if *kind != Kind::Again {
            leaf += 1;
            next_image(&image, *kind, leaf)?;
            for s in &sides {
                let builder = s.world.ssl_dir(Role::ImageBuilder)?;
                util::imagetool(
                    &bins,
                    s.world.imageserver.addr,
                    &builder,
                    &["add", &format!("{STREAM}/{leaf}"), path(&image)?],
                )?;
            }
        }
        let leaf = leaf.to_string();
        let step = i + 1;
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let (bins, rt, leaf) = (&bins, &rt, &leaf);
            let handles: Vec<_> =
                sides.iter_mut().map(|s| scope.spawn(move || one_step(rt, bins, work, s, step, *kind, leaf))).collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a soak step panicked"))??;
            }
            Ok(())
        })?;
        let (a, b) = (&sides[0], &sides[1]);
        println!(
            "== soak step {step}/{steps} ({}, leaf {leaf}): fault-free {:.1} s, faulty {:.1} s; leaks {} / {}; left to expire {} / {}",
            kind.name(),
            a.secs[i],
            b.secs[i],
            a.leaks.len(),
            b.leaks.len(),
            a.to_expire,
            b.to_expire
        );
    }
    // The last leaf's bytes, behind every target's AMI of it.
    for s in &sides {
        rt.block_on(check_last(s, &image, &leaf.to_string()))?;
    }
    Ok(report(&sides, &plan))
}

/// The image of leaf `leaf`: a few percent of chunks changed, and the size
/// of `kind`.
fn next_image(image: &Path, kind: Kind, leaf: u32) -> anyhow::Result<()> {
    if leaf > 1 {
        util::change_chunks(image, 0.03, u64::from(leaf))?;
    }
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    match kind {
        // 1 GiB and 2 GiB (the volume is 1 GiB at first): holes beyond the
        // small image's data.
        Kind::Grow => {
            let grown = f.metadata()?.len() > SMALL;
            f.set_len(if grown { 2048 * MIB } else { 1024 * MIB } + SMALL)?;
        }
        Kind::Shrink => f.set_len(SMALL)?,
        _ => {}
    }
    Ok(())
}

/// Run one step on one side, re-run the targets that failed, and count.
fn one_step(
    rt: &tokio::runtime::Runtime,
    bins: &Path,
    work: &Path,
    s: &mut Side,
    step: usize,
    kind: Kind,
    leaf: &str,
) -> anyhow::Result<()> {
    let run = |tag: &str| Publish::start(&s.world, bins, work, s.name, step, tag, leaf);
    let t = Instant::now();
    let mut results = match kind {
        Kind::Twice => {
            let (a, b) = (run("a")?, run("b")?);
            let (a, b) = (a.wait()?, b.wait()?);
            for (x, y) in a.targets.iter().zip(&b.targets) {
                if x.ok() && y.ok() && (x.ami_id != y.ami_id || x.snapshot_id != y.snapshot_id) {
                    s.disagreements
                        .push(format!("step {step} {},{}: {:?} vs {:?}", x.account, x.region, x.ami_id, y.ami_id));
                }
            }
            // What a pipeline acts on: either run's results; the second's.
            a.targets.into_iter().zip(b.targets).map(|(x, y)| if y.ok() { y } else { x }).collect()
        }
        Kind::Killed => {
            // Killed part way: after a third of the fault-free publish of
            // a leaf (about when the unpack ends and the snapshot starts).
            let mut p = run("killed")?;
            std::thread::sleep(kill_after(s));
            p.child.kill().context("killing the publisher")?;
            let _ = p.child.wait();
            run("after-kill")?.wait()?.targets
        }
        _ => run("")?.wait()?.targets,
    };
    let failed: Vec<_> = results.iter().filter(|t| !t.ok()).collect();
    if !failed.is_empty() {
        for t in &failed {
            *s.causes.entry(cause(t.error.as_deref().unwrap_or(""))).or_default() += 1;
        }
        s.reruns += 1;
        results = run("rerun")?.wait()?.targets;
        for t in results.iter().filter(|t| !t.ok()) {
            s.still_failed.push(format!(
                "step {step} {},{}: {}",
                t.account,
                t.region,
                t.error.as_deref().unwrap_or("")
            ));
        }
    }
    s.secs.push(t.elapsed().as_secs_f64());
    rt.block_on(count(s))
}

/// How long into a publish the killed step kills it.
fn kill_after(s: &Side) -> Duration {
    let typical = s.secs.iter().copied().fold(f64::MAX, f64::min);
    Duration::from_secs_f64(if typical == f64::MAX { 10.0 } else { typical / 3.0 })
}

/// The EC2 error code in a target's error ("WHAT: CODE: message"; a
/// what may be an action's name too), else its first words.
fn cause(error: &str) -> String {
    let codes: Vec<&str> = error
        .split(": ")
        .filter(|w| {
            w.len() > 3
                && w.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
                && w.chars().any(|c| c.is_ascii_lowercase())
        })
        .collect();
    match codes[..] {
        [] => error.split_whitespace().take(6).collect::<Vec<_>>().join(" "),
        [only] => only.to_owned(),
        [_, code, ..] => code.to_owned(),
    }
}

/// A running `ami-publisher publish`.
struct Publish {
    child: Child,
    results: PathBuf,
}

impl Publish {
    fn start(
        world: &World,
        bins: &Path,
        work: &Path,
        side: &str,
        step: usize,
        tag: &str,
        leaf: &str,
    ) -> anyhow::Result<Publish> {
        let name = format!("{side}-{step:02}{}{tag}", if tag.is_empty() { "" } else { "-" });
        let results = work.join(format!("{name}.json"));
        let log = std::fs::File::create(work.join(format!("{name}.log")))?;
        let mut cmd = Command::new(bins.join("ami-publisher"));
        cmd.envs(world.aws_env())
            .env("RUST_LOG", "ami_publisher=info")
            .arg("--ssl-dir")
            .arg(world.ssl_dir(Role::AmiPublisher)?)
            .args(["--image-server", &world.imageserver_addr(), "--min-free-bytes", "0", "--results", path(&results)?]);
        for r in REGIONS {
            cmd.args(["--targets", &format!(",{r}")]);
        }
        cmd.args(["publish", STREAM, leaf]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        Ok(Publish { child: cmd.spawn().context("starting ami-publisher")?, results })
    }

    fn wait(mut self) -> anyhow::Result<ami_publisher::results::PublishResults> {
        self.child.wait()?;
        ami_publisher::results::PublishResults::read(&self.results)
            .with_context(|| format!("the results of {}", self.results.display()))
    }
}

/// What a target holds now, as EC2 holds it.
#[derive(Default)]
struct Census {
    /// AMIs of the stream: (id, leaf, state, root snapshot).
    amis: Vec<(String, String, String, Option<String>)>,
    /// Snapshots of the stream: (id, set to expire).
    snapshots: Vec<(String, bool)>,
    /// Volumes of the stream: (id, set to expire).
    volumes: Vec<(String, bool)>,
    /// Instances besides the world's unpacker.
    instances: Vec<String>,
    untagged: BTreeSet<String>,
}

fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

async fn census(world: &World, t: &local_world::Target) -> anyhow::Result<Census> {
    let ec2 = world.ec2(&t.account, &t.region).await;
    let mut c = Census::default();
    for i in ec2.describe_images().owners("self").send().await?.images() {
        let id = i.image_id().unwrap_or_default().to_owned();
        match tag(i.tags(), "ImageStream") {
            Some(STREAM) => {
                let root = i.block_device_mappings().iter().find_map(|m| m.ebs()?.snapshot_id().map(str::to_owned));
                let state = i.state().map(|s| s.as_str().to_owned()).unwrap_or_default();
                c.amis.push((id, tag(i.tags(), "ImageLeaf").unwrap_or("").to_owned(), state, root));
            }
            Some(_) => {}
            None => {
                c.untagged.insert(id);
            }
        }
    }
    for s in ec2.describe_snapshots().owner_ids("self").send().await?.snapshots() {
        let id = s.snapshot_id().unwrap_or_default().to_owned();
        match tag(s.tags(), "ImageStream") {
            Some(STREAM) => c.snapshots.push((id, tag(s.tags(), "ExpiresAt").is_some())),
            Some(_) => {}
            None => {
                c.untagged.insert(id);
            }
        }
    }
    for v in ec2.describe_volumes().send().await?.volumes() {
        let id = v.volume_id().unwrap_or_default().to_owned();
        match tag(v.tags(), "ImageStream") {
            Some(STREAM) => c.volumes.push((id, tag(v.tags(), "ExpiresAt").is_some())),
            Some(_) => {}
            None if t.root_volumes.contains(&id) => {}
            None => {
                c.untagged.insert(id);
            }
        }
    }
    for r in ec2.describe_instances().send().await?.reservations() {
        for i in r.instances() {
            let id = i.instance_id().unwrap_or_default();
            let gone = i.state().and_then(|s| s.name()).is_some_and(|n| n.as_str() == "terminated");
            if id != t.instance_id && !gone {
                c.instances.push(id.to_owned());
            }
        }
    }
    Ok(c)
}

async fn untagged(world: &World) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    for t in &world.targets {
        out.insert(format!("{},{}", t.account, t.region), census(world, t).await?.untagged);
    }
    Ok(out)
}

/// Count every target's resources; record leaks.
async fn count(s: &mut Side) -> anyhow::Result<()> {
    let mut to_expire = 0;
    for t in &s.world.targets {
        let at = format!("{},{}", t.account, t.region);
        let c = census(&s.world, t).await?;
        let mut leak = |id: &str, what: String| {
            s.leaks.entry(id.to_owned()).or_insert_with(|| format!("{at}: {what}"));
        };
        let mut leaves: BTreeMap<&str, u32> = BTreeMap::new();
        for (id, leaf, state, _) in &c.amis {
            *leaves.entry(leaf).or_default() += 1;
            if state == "failed" {
                leak(id, format!("a failed AMI of leaf {leaf}"));
            }
        }
        for (id, leaf, _, _) in &c.amis {
            if leaves[leaf.as_str()] > 1 {
                leak(id, format!("one of {} AMIs of leaf {leaf}", leaves[leaf.as_str()]));
            }
        }
        for (id, expiring) in &c.snapshots {
            let backs = c.amis.iter().any(|a| a.3.as_deref() == Some(id.as_str()));
            match (backs, expiring) {
                (true, _) => {}
                (false, true) => to_expire += 1,
                (false, false) => leak(id, "a snapshot no AMI boots from, not set to expire".into()),
            }
        }
        let kept: Vec<_> = c.volumes.iter().filter(|v| !v.1).collect();
        to_expire += c.volumes.len() - kept.len();
        for (id, _) in kept.iter().skip(1) {
            leak(id, format!("one of {} volumes of the stream", kept.len()));
        }
        for id in &c.instances {
            leak(id, "an instance besides the unpacker".into());
        }
        let before = s.before.get(&at).cloned().unwrap_or_default();
        for id in c.untagged.difference(&before) {
            leak(id, "an untagged resource".into());
        }
    }
    s.to_expire = to_expire;
    Ok(())
}

/// Every target's AMI of the last leaf boots from a snapshot holding the
/// image.
async fn check_last(s: &Side, image: &Path, leaf: &str) -> anyhow::Result<()> {
    for t in &s.world.targets {
        let c = census(&s.world, t).await?;
        let Some((ami, _, _, Some(snap))) = c.amis.iter().find(|a| a.1 == leaf && a.2 == "available") else {
            bail!("{}: {},{} has no available AMI of leaf {leaf}", s.name, t.account, t.region);
        };
        s.world
            .check_snapshot(snap, image, Duration::from_secs(120))
            .await
            .with_context(|| format!("{}: {ami} of {},{}", s.name, t.account, t.region))?;
    }
    Ok(())
}

fn report(sides: &[Side], plan: &[Kind]) -> Vec<Row> {
    let (clean, faulty) = (&sides[0], &sides[1]);
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for k in plan {
        *kinds.entry(*k).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{} {n}", k.name())).collect();
    // Publish time: the steps that publish one new leaf once.
    let plain: Vec<usize> =
        (0..plan.len()).filter(|i| matches!(plan[*i], Kind::Next | Kind::Grow | Kind::Shrink)).collect();
    let sum = |s: &Side| plain.iter().map(|i| s.secs[*i]).sum::<f64>();
    let ratio = sum(faulty) / sum(clean);
    let causes = |s: &Side| {
        if s.causes.is_empty() {
            "none".to_owned()
        } else {
            s.causes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
        }
    };
    let leaks = |s: &Side| {
        if s.leaks.is_empty() {
            "0".to_owned()
        } else {
            format!(
                "{} ({})",
                s.leaks.len(),
                s.leaks.iter().map(|(id, w)| format!("{id}: {w}")).collect::<Vec<_>>().join("; ")
            )
        }
    };
    let targets = faulty.world.targets.len();
    vec![
        Row {
            what: format!(
                "steps: publishes of one stream to {targets} targets (2 accounts x 3 regions), on each world"
            ),
            figure: format!("{} ({})", plan.len(), kinds.join(", ")),
            goal: "20".into(),
            met: Some(plan.len() >= 20),
        },
        Row {
            what: format!("faults injected on the faulty world ({FAULTS}, seed {SEED})"),
            figure: faulty.world.struck(),
            goal: "every kind".into(),
            met: None,
        },
        Row {
            what: "failed target-runs by cause, each target re-run once (fault-free world / faulty world)".into(),
            figure: format!(
                "{} / {}; re-runs {} / {}; still failed after the re-run: {}",
                causes(clean),
                causes(faulty),
                clean.reruns,
                faulty.reruns,
                if faulty.still_failed.is_empty() && clean.still_failed.is_empty() {
                    "none".to_owned()
                } else {
                    [&clean.still_failed[..], &faulty.still_failed[..]].concat().join("; ")
                }
            ),
            goal: "every target published after one re-run".into(),
            met: Some(clean.still_failed.is_empty() && faulty.still_failed.is_empty() && clean.causes.is_empty()),
        },
        Row {
            what: "leaks, counted after every step (fault-free world / faulty world)".into(),
            figure: format!(
                "{} / {}; left with ExpiresAt for `expire` at the end: {} / {}; publishers of one leaf at once \
                 that named different AMIs: {}",
                leaks(clean),
                leaks(faulty),
                clean.to_expire,
                faulty.to_expire,
                clean.disagreements.len() + faulty.disagreements.len()
            ),
            goal: "0".into(),
            met: Some(
                clean.leaks.is_empty()
                    && faulty.leaks.is_empty()
                    && clean.disagreements.is_empty()
                    && faulty.disagreements.is_empty(),
            ),
        },
        Row {
            what: "time per publish under every fault vs fault-free (the next/grow/shrink steps, run side by side)"
                .into(),
            figure: format!(
                "{ratio:.2} ({:.1} s vs {:.1} s per publish over {} steps; all steps {:.0} s vs {:.0} s)",
                sum(faulty) / plain.len() as f64,
                sum(clean) / plain.len() as f64,
                plain.len(),
                faulty.secs.iter().sum::<f64>(),
                clean.secs.iter().sum::<f64>()
            ),
            goal: "<= 1.5".into(),
            met: Some(ratio <= 1.5),
        },
    ]
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
