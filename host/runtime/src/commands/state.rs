//! `husk state ID`: the container's OCI state as JSON (runtime-spec "state" operation).

use super::CommandError;
use crate::cli::Cli;
use crate::exit;
use crate::id::ContainerId;
use crate::store::Store;

/// Arguments of `husk state`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// The state of container `id` under `store` as pretty JSON: ociVersion, id, status, pid,
/// bundle, annotations. The status is refreshed (a container whose process is gone is `stopped`).
pub fn state_json(store: &Store, id: &ContainerId) -> Result<String, CommandError> {
    let record = store.load(id)?;
    serde_json::to_string_pretty(&record.current_state())
        .map_err(|err| CommandError::Output(std::io::Error::other(err)))
}

/// Runs `husk state`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let json = state_json(&Store::new(cli.root()), &id)?;
    super::print(&format!("{json}\n"))?;
    Ok(exit::SUCCESS)
}
