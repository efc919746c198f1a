//! The agent API shared by the host components and `husk-agent`.
//!
//! The service is defined in `proto/agent.proto` and generated at build time (pure Rust, no
//! `protoc`). [`client::AgentClient`] is the typed host-side client; [`validate`] holds the checks
//! both sides apply to identifiers and sizes. Every limit is a named constant below and is
//! documented in `docs/agent-api.md`.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod validate;

/// Generated protobuf messages (`proto/agent.proto`).
#[allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_variables,
    deprecated,
    unused_results,
    trivial_casts,
    unsafe_op_in_unsafe_fn
)]
#[rustfmt::skip]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc client, server trait and service registration (`create_agent`).
#[allow(
    clippy::all,
    clippy::undocumented_unsafe_blocks,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_mut,
    unused_variables,
    deprecated,
    unused_results,
    trivial_casts,
    unsafe_op_in_unsafe_fn
)]
#[rustfmt::skip]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub use client::{AgentClient, ClientError};

/// Version of the agent API. Host and guest must agree exactly: the agent refuses requests
/// carrying another version and the client refuses an agent reporting another version.
pub const API_VERSION: u32 = 1;

/// ttrpc metadata key that carries [`API_VERSION`] on every request.
pub const API_VERSION_METADATA_KEY: &str = "husk-api-version";

/// The line `husk-agent` prints on the guest console once it runs as PID 1 and listens; tests and
/// the boot benchmark wait for it.
pub const BOOT_MARKER: &str = "husk-agent: started";

/// The vsock port the agent listens on unless the kernel command line says `husk.agent_port=N`.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Largest ttrpc message either side sends (ttrpc's own frame limit is 4 MiB).
pub const MAX_MESSAGE_SIZE: usize = 4 << 20;

/// Largest chunk of stdin written, or of stdout/stderr read, in one call.
pub const MAX_IO_CHUNK: usize = 1 << 20;

/// Largest OCI spec, `process` or `resources` JSON document accepted.
pub const MAX_SPEC_SIZE: usize = 1 << 20;

/// Longest container, exec or sandbox identifier, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Most storages in one sandbox or container request.
pub const MAX_STORAGES: usize = 32;

/// Most DNS servers, and most search domains, in a sandbox.
pub const MAX_DNS_ENTRIES: usize = 16;

/// Longest hostname (the kernel's own limit, `HOST_NAME_MAX`).
pub const MAX_HOSTNAME_LEN: usize = 64;

/// Longest path or mount option string in a request.
pub const MAX_PATH_LEN: usize = 4096;

/// Most containers one agent runs at once.
pub const MAX_CONTAINERS: usize = 1024;

/// Most exec'd processes alive in one container at once.
pub const MAX_EXECS_PER_CONTAINER: usize = 256;
