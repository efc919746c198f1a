//! Why a VM stopped and which process exit status that maps to.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Process exit statuses of `husk-vmm` (also listed in `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The guest rebooted or powered off (i8042 reset, triple fault, halt), or the VM was stopped
    /// by SIGTERM/SIGINT.
    Ok = 0,
    /// Internal error of the monitor (setup failure, KVM ioctl failure).
    InternalError = 1,
    /// Invalid command line (clap's usage error status).
    Usage = 2,
    /// The guest kernel panicked.
    GuestPanic = 3,
    /// The host's /dev/kvm cannot run a standard guest (missing, PVM, no VMX/SVM).
    KvmUnusable = 4,
    /// The kernel, initrd or a disk image is missing or invalid.
    BadImage = 5,
    /// A vCPU failed (KVM internal error, emulation failure, failed VM entry).
    VcpuFailure = 6,
    /// A thread made a system call its seccomp filter forbids.
    Seccomp = 7,
}

/// The reason a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset through the i8042 controller.
    I8042Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): how `reboot=t` ends.
    TripleFault,
    /// KVM reported a system event (shutdown or reset through a paravirtual path).
    SystemEvent(u32),
    /// A vCPU halted with interrupts disabled; treated as a power-off.
    Halted,
    /// The monitor was asked to stop (signal or `StopHandle`).
    Stopped,
    /// A vCPU failed.
    VcpuError(String),
}

impl VmExit {
    /// The process exit status for this exit, given whether the guest printed a kernel panic.
    pub fn exit_code(&self, guest_panicked: bool) -> ExitCode {
        match self {
            VmExit::VcpuError(_) => ExitCode::VcpuFailure,
            VmExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_CRASH) => ExitCode::GuestPanic,
            _ if guest_panicked => ExitCode::GuestPanic,
            _ => ExitCode::Ok,
        }
    }
}

/// Shared by everything that can end the VM: the first reason recorded wins, and the event loop
/// is woken through an eventfd.
#[derive(Debug)]
pub struct ExitHandle {
    reason: Arc<Mutex<Option<VmExit>>>,
    evt: EventFd,
}

impl ExitHandle {
    /// A new handle with a fresh eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitHandle {
            reason: Arc::new(Mutex::new(None)),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Another handle for the same VM (the eventfd is duplicated).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(ExitHandle {
            reason: Arc::clone(&self.reason),
            evt: self.evt.try_clone()?,
        })
    }

    /// Records `exit` unless a reason is already recorded, and wakes the event loop.
    pub fn request(&self, exit: VmExit) {
        if let Ok(mut reason) = self.reason.lock() {
            if reason.is_none() {
                *reason = Some(exit);
            }
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal the VM exit eventfd: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// The eventfd the event loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
