//! `husk-vmm`: boots one microVM.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode as ProcessExitCode;

use clap::Parser;
use husk_vmm::signals::TerminationSignals;
use husk_vmm::{ExitCode, Vm, VmConfig};

const EXIT_CODES: &str = "\
Exit status:
  0  the guest rebooted or powered off (i8042 reset, triple fault), or SIGTERM/SIGINT stopped it
  1  internal error of the monitor
  2  invalid command line
  3  the guest kernel panicked (\"Kernel panic - not syncing\" seen on the console)
  4  /dev/kvm cannot run a standard guest (missing, PVM backend, no VMX/SVM)
  5  the kernel, initrd, a disk image or a shared directory is missing or invalid
  6  a vCPU failed (KVM internal error, emulation failure, failed VM entry)";

/// husk's virtual machine monitor: boots an x86_64 Linux kernel (ELF vmlinux, PVH entry)
/// directly on KVM with a serial console and virtio-mmio devices.
#[derive(Parser, Debug)]
#[command(name = "husk-vmm", version, after_help = EXIT_CODES)]
struct Args {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry note (CONFIG_PVH=y).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk (cpio archive, optionally compressed).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 pci=off nomodule" and one virtio_mmio.device= per device).
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Number of vCPUs (one host thread each), 1..=32.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB (16 ..= 1048576).
    #[arg(long = "memory-mib", value_name = "N", default_value_t = 256)]
    memory_mib: u64,
    /// Serial console (ttyS0) output: a file path, or "-" for standard output.
    #[arg(long, value_name = "PATH|-", default_value = "-")]
    console: String,
    /// Size cap of the console file in bytes; output beyond it is discarded (not applied to "-").
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    console_max_bytes: u64,
    /// A virtio-blk disk backed by a raw image; ",ro" makes it read-only. Repeatable: the guest
    /// sees them as /dev/vda, /dev/vdb, ... in order.
    #[arg(long, value_name = "PATH[,ro]")]
    block: Vec<husk_vmm::devices::virtio::block::BlockConfig>,
    /// Host side of virtio-vsock (Firecracker-compatible): clients connect to PATH and send
    /// "CONNECT <port>\n"; guest connections to host port P go to PATH_P.
    #[arg(long, value_name = "PATH", requires = "guest_cid")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID (3 ..= 2^32-2); needs --vsock-uds.
    #[arg(long, value_name = "N", requires = "vsock_uds")]
    guest_cid: Option<u64>,
    /// Share a host directory with the guest over virtio-fs; the guest mounts it with
    /// "mount -t virtiofs TAG DIR". PATH must be an existing directory; TAG is 1 to 36 bytes of
    /// printable ASCII (no ',' or spaces). The guest cannot leave PATH (symlinks are not
    /// followed on the host, no device nodes are opened). Repeatable, one tag each.
    #[arg(long, value_name = "PATH,tag=TAG")]
    fs: Vec<husk_vmm::devices::virtio::fs::FsConfig>,
    /// Do not add the virtio-rng entropy device.
    #[arg(long)]
    no_rng: bool,
    /// Run even if /dev/kvm cannot run a standard guest (PVM, no VMX/SVM): for tiny payloads
    /// and tests only; a Linux guest will not boot in useful time.
    #[arg(long)]
    allow_emulated_kvm: bool,
}

fn console_writer(spec: &str) -> anyhow::Result<(Box<dyn Write + Send>, bool)> {
    if spec == "-" {
        return Ok((Box::new(std::io::stdout()), false));
    }
    let file = File::create(spec)
        .map_err(|e| anyhow::anyhow!("cannot create the console file {spec}: {e}"))?;
    Ok((Box::new(LineWriter::new(file)), true))
}

/// Raises the soft limit on open files to the hard limit, as virtiofsd does: the virtio-fs
/// device holds one `O_PATH` fd per inode the guest has looked up, and the usual soft limit of
/// 1024 ran out after ~730 small files (measured by `make bench-fs`). The hard limit still
/// bounds what a guest can make the monitor hold; past it requests fail with EMFILE.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, owned `lim` and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the valid `raised`; raising the soft limit up to the hard limit
    // needs no privilege and affects only this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            "setrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.fs.is_empty() {
        raise_open_file_limit();
    }
    // Block SIGTERM/SIGINT before any thread exists so that every thread inherits the mask and
    // the signals arrive only on the signalfd.
    let signals = TerminationSignals::block()?;
    let (console, is_file) = console_writer(&args.console)?;
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        console,
        console_cap: is_file.then_some(args.console_max_bytes),
        allow_emulated_kvm: args.allow_emulated_kvm,
        rng: !args.no_rng,
        blocks: args.block,
        filesystems: args.fs,
        vsock: args
            .vsock_uds
            .zip(args.guest_cid)
            .map(
                |(uds_path, guest_cid)| husk_vmm::devices::virtio::vsock::VsockConfig {
                    uds_path,
                    guest_cid,
                },
            ),
    };
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            return Ok(e.exit_code());
        }
    };
    vm.set_termination_signals(signals);
    match vm.run() {
        Ok(outcome) => {
            let code = outcome.exit_code();
            match code {
                ExitCode::Ok => tracing::info!("VM stopped: {:?}", outcome.exit),
                ExitCode::GuestPanic => {
                    eprintln!("husk-vmm: the guest kernel panicked ({:?})", outcome.exit)
                }
                _ => eprintln!("husk-vmm: VM stopped with an error: {:?}", outcome.exit),
            }
            Ok(code)
        }
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            Ok(e.exit_code())
        }
    }
}

fn main() -> ProcessExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ProcessExitCode::from(code as u8),
        Err(e) => {
            eprintln!("husk-vmm: {e:#}");
            ProcessExitCode::from(ExitCode::InternalError as u8)
        }
    }
}
