//! The `/metrics` page: a daemon's counters and gauges, kept in a
//! prometheus-client [`Registry`], in the OpenMetrics text format that
//! Prometheus scrapes.

use prometheus_client::encoding::text::encode;
pub use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

/// The media type of the `/metrics` page.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A registry of a daemon's `counters` (name, help, counter; each is
/// exposed as `NAME_total`) and its uptime gauge `uptime` (name, gauge).
pub fn registry_of(counters: &[(&str, &str, &Counter)], uptime: (&str, &Gauge)) -> Registry {
    let mut registry = Registry::default();
    for (name, help, counter) in counters {
        registry.register(*name, *help, (*counter).clone());
    }
    registry.register(uptime.0, "Seconds since start", uptime.1.clone());
    registry
}

/// The text of a `/metrics` page: every metric of `registry`, then `# EOF`.
/// A counter registered as `x` is exposed as `x_total`.
pub fn metrics_text(registry: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("encoding into a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_are_written_with_help_and_type() {
        let mut registry = Registry::default();
        let served = Counter::<u64>::default();
        let up = Gauge::<i64>::default();
        registry.register("fake_served", "Pages served", served.clone());
        registry.register("fake_uptime_seconds", "Seconds since start", up.clone());
        served.inc_by(3);
        up.set(12);
        let text = metrics_text(&registry);
        assert_eq!(
            text,
            "# HELP fake_served Pages served.\n# TYPE fake_served counter\nfake_served_total 3\n\
             # HELP fake_uptime_seconds Seconds since start.\n# TYPE fake_uptime_seconds gauge\nfake_uptime_seconds 12\n\
             # EOF\n"
        );
    }
}
