//! Starting husk-vmm as the first process of a PID namespace of its own, in its cgroup, with a
//! pidfd: `clone3(CLONE_NEWPID | CLONE_PIDFD | CLONE_INTO_CGROUP)`, then `execve`.
//!
//! - The new PID namespace: husk-vmm is its PID 1 and sees no other process of the host, so
//!   nothing it could do (were its seccomp filter to fail) can name one. It blocks SIGTERM and
//!   SIGINT and reads them from a signalfd, so the signals the sandbox sends it still arrive (a
//!   namespace's init gets only signals it handles or blocks, and SIGKILL).
//! - `CLONE_INTO_CGROUP`: it is in its host cgroup from its first instruction.
//! - The pidfd: the sandbox signals and waits on this very process, never on a PID that may have
//!   been reused.
//!
//! Between `clone3` and `execve` the child, a copy of a multi-threaded process, makes only
//! system calls on memory prepared before the clone: no allocation, no lock.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitStatus;

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in libc yet.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What the child is started with.
pub struct SpawnSpec<'a> {
    pub program: &'a Path,
    /// Arguments after the program name.
    pub args: &'a [OsString],
    /// Standard output and error (standard input is /dev/null).
    pub stdout: &'a File,
    pub stderr: &'a File,
    /// A cgroup v2 directory the child starts in.
    pub cgroup: Option<&'a File>,
}

/// A started child.
#[derive(Debug)]
pub struct Spawned {
    /// Its PID in the caller's PID namespace.
    pub pid: u32,
    pub pidfd: OwnedFd,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `spec.program` (see the module documentation). Killed when the calling thread ends.
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let program = cstring(spec.program.as_os_str().as_bytes())?;
    let mut argv = vec![program.clone()];
    for arg in spec.args {
        argv.push(cstring(arg.as_bytes())?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let mut pair = key.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        env.push(cstring(&pair)?);
    }
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let devnull = File::open(OsStr::new("/dev/null"))?;
    // The child reports a failure before exec (an errno) here; end of file means exec succeeded.
    let (status_r, status_w) = pipe()?;
    // Held by the caller until the child has exec'd: the child sees it closed if the caller died
    // before the child's death signal was armed.
    let (alive_r, alive_w) = pipe()?;
    let fds = (
        devnull.as_raw_fd(),
        spec.stdout.as_raw_fd(),
        spec.stderr.as_raw_fd(),
        status_w.as_raw_fd(),
        alive_r.as_raw_fd(),
        alive_w.as_raw_fd(),
    );
    let mut pidfd: RawFd = -1;
    let mut flags = (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64;
    let mut cgroup = 0u64;
    if let Some(dir) = spec.cgroup {
        flags |= CLONE_INTO_CGROUP;
        cgroup = u64::try_from(dir.as_raw_fd()).unwrap_or_default();
    }
    // SAFETY: an all-zero clone_args is valid (no stack: fork semantics); the fields set below
    // are the ones clone3 reads for these flags.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags;
    args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    args.cgroup = cgroup;
    // SAFETY: clone3 without CLONE_VM duplicates the process like fork; `args` lives across the
    // call. The child branch below makes only async-signal-safe system calls on memory prepared
    // above, and ends in execve or _exit.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of_mut!(args),
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret == 0 {
        // SAFETY: the child of clone3; see above.
        unsafe { child(&program, &argv_ptrs, &env_ptrs, fds) }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: clone3 succeeded with CLONE_PIDFD, so `pidfd` is an open descriptor now ours.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = u32::try_from(ret).unwrap_or(0);
    drop(status_w);
    let mut errno = [0u8; 4];
    let got = read_full(&status_r, &mut errno);
    drop(alive_w);
    match got {
        Ok(0) => Ok(Spawned { pid, pidfd }),
        Ok(_) => {
            let _ = wait(&pidfd);
            Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
        }
        Err(err) => {
            let _ = send_signal(&pidfd, libc::SIGKILL);
            let _ = wait(&pidfd);
            Err(err)
        }
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid for writes of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(done)
}

/// The child between clone3 and execve.
///
/// # Safety
/// Only in the child of [`spawn`]'s clone3, with the pointers prepared there.
unsafe fn child(
    program: &CString,
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    (devnull, stdout, stderr, status, alive_r, alive_w): (RawFd, RawFd, RawFd, RawFd, RawFd, RawFd),
) -> ! {
    // SAFETY: the caller's contract; every call is a plain system call on descriptors and
    // memory prepared before the clone.
    unsafe {
        let fail = |status: RawFd| -> ! {
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(status, bytes.as_ptr().cast(), bytes.len());
            libc::_exit(127)
        };
        libc::close(alive_w);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(status);
        }
        // The caller died between clone3 and prctl: do not start an orphan VM.
        let mut poll = libc::pollfd {
            fd: alive_r,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut poll, 1, 0) != 0 {
            libc::_exit(127);
        }
        for (from, to) in [(devnull, 0), (stdout, 1), (stderr, 2)] {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let done = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if done < 0 {
                fail(status);
            }
        }
        libc::execve(program.as_ptr(), argv.as_ptr(), env.as_ptr());
        fail(status)
    }
}

/// Sends `signal` to the process of `pidfd` (nothing happens once it has been reaped).
pub fn send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal reads only its integer arguments (no siginfo).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps the exited process of `pidfd` (blocking until it exits) and returns its status, in the
/// form `std::process` gives (`exit status: 3`, `signal: 9 (SIGKILL)`).
pub fn wait(pidfd: &OwnedFd) -> io::Result<ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        // SAFETY: a zeroed siginfo_t is valid for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; the pidfd is open.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED,
            )
        };
        if ret != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid filled a SIGCHLD siginfo, whose status field is valid.
        let value = unsafe { info.si_status() };
        let raw = match info.si_code {
            libc::CLD_EXITED => (value & 0xff) << 8,
            libc::CLD_DUMPED => (value & 0x7f) | 0x80,
            _ => value & 0x7f,
        };
        return Ok(ExitStatus::from_raw(raw));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn run(program: &str, args: &[&str]) -> (Spawned, File) {
        let dir = tempfile::tempdir().unwrap();
        let out_path = dir.path().join("out");
        let out = File::create(&out_path).unwrap();
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let spawned = spawn(&SpawnSpec {
            program: Path::new(program),
            args: &args,
            stdout: &out,
            stderr: &out,
            cgroup: None,
        })
        .unwrap();
        (spawned, File::open(out_path).unwrap())
    }

