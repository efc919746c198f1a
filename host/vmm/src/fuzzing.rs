//! Fuzzing harnesses shared by the `cargo fuzz` targets in `host/vmm/fuzz` and by a plain test
//! over pseudo-random inputs (so they are exercised by `cargo test` too).
//!
//! Each harness turns bytes into guest memory (descriptor table, rings and buffers all come
//! from the input), sets a queue up over it, and kicks the device. Any panic is a bug.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMem;

/// Size of the fuzzed guest memory.
pub const MEM_SIZE: usize = 0x10000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;

fn memory_from(data: &[u8]) -> Option<GuestMem> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(data.get(..n)?, GuestAddress(0)).ok()?;
    Some(mem)
}

fn queue(mem: &GuestMem, size_byte: u8) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    // Sizes the fuzzer picks: powers of two from 1 to 256.
    q.set_size(1u16 << (size_byte % 9));
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_ready(true);
    q.is_valid(mem).then_some(q)
}

fn interrupt() -> Option<Arc<Interrupt>> {
    Some(Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).ok()?,
    )))
}

fn kick(device: &mut dyn VirtioDevice, mem: &GuestMem, sizes: &[u8], kicks: &[u8]) {
    let queues: Option<Vec<Queue>> = device
        .queue_max_sizes()
        .iter()
        .enumerate()
        .map(|(i, _)| queue(mem, sizes.get(i).copied().unwrap_or(4)))
        .collect();
    let (Some(queues), Some(interrupt)) = (queues, interrupt()) else {
        return;
    };
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt,
        acked_features: VIRTIO_F_VERSION_1,
    };
    if device.activate(ctx).is_err() {
        return;
    }
    for k in kicks {
        let _ = device.process_queue(usize::from(*k % 4));
    }
}

fn temp_path(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "husk-fuzz-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// virtio-vsock: the input is guest memory; its last bytes choose queue sizes and kicks.
pub fn fuzz_vsock(data: &[u8]) {
    let Some(mem) = memory_from(data) else { return };
    let path = temp_path("vsock");
    let config = VsockConfig {
        uds_path: path,
        guest_cid: 3,
    };
    let Ok(mut dev) = Vsock::new(&config) else {
        return;
    };
    let tail = data.get(MEM_SIZE..).unwrap_or(&[]);
    kick(
        &mut dev,
        &mem,
        tail.get(..3).unwrap_or(&[]),
        tail.get(3..).unwrap_or(&[1, 0, 1]),
    );
    let _ = dev.process_backend();
}

/// virtio-blk over a small temporary disk image.
pub fn fuzz_block(data: &[u8]) {
    let Some(mem) = memory_from(data) else { return };
    let path = temp_path("blk");
    if std::fs::write(&path, vec![0u8; 64 * 1024]).is_err() {
        return;
    }
    let read_only = data.get(MEM_SIZE).is_some_and(|b| b & 1 == 1);
    if let Ok(mut dev) = Block::open(&BlockConfig {
        path: path.clone(),
        read_only,
    }) {
        let tail = data.get(MEM_SIZE + 1..).unwrap_or(&[]);
        kick(&mut dev, &mem, tail.get(..1).unwrap_or(&[]), &[0, 0]);
    }
    let _ = std::fs::remove_file(&path);
}

/// The virtio-mmio transport (with virtio-rng behind it): the input is a sequence of
/// register accesses `[op, offset_lo, offset_hi, v0, v1, v2, v3]` (op bit 0: write, bits 1-2:
/// width 1/2/4/8), after the first `MEM_SIZE / 16` bytes which seed guest memory.
pub fn fuzz_mmio(data: &[u8]) {
    let seed_len = (MEM_SIZE / 16).min(data.len());
    let Some(mem) = memory_from(data.get(..seed_len).unwrap_or(&[])) else {
        return;
    };
    let (Ok(rng), Some(irq)) = (Rng::new(), interrupt()) else {
        return;
    };
    let Ok(mut transport) = MmioTransport::new(Box::new(rng), mem, irq) else {
        return;
    };
    for access in data.get(seed_len..).unwrap_or(&[]).chunks_exact(7) {
        let [op, lo, hi, v0, v1, v2, v3] = [
            access[0], access[1], access[2], access[3], access[4], access[5], access[6],
        ];
        let offset = u64::from(u16::from_le_bytes([lo, hi]) % 0x200);
        let width = 1usize << ((op >> 1) & 3);
        let value = [v0, v1, v2, v3, v0, v1, v2, v3];
        let bytes = value.get(..width).unwrap_or(&[]);
        if op & 1 == 1 {
            transport.write(offset, bytes);
        } else {
            let mut out = vec![0u8; width];
            transport.read(offset, &mut out);
        }
        if op & 0x80 != 0 {
            transport.process_queue(usize::from(v0 % 2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic pseudo-random inputs without a dependency.
    fn inputs(count: usize, len: usize) -> Vec<Vec<u8>> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..count)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn harnesses_survive_random_inputs() {
        for input in inputs(24, MEM_SIZE + 16) {
            fuzz_vsock(&input);
            fuzz_block(&input);
            fuzz_mmio(&input);
        }
    }

    #[test]
    fn harnesses_survive_short_inputs() {
        for len in [0, 1, 7, 100] {
            let input = vec![0xffu8; len];
            fuzz_vsock(&input);
            fuzz_block(&input);
            fuzz_mmio(&input);
        }
    }
}
