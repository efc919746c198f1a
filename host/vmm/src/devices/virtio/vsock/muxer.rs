//! The host side of vsock, compatible with Firecracker's hybrid vsock:
//!
//! - host → guest: a client connects to the Unix socket PATH and writes `CONNECT <port>\n`; the
//!   muxer sends the guest a REQUEST from a fresh host port, and on RESPONSE writes
//!   `OK <host_port>\n` to the client; then bytes flow both ways;
//! - guest → host: a guest connection to host port P is forwarded to the Unix socket `PATH_P`.
//!
//! Flow control is credit based in both directions: the guest never gets more bytes than its
//! advertised free buffer (`buf_alloc - (tx_cnt - fwd_cnt)`), and a guest that sends more than our
//! own `CONN_BUF_SIZE` allows is reset. Every buffer is bounded: per-connection data, the
//! control-packet queue, the number of connections and of half-open client sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer we advertise per connection (bytes the guest may have in flight to us).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet we send or accept.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most simultaneous connections.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most client sockets that have not yet sent their `CONNECT` line.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// Most queued control packets (RESPONSE, RST, CREDIT_UPDATE, ...).
pub const MAX_CONTROL_PACKETS: usize = 4096;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out for host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Errors while setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The Unix socket cannot be bound.
    #[error("cannot listen on the vsock socket {path}: {err}")]
    Bind {
        /// The path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// epoll failed.
    #[error("vsock epoll: {0}")]
    Epoll(std::io::Error),
}

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// The host stream reached EOF and we sent SHUTDOWN(SEND); guest data still flows to it.
    Closing,
}

