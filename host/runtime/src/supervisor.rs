//! The sandbox supervisor: one long-lived process per container (hidden verb
//! `sandbox-supervisor`, started by `create` in a session of its own). It sets up the share,
//! starts husk-vmm, has the agent create the sandbox and the container, answers `create`, then
//! relays the container's stdio and waits for its process. When that process ends it stops the
//! VM, removes the share, and exits with the process's status (re-raising a terminating signal),
//! which is what engines waiting for the container's PID (the supervisor's) expect.
//!
//! The supervisor does not read the configuration or the bundle: `create` decides everything
//! ([`Prepared::load`], where the checks are made once) and writes its decisions to the
//! container's state directory ([`PREPARED_FILE`], husk's own), which the supervisor reads
//! ([`Prepared::read`]) and acts on.
//!
//! `create` and the supervisor talk over a pipe on the supervisor's fd [`ANSWER_FD`]: the
//! supervisor writes `ok\n`, or `error <status>\n<message>`, and closes it. End of file without
//! an answer means the supervisor died.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use husk_agent_protocol::agent::CreateContainerRequest;
use husk_sandbox::guest::{self, GuestError};
use husk_sandbox::paths::{PathError, SandboxPaths};
use husk_sandbox::process::Recorded;
use husk_sandbox::vm::{self, BootSpec, Host, Layout, Sandbox, SandboxError};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use crate::bundle::{self, Bundle, BundleError};
use crate::cgroup::{self, CgroupError};
use crate::config::{self, Config, ConfigError, Discovery};
use crate::console::ConsoleError;
use crate::exit;
use crate::id::ContainerId;
use crate::options::Options;
use crate::relay::{self, HostStdio};
use crate::share::{self, ShareError, SharePlan};
use crate::sizing::{self, SizingError, VmSize};
use crate::store::{self, StoreError};

/// The supervisor's file descriptor carrying its answer to `create`.
pub const ANSWER_FD: RawFd = 3;
/// Most bytes of an answer read by `create`.
const MAX_ANSWER: u64 = 64 * 1024;
/// How long `delete` waits for a supervisor to end after SIGTERM before SIGKILL.
const SUPERVISOR_STOP_GRACE: Duration = Duration::from_secs(10);
/// What `create` decided ([`Prepared`], JSON), in the container's state directory.
pub const PREPARED_FILE: &str = "prepared.json";
/// The largest [`PREPARED_FILE`] written or read: it holds the spec twice (as loaded and as
/// rewritten for the guest) besides the configuration, the share's binds and the paths.
pub const MAX_PREPARED_BYTES: u64 = 2 * bundle::MAX_CONFIG_BYTES + 4 * 1024 * 1024;

/// Why a sandbox could not be set up or supervised.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Paths(#[from] PathError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Agent(#[from] GuestError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// [`PREPARED_FILE`], what `create` decided, is missing, too large or corrupt.
    #[error("cannot read what create decided for the supervisor from {path}: {reason}")]
    Prepared { path: PathBuf, reason: String },
    /// A terminal was asked for without a way to hand it over.
    #[error("process.terminal is true but no --console-socket was given: the terminal has nowhere to go")]
    TerminalWithoutSocket,
    /// A console socket was given for a process without a terminal.
    #[error("--console-socket was given but process.terminal is false")]
    SocketWithoutTerminal,
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The supervisor reported a failure to `create`.
    #[error("{message}")]
    Reported { status: u8, message: String },
    /// The supervisor (or another helper, named) ended without answering.
    #[error("{0} ended without an answer ({1}); see the log")]
    NoAnswer(&'static str, String),
}

impl SupervisorError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SupervisorError::Config(_) => exit::CONFIG,
            SupervisorError::Bundle(_)
            | SupervisorError::Sizing(_)
            | SupervisorError::TerminalWithoutSocket
            | SupervisorError::SocketWithoutTerminal
            | SupervisorError::Cgroup(CgroupError::Invalid { .. }) => exit::BUNDLE,
            SupervisorError::Share(
                ShareError::NoSource { .. }
                | ShareError::BadSource { .. }
                | ShareError::TooManyMounts(_),
            ) => exit::BUNDLE,
            SupervisorError::Reported { status, .. } => *status,
            SupervisorError::Store(err) => err.exit_code(),
            _ => exit::FAILURE,
        }
    }
}

