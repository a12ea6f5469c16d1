//! imagetool as a library: the operations behind each subcommand, usable by
//! tests, benchmarks and the demo without spawning the binary.

#![forbid(unsafe_code)]

pub mod cli;

pub use image_client as client;

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use fleet_proto::imageserver::{CommitImageRequest, FindMissingChunksRequest, ImageInfo, UploadChunk};
use futures::StreamExt;
use image_client::{Client, rpc};
use image_format::{ChunkRef, Digest, ImageName, Manifest};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Digests per FindMissingChunks request.
pub const MISSING_BATCH: usize = 64 * 1024;
/// Compressed chunks queued ahead of the upload stream.
pub const UPLOAD_QUEUE: usize = 8;

/// What `add` did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AddReport {
    pub image: String,
    pub image_id: String,
    pub size_bytes: u64,
    pub bytes_hashed: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub distinct_chunks: u64,
    pub chunks_reused: u64,
    pub chunks_uploaded: u64,
    /// Plain bytes of the uploaded chunks.
    pub bytes_uploaded_plain: u64,
    /// Bytes on the wire (zstd frames).
    pub bytes_sent: u64,
    pub converted_from: Option<String>,
}

/// What `get` did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GetReport {
    pub image: String,
    pub image_id: String,
    pub size_bytes: u64,
    pub chunks_fetched: u64,
    pub bytes_received: u64,
    pub bytes_written: u64,
    pub zero_chunks: u64,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Bars,
    Hidden,
}

