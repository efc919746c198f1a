use super::muxer::{CONN_BUF_SIZE, FIRST_LOCAL_PORT};
use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::*;
use crate::devices::virtio::test_utils::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const RX_BUF: u64 = 0x40000;
const RX_BUF_SIZE: u32 = (HDR_LEN + 4096) as u32;
const TX_HDR: u64 = 0x70000;
const TX_PAYLOAD: u64 = 0x80000;

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

struct Rig<'a> {
    mem: &'a GuestMem,
    rx: MockSplitQueue<'a, GuestMem>,
    tx: MockSplitQueue<'a, GuestMem>,
    dev: Vsock,
    dir: PathBuf,
    rx_given: u16,
    rx_seen: u16,
    tx_descs: u16,
}

impl Drop for Rig<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMem) -> Rig<'a> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "husk-vsock-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let rx = MockSplitQueue::create(mem, GuestAddress(0x10000), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x18000), 256);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x20000), 256);
        let mut dev = Vsock::new(&VsockConfig {
            uds_path: dir.join("v.sock"),
            guest_cid: GUEST_CID,
        })
        .unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![
                rx.create_queue().unwrap(),
                tx.create_queue().unwrap(),
                ev.create_queue().unwrap(),
            ],
            interrupt: test_interrupt(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
        Rig {
            mem,
            rx,
            tx,
            dev,
            dir,
            rx_given: 0,
            rx_seen: 0,
            tx_descs: 0,
        }
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    fn give_rx(&mut self, n: u16, size: u32) {
        for _ in 0..n {
            let k = self.rx_given;
            self.rx
                .add_desc_chains(
                    &[raw(
                        RX_BUF + u64::from(k) * 0x1100,
                        size,
                        VRING_DESC_F_WRITE,
                        0,
                    )],
                    k,
                )
                .unwrap();
            self.rx_given += 1;
        }
        self.dev.process_queue(RXQ).unwrap();
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let i = self.tx_descs;
        let hdr_addr = TX_HDR + u64::from(i) * 0x40;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(hdr_addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(TX_PAYLOAD))
            .unwrap();
        let descs = if payload.is_empty() {
            vec![raw(hdr_addr, HDR_LEN as u32, 0, 0)]
        } else {
            vec![
                raw(hdr_addr, HDR_LEN as u32, VRING_DESC_F_NEXT, i + 1),
                raw(TX_PAYLOAD, payload.len() as u32, 0, 0),
            ]
        };
        self.tx.add_desc_chains(&descs, i).unwrap();
        self.tx_descs += descs.len() as u16;
        self.dev.process_queue(TXQ).unwrap();
    }

    /// Packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used_idx = self.rx.used().idx().load();
        while self.rx_seen != used_idx {
            let elem = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen))
                .unwrap()
                .load();
            self.rx_seen += 1;
            if elem.len() == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let addr = RX_BUF + u64::from(elem.id()) * 0x1100;
            let mut raw_hdr = [0u8; HDR_LEN];
            self.mem
                .read_slice(&mut raw_hdr, GuestAddress(addr))
                .unwrap();
            let hdr = Header::from_bytes(&raw_hdr);
            let mut payload = vec![0u8; elem.len() as usize - HDR_LEN];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64))
                .unwrap();
            out.push((hdr, payload));
        }
        out
    }

    fn backend(&mut self) {
        self.dev.process_backend().unwrap();
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

/// Guest connects to host port 5000 where a listener waits; returns the host's stream.
fn connect_guest_to_host(rig: &mut Rig) -> (UnixListener, UnixStream) {
    let listener = UnixListener::bind(format!("{}_5000", rig.uds().display())).unwrap();
    rig.give_rx(8, RX_BUF_SIZE);
    rig.send(guest_hdr(1234, 5000, op::REQUEST, 0), &[]);
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::RESPONSE]);
    assert_eq!(
        (pkts[0].0.src_port, pkts[0].0.dst_port, pkts[0].0.dst_cid),
        (5000, 1234, GUEST_CID)
    );
    let (stream, _) = listener.accept().unwrap();
    (listener, stream)
}

#[test]
fn guest_connection_is_forwarded_to_the_port_listener_both_ways() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, mut host) = connect_guest_to_host(&mut rig);
    rig.send(guest_hdr(1234, 5000, op::RW, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    host.write_all(b"world").unwrap();
    rig.backend();
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::RW]);
    assert_eq!(pkts[0].1, b"world");
    assert_eq!(pkts[0].0.buf_alloc, CONN_BUF_SIZE);
}

