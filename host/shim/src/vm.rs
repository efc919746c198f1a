//! One microVM: husk-vmm started by the shim, the agent connection, the virtio-fs share.
//!
//! ```text
//! <root>/<sandbox>/              the sandbox directory (husk_runtime::sandbox::SandboxPaths)
//!   vsock.sock                   husk-vmm's hybrid vsock socket
//!   shared/                      the virtio-fs share (husk_runtime::share), tag husk-shared
//!   vmm.pid                      husk-vmm's PID, for `containerd-shim-husk-v2 delete`
//!   vmm.log                      husk-vmm's standard output and error
//! <console.log_dir>/<sandbox>.log  the guest console
//! ```

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_agent_protocol::agent::{CreateSandboxRequest, Storage};
use husk_agent_protocol::AgentClient;
use husk_runtime::config::Config;
use husk_runtime::id::ContainerId;
use husk_runtime::sandbox::{self, SandboxPaths, AGENT_PORT};
use husk_runtime::share::{self, HostMounter, GUEST_SHARE_DIR};
use husk_runtime::sizing::VmSize;
use husk_runtime::store::Store;
use husk_runtime::vsock;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Result, ShimError};

/// The virtio-fs tag of the share; the agent mounts it at [`GUEST_SHARE_DIR`].
pub const SHARE_TAG: &str = "husk-shared";
/// How long the guest may take to boot to the agent (nested, emulated hosts are slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long husk-vmm gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `DestroySandbox` may take at teardown.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory holding every sandbox of this host's shims: `HUSK_SHIM_ROOT`, else
/// `/run/husk/shim`.
pub fn state_root() -> PathBuf {
    std::env::var_os("HUSK_SHIM_ROOT")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/run/husk/shim"))
}

/// The husk configuration: `HUSK_CONFIG` if set (must exist), else `/etc/husk/config.toml`
/// (built-in defaults when missing).
pub fn load_config() -> Result<Config> {
    let discovery = husk_runtime::config::Discovery::from_process()?;
    let (path, explicit) = match std::env::var_os("HUSK_CONFIG") {
        Some(path) => (PathBuf::from(path), true),
        None => (PathBuf::from("/etc/husk/config.toml"), false),
    };
    Ok(husk_runtime::config::load(&path, explicit, &discovery)?)
}

/// The files of a sandbox (see the module documentation).
#[derive(Debug, Clone)]
pub struct VmFiles {
    pub paths: SandboxPaths,
    pub pid_file: PathBuf,
    pub log_file: PathBuf,
}

impl VmFiles {
    pub fn new(config: &Config, id: &ContainerId) -> Result<Self> {
        let paths = SandboxPaths::new(&Store::new(state_root()), config, id)?;
        Ok(VmFiles {
            pid_file: paths.dir.join("vmm.pid"),
            log_file: paths.dir.join("vmm.log"),
            paths,
        })
    }
}

/// A running microVM with its agent.
pub struct Vm {
    pub id: ContainerId,
    pub files: VmFiles,
    pub agent: AgentClient,
    pub vmm_pid: u32,
    /// `Some(description)` once husk-vmm has exited.
    vmm_exit: watch::Receiver<Option<String>>,
    /// Set once the shim stops the VM itself (an exit after that is expected).
    stopping: Arc<AtomicBool>,
}

/// husk-vmm's PID, its exit and whether the shim is stopping it.
type Started = (u32, watch::Receiver<Option<String>>, Arc<AtomicBool>);

/// Logs husk-vmm's exit while its sandbox was meant to run (a guest crash, a VMM failure, a
/// kill from outside), with the end of its log and of the guest console: the sandbox's files
/// are removed at teardown, so this is what is left to explain the exit.
fn report_unexpected_exit(id: &ContainerId, files: &VmFiles, status: &str) {
    warn!(
        sandbox = %id,
        %status,
        vmm_log = %husk_runtime::supervisor::log_tail(&files.log_file),
        console = %husk_runtime::supervisor::log_tail(&files.paths.console),
        "husk-vmm exited unexpectedly"
    );
}

/// What a VM is booted with.
pub struct BootSpec<'a> {
    pub id: &'a ContainerId,
    pub config: &'a Config,
    pub size: VmSize,
    pub hostname: String,
}

