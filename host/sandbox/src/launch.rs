//! Launching husk-vmm: the one place in husk that starts it ([`ProcessLauncher`]), behind the
//! [`Launcher`] trait so the front ends can be tested with [`crate::fake::FakeLauncher`].

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_vmm_config::VmmConfig;
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use crate::cgroup::{self, CgroupError, Placement};
use crate::guest::{self, GuestError, SharedGuest};
use crate::process::Recorded;
use crate::spawn::{self, SpawnSpec};

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
        let cgroup = match &spec.cgroup {
            Some(placement) => {
                cgroup::prepare(Path::new(cgroup::CGROUP_ROOT), placement)?;
                tracing::debug!(cgroup = %placement.dir.display(), limits = ?placement.limits, "husk-vmm's host cgroup is ready");
                let dir = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY)
                    .open(&placement.dir)
                    .map_err(io("open", &placement.dir))?;
                Some(dir)
            }
            None => None,
        };
        let args = spec.config.to_args();
        let spawned = spawn::spawn(&SpawnSpec {
            program: &spec.program,
            args: &args,
            stdout: &log,
            stderr: &log_err,
            cgroup: cgroup.as_ref(),
        })
        .map_err(|source| LaunchError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        let pid = spawned.pid;
        let record = Recorded::of(i32::try_from(pid).unwrap_or(0));
        let pidfd = Arc::new(spawned.pidfd);
        let (exit_tx, exit_rx) = watch::channel(None);
        let waited = pidfd.clone();
        tokio::spawn(async move {
            // Killed if this task is dropped before husk-vmm exited (the runtime shutting down).
            let guard = KillOnDrop(Some(waited.clone()));
            let status = match wait_exit(waited).await {
                Ok(status) => status.to_string(),
                Err(err) => format!("wait failed: {err}"),
            };
            std::mem::forget(guard);
            let _ = exit_tx.send(Some(status));
        });
        let vmm = ProcessVmm {
            pid,
            pidfd,
            exit: exit_rx,
        };
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

/// Sends SIGKILL through the pidfd when dropped (unless forgotten).
struct KillOnDrop(Option<Arc<OwnedFd>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pidfd) = self.0.take() {
            let _ = spawn::send_signal(&pidfd, libc::SIGKILL);
        }
    }
}

/// Waits until the process of `pidfd` exits (its pidfd becomes readable), then reaps it.
async fn wait_exit(pidfd: Arc<OwnedFd>) -> std::io::Result<std::process::ExitStatus> {
    // SAFETY: the Arc keeps the pidfd open, and always the same descriptor, for as long as the
    // AsyncFd (which holds a clone of it) lives.
    let ready = unsafe { AsyncFd::register_with_interest(pidfd.clone(), Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _ = ready.readable().await?;
    tokio::task::spawn_blocking(move || spawn::wait(&pidfd))
        .await
        .map_err(std::io::Error::other)?
}

/// A husk-vmm child process.
struct ProcessVmm {
    pid: u32,
    pidfd: Arc<OwnedFd>,
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
        // Through the pidfd: this very process, even if its PID were reused after it exited.
        if self.exit.borrow().is_some() {
            return;
        }
        let _ = spawn::send_signal(&self.pidfd, signal as i32);
    }
}
