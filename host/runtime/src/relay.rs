//! Relaying a container process's stdio between host file descriptors and the agent's streams
//! (`ReadStdout`/`ReadStderr`/`WriteStdin`/`CloseStdin`), for the supervisor and `exec`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use husk_agent_protocol::ClientError;
use husk_sandbox::pump::{self, Output, ProcessId, OUTPUT_DRAIN};
use husk_sandbox::SharedGuest;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::task::JoinHandle;

use crate::console::{self, ConsoleError};

/// Errors setting up a process's stdio on the host.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A terminal could not be prepared.
    #[error("cannot prepare the terminal: {0}")]
    Terminal(#[source] io::Error),
}

/// Where a process's stdio goes on the host.
#[derive(Debug)]
pub enum HostStdio {
    /// Pipes: this process's own stdin, stdout and stderr.
    Inherited,
    /// A terminal: the slave side of a host pty whose master went to a console socket, or this
    /// process's own stdin/stdout.
    Terminal {
        input: OwnedFd,
        output: OwnedFd,
        /// This process's terminal settings, restored at the end.
        restore: Option<(OwnedFd, Termios)>,
    },
}

/// A terminal for a process: with `console_socket`, a new pty of `size` whose master is sent
/// there; without, this process's own stdin/stdout (put in raw mode when stdin is a terminal).
pub fn terminal(
    console_socket: Option<&Path>,
    size: Option<(u16, u16)>,
) -> Result<HostStdio, RelayError> {
    let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(RelayError::Terminal);
    match console_socket {
        Some(socket) => {
            let pty = console::open_pty(size)?;
            // The guest's terminal echoes and edits lines; the host's must pass bytes through.
            make_raw(pty.slave.as_fd()).map_err(|e| RelayError::Terminal(e.into()))?;
            console::send_master(socket, pty.master.as_fd())?;
            drop(pty.master);
            Ok(HostStdio::Terminal {
                input: dup(pty.slave.as_fd())?,
                output: pty.slave,
                restore: None,
            })
        }
        None => {
            let stdin = io::stdin();
            let restore = make_raw(stdin.as_fd())
                .ok()
                .and_then(|saved| Some((stdin.as_fd().try_clone_to_owned().ok()?, saved)));
            Ok(HostStdio::Terminal {
                input: dup(stdin.as_fd())?,
                output: dup(io::stdout().as_fd())?,
                restore,
            })
        }
    }
}

/// The relay tasks of one process.
pub struct Attached {
    outputs: Vec<JoinHandle<()>>,
    input: JoinHandle<()>,
    resize: Option<JoinHandle<()>>,
    restore: Option<(OwnedFd, Termios)>,
}

/// Starts relaying the stdio of process (`container`, `exec_id`) (tokio tasks).
pub fn attach(guest: &SharedGuest, container: &str, exec_id: &str, stdio: HostStdio) -> Attached {
    let process = ProcessId::new(container, exec_id);
    let task_of = || (guest.clone(), process.clone());
    match stdio {
        HostStdio::Inherited => {
            let (g, p) = task_of();
            let stdout = tokio::spawn(async move {
                log_end(
                    "stdout",
                    pump::copy_output(g.as_ref(), &p, Output::Stdout, tokio::io::stdout()).await,
                );
            });
            let (g, p) = task_of();
            let stderr = tokio::spawn(async move {
                log_end(
                    "stderr",
                    pump::copy_output(g.as_ref(), &p, Output::Stderr, tokio::io::stderr()).await,
                );
            });
            let (g, p) = task_of();
            let input = tokio::spawn(async move {
                log_end(
                    "stdin",
                    pump::copy_input(g.as_ref(), &p, tokio::io::stdin()).await,
                );
            });
            Attached {
                outputs: vec![stdout, stderr],
                input,
                resize: None,
                restore: None,
            }
        }
        HostStdio::Terminal {
            input,
            output,
            restore,
        } => {
            let (g, p) = task_of();
            let watched = output.try_clone().ok();
            let resize = tokio::spawn(async move {
                if let Some(tty) = watched {
                    pump::follow_window_size(g.as_ref(), &p, || window_size(tty.as_fd())).await;
                }
            });
            let (g, p) = task_of();
            let out = tokio::spawn(async move {
                let out = async_file(output);
                log_end(
                    "terminal output",
                    pump::copy_output(g.as_ref(), &p, Output::Stdout, out).await,
                );
            });
            let (g, p) = task_of();
            let input = tokio::spawn(async move {
                log_end(
                    "terminal input",
                    pump::copy_input(g.as_ref(), &p, async_file(input)).await,
                );
            });
            Attached {
                outputs: vec![out],
                input,
                resize: Some(resize),
                restore,
            }
        }
    }
}

fn log_end(what: &str, result: Result<(), ClientError>) {
    if let Err(err) = result {
        tracing::debug!("{what}: {err}");
    }
}

impl Attached {
    /// Ends the relay: with `drain`, waits (a bounded time) for the outputs to reach end of file
    /// first; restores this process's terminal.
    pub async fn finish(self, drain: bool) {
        if drain {
            let outputs = async {
                for task in self.outputs {
                    let _ = task.await;
                }
            };
            if tokio::time::timeout(OUTPUT_DRAIN, outputs).await.is_err() {
                tracing::warn!("output still open {OUTPUT_DRAIN:?} after the process ended");
            }
        }
        self.input.abort();
        if let Some(task) = self.resize {
            task.abort();
        }
        if let Some((fd, saved)) = self.restore {
            let _ = termios::tcsetattr(&fd, SetArg::TCSANOW, &saved);
        }
    }
}

/// A host file descriptor as an async file (reads and writes on tokio's blocking threads, which
/// suits pipes, terminals and files alike).
pub fn async_file(fd: OwnedFd) -> tokio::fs::File {
    tokio::fs::File::from_std(std::fs::File::from(fd))
}

/// Puts the terminal `fd` in raw mode (no echo, no line editing, no signal characters, no
/// output processing) and returns its previous settings: the guest's terminal does all that.
pub fn make_raw(fd: BorrowedFd<'_>) -> nix::Result<Termios> {
    let saved = termios::tcgetattr(fd)?;
    let mut raw = saved.clone();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
    Ok(saved)
}

/// The size of terminal `fd` as (rows, columns), when it has one.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, which lives on our stack;
    // the fd is borrowed and open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}
