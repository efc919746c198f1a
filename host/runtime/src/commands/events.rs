//! `husk events [--stats] [--interval D] ID`: the container's statistics and OOM events as
//! JSON lines in runc's event format. `--stats` prints one `stats` event and exits; otherwise
//! a `stats` event every interval and an `oom` event whenever the guest kernel OOM-kills a
//! process of the container, until the container stops.

use std::time::Duration;

use husk_agent_protocol::agent::StatsContainerResponse;
use serde_json::{json, Value};

use super::CommandError;
use crate::cli::Cli;
use crate::container::Locked;
use crate::exit;
use crate::id::ContainerId;
use husk_sandbox::guest::{self, GuestError};

/// Arguments of `husk events`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between statistics (1 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// A `stats` event as runc prints it (the fields husk has; times in nanoseconds).
pub fn stats_event(id: &str, stats: &StatsContainerResponse) -> Value {
    let cpu = stats.cpu.as_ref();
    let memory = stats.memory.as_ref();
    let pids = stats.pids.as_ref();
    let usec = |v: Option<u64>| v.unwrap_or(0).saturating_mul(1000);
    let io: Vec<Value> = stats
        .io
        .iter()
        .flat_map(|d| {
            [
                json!({"major": d.major, "minor": d.minor, "op": "Read", "value": d.read_bytes}),
                json!({"major": d.major, "minor": d.minor, "op": "Write", "value": d.write_bytes}),
            ]
        })
        .collect();
    json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": usec(cpu.map(|c| c.usage_usec)),
                    "user": usec(cpu.map(|c| c.user_usec)),
                    "kernel": usec(cpu.map(|c| c.system_usec)),
                },
                "throttling": {
                    "throttledPeriods": cpu.map(|c| c.nr_throttled).unwrap_or(0),
                    "throttledTime": usec(cpu.map(|c| c.throttled_usec)),
                },
            },
            "memory": {
                "usage": {
                    "usage": memory.map(|m| m.current_bytes).unwrap_or(0),
                    "limit": memory.map(|m| m.limit_bytes).unwrap_or(0),
                },
                "swap": { "usage": memory.map(|m| m.swap_current_bytes).unwrap_or(0) },
                "raw": {
                    "anon": memory.map(|m| m.anon_bytes).unwrap_or(0),
                    "file": memory.map(|m| m.file_bytes).unwrap_or(0),
                },
                "oom_kill": memory.map(|m| m.oom_kills).unwrap_or(0),
            },
            "pids": {
                "current": pids.map(|p| p.current).unwrap_or(0),
                "limit": pids.map(|p| p.limit).unwrap_or(0),
            },
            "blkio": { "ioServiceBytesRecursive": io },
        },
    })
}

fn emit(event: &Value) -> Result<(), CommandError> {
    super::print(&format!("{event}\n"))
}

/// Runs `husk events`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let vsock = {
        let container = Locked::acquire(&cli.options(), &id)?;
        let status = *container.state.status();
        if status == oci_spec::runtime::ContainerState::Stopped {
            return Err(CommandError::Unsupported(format!(
                "container {id} is stopped: it has no events"
            )));
        }
        container.vsock()
    };
    let rt = guest::runtime()?;
    let result = rt.block_on(async {
        let client = guest::connect(&vsock, guest::CONNECT_TIMEOUT).await?;
        if args.stats {
            let stats = client.stats_container(id.as_str()).await?;
            return emit(&stats_event(id.as_str(), &stats));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(args.interval));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match client.stats_container(id.as_str()).await {
                        Ok(stats) => emit(&stats_event(id.as_str(), &stats))?,
                        // The container (or its VM) is gone: the stream ends.
                        Err(err) => {
                            tracing::debug!("events of {id} end: {err}");
                            return Ok(());
                        }
                    }
                }
                oom = client.get_oom_event() => match oom {
                    Ok(container) if container == id.as_str() => {
                        emit(&json!({"type": "oom", "id": id.as_str()}))?;
                    }
                    Ok(_) => {}
                    Err(err) => return Err(CommandError::from(GuestError::from(err))),
                },
            }
        }
    });
    rt.shutdown_background();
    result?;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use husk_agent_protocol::agent::{CpuStats, MemoryStats};

    use super::*;

    #[test]
    fn stats_in_runc_units() {
        let stats = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 3,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                current_bytes: 4096,
                limit_bytes: 8192,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let event = stats_event("c", &stats);
        assert_eq!(event["type"], "stats");
        assert_eq!(event["data"]["cpu"]["usage"]["total"], 3000);
        assert_eq!(event["data"]["memory"]["usage"]["limit"], 8192);
        assert_eq!(event["data"]["pids"]["current"], 0);
    }
}
