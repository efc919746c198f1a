//! The guest physical address map, in one place.
//!
//! ```text
//! 0x0000_0500  GDT used for the PVH entry (code and data descriptors)
//! 0x0000_6000  PVH hvm_start_info
//! 0x0000_7000  PVH memory map (e820-style entries)
//! 0x0000_8000  PVH module list (the initrd)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  MP table (up to 1 MiB: EBDA-like, reserved in the e820 map)
//! 0x0010_0000  start of high RAM: the kernel ELF loads at its own physical addresses
//! ...          initrd, page aligned, at the top of the RAM below the MMIO hole
//! 0xd000_0000  MMIO hole start: virtio-mmio devices, one 4 KiB page each
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 local APIC (in-kernel)
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than the 3.25 GiB below the hole
//! ```

/// Address of the GDT written for the PVH entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Address of the PVH start info structure (passed to the kernel in %rbx).
pub const PVH_INFO_START: u64 = 0x6000;
/// Address of the PVH memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// Maximum number of memory map entries we write.
pub const MEMMAP_MAX_ENTRIES: usize = 16;
/// Address of the PVH module list (the initrd entry).
pub const MODLIST_START: u64 = 0x8000;
/// Address of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum size of the kernel command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA-like area holding the MP table; reserved up to 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// First address of RAM above the legacy hole.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (3.25 GiB).
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Number of virtio-mmio windows available at the start of the MMIO hole.
pub const VIRTIO_MMIO_SLOTS: u64 = 64;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;
/// TSS address needed by KVM on Intel before the irqchip is created (3 pages below the APIC).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Serial port (COM1) base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ line of the serial port.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ given to virtio devices; the last one is `IOAPIC_PINS - 1`.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// i8042 keyboard controller ports (data and command/status).
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port of the i8042; 0xfe written here resets the machine.
pub const I8042_COMMAND_PORT: u16 = 0x64;
