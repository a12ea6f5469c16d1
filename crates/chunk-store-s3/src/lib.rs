//! The chunk store's objects in an S3 bucket (or any store that speaks S3's
//! API with conditional writes: MinIO, moto), shared by any number of
//! imageservers.
//!
//! Keys under `s3://BUCKET/PREFIX/`:
//! - `chunks/ab/abcdef…`: a chunk's zstd frame, named by its digest;
//! - `images/STREAM/_leaves/LEAF`: a leaf's record, created with
//!   `If-None-Match: *`, so it appears whole and once: of two imageservers
//!   committing one leaf, S3 lets exactly one create it (the other gets 412
//!   and reads the winner's);
//! - `leases/MS-OWNER-N`: the digests a writer was told are stored (the
//!   object's own time is the lease's); garbage collection keeps what a
//!   lease younger than its grace names, and removes older leases;
//! - `gc-claim`: held by the one collection allowed to delete, created with
//!   `If-None-Match: *`, holding its deadline. A writer touches (writes its
//!   lease), then waits while a claim is held, then looks: a collection
//!   that started before the look has finished deleting, one that starts
//!   after it lists the lease. S3's reads and lists are strongly consistent
//!   (since December 2020), which this relies on.
//!
//! Every call is bounded in time (per attempt and in all), retried by the
//! SDK's standard strategy; a retried create that finds its own record is
//! the same commit (the store compares image ids). Errors name the bucket,
//! the key and what S3 answered.

#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_sdk_s3::{
    Client,
    config::{retry::RetryConfig, timeout::TimeoutConfig},
    error::SdkError,
    primitives::ByteStream,
    types::{Delete, ObjectIdentifier},
};
use aws_smithy_types::error::display::DisplayErrorContext;
use chunk_store::{Backend, ChunkEntry, StoreError};
use futures::{StreamExt as _, TryStreamExt as _};
use image_format::{Digest, ImageName};
use tokio::runtime::Handle;

pub use aws_config::SdkConfig;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Requests in flight at once for one batch (presence checks, lease reads).
const PARALLEL: usize = 32;
/// Each attempt of a call, and the call with its retries.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 4;
/// Record bytes kept in memory (records never change in place: a listing's
/// ETag says whether the copy is still the record).
const RECORD_CACHE_BYTES: usize = 64 << 20;
/// How often a writer looks again while a collection holds the claim.
const CLAIM_POLL: Duration = Duration::from_millis(500);

