//! Signals: SIGTERM/SIGINT arrive on a signalfd polled by the event loop; vCPU threads are
//! kicked out of KVM_RUN with a real-time signal whose handler does nothing.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Once;

use vmm_sys_util::signal::{block_signal, create_sigset, register_signal_handler, SIGRTMIN};

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the kick signal (once per process).
pub fn install_vcpu_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(vcpu_kick_signal(), noop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// A signalfd for SIGTERM and SIGINT.
pub struct TerminationSignals {
    fd: File,
}

impl TerminationSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread (and the threads it creates afterwards)
    /// and returns a signalfd receiving them. Call it before spawning any thread.
    pub fn block() -> std::io::Result<Self> {
        let signals = [libc::SIGTERM, libc::SIGINT];
        for sig in signals {
            block_signal(sig)
                .map_err(|e| std::io::Error::other(format!("cannot block signal {sig}: {e}")))?;
        }
        let set =
            create_sigset(&signals).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: `set` is a valid, initialized sigset; -1 asks for a new fd, which we check and
        // then own exclusively.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created, valid file descriptor owned by nobody else.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(TerminationSignals { fd })
    }

    /// Reads one pending signal; returns its number.
    pub fn read(&mut self) -> Option<u32> {
        let mut info = [0u8; 128];
        self.fd.read_exact(&mut info).ok()?;
        Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
    }
}

impl AsRawFd for TerminationSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
