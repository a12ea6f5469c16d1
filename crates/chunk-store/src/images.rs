//! Committed images: a record per leaf, created only when every chunk of the
//! manifest is there with its length; listing streams and images, with
//! damaged records apart.

use super::*;

impl ChunkStore {
    /// Every chunk `m` (of image `name`) names is stored, with the length
    /// `m` gives it.
    pub(crate) fn check_chunks(&self, name: &ImageName, m: &Manifest) -> Result<()> {
        let order = first_uses(m);
        let digests: Vec<Digest> = order.iter().map(|(_, d)| *d).collect();
        let present = self.backend.chunk_heads(&digests, 0)?;
        let missing: Vec<Digest> = digests.iter().zip(&present).filter(|(_, p)| p.is_none()).map(|(d, _)| *d).collect();
        if let Some(first) = missing.first() {
            return Err(StoreError::ChunksMissing { name: name.to_string(), missing: missing.len(), first: *first });
        }
        let lens = self.chunk_lens(&digests)?;
        for ((index, d), stored) in order.into_iter().zip(lens) {
            let want = m.chunk_len(index) as u64;
            if stored != want {
                return Err(StoreError::ChunkLength { digest: d, index, expected: want, stored });
            }
        }
        Ok(())
    }

    /// Commit an image: refused while any chunk is missing or has another
    /// length than the manifest gives it; re-committing the same manifest is
    /// a no-op, other contents are refused. Returns the stored image and
    /// whether it was new.
    pub fn commit(&self, name: &ImageName, manifest: &Manifest) -> Result<(StoredImage, bool)> {
        let _guard = self.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        // As for find_missing: touched, then no collection running, then
        // checked; a collection elsewhere cannot take a chunk between the
        // check and the record.
        let digests: Vec<Digest> = first_uses(manifest).into_iter().map(|(_, d)| d).collect();
        self.backend.touch(&digests)?;
        self.backend.wait_for_gc()?;
        self.check_chunks(name, manifest)?;
        if let Some(existing) = self.get_image_opt(name)? {
            return already_committed(name, existing, manifest);
        }
        let committed = SystemTime::now();
        let ms = dir::unix_ms(committed);
        let rec = record::encode(name, ms, manifest);
        if !self.backend.record_create(name, &rec)? {
            // Another commit of the leaf got there first.
            return already_committed(name, self.get_image(name)?, manifest);
        }
        let stored = StoredImage {
            name: name.clone(),
            image_id: manifest.image_id(),
            manifest: manifest.clone(),
            committed: UNIX_EPOCH + Duration::from_millis(ms),
        };
        Ok((stored, true))
    }

    /// A committed image.
    pub fn get_image(&self, name: &ImageName) -> Result<StoredImage> {
        self.get_image_opt(name)?.ok_or_else(|| StoreError::NoSuchImage(name.to_string()))
    }

    pub(crate) fn get_image_opt(&self, name: &ImageName) -> Result<Option<StoredImage>> {
        match self.backend.record_read(name)? {
            Some(bytes) => self.decode(name, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn decode(&self, name: &ImageName, bytes: &[u8]) -> Result<StoredImage> {
        let r = record::decode(name, bytes).map_err(|why| StoreError::BadRecord {
            name: name.to_string(),
            location: self.location(),
            why,
        })?;
        Ok(StoredImage {
            name: name.clone(),
            image_id: r.image_id,
            manifest: r.manifest,
            committed: UNIX_EPOCH + Duration::from_millis(r.committed_ms),
        })
    }

    /// Delete a committed image (its chunks go at the next garbage
    /// collection). A damaged record can be deleted too.
    pub fn delete_image(&self, name: &ImageName) -> Result<()> {
        if self.backend.record_delete(name)? { Ok(()) } else { Err(StoreError::NoSuchImage(name.to_string())) }
    }

    /// Streams that hold at least one image, sorted.
    pub fn list_streams(&self) -> Result<Vec<String>> {
        let mut out = self.backend.streams()?;
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Images of a stream, oldest commit first, and apart from them the
    /// leaves whose records are damaged (one bad record hides no other).
    pub fn list_images(&self, stream: &str) -> Result<Listing> {
        image_format::validate_stream(stream)?;
        let mut out = Listing::default();
        for (leaf, bytes) in self.backend.records(stream)? {
            let Ok(name) = ImageName::new(stream, &leaf) else { continue };
            match self.decode(&name, &bytes) {
                Ok(img) => out.images.push(img),
                Err(StoreError::BadRecord { why, .. }) => {
                    tracing::error!(image = %name, %why, "image record is damaged; not served");
                    out.damaged.push(DamagedImage { name, why });
                }
                Err(e) => return Err(e),
            }
        }
        out.images.sort_by(|a, b| a.committed.cmp(&b.committed).then_with(|| a.name.cmp(&b.name)));
        out.damaged.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every committed image of every stream, and the damaged ones apart.
    pub fn list_all_images(&self) -> Result<Listing> {
        let mut out = Listing::default();
        for s in self.list_streams()? {
            let l = self.list_images(&s)?;
            out.images.extend(l.images);
            out.damaged.extend(l.damaged);
        }
        Ok(out)
    }
}

/// The distinct chunks of a manifest with the index of each one's first
/// use, in manifest order.
fn first_uses(m: &Manifest) -> Vec<(u64, Digest)> {
    let mut seen = HashSet::new();
    m.chunks()
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            ChunkRef::Data(d) if seen.insert(*d) => Some((i as u64, *d)),
            _ => None,
        })
        .collect()
}

/// A commit of `name` that finds `existing` there: a no-op when it is the
/// same image, else refused (a committed leaf never changes). The one rule
/// for both the plain re-commit and the lost race for the name.
fn already_committed(name: &ImageName, existing: StoredImage, manifest: &Manifest) -> Result<(StoredImage, bool)> {
    if existing.image_id == manifest.image_id() {
        Ok((existing, false))
    } else {
        Err(StoreError::LeafExists { name: name.to_string(), existing: existing.image_id })
    }
}
