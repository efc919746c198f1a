//! Shared support for husk's end-to-end tests.
//!
//! End-to-end tests boot real guests, so they need a hardware-style KVM. On machines whose
//! `/dev/kvm` is PVM (our build machines) they run inside the test host: `tests/e2e/run` builds
//! every test binary of this crate on the machine and runs them all in one test host boot
//! (`tests/testhost/run`); `make test-e2e` does both. They are never skipped: a missing
//! prerequisite is a loud panic that says how to get it.
//!
//! A test file under `tests/` typically starts with:
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//!
//! husk_e2e::require_real_kvm();
//! let kernel = husk_e2e::guest_kernel();
//! let mut qemu = Command::new("qemu-system-x86_64");
//! qemu.arg("-kernel").arg(&kernel); // ...
//! let mut guest = husk_e2e::Watched::spawn("qemu", &mut qemu);
//! let took = guest.expect_marker("husk-agent: started", Duration::from_secs(120));
//! eprintln!("marker after {took:?}");
//! // `guest` is killed when dropped.
//! ```
//!
//! The helpers panic on failure (they are for tests); their messages carry what is needed to
//! understand the failure (captured output, paths, the command to run).

pub mod containerd;
pub mod cri;

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How to run these tests; part of every "prerequisite missing" panic.
pub const HOW_TO_RUN: &str = "end-to-end tests need a hardware-backed KVM: run them with \
     `make test-e2e` (or `tests/e2e/run`), which boots a test host with a real KVM on machines \
     whose /dev/kvm is PVM or missing, or run a test binary inside `tests/testhost/run -- <binary>`";

/// Why this machine's `/dev/kvm` cannot run a standard guest, or `None` when it can: `/dev/kvm`
/// must exist, the CPU must show `svm` or `vmx`, and the KVM module must not be PVM.
pub fn kvm_problem() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".to_string());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is PVM (kvm_pvm loaded): it cannot boot a standard guest kernel".to_string(),
        );
    }
    let cpuinfo = match fs::read_to_string("/proc/cpuinfo") {
        Ok(text) => text,
        Err(e) => return Some(format!("cannot read /proc/cpuinfo: {e}")),
    };
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|flag| flag == "svm" || flag == "vmx");
    if !hardware {
        return Some("the CPU shows neither svm nor vmx: /dev/kvm is not hardware-backed".into());
    }
    None
}

/// Panics loudly unless `/dev/kvm` is a hardware-backed KVM (see [`kvm_problem`]). Call it first
/// in every test that boots a guest.
pub fn require_real_kvm() {
    if let Some(problem) = kvm_problem() {
        panic!("\n\n*** NO USABLE KVM: {problem}.\n*** {HOW_TO_RUN}\n\n");
    }
}

/// The checkout's top directory (where `Cargo.toml` of the workspace and `target/` live).
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or_else(|e| {
        panic!(
            "cannot resolve the checkout's top directory {}: {e}",
            root.display()
        )
    })
}

/// `target/guest/<name>` of the checkout; panics loudly when it is missing.
pub fn guest_file(name: &str) -> PathBuf {
    let path = repo_root().join("target/guest").join(name);
    if !path.is_file() {
        panic!(
            "\n\n*** {} is missing: run `make guest` (it builds the guest kernel and initramfs).\n\n",
            path.display()
        );
    }
    path
}

/// The guest kernel built by `make guest`: `target/guest/vmlinux` (an ELF with a PVH entry).
pub fn guest_kernel() -> PathBuf {
    guest_file("vmlinux")
}

/// The guest initramfs built by `make guest`: `target/guest/initramfs.cpio.gz` (`/init` is
/// `husk-agent`).
pub fn guest_initramfs() -> PathBuf {
    guest_file("initramfs.cpio.gz")
}

/// Finds `program` on `PATH`; panics loudly (naming the Debian package to install) when absent.
pub fn require_program(program: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "\n\n*** {program} not found on PATH: install it (apt-get install \
                 {debian_package}); `make test-e2e` does.\n\n"
            )
        })
}

/// A directory under the system's temporary directory, removed with its contents when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh, empty directory named `husk-e2e-<prefix>-<unique>`.
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("husk-e2e-{prefix}-{}-{nanos}-{n}", std::process::id());
            let path = std::env::temp_dir().join(name);
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!(
                    "cannot create the temporary directory {}: {e}",
                    path.display()
                ),
            }
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A mount left under the directory is detached first: removing the directory through
        // it would delete what it shows (a bind of a shared rootfs, say).
        remove_tree(&self.path);
    }
}