/// `s3://BUCKET/PREFIX`: where a store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or without leading or trailing `/`.
    pub prefix: String,
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl FromStr for S3Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("s3://").ok_or_else(|| format!("'{s}' is not s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's rules for bucket names: 3 to 63 of a-z, 0-9, '.', '-',
        // starting and ending with a letter or digit.
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
        let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !(3..=63).contains(&bucket.len())
            || !bucket.chars().all(ok_char)
            || !ends_ok(bucket.chars().next())
            || !ends_ok(bucket.chars().last())
        {
            return Err(format!(
                "'{bucket}' in '{s}' is not a bucket name (3 to 63 of a-z, 0-9, '.' and '-', starting and ending with a letter or digit)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(format!("the prefix '{prefix}' in '{s}' has an empty, '.' or '..' part"));
        }
        Ok(S3Location { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
    }
}

/// An S3 client for stores, from an SDK configuration (region, endpoint
/// and credentials as the standard AWS configuration gives them), with this
/// crate's time limits and path-style addressing (which S3, MinIO and moto
/// all serve).
pub fn client(sdk: &aws_config::SdkConfig) -> Client {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(CALL_TIMEOUT)
        .build();
    let config = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(true)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .build();
    Client::from_conf(config)
}

/// The standard AWS configuration (environment, profiles, roles; an
/// endpoint from `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`), over the
/// workspace's one TLS stack (rustls with ring).
pub async fn sdk_config_from_env() -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).load().await;
    // No region configured anywhere: S3 answers for any bucket from
    // us-east-1 (and MinIO or moto do not care).
    if sdk.region().is_none() {
        return sdk.into_builder().region(aws_config::Region::new("us-east-1")).build();
    }
    sdk
}

/// A store's objects in a bucket. Its methods block on the runtime it was
/// opened on: call them off that runtime's async threads (the store's
/// callers use `spawn_blocking`).
pub struct S3 {
    client: Client,
    at: S3Location,
    rt: Handle,
    /// Names this process in its leases and claims.
    owner: String,
    seq: AtomicU64,
    records: Mutex<RecordCache>,
    claim: Mutex<Option<String>>,
}

#[derive(Default)]
struct RecordCache {
    by_key: HashMap<String, (String, Vec<u8>)>,
    bytes: usize,
}

impl fmt::Debug for S3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3").field("at", &self.at).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl S3 {
    /// Open the store at `at`, checking that the bucket answers (a bucket
    /// that does not exist or refuses this identity is named here, before
    /// anything is served).
    pub async fn open(client: Client, at: S3Location) -> Result<S3> {
        let s3 = S3 {
            client,
            owner: format!("{:08x}", fastrand::u32(..)),
            seq: AtomicU64::new(0),
            records: Mutex::default(),
            claim: Mutex::default(),
            rt: Handle::current(),
            at,
        };
        s3.reachable().await?;
        Ok(s3)
    }

    /// Whether the bucket answers: one listing of at most one key under
    /// the prefix (the right the store needs anyway; HeadBucket would need
    /// ListBucket on the whole bucket). For readiness probes.
    pub async fn reachable(&self) -> Result<()> {
        let r = self.client.list_objects_v2().bucket(&self.at.bucket).prefix(self.key("")).max_keys(1).send().await;
        r.map(|_| ()).map_err(|e| {
            let what = "reaching the bucket".to_owned();
            if e.as_service_error().is_some_and(|e| e.is_no_such_bucket()) {
                StoreError::Backend { location: self.location(), what, why: "the bucket does not exist".into() }
            } else {
                self.failed(what, e)
            }
        })
    }

    fn key(&self, rest: &str) -> String {
        if self.at.prefix.is_empty() { rest.to_owned() } else { format!("{}/{rest}", self.at.prefix) }
    }

    fn chunk_key(&self, d: &Digest) -> String {
        let hex = d.to_hex();
        self.key(&format!("chunks/{}/{hex}", &hex[..2]))
    }

    fn record_key(&self, name: &ImageName) -> String {
        self.key(&format!("images/{}/_leaves/{}", name.stream(), name.leaf()))
    }

    fn failed<E: std::error::Error + Send + Sync + 'static>(&self, what: String, e: SdkError<E>) -> StoreError {
        StoreError::Backend { location: self.location(), what, why: DisplayErrorContext(e).to_string() }
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Every key under `rest` with its size, time and ETag.
    async fn list(&self, rest: &str) -> Result<Vec<Listed>> {
        let prefix = self.key(rest);
        let mut pages = self.client.list_objects_v2().bucket(&self.at.bucket).prefix(&prefix).into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.failed(format!("listing {prefix}"), e))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                out.push(Listed {
                    rest: key[prefix.len()..].to_owned(),
                    bytes: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    modified: o.last_modified().and_then(|t| SystemTime::try_from(*t).ok()),
                    etag: o.e_tag().unwrap_or_default().to_owned(),
                });
            }
        }
        Ok(out)
    }

    /// An object's bytes and ETag, `None` when there is none; `range` asks
    /// for the first bytes only.
    async fn get(&self, key: &str, first: Option<usize>) -> Result<Option<(Vec<u8>, String)>> {
        let mut req = self.client.get_object().bucket(&self.at.bucket).key(key);
        if let Some(n) = first {
            req = req.range(format!("bytes=0-{}", n.saturating_sub(1)));
        }
        match req.send().await {
            Ok(o) => {
                let etag = o.e_tag().unwrap_or_default().to_owned();
                let body = o.body.collect().await.map_err(|e| StoreError::Backend {
                    location: self.location(),
                    what: format!("reading {key}"),
                    why: e.to_string(),
                })?;
                Ok(Some((Vec::from(body.into_bytes()), etag)))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
            Err(e) => Err(self.failed(format!("reading {key}"), e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        match self.client.head_object().bucket(&self.at.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
            Err(e) => Err(self.failed(format!("looking for {key}"), e)),
        }
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.at.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.failed(format!("writing {key}"), e))
    }

    /// Create `key` only if there is none. `Ok(None)`: one was there.
    async fn create(&self, key: &str, bytes: &[u8]) -> Result<Option<String>> {
        // 409 ConditionalRequestConflict: a conflicting write was in flight;
        // S3 asks for the upload to be retried.
        for attempt in 0.. {
            let r = self
                .client
                .put_object()
                .bucket(&self.at.bucket)
                .key(key)
                .if_none_match("*")
                .body(ByteStream::from(bytes.to_vec()))
                .send()
                .await;
            match r {
                Ok(o) => return Ok(Some(o.e_tag().unwrap_or_default().to_owned())),
                Err(e) if status(&e) == Some(412) => return Ok(None),
                Err(e) if status(&e) == Some(409) && attempt < MAX_ATTEMPTS => {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(self.failed(format!("creating {key}"), e)),
            }
        }
        unreachable!("the loop returns")
    }

    async fn delete_keys(&self, keys: Vec<String>) -> Result<()> {
        for batch in keys.chunks(1000) {
            let objects: Vec<ObjectIdentifier> =
                batch.iter().map(|k| ObjectIdentifier::builder().key(k).build().expect("a key is given")).collect();
            let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects are given");
            let out = self
                .client
                .delete_objects()
                .bucket(&self.at.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.failed(format!("deleting {} objects", batch.len()), e))?;
            if let Some(e) = out.errors().first() {
                return Err(StoreError::Backend {
                    location: self.location(),
                    what: format!("deleting {}", e.key().unwrap_or("?")),
                    why: format!("{} {}", e.code().unwrap_or("?"), e.message().unwrap_or_default()),
                });
            }
        }
        Ok(())
    }

    async fn record_of(&self, key: &str, etag: Option<&str>) -> Result<Option<Vec<u8>>> {
        if let Some(etag) = etag {
            let cache = self.records.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((e, bytes)) = cache.by_key.get(key)
                && e == etag
            {
                return Ok(Some(bytes.clone()));
            }
        }
        let Some((bytes, etag)) = self.get(key, None).await? else {
            self.records.lock().unwrap_or_else(|e| e.into_inner()).by_key.remove(key);
            return Ok(None);
        };
        let mut cache = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if cache.bytes + bytes.len() > RECORD_CACHE_BYTES {
            *cache = RecordCache::default();
        }
        cache.bytes += bytes.len();
        cache.by_key.insert(key.to_owned(), (etag, bytes.clone()));
        Ok(Some(bytes))
    }

    /// The claim's deadline, and its ETag, when a collection holds it.
    async fn claim_held(&self) -> Result<Option<(SystemTime, String)>> {
        let key = self.key(CLAIM);
        Ok(self.get(&key, None).await?.map(|(bytes, etag)| {
            // An unreadable claim counts as held for the longest a
            // collection may run from now.
            let deadline = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
                .unwrap_or_else(|| SystemTime::now() + chunk_store::GC_MAX);
            (deadline, etag)
        }))
    }
}

const CLAIM: &str = "gc-claim";

struct Listed {
    /// The key after the listed prefix.
    rest: String,
    bytes: u64,
    modified: Option<SystemTime>,
    etag: String,
}

fn status<E>(e: &SdkError<E>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn when(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Backend for S3 {
    fn location(&self) -> String {
        self.at.to_string()
    }

    fn chunk_heads(&self, digests: &[Digest], n: usize) -> Result<Vec<Option<Vec<u8>>>> {
        self.block(
            futures::stream::iter(digests)
                .map(|d| async move {
                    let key = self.chunk_key(d);
                    if n == 0 {
                        Ok(self.exists(&key).await?.then(Vec::new))
                    } else {
                        Ok(self.get(&key, Some(n)).await?.map(|(b, _)| b))
                    }
                })
                .buffered(PARALLEL)
                .try_collect(),
        )
    }

    fn chunk_read(&self, d: &Digest) -> Result<Option<Vec<u8>>> {
        self.block(async { Ok(self.get(&self.chunk_key(d), None).await?.map(|(b, _)| b)) })
    }

    fn chunk_write(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        self.block(self.put(&self.chunk_key(d), bytes.to_vec()))
    }

    fn chunk_list(&self) -> Result<Vec<ChunkEntry>> {
        self.block(async {
            // Leases first: a lease written after this listing belongs to a
            // writer that waits for this collection's claim to go.
            let leases = self.list("leases/").await?;
            let mut leased: HashMap<Digest, SystemTime> = HashMap::new();
            let bodies: Vec<(SystemTime, Vec<u8>)> = futures::stream::iter(leases)
                .map(|l| async move {
                    let key = self.key(&format!("leases/{}", l.rest));
                    let at = l.modified.unwrap_or_else(SystemTime::now);
                    Ok::<_, StoreError>(self.get(&key, None).await?.map(|(b, _)| (at, b)))
                })
                .buffered(PARALLEL)
                .try_filter_map(|x| async move { Ok(x) })
                .try_collect()
                .await?;
            for (at, body) in bodies {
                for d in body.chunks_exact(32).filter_map(|b| Digest::from_slice(b).ok()) {
                    let e = leased.entry(d).or_insert(at);
                    *e = (*e).max(at);
                }
            }
            let chunks = self.list("chunks/").await?;
            Ok(chunks
                .into_iter()
                .filter_map(|c| {
                    let digest = Digest::from_hex(c.rest.rsplit('/').next()?).ok()?;
                    Some(ChunkEntry {
                        digest,
                        bytes: c.bytes,
                        // A time S3 did not give counts as now: kept.
                        written: c.modified.unwrap_or_else(SystemTime::now),
                        leased: leased.get(&digest).copied(),
                    })
                })
                .collect())
        })
    }

    fn chunk_delete(&self, digests: &[Digest]) -> Result<()> {
        self.block(self.delete_keys(digests.iter().map(|d| self.chunk_key(d)).collect()))
    }

    fn touch(&self, digests: &[Digest]) -> Result<()> {
        if digests.is_empty() {
            return Ok(());
        }
        let ms = UNIX_EPOCH.elapsed().unwrap_or_default().as_millis();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let key = self.key(&format!("leases/{ms}-{}-{n}", self.owner));
        let body: Vec<u8> = digests.iter().flat_map(|d| d.0).collect();
        self.block(self.put(&key, body))
    }

    fn wait_for_gc(&self) -> Result<()> {
        self.block(async {
            let give_up = SystemTime::now() + chunk_store::GC_MAX;
            loop {
                let Some((deadline, _)) = self.claim_held().await? else { return Ok(()) };
                let now = SystemTime::now();
                if deadline <= now {
                    return Ok(()); // abandoned: its holder stopped deleting before it
                }
                if now > give_up {
                    return Err(StoreError::GcRunning { location: self.location(), until: when(deadline) });
                }
                tokio::time::sleep(CLAIM_POLL).await;
            }
        })
    }

    fn begin_gc(&self, deadline: SystemTime) -> Result<()> {
        self.block(async {
            let key = self.key(CLAIM);
            let ms = deadline.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
            let body = format!("{ms} {}\n", self.owner);
            for _ in 0..2 {
                if let Some(etag) = self.create(&key, body.as_bytes()).await? {
                    *self.claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(etag);
                    return Ok(());
                }
                match self.claim_held().await? {
                    Some((until, etag)) if until <= SystemTime::now() => {
                        // Abandoned (its holder died): removed only if it is
                        // still that claim.
                        tracing::warn!(%key, "removing an abandoned garbage collection claim");
                        let r =
                            self.client.delete_object().bucket(&self.at.bucket).key(&key).if_match(etag).send().await;
                        if let Err(e) = r
                            && status(&e) != Some(412)
                        {
                            return Err(self.failed(format!("removing the abandoned {key}"), e));
                        }
                    }
                    Some((until, _)) => {
                        return Err(StoreError::GcRunning { location: self.location(), until: when(until) });
                    }
                    None => {}
                }
            }
            Err(StoreError::GcRunning { location: self.location(), until: "unknown".into() })
        })
    }

    fn end_gc(&self) {
        let Some(etag) = self.claim.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let key = self.key(CLAIM);
        let r = self.block(self.client.delete_object().bucket(&self.at.bucket).key(&key).if_match(etag).send());
        if let Err(e) = r {
            // It expires at its deadline; writers wait until then.
            tracing::warn!(%key, error = %DisplayErrorContext(e), "could not give the garbage collection claim back");
        }
    }

    fn sweep(&self, cutoff: SystemTime, dry_run: bool) -> Result<u64> {
        self.block(async {
            let old: Vec<String> = self
                .list("leases/")
                .await?
                .into_iter()
                .filter(|l| l.modified.is_some_and(|m| m < cutoff))
                .map(|l| self.key(&format!("leases/{}", l.rest)))
                .collect();
            let n = old.len() as u64;
            if !dry_run {
                self.delete_keys(old).await?;
            }
            Ok(n)
        })
    }

    fn record_read(&self, name: &ImageName) -> Result<Option<Vec<u8>>> {
        self.block(self.record_of(&self.record_key(name), None))
    }

    fn records(&self, stream: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.block(async {
            let under = &format!("images/{stream}/_leaves/");
            let listed: Vec<Listed> = self.list(under).await?.into_iter().filter(|l| !l.rest.contains('/')).collect();
            let got: Vec<Option<(String, Vec<u8>)>> = futures::stream::iter(listed)
                .map(|l| async move {
                    let key = self.key(&format!("{under}{}", l.rest));
                    Ok::<_, StoreError>(self.record_of(&key, Some(&l.etag)).await?.map(|b| (l.rest, b)))
                })
                .buffered(PARALLEL)
                .try_collect()
                .await?;
            Ok(got.into_iter().flatten().collect())
        })
    }

    fn record_create(&self, name: &ImageName, bytes: &[u8]) -> Result<bool> {
        self.block(async { Ok(self.create(&self.record_key(name), bytes).await?.is_some()) })
    }

    fn record_replace(&self, name: &ImageName, bytes: &[u8]) -> Result<()> {
        self.block(self.put(&self.record_key(name), bytes.to_vec()))
    }

    fn record_delete(&self, name: &ImageName) -> Result<bool> {
        self.block(async {
            let key = self.record_key(name);
            if !self.exists(&key).await? {
                return Ok(false);
            }
            self.client
                .delete_object()
                .bucket(&self.at.bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| self.failed(format!("deleting {key}"), e))?;
            self.records.lock().unwrap_or_else(|e| e.into_inner()).by_key.remove(&key);
            Ok(true)
        })
    }

    fn check(&self) -> Result<()> {
        self.block(self.reachable())
    }

    fn streams(&self) -> Result<Vec<String>> {
        self.block(async {
            let mut out = HashSet::new();
            for l in self.list("images/").await? {
                if let Some((stream, _leaf)) = l.rest.rsplit_once("/_leaves/") {
                    out.insert(stream.to_owned());
                }
            }
            Ok(out.into_iter().collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_bad_ones_are_named() {
        let l: S3Location = "s3://images-eu/fleet/prod/".parse().unwrap();
        assert_eq!(l, S3Location { bucket: "images-eu".into(), prefix: "fleet/prod".into() });
        assert_eq!(l.to_string(), "s3://images-eu/fleet/prod");
        let l: S3Location = "s3://b12".parse().unwrap();
        assert_eq!((l.prefix.as_str(), l.to_string().as_str()), ("", "s3://b12"));
        for (bad, says) in [
            ("/var/lib/x", "is not s3://"),
            ("s3://", "is not a bucket name"),
            ("s3://ab", "is not a bucket name"),
            ("s3://Upper", "is not a bucket name"),
            ("s3://-dash", "is not a bucket name"),
            ("s3://bucket-/x", "is not a bucket name"),
            ("s3://bucket/a//b", "empty, '.' or '..'"),
            ("s3://bucket/a/../b", "empty, '.' or '..'"),
        ] {
            let err = bad.parse::<S3Location>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
