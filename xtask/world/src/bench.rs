//! `cargo xtask bench`: release builds of the binaries, measured as users run
//! them, figures written to docs/benchmarks.md. Every speed figure is a ratio
//! to a baseline measured in the same run, because the machine is shared.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::util::{self, mib};

const GIB: u64 = 1 << 30;

pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) figure: String,
    pub(crate) goal: String,
    pub(crate) met: Option<bool>,
}

/// The publisher's section of docs/benchmarks.md starts with this.
const PUBLISHER_TITLE: &str = "ami-publisher";

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let only_publisher = args.windows(2).any(|w| w[0] == "--only" && w[1] == "publisher");
    let only_memory = args.windows(2).any(|w| w[0] == "--only" && w[1] == "imageserver-memory");
    let (add_size, rss_size) = if quick { (256 << 20, GIB) } else { (GIB, 4 * GIB) };
    let work = util::root().join("target/bench");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let doc = util::root().join("docs/benchmarks.md");
    let old = std::fs::read_to_string(&doc).unwrap_or_default();
    let marker = format!("\n## {PUBLISHER_TITLE}");
    let soak_marker = format!("\n## {}", crate::soak::TITLE);
    let old_soak = old.find(&soak_marker).map(|i| {
        let rest = &old[i + 1..];
        rest[..rest.find("\n## ").map_or(rest.len(), |j| j + 1)].to_owned()
    });
    if only_publisher {
        let rows = crate::bench_publisher::run(&work, 8)?;
        let mut md = old.find(&marker).map_or(old.clone(), |i| old[..i].to_owned());
        md.push('\n');
        publisher_table(&mut md, &rows);
        md.push_str(old_soak.as_deref().unwrap_or_default());
        return write_doc(&doc, &md);
    }
    if args.windows(2).any(|w| w[0] == "--only" && w[1] == "soak") {
        let rows = crate::soak::rows(&work, 20)?;
        return put_section(&doc, crate::soak::TITLE, &crate::soak::section(&rows));
    }
    if args.windows(2).any(|w| w[0] == "--only" && w[1] == "ebs-direct") {
        return put_section(&doc, crate::bench_direct::TITLE, &direct_section(&work)?);
    }
    if args.windows(2).any(|w| w[0] == "--only" && w[1] == "decode-fuzz") {
        let row = decode_fuzz(if quick { 10_000 } else { 100_000 })?;
        return replace_row(&doc, &row);
    }
    println!("== building release binaries");
    let bins = util::build_release(&["imageserver", "imagetool", "image-unpacker", "unpacker-tool"])?;
    let pki = work.join("pki");
    fleet_pki::write_pki(&pki)?;
    if args.windows(2).any(|w| w[0] == "--only" && w[1] == "datapath") {
        let rows = crate::bench_datapath::run(&bins, &pki, &work, quick)?;
        let mut body = String::new();
        table(&mut body, crate::bench_datapath::TITLE, &rows);
        body.push_str(crate::bench_datapath::NOTE);
        return put_section(&doc, crate::bench_datapath::TITLE, &body);
    }
    let ssl = work.join("ssl");
    util::ssl_dir(&pki, "image-builder", &ssl)?;
    let (server, addr) = util::start_imageserver(&bins, &pki, &work.join("data"), &work.join("imageserver.log"))?;
    let readers_size = if quick { 32 << 20 } else { 128 << 20 };
    let add_readers_image = || -> anyhow::Result<()> {
        let small = work.join("readers.raw");
        util::write_noise(&small, readers_size, 5)?;
        util::imagetool(&bins, addr, &ssl, &["add", "bench/readers/1", small.to_str().context("utf-8")?])?;
        Ok(std::fs::remove_file(&small)?)
    };
    if only_memory {
        add_readers_image()?;
        drop(server);
        let row = readers_rss(&bins, &pki, &work, &ssl, readers_size)?;
        println!("{} | {} | {}", row.what, row.figure, row.goal);
        return replace_row(&doc, &row);
    }
    let mut rows = Vec::new();

    // 1. add throughput, against a local copy of the same file.
    let img = work.join("a.raw");
    util::write_noise(&img, add_size, 1)?;
    let copy_secs = timed_copy(&img, &work.join("copy.raw"))?;
    std::fs::remove_file(work.join("copy.raw"))?;
    let t = Instant::now();
    let r = util::imagetool(&bins, addr, &ssl, &["add", "bench/a/1", img.to_str().context("utf-8")?])?;
    let add_secs = t.elapsed().as_secs_f64();
    rows.push(Row {
        what: format!("imagetool add, {} of incompressible data (new to the server)", mib(add_size)),
        figure: format!(
            "{:.0} MiB/s ({:.2} s; local copy with fsync {:.2} s, ratio {:.2})",
            add_size as f64 / 1048576.0 / add_secs,
            add_secs,
            copy_secs,
            copy_secs / add_secs
        ),
        goal: "reported".into(),
        met: None,
    });
    let _ = r;

    // 2. a 2%-changed leaf: bytes sent over bytes changed.
    let img2 = work.join("a2.raw");
    std::fs::copy(&img, &img2)?;
    let changed = util::change_chunks(&img2, 0.02, 7)?;
    let r = util::imagetool(&bins, addr, &ssl, &["add", "bench/a/2", img2.to_str().context("utf-8")?])?;
    let sent = r["bytes_sent"].as_u64().context("bytes_sent")?;
    let ratio = sent as f64 / changed as f64;
    rows.push(Row {
        what: "re-add of a 2%-changed leaf: bytes sent / bytes changed".into(),
        figure: format!("{ratio:.3} ({} sent for {} changed)", mib(sent), mib(changed)),
        goal: "<= 1.05".into(),
        met: Some(ratio <= 1.05),
    });

    // 3. get throughput over mTLS on loopback, against a local copy.
    let out = work.join("get.raw");
    let copy_secs = timed_copy(&img2, &work.join("copy.raw"))?;
    std::fs::remove_file(work.join("copy.raw"))?;
    let t = Instant::now();
    util::imagetool(&bins, addr, &ssl, &["get", "bench/a/2", out.to_str().context("utf-8")?])?;
    let get_secs = t.elapsed().as_secs_f64();
    if !util::same_bytes(&img2, &out)? {
        bail!("bytes read back differ");
    }
    std::fs::remove_file(&out)?;
    let ratio = copy_secs / get_secs;
    rows.push(Row {
        what: format!(
            "imagetool get of {} over mTLS on loopback, as a ratio to a local copy (with fsync)",
            mib(add_size)
        ),
        figure: format!(
            "{ratio:.2} (get {:.2} s = {:.0} MiB/s; copy {:.2} s)",
            get_secs,
            add_size as f64 / 1048576.0 / get_secs,
            copy_secs
        ),
        goal: ">= 0.8".into(),
        met: Some(ratio >= 0.8),
    });
    std::fs::remove_file(&img2)?;
    std::fs::remove_file(&img)?;

    // 4. imageserver peak RSS while 4 clients fetch a large image at once.
    let big = work.join("big.raw");
    util::write_noise(&big, rss_size, 3)?;
    util::imagetool(&bins, addr, &ssl, &["add", "bench/big/1", big.to_str().context("utf-8")?])?;
    std::fs::remove_file(&big)?;
    let before = server.peak_rss()?;
    let t = Instant::now();
    verify_at_once(&bins, addr, &ssl, "bench/big/1", 4)?;
    let fetch_secs = t.elapsed().as_secs_f64();
    let peak = server.peak_rss()?;
    rows.push(Row {
        what: format!("imageserver peak RSS while 4 clients fetch a {} image at once", mib(rss_size)),
        figure: format!(
            "{} (before the fetches {}; 4 x {} served in {:.1} s, {:.0} MiB/s in total)",
            mib(peak),
            mib(before),
            mib(rss_size),
            fetch_secs,
            4.0 * rss_size as f64 / 1048576.0 / fetch_secs
        ),
        goal: "< 128 MiB".into(),
        met: Some(peak < 128 << 20),
    });
    let (unpacker_rows, _) = crate::bench_unpacker::run(&bins, &pki, &work, addr, add_size, rss_size)?;

    // 5. imageserver peak RSS against the number of concurrent readers.
    add_readers_image()?;
    drop(server);
    rows.push(readers_rss(&bins, &pki, &work, &ssl, readers_size)?);

    // 6. untrusted input decoded 100,000 times per property.
    rows.push(decode_fuzz(if quick { 10_000 } else { 100_000 })?);

    let mut md = String::from(
        "# Benchmarks\n\nWritten by `cargo xtask bench` (release builds, loopback, this 2-core shared machine). \
         Speeds are ratios to a baseline measured in the same run; absolute figures are for orientation only.\n\n",
    );
    let _ = writeln!(md, "Run: {}{}\n", humantime_now(), if quick { " (--quick: smaller sizes)" } else { "" });
    table(&mut md, "imageserver and imagetool", &rows);
    table(&mut md, "image-unpacker", &unpacker_rows);
    let datapath_rows = crate::bench_datapath::run(&bins, &pki, &work, quick)?;
    table(&mut md, crate::bench_datapath::TITLE, &datapath_rows);
    md.push_str(crate::bench_datapath::NOTE);
    let publisher_rows = crate::bench_publisher::run(&work, 8)?;
    publisher_table(&mut md, &publisher_rows);
    md.push_str(&direct_section(&work)?);
    let soak_rows = crate::soak::rows(&work, 20)?;
    md.push_str(&crate::soak::section(&soak_rows));
    write_doc(&doc, &md)
}

