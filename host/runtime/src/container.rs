//! What the sandbox verbs share: creating a container (the CLI side of `create` and `run`),
//! locking an existing one with its refreshed status, reaching its agent, removing it.

use std::path::Path;
use std::process::Child;

use husk_agent_protocol::AgentClient;
use oci_spec::runtime::{ContainerState, Spec, State, StateBuilder};
use tokio::runtime::Runtime;

use crate::exit;
use crate::hooks::{self, HookError, HookKind};
use crate::id::ContainerId;
use crate::lifecycle::{self, NotAllowed, Operation};
use crate::options::Options;
use crate::store::{self, ContainerLock, Record, Store, StoreError, RECORD_VERSION};
use crate::supervisor::{self, Launch, Prepared, SupervisorError};
use husk_sandbox::guest::{self, GuestError};
use husk_sandbox::paths::SandboxPaths;

/// Why creating, locking or removing a container failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Hook(#[from] HookError),
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    /// The container's state or spec cannot be serialised.
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

impl ContainerError {
    /// The exit status for this error (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ContainerError::Store(err) => err.exit_code(),
            ContainerError::Supervisor(err) => err.exit_code(),
            ContainerError::Hook(_) | ContainerError::NotAllowed(_) | ContainerError::Output(_) => {
                exit::FAILURE
            }
        }
    }
}

/// The container's spec as `create` loaded it (for the hooks of `start` and `delete`, and the
/// defaults of `exec`), in its state directory.
pub const SPEC_FILE: &str = "spec.json";

/// The spec saved by `create`, if it can be read.
pub fn saved_spec(dir: &Path) -> Option<Spec> {
    let path = dir.join(SPEC_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(spec) => Some(spec),
        Err(err) => {
            tracing::warn!("cannot read {}: {err}", path.display());
            None
        }
    }
}

/// What `create` was asked for.
#[derive(Debug, Clone)]
pub struct CreateRequest<'a> {
    pub id: &'a ContainerId,
    pub bundle: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub pid_file: Option<&'a Path>,
    /// `run` without `--detach`: a terminal may use husk's own standard input and output.
    pub foreground: bool,
}

/// A created container: its lock (still held) and its supervisor (a child of this process).
#[derive(Debug)]
pub struct Created {
    pub lock: ContainerLock,
    pub supervisor: Child,
}

/// The OCI state JSON given to hooks.
fn state_bytes(state: &State) -> Vec<u8> {
    serde_json::to_vec(state).unwrap_or_default()
}

fn record(
    id: &ContainerId,
    prepared: &Prepared,
    status: ContainerState,
    pid: i32,
) -> Result<Record, ContainerError> {
    let mut builder = StateBuilder::default()
        .version(oci_spec::runtime::VERSION)
        .id(id.as_str())
        .status(status)
        .pid(pid)
        .bundle(prepared.bundle.dir.clone());
    if let Some(annotations) = prepared.bundle.spec.annotations() {
        builder = builder.annotations(annotations.clone());
    }
    let oci = builder
        .build()
        .map_err(|e| ContainerError::Output(std::io::Error::other(e)))?;
    Ok(Record {
        version: RECORD_VERSION,
        oci,
        created: store::now_rfc3339(),
        rootfs: prepared.bundle.rootfs.clone(),
        pid_start_time: store::process_start_time(pid),
        paused: false,
    })
}

