//! husk-agent end to end on a host with cgroup v2 (the test host): the agent serves on a Unix
//! socket and runs containers from a busybox rootfs (Debian's busybox-static).
//!
//! Prerequisites are checked, never skipped: root, cgroup v2 at /sys/fs/cgroup (or at
//! HUSK_AGENT_TEST_CGROUP_ROOT), /bin/busybox static, the husk-agent binary (HUSK_AGENT_BIN or
//! next to this test's target directory).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::Duration;

use husk_agent_protocol::agent::{CreateContainerRequest, StdioMode};
use husk_agent_protocol::client::ExitStatus;
use husk_agent_protocol::AgentClient;
use serde_json::{json, Value};

const OUTPUT_LIMIT: usize = 64 << 20;

fn cgroup_root() -> PathBuf {
    std::env::var_os("HUSK_AGENT_TEST_CGROUP_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

fn check_prerequisites() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the agent tests must run as root (inside tests/testhost/run)"
    );
    let root = cgroup_root();
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(root.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: statfs writes into a valid struct.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert!(
        rc == 0 && st.f_type as i64 == 0x6367_7270,
        "{} is not a cgroup v2 mount: run these tests inside tests/testhost/run",
        root.display()
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}

fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("husk-agent");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (cargo build --workspace) or set HUSK_AGENT_BIN",
        bin.display()
    );
    bin
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("husk-agent-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir scratch");
    d
}

/// A busybox rootfs, built once per test run.
fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let root = scratch("rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
        std::fs::write(root.join("etc/secret"), "top secret\n").expect("write");
        std::fs::write(root.join("root/private"), "private\n").expect("write");
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

struct Agent {
    child: Child,
    client: AgentClient,
    _dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(clippy::zombie_processes)] // Agent::drop kills and waits.
async fn start_agent(name: &str) -> Agent {
    check_prerequisites();
    let dir = scratch(&format!("agent-{name}"));
    let sock = dir.join("agent.sock");
    let child = Command::new(agent_bin())
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--cgroup-root")
        .arg(cgroup_root())
        .arg("--log")
        .arg("debug")
        .spawn()
        .expect("spawn husk-agent");
    // Generous: under the test host's TCG a debug build read over 9p can take seconds to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if sock.exists() {
            if let Ok(client) = AgentClient::connect(&format!("unix://{}", sock.display())).await {
                return Agent {
                    child,
                    client,
                    _dir: dir,
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "husk-agent did not come up on {} within 60 s",
        sock.display()
    );
}

fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs().to_string_lossy(), "readonly": false},
        "hostname": "husk",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus"]
        }
    })
}

async fn create(
    a: &Agent,
    id: &str,
    spec: &Value,
) -> Result<u32, husk_agent_protocol::ClientError> {
    let req = CreateContainerRequest {
        container_id: id.to_owned(),
        oci_spec_json: spec.to_string().into_bytes(),
        stdio: StdioMode::STDIO_FROM_SPEC.into(),
        ..Default::default()
    };
    a.client.create_container(&req).await
}

struct Output {
    stdout: String,
    stderr: String,
    exit: ExitStatus,
}

/// Creates, starts, drains stdout/stderr, waits and removes.
async fn run(a: &Agent, id: &str, spec: &Value) -> Output {
    create(a, id, spec).await.expect("create");
    a.client.start_container(id).await.expect("start");
    let (out, err, exit) = tokio::join!(
        a.client.read_to_end(false, id, "", OUTPUT_LIMIT),
        a.client.read_to_end(true, id, "", OUTPUT_LIMIT),
        a.client.wait_process(id, ""),
    );
    a.client.remove_container(id).await.expect("remove");
    Output {
        stdout: String::from_utf8_lossy(&out.expect("stdout")).into_owned(),
        stderr: String::from_utf8_lossy(&err.expect("stderr")).into_owned(),
        exit: exit.expect("wait"),
    }
}

