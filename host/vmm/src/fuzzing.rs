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
use crate::devices::virtio::fs::{FsConfig, VirtioFs};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMem;

/// Size of the fuzzed guest memory.
pub const MEM_SIZE: usize = 0x10000;
/// Rings of queue `i` live at `i * RING_STRIDE`: descriptor table, then avail, then used ring.
const RING_STRIDE: u64 = 0x1000;
const AVAIL_OFFSET: u64 = 0x400;
const USED_OFFSET: u64 = 0x800;
/// Buffers live here; descriptor addresses are folded into this area unless their top bit
/// asks for a raw (possibly out-of-range) address.
const BUF_BASE: u64 = 0x8000;
const BUF_SIZE: u64 = 0x8000;
const MAX_DESCS: u8 = 16;

/// Reads the input front to back; missing bytes read as zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in out.iter_mut() {
            if let Some((first, rest)) = self.0.split_first() {
                *b = *first;
                self.0 = rest;
            }
        }
        out
    }

    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
}

/// Builds guest memory and one split queue per entry of `max_sizes` from the input:
/// `[size][ndesc][ndesc x (addr u64, len u32, flags u16, next u16)][navail][navail x idx]` per
/// queue, then the rest of the input fills the buffer area.
fn build(data: &[u8], max_sizes: &[u16]) -> Option<(GuestMem, Vec<Queue>)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let mut input = Input(data);
    let mut queues = Vec::new();
    for (i, max) in max_sizes.iter().enumerate() {
        let base = i as u64 * RING_STRIDE;
        let size = (1u16 << (input.u8() % 5)).min(*max);
        for d in 0..u64::from(input.u8() % (MAX_DESCS + 1)) {
            let addr = u64::from_le_bytes(input.bytes::<8>());
            let len = u32::from_le_bytes(input.bytes::<4>());
            let flags = u16::from_le_bytes(input.bytes::<2>());
            let next = u16::from_le_bytes(input.bytes::<2>()) % 20;
            let (addr, len) = if addr >> 63 == 0 {
                (BUF_BASE + addr % BUF_SIZE, len % 0x2000)
            } else {
                (addr << 1, len)
            };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&(flags & 0x7).to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(base + d * 16)).ok()?;
        }
        let navail = input.u8() % (MAX_DESCS + 1);
        for a in 0..u64::from(navail) {
            let idx = u16::from(input.u8() % (MAX_DESCS + 2));
            mem.write_obj(idx, GuestAddress(base + AVAIL_OFFSET + 4 + a * 2))
                .ok()?;
        }
        mem.write_obj(u16::from(navail), GuestAddress(base + AVAIL_OFFSET + 2))
            .ok()?;
        let mut q = Queue::new(*max).ok()?;
        q.set_size(size);
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + AVAIL_OFFSET) as u32), Some(0));
        q.set_used_ring_address(Some((base + USED_OFFSET) as u32), Some(0));
        q.set_ready(true);
        queues.push(q);
    }
    let rest = input
        .0
        .get(..input.0.len().min(BUF_SIZE as usize))
        .unwrap_or(&[]);
    mem.write_slice(rest, GuestAddress(BUF_BASE)).ok()?;
    Some((mem, queues))
}

fn interrupt() -> Option<Arc<Interrupt>> {
    Some(Arc::new(Interrupt::new(
        EventFd::new(libc::EFD_NONBLOCK).ok()?,
    )))
}

/// Activates `device` on queues built from the input and kicks every queue, twice; returns the
/// guest memory (for tests to look at the device's replies).
fn activate_and_kick(device: &mut dyn VirtioDevice, data: &[u8]) -> Option<GuestMem> {
    let sizes = device.queue_max_sizes().to_vec();
    let (mem, queues) = build(data, &sizes)?;
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: interrupt()?,
        acked_features: VIRTIO_F_VERSION_1,
    };
    device.activate(ctx).ok()?;
    for round in 0..2 {
        for q in (0..sizes.len()).rev() {
            let _ = device.process_queue(q);
        }
        if round == 0 {
            let _ = device.process_backend();
        }
    }
    Some(mem)
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

/// virtio-vsock: queues and buffers from the input; tx is processed before rx so a guest
/// REQUEST can be answered in the same run.
pub fn fuzz_vsock(data: &[u8]) {
    let config = VsockConfig {
        uds_path: temp_path("vsock"),
        guest_cid: 3,
    };
    let Ok(mut dev) = Vsock::new(&config) else {
        return;
    };
    let _ = activate_and_kick(&mut dev, data);
}

/// virtio-blk over a small temporary disk image; the first byte picks read-only.
pub fn fuzz_block(data: &[u8]) {
    let path = temp_path("blk");
    if std::fs::write(&path, vec![0u8; 64 * 1024]).is_err() {
        return;
    }
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok(mut dev) = Block::open(&BlockConfig {
        path: path.clone(),
        read_only,
    }) {
        let _ = activate_and_kick(&mut dev, data.get(1..).unwrap_or(&[]));
    }
    let _ = std::fs::remove_file(&path);
}

/// virtio-fs over a fresh temporary share (a file, a directory, symlinks to a decoy directory
/// next to it), both removed afterwards: queues and FUSE messages from the input, the request
/// queue processed before the hiprio queue, twice. Panics if the decoy outside the share
/// changed: the guest escaped. Seed inputs carrying real FUSE requests: `fuzz/seeds/fs`.
pub fn fuzz_fs(data: &[u8]) {
    let _ = fuzz_fs_with_memory(data);
}

