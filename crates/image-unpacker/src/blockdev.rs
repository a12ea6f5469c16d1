//! Block devices (and regular files standing in for them): size, and the
//! checks that stand between the unpacker and a device it must not write.
//!
//! **Invariant:** [`open_for_write`] is the only way this crate opens a
//! device for writing. It refuses a device that is mounted (itself or any
//! partition), holds `/`, has holders (LVM, RAID, dm-crypt), backs a loop
//! device, or that another program holds open exclusively; block devices are
//! opened with `O_EXCL`, files are locked, so the check cannot go stale while
//! the unpacker writes.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// What kind of thing a device path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Block,
    File,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::File => "file",
        }
    }
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device '{path}': {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("'{0}' is neither a block device nor a regular file")]
    NotADevice(PathBuf),
    #[error("refusing to write '{path}': {what} is mounted on '{mount_point}'")]
    Mounted { path: PathBuf, what: String, mount_point: String },
    #[error("refusing to write '{path}': it holds the root file system")]
    HoldsRoot { path: PathBuf },
    #[error("refusing to write '{path}': it is in use ({why})")]
    InUse { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DeviceError + '_ {
    move |source| DeviceError::Io { path: path.to_owned(), source }
}

/// Kind and size in bytes of the device at `path` (symlinks followed).
pub fn inspect(path: &Path) -> Result<(Kind, u64), DeviceError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok((Kind::File, meta.len()));
    }
    if !ft.is_block_device() {
        return Err(DeviceError::NotADevice(path.to_owned()));
    }
    // A block device's length is where a seek to its end lands.
    let mut f = File::open(path).map_err(io_err(path))?;
    let size = io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(io_err(path))?;
    Ok((Kind::Block, size))
}

/// Major and minor numbers of a `dev_t` (glibc's encoding, as Linux uses).
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x00ff);
    (major, minor)
}

/// A block device and its partitions, as `(dev_t, /dev path)`.
fn device_family(rdev: u64, path: &Path) -> Vec<(u64, PathBuf)> {
    let mut family = vec![(rdev, path.to_owned())];
    let (ma, mi) = major_minor(rdev);
    let sys = PathBuf::from(format!("/sys/dev/block/{ma}:{mi}"));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            let p = e.path();
            if !p.join("partition").exists() {
                continue;
            }
            let Ok(dev) = std::fs::read_to_string(p.join("dev")) else { continue };
            let Some((a, b)) = dev.trim().split_once(':') else { continue };
            let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) else { continue };
            let devt = ((a & 0xffff_f000) << 32) | ((a & 0x0fff) << 8) | ((b & 0xffff_ff00) << 12) | (b & 0x00ff);
            family.push((devt, PathBuf::from("/dev").join(e.file_name())));
        }
    }
    family
}

/// `/proc/self/mountinfo` lines as (major:minor, mount point, source).
fn mounts() -> Vec<(String, String, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let source = fields.get(sep + 2).copied().unwrap_or("");
            Some(((*fields.get(2)?).to_owned(), (*fields.get(4)?).replace("\\040", " "), source.to_owned()))
        })
        .collect()
}

