//! One sandbox: a microVM started by husk, its agent connection and its share. Both front ends
//! (the OCI runtime's supervisor and the containerd shim) boot, watch and stop their VMs here.
//!
//! ```text
//! <root>/<id>/                  the sandbox directory (SandboxPaths)
//!   vm/vsock                    husk-vmm's hybrid vsock socket (agent: CONNECT 1024); vm/ is
//!                               the one host directory husk-vmm's jail keeps
//!   shared/                     the virtio-fs share (crate::share), tag husk-shared
//!   shared/<container>/...      each container's rootfs and mounts, bound in
//!   vmm.pid                     husk-vmm's PID and start time (crate::process::Recorded)
//!   vmm.log                     husk-vmm's standard output and error
//! <console.log_dir>/<id>.log    the guest console
//! ```

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use husk_agent_protocol::agent::{CreateSandboxRequest, Storage};
use husk_agent_protocol::ClientError;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::cgroup::{self, Placement};
use crate::config::Config;
use crate::files::{self, log_tail};
use crate::guest::{GuestError, SharedGuest};
use crate::id::ContainerId;
use crate::launch::{LaunchError, LaunchSpec, Launcher, ProcessLauncher, Vmm};
use crate::paths::{self, PathError, SandboxPaths, SHARE_TAG};
use crate::process::Recorded;
use crate::share::{self, HostMounter, Mounts, ShareError, SharePlan, GUEST_SHARE_DIR};
use crate::sizing::VmSize;
use crate::stall::Watched;

/// The file of an [`Layout::OwnDirectory`] sandbox that records its host cgroup, for the
/// cleanup after its VMM is gone.
pub const CGROUP_RECORD: &str = "vmm.cgroup";

/// How long the guest may take from husk-vmm's start to the agent's answer (nested, emulated
/// hosts are slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long husk-vmm gets to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long `DestroySandbox` may take at teardown.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(5);
/// The program name of husk-vmm (for the PID-reuse check of a recorded PID).
pub const VMM_COMM: &str = "husk-vmm";

/// Why a sandbox could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Launch(#[from] LaunchError),

    #[error("cannot reach husk-agent: {0}")]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The sandbox directory exists already (a shim of the same ID, or leftovers).
    #[error("sandbox {id} exists already ({dir})")]
    AlreadyExists { id: String, dir: PathBuf },
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// husk-vmm ended before the sandbox was ready.
    #[error(
        "husk-vmm exited ({status}) before the agent answered; its log ({log}) ends with: {tail}"
    )]
    VmmExited {
        status: String,
        log: PathBuf,
        tail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SandboxError {
    let path = path.to_path_buf();
    move |source| SandboxError::Io {
        action,
        path,
        source,
    }
}

/// What a sandbox needs from the host: how VMs are launched and how the share is mounted.
/// [`Host::real`] in production; fakes ([`crate::fake`]) in tests.
#[derive(Clone)]
pub struct Host {
    pub launcher: Arc<dyn Launcher>,
    pub mounts: Arc<dyn Mounts>,
}

impl Host {
    /// husk-vmm processes and the host's mount calls.
    pub fn real() -> Host {
        Host {
            launcher: Arc::new(ProcessLauncher),
            mounts: Arc::new(HostMounter),
        }
    }
}

/// Who owns the sandbox directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The sandbox makes `<root>/<id>` (it must not exist) and removes it, with the logs, at
    /// shutdown (the shim).
    OwnDirectory,
    /// The directory exists and holds other files (the runtime's container state): shutdown
    /// removes only what the running VM needed (share, socket, PID file) and keeps the logs for
    /// `delete`.
    InDirectory,
}

/// What a VM is booted with.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    pub id: &'a ContainerId,
    pub config: &'a Config,
    pub size: VmSize,
    /// The guest's hostname (empty: the agent's default).
    pub hostname: String,
    pub paths: SandboxPaths,
    pub layout: Layout,
    /// The host cgroup husk-vmm runs in, with its limits (`None`: the caller's cgroup).
    pub cgroup: Option<Placement>,
}