/// Reads stdout until it contains `needle`.
async fn read_until(a: &Agent, id: &str, exec_id: &str, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(
            Duration::from_secs(30),
            a.client.read_stdout(id, exec_id, 4096),
        )
        .await
        .expect("output in time")
        .expect("read")
        .unwrap_or_else(|| panic!("EOF before {needle:?}; got {seen:?}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

#[tokio::test]
async fn echo_output() {
    let a = start_agent("echo").await;
    let o = run(&a, "echo", &spec(&["echo", "hello from husk"])).await;
    assert_eq!(o.stdout, "hello from husk\n");
    assert_eq!(o.exit, ExitStatus { code: 0, signal: 0 });
}

#[tokio::test]
async fn exit_code_three() {
    let a = start_agent("exit3").await;
    let o = run(&a, "exit3", &spec(&["sh", "-c", "echo oops >&2; exit 3"])).await;
    assert_eq!(o.exit, ExitStatus { code: 3, signal: 0 });
    assert_eq!(o.stderr, "oops\n");
}

#[tokio::test]
async fn env_and_cwd() {
    let a = start_agent("envcwd").await;
    let mut s = spec(&["sh", "-c", "echo $GREETING; pwd"]);
    s["process"]["env"] = json!(["PATH=/bin", "GREETING=bonjour"]);
    s["process"]["cwd"] = json!("/tmp");
    let o = run(&a, "envcwd", &s).await;
    assert_eq!(o.stdout, "bonjour\n/tmp\n");
}

#[tokio::test]
async fn uid_gid_and_groups() {
    let a = start_agent("uid").await;
    let mut s = spec(&["id"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [2000, 2001]});
    let o = run(&a, "uid", &s).await;
    assert!(
        o.stdout.starts_with("uid=1000 gid=1001 groups="),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("2000") && o.stdout.contains("2001"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn hostname_is_set() {
    let a = start_agent("host").await;
    let mut s = spec(&["hostname"]);
    s["hostname"] = json!("box-one");
    let o = run(&a, "host", &s).await;
    assert_eq!(o.stdout, "box-one\n");
}

#[tokio::test]
async fn read_only_root() {
    let a = start_agent("ro").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "touch /tmp/ok && echo tmp-writable; touch /rootfile",
    ]);
    s["root"]["readonly"] = json!(true);
    let o = run(&a, "ro", &s).await;
    assert_eq!(o.stdout, "tmp-writable\n");
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);
    assert_ne!(o.exit.code, 0);
    assert!(!rootfs().join("rootfile").exists());
}

#[tokio::test]
async fn exec_into_running_container() {
    let a = start_agent("exec").await;
    create(&a, "exec", &spec(&["sleep", "1000"]))
        .await
        .expect("create");
    a.client.start_container("exec").await.expect("start");
    let process = json!({"args": ["sh", "-c", "echo from-exec; cat /proc/1/cmdline; hostname"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    a.client
        .exec_process("exec", "e1", process.to_string().as_bytes())
        .await
        .expect("exec");
    let out = a
        .client
        .read_to_end(false, "exec", "e1", OUTPUT_LIMIT)
        .await
        .expect("read");
    let exit = a.client.wait_process("exec", "e1").await.expect("wait");
    assert_eq!(exit.code, 0);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("from-exec\nsleep"), "{out}");
    assert!(out.ends_with("husk\n"), "{out}");
    a.client.remove_container("exec").await.expect("remove");
}

#[tokio::test]
async fn sigterm_runs_the_handler_sigkill_kills() {
    let a = start_agent("signals").await;
    let s = spec(&[
        "sh",
        "-c",
        "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done",
    ]);
    create(&a, "term", &s).await.expect("create");
    a.client.start_container("term").await.expect("start");
    read_until(&a, "term", "", "ready").await;
    a.client
        .signal_process("term", "", libc::SIGTERM as u32, false)
        .await
        .expect("signal");
    let exit = a.client.wait_process("term", "").await.expect("wait");
    assert_eq!(
        exit,
        ExitStatus {
            code: 42,
            signal: 0
        }
    );
    a.client.remove_container("term").await.expect("remove");

    create(&a, "kill", &spec(&["sleep", "1000"]))
        .await
        .expect("create");
    a.client.start_container("kill").await.expect("start");
    a.client
        .signal_process("kill", "", libc::SIGKILL as u32, false)
        .await
        .expect("signal");
    let exit = a.client.wait_process("kill", "").await.expect("wait");
    assert_eq!(
        exit,
        ExitStatus {
            code: 137,
            signal: 9
        }
    );
    a.client.remove_container("kill").await.expect("remove");
}

#[tokio::test]
async fn memory_limit_oom_kill_is_reported() {
    let a = start_agent("oom").await;
    let mut s = spec(&["sh", "-c", "a=0123456789abcdef; while :; do a=$a$a; done"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
    let client = a.client.clone();
    let oom = tokio::spawn(async move { client.get_oom_event().await });
    create(&a, "oom", &s).await.expect("create");
    a.client.start_container("oom").await.expect("start");
    let exit = a.client.wait_process("oom", "").await.expect("wait");
    assert_eq!(exit.signal, libc::SIGKILL, "{exit:?}");
    let event = tokio::time::timeout(Duration::from_secs(10), oom)
        .await
        .expect("OOM event in time");
    assert_eq!(event.expect("join").expect("oom event"), "oom");
    a.client.remove_container("oom").await.expect("remove");
}

#[tokio::test]
async fn pids_limit_stops_forks() {
    let a = start_agent("pids").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo done; exit 0",
    ]);
    s["linux"]["resources"] = json!({"pids": {"limit": 10}});
    create(&a, "pids", &s).await.expect("create");
    a.client.start_container("pids").await.expect("start");
    let stats = a.client.stats_container("pids").await.expect("stats");
    assert_eq!(stats.pids.limit, 10);
    let err = a
        .client
        .read_to_end(true, "pids", "", OUTPUT_LIMIT)
        .await
        .expect("stderr");
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("fork"), "no fork failure reported: {err:?}");
    assert!(a.client.list_processes("pids").await.expect("ps").len() <= 10);
    a.client.remove_container("pids").await.expect("remove");
}

#[tokio::test]
async fn seccomp_rule_denies_a_syscall() {
    let a = start_agent("seccomp").await;
    let mut s = spec(&["sh", "-c", "echo before; mkdir /tmp/denied; echo status=$?"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let o = run(&a, "seccomp", &s).await;
    assert_eq!(o.stdout, "before\nstatus=1\n");
    assert!(o.stderr.contains("Operation not permitted"), "{}", o.stderr);
}

#[tokio::test]
async fn masked_and_readonly_paths() {
    let a = start_agent("masked").await;
    let mut s = spec(&[
        "sh",
        "-c",
        "wc -c < /etc/secret; ls /root | wc -l; echo 1 > /proc/sys/kernel/ns_last_pid && echo wrote",
    ]);
    s["linux"]["maskedPaths"] = json!(["/proc/kcore", "/etc/secret", "/root"]);
    let o = run(&a, "masked", &s).await;
    assert_eq!(o.stdout, "0\n0\n");
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);
}

#[tokio::test]
async fn terminal_with_resize() {
    let a = start_agent("pty").await;
    let mut s = spec(&["sh", "-c", "stty size; read line; stty size"]);
    s["process"]["terminal"] = json!(true);
    s["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    create(&a, "pty", &s).await.expect("create");
    a.client.start_container("pty").await.expect("start");
    read_until(&a, "pty", "", "24 80").await;
    a.client
        .tty_win_resize("pty", "", 40, 100)
        .await
        .expect("resize");
    a.client
        .write_all_stdin("pty", "", b"go\n")
        .await
        .expect("stdin");
    read_until(&a, "pty", "", "40 100").await;
    let exit = a.client.wait_process("pty", "").await.expect("wait");
    assert_eq!(exit.code, 0);
    a.client.remove_container("pty").await.expect("remove");
}

#[tokio::test]
async fn ten_megabytes_of_stdout_intact() {
    let a = start_agent("big").await;
    let size = 10 << 20;
    let o = run(
        &a,
        "big",
        &spec(&["sh", "-c", &format!("yes 0123456789abcde | head -c {size}")]),
    )
    .await;
    let expected: String = "0123456789abcde\n".repeat(size / 16);
    assert_eq!(o.stdout.len(), size);
    assert!(
        o.stdout == expected,
        "stdout differs from the expected stream"
    );
    assert_eq!(o.exit.code, 0);
}

#[tokio::test]
async fn stdin_reaches_the_process() {
    let a = start_agent("stdin").await;
    create(&a, "stdin", &spec(&["cat"])).await.expect("create");
    a.client.start_container("stdin").await.expect("start");
    a.client
        .write_all_stdin("stdin", "", b"piped text\n")
        .await
        .expect("write");
    a.client.close_stdin("stdin", "").await.expect("close");
    let out = a
        .client
        .read_to_end(false, "stdin", "", OUTPUT_LIMIT)
        .await
        .expect("read");
    assert_eq!(out, b"piped text\n");
    assert_eq!(
        a.client.wait_process("stdin", "").await.expect("wait").code,
        0
    );
    a.client.remove_container("stdin").await.expect("remove");
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if ppid == pid {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn twenty_containers_leave_nothing_behind() {
    let a = start_agent("twenty").await;
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .count();
    for i in 0..20 {
        let id = format!("many-{i}");
        create(&a, &id, &spec(&["sh", "-c", "sleep 1000 & sleep 1000"]))
            .await
            .expect("create");
        a.client.start_container(&id).await.expect("start");
    }
    for i in 0..20 {
        a.client
            .remove_container(&format!("many-{i}"))
            .await
            .expect("remove");
    }
    let agent_pid = a.child.id();
    assert_eq!(
        children_of(agent_pid),
        Vec::<u32>::new(),
        "processes left behind"
    );
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .count();
    assert_eq!(mounts_before, mounts_after, "mounts left behind");
    for i in 0..20 {
        let dir = cgroup_root().join("husk").join(format!("many-{i}"));
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
}

#[tokio::test]
async fn unsupported_fields_and_bad_ids_are_refused() {
    let a = start_agent("refuse").await;
    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "user"}]);
    let err = create(&a, "userns", &s)
        .await
        .expect_err("user namespace accepted");
    assert_eq!(err.code(), Some(ttrpc::Code::INVALID_ARGUMENT), "{err}");
    assert!(err.to_string().contains("user namespaces"), "{err}");
    let err = create(&a, "../x", &spec(&["true"]))
        .await
        .expect_err("../x accepted");
    assert!(err.to_string().contains("invalid"), "{err}");
    let err = create(&a, "nope", &spec(&["/no/such/binary"])).await;
    // Exec errors surface at start.
    assert!(err.is_ok());
    let err = a
        .client
        .start_container("nope")
        .await
        .expect_err("start of a missing binary");
    assert!(err.to_string().contains("/no/such/binary"), "{err}");
    a.client.remove_container("nope").await.expect("remove");
}

/// Sums the container's CPU time now, via StatsContainer.
async fn cpu_usec(a: &Agent, id: &str) -> u64 {
    let stats = a.client.stats_container(id).await.expect("stats");
    stats.cpu.into_option().expect("cpu stats").usage_usec
}

#[tokio::test]
async fn pause_stops_cpu_use_and_resume_restarts_it() {
    let a = start_agent("pause").await;
    create(&a, "spin", &spec(&["sh", "-c", "while :; do :; done"]))
        .await
        .expect("create");
    a.client.start_container("spin").await.expect("start");
    let frozen_file = cgroup_root().join("husk/spin/cgroup.events");

    a.client.pause_container("spin").await.expect("pause");
    let events = std::fs::read_to_string(&frozen_file).expect("cgroup.events");
    let paused_at = cpu_usec(&a, "spin").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_later = cpu_usec(&a, "spin").await;
    a.client.resume_container("spin").await.expect("resume");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resumed_later = cpu_usec(&a, "spin").await;
    a.client.remove_container("spin").await.expect("remove");

    assert!(events.contains("frozen 1"), "cgroup.events: {events}");
    assert_eq!(paused_at, paused_later, "a paused container used CPU");
    assert!(
        resumed_later > paused_later,
        "no CPU used after resume ({paused_later} -> {resumed_later} usec)"
    );
}

#[tokio::test]
async fn update_container_changes_limits_and_refuses_unsupported_ones() {
    let a = start_agent("update").await;
    create(&a, "upd", &spec(&["sleep", "1000"]))
        .await
        .expect("create");
    a.client.start_container("upd").await.expect("start");

    let resources = json!({"memory": {"limit": 64 << 20}, "pids": {"limit": 20}, "cpu": {"quota": 50000, "period": 100000}});
    a.client
        .update_container("upd", resources.to_string().as_bytes())
        .await
        .expect("update");
    let stats = a.client.stats_container("upd").await.expect("stats");
    let cpu_max = std::fs::read_to_string(cgroup_root().join("husk/upd/cpu.max")).expect("cpu.max");
    let refused = a
        .client
        .update_container(
            "upd",
            json!({"blockIO": {"weight": 10}}).to_string().as_bytes(),
        )
        .await;
    a.client.remove_container("upd").await.expect("remove");

    assert_eq!(stats.memory.limit_bytes, 64 << 20);
    assert_eq!(stats.pids.limit, 20);
    assert!(stats.pids.current >= 1, "{:?}", stats.pids);
    assert_eq!(cpu_max.trim(), "50000 100000");
    let err = refused.expect_err("blockIO accepted");
    assert_eq!(err.code(), Some(ttrpc::Code::INVALID_ARGUMENT), "{err}");
    assert!(err.to_string().contains("linux.resources.blockIO"), "{err}");
}

#[tokio::test]
async fn signal_all_reaches_every_process_of_the_container() {
    let a = start_agent("sigall").await;
    // No pid namespace: killing the init alone would leave the two sleeps running.
    let mut s = spec(&["sh", "-c", "sleep 1000 & sleep 1000 & echo started; wait"]);
    s["linux"]["namespaces"] = json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    create(&a, "all", &s).await.expect("create");
    a.client.start_container("all").await.expect("start");
    read_until(&a, "all", "", "started").await;
    let before = a.client.list_processes("all").await.expect("ps");

    a.client
        .signal_process("all", "", libc::SIGTERM as u32, true)
        .await
        .expect("signal all");
    let exit = a.client.wait_process("all", "").await.expect("wait");
    let mut left = a.client.list_processes("all").await.expect("ps");
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = a.client.list_processes("all").await.expect("ps");
    }
    a.client.remove_container("all").await.expect("remove");

    assert_eq!(before.len(), 3, "sh and two sleeps: {before:?}");
    assert_eq!(
        exit,
        ExitStatus {
            code: 128 + libc::SIGTERM,
            signal: libc::SIGTERM
        }
    );
    assert_eq!(left, Vec::<u32>::new(), "processes survived SIGTERM to all");
}

#[tokio::test]
async fn every_waiter_gets_the_exit_status() {
    let a = start_agent("waiters").await;
    create(&a, "w", &spec(&["sh", "-c", "sleep 0.5; exit 7"]))
        .await
        .expect("create");
    a.client.start_container("w").await.expect("start");
    let (first, second) = tokio::join!(
        a.client.wait_process("w", ""),
        a.client.wait_process("w", "")
    );
    let late = a.client.wait_process("w", "").await;
    a.client.remove_container("w").await.expect("remove");

    let want = ExitStatus { code: 7, signal: 0 };
    assert_eq!(first.expect("first waiter"), want);
    assert_eq!(second.expect("second waiter"), want);
    assert_eq!(late.expect("waiter after the exit"), want);
}

/// The generated client, without the typed client's own checks: what a buggy or hostile host
/// could send.
async fn raw_client(a: &Agent) -> husk_agent_protocol::agent_ttrpc::AgentClient {
    let addr = format!("unix://{}", a._dir.join("agent.sock").display());
    let c = ttrpc::r#async::Client::connect(&addr)
        .await
        .expect("connect");
    husk_agent_protocol::agent_ttrpc::AgentClient::new(c)
}

fn versioned_ctx() -> ttrpc::context::Context {
    let mut ctx = ttrpc::context::with_duration(Duration::from_secs(30));
    ctx.add(
        husk_agent_protocol::API_VERSION_METADATA_KEY.to_owned(),
        husk_agent_protocol::API_VERSION.to_string(),
    );
    ctx
}

fn status_code(r: Result<impl std::fmt::Debug, ttrpc::Error>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test]
async fn the_agent_itself_refuses_bad_ids_oversize_specs_and_missing_versions() {
    let a = start_agent("raw").await;
    let raw = raw_client(&a).await;
    let good_spec = spec(&["true"]).to_string().into_bytes();

    let traversal = raw
        .create_container(
            versioned_ctx(),
            &CreateContainerRequest {
                container_id: "../x".into(),
                oci_spec_json: good_spec.clone(),
                ..Default::default()
            },
        )
        .await;
    let oversize = raw
        .create_container(
            versioned_ctx(),
            &CreateContainerRequest {
                container_id: "big".into(),
                oci_spec_json: vec![b' '; husk_agent_protocol::MAX_SPEC_SIZE + 1],
                ..Default::default()
            },
        )
        .await;
    let unversioned = raw
        .get_guest_details(
            ttrpc::context::with_duration(Duration::from_secs(30)),
            &Default::default(),
        )
        .await;
    let mut other = ttrpc::context::with_duration(Duration::from_secs(30));
    other.add(
        husk_agent_protocol::API_VERSION_METADATA_KEY.to_owned(),
        "999".to_owned(),
    );
    let wrong_version = raw.get_guest_details(other, &Default::default()).await;
    let bad_signal = raw
        .signal_process(
            versioned_ctx(),
            &husk_agent_protocol::agent::SignalProcessRequest {
                container_id: "nothing".into(),
                signal: 1000,
                ..Default::default()
            },
        )
        .await;

    let (code, msg) = status_code(traversal);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("\"../x\" is invalid"), "{msg}");
    let (code, msg) = status_code(oversize);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("the limit is 1048576"), "{msg}");
    let (code, msg) = status_code(unversioned);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    let (code, msg) = status_code(wrong_version);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("v999") && msg.contains("v1"), "{msg}");
    let (code, msg) = status_code(bad_signal);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("out of range"), "{msg}");
    assert!(
        !cgroup_root().join("x").exists() && !a._dir.join("x.init.json").exists(),
        "something was created from the id ../x"
    );
}

#[tokio::test]
async fn processes_start_with_default_signal_dispositions() {
    let a = start_agent("sigstate").await;
    // Exec'd directly (no shell in between): what the container's process inherits.
    let o = run(
        &a,
        "sigstate",
        &spec(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]),
    )
    .await;
    // An ignored SIGPIPE would turn `yes | head` into write errors instead of a quiet exit.
    let pipe = run(
        &a,
        "pipe",
        &spec(&["sh", "-c", "yes | head -c 4 >/dev/null; echo piped"]),
    )
    .await;

    assert_eq!(
        o.stdout,
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
    assert_eq!(pipe.stdout, "piped\n");
    assert_eq!(pipe.stderr, "", "yes saw a write error");
}

#[tokio::test]
async fn no_agent_file_descriptor_leaks_into_containers_or_execs() {
    let a = start_agent("fds").await;
    // `ls` itself holds the directory it lists open as fd 3; anything more is a leak.
    let o = run(&a, "fds", &spec(&["ls", "/proc/self/fd"])).await;
    create(&a, "fds-exec", &spec(&["sleep", "1000"]))
        .await
        .expect("create");
    a.client.start_container("fds-exec").await.expect("start");
    let process = json!({"args": ["ls", "/proc/self/fd"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    a.client
        .exec_process("fds-exec", "ls", process.to_string().as_bytes())
        .await
        .expect("exec");
    let exec_out = a
        .client
        .read_to_end(false, "fds-exec", "ls", OUTPUT_LIMIT)
        .await
        .expect("read");
    a.client.remove_container("fds-exec").await.expect("remove");

    assert_eq!(o.stdout, "0\n1\n2\n3\n", "container init fds");
    assert_eq!(
        String::from_utf8_lossy(&exec_out),
        "0\n1\n2\n3\n",
        "exec fds"
    );
}
