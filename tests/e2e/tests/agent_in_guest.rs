//! husk-agent as PID 1 of a real guest booted by husk-vmm (run inside the test host,
//! `tests/e2e/run`): the host reaches it through the hybrid vsock socket (`CONNECT 1024\n`,
//! `OK <port>\n`, then ttrpc), checks it, and runs one container end to end from a busybox
//! root file system on a virtio-blk ext4 image that the agent mounts as sandbox storage.
//!
//! Prerequisites are checked, never skipped: a hardware-backed /dev/kvm, `make guest`
//! (target/guest/{vmlinux,initramfs.cpio.gz}), the husk-vmm binary (HUSK_VMM_BIN or next to this
//! test's target directory), /bin/busybox static (busybox-static) and mkfs.ext4 (e2fsprogs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, StdioMode, Storage,
};
use husk_agent_protocol::client::ExitStatus;
use husk_agent_protocol::{AgentClient, API_VERSION, BOOT_MARKER, DEFAULT_AGENT_PORT};
use husk_e2e::{guest_initramfs, guest_kernel, require_real_kvm, TempDir, Watched};
use serde_json::{json, Value};

/// Generous: under the test host's TCG a boot takes seconds, and the machine may be busy.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// How long the vsock handshake is retried after the boot marker.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);
/// Where the agent mounts the container image in the guest.
const GUEST_ROOTFS: &str = "/run/husk/rootfs";
const GUEST_MEMORY_MIB: u64 = 256;
const GUEST_CPUS: u32 = 2;

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

/// `name` on PATH or in the sbin directories (mkfs is there and root's PATH may lack them).
fn find_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: apt-get install {package}"))
}

/// A 32 MiB ext4 image holding a busybox root file system (static busybox and its applet links).
fn busybox_ext4_image(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .expect("applet link");
        }
    }
    let image = dir.join("rootfs.ext4");
    let out = Command::new(find_tool("mkfs.ext4", "e2fsprogs"))
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("32M")
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// husk-vmm with the guest image, its console on stdout (captured by [`Watched`]).
fn start_vmm(uds: &Path, extra: &[&str]) -> Watched {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("--kernel")
        .arg(guest_kernel())
        .arg("--initrd")
        .arg(guest_initramfs())
        .args(["--console", "-", "--vcpus"])
        .arg(GUEST_CPUS.to_string())
        .arg("--memory-mib")
        .arg(GUEST_MEMORY_MIB.to_string())
        .arg("--vsock-uds")
        .arg(uds)
        .args(["--guest-cid", "3"])
        .args(extra);
    Watched::spawn("husk-vmm", &mut cmd)
}

/// The hybrid vsock handshake, retried until the agent answers: returns the stream positioned
/// right after the `OK <port>\n` line.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < CONNECT_DEADLINE {
        match try_vsock_connect(uds, port) {
            Ok(stream) => return stream,
            Err(why) => last = why,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "no vsock connection to guest port {port} through {} in {CONNECT_DEADLINE:?}: {last}",
        uds.display()
    );
}

fn try_vsock_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    // One byte at a time, so nothing after the reply line is consumed.
    let mut line = Vec::new();
    let mut reader = BufReader::with_capacity(1, &stream);
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("read: {e}"))?;
    let line = String::from_utf8_lossy(&line).into_owned();
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .and_then(|p| p.parse::<u32>().ok());
    if host_port.is_none() {
        return Err(format!("reply {line:?}"));
    }
    drop(reader);
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(stream)
}

async fn agent_client(uds: &Path) -> AgentClient {
    let stream = vsock_connect(uds, DEFAULT_AGENT_PORT);
    stream.set_nonblocking(true).expect("nonblocking");
    let socket = ttrpc::r#async::transport::Socket::try_from(stream).expect("ttrpc socket");
    AgentClient::from_socket(socket)
        .await
        .expect("Check through vsock")
}

fn container_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]
            },
            "noNewPrivileges": true
        },
        "root": {"path": GUEST_ROOTFS, "readonly": false},
        "hostname": "in-guest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

/// The sandbox storage that mounts the busybox image (`--block`, the first disk: /dev/vda).
fn rootfs_storage() -> Storage {
    Storage {
        source: "/dev/vda".into(),
        fstype: "ext4".into(),
        options: vec!["nodev".into()],
        mount_point: GUEST_ROOTFS.into(),
        ..Default::default()
    }
}

