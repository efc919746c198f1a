//! containerd-shim-husk-v2 end to end, beyond run/exec/kill (tests/e2e/tests/shim.rs): log URIs
//! (`binary://` logging programs and `file://`), Update (containerd's Tasks API: ctr 1.6 has no
//! `task update`), ResizePty (`ctr task exec -t` on a pseudo-terminal the test resizes), TaskOOM
//! and exit 137, and containerd's cleanup after the shim was killed (`containerd-shim-husk-v2
//! delete`). Same private containerd 1.6 as shim.rs (husk_e2e::containerd). Needs a real KVM:
//! run with `tests/e2e/run shim_` (inside the test host).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use husk_e2e::containerd::{
    describe, processes_named, shim_sockets, Containerd, Options, HUSK_RUNTIME, IMAGE, SHIM,
};
use husk_e2e::{TempDir, Watched};

/// A `binary://` logging program: stdout (fd 3) and stderr (fd 4) to files, its arguments and
/// environment to a third, ready (fd 5 closed) first so that no child inherits fd 5.
fn write_logger(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("test-logger");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             exec 5>&-\n\
             echo \"args=$* id=$CONTAINER_ID ns=$CONTAINER_NAMESPACE\" > {d}/logger.env\n\
             /bin/cat <&3 > {d}/logger.stdout &\n\
             /bin/cat <&4 > {d}/logger.stderr &\n\
             wait\n\
             echo done > {d}/logger.done\n",
            d = dir.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

#[test]
fn shim_log_uris_binary_and_file() {
    let containerd = Containerd::start();
    let logs = containerd.dir().join("logs");
    fs::create_dir_all(&logs).unwrap();
    let logger = write_logger(&logs);

    // binary://: the logging program gets the output; ctr prints none of it.
    let uri = format!("binary://{}?flag=value&-v", logger.display());
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        &uri,
        "--runtime",
        HUSK_RUNTIME,
        IMAGE,
        "log1",
        "sh",
        "-c",
        "echo to-stdout; echo to-stderr >&2; exit 5",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("to-stdout"),
        "{}",
        describe(&out)
    );
    // The exit is reported once the program has exited, so its files are complete.
    assert_eq!(read(&logs.join("logger.stdout")), "to-stdout\n");
    assert_eq!(read(&logs.join("logger.stderr")), "to-stderr\n");
    assert_eq!(
        read(&logs.join("logger.env")),
        "args=flag value -v id=log1 ns=default\n"
    );
    assert_eq!(read(&logs.join("logger.done")), "done\n");
    assert!(
        processes_named("test-logger").is_empty(),
        "the logging program still runs"
    );
    containerd.assert_clean();

    // file://: stdout and stderr appended to the file, its directory created.
    let file = logs.join("sub/dir/log2.log");
    let uri = format!("file://{}", file.display());
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--log-uri",
        &uri,
        "--runtime",
        HUSK_RUNTIME,
        IMAGE,
        "log2",
        "sh",
        "-c",
        "echo file-out; echo file-err >&2",
    ]);
    assert!(
        out.status.success(),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    let text = read(&file);
    let mut lines: Vec<_> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["file-err", "file-out"], "{text:?}");
    containerd.assert_clean();
}

/// containerd's Tasks API over gRPC (ctr 1.6 has no `task update`): the two messages needed.
mod tasks_api {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use hyper_util::rt::TokioIo;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Endpoint, Uri};

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// containerd.services.tasks.v1.UpdateTaskRequest.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UpdateTaskRequest {
        #[prost(string, tag = "1")]
        pub container_id: String,
        #[prost(message, optional, tag = "2")]
        pub resources: Option<Any>,
        #[prost(map = "string, string", tag = "3")]
        pub annotations: HashMap<String, String>,
    }

    /// Calls Tasks/Update for `id` in namespace `default` with OCI LinuxResources `json`.
    pub fn update(socket: &Path, id: &str, json: &str) -> Result<(), tonic::Status> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path: PathBuf = socket.to_owned();
        rt.block_on(async move {
            let channel = Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut request = tonic::Request::new(UpdateTaskRequest {
                container_id: id.to_owned(),
                resources: Some(Any {
                    // containerd's typeurl of specs.LinuxResources: the value is its JSON.
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .to_owned(),
                    value: json.as_bytes().to_vec(),
                }),
                annotations: HashMap::new(),
            });
            request
                .metadata_mut()
                .insert("containerd-namespace", "default".parse().unwrap());
            let codec = tonic_prost::ProstCodec::<UpdateTaskRequest, ()>::default();
            grpc.unary(
                request,
                PathAndQuery::from_static("/containerd.services.tasks.v1.Tasks/Update"),
                codec,
            )
            .await
            .map(|_| ())
        })
    }
}

