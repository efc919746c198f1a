//! `husk update --resources FILE ID`: applies new `linux.resources` (OCI JSON; `-` reads
//! standard input) to a container's cgroup in the guest. The microVM keeps its size.

use std::io::Read;
use std::path::PathBuf;

use oci_spec::runtime::LinuxResources;

use super::CommandError;
use crate::cli::Cli;
use crate::container::Locked;
use crate::exit;
use crate::id::ContainerId;

/// Largest resources document read.
pub const MAX_RESOURCES_BYTES: u64 = 1024 * 1024;

/// Arguments of `husk update`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The new resources as an OCI `linux.resources` JSON file (`-`: standard input).
    #[arg(long, short = 'r', value_name = "FILE")]
    pub resources: PathBuf,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// Reads and checks a resources document.
pub fn parse_resources(name: &str, bytes: &[u8]) -> Result<LinuxResources, CommandError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let bad = |e: &dyn std::fmt::Display| {
        CommandError::Unsupported(format!("malformed resources {name}: {e}"))
    };
    let resources: LinuxResources =
        serde_path_to_error::deserialize(&mut de).map_err(|e| bad(&e))?;
    de.end().map_err(|e| bad(&e))?;
    Ok(resources)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CommandError> {
    let mut bytes = Vec::new();
    let result = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_RESOURCES_BYTES + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_RESOURCES_BYTES + 1).read_to_end(&mut bytes))
    };
    result
        .map_err(|e| CommandError::Unsupported(format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_RESOURCES_BYTES {
        return Err(CommandError::Unsupported(format!(
            "{} is larger than {MAX_RESOURCES_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Runs `husk update`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let bytes = read(&args.resources)?;
    let resources = parse_resources(&args.resources.display().to_string(), &bytes)?;
    let json =
        serde_json::to_vec(&resources).map_err(|e| CommandError::Unsupported(e.to_string()))?;
    let container = Locked::acquire(&cli.options(), &id)?;
    let status = *container.state.status();
    if !matches!(
        status,
        oci_spec::runtime::ContainerState::Created | oci_spec::runtime::ContainerState::Running
    ) {
        return Err(CommandError::Unsupported(format!(
            "cannot update container {id}: it is {status}"
        )));
    }
    let (rt, client) = container.agent()?;
    rt.block_on(client.update_container(id.as_str(), &json))
        .map_err(husk_sandbox::guest::GuestError::from)?;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_parse_with_positions() {
        let ok = parse_resources("r", br#"{"memory":{"limit":1048576}}"#).unwrap();
        assert_eq!(ok.memory().as_ref().unwrap().limit(), Some(1_048_576));
        let err = parse_resources("r", br#"{"memory":{"limit":"x"}}"#).unwrap_err();
        assert!(err.to_string().contains("memory.limit"), "{err}");
        assert!(parse_resources("r", b"{} x").is_err());
    }
}
