//! `containerd-shim-husk-v2`: containerd's shim v2 for husk. Each pod (or container started
//! without CRI annotations) runs in its own microVM; the shim is the long-lived process that
//! owns the VM and relays the containers' I/O. See docs/containerd.md.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod io;
mod logger;
mod metrics;
mod pod;
mod service;
mod shim;
mod task;
mod vm;

/// The runtime name containerd knows the shim by.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

#[tokio::main]
async fn main() {
    let config = containerd_shim::Config {
        // The shim waits for its own children (husk-vmm) through tokio; it starts nothing that
        // could orphan processes onto it.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::HuskShim>(RUNTIME_ID, Some(config)).await;
}