impl Vm {
    /// Creates the sandbox directory and share, starts husk-vmm, waits for the agent and
    /// creates the guest sandbox. On failure everything made is removed again.
    pub async fn boot(spec: BootSpec<'_>) -> Result<Vm> {
        let files = VmFiles::new(spec.config, spec.id)?;
        let parent = files.paths.dir.parent().unwrap_or(Path::new("/"));
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(ShimError::io("create", parent))?;
        match DirBuilder::new().mode(0o700).create(&files.paths.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ShimError::AlreadyExists(format!(
                    "sandbox {} ({})",
                    spec.id,
                    files.paths.dir.display()
                )))
            }
            Err(err) => return Err(ShimError::io("create", &files.paths.dir)(err)),
        }
        let mut vmm_pid = None;
        let result = Self::boot_in(&spec, &files, &mut vmm_pid).await;
        if result.is_err() {
            let (pid, exit) = match vmm_pid {
                Some((pid, exit, stopping)) => {
                    stopping.store(true, Ordering::SeqCst);
                    (Some(pid), Some(exit))
                }
                None => (None, None),
            };
            cleanup(&files, pid, exit).await;
        }
        result
    }

    async fn boot_in(
        spec: &BootSpec<'_>,
        files: &VmFiles,
        started: &mut Option<Started>,
    ) -> Result<Vm> {
        share::create_share(&files.paths.shared, &HostMounter)?;
        if let Some(dir) = files.paths.console.parent() {
            DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(ShimError::io("create", dir))?;
        }
        let log =
            File::create(&files.log_file).map_err(ShimError::io("create", &files.log_file))?;
        let log_err = log
            .try_clone()
            .map_err(ShimError::io("duplicate", &files.log_file))?;
        let mut command = tokio::process::Command::new(&spec.config.vmm.path);
        command
            .args(vmm_args(spec.config, spec.size, &files.paths))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        die_with_the_shim(&mut command);
        let mut child = command
            .spawn()
            .map_err(ShimError::io("start", &spec.config.vmm.path))?;
        let pid = child.id().unwrap_or(0);
        let (exit_tx, exit_rx) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        let watched = (spec.id.clone(), files.clone(), stopping.clone());
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("wait failed: {err}"),
            };
            let (id, files, stopping) = watched;
            if !stopping.load(Ordering::SeqCst) {
                report_unexpected_exit(&id, &files, &status);
            }
            let _ = exit_tx.send(Some(status));
        });
        *started = Some((pid, exit_rx.clone(), stopping.clone()));
        fs::write(&files.pid_file, pid.to_string())
            .map_err(ShimError::io("write", &files.pid_file))?;
        info!(sandbox = %spec.id, pid, vcpus = spec.size.vcpus, memory_mib = spec.size.memory_mib, "husk-vmm started");

        let agent = connect_agent(files, exit_rx.clone()).await?;
        let storage = Storage {
            source: SHARE_TAG.to_owned(),
            fstype: "virtiofs".to_owned(),
            mount_point: GUEST_SHARE_DIR.to_owned(),
            ..Default::default()
        };
        let request = CreateSandboxRequest {
            sandbox_id: spec.id.to_string(),
            hostname: spec.hostname.clone(),
            storages: vec![storage],
            ..Default::default()
        };
        agent.create_sandbox(&request).await?;
        Ok(Vm {
            id: spec.id.clone(),
            files: files.clone(),
            agent,
            vmm_pid: pid,
            vmm_exit: exit_rx,
            stopping,
        })
    }

    /// Whether husk-vmm has exited.
    pub fn exited(&self) -> Option<String> {
        self.vmm_exit.borrow().clone()
    }

    /// Stops the guest and husk-vmm and removes every file of the sandbox.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.exited().is_none() {
            let mut agent = self.agent.clone();
            agent.set_timeout(DESTROY_TIMEOUT);
            if let Err(err) = agent.destroy_sandbox(self.id.as_str()).await {
                warn!(sandbox = %self.id, %err, "DestroySandbox failed; stopping the VM anyway");
            }
        }
        cleanup(&self.files, Some(self.vmm_pid), Some(self.vmm_exit.clone())).await;
    }
}

/// Makes husk-vmm receive SIGKILL when the shim dies (killed, crashed), so no VM outlives
/// its shim even before containerd runs the `delete` command, which then only removes files
/// and mounts. The kernel sends it when the thread that spawned husk-vmm ends: a worker thread
/// of the shim's tokio runtime, which lives as long as the shim.
fn die_with_the_shim(command: &mut tokio::process::Command) {
    let shim = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl and
    // getppid (async-signal-safe) on integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The shim died between fork and prctl: do not start an orphan VM.
            if u32::try_from(libc::getppid()).ok() != Some(shim) {
                return Err(std::io::Error::other("the shim exited"));
            }
            Ok(())
        });
    }
}

