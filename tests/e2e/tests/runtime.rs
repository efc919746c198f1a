//! End to end: the `husk` OCI runtime runs busybox containers in microVMs (husk-vmm, the guest
//! kernel and initramfs of `make guest`, husk-agent as the guest's PID 1, the rootfs over
//! virtio-fs). Needs a real KVM: run with `tests/e2e/run runtime` (the test host).
//!
//! Every test uses its own `--root` and checks that nothing is left behind: no state, no mount
//! under the root, no husk-vmm or supervisor process naming the root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

use std::fs;
use std::io::{IoSliceMut, Read};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use husk_e2e::TempDir;
use serde_json::{json, Value};

/// How long a container may take to appear (guest boot under nested virtualization included).
const BOOT: Duration = Duration::from_secs(120);
/// How long one husk command may take (a `run` includes a guest boot).
const VERB_TIMEOUT: Duration = Duration::from_secs(240);

fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// A busybox rootfs (Debian's busybox-static), built once per run.
fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        assert!(
            Path::new("/bin/busybox").exists(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let root = std::env::temp_dir().join(format!("husk-rt-rootfs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bin", "proc", "sys", "dev", "tmp", "etc", "data", "ro", "cg", "big",
        ] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
        let list = Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        root
    })
}

/// One test's husk: its own root, configuration and console log directory.
struct Husk {
    dir: TempDir,
    /// `--root`: short (podman's 64-character IDs must fit in a socket path under it).
    root: PathBuf,
}

impl Drop for Husk {
    /// Whatever the test left, and only that: the processes naming its root or its directory
    /// (supervisors, relays, husk-vmm, conmon) are killed, the mounts under them detached, the
    /// root removed (the directory goes with `dir`). A test's own leak checks
    /// ([`Husk::assert_clean`]) ran before, so a leak still fails the test that leaked; this only
    /// keeps it from failing the next one.
    fn drop(&mut self) {
        husk_e2e::clean_up(&[&self.root, self.dir.path()], &[&self.root]);
    }
}

impl Husk {
    fn new(name: &str) -> Husk {
        husk_e2e::require_real_kvm();
        let dir = TempDir::new(name);
        let config = format!(
            "[guest]\nkernel = {:?}\ninitramfs = {:?}\n[vmm]\npath = {:?}\n[console]\nlog_dir = {:?}\n",
            husk_e2e::guest_kernel(),
            husk_e2e::guest_initramfs(),
            target_bin("husk-vmm"),
            dir.path().join("logs"),
        );
        fs::write(dir.path().join("husk.toml"), config).expect("write husk.toml");
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = PathBuf::from(format!("/tmp/hk-{}-{n}", std::process::id()));
        Husk { dir, root }
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(target_bin("husk"));
        cmd.arg("--root")
            .arg(self.root())
            .arg("--config")
            .arg(self.dir.path().join("husk.toml"))
            .arg("--log")
            .arg(self.dir.path().join("husk.log"))
            .arg("--debug");
        cmd
    }

