//! Runs the built `husk` binary against temporary roots, bundles and configuration files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use husk_runtime::id::ContainerId;
use husk_runtime::store::{self, Record, Store, RECORD_VERSION};
use oci_spec::runtime::{ContainerState, StateBuilder};
use tempfile::TempDir;

/// Exit statuses (kept literal here so a change in `husk_runtime::exit` shows up as a failure).
const USAGE: i32 = 2;
const CONFIG: i32 = 3;
const NOT_FOUND: i32 = 4;
const HOST_NOT_READY: i32 = 6;
const ALREADY_EXISTS: i32 = 7;

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

fn husk(root: &Path, args: &[&str]) -> Run {
    let output: Output = Command::new(env!("CARGO_BIN_EXE_husk"))
        .arg("--root")
        .arg(root)
        // Never read the host's /etc/husk/config.toml in tests.
        .arg("--config")
        .arg(root.with_extension("toml"))
        .args(args)
        .output()
        .unwrap();
    Run {
        status: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// A temporary directory with `root` (the state root, absent) and `root.toml` (an empty
/// configuration file, so built-in defaults apply).
fn sandbox() -> (TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::write(root.with_extension("toml"), "").unwrap();
    (dir, root)
}

fn save_record(root: &Path, id: &str, status: ContainerState, pid: i32) {
    let store = Store::new(root);
    let lock = store.create(&ContainerId::new(id).unwrap()).unwrap();
    let oci = StateBuilder::default()
        .version(oci_spec::runtime::VERSION)
        .id(id)
        .status(status)
        .pid(pid)
        .bundle("/bundles/b")
        .build()
        .unwrap();
    lock.save(&Record {
        version: RECORD_VERSION,
        oci,
        created: store::now_rfc3339(),
        rootfs: "/bundles/b/rootfs".into(),
        pid_start_time: store::process_start_time(pid),
        paused: false,
    })
    .unwrap();
}

/// A minimal x86_64 ELF whose one PT_NOTE segment holds a "Xen" note of type `note_type`
/// (18 is XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry husk-vmm needs).
fn pvh_elf(note_type: u32) -> Vec<u8> {
    let mut note = Vec::new();
    for word in [4u32, 4, note_type] {
        note.extend_from_slice(&word.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0\0\0\0\x01");
    let mut elf = vec![0u8; 120];
    elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    elf[64..68].copy_from_slice(&4u32.to_le_bytes());
    elf[72..80].copy_from_slice(&120u64.to_le_bytes());
    elf[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes());
    elf.extend_from_slice(&note);
    elf
}

fn my_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap()
}

#[test]
fn bad_ids_are_rejected_before_touching_the_root() {
    let (_dir, root) = sandbox();
    for id in ["../x", "", ".", "..", "a/b", "a b", &"x".repeat(256)] {
        let run = husk(&root, &["state", id]);
        assert_eq!(run.status, USAGE, "{id:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("invalid container ID"),
            "{id:?}: {}",
            run.stderr
        );
    }
    assert!(!root.exists(), "a rejected ID must leave nothing behind");
}

#[test]
fn unknown_log_format_is_a_usage_error() {
    let (_dir, root) = sandbox();
    let run = husk(&root, &["--log-format", "xml", "list"]);
    assert_eq!(run.status, USAGE);
    assert!(run.stderr.contains("'xml'"), "{}", run.stderr);
    assert!(run.stderr.contains("--log-format"), "{}", run.stderr);
    assert!(run.stderr.contains("text, json"), "{}", run.stderr);
}

#[test]
fn unknown_container_does_not_exist() {
    let (_dir, root) = sandbox();
    let run = husk(&root, &["state", "ghost"]);
    assert_eq!(run.status, NOT_FOUND);
    assert!(
        run.stderr.contains("container ghost does not exist"),
        "{}",
        run.stderr
    );
}

#[test]
fn json_log_lines_go_to_the_log_file() {
    let (dir, root) = sandbox();
    let log = dir.path().join("husk.log");
    let log_arg = log.to_str().unwrap();
    let run = husk(
        &root,
        &[
            "--log",
            log_arg,
            "--log-format",
            "json",
            "--debug",
            "state",
            "ghost",
        ],
    );
    assert_eq!(run.status, NOT_FOUND);
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert!(line["level"].is_string(), "{line}");
        assert!(line["msg"].is_string(), "{line}");
        assert!(line["time"].as_str().unwrap().ends_with('Z'), "{line}");
    }
    assert_eq!(lines[0]["level"], "debug");
    let error = lines.last().unwrap();
    assert_eq!(error["level"], "error");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("container ghost does not exist"),
        "{error}"
    );
}

#[test]
fn text_log_lines_look_like_logrus() {
    let (dir, root) = sandbox();
    let log = dir.path().join("husk.log");
    let run = husk(&root, &["--log", log.to_str().unwrap(), "state", "ghost"]);
    assert_eq!(run.status, NOT_FOUND);
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.starts_with("time=\""), "{text}");
    assert!(
        text.contains(" level=error msg=\"container ghost does not exist\""),
        "{text}"
    );
}

