//! containerd-shim-husk-v2 end to end: Debian's containerd (1.6) started by the test with its own
//! configuration, root, state and socket; a busybox image built here (an OCI image tarball from
//! busybox-static, `ctr image import`); `ctr run --runtime io.containerd.husk.v2` runs it in a
//! microVM. Needs a real KVM: run with `tests/e2e/run shim` (inside the test host).
//!
//! The basic paths (`ctr run` output and exit status, a pod grouped by the CRI annotations) also
//! run on containerd 2.x (Debian sid's, unpacked by `tests/e2e/run`): one body per test, taking
//! the [`Line`], and a `..._on_containerd_1_6` and `..._on_containerd_2` test for it.
//!
//! Every test checks that nothing is left behind: no shim, no husk-vmm, no sandbox directory,
//! no mount under the test's directory.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::process::Command;
use std::time::Instant;

use husk_e2e::containerd::{describe, Containerd, Line, HUSK_RUNTIME as RUNTIME, IMAGE, SHIM};
use husk_vmm_config::{Parser, VmmConfig};

#[test]
fn shim_ctr_run_prints_output_and_propagates_the_exit_code_on_containerd_1_6() {
    ctr_run_prints_output_and_propagates_the_exit_code(Line::V1_6);
}

#[test]
fn shim_ctr_run_prints_output_and_propagates_the_exit_code_on_containerd_2() {
    ctr_run_prints_output_and_propagates_the_exit_code(Line::V2);
}

fn ctr_run_prints_output_and_propagates_the_exit_code(line: Line) {
    let containerd = Containerd::start_on(line);

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

#[test]
fn shim_exec_ps_metrics_pause_resume_and_sigterm() {
    let containerd = Containerd::start();
    let script = "trap 'echo got-term; exit 7' TERM; echo started; while true; do sleep 1; done";
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "long",
        "sh",
        "-c",
        script,
    ]);
    containerd.wait_status("long", "RUNNING");

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
    let ps = containerd.ctr_ok(&["task", "ps", "long"]);
    assert!(ps.lines().count() >= 2, "ctr task ps: {ps}");

    // metrics: containerd decodes the cgroup v2 metrics.
    let metrics = containerd.ctr_ok(&["task", "metrics", "long"]);
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
    containerd.ctr_ok(&["task", "pause", "long"]);
    assert_eq!(containerd.task_status("long"), "PAUSED");
    containerd.ctr_ok(&["task", "resume", "long"]);
    assert_eq!(containerd.task_status("long"), "RUNNING");

    // SIGTERM: the trap runs; `ctr task delete` exits with the task's status.
    containerd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "long"]);
    containerd.wait_status("long", "STOPPED");
    // ctr 1.6 reports a non-zero status as a warning (its own status stays 0).
    let out = containerd.ctr(&["task", "delete", "long"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 7"),
        "{}",
        describe(&out)
    );
    containerd.ctr_ok(&["container", "delete", "long"]);
    containerd.assert_clean();
}

