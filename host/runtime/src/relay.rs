//! Relaying a container process's stdio between host file descriptors and the agent's streams
//! (`ReadStdout`/`ReadStderr`/`WriteStdin`/`CloseStdin`), for the supervisor and `exec`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use husk_agent_protocol::{AgentClient, ClientError, MAX_IO_CHUNK};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::console::{self, ConsoleError};

/// Size of one read from the agent or from the host side.
const CHUNK: usize = 64 * 1024;
/// How long the process's output may keep coming after it ended (output of its children).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a terminal's size is checked for changes.
const RESIZE_POLL: Duration = Duration::from_millis(500);

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
pub fn attach(client: &AgentClient, container: &str, exec_id: &str, stdio: HostStdio) -> Attached {
    let task_of = |client: &AgentClient| (client.clone(), container.to_owned(), exec_id.to_owned());
    match stdio {
        HostStdio::Inherited => {
            let (c, i, e) = task_of(client);
            let stdout = tokio::spawn(async move {
                log_end(
                    "stdout",
                    copy_output(&c, &i, &e, Output::Stdout, tokio::io::stdout()).await,
                );
            });
            let (c, i, e) = task_of(client);
            let stderr = tokio::spawn(async move {
                log_end(
                    "stderr",
                    copy_output(&c, &i, &e, Output::Stderr, tokio::io::stderr()).await,
                );
            });
            let (c, i, e) = task_of(client);
            let input = tokio::spawn(async move {
                log_end("stdin", copy_input(&c, &i, &e, tokio::io::stdin()).await);
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
            let (c, i, e) = task_of(client);
            let watched = output.try_clone().ok();
            let resize = tokio::spawn(follow_window_size(c, i, e, watched));
            let (c, i, e) = task_of(client);
            let out = tokio::spawn(async move {
                let out = async_file(output);
                log_end(
                    "terminal output",
                    copy_output(&c, &i, &e, Output::Stdout, out).await,
                );
            });
            let (c, i, e) = task_of(client);
            let input = tokio::spawn(async move {
                log_end(
                    "terminal input",
                    copy_input(&c, &i, &e, async_file(input)).await,
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
            if tokio::time::timeout(DRAIN_TIMEOUT, outputs).await.is_err() {
                tracing::warn!("output still open {DRAIN_TIMEOUT:?} after the process ended");
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

/// Sends the terminal's size to the guest now and whenever it changes.
async fn follow_window_size(
    client: AgentClient,
    container: String,
    exec_id: String,
    tty: Option<OwnedFd>,
) {
    let Some(tty) = tty else {
        return;
    };
    let mut last = None;
    loop {
        let size = window_size(tty.as_fd());
        if let Some((rows, cols)) = size.filter(|_| size != last) {
            let resized = client
                .tty_win_resize(&container, &exec_id, u32::from(rows), u32::from(cols))
                .await;
            log_end("resize", resized);
            last = size;
        }
        tokio::time::sleep(RESIZE_POLL).await;
    }
}

/// Which of the process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Copies one output stream of process (`container`, `exec_id`) to `out` until end of file.
/// When `out` fails (a closed pipe), the rest is read and discarded, so the process never blocks
/// on a full pipe in the guest. Returns the agent's error, if any.
pub async fn copy_output<W: AsyncWrite + Unpin>(
    client: &AgentClient,
    container: &str,
    exec_id: &str,
    which: Output,
    mut out: W,
) -> Result<(), ClientError> {
    let mut writable = true;
    loop {
        let chunk = match which {
            Output::Stdout => client.read_stdout(container, exec_id, CHUNK).await?,
            Output::Stderr => client.read_stderr(container, exec_id, CHUNK).await?,
        };
        let Some(data) = chunk else {
            return Ok(());
        };
        if writable {
            let written = async {
                out.write_all(&data).await?;
                out.flush().await
            }
            .await;
            if let Err(err) = written {
                tracing::debug!("{which:?} of {container} {exec_id}: {err}; discarding the rest");
                writable = false;
            }
        }
    }
}

/// Copies `input` to the process's stdin until end of file, then closes its stdin. A read error
/// counts as end of file.
pub async fn copy_input<R: AsyncRead + Unpin>(
    client: &AgentClient,
    container: &str,
    exec_id: &str,
    mut input: R,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; CHUNK.min(MAX_IO_CHUNK)];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(n) => n,
            Err(err) => {
                tracing::debug!("stdin of {container} {exec_id}: {err}");
                0
            }
        };
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            return client.close_stdin(container, exec_id).await;
        };
        client.write_all_stdin(container, exec_id, data).await?;
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