/// husk-vmm's capabilities in its jail with a virtio-fs share (CHOWN, DAC_OVERRIDE,
/// DAC_READ_SEARCH, FOWNER, SETGID, SETUID), as `/proc/<pid>/status` prints them.
pub const VMM_FS_CAPABILITIES: &str = "00000000000000cf";

/// `vmm.host_memory_mib`'s default: what husk-vmm may use beyond guest memory in its cgroup.
pub const VMM_HOST_MEMORY_MIB: u64 = 32;

/// What is wrong with the host cgroup of the running husk-vmm `pid` (empty when nothing is): it
/// must be in `expected` (as `/proc/PID/cgroup` names it, `/a/b`), with `memory.max` its guest
/// memory (`--memory-mib`) plus [`VMM_HOST_MEMORY_MIB`], `pids.max` 256 and `cpu.max`
/// `cpu_max` (`None`: no CPU limit, so `cpu.max` is `max ...` or the cpu controller is not
/// enabled for it at all). Prints the cgroup's `memory.current` and `memory.peak` (what the VM really uses).
pub fn vmm_cgroup_problems(pid: u32, expected: &str, cpu_max: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    let theirs = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if theirs.trim() != format!("0::{expected}") {
        problems.push(format!("in cgroup {:?}, not {expected:?}", theirs.trim()));
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // husk-vmm's own definition of its command line.
    let guest_mib = <husk_vmm_config::VmmConfig as husk_vmm_config::Parser>::try_parse_from(&args)
        .ok()
        .map(|c| c.memory_mib);
    let dir = Path::new("/sys/fs/cgroup").join(expected.trim_start_matches('/'));
    let read = |file: &str| {
        fs::read_to_string(dir.join(file))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|e| format!("<{file}: {e}>"))
    };
    match guest_mib {
        Some(mib) => {
            let want = ((mib + VMM_HOST_MEMORY_MIB) * 1024 * 1024).to_string();
            if read("memory.max") != want {
                problems.push(format!("memory.max is {}, not {want}", read("memory.max")));
            }
        }
        None => problems.push(format!("no --memory-mib in {args:?}")),
    }
    if read("pids.max") != "256" {
        problems.push(format!("pids.max is {}, not 256", read("pids.max")));
    }
    let cpu = fs::read_to_string(dir.join("cpu.max")).ok();
    let cpu = cpu.as_deref().map(str::trim);
    match (cpu_max, cpu) {
        (Some(want), Some(got)) if got == want => {}
        (None, None) => {}
        (None, Some(got)) if got.starts_with("max ") => {}
        (want, got) => problems.push(format!("cpu.max is {got:?}, not {want:?}")),
    }
    eprintln!(
        "husk-vmm {pid}'s cgroup {expected}: memory.current {} memory.peak {} (guest memory {guest_mib:?} MiB), pids.current {}",
        read("memory.current"),
        read("memory.peak"),
        read("pids.current"),
    );
    problems
}

/// What is wrong with the jail of the running husk-vmm `pid` (empty when nothing is): it must
/// have no_new_privs, only [`VMM_FS_CAPABILITIES`] (nothing in the bounding, inheritable and
/// ambient sets), mount, IPC, UTS, network and PID namespaces of its own (the PID one from the
/// launcher), its root as working directory, and a root
/// holding no host `/etc`, `/dev`, `/proc` or `/usr`.
pub fn vmm_jail_problems(pid: u32) -> Vec<String> {
    let mut problems = Vec::new();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut expect = |name: &str, want: &str| {
        let got = field(name);
        if got != want {
            problems.push(format!("{name} is {got:?}, not {want:?}"));
        }
    };
    expect("NoNewPrivs", "1");
    for set in ["CapInh", "CapBnd", "CapAmb"] {
        expect(set, "0000000000000000");
    }
    for set in ["CapEff", "CapPrm"] {
        expect(set, VMM_FS_CAPABILITIES);
    }
    for ns in ["mnt", "ipc", "uts", "net", "pid"] {
        let theirs = fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        if theirs.is_none() || theirs == fs::read_link(format!("/proc/self/ns/{ns}")).ok() {
            problems.push(format!("no {ns} namespace of its own ({theirs:?})"));
        }
    }
    // Its working directory is its root (compared by device and inode: how the kernel names a
    // directory outside the reader's root depends on where the reader is).
    let id = |p: String| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let (cwd, root_id) = (
        id(format!("/proc/{pid}/cwd")),
        id(format!("/proc/{pid}/root")),
    );
    if cwd.is_none() || cwd != root_id {
        problems.push(format!(
            "working directory {cwd:?} is not its root {root_id:?}"
        ));
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    for host_dir in ["etc", "dev", "proc", "usr"] {
        if root.join(host_dir).exists() {
            problems.push(format!("its root holds the host's /{host_dir}"));
        }
    }
    problems
}

/// A process on this machine, as `/proc/<pid>` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its PID.
    pub pid: u32,
    /// The file name of its `argv[0]` (`husk-vmm`, `containerd-shim-husk-v2`, `husk`, ...).
    pub program: String,
    /// Its arguments, `argv[0]` included.
    pub args: Vec<String>,
}

