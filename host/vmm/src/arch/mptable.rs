//! The Intel MultiProcessor table (spec 1.4): how a guest without ACPI finds its vCPUs, the
//! IOAPIC and the routing of the 24 ISA/IOAPIC interrupt lines.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_ADDR, EBDA_START, HIGH_RAM_START, IOAPIC_ADDR, IOAPIC_PINS};
use crate::memory::GuestMem;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Zero vCPUs or more than the table can describe.
    #[error("cannot describe {0} vCPUs in the MP table (1..=254)")]
    BadVcpuCount(u8),
    /// The table does not fit between the EBDA and 1 MiB.
    #[error("the MP table ({0} bytes) does not fit below 1 MiB")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING_FAMILY: u32 = 0x600;
const CPU_FEATURE_FPU_APIC: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer and configuration table for `vcpus` vCPUs, to be placed at
/// `base`. Returns the bytes.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus == u8::MAX {
        return Err(MpTableError::BadVcpuCount(vcpus));
    }
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.push(flags);
        entries.extend_from_slice(&CPU_STEPPING_FAMILY.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURE_FPU_APIC.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        // type, irq type, flags (2 bytes, conforming), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let header_len = 44usize;
    let table_len = header_len + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    let sum = checksum(&table);
    if let Some(c) = table.get_mut(7) {
        *c = sum;
    }

    let config_addr = (base + 16) as u32;
    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&config_addr.to_le_bytes());
    out.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    let sum = checksum(&out);
    if let Some(c) = out.get_mut(10) {
        *c = sum;
    }
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs at the EBDA.
pub fn setup_mptable(mem: &GuestMem, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build(vcpus, EBDA_START)?;
    if EBDA_START + bytes.len() as u64 > HIGH_RAM_START {
        return Err(MpTableError::TooLarge(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_pointer_and_table_checksums_are_zero() {
        let bytes = build(4, EBDA_START).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(checksum(&bytes[0..16]), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(checksum(table), 0);
    }

    #[test]
    fn table_lists_every_vcpu_with_cpu0_as_boot_processor() {
        let bytes = build(3, EBDA_START).unwrap();
        let entries = &bytes[16 + 44..];
        let cpus: Vec<&[u8]> = entries.chunks(20).take(3).collect();
        assert_eq!(cpus[0][..4], [ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(cpus[2][..4], [ENTRY_PROCESSOR, 2, APIC_VERSION, 1]);
    }

    #[test]
    fn zero_vcpus_is_refused() {
        assert!(matches!(
            build(0, EBDA_START),
            Err(MpTableError::BadVcpuCount(0))
        ));
    }
}
