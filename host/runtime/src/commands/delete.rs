//! `husk delete [--force] ID`: removes a stopped container (or, with `--force`, any container,
//! killing it first): its supervisor, husk-vmm, share, console log and state.

use oci_spec::runtime::ContainerState;

use super::CommandError;
use crate::cli::Cli;
use crate::config::{self, Discovery};
use crate::container::{self, ContainerError, Locked};
use crate::exit;
use crate::hooks::{self, HookKind};
use crate::id::ContainerId;
use crate::lifecycle::Operation;
use crate::store::StoreError;
use husk_sandbox::paths::SandboxPaths;

/// Arguments of `husk delete`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill the container first if it is still created or running.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Deletes the locked container (see the module documentation).
pub fn delete(cli: &Cli, container: Locked, force: bool) -> Result<(), CommandError> {
    let stopped = *container.state.status() == ContainerState::Stopped;
    container.check(if force {
        Operation::ForceDelete
    } else {
        Operation::Delete
    })?;
    let id = container.lock.id().clone();
    if !stopped {
        // Best effort: the supervisor's SIGTERM stops the VM anyway.
        if let Ok((rt, client)) = container.agent() {
            let _ = rt.block_on(client.signal_process(id.as_str(), "", 9, true));
        }
    }
    let options = cli.options();
    let (config_path, explicit) = options.config_path();
    let config = config::load(&config_path, explicit, &Discovery::from_process()?)?;
    let paths = SandboxPaths::new(&options.root, &config, &id)
        .map_err(crate::supervisor::SupervisorError::from)?;
    let spec = container::saved_spec(container.lock.dir());
    let mut state = container.state.clone();
    state.set_status(ContainerState::Stopped);
    let supervisor = container.supervisor();
    container::remove(container.lock, &paths, supervisor)?;
    // The supervisor and husk-vmm are gone: their cgroup can go too.
    let cgroup = spec
        .as_ref()
        .map(|s| crate::supervisor::host_cgroup(s, cli.systemd_cgroup));
    if let Some(Ok(Some(dir))) = cgroup {
        if let Err(err) = crate::cgroup::remove(&dir) {
            tracing::warn!("{err}");
        }
    }
    let state_json = serde_json::to_vec(&state).unwrap_or_default();
    hooks::run_hooks(
        HookKind::Poststop,
        spec.as_ref().and_then(|s| s.hooks().as_ref()),
        &state_json,
    )?;
    match std::fs::remove_file(&paths.console) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => tracing::warn!("cannot remove {}: {err}", paths.console.display()),
    }
    Ok(())
}

/// Runs `husk delete`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let container = match Locked::acquire(&cli.options(), &id) {
        // runc: deleting a container that does not exist with --force succeeds.
        Err(ContainerError::Store(StoreError::NotFound(_))) if args.force => {
            return Ok(exit::SUCCESS)
        }
        other => other?,
    };
    delete(cli, container, args.force)?;
    Ok(exit::SUCCESS)
}