impl Process {
    /// The value following `flag` on its command line (`--vsock-uds PATH`), if any.
    pub fn arg_after(&self, flag: &str) -> Option<&str> {
        let at = self.args.iter().position(|a| a == flag)?;
        self.args.get(at + 1).map(String::as_str)
    }
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.pid, self.args.join(" "))
    }
}

/// Whether `value` names `mark` or a path under it: `mark` itself, `mark/...`, `mark,...`
/// (husk-vmm's `--fs DIR,tag=...`), also after a `KEY=` (an environment entry such as
/// `HUSK_SHIM_ROOT=...`, or an option such as `--root=...`). A plain prefix is not enough:
/// `/run/husk-e2e-1-1` does not name `/run/husk-e2e-1-10`.
fn names_path(value: &[u8], mark: &[u8]) -> bool {
    let at_start = |v: &[u8]| {
        v.strip_prefix(mark)
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'/' || rest[0] == b',')
    };
    if mark.is_empty() {
        return false;
    }
    at_start(value)
        || value
            .iter()
            .position(|b| *b == b'=')
            .is_some_and(|eq| at_start(&value[eq + 1..]))
}

/// The parent PID from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": the command name may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split(' ').nth(1)?.parse().ok()
}

/// Whether `pid` is a live process: not gone, not a zombie waiting for its reaper.
pub fn process_runs(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Live processes, other than this test process and its ancestors, whose command line or
/// environment (`/proc/<pid>/environ`, readable as root: the test host runs the tests as root)
/// names one of `marks` or a path under it (see [`names_path`]). This is how a test finds what
/// it started itself, and only that: husk-vmm names its sandbox's vsock socket and share (under
/// the runtime's `--root` or the shim's `HUSK_SHIM_ROOT`) and its console log, the supervisor its
/// `--root` and `--config`, a shim containerd's socket and the `HUSK_SHIM_ROOT` it inherited.
pub fn processes_naming(marks: &[&Path]) -> Vec<Process> {
    use std::os::unix::ffi::OsStrExt;
    let marks: Vec<&[u8]> = marks.iter().map(|m| m.as_os_str().as_bytes()).collect();
    let mut mine = vec![std::process::id()];
    while let Some(parent) = mine.last().and_then(|p| parent_of(*p)) {
        if parent == 0 || mine.contains(&parent) {
            break;
        }
        mine.push(parent);
    }
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if mine.contains(&pid) {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let named = cmdline
            .split(|b| *b == 0)
            .chain(environ.split(|b| *b == 0))
            .any(|value| marks.iter().any(|mark| names_path(value, mark)));
        if !named || !process_runs(pid) {
            continue;
        }
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        found.push(Process { pid, program, args });
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// Kills (SIGKILL) every process [`processes_naming`] finds for `marks`, and what they start
/// meanwhile, and waits (at most 10 s) until they are gone (a zombie counts as gone: it holds
/// nothing). Returns what was killed.
pub fn kill_processes_naming(marks: &[&Path]) -> Vec<Process> {
    let mut killed: Vec<Process> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = processes_naming(marks);
        if found.is_empty() {
            return killed;
        }
        if Instant::now() >= deadline {
            let left: Vec<String> = found.iter().map(Process::to_string).collect();
            eprintln!("warning: still running after SIGKILL: {left:?}");
            return killed;
        }
        for process in found {
            if let Ok(pid) = i32::try_from(process.pid) {
                // SAFETY: kill(2) takes plain integers; no memory is involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if !killed.iter().any(|k| k.pid == process.pid) {
                killed.push(process);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Undoes the octal escapes of `/proc/self/mountinfo` (`\040` for a space, ...).
fn unescape_mount_point(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_point)
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Detaches (`umount -l`) every mount at or under `dirs`, the most recent first.
pub fn unmount_under(dirs: &[&Path]) {
    use std::os::unix::ffi::OsStrExt;
    let mut points: Vec<PathBuf> = dirs.iter().flat_map(|d| mounts_under(d)).collect();
    points.dedup();
    for point in points.iter().rev() {
        let Ok(c_path) = std::ffi::CString::new(point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) reads the NUL-terminated path, which outlives the call.
        let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                eprintln!("warning: cannot detach {}: {e}", point.display());
            }
        }
    }
}

/// Detaches the mounts under `dir` and removes it with its contents, unless a mount is still
/// there (then it stays, with a warning: removing it would delete through the mount).
fn remove_tree(dir: &Path) {
    unmount_under(&[dir]);
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!(
            "warning: not removing {}: mounts are still under it: {left:?}",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("warning: cannot remove {}: {e}", dir.display());
        }
    }
}

/// What a test fixture's `Drop` does so that a failed test leaves nothing for the next test's
/// leak check: kills what the test left running (every process [`processes_naming`] `marks`,
/// the test's own root and directories), then detaches the mounts under `marks` and removes
/// `remove`, and the sandbox directory (the `--vsock-uds` socket's) of every husk-vmm killed
/// when it lies elsewhere (podman's containers under the default root `/run/husk`). Says on
/// stderr what it had to kill. It runs after the test's own leak assertions, which it does not
/// replace: a test that leaked still fails.
pub fn clean_up(marks: &[&Path], remove: &[&Path]) {
    let killed = kill_processes_naming(marks);
    let mut dirs: Vec<PathBuf> = remove.iter().map(|d| d.to_path_buf()).collect();
    if !killed.is_empty() {
        let shown: Vec<String> = killed.iter().map(Process::to_string).collect();
        eprintln!("clean-up: killed what the test left running: {shown:?}");
        for process in killed.iter().filter(|p| p.program == "husk-vmm") {
            let sandbox = process
                .arg_after("--vsock-uds")
                .and_then(|uds| Path::new(uds).parent());
            if let Some(sandbox) = sandbox {
                if !marks.iter().any(|m| sandbox.starts_with(m)) {
                    dirs.push(sandbox.to_path_buf());
                }
            }
        }
    }
    unmount_under(marks);
    for dir in &dirs {
        remove_tree(dir);
    }
}

/// Whether a guest that ended on its own was reset by the test host before its init said a word:
/// husk-vmm exited 0 (a reset or triple fault, host/vmm/src/exit.rs) although `init_word` (how
/// every line of that init starts: `"husk-agent:"`, `"vsock-echo:"`) is nowhere on the console,
/// and husk-vmm's log (`vmm_log`, its stderr) holds its triple-fault warning. That is the test
/// host's nested virtualization (tests/testhost/README.md "Known flakiness"), not the product:
/// the message returned is worded for tests/e2e/nested-virt-signatures, so the test loop retries
/// the test once. `None` for anything else, which the test then judges itself.
pub fn reset_before_init(
    status: std::process::ExitStatus,
    console: &str,
    vmm_log: &str,
    init_word: &str,
) -> Option<String> {
    if status.code() != Some(0) || console.contains(init_word) {
        return None;
    }
    let warning = vmm_log.lines().find(|l| l.contains(": triple fault; "))?;
    Some(format!(
        "husk-vmm exited (exit status: 0) before the guest's init printed a word ({init_word:?}); \
         husk-vmm logged: {warning}"
    ))
}

/// Why [`Watched::wait_for`] or [`Watched::wait_exit`] gave up. Its `Display` includes the
/// process's output so far, for assertion messages.
#[derive(Debug)]
pub enum WaitError {
    /// The deadline passed.
    Timeout {
        /// What was awaited.
        what: String,
        /// How long was waited.
        waited: Duration,
        /// The process's output (stdout and stderr interleaved as read), lossily decoded.
        output: String,
        /// Where each of the process's threads was when the wait gave up (for a process that
        /// hangs, e.g. a vCPU thread that no longer comes back from `KVM_RUN`).
        threads: String,
    },
    /// The process closed its output (it exited) before the marker appeared.
    Exited {
        /// What was awaited.
        what: String,
        /// Its exit status, when it could be collected.
        status: Option<ExitStatus>,
        /// The process's output, lossily decoded.
        output: String,
    },
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Timeout {
                what,
                waited,
                output,
                threads,
            } => write!(
                f,
                "timed out after {waited:?} waiting for {what}; its threads:\n{threads}\noutput so far:\n{output}"
            ),
            WaitError::Exited {
                what,
                status,
                output,
            } => write!(
                f,
                "the process ended ({status:?}) before {what}; its output:\n{output}"
            ),
        }
    }
}

impl std::error::Error for WaitError {}

/// Output captured from a [`Watched`] process.
#[derive(Debug, Default)]
struct Captured {
    /// Both streams, interleaved in the order the reader threads happened to take them (for
    /// showing; the relative order of stdout and stderr is not reliable).
    bytes: Vec<u8>,
    /// Each stream on its own (stdout, stderr): markers are searched here, where order holds.
    streams: [Vec<u8>; 2],
    open_streams: usize,
}

#[derive(Debug, Default)]
struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A child process whose stdout and stderr are captured (interleaved, as read) and echoed to
/// the test's stderr (shown by libtest when the test fails). It runs in its own process group;
/// the group is killed (SIGKILL) and the child reaped when dropped, so a failing assertion never
/// leaves it (or what it started) behind.
#[derive(Debug)]
pub struct Watched {
    name: String,
    child: Child,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Watched {
    /// Spawns `command` in a new process group, with stdin from `/dev/null` and stdout/stderr
    /// captured. `name` prefixes the echoed lines and messages. Panics when the program cannot be
    /// started.
    pub fn spawn(name: &str, command: &mut Command) -> Watched {
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let shared = Arc::new(Shared::default());
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(start_reader(name, Stream::Out(out), &shared));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(start_reader(name, Stream::Err(err), &shared));
        }
        Watched {
            name: name.to_string(),
            child,
            shared,
            readers,
            status: None,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote so far (stdout and stderr interleaved), lossily decoded.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().bytes).into_owned()
    }

    /// Waits until `marker` appears in stdout or in stderr (searched separately, since how the
    /// two interleave is not reliable), for at most `timeout`; returns how long it took.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<Duration, WaitError> {
        let start = Instant::now();
        let what = format!("{:?} from {}", marker, self.name);
        let needle = marker.as_bytes();
        let mut captured = self.shared.lock();
        loop {
            if captured.streams.iter().any(|s| contains(s, needle)) {
                return Ok(start.elapsed());
            }
            if captured.open_streams == 0 {
                drop(captured);
                // The pipes close a moment before the process becomes reapable; give it a
                // bounded while to finish exiting (one that closed its output and went on
                // running is reported without a status).
                let left = timeout.saturating_sub(start.elapsed());
                let status = self.poll_status(left.min(Duration::from_secs(10)));
                return Err(WaitError::Exited {
                    what,
                    status,
                    output: self.output(),
                });
            }
            let waited = start.elapsed();
            let Some(left) = timeout.checked_sub(waited).filter(|d| !d.is_zero()) else {
                drop(captured);
                return Err(WaitError::Timeout {
                    what,
                    waited,
                    output: self.output(),
                    threads: thread_report(self.child.id()),
                });
            };
            captured = self
                .shared
                .changed
                .wait_timeout(captured, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Like [`Watched::wait_for`], but panics with the captured output when the marker does not
    /// come.
    pub fn expect_marker(&mut self, marker: &str, timeout: Duration) -> Duration {
        match self.wait_for(marker, timeout) {
            Ok(took) => took,
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits for the process to exit, for at most `timeout` (then it is left running; drop kills
    /// it). Its output is fully read when this returns `Ok`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, WaitError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                self.join_readers();
                return Ok(status);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(WaitError::Timeout {
                    what: format!("{} to exit", self.name),
                    waited,
                    output: self.output(),
                    threads: thread_report(self.child.id()),
                });
            }
            std::thread::sleep(Duration::from_millis(20).min(timeout - waited));
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process only.
    pub fn signal(&self, signal: i32) {
        if self.status.is_some() {
            return;
        }
        let Ok(pid) = i32::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers; the pid is our unreaped child, so it cannot have
        // been reused by another process.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            eprintln!(
                "[{}] kill({pid}, {signal}): {}",
                self.name,
                io::Error::last_os_error()
            );
        }
    }

    /// Kills the process's group with SIGKILL (if the process still runs), reaps the process and
    /// collects the rest of its output; returns its exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        self.kill_group();
        self.join_readers();
        self.status
    }

    fn kill_group(&mut self) {
        if self.try_status().is_none() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) takes plain integers; the group is the one our unreaped child
                // leads (process_group(0) at spawn), so its id cannot have been reused.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            // Also the child itself, should the group call have failed.
            let _ = self.child.kill();
            match self.child.wait() {
                Ok(status) => self.status = Some(status),
                Err(e) => eprintln!("[{}] cannot reap process {}: {e}", self.name, self.id()),
            }
        }
    }

    fn poll_status(&mut self, patience: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            let waited = start.elapsed();
            if waited >= patience {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10).min(patience - waited));
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => eprintln!("[{}] cannot poll process {}: {e}", self.name, self.id()),
            }
        }
        self.status
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            if reader.join().is_err() {
                eprintln!("[{}] an output reader thread panicked", self.name);
            }
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // The reader threads are not joined: a process that left its own session could keep the
        // pipes open; they end by themselves when the last writer goes.
        self.kill_group();
    }
}

