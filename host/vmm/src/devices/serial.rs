//! 8250 UART on ttyS0 (port 0x3f8, IRQ 4 through an irqfd), emulated by vm-superio.
//!
//! Output goes to a [`ConsoleWriter`]: bounded when it is a file, and scanned for the kernel's
//! panic banner so that a panicking guest ends `husk-vmm` with a distinct exit status (the guest
//! has no ACPI, so there is no pvpanic device it could use).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Size of the port range of a 16550 UART.
pub const PORT_RANGE: u64 = 8;
/// Text printed by Linux's `panic()`.
pub const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

/// Raises the serial interrupt by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Detects [`PANIC_BANNER`] in a byte stream fed piecewise.
#[derive(Debug, Default)]
pub struct PanicDetector {
    matched: usize,
    seen: Arc<AtomicBool>,
}

impl PanicDetector {
    /// A detector reporting through `seen`.
    pub fn new(seen: Arc<AtomicBool>) -> Self {
        PanicDetector { matched: 0, seen }
    }

    /// Feeds bytes. The banner's first byte does not recur in it, so restarting on mismatch
    /// finds every occurrence.
    pub fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            if PANIC_BANNER.get(self.matched) == Some(b) {
                self.matched += 1;
            } else {
                self.matched = usize::from(PANIC_BANNER.first() == Some(b));
            }
            if self.matched == PANIC_BANNER.len() {
                self.seen.store(true, Ordering::SeqCst);
                self.matched = 0;
            }
        }
    }
}

/// Where the console goes, with an optional size cap.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    cap: Option<u64>,
    written: u64,
    truncated: bool,
    panic: PanicDetector,
}

impl ConsoleWriter {
    /// Writes to `out`, at most `cap` bytes if set, reporting a kernel panic through `panicked`.
    pub fn new(out: Box<dyn Write + Send>, cap: Option<u64>, panicked: Arc<AtomicBool>) -> Self {
        ConsoleWriter {
            out,
            cap,
            written: 0,
            truncated: false,
            panic: PanicDetector::new(panicked),
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.panic.feed(buf);
        let room = match self.cap {
            Some(cap) => cap.saturating_sub(self.written),
            None => u64::MAX,
        };
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if let Some(part) = buf.get(..take).filter(|p| !p.is_empty()) {
            // A console that cannot be written (closed pipe, full disk) must not stop the guest.
            if self.out.write_all(part).is_ok() {
                self.written = self.written.saturating_add(part.len() as u64);
            }
        }
        if take < buf.len() && !self.truncated {
            self.truncated = true;
            let _ = self
                .out
                .write_all(b"\n[husk-vmm: console output cap reached, rest discarded]\n");
            let _ = self.out.flush();
        }
        // The guest's bytes are always consumed, written or discarded.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, *value) {
                tracing::warn!("serial write failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn panic_banner_split_across_writes_is_detected() {
        let seen = Arc::new(AtomicBool::new(false));
        let mut det = PanicDetector::new(seen.clone());
        det.feed(b"[ 1.0] Kernel pa");
        det.feed(b"nic - not syncing: Attempted to kill init!");
        assert!(seen.load(Ordering::SeqCst));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let seen = Arc::new(AtomicBool::new(false));
        let mut det = PanicDetector::new(seen.clone());
        det.feed(b"Kernel panic test disabled; KKernel panic - not synced");
        assert!(!seen.load(Ordering::SeqCst));
    }

    #[test]
    fn console_file_output_is_capped() {
        let sink = Shared::default();
        let mut w = ConsoleWriter::new(Box::new(sink.clone()), Some(10), Arc::default());
        assert_eq!(w.write(b"0123456789abcdef").unwrap(), 16);
        w.write_all(b"more").unwrap();
        let out = sink.0.lock().unwrap().clone();
        assert!(out.starts_with(b"0123456789\n[husk-vmm: console output cap reached"));
        assert!(!out.ends_with(b"more"));
    }

    #[test]
    fn serial_transmit_register_writes_reach_the_console() {
        let sink = Shared::default();
        let w = ConsoleWriter::new(Box::new(sink.clone()), None, Arc::default());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, w);
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi");
    }
}
