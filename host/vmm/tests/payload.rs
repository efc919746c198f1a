//! Payload tests: tiny hand-assembled guests booted through the real PVH path (an ELF with a
//! PVH note, loaded by husk-vmm) on whatever /dev/kvm the machine has, PVM included.
//! They need root and /dev/kvm, and fail loudly without them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a failure is a test failure

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_vmm::vmm::RunOutcome;
use husk_vmm::{ExitCode, Vm, VmConfig, VmExit};

const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal ELF64 executable: one PT_LOAD segment with `code` at 1 MiB and a PT_NOTE carrying
/// the Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY = 18) pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let ehdr_len = 64u64;
    let phdr_len = 56u64;
    let note_off = ehdr_len + 2 * phdr_len;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // type
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let code_off = (note_off + note.len() as u64 + 15) & !15;

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&ehdr_len.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(ehdr_len as u16).to_le_bytes());
    elf.extend_from_slice(&(phdr_len as u16).to_le_bytes());
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&0u16.to_le_bytes());
    elf.extend_from_slice(&0u16.to_le_bytes());
    let phdr = |elf: &mut Vec<u8>, p_type: u32, off: u64, paddr: u64, size: u64| {
        elf.extend_from_slice(&p_type.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&off.to_le_bytes());
        elf.extend_from_slice(&paddr.to_le_bytes()); // vaddr
        elf.extend_from_slice(&paddr.to_le_bytes()); // paddr
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&size.to_le_bytes());
        elf.extend_from_slice(&4u64.to_le_bytes());
    };
    phdr(&mut elf, 1, code_off, LOAD_ADDR, code.len() as u64);
    phdr(&mut elf, 4, note_off, 0, note.len() as u64);
    elf.extend_from_slice(&note);
    elf.resize(code_off as usize, 0);
    elf.extend_from_slice(code);
    elf
}

/// 32-bit code: print the NUL-terminated string placed right after the code, then reset
/// through the i8042 controller.
fn print_then_reset(text: &str) -> Vec<u8> {
    let prologue_len = 5;
    let mut code = Vec::new();
    let body: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xb0, 0xfe, // done: mov al, 0xfe
        0xe6, 0x64, // out 0x64, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ];
    let msg_addr = LOAD_ADDR as u32 + prologue_len + body.len() as u32;
    code.push(0xbe); // mov esi, imm32
    code.extend_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(body);
    code.extend_from_slice(text.as_bytes());
    code.push(0);
    code
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Payload {
    _dir: tempdir::Dir,
    kernel: PathBuf,
}

mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "husk-vmm-payload-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn write_payload(tag: &str, code: &[u8]) -> Payload {
    let dir = tempdir::Dir::new(tag);
    let kernel = dir.path().join("payload.elf");
    std::fs::write(&kernel, pvh_elf(code)).unwrap();
    Payload { _dir: dir, kernel }
}

fn config(kernel: PathBuf, console: &Console, vcpus: u8) -> VmConfig {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: payload tests need KVM (any backend, PVM included) and root"
    );
    VmConfig {
        kernel,
        initrd: None,
        cmdline: String::new(),
        vcpus,
        memory_mib: 32,
        console: Box::new(console.clone()),
        console_cap: None,
        allow_emulated_kvm: true,
        rng: true,
        blocks: Vec::new(),
        vsock: None,
    }
}

/// Runs the VM with a watchdog: a payload that never stops is ended after 60 s, and the test
/// then fails on the exit reason rather than hanging.
fn run(config: VmConfig) -> RunOutcome {
    let vm = Vm::new(config).expect("VM setup failed");
    let stop = vm.stop_handle().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            stop.request(VmExit::VcpuError(
                "watchdog: payload did not stop in 60 s".into(),
            ));
        }
    });
    let outcome = vm.run().expect("VM run failed");
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    outcome
}

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
