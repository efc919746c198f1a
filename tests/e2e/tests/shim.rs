//! containerd-shim-husk-v2 end to end: Debian's containerd (1.6) started by the test with its own
//! configuration, root, state and socket; a busybox image built here (an OCI image tarball from
//! busybox-static, `ctr image import`); `ctr run --runtime io.containerd.husk.v2` runs it in a
//! microVM. Needs a real KVM: run with `tests/e2e/run shim` (inside the test host).
//!
//! Every test checks that nothing is left behind: no shim, no husk-vmm, no sandbox directory,
//! no mount under the test's directory.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use husk_e2e::{
    guest_initramfs, guest_kernel, require_program, require_real_kvm, TempDir, Watched,
};

const RUNTIME: &str = "io.containerd.husk.v2";
const IMAGE: &str = "docker.io/library/husk-busybox:e2e";
const SHIM: &str = "containerd-shim-husk-v2";
/// Applets linked in the image's /bin.
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "ls", "uname", "hostname", "id", "kill", "ps",
    "test", "mkdir", "touch",
];

/// The directory holding the workspace's binaries (the test binary is in its `deps/`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `blob` into the OCI layout's blobs; returns (digest, size).
fn add_blob(layout: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    let size = fs::metadata(file).unwrap().len();
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(file, dir.join(&digest)).unwrap();
    (format!("sha256:{digest}"), size)
}

/// An OCI image tarball with /bin/busybox (Debian's busybox-static) and applet links.
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image-rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy /bin/busybox");
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    let layer = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success(), "tar of the image layer failed");

    let layout = dir.join("oci");
    fs::create_dir_all(&layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let (layer_digest, layer_size) = add_blob(&layout, &layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_file = dir.join("config.json");
    fs::write(&config_file, serde_json::to_vec(&config).unwrap()).unwrap();
    let (config_digest, config_size) = add_blob(&layout, &config_file);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let manifest_file = dir.join("manifest.json");
    fs::write(&manifest_file, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (manifest_digest, manifest_size) = add_blob(&layout, &manifest_file);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": IMAGE,
                            "org.opencontainers.image.ref.name": "e2e"},
        }],
    });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let tarball = dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .expect("tar");
    assert!(status.success(), "tar of the OCI layout failed");
    tarball
}

/// Lines of /proc/self/mountinfo whose mount point is under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// PIDs of processes whose program (argv[0]'s file name) is `program`.
fn processes_named(program: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = Path::new(std::str::from_utf8(argv0).unwrap_or_default()).file_name();
        if name.is_some_and(|n| n == program) {
            pids.push(pid);
        }
    }
    pids
}

/// A containerd of the test's own, with the husk shim on its PATH and the busybox image.
struct Containerd {
    dir: TempDir,
    socket: PathBuf,
    shim_root: PathBuf,
    console_dir: PathBuf,
    daemon: Option<Watched>,
}

