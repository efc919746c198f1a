//! containerd's Task service, served by the shim over ttrpc.
//!
//! One shim runs one microVM (a [`Sandbox`]): the first container created boots it; containers
//! of the same pod (CRI annotations `io.kubernetes.cri.container-type=container` and
//! `io.kubernetes.cri.sandbox-id=<the VM's sandbox>`) join it. When the last container is
//! deleted, the VM is stopped and its files removed.
//!
//! Locking: the task table ([`State`]) is behind a synchronous mutex that is never held across
//! an `.await`, so no RPC waits for a VM's boot or an agent call made for another one (a State
//! or Kill of one container answers while another container of the pod is being created).
//! Whether a VM exists changes only under [`Inner::vm_lock`] (boot, and the shutdown after the
//! last delete), which only Create and that last Delete take. A process being started is
//! marked [`Status::Starting`] so that a second Start of it is refused while the first runs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::TtrpcResult;
use husk_agent_protocol::agent::{CreateContainerRequest, StdioMode};
use husk_sandbox::config::Config;
use husk_sandbox::id::ContainerId;
use husk_sandbox::paths::SandboxPaths;
use husk_sandbox::pump::OUTPUT_DRAIN;
use husk_sandbox::{bundle, cgroup, share, sizing, BootSpec, Host, Layout, Sandbox, SharedGuest};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::error::{Result, ShimError};
use crate::io::{PreparedIo, ProcessRef, StdioPaths};
use crate::metrics;
use crate::pod;
use crate::task::{Container, Exit, Process, Status};
use crate::vm;

#[cfg(test)]
mod tests;

/// Exit status reported for processes whose VM went away.
const VM_GONE_STATUS: u32 = 255;

/// How long the shim waits, once its last task is deleted after an earlier Shutdown, for the
/// Shutdown containerd 1.x sends next, before it exits on its own.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// The least time between two TaskOOM events of one container: a guest reporting the same
/// container's OOM kills in a loop gets one event per period.
const OOM_COALESCE: Duration = Duration::from_secs(1);

/// Where the service's events go: containerd ([`Remote`]), or a recorder in tests.
pub trait Events: Send + Sync {
    /// Publishes `event` on `topic` (in the background: never waits for containerd).
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>);
}

/// containerd's event service, through the publisher containerd-shim connected.
pub struct Remote {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl Remote {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Remote {
        Remote {
            publisher: Arc::new(publisher),
            namespace,
        }
    }
}

impl Events for Remote {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let publisher = self.publisher.clone();
        let namespace = self.namespace.clone();
        tokio::spawn(async move {
            if let Err(err) = publisher
                .publish(Context::default(), topic, &namespace, event)
                .await
            {
                warn!(topic, %err, "cannot publish event");
            }
        });
    }
}

/// Where the husk configuration comes from.
#[derive(Clone)]
pub enum ConfigSource {
    /// `HUSK_CONFIG` or /etc/husk/config.toml, read at each Create (see [`vm::load_config`]).
    Environment,
    /// This configuration.
    #[cfg_attr(not(test), allow(dead_code))]
    Fixed(Box<Config>),
}

/// What the service runs its sandboxes with.
#[derive(Clone)]
pub struct Settings {
    /// How VMs are launched and the share mounted.
    pub host: Host,
    /// The directory of the sandboxes.
    pub state_root: PathBuf,
    pub config: ConfigSource,
}

impl Settings {
    /// The real host, `HUSK_SHIM_ROOT`, `HUSK_CONFIG`.
    pub fn from_environment() -> Settings {
        Settings {
            host: Host::real(),
            state_root: vm::state_root(),
            config: ConfigSource::Environment,
        }
    }

    fn config(&self) -> Result<Config> {
        match &self.config {
            ConfigSource::Environment => vm::load_config(),
            ConfigSource::Fixed(config) => Ok(config.as_ref().clone()),
        }
    }
}

