//! `husk run --bundle DIR [-d] ID`: `create` + `start`; without `--detach`, waits for the
//! container's process, deletes the container (unless `--keep`) and exits with the process's
//! status (128 + N when signal N ended it), as `runc run`. In the foreground, the signals that
//! stop a process (see [`signal::FORWARDED`]) are passed on to the container's process, as runc
//! does; the container's init, as any PID 1, only receives those it handles.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};

use super::create::check_preserve_fds;
use super::CommandError;
use crate::cli::Cli;
use crate::container::{self, CreateRequest, Locked};
use crate::exit;
use crate::id::ContainerId;
use crate::signal;
use husk_sandbox::guest;

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
    // In the foreground the forwarded signals are caught before anything exists: one that came
    // between create and the wait would otherwise end `husk run` and leave the VM running. It
    // is passed on once the container runs.
    let forwarding = if args.detach {
        None
    } else {
        Some(Forwarding::new().map_err(CommandError::Output)?)
    };
    let created = container::create(
        &cli.options(),
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
    let vsock = locked.vsock();
    drop(locked);
    let Some(forwarding) = forwarding else {
        return Ok(exit::SUCCESS);
    };
    let status = forwarding
        .wait(&id, &vsock, supervisor)
        .map_err(|e| CommandError::Output(std::io::Error::other(e)))?;
    if !args.keep {
        match Locked::acquire(&cli.options(), &id) {
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

/// The foreground's signal forwarding: the runtime its signal streams belong to, and the
/// streams, registered from the start of `husk run`.
struct Forwarding {
    rt: tokio::runtime::Runtime,
    signals: signal::Forwarded,
}

impl Forwarding {
    fn new() -> std::io::Result<Forwarding> {
        let rt = guest::runtime().map_err(std::io::Error::other)?;
        let signals = rt.block_on(async { signal::Forwarded::new() })?;
        Ok(Forwarding { rt, signals })
    }

    /// Waits for the supervisor (the container's process, as seen on the host), passing the
    /// [`signal::FORWARDED`] signals this process receives (also those received before) on to
    /// the container's process.
    fn wait(
        self,
        id: &ContainerId,
        vsock: &Path,
        supervisor: Child,
    ) -> std::io::Result<ExitStatus> {
        let Forwarding { rt, mut signals } = self;
        let status = rt.block_on(async {
            let mut supervisor = supervisor;
            let waited = tokio::task::spawn_blocking(move || supervisor.wait());
            tokio::pin!(waited);
            let mut client = None;
            loop {
                tokio::select! {
                    status = &mut waited => break status.map_err(std::io::Error::other)?,
                    number = signals.recv() => {
                        tracing::debug!(signal = number, "{id}: passing a signal on to the container");
                        if client.is_none() {
                            match guest::connect(vsock, guest::CONNECT_TIMEOUT).await {
                                Ok(c) => client = Some(c),
                                Err(err) => tracing::warn!("{id}: cannot pass signal {number} on: {err}"),
                            }
                        }
                        if let Some(c) = &client {
                            if let Err(err) = c.signal_process(id.as_str(), "", number, false).await {
                                tracing::warn!("{id}: cannot pass signal {number} on: {err}");
                            }
                        }
                    }
                }
            }
        });
        rt.shutdown_background();
        status
    }
}
