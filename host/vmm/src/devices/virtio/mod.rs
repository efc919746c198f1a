//! virtio 1.x devices on the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] runs the register interface and
//! status state machine and hands the device its queues at DRIVER_OK. Device-specific code lives in
//! one folder per device.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;

/// Feature bit: virtio 1.x ("modern") device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type: block.
pub const TYPE_BLOCK: u32 = 2;
/// Device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// Device type: vsock.
pub const TYPE_VSOCK: u32 = 19;

/// InterruptStatus bit: a used buffer was added.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the configuration (or status) changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus register plus the irqfd.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::error!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Signals that used buffers were added to a queue.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Signals a configuration or status change (NEEDS_RESET).
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// The queues, as configured by the driver, in index order.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// Errors a device reports to its transport; they put the device in NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device got a queue index it does not have.
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    /// The device was given the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues given.
        got: usize,
    },
    /// A ring could not be accessed (its address is outside guest memory).
    #[error("virtqueue access failed: {0}")]
    Queue(virtio_queue::Error),
    /// A host-side I/O error the device cannot recover from.
    #[error("device I/O error: {0}")]
    Io(std::io::Error),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device type.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device configuration space; bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; devices without writable config ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            "ignored write of {} bytes at config offset {offset} to device type {}",
            data.len(),
            self.device_type()
        );
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError>;
    /// Stops the device and forgets its queues (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError>;
    /// A file descriptor to poll for back-end events, if the device has one.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The back-end file descriptor is ready.
    fn process_backend(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// One descriptor of a chain, copied out of guest memory once and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

/// Why a descriptor chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A buffer is not entirely inside guest memory.
    #[error("descriptor buffer 0x{addr:x}+0x{len:x} is outside guest memory")]
    OutOfRange {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    WrongOrder,
    /// The chain is longer than the device accepts.
    #[error("descriptor chain longer than {0} bytes")]
    TooLong(u64),
    /// The chain has too many descriptors.
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
}

/// Serves every available chain of `queue`: each is checked with [`collect_chain`] and handed
/// to `serve`, which returns the bytes it wrote; a bad chain is completed with 0 and a
/// rate-limited warning naming `device`. The guest is signalled once if any chain was used and
/// it asked to be notified.
pub(crate) fn drain_queue(
    device: &str,
    mem: &GuestMem,
    queue: &mut Queue,
    interrupt: &Interrupt,
    (max_total, max_descs): (u64, usize),
    mut serve: impl FnMut(&[Desc]) -> u32,
) -> Result<(), DeviceError> {
    use virtio_queue::QueueT;
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let used = match collect_chain(chain, max_total, max_descs) {
            Ok(descs) => serve(&descs),
            Err(e) => {
                crate::guest_warn!("{device}: bad descriptor chain: {e}");
                0
            }
        };
        queue
            .add_used(mem, head, used)
            .map_err(DeviceError::Queue)?;
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).map_err(DeviceError::Queue)? {
        interrupt.signal_used();
    }
    Ok(())
}

/// Walks `chain` (loops and indirect tables are bounded by virtio-queue's iterator) and checks
/// every buffer: inside guest memory, readable ones first, total length and count bounded.
pub fn collect_chain<M>(
    chain: DescriptorChain<M>,
    max_total: u64,
    max_descs: usize,
) -> Result<Vec<Desc>, ChainError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let mut descs: Vec<Desc> = Vec::new();
    let mut total: u64 = 0;
    let mut seen_write = false;
    // Clone the chain handle so `mem` stays borrowed from the original.
    for d in chain.clone() {
        if descs.len() >= max_descs {
            return Err(ChainError::TooManyDescriptors(max_descs));
        }
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        };
        if desc.len != 0 && !mem.check_range(desc.addr, desc.len as usize) {
            return Err(ChainError::OutOfRange {
                addr: desc.addr.raw_value(),
                len: desc.len,
            });
        }
        if desc.write {
            seen_write = true;
        } else if seen_write {
            return Err(ChainError::WrongOrder);
        }
        total = total.saturating_add(u64::from(desc.len));
        if total > max_total {
            return Err(ChainError::TooLong(max_total));
        }
        descs.push(desc);
    }
    Ok(descs)
}

/// A byte stream over some buffers of a chain (its readable or its writable part), with
/// bounds-checked access at any offset. Guest memory is accessed only through vm-memory's
/// checked accessors.
#[derive(Debug, Clone)]
pub struct DescBuf {
    descs: Vec<Desc>,
    len: u64,
}

impl DescBuf {
    /// The device-readable part of `descs`.
    pub fn readable(descs: &[Desc]) -> Self {
        Self::from_iter(descs.iter().filter(|d| !d.write))
    }

    /// The device-writable part of `descs`.
    pub fn writable(descs: &[Desc]) -> Self {
        Self::from_iter(descs.iter().filter(|d| d.write))
    }

