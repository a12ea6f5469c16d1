//! Which right each gRPC method needs, checked for every call in one place.
//!
//! Each daemon declares one [`Rights`] table from full method path
//! (`/package.Service/Method`) to the [`Right`] the method needs, and wraps
//! its whole tonic server in [`Rights::layer`]. The layer runs before the
//! request reaches any service, so handlers do not check rights themselves:
//!
//! - a method with no entry in the table is refused (deny by default), so an
//!   RPC added without a decision about who may call it is open to no one;
//! - a caller whose verified certificate lacks the method's right is refused
//!   with PERMISSION_DENIED naming the right and the certificate's subject.
//!
//! The caller's certificate is read from the connection information tonic
//! stores in the request's extensions before any layer runs (the same place
//! [`tonic::Request::peer_certs`] reads it from).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::{Peer, Right, peer_from_der};

/// The standard services every daemon serves beside its own: gRPC health
/// (`grpc.health.v1`, for load balancers and Kubernetes probes) and server
/// reflection (for grpcurl). They answer only whether a service is serving
/// and what the public protocol is, so any client whose certificate the
/// CA signed (the TLS handshake already demands one) may call them, whatever
/// its rights.
pub const PROBES: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// A daemon's table: every gRPC method it serves and the right it needs.
#[derive(Debug, Clone, Copy)]
pub struct Rights {
    table: &'static [(&'static str, Right)],
}

impl Rights {
    /// The table, as pairs of full method path (`/package.Service/Method`)
    /// and the right a caller needs.
    pub const fn new(table: &'static [(&'static str, Right)]) -> Rights {
        Rights { table }
    }

    /// Every entry, in the order given.
    pub fn entries(&self) -> &'static [(&'static str, Right)] {
        self.table
    }

    /// The right `path` needs, or `None` when the table has no entry for it.
    pub fn needed(&self, path: &str) -> Option<Right> {
        self.table.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
    }

    /// Whether `peer` may call `path`: refused when the table has no entry
    /// for it, or when the peer lacks the right the entry names. The
    /// standard probes ([`PROBES`]) are open to any peer the CA signed.
    pub fn check(&self, path: &str, peer: &Peer) -> Result<(), tonic::Status> {
        if PROBES.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        match self.needed(path) {
            None => Err(no_entry(path)),
            Some(right) if peer.has(right) => Ok(()),
            Some(right) => Err(crate::lacks(peer, right)),
        }
    }

    /// A tower layer for `Server::builder().layer(...)` that applies this
    /// table to every call; `on_denied` runs once per refused call (for the
    /// daemons' denial counters).
    pub fn layer(self, on_denied: impl Fn() + Send + Sync + 'static) -> RightsLayer {
        RightsLayer { rights: self, on_denied: Arc::new(on_denied), peer_of: peer_of_extensions }
    }
}

/// The refusal of a method the table does not name.
fn no_entry(path: &str) -> tonic::Status {
    tonic::Status::permission_denied(format!(
        "method '{path}' has no entry in this server's rights table, so no one may call it"
    ))
}

/// The verified peer recorded by tonic's TLS acceptor in a request's
/// extensions; a request without one has no rights.
pub fn peer_of_extensions(extensions: &http::Extensions) -> Peer {
    extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| peer_from_der(c.as_ref())))
        .unwrap_or_default()
}

type PeerSource = fn(&http::Extensions) -> Peer;

/// The layer made by [`Rights::layer`].
#[derive(Clone)]
pub struct RightsLayer {
    rights: Rights,
    on_denied: Arc<dyn Fn() + Send + Sync>,
    peer_of: PeerSource,
}

impl fmt::Debug for RightsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RightsLayer").field("rights", &self.rights).finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for RightsLayer {
    type Service = RightsService<S>;

    fn layer(&self, inner: S) -> RightsService<S> {
        RightsService { inner, rights: self.rights, on_denied: self.on_denied.clone(), peer_of: self.peer_of }
    }
}