/// `create`: checks everything first (nothing is made for bad input), claims the ID, saves what
/// it decided for the supervisor, starts the supervisor, records the container as `created`,
/// writes the pid file and runs the `prestart` and `createRuntime` hooks. Any failure leaves
/// nothing behind.
pub fn create(options: &Options, request: &CreateRequest<'_>) -> Result<Created, ContainerError> {
    let id = request.id;
    let prepared = Prepared::load(
        options,
        id,
        request.bundle,
        request.console_socket,
        request.foreground,
    )?;
    let store = Store::new(&options.root);
    let lock = store.create(id)?;
    let own_pid = i32::try_from(std::process::id()).unwrap_or(0);
    let result = (|| {
        lock.save(&record(id, &prepared, ContainerState::Creating, own_pid)?)?;
        let spec = serde_json::to_vec(&prepared.bundle.spec)
            .map_err(|e| ContainerError::Output(std::io::Error::other(e)))?;
        store::write_atomic(lock.dir(), SPEC_FILE, &spec)?;
        prepared.save(lock.dir())?;
        let launch = Launch {
            id,
            console_socket: request.console_socket,
        };
        supervisor::spawn(options, &launch).map_err(ContainerError::from)
    })();
    let mut child = match result {
        Ok(child) => child,
        Err(err) => {
            discard(lock, &prepared, None);
            return Err(err);
        }
    };
    let pid = i32::try_from(child.id()).unwrap_or(0);
    let finish = (|| {
        let record = record(id, &prepared, ContainerState::Created, pid)?;
        lock.save(&record)?;
        if let Some(pid_file) = request.pid_file {
            store::write_pid_file(pid_file, pid)?;
        }
        let state = state_bytes(&record.oci);
        let hooks = prepared.bundle.spec.hooks().as_ref();
        hooks::run_hooks(HookKind::Prestart, hooks, &state)?;
        hooks::run_hooks(HookKind::CreateRuntime, hooks, &state)?;
        Ok::<_, ContainerError>(record)
    })();
    match finish {
        Ok(_) => Ok(Created {
            lock,
            supervisor: child,
        }),
        Err(err) => {
            let start = store::process_start_time(pid);
            discard(lock, &prepared, Some((pid, start)));
            let _ = child.wait();
            if let Some(pid_file) = request.pid_file {
                let _ = std::fs::remove_file(pid_file);
            }
            Err(err)
        }
    }
}

/// Undoes a container: its supervisor and husk-vmm are stopped, its share removed, then its
/// state directory and its console log. If the share cannot be removed the directory is kept (deleting through a
/// mount that survived would delete the user's files) and the reason is logged.
pub fn discard(lock: ContainerLock, prepared: &Prepared, supervisor: Option<(i32, Option<u64>)>) {
    if let Err(err) = remove(lock, &prepared.paths, supervisor) {
        tracing::error!("{err}");
    }
    // The console log lives outside the state directory; nothing of a failed create stays.
    if let Err(err) = husk_sandbox::files::remove_if_exists(&prepared.paths.console) {
        tracing::warn!("cannot remove {}: {err}", prepared.paths.console.display());
    }
    if let Some(dir) = &prepared.cgroup {
        if let Err(err) = crate::cgroup::remove(dir) {
            tracing::warn!("{err}");
        }
    }
}

/// Like [`discard`], returning the error.
pub fn remove(
    lock: ContainerLock,
    paths: &SandboxPaths,
    supervisor: Option<(i32, Option<u64>)>,
) -> Result<(), ContainerError> {
    supervisor::reap_sandbox(paths, supervisor).map_err(SupervisorError::from)?;
    lock.remove()?;
    Ok(())
}

/// An existing container, locked, with its record and its refreshed OCI state.
pub struct Locked {
    pub lock: ContainerLock,
    pub record: Record,
    pub state: State,
}

impl Locked {
    /// Locks container `id` and refreshes its status.
    pub fn acquire(options: &Options, id: &ContainerId) -> Result<Self, ContainerError> {
        let lock = Store::new(&options.root).lock(id)?;
        let record = lock.load()?;
        let state = record.current_state();
        Ok(Self {
            lock,
            record,
            state,
        })
    }

    /// Checks that `operation` is allowed now.
    pub fn check(&self, operation: Operation) -> Result<(), ContainerError> {
        lifecycle::check(
            self.lock.id(),
            *self.state.status(),
            self.record.paused,
            operation,
        )?;
        Ok(())
    }

    /// The container's vsock socket.
    pub fn vsock(&self) -> std::path::PathBuf {
        husk_sandbox::paths::vsock_path(self.lock.dir())
    }

    /// Connects to the container's agent.
    pub fn agent(&self) -> Result<(Runtime, AgentClient), GuestError> {
        guest::connect_blocking(&self.vsock())
    }

    /// The container's OCI state JSON (for hooks).
    pub fn state_bytes(&self) -> Vec<u8> {
        state_bytes(&self.state)
    }

    /// Saves the record with a new status (the PID and its start time are kept).
    pub fn save_status(&mut self, status: ContainerState) -> Result<(), ContainerError> {
        self.record.oci.set_status(status);
        self.lock.save(&self.record)?;
        self.state = self.record.current_state();
        Ok(())
    }

    /// The supervisor's PID and start time, as recorded.
    pub fn supervisor(&self) -> Option<(i32, Option<u64>)> {
        self.record
            .oci
            .pid()
            .map(|pid| (pid, self.record.pid_start_time))
    }
}
