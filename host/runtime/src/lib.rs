//! husk's OCI runtime: a runc-compatible command line that runs each container in its own
//! microVM. The library holds everything the `husk` binary does; `main.rs` only parses, logs and
//! maps errors to exit statuses.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub use husk_sandbox::cgroup;
pub mod cli;
pub mod commands;
pub mod console;
pub mod container;
pub mod exit;
pub mod hooks;
pub mod host;
pub mod lifecycle;
pub mod logging;
pub mod options;
pub mod relay;
pub mod signal;
pub mod store;
pub mod supervisor;

// The sandbox core's modules, under the names the runtime has always used.
pub use husk_sandbox::{bundle, config, id, share, sizing};
