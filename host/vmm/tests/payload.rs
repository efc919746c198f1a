//! Payload tests: tiny hand-assembled guests booted through the real PVH path (an ELF with a
//! PVH note, loaded by husk-vmm) on whatever /dev/kvm the machine has, PVM included.
//! They need root and /dev/kvm, and fail loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

mod common;

use std::time::Duration;

use common::*;
use husk_vmm::{ExitCode, Vm, VmExit};

#[test]
fn serial_output_reaches_the_console_and_reset_exits_zero() {
    let payload = write_payload("serial", &print_then_reset("hello from the guest\n"));
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 1));
    assert_eq!(console.text(), "hello from the guest\n");
    assert_eq!(outcome.exit, VmExit::I8042Reset);
    assert_eq!(outcome.exit_code(), ExitCode::Ok);
}

#[test]
fn i8042_reset_stops_the_vm_with_status_zero() {
    let payload = write_payload("reset", &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 1));
    assert_eq!(outcome.exit, VmExit::I8042Reset);
    assert_eq!(outcome.exit_code(), ExitCode::Ok);
}

#[test]
fn mmio_read_of_virtio_magic_version_and_device_id() {
    // The first virtio device (virtio-rng) sits at 0xd000_0000.
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xa1, 0x00, 0x00, 0x00, 0xd0,       // mov eax, [0xd0000000]  (MagicValue)
        0xee,                               // out dx, al
        0xc1, 0xe8, 0x08, 0xee,             // shr eax, 8; out dx, al
        0xc1, 0xe8, 0x08, 0xee,             // shr eax, 8; out dx, al
        0xc1, 0xe8, 0x08, 0xee,             // shr eax, 8; out dx, al
        0xa1, 0x04, 0x00, 0x00, 0xd0,       // mov eax, [0xd0000004]  (Version)
        0x04, 0x30, 0xee,                   // add al, '0'; out dx, al
        0xa1, 0x08, 0x00, 0x00, 0xd0,       // mov eax, [0xd0000008]  (DeviceID)
        0x04, 0x30, 0xee,                   // add al, '0'; out dx, al
        0xb0, 0xfe, 0xe6, 0x64,             // i8042 reset
        0xf4, 0xeb, 0xfd,
    ];
    let payload = write_payload("mmio", &code);
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 1));
    assert_eq!(console.text(), "virt24");
    assert_eq!(outcome.exit, VmExit::I8042Reset);
}

#[test]
fn triple_fault_is_a_reboot_with_status_zero() {
    // ud2 with an empty IDT: #UD cannot be delivered (#GP), double fault, triple fault, KVM_EXIT_SHUTDOWN.
    let payload = write_payload("triple", &[0x0f, 0x0b]);
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 1));
    assert_eq!(outcome.exit, VmExit::TripleFault);
    assert_eq!(outcome.exit_code(), ExitCode::Ok);
}

#[test]
fn panic_banner_on_the_console_gives_the_panic_status() {
    let text = "[    0.5] Kernel panic - not syncing: Attempted to kill init!\n";
    let payload = write_payload("panic", &print_then_reset(text));
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 1));
    assert_eq!(outcome.exit, VmExit::I8042Reset);
    assert!(outcome.guest_panicked);
    assert_eq!(outcome.exit_code(), ExitCode::GuestPanic);
}

#[test]
fn smp_vm_stops_and_joins_every_vcpu_thread() {
    // vCPU 1 waits for a SIPI that never comes; the reset by vCPU 0 must still end the run.
    let payload = write_payload("smp", &print_then_reset("bsp\n"));
    let console = Console::default();
    let outcome = run(config(payload.kernel.clone(), &console, 4));
    assert_eq!(console.text(), "bsp\n");
    assert_eq!(outcome.exit, VmExit::I8042Reset);
}

#[test]
fn stop_request_ends_a_spinning_guest() {
    let payload = write_payload("spin", &[0xeb, 0xfe]); // jmp $
    let console = Console::default();
    let vm = Vm::new(config(payload.kernel.clone(), &console, 2)).unwrap();
    let stop = vm.stop_handle().unwrap();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stop.request(VmExit::Stopped);
    });
    let outcome = vm.run().unwrap();
    stopper.join().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    assert_eq!(outcome.exit_code(), ExitCode::Ok);
}

#[test]
fn missing_kernel_is_a_bad_image_error() {
    let console = Console::default();
    let err = Vm::new(config("/nonexistent/vmlinux".into(), &console, 1))
        .err()
        .expect("a missing kernel must fail");
    assert_eq!(err.exit_code(), ExitCode::BadImage);
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn elf_without_pvh_note_is_refused() {
    let dir = tempdir::Dir::new("nonote");
    let mut elf = pvh_elf(&[0xf4]);
    // Turn the PT_NOTE program header into PT_NULL.
    let note_phdr = 64 + 56;
    elf[note_phdr..note_phdr + 4].copy_from_slice(&0u32.to_le_bytes());
    let kernel = dir.path().join("nonote.elf");
    std::fs::write(&kernel, elf).unwrap();
    let console = Console::default();
    let err = Vm::new(config(kernel, &console, 1))
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("PVH"), "{err}");
}
