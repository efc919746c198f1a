//! Where the shim's sandboxes live and how they are configured; the VMs themselves are
//! [`husk_sandbox::Sandbox`]es.
//!
//! ```text
//! <root>/<sandbox>/    the sandbox directory (husk_sandbox::vm), owned by the shim
//! ```

use std::path::PathBuf;

use husk_sandbox::config::Config;
use husk_sandbox::id::ContainerId;
use husk_sandbox::paths::SandboxPaths;
use husk_sandbox::vm::{self, Host, Layout};

use crate::error::Result;

/// The directory holding every sandbox of this host's shims: `HUSK_SHIM_ROOT`, else
/// `/run/husk/shim`.
pub fn state_root() -> PathBuf {
    std::env::var_os("HUSK_SHIM_ROOT")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/run/husk/shim"))
}

/// The husk configuration: `HUSK_CONFIG` if set (must exist), else `/etc/husk/config.toml`
/// (built-in defaults when missing).
pub fn load_config() -> Result<Config> {
    let discovery = husk_sandbox::config::Discovery::from_process()?;
    let (path, explicit) = match std::env::var_os("HUSK_CONFIG") {
        Some(path) => (PathBuf::from(path), true),
        None => (PathBuf::from("/etc/husk/config.toml"), false),
    };
    Ok(husk_sandbox::config::load(&path, explicit, &discovery)?)
}

/// The `delete` command's cleanup of sandbox `id` after the shim died: stops husk-vmm if it
/// still runs and removes the sandbox's files. Nothing to do when the sandbox does not exist.
pub fn cleanup_leftovers(config: &Config, id: &ContainerId) -> Result<()> {
    let paths = SandboxPaths::new(&state_root(), config, id)?;
    vm::cleanup_leftovers(&Host::real(), &paths, Layout::OwnDirectory)?;
    Ok(())
}
