//! containerd's log URIs for a process's output, as its runc shim handles them:
//!
//! - `binary:///path/to/logger?key=value&flag`: the shim starts the logging program with the
//!   process's stdout and stderr as the read ends of two pipes on fds 3 and 4, the write end of a
//!   "ready" pipe on fd 5 (it closes or writes to it once it is ready), `key value flag` as its
//!   arguments and only `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment. The shim
//!   writes the output into the pipes; the program sees end of file when the process's output
//!   ends and is expected to exit; it is stopped (SIGTERM, then SIGKILL) when it does not.
//! - `file:///path/to/file`: stdout and stderr are appended to the file (its directory is
//!   created).

use std::ffi::OsString;
use std::fs::File;
use std::io::{PipeReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

/// Longest log URI accepted.
const MAX_URI: usize = 4096;
/// Most arguments a `binary://` URI may give the logging program.
const MAX_ARGS: usize = 64;
/// How long the logging program may take to report ready (nested, emulated hosts are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the logging program may take to exit after its input ended, then after SIGTERM.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The first fd the logging program gets: stdout's pipe (3), stderr's (4), the ready pipe (5).
const FIRST_FD: i32 = 3;

/// Why a log URI cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The URI is malformed or names something husk cannot use.
    #[error("log URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: &'static str },
    /// A pipe for the logging program could not be made.
    #[error("cannot create a pipe for the logging program: {0}")]
    Pipe(#[source] std::io::Error),
    /// The logging program could not be started.
    #[error("cannot start the logging program {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The logging program did not report ready.
    #[error("the logging program {path} {problem}")]
    NotReady { path: PathBuf, problem: String },
    /// The log file could not be opened.
    #[error("cannot open the log file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A stdout/stderr value containerd passes, when it is a log URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogUri {
    /// `binary://`: the logging program and its arguments.
    Binary { path: PathBuf, args: Vec<OsString> },
    /// `file://`: the file output is appended to.
    File(PathBuf),
}

impl LogUri {
    /// The log URI in `value`: `Ok(None)` for what is not one (a FIFO path, `fifo://`, empty).
    pub fn parse(value: &str) -> Result<Option<LogUri>, LogError> {
        let (scheme, rest) = match value.split_once("://") {
            Some((scheme @ ("binary" | "file"), rest)) => (scheme, rest),
            _ => return Ok(None),
        };
        let bad = |reason| LogError::BadUri {
            uri: value.chars().take(200).collect(),
            reason,
        };
        if value.len() > MAX_URI {
            return Err(bad("longer than 4096 bytes"));
        }
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = path.split_once('#').map_or(path, |(p, _)| p);
        // Only an empty authority: `binary:///path`.
        let Some(path) = path.strip_prefix('/') else {
            return Err(bad(
                "expected an absolute path after the scheme (scheme:///path)",
            ));
        };
        let path = PathBuf::from(OsString::from_vec(
            percent_decode(&format!("/{path}"), false).ok_or_else(|| bad("bad %-escape"))?,
        ));
        if path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(bad("NUL in the path"));
        }
        if path.file_name().is_none() {
            return Err(bad("the path names no file"));
        }
        if scheme == "file" {
            return Ok(Some(LogUri::File(path)));
        }
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, val) = pair.split_once('=').unwrap_or((pair, ""));
            for part in [Some(key), pair.contains('=').then_some(val)]
                .into_iter()
                .flatten()
            {
                let arg = percent_decode(part, true).ok_or_else(|| bad("bad %-escape"))?;
                if arg.contains(&0) {
                    return Err(bad("NUL in an argument"));
                }
                args.push(OsString::from_vec(arg));
            }
            if args.len() > MAX_ARGS {
                return Err(bad("more than 64 arguments"));
            }
        }
        Ok(Some(LogUri::Binary { path, args }))
    }
}

/// Decodes `%XX` escapes (and `+` as a space in a query); `None` for a malformed escape.
fn percent_decode(s: &str, query: bool) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i.checked_add(1)?..i.checked_add(3)?)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i = i.checked_add(3)?;
            }
            b'+' if query => {
                out.push(b' ');
                i = i.checked_add(1)?;
            }
            _ => {
                out.push(b);
                i = i.checked_add(1)?;
            }
        }
    }
    Some(out)
}

