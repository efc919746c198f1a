//! Port-I/O and MMIO buses: address ranges mapped to devices, fixed after setup.

use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset`; unknown registers read as zeros.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range is empty, wraps around, or overlaps an existing one.
    #[error("bus range 0x{base:x}+0x{len:x} is empty or overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base.saturating_add(r.len) && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        self.ranges.sort_by_key(|r| r.base);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let idx = self
            .ranges
            .partition_point(|r| r.base <= addr)
            .checked_sub(1)?;
        let range = self.ranges.get(idx)?;
        let offset = addr - range.base;
        let last = offset.checked_add(size as u64)?;
        (last <= range.len).then_some((range, offset))
    }

    /// Reads from the device at `addr`; false if nothing is mapped there (data is left as is).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                if let Ok(mut dev) = range.device.lock() {
                    dev.read(offset, data);
                }
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                if let Ok(mut dev) = range.device.lock() {
                    dev.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_are_routed_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, dev.clone()).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x103, &mut data));
        assert_eq!(data, [3]);
        assert!(bus.write(0x107, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![9])]);
    }

    #[test]
    fn accesses_outside_or_straddling_a_range_are_unmapped() {
        let mut bus = Bus::new();
        bus.insert(0x100, 8, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .unwrap();
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(!bus.read(0x106, &mut [0u8; 4]));
        assert!(!bus.write(u64::MAX, &[0u8; 2]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 8, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .unwrap();
        assert!(bus
            .insert(0x104, 8, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .is_err());
        assert!(bus
            .insert(0x200, 0, Arc::new(Mutex::new(Recorder(Vec::new()))))
            .is_err());
    }
}
