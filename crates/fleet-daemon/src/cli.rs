//! The command-line piece the daemons share: the `--metrics-listen` value.

use std::{fmt, net::SocketAddr};

/// Parse a `--metrics-listen` value: `off` (or nothing) turns the listener
/// off, anything else must be a socket address such as `127.0.0.1:6972`.
///
/// For clap, declare the field with the full path of `Option`, so that clap
/// hands the whole value to this parser instead of treating the flag as
/// optional:
///
/// ```
/// # use clap::Parser;
/// #[derive(Parser)]
/// struct Args {
///     #[arg(long, default_value = "127.0.0.1:6972", value_parser = fleet_daemon::parse_metrics_listen)]
///     metrics_listen: std::option::Option<std::net::SocketAddr>,
/// }
/// let args = Args::parse_from(["daemon", "--metrics-listen", "off"]);
/// assert_eq!(args.metrics_listen, None);
/// ```
pub fn parse_metrics_listen(value: &str) -> Result<Option<SocketAddr>, BadMetricsListen> {
    match value {
        "off" | "" => Ok(None),
        s => s.parse().map(Some).map_err(|e| BadMetricsListen { value: s.to_owned(), reason: e }),
    }
}

/// A `--metrics-listen` value that is neither `off` nor a socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMetricsListen {
    value: String,
    reason: std::net::AddrParseError,
}

impl fmt::Display for BadMetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is neither \"off\" nor an IP:PORT address ({})", self.value, self.reason)
    }
}

impl std::error::Error for BadMetricsListen {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_and_empty_mean_no_listener() {
        assert_eq!(parse_metrics_listen("off"), Ok(None));
        assert_eq!(parse_metrics_listen(""), Ok(None));
    }

    #[test]
    fn addresses_are_parsed() {
        assert_eq!(parse_metrics_listen("127.0.0.1:6972"), Ok(Some("127.0.0.1:6972".parse().unwrap())));
        assert_eq!(parse_metrics_listen("[::1]:0"), Ok(Some("[::1]:0".parse().unwrap())));
    }

    #[test]
    fn a_bad_value_is_named_in_the_error() {
        for bad in ["localhost:6972", "127.0.0.1", "OFF", "none", "1.2.3.4:99999"] {
            let e = parse_metrics_listen(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("'{bad}' is neither \"off\" nor an IP:PORT address (")), "{e}");
        }
    }

    #[test]
    fn works_as_a_clap_value_parser() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Args {
            #[arg(long, default_value = "127.0.0.1:6972", value_parser = parse_metrics_listen)]
            metrics_listen: std::option::Option<SocketAddr>,
        }
        let parse = |args: &[&str]| Args::try_parse_from([&["daemon"], args].concat());
        assert_eq!(parse(&[]).unwrap().metrics_listen, Some("127.0.0.1:6972".parse().unwrap()));
        assert_eq!(parse(&["--metrics-listen", "off"]).unwrap().metrics_listen, None);
        assert_eq!(
            parse(&["--metrics-listen", "0.0.0.0:1"]).unwrap().metrics_listen,
            Some("0.0.0.0:1".parse().unwrap())
        );
        let e = parse(&["--metrics-listen", "nowhere"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("'nowhere' is neither \"off\" nor an IP:PORT address"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }
}