/// A service that lets through only the calls its [`Rights`] allow.
#[derive(Clone)]
pub struct RightsService<S> {
    inner: S,
    rights: Rights,
    on_denied: Arc<dyn Fn() + Send + Sync>,
    peer_of: PeerSource,
}

impl<S> fmt::Debug for RightsService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RightsService").field("rights", &self.rights).finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for RightsService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let peer = (self.peer_of)(request.extensions());
        match self.rights.check(request.uri().path(), &peer) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                (self.on_denied)();
                // A trailers-only gRPC response carrying the refusal; the
                // request body is dropped unread.
                let response = status.into_http::<ResBody>();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicU64, Ordering},
        task::Waker,
    };

    use tower_layer::Layer as _;
    use tower_service::Service as _;

    use super::*;

    const TABLE: Rights = Rights::new(&[("/test.Svc/Read", Right::Read), ("/test.Svc/Write", Right::Write)]);

    /// Answers every call it is given with 200 and counts them.
    #[derive(Clone, Default)]
    struct Inner(Arc<AtomicU64>);

    impl tower_service::Service<http::Request<()>> for Inner {
        type Response = http::Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<String>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(http::Response::new("reached the handler".to_owned())))
        }
    }

    /// Call `path` through the layer as `peer` (put in the extensions
    /// where the test's peer source finds it). Returns the gRPC status
    /// (None for a call let through), how many calls reached the inner
    /// service, and how many denials were counted.
    fn call_as(peer: Peer, path: &str) -> (Option<tonic::Status>, u64, u64) {
        let denied = Arc::new(AtomicU64::new(0));
        let d = denied.clone();
        let mut layer = TABLE.layer(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        layer.peer_of = |ext| ext.get::<Peer>().cloned().unwrap_or_default();
        let inner = Inner::default();
        let mut svc = layer.layer(inner.clone());
        let mut request = http::Request::builder().uri(format!("http://localhost{path}")).body(()).unwrap();
        request.extensions_mut().insert(peer);
        let mut fut = svc.call(request);
        let Poll::Ready(Ok(response)) = fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
            panic!("the layer's answer was not ready at once");
        };
        (
            tonic::Status::from_header_map(response.headers()),
            inner.0.load(Ordering::SeqCst),
            denied.load(Ordering::SeqCst),
        )
    }

    fn peer(name: &str, rights: &[Right]) -> Peer {
        Peer { name: name.to_owned(), rights: rights.to_vec() }
    }

    #[test]
    fn a_method_missing_from_the_table_is_refused_even_with_every_right() {
        let (status, reached, denied) = call_as(peer("root", &Right::ALL), "/test.Svc/Unlisted");
        let status = status.expect("a method with no entry must be refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("'/test.Svc/Unlisted' has no entry in this server's rights table"));
        assert_eq!((reached, denied), (0, 1));
    }

    #[test]
    fn a_peer_lacking_the_right_is_refused_naming_right_and_subject() {
        let (status, reached, denied) = call_as(peer("image-builder", &[Right::Read]), "/test.Svc/Write");
        let status = status.expect("a peer without the right must be refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "certificate 'image-builder' lacks the 'write' right");
        assert_eq!((reached, denied), (0, 1));

        let (status, ..) = call_as(Peer::default(), "/test.Svc/Read");
        assert_eq!(status.unwrap().message(), "the client certificate lacks the 'read' right");
    }

    #[test]
    fn a_peer_with_the_right_reaches_the_service_uncounted() {
        let (status, reached, denied) = call_as(peer("image-builder", &[Right::Read, Right::Write]), "/test.Svc/Write");
        assert!(status.is_none(), "refused: {status:?}");
        assert_eq!((reached, denied), (1, 0));
    }

    #[test]
    fn without_tls_connection_information_a_request_has_no_rights() {
        let request = http::Request::builder().uri("/test.Svc/Read").body(()).unwrap();
        assert_eq!(peer_of_extensions(request.extensions()), Peer::default());
    }
}
