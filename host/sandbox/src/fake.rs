//! Fakes of the sandbox's seams, for tests of the front ends without a VM or root (as rust-vmm
//! ships `MockSplitQueue`): [`FakeGuest`] plays the agent, [`FakeLauncher`] starts VMs that are
//! only a PID and an exit, [`FakeMounts`] keeps a mount table in memory.
//!
//! The fake agent behaves like the real one where the front ends depend on it: a container's
//! processes exist from create/exec on, end when the test says so ([`FakeGuest::exit`]) or on
//! SIGKILL/SIGTERM/SIGINT (128 + signal, as the agent reports a signalled process), their
//! output ends with them, unknown processes are refused with `NOT_FOUND`. A method can be made
//! to fail ([`FakeGuest::fail`]) or to wait until the test lets it go on ([`FakeGuest::hold`]).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use husk_agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, StatsContainerResponse,
};
use husk_agent_protocol::client::ExitStatus;
use husk_agent_protocol::ClientError;
use nix::sys::signal::Signal;
use tokio::sync::{watch, Notify};

use crate::guest::{Guest, GuestError, SharedGuest};
use crate::launch::{LaunchError, LaunchSpec, Launcher, Vmm};
use crate::share::{Mounter, Mounts};

/// One output stream of a fake process.
#[derive(Default)]
struct Stream {
    chunks: VecDeque<Vec<u8>>,
    ended: bool,
}

#[derive(Default)]
struct FakeProcess {
    pid: u32,
    exit: Option<ExitStatus>,
    stdout: Stream,
    stderr: Stream,
    stdin: Vec<u8>,
    stdin_closed: bool,
}

#[derive(Default)]
struct FakeContainer {
    started: bool,
    paused: bool,
    resources: Vec<Vec<u8>>,
}

/// An injected failure of one method.
#[derive(Debug, Clone)]
enum Failure {
    /// The agent refuses with `INTERNAL` and this message.
    Refused(String),
    /// The request's deadline elapses.
    TimedOut,
}

#[derive(Default)]
struct GuestState {
    calls: Vec<String>,
    sandbox: Option<CreateSandboxRequest>,
    destroyed: bool,
    containers: HashMap<String, FakeContainer>,
    created: Vec<CreateContainerRequest>,
    processes: HashMap<(String, String), FakeProcess>,
    failures: HashMap<&'static str, Failure>,
    holds: HashMap<&'static str, watch::Receiver<bool>>,
    ooms: VecDeque<String>,
    next_pid: u32,
}

/// A fake husk-agent (see the module documentation).
#[derive(Clone, Default)]
pub struct FakeGuest {
    state: Arc<Mutex<GuestState>>,
    /// Woken on every change a waiting call may be waiting for.
    changed: Arc<Notify>,
}

/// Lets a held method go on once dropped or released.
pub struct Hold {
    release: watch::Sender<bool>,
    entered: Arc<Notify>,
    method: &'static str,
    guest: FakeGuest,
}

impl Hold {
    /// Waits until a call of the held method has arrived and is waiting.
    pub async fn entered(&self) {
        loop {
            let notified = self.entered.notified();
            if self
                .guest
                .calls()
                .iter()
                .any(|c| c.split(' ').next() == Some(self.method))
            {
                return;
            }
            notified.await;
        }
    }

    /// Lets the held calls go on.
    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.release.send(true);
        self.guest.state().holds.remove(self.method);
    }
}

fn not_found(method: &'static str, what: String) -> ClientError {
    ClientError::Rpc {
        method,
        code: ttrpc::Code::NOT_FOUND,
        message: format!("{what} not found"),
    }
}

impl FakeGuest {
    pub fn new() -> FakeGuest {
        FakeGuest::default()
    }