/// husk-vmm's command line: the runtime's, with the share when it does not carry it yet.
fn vmm_args(config: &Config, size: VmSize, paths: &SandboxPaths) -> Vec<OsString> {
    let mut args = sandbox::vmm_args(config, size, paths);
    if !args.iter().any(|a| a == "--fs") {
        let mut fs = paths.shared.clone().into_os_string();
        fs.push(format!(",tag={SHARE_TAG}"));
        args.push("--fs".into());
        args.push(fs);
    }
    args
}

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn connect_agent(
    files: &VmFiles,
    mut vmm_exit: watch::Receiver<Option<String>>,
) -> Result<AgentClient> {
    let uds = files.paths.vsock.clone();
    // Set when this function returns, so the blocking attempts stop with it (a shim whose VM died
    // while booting would otherwise keep a thread, and its own exit, waiting for BOOT_TIMEOUT).
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let cancelled = Arc::clone(&cancel.0);
    let connect = tokio::task::spawn_blocking(move || {
        vsock::connect_unless(&uds, AGENT_PORT, BOOT_TIMEOUT, &cancelled)
    });
    let exited = async {
        loop {
            if let Some(status) = vmm_exit.borrow().clone() {
                return status;
            }
            if vmm_exit.changed().await.is_err() {
                return "unknown status".to_owned();
            }
        }
    };
    let stream = tokio::select! {
        joined = connect => joined
            .map_err(|err| ShimError::io("connect to", &files.paths.vsock)(std::io::Error::other(err)))??,
        status = exited => return Err(ShimError::VmmExited {
            doing: "booting",
            status,
            log_tail: husk_runtime::supervisor::log_tail(&files.log_file),
        }),
    };
    stream
        .set_nonblocking(true)
        .map_err(ShimError::io("configure", &files.paths.vsock))?;
    let socket = ttrpc::r#async::transport::Socket::try_from(stream)
        .map_err(ShimError::io("use", &files.paths.vsock))?;
    Ok(AgentClient::from_socket(socket).await?)
}

/// Stops husk-vmm (`pid`; SIGTERM, then SIGKILL after a grace period) and removes the sandbox's
/// files: share (unmounted first), pid file, log, console log, directory.
pub async fn cleanup(
    files: &VmFiles,
    pid: Option<u32>,
    exit: Option<watch::Receiver<Option<String>>>,
) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 0) {
        stop_vmm(Pid::from_raw(pid), exit).await;
    }
    remove_files(files);
}

async fn stop_vmm(pid: Pid, exit: Option<watch::Receiver<Option<String>>>) {
    let Some(mut exit) = exit else {
        // Not our child (the `delete` command): the process may be gone or reused; SIGKILL
        // only what still runs husk-vmm.
        if is_vmm(pid) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        return;
    };
    if exit.borrow().is_some() {
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    let stopped = tokio::time::timeout(STOP_GRACE, exit.wait_for(|s| s.is_some()))
        .await
        .is_ok();
    if !stopped {
        warn!(
            pid = pid.as_raw(),
            "husk-vmm did not stop after SIGTERM; killing it"
        );
        let _ = kill(pid, Signal::SIGKILL);
        let _ = tokio::time::timeout(STOP_GRACE, exit.wait_for(|s| s.is_some())).await;
    }
}

/// Whether `pid` runs a program named husk-vmm (guards against PID reuse).
fn is_vmm(pid: Pid) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end() == "husk-vmm")
        .unwrap_or(false)
}

fn remove_files(files: &VmFiles) {
    let paths = &files.paths;
    if let Err(err) = share::remove_share(&paths.shared, &HostMounter, &share::read_mountinfo) {
        warn!(%err, "cannot remove the share; leaving the sandbox directory");
        return;
    }
    for file in [
        &files.pid_file,
        &files.log_file,
        &paths.vsock,
        &paths.console,
    ] {
        match fs::remove_file(file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => warn!(path = %file.display(), %err, "cannot remove"),
        }
    }
    match fs::remove_dir(&paths.dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => warn!(path = %paths.dir.display(), %err, "cannot remove the sandbox directory"),
    }
}

/// The `delete` command's cleanup of sandbox `id` after the shim died: kills husk-vmm if it
/// still runs and removes the sandbox's files. Nothing to do when the sandbox does not exist.
pub async fn cleanup_leftovers(config: &Config, id: &ContainerId) -> Result<()> {
    let files = VmFiles::new(config, id)?;
    if !files.paths.dir.exists() {
        return Ok(());
    }
    let pid = fs::read_to_string(&files.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    cleanup(&files, pid, None).await;
    Ok(())
}
