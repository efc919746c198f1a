//! Where devices are wired up: port and MMIO ranges, IRQ lines and the kernel command line
//! announcements are allocated here and nowhere else. Adding a virtio device is one call to
//! [`DeviceManager::add_virtio`].

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusError;
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{self, ConsoleWriter, SerialDevice};
use crate::devices::virtio::mmio::{MmioError, MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::devices::Bus;
use crate::exit::ExitHandle;
use crate::layout::{
    I8042_DATA_PORT, IOAPIC_PINS, MMIO_HOLE_START, SERIAL_IRQ, SERIAL_PORT, VIRTIO_FIRST_IRQ,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SLOTS,
};
use crate::memory::GuestMem;

/// Errors while wiring up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// No IRQ line or MMIO window is left.
    #[error("no free IRQ line or MMIO window for another virtio device")]
    Exhausted,
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{what} failed: {err}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Two devices overlap.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The transport could not be created.
    #[error(transparent)]
    Mmio(#[from] MmioError),
}

/// A virtio device as the event loop sees it.
pub struct VirtioEntry {
    /// The transport (shared with the vCPU threads through the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Queue notification eventfds (the ioeventfds KVM signals), one per queue.
    pub queue_evts: Vec<EventFd>,
    /// The back end's fd, if the device has one.
    pub backend_fd: Option<RawFd>,
    /// MMIO base address.
    pub base: u64,
    /// IRQ line.
    pub irq: u32,
}

/// Allocates resources and keeps the buses.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// The virtio devices, in creation order.
    pub virtio: Vec<VirtioEntry>,
    next_slot: u64,
    next_irq: u32,
}

fn new_eventfd() -> Result<EventFd, DeviceManagerError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(DeviceManagerError::EventFd)
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        DeviceManager {
            pio: Bus::new(),
            mmio: Bus::new(),
            virtio: Vec::new(),
            next_slot: 0,
            next_irq: VIRTIO_FIRST_IRQ,
        }
    }

    /// The 8250 UART at 0x3f8, IRQ 4.
    pub fn add_serial(&mut self, vm: &VmFd, out: ConsoleWriter) -> Result<(), DeviceManagerError> {
        let irq = new_eventfd()?;
        vm.register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|err| DeviceManagerError::Kvm {
                what: "KVM_IRQFD (serial)",
                err,
            })?;
        let dev = Arc::new(Mutex::new(SerialDevice::new(irq, out)));
        self.pio
            .insert(u64::from(SERIAL_PORT), serial::PORT_RANGE, dev)?;
        Ok(())
    }

    /// The i8042 reset line at ports 0x60..=0x64.
    pub fn add_i8042(&mut self, exit: ExitHandle) -> Result<(), DeviceManagerError> {
        let dev = Arc::new(Mutex::new(I8042::new(exit)));
        self.pio
            .insert(u64::from(I8042_DATA_PORT), i8042::PORT_RANGE, dev)?;
        Ok(())
    }

    /// Adds a virtio device: allocates its MMIO window and IRQ, registers its irqfd and one
    /// ioeventfd per queue, and maps it on the MMIO bus.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMem,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceManagerError> {
        if self.next_slot >= VIRTIO_MMIO_SLOTS || self.next_irq >= IOAPIC_PINS {
            return Err(DeviceManagerError::Exhausted);
        }
        let base = MMIO_HOLE_START + self.next_slot * VIRTIO_MMIO_SIZE;
        let irq = self.next_irq;
        let irqfd = new_eventfd()?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(|err| DeviceManagerError::Kvm {
                what: "KVM_IRQFD",
                err,
            })?;
        let backend_fd = device.backend_fd();
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(irqfd)))?;
        let mut queue_evts = Vec::new();
        for (index, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                index as u32,
            )
            .map_err(|err| DeviceManagerError::Kvm {
                what: "KVM_IOEVENTFD",
                err,
            })?;
            queue_evts.push(evt.try_clone().map_err(DeviceManagerError::EventFd)?);
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.virtio.push(VirtioEntry {
            transport,
            queue_evts,
            backend_fd,
            base,
            irq,
        });
        self.next_slot += 1;
        self.next_irq += 1;
        Ok(())
    }

    /// `virtio_mmio.device=` announcements for the kernel command line.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.virtio
            .iter()
            .map(|v| format!("virtio_mmio.device=4K@0x{:x}:{}", v.base, v.irq))
            .collect()
    }
}
