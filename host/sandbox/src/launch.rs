//! Launching husk-vmm: the one place in husk that starts it ([`ProcessLauncher`]), behind the
//! [`Launcher`] trait so the front ends can be tested with [`crate::fake::FakeLauncher`].

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_vmm_config::VmmConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::cgroup::{self, CgroupError, Placement};
use crate::guest::{self, GuestError, SharedGuest};
use crate::process::Recorded;

/// Errors starting husk-vmm.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A file of the sandbox could not be made.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Its host cgroup could not be made or limited.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// husk-vmm could not be started.
    #[error("cannot start husk-vmm ({program}): {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How one VM is started.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The husk-vmm binary (configuration `vmm.path`).
    pub program: PathBuf,
    /// Its command line, typed.
    pub config: VmmConfig,
    /// husk-vmm's standard output and error go here (created 0600, appended to).
    pub log: PathBuf,
    /// husk-vmm's PID and start time are written here ([`Recorded::to_text`]).
    pub pid_file: PathBuf,
    /// The host cgroup husk-vmm starts in, made and limited first ([`cgroup::prepare`]);
    /// `None`: its parent's.
    pub cgroup: Option<Placement>,
}

/// Starts VMs.
pub trait Launcher: Send + Sync {
    /// Starts the VM `spec` describes. It is killed when the launching thread's process dies.
    fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn Vmm>, LaunchError>;
}

/// A started VM, as its sandbox sees it.
#[async_trait]
pub trait Vmm: Send + Sync {
    /// The monitor's host PID (what containerd and engines are told is the task's PID).
    fn pid(&self) -> u32;
    /// `Some(description of its exit status)` once the monitor has exited.
    fn exit(&self) -> watch::Receiver<Option<String>>;
    /// Connects to the agent in the guest through the VM's vsock socket `vsock`, retrying until
    /// `timeout` or until `cancel` is set.
    async fn connect(
        &self,
        vsock: &Path,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
    ) -> Result<SharedGuest, GuestError>;
    /// Sends `signal` to the monitor, unless it has already exited.
    fn signal(&self, signal: Signal);
}

/// Starts the real husk-vmm.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessLauncher;

impl Launcher for ProcessLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn Vmm>, LaunchError> {
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| LaunchError::Io {
                action,
                path,
                source,
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&spec.log)
            .map_err(io("create", &spec.log))?;
        let log_err = log.try_clone().map_err(io("duplicate", &spec.log))?;
        let mut command = tokio::process::Command::new(&spec.program);
        command
            .args(spec.config.to_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        if let Some(placement) = &spec.cgroup {
            cgroup::prepare(Path::new(cgroup::CGROUP_ROOT), placement)?;
            tracing::debug!(cgroup = %placement.dir.display(), limits = ?placement.limits, "husk-vmm's host cgroup is ready");
            let procs = placement.dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(io("open", &procs))?;
            start_in_cgroup(&mut command, file);
        }
        let mut child = command.spawn().map_err(|source| LaunchError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let record = Recorded::of(i32::try_from(pid).unwrap_or(0));
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("wait failed: {err}"),
            };
            let _ = exit_tx.send(Some(status));
        });
        let vmm = ProcessVmm { pid, exit: exit_rx };
        let dir = spec.pid_file.parent().unwrap_or(Path::new("/"));
        let name = spec
            .pid_file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("vmm.pid");
        crate::files::write_atomic(dir, name, record.to_text().as_bytes())
            .map_err(io("write", &spec.pid_file))?;
        Ok(Box::new(vmm))
    }
}

/// Makes husk-vmm receive SIGKILL when the process that started it dies (killed, crashed), so
/// no VM outlives its shim or supervisor. The kernel sends it when the spawning thread ends: for
/// the shim a worker thread of its tokio runtime, which lives as long as the shim.
fn die_with_parent(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl and
    // getppid (async-signal-safe) on integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died between fork and prctl: do not start an orphan VM.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the parent exited"));
            }
            Ok(())
        });
    }
}

/// Makes husk-vmm join the cgroup whose `cgroup.procs` is `procs` before it runs, so all of its
/// memory and threads are accounted there from the start. The file is open with close-on-exec;
/// the command owns it and closes it in the parent once spawned.
fn start_in_cgroup(command: &mut tokio::process::Command, procs: std::fs::File) {
    use std::os::fd::AsRawFd;
    let fd = procs.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and calls only write(2)
    // (async-signal-safe) on an fd that `procs`, moved into the closure, keeps open; it
    // allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let _keep_open = &procs;
            let pid = b"0";
            if libc::write(fd, pid.as_ptr().cast(), pid.len()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A husk-vmm child process.
struct ProcessVmm {
    pid: u32,
    exit: watch::Receiver<Option<String>>,
}

#[async_trait]
impl Vmm for ProcessVmm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn exit(&self) -> watch::Receiver<Option<String>> {
        self.exit.clone()
    }

    async fn connect(
        &self,
        vsock: &Path,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
    ) -> Result<SharedGuest, GuestError> {
        let client = guest::connect_unless(vsock, timeout, cancel).await?;
        Ok(Arc::new(client))
    }

    fn signal(&self, signal: Signal) {
        // Our own child is not reaped before `exit` is set, so the PID cannot be reused yet.
        if self.exit.borrow().is_some() {
            return;
        }
        if let Some(pid) = i32::try_from(self.pid).ok().filter(|p| *p > 0) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}