async fn create(client: &AgentClient, id: &str, spec: &Value) {
    client
        .create_container(&CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec.to_string().into_bytes(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}"));
}

/// Reads stdout of a process until it contains `needle`.
async fn read_until(client: &AgentClient, id: &str, exec_id: &str, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(
            Duration::from_secs(60),
            client.read_stdout(id, exec_id, 4096),
        )
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} from {id} in 60 s; got {seen:?}"))
        .expect("ReadStdout")
        .unwrap_or_else(|| panic!("EOF from {id} before {needle:?}; got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_as_pid1_serves_vsock_and_runs_a_container_from_a_block_device() {
    require_real_kvm();
    let dir = TempDir::new("agent-guest");
    let image = busybox_ext4_image(dir.path());
    let uds = dir.path().join("vsock.sock");
    let block = image.to_str().expect("utf8 path");
    let mut vmm = start_vmm(&uds, &["--block", block]);

    let booted = vmm.expect_marker(BOOT_MARKER, BOOT_DEADLINE);
    let t_connect = Instant::now();
    let client = agent_client(&uds).await;
    let connected = t_connect.elapsed();

    let check = client.check().await.expect("Check");
    assert_eq!(check.api_version, API_VERSION);
    assert_eq!(check.agent_version, env!("CARGO_PKG_VERSION"));
    let details = client.guest_details().await.expect("GetGuestDetails");
    assert!(details.kernel_release.starts_with("6.1"), "{details:?}");
    assert_eq!(details.cpus, GUEST_CPUS, "{details:?}");
    let ram = GUEST_MEMORY_MIB << 20;
    assert!(
        details.mem_total_bytes > ram / 2 && details.mem_total_bytes <= ram,
        "MemTotal {} for a {GUEST_MEMORY_MIB} MiB guest",
        details.mem_total_bytes
    );
    assert!(
        details.mem_available_bytes > 0 && details.mem_available_bytes <= details.mem_total_bytes,
        "{details:?}"
    );

    let t_run = Instant::now();
    client
        .create_sandbox(&CreateSandboxRequest {
            sandbox_id: "pod1".into(),
            hostname: "husk-pod".into(),
            storages: vec![rootfs_storage()],
            ..Default::default()
        })
        .await
        .expect("CreateSandbox mounts /dev/vda");
    let spec = container_spec(&["sh", "-c", "echo hello; hostname; exit 3"]);
    let pid = client
        .create_container(&CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: spec.to_string().into_bytes(),
            stdio: StdioMode::STDIO_PIPES.into(),
            ..Default::default()
        })
        .await
        .expect("CreateContainer");
    assert!(pid > 1, "container init pid {pid}");
    client.start_container("c1").await.expect("StartContainer");
    let (stdout, stderr, exit) = tokio::join!(
        client.read_to_end(false, "c1", "", 1 << 20),
        client.read_to_end(true, "c1", "", 1 << 20),
        client.wait_process("c1", ""),
    );
    let stdout = String::from_utf8_lossy(&stdout.expect("ReadStdout")).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.expect("ReadStderr")).into_owned();
    assert_eq!(stdout, "hello\nin-guest\n", "stderr: {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(
        exit.expect("WaitProcess"),
        ExitStatus { code: 3, signal: 0 }
    );
    client
        .remove_container("c1")
        .await
        .expect("RemoveContainer");
    let gone = client.list_processes("c1").await;
    assert_eq!(
        gone.as_ref().err().and_then(|e| e.code()),
        Some(ttrpc::Code::NOT_FOUND),
        "{gone:?}"
    );
    client
        .destroy_sandbox("pod1")
        .await
        .expect("DestroySandbox");
    let ran = t_run.elapsed();

    // The agent stays up: a second connection is served after all that.
    let again = agent_client(&uds).await;
    again.check().await.expect("Check on a second connection");
    drop(again);
    drop(client);

    // The API has no power-off call: the host stops the VM, which must end cleanly.
    let t_stop = Instant::now();
    vmm.signal(libc::SIGTERM);
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let stopped = t_stop.elapsed();
    assert_eq!(status.code(), Some(0), "husk-vmm after SIGTERM");
    assert!(!uds.exists(), "husk-vmm removes its vsock socket on exit");
    let console = vmm.output();
    assert!(
        !console.contains("husk-agent: fatal"),
        "the agent reported a fatal error:\n{console}"
    );
    eprintln!(
        "agent-in-guest timings: marker {:.2}s after husk-vmm started, vsock+Check {:.0} ms, \
         sandbox+container+destroy {:.0} ms, SIGTERM to exit {:.0} ms",
        booted.as_secs_f64(),
        connected.as_secs_f64() * 1e3,
        ran.as_secs_f64() * 1e3,
        stopped.as_secs_f64() * 1e3
    );
}

