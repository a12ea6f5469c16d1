//! Garbage collection: chunks no committed image references, once past a
//! grace period, and what interrupted writes and old confirmations left.

use super::*;

/// How long one collection may take: it claims the store until then, and
/// stops deleting a margin before it (other processes treat a claim past
/// its deadline as abandoned).
pub const GC_MAX: Duration = Duration::from_secs(600);
/// How long before its deadline a collection stops deleting (clock skew
/// between the processes sharing a bucket, and one delete in flight).
const GC_MARGIN: Duration = Duration::from_secs(60);

/// Result of a garbage collection: what went, and what stayed and why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    /// Every chunk that stayed (the sum of the three reasons below).
    pub chunks_kept: u64,
    /// Kept: a committed image names it.
    pub kept_referenced: u64,
    /// Kept: written within the grace period (an upload whose image is not
    /// committed yet).
    pub kept_recent: u64,
    /// Kept: confirmed to a writer within the grace period (a lease: an
    /// upload in flight through any imageserver of the bucket).
    pub kept_leased: u64,
    /// Leftovers of interrupted writes and expired leases removed.
    pub stale_temp_files: u64,
    /// The collection reached its time limit and stopped early; run it
    /// again for the rest.
    pub stopped_early: bool,
}

impl ChunkStore {
    /// Remove chunks no committed image references and that were not written
    /// or confirmed within `grace` (uploads of images not yet committed).
    /// Refused while any record is damaged: the chunks it names cannot be
    /// told apart from garbage. Also removes leftovers of interrupted writes
    /// older than [`STALE_TMP`] and `grace`, and leases older than `grace`.
    pub fn collect_garbage(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _guard = self.gc_lock.write().unwrap_or_else(|e| e.into_inner());
        let started = SystemTime::now();
        let deadline = started + GC_MAX;
        if !dry_run {
            self.backend.begin_gc(deadline)?;
        }
        let claim = Claim { backend: &*self.backend, held: !dry_run };
        let r = self.collect(grace, dry_run, started, deadline);
        drop(claim);
        let report = r?;
        tracing::info!(?report, dry_run, "garbage collection done");
        Ok(report)
    }

    fn collect(&self, grace: Duration, dry_run: bool, now: SystemTime, deadline: SystemTime) -> Result<GcReport> {
        // Chunks are listed before records: a chunk written after the listing
        // is not judged at all, and a record committed after it names only
        // chunks the commit touched (kept as leased or recent).
        let chunks = self.backend.chunk_list()?;
        let all = self.list_all_images()?;
        if let Some(first) = all.damaged.first() {
            return Err(StoreError::DamagedRecords { count: all.damaged.len(), first: first.name.to_string() });
        }
        let mut live = HashSet::new();
        for img in all.images {
            live.extend(img.manifest.distinct_digests());
        }
        let cutoff = now.checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        for c in chunks {
            if live.contains(&c.digest) {
                report.kept_referenced += 1;
            } else if c.written > cutoff {
                report.kept_recent += 1;
            } else if c.leased.is_some_and(|l| l > cutoff) {
                report.kept_leased += 1;
            } else {
                doomed.push(c);
            }
        }
        for batch in doomed.chunks(1000) {
            if !dry_run {
                if SystemTime::now() + GC_MARGIN > deadline {
                    report.stopped_early = true;
                    break;
                }
                let digests: Vec<Digest> = batch.iter().map(|c| c.digest).collect();
                self.backend.chunk_delete(&digests)?;
            }
            report.chunks_removed += batch.len() as u64;
            report.bytes_removed += batch.iter().map(|c| c.bytes).sum::<u64>();
        }
        report.chunks_kept = report.kept_referenced + report.kept_recent + report.kept_leased;
        let sweep_cutoff = now.checked_sub(grace.max(STALE_TMP)).unwrap_or(UNIX_EPOCH);
        report.stale_temp_files = self.backend.sweep(sweep_cutoff, dry_run)?;
        Ok(report)
    }
}

/// The backend's claim to delete, given back however the collection ends.
struct Claim<'a> {
    backend: &'a dyn Backend,
    held: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.held {
            self.backend.end_gc();
        }
    }
}
