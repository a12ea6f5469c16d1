//! The monitoring listener over real HTTP on loopback.

use std::{net::SocketAddr, sync::Arc};

use fleet_daemon::{Counter, Monitored, Registry, metrics_text, serve_metrics};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Clone)]
struct Fake {
    requests: Counter,
    registry: Arc<Registry>,
}

impl Default for Fake {
    fn default() -> Self {
        let requests = Counter::default();
        let mut registry = Registry::default();
        registry.register("fake_requests", "Metrics pages served", requests.clone());
        Fake { requests, registry: Arc::new(registry) }
    }
}

#[derive(serde::Serialize)]
struct Status {
    role: &'static str,
    busy: bool,
}

impl Monitored for Fake {
    type Status = Status;

    async fn status_page(&self) -> Status {
        tokio::task::yield_now().await;
        Status { role: "fake", busy: false }
    }

    fn metrics_page(&self) -> String {
        self.requests.inc();
        metrics_text(&self.registry)
    }
}

/// One HTTP/1.1 request; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let (line, _, body) = get_with_head(addr, path).await;
    (line, body)
}

/// One HTTP/1.1 request; returns the status line, the header and the body.
async fn get_with_head(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a header and a body");
    (head.lines().next().unwrap().to_owned(), head.to_lowercase(), body.to_owned())
}

#[tokio::test]
async fn status_and_metrics_are_served_on_the_bound_port() {
    let fake = Fake::default();
    let addr = serve_metrics("127.0.0.1:0".parse().unwrap(), fake.clone()).await.unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0, "the bound port, not the one asked for");

    let (line, body) = get(addr, "/status").await;
    assert_eq!(line, "HTTP/1.1 200 OK");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, serde_json::json!({"role": "fake", "busy": false}));

    for n in 1..=2 {
        let (line, head, body) = get_with_head(addr, "/metrics").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert!(head.contains("content-type: application/openmetrics-text; version=1.0.0"), "{head}");
        assert_eq!(
            body,
            format!(
                "# HELP fake_requests Metrics pages served.\n# TYPE fake_requests counter\nfake_requests_total {n}\n# EOF\n"
            )
        );
    }
    assert_eq!(fake.requests.get(), 2);

    let (line, _) = get(addr, "/nothing").await;
    assert_eq!(line, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn a_port_in_use_is_an_error_naming_it() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = serve_metrics(addr, Fake::default()).await.unwrap_err();
    assert!(format!("{err:#}").contains(&format!("binding the metrics port {addr}")), "{err:#}");
}