fn bar(progress: Progress, len: u64, what: &str) -> ProgressBar {
    if progress == Progress::Hidden {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// A raw file ready to chunk: the input itself, or a raw conversion of a
/// qcow2/vmdk/vhd file (made with qemu-img) that lives as long as this value.
pub struct RawInput {
    pub path: PathBuf,
    pub converted_from: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// Detect the input's format and convert it to raw when needed.
pub fn raw_input(file: &Path) -> anyhow::Result<RawInput> {
    let meta = std::fs::metadata(file).with_context(|| format!("cannot read '{}'", file.display()))?;
    if !meta.is_file() {
        bail!("'{}' is not a regular file", file.display());
    }
    let format = sniff_format(file)?;
    if format == "raw" {
        return Ok(RawInput { path: file.to_owned(), converted_from: None, _tmp: None });
    }
    check_input(file, &format)?;
    let tmp = tempfile::Builder::new().prefix("imagetool-raw").tempdir()?;
    let out = tmp.path().join("disk.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-q", "-f", &format, "-O", "raw"])
        .arg(file)
        .arg(&out)
        .status()
        .with_context(|| format!("'{}' is a {format} image and converting it needs qemu-img", file.display()))?;
    if !status.success() {
        bail!("qemu-img could not convert '{}' from {format} to raw ({status})", file.display());
    }
    Ok(RawInput { path: out, converted_from: Some(format), _tmp: Some(tmp) })
}

/// Refuse a damaged or truncated disk image before converting it:
/// `qemu-img convert` reads clusters past the end of a file as zeros and
/// succeeds, so a cut file would silently become a disk with a zeroed part.
/// Two checks, each enough on its own for the damage it sees: `qemu-img
/// check` (metadata and refcount consistency, for the formats that support
/// it) and the data extents of `qemu-img map`, which must lie inside the file.
fn check_input(file: &Path, format: &str) -> anyhow::Result<()> {
    let shown = file.display();
    let out = Command::new("qemu-img")
        .args(["check", "-q", "--output=json", "-f", format])
        .arg(file)
        .output()
        .with_context(|| format!("'{shown}' is a {format} image and checking it needs qemu-img"))?;
    // Exit status: 0 clean, 1 check failed to complete, 2 corruptions,
    // 3 only leaked clusters (wasted space, no harm to data), 63 the format
    // has no check.
    match out.status.code() {
        Some(0 | 63) => {}
        Some(3) => tracing::warn!(file = %shown, "qemu-img check found leaked clusters (wasted space, data intact)"),
        Some(2) => {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let n = |k: &str| report.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            bail!(
                "'{shown}' is a damaged {format} image: qemu-img check found {} corruptions and {} check errors; \
                 refusing to add it (repair it with qemu-img check -r all, or rebuild it)",
                n("corruptions"),
                n("check-errors")
            );
        }
        _ => bail!(
            "'{shown}' is a damaged {format} image: qemu-img check could not complete: {}",
            first_lines(&out.stderr)
        ),
    }
    let out = Command::new("qemu-img").args(["map", "--output=json", "-f", format]).arg(file).output()?;
    if !out.status.success() {
        bail!("'{shown}' is a damaged {format} image: qemu-img map failed: {}", first_lines(&out.stderr));
    }
    let len = std::fs::metadata(file)?.len();
    extents_inside(&out.stdout, len)
        .map_err(|why| anyhow::anyhow!("'{shown}' is a truncated or damaged {format} image: {why}"))
}

/// Whether every data extent in `qemu-img map --output=json` output lies
/// within a file of `file_len` bytes.
fn extents_inside(map_json: &[u8], file_len: u64) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Extent {
        start: u64,
        length: u64,
        #[serde(default)]
        data: bool,
        #[serde(default)]
        compressed: bool,
        offset: Option<u64>,
    }
    let extents: Vec<Extent> =
        serde_json::from_slice(map_json).map_err(|e| format!("qemu-img map gave output this tool cannot read: {e}"))?;
    for e in extents {
        // A compressed cluster's host bytes are shorter than its guest
        // length; only its start must be inside.
        let need = if e.compressed { 1 } else { e.length };
        if let (true, Some(offset)) = (e.data, e.offset)
            && offset.saturating_add(need) > file_len
        {
            return Err(format!(
                "the disk's bytes {}..{} are stored at file offset {offset}..{} but the file has only {file_len} bytes",
                e.start,
                e.start + e.length,
                offset.saturating_add(e.length)
            ));
        }
    }
    Ok(())
}

fn first_lines(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(3).collect();
    if lines.is_empty() { "no message".into() } else { lines.join("; ") }
}

fn sniff_format(file: &Path) -> anyhow::Result<String> {
    let mut head = [0u8; 512];
    let mut f = File::open(file).with_context(|| format!("cannot open '{}'", file.display()))?;
    let n = f.read(&mut head)?;
    let head = &head[..n];
    if head.starts_with(b"QFI\xfb") {
        return Ok("qcow2".into());
    }
    if head.starts_with(b"KDMV") {
        return Ok("vmdk".into());
    }
    if head.starts_with(b"vhdxfile") {
        return Ok("vhdx".into());
    }
    // A dynamic VHD has its footer copy at the start; a fixed one only at the
    // end.
    if head.starts_with(b"conectix") {
        return Ok("vpc".into());
    }
    let len = f.metadata()?.len();
    if len >= 512 {
        let mut tail = [0u8; 8];
        f.seek(SeekFrom::Start(len - 512))?;
        f.read_exact(&mut tail)?;
        if &tail == b"conectix" {
            return Ok("vpc".into());
        }
    }
    Ok("raw".into())
}

/// Add `file` as image `name`: hash locally, ask what is missing, upload only
/// that, commit.
pub async fn add(
    client: &mut Client,
    name: &ImageName,
    file: &Path,
    chunk_size: u32,
    progress: Progress,
) -> anyhow::Result<AddReport> {
    let input = raw_input(file)?;
    let path = input.path.clone();
    let size = std::fs::metadata(&path)?.len();
    let pb = bar(progress, size, "hashing");
    let pb2 = pb.clone();
    let p = path.clone();
    let manifest =
        tokio::task::spawn_blocking(move || image_format::hash_file(&p, chunk_size, |n| pb2.set_position(n)))
            .await?
            .with_context(|| format!("hashing '{}'", path.display()))?;
    pb.finish_and_clear();

    let distinct = manifest.distinct_digests();
    let mut missing = Vec::new();
    for batch in distinct.chunks(MISSING_BATCH) {
        let resp = client
            .find_missing_chunks(FindMissingChunksRequest {
                digests: batch.iter().map(|d| d.0.to_vec().into()).collect(),
            })
            .await
            .map_err(rpc("ask which chunks are missing"))?
            .into_inner();
        for m in resp.missing {
            missing.push(Digest::from_slice(&m)?);
        }
    }
    // First index of each missing digest, in file order.
    let mut first_index: HashMap<Digest, u64> = HashMap::new();
    for (i, c) in manifest.chunks().iter().enumerate() {
        if let ChunkRef::Data(d) = c {
            first_index.entry(*d).or_insert(i as u64);
        }
    }
    let mut todo: Vec<(u64, Digest)> = missing.iter().map(|d| (first_index[d], *d)).collect();
    todo.sort_unstable();
    let plain_total: u64 = todo.iter().map(|(i, _)| manifest.chunk_len(*i) as u64).sum();

    let mut report = AddReport {
        image: name.to_string(),
        image_id: manifest.image_id().to_hex(),
        size_bytes: size,
        bytes_hashed: size,
        chunks: manifest.chunks().len() as u64,
        zero_chunks: manifest.zero_chunks(),
        distinct_chunks: distinct.len() as u64,
        chunks_reused: (distinct.len() - todo.len()) as u64,
        chunks_uploaded: todo.len() as u64,
        bytes_uploaded_plain: plain_total,
        bytes_sent: 0,
        converted_from: input.converted_from.clone(),
    };

    if !todo.is_empty() {
        let pb = bar(progress, plain_total, "uploading");
        let (tx, rx) = tokio::sync::mpsc::channel::<UploadChunk>(UPLOAD_QUEUE);
        let m = manifest.clone();
        let p = path.clone();
        let pb2 = pb.clone();
        let producer = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let f = File::open(&p)?;
            let mut buf = vec![0u8; m.chunk_size() as usize];
            let mut sent = 0u64;
            for (i, d) in todo {
                let len = m.chunk_len(i);
                f.read_exact_at(&mut buf[..len], m.offset(i))?;
                if Digest::of(&buf[..len]) != d {
                    bail!("'{}' changed while being added (chunk {i})", p.display());
                }
                let z = image_format::codec::compress(&buf[..len]);
                sent += z.len() as u64;
                pb2.inc(len as u64);
                if tx.blocking_send(UploadChunk { digest: d.0.to_vec().into(), zstd_data: z.into() }).is_err() {
                    break;
                }
            }
            Ok(sent)
        });
        let upload = client.upload_chunks(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let sent = producer.await??;
        let resp = upload.map_err(rpc("upload chunks"))?.into_inner();
        pb.finish_and_clear();
        report.bytes_sent = sent;
        tracing::debug!(?resp, "upload finished");
    }
    client
        .commit_image(CommitImageRequest {
            stream: name.stream().to_owned(),
            leaf: name.leaf().to_owned(),
            manifest: manifest.encode().into(),
        })
        .await
        .map_err(rpc(format!("commit {name}")))?;
    Ok(report)
}

