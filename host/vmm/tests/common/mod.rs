//! Helpers shared by the payload tests: a PVH ELF builder, small 32-bit programs, a captured
//! console, VM configuration and a run with a watchdog.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // each test binary uses a subset

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_vmm::vmm::RunOutcome;
use husk_vmm::{Vm, VmConfig, VmExit};

pub const LOAD_ADDR: u64 = 0x10_0000;

/// A minimal ELF64 executable: one PT_LOAD segment with `code` at 1 MiB and a PT_NOTE carrying
/// the Xen PVH entry (XEN_ELFNOTE_PHYS32_ENTRY = 18) pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
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
pub fn print_then_reset(text: &str) -> Vec<u8> {
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
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

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
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub struct Payload {
    _dir: tempdir::Dir,
    pub kernel: PathBuf,
}

pub mod tempdir {
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

pub fn write_payload(tag: &str, code: &[u8]) -> Payload {
    let dir = tempdir::Dir::new(tag);
    let kernel = dir.path().join("payload.elf");
    std::fs::write(&kernel, pvh_elf(code)).unwrap();
    Payload { _dir: dir, kernel }
}

pub fn config(kernel: PathBuf, console: &Console, vcpus: u8) -> VmConfig {
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
        filesystems: Vec::new(),
    }
}

/// Runs the VM with a watchdog: a payload that never stops is ended after 60 s, and the test
/// then fails on the exit reason rather than hanging.
pub fn run(config: VmConfig) -> RunOutcome {
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