#[test]
fn shim_sigkill_stdin_and_tty() {
    let containerd = Containerd::start();

    // SIGKILL: status 128 + 9.
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "victim",
        "sleep",
        "1000",
    ]);
    containerd.wait_status("victim", "RUNNING");
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "victim"]);
    containerd.wait_status("victim", "STOPPED");
    let out = containerd.ctr(&["task", "delete", "victim"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 137"),
        "{}",
        describe(&out)
    );
    containerd.ctr_ok(&["container", "delete", "victim"]);
    containerd.assert_clean();

    // stdin (ctr 1.6 always attaches its own): piped in, end of file reaches the process.
    let mut child = Command::new(containerd.ctr_program())
        .arg("--address")
        .arg(containerd.socket())
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
        "{} --address {} run --rm -t --runtime {RUNTIME} {IMAGE} tty1 sh -c 'test -t 1 && echo is-a-tty'",
        containerd.ctr_program().display(),
        containerd.socket().display()
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
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "doomed",
        "sleep",
        "1000",
    ]);
    containerd.wait_status("doomed", "RUNNING");
    let vmms = containerd.processes("husk-vmm");
    assert_eq!(vmms.len(), 1, "husk-vmm processes: {vmms:?}");
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(vmms[0] as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill -9 husk-vmm");
    containerd.wait_status("doomed", "STOPPED");
    let out = containerd.ctr(&["task", "delete", "doomed"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 255"),
        "{}",
        describe(&out)
    );
    containerd.ctr_ok(&["container", "delete", "doomed"]);
    containerd.assert_clean();
}

/// The guest's boot ID seen from a process exec'd in task `id`.
fn boot_id(containerd: &Containerd, id: &str, exec_id: &str) -> String {
    let out = containerd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        id,
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    let boot_id = out.trim().to_owned();
    assert_eq!(boot_id.len(), 36, "boot id {boot_id:?}");
    boot_id
}

#[test]
fn shim_pod_containers_share_one_vm_by_cri_annotations_on_containerd_1_6() {
    pod_containers_share_one_vm_by_cri_annotations(Line::V1_6);
}

#[test]
fn shim_pod_containers_share_one_vm_by_cri_annotations_on_containerd_2() {
    pod_containers_share_one_vm_by_cri_annotations(Line::V2);
}

fn pod_containers_share_one_vm_by_cri_annotations(line: Line) {
    let containerd = Containerd::start_on(line);
    // The CRI plugin's annotations, given by hand: a sandbox, then a container of its pod. The
    // sandbox carries the pod's resources as containerd 1.7+ does (2 CPUs, 384 MiB), which size
    // the VM (the defaults would be 1 vCPU and 256 MiB).
    // The pod's cgroup, as kubelet's parent and containerd's CRI plugin would name it.
    let cgroup = format!("/husk-e2e-pods-{line:?}-{}/pod1", std::process::id());
    containerd.ctr_ok(&[
        "run",
        "-d",
        "--cgroup",
        &cgroup,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        "--annotation",
        "io.kubernetes.cri.sandbox-cpu-quota=200000",
        "--annotation",
        "io.kubernetes.cri.sandbox-cpu-period=100000",
        "--annotation",
        "io.kubernetes.cri.sandbox-memory=402653184",
        "--runtime",
        RUNTIME,
        IMAGE,
        "pod1",
        "sleep",
        "1000",
    ]);
    containerd.wait_status("pod1", "RUNNING");
    containerd.ctr_ok(&[
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
    ]);
    containerd.wait_status("app1", "RUNNING");
    assert_eq!(
        containerd.processes("husk-vmm").len(),
        1,
        "one VM for the pod\ncontainerd log:\n{}",
        containerd.log()
    );
    assert_eq!(
        containerd.processes(SHIM).len(),
        1,
        "one shim for the pod\ncontainerd log:\n{}",
        containerd.log()
    );
    assert_eq!(
        boot_id(&containerd, "pod1", "b1"),
        boot_id(&containerd, "app1", "b2")
    );

    // The VM's size: 2 vCPUs and the pod's 384 MiB plus the default 64 MiB overhead.
    let vmm = containerd.processes("husk-vmm");
    let problems = husk_e2e::vmm_jail_problems(vmm[0]);
    assert!(problems.is_empty(), "husk-vmm's jail: {problems:?}");
    // The VM runs in the pod sandbox's cgroup, limited to its size and the pod's 2 CPUs.
    let problems = husk_e2e::vmm_cgroup_problems(vmm[0], &cgroup, Some("200000 100000"));
    assert!(problems.is_empty(), "husk-vmm's cgroup: {problems:?}");
    let cmdline = fs::read(format!("/proc/{}/cmdline", vmm[0])).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // husk-vmm's own definition of its command line reads what the shim gave it.
    let config = VmmConfig::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("husk-vmm {args:?} does not parse: {e}"));
    assert_eq!(config.vcpus, 2, "husk-vmm {args:?}");
    assert_eq!(config.memory_mib, 448, "husk-vmm {args:?}");
    let guest = containerd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "size",
        "app1",
        "sh",
        "-c",
        // The image has no grep: count and pick with the shell.
        "n=0; while read -r k _; do [ \"$k\" = processor ] && n=$((n+1)); done </proc/cpuinfo; \
         echo $n; while read -r k v _; do [ \"$k\" = MemTotal: ] && echo \"$k $v\"; done </proc/meminfo; true",
    ]);
    let mut lines = guest.lines();
    assert_eq!(lines.next(), Some("2"), "guest: {guest}");
    let mem_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {guest:?}"));
    assert!(
        (384 * 1024..=448 * 1024).contains(&mem_kib),
        "the guest sees {mem_kib} KiB"
    );

    // The pod's container goes first; the VM stays for the sandbox.
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "app1"]);
    containerd.wait_status("app1", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "app1"]);
    containerd.ctr_ok(&["container", "delete", "app1"]);
    assert_eq!(
        containerd.processes("husk-vmm").len(),
        1,
        "the pod's VM stays"
    );
    boot_id(&containerd, "pod1", "b3");

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    containerd.wait_status("pod1", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "pod1"]);
    containerd.ctr_ok(&["container", "delete", "pod1"]);
    containerd.assert_clean();
    // The shim removes the sandbox's cgroup with its VM; its parent (kubelet's pod cgroup in a
    // cluster) is not the shim's.
    let dir = std::path::Path::new("/sys/fs/cgroup").join(cgroup.trim_start_matches('/'));
    assert!(!dir.exists(), "{} is left behind", dir.display());
    if let Some(parent) = dir.parent() {
        fs::remove_dir(parent).unwrap_or_else(|e| panic!("{}: {e}", parent.display()));
    }
}
