//! `husk pause ID` and `husk resume ID`: freeze and thaw every process of a running container
//! (the agent's cgroup freezer in the guest). The record's `paused` says which; the OCI status
//! stays `running`.

use super::CommandError;
use crate::cli::Cli;
use crate::container::Locked;
use crate::exit;
use crate::id::ContainerId;
use crate::lifecycle::Operation;

/// Arguments of `husk pause` and `husk resume`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Pauses (`pause` true) or resumes the container.
pub fn run(cli: &Cli, args: &Args, pause: bool) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let mut container = Locked::acquire(&cli.options(), &id)?;
    container.check(if pause {
        Operation::Pause
    } else {
        Operation::Resume
    })?;
    let (rt, client) = container.agent()?;
    let result = if pause {
        rt.block_on(client.pause_container(id.as_str()))
    } else {
        rt.block_on(client.resume_container(id.as_str()))
    };
    result.map_err(husk_sandbox::guest::GuestError::from)?;
    container.record.paused = pause;
    container.lock.save(&container.record)?;
    Ok(exit::SUCCESS)
}
