//! virtio-vsock with a Firecracker-compatible hybrid host side (see [`muxer`]).
//!
//! Queues: 0 rx (host → guest), 1 tx (guest → host), 2 event (unused: no transport resets
//! are reported). Every tx packet's header is copied out once, then checked: source CID is the
//! guest's, destination is the host, type is stream, the payload length fits the chain and
//! [`muxer::MAX_PKT_PAYLOAD`]. Anything else is dropped (and logged).

pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{
    collect_chain, ActivateContext, DescBuf, DeviceError, Interrupt, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;
use muxer::{Muxer, MuxerError, MAX_PKT_PAYLOAD};
use packet::{op, Header, HDR_LEN, HOST_CID, TYPE_STREAM};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// Lowest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

/// `--vsock-uds PATH --guest-cid N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The host-side Unix socket.
    pub uds_path: PathBuf,
    /// The guest's CID.
    pub guest_cid: u64,
}

/// Errors while creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Reserved or too large CID.
    #[error("guest CID {0} is invalid (must be between 3 and 2^32-2)")]
    BadCid(u64),
    /// The host side could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
}

struct Active {
    mem: GuestMem,
    rxq: Queue,
    txq: Queue,
    _evq: Queue,
    interrupt: Arc<Interrupt>,
}

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
}

impl Vsock {
    /// A device for guest `config.guest_cid` listening on `config.uds_path`.
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < MIN_GUEST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::BadCid(config.guest_cid));
        }
        Ok(Vsock {
            guest_cid: config.guest_cid,
            muxer: Muxer::new(&config.uds_path, config.guest_cid)?,
            active: None,
        })
    }

    /// Checks a guest packet header.
    fn validate(&self, hdr: &Header, available: u64) -> Result<(), &'static str> {
        if hdr.src_cid != self.guest_cid {
            return Err("source CID is not the guest's");
        }
        if hdr.dst_cid != HOST_CID {
            return Err("destination is not the host");
        }
        if hdr.type_ != TYPE_STREAM {
            return Err("not a stream packet");
        }
        if hdr.len as usize > MAX_PKT_PAYLOAD {
            return Err("payload larger than 64 KiB");
        }
        if u64::from(hdr.len) > available {
            return Err("payload length exceeds the chain");
        }
        if hdr.op == op::RW && hdr.len == 0 {
            return Err("empty data packet");
        }
        Ok(())
    }

    /// Drains the tx queue into the muxer.
    fn process_tx(&mut self, active: &mut Active) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while let Some(chain) = active.txq.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let max_total = (HDR_LEN + MAX_PKT_PAYLOAD) as u64;
            match collect_chain(chain, max_total, usize::from(QUEUE_SIZE)) {
                Ok(descs) => self.handle_tx_chain(&active.mem, &descs),
                Err(e) => crate::guest_warn!("vsock: bad tx chain dropped: {e}"),
            }
            active
                .txq
                .add_used(&active.mem, head, 0)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn handle_tx_chain(&mut self, mem: &GuestMem, descs: &[super::Desc]) {
        let input = DescBuf::readable(descs);
        let mut raw = [0u8; HDR_LEN];
        if input.read_at(mem, 0, &mut raw).is_err() {
            crate::guest_warn!("vsock: tx packet shorter than its header; dropped");
            return;
        }
        let hdr = Header::from_bytes(&raw);
        let available = input.len().saturating_sub(HDR_LEN as u64);
        if let Err(why) = self.validate(&hdr, available) {
            crate::guest_warn!("vsock: tx packet dropped: {why} ({hdr:?})");
            return;
        }
        let mut payload = vec![0u8; hdr.len as usize];
        if input.read_at(mem, HDR_LEN as u64, &mut payload).is_err() {
            crate::guest_warn!("vsock: tx payload unreadable; dropped");
            return;
        }
        self.muxer.handle_guest_packet(&hdr, &payload);
    }

    /// Fills rx buffers with whatever the muxer has for the guest.
    fn process_rx(&mut self, active: &mut Active) -> Result<bool, DeviceError> {
        let mut used_any = false;
        while self.muxer.has_rx() {
            let Some(chain) = active.rxq.pop_descriptor_chain(&active.mem) else {
                break;
            };
            let head = chain.head_index();
            let max_total = (HDR_LEN + MAX_PKT_PAYLOAD) as u64 * 4;
            let used = match collect_chain(chain, max_total, usize::from(QUEUE_SIZE)) {
                Ok(descs) => {
                    let out = DescBuf::writable(&descs);
                    if out.len() < HDR_LEN as u64 {
                        crate::guest_warn!(
                            "vsock: rx buffer smaller than a header; returned empty"
                        );
                        0
                    } else {
                        let room =
                            (out.len() - HDR_LEN as u64).min(MAX_PKT_PAYLOAD as u64) as usize;
                        match self.muxer.next_rx(room) {
                            Some((hdr, payload)) => {
                                let ok = out.write_at(&active.mem, 0, &hdr.to_bytes()).is_ok()
                                    && out.write_at(&active.mem, HDR_LEN as u64, &payload).is_ok();
                                if ok {
                                    (HDR_LEN + payload.len()) as u32
                                } else {
                                    crate::guest_warn!(
                                        "vsock: rx buffer not writable; packet lost"
                                    );
                                    0
                                }
                            }
                            None => {
                                // Nothing after all: give the buffer back for later.
                                active.rxq.go_to_previous_position();
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    crate::guest_warn!("vsock: bad rx chain: {e}");
                    0
                }
            };
            active
                .rxq
                .add_used(&active.mem, head, used)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn run<F>(&mut self, f: F) -> Result<(), DeviceError>
    where
        F: FnOnce(&mut Self, &mut Active) -> Result<bool, DeviceError>,
    {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let result = f(self, &mut active).and_then(|tx_used| {
            let rx_used = self.process_rx(&mut active)?;
            let notify_tx = tx_used
                && active
                    .txq
                    .needs_notification(&active.mem)
                    .map_err(DeviceError::Queue)?;
            let notify_rx = rx_used
                && active
                    .rxq
                    .needs_notification(&active.mem)
                    .map_err(DeviceError::Queue)?;
            if notify_tx || notify_rx {
                active.interrupt.signal_used();
            }
            Ok(())
        });
        self.active = Some(active);
        result
    }

    /// The host side (for tests).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq), None) =
            (queues.next(), queues.next(), queues.next(), queues.next())
        else {
            return Err(DeviceError::QueueCount { expected: 3, got });
        };
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            _evq: evq,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RXQ | EVQ => self.run(|_, _| Ok(false)),
            TXQ => self.run(|dev, active| dev.process_tx(active)),
            other => Err(DeviceError::NoSuchQueue(other)),
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self) -> Result<(), DeviceError> {
        if self.active.is_none() {
            // Not running yet: still accept clients so they do not pile up in the backlog.
            self.muxer.process_events();
            return Ok(());
        }
        self.run(|dev, _| {
            dev.muxer.process_events();
            Ok(false)
        })
    }
}

#[cfg(test)]
mod tests;