impl Containerd {
    fn start() -> Containerd {
        require_real_kvm();
        require_program("containerd", "containerd");
        require_program("ctr", "containerd");
        assert!(
            Path::new("/bin/busybox").is_file(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let bins = bin_dir();
        for bin in [SHIM, "husk-vmm"] {
            assert!(
                bins.join(bin).is_file(),
                "{} missing: cargo build --workspace",
                bins.join(bin).display()
            );
        }
        let dir = TempDir::new("shim");
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let shim_root = root.join("husk");
        let console_dir = root.join("console");
        let husk_config = root.join("husk.toml");
        fs::write(
            &husk_config,
            format!(
                "[guest]\nkernel = {:?}\ninitramfs = {:?}\n[vmm]\npath = {:?}\n[console]\nlog_dir = {:?}\n",
                guest_kernel(),
                guest_initramfs(),
                bins.join("husk-vmm"),
                console_dir,
            ),
        )
        .unwrap();
        let config = root.join("containerd.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = {:?}
state = {:?}
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = {:?}
[ttrpc]
  address = {:?}
"#,
                root.join("root"),
                root.join("state"),
                socket,
                root.join("containerd.sock.ttrpc"),
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bins.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut daemon = Watched::spawn(
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .arg("--log-level")
                .arg("debug")
                .env("PATH", &path)
                .env("HUSK_CONFIG", &husk_config)
                .env("HUSK_SHIM_ROOT", &shim_root)
                .env("HUSK_LOG", "info"),
        );
        daemon.expect_marker("containerd successfully booted", Duration::from_secs(60));
        let this = Containerd {
            dir,
            socket,
            shim_root,
            console_dir,
            daemon: Some(daemon),
        };
        let tarball = build_image(this.dir.path());
        let out = this.ctr(&["image", "import", tarball.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "ctr image import failed: {}",
            describe(&out)
        );
        let out = this.ctr(&["image", "ls", "-q"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(IMAGE),
            "imported image not listed: {}",
            describe(&out)
        );
        this
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr run --rm --runtime husk IMAGE ID ARGS...`.
    fn run(&self, id: &str, args: &[&str]) -> Output {
        let mut all = vec!["run", "--rm", "--runtime", RUNTIME, IMAGE, id];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// Asserts that no shim, no husk-vmm, no sandbox directory and no console log is left, within
    /// a few seconds (the shim exits after containerd's Shutdown).
    fn assert_clean(&self) {
        let started = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let shims = processes_named(SHIM);
            let vmms = processes_named("husk-vmm");
            let sandboxes: Vec<_> = fs::read_dir(&self.shim_root)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            let consoles: Vec<_> = fs::read_dir(&self.console_dir)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            let mounts = mounts_under(&self.dir.path().join("husk"));
            if shims.is_empty()
                && vmms.is_empty()
                && sandboxes.is_empty()
                && consoles.is_empty()
                && mounts.is_empty()
            {
                eprintln!("clean after {:?}", started.elapsed());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: shims {shims:?}, husk-vmm {vmms:?}, sandboxes {sandboxes:?}, \
                 console logs {consoles:?}, mounts {mounts:?}\ncontainerd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Watched::output)
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.signal(libc::SIGTERM);
            let _ = daemon.wait_exit(Duration::from_secs(20));
        }
        // Whatever a failed test left: shims and VMs killed, mounts detached, so the temporary
        // directory can go.
        for pid in processes_named(SHIM)
            .into_iter()
            .chain(processes_named("husk-vmm"))
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let mut points = mounts_under(self.dir.path());
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = Command::new("umount").args(["-l", &point]).status();
        }
    }
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn shim_ctr_run_prints_output_and_propagates_the_exit_code() {
    let containerd = Containerd::start();

    let started = Instant::now();
    let out = containerd.run("hello", &["echo", "hello"]);
    eprintln!(
        "ctr run echo hello: {:?} in {:?}",
        out.status,
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "ctr run echo failed: {}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        describe(&out)
    );
    containerd.assert_clean();

    let out = containerd.run("exit3", &["sh", "-c", "echo to-stderr >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-stderr"),
        "stderr not relayed: {}",
        describe(&out)
    );
    containerd.assert_clean();
}

/// Runs `ctr ARGS` and asserts it succeeded; returns its stdout.
fn ctr_ok(containerd: &Containerd, args: &[&str]) -> String {
    let started = Instant::now();
    let out = containerd.ctr(args);
    eprintln!("ctr {args:?}: {:?} in {:?}", out.status, started.elapsed());
    assert!(
        out.status.success(),
        "ctr {args:?} failed: {}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status column of `ctr task ls` for task `id`.
fn task_status(containerd: &Containerd, id: &str) -> String {
    let out = ctr_ok(containerd, &["task", "ls"]);
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("absent")
        .to_owned()
}

fn wait_status(containerd: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = task_status(containerd, id);
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {status}, not {want}\ncontainerd log:\n{}",
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn shim_exec_ps_metrics_pause_resume_and_sigterm() {
    let containerd = Containerd::start();
    let script = "trap 'echo got-term; exit 7' TERM; echo started; while true; do sleep 1; done";
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "long",
            "sh",
            "-c",
            script,
        ],
    );
    wait_status(&containerd, "long", "RUNNING");

    // exec: output and exit status of the exec'd process.
    let out = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "long",
        "sh",
        "-c",
        "echo exec-out; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "exec-out\n");

    // ps: the guest PIDs of the container's processes (sh and its sleep at least).
    let ps = ctr_ok(&containerd, &["task", "ps", "long"]);
    assert!(ps.lines().count() >= 2, "ctr task ps: {ps}");

    // metrics: containerd decodes the cgroup v2 metrics.
    let metrics = ctr_ok(&containerd, &["task", "metrics", "long"]);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in ctr task metrics:\n{metrics}"))
    };
    assert!(value("pids.current") >= 2, "{metrics}");
    assert!(value("memory.usage") > 0, "{metrics}");
    assert!(value("cpu.usage_usec") > 0, "{metrics}");

    // pause / resume.
    ctr_ok(&containerd, &["task", "pause", "long"]);
    assert_eq!(task_status(&containerd, "long"), "PAUSED");
    ctr_ok(&containerd, &["task", "resume", "long"]);
    assert_eq!(task_status(&containerd, "long"), "RUNNING");

    // SIGTERM: the trap runs; `ctr task delete` exits with the task's status.
    ctr_ok(&containerd, &["task", "kill", "-s", "SIGTERM", "long"]);
    wait_status(&containerd, "long", "STOPPED");
    // ctr 1.6 reports a non-zero status as a warning (its own status stays 0).
    let out = containerd.ctr(&["task", "delete", "long"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 7"),
        "{}",
        describe(&out)
    );
    ctr_ok(&containerd, &["container", "delete", "long"]);
    containerd.assert_clean();
}

#[test]
fn shim_sigkill_stdin_and_tty() {
    let containerd = Containerd::start();

    // SIGKILL: status 128 + 9.
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "victim",
            "sleep",
            "1000",
        ],
    );
    wait_status(&containerd, "victim", "RUNNING");
    ctr_ok(&containerd, &["task", "kill", "-s", "SIGKILL", "victim"]);
    wait_status(&containerd, "victim", "STOPPED");
    let out = containerd.ctr(&["task", "delete", "victim"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 137"),
        "{}",
        describe(&out)
    );
    ctr_ok(&containerd, &["container", "delete", "victim"]);
    containerd.assert_clean();

    // stdin (ctr 1.6 always attaches its own): piped in, end of file reaches the process.
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&containerd.socket)
        .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, "cat1", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctr run -i");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"piped through stdin\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped through stdin\n"
    );
    containerd.assert_clean();

    // tty: ctr -t needs a terminal of its own; script(1) gives it one.
    let command = format!(
        "ctr --address {} run --rm -t --runtime {RUNTIME} {IMAGE} tty1 sh -c 'test -t 1 && echo is-a-tty'",
        containerd.socket.display()
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (bsdutils)");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is-a-tty"),
        "{}\ncontainerd log:\n{}",
        describe(&out),
        containerd.log()
    );
    containerd.assert_clean();
}

#[test]
fn shim_vmm_killed_reports_the_exit_and_cleans_up() {
    let containerd = Containerd::start();
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "doomed",
            "sleep",
            "1000",
        ],
    );
    wait_status(&containerd, "doomed", "RUNNING");
    let vmms = processes_named("husk-vmm");
    assert_eq!(vmms.len(), 1, "husk-vmm processes: {vmms:?}");
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 husk-vmm");
    wait_status(&containerd, "doomed", "STOPPED");
    let out = containerd.ctr(&["task", "delete", "doomed"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 255"),
        "{}",
        describe(&out)
    );
    ctr_ok(&containerd, &["container", "delete", "doomed"]);
    containerd.assert_clean();
}

/// The guest's boot ID seen from a process exec'd in task `id`.
fn boot_id(containerd: &Containerd, id: &str, exec_id: &str) -> String {
    let out = ctr_ok(
        containerd,
        &[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            id,
            "cat",
            "/proc/sys/kernel/random/boot_id",
        ],
    );
    let boot_id = out.trim().to_owned();
    assert_eq!(boot_id.len(), 36, "boot id {boot_id:?}");
    boot_id
}

#[test]
fn shim_pod_containers_share_one_vm_by_cri_annotations() {
    let containerd = Containerd::start();
    // The CRI plugin's annotations, given by hand: a sandbox, then a container of its pod.
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--runtime",
            RUNTIME,
            IMAGE,
            "pod1",
            "sleep",
            "1000",
        ],
    );
    wait_status(&containerd, "pod1", "RUNNING");
    ctr_ok(
        &containerd,
        &[
            "run",
            "-d",
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
            "io.kubernetes.cri.sandbox-id=pod1",
            "--runtime",
            RUNTIME,
            IMAGE,
            "app1",
            "sleep",
            "1000",
        ],
    );
    wait_status(&containerd, "app1", "RUNNING");
    assert_eq!(
        processes_named("husk-vmm").len(),
        1,
        "one VM for the pod\ncontainerd log:\n{}",
        containerd.log()
    );
    assert_eq!(
        processes_named(SHIM).len(),
        1,
        "one shim for the pod\ncontainerd log:\n{}",
        containerd.log()
    );
    assert_eq!(
        boot_id(&containerd, "pod1", "b1"),
        boot_id(&containerd, "app1", "b2")
    );

    // The pod's container goes first; the VM stays for the sandbox.
    ctr_ok(&containerd, &["task", "kill", "-s", "SIGKILL", "app1"]);
    wait_status(&containerd, "app1", "STOPPED");
    ctr_ok(&containerd, &["task", "delete", "app1"]);
    ctr_ok(&containerd, &["container", "delete", "app1"]);
    assert_eq!(processes_named("husk-vmm").len(), 1, "the pod's VM stays");
    boot_id(&containerd, "pod1", "b3");

    ctr_ok(&containerd, &["task", "kill", "-s", "SIGKILL", "pod1"]);
    wait_status(&containerd, "pod1", "STOPPED");
    ctr_ok(&containerd, &["task", "delete", "pod1"]);
    ctr_ok(&containerd, &["container", "delete", "pod1"]);
    containerd.assert_clean();
}
