//! One fetch of every FUSE request.
//!
//! fuse-backend-rs builds its reader and writer from a virtio-queue `DescriptorChain`, which
//! reads the descriptors from the memory it is given each time it is walked. Walking the guest's
//! chain after validating it would read guest-controlled descriptors twice: a second vCPU could
//! grow a length or move a buffer in between. So the device copies the chain out of guest memory
//! once ([`collect_chain`](super::super::collect_chain)), validates the copy, and hands the FUSE
//! server a chain rebuilt from that copy in a private region the guest cannot address:
//!
//! - a descriptor table (no indirect tables, no loops) and a one-entry available ring, served by
//!   a private [`Queue`];
//! - the request's head (FUSE header and arguments, up to [`HEAD_COPY_LEN`] bytes), copied out of
//!   guest memory once, so the opcode this device checked and the arguments it rewrote are the
//!   ones the server decodes.
//!
//! What is left in guest memory is write payload (bytes written to a file as they are) and the
//! reply buffers (written, never parsed).
//!
//! The region is mapped by this process only; it is not a KVM memory slot, so no guest address
//! reaches it. It sits just above the guest's last byte in the address space the server sees.

use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestRegionMmap};

use super::super::Desc;
use crate::memory::GuestMem;

/// Most bytes of a request copied out of guest memory: the header and the arguments of every
/// request husk serves (names are at most 255 bytes, a symlink target at most 4096) fit.
pub const HEAD_COPY_LEN: usize = 8 << 10;
/// Descriptors in the private table: the copied head plus every descriptor of the largest chain.
const QUEUE_SIZE: u16 = 2 * super::REQUEST_QUEUE_SIZE;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = DESC_TABLE + 16 * QUEUE_SIZE as u64;
const USED_RING: u64 = AVAIL_RING + 0x2000;
const HEAD_COPY: u64 = USED_RING + 0x6000;
const REGION_LEN: u64 = HEAD_COPY + HEAD_COPY_LEN as u64;
/// Alignment of the region's start.
const REGION_ALIGN: u64 = 0x1_0000;

const _: () = assert!(QUEUE_SIZE as usize > super::MAX_CHAIN_DESCS);
// virtio-queue's largest split queue.
const _: () = assert!(QUEUE_SIZE <= 32768);
const _: () = assert!(AVAIL_RING + 6 + 2 * QUEUE_SIZE as u64 <= USED_RING);
const _: () = assert!(USED_RING + 6 + 8 * QUEUE_SIZE as u64 <= HEAD_COPY);

/// Why the private region could not be set up (a host-side failure, not the guest's).
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// Guest memory ends too close to the top of the address space.
    #[error("no room above guest memory for the request copy")]
    NoRoom,
    /// The region could not be mapped.
    #[error("cannot map the request copy region: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    /// The region could not join guest memory's view.
    #[error("cannot add the request copy region: {0}")]
    Insert(vm_memory::GuestRegionCollectionError),
    /// The private queue could not be set up.
    #[error("cannot set up the request copy queue: {0}")]
    Queue(virtio_queue::Error),
}

/// Why one request could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The private region refused a write (cannot happen with the bounds above).
    #[error("cannot write the request copy: {0}")]
    Memory(vm_memory::GuestMemoryError),
    /// The private queue did not yield the chain just written.
    #[error("the request copy queue yielded no chain")]
    NoChain,
}

/// Guest memory plus the private region, and the private queue over it.
pub struct Shadow {
    mem: GuestMem,
    queue: Queue,
    base: GuestAddress,
}

impl Shadow {
    /// Maps the private region above `guest`'s last byte.
    pub fn new(guest: &GuestMem) -> Result<Self, ShadowError> {
        let end = guest.last_addr().raw_value();
        let base = end
            .checked_add(REGION_ALIGN)
            .map(|a| a & !(REGION_ALIGN - 1))
            .filter(|a| a.checked_add(REGION_LEN).is_some())
            .ok_or(ShadowError::NoRoom)?;
        let base = GuestAddress(base);
        let len = usize::try_from(REGION_LEN).map_err(|_| ShadowError::NoRoom)?;
        let region =
            GuestRegionMmap::<()>::from_range(base, len, None).map_err(ShadowError::Map)?;
        let mem = guest
            .insert_region(Arc::new(region))
            .map_err(ShadowError::Insert)?;
        let mut queue = Queue::new(QUEUE_SIZE).map_err(ShadowError::Queue)?;
        let split = |a: GuestAddress| {
            let raw = a.raw_value();
            // Truncation is the point: low and high halves of the address.
            (Some(raw as u32), Some((raw >> 32) as u32))
        };
        let (lo, hi) = split(base.unchecked_add(DESC_TABLE));
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = split(base.unchecked_add(AVAIL_RING));
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(base.unchecked_add(USED_RING));
        queue.set_used_ring_address(lo, hi);
        queue.set_size(QUEUE_SIZE);
        queue.set_ready(true);
        if !queue.is_valid(&mem) {
            return Err(ShadowError::Queue(virtio_queue::Error::QueueNotReady));
        }
        Ok(Shadow { mem, queue, base })
    }