/// The task table.
#[derive(Default)]
struct State {
    vm: Option<Arc<Sandbox>>,
    containers: HashMap<String, Container>,
    /// Containers whose Create is under way (their IDs are taken; they keep the VM alive).
    creating: HashSet<String>,
    /// Every container this shim has created, kept after its Delete: the guest's report of an
    /// OOM kill can come after the task's exit was reported and the task deleted. Bounded by
    /// what containerd creates, never by the guest.
    ran: HashSet<String>,
    /// containerd sent Shutdown while tasks were left. containerd 1.x sends one after every
    /// task's Delete; containerd 2.x sends it after the sandbox's only (a pod's containers are
    /// deleted later, with no Shutdown of their own), so the shim must then end by itself once
    /// its last task is gone.
    shutdown_requested: bool,
}

impl State {
    /// No task is left or on its way.
    fn idle(&self) -> bool {
        self.containers.is_empty() && self.creating.is_empty()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Held while a VM is booted or stopped, so a Create never boots a VM into the directory of
    /// one being torn down.
    vm_lock: tokio::sync::Mutex<()>,
    events: Arc<dyn Events>,
    namespace: String,
    exit: Arc<ExitSignal>,
    settings: Settings,
}

/// The Task service of one shim.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

fn timestamp(at: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(at))
}