/// The memory.max of task `id`'s cgroup, read in the guest by an exec'd process.
fn guest_memory_max(containerd: &Containerd, id: &str, exec_id: &str) -> String {
    // The cgroup2 mount shows the whole hierarchy (a cgroup namespace) or the container's own
    // cgroup (the agent binds it there without one).
    let script = "f=/sys/fs/cgroup$(busybox sed -n 's/^0:://p' /proc/self/cgroup)/memory.max; \
                  [ -e \"$f\" ] || f=/sys/fs/cgroup/memory.max; busybox cat \"$f\"";
    containerd
        .ctr_ok(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
        .trim()
        .to_owned()
}

/// A pseudo-terminal: the master end (non-blocking) and the slave end.
fn open_pty(rows: u16, cols: u16) -> (File, File) {
    let mut master = -1;
    let mut slave = -1;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the pointers are to live locals; openpty writes two fds into them.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&master), libc::F_GETFL);
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        );
    }
    (master, slave)
}

fn set_pty_size(master: &File, rows: u16, cols: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a live local.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(master),
            libc::TIOCSWINSZ,
            &size,
        )
    };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

/// A child killed (and reaped) if the test ends before it exits.
struct KillOnDrop(Child);

impl KillOnDrop {
    /// Its exit status, or `None` when it did not exit within `timeout`.
    fn wait(mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Presses Enter on the terminal until `want` appears in its output (at most 120 s).
fn poke_until(master: &mut File, seen: &mut String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    let mut last_poke = Instant::now() - Duration::from_secs(10);
    while !seen.contains(want) {
        assert!(
            Instant::now() < deadline,
            "{want:?} never appeared on the terminal; output: {seen:?}"
        );
        if last_poke.elapsed() > Duration::from_secs(1) {
            let _ = master.write_all(b"\n");
            last_poke = Instant::now();
        }
        match master.read(&mut buf) {
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("terminal closed before {want:?} appeared ({e}); output: {seen:?}"),
        }
    }
}

#[test]
fn shim_update_and_resize_pty() {
    let containerd = Containerd::start();
    containerd.ctr_ok(&[
        "run",
        "-d",
        // containerd's default spec has no cgroup mount: the container's cgroup at
        // /sys/fs/cgroup, as Docker and the CRI plugin give it.
        "--mount",
        "type=cgroup2,src=cgroup,dst=/sys/fs/cgroup,options=ro",
        "--runtime",
        HUSK_RUNTIME,
        IMAGE,
        "upd",
        "sleep",
        "100000",
    ]);
    containerd.wait_status("upd", "RUNNING");

    // Update: the new memory limit is the guest cgroup's memory.max.
    assert_eq!(guest_memory_max(&containerd, "upd", "m1"), "max");
    tasks_api::update(
        containerd.socket(),
        "upd",
        r#"{"memory":{"limit":67108864}}"#,
    )
    .unwrap_or_else(|e| panic!("Tasks/Update: {e}\ncontainerd log:\n{}", containerd.log()));
    assert_eq!(guest_memory_max(&containerd, "upd", "m2"), "67108864");

    // ResizePty: ctr sends the terminal's size at start and on SIGWINCH (the kernel signals
    // ctr, the terminal's session leader, when the test resizes the terminal).
    let (mut master, slave) = open_pty(30, 100);
    let mut ctr = Command::new("ctr");
    ctr.arg("--address")
        .arg(containerd.socket())
        .args(["task", "exec", "-t", "--exec-id", "tty1", "upd", "sh", "-c"])
        .arg("busybox stty size; while read x; do busybox stty size; done")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: runs between fork and exec; setsid and ioctl are async-signal-safe.
    unsafe {
        ctr.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let ctr = KillOnDrop(ctr.spawn().expect("spawn ctr task exec -t"));
    let mut seen = String::new();
    poke_until(&mut master, &mut seen, "30 100");
    set_pty_size(&master, 40, 120);
    poke_until(&mut master, &mut seen, "40 120");
    // End of file (^D) ends the read loop, the shell and ctr.
    master.write_all(&[4]).unwrap();
    let status = ctr.wait(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "ctr task exec -t: {status:?}; terminal: {seen:?}"
    );

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "upd"]);
    containerd.wait_status("upd", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "upd"]);
    containerd.ctr_ok(&["container", "delete", "upd"]);
    containerd.assert_clean();
}

