//! containerd's Task service, served by the shim over ttrpc.
//!
//! One shim runs one microVM: the first container created boots it; containers of the same
//! pod (CRI annotations `io.kubernetes.cri.container-type=container` and
//! `io.kubernetes.cri.sandbox-id=<the VM's sandbox>`) join it. When the last container is
//! deleted, the VM is stopped and its files removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
use husk_runtime::bundle;
use husk_runtime::id::ContainerId;
use husk_runtime::share::{self, HostMounter};
use husk_runtime::sizing;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::{Result, ShimError};
use crate::io::{PreparedIo, ProcessRef, StdioPaths};
use crate::metrics;
use crate::pod;
use crate::task::{Container, Exit, Process, Status};
use crate::vm::{self, BootSpec, Vm};

/// Exit status reported for processes whose VM went away.
const VM_GONE_STATUS: u32 = 255;
/// How long output may still arrive after a process ended (a background process keeping the
/// stream open must not hold the exit forever).
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);

struct State {
    vm: Option<Arc<Vm>>,
    containers: HashMap<String, Container>,
    /// containerd sent Shutdown while tasks were left. containerd 1.x sends one after every
    /// task's Delete; containerd 2.x sends it after the sandbox's only (a pod's containers are
    /// deleted later, with no Shutdown of their own), so the shim must then end by itself once
    /// its last task is gone.
    shutdown_requested: bool,
}

/// How long the shim waits, once its last task is deleted after an earlier Shutdown, for the
/// Shutdown containerd 1.x sends next, before it exits on its own.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The Task service of one shim.
#[derive(Clone)]
pub struct Service {
    state: Arc<Mutex<State>>,
    publisher: Arc<RemotePublisher>,
    namespace: String,
    exit: Arc<ExitSignal>,
}

fn timestamp(at: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(at))
}