    fn from_iter<'a>(it: impl Iterator<Item = &'a Desc>) -> Self {
        let descs: Vec<Desc> = it.copied().collect();
        let len = descs.iter().map(|d| u64::from(d.len)).sum();
        DescBuf { descs, len }
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(guest_address, range_in_buf)` for each piece of `[offset, offset + n)`.
    fn for_each_piece(
        &self,
        offset: u64,
        n: usize,
        mut f: impl FnMut(
            GuestAddress,
            std::ops::Range<usize>,
        ) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), BufError> {
        let end = offset.checked_add(n as u64).ok_or(BufError::OutOfBounds)?;
        if end > self.len {
            return Err(BufError::OutOfBounds);
        }
        let mut pos: u64 = 0; // start of the current descriptor in the stream
        let mut done: usize = 0;
        for d in &self.descs {
            let d_end = pos + u64::from(d.len);
            if done < n && d_end > offset + done as u64 {
                let start_in_desc = offset + done as u64 - pos;
                let take = ((u64::from(d.len) - start_in_desc) as usize).min(n - done);
                let addr = d
                    .addr
                    .checked_add(start_in_desc)
                    .ok_or(BufError::OutOfBounds)?;
                f(addr, done..done + take).map_err(BufError::Memory)?;
                done += take;
            }
            pos = d_end;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the stream.
    pub fn read_at(&self, mem: &GuestMem, offset: u64, buf: &mut [u8]) -> Result<(), BufError> {
        let n = buf.len();
        self.for_each_piece(offset, n, |addr, range| {
            let piece = buf
                .get_mut(range)
                .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?;
            mem.read_slice(piece, addr)
        })
    }

    /// Writes `buf` at `offset` of the stream.
    pub fn write_at(&self, mem: &GuestMem, offset: u64, buf: &[u8]) -> Result<(), BufError> {
        self.for_each_piece(offset, buf.len(), |addr, range| {
            let piece = buf
                .get(range)
                .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?;
            mem.write_slice(piece, addr)
        })
    }
}

/// Errors of [`DescBuf`] accesses.
#[derive(Debug, thiserror::Error)]
pub enum BufError {
    /// The access goes past the end of the buffers.
    #[error("access past the end of the descriptor buffers")]
    OutOfBounds,
    /// Guest memory refused the access.
    #[error("guest memory access failed: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers shared by the device tests: guest memory and a mock split queue.
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// 1 MiB of guest memory at address 0.
    pub fn test_memory() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// An eventfd-backed interrupt to observe signals.
    pub fn test_interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn descbuf_reads_and_writes_across_descriptors() {
        let mem = test_memory();
        let descs = [
            Desc {
                addr: GuestAddress(0x1000),
                len: 3,
                write: true,
            },
            Desc {
                addr: GuestAddress(0x2000),
                len: 5,
                write: true,
            },
        ];
        let buf = DescBuf::writable(&descs);
        assert_eq!(buf.len(), 8);
        buf.write_at(&mem, 1, b"abcdef").unwrap();
        let mut out = [0u8; 6];
        buf.read_at(&mem, 1, &mut out).unwrap();
        assert_eq!(&out, b"abcdef");
        let mut tail = [0u8; 4];
        mem.read_slice(&mut tail, GuestAddress(0x2000)).unwrap();
        assert_eq!(&tail, b"cdef");
        assert!(matches!(
            buf.write_at(&mem, 4, b"12345"),
            Err(BufError::OutOfBounds)
        ));
    }

    #[test]
    fn valid_chain_is_collected_in_order() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            raw(0x1000, 16, VRING_DESC_F_NEXT, 1),
            raw(0x2000, 32, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let descs = collect_chain(chain, 1 << 20, 16).unwrap();
        assert_eq!(descs.len(), 2);
        assert!(!descs[0].write && descs[1].write);
    }

    #[test]
    fn buffer_outside_memory_is_rejected() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[raw(0xff000, 0x2000, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert!(matches!(
            collect_chain(chain, 1 << 20, 16),
            Err(ChainError::OutOfRange { .. })
        ));
    }

    #[test]
    fn readable_after_writable_is_rejected() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            raw(0x1000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            raw(0x2000, 16, 0, 0),
        ])
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            collect_chain(chain, 1 << 20, 16),
            Err(ChainError::WrongOrder)
        );
    }

    #[test]
    fn oversized_chain_is_rejected() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[raw(0x1000, 0x8000, 0, 0)]).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(
            collect_chain(chain, 0x4000, 16),
            Err(ChainError::TooLong(0x4000))
        );
    }

    #[test]
    fn looping_chain_terminates() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 4);
        // Descriptor 0 -> 1 -> 0 -> ... : the iterator stops after queue-size descriptors.
        vq.desc_table()
            .store(0, raw(0x1000, 8, VRING_DESC_F_NEXT, 1))
            .unwrap();
        vq.desc_table()
            .store(1, raw(0x2000, 8, VRING_DESC_F_NEXT, 0))
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        // The walk ends: virtio-queue's iterator yields at most queue-size (4) descriptors of
        // the loop, all readable and inside memory, so the chain is accepted as those 4.
        let descs = collect_chain(chain.clone(), 1 << 20, 64).unwrap();
        assert_eq!(descs.len(), 4, "{descs:?}");
        // With a smaller descriptor bound the same loop is refused by name.
        assert!(matches!(
            collect_chain(chain, 1 << 20, 2),
            Err(ChainError::TooManyDescriptors(2))
        ));
    }
}
