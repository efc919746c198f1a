//! `husk run --bundle DIR [-d] ID`: `create` + `start`; without `--detach`, waits for the
//! container's process, deletes the container (unless `--keep`) and exits with the process's
//! status (128 + N when signal N ended it), as `runc run`.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use super::create::check_preserve_fds;
use super::CommandError;
use crate::cli::Cli;
use crate::container::{self, CreateRequest, Locked};
use crate::exit;
use crate::id::ContainerId;

/// Arguments of `husk run`.
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
    /// Return once the container is running instead of waiting for it.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Do not delete the container after its process exits.
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra file descriptors to pass into the container: only 0 is supported.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Runs `husk run`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    check_preserve_fds(args.preserve_fds)?;
    let created = container::create(
        cli,
        &CreateRequest {
            id: &id,
            bundle: &args.bundle,
            console_socket: args.console_socket.as_deref(),
            pid_file: args.pid_file.as_deref(),
            foreground: !args.detach,
        },
    )?;
    let mut supervisor = created.supervisor;
    let record = created.lock.load()?;
    let state = record.current_state();
    let mut locked = Locked {
        lock: created.lock,
        record,
        state,
    };
    if let Err(err) = super::start::start(&mut locked) {
        let _ = super::delete::delete(cli, locked, true);
        let _ = supervisor.wait();
        return Err(err);
    }
    drop(locked);
    if args.detach {
        return Ok(exit::SUCCESS);
    }
    let status = supervisor
        .wait()
        .map_err(|e| CommandError::Output(std::io::Error::other(e)))?;
    if !args.keep {
        match Locked::acquire(cli, &id) {
            Ok(container) => {
                if let Err(err) = super::delete::delete(cli, container, true) {
                    tracing::warn!("cannot delete {id} after it exited: {err}");
                }
            }
            Err(err) => tracing::warn!("cannot delete {id} after it exited: {err}"),
        }
    }
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => signal.saturating_add(128),
        (None, None) => i32::from(exit::FAILURE),
    };
    Ok(u8::try_from(code & 0xff).unwrap_or(exit::FAILURE))
}
