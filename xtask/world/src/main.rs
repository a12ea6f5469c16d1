//! `xtask-world`: the commands of `cargo xtask` that stand up the local
//! world (crates/local-world) as the stand-in for AWS, or need
//! the tools' CLI definitions: demo, world, bench, soak, dist, package. `cargo xtask`
//! hands these to this binary, so that its light commands (pki, mutants)
//! build without the AWS SDK.
//!
//! Commands shell out to the workspace's own binaries, exactly as a user
//! would run them; nothing here reaches into their internals.

mod bench;
mod bench_datapath;
mod bench_direct;
mod bench_publisher;
mod bench_unpacker;
mod demo;
mod dist;
mod package;
mod soak;
mod util;
mod world;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("package") => package::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("world") => world::run(&args[1..]),
        other => {
            eprintln!("xtask-world: unknown command {other:?}; run `cargo xtask help`");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
