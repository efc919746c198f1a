//! Guest memory: anonymous mmap regions around the 32-bit MMIO hole, and their e820 map.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{EBDA_START, HIGH_RAM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest memory type used everywhere in husk-vmm.
pub type GuestMem = GuestMemoryMmap<()>;

/// Smallest and largest guest memory accepted.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// e820 entry type for usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 entry type for reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Errors while creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside the accepted range.
    #[error("guest memory of {0} MiB is outside the accepted range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")]
    BadSize(u64),
    /// The mmap of guest memory failed.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(vm_memory::mmap::FromRangesError),
    /// A region's host address could not be found.
    #[error("cannot find the host address of guest memory: {0}")]
    HostAddress(vm_memory::GuestMemoryError),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {err}")]
    Register {
        /// The slot number.
        slot: u32,
        /// The error.
        err: kvm_ioctls::Error,
    },
}

/// The RAM ranges (start, size) for a guest of `mem_bytes` bytes: one range below the MMIO hole,
/// and a second one above 4 GiB if needed.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let below = mem_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), below as usize)];
    let above = mem_bytes.saturating_sub(MMIO_HOLE_START);
    if above > 0 {
        ranges.push((GuestAddress(MMIO_HOLE_END), above as usize));
    }
    ranges
}

/// Allocates guest memory of `mib` MiB.
pub fn create_guest_memory(mib: u64) -> Result<GuestMem, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(mib << 20)).map_err(MemoryError::Allocate)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(MemoryError::HostAddress)?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the host range [host_addr, host_addr + len) is an mmap owned by `mem`, which
        // the VM keeps alive (and never unmaps) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|err| MemoryError::Register { slot, err })?;
    }
    Ok(())
}

/// The e820 map of `mem`: low RAM below the EBDA, the EBDA..1 MiB range reserved, then RAM.
pub fn e820_entries(mem: &GuestMem) -> Vec<(u64, u64, u32)> {
    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_RAM_START);
        let end = region.start_addr().raw_value().saturating_add(region.len());
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_below_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(
            ranges,
            vec![
                (GuestAddress(0), MMIO_HOLE_START as usize),
                (
                    GuestAddress(MMIO_HOLE_END),
                    ((4u64 << 30) - MMIO_HOLE_START) as usize
                )
            ]
        );
    }

    #[test]
    fn memory_size_out_of_range_is_refused() {
        assert!(matches!(
            create_guest_memory(1),
            Err(MemoryError::BadSize(1))
        ));
    }

    #[test]
    fn e820_reserves_the_ebda_and_covers_the_ram() {
        let mem = create_guest_memory(64).unwrap();
        let e820 = e820_entries(&mem);
        assert_eq!(e820[0], (0, EBDA_START, E820_RAM));
        assert_eq!(e820[1].2, E820_RESERVED);
        assert_eq!(
            e820[2],
            (HIGH_RAM_START, (64 << 20) - HIGH_RAM_START, E820_RAM)
        );
    }
}