fn fuzz_fs_with_memory(data: &[u8]) -> Option<GuestMem> {
    const SECRET: &[u8] = b"outside the share";
    let mut mem = None;
    let dir = temp_path("fs");
    let outside = dir.with_extension("outside");
    let populate = || -> std::io::Result<()> {
        std::fs::create_dir(&outside)?;
        std::fs::write(outside.join("secret"), SECRET)?;
        std::fs::create_dir(&dir)?;
        std::fs::write(dir.join("f"), b"0123456789abcdef")?;
        std::fs::create_dir(dir.join("d"))?;
        std::os::unix::fs::symlink(&outside, dir.join("l"))?;
        let relative = std::path::Path::new("..").join(outside.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(relative, dir.join("d").join("r"))
    };
    if populate().is_ok() {
        let config = FsConfig {
            path: dir.clone(),
            tag: "fuzz".into(),
        };
        if let Ok(mut dev) = VirtioFs::new(&config) {
            mem = activate_and_kick(&mut dev, data);
        }
        let entries = std::fs::read_dir(&outside).map(|d| d.count()).unwrap_or(0);
        let secret = std::fs::read(outside.join("secret")).unwrap_or_default();
        assert!(
            entries == 1 && secret == SECRET,
            "virtio-fs: the guest changed a directory outside its share"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&outside);
    mem
}

/// The virtio-mmio transport with virtio-rng behind it. Byte 0 bit 0: run the driver's normal
/// bring-up first (so the fuzzer starts from an active device). The next 512 bytes seed guest
/// memory; the rest is a sequence of register accesses `[op, off_lo, off_hi, v0..v3]`
/// (op bit 0: write, bits 1-2: width 1/2/4/8, bit 7: then process queue 0).
pub fn fuzz_mmio(data: &[u8]) {
    let mut input = Input(data);
    let bring_up = input.u8() & 1 == 1;
    let seed = input.0.get(..input.0.len().min(512)).unwrap_or(&[]);
    let accesses = input.0.get(seed.len()..).unwrap_or(&[]);
    let Some((mem, _)) = build(seed, &[]) else {
        return;
    };
    let (Ok(rng), Some(irq)) = (Rng::new(), interrupt()) else {
        return;
    };
    let Ok(mut transport) = MmioTransport::new(Box::new(rng), mem.clone(), irq) else {
        return;
    };
    // The seed area holds ring data for queue 0 at the usual place.
    let _ = mem.write_slice(seed, GuestAddress(0));
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    if bring_up {
        for (off, v) in [
            (0x70, 1),
            (0x70, 3),
            (0x24, 1),
            (0x20, 1),
            (0x70, 11),
            (0x30, 0),
            (0x38, 16),
            (0x80, 0),
            (0x90, AVAIL_OFFSET as u32),
            (0xa0, USED_OFFSET as u32),
            (0x44, 1),
            (0x70, 15),
        ] {
            w(&mut transport, off, v);
        }
    }
    for access in accesses.chunks_exact(7) {
        let mut a = Input(access);
        let op = a.u8();
        let offset = u64::from(u16::from_le_bytes(a.bytes::<2>()) % 0x200);
        let v = a.bytes::<4>();
        let value = [v[0], v[1], v[2], v[3], v[0], v[1], v[2], v[3]];
        let width = 1usize << ((op >> 1) & 3);
        let bytes = value.get(..width).unwrap_or(&[]);
        if op & 1 == 1 {
            transport.write(offset, bytes);
        } else {
            let mut out = vec![0u8; width];
            transport.read(offset, &mut out);
        }
        if op & 0x80 != 0 {
            transport.process_queue(0);
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
        for input in inputs(200, 600) {
            fuzz_vsock(&input);
            fuzz_block(&input);
            fuzz_mmio(&input);
            fuzz_fs(&input);
        }
    }

    /// The committed seeds put FUSE requests where the harness builds the request queue: the
    /// device answers every one of them (the first, FUSE_INIT, without error), so the fuzzer
    /// starts from real FUSE traffic.
    #[test]
    fn fs_seeds_reach_the_fuse_server() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/fs");
        let mut count = 0;
        for entry in std::fs::read_dir(&seeds).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let mem = fuzz_fs_with_memory(&data).unwrap();
            let requests = u16::from(data[4] / 2);
            let used_idx: u16 = mem
                .read_obj(GuestAddress(RING_STRIDE + USED_OFFSET + 2))
                .unwrap();
            assert_eq!(used_idx, requests);
            // The reply to request 0 (FUSE_INIT, unique 1) is at BUF_BASE + 0x4000.
            let mut out = [0u8; 16];
            mem.read_slice(&mut out, GuestAddress(BUF_BASE + 0x4000))
                .unwrap();
            assert_eq!(i32::from_le_bytes(out[4..8].try_into().unwrap()), 0);
            assert_eq!(u64::from_le_bytes(out[8..].try_into().unwrap()), 1);
            count += 1;
        }
        assert!(count >= 6);
    }

    #[test]
    fn harnesses_survive_short_inputs() {
        for len in [0, 1, 7, 100] {
            let input = vec![0xffu8; len];
            fuzz_vsock(&input);
            fuzz_block(&input);
            fuzz_mmio(&input);
            fuzz_fs(&input);
        }
    }
}
