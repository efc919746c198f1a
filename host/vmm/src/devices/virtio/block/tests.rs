use husk_vmm_config::BlockSpec;

use super::*;
use crate::devices::virtio::test_utils::*;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;
const R: u32 = 0;
const W: u32 = VRING_DESC_F_WRITE;

/// A disk image file removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(sectors: u64) -> Image {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "husk-blk-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, content).unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Builds a chain from (addr, len, flags) triples, linking them in order.
fn chain(parts: &[(u64, u32, u32)]) -> Vec<RawDescriptor> {
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            raw(
                addr,
                len,
                flags | next,
                if i + 1 < n { i as u16 + 1 } else { 0 },
            )
        })
        .collect()
}

fn write_header(mem: &GuestMem, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

struct Rig {
    mem: GuestMem,
    image: Image,
}

impl Rig {
    fn new(sectors: u64) -> Rig {
        Rig {
            mem: test_memory(),
            image: Image::new(sectors),
        }
    }

    /// Runs one request chain; returns (status byte, used length).
    fn run(&self, read_only: bool, descs: &[RawDescriptor]) -> (u8, u32) {
        let vq = MockSplitQueue::new(&self.mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut blk = Block::open(&BlockConfig {
            path: self.image.0.clone(),
            read_only,
        })
        .unwrap();
        blk.activate(ActivateContext {
            mem: self.mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
            interrupt: test_interrupt(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        blk.process_queue(0).unwrap();
        assert_eq!(vq.used().idx().load(), 1, "the request must be completed");
        let used = vq.used().ring().ref_at(0).unwrap().load().len();
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used)
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(&self.image.0).unwrap()
    }
}

#[test]
fn read_copies_sectors_into_the_guest() {
    let rig = Rig::new(8);
    write_header(&rig.mem, T_IN, 2);
    let (status, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]),
    );
    assert_eq!((status, used), (S_OK, 1025));
    let mut buf = vec![0u8; 1024];
    rig.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 2) && buf[512..].iter().all(|b| *b == 3));
}

#[test]
fn write_reaches_the_disk() {
    let rig = Rig::new(8);
    write_header(&rig.mem, T_OUT, 1);
    rig.mem
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    let (status, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
    );
    assert_eq!((status, used), (S_OK, 1));
    let disk = rig.disk();
    assert!(disk[512..1024].iter().all(|b| *b == 0xab));
    assert!(disk[1024..1536].iter().all(|b| *b == 2));
}

#[test]
fn write_to_read_only_disk_fails_and_leaves_it_unchanged() {
    let rig = Rig::new(8);
    write_header(&rig.mem, T_OUT, 1);
    rig.mem
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    let (status, _) = rig.run(
        true,
        &chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
    );
    assert_eq!(status, S_IOERR);
    assert!(rig.disk()[512..1024].iter().all(|b| *b == 1));
}

#[test]
fn read_past_the_end_fails() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 3);
    let (status, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]),
    );
    assert_eq!((status, used), (S_IOERR, 1));
}

#[test]
fn huge_sector_number_does_not_overflow() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, u64::MAX);
    let (status, _) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]),
    );
    assert_eq!(status, S_IOERR);
}

#[test]
fn unaligned_length_fails() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 0);
    let (status, _) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 100, W), (STATUS, 1, W)]),
    );
    assert_eq!(status, S_IOERR);
}

#[test]
fn flush_succeeds() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_FLUSH, 0);
    let (status, used) = rig.run(false, &chain(&[(HDR, 16, R), (STATUS, 1, W)]));
    assert_eq!((status, used), (S_OK, 1));
}

#[test]
fn get_id_returns_the_image_name() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_GET_ID, 0);
    let (status, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]),
    );
    assert_eq!((status, used), (S_OK, 21));
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert!(id.starts_with(b"husk-blk-test-"));
}

#[test]
fn unknown_request_type_is_unsupported() {
    let rig = Rig::new(4);
    write_header(&rig.mem, 0x77, 0);
    let (status, _) = rig.run(false, &chain(&[(HDR, 16, R), (STATUS, 1, W)]));
    assert_eq!(status, S_UNSUPP);
}

#[test]
fn short_header_fails() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 0);
    let (status, _) = rig.run(false, &chain(&[(HDR, 8, R), (STATUS, 1, W)]));
    assert_eq!(status, S_IOERR);
}

#[test]
fn chain_without_status_byte_is_completed_with_zero_length() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 0);
    let (status, used) = rig.run(false, &chain(&[(HDR, 16, R), (DATA, 512, R)]));
    assert_eq!((status, used), (0xff, 0));
}

#[test]
fn data_buffer_outside_guest_memory_is_rejected() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 0);
    let (status, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (0xfff_0000, 512, W), (STATUS, 1, W)]),
    );
    assert_eq!((status, used), (0xff, 0));
}

#[test]
fn read_into_device_readable_buffer_writes_nothing_there() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 1);
    rig.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    // Wrong direction: the data buffer is readable, so only the status byte is writable.
    let (_, used) = rig.run(
        false,
        &chain(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]),
    );
    assert_eq!(used, 1);
    let mut buf = [0u8; 512];
    rig.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|b| *b == 0x5a));
}

#[test]
fn config_from_spec_keeps_path_and_mode() {
    let spec: BlockSpec = "disk.img,ro".parse().unwrap();
    assert_eq!(
        BlockConfig::from(&spec),
        BlockConfig {
            path: "disk.img".into(),
            read_only: true
        }
    );
}

#[test]
fn request_longer_than_the_limit_is_rejected() {
    let rig = Rig::new(4);
    write_header(&rig.mem, T_IN, 0);
    // Three 4 MiB buffers (addresses repeat, which is fine for a length check) exceed 8 MiB.
    let descs = chain(&[
        (HDR, 16, R),
        (0, 0x40_0000, W),
        (0, 0x40_0000, W),
        (0, 0x40_0000, W),
        (STATUS, 1, W),
    ]);
    let (status, used) = rig.run(false, &descs);
    assert_eq!((status, used), (0xff, 0));
}