/// Everything `create` decides before it creates anything, checked once there (so bad input
/// leaves nothing behind), then handed to the supervisor in [`PREPARED_FILE`] so that it acts on
/// the same decisions without reading the configuration or the bundle again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepared {
    pub config: Config,
    pub bundle: Bundle,
    pub size: VmSize,
    pub plan: SharePlan,
    pub paths: SandboxPaths,
    /// The host cgroup named by `linux.cgroupsPath`, if any (see `crate::cgroup`).
    pub cgroup: Option<PathBuf>,
}

impl Prepared {
    /// Loads the configuration and the bundle, sizes the VM, plans the share, computes the paths.
    /// A terminal needs a console socket to go to, unless `foreground` (`run` without
    /// `--detach`: husk's own terminal); a console socket needs a terminal.
    pub fn load(
        options: &Options,
        id: &ContainerId,
        bundle_dir: &Path,
        console_socket: Option<&Path>,
        foreground: bool,
    ) -> Result<Self, SupervisorError> {
        let (config_path, explicit) = options.config_path();
        let config = config::load(&config_path, explicit, &Discovery::from_process()?)?;
        let bundle = bundle::load(bundle_dir)?;
        let terminal = bundle
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        match (terminal, console_socket.is_some()) {
            (true, false) if !foreground => return Err(SupervisorError::TerminalWithoutSocket),
            (false, true) => return Err(SupervisorError::SocketWithoutTerminal),
            _ => {}
        }
        let resources = bundle
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let size = sizing::vm_size(resources, &config)?;
        let plan = share::plan(&bundle, id)?;
        let paths = SandboxPaths::new(&options.root, &config, id)?;
        let cgroup = host_cgroup(&bundle.spec, options.systemd_cgroup)?;
        Ok(Self {
            config,
            bundle,
            size,
            plan,
            paths,
            cgroup,
        })
    }

