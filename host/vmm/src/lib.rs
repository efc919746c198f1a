//! husk-vmm: a minimal virtual machine monitor built on the rust-vmm crates.
//!
//! The machine model, the boot path and the virtio devices arrive with the husk-vmm issue.
