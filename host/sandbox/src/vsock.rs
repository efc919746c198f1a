//! Reaching the agent through husk-vmm's hybrid vsock (Firecracker's protocol): connect to the
//! VMM's Unix socket, write `CONNECT <port>\n`, read `OK <host_port>\n`; the stream then carries
//! the guest connection's bytes (ttrpc, for the agent).
//!
//! While the guest boots, the socket may not exist yet, refuse connections, or be closed by the
//! VMM without an `OK` because nothing listens on the port in the guest yet: all of these are
//! retried until the deadline. The reply is read one byte at a time, so not a byte of the stream
//! that follows it is consumed.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The longest reply line accepted (`OK 4294967295\n` is 14 bytes).
pub const MAX_REPLY: usize = 32;
/// The first pause between attempts; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The deadline passed; `last` is the last attempt's failure.
    #[error(
        "no answer on guest port {port} through {uds} within {waited_ms} ms (last attempt: {last})"
    )]
    Timeout {
        uds: PathBuf,
        port: u32,
        waited_ms: u128,
        last: String,
    },
    /// The caller stopped waiting.
    #[error("gave up connecting to guest port {port} through {uds}")]
    Cancelled { uds: PathBuf, port: u32 },
    /// The VMM answered something other than `OK <port>`.
    #[error("unexpected reply {reply:?} from {uds} to CONNECT {port}")]
    BadReply {
        uds: PathBuf,
        port: u32,
        reply: String,
    },
}

/// One attempt's outcome.
enum Attempt {
    Connected(UnixStream),
    /// Worth retrying (not listening yet).
    Retry(String),
    /// Not worth retrying.
    Fatal(VsockError),
}

/// Connects to guest `port` through the hybrid vsock socket `uds`, retrying until `timeout`.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    connect_unless(uds, port, timeout, &AtomicBool::new(false))
}

/// [`connect`], giving up (with [`VsockError::Cancelled`]) within [`MAX_BACKOFF`] of `cancel`
/// being set, e.g. when the VMM has exited and nothing will ever answer.
pub fn connect_unless(
    uds: &Path,
    port: u32,
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<UnixStream, VsockError> {
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(VsockError::Cancelled {
                uds: uds.to_path_buf(),
                port,
            });
        }
        let last = match attempt(uds, port, timeout.saturating_sub(start.elapsed())) {
            Attempt::Connected(stream) => return Ok(stream),
            Attempt::Fatal(err) => return Err(err),
            Attempt::Retry(reason) => reason,
        };
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(VsockError::Timeout {
                uds: uds.to_path_buf(),
                port,
                waited_ms: start.elapsed().as_millis(),
                last,
            });
        }
        thread::sleep(backoff.min(left));
        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
    }
}

fn attempt(uds: &Path, port: u32, left: Duration) -> Attempt {
    let mut stream = match UnixStream::connect(uds) {
        Ok(stream) => stream,
        Err(err) => return Attempt::Retry(format!("connect: {err}")),
    };
    // Bound the wait for the reply; the stream is handed back blocking without a timeout.
    let reply_timeout = left.max(Duration::from_millis(1));
    if let Err(err) = stream.set_read_timeout(Some(reply_timeout)) {
        return Attempt::Retry(format!("set timeout: {err}"));
    }
    if let Err(err) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Attempt::Retry(format!("write: {err}"));
    }
    let reply = match read_line(&mut stream) {
        Ok(Some(line)) => line,
        Ok(None) => return Attempt::Retry("closed without a reply".into()),
        Err(err) => return Attempt::Retry(format!("read: {err}")),
    };
    if parse_ok(&reply).is_none() {
        return Attempt::Fatal(VsockError::BadReply {
            uds: uds.to_path_buf(),
            port,
            reply,
        });
    }
    match stream.set_read_timeout(None) {
        Ok(()) => Attempt::Connected(stream),
        Err(err) => Attempt::Retry(format!("clear timeout: {err}")),
    }
}

/// Reads up to and including `\n`, one byte at a time, at most [`MAX_REPLY`] bytes. `None` on
/// end of stream before any byte.
pub(crate) fn read_line(stream: &mut impl Read) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_REPLY {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into())),
            Ok(_) => line.push(byte[0]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(Some(String::from_utf8_lossy(&line).into()))
}

