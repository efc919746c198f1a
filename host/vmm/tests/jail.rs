//! husk-vmm's jail, seen from the host as `/proc/<pid>` shows it: a running husk-vmm (a payload
//! that halts forever, with a vsock device and, in one test, a virtio-fs share) has
//! no_new_privs, a seccomp filter on every thread, no capability but virtio-fs's, its own mount,
//! IPC and UTS namespaces, a root
//! holding only its socket's directory, `/` as working directory; it still removes its socket on
//! exit, and the host's mount table is untouched. Needs root and /dev/kvm (any backend, PVM
//! included: --allow-emulated-kvm).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// virtio-fs's capabilities: CHOWN 0, DAC_OVERRIDE 1, DAC_READ_SEARCH 2, FOWNER 3, SETGID 6,
/// SETUID 7.
const FS_CAPS: &str = "00000000000000cf";
const NO_CAPS: &str = "0000000000000000";

fn status_field(pid: u32, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

struct Running {
    child: Child,
    dir: tempdir::Dir,
    _payload: Payload,
}

impl Running {
    /// Starts husk-vmm with a vsock socket in a fresh directory (and a share if `share`), and
    /// waits until it is in its jail (its bounding set is empty: the jail's last step).
    fn start(tag: &str, share: bool) -> Running {
        assert!(
            caps::has_cap(
                None,
                caps::CapSet::Effective,
                caps::Capability::CAP_SYS_ADMIN
            )
            .unwrap(),
            "this test needs root (CAP_SYS_ADMIN): husk-vmm's jail does"
        );
        let payload = write_payload(tag, &[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
        let dir = tempdir::Dir::new(&format!("{tag}-jail"));
        std::fs::create_dir(dir.path().join("share")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk-vmm"));
        cmd.arg("--kernel")
            .arg(&payload.kernel)
            .arg("--console")
            .arg(dir.path().join("console"))
            .arg("--vsock-uds")
            .arg(dir.path().join("v.sock"))
            .arg("--guest-cid=3")
            .arg("--allow-emulated-kvm")
            .stdout(Stdio::null());
        if share {
            cmd.arg("--fs")
                .arg(format!("{},tag=t", dir.path().join("share").display()));
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while status_field(child.id(), "CapBnd").as_deref() != Some(NO_CAPS) {
            assert!(child.try_wait().unwrap().is_none(), "husk-vmm exited early");
            assert!(Instant::now() < deadline, "husk-vmm never entered its jail");
            std::thread::sleep(Duration::from_millis(20));
        }
        Running {
            child,
            dir,
            _payload: payload,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then its exit status must be 0.
    fn stop(mut self) -> tempdir::Dir {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "husk-vmm after SIGTERM: {status}");
        self.dir
    }
}

fn link(path: &str) -> std::path::PathBuf {
    std::fs::read_link(path).unwrap()
}

fn assert_jailed(vm: &Running, caps: &str) {
    let pid = vm.pid();
    // Every thread (main and vCPU) under its seccomp filter.
    let deadline = Instant::now() + Duration::from_secs(30);
    let unfiltered = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| {
                let tid = t.unwrap().file_name().to_string_lossy().into_owned();
                let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                    .unwrap_or_default();
                (!status.lines().any(|l| l == "Seccomp:\t2")).then_some(tid)
            })
            .collect()
    };
    while !unfiltered().is_empty() {
        assert!(
            Instant::now() < deadline,
            "threads without seccomp: {:?}",
            unfiltered()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    for set in ["CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, set).as_deref(), Some(NO_CAPS), "{set}");
    }
    for set in ["CapEff", "CapPrm"] {
        assert_eq!(status_field(pid, set).as_deref(), Some(caps), "{set}");
    }
    for ns in ["mnt", "ipc", "uts", "net"] {
        assert_ne!(
            link(&format!("/proc/{pid}/ns/{ns}")),
            link(&format!("/proc/self/ns/{ns}")),
            "{ns} namespace"
        );
    }
    // Its root: the socket's directory at its own path, and nothing else of the host.
    let root = Path::new("/proc").join(pid.to_string()).join("root");
    let top: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let socket_dir = std::fs::canonicalize(vm.dir.path()).unwrap();
    let first = socket_dir.iter().nth(1).unwrap();
    assert_eq!(
        top,
        vec![first.to_os_string()],
        "the jail's root holds only the socket's path"
    );
    assert!(!root.join("etc").exists() && !root.join("dev").exists());
    assert!(root
        .join(socket_dir.strip_prefix("/").unwrap())
        .join("v.sock")
        .exists());
    assert_eq!(link(&format!("/proc/{pid}/cwd")), Path::new("/"));
    // The host's mount table did not change.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*socket_dir.to_string_lossy()),
        "a jail mount leaked into the host: {mounts}"
    );
}

#[test]
fn a_vm_without_a_share_keeps_no_capability() {
    let vm = Running::start("jail-bare", false);
    assert_jailed(&vm, NO_CAPS);
    let dir = vm.stop();
    assert!(
        !dir.path().join("v.sock").exists(),
        "the socket is removed on exit"
    );
}

#[test]
fn a_vm_with_a_share_keeps_only_virtio_fs_capabilities() {
    let vm = Running::start("jail-fs", true);
    assert_jailed(&vm, FS_CAPS);
    let dir = vm.stop();
    assert!(
        !dir.path().join("v.sock").exists(),
        "the socket is removed on exit"
    );
}

/// Kills the child on drop, so a failed assertion leaves no husk-vmm behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_jail_keeps_the_host_namespaces_and_capabilities_and_still_filters_system_calls() {
    let payload = write_payload("nojail", &[0xf4, 0xeb, 0xfd]);
    let child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--kernel")
        .arg(&payload.kernel)
        .arg("--console=-")
        .arg("--allow-emulated-kvm")
        .arg("--no-jail")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    // The event loop's filter is the last thing set up: wait for it on the main thread.
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_field(pid, "Seccomp").as_deref() != Some("2") {
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "husk-vmm exited early"
        );
        assert!(
            Instant::now() < deadline,
            "husk-vmm never applied its seccomp filter"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(status_field(pid, "CapBnd").as_deref(), Some(NO_CAPS));
    assert_eq!(
        link(&format!("/proc/{pid}/ns/mnt")),
        link("/proc/self/ns/mnt")
    );
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success());
}
