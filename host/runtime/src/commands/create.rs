//! `husk create --bundle DIR [--pid-file F] [--console-socket SOCK] ID`: creates the container
//! in its own microVM (status `created`); its process waits for `start`.

use std::path::PathBuf;

use super::CommandError;
use crate::cli::Cli;
use crate::container::{self, CreateRequest};
use crate::exit;
use crate::id::ContainerId;

/// Arguments of `husk create` (runc's, including the ones podman passes).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bundle directory (config.json and usually the rootfs).
    #[arg(long, short = 'b', value_name = "DIR", default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket that receives the master of the container's terminal (process.terminal).
    #[arg(long, value_name = "SOCK")]
    pub console_socket: Option<PathBuf>,
    /// Write the PID of the container's process (as seen on the host) to FILE.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility (the container's root is set up in the guest).
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (there is no session keyring to create on the host).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra file descriptors to pass into the container: only 0 (none) is supported, as they
    /// cannot cross into the microVM.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Refuses what husk cannot do with file descriptors.
pub(crate) fn check_preserve_fds(n: u32) -> Result<(), CommandError> {
    if n == 0 {
        Ok(())
    } else {
        Err(CommandError::Unsupported(format!(
            "--preserve-fds {n}: file descriptors cannot be passed into a microVM"
        )))
    }
}

/// Runs `husk create`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    check_preserve_fds(args.preserve_fds)?;
    let created = container::create(
        &cli.options(),
        &CreateRequest {
            id: &id,
            bundle: &args.bundle,
            console_socket: args.console_socket.as_deref(),
            pid_file: args.pid_file.as_deref(),
            foreground: false,
        },
    )?;
    tracing::info!(pid = created.supervisor.id(), "created container {id}");
    Ok(exit::SUCCESS)
}