    /// Writes these decisions to `dir/`[`PREPARED_FILE`] (atomically, mode 0600), for the
    /// supervisor.
    pub fn save(&self, dir: &Path) -> Result<(), SupervisorError> {
        let path = dir.join(PREPARED_FILE);
        let json = serde_json::to_vec(self).map_err(|e| SupervisorError::Io {
            action: "serialise",
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        if json.len() as u64 > MAX_PREPARED_BYTES {
            return Err(SupervisorError::Io {
                action: "write",
                path,
                source: io::Error::other(format!(
                    "{} bytes, more than the {MAX_PREPARED_BYTES} the supervisor reads",
                    json.len()
                )),
            });
        }
        Ok(store::write_atomic(dir, PREPARED_FILE, &json)?)
    }

    /// Reads the decisions [`Prepared::save`] wrote to `dir/`[`PREPARED_FILE`]. They are not
    /// checked again: the file is in husk's own state directory, written by `create` after its
    /// checks.
    pub fn read(dir: &Path) -> Result<Self, SupervisorError> {
        let path = dir.join(PREPARED_FILE);
        let unreadable = |reason: String| SupervisorError::Prepared {
            path: path.clone(),
            reason,
        };
        let file = File::open(&path).map_err(|e| {
            unreadable(if e.kind() == io::ErrorKind::NotFound {
                "the file does not exist".to_owned()
            } else {
                e.to_string()
            })
        })?;
        let mut bytes = Vec::new();
        file.take(MAX_PREPARED_BYTES.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| unreadable(e.to_string()))?;
        if bytes.len() as u64 > MAX_PREPARED_BYTES {
            return Err(unreadable(format!(
                "larger than {MAX_PREPARED_BYTES} bytes"
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| unreadable(format!("corrupt: {e}")))
    }

    /// Whether the container's process has a terminal.
    pub fn terminal(&self) -> bool {
        self.bundle
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
    }
}

/// The host cgroup `spec` names (`linux.cgroupsPath`), if any.
pub fn host_cgroup(
    spec: &oci_spec::runtime::Spec,
    systemd: bool,
) -> Result<Option<PathBuf>, CgroupError> {
    cgroup::of_spec(spec, Some(systemd))
}

/// How `create` starts the supervisor (which reads the rest from [`PREPARED_FILE`]).
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub id: &'a ContainerId,
    pub console_socket: Option<&'a Path>,
}

/// A command running this husk binary (for its hidden helpers).
pub(crate) fn husk_command(what: &'static str) -> Result<Command, SupervisorError> {
    let exe = std::env::current_exe().map_err(|source| SupervisorError::Spawn { what, source })?;
    Ok(Command::new(exe))
}

/// Starts the supervisor (in a new session, its answer pipe on [`ANSWER_FD`]) and waits for its
/// answer. On success the supervisor runs on, holding the sandbox; on failure it has already
/// undone what it did and is reaped here.
pub fn spawn(options: &Options, launch: &Launch<'_>) -> Result<Child, SupervisorError> {
    let mut command = husk_command("the sandbox supervisor (no path to husk)")?;
    command
        .args(options.global_args())
        .arg("sandbox-supervisor");
    if let Some(socket) = launch.console_socket {
        let socket = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
        command.arg("--console-socket").arg(socket);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    // After `--`: an ID may start with `-` (as for runc) and must not be read as a flag.
    command.arg("--").arg(launch.id.as_str());
    spawn_answering(command, "the sandbox supervisor")
}

/// Starts `command` (a husk helper) in a new session with the write end of a pipe on its
/// [`ANSWER_FD`], and waits for its answer (see the module documentation). On success the helper
/// runs on; on failure, or when it ends without an answer, it is reaped here.
pub(crate) fn spawn_answering(
    mut command: Command,
    what: &'static str,
) -> Result<Child, SupervisorError> {
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SupervisorError::Spawn {
            what,
            source: e.into(),
        })?;
    let answer_raw = write_end.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (dup2, fcntl, setsid) on integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if answer_raw == ANSWER_FD {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                if libc::fcntl(ANSWER_FD, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(answer_raw, ANSWER_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|source| SupervisorError::Spawn { what, source })?;
    drop(write_end);
    let answer = read_answer(File::from(read_end));
    match answer {
        Ok(Some(Ok(()))) => Ok(child),
        Ok(Some(Err(err))) => {
            let _ = child.wait();
            Err(err)
        }
        Ok(None) => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(SupervisorError::NoAnswer(what, status))
        }
        Err(err) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(SupervisorError::NoAnswer(what, err.to_string()))
        }
    }
}

/// Reads the supervisor's answer: `None` at end of file without one.
fn read_answer(pipe: File) -> io::Result<Option<Result<(), SupervisorError>>> {
    let mut bytes = Vec::new();
    pipe.take(MAX_ANSWER).read_to_end(&mut bytes)?;
    Ok(parse_answer(&String::from_utf8_lossy(&bytes)))
}

/// Parses an answer (see the module documentation).
pub fn parse_answer(text: &str) -> Option<Result<(), SupervisorError>> {
    if text == "ok\n" {
        return Some(Ok(()));
    }
    let (first, message) = text.split_once('\n')?;
    let status = first.strip_prefix("error ")?.parse::<u8>().ok()?;
    Some(Err(SupervisorError::Reported {
        status: if status == 0 { exit::FAILURE } else { status },
        message: message.trim_end().to_owned(),
    }))
}

/// Formats an answer.
pub fn format_answer(result: &Result<(), SupervisorError>) -> String {
    match result {
        Ok(()) => "ok\n".to_owned(),
        Err(err) => error_answer(err.exit_code(), err),
    }
}

/// The answer for a failure with exit status `status`.
pub(crate) fn error_answer(status: u8, message: &dyn std::fmt::Display) -> String {
    format!("error {status}\n{message}\n")
}

/// Writes `text` to the answer pipe, once: later answers go nowhere.
pub(crate) fn write_answer(answer: &mut Option<File>, text: &str) {
    if let Some(mut pipe) = answer.take() {
        let _ = pipe.write_all(text.as_bytes());
    }
}

/// Takes the answer pipe at [`ANSWER_FD`] (made close-on-exec so husk-vmm does not inherit it).
pub(crate) fn take_answer_fd() -> Option<File> {
    // SAFETY: F_GETFD on an integer fd only queries it; no memory is involved.
    if unsafe { libc::fcntl(ANSWER_FD, libc::F_GETFD) } < 0 {
        return None;
    }
    // Only a pipe is an answer pipe: a helper verb started by hand with some other fd 3 (a file
    // a shell opened) leaves it alone.
    // SAFETY: fd 3 is open (checked above); the borrow ends with this statement.
    let stat = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(ANSWER_FD) }).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    // SAFETY: as above, setting FD_CLOEXEC on the same fd.
    if unsafe { libc::fcntl(ANSWER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return None;
    }
    // SAFETY: fd 3 is an open pipe (checked above) placed there by `spawn` for this purpose;
    // nothing else in this process owns it, so ownership moves into the File.
    Some(File::from(unsafe { OwnedFd::from_raw_fd(ANSWER_FD) }))
}

/// Runs the supervisor (the hidden verb) on what `create` decided for container `id` (its
/// [`PREPARED_FILE`]). Does not return when the container's process ran: the supervisor exits
/// with its status.
pub fn run(options: &Options, id: &ContainerId, console_socket: Option<&Path>) -> u8 {
    let mut answer = take_answer_fd();
    let rt = match guest::runtime() {
        Ok(rt) => rt,
        Err(err) => {
            let result = Err(SupervisorError::from(err));
            send_answer(&mut answer, &result);
            return exit::FAILURE;
        }
    };
    let dir = store::Store::new(&options.root).container_dir(id);
    let outcome = rt.block_on(async {
        let prepared = match Prepared::read(&dir) {
            Ok(p) => p,
            Err(err) => {
                let status = err.exit_code();
                send_answer(&mut answer, &Err(err));
                return Ended::Failed(status);
            }
        };
        supervise(&Host::real(), id, prepared, console_socket, &mut answer).await
    });
    // Blocking stdin readers may still be parked in read(); do not wait for them.
    rt.shutdown_background();
    match outcome {
        Ended::Failed(status) => status,
        Ended::Process { code, signal } => finish(code, signal),
        Ended::Signaled(signal) => finish(signal.saturating_add(128), signal),
    }
}

fn send_answer(answer: &mut Option<File>, result: &Result<(), SupervisorError>) {
    if let Err(err) = result {
        tracing::error!("{err}");
    }
    write_answer(answer, &format_answer(result));
}

/// How supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Setup failed (answered) or the sandbox failed: exit with this status.
    Failed(u8),
    /// The container's process ended.
    Process { code: i32, signal: i32 },
    /// The supervisor was told to stop (`delete --force`, a signal to the container's PID).
    Signaled(i32),
}

/// The supervisor's exit status for the container's process: its status, or 128 + N for
/// signal N. The signal is not raised again on the supervisor: which signal it is, is the guest's
/// choice, and a core-dumping one (SIGSEGV, SIGQUIT, ...) would have the host dump the
/// supervisor's memory and run whatever `core_pattern` names.
fn finish(code: i32, signal: i32) -> u8 {
    if signal > 0 {
        return u8::try_from(signal.saturating_add(128) & 0xff).unwrap_or(exit::FAILURE);
    }
    u8::try_from(code & 0xff).unwrap_or(exit::FAILURE)
}

/// Sets up the sandbox on `host` (launcher and mounts: [`Host::real`] but in tests), answers
/// `create`, then supervises the container's process.
async fn supervise(
    host: &Host,
    id: &ContainerId,
    prepared: Prepared,
    console_socket: Option<&Path>,
    answer: &mut Option<File>,
) -> Ended {
    let (sandbox, stdio) = match set_up(host, id, &prepared, console_socket).await {
        Ok(ready) => ready,
        Err((err, sandbox)) => {
            let status = err.exit_code();
            if let Some(sandbox) = sandbox {
                sandbox.shutdown().await;
            }
            send_answer(answer, &Err(err));
            return Ended::Failed(status);
        }
    };
    send_answer(answer, &Ok(()));
    let ended = wait_for_process(id, &sandbox, stdio).await;
    sandbox.shutdown().await;
    ended
}

/// A failure of [`set_up`], with the sandbox when it was already booted.
type SetUpFailure = (SupervisorError, Option<Sandbox>);

async fn set_up(
    host: &Host,
    id: &ContainerId,
    prepared: &Prepared,
    console_socket: Option<&Path>,
) -> Result<(Sandbox, HostStdio), SetUpFailure> {
    let resources = prepared
        .bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref());
    let placement = prepared.cgroup.as_ref().map(|dir| cgroup::Placement {
        dir: dir.clone(),
        limits: cgroup::HostLimits::for_vm(
            prepared.size,
            resources,
            prepared.config.vmm.host_memory_mib,
        ),
    });
    if let Some(placement) = &placement {
        // The supervisor joins the container's cgroup too (engines look for the container's
        // processes there); husk-vmm, started below, starts in it.
        cgroup::prepare(Path::new(cgroup::CGROUP_ROOT), placement)
            .and_then(|()| cgroup::enter(&placement.dir))
            .map_err(|e| (e.into(), None))?;
        tracing::debug!("{id}: in cgroup {}", placement.dir.display());
    }
    let started = std::time::Instant::now();
    let hostname = prepared.bundle.spec.hostname().clone().unwrap_or_default();
    let sandbox = Sandbox::boot(
        host,
        BootSpec {
            id,
            config: &prepared.config,
            size: prepared.size,
            hostname,
            paths: prepared.paths.clone(),
            layout: Layout::InDirectory,
            cgroup: placement,
        },
    )
    .await
    .map_err(|e| (e.into(), None))?;
    tracing::debug!(ms = started.elapsed().as_millis(), "{id}: sandbox ready");
    match create_container(id, prepared, &sandbox, console_socket).await {
        Ok(stdio) => {
            tracing::debug!(
                ms = started.elapsed().as_millis(),
                "{id}: container created"
            );
            Ok((sandbox, stdio))
        }
        Err(err) => Err((err, Some(sandbox))),
    }
}

/// Shares the container's rootfs and mounts and has the agent create it.
async fn create_container(
    id: &ContainerId,
    prepared: &Prepared,
    sandbox: &Sandbox,
    console_socket: Option<&Path>,
) -> Result<HostStdio, SupervisorError> {
    sandbox.share(&prepared.plan)?;
    let mut spec = prepared.plan.guest_spec.clone();
    // Hooks are the runtime's (run on the host); the agent refuses them.
    spec.set_hooks(None);
    let spec_json = serde_json::to_vec(&spec).map_err(|e| SupervisorError::Io {
        action: "serialise the spec of",
        path: prepared.bundle.dir.clone(),
        source: io::Error::other(e),
    })?;
    sandbox
        .guest()
        .create_container(&CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: spec_json,
            rootfs_path: prepared.plan.guest_rootfs.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await
        .map_err(GuestError::from)?;
    if !prepared.terminal() {
        return Ok(HostStdio::Inherited);
    }
    let size = prepared
        .bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.console_size())
        .and_then(|b| {
            Some((
                u16::try_from(b.height()).ok()?,
                u16::try_from(b.width()).ok()?,
            ))
        });
    Ok(relay::terminal(console_socket, size)?)
}

/// Relays stdio and waits for the container's process, a termination signal, or husk-vmm's end.
async fn wait_for_process(id: &ContainerId, sandbox: &Sandbox, stdio: HostStdio) -> Ended {
    let cid = id.to_string();
    let attached = relay::attach(sandbox.guest(), &cid, "", stdio);
    let ended = wait_events(&cid, sandbox).await;
    attached
        .finish(matches!(ended, Ended::Process { .. }))
        .await;
    ended
}

async fn wait_events(cid: &str, sandbox: &Sandbox) -> Ended {
    let signals = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ];
    let mut streams = Vec::new();
    for kind in signals {
        match signal(kind) {
            Ok(s) => streams.push(s),
            Err(err) => {
                tracing::error!("cannot handle signals: {err}");
                return Ended::Failed(exit::FAILURE);
            }
        }
    }
    let [term, int, hup] = streams.as_mut_slice() else {
        return Ended::Failed(exit::FAILURE);
    };
    tokio::select! {
        status = sandbox.guest().wait_process(cid, "") => match status {
            Ok(status) => {
                tracing::debug!(code = status.code, signal = status.signal, "{cid}: process ended");
                Ended::Process { code: status.code, signal: status.signal }
            }
            Err(err) => {
                tracing::error!("{cid}: lost the agent: {err}");
                Ended::Failed(exit::FAILURE)
            }
        },
        status = sandbox.wait_exit() => {
            tracing::error!("{cid}: husk-vmm exited ({status}); log: {}", sandbox.paths().vmm_log.display());
            Ended::Failed(exit::FAILURE)
        }
        _ = term.recv() => Ended::Signaled(libc::SIGTERM),
        _ = int.recv() => Ended::Signaled(libc::SIGINT),
        _ = hup.recv() => Ended::Signaled(libc::SIGHUP),
    }
}