struct Connection {
    stream: UnixStream,
    state: State,
    /// Guest → host bytes not yet written to the stream (bounded by CONN_BUF_SIZE via credit).
    to_host: VecDeque<u8>,
    /// Bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The guest's receive buffer and what it consumed of it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest will send no more.
    peer_done_sending: bool,
    /// The guest will receive no more.
    peer_done_receiving: bool,
    /// Whether the stream may have data for the guest (queued in `rx_ready`).
    rx_ready: bool,
    /// Waiting for the guest to grant credit.
    credit_wait: bool,
    /// Current epoll registration.
    registered: Option<EventSet>,
    /// Both sides are done: close (RST) once `to_host` is written out.
    close_after_flush: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State, peer: &Header) -> Connection {
        Connection {
            stream,
            state,
            to_host: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            peer_done_sending: false,
            peer_done_receiving: false,
            rx_ready: false,
            credit_wait: false,
            registered: None,
            close_after_flush: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Established
            && !self.rx_ready
            && !self.credit_wait
            && !self.peer_done_receiving
        {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }
}

struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A control packet waiting for an rx buffer.
#[derive(Debug, Clone, Copy)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// The vsock host side.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, PendingClient>,
    control: VecDeque<Control>,
    rx_ready: VecDeque<Key>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` for host-initiated connections to guest `guest_cid`.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Muxer, MuxerError> {
        let bind_err = |err| MuxerError::Bind {
            path: uds_path.display().to_string(),
            err,
        };
        remove_stale_socket(uds_path);
        let listener = UnixListener::bind(uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let epoll = Epoll::new().map_err(MuxerError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, listener.as_raw_fd() as u64),
            )
            .map_err(MuxerError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The epoll fd the VMM event loop polls.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection (device reset).
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.control.clear();
        self.rx_ready.clear();
    }

    /// Whether something is waiting to go to the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            crate::guest_warn!("vsock: control queue full, dropping op {op} for {key:?}");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.wanted_events();
        let fd = conn.stream.as_raw_fd();
        let result = match (conn.registered, want.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => {
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(want, fd as u64))
            }
            (Some(_), true) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (Some(cur), false) if cur == want => Ok(()),
            (Some(_), false) => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, fd as u64),
            ),
        };
        match result {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => tracing::error!("vsock: epoll update for {key:?} failed: {e}"),
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.by_fd.remove(&fd);
        }
    }

    /// Resets the connection: RST to the guest, host socket closed.
    fn reset_conn(&mut self, key: Key) {
        self.remove(key);
        self.push_control(key, op::RST, 0);
    }

    fn mark_rx_ready(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.rx_ready && !conn.credit_wait && conn.state == State::Established {
                conn.rx_ready = true;
                self.rx_ready.push_back(key);
            }
        }
        self.update_interest(key);
    }

    /// Handles whatever is ready on the host side (non-blocking).
    pub fn process_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("vsock: epoll_wait failed: {e}");
                return;
            }
        };
        for ev in events.iter().take(n) {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            if fd == self.listener.as_raw_fd() {
                self.accept_clients();
            } else if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(&key) = self.by_fd.get(&fd) {
                if set.contains(EventSet::OUT) {
                    self.flush_to_host(key);
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.mark_rx_ready(key);
                }
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() >= MAX_PENDING_CLIENTS
                        || stream.set_nonblocking(true).is_err()
                    {
                        crate::guest_warn!(
                            "vsock: too many clients waiting to send CONNECT; closing one"
                        );
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            fd,
                            PendingClient {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::guest_warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the client's `CONNECT <port>\n` byte by byte (so no stream data is consumed past it).
    fn read_connect_line(&mut self, fd: RawFd) {
        let port = {
            let Some(client) = self.pending.get_mut(&fd) else {
                return;
            };
            let mut byte = [0u8; 1];
            loop {
                match client.stream.read(&mut byte) {
                    Ok(0) => break Err("closed before CONNECT"),
                    Ok(_) if byte[0] == b'\n' => break parse_connect(&client.line),
                    Ok(_) if client.line.len() >= MAX_CONNECT_LINE => {
                        break Err("CONNECT line too long")
                    }
                    Ok(_) => client.line.push(byte[0]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(_) => break Err("read error"),
                }
            }
        };
        let Some(client) = self.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let peer_port = match port {
            Ok(p) => p,
            Err(why) => {
                crate::guest_warn!("vsock: client rejected: {why}");
                let mut stream = client.stream;
                let _ = stream.write_all(b"ERROR invalid CONNECT request\n");
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!(
                "vsock: connection limit reached; client to port {peer_port} rejected"
            );
            return;
        }
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            return;
        };
        let key = (local_port, peer_port);
        let conn = Connection::new(client.stream, State::Connecting, &Header::default());
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_control(key, op::REQUEST, 0);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..MAX_CONNECTIONS * 2 {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    /// Writes buffered guest data to the host stream; grants credit back as it drains.
    fn flush_to_host(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match conn.stream.write(front) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if !failed && conn.to_host.is_empty() && conn.peer_done_sending {
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        if !failed && conn.to_host.is_empty() && conn.close_after_flush {
            self.reset_conn(key);
            return;
        }
        let send_credit = !failed && (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CONN_BUF_SIZE / 4;
        if send_credit {
            conn.fwd_cnt_sent = conn.fwd_cnt;
        }
        if failed {
            tracing::debug!("vsock: host side of {key:?} failed; resetting");
            self.reset_conn(key);
            return;
        }
        if send_credit {
            self.push_control(key, op::CREDIT_UPDATE, 0);
        }
        self.update_interest(key);
    }

    /// A packet from the guest (header validated for CIDs and type by the device).
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        enum Next {
            Nothing,
            Reset,
            Remove,
            Flush,
            CreditUpdate,
            CloseBoth,
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::REQUEST {
            self.guest_connect(key, hdr);
            return;
        }
        let (next, credit_granted) = {
            let Some(conn) = self.conns.get_mut(&key) else {
                if hdr.op != op::RST {
                    self.push_control(key, op::RST, 0);
                }
                return;
            };
            let had_no_credit = conn.credit_wait;
            conn.peer_buf_alloc = hdr.buf_alloc;
            conn.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
            let granted = had_no_credit && conn.peer_credit() > 0;
            if granted {
                conn.credit_wait = false;
            }
            let next = match hdr.op {
                op::RESPONSE if conn.state == State::Connecting => {
                    conn.state = State::Established;
                    let ack = format!("OK {}\n", key.0);
                    if conn.stream.write_all(ack.as_bytes()).is_err() {
                        Next::Reset
                    } else {
                        Next::Nothing
                    }
                }
                op::RW if conn.state != State::Connecting => {
                    let in_flight = u64::from((conn.rx_cnt - conn.fwd_cnt).0);
                    if in_flight + payload.len() as u64 > u64::from(CONN_BUF_SIZE)
                        || conn.peer_done_sending
                    {
                        crate::guest_warn!("vsock: guest overran its credit on {key:?}; resetting");
                        Next::Reset
                    } else {
                        conn.to_host.extend(payload);
                        conn.rx_cnt += Wrapping(payload.len() as u32);
                        Next::Flush
                    }
                }
                op::CREDIT_UPDATE => Next::Nothing,
                op::CREDIT_REQUEST => {
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    Next::CreditUpdate
                }
                op::SHUTDOWN => {
                    conn.peer_done_receiving |= hdr.flags & SHUTDOWN_RCV != 0;
                    conn.peer_done_sending |= hdr.flags & SHUTDOWN_SEND != 0;
                    if conn.peer_done_receiving && conn.peer_done_sending {
                        Next::CloseBoth
                    } else {
                        if conn.peer_done_sending && conn.to_host.is_empty() {
                            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                        }
                        Next::Nothing
                    }
                }
                op::RST => Next::Remove,
                other => {
                    crate::guest_warn!(
                        "vsock: unexpected op {other} on {key:?} in state {:?}; resetting",
                        conn.state
                    );
                    Next::Reset
                }
            };
            (next, granted)
        };
        match next {
            Next::Reset => return self.reset_conn(key),
            Next::Remove => return self.remove(key),
            Next::CloseBoth => {
                // Both directions closed: close with RST once buffered data is written out.
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.close_after_flush = true;
                }
                return self.flush_to_host(key);
            }
            Next::Flush => self.flush_to_host(key),
            Next::CreditUpdate => self.push_control(key, op::CREDIT_UPDATE, 0),
            Next::Nothing => {}
        }
        if credit_granted {
            self.mark_rx_ready(key);
        } else {
            self.update_interest(key);
        }
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.push_control(key, op::RST, 0);
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match UnixStream::connect(&target) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                tracing::debug!(
                    "vsock: guest connection to host port {} refused ({} not listening)",
                    key.0,
                    target.display()
                );
                self.push_control(key, op::RST, 0);
                return;
            }
        };
        let conn = Connection::new(stream, State::Established, hdr);
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_control(key, op::RESPONSE, 0);
        self.update_interest(key);
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, Vec<u8>)> {
        enum Read {
            Skip,
            NoCredit,
            Eof,
            Data(Vec<u8>),
            WouldBlock,
            Failed,
        }
        loop {
            if let Some(c) = self.control.pop_front() {
                if let Some(conn) = self.conns.get_mut(&c.key) {
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                }
                return Some((self.header(c.key, c.op, c.flags, 0), Vec::new()));
            }
            let key = self.rx_ready.pop_front()?;
            let outcome = match self.conns.get_mut(&key) {
                None => Read::Skip,
                Some(conn) if !conn.rx_ready => Read::Skip,
                Some(conn) => {
                    let credit = conn.peer_credit() as usize;
                    if credit == 0 {
                        conn.rx_ready = false;
                        conn.credit_wait = true;
                        Read::NoCredit
                    } else {
                        let mut buf = vec![0u8; credit.min(max_payload).min(MAX_PKT_PAYLOAD)];
                        match conn.stream.read(&mut buf) {
                            Ok(0) => {
                                conn.rx_ready = false;
                                conn.state = State::Closing;
                                Read::Eof
                            }
                            Ok(n) => {
                                buf.truncate(n);
                                conn.tx_cnt += Wrapping(n as u32);
                                conn.fwd_cnt_sent = conn.fwd_cnt;
                                Read::Data(buf)
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                conn.rx_ready = false;
                                Read::WouldBlock
                            }
                            Err(_) => Read::Failed,
                        }
                    }
                }
            };
            match outcome {
                Read::Skip => {}
                Read::NoCredit => {
                    self.push_control(key, op::CREDIT_REQUEST, 0);
                    self.update_interest(key);
                }
                Read::Eof => {
                    // The host will send nothing more. It may still read (a half-closed
                    // stream); if it closed entirely, the next write fails and resets.
                    self.push_control(key, op::SHUTDOWN, SHUTDOWN_SEND);
                    self.update_interest(key);
                }
                Read::Data(buf) => {
                    self.rx_ready.push_back(key);
                    let len = buf.len() as u32;
                    return Some((self.header(key, op::RW, 0, len), buf));
                }
                Read::WouldBlock => self.update_interest(key),
                Read::Failed => self.reset_conn(key),
            }
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Removes a leftover socket at `path` (never a regular file or directory).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Parses `CONNECT <port>` (without the newline).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let text = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8")?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .ok_or("expected CONNECT <port>")?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| "invalid port in CONNECT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"connect 5").is_err());
        assert!(parse_connect(b"CONNECT 99999999999").is_err());
        assert!(parse_connect(&[0xff, 0xfe]).is_err());
    }
}
