//! Smoke test of the whole chain: the guest kernel (kernel-config/), the guest image
//! (guest-agent/initramfs/) and a real KVM (the test host on PVM machines). QEMU's `-M microvm`
//! is the reference monitor until husk-vmm boots guests by itself.
//!
//! Run with `make test-e2e` (or `tests/e2e/run`); it needs `make guest` first.

use std::process::Command;
use std::time::Duration;

use husk_agent_protocol::BOOT_MARKER;
use husk_e2e::{guest_initramfs, guest_kernel, require_program, require_real_kvm, Watched};

/// Generous: under the test host's TCG a boot takes seconds, and the machine may be busy.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// The guest's kernel command line: console on the first serial port, a guest panic or reboot
/// ends QEMU (with -no-reboot).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

fn microvm(kernel: &std::path::Path, initramfs: &std::path::Path) -> Command {
    let mut qemu = Command::new(require_program("qemu-system-x86_64", "qemu-system-x86"));
    qemu.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,pcie=off,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "512",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-append",
        CMDLINE,
    ]);
    qemu.arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs);
    qemu
}

#[test]
fn guest_kernel_and_image_boot_to_the_agent_marker_under_qemu_microvm() {
    require_real_kvm();
    let kernel = guest_kernel();
    let initramfs = guest_initramfs();

    let mut guest = Watched::spawn("guest", &mut microvm(&kernel, &initramfs));
    let took = guest.expect_marker(BOOT_MARKER, BOOT_DEADLINE);
    let console = guest.output();
    guest.kill();

    eprintln!(
        "smoke: {BOOT_MARKER:?} on the console {:.2}s after QEMU started",
        took.as_secs_f64()
    );
    let linux_at = console.find("Linux version");
    let marker_at = console.find(BOOT_MARKER);
    assert!(
        matches!((linux_at, marker_at), (Some(l), Some(m)) if l < m),
        "the console should show the kernel's banner before the agent's marker; console:\n{console}"
    );
}
