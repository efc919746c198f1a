//! The exit statuses of `husk`, one per cause of failure (documented in docs/runtime.md).
//!
//! Verbs that run a container process (`run`, `exec`, next) exit with that process's status
//! instead, like runc.

/// Success.
pub const SUCCESS: u8 = 0;
/// A failure with no more specific status: an I/O error, a corrupt state file, ...
pub const FAILURE: u8 = 1;
/// Bad command line: unknown flag or verb, unknown `--log-format`, invalid container ID.
pub const USAGE: u8 = 2;
/// The configuration file is missing (when named with `--config`), unreadable or invalid.
pub const CONFIG: u8 = 3;
/// The container named does not exist.
pub const NOT_FOUND: u8 = 4;
/// The bundle is invalid: missing directory, missing or malformed config.json, bad rootfs.
pub const BUNDLE: u8 = 5;
/// `husk check`: this host cannot run husk as configured.
pub const HOST_NOT_READY: u8 = 6;
/// Something that must not exist already does (a container ID, `spec`'s config.json).
pub const ALREADY_EXISTS: u8 = 7;