    /// The memory the server reads and writes through (guest memory and the private region).
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Rebuilds a validated chain in the private region: its first descriptor is `head` (the
    /// request's first `head.len()` readable bytes, already copied and checked by the caller),
    /// then the rest of the readable buffers, then the writable ones, all from `descs`.
    pub fn load(
        &mut self,
        descs: &[Desc],
        head: &[u8],
    ) -> Result<DescriptorChain<&GuestMem>, CopyError> {
        let head_len = head.len().min(HEAD_COPY_LEN);
        let head_addr = self.base.unchecked_add(HEAD_COPY);
        self.mem
            .write_slice(head.get(..head_len).unwrap_or_default(), head_addr)
            .map_err(CopyError::Memory)?;
        let mut table: Vec<(u64, u32, bool)> = Vec::with_capacity(descs.len() + 1);
        // head_len <= HEAD_COPY_LEN fits in u32.
        table.push((head_addr.raw_value(), head_len as u32, false));
        let mut skip = head_len as u64;
        for d in descs {
            if d.write {
                table.push((d.addr.raw_value(), d.len, true));
                continue;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            // 0 < len - skip <= d.len, and addr + skip stays inside the validated buffer.
            table.push((d.addr.raw_value() + skip, (len - skip) as u32, false));
            skip = 0;
        }
        let count = table.len();
        for (i, (addr, len, write)) in table.into_iter().enumerate() {
            let mut flags = 0u16;
            if write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = if i + 1 < count {
                flags |= VRING_DESC_F_NEXT as u16;
                // count <= MAX_CHAIN_DESCS + 1 < QUEUE_SIZE.
                (i + 1) as u16
            } else {
                0
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            let at = self.base.unchecked_add(DESC_TABLE + 16 * i as u64);
            self.mem.write_obj(raw, at).map_err(CopyError::Memory)?;
        }
        // One chain, head 0, always at slot 0 of the ring: idx 1 with next_avail 0.
        let avail = self.base.unchecked_add(AVAIL_RING);
        self.mem
            .write_obj(0u16, avail.unchecked_add(4))
            .map_err(CopyError::Memory)?;
        self.mem
            .write_obj(1u16, avail.unchecked_add(2))
            .map_err(CopyError::Memory)?;
        self.queue.set_next_avail(0);
        self.queue
            .pop_descriptor_chain(&self.mem)
            .ok_or(CopyError::NoChain)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryRegion;

    use super::*;
    use crate::devices::virtio::test_utils::test_memory;

    #[test]
    fn the_rebuilt_chain_starts_with_the_copy_and_keeps_the_rest() {
        let guest = test_memory();
        let mut shadow = Shadow::new(&guest).unwrap();
        assert!(shadow.base > guest.last_addr());
        let descs = [
            Desc {
                addr: GuestAddress(0x1000),
                len: 100,
                write: false,
            },
            Desc {
                addr: GuestAddress(0x2000),
                len: 50,
                write: false,
            },
            Desc {
                addr: GuestAddress(0x3000),
                len: 64,
                write: true,
            },
        ];
        // The head covers the first buffer and 20 bytes of the second.
        let head = [7u8; 120];
        for _ in 0..3 {
            let chain = shadow.load(&descs, &head).unwrap();
            let got: Vec<(u64, u32, bool)> = chain
                .map(|d| (d.addr().raw_value(), d.len(), d.is_write_only()))
                .collect();
            let head_addr = shadow.base.raw_value() + HEAD_COPY;
            assert_eq!(
                got,
                vec![
                    (head_addr, 120, false),
                    (0x2000 + 20, 30, false),
                    (0x3000, 64, true)
                ]
            );
            let mut copied = [0u8; 120];
            shadow
                .mem()
                .read_slice(&mut copied, GuestAddress(head_addr))
                .unwrap();
            assert_eq!(copied, head);
        }
    }

    #[test]
    fn the_private_region_is_not_guest_memory() {
        let guest = test_memory();
        let shadow = Shadow::new(&guest).unwrap();
        assert!(!guest.address_in_range(shadow.base));
        assert!(shadow.mem().address_in_range(shadow.base));
        assert_eq!(
            shadow.mem().num_regions(),
            guest.num_regions() + 1,
            "guest regions are shared, not copied"
        );
        let start = guest.iter().next().unwrap().start_addr();
        assert_eq!(
            guest.get_host_address(start).unwrap(),
            shadow.mem().get_host_address(start).unwrap()
        );
    }
}
