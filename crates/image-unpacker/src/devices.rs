//! Finding an attached EBS volume by its id, the ways EC2 shows them.
//!
//! - Nitro: udev links `nvme-Amazon_Elastic_Block_Store_vol0123…` (the id
//!   without its dash) in the device directory (`/dev/disk/by-id`).
//! - Nitro without udev links: the NVMe controller's serial in
//!   `/sys/class/nvme/nvmeN/serial` is the id without its dash; the volume is
//!   the controller's namespace `/dev/nvmeNn1`.
//! - Xen: the name given at attach time, `/dev/sdf` appearing as `/dev/xvdf`.

use std::path::{Path, PathBuf};

/// Prefix of the udev names of EBS volumes on Nitro instances.
pub const NITRO_PREFIX: &str = "nvme-Amazon_Elastic_Block_Store_";

/// Check an EBS volume id: `vol-` and 8 to 32 lowercase hex digits.
pub fn validate_volume_id(id: &str) -> Result<(), String> {
    let hex = id.strip_prefix("vol-").ok_or_else(|| format!("volume id '{id}' does not start with 'vol-'"))?;
    if !(8..=32).contains(&hex.len()) || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("volume id '{id}' is not 'vol-' followed by 8 to 32 lowercase hex digits"));
    }
    Ok(())
}

/// The Nitro udev name of a volume.
pub fn nitro_name(volume_id: &str) -> String {
    format!("{NITRO_PREFIX}{}", volume_id.replacen('-', "", 1))
}

/// Where the volume is attached now, if anywhere. Symlinks are resolved so
/// the path names the device itself.
pub fn find_volume(device_dir: &Path, volume_id: &str, attach_name: Option<&str>) -> Option<PathBuf> {
    by_id(device_dir, volume_id).or_else(|| by_nvme_serial(volume_id)).or_else(|| by_xen_name(attach_name?))
}

fn by_id(device_dir: &Path, volume_id: &str) -> Option<PathBuf> {
    let name = nitro_name(volume_id);
    // Some udev rules add a namespace suffix (`_1`); partitions end in `-partN`.
    [name.clone(), format!("{name}_1")]
        .iter()
        .map(|n| device_dir.join(n))
        .find(|p| p.exists())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

fn by_nvme_serial(volume_id: &str) -> Option<PathBuf> {
    let serial = volume_id.replacen('-', "", 1);
    let entries = std::fs::read_dir("/sys/class/nvme").ok()?;
    for e in entries.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("serial")) else { continue };
        if s.trim() != serial {
            continue;
        }
        let ctrl = e.file_name().to_string_lossy().into_owned();
        let dev = PathBuf::from(format!("/dev/{ctrl}n1"));
        if dev.exists() {
            return Some(dev);
        }
    }
    None
}

fn by_xen_name(attach_name: &str) -> Option<PathBuf> {
    let base = attach_name.strip_prefix("/dev/").unwrap_or(attach_name);
    if base.is_empty() || base.contains('/') || base.contains("..") {
        return None;
    }
    let xen = base.strip_prefix("sd").map(|rest| format!("xvd{rest}"));
    xen.into_iter().chain([base.to_owned()]).map(|n| PathBuf::from("/dev").join(n)).find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_are_checked() {
        validate_volume_id("vol-0123456789abcdef0").unwrap();
        validate_volume_id("vol-12345678").unwrap();
        for bad in ["", "vol-", "vol-XYZ12345", "volume-12345678", "vol-1234", "vol-../../etc"] {
            assert!(validate_volume_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nitro_links_are_found_and_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("backing");
        std::fs::write(&disk, b"x").unwrap();
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id).unwrap();
        std::os::unix::fs::symlink(&disk, by_id.join(nitro_name("vol-0abc12345678"))).unwrap();
        std::os::unix::fs::symlink(&disk, by_id.join(format!("{}-part1", nitro_name("vol-0abc12345679")))).unwrap();
        let found = find_volume(&by_id, "vol-0abc12345678", None).unwrap();
        assert_eq!(found, std::fs::canonicalize(&disk).unwrap());
        // A partition link is not the volume.
        assert_eq!(find_volume(&by_id, "vol-0abc12345679", None), None);
        assert_eq!(nitro_name("vol-0abc12345678"), "nvme-Amazon_Elastic_Block_Store_vol0abc12345678");
    }

    #[test]
    fn xen_names_never_escape_dev() {
        assert_eq!(by_xen_name("../etc/passwd"), None);
        assert_eq!(by_xen_name("/dev/"), None);
        assert_eq!(by_xen_name("/dev/sdzz9"), None);
    }
}