enum Stream {
    Out(ChildStdout),
    Err(ChildStderr),
}

impl Stream {
    /// Index of the stream's own buffer in [`Captured::streams`].
    fn index(&self) -> usize {
        match self {
            Stream::Out(_) => 0,
            Stream::Err(_) => 1,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Out(out) => out.read(buf),
            Stream::Err(err) => err.read(buf),
        }
    }
}

fn start_reader(name: &str, mut stream: Stream, shared: &Arc<Shared>) -> JoinHandle<()> {
    shared.lock().open_streams += 1;
    let shared = Arc::clone(shared);
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut echo = LineEcho::new(&name);
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("[{name}] reading its output failed: {e}");
                    break;
                }
            };
            let chunk = &buf[..n.min(buf.len())];
            echo.feed(chunk);
            {
                let mut captured = shared.lock();
                captured.bytes.extend_from_slice(chunk);
                if let Some(own) = captured.streams.get_mut(stream.index()) {
                    own.extend_from_slice(chunk);
                }
            }
            shared.changed.notify_all();
        }
        echo.finish();
        shared.lock().open_streams -= 1;
        shared.changed.notify_all();
    })
}

/// Echoes a stream to stderr line by line, each line prefixed with the process's name.
struct LineEcho {
    prefix: String,
    line: Vec<u8>,
}

