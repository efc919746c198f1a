//! husk-vmm end to end: boots the real guest kernel on a real KVM (run inside the test host,
//! `tests/e2e/run`). Prerequisites are checked, never skipped:
//! - a hardware-backed /dev/kvm (svm/vmx, not PVM);
//! - target/guest/vmlinux and target/guest/initramfs.cpio.gz (`make guest`);
//! - the husk-vmm binary (HUSK_VMM_BIN, or next to this test's target directory);
//! - target/guest/vmm-echo.cpio.gz, the vsock echo image (built here if missing, by
//!   host/vmm/tests/fixtures/build-echo-image).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const AGENT_MARKER: &str = "husk-agent: started";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

fn require_real_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm missing: run inside tests/testhost/run"
    );
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "svm" || f == "vmx");
    assert!(
        hw && !Path::new("/sys/module/kvm_pvm").exists(),
        "/dev/kvm is not hardware-backed (PVM or no VMX/SVM): run inside tests/testhost/run"
    );
}

fn guest_file(name: &str) -> PathBuf {
    let path = repo_root().join("target/guest").join(name);
    assert!(
        path.exists(),
        "{} missing: run `make guest` first",
        path.display()
    );
    path
}

fn echo_image() -> PathBuf {
    let path = repo_root().join("target/guest/vmm-echo.cpio.gz");
    if !path.exists() {
        let status = Command::new(repo_root().join("host/vmm/tests/fixtures/build-echo-image"))
            .stdout(Stdio::null())
            .status()
            .expect("run build-echo-image");
        assert!(status.success(), "building the vsock echo image failed");
    }
    path
}

fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("husk-vmm");
    assert!(
        bin.exists(),
        "{} missing: cargo build -p husk-vmm, or set HUSK_VMM_BIN",
        bin.display()
    );
    bin
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("husk-vmm-e2e-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir scratch");
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running husk-vmm, killed on drop if still alive.
struct Vmm {
    child: Child,
    console: PathBuf,
    /// husk-vmm's stderr once read ([`Vmm::stderr`]).
    stderr_text: String,
}

impl Vmm {
    fn start(dir: &Path, kernel: &Path, initrd: &Path, extra: &[&str]) -> Vmm {
        let console = dir.join("console.log");
        let child = Command::new(vmm_bin())
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd)
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn husk-vmm");
        Vmm {
            child,
            console,
            stderr_text: String::new(),
        }
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for `needle` on the console; panics with the console on timeout or early exit.
    fn wait_console(&mut self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < BOOT_TIMEOUT {
            if self.console_text().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                if self.console_text().contains(needle) {
                    return;
                }
                panic!(
                    "husk-vmm exited ({status}) before {needle:?}; its stderr:\n{}\nconsole:\n{}",
                    self.stderr(),
                    self.console_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no {needle:?} on the console after {BOOT_TIMEOUT:?}:\n{}",
            self.console_text()
        );
    }

    /// husk-vmm's exit status. A guest reset by the test host before its init (the agent or the
    /// echo image) said a word is reported in a signature's words (tests/e2e/src/lib.rs
    /// `reset_before_init`, retried), not left to the test's own assertions.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let console = self.console_text();
                let log = self.stderr();
                // The echo image's init; the agent (one test boots it) speaks as "husk-agent:".
                if !console.contains("husk-agent:") {
                    if let Some(reset) =
                        husk_e2e::reset_before_init(status, &console, &log, "vsock-echo:")
                    {
                        panic!("{reset}\nstderr:\n{log}\nconsole:\n{console}");
                    }
                }
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "husk-vmm still running after {timeout:?}; console:\n{}",
            self.console_text()
        );
    }

    /// Everything husk-vmm wrote to stderr; read once at its end and kept.
    fn stderr(&mut self) -> String {
        if let Some(mut e) = self.child.stderr.take() {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            self.stderr_text = s;
        }
        self.stderr_text.clone()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill failed");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn boots_the_guest_image_to_the_agent_marker_and_sigterm_stops_it_cleanly() {
    require_real_kvm();
    let dir = Scratch::new("boot");
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let uds = dir.0.join("v.sock");
    let block = format!("{},ro", disk.display());
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &guest_file("initramfs.cpio.gz"),
        &[
            "--vcpus",
            "2",
            "--memory-mib",
            "256",
            "--vsock-uds",
            uds.to_str().expect("utf8"),
            "--guest-cid",
            "3",
            "--block",
            &block,
        ],
    );
    vmm.wait_console(AGENT_MARKER);
    let console = vmm.console_text();
    // Both vCPUs came up (MP table) and the disk was found (virtio-blk, read-only).
    assert!(
        console.contains("smp: Brought up 1 node, 2 CPUs"),
        "console:\n{console}"
    );
    assert!(
        console.contains("[vda] 2048 512-byte logical blocks"),
        "console:\n{console}"
    );
    // The guest may reboot by itself (exit 0) or keep serving; SIGTERM must stop it with 0.
    if let Ok(None) = vmm.child.try_wait() {
        vmm.signal(libc::SIGTERM);
    }
    let status = vmm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "stderr: {}", vmm.stderr());
    assert!(!uds.exists(), "the vsock socket is removed on exit");
}

