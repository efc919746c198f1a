//! The shim's errors, and how they map to ttrpc status codes for containerd.

use std::io;
use std::path::PathBuf;

use containerd_shim::protos::ttrpc;
use husk_agent_protocol::ClientError;

/// Everything a Task request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A request names a task or exec this shim does not run.
    #[error("{0} not found")]
    NotFound(String),
    /// A request's content is invalid (bad ID, malformed spec or options).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request does not fit the task's state (start twice, delete while running).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something already exists (task ID, exec ID).
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A feature husk does not offer.
    #[error("{0} is not supported by husk")]
    Unsupported(&'static str),
    /// Loading the husk configuration failed.
    #[error("husk configuration: {0}")]
    Config(#[from] husk_sandbox::config::ConfigError),
    /// The bundle containerd prepared is not usable.
    #[error("bundle: {0}")]
    Bundle(#[from] husk_sandbox::bundle::BundleError),
    /// The spec asks for a microVM husk refuses to build.
    #[error("microVM size: {0}")]
    Sizing(#[from] husk_sandbox::sizing::SizingError),
    /// The sandbox's paths cannot be used.
    #[error("sandbox: {0}")]
    Paths(#[from] husk_sandbox::paths::PathError),
    /// The host cgroup the spec names cannot be used.
    #[error("host cgroup: {0}")]
    Cgroup(#[from] husk_sandbox::cgroup::CgroupError),
    /// The sandbox's microVM could not be booted.
    #[error("sandbox: {0}")]
    Sandbox(#[from] husk_sandbox::SandboxError),
    /// Sharing the rootfs and mounts with the guest failed.
    #[error("share: {0}")]
    Share(#[from] husk_sandbox::share::ShareError),
    /// The agent refused a request or the connection failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// A host file or system call failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A log URI containerd passed cannot be used, or its logging program failed.
    #[error(transparent)]
    Log(#[from] crate::logger::LogError),
    /// Mounting the rootfs containerd prepared failed.
    #[error("cannot mount the rootfs on {path}: {reason}")]
    Rootfs { path: PathBuf, reason: String },
}

impl ShimError {
    /// A closure turning an `io::Error` into [`ShimError::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| ShimError::Io {
            action,
            path,
            source,
        }
    }

    /// The ttrpc status code containerd expects for this error.
    pub fn code(&self) -> ttrpc::Code {
        use containerd_shim::protos::protobuf::Enum;
        use ttrpc::Code;
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::InvalidArgument(_)
            | ShimError::Bundle(_)
            | ShimError::Sizing(_)
            | ShimError::Paths(_)
            | ShimError::Sandbox(husk_sandbox::SandboxError::Paths(_))
            | ShimError::Cgroup(husk_sandbox::cgroup::CgroupError::Invalid { .. })
            | ShimError::Log(crate::logger::LogError::BadUri { .. }) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::AlreadyExists(_)
            | ShimError::Sandbox(husk_sandbox::SandboxError::AlreadyExists { .. }) => {
                Code::ALREADY_EXISTS
            }
            ShimError::Unsupported(_) => Code::UNIMPLEMENTED,
            ShimError::Agent(err) => match err.code().map(|c| c.value()) {
                Some(code) => ttrpc::Code::from_i32(code).unwrap_or(Code::UNKNOWN),
                None => Code::UNAVAILABLE,
            },
            _ => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), err.to_string()))
    }
}

/// Result of the shim's internal operations.
pub type Result<T> = std::result::Result<T, ShimError>;