    fn state(&self) -> MutexGuard<'_, GuestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call so far, one line each: method name, then its arguments.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// How many calls of `method` were made.
    pub fn count(&self, method: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.split(' ').next() == Some(method))
            .count()
    }

    /// The CreateSandbox request, once made.
    pub fn sandbox(&self) -> Option<CreateSandboxRequest> {
        self.state().sandbox.clone()
    }

    /// Whether DestroySandbox was called.
    pub fn destroyed(&self) -> bool {
        self.state().destroyed
    }

    /// The CreateContainer requests, in order.
    pub fn created(&self) -> Vec<CreateContainerRequest> {
        self.state().created.clone()
    }

    /// Whether the container exists (created and not removed).
    pub fn has_container(&self, container: &str) -> bool {
        self.state().containers.contains_key(container)
    }

    /// Whether the container was started.
    pub fn started(&self, container: &str) -> bool {
        self.state()
            .containers
            .get(container)
            .is_some_and(|c| c.started)
    }

    /// Whether the container is paused.
    pub fn paused(&self, container: &str) -> bool {
        self.state()
            .containers
            .get(container)
            .is_some_and(|c| c.paused)
    }

    /// The resources of every UpdateContainer of `container`.
    pub fn updates(&self, container: &str) -> Vec<Vec<u8>> {
        self.state()
            .containers
            .get(container)
            .map(|c| c.resources.clone())
            .unwrap_or_default()
    }

    /// What was written to a process's stdin.
    pub fn stdin_of(&self, container: &str, exec: &str) -> Vec<u8> {
        self.state()
            .processes
            .get(&(container.to_owned(), exec.to_owned()))
            .map(|p| p.stdin.clone())
            .unwrap_or_default()
    }

    /// Whether a process's stdin was closed.
    pub fn stdin_closed(&self, container: &str, exec: &str) -> bool {
        self.state()
            .processes
            .get(&(container.to_owned(), exec.to_owned()))
            .is_some_and(|p| p.stdin_closed)
    }

    /// Makes every later call of `method` (the agent's RPC name, e.g. "StartContainer") fail
    /// with `INTERNAL` and `message`.
    pub fn fail(&self, method: &'static str, message: &str) {
        self.state()
            .failures
            .insert(method, Failure::Refused(message.to_owned()));
    }

    /// Makes every later call of `method` fail as a request whose deadline elapsed (the agent
    /// never answered), as ttrpc's client reports it.
    pub fn time_out(&self, method: &'static str) {
        self.state().failures.insert(method, Failure::TimedOut);
    }

    /// Makes calls of `method` wait until the returned [`Hold`] is released or dropped.
    pub fn hold(&self, method: &'static str) -> Hold {
        let (release, rx) = watch::channel(false);
        self.state().holds.insert(method, rx);
        Hold {
            release,
            entered: self.changed.clone(),
            method,
            guest: self.clone(),
        }
    }

    /// Queues output for a process (before or after it exists).
    pub fn push_output(&self, container: &str, exec: &str, stderr: bool, data: &[u8]) {
        {
            let mut state = self.state();
            let process = state
                .processes
                .entry((container.to_owned(), exec.to_owned()))
                .or_default();
            let stream = if stderr {
                &mut process.stderr
            } else {
                &mut process.stdout
            };
            stream.chunks.push_back(data.to_vec());
        }
        self.changed.notify_waiters();
    }

    /// Ends one output stream of a process.
    pub fn end_output(&self, container: &str, exec: &str, stderr: bool) {
        {
            let mut state = self.state();
            let process = state
                .processes
                .entry((container.to_owned(), exec.to_owned()))
                .or_default();
            if stderr {
                process.stderr.ended = true;
            } else {
                process.stdout.ended = true;
            }
        }
        self.changed.notify_waiters();
    }

    /// Ends a process with `code` (and its output with it).
    pub fn exit(&self, container: &str, exec: &str, code: i32) {
        self.end_process(
            &mut self.state(),
            container,
            exec,
            ExitStatus { code, signal: 0 },
        );
        self.changed.notify_waiters();
    }

    /// Reports an OOM kill of `container` (GetOOMEvent answers it).
    pub fn oom(&self, container: &str) {
        self.state().ooms.push_back(container.to_owned());
        self.changed.notify_waiters();
    }

    /// OOM kills reported with [`FakeGuest::oom`] that GetOOMEvent has not answered yet.
    pub fn pending_ooms(&self) -> usize {
        self.state().ooms.len()
    }

    fn end_process(&self, state: &mut GuestState, container: &str, exec: &str, exit: ExitStatus) {
        if let Some(process) = state
            .processes
            .get_mut(&(container.to_owned(), exec.to_owned()))
        {
            if process.exit.is_none() {
                process.exit = Some(exit);
            }
            process.stdout.ended = true;
            process.stderr.ended = true;
        }
    }

    /// Records a call, applies an injected failure, waits while the method is held.
    async fn call(&self, method: &'static str, args: String) -> Result<(), ClientError> {
        let (failure, hold) = {
            let mut state = self.state();
            state.calls.push(format!("{method} {args}"));
            (
                state.failures.get(method).cloned(),
                state.holds.get(method).cloned(),
            )
        };
        self.changed.notify_waiters();
        if let Some(mut hold) = hold {
            let _ = hold.wait_for(|released| *released).await;
        }
        match failure {
            Some(Failure::Refused(message)) => Err(ClientError::Rpc {
                method,
                code: ttrpc::Code::INTERNAL,
                message,
            }),
            Some(Failure::TimedOut) => Err(ClientError::Transport {
                method,
                reason: format!("ttrpc err: {}", crate::stall::DEADLINE_ELAPSED),
            }),
            None => Ok(()),
        }
    }

    /// Waits until `ready` gives an answer.
    async fn until<T>(&self, mut ready: impl FnMut(&mut GuestState) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            if let Some(answer) = ready(&mut self.state()) {
                return answer;
            }
            notified.await;
        }
    }

    fn known(&self, method: &'static str, container: &str, exec: &str) -> Result<(), ClientError> {
        if self
            .state()
            .processes
            .get(&(container.to_owned(), exec.to_owned()))
            .is_some_and(|p| p.pid != 0)
        {
            Ok(())
        } else {
            Err(not_found(method, format!("process {container}/{exec}")))
        }
    }
}

