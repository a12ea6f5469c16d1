//! `ami-publisher`: see `ami-publisher --help`.

use std::process::ExitCode;

use ami_publisher::cli::{self, Outcome, Refused};

fn main() -> ExitCode {
    let cli = match cli::parse_args(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    fleet_cli::init_tracing("warn", false);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(cli::run(cli)) {
        Ok(Outcome::AllSucceeded) => ExitCode::SUCCESS,
        Ok(Outcome::SomeFailed) => ExitCode::from(1),
        Err(e) if e.is::<Refused>() => {
            eprintln!("ami-publisher: {e:#}\nnothing was done.");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("ami-publisher: {e:#}");
            ExitCode::from(1)
        }
    }
}
