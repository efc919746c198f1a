//! Containers and their processes: the agent's state and every operation on it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_agent_protocol::agent::{CreateContainerRequest, StdioMode, Storage};
use husk_agent_protocol::validate::{check_abs_path, check_size, validate_id, ValidationError};
use husk_agent_protocol::{
    MAX_CONTAINERS, MAX_EXECS_PER_CONTAINER, MAX_IO_CHUNK, MAX_SPEC_SIZE, MAX_STORAGES,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Interest};
use tokio::sync::{mpsc, watch};

use crate::cgroup::{self, CgroupError, Cgroups};
use crate::config::{BpfInsn, InitConfig, ProcessConfig, SyncMsg};
use crate::init::{START_FD, SYNC_FD};
use crate::mountopts::parse_mount_options;
use crate::reaper::{wait_exit, Exit, Reaper};
use crate::spec::{self, NsKind, SpecError};
use crate::stdio::{dup_high, openpty, pipe, FdStream};

/// How long the helper may take to set a container or process up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long removal waits for the processes to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line the helper may send on the sync pipe.
const MAX_SYNC_LINE: u64 = 64 * 1024;
/// Pending OOM events kept for GetOOMEvent.
const OOM_QUEUE: usize = 64;
/// How often memory.events is polled for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(100);

