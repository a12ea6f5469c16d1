//! The unpacker's counters, and their Prometheus text for `/metrics` (served
//! with `/status` on a plain-HTTP port of its own, for monitoring without a
//! client certificate: see `core::status`).

use std::time::Instant;

use fleet_daemon::{Counter, Gauge, Registry, metrics_text};

/// Counters the unpacker keeps, each registered for `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    registry: Registry,
    uptime: Gauge,
    pub unpacks: Counter,
    pub unpack_failures: Counter,
    pub scans: Counter,
    pub chunks_fetched: Counter,
    pub bytes_fetched: Counter,
    pub chunks_written: Counter,
    pub bytes_written: Counter,
    pub chunks_zeroed: Counter,
    pub captures: Counter,
    pub capture_mismatches: Counter,
    pub requests_denied: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let c = Counter::default;
        let mut m = Metrics {
            started: Instant::now(),
            registry: Registry::default(),
            uptime: Gauge::default(),
            unpacks: c(),
            unpack_failures: c(),
            scans: c(),
            chunks_fetched: c(),
            bytes_fetched: c(),
            chunks_written: c(),
            bytes_written: c(),
            chunks_zeroed: c(),
            captures: c(),
            capture_mismatches: c(),
            requests_denied: c(),
        };
        // Each counter appears as NAME_total.
        let counters: &[(&str, &str, &Counter)] = &[
            ("unpacker_unpacks", "Unpacks finished", &m.unpacks),
            ("unpacker_unpack_failures", "Unpacks that failed", &m.unpack_failures),
            ("unpacker_scans", "Device scans finished", &m.scans),
            ("unpacker_chunks_fetched", "Verified chunks received from the imageserver", &m.chunks_fetched),
            ("unpacker_bytes_fetched", "Compressed bytes received from the imageserver", &m.bytes_fetched),
            ("unpacker_chunks_written", "Chunks written to devices", &m.chunks_written),
            ("unpacker_bytes_written", "Chunk bytes written to devices", &m.bytes_written),
            ("unpacker_chunks_zeroed", "Chunks zeroed on devices", &m.chunks_zeroed),
            ("unpacker_captures", "Devices read back and verified for capture", &m.captures),
            ("unpacker_capture_mismatches", "Read-backs that found wrong bytes", &m.capture_mismatches),
            ("unpacker_requests_denied", "Requests refused for lack of a right", &m.requests_denied),
        ];
        m.registry = fleet_daemon::registry_of(counters, ("unpacker_uptime_seconds", &m.uptime));
        m
    }
}

impl Metrics {
    pub fn add(counter: &Counter, n: u64) {
        counter.inc_by(n);
    }

    /// The `/metrics` page.
    pub fn render(&self) -> String {
        self.uptime.set(i64::try_from(self.started.elapsed().as_secs()).unwrap_or(i64::MAX));
        metrics_text(&self.registry)
    }
}