#[test]
fn spec_writes_a_config_that_parses_and_refuses_to_overwrite() {
    let (dir, root) = sandbox();
    let bundle = dir.path().join("bundle");
    fs::create_dir(&bundle).unwrap();
    let run = husk(&root, &["spec", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let config = bundle.join("config.json");
    let bytes = fs::read(&config).unwrap();
    let spec = husk_runtime::bundle::parse_spec(&config, &bytes).unwrap();
    husk_runtime::bundle::check_spec(&spec).unwrap();

    let again = husk(&root, &["spec", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(again.status, ALREADY_EXISTS);
    assert!(again.stderr.contains("exists"), "{}", again.stderr);
    assert_eq!(fs::read(&config).unwrap(), bytes);
}

#[test]
fn spec_in_a_missing_bundle_fails() {
    let (dir, root) = sandbox();
    let missing = dir.path().join("missing");
    let run = husk(&root, &["spec", "-b", missing.to_str().unwrap()]);
    assert_eq!(run.status, 1);
    assert!(run.stderr.contains("cannot write"), "{}", run.stderr);
}

#[test]
fn features_is_an_oci_features_document() {
    let (_dir, root) = sandbox();
    let run = husk(&root, &["features"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let value: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(value["ociVersionMin"], "1.0.0");
    assert!(value["ociVersionMax"].as_str().unwrap().starts_with("1."));
    assert_eq!(value["linux"]["cgroup"]["v2"], true);
    let _: oci_spec::runtime::Features = serde_json::from_str(&run.stdout).unwrap();
}

#[test]
fn check_reports_this_hosts_kvm_and_exits_non_zero() {
    let (dir, root) = sandbox();
    // A kernel that does not exist, so the check fails on any host.
    let kernel = dir.path().join("no-vmlinux");
    fs::write(
        root.with_extension("toml"),
        format!("[guest]\nkernel = {kernel:?}\n"),
    )
    .unwrap();
    let run = husk(&root, &["check"]);
    assert_eq!(run.status, HOST_NOT_READY, "{}", run.stdout);
    let expected = format!("FAIL  guest kernel: {} does not exist", kernel.display());
    assert!(run.stdout.contains(&expected), "{}", run.stdout);
    // The build machines' /dev/kvm is PVM: husk must say so and what to do instead.
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm_line = run
        .stdout
        .lines()
        .find(|line| line.contains(" kvm: "))
        .unwrap_or_else(|| panic!("no kvm line in:\n{}", run.stdout));
    assert_eq!(kvm_line.contains("PVM"), pvm, "{kvm_line}");
    if pvm {
        assert!(kvm_line.starts_with("FAIL"), "{kvm_line}");
        assert!(
            run.stdout.contains("VMX (Intel) or SVM (AMD)")
                && run.stdout.contains("nested virtualization"),
            "{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("# effective configuration"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("[vm]\nvcpus = 1\n"), "{}", run.stdout);
}

#[test]
fn check_uses_the_configured_guest_files_and_vmm() {
    let (dir, root) = sandbox();
    let kernel = dir.path().join("vmlinux");
    fs::write(&kernel, pvh_elf(18)).unwrap();
    let initramfs = dir.path().join("initramfs.cpio.gz");
    fs::write(&initramfs, b"\x1f\x8b\x08\x00").unwrap();
    let vmm = dir.path().join("husk-vmm");
    fs::write(&vmm, b"#!/bin/sh\n").unwrap();
    fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        root.with_extension("toml"),
        format!(
            "[guest]\nkernel = {kernel:?}\ninitramfs = {initramfs:?}\n[vmm]\npath = {vmm:?}\n[vm]\nvcpus = 2\n"
        ),
    )
    .unwrap();
    let run = husk(&root, &["check"]);
    let expect = [
        format!("ok    guest kernel: {}", kernel.display()),
        format!("ok    guest initramfs: {}", initramfs.display()),
        format!("ok    husk-vmm: {}", vmm.display()),
        "vcpus = 2".to_owned(),
    ];
    for line in expect {
        assert!(run.stdout.contains(&line), "{line} not in:\n{}", run.stdout);
    }
}

#[test]
fn check_reports_a_missing_bundle() {
    let (dir, root) = sandbox();
    let missing = dir.path().join("nowhere");
    let run = husk(&root, &["check", "--bundle", missing.to_str().unwrap()]);
    assert_eq!(run.status, HOST_NOT_READY);
    let expected = format!("FAIL  bundle: bundle {} does not exist", missing.display());
    assert!(run.stdout.contains(&expected), "{}", run.stdout);
}

#[test]
fn check_reports_a_malformed_config_json_with_its_position() {
    let (dir, root) = sandbox();
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(bundle.join("rootfs")).unwrap();
    fs::write(
        bundle.join("config.json"),
        "{\n  \"ociVersion\": \"1.0.2\",\n  \"process\": {\"args\": [\"sh\",]}\n}\n",
    )
    .unwrap();
    let run = husk(&root, &["check", "--bundle", bundle.to_str().unwrap()]);
    assert_eq!(run.status, HOST_NOT_READY);
    let line = run
        .stdout
        .lines()
        .find(|line| line.starts_with("FAIL  bundle:"))
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(line.contains("malformed"), "{line}");
    assert!(line.contains("line 3, column"), "{line}");
}

#[test]
fn check_accepts_a_spec_generated_bundle() {
    let (dir, root) = sandbox();
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(bundle.join("rootfs")).unwrap();
    assert_eq!(
        husk(&root, &["spec", "-b", bundle.to_str().unwrap()]).status,
        0
    );
    let run = husk(&root, &["check", "--bundle", bundle.to_str().unwrap()]);
    assert!(run.stdout.contains("ok    bundle: "), "{}", run.stdout);
    assert!(
        run.stdout.contains("microVM of 1 vCPU and 320 MiB"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_sizes_the_microvm_from_the_spec_resources() {
    let (dir, root) = sandbox();
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(bundle.join("rootfs")).unwrap();
    assert_eq!(
        husk(&root, &["spec", "-b", bundle.to_str().unwrap()]).status,
        0
    );
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    spec["linux"]["resources"] = serde_json::json!({
        "cpu": {"quota": 200000, "period": 100000},
        "memory": {"limit": 512 * 1024 * 1024}
    });
    fs::write(&config, spec.to_string()).unwrap();
    let run = husk(&root, &["check", "--bundle", bundle.to_str().unwrap()]);
    assert!(
        run.stdout.contains("microVM of 2 vCPUs and 576 MiB"),
        "{}",
        run.stdout
    );

    spec["linux"]["resources"]["cpu"]["quota"] = serde_json::json!(6_400_000);
    fs::write(&config, spec.to_string()).unwrap();
    let run = husk(&root, &["check", "--bundle", bundle.to_str().unwrap()]);
    assert!(
        run.stdout
            .contains("FAIL  bundle: the spec asks for 64 vCPUs (cpu.quota / cpu.period); limits.max_vcpus is 16"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_rejects_a_rootfs_symlink_out_of_the_bundle() {
    let (dir, root) = sandbox();
    let bundle = dir.path().join("bundle");
    fs::create_dir(&bundle).unwrap();
    assert_eq!(
        husk(&root, &["spec", "-b", bundle.to_str().unwrap()]).status,
        0
    );
    std::os::unix::fs::symlink("/", bundle.join("rootfs")).unwrap();
    let run = husk(&root, &["check", "--bundle", bundle.to_str().unwrap()]);
    assert!(run.stdout.contains("outside the bundle"), "{}", run.stdout);
}

#[test]
fn bad_configuration_file_names_the_key() {
    let (_dir, root) = sandbox();
    fs::write(root.with_extension("toml"), "[vm]\nvcpus = 0\n").unwrap();
    let run = husk(&root, &["check"]);
    assert_eq!(run.status, CONFIG);
    assert!(run.stderr.contains("key `vm.vcpus`"), "{}", run.stderr);

    fs::write(root.with_extension("toml"), "[vm]\nmemory = 5\n").unwrap();
    let run = husk(&root, &["check"]);
    assert_eq!(run.status, CONFIG);
    assert!(
        run.stderr.contains("unknown field `memory`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
}

#[test]
fn missing_explicit_configuration_file_is_an_error() {
    let (_dir, root) = sandbox();
    fs::remove_file(root.with_extension("toml")).unwrap();
    let run = husk(&root, &["check"]);
    assert_eq!(run.status, CONFIG);
    assert!(
        run.stderr.contains("cannot read configuration file"),
        "{}",
        run.stderr
    );
    // The cause is said once, not repeated by an error chain.
    assert_eq!(
        run.stderr.matches("os error 2").count(),
        1,
        "{}",
        run.stderr
    );
}

#[test]
fn state_prints_oci_state_and_notices_a_dead_process() {
    let (_dir, root) = sandbox();
    save_record(&root, "alive", ContainerState::Running, my_pid());
    save_record(&root, "gone", ContainerState::Running, i32::MAX);

    let run = husk(&root, &["state", "alive"]);
    assert_eq!(run.status, 0, "{}", run.stderr);
    let state: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(state["ociVersion"], oci_spec::runtime::VERSION);
    assert_eq!(state["id"], "alive");
    assert_eq!(state["status"], "running");
    assert_eq!(state["pid"], my_pid());
    assert_eq!(state["bundle"], "/bundles/b");

    let run = husk(&root, &["state", "gone"]);
    let state: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(state["status"], "stopped");
}

#[test]
fn list_shows_containers_as_a_table_and_as_json() {
    let (_dir, root) = sandbox();
    let empty = husk(&root, &["list"]);
    assert_eq!(empty.status, 0);
    assert_eq!(
        empty.stdout,
        "ID   PID   STATUS   BUNDLE   CREATED   OWNER\n"
    );
    assert_eq!(husk(&root, &["list", "--format", "json"]).stdout, "[]\n");

    save_record(&root, "b-running", ContainerState::Running, my_pid());
    save_record(&root, "a-created", ContainerState::Created, my_pid());

    let table = husk(&root, &["list"]);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    assert!(lines[1].starts_with("a-created "), "{}", table.stdout);
    assert!(lines[2].starts_with("b-running "), "{}", table.stdout);
    assert!(lines[2].contains(" running "), "{}", table.stdout);

    let json = husk(&root, &["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(list[0]["id"], "a-created");
    assert_eq!(list[0]["status"], "created");
    assert_eq!(list[1]["pid"], my_pid());
    assert_eq!(list[1]["rootfs"], "/bundles/b/rootfs");

    let quiet = husk(&root, &["list", "-q"]);
    assert_eq!(quiet.stdout, "a-created\nb-running\n");
}

#[test]
fn unopenable_log_file_is_an_error() {
    let (dir, root) = sandbox();
    let log = dir.path().join("no-such-dir").join("husk.log");
    let run = husk(&root, &["--log", log.to_str().unwrap(), "list"]);
    assert_eq!(run.status, 1);
    assert!(
        run.stderr.contains("cannot open log file"),
        "{}",
        run.stderr
    );
}

#[test]
fn global_flags_may_follow_the_verb() {
    let (_dir, root) = sandbox();
    save_record(&root, "c", ContainerState::Created, my_pid());
    let output = Command::new(env!("CARGO_BIN_EXE_husk"))
        .args(["list", "-q", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "c\n");
}

#[test]
fn version_names_the_runtime_spec() {
    let output = Command::new(env!("CARGO_BIN_EXE_husk"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        text,
        format!(
            "husk {}\nspec: {}\n",
            env!("CARGO_PKG_VERSION"),
            oci_spec::runtime::VERSION
        )
    );
}

#[test]
fn podman_style_global_flags_are_accepted() {
    let (dir, root) = sandbox();
    let log = dir.path().join("log.json");
    let run = husk(
        &root,
        &[
            "--systemd-cgroup",
            "--log",
            log.to_str().unwrap(),
            "--log-format=json",
            "state",
            "x",
        ],
    );
    assert_eq!(run.status, NOT_FOUND, "{}", run.stderr);
}

#[test]
fn check_refuses_a_kernel_without_a_pvh_entry() {
    let (dir, root) = sandbox();
    let kernel = dir.path().join("vmlinux");
    fs::write(&kernel, pvh_elf(17)).unwrap();
    fs::write(
        root.with_extension("toml"),
        format!("[guest]\nkernel = {kernel:?}\n"),
    )
    .unwrap();
    let run = husk(&root, &["check"]);
    assert_eq!(run.status, HOST_NOT_READY);
    let expected = format!(
        "FAIL  guest kernel: {}: no PVH entry note",
        kernel.display()
    );
    assert!(run.stdout.contains(&expected), "{}", run.stdout);
    assert!(run.stdout.contains("CONFIG_PVH=y"), "{}", run.stdout);
}
