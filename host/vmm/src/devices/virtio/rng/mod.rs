//! virtio-rng: fills device-writable buffers with entropy from the host's getrandom pool
//! (read through /dev/urandom), so the guest never blocks on getrandom() at boot.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;
#[cfg(test)]
use vm_memory::GuestAddress;

use super::{
    drain_queue, ActivateContext, DeviceError, Interrupt, VirtioDevice, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request; a larger buffer gets this many.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

struct Active {
    mem: GuestMem,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The entropy device.
pub struct Rng {
    source: File,
    active: Option<Active>,
    buf: Vec<u8>,
}

impl Rng {
    /// An entropy device reading /dev/urandom.
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            source: File::open("/dev/urandom")?,
            active: None,
            buf: Vec::new(),
        })
    }

    /// Serves one chain: returns the number of bytes written into it.
    fn fill_chain(
        source: &mut File,
        buf: &mut Vec<u8>,
        mem: &GuestMem,
        descs: &[super::Desc],
    ) -> u32 {
        let mut written: u32 = 0;
        for d in descs.iter().filter(|d| d.write) {
            let room = MAX_REQUEST_BYTES.saturating_sub(written);
            let len = d.len.min(room) as usize;
            if len == 0 {
                break;
            }
            buf.resize(len, 0);
            if source.read_exact(buf).is_err() || mem.write_slice(buf, d.addr).is_err() {
                break;
            }
            written = written.saturating_add(len as u32);
        }
        written
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        let got = ctx.queues.len();
        let queue = ctx
            .queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(DeviceError::QueueCount { expected: 1, got })?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (source, buf) = (&mut self.source, &mut self.buf);
        let mem = &active.mem;
        drain_queue(
            "virtio-rng",
            mem,
            &mut active.queue,
            &active.interrupt,
            (u64::from(u32::MAX), usize::from(QUEUE_SIZE)),
            |descs| Self::fill_chain(source, buf, mem, descs),
        )
    }
}

/// Writes a zero byte at `addr`; used by tests to check a buffer was (not) touched.
#[cfg(test)]
fn zero(mem: &GuestMem, addr: u64, len: usize) {
    mem.write_slice(&vec![0u8; len], GuestAddress(addr))
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn activated(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>) -> Rng {
        let mut rng = Rng::new().unwrap();
        rng.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
            interrupt: test_interrupt(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        rng
    }

    #[test]
    fn writable_buffer_is_filled_and_used_length_reported() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        zero(&mem, 0x8000, 256);
        vq.build_desc_chain(&[raw(0x8000, 256, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut rng = activated(&mem, &vq);
        rng.process_queue(0).unwrap();
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 256);
        let mut buf = [0u8; 256];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert!(buf.iter().any(|b| *b != 0));
    }

    #[test]
    fn read_only_buffer_gets_nothing() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        zero(&mem, 0x8000, 64);
        vq.build_desc_chain(&[raw(0x8000, 64, 0, 0)]).unwrap();
        let mut rng = activated(&mem, &vq);
        rng.process_queue(0).unwrap();
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert_eq!(buf, [0u8; 64]);
    }

    #[test]
    fn out_of_range_buffer_is_completed_empty() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[
            raw(0x8000, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
            raw(0xffff_0000, 16, VRING_DESC_F_WRITE, 0),
        ])
        .unwrap();
        let mut rng = activated(&mem, &vq);
        rng.process_queue(0).unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn oversized_request_is_capped() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.build_desc_chain(&[raw(0x10000, 0x20000, VRING_DESC_F_WRITE, 0)])
            .unwrap();
        let mut rng = activated(&mem, &vq);
        rng.process_queue(0).unwrap();
        assert_eq!(
            vq.used().ring().ref_at(0).unwrap().load().len(),
            MAX_REQUEST_BYTES
        );
    }

    #[test]
    fn unknown_queue_is_an_error() {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut rng = activated(&mem, &vq);
        assert!(rng.process_queue(3).is_err());
    }
}
