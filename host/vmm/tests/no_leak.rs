//! No thread or file descriptor outlives a VM: counted in a process of its own (this test
//! binary holds a single test), around a full run of a tiny payload with 4 vCPUs and a vsock
//! device. Needs root and /dev/kvm (any backend, PVM included).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

mod common;

use common::*;
use husk_vmm::{Vm, VmExit};

#[test]
fn a_finished_vm_leaves_no_thread_and_no_fd_behind() {
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    let payload = write_payload("leak", &print_then_reset("bye\n"));
    let dir = tempdir::Dir::new("leak-uds");
    let console = Console::default();
    let (fds_before, threads_before) = (count("/proc/self/fd"), count("/proc/self/task"));
    let mut cfg = config(payload.kernel.clone(), &console, 4);
    cfg.vsock = Some(husk_vmm::devices::virtio::vsock::VsockConfig {
        uds_path: dir.path().join("v.sock"),
        guest_cid: 3,
    });
    let outcome = Vm::new(cfg).unwrap().run().unwrap();
    assert_eq!(outcome.exit, VmExit::I8042Reset);
    assert_eq!(console.text(), "bye\n");
    assert_eq!(
        count("/proc/self/fd"),
        fds_before,
        "file descriptors leaked"
    );
    assert_eq!(count("/proc/self/task"), threads_before, "threads leaked");
    assert!(
        !dir.path().join("v.sock").exists(),
        "vsock socket left behind"
    );
}
