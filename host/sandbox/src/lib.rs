//! husk's sandbox core: everything both front ends (the OCI runtime `husk` and the containerd
//! shim) need from a microVM, written once.
//!
//! - [`id`], [`bundle`], [`config`], [`sizing`]: what a sandbox is made from (a valid ID, an OCI
//!   bundle, husk's configuration, the VM's size).
//! - [`paths`]: a sandbox's files, and [`paths::vmm_config`], husk-vmm's typed command line
//!   ([`husk_vmm_config::VmmConfig`], which husk-vmm itself parses).
//! - [`cgroup`]: the host cgroup husk-vmm runs in, with its limits.
//! - [`launch`]: the one place husk-vmm is started (through [`spawn`]: its own PID namespace,
//!   its cgroup, a pidfd) ([`launch::ProcessLauncher`]), behind the
//!   [`launch::Launcher`] trait.
//! - [`vm`]: [`vm::Sandbox`]: boot (share, launch, agent connection cancelled when the VM dies,
//!   `CreateSandbox`), watch, shutdown (`DestroySandbox`, SIGTERM/SIGKILL) and cleanup.
//! - [`guest`]: the agent calls as the [`guest::Guest`] trait, over vsock ([`vsock`]).
//! - [`share`]: the virtio-fs share with each container's rootfs and mounts.
//! - [`pump`]: stdio and terminal pumps between host files and guest processes.
//! - [`process`]: the one rule against signalling a reused PID.
//! - [`stall`]: what is reported when a running sandbox's agent stops answering.
//! - [`fake`]: fakes of the seams (guest, launcher, mounts) for tests without a VM or root.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod fake;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod id;
pub mod launch;
pub mod paths;
pub mod process;
pub mod pump;
pub mod share;
pub mod sizing;
pub mod spawn;
pub mod stall;
pub mod vm;
pub mod vsock;

pub use guest::{Guest, SharedGuest};
pub use vm::{BootSpec, Host, Layout, Sandbox, SandboxError};