/// Makes sure a sandbox's supervisor and husk-vmm are gone and its share is removed (for
/// `delete` and for `create` failing after the supervisor answered). `supervisor` is the
/// supervisor's PID with its recorded start time, when it may still run.
pub fn reap_sandbox(
    paths: &SandboxPaths,
    supervisor: Option<(i32, Option<u64>)>,
) -> Result<(), ShareError> {
    if let Some((pid, start)) = supervisor {
        Recorded { pid, start }.stop(None, SUPERVISOR_STOP_GRACE);
    }
    vm::cleanup_leftovers(&Host::real(), paths, Layout::InDirectory)
}

/// SIGTERM to `pid` (when it is still the process started at `start`), SIGKILL after `grace`,
/// and waits until it is gone.
pub fn stop_process(pid: i32, start: Option<u64>, grace: Duration) {
    Recorded { pid, start }.stop(None, grace);
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::unix::fs::PermissionsExt;

    use husk_sandbox::fake::FakeHost;
    use husk_sandbox::share::GUEST_SHARE_DIR;

    use super::*;
    use crate::logging::LogFormat;
    use nix::sys::signal::Signal;

    const ID: &str = "sv-test";
    /// How long a test waits for the supervisor before it fails.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// A bundle (with a prestart hook), a configuration file and a state root in a temporary
    /// directory, and what `create` decides for them.
    struct Fixture {
        _dir: tempfile::TempDir,
        id: ContainerId,
        prepared: Prepared,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let bundle = dir.path().join("bundle");
            std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
            let spec = serde_json::json!({
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "hostname": "sv-host",
                "process": {"cwd": "/", "args": ["sh", "-c", "exit 3"], "user": {"uid": 0, "gid": 0}},
                "hooks": {"prestart": [{"path": "/bin/true"}]},
            });
            std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
            let config = dir.path().join("config.toml");
            let log_dir = dir.path().join("log");
            std::fs::write(
                &config,
                format!("[console]\nlog_dir = {:?}\n", log_dir.to_str().unwrap()),
            )
            .unwrap();
            let options = Options {
                root: dir.path().join("run"),
                log: None,
                log_format: LogFormat::Text,
                debug: false,
                config: Some(config),
                systemd_cgroup: false,
            };
            let id = ContainerId::new(ID).unwrap();
            // What Store::create makes before the supervisor starts.
            std::fs::create_dir_all(options.root.join(ID)).unwrap();
            let prepared = Prepared::load(&options, &id, &bundle, None, false).unwrap();
            Fixture {
                _dir: dir,
                id,
                prepared,
            }
        }
    }

    /// Runs `test` on a runtime that is left behind without waiting for its blocking threads:
    /// the relay of a process without a terminal reads this process's standard input there,
    /// which may never end (a terminal).
    fn block_on<F: Future>(test: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let output = rt.block_on(async {
            tokio::time::timeout(PATIENCE, test)
                .await
                .expect("the supervisor finished in time")
        });
        rt.shutdown_background();
        output
    }

    /// An answer pipe: the supervisor's end, and the text written to it until it was closed.
    fn answer_pipe() -> (Option<File>, impl Future<Output = String>) {
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let text = async move {
            tokio::task::spawn_blocking(move || {
                let mut text = String::new();
                File::from(read_end).read_to_string(&mut text).unwrap();
                text
            })
            .await
            .unwrap()
        };
        (Some(File::from(write_end)), text)
    }

    /// Supervises the fixture's container on `fake`, calling `then` once the supervisor has
    /// answered; returns how supervision ended and the answer.
    fn supervise_on(fake: &FakeHost, fixture: &Fixture, then: impl FnOnce()) -> (Ended, String) {
        let (mut answer, text) = answer_pipe();
        block_on(async {
            let supervising = supervise(
                &fake.host,
                &fixture.id,
                fixture.prepared.clone(),
                None,
                &mut answer,
            );
            let answered = async {
                let text = text.await;
                then();
                text
            };
            tokio::join!(supervising, answered)
        })
    }

    /// Nothing of the sandbox is left: no VM running, nothing mounted, no share directory.
    fn assert_nothing_left(fake: &FakeHost, fixture: &Fixture) {
        assert_eq!(fake.launcher.launched().len(), 1);
        assert_eq!(fake.launcher.running(), 0);
        assert_eq!(fake.mounts.mounted(), Vec::<PathBuf>::new());
        assert!(!fixture.prepared.paths.shared.exists());
    }

    #[test]
    fn supervise_creates_the_container_answers_ok_and_ends_with_its_process() {
        let fixture = Fixture::new();
        let fake = FakeHost::new();
        let guest = fake.guest().clone();

        let (ended, answer) = supervise_on(&fake, &fixture, || guest.exit(ID, "", 3));

        assert_eq!(answer, "ok\n");
        assert_eq!(ended, Ended::Process { code: 3, signal: 0 });
        let sandbox = guest.sandbox().expect("CreateSandbox was sent");
        assert_eq!(sandbox.sandbox_id, ID);
        assert_eq!(sandbox.hostname, "sv-host");
        let created = guest.created();
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].container_id, ID);
        let rootfs = format!("{GUEST_SHARE_DIR}/{ID}/rootfs");
        assert_eq!(created[0].rootfs_path, rootfs);
        let sent: oci_spec::runtime::Spec =
            serde_json::from_slice(&created[0].oci_spec_json).unwrap();
        assert!(fixture.prepared.bundle.spec.hooks().is_some());
        assert_eq!(sent.hooks(), &None);
        assert_eq!(
            sent.root().as_ref().map(|r| r.path().clone()),
            Some(PathBuf::from(&rootfs))
        );
        assert_eq!(sent.process(), fixture.prepared.plan.guest_spec.process());
        assert!(guest.destroyed(), "DestroySandbox was sent");
        assert!(fake.launcher.signals().contains(&Signal::SIGTERM));
        assert_nothing_left(&fake, &fixture);
    }

    #[test]
    fn a_failed_create_container_is_answered_with_the_agents_message_and_undone() {
        let fixture = Fixture::new();
        let fake = FakeHost::new();
        fake.guest()
            .fail("CreateContainer", "exec: sh: no such file or directory");

        let (ended, answer) = supervise_on(&fake, &fixture, || {});

        assert_eq!(ended, Ended::Failed(exit::FAILURE));
        let (status, message) = answer.split_once('\n').unwrap();
        assert_eq!(status, format!("error {}", exit::FAILURE));
        assert!(
            message.contains("exec: sh: no such file or directory"),
            "{message}"
        );
        assert!(fake.guest().destroyed(), "DestroySandbox was sent");
        assert!(!fake.guest().has_container(ID));
        assert_nothing_left(&fake, &fixture);
    }

    #[test]
    fn a_vmm_dying_while_booting_is_answered_as_such() {
        let fixture = Fixture::new();
        let fake = FakeHost::new();
        fake.launcher.exit_while_booting("exit status: 2");

        let (ended, answer) = supervise_on(&fake, &fixture, || {});

        assert_eq!(ended, Ended::Failed(exit::FAILURE));
        assert!(answer.starts_with("error 1\n"), "{answer}");
        assert!(
            answer.contains("husk-vmm exited (exit status: 2)"),
            "{answer}"
        );
        assert_eq!(fake.guest().count("CreateSandbox"), 0);
        assert_eq!(fake.guest().count("CreateContainer"), 0);
        assert_nothing_left(&fake, &fixture);
    }

    #[test]
    fn a_vmm_crashing_after_the_answer_fails_the_supervisor() {
        let fixture = Fixture::new();
        let fake = FakeHost::new();
        let launcher = fake.launcher.clone();

        let (ended, answer) = supervise_on(&fake, &fixture, || launcher.crash("signal: 9"));

        assert_eq!(answer, "ok\n");
        assert_eq!(ended, Ended::Failed(exit::FAILURE));
        assert!(fake.guest().has_container(ID));
        // The VM was gone: nothing was left to destroy or signal.
        assert!(!fake.guest().destroyed());
        assert_eq!(fake.launcher.signals(), Vec::<Signal>::new());
        assert_nothing_left(&fake, &fixture);
    }

    #[test]
    fn what_create_decided_round_trips_through_its_file() {
        let fixture = Fixture::new();
        let dir = fixture.prepared.paths.dir.clone();

        fixture.prepared.save(&dir).unwrap();
        let read = Prepared::read(&dir).unwrap();

        // Everything but where the configuration came from (only `husk check` says that).
        let mut expected = fixture.prepared.clone();
        expected.config.origin = config::Origin::Defaults;
        assert_eq!(read, expected);
        let mode = std::fs::metadata(dir.join(PREPARED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_prepared_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();

        let err = Prepared::read(dir.path()).unwrap_err();

        let message = err.to_string();
        assert!(matches!(err, SupervisorError::Prepared { .. }), "{err:?}");
        assert!(
            message.contains(&dir.path().join(PREPARED_FILE).display().to_string()),
            "{message}"
        );
        assert!(message.contains("does not exist"), "{message}");
        assert_eq!(err.exit_code(), exit::FAILURE);
    }

    #[test]
    fn a_corrupt_prepared_file_is_a_clear_error() {
        let fixture = Fixture::new();
        let dir = fixture.prepared.paths.dir.clone();
        fixture.prepared.save(&dir).unwrap();
        let path = dir.join(PREPARED_FILE);
        let json = std::fs::read(&path).unwrap();
        std::fs::write(&path, &json[..json.len() / 2]).unwrap();

        let err = Prepared::read(&dir).unwrap_err();

        let message = err.to_string();
        assert!(matches!(err, SupervisorError::Prepared { .. }), "{err:?}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("corrupt"), "{message}");
    }

    #[test]
    fn an_oversized_prepared_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join(PREPARED_FILE)).unwrap();
        file.set_len(MAX_PREPARED_BYTES + 1).unwrap();

        let message = Prepared::read(dir.path()).unwrap_err().to_string();

        assert!(message.contains("larger than"), "{message}");
    }

    #[test]
    fn answers_round_trip() {
        assert!(matches!(
            parse_answer(&format_answer(&Ok(()))),
            Some(Ok(()))
        ));
        let err = SupervisorError::TerminalWithoutSocket;
        let text = format_answer(&Err(err));
        match parse_answer(&text) {
            Some(Err(SupervisorError::Reported { status, message })) => {
                assert_eq!(status, exit::BUNDLE);
                assert!(message.contains("--console-socket"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_no_answer() {
        for text in ["", "ok", "okay\n", "error x\nmsg", "error 3"] {
            assert!(parse_answer(text).is_none(), "{text:?}");
        }
    }

    #[test]
    fn an_error_status_of_zero_still_fails() {
        match parse_answer("error 0\nbad\n") {
            Some(Err(err)) => assert_eq!(err.exit_code(), exit::FAILURE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_statuses_of_a_process() {
        assert_eq!(finish(3, 0), 3);
        assert_eq!(finish(256 + 7, 0), 7);
        assert_eq!(finish(0, 0), 0);
        // A signal (here SIGSEGV, which would dump core if raised) is an exit status.
        assert_eq!(finish(139, libc::SIGSEGV), 139);
        assert_eq!(finish(0, libc::SIGKILL), 137);
    }
}