#[test]
fn shim_oom_kill_publishes_task_oom_and_exits_137() {
    let containerd = Containerd::start();
    let mut events = Command::new("ctr");
    events
        .arg("--address")
        .arg(containerd.socket())
        .arg("events");
    let mut events = Watched::spawn("ctr events", &mut events);

    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "33554432",
        "--runtime",
        HUSK_RUNTIME,
        IMAGE,
        "oom1",
        "sh",
        "-c",
        "a=0123456789abcdef; while :; do a=$a$a; done",
    ]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    events
        .wait_for("/tasks/oom", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("no TaskOOM event: {e}"));
    let oom_line = events
        .output()
        .lines()
        .find(|l| l.contains("/tasks/oom"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(oom_line.contains("oom1"), "TaskOOM event: {oom_line}");
    containerd.assert_clean();
}

#[test]
fn shim_killed_shim_is_cleaned_up_by_the_delete_command() {
    let containerd = Containerd::start();
    let sockets_before = shim_sockets();
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        HUSK_RUNTIME,
        IMAGE,
        "orphan",
        "sleep",
        "100000",
    ]);
    containerd.wait_status("orphan", "RUNNING");
    let shims = containerd.processes(SHIM);
    assert_eq!(shims.len(), 1, "shims: {shims:?}");
    assert_eq!(containerd.processes("husk-vmm").len(), 1);
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 the shim");

    // containerd sees the shim's connection close and runs `containerd-shim-husk-v2 delete`
    // in the bundle: the task is gone or stopped, and can be deleted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = containerd.task_status("orphan");
        if status != "RUNNING" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the task still runs 60 s after its shim was killed\ncontainerd log:\n{}",
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("task after the shim was killed: {status}");
    if status != "absent" {
        let out = containerd.ctr(&["task", "delete", "orphan"]);
        eprintln!("ctr task delete: {}", describe(&out));
    }
    containerd.ctr_ok(&["container", "delete", "orphan"]);
    containerd.assert_nothing_left(&sockets_before);
}

#[test]
fn shim_vmm_dying_while_booting_fails_the_task_with_its_log_and_leaves_nothing() {
    // A "husk-vmm" that says why it stops and exits at once, as a VMM whose guest crashed early
    // in boot would: the task fails with the end of that log (the log itself is removed).
    let dir = TempDir::new("dying-vmm");
    let vmm = dir.path().join("husk-vmm");
    fs::write(
        &vmm,
        "#!/bin/sh\necho 'vcpu0: triple fault (fake husk-vmm)' >&2\nexit 0\n",
    )
    .expect("write the fake husk-vmm");
    fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).expect("chmod");
    let containerd = Containerd::start_with(Options {
        vmm: Some(vmm),
        ..Options::default()
    });
    let sockets_before = shim_sockets();
    let out = containerd.ctr(&["run", "--runtime", HUSK_RUNTIME, IMAGE, "doomed", "true"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("husk-vmm exited (exit status: 0) before the agent answered")
            && stderr.contains("vcpu0: triple fault (fake husk-vmm)"),
        "{}",
        describe(&out)
    );
    assert!(
        containerd.log().contains("husk-vmm exited unexpectedly"),
        "the shim does not log the unexpected exit\ncontainerd log:\n{}",
        containerd.log()
    );
    let _ = containerd.ctr(&["container", "delete", "doomed"]);
    containerd.assert_nothing_left(&sockets_before);
}