fn status_of(process: &Process, paused: bool) -> TaskStatus {
    match process.status {
        Status::Created | Status::Starting => TaskStatus::CREATED,
        Status::Running if paused => TaskStatus::PAUSED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

fn no_vm() -> ShimError {
    ShimError::FailedPrecondition("the sandbox VM is not running".into())
}

fn no_process(id: &str, exec_id: &str) -> ShimError {
    if exec_id.is_empty() {
        ShimError::NotFound(format!("task {id}"))
    } else {
        ShimError::NotFound(format!("exec {exec_id} of task {id}"))
    }
}

impl Service {
    pub fn new(
        events: Arc<dyn Events>,
        namespace: String,
        exit: Arc<ExitSignal>,
        settings: Settings,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                vm_lock: tokio::sync::Mutex::new(()),
                events,
                namespace,
                exit,
                settings,
            }),
        }
    }

    /// The task table (never held across an `.await`).
    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        self.inner.events.publish(topic, event);
    }

    /// The VM's guest, for a request about a task this shim runs.
    fn guest_for(&self, id: &str) -> Result<SharedGuest> {
        let state = self.state();
        if !state.containers.contains_key(id) {
            return Err(ShimError::NotFound(format!("task {id}")));
        }
        let vm = state.vm.as_ref().ok_or_else(no_vm)?;
        Ok(vm.guest().clone())
    }

    fn task_pid(&self) -> u32 {
        self.state().vm.as_ref().map(|v| v.vmm_pid()).unwrap_or(0)
    }

    async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let id =
            ContainerId::new(&req.id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unsupported("checkpoint/restore"));
        }
        {
            let mut state = self.state();
            if state.containers.contains_key(&req.id) || !state.creating.insert(req.id.clone()) {
                return Err(ShimError::AlreadyExists(format!("task {}", req.id)));
            }
        }
        let created = self.create_task(&id, req).await;
        let recorded = {
            let mut state = self.state();
            state.creating.remove(&req.id);
            let pid = state.vm.as_ref().map(|v| v.vmm_pid()).unwrap_or(0);
            created.map(|container| {
                state.ran.insert(req.id.clone());
                state.containers.insert(req.id.clone(), container);
                pid
            })
        };
        let task_pid = match recorded {
            Ok(pid) => pid,
            Err(err) => {
                self.stop_vm_if_idle().await;
                return Err(err);
            }
        };
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid: task_pid,
                ..Default::default()
            }),
        );
        info!(container = %req.id, "created");
        Ok(task_pid)
    }

    /// Prepares the container's stdio and rootfs, boots the VM when this container starts one,
    /// and creates the container in the guest.
    async fn create_task(
        &self,
        id: &ContainerId,
        req: &api::CreateTaskRequest,
    ) -> Result<Container> {
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io = PreparedIo::prepare(
            ProcessRef {
                container: &req.id,
                exec: "",
                namespace: &self.inner.namespace,
            },
            &stdio,
        )
        .await?;
        let bundle_dir = PathBuf::from(&req.bundle);
        let mounted_rootfs = mount_rootfs(&bundle_dir, &req.rootfs).await?;
        let created = self.create_in_vm(id, &bundle_dir, req.terminal).await;
        let (vm, pid) = match created {
            Ok(created) => created,
            Err(err) => {
                if let Some(rootfs) = &mounted_rootfs {
                    unmount_rootfs(rootfs);
                }
                return Err(err);
            }
        };
        let mut init = Process::new(stdio);
        init.pid = pid;
        let relays = io.start(vm.guest());
        init.stdin_close = relays.stdin_close;
        init.outputs = relays.outputs;
        Ok(Container {
            bundle: bundle_dir,
            mounted_rootfs,
            init,
            execs: HashMap::new(),
            paused: false,
        })
    }

    /// Boots the VM when this container starts one (or takes the running one it joins), shares
    /// its rootfs and mounts, and creates it in the guest. Returns the VM and the container's
    /// guest PID.
    async fn create_in_vm(
        &self,
        id: &ContainerId,
        bundle_dir: &Path,
        terminal: bool,
    ) -> Result<(Arc<Sandbox>, u32)> {
        let bundle = bundle::load(bundle_dir)?;
        let role = pod::role(&bundle.spec);
        let vm = self.vm_for(id, &bundle, &role).await?;
        let mut plan = share::plan(&bundle, id)?;
        pod::map_namespaces(&mut plan.guest_spec, &role)?;
        // A read-only root with mount points the image lacks (containerd's CRI plugin binds
        // /etc/resolv.conf into every sandbox, whose root is read-only): as runc does, the
        // mount points are made while the root is writable, and it becomes read-only after.
        // So the rootfs is shared writable; the guest spec keeps `root.readonly`, which the
        // agent applies once the container's mounts are in place.
        if let Some(rootfs) = plan.binds.first_mut() {
            rootfs.readonly = false;
        }
        vm.share(&plan)?;
        let mut spec = plan.guest_spec.clone();
        spec.set_hooks(None);
        let created = async {
            let spec_json = serde_json::to_vec(&spec)
                .map_err(|e| ShimError::InvalidArgument(format!("spec: {e}")))?;
            let request = CreateContainerRequest {
                container_id: id.to_string(),
                oci_spec_json: spec_json,
                rootfs_path: plan.guest_rootfs.to_string_lossy().into_owned(),
                stdio: if terminal {
                    StdioMode::STDIO_TERMINAL
                } else {
                    StdioMode::STDIO_PIPES
                }
                .into(),
                ..Default::default()
            };
            Ok(vm.guest().create_container(&request).await?)
        }
        .await;
        match created {
            Ok(pid) => Ok((vm, pid)),
            Err(err) => {
                vm.unshare(id.as_str());
                Err(err)
            }
        }
    }

    /// The VM container `id` runs in: the running one it belongs to, or a new one it boots.
    async fn vm_for(
        &self,
        id: &ContainerId,
        bundle: &bundle::Bundle,
        role: &pod::Role,
    ) -> Result<Arc<Sandbox>> {
        let _vm_lock = self.inner.vm_lock.lock().await;
        let running = self.state().vm.clone();
        match (running, role) {
            (Some(vm), pod::Role::Container { sandbox_id }) if vm.id().as_str() == sandbox_id => {
                Ok(vm)
            }
            (Some(vm), _) => Err(ShimError::FailedPrecondition(format!(
                "this shim runs the microVM of sandbox {}; container {id} does not belong to it",
                vm.id()
            ))),
            (None, pod::Role::Container { sandbox_id }) if sandbox_id.as_str() != id.as_str() => {
                Err(ShimError::FailedPrecondition(format!(
                    "container {id} belongs to sandbox {sandbox_id}, whose VM is not running in this shim"
                )))
            }
            (None, _) => {
                let config = self.inner.settings.config()?;
                let pod_resources = match role {
                    pod::Role::Sandbox => pod::sandbox_resources(&bundle.spec)?,
                    _ => None,
                };
                let resources = pod_resources.as_ref().or_else(|| {
                    bundle
                        .spec
                        .linux()
                        .as_ref()
                        .and_then(|l| l.resources().as_ref())
                });
                let size = sizing::vm_size(resources, &config)?;
                // The pod's VM runs in the sandbox container's cgroup, limited to its size.
                let cgroup = cgroup::of_spec(&bundle.spec, None)?.map(|dir| cgroup::Placement {
                    dir,
                    limits: cgroup::HostLimits::for_vm(
                        size,
                        resources,
                        config.vmm.host_memory_mib,
                    ),
                });
                let paths = SandboxPaths::new(&self.inner.settings.state_root, &config, id)?;
                let vm = Sandbox::boot(
                    &self.inner.settings.host,
                    BootSpec {
                        id,
                        config: &config,
                        size,
                        hostname: bundle.spec.hostname().clone().unwrap_or_default(),
                        paths,
                        layout: Layout::OwnDirectory,
                        cgroup,
                    },
                )
                .await?;
                let vm = Arc::new(vm);
                self.spawn_oom_watcher(&vm);
                self.state().vm = Some(vm.clone());
                Ok(vm)
            }
        }
    }

    /// Stops the VM when no task is left or being created.
    async fn stop_vm_if_idle(&self) {
        let _vm_lock = self.inner.vm_lock.lock().await;
        let vm = {
            let mut state = self.state();
            if !state.idle() {
                return;
            }
            state.vm.take()
        };
        if let Some(vm) = vm {
            vm.shutdown().await;
        }
    }

    async fn do_start(&self, req: &api::StartRequest) -> Result<u32> {
        let (vm, stdio, spec) = {
            let mut state = self.state();
            let vm = state.vm.clone().ok_or_else(no_vm)?;
            let process = state
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.process_mut(&req.exec_id))
                .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
            if process.status != Status::Created {
                return Err(ShimError::FailedPrecondition(format!(
                    "process {} of task {} was already started",
                    req.exec_id, req.id
                )));
            }
            process.status = Status::Starting;
            (vm, process.stdio.clone(), process.spec.clone())
        };
        let started = self.start_process(&vm, req, &stdio, spec).await;
        let mut state = self.state();
        let process = state
            .containers
            .get_mut(&req.id)
            .and_then(|c| c.process_mut(&req.exec_id));
        let Some(process) = process else {
            // Deleted while starting (only possible for a forced cleanup): nothing to record.
            return Err(no_process(&req.id, &req.exec_id));
        };
        let (guest_pid, relays) = match started {
            Ok(started) => started,
            Err(err) => {
                process.status = Status::Created;
                return Err(err);
            }
        };
        process.status = Status::Running;
        let outputs = match relays {
            // The init's relays started at Create.
            None => std::mem::take(&mut process.outputs),
            Some(relays) => {
                process.pid = guest_pid;
                process.spec = None;
                process.stdin_close = relays.stdin_close;
                relays.outputs
            }
        };
        drop(state);
        let pid = if req.exec_id.is_empty() {
            vm.vmm_pid()
        } else {
            guest_pid
        };
        self.spawn_waiter(&vm, req.id.clone(), req.exec_id.clone(), pid, outputs);
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(pid)
    }

    /// Starts a container's init (`StartContainer`) or an exec (its stdio prepared, then
    /// `ExecProcess`, then its relays). Returns the exec's guest PID and relays.
    async fn start_process(
        &self,
        vm: &Sandbox,
        req: &api::StartRequest,
        stdio: &StdioPaths,
        spec: Option<Vec<u8>>,
    ) -> Result<(u32, Option<crate::io::Relays>)> {
        if req.exec_id.is_empty() {
            vm.guest().start_container(&req.id).await?;
            return Ok((0, None));
        }
        let io = PreparedIo::prepare(
            ProcessRef {
                container: &req.id,
                exec: &req.exec_id,
                namespace: &self.inner.namespace,
            },
            stdio,
        )
        .await?;
        let spec = spec.unwrap_or_default();
        let pid = vm
            .guest()
            .exec_process(&req.id, &req.exec_id, &spec)
            .await?;
        Ok((pid, Some(io.start(vm.guest()))))
    }

    /// Publishes TaskOOM for the OOM kills the agent reports of a container this shim created
    /// (deleted ones too: the report may come after the exit),
    /// until the VM goes away: at most one per container per [`OOM_COALESCE`] (the guest decides
    /// how many it reports), and names of containers this shim does not run are counted and
    /// logged, not published.
    fn spawn_oom_watcher(&self, vm: &Arc<Sandbox>) {
        let this = self.clone();
        let guest = vm.guest().clone();
        tokio::spawn(async move {
            let mut last: HashMap<String, Instant> = HashMap::new();
            let mut strangers: u64 = 0;
            loop {
                let container_id = match guest.oom_event().await {
                    Ok(id) => id,
                    Err(err) => {
                        info!(%err, "OOM event watch ends");
                        return;
                    }
                };
                if !this.state().ran.contains(&container_id) {
                    strangers = strangers.saturating_add(1);
                    // 1, 2, 4, 8...: a guest naming strangers in a loop cannot flood the log.
                    if strangers.is_power_of_two() {
                        warn!(container = %container_id, strangers, "the guest reported an OOM kill of a container this shim does not run; ignored");
                    }
                    continue;
                }
                let now = Instant::now();
                if last
                    .get(&container_id)
                    .is_some_and(|at| now.duration_since(*at) < OOM_COALESCE)
                {
                    debug!(container = %container_id, "OOM kill in the guest, coalesced with the last one");
                    continue;
                }
                // Only containers this shim ran get an entry (bounded like `ran`).
                last.insert(container_id.clone(), now);
                warn!(container = %container_id, "OOM kill in the guest");
                this.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM {
                        container_id,
                        ..Default::default()
                    }),
                );
            }
        });
    }

    /// Waits for the process's end in the guest (or the VM's), lets its output drain, records
    /// the exit and publishes TaskExit.
    fn spawn_waiter(
        &self,
        vm: &Arc<Sandbox>,
        id: String,
        exec_id: String,
        pid: u32,
        outputs: Vec<JoinHandle<()>>,
    ) {
        let this = self.clone();
        let guest = vm.guest().clone();
        tokio::spawn(async move {
            let status = match guest.wait_process(&id, &exec_id).await {
                Ok(exit) => u32::try_from(exit.code).unwrap_or(VM_GONE_STATUS),
                Err(err) => {
                    warn!(container = %id, exec = %exec_id, %err, "WaitProcess failed; reporting the process as gone");
                    VM_GONE_STATUS
                }
            };
            let drain = async {
                for handle in outputs {
                    let _ = handle.await;
                }
            };
            if tokio::time::timeout(OUTPUT_DRAIN, drain).await.is_err() {
                warn!(container = %id, exec = %exec_id, "output still open after the process ended; not waiting longer");
            }
            let exit = Exit {
                status,
                at: SystemTime::now(),
            };
            let recorded = this
                .state()
                .containers
                .get_mut(&id)
                .and_then(|c| c.process_mut(&exec_id))
                .map(|p| p.set_exit(exit))
                .unwrap_or(false);
            if recorded {
                info!(container = %id, exec = %exec_id, status, "exited");
                this.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: id.clone(),
                        id: if exec_id.is_empty() {
                            id.clone()
                        } else {
                            exec_id
                        },
                        pid,
                        exit_status: status,
                        exited_at: timestamp(exit.at),
                        ..Default::default()
                    }),
                );
            }
        });
    }

    async fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let (container, vm, exit) = {
            let mut state = self.state();
            let vm = state.vm.clone();
            let container = state
                .containers
                .get_mut(&req.id)
                .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
            if !req.exec_id.is_empty() {
                let process = container
                    .execs
                    .get(&req.exec_id)
                    .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
                if matches!(process.status, Status::Running | Status::Starting) {
                    return Err(ShimError::FailedPrecondition(format!(
                        "exec {} is running: kill it first",
                        req.exec_id
                    )));
                }
                let exit = process.exit();
                let pid = process.pid;
                container.execs.remove(&req.exec_id);
                return Ok(delete_response(pid, exit));
            }
            if matches!(container.init.status, Status::Running | Status::Starting) {
                return Err(ShimError::FailedPrecondition(format!(
                    "task {} is running: kill it first",
                    req.id
                )));
            }
            let exit = container.init.exit();
            let Some(container) = state.containers.remove(&req.id) else {
                return Err(ShimError::NotFound(format!("task {}", req.id)));
            };
            (container, vm, exit)
        };
        let mut container = container;
        container.init.close_stdin();
        container.init.outputs.iter().for_each(JoinHandle::abort);
        if let Some(vm) = &vm {
            if vm.exited().is_none() {
                if let Err(err) = vm.guest().remove_container(&req.id).await {
                    warn!(container = %req.id, %err, "RemoveContainer failed");
                }
            }
            vm.unshare(&req.id);
        }
        if let Some(rootfs) = &container.mounted_rootfs {
            unmount_rootfs(rootfs);
        }
        let pid = vm.as_ref().map(|v| v.vmm_pid()).unwrap_or(0);
        drop(vm);
        self.stop_vm_if_idle().await;
        let exit_after_shutdown = {
            let state = self.state();
            state.idle() && state.shutdown_requested
        };
        if exit_after_shutdown {
            let exit = self.inner.exit.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                info!("last task deleted after a Shutdown: exiting");
                exit.signal();
            });
        }
        let exit = exit.unwrap_or(Exit {
            status: VM_GONE_STATUS,
            at: SystemTime::now(),
        });
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                id: req.id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        );
        info!(container = %req.id, "deleted");
        Ok(delete_response(pid, Some(exit)))
    }

    fn do_state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        let state = self.state();
        let container = state
            .containers
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        let process = container
            .process(&req.exec_id)
            .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
        let exit = process.exit();
        let pid = if req.exec_id.is_empty() {
            state.vm.as_ref().map(|v| v.vmm_pid()).unwrap_or(0)
        } else {
            process.pid
        };
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid,
            status: status_of(process, container.paused).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn do_kill(&self, req: &api::KillRequest) -> Result<()> {
        let guest = {
            let state = self.state();
            let process = state
                .containers
                .get(&req.id)
                .and_then(|c| c.process(&req.exec_id))
                .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
            if process.status == Status::Stopped {
                return Err(ShimError::NotFound(format!(
                    "process {} of task {}: already finished",
                    req.exec_id, req.id
                )));
            }
            state.vm.as_ref().ok_or_else(no_vm)?.guest().clone()
        };
        guest
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(())
    }

    fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
        if req.exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("exec without an exec ID".into()));
        }
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        if container.init.status != Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is not running",
                req.id
            )));
        }
        if container.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {:?}", req.exec_id)));
        }
        let mut process = Process::new(StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        process.spec = Some(spec);
        container.execs.insert(req.exec_id.clone(), process);
        drop(state);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    async fn do_pause(&self, id: &str, pause: bool) -> Result<()> {
        let guest = self.guest_for(id)?;
        if pause {
            guest.pause_container(id).await?;
        } else {
            guest.resume_container(id).await?;
        }
        if let Some(c) = self.state().containers.get_mut(id) {
            c.paused = pause;
        }
        if pause {
            self.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.to_owned(),
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.to_owned(),
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }

    fn do_shutdown(&self) {
        let mut state = self.state();
        if state.idle() {
            info!("Shutdown: no task left, exiting");
            self.inner.exit.signal();
        } else {
            info!(
                tasks = state.containers.len(),
                "Shutdown: tasks left, exiting once the last is deleted"
            );
            state.shutdown_requested = true;
        }
    }
}

fn delete_response(pid: u32, exit: Option<Exit>) -> api::DeleteResponse {
    let exit = exit.unwrap_or(Exit {
        status: VM_GONE_STATUS,
        at: SystemTime::now(),
    });
    api::DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: timestamp(exit.at),
        ..Default::default()
    }
}

