//! Building a VM from a [`VmConfig`] and running it until it stops.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::signal::Killable;

use crate::arch::{cpuid, mptable, regs, MAX_VCPUS};
use crate::boot::{self, BootError};
use crate::device_manager::{DeviceManager, DeviceManagerError, VirtioEntry};
use crate::devices::serial::ConsoleWriter;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::fs::{FsConfig, FsError, VirtioFs};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::Bus;
use crate::exit::{ExitCode, ExitHandle, VmExit};
use crate::host_check::{check_host_kvm, HostCheckError};
use crate::layout::KVM_TSS_ADDRESS;
use crate::memory::{self, GuestMem, MemoryError};
use crate::seccomp::{self, SeccompError};
use crate::signals::{install_vcpu_kick_handler, vcpu_kick_signal, TerminationSignals};
use crate::vcpu::Vcpu;

/// What to run.
pub struct VmConfig {
    /// The guest kernel: an ELF vmlinux with a PVH entry note.
    pub kernel: PathBuf,
    /// An initrd (cpio archive), if any.
    pub initrd: Option<PathBuf>,
    /// Appended to [`boot::DEFAULT_CMDLINE`] and the device announcements.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Where the serial console goes.
    pub console: Box<dyn Write + Send>,
    /// Size cap on the console output.
    pub console_cap: Option<u64>,
    /// Skip the check that /dev/kvm can run a standard guest (for tiny payloads on PVM).
    pub allow_emulated_kvm: bool,
    /// Add a virtio-rng device.
    pub rng: bool,
    /// virtio-blk devices, in order (the guest sees them as vda, vdb, ...).
    pub blocks: Vec<BlockConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shared directories.
    pub filesystems: Vec<FsConfig>,
}

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The host cannot run a standard guest.
    #[error(transparent)]
    HostCheck(#[from] HostCheckError),
    /// A seccomp filter could not be set up.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A KVM ioctl failed.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// KVM lacks a capability husk needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// Invalid vCPU count.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    BadVcpus(u8),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Setting vCPU registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Wiring up devices.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// A device's back end could not be created.
    #[error("{what}: {err}")]
    DeviceSetup {
        /// The device.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// A disk image could not be opened.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(crate::devices::virtio::vsock::VsockError),
    /// A shared directory could not be set up.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Host I/O (eventfd, epoll, threads).
    #[error("{what}: {err}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The error.
        err: std::io::Error,
    },
}

impl VmError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            VmError::HostCheck(_) | VmError::MissingCap(_) => ExitCode::KvmUnusable,
            VmError::Boot(BootError::Cmdline(_)) | VmError::BadVcpus(_) => ExitCode::Usage,
            VmError::Boot(_) => ExitCode::BadImage,
            VmError::Memory(MemoryError::BadSize(_)) => ExitCode::Usage,
            VmError::Fs(FsError::BadTag(_) | FsError::DuplicateTag(_)) => ExitCode::Usage,
            VmError::DeviceSetup { .. } | VmError::Block(_) | VmError::Fs(_) => ExitCode::BadImage,
            _ => ExitCode::InternalError,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |err| VmError::Io { what, err }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Why the VM stopped.
    pub exit: VmExit,
    /// Whether the guest printed a kernel panic on its console.
    pub guest_panicked: bool,
}

impl RunOutcome {
    /// The process exit status.
    pub fn exit_code(&self) -> ExitCode {
        self.exit.exit_code(self.guest_panicked)
    }
}

/// A VM ready to run.
pub struct Vm {
    _kvm: Kvm,
    _vm_fd: VmFd,
    _mem: GuestMem,
    vcpus: Vec<(u8, VcpuFd)>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    virtio: Vec<VirtioEntry>,
    exit: ExitHandle,
    panicked: Arc<AtomicBool>,
    signals: Option<TerminationSignals>,
    seccomp: Option<seccomp::Mode>,
}

const REQUIRED_CAPS: [(Cap, &str); 4] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
];

