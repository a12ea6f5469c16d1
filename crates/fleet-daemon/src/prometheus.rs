//! Prometheus text exposition: counters and gauges, each with its HELP and
//! TYPE lines, in the order they are added.

use std::fmt::Write as _;

/// Builds the text of a `/metrics` page.
#[derive(Debug, Default)]
pub struct Prometheus {
    out: String,
}

impl Prometheus {
    pub fn new() -> Self {
        Prometheus::default()
    }

    /// A counter: a total that only grows (by convention named `…_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.family(name, help, "counter");
        let _ = writeln!(self.out, "{name} {value}");
        self
    }

    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, help, "gauge");
        // Rust prints whole floats without a fraction ("12"), as Prometheus
        // does; only the infinities are spelt differently.
        let _ = if value == f64::INFINITY {
            writeln!(self.out, "{name} +Inf")
        } else if value == f64::NEG_INFINITY {
            writeln!(self.out, "{name} -Inf")
        } else {
            writeln!(self.out, "{name} {value}")
        };
        self
    }

    /// The page's text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }

    fn family(&mut self, name: &str, help: &str, kind: &str) {
        debug_assert!(valid_name(name), "'{name}' is not a Prometheus metric name");
        // In HELP text a backslash and a line break must be escaped.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_have_help_and_type_lines() {
        let text = Prometheus::new()
            .counter("x_chunks_total", "Chunks sent", 42)
            .gauge("x_uptime_seconds", "Seconds since start", 12.0)
            .finish();
        assert_eq!(
            text,
            "# HELP x_chunks_total Chunks sent\n# TYPE x_chunks_total counter\nx_chunks_total 42\n\
             # HELP x_uptime_seconds Seconds since start\n# TYPE x_uptime_seconds gauge\nx_uptime_seconds 12\n"
        );
    }

    #[test]
    fn gauge_values_are_spelt_as_prometheus_reads_them() {
        let mut p = Prometheus::new();
        p.gauge("a", "h", 0.5).gauge("b", "h", -3.0).gauge("c", "h", f64::INFINITY);
        p.gauge("d", "h", f64::NEG_INFINITY).gauge("e", "h", f64::NAN);
        let values: Vec<_> = p.finish().lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect();
        assert_eq!(values, ["a 0.5", "b -3", "c +Inf", "d -Inf", "e NaN"]);
    }

    #[test]
    fn help_text_is_escaped() {
        let text = Prometheus::new().counter("a_total", "one\\two\nthree", 0).finish();
        assert!(text.starts_with("# HELP a_total one\\\\two\\nthree\n# TYPE a_total counter\n"), "{text}");
    }

    #[test]
    fn metric_names_are_checked() {
        assert!(valid_name("imageserver_chunks_served_total"));
        assert!(valid_name("_a:b9"));
        assert!(!valid_name(""));
        assert!(!valid_name("9a"));
        assert!(!valid_name("a-b"));
    }
}