/// Mounts containerd's rootfs mounts (the snapshot, e.g. one overlay) on `<bundle>/rootfs`.
async fn mount_rootfs(bundle: &Path, mounts: &[api::Mount]) -> Result<Option<PathBuf>> {
    if mounts.is_empty() {
        return Ok(None);
    }
    let rootfs = bundle.join("rootfs");
    tokio::fs::create_dir_all(&rootfs)
        .await
        .map_err(ShimError::io("create", &rootfs))?;
    for mount in mounts {
        if let Err(err) = containerd_shim::util::mount_rootfs(mount, &rootfs).await {
            unmount_rootfs(&rootfs);
            return Err(ShimError::Rootfs {
                path: rootfs,
                reason: err.to_string(),
            });
        }
    }
    Ok(Some(rootfs))
}

fn unmount_rootfs(rootfs: &Path) {
    // Every layer mounted on it (there may be several), lazily.
    while nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        info!(id = %req.id, bundle = %req.bundle, "Create");
        let pid = self
            .do_create(&req)
            .await
            .inspect_err(|e| warn!(id = %req.id, %e, "Create failed"))?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        info!(id = %req.id, exec = %req.exec_id, "Start");
        let pid = self
            .do_start(&req)
            .await
            .inspect_err(|e| warn!(id = %req.id, %e, "Start failed"))?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        info!(id = %req.id, exec = %req.exec_id, "Delete");
        Ok(self.do_delete(&req).await?)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.do_state(&req)?)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit_rx = self
            .state()
            .containers
            .get(&req.id)
            .and_then(|c| c.process(&req.exec_id))
            .map(|p| p.subscribe())
            .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
        let exit = exit_rx
            .wait_for(|e| e.is_some())
            .await
            .ok()
            .and_then(|e| *e)
            .unwrap_or(Exit {
                status: VM_GONE_STATUS,
                at: SystemTime::now(),
            });
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        info!(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "Kill");
        self.do_kill(&req).await?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        info!(id = %req.id, exec = %req.exec_id, "Exec");
        self.do_exec(&req)?;
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let guest = self.guest_for(&req.id)?;
        guest
            .resize_terminal(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(ShimError::from)?;
        Ok(api::Empty::default())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            let mut state = self.state();
            let process = state
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.process_mut(&req.exec_id))
                .ok_or_else(|| no_process(&req.id, &req.exec_id))?;
            process.close_stdin();
        }
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let guest = self.guest_for(&req.id)?;
        let pids = guest
            .list_processes(&req.id)
            .await
            .map_err(ShimError::from)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, true).await?;
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_pause(&req.id, false).await?;
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        let guest = self.guest_for(&req.id)?;
        guest
            .update_container(&req.id, &resources)
            .await
            .map_err(ShimError::from)?;
        Ok(api::Empty::default())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let guest = self.guest_for(&req.id)?;
        let stats = guest
            .stats_container(&req.id)
            .await
            .map_err(ShimError::from)?;
        let any: Any = metrics::to_any(&stats)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unsupported("checkpoint").into())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.task_pid(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        self.do_shutdown();
        Ok(api::Empty::default())
    }
}