    /// Runs husk with `args`, stdin from /dev/null, output captured; killed (and the test
    /// failed) after [`VERB_TIMEOUT`].
    fn run(&self, args: &[&str]) -> Output {
        let child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run husk");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(VERB_TIMEOUT) {
            Ok(out) => out.expect("wait for husk"),
            Err(_) => {
                // SAFETY: kill(2) with a PID and a signal number; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!(
                    "husk {args:?} did not finish within {VERB_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Runs a husk verb that leaves a supervisor behind (`create`, `run --detach`): the
    /// supervisor keeps the standard output and error it inherits (the container's, as with runc),
    /// so they go to files, not pipes that would never reach end of file. Returns the status,
    /// what was written to standard error by the time husk exited, and the container's stdout file.
    fn detached(&self, name: &str, args: &[&str]) -> (Output, PathBuf) {
        let stdout_path = self.dir.path().join(format!("{name}.stdout"));
        let stderr_path = self.dir.path().join(format!("{name}.stderr"));
        let status = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(fs::File::create(&stderr_path).expect("stderr file"))
            .status()
            .expect("run husk");
        let out = Output {
            status,
            stdout: Vec::new(),
            stderr: fs::read(&stderr_path).unwrap_or_default(),
        };
        (out, stdout_path)
    }

    /// A bundle named `name` using the busybox rootfs, with `process.args` = `args` and the
    /// changes `edit` makes to the default spec.
    fn bundle(&self, name: &str, args: &[&str], edit: impl FnOnce(&mut Value)) -> PathBuf {
        let bundle = self.dir.path().join(name);
        fs::create_dir_all(&bundle).expect("mkdir bundle");
        std::os::unix::fs::symlink(busybox_rootfs(), bundle.join("rootfs")).ok();
        let out = self
            .command()
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle)
            .output()
            .expect("husk spec");
        assert!(out.status.success(), "husk spec: {}", text(&out.stderr));
        let path = bundle.join("config.json");
        let mut spec: Value =
            serde_json::from_slice(&fs::read(&path).expect("read config.json")).expect("json");
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!(args);
        // The rootfs is shared by the tests: a symlink inside the bundle to it is outside the
        // bundle, so use its absolute path.
        spec["root"]["path"] = json!(busybox_rootfs());
        spec["root"]["readonly"] = json!(false);
        edit(&mut spec);
        fs::write(&path, serde_json::to_vec_pretty(&spec).expect("json")).expect("write");
        bundle
    }

    fn state(&self, id: &str) -> Value {
        let out = self.run(&["state", id]);
        assert!(out.status.success(), "state {id}: {}", self.explain(&out));
        serde_json::from_slice(&out.stdout).expect("state json")
    }

    fn status(&self, id: &str) -> String {
        self.state(id)["status"]
            .as_str()
            .expect("status string")
            .to_owned()
    }

    fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let status = self.status(id);
            if status == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{id} is still {status} after {timeout:?}, expected {want}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// husk's log and the guest consoles, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let log = fs::read_to_string(self.dir.path().join("husk.log")).unwrap_or_default();
        out.push_str(&format!("--- husk.log ---\n{log}"));
        if let Ok(entries) = fs::read_dir(self.dir.path().join("logs")) {
            for entry in entries.flatten() {
                let text = fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: String = text
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push_str(&format!("--- {} ---\n{tail}\n", entry.path().display()));
            }
        }
        out
    }

    fn explain(&self, out: &Output) -> String {
        format!(
            "status {:?}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.logs()
        )
    }

    /// Nothing left: no container directory, no mount under the root, no process naming it.
    fn assert_clean(&self) {
        let root = self.root();
        if let Ok(entries) = fs::read_dir(&root) {
            let left: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "left under {}: {left:?}", root.display());
        }
        let mounts = husk_e2e::mounts_under(&root);
        assert!(mounts.is_empty(), "mounts left: {mounts:?}");
        let procs = husk_e2e::processes_naming(&[&root]);
        assert!(procs.is_empty(), "processes left: {procs:?}");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn host_kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("osrelease")
        .trim()
        .to_owned()
}

