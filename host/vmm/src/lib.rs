//! husk-vmm: a minimal virtual machine monitor built on the rust-vmm crates.
//!
//! One process per microVM. Threads by role: the main thread sets the machine up and then runs
//! the event loop (virtio queue notifications, device back ends, signals, exit requests); one
//! thread per vCPU runs `KVM_RUN` and serves port and MMIO accesses.
//!
//! The guest is hostile: every value read from guest memory, a virtio queue or a device register
//! is bounded and validated before use.

pub mod arch;
pub mod boot;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod fuzzing;
pub mod guest_log;
pub mod host_check;
pub mod jail;
pub mod layout;
pub mod memory;
pub mod seccomp;
pub mod signals;
pub mod vcpu;
pub mod vmm;

pub use exit::{ExitCode, VmExit};
pub use vmm::{Vm, VmConfig};
