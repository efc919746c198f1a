//! `husk kill ID [SIGNAL] [--all]`: sends a signal to the container's process (or, with `--all`,
//! to every process of the container), as `runc kill`.

use super::CommandError;
use crate::cli::Cli;
use crate::container::Locked;
use crate::id::ContainerId;
use crate::lifecycle::Operation;
use crate::{exit, signal};

/// Arguments of `husk kill`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Send the signal to every process of the container.
    #[arg(long, short = 'a')]
    pub all: bool,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The signal: a number, or a name with or without SIG (default SIGTERM).
    #[arg(value_name = "SIGNAL", default_value = "SIGTERM")]
    pub signal: String,
}

/// Runs `husk kill`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let number = signal::parse(&args.signal)?;
    let container = Locked::acquire(&cli.options(), &id)?;
    container.check(Operation::Kill)?;
    let (rt, client) = container.agent()?;
    let signal = u32::try_from(number).unwrap_or(signal::DEFAULT.unsigned_abs());
    rt.block_on(client.signal_process(id.as_str(), "", signal, args.all))
        .map_err(husk_sandbox::guest::GuestError::from)?;
    Ok(exit::SUCCESS)
}