#[async_trait]
impl Guest for FakeGuest {
    async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), ClientError> {
        self.call("CreateSandbox", req.sandbox_id.clone()).await?;
        self.state().sandbox = Some(req.clone());
        Ok(())
    }

    async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        self.call("DestroySandbox", sandbox_id.to_owned()).await?;
        let mut state = self.state();
        state.destroyed = true;
        let keys: Vec<_> = state.processes.keys().cloned().collect();
        for (c, e) in keys {
            self.end_process(
                &mut state,
                &c,
                &e,
                ExitStatus {
                    code: 137,
                    signal: 9,
                },
            );
        }
        drop(state);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, ClientError> {
        self.call("CreateContainer", req.container_id.clone())
            .await?;
        let mut state = self.state();
        if state.containers.contains_key(&req.container_id) {
            return Err(ClientError::Rpc {
                method: "CreateContainer",
                code: ttrpc::Code::ALREADY_EXISTS,
                message: format!("container {} exists", req.container_id),
            });
        }
        state.next_pid += 1;
        let pid = state.next_pid;
        state
            .containers
            .insert(req.container_id.clone(), FakeContainer::default());
        state.created.push(req.clone());
        state
            .processes
            .entry((req.container_id.clone(), String::new()))
            .or_default()
            .pid = pid;
        Ok(pid)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.call("StartContainer", container_id.to_owned()).await?;
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| not_found("StartContainer", format!("container {container_id}")))?;
        container.started = true;
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.call("RemoveContainer", container_id.to_owned())
            .await?;
        let mut state = self.state();
        state.containers.remove(container_id);
        state.processes.retain(|(c, _), _| c != container_id);
        Ok(())
    }

    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, ClientError> {
        self.call(
            "ExecProcess",
            format!(
                "{container_id} {exec_id} {}",
                String::from_utf8_lossy(process_json)
            ),
        )
        .await?;
        let mut state = self.state();
        if !state.containers.contains_key(container_id) {
            return Err(not_found(
                "ExecProcess",
                format!("container {container_id}"),
            ));
        }
        state.next_pid += 1;
        let pid = state.next_pid;
        state
            .processes
            .entry((container_id.to_owned(), exec_id.to_owned()))
            .or_default()
            .pid = pid;
        Ok(pid)
    }

    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.call(
            "SignalProcess",
            format!("{container_id} {exec_id} {signal} all={all}"),
        )
        .await?;
        self.known("SignalProcess", container_id, exec_id)?;
        let deadly = [libc::SIGKILL, libc::SIGTERM, libc::SIGINT]
            .iter()
            .any(|s| u32::try_from(*s).ok() == Some(signal));
        if deadly {
            let mut state = self.state();
            let exit = ExitStatus {
                code: 128 + i32::try_from(signal).unwrap_or(0),
                signal: i32::try_from(signal).unwrap_or(0),
            };
            let targets: Vec<_> = state
                .processes
                .keys()
                .filter(|(c, e)| c == container_id && (all || e == exec_id))
                .cloned()
                .collect();
            for (c, e) in targets {
                self.end_process(&mut state, &c, &e, exit);
            }
            drop(state);
            self.changed.notify_waiters();
        }
        Ok(())
    }

    async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError> {
        self.call("WaitProcess", format!("{container_id} {exec_id}"))
            .await?;
        self.known("WaitProcess", container_id, exec_id)?;
        let key = (container_id.to_owned(), exec_id.to_owned());
        let exit = self
            .until(|state| match state.processes.get(&key) {
                Some(p) => p.exit.map(Ok),
                None => Some(Err(not_found("WaitProcess", format!("process {key:?}")))),
            })
            .await?;
        Ok(exit)
    }

    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.call(
            "WriteStdin",
            format!("{container_id} {exec_id} {}", data.len()),
        )
        .await?;
        self.known("WriteStdin", container_id, exec_id)?;
        let mut state = self.state();
        if let Some(p) = state
            .processes
            .get_mut(&(container_id.to_owned(), exec_id.to_owned()))
        {
            p.stdin.extend_from_slice(data);
        }
        Ok(())
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        self.call("CloseStdin", format!("{container_id} {exec_id}"))
            .await?;
        let mut state = self.state();
        if let Some(p) = state
            .processes
            .get_mut(&(container_id.to_owned(), exec_id.to_owned()))
        {
            p.stdin_closed = true;
        }
        Ok(())
    }

    async fn read_output(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let method = if stderr { "ReadStderr" } else { "ReadStdout" };
        self.call(method, format!("{container_id} {exec_id} max={max_len}"))
            .await?;
        let key = (container_id.to_owned(), exec_id.to_owned());
        let answer = self
            .until(|state| {
                let process = state.processes.entry(key.clone()).or_default();
                let stream = if stderr {
                    &mut process.stderr
                } else {
                    &mut process.stdout
                };
                match stream.chunks.pop_front() {
                    Some(mut chunk) => {
                        if chunk.len() > max_len {
                            let rest = chunk.split_off(max_len);
                            stream.chunks.push_front(rest);
                        }
                        Some(Some(chunk))
                    }
                    None if stream.ended => Some(None),
                    None => None,
                }
            })
            .await;
        Ok(answer)
    }

    async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        self.call(
            "TtyWinResize",
            format!("{container_id} {exec_id} {rows}x{cols}"),
        )
        .await?;
        self.known("TtyWinResize", container_id, exec_id)
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        self.call("ListProcesses", container_id.to_owned()).await?;
        let state = self.state();
        if !state.containers.contains_key(container_id) {
            return Err(not_found(
                "ListProcesses",
                format!("container {container_id}"),
            ));
        }
        let mut pids: Vec<u32> = state
            .processes
            .iter()
            .filter(|((c, _), p)| c == container_id && p.pid != 0 && p.exit.is_none())
            .map(|(_, p)| p.pid)
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        self.call("StatsContainer", container_id.to_owned()).await?;
        if !self.has_container(container_id) {
            return Err(not_found(
                "StatsContainer",
                format!("container {container_id}"),
            ));
        }
        Ok(StatsContainerResponse::default())
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), ClientError> {
        self.call("UpdateContainer", container_id.to_owned())
            .await?;
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| not_found("UpdateContainer", format!("container {container_id}")))?;
        container.resources.push(resources_json.to_vec());
        Ok(())
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.call("PauseContainer", container_id.to_owned()).await?;
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| not_found("PauseContainer", format!("container {container_id}")))?;
        container.paused = true;
        Ok(())
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.call("ResumeContainer", container_id.to_owned())
            .await?;
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| not_found("ResumeContainer", format!("container {container_id}")))?;
        container.paused = false;
        Ok(())
    }

    async fn oom_event(&self) -> Result<String, ClientError> {
        self.until(|state| {
            if state.destroyed {
                return Some(Err(ClientError::Transport {
                    method: "GetOOMEvent",
                    reason: "the sandbox is gone".into(),
                }));
            }
            state.ooms.pop_front().map(Ok)
        })
        .await
    }
}