/// A running microVM with its agent.
pub struct Sandbox {
    id: ContainerId,
    paths: SandboxPaths,
    layout: Layout,
    host: Host,
    guest: SharedGuest,
    vmm: Box<dyn Vmm>,
    /// Set once husk stops the VM itself (an exit after that is expected).
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vmm_pid", &self.vmm.pid())
            .finish_non_exhaustive()
    }
}

/// Sets its flag when dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Sandbox {
    /// Creates the sandbox's share, starts husk-vmm, waits for the agent (at most
    /// [`BOOT_TIMEOUT`], less if husk-vmm exits) and creates the guest sandbox. On failure
    /// everything made is removed again.
    pub async fn boot(host: &Host, spec: BootSpec<'_>) -> Result<Sandbox, SandboxError> {
        let paths = &spec.paths;
        if spec.layout == Layout::OwnDirectory {
            let parent = paths.dir.parent().unwrap_or(Path::new("/"));
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err("create", parent))?;
            match DirBuilder::new().mode(0o700).create(&paths.dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(SandboxError::AlreadyExists {
                        id: spec.id.to_string(),
                        dir: paths.dir.clone(),
                    })
                }
                Err(err) => return Err(io_err("create", &paths.dir)(err)),
            }
        }
        let mut launched = None;
        let stopping = Arc::new(AtomicBool::new(false));
        let result = boot_in(host, &spec, &mut launched, &stopping).await;
        if result.is_err() {
            stopping.store(true, Ordering::SeqCst);
            if let Some(vmm) = launched.as_deref() {
                stop_vmm(vmm).await;
            }
            if let Err(err) = remove_files(host, paths, spec.layout) {
                warn!(sandbox = %spec.id, %err, "cannot remove the share of a failed boot");
            }
        }
        let (guest, vmm) = result?;
        Ok(Sandbox {
            id: spec.id.clone(),
            paths: spec.paths.clone(),
            layout: spec.layout,
            host: host.clone(),
            guest,
            vmm,
            stopping,
        })
    }

    /// The sandbox's ID.
    pub fn id(&self) -> &ContainerId {
        &self.id
    }

    /// Its files.
    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    /// The agent in its guest.
    pub fn guest(&self) -> &SharedGuest {
        &self.guest
    }

    /// husk-vmm's host PID.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid()
    }

    /// `Some(status)` once husk-vmm has exited.
    pub fn exited(&self) -> Option<String> {
        self.vmm.exit().borrow().clone()
    }

    /// Resolves with husk-vmm's exit status once it has exited.
    pub async fn wait_exit(&self) -> String {
        wait_exit(self.vmm.exit()).await
    }

    /// Binds a container's rootfs and mounts (`plan`) into the share, under `shared/<id>/`.
    pub fn share(&self, plan: &SharePlan) -> Result<(), ShareError> {
        share::bind_all(self.paths.share(), plan, self.host.mounts.as_ref())
    }

    /// Unmounts and removes a container's part of the share (`<container>/` on both sides).
    pub fn unshare(&self, container: &str) {
        let mounts = self.host.mounts.as_ref();
        let removed = share::remove_container(self.paths.share(), container, mounts, &|| {
            mounts.mountinfo()
        });
        if let Err(err) = removed {
            warn!(%container, %err, "cannot remove the container's share");
        }
    }

    /// Stops the guest (`DestroySandbox`, bounded) and husk-vmm (SIGTERM, SIGKILL after
    /// [`STOP_GRACE`]) and removes the sandbox's files (see [`Layout`]).
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if self.exited().is_none() {
            let destroyed = tokio::time::timeout(
                DESTROY_TIMEOUT,
                self.guest.destroy_sandbox(self.id.as_str()),
            )
            .await;
            match destroyed {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    warn!(sandbox = %self.id, %err, "DestroySandbox failed; stopping the VM anyway")
                }
                Err(_) => {
                    warn!(sandbox = %self.id, "DestroySandbox timed out; stopping the VM anyway")
                }
            }
        }
        stop_vmm(self.vmm.as_ref()).await;
        if let Err(err) = remove_files(&self.host, &self.paths, self.layout) {
            warn!(sandbox = %self.id, %err, "cannot remove the share; leaving the sandbox directory");
        }
        info!(sandbox = %self.id, "sandbox stopped");
    }
}

