//! husk through containerd's real CRI plugin: Debian's containerd (1.6) started by the test with
//! the CRI plugin on and runtime handler `husk` (io.containerd.husk.v2), driven by a CRI v1
//! client (husk_e2e::cri), as kubelet would. Images are imported locally (the sandbox image is
//! a busybox `sleep`); no registry, no network: CNI is not configured, so every pod uses the
//! node's network namespace (hostNetwork; the guest has no network device yet). Needs a real
//! KVM: run with `tests/e2e/run cri` (inside the test host).
//!
//! Every test checks that nothing is left once the pods are removed: no shim, no husk-vmm, no
//! shim socket, no mount, no sandbox, task or CRI directory.
//!
//! The pod of two containers also runs on containerd 2.x (Debian sid's, unpacked by
//! `tests/e2e/run`; configured with a `version = 3` file), where it also checks what the CRI
//! plugin and containerd's introspection say about husk's features.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_e2e::containerd::{
    describe, shim_sockets, Containerd, Line, Options, HUSK_HANDLER, HUSK_RUNTIME, IMAGE, SHIM,
};
use husk_e2e::cri::{self, api, Cri};

/// A containerd with the CRI plugin, a client, and the shim sockets that existed before.
struct Setup {
    containerd: Containerd,
    cri: Cri,
    sockets_before: Vec<PathBuf>,
}

impl Setup {
    /// containerd 1.6.
    fn new() -> Setup {
        Setup::on(Line::V1_6)
    }

