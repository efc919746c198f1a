//! `husk sandbox-supervisor` (hidden, internal): the long-lived process of one container,
//! started by `create`, which it takes over from through the container's state directory; see
//! `crate::supervisor`.

use std::path::PathBuf;

use super::CommandError;
use crate::cli::Cli;
use crate::id::ContainerId;
use crate::supervisor;

/// Arguments of the supervisor.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the container's terminal master goes.
    #[arg(long, value_name = "SOCK")]
    pub console_socket: Option<PathBuf>,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Runs the supervisor; its status is the container process's.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    Ok(supervisor::run(
        &cli.options(),
        &id,
        args.console_socket.as_deref(),
    ))
}