#[test]
fn guest_connection_to_a_port_nobody_listens_on_is_reset() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(4, RX_BUF_SIZE);
    rig.send(guest_hdr(1234, 6000, op::REQUEST, 0), &[]);
    assert_eq!(ops(&rig.recv()), vec![op::RST]);
}

#[test]
fn host_connect_command_opens_a_guest_connection() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(4, RX_BUF_SIZE);
    let mut client = UnixStream::connect(rig.uds()).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    rig.backend(); // accept
    rig.backend(); // read the CONNECT line
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::REQUEST]);
    let req = pkts[0].0;
    assert_eq!(req.dst_port, 1024);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    rig.send(guest_hdr(1024, req.src_port, op::RESPONSE, 0), &[]);
    let mut line = [0u8; 64];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    client.write_all(b"ping").unwrap();
    rig.backend();
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::RW]);
    assert_eq!(pkts[0].1, b"ping");
}

#[test]
fn malformed_connect_line_is_refused() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(4, RX_BUF_SIZE);
    let mut client = UnixStream::connect(rig.uds()).unwrap();
    client.write_all(b"HELLO 1024\n").unwrap();
    rig.backend();
    rig.backend();
    assert!(rig.recv().is_empty());
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("ERROR"), "{reply}");
}

#[test]
fn host_data_respects_the_guest_credit() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(format!("{}_5000", rig.uds().display())).unwrap();
    rig.give_rx(8, RX_BUF_SIZE);
    let mut req = guest_hdr(1234, 5000, op::REQUEST, 0);
    req.buf_alloc = 8;
    rig.send(req, &[]);
    rig.recv();
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[7u8; 100]).unwrap();
    rig.backend();
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::RW, op::CREDIT_REQUEST]);
    assert_eq!(pkts[0].1.len(), 8);
    let mut update = guest_hdr(1234, 5000, op::CREDIT_UPDATE, 0);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    rig.send(update, &[]);
    let pkts = rig.recv();
    assert_eq!(pkts[0].0.op, op::RW);
    assert_eq!(pkts[0].1.len(), 8);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, _host) = connect_guest_to_host(&mut rig);
    // The host never reads: once the socket buffer is full, the muxer buffers up to
    // CONN_BUF_SIZE and then resets the connection instead of growing.
    let chunk = vec![1u8; 60 * 1024];
    for _ in 0..20 {
        rig.send(guest_hdr(1234, 5000, op::RW, chunk.len() as u32), &chunk);
    }
    assert!(ops(&rig.recv()).contains(&op::RST));
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn shutdown_of_both_directions_closes_the_host_stream() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, mut host) = connect_guest_to_host(&mut rig);
    rig.send(guest_hdr(1234, 5000, op::RW, 3), b"bye");
    let mut shutdown = guest_hdr(1234, 5000, op::SHUTDOWN, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(shutdown, &[]);
    assert_eq!(ops(&rig.recv()), vec![op::RST]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
}

#[test]
fn data_buffered_for_a_slow_host_is_written_before_the_close() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, mut host) = connect_guest_to_host(&mut rig);
    // Fill the host socket so the muxer has to buffer, then close both directions.
    let chunk = vec![9u8; 60 * 1024];
    for _ in 0..4 {
        rig.send(guest_hdr(1234, 5000, op::RW, chunk.len() as u32), &chunk);
    }
    let mut shutdown = guest_hdr(1234, 5000, op::SHUTDOWN, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(shutdown, &[]);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        all.len()
    });
    for _ in 0..200 {
        if rig.dev.muxer().connection_count() == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        rig.backend();
    }
    // A budget that runs out fails here instead of hanging in the join below (the reader
    // would wait forever on a connection the muxer still holds).
    assert_eq!(
        rig.dev.muxer().connection_count(),
        0,
        "the muxer still holds the connection after 200 backend passes"
    );
    assert_eq!(reader.join().unwrap(), 4 * 60 * 1024);
    assert!(ops(&rig.recv()).contains(&op::RST));
}