impl LineEcho {
    fn new(name: &str) -> LineEcho {
        LineEcho {
            prefix: format!("[{name}] "),
            line: Vec::new(),
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.flush_line();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
    }

    fn flush_line(&mut self) {
        // eprintln! goes through libtest's capture (a plain write to stderr would not).
        eprintln!("{}{}", self.prefix, String::from_utf8_lossy(&self.line));
        self.line.clear();
    }

    fn finish(&mut self) {
        if !self.line.is_empty() {
            self.flush_line();
        }
        let _ = io::stderr().flush();
    }
}

/// One line per thread of process `pid`: its name, state, the kernel function it sleeps in and,
/// when readable (root), its kernel stack. Best effort: what cannot be read is left out.
pub fn thread_report(pid: u32) -> String {
    let mut report = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("  (no /proc/{pid}/task: the process is gone)\n");
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        let comm = read("comm");
        let state = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let wchan = read("wchan");
        report.push_str(&format!(
            "  tid {} {:?} {state} wchan={wchan}\n",
            task.file_name().to_string_lossy(),
            comm.trim(),
        ));
        for frame in read("stack").lines().take(12) {
            report.push_str(&format!("      {frame}\n"));
        }
    }
    report
}

/// Whether `haystack` contains `needle` (an empty needle is always found).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        command
    }

    #[test]
    fn wait_for_finds_a_marker_split_across_writes_and_streams_are_both_captured() {
        let mut p = Watched::spawn("sh", &mut sh("printf 'boot: husk-'; echo oops >&2; sleep 0.2; printf 'agent: started\\n'; sleep 30"));

        let found = p.wait_for("husk-agent: started", Duration::from_secs(20));
        let err = p.wait_for("oops", Duration::from_secs(20));

        assert!(found.is_ok(), "{:?}", found);
        assert!(err.is_ok(), "{:?}", err);
    }

    #[test]
    fn wait_for_reports_exit_with_the_output_when_the_marker_never_comes() {
        let mut p = Watched::spawn("sh", &mut sh("echo partial; exit 3"));

        let result = p.wait_for("never", Duration::from_secs(20));

        match result {
            Err(WaitError::Exited { status, output, .. }) => {
                assert_eq!(status.and_then(|s| s.code()), Some(3));
                assert!(output.contains("partial"), "output: {output}");
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn wait_for_reports_the_status_of_a_process_that_exits_after_closing_its_output() {
        let mut p = Watched::spawn("sh", &mut sh("echo bye; exec >&- 2>&-; sleep 0.5; exit 5"));

        let result = p.wait_for("never", Duration::from_secs(20));

        match result {
            Err(WaitError::Exited { status, .. }) => {
                assert_eq!(status.and_then(|s| s.code()), Some(5));
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn wait_for_times_out_and_drop_kills_the_process() {
        let mut p = Watched::spawn("sleep", &mut sh("echo waiting; exec sleep 60"));
        let pid = p.id();

        let result = p.wait_for("never", Duration::from_millis(300));
        drop(p);

        assert!(
            matches!(result, Err(WaitError::Timeout { .. })),
            "{result:?}"
        );
        let message = result.map_or_else(|e| e.to_string(), |_| String::new());
        assert!(
            message.contains(&format!("tid {pid} ")) && message.contains("wchan="),
            "the report shows where the hung thread is: {message}"
        );
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists after drop"
        );
    }

    #[test]
    fn wait_exit_returns_the_status_and_all_output() {
        let mut p = Watched::spawn("sh", &mut sh("seq 1 5000; exit 4"));

        let status = p.wait_exit(Duration::from_secs(20));

        assert_eq!(status.ok().and_then(|s| s.code()), Some(4));
        assert!(p.output().ends_with("4999\n5000\n"));
    }

    /// Whether one of tests/e2e/nested-virt-signatures matches `line`, as tests/e2e/loop.sh asks.
    fn a_signature_matches(line: &str) -> bool {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("nested-virt-signatures");
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let patterns: String = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let patterns_file =
            std::env::temp_dir().join(format!("husk-e2e-sig-{}", std::process::id()));
        fs::write(&patterns_file, patterns).unwrap_or_else(|e| panic!("write: {e}"));
        let mut grep = Command::new("grep")
            .env("LC_ALL", "C")
            .args(["-a", "-q", "-E", "-f"])
            .arg(&patterns_file)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("grep: {e}"));
        if let Some(mut stdin) = grep.stdin.take() {
            let _ = writeln!(stdin, "{line}");
        }
        let status = grep.wait().unwrap_or_else(|e| panic!("grep: {e}"));
        let _ = fs::remove_file(&patterns_file);
        assert_ne!(status.code(), Some(2), "grep failed on the signatures");
        status.success()
    }

    #[test]
    fn a_reset_before_the_init_spoke_is_told_in_a_signatures_words_and_nothing_else_is() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        let early = "[husk-vmm] CPUID[0d, 1c]: eax=00000000 ebx=00000000\n";
        let warning =
            "2026-12-04T20:47:03.106028Z \u{1b}[33m WARN\u{1b}[0m husk_vmm::vcpu: vcpu0: \
                       triple fault; rip=0xfff0 rsp=0x0 rflags=0x2 cr0=0x10 cs=0xf000";
        let log = format!("{early}{warning}\n");

        let said = reset_before_init(exited(0), early, &log, "husk-agent:")
            .unwrap_or_else(|| panic!("an early reset is not recognised"));
        assert!(said.contains("vcpu0: triple fault; rip=0xfff0"), "{said}");
        assert!(a_signature_matches(&said), "no signature matches {said:?}");

        // The init spoke (then reset the guest itself, or failed): the test's own business.
        let spoke = format!("{early}vsock-echo: rebooting at once\n");
        assert_eq!(
            reset_before_init(exited(0), &spoke, &log, "vsock-echo:"),
            None
        );
        // A kernel panic (status 3), a failing monitor, or a reset without husk-vmm's warning.
        assert_eq!(
            reset_before_init(exited(3), early, &log, "husk-agent:"),
            None
        );
        assert_eq!(
            reset_before_init(exited(1), early, &log, "husk-agent:"),
            None
        );
        assert_eq!(
            reset_before_init(exited(0), early, early, "husk-agent:"),
            None
        );
        // The fake husk-vmm's warning of shim_more.rs is not husk-vmm's.
        let fake = "vcpu0: triple fault (fake husk-vmm)\n";
        assert_eq!(
            reset_before_init(exited(0), early, fake, "husk-agent:"),
            None
        );
    }

    #[test]
    fn temp_dir_is_created_empty_and_removed_on_drop() {
        let dir = TempDir::new("unit");
        let path = dir.path().to_path_buf();
        fs::write(path.join("f"), b"x").unwrap_or_else(|e| panic!("write: {e}"));

        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn a_path_is_named_by_itself_what_is_under_it_and_key_values_not_by_a_longer_name() {
        let mark = b"/run/husk-e2e-1-1";
        for named in [
            &b"/run/husk-e2e-1-1"[..],
            b"/run/husk-e2e-1-1/c1/vsock.sock",
            b"/run/husk-e2e-1-1/c1/shared,tag=husk-shared",
            b"HUSK_SHIM_ROOT=/run/husk-e2e-1-1",
            b"--root=/run/husk-e2e-1-1/x",
        ] {
            assert!(
                names_path(named, mark),
                "{}",
                String::from_utf8_lossy(named)
            );
        }
        for other in [
            &b"/run/husk-e2e-1-10"[..],
            b"/run/husk-e2e-1-10/c1/vsock.sock",
            b"x/run/husk-e2e-1-1",
            b"",
        ] {
            assert!(
                !names_path(other, mark),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        assert!(!names_path(b"/anything", b""));
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(
            unescape_mount_point("/tmp/a\\040b\\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
        assert_eq!(unescape_mount_point("/x\\09"), PathBuf::from("/x\\09"));
    }

    #[test]
    fn the_processes_naming_a_directory_are_found_and_killed_and_no_other() {
        let mine = TempDir::new("procs");
        let other = PathBuf::from(format!("{}0", mine.path().display()));
        // Named by argv[0] (a link to sleep in the directory), by the environment, and a
        // process naming a longer path that starts with the same characters.
        let link = mine.path().join("sleep");
        std::os::unix::fs::symlink(require_program("sleep", "coreutils"), &link)
            .unwrap_or_else(|e| panic!("symlink: {e}"));
        let mut by_arg = Watched::spawn("by-arg", Command::new(&link).arg("60"));
        let mut by_env = Command::new("sleep");
        by_env.arg("61").env("HUSK_SHIM_ROOT", mine.path());
        let mut by_env = Watched::spawn("by-env", &mut by_env);
        let mut elsewhere = Command::new("sleep");
        elsewhere.arg("62").env("HUSK_SHIM_ROOT", &other);
        let mut elsewhere = Watched::spawn("elsewhere", &mut elsewhere);
        // Until both have exec'd.
        let deadline = Instant::now() + Duration::from_secs(20);
        while processes_naming(&[mine.path()]).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }

        let found: Vec<u32> = processes_naming(&[mine.path()])
            .iter()
            .map(|p| p.pid)
            .collect();
        let killed = kill_processes_naming(&[mine.path()]);

        let mut want = vec![by_arg.id(), by_env.id()];
        want.sort_unstable();
        assert_eq!(found, want);
        assert!(killed.iter().all(|p| p.program == "sleep"), "{killed:?}");
        assert_eq!(
            killed.iter().map(|p| p.pid).collect::<Vec<_>>(),
            want,
            "{killed:?}"
        );
        assert!(by_arg.wait_exit(Duration::from_secs(10)).is_ok());
        assert!(by_env.wait_exit(Duration::from_secs(10)).is_ok());
        assert!(
            process_runs(elsewhere.id()),
            "a process of another directory was killed"
        );
        assert!(processes_naming(&[mine.path()]).is_empty());
        elsewhere.kill();
    }

    #[test]
    fn contains_handles_edges() {
        assert!(contains(b"abc", b""));
        assert!(contains(b"abc", b"bc"));
        assert!(!contains(b"ab", b"abc"));
    }
}
