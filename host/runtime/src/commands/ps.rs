//! `husk ps [--format table|json] ID`: the processes of a container, as PIDs in the guest.

use super::CommandError;
use crate::cli::Cli;
use crate::container::Locked;
use crate::exit;
use crate::id::ContainerId;

/// Output formats of `husk ps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A `PID` column.
    #[default]
    Table,
    /// A JSON array of PIDs (as `runc ps --format json`).
    Json,
}

/// Arguments of `husk ps`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t)]
    pub format: Format,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Accepted for runc compatibility (ps(1) options); ignored: the processes are in the guest.
    #[arg(
        value_name = "PS_ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub ps_args: Vec<String>,
}

/// The output of `husk ps`.
pub fn render(pids: &[u32], format: Format) -> String {
    match format {
        Format::Json => format!(
            "[{}]\n",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        Format::Table => {
            let mut out = String::from("PID\n");
            for pid in pids {
                out.push_str(&format!("{pid}\n"));
            }
            out
        }
    }
}

/// Runs `husk ps`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let container = Locked::acquire(&cli.options(), &id)?;
    let status = *container.state.status();
    if !matches!(
        status,
        oci_spec::runtime::ContainerState::Created | oci_spec::runtime::ContainerState::Running
    ) {
        return Err(CommandError::Unsupported(format!(
            "container {id} is {status}: it has no processes"
        )));
    }
    let (rt, client) = container.agent()?;
    let mut pids = rt
        .block_on(client.list_processes(id.as_str()))
        .map_err(husk_sandbox::guest::GuestError::from)?;
    pids.sort_unstable();
    super::print(&render(&pids, args.format))?;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(render(&[1, 7], Format::Table), "PID\n1\n7\n");
        assert_eq!(render(&[1, 7], Format::Json), "[1,7]\n");
        assert_eq!(render(&[], Format::Json), "[]\n");
    }
}
