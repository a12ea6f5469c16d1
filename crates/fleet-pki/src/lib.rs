//! A small certificate authority for local worlds, tests and first set-ups.
//!
//! [`Role`] lists the fleet's roles and the rights each one's certificate
//! carries; [`write_pki`] lays out the files `cargo xtask pki` promises.

#![forbid(unsafe_code)]

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use fleet_tls::{IMAGESERVER_TLS_NAME, Right, UNPACKER_TLS_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
pub use time::Duration;
use time::OffsetDateTime;

/// Errors while making or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("failed to write '{path}': {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A fleet role: which program holds the certificate, and what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves images; as a replica it reads and follows a master.
    Imageserver,
    /// Serves the publisher; reads images from the imageserver.
    ImageUnpacker,
    /// Reads images and drives unpackers.
    AmiPublisher,
    /// A build pipeline: reads and writes images.
    ImageBuilder,
}

impl Role {
    /// Every role `cargo xtask pki` writes.
    pub const ALL: [Role; 4] = [Role::Imageserver, Role::ImageUnpacker, Role::AmiPublisher, Role::ImageBuilder];

    /// Directory and common name of the role.
    pub fn name(self) -> &'static str {
        match self {
            Role::Imageserver => "imageserver",
            Role::ImageUnpacker => "image-unpacker",
            Role::AmiPublisher => "ami-publisher",
            Role::ImageBuilder => "image-builder",
        }
    }

    /// Rights the role's certificate carries.
    pub fn rights(self) -> &'static [Right] {
        match self {
            Role::Imageserver => &[Right::Read, Right::Replicate],
            Role::ImageUnpacker => &[Right::Read],
            Role::AmiPublisher => &[Right::Read, Right::DriveUnpacker],
            Role::ImageBuilder => &[Right::Read, Right::Write],
        }
    }

    /// Server name the role answers to, for the roles that run servers.
    pub fn server_name(self) -> Option<&'static str> {
        match self {
            Role::Imageserver => Some(IMAGESERVER_TLS_NAME),
            Role::ImageUnpacker => Some(UNPACKER_TLS_NAME),
            Role::AmiPublisher | Role::ImageBuilder => None,
        }
    }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub rights: Vec<Right>,
    /// DNS names (and `localhost`/`127.0.0.1` when `server` is set).
    pub dns_names: Vec<String>,
    pub server: bool,
    /// Validity relative to now; a negative end makes an expired certificate.
    pub valid_from: Duration,
    pub valid_until: Duration,
}

impl LeafSpec {
    /// The certificate a role gets: valid from a day ago for ten years.
    pub fn for_role(role: Role) -> LeafSpec {
        LeafSpec {
            common_name: role.name().to_owned(),
            rights: role.rights().to_vec(),
            dns_names: role.server_name().map(str::to_owned).into_iter().collect(),
            server: role.server_name().is_some(),
            valid_from: Duration::days(-1),
            valid_until: Duration::days(3650),
        }
    }
}

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(2);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    /// The CA certificate in PEM form.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Sign a leaf certificate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, spec.common_name.as_str());
        let now = OffsetDateTime::now_utc();
        params.not_before = now + spec.valid_from;
        params.not_after = now + spec.valid_until;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if spec.server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
            params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        for dns in &spec.dns_names {
            params.subject_alt_names.push(SanType::DnsName(dns.as_str().try_into()?));
        }
        for right in &spec.rights {
            params.subject_alt_names.push(SanType::URI(right.uri().as_str().try_into()?));
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Write `DIR/CA.pem` and, for every role, `DIR/ROLE/cert.pem` and
/// `DIR/ROLE/key.pem`. Returns the CA so callers can issue more.
pub fn write_pki(dir: &Path) -> Result<Ca, PkiError> {
    let ca = Ca::new("ami-fleet local CA")?;
    write_file(&dir.join("CA.pem"), ca.cert_pem())?;
    for role in Role::ALL {
        let issued = ca.issue(&LeafSpec::for_role(role))?;
        write_issued(&dir.join(role.name()), &issued)?;
    }
    Ok(ca)
}

/// Write `cert.pem` and `key.pem` (mode 0600) into `dir`.
pub fn write_issued(dir: &Path, issued: &Issued) -> Result<(), PkiError> {
    write_file(&dir.join("cert.pem"), &issued.cert_pem)?;
    write_file(&dir.join("key.pem"), &issued.key_pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| PkiError::Write { path: key, source })?;
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.to_owned(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::write(path, text).map_err(err)
}

/// Make `DIR/ca.pem`-style client directory: copy of the CA plus a role's
/// certificate and key as `cert.pem`/`key.pem` (the `~/.ssl` layout).
pub fn write_ssl_dir(dir: &Path, ca: &Ca, issued: &Issued) -> Result<(), PkiError> {
    write_file(&dir.join("CA.pem"), ca.cert_pem())?;
    write_issued(dir, issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_certificates_carry_their_rights() {
        let ca = Ca::new("test").unwrap();
        for role in Role::ALL {
            let issued = ca.issue(&LeafSpec::for_role(role)).unwrap();
            let peer = fleet_tls::peer_from_pem(issued.cert_pem.as_bytes());
            assert_eq!(peer.name, role.name());
            let mut want = role.rights().to_vec();
            want.sort();
            assert_eq!(peer.rights, want, "{}", role.name());
        }
    }

    #[test]
    fn write_pki_lays_out_every_role() {
        let dir = tempfile::tempdir().unwrap();
        write_pki(dir.path()).unwrap();
        assert!(dir.path().join("CA.pem").is_file());
        for role in Role::ALL {
            assert!(dir.path().join(role.name()).join("cert.pem").is_file());
            assert!(dir.path().join(role.name()).join("key.pem").is_file());
        }
    }
}