#[test]
fn vsock_round_trip_both_ways_then_guest_reboot_exits_zero() {
    require_real_kvm();
    let dir = Scratch::new("vsock");
    let uds = dir.0.join("v.sock");
    let host_listener = UnixListener::bind(format!("{}_2000", uds.display())).expect("bind _2000");
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &echo_image(),
        &[
            "--vcpus",
            "2",
            "--vsock-uds",
            uds.to_str().expect("utf8"),
            "--guest-cid",
            "3",
        ],
    );
    vmm.wait_console("vsock-echo: listening on 1024");

    // Host → guest: CONNECT, OK <port>, then 256 KiB echoed back (exercises credit updates).
    let stream = UnixStream::connect(&uds).expect("connect to the vsock socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    writer.write_all(b"CONNECT 1024\n").expect("send CONNECT");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("read OK line");
    assert!(
        line.starts_with("OK ") && line.ends_with('\n'),
        "bad reply {line:?}"
    );
    let sent: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let to_send = sent.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).expect("send data");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    });
    let mut echoed = Vec::new();
    reader.read_to_end(&mut echoed).expect("read echo");
    sender.join().expect("sender");
    assert_eq!(echoed.len(), sent.len(), "echo length");
    assert!(echoed == sent, "echoed bytes differ");

    // Guest → host: the guest connects to host port 2000, forwarded to v.sock_2000.
    let (mut conn, _) = host_listener
        .accept()
        .expect("guest connection on v.sock_2000");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut greeting = [0u8; 14];
    conn.read_exact(&mut greeting).expect("guest greeting");
    assert_eq!(&greeting, b"guest says hi\n");
    conn.write_all(b"host says hi\n").expect("reply");
    drop(conn);

    let status = vmm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {}\nconsole:\n{}",
        vmm.stderr(),
        vmm.console_text()
    );
    assert!(vmm
        .console_text()
        .contains("host replied \"host says hi\\n\""));
}

#[test]
fn guest_reboot_by_triple_fault_exits_zero() {
    require_real_kvm();
    let dir = Scratch::new("reboot-t");
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &echo_image(),
        &["--cmdline", "echo.reboot reboot=t"],
    );
    let status = vmm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {}\nconsole:\n{}",
        vmm.stderr(),
        vmm.console_text()
    );
    assert!(vmm.console_text().contains("vsock-echo: rebooting at once"));
}

#[test]
fn guest_panic_exits_with_status_3() {
    require_real_kvm();
    let dir = Scratch::new("panic");
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &echo_image(),
        &["--cmdline", "echo.panic"],
    );
    let status = vmm.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(3), "console:\n{}", vmm.console_text());
    assert!(vmm.stderr().contains("panicked"));
}

#[test]
fn missing_kernel_is_a_clear_error_with_status_5() {
    let dir = Scratch::new("nokernel");
    let missing = dir.0.join("no-such-vmlinux");
    let out = Command::new(vmm_bin())
        .arg("--kernel")
        .arg(&missing)
        .arg("--allow-emulated-kvm")
        .output()
        .expect("run husk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot open the kernel") && stderr.contains("no-such-vmlinux"),
        "{stderr}"
    );
    assert!(out.status.signal().is_none());
}

