//! Garbage collection: chunks no committed image references, once past a
//! grace period, and stale files of interrupted writes in `tmp/`.

use super::*;

/// Result of a garbage collection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub bytes_removed: u64,
    pub chunks_kept: u64,
    /// Files of interrupted writes removed from `tmp/`.
    pub stale_temp_files: u64,
}

impl ChunkStore {
    /// Remove chunks no committed image references and that were not written
    /// or confirmed within `grace` (uploads of images not yet committed).
    /// Refused while any record is damaged: the chunks it names cannot be
    /// told apart from garbage. Also removes files of interrupted writes
    /// from `tmp/` that are older than [`STALE_TMP`] and `grace`.
    pub fn collect_garbage(&self, grace: Duration, dry_run: bool) -> Result<GcReport> {
        let _guard = self.gc_lock.write().unwrap_or_else(|e| e.into_inner());
        let all = self.list_all_images()?;
        if let Some(first) = all.damaged.first() {
            return Err(StoreError::DamagedRecords { count: all.damaged.len(), first: first.name.to_string() });
        }
        let mut live = HashSet::new();
        for img in all.images {
            live.extend(img.manifest.distinct_digests());
        }
        let cutoff = SystemTime::now().checked_sub(grace).unwrap_or(UNIX_EPOCH);
        let mut report = GcReport::default();
        let tmp_cutoff = SystemTime::now().checked_sub(grace.max(STALE_TMP)).unwrap_or(UNIX_EPOCH);
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let stale = entry.metadata().and_then(|m| m.modified()).map(|m| m < tmp_cutoff).unwrap_or(false);
            if stale {
                if !dry_run {
                    let _ = fs::remove_file(entry.path());
                }
                report.stale_temp_files += 1;
            }
        }
        let chunks = self.root.join("chunks");
        for sub in fs::read_dir(&chunks).map_err(io_err(&chunks))? {
            let sub = sub.map_err(io_err(&chunks))?.path();
            for entry in fs::read_dir(&sub).map_err(io_err(&sub))? {
                let entry = entry.map_err(io_err(&sub))?;
                let name = entry.file_name();
                let Ok(d) = Digest::from_hex(&name.to_string_lossy()) else { continue };
                let meta = entry.metadata().map_err(io_err(&entry.path()))?;
                let recent = meta.modified().map(|m| m > cutoff).unwrap_or(true);
                if live.contains(&d) || recent {
                    report.chunks_kept += 1;
                    continue;
                }
                if !dry_run {
                    fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                }
                report.chunks_removed += 1;
                report.bytes_removed += meta.len();
            }
        }
        tracing::info!(?report, dry_run, "garbage collection done");
        Ok(report)
    }
}
