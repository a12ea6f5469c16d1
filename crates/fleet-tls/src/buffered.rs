//! TCP with a read buffer under TLS, for both ends of a daemon's
//! connections.
//!
//! rustls reads the socket one TLS record (at most 16 KiB) at a time, so a
//! 512 KiB chunk cost the reader 32 `recvfrom` calls. [`Buffered`] reads
//! up to [`READ_BUFFER`] (a client) or [`SERVER_READ_BUFFER`] (a daemon's
//! accepted connection) at once beneath TLS and hands rustls its records
//! from memory: one system call where there were up to sixteen, for one
//! extra copy in user space. Writes pass straight through (rustls already
//! writes its records with vectored writes).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, BufReader, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client reads from the socket at most at once (a client has a
/// few connections, each bringing chunks).
pub const READ_BUFFER: usize = 256 * 1024;
/// The same for each connection a daemon accepts: smaller, as a server
/// holds one per client (hundreds of unpackers) and most bring small
/// requests; uploads still read four records per call.
pub const SERVER_READ_BUFFER: usize = 64 * 1024;

/// A TCP connection whose reads are buffered (see the module's text).
#[derive(Debug)]
pub struct Buffered(BufReader<TcpStream>);

impl Buffered {
    /// Wrap a connected socket with a read buffer of `capacity` bytes,
    /// with `TCP_NODELAY` set (the HTTP/2 layer writes whole frames).
    pub fn new(stream: TcpStream, capacity: usize) -> io::Result<Buffered> {
        stream.set_nodelay(true)?;
        Ok(Buffered(BufReader::with_capacity(capacity, stream)))
    }
}

impl AsyncRead for Buffered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connected for Buffered {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().connect_info()
    }
}

/// A daemon's incoming connections from `listener`, buffered; a failed
/// accept is passed on for the server to log and go on.
pub fn incoming(listener: tokio::net::TcpListener) -> impl tokio_stream::Stream<Item = io::Result<Buffered>> + Send {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener)
        .map(|accepted| accepted.and_then(|s| Buffered::new(s, SERVER_READ_BUFFER)))
}

/// Dials plain TCP for tonic's channel, buffered; tonic puts TLS on top.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Dialer;

impl tower_service::Service<http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<Buffered>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let authority = uri
                .authority()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("'{uri}' names no host")))?;
            let target = match authority.port_u16() {
                Some(_) => authority.as_str().to_owned(),
                None => format!("{}:443", authority.as_str()),
            };
            let stream = TcpStream::connect(target).await?;
            Ok(hyper_util::rt::TokioIo::new(Buffered::new(stream, READ_BUFFER)?))
        })
    }
}