/// The host port of an `OK <port>` reply.
pub(crate) fn parse_ok(reply: &str) -> Option<u32> {
    reply.strip_prefix("OK ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake VMM: for each connection in `script`, reads the CONNECT line, then either closes
    /// (`None`) or sends the reply followed by `b"after"` in the same write.
    fn fake_vmm(
        listener: UnixListener,
        script: Vec<Option<&'static str>>,
    ) -> thread::JoinHandle<Vec<String>> {
        thread::spawn(move || {
            let mut requests = Vec::new();
            for reply in script {
                let (mut stream, _) = listener.accept().unwrap();
                requests.push(read_line(&mut stream).unwrap().unwrap());
                if let Some(reply) = reply {
                    stream
                        .write_all(format!("{reply}after").as_bytes())
                        .unwrap();
                    // Echo 4 bytes if the client sends them (some tests just drop the stream).
                    let mut echo = [0u8; 4];
                    if stream.read_exact(&mut echo).is_ok() {
                        stream.write_all(&echo).unwrap();
                    }
                }
            }
            requests
        })
    }

    #[test]
    fn handshake_then_the_stream_is_intact() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let vmm = fake_vmm(
            UnixListener::bind(&uds).unwrap(),
            vec![Some("OK 1073741824\n")],
        );
        let mut stream = connect(&uds, 1024, Duration::from_secs(10)).unwrap();
        let mut after = [0u8; 5];
        stream.read_exact(&mut after).unwrap();
        assert_eq!(&after, b"after");
        stream.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
        assert_eq!(vmm.join().unwrap(), ["CONNECT 1024"]);
    }

    #[test]
    fn closed_connections_are_retried_until_the_guest_listens() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let vmm = fake_vmm(
            UnixListener::bind(&uds).unwrap(),
            vec![None, None, Some("OK 5\n")],
        );
        connect(&uds, 1024, Duration::from_secs(10)).unwrap();
        assert_eq!(vmm.join().unwrap().len(), 3);
    }

    #[test]
    fn a_cancelled_wait_ends_at_once_instead_of_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("never.sock");
        let cancel = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&cancel);
        let waiter = thread::spawn(move || {
            let started = Instant::now();
            let result = connect_unless(&uds, 1024, Duration::from_secs(600), &flag);
            (result, started.elapsed())
        });
        thread::sleep(Duration::from_millis(50));
        cancel.store(true, Ordering::SeqCst);
        let (result, waited) = waiter.join().unwrap();
        assert!(
            matches!(result, Err(VsockError::Cancelled { port: 1024, .. })),
            "{result:?}"
        );
        assert!(waited < Duration::from_secs(60), "waited {waited:?}");
    }

    #[test]
    fn a_socket_that_appears_later_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let late = uds.clone();
        let vmm = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            fake_vmm(UnixListener::bind(&late).unwrap(), vec![Some("OK 5\n")])
                .join()
                .unwrap()
        });
        connect(&uds, 1024, Duration::from_secs(10)).unwrap();
        vmm.join().unwrap();
    }

    #[test]
    fn garbage_reply_is_an_error_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let _vmm = fake_vmm(UnixListener::bind(&uds).unwrap(), vec![Some("NOPE\n")]);
        let err = connect(&uds, 1024, Duration::from_secs(10)).unwrap_err();
        assert!(
            matches!(&err, VsockError::BadReply { reply, .. } if reply == "NOPE"),
            "{err}"
        );
    }

    #[test]
    fn overlong_reply_is_bounded() {
        let mut long = io::Cursor::new(vec![b'x'; 1000]);
        assert_eq!(read_line(&mut long).unwrap().unwrap().len(), MAX_REPLY);
    }

    #[test]
    fn deadline_names_the_socket_port_and_last_failure() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("absent.sock");
        let err = connect(&uds, 1024, Duration::from_millis(30)).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("guest port 1024"), "{message}");
        assert!(message.contains("absent.sock"), "{message}");
        assert!(message.contains("connect:"), "{message}");
    }

    #[test]
    fn ok_replies_parse() {
        assert_eq!(parse_ok("OK 1073741824"), Some(1_073_741_824));
        assert_eq!(parse_ok("OK"), None);
        assert_eq!(parse_ok("OK -1"), None);
        assert_eq!(parse_ok("ok 5"), None);
    }
}
