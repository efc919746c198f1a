//! Devices: the port/MMIO buses, legacy devices (8250 serial, i8042) and virtio devices.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
