//! The plumbing every daemon of the fleet repeats, written once: the run
//! loop that stops on SIGINT or SIGTERM ([`run_until_signal`]), the
//! plain-HTTP `/status` and `/metrics` listener ([`serve_metrics`]), the
//! `/metrics` text of a prometheus-client registry ([`metrics_text`]) and the `--metrics-listen` flag
//! ([`parse_metrics_listen`]). Log set-up is not here: every fleet binary,
//! daemon or client, shares `fleet_cli::init_tracing`.
//!
//! This crate knows nothing of images, devices, AWS or gRPC services: a
//! daemon hands it a way to stop, a status to serialise and its counters,
//! and keeps everything about what it serves to itself.

#![forbid(unsafe_code)]

mod cli;
mod http;
mod metrics;
mod run;

pub use cli::{BadMetricsListen, parse_metrics_listen};
pub use http::{Monitored, serve_metrics};
pub use metrics::{Counter, Gauge, METRICS_CONTENT_TYPE, Registry, metrics_text, registry_of};
pub use run::{Daemon, Serving, run_until_signal};