impl Vm {
    /// Builds the machine: checks the host, creates the VM, memory, devices, loads the guest
    /// and configures the vCPUs. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpus(config.vcpus));
        }
        if !config.allow_emulated_kvm {
            check_host_kvm()?;
        }
        let kvm = Kvm::new().map_err(|e| HostCheckError::NoKvm(e.into()))?;
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create_guest_memory(config.memory_mib)?;
        memory::register_with_kvm(&vm_fd, &mem)?;
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, path, kernel.end)?),
            None => None,
        };

        let exit = ExitHandle::new().map_err(io_err("cannot create the exit eventfd"))?;
        let panicked = Arc::new(AtomicBool::new(false));
        let mut dm = DeviceManager::new();
        let console = ConsoleWriter::new(config.console, config.console_cap, panicked.clone());
        dm.add_serial(&vm_fd, console)?;
        dm.add_i8042(
            exit.try_clone()
                .map_err(io_err("cannot clone the exit eventfd"))?,
        )?;
        if config.rng {
            let rng = Rng::new().map_err(|err| VmError::DeviceSetup {
                what: "cannot open /dev/urandom for virtio-rng".into(),
                err,
            })?;
            dm.add_virtio(&vm_fd, &mem, Box::new(rng))?;
        }
        for block in &config.blocks {
            let dev = Block::open(block)?;
            dm.add_virtio(&vm_fd, &mem, Box::new(dev))?;
        }
        if let Some(vsock) = &config.vsock {
            let dev = Vsock::new(vsock).map_err(VmError::Vsock)?;
            dm.add_virtio(&vm_fd, &mem, Box::new(dev))?;
        }
        // Last: PassthroughFs sets the umask to 0, after the vsock socket exists.
        for (i, fs) in config.filesystems.iter().enumerate() {
            if config.filesystems.iter().take(i).any(|o| o.tag == fs.tag) {
                return Err(FsError::DuplicateTag(fs.tag.clone()).into());
            }
            dm.add_virtio(&vm_fd, &mem, Box::new(VirtioFs::new(fs)?))?;
        }

        let cmdline = boot::build_cmdline(&dm.cmdline_entries(), &config.cmdline)?;
        boot::write_boot_info(&mem, &cmdline, initrd)?;
        mptable::setup_mptable(&mem, config.vcpus)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpuid::filter_cpuid(&supported, index, config.vcpus, tsc_deadline);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&fd)?;
            regs::setup_regs(&fd, kernel.entry)?;
            regs::setup_sregs(&fd, &mem)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            vcpus.push((index, fd));
        }
        tracing::info!(
            "VM ready: {} vCPUs, {} MiB, entry 0x{:x}, cmdline {:?}",
            config.vcpus,
            config.memory_mib,
            kernel.entry,
            boot::read_cmdline(&mem).unwrap_or_default()
        );
        let DeviceManager {
            pio, mmio, virtio, ..
        } = dm;
        Ok(Vm {
            _kvm: kvm,
            _vm_fd: vm_fd,
            _mem: mem,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            virtio,
            exit,
            panicked,
            signals: None,
            seccomp: None,
        })
    }

    /// A handle that stops the VM when `request(VmExit::Stopped)` is called on it.
    pub fn stop_handle(&self) -> std::io::Result<ExitHandle> {
        self.exit.try_clone()
    }

    /// Stops the VM when SIGTERM or SIGINT arrive on `signals`.
    pub fn set_termination_signals(&mut self, signals: TerminationSignals) {
        self.signals = Some(signals);
    }

    /// Has [`Vm::run`] put every vCPU thread under its seccomp filter before its first
    /// `KVM_RUN`, and the calling thread under the event loop's once the vCPUs are started. The
    /// calling thread keeps its filter after `run` returns: for a process that only exits
    /// afterwards (husk-vmm).
    pub fn set_seccomp(&mut self, mode: seccomp::Mode) {
        self.seccomp = Some(mode);
    }

    /// Runs the VM until it stops; every vCPU thread is joined before this returns.
    pub fn run(mut self) -> Result<RunOutcome, VmError> {
        install_vcpu_kick_handler().map_err(io_err("cannot install the vCPU kick handler"))?;
        if self.seccomp.is_some() {
            seccomp::install_trap_handler()?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for (index, fd) in std::mem::take(&mut self.vcpus) {
            let vcpu = Vcpu {
                fd,
                index,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self
                    .exit
                    .try_clone()
                    .map_err(io_err("cannot clone the exit eventfd"))?,
                stop: stop.clone(),
                seccomp: self.seccomp,
            };
            match vcpu.spawn() {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let loop_result = match (spawn_error, self.seccomp) {
            (Some(e), _) => Err(VmError::Io {
                what: "cannot start a vCPU thread",
                err: e,
            }),
            (None, Some(mode)) => match seccomp::apply(seccomp::Role::Main, mode) {
                Ok(()) => self.event_loop(),
                Err(e) => Err(e.into()),
            },
            (None, None) => self.event_loop(),
        };
        stop_vcpus(&stop, threads);
        loop_result?;
        let exit = self.exit.reason().unwrap_or(VmExit::Stopped);
        Ok(RunOutcome {
            exit,
            guest_panicked: self.panicked.load(Ordering::SeqCst),
        })
    }

    fn event_loop(&mut self) -> Result<(), VmError> {
        const TOKEN_EXIT: u64 = 0;
        const TOKEN_SIGNAL: u64 = 1;
        const TOKEN_DEVICE_BASE: u64 = 2;
        // Token layout for devices: base + device * 64 + (queue index | 63 for the back end).
        const BACKEND: u64 = 63;
        let epoll = Epoll::new().map_err(io_err("epoll_create"))?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll_ctl"))
        };
        add(self.exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        if let Some(sig) = &self.signals {
            add(sig.as_raw_fd(), TOKEN_SIGNAL)?;
        }
        for (d, entry) in self.virtio.iter().enumerate() {
            let base = TOKEN_DEVICE_BASE + d as u64 * 64;
            for (q, evt) in entry.queue_evts.iter().enumerate() {
                add(evt.as_raw_fd(), base + q as u64)?;
            }
            if let Some(fd) = entry.backend_fd {
                add(fd, base + BACKEND)?;
            }
        }
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(VmError::Io {
                        what: "epoll_wait",
                        err: e,
                    })
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_EXIT => return Ok(()),
                    TOKEN_SIGNAL => {
                        if let Some(signo) = self.signals.as_mut().and_then(|s| s.read()) {
                            tracing::info!("signal {signo} received: stopping the VM");
                            self.exit.request(VmExit::Stopped);
                            return Ok(());
                        }
                    }
                    token => {
                        let d = ((token - TOKEN_DEVICE_BASE) / 64) as usize;
                        let slot = (token - TOKEN_DEVICE_BASE) % 64;
                        let Some(entry) = self.virtio.get(d) else {
                            continue;
                        };
                        let Ok(mut transport) = entry.transport.lock() else {
                            continue;
                        };
                        if slot == BACKEND {
                            transport.process_backend();
                        } else if let Some(evt) = entry.queue_evts.get(slot as usize) {
                            let _ = evt.read();
                            transport.process_queue(slot as usize);
                        }
                    }
                }
            }
        }
    }
}

/// Stops every vCPU thread: sets the stop flag and kicks each thread out of KVM_RUN until it
/// has ended (a kick that lands just before KVM_RUN is retried), then joins them.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        while !t.is_finished() {
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                tracing::warn!("cannot kick a vCPU thread: {e}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
