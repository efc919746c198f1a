//! Relays between the FIFOs or log URIs containerd gives a process (stdin, stdout, stderr) and
//! the agent's stream calls (`WriteStdin`/`CloseStdin`, `ReadStdout`, `ReadStderr`).
//!
//! containerd opens its end of each FIFO before `Create`/`Exec` (read ends non-blocking, the
//! stdin write end once a reader appears), so the shim opens its ends with blocking `open`s on
//! blocking threads. Output relays run until the agent reports end of file, which it does once
//! every writer of the process's stream is gone, so output is complete when they finish.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use husk_sandbox::pump::{self, Output, ProcessId};
use husk_sandbox::SharedGuest;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::logger::{open_log_file, BinaryLogger, LogError, LogUri, LoggedProcess, LoggerExit};

/// Where a process's stdio goes on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// containerd's stdin FIFO (empty: no stdin).
    pub stdin: String,
    /// containerd's stdout FIFO or log URI (empty: discarded).
    pub stdout: String,
    /// containerd's stderr FIFO (empty: discarded).
    pub stderr: String,
    /// The process has a terminal (stderr is merged into stdout by the pty).
    pub terminal: bool,
}

/// The relays of one process, just started.
pub struct Relays {
    /// stdout and stderr: they end at the agent's end of file.
    pub outputs: Vec<JoinHandle<()>>,
    /// Closes the stdin relay (and the process's stdin).
    pub stdin_close: Option<oneshot::Sender<()>>,
}

/// The process whose stdio is relayed.
#[derive(Debug, Clone, Copy)]
pub struct ProcessRef<'a> {
    pub container: &'a str,
    /// Empty for the container's init.
    pub exec: &'a str,
    /// containerd's namespace (for a logging program's environment).
    pub namespace: &'a str,
}

/// Where one output stream goes.
enum Sink {
    /// A FIFO or file path, opened by the relay.
    Path(PathBuf),
    /// Already open (a log file, a logging program's pipe).
    Open(File),
}

/// A process's stdio with its log program started or log file opened, before its relays run.
pub struct PreparedIo {
    container: String,
    exec: String,
    /// (stderr?, where the stream goes).
    outputs: Vec<(bool, Sink)>,
    /// A logging program, finished once every output relay ended.
    logger: Option<LoggerExit>,
    stdin: Option<PathBuf>,
}

impl PreparedIo {
    /// Prepares `process`'s stdio: a `binary://` stdout starts the logging program and waits
    /// until it is ready; a `file://` one opens the file (see [`crate::logger`]). Done before
    /// the process is created in the guest, so a failure leaves nothing to undo there.
    pub async fn prepare(process: ProcessRef<'_>, paths: &StdioPaths) -> Result<Self, LogError> {
        let mut outputs = Vec::new();
        let mut logger = None;
        match LogUri::parse(&paths.stdout)? {
            Some(LogUri::Binary { path, args }) => {
                // As containerd's runc shim: the logging program gets stdout and stderr both.
                let started = BinaryLogger::start(
                    &path,
                    &args,
                    LoggedProcess {
                        container_id: process.container,
                        namespace: process.namespace,
                    },
                )
                .await?;
                let (stdout, stderr, exit) = started.split();
                outputs.push((false, Sink::Open(stdout)));
                // With a terminal, stderr is merged into stdout: the program's fd 4 just ends.
                if !paths.terminal {
                    outputs.push((true, Sink::Open(stderr)));
                }
                logger = Some(exit);
            }
            Some(LogUri::File(path)) => {
                let file = tokio::task::spawn_blocking(move || open_log_file(&path))
                    .await
                    .map_err(|e| LogError::Pipe(std::io::Error::other(e)))??;
                if !paths.terminal {
                    let copy = file.try_clone().map_err(LogError::Pipe)?;
                    outputs.push((true, Sink::Open(copy)));
                }
                outputs.push((false, Sink::Open(file)));
            }
            None => {
                for (stderr, value) in [(false, &paths.stdout), (true, &paths.stderr)] {
                    if let Some(path) = fifo_path(value) {
                        outputs.push((stderr, Sink::Path(path)));
                    } else if !value.is_empty() {
                        warn!(uri = %value, "unsupported stdio URI; output is discarded");
                    }
                }
            }
        }
        Ok(PreparedIo {
            container: process.container.to_owned(),
            exec: process.exec.to_owned(),
            outputs,
            logger,
            stdin: fifo_path(&paths.stdin),
        })
    }

    /// Starts the relays, once the process exists in the guest.
    pub fn start(self, guest: &SharedGuest) -> Relays {
        let process = ProcessId::new(&self.container, &self.exec);
        let mut outputs: Vec<JoinHandle<()>> = self
            .outputs
            .into_iter()
            .map(|(stderr, sink)| {
                tokio::spawn(relay_output(guest.clone(), process.clone(), stderr, sink))
            })
            .collect();
        if let Some(logger) = self.logger {
            // One handle for the whole: the output is complete once the program has exited.
            let streams = std::mem::take(&mut outputs);
            outputs.push(tokio::spawn(async move {
                for stream in streams {
                    let _ = stream.await;
                }
                logger.finish().await;
            }));
        }
        let stdin_close = self.stdin.map(|path| {
            let (close_tx, close_rx) = oneshot::channel();
            tokio::spawn(relay_stdin(guest.clone(), process.clone(), path, close_rx));
            close_tx
        });
        Relays {
            outputs,
            stdin_close,
        }
    }
}

