//! `husk`: husk's OCI runtime: a runc-compatible command line that runs each container in its own microVM.

use std::process::ExitCode;

use clap::Parser;
use husk_runtime::cli::Cli;
use husk_runtime::{commands, exit, logging};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Help and version go to stdout with status 0; usage errors to stderr with USAGE.
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(err) = logging::init(cli.log_path().as_deref(), cli.log_format, cli.debug) {
        eprintln!("husk: {err}");
        return ExitCode::from(exit::FAILURE);
    }
    tracing::debug!(command = ?cli.command, root = %cli.root.display(), "husk starting");
    match commands::run(&cli) {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            // Every error's message already includes its cause, so the chain is not printed.
            if cli.log_path().is_some() {
                // Engines read the reason from the log file; users read standard error.
                tracing::error!("{err}");
            }
            eprintln!("husk: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
