//! virtio-fs device tests: FUSE messages built by hand on mock split queues, served by the
//! device over a temporary shared directory.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, EntryOut, GetattrIn, InHeader, InitIn, InitOut, MknodIn, OpenIn, OutHeader,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use husk_vmm_config::FsSpec;

use super::*;
use crate::devices::virtio::test_utils::*;

const OP_LOOKUP: u32 = 1;
const OP_GETATTR: u32 = 3;
const OP_MKNOD: u32 = 8;
const OP_OPEN: u32 = 14;
const OP_INIT: u32 = 26;
const ROOT: u64 = 1;
const REQ_ADDR: u64 = 0x4_0000;
const REPLY_ADDR: u64 = 0x8_0000;
const REPLY_LEN: u32 = 0x1000;

/// A directory under the system temp dir, removed on drop.
struct SharedDir(PathBuf);

impl SharedDir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("husk-vmm-fs-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap();
        SharedDir(path)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// The device, activated on a hiprio queue at 0 and a request queue at 0x1_0000.
struct Harness<'a> {
    mem: &'a GuestMem,
    request: MockSplitQueue<'a, GuestMem>,
    dev: VirtioFs,
    next_unique: u64,
    served: u16,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMem, dir: &SharedDir) -> Self {
        let hiprio = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let request = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
        let config = FsConfig {
            path: dir.0.clone(),
            tag: "test".into(),
        };
        let mut dev = VirtioFs::new(&config).unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue().unwrap(),
                request.create_queue().unwrap(),
            ],
            interrupt: test_interrupt(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Harness {
            mem,
            request,
            dev,
            next_unique: 1,
            served: 0,
        }
    }

    /// Puts `descs` on the request queue, kicks it and returns the used length.
    fn submit(&mut self, descs: &[RawDescriptor]) -> u32 {
        self.request.build_desc_chain(descs).unwrap();
        self.dev.process_queue(1).unwrap();
        assert_eq!(self.request.used().idx().load(), self.served + 1);
        let used = self
            .request
            .used()
            .ring()
            .ref_at(usize::from(self.served))
            .unwrap()
            .load();
        self.served += 1;
        used.len()
    }

    /// Sends a FUSE request (header + `body`) in one readable descriptor with one writable
    /// reply descriptor; returns the reply header and the reply body.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (OutHeader, Vec<u8>) {
        let unique = self.next_unique;
        self.next_unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(body);
        self.mem
            .write_slice(&request, GuestAddress(REQ_ADDR))
            .unwrap();
        self.mem
            .write_slice(&[0u8; REPLY_LEN as usize], GuestAddress(REPLY_ADDR))
            .unwrap();
        let used = self.submit(&[
            raw(REQ_ADDR, request.len() as u32, VRING_DESC_F_NEXT, 1),
            raw(REPLY_ADDR, REPLY_LEN, VRING_DESC_F_WRITE, 0),
        ]);
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY_ADDR)).unwrap();
        assert_eq!(out.unique, unique);
        assert_eq!(out.len, used, "reply length and used length agree");
        let mut reply = vec![0u8; used as usize - std::mem::size_of::<OutHeader>()];
        self.mem
            .read_slice(&mut reply, GuestAddress(REPLY_ADDR + 16))
            .unwrap();
        (out, reply)
    }

    fn init(&mut self) -> InitOut {
        self.init_with(0)
    }

    fn init_with(&mut self, flags: u32) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags,
        };
        let (out, body) = self.call(OP_INIT, 0, init.as_slice());
        assert_eq!(out.error, 0);
        InitOut::from_slice(&body[..std::mem::size_of::<InitOut>()])
            .copied()
            .unwrap()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (out, reply) = self.call(OP_LOOKUP, parent, &body);
        if out.error != 0 {
            return Err(-out.error);
        }
        Ok(
            EntryOut::from_slice(&reply[..std::mem::size_of::<EntryOut>()])
                .copied()
                .unwrap(),
        )
    }

    fn open(&mut self, nodeid: u64) -> i32 {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.call(OP_OPEN, nodeid, open.as_slice()).0.error
    }
}

fn test_mem() -> GuestMem {
    test_memory()
}

