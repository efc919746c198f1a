//! A typed host-side client for the agent API.
//!
//! [`AgentClient::connect`] (or [`AgentClient::from_socket`] for a stream the caller already
//! connected, e.g. through the VMM's vsock proxy) negotiates the API version with `Check` before
//! it returns, so a host and a guest of different API versions fail at once with
//! [`ClientError::VersionMismatch`]. Every request also carries the version in its metadata.

use std::time::Duration;

use ttrpc::context::Context;
use ttrpc::r#async::transport::Socket;

use crate::agent::{
    CheckRequest, CheckResponse, ContainerRequest, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, ExecProcessRequest, GetGuestDetailsRequest, GetOOMEventRequest,
    GuestDetails, OOMEvent, ProcessRequest, ReadStreamRequest, ReadStreamResponse,
    SignalProcessRequest, StatsContainerResponse, TtyWinResizeRequest, UpdateContainerRequest,
    WaitProcessResponse, WriteStdinRequest,
};
use crate::validate::{check_size, validate_id, ValidationError};
use crate::{agent_ttrpc, API_VERSION, API_VERSION_METADATA_KEY, MAX_IO_CHUNK, MAX_SPEC_SIZE};

/// How long a control request (create, start, signal, ...) may take before the client gives up.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest error message of the agent kept in a [`ClientError::Rpc`]; the rest is cut off.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// The largest signal number Linux has (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;

/// Errors of the host-side client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the agent failed.
    #[error("cannot connect to the agent at {addr}: {reason}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The agent speaks another API version.
    #[error("agent API version mismatch: this host speaks v{client}, the agent speaks v{agent}; use host and guest image of the same husk release")]
    VersionMismatch {
        /// Our version.
        client: u32,
        /// The agent's version.
        agent: u32,
    },
    /// The agent answered with an error status.
    #[error("agent refused {method}: {code:?}: {message}")]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// The ttrpc status code.
        code: ttrpc::Code,
        /// The agent's message.
        message: String,
    },
    /// The connection failed during a request.
    #[error("agent request {method} failed: {reason}")]
    Transport {
        /// The RPC.
        method: &'static str,
        /// What happened.
        reason: String,
    },
    /// The request was refused locally before being sent.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The agent's answer breaks the API contract (a hostile or broken guest).
    #[error("agent answered {method} with an invalid response: {reason}")]
    BadResponse {
        /// The RPC.
        method: &'static str,
        /// What is wrong with the answer.
        reason: String,
    },
}

impl ClientError {
    /// The ttrpc status code when the agent refused the request.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit status, or 128 + signal when a signal killed the process.
    pub code: i32,
    /// The terminating signal, 0 when the process exited on its own.
    pub signal: i32,
}

/// Typed client of one agent connection. Cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    timeout: Duration,
    agent_version: String,
}

