//! The upgrade of format-1 image records (no checksum) to the current
//! format, done when a directory store is opened, only for records that
//! check out.

use super::*;

impl ChunkStore {
    /// Rewrite format 1 records (no checksum) as format 2, each only after
    /// its manifest decoded and every chunk it names is stored with the
    /// length the manifest gives it; a record that fails stays as it is and
    /// reads as damaged.
    pub(crate) fn upgrade_legacy_records(&self) -> Result<()> {
        for stream in self.list_streams()? {
            for (leaf, bytes) in self.backend.records(&stream)? {
                let Ok(name) = ImageName::new(&stream, &leaf) else { continue };
                let Some(legacy) = record::decode_legacy(&bytes) else { continue };
                let checked = legacy
                    .map_err(|e| e.to_string())
                    .and_then(|(ms, m)| self.check_chunks(&name, &m).map(|()| (ms, m)).map_err(|e| e.to_string()));
                match checked {
                    Ok((ms, m)) => {
                        self.backend.record_replace(&name, &record::encode(&name, ms, &m))?;
                        tracing::info!(image = %name, "image record upgraded to format 2");
                    }
                    Err(why) => {
                        tracing::error!(image = %name, %why, "format 1 image record failed its checks; left as it is")
                    }
                }
            }
        }
        Ok(())
    }
}
