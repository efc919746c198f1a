//! Non-blocking pipes and pty masters driven by tokio, for a process's stdio.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// One end of a pipe or a pty master, read or written asynchronously.
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl FdStream {
    /// Wraps `fd` (made non-blocking).
    pub fn new(fd: OwnedFd, interest: Interest) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which deregisters it before closing it,
        // so the registration never outlives the fd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, interest)? };
        Ok(FdStream { fd })
    }

    /// Reads up to `max` bytes; an empty result is end of file (EIO on a pty counts as EOF:
    /// every slave was closed).
    pub async fn read(&self, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; max.max(1)];
        loop {
            let mut guard = self.fd.readable().await?;
            let res = guard.try_io(|inner| {
                // SAFETY: read into a buffer of buf.len() bytes that we own.
                let n =
                    unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(Vec::new()),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes some of `data`; returns how much.
    pub async fn write(&self, data: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|inner| {
                // SAFETY: write from a buffer of data.len() valid bytes.
                let n = unsafe { libc::write(inner.as_raw_fd(), data.as_ptr().cast(), data.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match res {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// The raw fd (for ioctls such as TIOCSWINSZ).
    pub fn raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }
}

/// A pipe: (read end, write end), both close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pty: (master, slave), both close-on-exec.
pub fn openpty() -> io::Result<(OwnedFd, OwnedFd)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    // SAFETY: openpty returned two fresh fds that we now own.
    let (master, slave) = unsafe {
        (
            OwnedFd::from_raw_fd(pty.master),
            OwnedFd::from_raw_fd(pty.slave),
        )
    };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

/// Duplicates `fd` onto a number >= 10, close-on-exec (keeps it clear of fds 0-4 of a helper).
pub fn dup_high(fd: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: n is a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}
