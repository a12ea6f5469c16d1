//! The monitoring listener over real HTTP on loopback.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use fleet_daemon::{Monitored, Prometheus, serve_metrics};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Clone, Default)]
struct Fake {
    requests: Arc<AtomicU64>,
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
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        Prometheus::new().counter("fake_requests_total", "Metrics pages served", n).finish()
    }
}

/// One HTTP/1.1 request; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a header and a body");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
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
        let (line, body) = get(addr, "/metrics").await;
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(
            body,
            format!(
                "# HELP fake_requests_total Metrics pages served\n# TYPE fake_requests_total counter\nfake_requests_total {n}\n"
            )
        );
    }
    assert_eq!(fake.requests.load(Ordering::Relaxed), 2);

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
