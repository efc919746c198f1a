//! The guest side of a sandbox: the calls husk makes to husk-agent, as a trait ([`Guest`]) so
//! the front ends can be tested against [`crate::fake::FakeGuest`] without a VM.
//!
//! The real implementation is the typed ttrpc client of `guest-agent/protocol`
//! ([`AgentClient`], which negotiates the API version), reached through husk-vmm's hybrid vsock
//! socket `<root>/<id>/vm/vsock` ([`crate::vsock`]): [`connect`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, StatsContainerResponse,
};
use husk_agent_protocol::client::ExitStatus;
use husk_agent_protocol::{AgentClient, ClientError};
use tokio::runtime::Runtime;

use crate::paths::AGENT_PORT;
use crate::vsock::{self, VsockError};

/// How long a verb waits for an already running agent to answer the vsock handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors reaching or using the agent.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The vsock handshake failed.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The connected stream could not be handed to the async runtime.
    #[error("cannot use the agent connection through {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The agent refused a request, or the connection failed during one.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What husk asks of the agent in a sandbox's guest. Every method is one agent request; the
/// long-polling ones (`wait_process`, `read_stdout`, `read_stderr`, `oom_event`) block until
/// there is something to report.
#[async_trait]
pub trait Guest: Send + Sync {
    async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), ClientError>;
    async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError>;
    /// Returns the container's guest PID.
    async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, ClientError>;
    async fn start_container(&self, container_id: &str) -> Result<(), ClientError>;
    async fn remove_container(&self, container_id: &str) -> Result<(), ClientError>;
    /// Returns the process's guest PID.
    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, ClientError>;
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError>;
    async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError>;
    /// Writes all of `data` to the process's stdin.
    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), ClientError>;
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError>;
    /// The next chunk of stdout (`stderr` false) or stderr, at most `max_len` bytes; `None` at
    /// end of file.
    async fn read_output(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError>;
    async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError>;
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError>;
    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError>;
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), ClientError>;
    async fn pause_container(&self, container_id: &str) -> Result<(), ClientError>;
    async fn resume_container(&self, container_id: &str) -> Result<(), ClientError>;
    /// The next container the guest's OOM killer hit.
    async fn oom_event(&self) -> Result<String, ClientError>;
}

/// The agent as the shared, cloneable handle the front ends hold.
pub type SharedGuest = Arc<dyn Guest>;

#[async_trait]
impl Guest for AgentClient {
    async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), ClientError> {
        AgentClient::create_sandbox(self, req).await
    }
    async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        AgentClient::destroy_sandbox(self, sandbox_id).await
    }
    async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, ClientError> {
        AgentClient::create_container(self, req).await
    }
    async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        AgentClient::start_container(self, container_id).await
    }
    async fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        AgentClient::remove_container(self, container_id).await
    }
    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, ClientError> {
        AgentClient::exec_process(self, container_id, exec_id, process_json).await
    }
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        AgentClient::signal_process(self, container_id, exec_id, signal, all).await
    }
    async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError> {
        AgentClient::wait_process(self, container_id, exec_id).await
    }
    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.write_all_stdin(container_id, exec_id, data).await
    }
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        AgentClient::close_stdin(self, container_id, exec_id).await
    }
    async fn read_output(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        if stderr {
            self.read_stderr(container_id, exec_id, max_len).await
        } else {
            self.read_stdout(container_id, exec_id, max_len).await
        }
    }
    async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        self.tty_win_resize(container_id, exec_id, rows, cols).await
    }
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        AgentClient::list_processes(self, container_id).await
    }
    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        AgentClient::stats_container(self, container_id).await
    }
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), ClientError> {
        AgentClient::update_container(self, container_id, resources_json).await
    }
    async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        AgentClient::pause_container(self, container_id).await
    }
    async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        AgentClient::resume_container(self, container_id).await
    }
    async fn oom_event(&self) -> Result<String, ClientError> {
        self.get_oom_event().await
    }
}

/// A current-thread tokio runtime with I/O and timers, for one verb of the CLI.
pub fn runtime() -> Result<Runtime, GuestError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(GuestError::Runtime)
}

/// Connects to the agent behind the sandbox's hybrid vsock socket `uds` and negotiates the API
/// version. Must run inside a tokio runtime. The handshake is retried until `timeout`, or until
/// `cancel` is set (see [`vsock::connect_unless`]); it runs on a blocking thread so the runtime
/// keeps going.
pub async fn connect_unless(
    uds: &Path,
    timeout: Duration,
    cancel: Arc<AtomicBool>,
) -> Result<AgentClient, GuestError> {
    let path = uds.to_path_buf();
    let stream = tokio::task::spawn_blocking(move || {
        vsock::connect_unless(&path, AGENT_PORT, timeout, &cancel)
    })
    .await
    .map_err(|err| GuestError::Socket {
        path: uds.to_path_buf(),
        source: std::io::Error::other(err),
    })??;
    let socket_error = |source| GuestError::Socket {
        path: uds.to_path_buf(),
        source,
    };
    stream.set_nonblocking(true).map_err(socket_error)?;
    let socket = ttrpc::r#async::transport::Socket::try_from(stream).map_err(socket_error)?;
    Ok(AgentClient::from_socket(socket).await?)
}

/// Connects to the agent of an already running sandbox (see [`connect_unless`]).
pub async fn connect(uds: &Path, timeout: Duration) -> Result<AgentClient, GuestError> {
    connect_unless(uds, timeout, Arc::new(AtomicBool::new(false))).await
}

/// `connect` with [`CONNECT_TIMEOUT`] on a fresh current-thread runtime, for verbs that make one
/// or a few calls: returns the runtime and the client.
pub fn connect_blocking(uds: &Path) -> Result<(Runtime, AgentClient), GuestError> {
    let rt = runtime()?;
    let client = rt.block_on(connect(uds, CONNECT_TIMEOUT))?;
    Ok((rt, client))
}
