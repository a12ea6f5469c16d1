//! Committed images: a record per leaf under `images/STREAM/_leaves/`,
//! written only when every chunk of the manifest is there with its length;
//! listing streams and images, with damaged records apart.

use super::*;

impl ChunkStore {
    /// Every chunk `m` (of image `name`) names is stored, with the length
    /// `m` gives it.
    pub(crate) fn check_chunks(&self, name: &ImageName, m: &Manifest) -> Result<()> {
        let mut expected: std::collections::HashMap<Digest, u64> = std::collections::HashMap::new();
        for (index, c) in m.chunks().iter().enumerate() {
            if let ChunkRef::Data(d) = c {
                expected.entry(*d).or_insert(index as u64);
            }
        }
        let mut order: Vec<(u64, Digest)> = expected.into_iter().map(|(d, i)| (i, d)).collect();
        order.sort_unstable();
        let missing: Vec<Digest> = order.iter().filter(|(_, d)| !self.has(d)).map(|(_, d)| *d).collect();
        if let Some(first) = missing.first() {
            return Err(StoreError::ChunksMissing { name: name.to_string(), missing: missing.len(), first: *first });
        }
        for (index, d) in order {
            let want = m.chunk_len(index) as u64;
            let stored = self.chunk_len(&d)?;
            if stored != want {
                return Err(StoreError::ChunkLength { digest: d, index, expected: want, stored });
            }
        }
        Ok(())
    }

    pub(crate) fn leaves_dir(&self, stream: &str) -> PathBuf {
        let mut p = self.root.join("images");
        p.extend(stream.split('/'));
        p.join(LEAVES_DIR)
    }

    pub(crate) fn record_path(&self, name: &ImageName) -> PathBuf {
        self.leaves_dir(name.stream()).join(name.leaf())
    }

    /// Commit an image: refused while any chunk is missing or has another
    /// length than the manifest gives it; re-committing the same manifest is
    /// a no-op, other contents are refused. Returns the stored image and
    /// whether it was new.
    pub fn commit(&self, name: &ImageName, manifest: &Manifest) -> Result<(StoredImage, bool)> {
        let _guard = self.gc_lock.read().unwrap_or_else(|e| e.into_inner());
        self.check_chunks(name, manifest)?;
        let path = self.record_path(name);
        if let Some(existing) = self.get_image_opt(name)? {
            return already_committed(name, existing, manifest);
        }
        let dir = path.parent().expect("record path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let committed = SystemTime::now();
        let ms = u64::try_from(committed.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(0);
        let rec = record::encode(name, ms, manifest);
        let tmp = self.tmp_path();
        write_synced(&tmp, &rec)?;
        // A hard link never replaces an existing file: two racing commits of
        // one leaf cannot both win.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another commit of the leaf got there first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return already_committed(name, self.get_image(name)?, manifest);
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
        sync_dir(dir)?;
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
        let path = self.record_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let r = record::decode(name, &bytes).map_err(|why| StoreError::BadRecord {
            name: name.to_string(),
            path: path.clone(),
            why,
        })?;
        Ok(Some(StoredImage {
            name: name.clone(),
            image_id: r.image_id,
            manifest: r.manifest,
            committed: UNIX_EPOCH + Duration::from_millis(r.committed_ms),
        }))
    }

    /// Delete a committed image (its chunks go at the next garbage
    /// collection). A damaged record can be deleted too.
    pub fn delete_image(&self, name: &ImageName) -> Result<()> {
        let path = self.record_path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NoSuchImage(name.to_string())),
            Err(e) => return Err(io_err(&path)(e)),
        }
        let dir = path.parent().expect("record path has a parent");
        sync_dir(dir)?;
        // Prune empty directories up to images/, so empty streams vanish.
        let images = self.root.join("images");
        let mut d = dir.to_owned();
        while d != images && fs::remove_dir(&d).is_ok() {
            d.pop();
        }
        Ok(())
    }

    /// Streams that hold at least one image, sorted.
    pub fn list_streams(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let images = self.root.join("images");
        walk_streams(&images, "", &mut out)?;
        out.sort();
        Ok(out)
    }

    /// Images of a stream, oldest commit first, and apart from them the
    /// leaves whose records are damaged (one bad record hides no other).
    pub fn list_images(&self, stream: &str) -> Result<Listing> {
        image_format::validate_stream(stream)?;
        let dir = self.leaves_dir(stream);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Listing::default();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            let leaf = entry.file_name().to_string_lossy().into_owned();
            let Ok(name) = ImageName::new(stream, &leaf) else { continue };
            match self.get_image_opt(&name) {
                Ok(Some(img)) => out.images.push(img),
                Ok(None) => {}
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

fn walk_streams(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        if !entry.file_type().map_err(io_err(dir))?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LEAVES_DIR {
            if fs::read_dir(entry.path()).map(|mut e| e.next().is_some()).unwrap_or(false) && !prefix.is_empty() {
                out.push(prefix.to_owned());
            }
            continue;
        }
        let child = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        walk_streams(&entry.path(), &child, out)?;
    }
    Ok(())
}