#[test]
fn init_negotiates_the_protocol() {
    let dir = SharedDir::new("init");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let init = h.init();
    assert_eq!(init.major, 7);
    assert!(init.minor >= 27);
    assert!(init.max_write > 0);
}

#[test]
fn init_grants_large_requests_but_no_writeback_or_dax() {
    let dir = SharedDir::new("init-opts");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let offered = FsOptions::ASYNC_READ
        | FsOptions::BIG_WRITES
        | FsOptions::MAX_PAGES
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::PERFILE_DAX
        | FsOptions::ZERO_MESSAGE_OPEN;
    let init = h.init_with(offered.bits() as u32);
    let granted = FsOptions::from_bits_truncate(u64::from(init.flags));
    assert!(granted.contains(FsOptions::ASYNC_READ | FsOptions::BIG_WRITES | FsOptions::MAX_PAGES));
    assert!(!granted.intersects(
        FsOptions::WRITEBACK_CACHE | FsOptions::PERFILE_DAX | FsOptions::ZERO_MESSAGE_OPEN
    ));
    assert_eq!(init.max_pages, 256);
    assert_eq!(init.max_write, 1 << 20);
}

#[test]
fn lookup_and_getattr_see_the_host_file() {
    let dir = SharedDir::new("lookup");
    std::fs::write(dir.0.join("hello"), b"hello from the host\n").unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();

    let entry = h.lookup(ROOT, "hello").unwrap();
    assert_ne!(entry.nodeid, ROOT);
    assert_eq!(entry.attr.size, 20);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);

    let getattr = GetattrIn::default();
    let (out, body) = h.call(OP_GETATTR, entry.nodeid, getattr.as_slice());
    assert_eq!(out.error, 0);
    let attr = AttrOut::from_slice(&body[..std::mem::size_of::<AttrOut>()])
        .copied()
        .unwrap();
    assert_eq!(attr.attr.size, 20);
    assert_eq!(attr.attr.ino, entry.attr.ino);

    assert_eq!(h.lookup(ROOT, "missing").unwrap_err(), libc::ENOENT);
}

#[test]
fn dotdot_of_the_root_is_the_root() {
    let dir = SharedDir::new("dotdot");
    std::fs::create_dir(dir.0.join("sub")).unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();
    // A sibling of the share in the host's temp dir: never visible through "..".
    let sibling = dir.0.with_extension("sibling");
    std::fs::write(&sibling, b"outside").unwrap();
    let sibling_name = sibling.file_name().unwrap().to_str().unwrap();
    let sub = h.lookup(ROOT, "sub").unwrap();
    // The VFS may give the root a second node id, but it is the same directory.
    let parent_of_root = h.lookup(ROOT, "..").unwrap();
    let parent_of_sub = h.lookup(sub.nodeid, "..").unwrap();
    let grandparent = h.lookup(parent_of_root.nodeid, "..").unwrap();
    for dir_node in [parent_of_root, parent_of_sub, grandparent] {
        assert_eq!(h.lookup(dir_node.nodeid, "sub").unwrap().nodeid, sub.nodeid);
        assert_eq!(
            h.lookup(dir_node.nodeid, sibling_name).unwrap_err(),
            libc::ENOENT
        );
    }
    assert_eq!(h.lookup(ROOT, "../etc").unwrap_err(), libc::EINVAL);
    std::fs::remove_file(&sibling).unwrap();
}

