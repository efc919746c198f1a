//! x86_64 machine setup: CPUID, registers and MSRs for the PVH entry, the MP table.

pub mod cpuid;
pub mod mptable;
pub mod regs;

/// Largest number of vCPUs accepted (APIC ids stay below the IOAPIC id and fit xAPIC mode).
pub const MAX_VCPUS: u8 = 32;