/// A FIFO path from what containerd passes: a plain path, or a `fifo://` URI. Log URIs are
/// [`LogUri`]s; other URIs yield `None`.
fn fifo_path(value: &str) -> Option<PathBuf> {
    if value.is_empty() {
        return None;
    }
    if let Some(path) = value.strip_prefix("fifo://") {
        return Some(PathBuf::from(path));
    }
    if value.contains("://") {
        return None;
    }
    Some(PathBuf::from(value))
}

fn open_output(path: &Path) -> std::io::Result<File> {
    if !std::fs::metadata(path)?.file_type().is_fifo() {
        return OpenOptions::new().append(true).create(true).open(path);
    }
    // Opened read-write first, which never blocks nor fails with ENXIO; then write-only, and the
    // read-write handle dropped, so that a write fails (EPIPE) rather than blocks forever once
    // containerd's reader is gone.
    let both = OpenOptions::new().read(true).write(true).open(path)?;
    let write_only = OpenOptions::new().write(true).open(path)?;
    drop(both);
    Ok(write_only)
}

async fn relay_output(guest: SharedGuest, process: ProcessId, stderr: bool, sink: Sink) {
    let file = match sink {
        Sink::Open(file) => Some(file),
        Sink::Path(path) => {
            let opened = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || open_output(&path)).await
            };
            match opened {
                Ok(Ok(file)) => Some(file),
                Ok(Err(err)) => {
                    warn!(path = %path.display(), %err, "cannot open the output FIFO; output is discarded");
                    None
                }
                Err(err) => {
                    warn!(%err, "output FIFO open task failed");
                    None
                }
            }
        }
    };
    let which = if stderr {
        Output::Stderr
    } else {
        Output::Stdout
    };
    let result = match file {
        Some(file) => {
            pump::copy_output(
                guest.as_ref(),
                &process,
                which,
                tokio::fs::File::from_std(file),
            )
            .await
        }
        // Nowhere to write: the output is still read, so the process never blocks on it.
        None => pump::copy_output(guest.as_ref(), &process, which, tokio::io::sink()).await,
    };
    if let Err(err) = result {
        debug!(container = %process.container, exec = %process.exec, stderr, %err, "output relay ends");
    }
}

/// Relays containerd's stdin FIFO to the process until end of file or CloseIO, then closes the
/// process's stdin. Opening the FIFO blocks until containerd's writer appears and reads block
/// until it writes, so both happen on a thread of its own (not tokio's blocking pool, whose
/// threads the runtime waits for at shutdown), which ends at end of file or with the shim.
async fn relay_stdin(
    guest: SharedGuest,
    process: ProcessId,
    path: PathBuf,
    mut close: oneshot::Receiver<()>,
) {
    let (chunks_tx, mut chunks_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let reader_path = path.clone();
    let spawned = std::thread::Builder::new()
        .name("stdin-relay".into())
        .spawn(move || {
            let mut file = match File::open(&reader_path) {
                Ok(file) => file,
                Err(err) => {
                    warn!(path = %reader_path.display(), %err, "cannot open the stdin FIFO");
                    return;
                }
            };
            let mut buf = vec![0u8; pump::CHUNK];
            loop {
                match std::io::Read::read(&mut file, &mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let chunk = buf.get(..n).unwrap_or_default().to_vec();
                        if chunks_tx.blocking_send(chunk).is_err() {
                            return;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        debug!(%err, "stdin FIFO read failed");
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        warn!(%err, "cannot start the stdin relay thread");
    }
    loop {
        tokio::select! {
            chunk = chunks_rx.recv() => match chunk {
                Some(data) => {
                    if let Err(err) = guest.write_stdin(&process.container, &process.exec, &data).await {
                        debug!(container = %process.container, exec = %process.exec, %err, "stdin relay ends");
                        return;
                    }
                }
                None => break,
            },
            _ = &mut close => break,
        }
    }
    if let Err(err) = guest.close_stdin(&process.container, &process.exec).await {
        debug!(container = %process.container, exec = %process.exec, %err, "CloseStdin failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_paths_from_containerd_values() {
        assert_eq!(fifo_path(""), None);
        assert_eq!(fifo_path("/run/x/stdout"), Some("/run/x/stdout".into()));
        assert_eq!(fifo_path("fifo:///run/x/o"), Some("/run/x/o".into()));
        assert_eq!(fifo_path("file:///var/log/o"), None);
        assert_eq!(fifo_path("binary:///bin/logger?a=b"), None);
    }
}