/// Errors of container operations; each maps to a ttrpc status code.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("container {0:?} does not exist")]
    NoContainer(String),
    #[error("process {exec_id:?} does not exist in container {container_id:?}")]
    NoProcess {
        container_id: String,
        exec_id: String,
    },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Invalid(String),
    #[error("limit reached: {0}")]
    Exhausted(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("container set-up failed: {0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

impl AgentError {
    /// The ttrpc status code.
    pub fn code(&self) -> ttrpc::Code {
        match self {
            AgentError::Validation(_) | AgentError::Spec(_) | AgentError::Invalid(_) => {
                ttrpc::Code::INVALID_ARGUMENT
            }
            AgentError::NoContainer(_) | AgentError::NoProcess { .. } => ttrpc::Code::NOT_FOUND,
            AgentError::Exists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::Precondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::Exhausted(_) => ttrpc::Code::RESOURCE_EXHAUSTED,
            AgentError::Cgroup(_) | AgentError::Io { .. } | AgentError::Setup(_) => {
                ttrpc::Code::INTERNAL
            }
        }
    }
}

type Result<T> = std::result::Result<T, AgentError>;

/// One process: a container's init or an exec'd process.
pub struct Proc {
    pub pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    stdin: tokio::sync::Mutex<Option<FdStream>>,
    stdout: tokio::sync::Mutex<Option<FdStream>>,
    stderr: tokio::sync::Mutex<Option<FdStream>>,
    pty: Option<FdStream>,
}

impl Proc {
    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the process to end.
    pub async fn wait(&self) -> Result<Exit> {
        let mut rx = self.exit.clone();
        wait_exit(&mut rx)
            .await
            .ok_or_else(|| AgentError::Setup("the reaper stopped".into()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
}

struct Pending {
    start: Option<OwnedFd>,
    sync: Option<SyncReader>,
}

/// A container.
pub struct Container {
    pub id: String,
    cgroup_dir: PathBuf,
    init: Arc<Proc>,
    namespaces: Vec<NsKind>,
    seccomp: Vec<Vec<BpfInsn>>,
    status: Mutex<Status>,
    pending: tokio::sync::Mutex<Pending>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    storages: Vec<PathBuf>,
    oom_seen: Mutex<u64>,
}

/// The agent's containers.
pub struct Manager {
    state_dir: PathBuf,
    cgroups: std::result::Result<Cgroups, String>,
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    /// Where OOM kills are queued for GetOOMEvent (by the poll loop, and by the last look taken
    /// when a container's process ends or the container is removed).
    oom_tx: mpsc::Sender<String>,
    sandbox_storages: Mutex<Vec<PathBuf>>,
}

struct SyncReader {
    inner: BufReader<tokio::net::unix::pipe::Receiver>,
}

impl SyncReader {
    fn new(fd: OwnedFd) -> Result<Self> {
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd).map_err(io("sync pipe"))?;
        Ok(SyncReader {
            inner: BufReader::new(rx),
        })
    }

    /// The next message, or `None` at end of file.
    async fn next(&mut self) -> Result<Option<SyncMsg>> {
        let mut line = String::new();
        let n = (&mut self.inner)
            .take(MAX_SYNC_LINE)
            .read_line(&mut line)
            .await
            .map_err(io("reading the sync pipe"))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| AgentError::Setup(format!("bad message from the init helper: {e}")))
    }

    async fn next_timeout(&mut self) -> Result<Option<SyncMsg>> {
        tokio::time::timeout(SETUP_TIMEOUT, self.next())
            .await
            .map_err(|_| AgentError::Setup("the init helper did not answer in time".into()))?
    }
}

/// The child ends and the agent ends of a process's stdio.
struct StdioPlan {
    child: [OwnedFd; 3],
    stdin: FdStream,
    stdout: FdStream,
    stderr: Option<FdStream>,
    pty: Option<FdStream>,
}

fn make_stdio(terminal: bool) -> Result<StdioPlan> {
    if terminal {
        let (master, slave) = openpty().map_err(io("openpty"))?;
        let child = [
            slave.try_clone().map_err(io("dup"))?,
            slave.try_clone().map_err(io("dup"))?,
            slave,
        ];
        let reader = master.try_clone().map_err(io("dup"))?;
        let writer = master.try_clone().map_err(io("dup"))?;
        Ok(StdioPlan {
            child,
            stdin: FdStream::new(writer, Interest::WRITABLE).map_err(io("pty"))?,
            stdout: FdStream::new(reader, Interest::READABLE).map_err(io("pty"))?,
            stderr: None,
            pty: Some(FdStream::new(master, Interest::READABLE).map_err(io("pty"))?),
        })
    } else {
        let (in_r, in_w) = pipe().map_err(io("pipe"))?;
        let (out_r, out_w) = pipe().map_err(io("pipe"))?;
        let (err_r, err_w) = pipe().map_err(io("pipe"))?;
        Ok(StdioPlan {
            child: [in_r, out_w, err_w],
            stdin: FdStream::new(in_w, Interest::WRITABLE).map_err(io("pipe"))?,
            stdout: FdStream::new(out_r, Interest::READABLE).map_err(io("pipe"))?,
            stderr: Some(FdStream::new(err_r, Interest::READABLE).map_err(io("pipe"))?),
            pty: None,
        })
    }
}

/// Moves `src` to fd `dst` in a freshly forked child (async-signal-safe).
fn move_fd(src: i32, dst: i32) -> std::io::Result<()> {
    // SAFETY: dup2 on fds valid in this process; it clears FD_CLOEXEC on dst.
    if unsafe { libc::dup2(src, dst) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Spawns `husk-agent init CONFIG`; returns the helper's pid.
fn spawn_helper(
    config: &Path,
    child_stdio: [OwnedFd; 3],
    sync_w: OwnedFd,
    start_r: Option<OwnedFd>,
) -> Result<i32> {
    let sync_w = dup_high(&sync_w).map_err(io("dup"))?;
    let start_r = start_r
        .map(|f| dup_high(&f))
        .transpose()
        .map_err(io("dup"))?;
    let sync_raw = sync_w.as_raw_fd();
    let start_raw = start_r.as_ref().map(|f| f.as_raw_fd());
    let [stdin, stdout, stderr] = child_stdio;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("init")
        .arg(config)
        .env_clear()
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // SAFETY: the closure only calls dup2 (async-signal-safe) on fds that stay open until spawn
    // returns (sync_w and start_r live past the spawn call).
    unsafe {
        cmd.pre_exec(move || {
            move_fd(sync_raw, SYNC_FD)?;
            if let Some(s) = start_raw {
                move_fd(s, START_FD)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io("spawning the init helper"))?;
    let pid =
        i32::try_from(child.id()).map_err(|_| AgentError::Setup("pid out of range".into()))?;
    drop((sync_w, start_r));
    Ok(pid)
}

fn mount_storage(s: &Storage) -> Result<PathBuf> {
    check_abs_path("storage mount point", &s.mount_point)?;
    check_size(
        "storage source",
        s.source.len(),
        husk_agent_protocol::MAX_PATH_LEN,
    )?;
    if s.fstype.is_empty() || s.fstype.len() > 64 {
        return Err(AgentError::Invalid(format!(
            "storage for {}: bad file system type {:?}",
            s.mount_point, s.fstype
        )));
    }
    let target = PathBuf::from(&s.mount_point);
    if target
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(AgentError::Invalid(format!(
            "storage mount point {} contains ..",
            s.mount_point
        )));
    }
    std::fs::create_dir_all(&target).map_err(io(format!("mkdir {}", s.mount_point)))?;
    let opts = parse_mount_options(&s.options);
    let mut flags = nix::mount::MsFlags::from_bits_truncate(opts.flags);
    if opts.bind {
        flags |= nix::mount::MsFlags::MS_BIND;
    }
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    nix::mount::mount(
        Some(s.source.as_str()),
        &target,
        Some(s.fstype.as_str()),
        flags,
        data,
    )
    .map_err(|e| AgentError::Io {
        what: format!("mount {} ({}) on {}", s.source, s.fstype, s.mount_point),
        source: e.into(),
    })?;
    Ok(target)
}

fn unmount_all(paths: &[PathBuf]) {
    for p in paths.iter().rev() {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(path = %p.display(), error = %e, "unmount failed");
        }
    }
}

fn mount_storages(list: &[Storage]) -> Result<Vec<PathBuf>> {
    if list.len() > MAX_STORAGES {
        return Err(AgentError::Invalid(format!(
            "{} storages; the limit is {MAX_STORAGES}",
            list.len()
        )));
    }
    let mut done = Vec::new();
    for s in list {
        match mount_storage(s) {
            Ok(p) => done.push(p),
            Err(e) => {
                unmount_all(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and have not yet seen exit.
    unsafe { libc::kill(pid, sig) };
}

impl Manager {
    /// A manager keeping helper configs in `state_dir` and containers under `cgroup_root`.
    /// Without cgroup v2 the agent still answers, and container creation fails with the reason.
    pub fn new(state_dir: PathBuf, cgroup_root: &Path, reaper: Arc<Reaper>) -> Arc<Self> {
        let cgroups = Cgroups::init(cgroup_root).map_err(|e| e.to_string());
        if let Err(e) = &cgroups {
            tracing::error!(error = %e, "containers cannot be created");
        }
        let (oom_tx, oom_rx) = mpsc::channel(OOM_QUEUE);
        let m = Arc::new(Manager {
            state_dir,
            cgroups,
            reaper,
            containers: Mutex::new(HashMap::new()),
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            oom_tx,
            sandbox_storages: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&m);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let Some(m) = weak.upgrade() else { return };
                for c in m.all() {
                    m.note_oom_kills(&c);
                }
            }
        });
        m
    }

    /// Queues an OOM event for `c` if its cgroup counts OOM kills not yet reported. The poll
    /// loop calls it every [`OOM_POLL`]; a process's end and the container's removal call it
    /// too, so a kill that ends the container between two polls is still reported (its cgroup,
    /// and with it the count, is gone after RemoveContainer).
    fn note_oom_kills(&self, c: &Container) {
        let kills = cgroup::oom_kills(&c.cgroup_dir);
        let Ok(mut seen) = c.oom_seen.lock() else {
            return;
        };
        if kills > *seen {
            *seen = kills;
            tracing::info!(container = %c.id, "OOM kill");
            if self.oom_tx.try_send(c.id.clone()).is_err() {
                tracing::warn!(container = %c.id, "OOM event queue full; event dropped");
            }
        }
    }

    /// The last look at a container's OOM kills, once one of its processes ended: before its
    /// exit is reported, so the event is queued before the shim hears of the exit.
    pub fn note_oom_kills_of(&self, id: &str) {
        if let Ok(c) = self.get(id) {
            self.note_oom_kills(&c);
        }
    }

    fn all(&self) -> Vec<Arc<Container>> {
        self.containers
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The container `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        validate_id("container id", id)?;
        self.containers
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| AgentError::NoContainer(id.to_owned()))
    }

    /// The process `exec_id` of container `id` (its init when `exec_id` is empty).
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Proc>> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        validate_id("exec id", exec_id)?;
        c.execs
            .lock()
            .ok()
            .and_then(|m| m.get(exec_id).cloned())
            .ok_or_else(|| AgentError::NoProcess {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn cgroups(&self) -> Result<&Cgroups> {
        self.cgroups
            .as_ref()
            .map_err(|e| AgentError::Precondition(format!("cgroup v2 is unavailable: {e}")))
    }

    /// Mounts the sandbox's shared storages.
    pub fn mount_sandbox_storages(&self, list: &[Storage]) -> Result<()> {
        let mounted = mount_storages(list)?;
        if let Ok(mut s) = self.sandbox_storages.lock() {
            s.extend(mounted);
        }
        Ok(())
    }

    /// Removes every container and unmounts the sandbox's storages.
    pub async fn destroy_sandbox(&self) -> Result<()> {
        let ids: Vec<String> = self.all().iter().map(|c| c.id.clone()).collect();
        for id in ids {
            self.remove(&id).await?;
        }
        let storages = self
            .sandbox_storages
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        unmount_all(&storages);
        Ok(())
    }

    /// CreateContainer.
    pub async fn create(&self, req: CreateContainerRequest) -> Result<i32> {
        let id = req.container_id.clone();
        validate_id("container id", &id)?;
        check_size("OCI spec", req.oci_spec_json.len(), MAX_SPEC_SIZE)?;
        {
            let map = self
                .containers
                .lock()
                .map_err(|_| AgentError::Setup("state lock".into()))?;
            if map.contains_key(&id) {
                return Err(AgentError::Exists(format!("container {id:?}")));
            }
            if map.len() >= MAX_CONTAINERS {
                return Err(AgentError::Exhausted(format!(
                    "{MAX_CONTAINERS} containers"
                )));
            }
        }
        let plan = spec::plan_container(spec::parse_spec(&req.oci_spec_json)?)?;
        let stdio_mode = req
            .stdio
            .enum_value()
            .map_err(|v| AgentError::Invalid(format!("unknown stdio mode {v}")))?;
        match (stdio_mode, plan.process.terminal) {
            (StdioMode::STDIO_PIPES, true) | (StdioMode::STDIO_TERMINAL, false) => {
                return Err(AgentError::Invalid(
                    "stdio mode disagrees with process.terminal".into(),
                ))
            }
            _ => {}
        }
        let rootfs = if req.rootfs_path.is_empty() {
            plan.root_path
                .clone()
                .ok_or(SpecError::Missing("root.path"))?
        } else {
            req.rootfs_path.clone()
        };
        check_abs_path("rootfs path", &rootfs)?;
        let seccomp = match &plan.seccomp {
            Some(s) => crate::seccomp::compile(s, plan.process.no_new_privileges)
                .map_err(|e| AgentError::Invalid(format!("linux.seccomp: {e}")))?,
            None => Vec::new(),
        };
        let cgroups = self.cgroups()?;
        let storages = mount_storages(&req.storages)?;
        if !Path::new(&rootfs).is_dir() {
            unmount_all(&storages);
            return Err(AgentError::Invalid(format!(
                "rootfs {rootfs} is not a directory"
            )));
        }
        let cgroup_dir = match cgroups.create(&id) {
            Ok(d) => d,
            Err(e) => {
                unmount_all(&storages);
                return Err(e.into());
            }
        };
        let cfg = InitConfig {
            exec: false,
            join_pid: 0,
            cgroup_dir: cgroup_dir.to_string_lossy().into_owned(),
            namespaces: plan.namespaces.clone(),
            hostname: plan.hostname,
            domainname: plan.domainname,
            rootfs,
            root_readonly: plan.root_readonly,
            rootfs_propagation: plan.rootfs_propagation,
            mounts: plan.mounts,
            devices: plan.devices,
            masked_paths: plan.masked_paths,
            readonly_paths: plan.readonly_paths,
            sysctl: plan.sysctl,
            process: plan.process,
            seccomp: seccomp.clone(),
        };
        let res = async {
            if let Some(r) = &plan.resources {
                cgroup::apply(&cgroup_dir, r)?;
            }
            self.launch(&id, "init", &cfg, true).await
        }
        .await;
        match res {
            Ok((init, pending)) => {
                let pid = init.pid;
                let c = Arc::new(Container {
                    id: id.clone(),
                    cgroup_dir,
                    init,
                    namespaces: plan.namespaces,
                    seccomp,
                    status: Mutex::new(Status::Created),
                    pending: tokio::sync::Mutex::new(pending),
                    execs: Mutex::new(HashMap::new()),
                    storages,
                    oom_seen: Mutex::new(0),
                });
                if let Ok(mut map) = self.containers.lock() {
                    map.insert(id, c);
                }
                Ok(pid)
            }
            Err(e) => {
                if let Err(ce) = cgroup::destroy(&cgroup_dir).await {
                    tracing::warn!(error = %ce, "cleaning up a failed container");
                }
                unmount_all(&storages);
                Err(e)
            }
        }
    }

    /// Spawns the helper for `cfg` and waits until the process exists (and, for a container,
    /// until it is set up and waits for the start signal).
    async fn launch(
        &self,
        id: &str,
        name: &str,
        cfg: &InitConfig,
        container: bool,
    ) -> Result<(Arc<Proc>, Pending)> {
        std::fs::create_dir_all(&self.state_dir).map_err(io("creating the state directory"))?;
        let config_path = self.state_dir.join(format!("{id}.{name}.json"));
        let json = serde_json::to_vec(cfg)
            .map_err(|e| AgentError::Setup(format!("encoding the init config: {e}")))?;
        std::fs::write(&config_path, json).map_err(io("writing the init config"))?;
        let result = self.launch_inner(&config_path, cfg, container).await;
        let _ = std::fs::remove_file(&config_path);
        result
    }

    async fn launch_inner(
        &self,
        config_path: &Path,
        cfg: &InitConfig,
        container: bool,
    ) -> Result<(Arc<Proc>, Pending)> {
        let stdio = make_stdio(cfg.process.terminal)?;
        let (sync_r, sync_w) = pipe().map_err(io("pipe"))?;
        let (start_r, start_w) = if container {
            let (r, w) = pipe().map_err(io("pipe"))?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let mut sync = SyncReader::new(sync_r)?;
        let helper = spawn_helper(config_path, stdio.child, sync_w, start_r)?;
        let mut helper_exit = self.reaper.watch(helper);
        let pid = match sync.next_timeout().await {
            Ok(Some(SyncMsg::Pid(pid))) if pid > 0 => pid,
            Ok(Some(SyncMsg::Error(e))) => return Err(AgentError::Setup(e)),
            Ok(other) => {
                kill(helper, libc::SIGKILL);
                return Err(AgentError::Setup(format!(
                    "the init helper sent {other:?} instead of a pid"
                )));
            }
            Err(e) => {
                kill(helper, libc::SIGKILL);
                return Err(e);
            }
        };
        let exit = self.reaper.watch(pid);
        let _ = wait_exit(&mut helper_exit).await;
        let fail = |e: AgentError| {
            kill(pid, libc::SIGKILL);
            e
        };
        let proc_ = Arc::new(Proc {
            pid,
            exit,
            stdin: tokio::sync::Mutex::new(Some(stdio.stdin)),
            stdout: tokio::sync::Mutex::new(Some(stdio.stdout)),
            stderr: tokio::sync::Mutex::new(stdio.stderr),
            pty: stdio.pty,
        });
        if container {
            match sync.next_timeout().await.map_err(fail)? {
                Some(SyncMsg::Ready) => Ok((
                    proc_,
                    Pending {
                        start: start_w,
                        sync: Some(sync),
                    },
                )),
                Some(SyncMsg::Error(e)) => Err(fail(AgentError::Setup(e))),
                other => Err(fail(AgentError::Setup(format!(
                    "the container init sent {other:?} instead of ready"
                )))),
            }
        } else {
            match sync.next_timeout().await.map_err(fail)? {
                None => Ok((
                    proc_,
                    Pending {
                        start: None,
                        sync: None,
                    },
                )),
                Some(SyncMsg::Error(e)) => Err(fail(AgentError::Setup(e))),
                Some(other) => Err(fail(AgentError::Setup(format!(
                    "unexpected message {other:?} from the exec helper"
                )))),
            }
        }
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut pending = c.pending.lock().await;
        let (Some(start), Some(mut sync)) = (pending.start.take(), pending.sync.take()) else {
            return Err(AgentError::Precondition(format!(
                "container {id:?} was already started"
            )));
        };
        if c.init.exited().is_some() {
            return Err(AgentError::Precondition(format!(
                "container {id:?} has stopped"
            )));
        }
        let file = std::fs::File::from(start);
        std::io::Write::write_all(&mut &file, b"s").map_err(io("signalling the start"))?;
        drop(file);
        match sync.next_timeout().await? {
            None => {
                if let Ok(mut s) = c.status.lock() {
                    *s = Status::Running;
                }
                Ok(())
            }
            Some(SyncMsg::Error(e)) => Err(AgentError::Setup(e)),
            Some(other) => Err(AgentError::Setup(format!(
                "unexpected message {other:?} at start"
            ))),
        }
    }

    /// ExecProcess.
    pub async fn exec(&self, id: &str, exec_id: &str, process_json: &[u8]) -> Result<i32> {
        validate_id("exec id", exec_id)?;
        check_size("OCI process", process_json.len(), MAX_SPEC_SIZE)?;
        let c = self.get(id)?;
        let running = c
            .status
            .lock()
            .map(|s| *s == Status::Running)
            .unwrap_or(false);
        if !running || c.init.exited().is_some() {
            return Err(AgentError::Precondition(format!(
                "container {id:?} is not running"
            )));
        }
        {
            let execs = c
                .execs
                .lock()
                .map_err(|_| AgentError::Setup("state lock".into()))?;
            if execs.contains_key(exec_id) {
                return Err(AgentError::Exists(format!("exec {exec_id:?} in {id:?}")));
            }
            let alive = execs.values().filter(|p| p.exited().is_none()).count();
            if alive >= MAX_EXECS_PER_CONTAINER {
                return Err(AgentError::Exhausted(format!(
                    "{MAX_EXECS_PER_CONTAINER} processes in one container"
                )));
            }
        }
        let process: ProcessConfig = spec::plan_process(spec::parse_process(process_json)?)?;
        let cfg = InitConfig {
            exec: true,
            join_pid: c.init.pid,
            cgroup_dir: c.cgroup_dir.to_string_lossy().into_owned(),
            namespaces: c.namespaces.clone(),
            hostname: None,
            domainname: None,
            rootfs: String::new(),
            root_readonly: false,
            rootfs_propagation: 0,
            mounts: Vec::new(),
            devices: Vec::new(),
            masked_paths: Vec::new(),
            readonly_paths: Vec::new(),
            sysctl: Vec::new(),
            process,
            seccomp: c.seccomp.clone(),
        };
        let (p, _) = self
            .launch(id, &format!("exec-{exec_id}"), &cfg, false)
            .await?;
        let pid = p.pid;
        let mut execs = c
            .execs
            .lock()
            .map_err(|_| AgentError::Setup("state lock".into()))?;
        // Forget finished execs nobody asked about, to bound the table.
        if execs.len() >= MAX_EXECS_PER_CONTAINER {
            execs.retain(|_, p| p.exited().is_none());
        }
        execs.insert(exec_id.to_owned(), p);
        Ok(pid)
    }

    /// SignalProcess.
    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let sig = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| AgentError::Invalid(format!("signal {signal} out of range 1..=64")))?;
        if all {
            if !exec_id.is_empty() {
                return Err(AgentError::Invalid(
                    "`all` applies to the container, not to an exec".into(),
                ));
            }
            let c = self.get(id)?;
            for pid in cgroup::procs(&c.cgroup_dir)? {
                if let Ok(pid) = i32::try_from(pid) {
                    kill(pid, sig);
                }
            }
            return Ok(());
        }
        let p = self.process(id, exec_id)?;
        if p.exited().is_some() {
            return Err(AgentError::Precondition(
                "the process has already exited".into(),
            ));
        }
        kill(p.pid, sig);
        Ok(())
    }

    /// ReadStdout / ReadStderr: `None` at end of file.
    pub async fn read(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        max_len: u32,
    ) -> Result<Option<Vec<u8>>> {
        let p = self.process(id, exec_id)?;
        let max = match max_len as usize {
            0 => MAX_IO_CHUNK,
            n => n.min(MAX_IO_CHUNK),
        };
        let mut slot = if stderr {
            p.stderr.lock().await
        } else {
            p.stdout.lock().await
        };
        let Some(stream) = slot.as_ref() else {
            return Ok(None);
        };
        let data = stream
            .read(max)
            .await
            .map_err(io("reading process output"))?;
        if data.is_empty() {
            *slot = None;
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// WriteStdin.
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        check_size("stdin chunk", data.len(), MAX_IO_CHUNK)?;
        let p = self.process(id, exec_id)?;
        let slot = p.stdin.lock().await;
        let Some(stream) = slot.as_ref() else {
            return Err(AgentError::Precondition("stdin is closed".into()));
        };
        let mut written = 0;
        while written < data.len() {
            let n = stream
                .write(&data[written..])
                .await
                .map_err(io("writing stdin"))?;
            written += n;
        }
        Ok(written)
    }

    /// CloseStdin. For a terminal the end-of-file character is sent instead (the pty stays open
    /// for output).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.process(id, exec_id)?;
        let mut slot = p.stdin.lock().await;
        if p.pty.is_some() {
            if let Some(s) = slot.as_ref() {
                s.write(&[4]).await.map_err(io("writing EOF to the pty"))?;
            }
            return Ok(());
        }
        *slot = None;
        Ok(())
    }

    /// TtyWinResize.
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let p = self.process(id, exec_id)?;
        let Some(pty) = &p.pty else {
            return Err(AgentError::Precondition(
                "the process has no terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: u16::try_from(rows).map_err(|_| AgentError::Invalid("rows > 65535".into()))?,
            ws_col: u16::try_from(cols).map_err(|_| AgentError::Invalid("cols > 65535".into()))?,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from our pty master.
        if unsafe { libc::ioctl(pty.raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(AgentError::Io {
                what: "TIOCSWINSZ".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// ListProcesses.
    pub fn list_processes(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        Ok(cgroup::procs(&c.cgroup_dir)?)
    }

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<husk_agent_protocol::agent::StatsContainerResponse> {
        let c = self.get(id)?;
        Ok(cgroup::stats(&c.cgroup_dir)?)
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        check_size("OCI resources", resources_json.len(), MAX_SPEC_SIZE)?;
        let c = self.get(id)?;
        let r = spec::parse_resources(resources_json)?;
        spec::check_resources(&r)?;
        Ok(cgroup::apply(&c.cgroup_dir, &r)?)
    }

    /// PauseContainer / ResumeContainer.
    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let c = self.get(id)?;
        Ok(cgroup::freeze(&c.cgroup_dir, frozen).await?)
    }

    /// GetOOMEvent: the next container that had an OOM kill.
    pub async fn next_oom(&self) -> Result<String> {
        self.oom_rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| AgentError::Setup("OOM watcher stopped".into()))
    }

    /// RemoveContainer: kills every process, waits for them, removes the cgroup and storages.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        {
            let mut pending = c.pending.lock().await;
            pending.start = None;
            pending.sync = None;
        }
        self.note_oom_kills(&c);
        cgroup::destroy(&c.cgroup_dir).await?;
        if c.init.exited().is_none() {
            kill(c.init.pid, libc::SIGKILL);
        }
        let procs: Vec<Arc<Proc>> = std::iter::once(c.init.clone())
            .chain(
                c.execs
                    .lock()
                    .map(|m| m.values().cloned().collect::<Vec<_>>())
                    .unwrap_or_default(),
            )
            .collect();
        for p in procs {
            if tokio::time::timeout(KILL_TIMEOUT, p.wait()).await.is_err() {
                return Err(AgentError::Setup(format!(
                    "process {} of container {id:?} did not die after SIGKILL",
                    p.pid
                )));
            }
        }
        unmount_all(&c.storages);
        if let Ok(mut map) = self.containers.lock() {
            map.remove(id);
        }
        Ok(())
    }
}