fn status_of(process: &Process, paused: bool) -> TaskStatus {
    match process.status {
        Status::Created => TaskStatus::CREATED,
        Status::Running if paused => TaskStatus::PAUSED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

impl Service {
    pub fn new(publisher: RemotePublisher, namespace: String, exit: Arc<ExitSignal>) -> Service {
        Service {
            state: Arc::new(Mutex::new(State {
                vm: None,
                containers: HashMap::new(),
                shutdown_requested: false,
            })),
            publisher: Arc::new(publisher),
            namespace,
            exit,
        }
    }

    /// Publishes an event to containerd in the background.
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

    async fn vm(&self) -> Result<Arc<Vm>> {
        self.state
            .lock()
            .await
            .vm
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("the sandbox VM is not running".into()))
    }

    async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let id =
            ContainerId::new(&req.id).map_err(|e| ShimError::InvalidArgument(e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unsupported("checkpoint/restore"));
        }
        let mut state = self.state.lock().await;
        if state.containers.contains_key(&req.id) {
            return Err(ShimError::AlreadyExists(format!("task {}", req.id)));
        }
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
                namespace: &self.namespace,
            },
            &stdio,
        )
        .await?;
        let bundle_dir = PathBuf::from(&req.bundle);
        let mounted_rootfs = mount_rootfs(&bundle_dir, &req.rootfs).await?;
        let result = self.create_in_vm(&mut state, &id, &bundle_dir, req).await;
        let pid = match result {
            Ok(pid) => pid,
            Err(err) => {
                if let Some(rootfs) = &mounted_rootfs {
                    unmount_rootfs(rootfs);
                }
                return Err(err);
            }
        };
        let mut init = Process::new(stdio);
        init.pid = pid;
        let vm = state.vm.clone();
        if let Some(vm) = &vm {
            let relays = io.start(&vm.agent);
            init.stdin_close = relays.stdin_close;
            init.outputs = relays.outputs;
        }
        state.containers.insert(
            req.id.clone(),
            Container {
                bundle: bundle_dir,
                mounted_rootfs,
                init,
                execs: HashMap::new(),
                paused: false,
            },
        );
        let task_pid = vm.map(|v| v.vmm_pid).unwrap_or(0);
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

    /// Boots the VM when this container starts one, shares its rootfs and mounts, and creates it
    /// in the guest. Returns the container's guest PID.
    async fn create_in_vm(
        &self,
        state: &mut State,
        id: &ContainerId,
        bundle_dir: &Path,
        req: &api::CreateTaskRequest,
    ) -> Result<u32> {
        let bundle = bundle::load(bundle_dir)?;
        let role = pod::role(&bundle.spec);
        let config = vm::load_config()?;
        let booted_here = match (&state.vm, &role) {
            (Some(vm), pod::Role::Container { sandbox_id }) if vm.id.as_str() == sandbox_id => {
                false
            }
            (Some(vm), _) => {
                return Err(ShimError::FailedPrecondition(format!(
                    "this shim runs the microVM of sandbox {}; container {id} does not belong to it",
                    vm.id
                )))
            }
            (None, pod::Role::Container { sandbox_id }) if sandbox_id.as_str() != id.as_str() => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {id} belongs to sandbox {sandbox_id}, whose VM is not running in this shim"
                )))
            }
            (None, _) => {
                let pod_resources = match role {
                    pod::Role::Sandbox => pod::sandbox_resources(&bundle.spec)?,
                    _ => None,
                };
                let resources = pod_resources.as_ref().or_else(|| {
                    bundle.spec.linux().as_ref().and_then(|l| l.resources().as_ref())
                });
                let size = sizing::vm_size(resources, &config)?;
                let hostname = bundle.spec.hostname().clone().unwrap_or_default();
                let vm = Vm::boot(BootSpec {
                    id,
                    config: &config,
                    size,
                    hostname,
                })
                .await?;
                let vm = Arc::new(vm);
                self.spawn_oom_watcher(&vm);
                state.vm = Some(vm);
                true
            }
        };
        let result = self.create_container(state, id, &bundle, req).await;
        if result.is_err() && booted_here {
            if let Some(vm) = state.vm.take() {
                vm.shutdown().await;
            }
        }
        result
    }

    async fn create_container(
        &self,
        state: &State,
        id: &ContainerId,
        bundle: &bundle::Bundle,
        req: &api::CreateTaskRequest,
    ) -> Result<u32> {
        let vm = state
            .vm
            .as_ref()
            .ok_or_else(|| ShimError::FailedPrecondition("no VM".into()))?;
        let mut plan = share::plan(bundle, id)?;
        pod::map_namespaces(&mut plan.guest_spec, &pod::role(&bundle.spec))?;
        // A read-only root with mount points the image lacks (containerd's CRI plugin binds
        // /etc/resolv.conf into every sandbox, whose root is read-only): as runc does, the
        // mount points are made while the root is writable, and it becomes read-only after.
        // So the rootfs is shared writable; the guest spec keeps `root.readonly`, which the
        // agent applies once the container's mounts are in place.
        if let Some(rootfs) = plan.binds.first_mut() {
            rootfs.readonly = false;
        }
        share::bind_all(&vm.files.paths.shared, &plan, &HostMounter)?;
        let mut spec = plan.guest_spec.clone();
        spec.set_hooks(None);
        let result = async {
            let spec_json = serde_json::to_vec(&spec)
                .map_err(|e| ShimError::InvalidArgument(format!("spec: {e}")))?;
            let request = CreateContainerRequest {
                container_id: id.to_string(),
                oci_spec_json: spec_json,
                rootfs_path: plan.guest_rootfs.to_string_lossy().into_owned(),
                stdio: if req.terminal {
                    StdioMode::STDIO_TERMINAL
                } else {
                    StdioMode::STDIO_PIPES
                }
                .into(),
                ..Default::default()
            };
            Ok(vm.agent.create_container(&request).await?)
        }
        .await;
        if result.is_err() {
            unshare_container(&vm.files.paths.shared, id.as_str());
        }
        result
    }

    async fn do_start(&self, req: &api::StartRequest) -> Result<u32> {
        let mut state = self.state.lock().await;
        let vm = state
            .vm
            .clone()
            .ok_or_else(|| ShimError::FailedPrecondition("the sandbox VM is not running".into()))?;
        let container = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        let process = container.process_mut(&req.exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("exec {} of task {}", req.exec_id, req.id))
        })?;
        if process.status != Status::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "process {} of task {} was already started",
                req.exec_id, req.id
            )));
        }
        let outputs = if req.exec_id.is_empty() {
            vm.agent.start_container(&req.id).await?;
            std::mem::take(&mut process.outputs)
        } else {
            let io = PreparedIo::prepare(
                ProcessRef {
                    container: &req.id,
                    exec: &req.exec_id,
                    namespace: &self.namespace,
                },
                &process.stdio,
            )
            .await?;
            let spec = process.spec.take().unwrap_or_default();
            process.pid = vm.agent.exec_process(&req.id, &req.exec_id, &spec).await?;
            let relays = io.start(&vm.agent);
            process.stdin_close = relays.stdin_close;
            relays.outputs
        };
        process.status = Status::Running;
        let pid = if req.exec_id.is_empty() {
            vm.vmm_pid
        } else {
            process.pid
        };
        self.spawn_waiter(vm, req.id.clone(), req.exec_id.clone(), pid, outputs);
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

    /// Publishes TaskOOM for every OOM kill the agent reports, until the VM goes away.
    fn spawn_oom_watcher(&self, vm: &Arc<Vm>) {
        let this = self.clone();
        let agent = vm.agent.clone();
        tokio::spawn(async move {
            loop {
                match agent.get_oom_event().await {
                    Ok(container_id) => {
                        warn!(container = %container_id, "OOM kill in the guest");
                        this.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            Box::new(TaskOOM {
                                container_id,
                                ..Default::default()
                            }),
                        );
                    }
                    Err(err) => {
                        info!(%err, "OOM event watch ends");
                        return;
                    }
                }
            }
        });
    }

    /// Waits for the process's end in the guest (or the VM's), lets its output drain, records
    /// the exit and publishes TaskExit.
    fn spawn_waiter(
        &self,
        vm: Arc<Vm>,
        id: String,
        exec_id: String,
        pid: u32,
        outputs: Vec<JoinHandle<()>>,
    ) {
        let this = self.clone();
        tokio::spawn(async move {
            let status = match vm.agent.wait_process(&id, &exec_id).await {
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
            let recorded = {
                let mut state = this.state.lock().await;
                state
                    .containers
                    .get_mut(&id)
                    .and_then(|c| c.process_mut(&exec_id))
                    .map(|p| p.set_exit(exit))
                    .unwrap_or(false)
            };
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
        let mut state = self.state.lock().await;
        let vm = state.vm.clone();
        let container = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        if !req.exec_id.is_empty() {
            let process = container
                .execs
                .get(&req.exec_id)
                .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
            if process.status == Status::Running {
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
        if container.init.status == Status::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "task {} is running: kill it first",
                req.id
            )));
        }
        let exit = container.init.exit();
        let Some(mut container) = state.containers.remove(&req.id) else {
            return Err(ShimError::NotFound(format!("task {}", req.id)));
        };
        container.init.close_stdin();
        container.init.outputs.iter().for_each(JoinHandle::abort);
        if let Some(vm) = &vm {
            if vm.exited().is_none() {
                if let Err(err) = vm.agent.remove_container(&req.id).await {
                    warn!(container = %req.id, %err, "RemoveContainer failed");
                }
            }
            unshare_container(&vm.files.paths.shared, &req.id);
        }
        if let Some(rootfs) = &container.mounted_rootfs {
            unmount_rootfs(rootfs);
        }
        let pid = vm.as_ref().map(|v| v.vmm_pid).unwrap_or(0);
        if state.containers.is_empty() {
            if let Some(vm) = state.vm.take() {
                match Arc::try_unwrap(vm) {
                    Ok(vm) => vm.shutdown().await,
                    Err(vm) => {
                        warn!(sandbox = %vm.id, "VM still referenced; it stops with the shim")
                    }
                }
            }
        }
        if state.containers.is_empty() && state.shutdown_requested {
            let exit = self.exit.clone();
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

/// Unmounts and removes `<share>/<container>`.
fn unshare_container(share: &Path, container: &str) {
    let dir = share.join(container);
    if let Err(err) = share::remove_share(&dir, &HostMounter, &share::read_mountinfo) {
        warn!(%container, %err, "cannot remove the container's share");
    }
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
        let state = self.state.lock().await;
        let container = state
            .containers
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        let process = container
            .process(&req.exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {}", req.exec_id)))?;
        let exit = process.exit();
        let pid = if req.exec_id.is_empty() {
            state.vm.as_ref().map(|v| v.vmm_pid).unwrap_or(0)
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

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit_rx = {
            let state = self.state.lock().await;
            state
                .containers
                .get(&req.id)
                .and_then(|c| c.process(&req.exec_id))
                .map(|p| p.subscribe())
                .ok_or_else(|| {
                    ShimError::NotFound(format!("task {} exec {}", req.id, req.exec_id))
                })?
        };
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
        let vm = self.vm().await?;
        {
            let state = self.state.lock().await;
            let process = state
                .containers
                .get(&req.id)
                .and_then(|c| c.process(&req.exec_id))
                .ok_or_else(|| {
                    ShimError::NotFound(format!("task {} exec {}", req.id, req.exec_id))
                })?;
            if process.status == Status::Stopped {
                return Err(ShimError::NotFound(format!(
                    "process {} of task {}: already finished",
                    req.exec_id, req.id
                ))
                .into());
            }
        }
        vm.agent
            .signal_process(&req.id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(ShimError::from)?;
        Ok(api::Empty::default())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        info!(id = %req.id, exec = %req.exec_id, "Exec");
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| ShimError::InvalidArgument(format!("exec process spec: {e}")))?;
        let mut state = self.state.lock().await;
        let container = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("task {}", req.id)))?;
        if container.init.status != Status::Running {
            return Err(
                ShimError::FailedPrecondition(format!("task {} is not running", req.id)).into(),
            );
        }
        if req.exec_id.is_empty() || container.execs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!("exec {:?}", req.exec_id)).into());
        }
        let mut process = Process::new(StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        process.spec = Some(spec);
        container.execs.insert(req.exec_id.clone(), process);
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = self.vm().await?;
        vm.agent
            .tty_win_resize(&req.id, &req.exec_id, req.height, req.width)
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
            let mut state = self.state.lock().await;
            let process = state
                .containers
                .get_mut(&req.id)
                .and_then(|c| c.process_mut(&req.exec_id))
                .ok_or_else(|| {
                    ShimError::NotFound(format!("task {} exec {}", req.id, req.exec_id))
                })?;
            process.close_stdin();
        }
        Ok(api::Empty::default())
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let vm = self.vm().await?;
        let pids = vm
            .agent
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
        let vm = self.vm().await?;
        vm.agent
            .pause_container(&req.id)
            .await
            .map_err(ShimError::from)?;
        if let Some(c) = self.state.lock().await.containers.get_mut(&req.id) {
            c.paused = true;
        }
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = self.vm().await?;
        vm.agent
            .resume_container(&req.id)
            .await
            .map_err(ShimError::from)?;
        if let Some(c) = self.state.lock().await.containers.get_mut(&req.id) {
            c.paused = false;
        }
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let vm = self.vm().await?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .ok_or_else(|| ShimError::InvalidArgument("update without resources".into()))?;
        vm.agent
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
        let vm = self.vm().await?;
        let stats = vm
            .agent
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
        let state = self.state.lock().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: state.vm.as_ref().map(|v| v.vmm_pid).unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut state = self.state.lock().await;
        if state.containers.is_empty() {
            info!("Shutdown: no task left, exiting");
            self.exit.signal();
        } else {
            info!(
                tasks = state.containers.len(),
                "Shutdown: tasks left, exiting once the last is deleted"
            );
            state.shutdown_requested = true;
        }
        Ok(api::Empty::default())
    }
}