/// Read image `name` into `out`, verified chunk by chunk. The file appears
/// at `out` only when complete (written beside it, fsynced, renamed).
pub async fn get(client: &mut Client, name: &ImageName, out: &Path, progress: Progress) -> anyhow::Result<GetReport> {
    let (info, manifest) = image_client::get_manifest(client, name).await?;
    // A character device (/dev/null: a fetch measured or checked, nothing
    // kept) is written in place; zero chunks are not written to it.
    if std::fs::metadata(out).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type())) {
        let dev = File::options().write(true).open(out).with_context(|| format!("cannot open '{}'", out.display()))?;
        let report = fetch_into(client, &manifest, dev, progress).await?;
        return Ok(GetReport { image: name.to_string(), image_id: info.image_id, ..report });
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp =
        fleet_fs::AtomicFile::new(out).with_context(|| format!("cannot create a file in '{}'", dir.display()))?;
    tmp.file().set_len(manifest.size())?;
    let report = fetch_into(client, &manifest, tmp.file().try_clone()?, progress).await?;
    tmp.commit().with_context(|| format!("cannot write '{}'", out.display()))?;
    Ok(GetReport { image: name.to_string(), image_id: info.image_id, ..report })
}

/// Fetch every data chunk of `manifest` and write it (at each index it
/// appears) into `file`, which must already read as zeros elsewhere.
pub async fn fetch_into(
    client: &Client,
    manifest: &Manifest,
    file: File,
    progress: Progress,
) -> anyhow::Result<GetReport> {
    let mut places: HashMap<Digest, Vec<u64>> = HashMap::new();
    for (i, c) in manifest.chunks().iter().enumerate() {
        if let ChunkRef::Data(d) = c {
            places.entry(*d).or_default().push(i as u64);
        }
    }
    let wanted = manifest.distinct_chunks();
    let total: u64 = manifest.size() - manifest.zero_chunks() * u64::from(manifest.chunk_size());
    let pb = bar(progress, total.min(manifest.size()), "fetching");
    let (tx, rx) = std::sync::mpsc::sync_channel::<image_client::FetchedChunk>(4);
    let m = manifest.clone();
    let pb2 = pb.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut written = 0u64;
        for chunk in rx {
            for &i in &places[chunk.digest()] {
                file.write_all_at(chunk.plain(), m.offset(i))?;
                written += chunk.plain().len() as u64;
                pb2.inc(chunk.plain().len() as u64);
            }
        }
        Ok(written)
    });
    let mut report =
        GetReport { size_bytes: manifest.size(), zero_chunks: manifest.zero_chunks(), ..Default::default() };
    let mut chunks = image_client::fetch_chunks(client.clone(), wanted);
    let mut failure = None;
    while let Some(c) = chunks.next().await {
        match c {
            Ok(c) => {
                report.chunks_fetched += 1;
                report.bytes_received += c.zstd().len() as u64;
                if tx.send(c).is_err() {
                    break;
                }
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    report.bytes_written = written.context("writing the output")?;
    pb.finish_and_clear();
    Ok(report)
}

/// Check every chunk of an image on the server against its digest (without
/// writing anything). Returns the info and the chunks checked.
pub async fn verify(client: &mut Client, name: &ImageName, progress: Progress) -> anyhow::Result<(ImageInfo, u64)> {
    let (info, manifest) = image_client::get_manifest(client, name).await?;
    let pb = bar(progress, manifest.stored_bytes(), "verifying");
    let mut chunks = image_client::fetch_chunks(client.clone(), manifest.distinct_chunks());
    let mut n = 0;
    while let Some(c) = chunks.next().await {
        let c = c?;
        pb.inc(c.plain().len() as u64);
        n += 1;
    }
    pb.finish_and_clear();
    Ok((info, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_extents_must_lie_inside_the_file() {
        let map = br#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 327680},
{ "start": 65536, "length": 1048576, "depth": 0, "present": false, "zero": true, "data": false, "compressed": false}]"#;
        assert_eq!(extents_inside(map, 327680 + 65536), Ok(()));
        let err = extents_inside(map, 327680 + 65535).unwrap_err();
        assert!(err.contains("bytes 0..65536") && err.contains("only 393215 bytes"), "{err}");
        // Zero and unallocated extents have no host bytes to check.
        assert_eq!(extents_inside(br#"[{"start":0,"length":9,"data":false,"zero":true}]"#, 0), Ok(()));
        // A compressed cluster needs only its start inside.
        let c = br#"[{"start":0,"length":65536,"data":true,"compressed":true,"offset":1000}]"#;
        assert_eq!(extents_inside(c, 1001), Ok(()));
        assert!(extents_inside(c, 1000).is_err());
        assert!(extents_inside(b"not json", 10).unwrap_err().contains("cannot read"));
    }
}