/// The ebs-direct section: its table and what it measured with.
fn direct_section(work: &std::path::Path) -> anyhow::Result<String> {
    let rows = crate::bench_direct::run(work, 1024)?;
    let mut body = String::new();
    table(&mut body, crate::bench_direct::TITLE, &rows);
    body.push_str(
        "Dev-profile ami-publisher, one target, the world at AWS's own durations (LOCAL_WORLD_TIME_SCALE=1): \
         each EBS call takes EC2's modelled latency (80 to 200 ms for a write) and a snapshot completes at the \
         world's 40 MiB/s of blocks written; the unpacker's way also waits for its volume's snapshot and reads \
         the volume back. Both leaves are the same bytes under two streams.\n\n",
    );
    Ok(body)
}

/// Put section `## TITLE` (`body` starts with that line) into the document:
/// in place of the old one, else before the hand-written section (or at
/// the end).
pub(crate) fn put_section(doc: &std::path::Path, title: &str, body: &str) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(doc).unwrap_or_default();
    let marker = format!("\n## {title}\n");
    let md = if let Some(i) = old.find(&marker) {
        let rest = &old[i + 1..];
        let end = rest.find("\n## ").map_or(old.len(), |j| i + 1 + j + 1);
        format!("{}{body}{}", &old[..i + 1], &old[end..])
    } else if let Some(i) = old.find(MUTATION_TITLE) {
        format!("{}\n{body}{}", old[..i].trim_end(), &old[i..])
    } else {
        format!("{}\n\n{body}", old.trim_end())
    };
    write_doc(doc, &md)
}