/// Opens (creating it and its directory) a `file://` log for appending.
pub fn open_log_file(path: &Path) -> Result<File, LogError> {
    let err = |source| LogError::File {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(err)
}

/// A running logging program and the write ends of its stdout and stderr pipes.
pub struct BinaryLogger {
    pub stdout: File,
    pub stderr: File,
    child: Child,
    path: PathBuf,
}

/// Identifies the process whose output a logging program receives.
pub struct LoggedProcess<'a> {
    pub container_id: &'a str,
    pub namespace: &'a str,
}

impl BinaryLogger {
    /// Starts the logging program and waits until it reports ready (a byte or end of file on
    /// its fd 5).
    pub async fn start(
        path: &Path,
        args: &[OsString],
        process: LoggedProcess<'_>,
    ) -> Result<BinaryLogger, LogError> {
        let (out_r, out_w) = std::io::pipe().map_err(LogError::Pipe)?;
        let (err_r, err_w) = std::io::pipe().map_err(LogError::Pipe)?;
        let (ready_r, ready_w) = std::io::pipe().map_err(LogError::Pipe)?;
        let fds: [OwnedFd; 3] = [out_r.into(), err_r.into(), ready_w.into()];
        let mut command = Command::new(path);
        command
            .args(args)
            .env_clear()
            .env("CONTAINER_ID", process.container_id)
            .env("CONTAINER_NAMESPACE", process.namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        pass_fds(&mut command, &fds);
        let mut child = command.spawn().map_err(|source| LogError::Spawn {
            path: path.to_owned(),
            source,
        })?;
        // The program holds its ends now; ours must go, or the ready pipe never ends.
        drop(fds);
        let not_ready = |problem: String| LogError::NotReady {
            path: path.to_owned(),
            problem,
        };
        let ready = tokio::task::spawn_blocking(move || wait_ready(ready_r));
        match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                let _ = child.start_kill();
                return Err(not_ready(format!("failed to report ready: {err}")));
            }
            Ok(Err(err)) => {
                let _ = child.start_kill();
                return Err(not_ready(format!("failed to report ready: {err}")));
            }
            Err(_) => {
                // Killing it ends the ready pipe, which ends the blocked read.
                let _ = child.start_kill();
                return Err(not_ready(format!(
                    "did not report ready within {READY_TIMEOUT:?}"
                )));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            debug!(path = %path.display(), %status, "the logging program exited at once");
        }
        Ok(BinaryLogger {
            stdout: File::from(OwnedFd::from(out_w)),
            stderr: File::from(OwnedFd::from(err_w)),
            child,
            path: path.to_owned(),
        })
    }

    /// Splits off the write ends (for the relays) from the program (for [`LoggerExit::finish`]).
    pub fn split(self) -> (File, File, LoggerExit) {
        (
            self.stdout,
            self.stderr,
            LoggerExit {
                child: self.child,
                path: self.path,
            },
        )
    }
}

/// The logging program, once its pipes were handed to the relays.
pub struct LoggerExit {
    child: Child,
    path: PathBuf,
}

impl LoggerExit {
    /// After the relays closed the pipes: waits for the program to exit, SIGTERM after a grace
    /// period, SIGKILL after another; reaps it.
    pub async fn finish(mut self) {
        if let Ok(status) = tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            debug!(path = %self.path.display(), ?status, "logging program exited");
            return;
        }
        warn!(path = %self.path.display(), "logging program still runs after its input ended; SIGTERM");
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(EXIT_GRACE, self.child.wait())
            .await
            .is_ok()
        {
            return;
        }
        warn!(path = %self.path.display(), "logging program ignores SIGTERM; SIGKILL");
        let _ = self.child.kill().await;
    }
}

