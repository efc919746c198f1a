//! Stdio pumps between host files and a process in the guest: output (`read_output` until end
//! of file) and input (`write_stdin`, then `close_stdin`), and a terminal's window size. Both
//! front ends relay through these, with one chunk size and one drain time.

use std::time::Duration;

use husk_agent_protocol::ClientError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::guest::Guest;

/// Bytes moved per agent request, in either direction (the agent allows up to
/// [`husk_agent_protocol::MAX_IO_CHUNK`]).
pub const CHUNK: usize = 128 * 1024;
/// How long a process's output may keep coming after it ended (a background process holding
/// the stream open must not hold the exit forever).
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// How often a terminal's size is checked for changes.
pub const RESIZE_POLL: Duration = Duration::from_millis(500);

/// Which output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// The process a pump serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessId {
    pub container: String,
    /// Empty for the container's first process.
    pub exec: String,
}

impl ProcessId {
    pub fn new(container: &str, exec: &str) -> ProcessId {
        ProcessId {
            container: container.to_owned(),
            exec: exec.to_owned(),
        }
    }
}

/// Copies one output stream of `process` to `out` until end of file. When `out` fails (a closed
/// pipe, a reader gone), the rest is read and discarded, so the process never blocks on a full
/// pipe in the guest. Returns the agent's error, if any.
pub async fn copy_output<W: AsyncWrite + Unpin>(
    guest: &dyn Guest,
    process: &ProcessId,
    which: Output,
    mut out: W,
) -> Result<(), ClientError> {
    let mut writable = true;
    loop {
        let chunk = guest
            .read_output(
                which == Output::Stderr,
                &process.container,
                &process.exec,
                CHUNK,
            )
            .await?;
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
                tracing::debug!(
                    container = %process.container,
                    exec = %process.exec,
                    "{which:?}: {err}; discarding the rest"
                );
                writable = false;
            }
        }
    }
}

/// Copies `input` to the process's stdin until end of file (a read error counts as one), then
/// closes its stdin.
pub async fn copy_input<R: AsyncRead + Unpin>(
    guest: &dyn Guest,
    process: &ProcessId,
    mut input: R,
) -> Result<(), ClientError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(n) => n,
            Err(err) => {
                tracing::debug!(container = %process.container, exec = %process.exec, "stdin: {err}");
                0
            }
        };
        let Some(data) = buf.get(..n).filter(|d| !d.is_empty()) else {
            return guest.close_stdin(&process.container, &process.exec).await;
        };
        guest
            .write_stdin(&process.container, &process.exec, data)
            .await?;
    }
}

/// Sends a terminal's size to the guest now and whenever it changes (polled every
/// [`RESIZE_POLL`]); `size` reads it, `None` when unknown. Runs until cancelled.
pub async fn follow_window_size(
    guest: &dyn Guest,
    process: &ProcessId,
    size: impl Fn() -> Option<(u16, u16)>,
) {
    let mut last = None;
    loop {
        let now = size();
        if let Some((rows, cols)) = now.filter(|_| now != last) {
            if let Err(err) = guest
                .resize_terminal(
                    &process.container,
                    &process.exec,
                    u32::from(rows),
                    u32::from(cols),
                )
                .await
            {
                tracing::debug!("resize: {err}");
            }
            last = now;
        }
        tokio::time::sleep(RESIZE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::fake::FakeGuest;

    fn process() -> ProcessId {
        ProcessId::new("c1", "")
    }

    #[tokio::test]
    async fn output_is_copied_until_end_of_file_in_chunks() {
        let guest = FakeGuest::new();
        let big = vec![7u8; CHUNK * 2 + 5];
        guest.push_output("c1", "", false, &big);
        guest.push_output("c1", "", false, b"end");
        guest.end_output("c1", "", false);
        let mut out = Vec::new();
        copy_output(&guest, &process(), Output::Stdout, &mut out)
            .await
            .unwrap();
        assert_eq!(out.len(), big.len() + 3);
        assert!(guest
            .calls()
            .iter()
            .filter(|c| c.starts_with("ReadStdout"))
            .all(|c| c.ends_with(&format!("max={CHUNK}"))));
    }

    #[tokio::test]
    async fn output_is_drained_after_the_writer_fails() {
        struct Broken;
        impl AsyncWrite for Broken {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        let guest = FakeGuest::new();
        guest.push_output("c1", "", true, b"one");
        guest.push_output("c1", "", true, b"two");
        guest.end_output("c1", "", true);
        copy_output(&guest, &process(), Output::Stderr, Broken)
            .await
            .unwrap();
        let reads = guest
            .calls()
            .iter()
            .filter(|c| c.starts_with("ReadStderr"))
            .count();
        assert_eq!(reads, 3, "two chunks and the end of file were all read");
    }

    #[tokio::test]
    async fn input_is_written_then_closed() {
        let guest = Arc::new(FakeGuest::new());
        let create = husk_agent_protocol::agent::CreateContainerRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        guest.create_container(&create).await.unwrap();
        let input: &[u8] = b"hello";
        copy_input(guest.as_ref(), &process(), input).await.unwrap();
        assert_eq!(guest.stdin_of("c1", ""), b"hello");
        assert_eq!(
            guest.calls().last().map(String::as_str),
            Some("CloseStdin c1 ")
        );
    }
}
