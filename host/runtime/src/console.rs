//! Terminals for `create --console-socket SOCK`, as runc does it: husk opens a pseudo-terminal on
//! the host, sends its master over the Unix socket SOCK (SCM_RIGHTS) to the caller (podman's
//! conmon, containerd's shim), and relays the slave side to the container's terminal in the guest.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::pty::{openpty, Winsize};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// The name sent with the master, as runc sends it (receivers use it only to label the file).
pub const MASTER_NAME: &str = "/dev/ptmx";

/// Errors setting up a terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// openpty failed.
    #[error("cannot open a pseudo-terminal: {0}")]
    OpenPty(#[source] nix::Error),
    /// The console socket cannot be connected to.
    #[error("cannot connect to the console socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Sending the master failed.
    #[error("cannot send the terminal to the console socket {path}: {source}")]
    Send {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// A pseudo-terminal pair; both ends close-on-exec.
#[derive(Debug)]
pub struct Pty {
    /// The master: given to the caller through the console socket.
    pub master: OwnedFd,
    /// The slave: husk's side, relayed to the container's terminal in the guest.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` x `cols` (the spec's `process.consoleSize`, when given).
pub fn open_pty(size: Option<(u16, u16)>) -> Result<Pty, ConsoleError> {
    let winsize = size.map(|(rows, cols)| Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    });
    let pair = openpty(winsize.as_ref(), None).map_err(ConsoleError::OpenPty)?;
    for fd in [&pair.master, &pair.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(ConsoleError::OpenPty)?;
    }
    Ok(Pty {
        master: pair.master,
        slave: pair.slave,
    })
}

/// Sends `master` over the Unix socket at `socket` with SCM_RIGHTS, with [`MASTER_NAME`] as data.
pub fn send_master(socket: &Path, master: BorrowedFd<'_>) -> Result<(), ConsoleError> {
    let stream = UnixStream::connect(socket).map_err(|source| ConsoleError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let fds = [master.as_raw_fd()];
    let control = [ControlMessage::ScmRights(&fds)];
    let data = [IoSlice::new(MASTER_NAME.as_bytes())];
    sendmsg::<()>(stream.as_raw_fd(), &data, &control, MsgFlags::empty(), None).map_err(
        |source| ConsoleError::Send {
            path: socket.to_path_buf(),
            source,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{IoSliceMut, Read, Write};
    use std::os::fd::{AsFd, FromRawFd, RawFd};
    use std::os::unix::net::UnixListener;

    use nix::sys::socket::{recvmsg, ControlMessageOwned};

    use super::*;

    /// Accepts one connection and returns the data and the file descriptor it carried.
    fn receive(listener: &UnixListener) -> (String, OwnedFd) {
        let (stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let fd = msg
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .unwrap();
        let len = msg.bytes;
        // SAFETY: the kernel just installed `fd` in this process for us (SCM_RIGHTS); nothing
        // else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        (String::from_utf8(buf[..len].to_vec()).unwrap(), fd)
    }

    #[test]
    fn the_master_sent_drives_the_slave() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = open_pty(Some((24, 80))).unwrap();
        let receiver = std::thread::spawn(move || receive(&listener));
        send_master(&path, pty.master.as_fd()).unwrap();
        let (name, master) = receiver.join().unwrap();
        assert_eq!(name, MASTER_NAME);

        // What the caller types on the received master is read on husk's slave.
        File::from(master).write_all(b"hello\n").unwrap();
        let mut line = [0u8; 6];
        File::from(pty.slave).read_exact(&mut line).unwrap();
        assert_eq!(&line, b"hello\n");
    }

    #[test]
    fn both_ends_are_close_on_exec() {
        let pty = open_pty(None).unwrap();
        for fd in [&pty.master, &pty.slave] {
            let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn missing_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let pty = open_pty(None).unwrap();
        let err = send_master(&dir.path().join("absent.sock"), pty.master.as_fd()).unwrap_err();
        assert!(matches!(err, ConsoleError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("absent.sock"), "{err}");
    }
}
