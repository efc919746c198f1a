//! CPUID for each vCPU: KVM's supported CPUID, filtered.
//!
//! - leaf 1: APIC id and logical processor count in EBX, the hypervisor bit set, VMX cleared
//!   (no nested virtualization), HTT when there is more than one vCPU, the TSC-deadline timer
//!   when KVM emulates it (KVM_CAP_TSC_DEADLINE_TIMER; it is not part of the supported CPUID):
//!   the guest then skips the slow, jitter-prone LAPIC timer calibration against the PIT;
//! - leaves 4, 0xb, 0x8000_0008, 0x8000_001e: a topology of one socket, one thread per core,
//!   `vcpu_count` cores, APIC id = vCPU index;
//! - leaf 6: no energy-performance bias; leaf 0xa: no PMU; leaf 0x8000_0001: SVM cleared;
//! - the KVM leaves (0x4000_0000..) are kept as KVM reports them (paravirtual clock etc.).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_THERMAL: u32 = 6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_VMX: u32 = 1 << 5;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_EXT_SVM: u32 = 1 << 2;
const ECX_THERMAL_EPB: u32 = 1 << 3;

/// Number of bits needed to hold `n` distinct ids (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Filters `supported` (from KVM_GET_SUPPORTED_CPUID) for vCPU `cpu_index` of `vcpu_count`.
pub fn filter_cpuid(supported: &CpuId, cpu_index: u8, vcpu_count: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = u32::from(cpu_index);
    let count = u32::from(vcpu_count.max(1));
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (count << 16) | (apic_id << 24);
                entry.ecx = (entry.ecx | ECX_HYPERVISOR) & !ECX_VMX;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff)
                    | ((sharing & 0xfff) << 14)
                    | (((count - 1).min(63)) << 26);
            }
            LEAF_THERMAL => entry.ecx &= !ECX_THERMAL_EPB,
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY => {
                // Level 0: SMT, one thread per core. Level 1: core, `count` cores per package.
                let (eax, ebx, ecx) = match entry.index {
                    0 => (0, 1, 1 << 8),
                    1 => (id_bits(count), count, (2 << 8) | 1),
                    other => (0, 0, other & 0xff),
                };
                entry.eax = eax;
                entry.ebx = ebx;
                entry.ecx = ecx;
                entry.edx = apic_id;
            }
            LEAF_EXT_FEATURES => entry.ecx &= !ECX_EXT_SVM,
            LEAF_EXT_ADDR_SIZES => {
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            LEAF_EXT_APIC_ID => {
                entry.eax = apic_id;
                entry.ebx = (entry.ebx & !0xff) | apic_id;
                entry.ecx &= !0xff;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let mut leaf1 = entry(1, 0);
        leaf1.ecx = ECX_VMX;
        let supported = CpuId::from_entries(&[leaf1]).unwrap();
        let cpuid = filter_cpuid(&supported, 3, 4, true);
        let e = find(&cpuid, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e.ecx & ECX_VMX, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn topology_leaf_reports_cores_and_apic_id() {
        let supported = CpuId::from_entries(&[entry(0xb, 0), entry(0xb, 1)]).unwrap();
        let cpuid = filter_cpuid(&supported, 2, 3, false);
        let core_level = find(&cpuid, 0xb, 1);
        assert_eq!(core_level.ebx, 3);
        assert_eq!(core_level.eax, 2);
        assert_eq!(core_level.edx, 2);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
