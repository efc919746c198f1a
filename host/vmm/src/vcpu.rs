//! One thread per vCPU: KVM_RUN in a loop, port and MMIO accesses served from the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::Bus;
use crate::exit::{ExitHandle, VmExit};

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index (= APIC id).
    pub index: u8,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// How to end the VM.
    pub exit: ExitHandle,
    /// Set when the VM is stopping; checked after every exit from KVM_RUN.
    pub stop: Arc<AtomicBool>,
    /// The seccomp filter to apply before the first KVM_RUN, if any.
    pub seccomp: Option<crate::seccomp::Mode>,
}

impl Vcpu {
    /// Starts the vCPU thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        let Vcpu {
            fd,
            index,
            pio,
            mmio,
            exit,
            stop,
            seccomp,
        } = &mut self;
        if let Some(mode) = *seccomp {
            if let Err(e) = crate::seccomp::apply(crate::seccomp::Role::Vcpu, mode) {
                exit.request(VmExit::VcpuError(format!("vcpu{index}: {e}")));
                return;
            }
        }
        while !stop.load(Ordering::SeqCst) {
            let outcome = match fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::debug!("vcpu{index}: read of unmapped MMIO 0x{addr:x}");
                        data.fill(0);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::debug!("vcpu{index}: write to unmapped MMIO 0x{addr:x}");
                    }
                    None
                }
                Ok(VcpuExit::Hlt) => Some(VmExit::Halted),
                Ok(VcpuExit::Shutdown) => {
                    tracing::warn!("vcpu{index}: triple fault; {}", cpu_state(fd));
                    Some(VmExit::TripleFault)
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(VmExit::SystemEvent(kind)),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::VcpuError(format!(
                    "vcpu{index}: VM entry failed (hardware reason 0x{reason:x}, cpu {cpu})"
                ))),
                Ok(VcpuExit::InternalError) => Some(VmExit::VcpuError(format!(
                    "vcpu{index}: KVM internal error (emulation failure?); on a PVM host a \
                     standard guest cannot run"
                ))),
                Ok(VcpuExit::Intr) => None,
                Ok(other) => Some(VmExit::VcpuError(format!(
                    "vcpu{index}: unexpected exit {other:?}"
                ))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VmExit::VcpuError(format!(
                    "vcpu{index}: KVM_RUN failed: {e}"
                ))),
            };
            if let Some(reason) = outcome {
                tracing::info!("vcpu{index} stops the VM: {reason:?}");
                exit.request(reason);
                break;
            }
        }
    }
}

/// Where a vCPU stopped, for the log of an unexpected exit (a triple fault ends `reboot=t`, but
/// anywhere else it is a guest crash the log should explain).
fn cpu_state(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip=0x{:x} rsp=0x{:x} rflags=0x{:x} cr0=0x{:x} cr2=0x{:x} cr3=0x{:x} cr4=0x{:x} \
             efer=0x{:x} cs=0x{:x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
    }
}