pub(crate) fn map_err(method: &'static str, err: ttrpc::Error) -> ClientError {
    match err {
        ttrpc::Error::RpcStatus(status) => ClientError::Rpc {
            method,
            code: status.code(),
            message: truncate(status.message(), MAX_STATUS_MESSAGE).to_owned(),
        },
        other => ClientError::Transport {
            method,
            reason: other.to_string(),
        },
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default()
}

fn bad_response(method: &'static str, reason: String) -> ClientError {
    ClientError::BadResponse { method, reason }
}

/// Checks the agent's `Check` answer: the API version must be ours. Returns the agent's release.
pub(crate) fn check_version(resp: CheckResponse) -> Result<String, ClientError> {
    if resp.api_version != API_VERSION {
        return Err(ClientError::VersionMismatch {
            client: API_VERSION,
            agent: resp.api_version,
        });
    }
    Ok(resp.agent_version)
}

/// Checks a `WaitProcess` answer: a signal that can end a process (the runtime re-raises it on
/// itself) with the exit code the agent derives from it (`128 + signal`), or an exit status of
/// 0..=255 when no signal killed the process.
pub(crate) fn check_exit(resp: &WaitProcessResponse) -> Result<ExitStatus, ClientError> {
    let (code, signal) = (resp.exit_code, resp.signal);
    let valid = match signal {
        0 => (0..=255).contains(&code),
        // Stop, continue and default-ignored signals never end a process.
        17..=23 | 28 => false,
        1..=MAX_SIGNAL => Some(code) == signal.checked_add(128),
        _ => false,
    };
    if !valid {
        return Err(bad_response(
            "WaitProcess",
            format!("exit code {code} with signal {signal}"),
        ));
    }
    Ok(ExitStatus { code, signal })
}

/// Checks a `WriteStdin` answer: no more bytes written than were sent.
pub(crate) fn check_written(written: u32, sent: usize) -> Result<usize, ClientError> {
    match usize::try_from(written) {
        Ok(n) if n <= sent => Ok(n),
        _ => Err(bad_response(
            "WriteStdin",
            format!("{written} bytes written of {sent}"),
        )),
    }
}

/// Checks a `ReadStdout`/`ReadStderr` answer: no more data than asked for (`max_len`, itself
/// capped at [`MAX_IO_CHUNK`]; 0 asks for up to [`MAX_IO_CHUNK`]). `None` at end of file.
pub(crate) fn check_read(
    method: &'static str,
    resp: ReadStreamResponse,
    max_len: usize,
) -> Result<Option<Vec<u8>>, ClientError> {
    if resp.eof {
        return Ok(None);
    }
    let max = match max_len {
        0 => MAX_IO_CHUNK,
        n => n.min(MAX_IO_CHUNK),
    };
    if resp.data.len() > max {
        return Err(bad_response(
            method,
            format!(
                "{} bytes of output when at most {max} were asked for",
                resp.data.len()
            ),
        ));
    }
    Ok(Some(resp.data))
}

/// Checks a `GetOOMEvent` answer: the container id must be a valid id.
pub(crate) fn check_oom(resp: OOMEvent) -> Result<String, ClientError> {
    validate_id("container id", &resp.container_id)
        .map_err(|err| bad_response("GetOOMEvent", err.to_string()))?;
    Ok(resp.container_id)
}

fn process_request(container_id: &str, exec_id: &str) -> Result<ProcessRequest, ClientError> {
    validate_id("container id", container_id)?;
    if !exec_id.is_empty() {
        validate_id("exec id", exec_id)?;
    }
    Ok(ProcessRequest {
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
        ..Default::default()
    })
}

fn container_request(container_id: &str) -> Result<ContainerRequest, ClientError> {
    validate_id("container id", container_id)?;
    Ok(ContainerRequest {
        container_id: container_id.to_owned(),
        ..Default::default()
    })
}

impl AgentClient {
    /// Connects to `addr` (`unix:///path` or `vsock://CID:PORT`) and negotiates the API version.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let client =
            ttrpc::r#async::Client::connect(addr)
                .await
                .map_err(|e| ClientError::Connect {
                    addr: addr.to_owned(),
                    reason: e.to_string(),
                })?;
        Self::negotiate(client).await
    }

    /// Uses an already connected stream (e.g. a Unix stream to the VMM's vsock proxy after its
    /// handshake) and negotiates the API version.
    pub async fn from_socket(socket: Socket) -> Result<Self, ClientError> {
        Self::negotiate(ttrpc::r#async::Client::new(socket)).await
    }

    async fn negotiate(client: ttrpc::r#async::Client) -> Result<Self, ClientError> {
        let mut this = AgentClient {
            inner: agent_ttrpc::AgentClient::new(client),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            agent_version: String::new(),
        };
        this.agent_version = check_version(this.check().await?)?;
        Ok(this)
    }

    /// Sets the timeout of control requests (not of waits and reads, which block by design).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The agent's release, as reported by `Check` when connecting.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    fn ctx(&self, timeout: Option<Duration>) -> Context {
        let mut ctx = match timeout {
            Some(t) => ttrpc::context::with_duration(t),
            None => ttrpc::context::Context::default(),
        };
        ctx.add(API_VERSION_METADATA_KEY.to_owned(), API_VERSION.to_string());
        ctx
    }

    fn control(&self) -> Context {
        self.ctx(Some(self.timeout))
    }

    /// Health check; returns the agent's API version and release.
    pub async fn check(&self) -> Result<CheckResponse, ClientError> {
        let req = CheckRequest {
            api_version: API_VERSION,
            ..Default::default()
        };
        self.inner
            .check(self.control(), &req)
            .await
            .map_err(|e| map_err("Check", e))
    }

    /// Kernel release, memory and CPUs of the guest.
    pub async fn guest_details(&self) -> Result<GuestDetails, ClientError> {
        self.inner
            .get_guest_details(self.control(), &GetGuestDetailsRequest::default())
            .await
            .map_err(|e| map_err("GetGuestDetails", e))
    }

    /// Sets up the sandbox: hostname, DNS, shared mounts.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), ClientError> {
        validate_id("sandbox id", &req.sandbox_id)?;
        self.inner
            .create_sandbox(self.control(), req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("CreateSandbox", e))
    }

    /// Removes every container and unmounts the sandbox's shared mounts.
    pub async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        validate_id("sandbox id", sandbox_id)?;
        let req = DestroySandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            ..Default::default()
        };
        self.inner
            .destroy_sandbox(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("DestroySandbox", e))
    }

    /// Creates a container (its init process waits for [`Self::start_container`]); returns the
    /// init's pid in the guest.
    pub async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, ClientError> {
        validate_id("container id", &req.container_id)?;
        check_size("OCI spec", req.oci_spec_json.len(), MAX_SPEC_SIZE)?;
        self.inner
            .create_container(self.control(), req)
            .await
            .map(|r| r.pid)
            .map_err(|e| map_err("CreateContainer", e))
    }

    /// Runs the container's process.
    pub async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .start_container(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("StartContainer", e))
    }

    /// Kills every process of the container and removes it.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .remove_container(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("RemoveContainer", e))
    }

    /// Starts a new process (an OCI `process` as JSON) in a running container; returns its pid.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, ClientError> {
        validate_id("container id", container_id)?;
        validate_id("exec id", exec_id)?;
        check_size("OCI process", process_json.len(), MAX_SPEC_SIZE)?;
        let req = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process_json: process_json.to_vec(),
            ..Default::default()
        };
        self.inner
            .exec_process(self.control(), &req)
            .await
            .map(|r| r.pid)
            .map_err(|e| map_err("ExecProcess", e))
    }

    /// Sends `signal` to one process (`exec_id` empty: the init) or, with `all`, to every process
    /// of the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        let p = process_request(container_id, exec_id)?;
        let req = SignalProcessRequest {
            container_id: p.container_id,
            exec_id: p.exec_id,
            signal,
            all,
            ..Default::default()
        };
        self.inner
            .signal_process(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("SignalProcess", e))
    }

    /// Blocks until the process ends.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError> {
        let req = process_request(container_id, exec_id)?;
        self.inner
            .wait_process(self.ctx(None), &req)
            .await
            .map_err(|e| map_err("WaitProcess", e))
            .and_then(|r| check_exit(&r))
    }

    /// Writes up to [`MAX_IO_CHUNK`] bytes to the process's stdin; returns how many were written.
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        let p = process_request(container_id, exec_id)?;
        check_size("stdin chunk", data.len(), MAX_IO_CHUNK)?;
        let req = WriteStdinRequest {
            container_id: p.container_id,
            exec_id: p.exec_id,
            data: data.to_vec(),
            ..Default::default()
        };
        let resp = self
            .inner
            .write_stdin(self.ctx(None), &req)
            .await
            .map_err(|e| map_err("WriteStdin", e))?;
        check_written(resp.written, data.len())
    }

    /// Writes all of `data` to stdin, in chunks.
    pub async fn write_all_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        mut data: &[u8],
    ) -> Result<(), ClientError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_IO_CHUNK);
            let written = self.write_stdin(container_id, exec_id, &data[..n]).await?;
            if written == 0 || written > n {
                return Err(ClientError::Transport {
                    method: "WriteStdin",
                    reason: format!("agent reported {written} bytes written of {n}"),
                });
            }
            data = &data[written..];
        }
        Ok(())
    }

    /// Closes the process's stdin (end of file for the process).
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let req = process_request(container_id, exec_id)?;
        self.inner
            .close_stdin(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("CloseStdin", e))
    }

    async fn read_stream(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let p = process_request(container_id, exec_id)?;
        let req = ReadStreamRequest {
            container_id: p.container_id,
            exec_id: p.exec_id,
            max_len: u32::try_from(max_len.min(MAX_IO_CHUNK)).unwrap_or(0),
            ..Default::default()
        };
        let method = if stderr { "ReadStderr" } else { "ReadStdout" };
        let resp = if stderr {
            self.inner.read_stderr(self.ctx(None), &req).await
        } else {
            self.inner.read_stdout(self.ctx(None), &req).await
        }
        .map_err(|e| map_err(method, e))?;
        check_read(method, resp, max_len)
    }

    /// Reads the next chunk of stdout (at most `max_len` bytes); `None` at end of file.
    pub async fn read_stdout(
        &self,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.read_stream(false, container_id, exec_id, max_len)
            .await
    }

    /// Reads the next chunk of stderr (at most `max_len` bytes); `None` at end of file.
    pub async fn read_stderr(
        &self,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.read_stream(true, container_id, exec_id, max_len).await
    }

    /// Reads stdout (or stderr) to end of file, refusing more than `limit` bytes in total.
    pub async fn read_to_end(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        limit: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(chunk) = self
            .read_stream(stderr, container_id, exec_id, MAX_IO_CHUNK)
            .await?
        {
            check_size(
                "process output",
                out.len().saturating_add(chunk.len()),
                limit,
            )?;
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Sets the terminal size of a process that has a terminal.
    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        let p = process_request(container_id, exec_id)?;
        let req = TtyWinResizeRequest {
            container_id: p.container_id,
            exec_id: p.exec_id,
            rows,
            cols,
            ..Default::default()
        };
        self.inner
            .tty_win_resize(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("TtyWinResize", e))
    }

    /// The guest pids of every process in the container.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .list_processes(self.control(), &req)
            .await
            .map(|r| r.pids)
            .map_err(|e| map_err("ListProcesses", e))
    }

    /// cgroup statistics of the container.
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .stats_container(self.control(), &req)
            .await
            .map_err(|e| map_err("StatsContainer", e))
    }

    /// Applies new resources (an OCI `linux.resources` as JSON) to a container.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), ClientError> {
        validate_id("container id", container_id)?;
        check_size("OCI resources", resources_json.len(), MAX_SPEC_SIZE)?;
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.inner
            .update_container(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("UpdateContainer", e))
    }

    /// Freezes every process of the container.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .pause_container(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("PauseContainer", e))
    }

    /// Thaws a paused container.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        let req = container_request(container_id)?;
        self.inner
            .resume_container(self.control(), &req)
            .await
            .map(|_| ())
            .map_err(|e| map_err("ResumeContainer", e))
    }

    /// Blocks until the kernel OOM-kills a process in some container; returns that container.
    pub async fn get_oom_event(&self) -> Result<String, ClientError> {
        self.inner
            .get_oom_event(self.ctx(None), &GetOOMEventRequest::default())
            .await
            .map_err(|e| map_err("GetOOMEvent", e))
            .and_then(check_oom)
    }
}