/// Reads `path` on this host in 1 MiB chunks; returns the elapsed microseconds.
fn host_read_micros(path: &Path) -> u128 {
    let mut file = std::fs::File::open(path).expect("open big file");
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    while file.read(&mut buf).expect("read big file") != 0 {}
    start.elapsed().as_micros()
}

/// Parses "read big PASS N bytes in M us" from the console: (N, M).
fn guest_read_figure(console: &str, pass: &str) -> Option<(u64, u128)> {
    let prefix = format!("vsock-echo: fs: read big {pass} ");
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    Some((words.first()?.parse().ok()?, words.get(3)?.parse().ok()?))
}

#[test]
fn virtio_fs_share_is_read_and_written_and_symlinks_stay_inside() {
    require_real_kvm();
    let dir = Scratch::new("fs");
    let share = dir.0.join("shared");
    let outside = dir.0.join("outside");
    std::fs::create_dir_all(share.join("sub")).expect("mkdir share");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    std::fs::write(share.join("from-host"), "written by the host\n").expect("from-host");
    std::fs::write(outside.join("secret"), "HOST-SECRET\n").expect("secret");
    std::os::unix::fs::symlink("/etc", share.join("etc-link")).expect("etc-link");
    std::os::unix::fs::symlink(&outside, share.join("outside-link")).expect("outside-link");
    std::os::unix::fs::symlink("../../outside", share.join("sub/rel-link")).expect("rel-link");
    // A large file for a rough throughput figure (measured, not asserted).
    let big = share.join("big");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    let mut f = std::fs::File::create(&big).expect("big");
    for _ in 0..64 {
        f.write_all(&chunk).expect("write big");
    }
    drop(f);

    let fs_arg = format!("{},tag=husk-test", share.display());
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &echo_image(),
        &[
            "--memory-mib",
            "256",
            "--fs",
            &fs_arg,
            "--cmdline",
            "echo.fs=husk-test",
        ],
    );
    let status = vmm.wait_exit(BOOT_TIMEOUT);
    let console = vmm.console_text();
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {}\nconsole:\n{console}",
        vmm.stderr()
    );
    assert!(
        console.contains("vsock-echo: fs: done"),
        "console:\n{console}"
    );
    // The guest read the host's file, and the host sees the guest's file.
    assert!(
        console.contains(r#"vsock-echo: fs: from-host "written by the host\n""#),
        "console:\n{console}"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest")).expect("from-guest on the host"),
        "written by the guest\n"
    );
    // Symlinks out of the share resolve in the guest's namespace, never on the host.
    for path in [
        "/mnt/etc-link/passwd",
        "/mnt/outside-link/secret",
        "/mnt/sub/rel-link/secret",
    ] {
        assert!(
            console.contains(&format!("vsock-echo: fs: {path} error NotFound")),
            "{path} was not refused; console:\n{console}"
        );
    }
    assert!(!console.contains("HOST-SECRET"), "console:\n{console}");
    assert!(!console.contains("root:x:0:0"), "console:\n{console}");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).expect("secret"),
        "HOST-SECRET\n"
    );

    let host_micros = host_read_micros(&big);
    eprintln!(
        "64 MiB read on the host: {:.1} MiB/s",
        64.0 * 1e6 / host_micros.max(1) as f64
    );
    for pass in ["cold", "warm", "tmpfs"] {
        let (bytes, micros) = guest_read_figure(&console, pass).expect("guest read figure");
        assert_eq!(bytes, 64 << 20, "the guest read the whole big file");
        eprintln!(
            "64 MiB read in the guest ({pass}): {:.1} MiB/s",
            64.0 * 1e6 / micros.max(1) as f64
        );
    }
}

/// What the hostile guest (`echo.attack`, host/vmm/tests/fixtures/vsock-echo/src/attack.rs)
/// reported for `what`: `ok` or `error <errno>`.
fn attack_result<'a>(console: &'a str, what: &str) -> &'a str {
    let prefix = format!("vsock-echo: attack: {what} ");
    console
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {what:?} result; console:\n{console}"))
}

/// The paths of the mount table under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

