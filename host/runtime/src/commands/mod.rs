//! One module per verb. Each has an `Args` (its part of the command line) and a `run` that
//! returns the exit status or a [`CommandError`].

pub mod check;
pub mod features;
pub mod list;
pub mod spec;
pub mod state;

use std::io::{self, Write};

use crate::bundle::BundleError;
use crate::cli::{Cli, Command};
use crate::config::ConfigError;
use crate::exit;
use crate::id::IdError;
use crate::sizing::SizingError;
use crate::store::StoreError;

/// Why a verb failed; each cause has its own exit status ([`CommandError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// Writing the verb's output failed (for example a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl CommandError {
    /// The process exit status for this error (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Id(_) => exit::USAGE,
            CommandError::Config(_) => exit::CONFIG,
            CommandError::Store(err) => err.exit_code(),
            CommandError::Bundle(_) | CommandError::Sizing(_) => exit::BUNDLE,
            CommandError::Spec(err) => err.exit_code(),
            CommandError::Output(_) => exit::FAILURE,
        }
    }
}

/// Runs the verb named on the command line.
pub fn run(cli: &Cli) -> Result<u8, CommandError> {
    match &cli.command {
        Command::Check(args) => check::run(cli, args),
        Command::Features(args) => features::run(args),
        Command::List(args) => list::run(cli, args),
        Command::Spec(args) => spec::run(args),
        Command::State(args) => state::run(cli, args),
    }
}

/// Writes `text` to standard output, reporting failures (a closed pipe) as errors.
pub(crate) fn print(text: &str) -> Result<(), CommandError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CommandError::Output)
}