/// Refuse a device that something else uses. Cheap; called before every
/// write session (and again implicitly by the exclusive open).
pub fn check_free(path: &Path) -> Result<(), DeviceError> {
    let canon = std::fs::canonicalize(path).map_err(io_err(path))?;
    let meta = std::fs::metadata(&canon).map_err(io_err(path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return check_file_free(path, &canon);
    }
    if !ft.is_block_device() {
        return Err(DeviceError::NotADevice(path.to_owned()));
    }
    let family = device_family(meta.rdev(), &canon);
    let root_dev = std::fs::metadata("/").map(|m| m.dev()).ok();
    for (devt, dev_path) in &family {
        if Some(*devt) == root_dev {
            return Err(DeviceError::HoldsRoot { path: path.to_owned() });
        }
        let (ma, mi) = major_minor(*devt);
        let id = format!("{ma}:{mi}");
        for (mm, mount_point, source) in mounts() {
            let same_source = Path::new(&source) == dev_path.as_path()
                || std::fs::canonicalize(&source).is_ok_and(|s| s == *dev_path);
            if mm == id || same_source {
                if mount_point == "/" {
                    return Err(DeviceError::HoldsRoot { path: path.to_owned() });
                }
                return Err(DeviceError::Mounted {
                    path: path.to_owned(),
                    what: dev_path.display().to_string(),
                    mount_point,
                });
            }
        }
        let holders = PathBuf::from(format!("/sys/dev/block/{id}/holders"));
        if let Some(h) = std::fs::read_dir(holders).ok().and_then(|mut d| d.next()).and_then(Result::ok) {
            return Err(DeviceError::InUse {
                path: path.to_owned(),
                why: format!("{} is held by {}", dev_path.display(), h.file_name().to_string_lossy()),
            });
        }
    }
    Ok(())
}

/// A regular file is in use when a loop device is backed by it.
fn check_file_free(path: &Path, canon: &Path) -> Result<(), DeviceError> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Ok(()) };
    for e in entries.flatten() {
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else { continue };
        if Path::new(backing.trim()) == canon {
            return Err(DeviceError::InUse {
                path: path.to_owned(),
                why: format!("it backs /dev/{}", e.file_name().to_string_lossy()),
            });
        }
    }
    Ok(())
}

/// Open a device for writing, after [`check_free`], exclusively: `O_EXCL`
/// for block devices (the kernel refuses it while mounted or claimed), an
/// advisory lock for files. The handle keeps the claim until dropped.
pub fn open_for_write(path: &Path) -> Result<File, DeviceError> {
    check_free(path)?;
    let (kind, _) = inspect(path)?;
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if kind == Kind::Block {
        opts.custom_flags(rustix::fs::OFlags::EXCL.bits().cast_signed());
    }
    let file = opts.open(path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
            DeviceError::InUse { path: path.to_owned(), why: "another program holds it open exclusively".into() }
        } else {
            io_err(path)(e)
        }
    })?;
    if kind == Kind::File {
        file.try_lock().map_err(|_| DeviceError::InUse {
            path: path.to_owned(),
            why: "another program holds a lock on it".into(),
        })?;
    }
    Ok(file)
}

/// Ask the kernel to drop cached pages of `file`, so that what is read next
/// comes from the device. Advisory: failure only costs the guarantee.
pub fn drop_cache(file: &File) {
    if let Err(e) = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "fadvise(DONTNEED) failed; reading back may hit the page cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_numbers_split_like_glibc() {
        // loop0 is 7:0, nvme0n1p1 often 259:1, a large minor 8:300.
        assert_eq!(major_minor(0x0700), (7, 0));
        assert_eq!(major_minor((259 << 8) | 1), (259, 1));
        let dev = ((300u64 & 0xffff_ff00) << 12) | (8 << 8) | (300 & 0xff);
        assert_eq!(major_minor(dev), (8, 300));
    }

    #[test]
    fn a_file_is_free_and_locked_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert_eq!(inspect(&p).unwrap(), (Kind::File, 8192));
        let held = open_for_write(&p).unwrap();
        let err = open_for_write(&p).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(held);
        open_for_write(&p).unwrap();
    }

    #[test]
    fn a_directory_is_not_a_device() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(inspect(dir.path()), Err(DeviceError::NotADevice(_))));
        assert!(matches!(open_for_write(&dir.path().join("missing")), Err(DeviceError::Io { .. })));
    }

    #[test]
    fn the_root_device_is_refused() {
        // Whatever backs `/` here, if it is a block device we can name it.
        let root_dev = std::fs::metadata("/").unwrap().dev();
        let Some((_, _, source)) = mounts().into_iter().find(|(_, mp, _)| mp == "/") else { return };
        let Ok(meta) = std::fs::metadata(&source) else { return };
        if !meta.file_type().is_block_device() || meta.rdev() != root_dev {
            eprintln!("root is not on a plain block device here ({source}); nothing to check");
            return;
        }
        let err = check_free(Path::new(&source)).unwrap_err();
        assert!(matches!(err, DeviceError::HoldsRoot { .. } | DeviceError::Mounted { .. }), "{err}");
    }
}
