//! Registers, segments, FPU, MSRs and local APIC of a vCPU for the PVH entry.
//!
//! PVH starts the kernel in 32-bit protected mode with paging off, flat 4 GiB segments, and
//! %ebx pointing at the `hvm_start_info` structure.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_GDT_START, PVH_INFO_START};
use crate::memory::GuestMem;

/// Errors while setting up a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl on the vCPU failed.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The ioctl that failed.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Writing the boot GDT into guest memory failed.
    #[error("cannot write the boot GDT: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    MsrList,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |err| RegsError::Kvm { what, err }
}

/// Flat GDT: null, 32-bit code (0x08), data (0x10), TSS (0x18).
const BOOT_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;

fn segment(selector: u16, type_: u8, s: u8, limit: u32, g: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l: 0,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and loads flat protected-mode segments (paging off).
pub fn setup_sregs(vcpu: &VcpuFd, mem: &GuestMem) -> Result<(), RegsError> {
    for (i, desc) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(RegsError::Gdt)?;
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(0x08, 0xb, 1, 0xffff_ffff, 1, 1);
    let data = segment(0x10, 0x3, 1, 0xffff_ffff, 1, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, 0xb, 0, 0x67, 0, 0);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
}

/// Entry point in %rip, start info pointer in %rbx.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: PVH_INFO_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back (otherwise the guest runs uncached).
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The boot MSRs: syscall MSRs cleared, fast strings, write-back MTRR default.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != entries.len() {
        // KVM stops at the first MSR it refuses; report which one.
        let refused = entries.get(written).map(|e| e.index).unwrap_or_default();
        tracing::warn!(
            "KVM set only {written} of {} boot MSRs (refused 0x{refused:x})",
            entries.len()
        );
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = regs.get(offset + i).copied().unwrap_or_default() as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        if let Some(r) = regs.get_mut(offset + i) {
            *r = *b as std::os::raw::c_char;
        }
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (legacy PIC) and LINT1 as NMI, like a PC's BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}
