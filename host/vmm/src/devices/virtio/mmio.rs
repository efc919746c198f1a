//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! The device status follows an explicit state machine:
//! `0 → ACKNOWLEDGE → +DRIVER → +FEATURES_OK → +DRIVER_OK`, with FAILED settable at any time and
//! 0 resetting. Any other transition, a queue register written outside FEATURES_OK..DRIVER_OK,
//! a feature write after FEATURES_OK, an access of the wrong width or at an unknown offset is
//! logged and ignored. A device error sets NEEDS_RESET and raises a configuration interrupt.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::memory::GuestMem;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio register layout version for virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("HUSK" would do; QEMU uses 0x554d4551).
pub const VENDOR_ID: u32 = 0x4b53_5548;

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register (for ioeventfd registration).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// A virtio device behind the MMIO register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

/// Errors while creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue could not be created with the device's maximum size.
    #[error("invalid queue size for device: {0}")]
    Queue(virtio_queue::Error),
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(std::io::Error),
}

impl MmioTransport {
    /// Wraps `device`, raising interrupts through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(MmioError::Queue))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = queues
            .iter()
            .map(|_| {
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MmioError::EventFd)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The queue notification eventfds, one per queue.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's back-end fd, if any.
    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn set_needs_reset(&mut self, why: &dyn std::fmt::Display) {
        crate::guest_warn!(
            "virtio device type {} failed, needs reset: {why}",
            self.device.device_type()
        );
        self.status |= status::NEEDS_RESET;
        self.interrupt.signal_config();
    }

    fn can_run(&self) -> bool {
        self.activated && self.status & (status::NEEDS_RESET | status::FAILED) == 0
    }

    /// The driver notified queue `index` (through the ioeventfd or a trapped write).
    pub fn process_queue(&mut self, index: usize) {
        if !self.can_run() {
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.set_needs_reset(&e);
        }
    }

    /// The device's back end has events. They are consumed even when the device is not running
    /// (otherwise a level-triggered back-end fd would keep the event loop spinning).
    pub fn process_backend(&mut self) {
        let result = self.device.process_backend();
        if let Err(e) = result {
            if self.can_run() {
                self.set_needs_reset(&e);
            }
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers are writable only between FEATURES_OK and DRIVER_OK, on a queue that is
    /// not ready yet (QueueReady itself excepted).
    fn queue_mut_for_setup(&mut self, reg_offset: u64) -> Option<&mut Queue> {
        let in_setup =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        if !in_setup {
            crate::guest_warn!("queue register 0x{reg_offset:x} written outside queue setup (status 0x{:x}); ignored", self.status);
            return None;
        }
        let sel = self.queue_sel;
        let queue = self.queues.get_mut(sel as usize);
        match queue {
            Some(q) if reg_offset == reg::QUEUE_READY || !q.ready() => Some(q),
            Some(_) => {
                crate::guest_warn!("queue {sel} register 0x{reg_offset:x} written while the queue is ready; ignored");
                None
            }
            None => {
                crate::guest_warn!(
                    "queue register 0x{reg_offset:x} written for nonexistent queue {sel}; ignored"
                );
                None
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let features = self.device.features() | VIRTIO_F_VERSION_1;
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_AVAIL_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                crate::guest_warn!(
                    "read of unknown virtio-mmio register 0x{offset:x}; returning 0"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_mut_for_setup(offset) {
                    // Sizes that are zero, not a power of two or above the maximum are refused by
                    // virtio-queue and leave the queue unusable (is_valid fails at DRIVER_OK).
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue_mut_for_setup(offset) {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH | reg::QUEUE_USED_LOW | reg::QUEUE_USED_HIGH => {
                if let Some(q) = self.queue_mut_for_setup(offset) {
                    let (low, high) = if offset & 4 == 0 { (Some(value), None) } else { (None, Some(value)) };
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            _ => crate::guest_warn!("write of 0x{value:x} to read-only or unknown virtio-mmio register 0x{offset:x}; ignored"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating =
            self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
        if !negotiating {
            crate::guest_warn!(
                "driver features written outside negotiation (status 0x{:x}); ignored",
                self.status
            );
            return;
        }
        let offered = self.device.features() | VIRTIO_F_VERSION_1;
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffffu64),
            1 => (32, 0xffff_ffff_0000_0000u64),
            other => {
                crate::guest_warn!("driver features page {other} does not exist; ignored");
                return;
            }
        };
        let requested = u64::from(value) << shift;
        if requested & !offered != 0 {
            crate::guest_warn!(
                "driver accepted features it was not offered: 0x{:x}; dropped",
                requested & !offered
            );
        }
        self.acked_features = (self.acked_features & !mask) | (requested & offered);
    }

    fn notify(&mut self, value: u32) {
        match self.queue_evts.get(value as usize) {
            Some(evt) if self.activated => {
                if let Err(e) = evt.write(1) {
                    tracing::error!("cannot signal queue {value}: {e}");
                }
            }
            Some(_) => crate::guest_warn!("queue {value} notified before DRIVER_OK; ignored"),
            None => crate::guest_warn!("notification for nonexistent queue {value}; ignored"),
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            crate::guest_warn!(
                "driver marked virtio device type {} FAILED",
                self.device.device_type()
            );
            self.status |= FAILED;
            return;
        }
        let current = self.status & !NEEDS_RESET;
        let next = match current {
            0 => ACKNOWLEDGE,
            s if s == ACKNOWLEDGE => ACKNOWLEDGE | DRIVER,
            s if s == ACKNOWLEDGE | DRIVER => ACKNOWLEDGE | DRIVER | FEATURES_OK,
            s if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
            }
            _ => 0,
        };
        if value & !NEEDS_RESET != next || next == 0 {
            crate::guest_warn!(
                "illegal virtio status transition 0x{:x} -> 0x{value:x}; ignored",
                self.status
            );
            return;
        }
        match next & !current {
            FEATURES_OK if self.acked_features & VIRTIO_F_VERSION_1 == 0 => {
                // Legacy drivers are not supported: leave FEATURES_OK clear, the driver sees it.
                crate::guest_warn!("driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused");
            }
            DRIVER_OK => self.activate(),
            _ => self.status = next | (self.status & NEEDS_RESET),
        }
    }

    fn activate(&mut self) {
        if let Some(bad) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.status |= status::DRIVER_OK;
            self.set_needs_reset(&format!(
                "queue {bad} is ready but invalid (size or ring addresses)"
            ));
            return;
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: self
                .queues
                .iter()
                .filter_map(|q| Queue::try_from(q.state()).ok())
                .collect(),
            interrupt: Arc::clone(&self.interrupt),
            acked_features: self.acked_features,
        };
        self.status |= status::DRIVER_OK;
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => self.set_needs_reset(&e),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            crate::guest_warn!(
                "virtio-mmio read of {} bytes at 0x{offset:x}: registers are 32-bit; returning 0",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - reg::CONFIG, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            } else {
                crate::guest_warn!("config write before DRIVER status; ignored");
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_warn!(
                "virtio-mmio write of {} bytes at 0x{offset:x}: registers are 32-bit; ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            crate::guest_warn!("unaligned virtio-mmio write at 0x{offset:x}; ignored");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::DeviceError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counters {
        activated: AtomicUsize,
        reset: AtomicUsize,
        processed: AtomicUsize,
    }

    struct FakeDevice {
        counters: Arc<Counters>,
        fail_process: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x10);
        }
        fn activate(&mut self, _ctx: ActivateContext) -> Result<(), DeviceError> {
            self.counters.activated.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.counters.reset.fetch_add(1, Ordering::SeqCst);
        }
        fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
            self.counters.processed.fetch_add(1, Ordering::SeqCst);
            if self.fail_process {
                return Err(DeviceError::NoSuchQueue(index));
            }
            Ok(())
        }
    }

    fn transport(fail_process: bool) -> (MmioTransport, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let dev = FakeDevice {
            counters: counters.clone(),
            fail_process,
        };
        let t = MmioTransport::new(Box::new(dev), test_memory(), test_interrupt()).unwrap();
        (t, counters)
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Drives the transport like Linux's virtio-mmio driver up to DRIVER_OK.
    fn bring_up(t: &mut MmioTransport) {
        use status::*;
        write32(t, reg::STATUS, ACKNOWLEDGE);
        write32(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        write32(t, reg::DRIVER_FEATURES_SEL, 1);
        write32(t, reg::DRIVER_FEATURES, 1);
        write32(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        write32(t, reg::QUEUE_SEL, 0);
        write32(t, reg::QUEUE_NUM, 16);
        write32(t, reg::QUEUE_DESC_LOW, 0x1000);
        write32(t, reg::QUEUE_AVAIL_LOW, 0x2000);
        write32(t, reg::QUEUE_USED_LOW, 0x3000);
        write32(t, reg::QUEUE_READY, 1);
        write32(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport(false);
        assert_eq!(read32(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(read32(&mut t, reg::VERSION), 2);
        assert_eq!(read32(&mut t, reg::DEVICE_ID), 4);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 1);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 16);
    }

    #[test]
    fn full_negotiation_activates_the_device() {
        let (mut t, counters) = transport(false);
        bring_up(&mut t);
        assert_eq!(t.status(), 0xf);
        assert_eq!(counters.activated.load(Ordering::SeqCst), 1);
        write32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    }

    #[test]
    fn skipping_a_status_step_is_ignored() {
        let (mut t, counters) = transport(false);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(t.status(), 0);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(t.status(), status::ACKNOWLEDGE);
        assert_eq!(counters.activated.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let (mut t, _) = transport(false);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(t.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_setup_before_features_ok_is_ignored() {
        let (mut t, _) = transport(false);
        write32(&mut t, reg::QUEUE_NUM, 8);
        write32(&mut t, reg::QUEUE_DESC_LOW, 0x5000);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM), 16);
        assert_eq!(read32(&mut t, reg::QUEUE_DESC_LOW), 0);
    }

    #[test]
    fn invalid_queue_at_driver_ok_sets_needs_reset() {
        let (mut t, counters) = transport(false);
        use status::*;
        write32(&mut t, reg::STATUS, ACKNOWLEDGE);
        write32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut t, reg::DRIVER_FEATURES, 1);
        write32(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        write32(&mut t, reg::QUEUE_DESC_LOW, 0xfff0_0000);
        write32(&mut t, reg::QUEUE_READY, 1);
        write32(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(t.status() & NEEDS_RESET, 0);
        assert_eq!(counters.activated.load(Ordering::SeqCst), 0);
        assert_ne!(read32(&mut t, reg::INTERRUPT_STATUS) & 2, 0);
    }

    #[test]
    fn device_error_sets_needs_reset_and_stops_processing() {
        let (mut t, counters) = transport(true);
        bring_up(&mut t);
        t.process_queue(0);
        assert_ne!(t.status() & status::NEEDS_RESET, 0);
        t.process_queue(0);
        assert_eq!(counters.processed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let (mut t, counters) = transport(false);
        bring_up(&mut t);
        write32(&mut t, reg::STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(counters.reset.load(Ordering::SeqCst), 1);
        assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn wrong_width_and_unknown_accesses_are_ignored() {
        let (mut t, _) = transport(false);
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(t.status(), 0);
        write32(&mut t, 0x0f0, 1);
        assert_eq!(read32(&mut t, 0x0f0), 0);
        write32(&mut t, reg::MAGIC, 0);
        assert_eq!(read32(&mut t, reg::MAGIC), MAGIC_VALUE);
    }

    #[test]
    fn notify_before_driver_ok_or_for_bad_queue_is_ignored() {
        let (mut t, _) = transport(false);
        write32(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(t.queue_evts()[0].read().is_err());
        bring_up(&mut t);
        write32(&mut t, reg::QUEUE_NOTIFY, 7);
        assert!(t.queue_evts()[0].read().is_err());
    }

    #[test]
    fn config_write_before_driver_and_bad_feature_page_are_ignored() {
        let (mut t, _) = transport(false);
        t.write(reg::CONFIG, &[1, 2, 3, 4]);
        assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), 0);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 7);
        write32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        // Features the device does not offer (all of page 0 here) are dropped.
        write32(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            t.status() & status::FEATURES_OK,
            0,
            "VERSION_1 was never accepted"
        );
    }

    #[test]
    fn config_space_is_read_through_the_device() {
        let (mut t, _) = transport(false);
        let mut data = [0u8; 1];
        t.read(reg::CONFIG + 2, &mut data);
        assert_eq!(data, [0x12]);
    }
}
