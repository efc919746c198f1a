//! husk's OCI runtime: a runc-compatible command line that runs each container in its own
//! microVM. The library holds everything the `husk` binary does; `main.rs` only parses, logs and
//! maps errors to exit statuses.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod bundle;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod console;
pub mod container;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod host;
pub mod id;
pub mod lifecycle;
pub mod logging;
pub mod relay;
pub mod sandbox;
pub mod share;
pub mod signal;
pub mod sizing;
pub mod store;
pub mod supervisor;
pub mod vsock;