type Booted = (SharedGuest, Box<dyn Vmm>);

async fn boot_in(
    host: &Host,
    spec: &BootSpec<'_>,
    launched: &mut Option<Box<dyn Vmm>>,
    stopping: &Arc<AtomicBool>,
) -> Result<Booted, SandboxError> {
    let paths = &spec.paths;
    let mounts = host.mounts.as_ref();
    share::create_share(paths.share(), mounts)?;
    if let Some(dir) = paths.vsock.parent() {
        DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .or_else(|err| match err.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(err),
            })
            .map_err(io_err("create husk-vmm's directory", dir))?;
    }
    if let Some(dir) = paths.console.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create the console log directory", dir))?;
    }
    if let Some(placement) = &spec.cgroup {
        if spec.layout == Layout::OwnDirectory {
            // Recorded first, so a cleanup after a crash finds it even if the rest failed.
            let record = paths.dir.join(CGROUP_RECORD);
            files::write_atomic(
                &paths.dir,
                CGROUP_RECORD,
                placement.dir.as_os_str().as_encoded_bytes(),
            )
            .map_err(io_err("write", &record))?;
        }
    }
    let launch = LaunchSpec {
        program: spec.config.vmm.path.clone(),
        config: paths::vmm_config(spec.config, spec.size, paths)?,
        log: paths.vmm_log.clone(),
        pid_file: paths.vmm_pid.clone(),
        cgroup: spec.cgroup.clone(),
    };
    let started = Instant::now();
    let vmm = launched.insert(host.launcher.launch(&launch)?);
    info!(
        sandbox = %spec.id,
        pid = vmm.pid(),
        vcpus = spec.size.vcpus,
        memory_mib = spec.size.memory_mib,
        "husk-vmm started"
    );
    watch_exit(spec.id, paths, vmm.exit(), stopping.clone());
    // Set when this function returns, so the blocking attempts stop with it (a VM that died
    // while booting would otherwise keep a thread waiting for BOOT_TIMEOUT).
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let guest = tokio::select! {
        guest = vmm.connect(&paths.vsock, BOOT_TIMEOUT, cancel.0.clone()) => guest?,
        status = wait_exit(vmm.exit()) => return Err(SandboxError::VmmExited {
            status,
            log: paths.vmm_log.clone(),
            tail: log_tail(&paths.vmm_log),
        }),
    };
    debug!(sandbox = %spec.id, ms = started.elapsed().as_millis(), "agent connected");
    let guest: SharedGuest = Arc::new(Watched::new(guest, spec.id.as_str(), paths, vmm.pid()));
    let request = CreateSandboxRequest {
        sandbox_id: spec.id.to_string(),
        hostname: spec.hostname.clone(),
        storages: vec![Storage {
            source: SHARE_TAG.to_owned(),
            fstype: "virtiofs".to_owned(),
            mount_point: GUEST_SHARE_DIR.to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    };
    guest.create_sandbox(&request).await?;
    let Some(vmm) = launched.take() else {
        return Err(SandboxError::Io {
            action: "keep track of",
            path: paths.vmm_pid.clone(),
            source: io::Error::other("husk-vmm handle lost"),
        });
    };
    Ok((guest, vmm))
}

async fn wait_exit(mut exit: watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(status) = exit.borrow().clone() {
            return status;
        }
        if exit.changed().await.is_err() {
            return "unknown status".to_owned();
        }
    }
}

/// Logs husk-vmm's exit while its sandbox was meant to run (a guest crash, a VMM failure, a
/// kill from outside), with the end of its log and of the guest console: the sandbox's files
/// may be removed at teardown, so this is what is left to explain the exit.
fn watch_exit(
    id: &ContainerId,
    paths: &SandboxPaths,
    exit: watch::Receiver<Option<String>>,
    stopping: Arc<AtomicBool>,
) {
    let id = id.clone();
    let paths = paths.clone();
    tokio::spawn(async move {
        let status = wait_exit(exit).await;
        if !stopping.load(Ordering::SeqCst) {
            warn!(
                sandbox = %id,
                %status,
                vmm_log = %log_tail(&paths.vmm_log),
                console = %log_tail(&paths.console),
                "husk-vmm exited unexpectedly"
            );
        }
    });
}

/// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns once husk-vmm has exited (or a second
/// grace period after SIGKILL).
async fn stop_vmm(vmm: &dyn Vmm) {
    let mut exit = vmm.exit();
    if exit.borrow().is_some() {
        return;
    }
    vmm.signal(Signal::SIGTERM);
    let stopped = tokio::time::timeout(STOP_GRACE, exit.wait_for(|s| s.is_some()))
        .await
        .is_ok();
    if !stopped {
        warn!(
            pid = vmm.pid(),
            "husk-vmm did not stop after SIGTERM; killing it"
        );
        vmm.signal(Signal::SIGKILL);
        let _ = tokio::time::timeout(STOP_GRACE, exit.wait_for(|s| s.is_some())).await;
    }
}

/// Removes the share (unmounted first), then the files of the sandbox that `layout` says are
/// its own. A share that cannot be unmounted keeps the directory (nothing behind a mount is
/// ever deleted).
fn remove_files(host: &Host, paths: &SandboxPaths, layout: Layout) -> Result<(), ShareError> {
    let mounts = host.mounts.as_ref();
    share::remove_share(paths.share(), mounts, &|| mounts.mountinfo())?;
    let mut files = vec![&paths.vmm_pid, &paths.vsock];
    if layout == Layout::OwnDirectory {
        files.extend([&paths.vmm_log, &paths.console]);
    }
    for file in files {
        if let Err(err) = files::remove_if_exists(file) {
            warn!(path = %file.display(), %err, "cannot remove");
        }
    }
    // husk-vmm's directory: its sockets are gone with it (a VM that had guest-initiated
    // listeners next to its socket leaves them to their owners).
    if let Some(dir) = paths.vsock.parent() {
        match fs::remove_dir(dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => warn!(path = %dir.display(), %err, "cannot remove husk-vmm's directory"),
        }
    }
    if layout == Layout::OwnDirectory {
        remove_recorded_cgroup(paths);
        match fs::remove_dir(&paths.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                warn!(path = %paths.dir.display(), %err, "cannot remove the sandbox directory")
            }
        }
    }
    Ok(())
}

/// Removes the host cgroup recorded in the sandbox directory (husk-vmm has exited), then the
/// record. A record naming anything but a directory under the cgroup root is ignored.
fn remove_recorded_cgroup(paths: &SandboxPaths) {
    let record = paths.dir.join(CGROUP_RECORD);
    let Ok(text) = fs::read(&record) else {
        return;
    };
    let dir =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(text));
    let root = Path::new(cgroup::CGROUP_ROOT);
    let safe = dir.strip_prefix(root).is_ok_and(|rest| {
        rest.components().count() > 0
            && rest
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    if !safe {
        warn!(record = %record.display(), "ignoring a cgroup record outside {}", root.display());
    } else if let Err(err) = cgroup::remove(&dir) {
        warn!(%err, "cannot remove the sandbox's host cgroup");
    }
    if let Err(err) = files::remove_if_exists(&record) {
        warn!(path = %record.display(), %err, "cannot remove");
    }
}

/// Makes sure the sandbox whose process that ran it is gone (a killed shim or supervisor) has
/// no husk-vmm left and no share mounted: stops the recorded husk-vmm (only while it is still
/// that process) and removes the files `layout` says are the sandbox's. Nothing to do when the
/// sandbox directory does not exist.
pub fn cleanup_leftovers(
    host: &Host,
    paths: &SandboxPaths,
    layout: Layout,
) -> Result<(), ShareError> {
    if !paths.dir.exists() {
        return Ok(());
    }
    if let Some(vmm) = recorded_vmm(paths) {
        vmm.stop(Some(VMM_COMM), STOP_GRACE);
    }
    remove_files(host, paths, layout)
}

/// The husk-vmm recorded in the sandbox's PID file.
pub fn recorded_vmm(paths: &SandboxPaths) -> Option<Recorded> {
    fs::read_to_string(&paths.vmm_pid)
        .ok()
        .and_then(|text| Recorded::parse(&text))
}