/// A share built as the sandbox core builds it (a host-only staging tree, its read-only view
/// exported, the container's rootfs bound writable at `c1/rootfs` and a volume read-only at
/// `c1/mounts/1`), served to a guest that, as its root, tries to replace the container's
/// directory with a symlink, make a later container's or volume's mount point, write into and
/// move the read-only volume, and plant a symlink to /etc. Then the teardown of a task delete and of the sandbox runs: nothing outside
/// the share changes, nothing stays mounted, the volumes keep their files. Needs root (mounts).
#[test]
fn a_hostile_guest_cannot_steer_the_share_or_its_teardown() {
    use husk_sandbox::share::{self, Bind, HostMounter, ShareDirs, SharePlan};
    require_real_kvm();
    let dir = Scratch::new("attack");
    let (rootfs, data, outside) = (
        dir.0.join("rootfs-src"),
        dir.0.join("data-src"),
        dir.0.join("outside"),
    );
    for d in [&rootfs, &data, &outside.join("emptydir")] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    std::fs::write(rootfs.join("keep"), "container data\n").expect("keep");
    std::fs::write(data.join("ro"), "read-only volume\n").expect("ro");
    std::fs::write(outside.join("empty"), "").expect("empty");
    let (staging, shared) = (dir.0.join("staging"), dir.0.join("shared"));
    let dirs = ShareDirs {
        host: &staging,
        guest: &shared,
    };
    share::create_share(dirs, &HostMounter).expect("create the share");
    let plan = SharePlan {
        binds: vec![
            Bind {
                source: rootfs.clone(),
                target: "c1/rootfs".into(),
                readonly: false,
                recursive: true,
                is_dir: true,
            },
            Bind {
                source: data.clone(),
                target: "c1/mounts/1".into(),
                readonly: true,
                recursive: false,
                is_dir: true,
            },
        ],
        guest_spec: Default::default(),
        guest_rootfs: "/run/husk/shared/c1/rootfs".into(),
    };
    share::bind_all(dirs, &plan, &HostMounter).expect("bind the container");

    let fs_arg = format!("{},tag=husk-test", shared.display());
    let mut vmm = Vmm::start(
        &dir.0,
        &guest_file("vmlinux"),
        &echo_image(),
        &[
            "--memory-mib",
            "256",
            "--fs",
            &fs_arg,
            "--cmdline",
            "echo.attack=husk-test",
        ],
    );
    let status = vmm.wait_exit(BOOT_TIMEOUT);
    let console = vmm.console_text();
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {}\nconsole:\n{console}",
        vmm.stderr()
    );
    assert!(
        console.contains("vsock-echo: attack: done"),
        "console:\n{console}"
    );
    // The share's own tree is read-only to the guest (EROFS): no symlink or directory of its
    // own where the host mounts, binds and deletes.
    for what in [
        "rename-c1",
        "symlink-at-top",
        "mkdir-c2",
        "mkdir-volume",
        "write-ro-volume",
        "move-ro-volume",
    ] {
        assert_eq!(attack_result(&console, what), "error 30", "{what}");
    }
    // Inside the writable rootfs the guest writes as it likes: that is the container's data.
    assert_eq!(attack_result(&console, "symlink-in-rootfs"), "ok");
    assert_eq!(attack_result(&console, "write-rootfs"), "ok");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-guest")).expect("from-guest"),
        "guest data\n"
    );
    assert!(!data.join("planted").exists());
    for planted in ["c2", "c1-link", "c1-away", "c1/mounts/2", "c1/mounts/away"] {
        assert!(!staging.join(planted).exists(), "{planted}");
    }

    // The teardown of a task delete, then of the sandbox.
    let info = || share::read_mountinfo();
    share::remove_container(dirs, "c1", &HostMounter, &info).expect("remove the container");
    share::remove_share(dirs, &HostMounter, &info).expect("remove the share");
    assert_eq!(mounts_under(&dir.0), Vec::<String>::new(), "still mounted");
    assert!(!staging.exists() && !shared.exists());
    // What the binds showed is intact, and so is everything outside the share.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("keep")).expect("keep"),
        "container data\n"
    );
    assert_eq!(
        std::fs::read_link(rootfs.join("etc-link")).expect("etc-link"),
        Path::new("/etc")
    );
    assert_eq!(
        std::fs::read_to_string(data.join("ro")).expect("ro"),
        "read-only volume\n"
    );
    assert!(outside.join("empty").is_file() && outside.join("emptydir").is_dir());
    assert!(Path::new("/etc/passwd").is_file());
}