#[test]
fn run_prints_the_output_of_a_guest_kernel_passes_signals_on_and_exits_with_the_process_status() {
    let husk = Husk::new("run");
    // The process ends when the SIGTERM sent to `husk run` reaches it.
    let bundle = husk.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 3' TERM; echo hello from husk; uname -r; echo to-stderr >&2; \
             while true; do sleep 1; done",
        ],
        |_| {},
    );
    let started = Instant::now();
    let stdout_path = husk.dir.path().join("run.stdout");
    let stderr_path = husk.dir.path().join("run.stderr");
    let mut child = husk
        .command()
        .args(["run", "--bundle", bundle.to_str().unwrap(), "c1"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("husk run");
    wait_for_text(&stderr_path, "to-stderr", BOOT);
    eprintln!("husk run's process was up after {:?}", started.elapsed());
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with a PID and a signal number; no memory is involved.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to husk run");
    let status = child.wait().expect("wait husk run");
    let out = Output {
        status,
        stdout: fs::read(&stdout_path).unwrap_or_default(),
        stderr: fs::read(&stderr_path).unwrap_or_default(),
    };
    assert_eq!(out.status.code(), Some(3), "{}", husk.explain(&out));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"hello from husk"), "{stdout}");
    let guest_kernel = lines.get(1).expect("uname -r line");
    assert_ne!(
        *guest_kernel,
        host_kernel(),
        "the container must run on the guest's kernel"
    );
    assert_eq!(lines.get(2), Some(&"got TERM"), "{stdout}");
    husk.assert_clean();
}

#[test]
fn lifecycle_create_start_stop_delete() {
    let husk = Husk::new("life");
    let bundle = husk.bundle("b", &["sleep", "3"], |_| {});
    let pid_file = husk.dir.path().join("pid");
    let (out, _) = husk.detached(
        "create",
        &[
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ],
    );
    assert!(out.status.success(), "create: {}", husk.explain(&out));
    let state = husk.state("c1");
    assert_eq!(state["status"], "created", "{state}");
    let pid = fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(state["pid"].to_string(), pid, "pid file and state agree");

    // A second container with the same ID is refused and the first is untouched.
    let dup = husk.run(&["create", "--bundle", bundle.to_str().unwrap(), "c1"]);
    assert_eq!(dup.status.code(), Some(7), "{}", husk.explain(&dup));
    assert!(
        text(&dup.stderr).contains("already exists"),
        "{}",
        text(&dup.stderr)
    );
    assert_eq!(husk.status("c1"), "created");

    // Deleting a created container needs --force; starting it twice is refused.
    let out = husk.run(&["delete", "c1"]);
    assert_eq!(out.status.code(), Some(1), "{}", husk.explain(&out));
    let out = husk.run(&["start", "c1"]);
    assert!(out.status.success(), "start: {}", husk.explain(&out));
    assert_eq!(husk.status("c1"), "running");
    let out = husk.run(&["start", "c1"]);
    assert!(!out.status.success(), "a second start must fail");

    husk.wait_status("c1", "stopped", Duration::from_secs(60));
    let out = husk.run(&["delete", "c1"]);
    assert!(out.status.success(), "delete: {}", husk.explain(&out));
    let out = husk.run(&["state", "c1"]);
    assert_eq!(out.status.code(), Some(4), "{}", husk.explain(&out));
    assert!(text(&out.stderr).contains("does not exist"));
    husk.assert_clean();
}

