//! `husk start ID`: runs the process of a created container.

use oci_spec::runtime::ContainerState;

use super::CommandError;
use crate::cli::Cli;
use crate::container::{self, Locked};
use crate::exit;
use crate::hooks::{self, HookKind};
use crate::id::ContainerId;
use crate::lifecycle::Operation;

/// Arguments of `husk start`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Starts the process of the locked container and runs the `poststart` hooks.
pub fn start(container: &mut Locked) -> Result<(), CommandError> {
    container.check(Operation::Start)?;
    let id = container.lock.id().clone();
    let (rt, client) = container.agent()?;
    rt.block_on(client.start_container(id.as_str()))
        .map_err(husk_sandbox::guest::GuestError::from)?;
    container.save_status(ContainerState::Running)?;
    let spec = container::saved_spec(container.lock.dir());
    let hooks = spec.as_ref().and_then(|s| s.hooks().as_ref());
    hooks::run_hooks(HookKind::Poststart, hooks, &container.state_bytes())?;
    Ok(())
}

/// Runs `husk start`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let mut container = Locked::acquire(&cli.options(), &id)?;
    start(&mut container)?;
    Ok(exit::SUCCESS)
}
