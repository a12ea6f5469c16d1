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

/// Where the kernel shows devices and mounts (`sys/`, `proc/self/mountinfo`)
/// and names device nodes (`dev/`). The checks take this root as a
/// parameter, so each layer can be tested on a crafted tree.
const SYSTEM_ROOT: &str = "/";

/// `MAJOR:MINOR`, as sysfs and mountinfo write a device number (rustix
/// splits a `dev_t` as glibc does).
fn dev_id(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// The device number in a sysfs `dev` file (`MAJOR:MINOR` and a newline).
fn parse_dev_id(text: &str) -> Option<u64> {
    let (major, minor) = text.trim().split_once(':')?;
    Some(rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// A block device and its partitions, as `(dev_t, device node)`: the
/// partitions are the entries of `sys/dev/block/MAJOR:MINOR/` under `root`
/// that have a `partition` file.
fn device_family(root: &Path, rdev: u64, path: &Path) -> Vec<(u64, PathBuf)> {
    let mut family = vec![(rdev, path.to_owned())];
    let sys = root.join("sys/dev/block").join(dev_id(rdev));
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            let p = e.path();
            if !p.join("partition").exists() {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(p.join("dev")) else { continue };
            let Some(devt) = parse_dev_id(&text) else { continue };
            family.push((devt, root.join("dev").join(e.file_name())));
        }
    }
    family
}

/// One line of mountinfo: what is mounted where.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// `MAJOR:MINOR` of the mounted file system's device.
    dev: String,
    mount_point: String,
    /// What was mounted, as given to mount(2): often a device node.
    source: String,
}

/// Undo the kernel's escapes in a mountinfo field (space, tab, newline and
/// backslash are written as three octal digits after a backslash).
fn unescape_mount_field(field: &str) -> String {
    // The backslash comes last, so that a decoded one never starts a new escape.
    [("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")]
        .iter()
        .fold(field.to_owned(), |s, (escaped, plain)| s.replace(escaped, plain))
}

/// The mounts in mountinfo text (`ID PARENT MAJOR:MINOR ROOT MOUNT_POINT
/// OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`); lines that do not
/// parse are skipped.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                dev: (*fields.get(2)?).to_owned(),
                mount_point: unescape_mount_field(fields.get(4)?),
                source: unescape_mount_field(fields.get(sep + 2).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// The mounts this process sees, from `proc/self/mountinfo` under `root`.
fn mounts(root: &Path) -> Vec<Mount> {
    std::fs::read_to_string(root.join("proc/self/mountinfo")).map(|text| parse_mountinfo(&text)).unwrap_or_default()
}

/// Whether a mount's source names the device node `dev_path`, as it is or
/// through links (`/dev/disk/by-uuid/...`, `/dev/mapper/...`).
fn same_source(source: &str, dev_path: &Path) -> bool {
    Path::new(source) == dev_path || std::fs::canonicalize(source).is_ok_and(|s| s == dev_path)
}

/// The first holder (LVM, RAID, dm-crypt) of the device `id` listed in
/// `sys/dev/block/ID/holders` under `root`.
fn first_holder(root: &Path, id: &str) -> Option<String> {
    let holders = root.join("sys/dev/block").join(id).join("holders");
    let entry = std::fs::read_dir(holders).ok()?.next()?.ok()?;
    Some(entry.file_name().to_string_lossy().into_owned())
}

/// Refuse a device that something else uses. Cheap; called before every
/// write session (and again implicitly by the exclusive open).
pub fn check_free(path: &Path) -> Result<(), DeviceError> {
    check_free_under(Path::new(SYSTEM_ROOT), path)
}

/// [`check_free`], with the kernel's views read under `root`.
fn check_free_under(root: &Path, path: &Path) -> Result<(), DeviceError> {
    let canon = std::fs::canonicalize(path).map_err(io_err(path))?;
    let meta = std::fs::metadata(&canon).map_err(io_err(path))?;
    let ft = meta.file_type();
    if ft.is_file() {
        return check_file_free(root, path, &canon);
    }
    if !ft.is_block_device() {
        return Err(DeviceError::NotADevice(path.to_owned()));
    }
    let root_dev = std::fs::metadata(root).map(|m| m.dev()).ok();
    check_block_free(root, path, &canon, meta.rdev(), root_dev)
}

/// The block device `canon` (number `rdev`) and each of its partitions must
/// not hold the file system whose device is `root_dev`, be mounted, or have
/// holders.
fn check_block_free(
    root: &Path,
    path: &Path,
    canon: &Path,
    rdev: u64,
    root_dev: Option<u64>,
) -> Result<(), DeviceError> {
    let mounts = mounts(root);
    for (devt, dev_path) in device_family(root, rdev, canon) {
        if Some(devt) == root_dev {
            return Err(DeviceError::HoldsRoot { path: path.to_owned() });
        }
        let id = dev_id(devt);
        if let Some(m) = mounts.iter().find(|m| m.dev == id || same_source(&m.source, &dev_path)) {
            if m.mount_point == "/" {
                return Err(DeviceError::HoldsRoot { path: path.to_owned() });
            }
            return Err(DeviceError::Mounted {
                path: path.to_owned(),
                what: dev_path.display().to_string(),
                mount_point: m.mount_point.clone(),
            });
        }
        if let Some(holder) = first_holder(root, &id) {
            return Err(DeviceError::InUse {
                path: path.to_owned(),
                why: format!("{} is held by {holder}", dev_path.display()),
            });
        }
    }
    Ok(())
}

/// A regular file is in use when a loop device is backed by it (a
/// `sys/block/*/loop/backing_file` under `root` names it).
fn check_file_free(root: &Path, path: &Path, canon: &Path) -> Result<(), DeviceError> {
    let Ok(entries) = std::fs::read_dir(root.join("sys/block")) else { return Ok(()) };
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

    /// A crafted root: `sys/`, `proc/self/mountinfo` and `dev/` as the
    /// kernel would show them, for one layer of the checks at a time.
    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Tree {
        fn new() -> Tree {
            let dir = tempfile::tempdir().unwrap();
            let root = std::fs::canonicalize(dir.path()).unwrap();
            Tree { _dir: dir, root }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.path(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }

        fn mkdir(&self, rel: &str) {
            std::fs::create_dir_all(self.path(rel)).unwrap();
        }

        /// A disk `MAJOR:MINOR` with partitions (name, major, minor), laid
        /// out as sysfs does: each partition a directory with `partition`
        /// and `dev` files, beside entries that are not partitions.
        fn disk(&self, id: &str, parts: &[(&str, u64, u64)]) {
            let base = format!("sys/dev/block/{id}");
            self.write(&format!("{base}/dev"), &format!("{id}\n"));
            self.mkdir(&format!("{base}/holders"));
            self.write(&format!("{base}/queue/rotational"), "0\n");
            for (name, major, minor) in parts {
                self.write(&format!("{base}/{name}/partition"), "1\n");
                self.write(&format!("{base}/{name}/dev"), &format!("{major}:{minor}\n"));
                self.mkdir(&format!("sys/dev/block/{major}:{minor}/holders"));
            }
        }

        fn mountinfo(&self, lines: &[&str]) {
            self.write("proc/self/mountinfo", &(lines.join("\n") + "\n"));
        }
    }

    /// Mounts that name neither test disk: the root file system, pseudo
    /// file systems, and an existing node that is some other device.
    fn unrelated_mounts(t: &Tree) -> Vec<String> {
        t.write("dev/vdb", "");
        vec![
            "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw".into(),
            "22 27 0:21 / /proc rw,relatime shared:2 - proc proc rw".into(),
            "25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw".into(),
            format!("40 27 254:16 / /srv/other\\040disk rw shared:9 master:3 - xfs {} rw", t.path("dev/vdb").display()),
        ]
    }

    /// Disk 241:0 (node `dev/sdz`, not created) with partitions 241:1,
    /// 241:2 and one with a large minor, and the mounts above.
    fn free_disk() -> (Tree, PathBuf, u64) {
        let t = Tree::new();
        t.disk("241:0", &[("sdz1", 241, 1), ("sdz2", 241, 2), ("sdz17", 259, 1 << 19)]);
        let lines = unrelated_mounts(&t);
        t.mountinfo(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        let canon = t.path("dev/sdz");
        (t, canon, rustix::fs::makedev(241, 0))
    }

    fn check(t: &Tree, canon: &Path, rdev: u64, root_dev: Option<u64>) -> Result<(), DeviceError> {
        check_block_free(&t.root, Path::new("/dev/disk/by-id/test"), canon, rdev, root_dev)
    }

    fn add_mount(t: &Tree, line: &str) {
        let old = std::fs::read_to_string(t.path("proc/self/mountinfo")).unwrap();
        t.write("proc/self/mountinfo", &format!("{old}{line}\n"));
    }

    #[test]
    fn dev_numbers_read_and_written_as_sysfs_does() {
        // loop0 is 7:0, nvme0n1p1 often 259:1, a large minor 8:300.
        assert_eq!(dev_id(0x0700), "7:0");
        assert_eq!(dev_id(0x0010_082c), "8:300");
        assert_eq!(parse_dev_id("259:1\n"), Some(0x0001_0301));
        let values = [0u32, 1, 7, 255, 256, 300, 4095, 4096, 0x000f_ffff, 0x0010_0000, 0x1234_5678, u32::MAX];
        for major in values {
            for minor in values {
                let text = format!("{major}:{minor}");
                let dev = parse_dev_id(&format!("{text}\n")).unwrap();
                assert_eq!(dev_id(dev), text, "dev_t {dev:#x}");
            }
        }
        assert_eq!(parse_dev_id("8"), None);
        assert_eq!(parse_dev_id("8:x"), None);
        assert_eq!(parse_dev_id("-1:0"), None);
    }

    /// What stat says of each device node matches the number sysfs gives it.
    #[test]
    fn dev_numbers_match_the_kernels() {
        let mut seen = 0;
        for e in std::fs::read_dir("/sys/class/block").into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("dev")) else { continue };
            let Ok(meta) = std::fs::metadata(Path::new("/dev").join(e.file_name())) else { continue };
            if !meta.file_type().is_block_device() {
                continue;
            }
            assert_eq!(parse_dev_id(&text), Some(meta.rdev()), "{:?}", e.file_name());
            assert_eq!(dev_id(meta.rdev()), text.trim(), "{:?}", e.file_name());
            seen += 1;
        }
        if seen == 0 {
            eprintln!("no block device nodes here; the encodings are checked by the round trip alone");
        }
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
101 27 7:3 / /mnt/my\\040data rw,relatime shared:5 master:2 - ext4 /dev/loop3 rw
102 27 0:40 /sub /media/a\\011b\\012c\\134d rw - tmpfs my\\040tmp rw
103 27 0:41 / /srv/a\\134040b rw shared:7 - fuse.x /dev/disk/by-label/x\\040y rw
a line without a separator
1 2 - x
104 27 0:42 / /x rw -
";
        let m = |dev: &str, mount_point: &str, source: &str| Mount {
            dev: dev.into(),
            mount_point: mount_point.into(),
            source: source.into(),
        };
        assert_eq!(
            parse_mountinfo(text),
            vec![
                m("254:0", "/", "/dev/vda"),
                m("7:3", "/mnt/my data", "/dev/loop3"),
                m("0:40", "/media/a\tb\nc\\d", "my tmp"),
                m("0:41", "/srv/a\\040b", "/dev/disk/by-label/x y"),
                m("0:42", "/x", ""),
            ]
        );
        assert_eq!(parse_mountinfo(""), vec![]);
    }

    #[test]
    fn device_family_lists_partitions_from_sysfs() {
        let (t, canon, rdev) = free_disk();
        // Entries that are not partitions, or whose number does not parse, are not family.
        t.write("sys/dev/block/241:0/sdz9/partition", "9\n");
        t.write("sys/dev/block/241:0/sdz9/dev", "garbage\n");
        t.write("sys/dev/block/241:0/slaves/dev", "241:99\n");
        let mut family = device_family(&t.root, rdev, &canon);
        family.sort();
        assert_eq!(
            family,
            vec![
                (rustix::fs::makedev(241, 0), canon.clone()),
                (rustix::fs::makedev(241, 1), t.path("dev/sdz1")),
                (rustix::fs::makedev(241, 2), t.path("dev/sdz2")),
                (rustix::fs::makedev(259, 1 << 19), t.path("dev/sdz17")),
            ]
        );
        // A device sysfs does not know is its own family.
        assert_eq!(
            device_family(&t.root, rustix::fs::makedev(242, 0), &canon),
            vec![(rustix::fs::makedev(242, 0), canon.clone())]
        );
    }

    #[test]
    fn a_free_device_passes_every_layer() {
        let (t, canon, rdev) = free_disk();
        check(&t, &canon, rdev, Some(rustix::fs::makedev(254, 0))).unwrap();
        check(&t, &canon, rdev, None).unwrap();
    }

    #[test]
    fn a_partition_mounted_by_number_is_refused() {
        let (t, canon, rdev) = free_disk();
        add_mount(&t, "120 27 241:2 / /mnt/my\\040data rw shared:4 - ext4 /dev/mapper/elsewhere rw");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        let DeviceError::Mounted { what, mount_point, .. } = &err else { panic!("{err}") };
        assert_eq!((what.as_str(), mount_point.as_str()), (t.path("dev/sdz2").to_str().unwrap(), "/mnt/my data"));
        assert!(err.to_string().contains("is mounted on '/mnt/my data'"), "{err}");
    }

    #[test]
    fn a_partition_with_a_large_minor_mounted_by_number_is_refused() {
        let (t, canon, rdev) = free_disk();
        add_mount(&t, "121 27 259:524288 / /data rw - ext4 /dev/nvme0n1p17 rw");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(matches!(&err, DeviceError::Mounted { what, .. } if what.ends_with("/dev/sdz17")), "{err}");
    }

    /// btrfs shows an anonymous device number in mountinfo; only the source
    /// names the partition.
    #[test]
    fn a_partition_mounted_under_another_number_is_refused_by_its_node() {
        let (t, canon, rdev) = free_disk();
        let node = t.path("dev/sdz1");
        add_mount(&t, &format!("122 27 0:77 / /home rw - btrfs {} rw", node.display()));
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(
            matches!(&err, DeviceError::Mounted { what, mount_point, .. }
            if Path::new(what) == node && mount_point == "/home"),
            "{err}"
        );
    }

    #[test]
    fn a_device_mounted_through_a_link_is_refused() {
        let (t, canon, rdev) = free_disk();
        t.write("dev/sdz2", "");
        t.mkdir("dev/disk/by-label");
        std::os::unix::fs::symlink("../../sdz2", t.path("dev/disk/by-label/data")).unwrap();
        let link = t.path("dev/disk/by-label/data");
        add_mount(&t, &format!("123 27 0:78 / /var/lib rw - btrfs {} rw", link.display()));
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(matches!(&err, DeviceError::Mounted { what, .. } if what.ends_with("/dev/sdz2")), "{err}");
    }

    #[test]
    fn a_whole_disk_mounted_is_refused() {
        let (t, canon, rdev) = free_disk();
        add_mount(&t, "124 27 241:0 / /mnt rw - ext4 /dev/sdz rw");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(matches!(&err, DeviceError::Mounted { what, .. } if Path::new(what) == canon), "{err}");
    }

    #[test]
    fn a_device_holding_root_is_refused() {
        let (t, canon, rdev) = free_disk();
        // By the device number of `/`, for the disk or any partition.
        for root_dev in [rustix::fs::makedev(241, 0), rustix::fs::makedev(241, 2), rustix::fs::makedev(259, 1 << 19)] {
            let err = check(&t, &canon, rdev, Some(root_dev)).unwrap_err();
            assert!(matches!(err, DeviceError::HoldsRoot { .. }), "{err}");
        }
        // By a mount on `/`.
        add_mount(&t, "125 1 241:1 / / rw - ext4 /dev/root rw");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(matches!(err, DeviceError::HoldsRoot { .. }), "{err}");
        assert_eq!(err.to_string(), "refusing to write '/dev/disk/by-id/test': it holds the root file system");
    }

    #[test]
    fn a_device_with_holders_is_refused() {
        let (t, canon, rdev) = free_disk();
        t.mkdir("sys/dev/block/241:2/holders/dm-0");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        let DeviceError::InUse { why, .. } = &err else { panic!("{err}") };
        assert_eq!(why, &format!("{} is held by dm-0", t.path("dev/sdz2").display()));

        let (t, canon, rdev) = free_disk();
        t.mkdir("sys/dev/block/241:0/holders/md127");
        let err = check(&t, &canon, rdev, None).unwrap_err();
        assert!(matches!(&err, DeviceError::InUse { why, .. } if why.ends_with("/dev/sdz is held by md127")), "{err}");
    }

    #[test]
    fn a_file_backing_a_loop_device_is_refused() {
        let t = Tree::new();
        let disk = t.path("images/disk.raw");
        t.write("images/disk.raw", "");
        t.write("images/other.raw", "");
        t.mkdir("sys/block/vda/queue");
        t.write("sys/block/loop1/loop/backing_file", &format!("{}\n", t.path("images/other.raw").display()));
        check_file_free(&t.root, &disk, &disk).unwrap();
        check_free_under(&t.root, &disk).unwrap();

        t.write("sys/block/loop2/loop/backing_file", &format!("{}\n", disk.display()));
        let err = check_file_free(&t.root, &disk, &disk).unwrap_err();
        assert!(matches!(&err, DeviceError::InUse { why, .. } if why == "it backs /dev/loop2"), "{err}");
        // Named through a link, the file is still the one the loop device uses.
        std::os::unix::fs::symlink(&disk, t.path("link.raw")).unwrap();
        let err = check_free_under(&t.root, &t.path("link.raw")).unwrap_err();
        assert!(matches!(&err, DeviceError::InUse { path, .. } if *path == t.path("link.raw")), "{err}");
    }

    /// The whole check on a real block device node, with a crafted sysfs
    /// and mountinfo around it.
    #[test]
    fn check_free_reads_the_family_and_mounts_under_its_root() {
        let Some(node) = ["/dev/loop0", "/dev/loop7", "/dev/vda", "/dev/sda", "/dev/nvme0n1"]
            .into_iter()
            .map(Path::new)
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device()))
        else {
            eprintln!("no block device node here; the layers are checked one by one above");
            return;
        };
        let id = dev_id(std::fs::metadata(node).unwrap().rdev());
        let t = Tree::new();
        t.disk(&id, &[("inner1", 240, 77)]);
        t.mountinfo(&["27 1 254:0 / / rw - ext4 /dev/vda rw"]);
        check_free_under(&t.root, node).unwrap();
        add_mount(&t, "130 27 240:77 / /mnt/inner rw - ext4 /dev/inner1 rw");
        let err = check_free_under(&t.root, node).unwrap_err();
        assert!(matches!(&err, DeviceError::Mounted { what, .. } if Path::new(what) == t.path("dev/inner1")), "{err}");
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

    /// On a real loop device: its backing file is refused (through the real
    /// sysfs), and a device open for writing is held exclusively.
    #[test]
    fn a_loop_device_is_claimed_exclusively_and_its_backing_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = test_support::ScratchDevice::new(&dir.path().join("backing"), 1 << 20).unwrap();
        if !dev.is_loop {
            eprintln!("no loop devices here (needs root); the crafted trees above check each layer");
            return;
        }
        let err = check_free(&dev.backing).unwrap_err();
        let name = dev.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(matches!(&err, DeviceError::InUse { why, .. } if *why == format!("it backs /dev/{name}")), "{err}");
        assert_eq!(inspect(&dev.path).unwrap(), (Kind::Block, 1 << 20));
        check_free(&dev.path).unwrap();
        let held = open_for_write(&dev.path).unwrap();
        let err = open_for_write(&dev.path).unwrap_err();
        assert!(
            matches!(&err, DeviceError::InUse { why, .. } if why == "another program holds it open exclusively"),
            "{err}"
        );
        drop(held);
        drop(open_for_write(&dev.path).unwrap());
    }

    /// Read-back must read the device, not what the page cache kept of it.
    #[test]
    fn drop_cache_leaves_nothing_of_the_file_in_the_page_cache() {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let dir = tempfile::tempdir().unwrap();
        #[allow(clippy::useless_conversion)] // f_type's integer type differs between architectures
        let on_tmpfs = rustix::fs::statfs(dir.path()).is_ok_and(|s| i64::from(s.f_type) == TMPFS_MAGIC);
        if on_tmpfs {
            eprintln!("the temporary directory is on tmpfs, whose pages cannot be dropped; nothing to check");
            return;
        }
        let p = dir.path().join("disk");
        std::fs::write(&p, test_support::noise(1 << 20, 3)).unwrap();
        File::open(&p).unwrap().sync_all().unwrap();
        // Bytes of the file in the page cache, as util-linux's fincore counts them.
        let cached = || -> Option<u64> {
            let out = std::process::Command::new("fincore")
                .args(["--bytes", "--noheadings", "--output", "RES"])
                .arg(&p)
                .output()
                .ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        };
        io::Read::read_to_end(&mut File::open(&p).unwrap(), &mut Vec::new()).unwrap();
        let Some(before) = cached() else {
            eprintln!("no fincore here; nothing to check");
            return;
        };
        assert!(before > 0, "reading the file put it in the page cache");
        drop_cache(&File::open(&p).unwrap());
        assert_eq!(cached(), Some(0));
    }

    #[test]
    fn kinds_are_named_as_the_state_file_names_them() {
        for kind in [Kind::Block, Kind::File] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{}\"", kind.as_str()));
        }
        assert_eq!((Kind::Block.as_str(), Kind::File.as_str()), ("block", "file"));
    }

    #[test]
    fn a_directory_is_not_a_device() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(inspect(dir.path()), Err(DeviceError::NotADevice(_))));
        assert!(matches!(check_free(dir.path()), Err(DeviceError::NotADevice(_))));
        assert!(matches!(open_for_write(&dir.path().join("missing")), Err(DeviceError::Io { .. })));
    }

    #[test]
    fn the_root_device_is_refused() {
        // Whatever backs `/` here, if it is a block device we can name it.
        let root_dev = std::fs::metadata("/").unwrap().dev();
        let Some(root) = mounts(Path::new(SYSTEM_ROOT)).into_iter().find(|m| m.mount_point == "/") else { return };
        let Ok(meta) = std::fs::metadata(&root.source) else { return };
        if !meta.file_type().is_block_device() || meta.rdev() != root_dev {
            eprintln!("root is not on a plain block device here ({}); nothing to check", root.source);
            return;
        }
        let err = check_free(Path::new(&root.source)).unwrap_err();
        assert!(matches!(err, DeviceError::HoldsRoot { .. }), "{err}");
    }
}