#[derive(Default)]
struct LauncherState {
    launched: Vec<LaunchSpec>,
    vmms: Vec<Arc<FakeVmmState>>,
    fail_launch: Option<String>,
    exit_while_booting: Option<String>,
}

/// Starts fake VMs whose guest is one [`FakeGuest`] (see the module documentation).
#[derive(Clone, Default)]
pub struct FakeLauncher {
    state: Arc<Mutex<LauncherState>>,
    guest: FakeGuest,
    next_pid: Arc<AtomicU32>,
}

impl FakeLauncher {
    pub fn new(guest: FakeGuest) -> FakeLauncher {
        FakeLauncher {
            guest,
            next_pid: Arc::new(AtomicU32::new(40_000)),
            ..Default::default()
        }
    }

    fn state(&self) -> MutexGuard<'_, LauncherState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest every VM of this launcher runs.
    pub fn guest(&self) -> &FakeGuest {
        &self.guest
    }

    /// Everything launched so far.
    pub fn launched(&self) -> Vec<LaunchSpec> {
        self.state().launched.clone()
    }

    /// How many launched VMs have not exited.
    pub fn running(&self) -> usize {
        self.state()
            .vmms
            .iter()
            .filter(|v| v.exit.borrow().is_none())
            .count()
    }

    /// The signals sent to the VMs, in order.
    pub fn signals(&self) -> Vec<Signal> {
        self.state()
            .vmms
            .iter()
            .flat_map(|v| v.signals.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// Makes the next launches fail to start.
    pub fn fail_launch(&self, message: &str) {
        self.state().fail_launch = Some(message.to_owned());
    }

    /// Makes the next VMs exit with `status` before their agent answers.
    pub fn exit_while_booting(&self, status: &str) {
        self.state().exit_while_booting = Some(status.to_owned());
    }

    /// Ends every running VM as if husk-vmm had died with `status`.
    pub fn crash(&self, status: &str) {
        for vmm in &self.state().vmms {
            let _ = vmm.exit.send(Some(status.to_owned()));
        }
    }
}

struct FakeVmmState {
    pid: u32,
    exit: watch::Sender<Option<String>>,
    signals: Mutex<Vec<Signal>>,
    /// Ignore SIGTERM (a VMM that needs SIGKILL).
    stubborn: AtomicBool,
}

struct FakeVmm {
    state: Arc<FakeVmmState>,
    guest: FakeGuest,
    boot_exit: Option<String>,
}

impl Launcher for FakeLauncher {
    fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn Vmm>, LaunchError> {
        let mut state = self.state();
        state.launched.push(spec.clone());
        if let Some(message) = &state.fail_launch {
            return Err(LaunchError::Spawn {
                program: spec.program.clone(),
                source: io::Error::other(message.clone()),
            });
        }
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let (exit, _) = watch::channel(None);
        let vmm = Arc::new(FakeVmmState {
            pid,
            exit,
            signals: Mutex::new(Vec::new()),
            stubborn: AtomicBool::new(false),
        });
        state.vmms.push(vmm.clone());
        if let Some(dir) = spec.pid_file.parent() {
            if dir.is_dir() {
                let _ = std::fs::write(&spec.pid_file, format!("{pid}\n"));
            }
        }
        Ok(Box::new(FakeVmm {
            state: vmm,
            guest: self.guest.clone(),
            boot_exit: state.exit_while_booting.clone(),
        }))
    }
}

#[async_trait]
impl Vmm for FakeVmm {
    fn pid(&self) -> u32 {
        self.state.pid
    }

    fn exit(&self) -> watch::Receiver<Option<String>> {
        self.state.exit.subscribe()
    }

    async fn connect(
        &self,
        _vsock: &Path,
        _timeout: Duration,
        _cancel: Arc<AtomicBool>,
    ) -> Result<SharedGuest, GuestError> {
        if let Some(status) = &self.boot_exit {
            let _ = self.state.exit.send(Some(status.clone()));
            // Never connects: the sandbox sees the exit.
            std::future::pending::<()>().await;
        }
        Ok(Arc::new(self.guest.clone()))
    }

    fn signal(&self, signal: Signal) {
        self.state
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(signal);
        let ends = signal == Signal::SIGKILL
            || (signal == Signal::SIGTERM && !self.state.stubborn.load(Ordering::SeqCst));
        if ends && self.state.exit.borrow().is_none() {
            let _ = self
                .state
                .exit
                .send(Some(format!("signal: {}", signal as i32)));
        }
    }
}

/// A mount table in memory: binds are recorded, nothing is mounted.
#[derive(Clone, Default)]
pub struct FakeMounts {
    table: Arc<Mutex<Vec<PathBuf>>>,
    readonly: Arc<Mutex<Vec<PathBuf>>>,
}

impl FakeMounts {
    pub fn new() -> FakeMounts {
        FakeMounts::default()
    }

    /// The mount points, in mount order.
    pub fn mounted(&self) -> Vec<PathBuf> {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The mount points remounted read-only.
    pub fn readonly(&self) -> Vec<PathBuf> {
        self.readonly
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Mounter for FakeMounts {
    fn bind(&self, _source: &Path, target: &Path, _recursive: bool) -> io::Result<()> {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target.to_path_buf());
        Ok(())
    }

    fn attach(
        &self,
        source: &Path,
        target: &Path,
        recursive: bool,
        readonly: bool,
    ) -> io::Result<()> {
        self.bind(source, target, recursive)?;
        if readonly {
            self.remount_readonly(target)?;
        }
        Ok(())
    }

    fn remount_readonly(&self, target: &Path) -> io::Result<()> {
        self.readonly
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target.to_path_buf());
        Ok(())
    }

    fn make_private(&self, _target: &Path) -> io::Result<()> {
        Ok(())
    }

    fn make_shared(&self, _target: &Path) -> io::Result<()> {
        Ok(())
    }

    fn make_slave(&self, _target: &Path) -> io::Result<()> {
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.iter().rposition(|p| p == target) {
            Some(i) => {
                table.remove(i);
                Ok(())
            }
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl Mounts for FakeMounts {
    fn mountinfo(&self) -> io::Result<String> {
        Ok(self
            .mounted()
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{} 1 0:1 / {} rw - fake fake rw\n", i + 100, p.display()))
            .collect())
    }
}

/// A [`crate::vm::Host`] of fakes, with handles to inspect them.
pub struct FakeHost {
    pub host: crate::vm::Host,
    pub launcher: FakeLauncher,
    pub mounts: FakeMounts,
}

impl FakeHost {
    pub fn new() -> FakeHost {
        let launcher = FakeLauncher::new(FakeGuest::new());
        let mounts = FakeMounts::new();
        FakeHost {
            host: crate::vm::Host {
                launcher: Arc::new(launcher.clone()),
                mounts: Arc::new(mounts.clone()),
            },
            launcher,
            mounts,
        }
    }

    /// The guest of the VMs.
    pub fn guest(&self) -> &FakeGuest {
        self.launcher.guest()
    }
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new()
    }
}