    fn on(line: Line) -> Setup {
        let sockets_before = shim_sockets();
        let containerd = Containerd::start_with(Options {
            cri: true,
            line,
            ..Options::default()
        });
        let cri = Cri::connect(containerd.socket());
        let version = cri.version().expect("CRI Version");
        eprintln!(
            "CRI: {} {} (CRI {})",
            version.runtime_name, version.runtime_version, version.runtime_api_version
        );
        // The CRI plugin learns about imported images from containerd's events.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cri.image_status(IMAGE).expect("ImageStatus").is_none() {
            assert!(
                Instant::now() < deadline,
                "the CRI plugin does not see {IMAGE}\ncontainerd log:\n{}",
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Setup {
            containerd,
            cri,
            sockets_before,
        }
    }

    /// Panics with `what`, the CRI error and containerd's log.
    fn fail(&self, what: &str, err: &cri::CriError) -> ! {
        panic!(
            "{what}: {} ({:?})\ncontainerd log:\n{}",
            err.message(),
            err.code(),
            self.containerd.log()
        )
    }

    /// RunPodSandbox with handler `husk`; returns the pod ID.
    fn run_pod(&self, pod: &api::PodSandboxConfig) -> String {
        let started = Instant::now();
        let id = self
            .cri
            .run_pod_sandbox(pod, HUSK_HANDLER)
            .unwrap_or_else(|e| self.fail("RunPodSandbox", &e));
        eprintln!("RunPodSandbox {id}: {:?}", started.elapsed());
        id
    }

    /// CreateContainer + StartContainer; returns the container ID.
    fn start_container(
        &self,
        pod_id: &str,
        pod: &api::PodSandboxConfig,
        config: &api::ContainerConfig,
    ) -> String {
        let started = Instant::now();
        let id = self
            .cri
            .create_container(pod_id, config, pod)
            .unwrap_or_else(|e| self.fail("CreateContainer", &e));
        self.cri
            .start_container(&id)
            .unwrap_or_else(|e| self.fail("StartContainer", &e));
        eprintln!("container {id} started in {:?}", started.elapsed());
        id
    }

    /// ExecSync of `cmd` in `id`: (exit code, stdout, stderr).
    fn exec(&self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let out = self
            .cri
            .exec_sync(id, cmd, 60)
            .unwrap_or_else(|e| self.fail(&format!("ExecSync {cmd:?}"), &e));
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The guest kernel's boot ID seen from container `id`.
    fn boot_id(&self, id: &str) -> String {
        let (code, out, err) = self.exec(id, &["cat", "/proc/sys/kernel/random/boot_id"]);
        assert_eq!(code, 0, "cat boot_id: {err}");
        let boot_id = out.trim().to_owned();
        assert_eq!(boot_id.len(), 36, "boot id {boot_id:?}");
        boot_id
    }

    /// Waits (at most 60 s) until container `id` is in `want`.
    fn wait_container_state(&self, id: &str, want: api::ContainerState) -> api::ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self
                .cri
                .container_status(id)
                .unwrap_or_else(|e| self.fail("ContainerStatus", &e));
            if status.state == want as i32 {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} is in state {}, not {want:?}\ncontainerd log:\n{}",
                status.state,
                self.containerd.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// StopPodSandbox + RemovePodSandbox, then no pod or container is listed.
    fn stop_and_remove(&self, pod_id: &str) {
        let started = Instant::now();
        self.cri
            .stop_pod_sandbox(pod_id)
            .unwrap_or_else(|e| self.fail("StopPodSandbox", &e));
        let stopped = started.elapsed();
        self.cri
            .remove_pod_sandbox(pod_id)
            .unwrap_or_else(|e| self.fail("RemovePodSandbox", &e));
        eprintln!(
            "StopPodSandbox {pod_id}: {stopped:?}, RemovePodSandbox: {:?}",
            started.elapsed() - stopped
        );
        let pods = self.cri.list_pod_sandboxes().expect("ListPodSandbox");
        assert!(
            pods.iter().all(|p| p.id != pod_id),
            "pod still listed: {pods:?}"
        );
        let containers = self.cri.list_containers().expect("ListContainers");
        assert!(
            containers.iter().all(|c| c.pod_sandbox_id != pod_id),
            "containers of the pod still listed: {containers:?}"
        );
    }

    fn assert_nothing_left(&self) {
        self.containerd.assert_nothing_left(&self.sockets_before);
    }
}

#[test]
fn cri_pod_with_two_containers_sharing_one_vm_logs_exec_stats_stop_remove_on_containerd_1_6() {
    pod_with_two_containers_sharing_one_vm(Line::V1_6);
}

#[test]
fn cri_pod_with_two_containers_sharing_one_vm_logs_exec_stats_stop_remove_on_containerd_2() {
    pod_with_two_containers_sharing_one_vm(Line::V2);
}

/// What containerd 2.x's CRI plugin says about the `husk` handler (CRI `Status`), and what
/// containerd's runtime introspection (`ctr plugins inspect-runtime`, which runs
/// `containerd-shim-husk-v2 -info`) reports: husk's OCI features document lists neither the
/// `rro` mount option nor id-mapped mounts, so neither recursive read-only mounts nor user
/// namespaces may be advertised.
fn assert_husk_features_on_containerd_2(setup: &Setup) {
    let status = setup
        .cri
        .status()
        .unwrap_or_else(|e| setup.fail("Status", &e));
    eprintln!("CRI Status runtime handlers: {:?}", status.runtime_handlers);
    let husk = status
        .runtime_handlers
        .iter()
        .find(|h| h.name == HUSK_HANDLER)
        .unwrap_or_else(|| panic!("no {HUSK_HANDLER} runtime handler in CRI Status: {status:?}"));
    // containerd 2.1 introspects runc-type runtimes only (later releases every runtime): there
    // the handler has no features at all, which kubelet reads as both false.
    let advertised = husk.features.as_ref().map_or((false, false), |f| {
        (f.recursive_read_only_mounts, f.user_namespaces)
    });
    assert_eq!(
        advertised,
        (false, false),
        "the CRI plugin advertises (recursive read-only mounts, user namespaces) for husk: {husk:?}"
    );
    // The CRI plugin's introspection of husk may only have been refused by containerd 2.1's
    // runc-only rule, never failed on the shim's answer.
    let log = setup.containerd.log();
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("failed to introspect") && l.contains(HUSK_HANDLER))
        // (in containerd's log the quotes are escaped: match the words only).
        .filter(|l| !l.contains("features needs the runtime type to be"))
        .collect();
    assert!(
        failures.is_empty(),
        "containerd failed to introspect the husk runtime:\n{}",
        failures.join("\n")
    );

    // containerd's own introspection of the shim: `containerd-shim-husk-v2 -info`.
    let out = setup
        .containerd
        .ctr(&["plugins", "inspect-runtime", "--runtime", HUSK_RUNTIME]);
    assert!(
        out.status.success(),
        "ctr plugins inspect-runtime --runtime {HUSK_RUNTIME} (the shim's -info) failed: {}",
        describe(&out)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect-runtime printed no JSON ({e}): {}", describe(&out)));
    eprintln!("ctr plugins inspect-runtime: {info}");
    let features = &info["Features"];
    assert!(
        features.is_object(),
        "no OCI features document in the shim's -info answer: {info}"
    );
    let mount_options = features["mountOptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !mount_options.iter().any(|o| o == "rro"),
        "husk's features list the rro mount option: {features}"
    );
    assert_ne!(
        features["linux"]["mountExtensions"]["idmap"]["enabled"],
        serde_json::Value::Bool(true),
        "husk's features list id-mapped mounts: {features}"
    );
}

/// RunPodSandbox; two containers in it sharing one VM and an emptyDir, one with a read-only
/// root; their logs, ExecSync, ContainerStats; Stop and Remove; nothing left.
fn pod_with_two_containers_sharing_one_vm(line: Line) {
    let setup = Setup::on(line);
    if line == Line::V2 {
        assert_husk_features_on_containerd_2(&setup);
    }
    let mut pod = cri::pod_config("pod1", "uid-pod1");
    // The pod's cgroup parent, as kubelet (cgroupfs driver) gives it; containerd names the
    // sandbox's cgroup `<parent>/<pod id>` in its spec.
    let cgroup_parent = format!(
        "/husk-e2e-kubepods-{line:?}-{}/poduid-pod1",
        std::process::id()
    );
    if let Some(linux) = pod.linux.as_mut() {
        linux.cgroup_parent = cgroup_parent.clone();
    }
    // The pod's log directory, as kubelet makes it.
    let logs = setup.containerd.dir().join("pod-logs");
    fs::create_dir(&logs).unwrap();
    pod.log_directory = logs.to_string_lossy().into_owned();
    let pod_id = setup.run_pod(&pod);
    let status = setup
        .cri
        .pod_sandbox_status(&pod_id)
        .unwrap_or_else(|e| setup.fail("PodSandboxStatus", &e));
    assert_eq!(status.state, api::PodSandboxState::SandboxReady as i32);

    // An emptyDir-style volume: one host directory mounted into both containers.
    let volume = setup.containerd.dir().join("volume");
    fs::create_dir(&volume).unwrap();
    let mut containers = Vec::new();
    for name in ["first", "second"] {
        let script = format!("echo {name}-to-stdout; echo {name}-to-stderr >&2; exec sleep 100000");
        let mut config = cri::container_config(name, IMAGE, &["sh", "-c", &script]);
        config.log_path = format!("{name}.log");
        config.mounts.push(cri::bind_mount(&volume, "/shared"));
        if name == "second" {
            // A read-only root file system (its mount point /shared is made all the same).
            let linux = config.linux.get_or_insert_with(Default::default);
            linux
                .security_context
                .get_or_insert_with(Default::default)
                .readonly_rootfs = true;
        }
        containers.push(setup.start_container(&pod_id, &pod, &config));
    }
    let (first, second) = (&containers[0], &containers[1]);
    for id in [first, second] {
        setup.wait_container_state(id, api::ContainerState::ContainerRunning);
    }

    // One VM for the pod: one shim, one husk-vmm, the same guest kernel in both containers
    // (not the host's).
    assert_eq!(
        setup.containerd.processes("husk-vmm").len(),
        1,
        "one VM for the pod"
    );
    assert_eq!(
        setup.containerd.processes(SHIM).len(),
        1,
        "one shim for the pod"
    );
    // The VM runs in the pod sandbox's cgroup, limited to its size (the pod sets no CPU quota).
    let vmm = setup.containerd.processes("husk-vmm")[0];
    let sandbox_cgroup = format!("{cgroup_parent}/{pod_id}");
    let problems = husk_e2e::vmm_cgroup_problems(vmm, &sandbox_cgroup, None);
    assert!(problems.is_empty(), "husk-vmm's cgroup: {problems:?}");
    // Where this containerd line keeps what the nothing-left check looks at: the shim's socket
    // in /run/containerd/s, the CRI plugin's sandbox and container directories.
    let sockets: Vec<_> = shim_sockets()
        .into_iter()
        .filter(|s| !setup.sockets_before.contains(s))
        .collect();
    let cri_dirs = setup.containerd.cri_directories();
    eprintln!("while the pod runs: shim sockets {sockets:?}, CRI directories {cri_dirs:?}");
    assert!(
        !sockets.is_empty(),
        "no shim socket in /run/containerd/s while the pod runs"
    );
    assert!(
        cri_dirs.iter().any(|d| d.ends_with(&pod_id)),
        "no CRI directory of the pod while it runs: {cri_dirs:?}"
    );

    // Logs: the CRI plugin writes each container's stdout and stderr into its log file, in the
    // CRI format ("<time> <stream> F <line>").
    for name in ["first", "second"] {
        let file = logs.join(format!("{name}.log"));
        let want = [
            format!(" stdout F {name}-to-stdout"),
            format!(" stderr F {name}-to-stderr"),
        ];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&file).unwrap_or_default();
            if want
                .iter()
                .all(|w| text.lines().any(|l| l.ends_with(w.as_str())))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} does not hold {want:?}: {text:?}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let boot_id = setup.boot_id(first);
    assert_eq!(boot_id, setup.boot_id(second), "both containers in one VM");
    let host_boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(
        boot_id,
        host_boot_id.trim(),
        "the containers run in a guest"
    );

    // Each sees what the other wrote in the shared volume, and so does the host.
    let (code, _, err) = setup.exec(first, &["sh", "-c", "echo from-first > /shared/a"]);
    assert_eq!(code, 0, "write /shared/a: {err}");
    let (code, out, err) = setup.exec(second, &["cat", "/shared/a"]);
    assert_eq!((code, out.as_str()), (0, "from-first\n"), "{err}");
    let (code, _, err) = setup.exec(second, &["sh", "-c", "echo from-second > /shared/b"]);
    assert_eq!(code, 0, "write /shared/b: {err}");
    let (code, out, err) = setup.exec(first, &["cat", "/shared/b"]);
    assert_eq!((code, out.as_str()), (0, "from-second\n"), "{err}");
    let (code, _, err) = setup.exec(second, &["touch", "/in-root"]);
    assert_ne!(code, 0, "the second container's root is read-only");
    assert!(
        err.contains("Read-only file system"),
        "touch /in-root: {err}"
    );
    let (code, _, err) = setup.exec(first, &["touch", "/in-root"]);
    assert_eq!(code, 0, "the first container's root is writable: {err}");
    assert_eq!(
        fs::read_to_string(volume.join("a")).unwrap(),
        "from-first\n"
    );
    assert_eq!(
        fs::read_to_string(volume.join("b")).unwrap(),
        "from-second\n"
    );

    // ExecSync: stdout, stderr and the exit code apart.
    let (code, out, err) = setup.exec(first, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((code, out.as_str(), err.as_str()), (3, "out\n", "err\n"));

    // ContainerStats: the guest cgroup's numbers, decoded by the CRI plugin.
    let (code, _, err) = setup.exec(
        first,
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        ],
    );
    assert_eq!(code, 0, "busy loop: {err}");
    let stats = setup
        .cri
        .container_stats(first)
        .unwrap_or_else(|e| setup.fail("ContainerStats", &e));
    eprintln!("ContainerStats: {stats:?}");
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value)
        .expect("cpu.usage_core_nano_seconds");
    let memory = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map(|v| v.value)
        .expect("memory.working_set_bytes");
    // No memory limit: containerd reports nothing available rather than a wrapped-around
    // difference.
    let available = stats
        .memory
        .as_ref()
        .and_then(|m| m.available_bytes.as_ref())
        .map_or(0, |v| v.value);
    assert_eq!(available, 0, "available bytes without a limit");
    assert!(cpu > 0, "CPU usage {cpu}");
    assert!(memory > 0, "memory working set {memory}");
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(first.as_str())
    );

    setup.stop_and_remove(&pod_id);
    setup.assert_nothing_left();
    // The sandbox's cgroup goes with its VM; the pod's (kubelet's) is left to its owner.
    let dir = Path::new("/sys/fs/cgroup").join(sandbox_cgroup.trim_start_matches('/'));
    assert!(!dir.exists(), "{} is left behind", dir.display());
    let kubepods = Path::new("/sys/fs/cgroup").join(cgroup_parent.trim_start_matches('/'));
    for dir in kubepods.ancestors().take(2) {
        fs::remove_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    // The volume is the host's: it stays, with what the containers wrote.
    assert!(volume.join("a").is_file());
}