/// Run `n` `imagetool verify IMAGE` processes at once and wait for all.
fn verify_at_once(
    bins: &std::path::Path,
    addr: std::net::SocketAddr,
    ssl: &std::path::Path,
    image: &str,
    n: usize,
) -> anyhow::Result<()> {
    let clients: Vec<_> = (0..n)
        .map(|_| {
            Command::new(bins.join("imagetool"))
                .arg("--server")
                .arg(addr.to_string())
                .arg("--ssl-dir")
                .arg(ssl)
                .args(["--json", "verify", image])
                .stdout(Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut c in clients {
        let s = c.wait()?;
        if !s.success() {
            bail!("a client verifying {image} failed ({s})");
        }
    }
    Ok(())
}

/// Peak RSS of a fresh imageserver while N clients verify the same image at
/// once, for N = 4, 16, 64: memory must be set by the server's own bounds,
/// not by how many read.
fn readers_rss(
    bins: &std::path::Path,
    pki: &std::path::Path,
    work: &std::path::Path,
    ssl: &std::path::Path,
    size: u64,
) -> anyhow::Result<Row> {
    let mut figures = Vec::new();
    let mut worst = 0;
    for n in [4usize, 16, 64] {
        let log = work.join(format!("imageserver-{n}-readers.log"));
        let (server, addr) = util::start_imageserver(bins, pki, &work.join("data"), &log)?;
        let before = server.peak_rss()?;
        let t = Instant::now();
        verify_at_once(bins, addr, ssl, "bench/readers/1", n).with_context(|| format!("see {}", log.display()))?;
        let secs = t.elapsed().as_secs_f64();
        let peak = server.peak_rss()?;
        worst = worst.max(peak);
        figures.push(format!("{n} readers: {} (idle {}; {:.1} s)", mib(peak), mib(before), secs));
    }
    Ok(Row {
        what: format!("imageserver peak RSS while N clients verify a {} image at once", mib(size)),
        figure: figures.join("; "),
        goal: "< 128 MiB at 64".into(),
        met: Some(worst < 128 << 20),
    })
}

/// The property tests of manifest decoding (image-format) and of image
/// records (chunk-store), each property run `cases` times instead of the
/// suite's 1,000: no panic, and whatever is accepted is consistent.
fn decode_fuzz(cases: u32) -> anyhow::Result<Row> {
    let t = Instant::now();
    for (package, filter) in [("image-format", "manifest_props"), ("chunk-store", "record::tests::random_damage")] {
        let mut cmd = util::cargo();
        cmd.args(["test", "--quiet", "-p", package]);
        if package == "image-format" {
            cmd.args(["--test", filter]);
        } else {
            cmd.args(["--lib", "--", filter]);
        }
        let status = cmd.env("PROPTEST_CASES", cases.to_string()).env("RECORD_CASES", cases.to_string()).status()?;
        if !status.success() {
            bail!("the property tests of {package} failed with {cases} cases ({status})");
        }
    }
    Ok(Row {
        what: format!(
            "untrusted input decoded {cases} times per property: random and mutated manifests, headers and records"
        ),
        figure: format!("no panic; every accepted manifest and record consistent ({:.0} s)", t.elapsed().as_secs_f64()),
        goal: "no failure".into(),
        met: Some(true),
    })
}

/// Put `row` into the existing document: in place of the row with the same
/// description, else at the end of the imageserver table.
fn replace_row(doc: &std::path::Path, row: &Row) -> anyhow::Result<()> {
    // Read now, not when the run started: the document may have changed
    // while the measurement ran.
    let old = std::fs::read_to_string(doc)?;
    let mut line = String::new();
    row_line(&mut line, row);
    let line = line.trim_end();
    let mut lines: Vec<String> = old.lines().map(str::to_owned).collect();
    let prefix = format!("| {} |", row.what);
    if let Some(l) = lines.iter_mut().find(|l| l.starts_with(&prefix)) {
        *l = line.to_owned();
    } else {
        let table = lines.iter().position(|l| l.starts_with("## imageserver")).context("no imageserver table")?;
        let end = lines[table + 1..].iter().position(|l| l.starts_with("## ")).map_or(lines.len(), |i| table + 1 + i);
        let last_row = lines[..end].iter().rposition(|l| l.starts_with('|')).context("empty imageserver table")?;
        lines.insert(last_row + 1, line.to_owned());
    }
    write_doc(doc, &(lines.join("\n") + "\n"))
}

fn publisher_table(md: &mut String, rows: &[Row]) {
    table(md, PUBLISHER_TITLE, rows);
    md.push_str(
        "The publisher figures use dev-profile builds of ami-publisher and imagetool (a release build of \
         aws-sdk-ec2 takes about 20 minutes here) and the local world at AWS's own durations \
         (LOCAL_WORLD_TIME_SCALE=1; see docs/world.md for the modelled latencies and pending states): one \
         moto process serves every account and region, and 24 unpackers share the machine's 2 cores with \
         the imageserver. At the test suite's scale (0.02) the pending states shrink fifty-fold while the \
         publisher's poll intervals stay real-sized, so a ratio measured there rounds polls, not fan-out.\n\n",
    );
}

/// The hand-written section of docs/benchmarks.md, kept whenever the
/// measured tables are rewritten.
const MUTATION_TITLE: &str = "\n## Mutation testing";

fn write_doc(doc: &std::path::Path, md: &str) -> anyhow::Result<()> {
    let mut md = md.to_owned();
    let now = std::fs::read_to_string(doc).unwrap_or_default();
    if !md.contains(MUTATION_TITLE)
        && let Some(i) = now.find(MUTATION_TITLE)
    {
        md = format!("{}\n{}", md.trim_end(), &now[i..]);
    }
    std::fs::write(doc, &md)?;
    println!("{md}");
    println!("written to {}", doc.display());
    Ok(())
}

pub(crate) fn table(md: &mut String, title: &str, rows: &[Row]) {
    let _ = writeln!(md, "## {title}\n\n| what | figure | goal | met |\n|---|---|---|---|");
    for r in rows {
        row_line(md, r);
    }
    md.push('\n');
}

fn row_line(md: &mut String, r: &Row) {
    let met = match r.met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "-",
    };
    let _ = writeln!(md, "| {} | {} | {} | {} |", r.what, r.figure, r.goal, met);
}

/// Seconds to copy `from` to `to` and fsync the copy: the local baseline.
fn timed_copy(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    Ok(t.elapsed().as_secs_f64())
}

fn humantime_now() -> String {
    let out = Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output();
    out.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}