    /// Needs root (a new PID namespace), as CI runs.
    #[test]
    fn the_child_is_pid_1_of_its_namespace_with_its_output_and_status() {
        let (child, mut out) = run("/bin/sh", &["-c", "echo pid $$; read x; exit 3"]);
        assert!(child.pid > 1);
        assert_eq!(wait(&child.pidfd).unwrap().code(), Some(3));
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(text, "pid 1\n", "stdin is /dev/null, so read ends at once");
    }

    #[test]
    fn a_signal_through_the_pidfd_reaches_the_child() {
        // As PID 1 of its namespace, sh gets SIGKILL (never ignored) but would ignore SIGTERM.
        let (child, _) = run("/bin/sh", &["-c", "while :; do sleep 1; done"]);
        send_signal(&child.pidfd, libc::SIGKILL).unwrap();
        let status = wait(&child.pidfd).unwrap();
        assert_eq!(status.to_string(), "signal: 9 (SIGKILL)");
        assert!(send_signal(&child.pidfd, libc::SIGKILL).is_err(), "reaped");
    }

    #[test]
    fn a_missing_program_is_an_error_and_leaves_no_child() {
        let out = tempfile::tempfile().unwrap();
        let err = spawn(&SpawnSpec {
            program: Path::new("/nonexistent/husk-vmm"),
            args: &[],
            stdout: &out,
            stderr: &out,
            cgroup: None,
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