#[test]
fn cri_vmm_killed_containers_exit_and_the_pod_is_removed() {
    let setup = Setup::new();
    let pod = cri::pod_config("doomed", "uid-doomed");
    let pod_id = setup.run_pod(&pod);
    let config = cri::container_config("app", IMAGE, &["sleep", "100000"]);
    let id = setup.start_container(&pod_id, &pod, &config);
    setup.wait_container_state(&id, api::ContainerState::ContainerRunning);

    let vmms = setup.containerd.processes("husk-vmm");
    assert_eq!(vmms.len(), 1, "husk-vmm processes: {vmms:?}");
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 husk-vmm");

    let status = setup.wait_container_state(&id, api::ContainerState::ContainerExited);
    eprintln!(
        "after kill -9: exit code {}, reason {:?}",
        status.exit_code, status.reason
    );
    assert_ne!(
        status.exit_code, 0,
        "a container whose VM died did not succeed"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod_status = setup
            .cri
            .pod_sandbox_status(&pod_id)
            .unwrap_or_else(|e| setup.fail("PodSandboxStatus", &e));
        if pod_status.state == api::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pod stays ready after its VM died\ncontainerd log:\n{}",
            setup.containerd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    setup.stop_and_remove(&pod_id);
    setup.assert_nothing_left();
}

/// How the shim reports a VM that stopped before its agent answered (host/sandbox/src/vm.rs).
const VM_DIED_BOOTING: &str = "husk-vmm exited (exit status: 0) before the agent answered";
/// husk-vmm's warning for the test host's nested-SVM fault (host/vmm/src/vcpu.rs).
const TRIPLE_FAULT: &str = "triple fault; ";

#[test]
fn cri_ten_pods_in_a_row_leave_nothing_behind() {
    let setup = Setup::new();
    let started = Instant::now();
    let mut boot_retries = 0;
    for i in 0..10 {
        let round = Instant::now();
        let pod = cri::pod_config(&format!("loop{i}"), &format!("uid-loop{i}"));
        let pod_id = match setup.cri.run_pod_sandbox(&pod, HUSK_HANDLER) {
            Ok(id) => id,
            // As kubelet would, a pod whose VM died while booting is created again, once per pod
            // and at most twice in the loop: the test host's nested SVM sometimes crashes a guest
            // early in boot (tests/testhost/README.md). The failed attempt must leave nothing.
            Err(e)
                if e.message().contains(VM_DIED_BOOTING)
                    && e.message().contains(TRIPLE_FAULT)
                    && boot_retries < 2 =>
            {
                boot_retries += 1;
                eprintln!(
                    "pod {i}: RETRYING RunPodSandbox once: its VM died while booting: {}",
                    e.message()
                );
                setup.assert_nothing_left();
                setup.run_pod(&pod)
            }
            Err(e) => setup.fail("RunPodSandbox", &e),
        };
        let config = cri::container_config("app", IMAGE, &["sleep", "100000"]);
        let id = setup.start_container(&pod_id, &pod, &config);
        let (code, out, err) = setup.exec(&id, &["echo", "alive"]);
        assert_eq!((code, out.as_str()), (0, "alive\n"), "{err}");
        setup.stop_and_remove(&pod_id);
        setup.assert_nothing_left();
        eprintln!("pod {i}: {:?}", round.elapsed());
    }
    eprintln!(
        "10 pods: {:?} ({boot_retries} created again after their VM died while booting)",
        started.elapsed()
    );
}