#[test]
fn a_fatal_agent_error_is_printed_and_ends_the_vm_with_a_failure() {
    require_real_kvm();
    let dir = TempDir::new("agent-fatal");
    let uds = dir.path().join("vsock.sock");
    let mut vmm = start_vmm(&uds, &["--cmdline", "husk.agent_port=nonsense"]);

    let status = vmm
        .wait_exit(BOOT_DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));

    let console = vmm.output();
    // The kernel prints to the same serial port on its own (this guest boots without `quiet`):
    // its lines can land inside the agent's, so they are taken out before looking.
    let agent_text = without_kernel_lines(&console);
    // Reset by the test host before the agent ran at all: said in a signature's words (retried).
    if let Some(reset) = husk_e2e::reset_before_init(status, &agent_text, &console, "husk-agent:") {
        panic!("{reset}\nconsole:\n{console}");
    }
    assert!(
        agent_text.contains("husk-agent: fatal: husk.agent_port=\"nonsense\" is not a port number"),
        "console:\n{console}"
    );
    assert!(!console.contains(BOOT_MARKER), "console:\n{console}");
    // PID 1 exits: the kernel panics, resets at once, and husk-vmm reports the panic.
    assert_eq!(status.code(), Some(3), "console:\n{console}");
}

/// `console` without the kernel's printk lines (`[ SECONDS.MICROS] text` up to the end of the
/// line), wherever they start, even inside another line.
fn without_kernel_lines(console: &str) -> String {
    let mut out = String::with_capacity(console.len());
    let mut rest = console;
    while let Some(start) = rest.find('[') {
        let after = &rest[start + 1..];
        let stamp_len = after.find(']').unwrap_or(0);
        let stamp = after[..stamp_len].trim_start();
        let is_stamp = stamp_len > 0
            && stamp.split_once('.').is_some_and(|(s, us)| {
                !s.is_empty()
                    && !us.is_empty()
                    && s.bytes().all(|b| b.is_ascii_digit())
                    && us.bytes().all(|b| b.is_ascii_digit())
            });
        if is_stamp {
            out.push_str(&rest[..start]);
            let line_end = after.find('\n').map_or(after.len(), |i| i + 1);
            rest = &after[line_end..];
        } else {
            out.push_str(&rest[..=start]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn kernel_lines_inside_the_agents_are_taken_out() {
    let console = "[    0.1] boot\nhusk-agent: fatal: a[    2.345678] random: crng init done\nb c\n[x] kept\n";
    assert_eq!(
        without_kernel_lines(console),
        "husk-agent: fatal: ab c\n[x] kept\n"
    );
}

/// What containers need from the guest kernel (its own minimal config, not the test host's):
/// exec into pid/mount namespaces, a pty with resize, the memory controller with OOM events, the
/// pids controller, seccomp filters and cgroup statistics, all in one boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_kernel_runs_exec_pty_oom_pids_and_seccomp() {
    require_real_kvm();
    let dir = TempDir::new("agent-guest-features");
    let image = busybox_ext4_image(dir.path());
    let uds = dir.path().join("vsock.sock");
    let mut vmm = start_vmm(&uds, &["--block", image.to_str().expect("utf8 path")]);
    vmm.expect_marker(BOOT_MARKER, BOOT_DEADLINE);
    let client = agent_client(&uds).await;
    client
        .create_sandbox(&CreateSandboxRequest {
            sandbox_id: "pod2".into(),
            storages: vec![rootfs_storage()],
            ..Default::default()
        })
        .await
        .expect("CreateSandbox");

    // Exec into a running container: same pid namespace (its pid 1 is the sleep), same hostname.
    create(&client, "sleeper", &container_spec(&["sleep", "1000"])).await;
    client
        .start_container("sleeper")
        .await
        .expect("start sleeper");
    let process = json!({"args": ["sh", "-c", "tr \\\\0 ' ' < /proc/1/cmdline; echo; hostname"],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    client
        .exec_process("sleeper", "e1", process.to_string().as_bytes())
        .await
        .expect("ExecProcess");
    let exec_out = client
        .read_to_end(false, "sleeper", "e1", 1 << 20)
        .await
        .expect("exec stdout");
    let exec_exit = client
        .wait_process("sleeper", "e1")
        .await
        .expect("wait exec");
    let stats = client
        .stats_container("sleeper")
        .await
        .expect("StatsContainer");

    // A terminal, resized while the process runs.
    let mut pty = container_spec(&["sh", "-c", "stty size; read line; stty size"]);
    pty["process"]["terminal"] = json!(true);
    pty["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    create(&client, "pty", &pty).await;
    client.start_container("pty").await.expect("start pty");
    read_until(&client, "pty", "", "24 80").await;
    client
        .tty_win_resize("pty", "", 40, 100)
        .await
        .expect("TtyWinResize");
    client
        .write_all_stdin("pty", "", b"go\n")
        .await
        .expect("WriteStdin");
    read_until(&client, "pty", "", "40 100").await;
    let pty_exit = client.wait_process("pty", "").await.expect("wait pty");

    // An OOM kill under a 32 MiB limit, reported by GetOOMEvent.
    let mut oom = container_spec(&["sh", "-c", "a=0123456789abcdef; while :; do a=$a$a; done"]);
    oom["linux"]["resources"] = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
    let watcher = client.clone();
    let oom_event = tokio::spawn(async move { watcher.get_oom_event().await });
    create(&client, "oom", &oom).await;
    client.start_container("oom").await.expect("start oom");
    let oom_exit = client.wait_process("oom", "").await.expect("wait oom");
    let oom_event = tokio::time::timeout(Duration::from_secs(30), oom_event)
        .await
        .expect("an OOM event within 30 s")
        .expect("join")
        .expect("GetOOMEvent");

    // A pids limit stops forks.
    let mut pids = container_spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 20 ]; do sleep 5 & i=$((i+1)); done; exit 0",
    ]);
    pids["linux"]["resources"] = json!({"pids": {"limit": 5}});
    create(&client, "pids", &pids).await;
    client.start_container("pids").await.expect("start pids");
    let pids_err = client
        .read_to_end(true, "pids", "", 1 << 20)
        .await
        .expect("pids stderr");
    let pids_running = client.list_processes("pids").await.expect("ListProcesses");

    // A seccomp rule denies mkdir.
    let mut sec = container_spec(&["sh", "-c", "mkdir /tmp/denied; echo status=$?"]);
    sec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    create(&client, "seccomp", &sec).await;
    client
        .start_container("seccomp")
        .await
        .expect("start seccomp");
    let sec_out = client
        .read_to_end(false, "seccomp", "", 1 << 20)
        .await
        .expect("seccomp stdout");

    client
        .destroy_sandbox("pod2")
        .await
        .expect("DestroySandbox removes all");
    let after = client.list_processes("sleeper").await;
    drop(client);
    vmm.signal(libc::SIGTERM);
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));

    let exec_out = String::from_utf8_lossy(&exec_out);
    assert_eq!(exec_out, "sleep 1000 \nin-guest\n", "exec output");
    assert_eq!(exec_exit, ExitStatus { code: 0, signal: 0 });
    let memory = stats.memory.into_option().expect("memory stats");
    assert!(memory.current_bytes > 0, "{memory:?}");
    assert!(stats.pids.into_option().expect("pids stats").current >= 1);
    assert_eq!(pty_exit, ExitStatus { code: 0, signal: 0 });
    assert_eq!(oom_exit.signal, libc::SIGKILL, "{oom_exit:?}");
    assert_eq!(oom_event, "oom");
    let pids_err = String::from_utf8_lossy(&pids_err);
    assert!(pids_err.contains("fork"), "no fork failure: {pids_err:?}");
    assert!(pids_running.len() <= 5, "{pids_running:?}");
    assert_eq!(String::from_utf8_lossy(&sec_out), "status=1\n");
    assert_eq!(
        after.as_ref().err().and_then(|e| e.code()),
        Some(ttrpc::Code::NOT_FOUND),
        "DestroySandbox left the container: {after:?}"
    );
    assert_eq!(status.code(), Some(0), "husk-vmm after SIGTERM");
}