#[test]
fn host_closing_its_side_sends_shutdown_to_the_guest() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, host) = connect_guest_to_host(&mut rig);
    drop(host);
    rig.backend();
    let pkts = rig.recv();
    assert_eq!(ops(&pkts), vec![op::SHUTDOWN]);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_SEND);
    rig.send(guest_hdr(1234, 5000, op::RST, 0), &[]);
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn data_for_an_unknown_connection_is_answered_with_rst() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(4, RX_BUF_SIZE);
    rig.send(guest_hdr(1, 2, op::RW, 3), b"abc");
    assert_eq!(ops(&rig.recv()), vec![op::RST]);
}

#[test]
fn spoofed_or_malformed_packets_are_dropped_silently() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(8, RX_BUF_SIZE);
    let mut spoofed = guest_hdr(1234, 5000, op::REQUEST, 0);
    spoofed.src_cid = 99;
    rig.send(spoofed, &[]);
    let mut not_host = guest_hdr(1234, 5000, op::REQUEST, 0);
    not_host.dst_cid = 7;
    rig.send(not_host, &[]);
    let mut dgram = guest_hdr(1234, 5000, op::REQUEST, 0);
    dgram.type_ = 2;
    rig.send(dgram, &[]);
    // Claims 4 KiB of payload but the chain carries 3 bytes.
    rig.send(guest_hdr(1234, 5000, op::RW, 4096), b"abc");
    // Claims more than the 64 KiB maximum.
    rig.send(guest_hdr(1234, 5000, op::RW, 70 * 1024), b"abc");
    assert!(rig.recv().is_empty());
    assert_eq!(
        rig.tx.used().idx().load(),
        5,
        "every chain is returned to the guest"
    );
}

#[test]
fn tx_chain_shorter_than_a_header_is_dropped() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(2, RX_BUF_SIZE);
    rig.tx.add_desc_chains(&[raw(TX_HDR, 10, 0, 0)], 0).unwrap();
    rig.dev.process_queue(TXQ).unwrap();
    assert_eq!(rig.tx.used().idx().load(), 1);
    assert!(rig.recv().is_empty());
}

#[test]
fn tx_chain_outside_guest_memory_is_dropped() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.tx
        .add_desc_chains(&[raw(0xffff_0000, HDR_LEN as u32, 0, 0)], 0)
        .unwrap();
    rig.dev.process_queue(TXQ).unwrap();
    assert_eq!(rig.tx.used().idx().load(), 1);
}

#[test]
fn rx_buffer_smaller_than_a_header_is_returned_empty() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(1, 16);
    rig.send(guest_hdr(1234, 6000, op::REQUEST, 0), &[]);
    let pkts = rig.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        pkts[0].0,
        Header::default(),
        "the buffer comes back with length 0"
    );
}

#[test]
fn reserved_guest_cid_is_refused() {
    let dir = std::env::temp_dir().join(format!("husk-vsock-cid-{}", std::process::id()));
    let err = Vsock::new(&VsockConfig {
        uds_path: dir.join("x"),
        guest_cid: 2,
    })
    .err()
    .unwrap();
    assert!(matches!(err, VsockError::BadCid(2)));
}

#[test]
fn overlong_connect_line_is_refused() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(2, RX_BUF_SIZE);
    let mut client = UnixStream::connect(rig.uds()).unwrap();
    // One byte past the limit and no newline: the muxer consumes all of it (nothing left
    // unread, so the close is not a reset) and answers ERROR.
    client
        .write_all(&[b'7'; super::muxer::MAX_CONNECT_LINE + 1])
        .unwrap();
    rig.backend();
    rig.backend();
    assert!(rig.recv().is_empty());
    let mut reply = String::new();
    client.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("ERROR"), "{reply}");
}

#[test]
fn duplicate_request_for_an_open_connection_is_reset() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    let (_l, _host) = connect_guest_to_host(&mut rig);
    rig.send(guest_hdr(1234, 5000, op::REQUEST, 0), &[]);
    assert_eq!(ops(&rig.recv()), vec![op::RST]);
}

#[test]
fn data_before_the_guest_accepted_a_host_connection_resets_it() {
    let mem = test_memory();
    let mut rig = Rig::new(&mem);
    rig.give_rx(4, RX_BUF_SIZE);
    let mut client = UnixStream::connect(rig.uds()).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    rig.backend();
    rig.backend();
    let req = rig.recv()[0].0;
    // RW while the host is still waiting for RESPONSE is a protocol violation.
    rig.send(guest_hdr(1024, req.src_port, op::RW, 3), b"abc");
    assert_eq!(ops(&rig.recv()), vec![op::RST]);
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}