#[test]
fn a_running_container_takes_exec_ps_pause_events_and_signals() {
    let husk = Husk::new("running");
    let script = "trap 'echo got TERM' TERM; echo ready; while true; do sleep 1; done";
    let cgroup = format!("/husk-e2e-{}", std::process::id());
    let cgroup_in_spec = cgroup.clone();
    let bundle = husk.bundle("b", &["sh", "-c", script], move |spec| {
        spec["linux"]["cgroupsPath"] = json!(cgroup_in_spec);
        spec["linux"]["resources"]["cpu"] = json!({"quota": 50000, "period": 100000});
    });
    let (out, stdout_path) = husk.detached(
        "create",
        &["create", "--bundle", bundle.to_str().unwrap(), "c1"],
    );
    assert!(out.status.success(), "create: {}", husk.explain(&out));
    let out = husk.run(&["start", "c1"]);
    assert!(out.status.success(), "start: {}", husk.explain(&out));
    wait_for_text(&stdout_path, "ready", BOOT);

    // The supervisor (and husk-vmm) are in the host cgroup the spec names.
    let pid = husk.state("c1")["pid"].as_i64().expect("pid");
    let cgroup_of = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of pid");
    assert_eq!(cgroup_of.trim(), format!("0::{cgroup}"));

    // husk-vmm runs in its jail.
    let vmms: Vec<_> = husk_e2e::processes_naming(&[husk.dir.path()])
        .into_iter()
        .filter(|p| p.program == "husk-vmm")
        .collect();
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    let problems = husk_e2e::vmm_jail_problems(vmms[0].pid);
    assert!(problems.is_empty(), "husk-vmm's jail: {problems:?}");
    // ... in the container's cgroup with the VM's size as limits, and half a CPU as the spec says.
    let problems = husk_e2e::vmm_cgroup_problems(vmms[0].pid, &cgroup, Some("50000 100000"));
    assert!(problems.is_empty(), "husk-vmm's cgroup: {problems:?}");

    // exec: output, stdin, exit status.
    let out = husk.run(&[
        "exec",
        "c1",
        "sh",
        "-c",
        "echo exec-ok; cat /proc/1/cmdline; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", husk.explain(&out));
    assert!(
        text(&out.stdout).starts_with("exec-ok\nsh"),
        "{}",
        husk.explain(&out)
    );
    let mut child = husk
        .command()
        .args(["exec", "c1", "tr", "a-z", "A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("exec tr");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped through\n").unwrap();
    let out = child.wait_with_output().expect("exec tr output");
    assert_eq!(text(&out.stdout), "PIPED THROUGH\n");

    // A signal to `husk exec` reaches the exec'd process in the guest (its trap runs).
    let exec_out = husk.dir.path().join("exec-trap.stdout");
    let mut child = husk
        .command()
        .args(["exec", "c1", "sh", "-c"])
        .arg(
            "trap 'echo exec got TERM; exit 7' TERM; echo exec-ready; while true; do sleep 1; done",
        )
        .stdin(Stdio::null())
        .stdout(fs::File::create(&exec_out).expect("exec stdout file"))
        .spawn()
        .expect("exec trap");
    wait_for_text(&exec_out, "exec-ready", Duration::from_secs(60));
    let exec_pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) with a PID and a signal number; no memory is involved.
    let rc = unsafe { libc::kill(exec_pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to exec");
    let status = child.wait().expect("wait exec");
    let exec_text = fs::read_to_string(&exec_out).unwrap_or_default();
    assert_eq!(status.code(), Some(7), "{exec_text}\n{}", husk.logs());
    assert!(exec_text.contains("exec got TERM"), "{exec_text}");

    // exec --detach: returns once the process runs; the relay named by --pid-file carries its
    // output and ends with it.
    let pid_file = husk.dir.path().join("exec.pid");
    let (out, detached_out) = husk.detached(
        "exec-detach",
        &[
            "exec",
            "--detach",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
            "sh",
            "-c",
            "echo detached-start; sleep 3; echo detached-done",
        ],
    );
    assert!(
        out.status.success(),
        "exec --detach: {}",
        husk.explain(&out)
    );
    let relay: u32 = fs::read_to_string(&pid_file)
        .expect("exec --detach writes the pid file")
        .trim()
        .parse()
        .expect("a pid");
    assert!(
        !fs::read_to_string(&detached_out)
            .unwrap_or_default()
            .contains("detached-done"),
        "exec --detach returned only after the process ended"
    );
    wait_for_text(&detached_out, "detached-done", Duration::from_secs(60));
    let start = Instant::now();
    while husk_e2e::process_runs(relay) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the relay {relay} outlived its process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = husk.run(&["exec", "--detach", "c1"]);
    assert!(!out.status.success(), "exec --detach without a command");
    assert!(
        text(&out.stderr).contains("COMMAND"),
        "{}",
        text(&out.stderr)
    );

    // ps: the processes of the container.
    let out = husk.run(&["ps", "--format", "json", "c1"]);
    assert!(out.status.success(), "ps: {}", husk.explain(&out));
    let pids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("ps json");
    assert!(!pids.is_empty(), "ps lists the container's processes");

    // pause refuses exec until resume.
    assert!(husk.run(&["pause", "c1"]).status.success());
    let out = husk.run(&["exec", "c1", "true"]);
    assert!(
        !out.status.success(),
        "exec into a paused container must fail"
    );
    assert!(
        text(&out.stderr).contains("paused"),
        "{}",
        text(&out.stderr)
    );
    assert!(husk.run(&["resume", "c1"]).status.success());
    assert_eq!(husk.run(&["exec", "c1", "true"]).status.code(), Some(0));

    // events --stats: one stats event.
    let out = husk.run(&["events", "--stats", "c1"]);
    assert!(out.status.success(), "events: {}", husk.explain(&out));
    let event: Value = serde_json::from_slice(&out.stdout).expect("event json");
    assert_eq!(event["type"], "stats");
    assert!(
        event["data"]["memory"]["usage"]["usage"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{event}"
    );

    // SIGTERM reaches the process (its trap runs), SIGKILL ends it.
    assert!(husk.run(&["kill", "c1", "TERM"]).status.success());
    wait_for_text(&stdout_path, "got TERM", Duration::from_secs(30));
    assert_eq!(husk.status("c1"), "running");
    assert!(husk.run(&["kill", "c1", "SIGKILL"]).status.success());
    husk.wait_status("c1", "stopped", Duration::from_secs(60));
    let out = husk.run(&["kill", "c1", "KILL"]);
    assert!(
        !out.status.success(),
        "kill of a stopped container must fail"
    );
    assert!(husk.run(&["delete", "c1"]).status.success());
    let cgroup_dir = Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'));
    assert!(
        !cgroup_dir.exists(),
        "delete removes {}",
        cgroup_dir.display()
    );
    husk.assert_clean();
}

fn wait_for_text(path: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let content = fs::read_to_string(path).unwrap_or_default();
        if content.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} not in {} after {timeout:?}: {content:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn delete_force_stops_a_running_container() {
    let husk = Husk::new("force");
    let bundle = husk.bundle("b", &["sleep", "1000"], |_| {});
    let (out, _) = husk.detached(
        "run",
        &[
            "run",
            "--detach",
            "--bundle",
            bundle.to_str().unwrap(),
            "c1",
        ],
    );
    assert!(out.status.success(), "run -d: {}", husk.explain(&out));
    assert_eq!(husk.status("c1"), "running");
    let out = husk.run(&["delete", "--force", "c1"]);
    assert!(
        out.status.success(),
        "delete --force: {}",
        husk.explain(&out)
    );
    husk.assert_clean();
}

/// Receives one file descriptor sent over `listener` (a console socket).
fn receive_fd(listener: &UnixListener) -> OwnedFd {
    use std::os::fd::AsRawFd;
    let (stream, _) = listener.accept().expect("accept console socket");
    let mut buf = [0u8; 64];
    let mut space = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // SAFETY: msghdr is plain data; every pointer set below refers to live local buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = space.len();
    // SAFETY: recvmsg writes into the buffers described by msg, which outlive the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
    assert!(n > 0, "recvmsg: {}", std::io::Error::last_os_error());
    // SAFETY: CMSG_FIRSTHDR reads msg's control fields, set by recvmsg within `space`.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    assert!(!cmsg.is_null(), "no file descriptor received");
    // SAFETY: cmsg points into `space`; an SCM_RIGHTS message carries at least one int.
    let fd: RawFd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
    // SAFETY: the kernel installed fd in this process for us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn a_terminal_goes_to_the_console_socket() {
    let husk = Husk::new("tty");
    let bundle = husk.bundle(
        "b",
        &[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo stdio-is-a-tty; stty size; echo tty-done",
        ],
        |spec| {
            spec["process"]["terminal"] = json!(true);
            spec["process"]["consoleSize"] = json!({"height": 30, "width": 100});
        },
    );
    let socket = husk.dir.path().join("console.sock");
    let listener = UnixListener::bind(&socket).expect("bind console socket");
    let child = husk
        .command()
        .args([
            "run",
            "--bundle",
            bundle.to_str().unwrap(),
            "--console-socket",
            socket.to_str().unwrap(),
            "c1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("husk run");
    let master = receive_fd(&listener);
    let mut master = fs::File::from(master);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !text(&seen).contains("tty-done") {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let out = child.wait_with_output().expect("husk run");
    let seen = text(&seen);
    assert!(
        seen.contains("stdio-is-a-tty\r\n"),
        "tty output: {seen:?}\n{}",
        husk.explain(&out)
    );
    assert!(seen.contains("30 100"), "terminal size: {seen:?}");
    assert_eq!(out.status.code(), Some(0), "{}", husk.explain(&out));
    husk.assert_clean();
}

#[test]
fn read_only_rootfs_and_bind_mounts_follow_the_spec() {
    let husk = Husk::new("mounts");
    let rw = husk.dir.path().join("rw");
    let ro = husk.dir.path().join("ro");
    fs::create_dir_all(&rw).unwrap();
    fs::create_dir_all(&ro).unwrap();
    fs::write(ro.join("marker"), "from the host\n").unwrap();
    let script =
        "touch /rootfs-write 2>/dev/null && echo rootfs-writable || echo rootfs-readonly; \
                  echo hi > /data/f && echo data-writable; \
                  echo x > /ro/f 2>/dev/null && echo ro-writable || echo ro-refused; \
                  cat /ro/marker";
    let (rw_s, ro_s) = (rw.clone(), ro.clone());
    let bundle = husk.bundle("b", &["sh", "-c", script], move |spec| {
        spec["root"]["readonly"] = json!(true);
        let mounts = spec["mounts"].as_array_mut().expect("mounts");
        mounts.push(
            json!({"destination": "/data", "type": "bind", "source": rw_s,
                           "options": ["rbind", "rw"]}),
        );
        mounts.push(json!({"destination": "/ro", "type": "bind", "source": ro_s,
                           "options": ["rbind", "ro"]}));
    });
    let out = husk.run(&["run", "--bundle", bundle.to_str().unwrap(), "c1"]);
    assert_eq!(out.status.code(), Some(0), "{}", husk.explain(&out));
    assert_eq!(
        text(&out.stdout),
        "rootfs-readonly\ndata-writable\nro-refused\nfrom the host\n",
        "{}",
        husk.explain(&out)
    );
    assert_eq!(fs::read_to_string(rw.join("f")).unwrap(), "hi\n");
    assert!(!ro.join("f").exists());
    assert!(!busybox_rootfs().join("rootfs-write").exists());
    husk.assert_clean();
}

#[test]
fn a_memory_limit_is_enforced_in_the_guest() {
    let husk = Husk::new("memory");
    // 32 MiB for the container; the microVM is larger (overhead, minimum), so only the
    // container's cgroup can stop a 64 MiB tmpfs file.
    let script = "cat /cg/memory.max; \
                  dd if=/dev/zero of=/big/f bs=1M count=64 2>/dev/null && echo wrote-all";
    let bundle = husk.bundle("b", &["sh", "-c", script], |spec| {
        spec["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
        spec["mounts"].as_array_mut().expect("mounts").extend([
            json!({"destination": "/big", "type": "tmpfs", "source": "tmpfs",
                       "options": ["size=256m"]}),
            json!({"destination": "/cg", "type": "cgroup2", "source": "cgroup2",
                       "options": ["nosuid", "noexec", "nodev", "ro"]}),
        ]);
    });
    let out = husk.run(&["run", "--bundle", bundle.to_str().unwrap(), "c1"]);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("33554432\n"), "{}", husk.explain(&out));
    assert!(!stdout.contains("wrote-all"), "{}", husk.explain(&out));
    assert_eq!(
        out.status.code(),
        Some(137),
        "OOM-killed: {}",
        husk.explain(&out)
    );
    husk.assert_clean();
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let husk = Husk::new("bad");
    let good = husk.bundle("good", &["true"], |_| {});
    let good = good.to_str().unwrap().to_owned();

    let missing = husk.dir.path().join("missing");
    let out = husk.run(&["create", "--bundle", missing.to_str().unwrap(), "c1"]);
    assert_eq!(out.status.code(), Some(5), "{}", husk.explain(&out));
    assert!(text(&out.stderr).contains("does not exist"));

    let malformed = husk.dir.path().join("malformed");
    fs::create_dir_all(&malformed).unwrap();
    fs::write(
        malformed.join("config.json"),
        "{\"ociVersion\": \"1.0.0\", \"process\": 3}",
    )
    .unwrap();
    let out = husk.run(&["create", "--bundle", malformed.to_str().unwrap(), "c1"]);
    assert_eq!(out.status.code(), Some(5), "{}", husk.explain(&out));
    assert!(
        text(&out.stderr).contains("malformed"),
        "{}",
        text(&out.stderr)
    );

    let out = husk.run(&["create", "--bundle", &good, "../x"]);
    assert_eq!(out.status.code(), Some(2), "{}", husk.explain(&out));
    assert!(text(&out.stderr).contains("invalid container ID"));

    let escape = husk.bundle("escape", &["true"], |spec| {
        spec["root"]["path"] = json!("rootfs")
    });
    fs::remove_file(escape.join("rootfs")).ok();
    std::os::unix::fs::symlink("/", escape.join("rootfs")).unwrap();
    let out = husk.run(&["create", "--bundle", escape.to_str().unwrap(), "c1"]);
    assert_eq!(out.status.code(), Some(5), "{}", husk.explain(&out));
    assert!(
        text(&out.stderr).contains("outside the bundle"),
        "{}",
        text(&out.stderr)
    );

    let out = husk.run(&["--log-format", "yaml", "create", "--bundle", &good, "c1"]);
    assert_eq!(out.status.code(), Some(2), "{}", husk.explain(&out));

    let out = husk.run(&["start", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", husk.explain(&out));
    husk.assert_clean();
}

#[test]
fn a_monitor_that_fails_leaves_nothing() {
    let husk = Husk::new("vmmfail");
    let config = husk.dir.path().join("husk.toml");
    let text_config = fs::read_to_string(&config).unwrap();
    let vmm = format!("{:?}", target_bin("husk-vmm"));
    fs::write(&config, text_config.replace(&vmm, "\"/bin/false\"")).unwrap();
    let bundle = husk.bundle("b", &["true"], |_| {});
    let (out, _) = husk.detached(
        "create",
        &["create", "--bundle", bundle.to_str().unwrap(), "c1"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", husk.explain(&out));
    assert!(
        text(&out.stderr).contains("husk-vmm exited"),
        "{}",
        husk.explain(&out)
    );
    husk.assert_clean();
}

#[test]
fn a_container_the_agent_refuses_leaves_nothing() {
    let husk = Husk::new("refused");
    // Joining a namespace by path is refused by the agent, after the microVM booted.
    let bundle = husk.bundle("b", &["true"], |spec| {
        let namespaces = spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("namespaces");
        namespaces.retain(|ns| ns["type"] != "network");
        namespaces.push(json!({"type": "network", "path": "/proc/1/ns/net"}));
    });
    let (out, _) = husk.detached(
        "create",
        &["create", "--bundle", bundle.to_str().unwrap(), "c1"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", husk.explain(&out));
    assert!(
        text(&out.stderr).contains("CreateContainer"),
        "{}",
        husk.explain(&out)
    );
    husk.assert_clean();
}

#[test]
fn podman_runs_containers_with_husk() {
    let husk = Husk::new("podman");
    let podman = husk_e2e::require_program("podman", "podman");
    let storage = husk.dir.path().join("storage");
    let runroot = husk.dir.path().join("runroot");
    let config_flag = format!("config={}", husk.dir.path().join("husk.toml").display());
    // husk's log is the test's (shown by husk.explain on failure).
    let log_flag = format!("log={}", husk.dir.path().join("husk.log").display());
    // podman runs `husk delete` from its cleanup process (started by conmon) without the
    // --runtime-flag options, so the state must be under the default root, /run/husk.
    let default_root = Path::new("/run/husk");
    let entries = |dir: &Path| -> Vec<std::ffi::OsString> {
        fs::read_dir(dir)
            .map(|e| e.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let before = entries(default_root);
    let podman_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&podman);
        cmd.arg("--root")
            .arg(&storage)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--runtime"])
            .arg(target_bin("husk"))
            .args(["--runtime-flag", &config_flag, "--runtime-flag", &log_flag])
            .args(["--runtime-flag", "debug"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    };
    // The image: the busybox rootfs, imported (no registry).
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(busybox_rootfs())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let out = podman_cmd(&["import", "-", "localhost/husk-busybox"])
        .stdin(tar.stdout.take().expect("tar stdout"))
        .output()
        .expect("podman import");
    assert!(tar.wait().expect("tar").success());
    assert!(out.status.success(), "podman import: {}", text(&out.stderr));

    let out = podman_cmd(&[
        "run",
        "--rm",
        "--network",
        "none",
        "localhost/husk-busybox",
        "echo",
        "hi",
    ])
    .output()
    .expect("podman run");
    assert!(out.status.success(), "podman run: {}", husk.explain(&out));
    assert_eq!(text(&out.stdout), "hi\n");

    let out = podman_cmd(&[
        "run",
        "--rm",
        "--network",
        "none",
        "localhost/husk-busybox",
        "sh",
        "-c",
        "uname -r; exit 3",
    ])
    .output()
    .expect("podman run");
    assert_eq!(out.status.code(), Some(3), "{}", husk.explain(&out));
    assert_ne!(text(&out.stdout).trim(), host_kernel());

    // podman exec: conmon runs `husk exec --detach --pid-file F --process P [--tty
    // --console-socket S]` and waits for the PID in F (husk's relay) to learn the exit status.
    let podman = |args: &[&str]| podman_cmd(args).output().expect("run podman");
    let detached = ["run", "-d", "--name", "husk-exec", "--network", "none"];
    let out = podman(&[&detached[..], &["localhost/husk-busybox", "sleep", "600"]].concat());
    assert!(out.status.success(), "run -d: {}", husk.explain(&out));
    let out = podman(&[
        "exec",
        "husk-exec",
        "sh",
        "-c",
        "echo in-$((1 + 1)); exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "exec: {}", husk.explain(&out));
    assert_eq!(text(&out.stdout), "in-2\n");
    let out = podman(&[
        "exec",
        "-t",
        "husk-exec",
        "sh",
        "-c",
        "test -t 1 && echo a-tty",
    ]);
    assert!(out.status.success(), "exec -t: {}", husk.explain(&out));
    assert_eq!(text(&out.stdout), "a-tty\r\n");
    let out = podman(&["rm", "-f", "-t", "0", "husk-exec"]);
    assert!(out.status.success(), "rm -f: {}", husk.explain(&out));

    let out = podman_cmd(&["ps", "-a", "-q"]).output().expect("podman ps");
    assert_eq!(text(&out.stdout), "", "podman has no container left");
    // The cleanup process may still be finishing.
    let start = Instant::now();
    while entries(default_root) != before && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        entries(default_root),
        before,
        "containers left under /run/husk"
    );
    // This test's VMs: their console logs are in its directory (their sockets under the
    // default root, which other users of the machine share).
    let procs: Vec<_> = husk_e2e::processes_naming(&[husk.dir.path()])
        .into_iter()
        .filter(|p| p.program == "husk-vmm")
        .collect();
    assert!(procs.is_empty(), "processes left: {procs:?}");
}
