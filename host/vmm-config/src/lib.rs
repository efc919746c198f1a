//! husk-vmm's command line as one type: [`VmmConfig`] is what husk-vmm parses, and what the
//! front ends (the `husk` runtime, the containerd shim) build and turn into arguments with
//! [`VmmConfig::to_args`]. No KVM or rust-vmm code here, only the definition.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod spec;
#[cfg(test)]
mod tests;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::builder::{OsStringValueParser, TypedValueParser};
/// `VmmConfig::parse` / `try_parse_from`, for husk-vmm and for tests that read a running
/// husk-vmm's command line back.
pub use clap::Parser;

pub use spec::{validate_tag, BlockSpec, FsSpec, SpecError, TagError, TAG_MAX_LEN};

/// The monitor's executable name (looked up next to the front end or on `PATH`).
pub const VMM_BINARY: &str = "husk-vmm";

const DEFAULT_CMDLINE: &str = "";
const DEFAULT_VCPUS: u8 = 1;
const DEFAULT_MEMORY_MIB: u64 = 256;
const DEFAULT_CONSOLE: &str = "-";
const DEFAULT_CONSOLE_MAX_BYTES: u64 = 16 << 20;

const EXIT_CODES: &str = "\
Exit status:
  0  the guest rebooted or powered off (i8042 reset, triple fault), or SIGTERM/SIGINT stopped it
  1  internal error of the monitor
  2  invalid command line
  3  the guest kernel panicked (\"Kernel panic - not syncing\" seen on the console)
  4  /dev/kvm cannot run a standard guest (missing, PVM backend, no VMX/SVM)
  5  the kernel, initrd, a disk image or a shared directory is missing or invalid
  6  a vCPU failed (KVM internal error, emulation failure, failed VM entry)
  7  a thread made a system call its seccomp filter forbids (the log names it)";

/// husk's virtual machine monitor: boots an x86_64 Linux kernel (ELF vmlinux, PVH entry)
/// directly on KVM with a serial console and virtio-mmio devices.
#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "husk-vmm", version, after_help = EXIT_CODES)]
pub struct VmmConfig {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry note (CONFIG_PVH=y).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio archive, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 pci=off nomodule" and one virtio_mmio.device= per device).
    #[arg(long, value_name = "ARGS", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs (one host thread each), 1..=32.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_VCPUS)]
    pub vcpus: u8,
    /// Guest memory in MiB (16 ..= 1048576).
    #[arg(long = "memory-mib", value_name = "N", default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory_mib: u64,
    /// Serial console (ttyS0) output: a file path, or "-" for standard output.
    #[arg(long, value_name = "PATH|-", default_value = DEFAULT_CONSOLE)]
    pub console: String,
    /// Size cap of the console file in bytes; output beyond it is discarded (not applied to "-").
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CONSOLE_MAX_BYTES)]
    pub console_max_bytes: u64,
    /// A virtio-blk disk backed by a raw image; ",ro" makes it read-only. Repeatable: the guest
    /// sees them as /dev/vda, /dev/vdb, ... in order.
    #[arg(
        long,
        value_name = "PATH[,ro]",
        value_parser = OsStringValueParser::new().try_map(spec::parse_block)
    )]
    pub block: Vec<BlockSpec>,
    /// Host side of virtio-vsock (Firecracker-compatible): clients connect to PATH and send
    /// "CONNECT <port>\n"; guest connections to host port P go to PATH_P.
    // The doc comment is the help text: "<port>" is meant literally, not as HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, value_name = "PATH", requires = "guest_cid")]
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID (3 ..= 2^32-2); needs --vsock-uds.
    #[arg(long, value_name = "N", requires = "vsock_uds")]
    pub guest_cid: Option<u64>,
    /// Share a host directory with the guest over virtio-fs; the guest mounts it with
    /// "mount -t virtiofs TAG DIR". PATH must be an existing directory; TAG is 1 to 36 bytes of
    /// printable ASCII (no ',' or spaces). The guest cannot leave PATH (symlinks are not
    /// followed on the host, no device nodes are opened). Repeatable, one tag each.
    #[arg(
        long,
        value_name = "PATH,tag=TAG",
        value_parser = OsStringValueParser::new().try_map(spec::parse_fs)
    )]
    pub fs: Vec<FsSpec>,
    /// Do not add the virtio-rng entropy device.
    #[arg(long)]
    pub no_rng: bool,
    /// Run even if /dev/kvm cannot run a standard guest (PVM, no VMX/SVM): for tiny payloads
    /// and tests only; a Linux guest will not boot in useful time.
    #[arg(long)]
    pub allow_emulated_kvm: bool,
    /// Run without the jail (own mount namespace and root, no capabilities but virtio-fs's,
    /// no_new_privs, bounded limits): for debugging only. The jail needs root.
    #[arg(long)]
    pub no_jail: bool,
    /// Let system calls the seccomp filters forbid through, logged by the kernel (audit type
    /// 1326), instead of stopping the VM: for debugging only.
    #[arg(long)]
    pub seccomp_log: bool,
}

/// `--name=value`: the `=` form keeps a value that starts with '-' (or is empty) a value.
fn flag(name: &str, value: impl AsRef<OsStr>) -> OsString {
    let mut arg = OsString::from(format!("--{name}="));
    arg.push(value);
    arg
}

impl VmmConfig {
    /// A configuration booting `kernel`, everything else at husk-vmm's defaults.
    pub fn new(kernel: PathBuf) -> Self {
        VmmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: DEFAULT_CONSOLE.to_string(),
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
            block: Vec::new(),
            vsock_uds: None,
            guest_cid: None,
            fs: Vec::new(),
            no_rng: false,
            allow_emulated_kvm: false,
            no_jail: false,
            seccomp_log: false,
        }
    }

    /// husk-vmm's arguments (without argv\[0\]) for this configuration: every flag that has a
    /// value, defaults included, in a fixed order, each as `--name=value`. husk-vmm parses them
    /// back into a configuration equal to `self` (for values it accepts: a [`FsSpec`] made by
    /// [`FsSpec::new`], a non-empty block path).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec![flag("kernel", &self.kernel)];
        if let Some(initrd) = &self.initrd {
            args.push(flag("initrd", initrd));
        }
        args.push(flag("cmdline", &self.cmdline));
        args.push(flag("vcpus", self.vcpus.to_string()));
        args.push(flag("memory-mib", self.memory_mib.to_string()));
        args.push(flag("console", &self.console));
        args.push(flag(
            "console-max-bytes",
            self.console_max_bytes.to_string(),
        ));
        args.extend(self.block.iter().map(|b| flag("block", b.to_arg())));
        if let Some(uds) = &self.vsock_uds {
            args.push(flag("vsock-uds", uds));
        }
        if let Some(cid) = self.guest_cid {
            args.push(flag("guest-cid", cid.to_string()));
        }
        args.extend(self.fs.iter().map(|f| flag("fs", f.to_arg())));
        if self.no_rng {
            args.push(OsString::from("--no-rng"));
        }
        if self.allow_emulated_kvm {
            args.push(OsString::from("--allow-emulated-kvm"));
        }
        if self.no_jail {
            args.push(OsString::from("--no-jail"));
        }
        if self.seccomp_log {
            args.push(OsString::from("--seccomp-log"));
        }
        args
    }
}
