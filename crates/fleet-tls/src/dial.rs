//! Dialing a daemon of the fleet over mutual TLS, and saying why a daemon
//! refused this client's certificate.
//!
//! Under TLS 1.3 a client finishes its side of the handshake before the
//! server has judged the client's certificate, so a refusal (the server's
//! fatal alert) arrives after the connection looks made, and what the first
//! call reports depends on timing: "connection was not ready", "broken
//! pipe", or the alert itself. [`refusal`] asks the server again on a
//! connection of its own and reads its answer, so every client can name the
//! refused certificate whatever its first call said.

use std::{error::Error as _, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::{Channel, Endpoint};

use crate::{TlsError, TlsFiles, read_pem};

/// HTTP/2 windows: large enough that one stream fills a fast link.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest HTTP/2 frame each side accepts (the protocol's default is
/// 16 KiB). A chunk (512 KiB by default) then crosses as one DATA frame:
/// the sender hands TLS one buffer per chunk, which it seals and writes
/// with a few vectored writes instead of one write per 16 KiB frame, and
/// the receiver's connection task wakes the reading call once per chunk
/// instead of 32 times. See docs/benchmarks.md, "data path".
pub const MAX_FRAME: u32 = 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`refusal`] waits for each step of its own connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection to a daemon could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot reach {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A short form of an error and all its sources, for messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_sources(e.to_string(), e.source())
}

/// `s` followed by each error in the chain from `cur` that it does not
/// already say.
fn with_sources(mut s: String, mut cur: Option<&dyn std::error::Error>) -> String {
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A status's message with the errors under it (a transport error says only
/// "transport error" on its own), and what a TLS alert from the server
/// means for this client.
pub fn describe_status(status: &tonic::Status) -> String {
    let mut s = with_sources(status.message().to_owned(), std::error::Error::source(status));
    if let Some(hint) = tls_alert_hint(&s) {
        s.push_str(" (");
        s.push_str(hint);
        s.push(')');
    }
    s
}

/// What a fatal TLS alert the server sent says about this client's
/// certificate; rustls names the alert in its error ("received fatal alert:
/// CertificateExpired").
pub fn tls_alert_hint(text: &str) -> Option<&'static str> {
    if !text.contains("alert") {
        return None;
    }
    let hints: [(&str, &str); 6] = [
        ("CertificateExpired", "the server refused this client's certificate: it has expired or is not yet valid"),
        ("UnknownCA", "the server refused this client's certificate: it is not signed by the CA the server trusts"),
        ("CertificateRevoked", "the server refused this client's certificate: it was revoked"),
        ("CertificateRequired", "the server wants a client certificate and none was sent"),
        ("BadCertificate", "the server refused this client's certificate as unacceptable"),
        ("DecryptError", "the server could not verify this client's key: does the key match the certificate?"),
    ];
    hints.iter().find(|(alert, _)| text.contains(alert)).map(|(_, hint)| *hint)
}

/// Whether a failed call's status is one a refused certificate shows up
/// as: the transport failed (the server never answered the call).
pub fn may_be_refusal(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown)
}

/// Connect to `addr` (`HOST:PORT`) over mutual TLS, expecting the server's
/// certificate to name `server_name`.
pub async fn connect_channel(addr: &str, tls: &TlsFiles, server_name: &str) -> Result<Channel, DialError> {
    let cfg = tls.client_config(server_name)?;
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| DialError::Connect { addr: addr.to_owned(), detail: format!("bad address: {e}") })?
        .tls_config(cfg)
        .map_err(|e| DialError::Connect { addr: addr.to_owned(), detail: error_chain(&e) })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    endpoint.connect_with_connector(crate::buffered::Dialer).await.map_err(|e| {
        let mut detail = e.source().map(error_chain).unwrap_or_else(|| e.to_string());
        if let Some(hint) = tls_alert_hint(&detail) {
            detail = format!("{detail} ({hint})");
        }
        DialError::Connect { addr: addr.to_owned(), detail }
    })
}

/// Whether the server at `addr` refuses this client's certificate, and
/// why: a connection of its own, with the same certificate, key and CA,
/// that sends the HTTP/2 preface and reads the server's first answer. A
/// fatal alert becomes its sentence ("the imageserver at ADDR refused this
/// client's certificate: it has expired ..."); a server that answers, one
/// that cannot be reached, and files that cannot be read give None (the
/// caller's own error already says those).
pub async fn refusal(addr: &str, tls: &TlsFiles, server_name: &str) -> Option<String> {
    let text = match tokio::time::timeout(PROBE_TIMEOUT * 3, probe(addr, tls, server_name)).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) | Err(_) => return None,
    };
    let hint = tls_alert_hint(&text)?;
    Some(format!("{server_name} at {addr}: {hint} ({text})"))
}

/// [`refusal`], for a call that failed with `message`, unless the message
/// already names the alert (then it says why itself).
pub async fn unnamed_refusal(message: &str, addr: &str, tls: &TlsFiles, server_name: &str) -> Option<String> {
    if tls_alert_hint(message).is_some() {
        return None;
    }
    refusal(addr, tls, server_name).await
}

/// One connection's handshake and first read; the error's text, if any.
async fn probe(addr: &str, tls: &TlsFiles, server_name: &str) -> Result<(), String> {
    let config = rustls_client_config(tls).map_err(|_| String::new())?;
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let tcp = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| String::new())?
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = tokio::time::timeout(PROBE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| String::new())?
        .map_err(|e| error_chain(&e))?;
    // The client preface and an empty SETTINGS frame: a server that took
    // the certificate answers with its own SETTINGS; one that did not sends
    // its alert.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let mut buf = [0u8; 64];
    let exchange = async {
        stream.write_all(&hello).await?;
        stream.flush().await?;
        stream.read(&mut buf).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, exchange).await {
        Ok(Err(e)) => Err(error_chain(&e)),
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

/// The rustls form of what [`TlsFiles::client_config`] gives tonic.
fn rustls_client_config(tls: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let ca = read_pem(&tls.ca, "CERTIFICATE").map_err(|e| e.to_string())?;
    let cert = read_pem(&tls.cert, "CERTIFICATE").map_err(|e| e.to_string())?;
    let key = read_pem(&tls.key, "PRIVATE KEY").map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let chain = CertificateDer::pem_slice_iter(&cert).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| e.to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