#[test]
fn symlinks_out_of_the_share_are_not_followed_on_the_host() {
    let dir = SharedDir::new("symlink");
    std::os::unix::fs::symlink("/etc", dir.0.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.0.join("passwd-link")).unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();

    let link = h.lookup(ROOT, "etc-link").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(h.lookup(link.nodeid, "passwd").unwrap_err(), libc::ENOTDIR);

    let file_link = h.lookup(ROOT, "passwd-link").unwrap();
    assert_eq!(file_link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_ne!(h.open(file_link.nodeid), 0, "opening a symlink must fail");
}

#[test]
fn special_files_are_never_opened() {
    let dir = SharedDir::new("fifo");
    let fifo = dir.0.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();
    let entry = h.lookup(ROOT, "fifo").unwrap();
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    // Opening a FIFO would block the event loop; it is refused instead.
    assert_ne!(h.open(entry.nodeid), 0);
}

fn mknod(h: &mut Harness, name: &str, mode: u32, rdev: u32) -> i32 {
    let args = MknodIn {
        mode,
        rdev,
        umask: 0,
        padding: 0,
    };
    let mut body = args.as_slice().to_vec();
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    -h.call(OP_MKNOD, ROOT, &body).0.error
}

#[test]
fn guest_cannot_create_device_nodes_but_fifos() {
    assert!(
        caps::has_cap(None, caps::CapSet::Permitted, caps::Capability::CAP_MKNOD).unwrap(),
        "this test needs CAP_MKNOD (run as root) to show the device drops it"
    );
    let dir = SharedDir::new("mknod");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();
    // /dev/null's numbers: a node host users could open if it were created.
    let null = ((1 << 8) | 3) as u32;
    assert_eq!(
        mknod(&mut h, "chr", libc::S_IFCHR | 0o666, null),
        libc::EPERM
    );
    assert_eq!(
        mknod(&mut h, "blk", libc::S_IFBLK | 0o666, null),
        libc::EPERM
    );
    assert!(!dir.0.join("chr").exists() && !dir.0.join("blk").exists());
    assert_eq!(mknod(&mut h, "fifo", libc::S_IFIFO | 0o644, 0), 0);
    assert!(dir.0.join("fifo").exists());
}

#[test]
fn too_short_header_fails_the_request_only() {
    let dir = SharedDir::new("short");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let used = h.submit(&[
        raw(REQ_ADDR, 20, VRING_DESC_F_NEXT, 1),
        raw(REPLY_ADDR, REPLY_LEN, VRING_DESC_F_WRITE, 0),
    ]);
    assert_eq!(used, 0);
    // The device still serves well-formed requests.
    assert_eq!(h.init().major, 7);
}

#[test]
fn header_in_a_writable_buffer_fails() {
    let dir = SharedDir::new("writable-header");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let used = h.submit(&[raw(REQ_ADDR, 64, VRING_DESC_F_WRITE, 0)]);
    assert_eq!(used, 0);
}

#[test]
fn readable_after_writable_fails() {
    let dir = SharedDir::new("wrong-order");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let used = h.submit(&[
        raw(
            REPLY_ADDR,
            REPLY_LEN,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            1,
        ),
        raw(REQ_ADDR, 64, 0, 0),
    ]);
    assert_eq!(used, 0);
    assert_eq!(h.init().major, 7);
}

#[test]
fn buffer_outside_guest_memory_fails() {
    let dir = SharedDir::new("oob");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let used = h.submit(&[
        raw(REQ_ADDR, 64, VRING_DESC_F_NEXT, 1),
        raw(0xfff0_0000, REPLY_LEN, VRING_DESC_F_WRITE, 0),
    ]);
    assert_eq!(used, 0);
}

#[test]
fn tiny_reply_buffer_fails() {
    let dir = SharedDir::new("tiny-reply");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0,
        flags: 0,
    };
    let header = InHeader {
        len: 56,
        opcode: OP_INIT,
        unique: 9,
        ..Default::default()
    };
    let mut request = header.as_slice().to_vec();
    request.extend_from_slice(init.as_slice());
    mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
    let used = h.submit(&[
        raw(REQ_ADDR, 56, VRING_DESC_F_NEXT, 1),
        raw(REPLY_ADDR, 8, VRING_DESC_F_WRITE, 0),
    ]);
    assert_eq!(used, 0);
}

#[test]
fn header_length_lying_about_the_body_fails_the_request() {
    let dir = SharedDir::new("lying-len");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();
    // LOOKUP whose header claims 4 KiB but whose name has no NUL terminator.
    let header = InHeader {
        len: 4096,
        opcode: OP_LOOKUP,
        unique: 77,
        nodeid: ROOT,
        ..Default::default()
    };
    let mut request = header.as_slice().to_vec();
    request.extend_from_slice(b"abc");
    mem.write_slice(&request, GuestAddress(REQ_ADDR)).unwrap();
    let used = h.submit(&[
        raw(REQ_ADDR, request.len() as u32, VRING_DESC_F_NEXT, 1),
        raw(REPLY_ADDR, REPLY_LEN, VRING_DESC_F_WRITE, 0),
    ]);
    assert_eq!(used, 0);
}