fn wait_ready(mut ready: PipeReader) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        match ready.read(&mut byte) {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// Makes the child see `fds` as fds 3, 4, 5, ... (without close-on-exec).
fn pass_fds(command: &mut Command, fds: &[OwnedFd; 3]) {
    let raw: [i32; 3] = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    // SAFETY: the closure runs in the child between fork and exec; it calls only fcntl and dup2
    // (async-signal-safe) on integers and allocates nothing. Each fd is first copied above the
    // targets' range, so a source that is itself 3..=5 is not overwritten before it is moved.
    unsafe {
        command.pre_exec(move || {
            let mut high = [0i32; 3];
            for (slot, fd) in high.iter_mut().zip(raw) {
                let copy = libc::fcntl(fd, libc::F_DUPFD, 10);
                if copy < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                *slot = copy;
            }
            for (target, fd) in (FIRST_FD..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(path: &str, args: &[&str]) -> Option<LogUri> {
        Some(LogUri::Binary {
            path: path.into(),
            args: args.iter().map(OsString::from).collect(),
        })
    }

    #[test]
    fn log_uris_parse_like_containerd() {
        assert_eq!(LogUri::parse("").unwrap(), None);
        assert_eq!(LogUri::parse("/run/x/stdout").unwrap(), None);
        assert_eq!(LogUri::parse("fifo:///run/x/o").unwrap(), None);
        assert_eq!(
            LogUri::parse("file:///var/log/a%20b.log").unwrap(),
            Some(LogUri::File("/var/log/a b.log".into()))
        );
        assert_eq!(
            LogUri::parse("binary:///usr/bin/logger").unwrap(),
            binary("/usr/bin/logger", &[])
        );
        assert_eq!(
            LogUri::parse("binary:///bin/log?id=a+b&verbose&x=%2F").unwrap(),
            binary("/bin/log", &["id", "a b", "verbose", "x", "/"])
        );
    }

    #[test]
    fn bad_log_uris_are_refused_with_a_reason() {
        for uri in [
            "binary://host/bin/logger",
            "binary:///",
            "file:///var/%zz",
            "binary:///bin/l?a=%00",
            "file:///a%00b",
        ] {
            let err = LogUri::parse(uri).unwrap_err();
            assert!(matches!(err, LogError::BadUri { .. }), "{uri}: {err}");
        }
        let long = format!("binary:///{}", "a".repeat(5000));
        assert!(LogUri::parse(&long).is_err());
        let many = format!("binary:///l?{}", "a&".repeat(100));
        assert!(LogUri::parse(&many).is_err());
    }

    #[tokio::test]
    async fn a_logging_program_gets_the_output_on_fd_3_and_4() {
        let dir = std::env::temp_dir().join(format!("husk-shim-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        // The logging program is sh -c SCRIPT rather than a script file written here: a file
        // written while another test thread forks stays open for writing in that child until
        // its exec, and exec'ing the file then fails with ETXTBSY (seen on a fresh clone).
        let script = format!(
            "exec 5>&-\n/bin/cat <&3 > {out}.1\n/bin/cat <&4 > {out}.2\necho \"$1 $2 $CONTAINER_ID $CONTAINER_NAMESPACE\" > {out}.env\n",
            out = out.display()
        );
        let logger = BinaryLogger::start(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                script.into(),
                "logger".into(),
                "k".into(),
                "v".into(),
            ],
            LoggedProcess {
                container_id: "c1",
                namespace: "ns",
            },
        )
        .await
        .unwrap();
        let (mut stdout, mut stderr, exit) = logger.split();
        use std::io::Write;
        stdout.write_all(b"to stdout\n").unwrap();
        stderr.write_all(b"to stderr\n").unwrap();
        drop((stdout, stderr));
        exit.finish().await;
        let read =
            |ext: &str| std::fs::read_to_string(dir.join(format!("out.{ext}"))).unwrap_or_default();
        assert_eq!(read("1"), "to stdout\n");
        assert_eq!(read("2"), "to stderr\n");
        assert_eq!(read("env"), "k v c1 ns\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_logging_program_that_exits_at_once_fails_nothing() {
        let logger = BinaryLogger::start(
            Path::new("/bin/true"),
            &[],
            LoggedProcess {
                container_id: "c",
                namespace: "n",
            },
        )
        .await
        .unwrap();
        let (mut stdout, _stderr, exit) = logger.split();
        exit.finish().await;
        use std::io::Write;
        // Its reader is gone: EPIPE, not a hang (SIGPIPE is ignored by Rust programs).
        assert!(stdout.write_all(&[0u8; 100_000]).is_err());
    }

    #[tokio::test]
    async fn a_missing_logging_program_is_named() {
        let err = BinaryLogger::start(
            Path::new("/nonexistent/logger"),
            &[],
            LoggedProcess {
                container_id: "c",
                namespace: "n",
            },
        )
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/logger"), "{err}");
    }
}
