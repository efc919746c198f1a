//! Talking to husk-agent in a sandbox's microVM: the hybrid vsock handshake on
//! `<root>/<id>/vsock.sock` ([`crate::vsock`]), then ttrpc with the typed client of
//! `guest-agent/protocol` ([`AgentClient`], which negotiates the API version).
//!
//! The client is async (tokio); the short-lived verbs drive it with a current-thread runtime
//! ([`runtime`]) and [`Runtime::block_on`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_agent_protocol::{AgentClient, ClientError};
use tokio::runtime::Runtime;

use crate::sandbox::AGENT_PORT;
use crate::vsock::{self, VsockError};

/// How long a verb waits for an already running agent to answer the vsock handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors reaching or using the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
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

/// A current-thread tokio runtime with I/O and timers, for one verb.
pub fn runtime() -> Result<Runtime, AgentError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)
}

/// Connects to the agent behind the sandbox's hybrid vsock socket `uds` and negotiates the API
/// version. Must run inside a tokio runtime. The handshake is retried until `timeout` (see
/// [`vsock::connect`]); it runs on a blocking thread so the runtime keeps going.
pub async fn connect(uds: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
    let path = uds.to_path_buf();
    let stream = tokio::task::spawn_blocking(move || vsock::connect(&path, AGENT_PORT, timeout))
        .await
        .map_err(|err| AgentError::Socket {
            path: uds.to_path_buf(),
            source: std::io::Error::other(err),
        })??;
    let socket_error = |source| AgentError::Socket {
        path: uds.to_path_buf(),
        source,
    };
    stream.set_nonblocking(true).map_err(socket_error)?;
    let socket = ttrpc::r#async::transport::Socket::try_from(stream).map_err(socket_error)?;
    Ok(AgentClient::from_socket(socket).await?)
}

/// `connect` with [`CONNECT_TIMEOUT`] on a fresh current-thread runtime, for verbs that make one
/// or a few calls: returns the runtime and the client.
pub fn connect_blocking(uds: &Path) -> Result<(Runtime, AgentClient), AgentError> {
    let rt = runtime()?;
    let client = rt.block_on(connect(uds, CONNECT_TIMEOUT))?;
    Ok((rt, client))
}
