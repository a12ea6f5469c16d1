//! The unpacker's counters, and their Prometheus text for `/metrics` (served
//! with `/status` on a plain-HTTP port of its own, for monitoring without a
//! client certificate: see `core::status`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

/// Counters the unpacker keeps.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    pub unpacks: AtomicU64,
    pub unpack_failures: AtomicU64,
    pub scans: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub chunks_zeroed: AtomicU64,
    pub captures: AtomicU64,
    pub capture_mismatches: AtomicU64,
    pub requests_denied: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Metrics {
            started: Instant::now(),
            unpacks: z(),
            unpack_failures: z(),
            scans: z(),
            chunks_fetched: z(),
            bytes_fetched: z(),
            chunks_written: z(),
            bytes_written: z(),
            chunks_zeroed: z(),
            captures: z(),
            capture_mismatches: z(),
            requests_denied: z(),
        }
    }
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters in Prometheus text format.
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &AtomicU64); 11] = [
            ("unpacker_unpacks_total", "Unpacks finished", &self.unpacks),
            ("unpacker_unpack_failures_total", "Unpacks that failed", &self.unpack_failures),
            ("unpacker_scans_total", "Device scans finished", &self.scans),
            ("unpacker_chunks_fetched_total", "Verified chunks received from the imageserver", &self.chunks_fetched),
            ("unpacker_bytes_fetched_total", "Compressed bytes received from the imageserver", &self.bytes_fetched),
            ("unpacker_chunks_written_total", "Chunks written to devices", &self.chunks_written),
            ("unpacker_bytes_written_total", "Chunk bytes written to devices", &self.bytes_written),
            ("unpacker_chunks_zeroed_total", "Chunks zeroed on devices", &self.chunks_zeroed),
            ("unpacker_captures_total", "Devices read back and verified for capture", &self.captures),
            ("unpacker_capture_mismatches_total", "Read-backs that found wrong bytes", &self.capture_mismatches),
            ("unpacker_requests_denied_total", "Requests refused for lack of a right", &self.requests_denied),
        ];
        let mut p = fleet_daemon::Prometheus::new();
        for (name, help, v) in rows {
            p.counter(name, help, v.load(Ordering::Relaxed));
        }
        p.gauge("unpacker_uptime_seconds", "Seconds since start", self.started.elapsed().as_secs() as f64);
        p.finish()
    }
}