#[test]
fn reset_forgets_the_old_drivers_inodes() {
    let dir = SharedDir::new("reset");
    std::fs::write(dir.0.join("hello"), b"x").unwrap();
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    h.init();
    let entry = h.lookup(ROOT, "hello").unwrap();
    h.dev.reset();
    let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
    h.request = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
    h.served = 0;
    h.dev
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue().unwrap(),
                h.request.create_queue().unwrap(),
            ],
            interrupt: test_interrupt(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    h.init();
    let getattr = GetattrIn::default();
    let (out, _) = h.call(OP_GETATTR, entry.nodeid, getattr.as_slice());
    assert_ne!(out.error, 0, "an inode of the previous driver is gone");
    assert_eq!(h.lookup(ROOT, "hello").unwrap().attr.size, 1);
}

#[test]
fn unknown_queue_is_an_error() {
    let dir = SharedDir::new("queue");
    let mem = test_mem();
    let mut h = Harness::new(&mem, &dir);
    assert!(h.dev.process_queue(2).is_err());
}

#[test]
fn config_space_holds_tag_and_queue_count() {
    let dir = SharedDir::new("config");
    let dev = VirtioFs::new(&FsConfig {
        path: dir.0.clone(),
        tag: "husk-shared".into(),
    })
    .unwrap();
    let mut config = [0xffu8; 40];
    dev.read_config(0, &mut config);
    assert_eq!(&config[..11], b"husk-shared");
    assert!(config[11..36].iter().all(|b| *b == 0));
    assert_eq!(&config[36..], &1u32.to_le_bytes());
    let mut tail = [0xffu8; 8];
    dev.read_config(38, &mut tail);
    assert_eq!(tail, [0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        dev.queue_max_sizes(),
        &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
    );
    assert_eq!(dev.device_type(), TYPE_FS);
}

#[test]
fn wrong_queue_count_is_refused() {
    let dir = SharedDir::new("qcount");
    let mem = test_mem();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut dev = VirtioFs::new(&FsConfig {
        path: dir.0.clone(),
        tag: "t".into(),
    })
    .unwrap();
    let result = dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![vq.create_queue().unwrap()],
        interrupt: test_interrupt(),
        acked_features: VIRTIO_F_VERSION_1,
    });
    assert!(matches!(
        result,
        Err(DeviceError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
}

#[test]
fn config_from_spec_resolves_the_path() {
    let dir = SharedDir::new("cli");
    let spec: FsSpec = format!("{},tag=husk-shared", dir.0.display())
        .parse()
        .unwrap();
    let config = FsConfig::try_from(&spec).unwrap();
    assert_eq!(config.tag, "husk-shared");
    assert_eq!(config.path, std::fs::canonicalize(&dir.0).unwrap());
}

#[test]
fn config_from_spec_rejects_missing_paths_files_and_bad_tags() {
    let dir = SharedDir::new("cli-bad");
    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let spec = |path: PathBuf, tag: &str| FsSpec {
        path,
        tag: tag.to_string(),
    };

    let missing = FsConfig::try_from(&spec(dir.0.join("missing"), "t")).unwrap_err();
    let not_dir = FsConfig::try_from(&spec(file.clone(), "t")).unwrap_err();
    let bad_tag = FsConfig::try_from(&spec(dir.0.clone(), "has space")).unwrap_err();

    assert!(
        matches!(&missing, FsError::SharedDir { err, .. } if err.kind() == std::io::ErrorKind::NotFound),
        "{missing}"
    );
    assert_eq!(
        missing.to_string(),
        format!(
            "shared directory {}: No such file or directory (os error 2)",
            dir.0.join("missing").display()
        )
    );
    assert!(matches!(not_dir, FsError::NotADirectory(_)), "{not_dir}");
    assert_eq!(
        not_dir.to_string(),
        format!(
            "shared directory {}: not a directory",
            std::fs::canonicalize(&file).unwrap().display()
        )
    );
    assert!(matches!(bad_tag, FsError::BadTag(_)), "{bad_tag}");
}
