//! Durable file writes, one way for every binary of the fleet (the
//! imageserver's records, the unpacker's state, imagetool's and
//! unpacker-tool's downloads, ami-publisher's results files).
//!
//! A file written here appears at its path only when complete: it is
//! written to a temporary file beside the path, fsynced, renamed over the
//! path, and the directory is fsynced so that the rename itself survives a
//! crash. A reader sees the old contents or the new, never a mix, and a
//! crash leaves at most a hidden temporary file (`.NAME.tmp…`).
//!
//! Errors are the operating system's, without the path: callers say which
//! file they were writing, in their own words.

#![forbid(unsafe_code)]

use std::{
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
};

/// The directory `path` is in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// fsync a directory, so that a rename or link in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|f| f.sync_all())
}

/// Write `bytes` to a new file at `path` and fsync it (not atomic: for
/// files nobody reads before they are renamed or linked into place).
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replace `path` with `bytes`, atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::new(path)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// A file being written that appears at its path only on [`commit`]
/// (dropped uncommitted, it disappears and the path is untouched).
///
/// [`commit`]: AtomicFile::commit
#[derive(Debug)]
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl AtomicFile {
    /// A temporary file beside `path`, in the same directory (so the
    /// rename cannot cross file systems).
    pub fn new(path: &Path) -> io::Result<AtomicFile> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = tempfile::Builder::new().prefix(&format!(".{name}.tmp")).tempfile_in(dir_of(path))?;
        Ok(AtomicFile { tmp, path: path.to_owned() })
    }

    /// The file to write (positioned at its start).
    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// fsync the file, rename it over the path, fsync the directory.
    pub fn commit(self) -> io::Result<()> {
        let AtomicFile { tmp, path } = self;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        sync_dir(dir_of(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_write_replaces_the_file_and_leaves_nothing_beside_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("results.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new contents").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new contents");
        assert_eq!(names(d.path()), ["results.json"]);
    }

    #[test]
    fn an_uncommitted_file_never_appears_and_the_old_one_stays() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("image.raw");
        write_atomic(&p, b"complete").unwrap();
        let mut f = AtomicFile::new(&p).unwrap();
        f.file().write_all(b"half of the n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"complete", "not visible before commit");
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"complete");
        assert_eq!(names(d.path()), ["image.raw"], "the temporary file went with it");
    }
}
