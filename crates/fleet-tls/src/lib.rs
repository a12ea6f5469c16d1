//! Mutual TLS for every gRPC endpoint of the fleet, and the rights a peer's
//! certificate grants.
//!
//! **Architecture invariant:** what a client may do is decided only from its
//! verified certificate. A right is a SAN URI of the form
//! `urn:ami-fleet:right:NAME` (see [`Right`]); the CA that signs certificates is
//! the one place rights are granted.

#![forbid(unsafe_code)]

mod buffered;
pub mod dial;
mod rights;

pub use buffered::{Buffered, READ_BUFFER, SERVER_READ_BUFFER, incoming};
pub use rights::{PROBES, Rights, RightsLayer, RightsService, peer_of_extensions};

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Prefix of the SAN URIs that carry rights.
pub const RIGHT_URI_PREFIX: &str = "urn:ami-fleet:right:";

/// TLS server name clients expect in an imageserver's certificate, whatever
/// address they dialled.
pub const IMAGESERVER_TLS_NAME: &str = "imageserver";
/// TLS server name clients expect in an image-unpacker's certificate. Unpackers
/// are dialled by private IP, which the certificate cannot know in advance.
pub const UNPACKER_TLS_NAME: &str = "image-unpacker";

/// Something a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Right {
    /// List images, read manifests and chunks.
    Read,
    /// Add and delete images, collect garbage.
    Write,
    /// Follow every image of a server, deletes included (replicas).
    Replicate,
    /// Call an image-unpacker (the ami-publisher role).
    DriveUnpacker,
}

impl Right {
    /// Every right, in a stable order.
    pub const ALL: [Right; 4] = [Right::Read, Right::Write, Right::Replicate, Right::DriveUnpacker];

    /// The name used in certificates and messages.
    pub fn name(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Replicate => "replicate",
            Right::DriveUnpacker => "drive-unpacker",
        }
    }

    /// The SAN URI that grants this right.
    pub fn uri(self) -> String {
        format!("{RIGHT_URI_PREFIX}{}", self.name())
    }
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Right {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Right::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown right '{s}' (known: read, write, replicate, drive-unpacker)"))
    }
}

/// The rights and subject of a verified peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Common name of the leaf certificate, for logs.
    pub name: String,
    /// Rights granted by the leaf certificate.
    pub rights: Vec<Right>,
}

impl Peer {
    /// Whether the peer holds `right`.
    pub fn has(&self, right: Right) -> bool {
        self.rights.contains(&right)
    }
}

/// Errors while loading certificates or reading rights.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (the cause is the error's source).
    #[error("failed to read '{path}'")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("'{path}' holds no {what} in PEM form")]
    NoPem { path: PathBuf, what: &'static str },
}

/// Paths of the CA bundle, certificate and key a process uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that sign every peer.
    pub ca: PathBuf,
    /// This process's certificate chain.
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The client layout used by imagetool, unpacker-tool and ami-publisher:
    /// `DIR/CA.pem`, `DIR/cert.pem`, `DIR/key.pem`.
    pub fn from_ssl_dir(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join("CA.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
    }

    /// The default layout of a daemon: `/etc/ssl/CA.pem` and
    /// `/etc/ssl/NAME/{cert,key}.pem`.
    pub fn daemon_default(name: &str) -> TlsFiles {
        let etc = Path::new("/etc/ssl");
        TlsFiles { ca: etc.join("CA.pem"), cert: etc.join(name).join("cert.pem"), key: etc.join(name).join("key.pem") }
    }

    /// The client default: `$HOME/.ssl`.
    pub fn default_ssl_dir() -> PathBuf {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/")).join(".ssl")
    }

    fn load(&self) -> Result<(Certificate, Identity), TlsError> {
        let ca = read_pem(&self.ca, "CERTIFICATE")?;
        let cert = read_pem(&self.cert, "CERTIFICATE")?;
        let key = read_pem(&self.key, "PRIVATE KEY")?;
        Ok((Certificate::from_pem(ca), Identity::from_pem(cert, key)))
    }

    /// Server side: present our certificate and demand a client certificate
    /// signed by the CA.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let (ca, identity) = self.load()?;
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca))
    }

    /// Client side: trust only the CA, present our certificate, and expect
    /// the server certificate to name `server_name`.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let (ca, identity) = self.load()?;
        Ok(ClientTlsConfig::new().ca_certificate(ca).identity(identity).domain_name(server_name))
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains("-----BEGIN") || !text.contains(what) {
        return Err(TlsError::NoPem { path: path.to_owned(), what });
    }
    Ok(bytes)
}

/// Rights and name of a DER certificate. A certificate that does not parse
/// grants nothing.
pub fn peer_from_der(der: &[u8]) -> Peer {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Peer::default();
    };
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or("").to_owned();
    let mut rights = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = gn
                && let Some(r) = uri.strip_prefix(RIGHT_URI_PREFIX).and_then(|n| n.parse::<Right>().ok())
                && !rights.contains(&r)
            {
                rights.push(r);
            }
        }
    }
    rights.sort();
    Peer { name, rights }
}

/// Rights and name of the first certificate in a PEM text.
pub fn peer_from_pem(pem: &[u8]) -> Peer {
    match x509_parser::pem::parse_x509_pem(pem) {
        Ok((_, pem)) => peer_from_der(&pem.contents),
        Err(_) => Peer::default(),
    }
}

/// The verified peer of a gRPC request (its leaf certificate).
pub fn peer_of<T>(request: &tonic::Request<T>) -> Peer {
    request.peer_certs().and_then(|certs| certs.first().map(|c| peer_from_der(c.as_ref()))).unwrap_or_default()
}

/// Refuse a request whose certificate lacks `right`, with
/// PERMISSION_DENIED naming the right. The daemons do not call this per
/// handler: their [`Rights`] table, applied by [`Rights::layer`], decides
/// every call.
pub fn require<T>(request: &tonic::Request<T>, right: Right) -> Result<Peer, tonic::Status> {
    let peer = peer_of(request);
    if peer.has(right) { Ok(peer) } else { Err(lacks(&peer, right)) }
}

/// The refusal of a peer that lacks `right`, naming the right and the
/// certificate's subject.
fn lacks(peer: &Peer, right: Right) -> tonic::Status {
    let who =
        if peer.name.is_empty() { "the client certificate".to_owned() } else { format!("certificate '{}'", peer.name) };
    tonic::Status::permission_denied(format!("{who} lacks the '{right}' right"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_round_trip_through_names() {
        for r in Right::ALL {
            assert_eq!(r.name().parse::<Right>().unwrap(), r);
            assert!(r.uri().starts_with(RIGHT_URI_PREFIX));
        }
        assert!("root".parse::<Right>().unwrap_err().contains("unknown right 'root'"));
    }

    #[test]
    fn garbage_certificate_grants_nothing() {
        assert_eq!(peer_from_der(b"not a certificate"), Peer::default());
    }
}
