//! The agent's cgroup v2 statistics in containerd's metrics format
//! (`io.containerd.cgroups.v2.Metrics`, what `ctr task metrics` and the CRI plugin decode).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use husk_agent_protocol::agent::StatsContainerResponse;

use crate::error::{Result, ShimError};

/// The agent says 0 for no memory limit (`memory.max` = `max`); containerd's cgroup v2 metrics
/// say `u64::MAX`, which the CRI plugin checks before computing `available_bytes` (limit minus
/// working set: with 0 it wrapped around to nearly 2^64).
fn unlimited_as_max(limit: u64) -> u64 {
    if limit == 0 {
        u64::MAX
    } else {
        limit
    }
}

/// containerd's metrics message for the agent's statistics.
pub fn to_metrics(stats: &StatsContainerResponse) -> Metrics {
    let mut metrics = Metrics::new();
    if let Some(cpu) = stats.cpu.as_ref() {
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(memory) = stats.memory.as_ref() {
        metrics.memory = MessageField::some(MemoryStat {
            usage: memory.current_bytes,
            usage_limit: unlimited_as_max(memory.limit_bytes),
            swap_usage: memory.swap_current_bytes,
            anon: memory.anon_bytes,
            file: memory.file_bytes,
            ..Default::default()
        });
        metrics.memory_events = MessageField::some(MemoryEvents {
            oom_kill: memory.oom_kills,
            ..Default::default()
        });
    }
    if let Some(pids) = stats.pids.as_ref() {
        metrics.pids = MessageField::some(PidsStat {
            current: pids.current,
            limit: pids.limit,
            ..Default::default()
        });
    }
    if !stats.io.is_empty() {
        metrics.io = MessageField::some(IOStat {
            usage: stats
                .io
                .iter()
                .map(|d| IOEntry {
                    major: u64::from(d.major),
                    minor: u64::from(d.minor),
                    rbytes: d.read_bytes,
                    wbytes: d.write_bytes,
                    rios: d.read_ios,
                    wios: d.write_ios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    metrics
}

/// The metrics packed as containerd expects them in `StatsResponse.stats`.
pub fn to_any(stats: &StatsContainerResponse) -> Result<Any> {
    containerd_shim::util::convert_to_any(Box::new(to_metrics(stats)))
        .map_err(|e| ShimError::InvalidArgument(format!("cannot encode metrics: {e}")))
}

#[cfg(test)]
mod tests {
    use husk_agent_protocol::agent::{CpuStats, MemoryStats};

    use super::*;

    #[test]
    fn agent_stats_become_cgroup_v2_metrics() {
        let stats = StatsContainerResponse {
            cpu: MessageField::some(CpuStats {
                usage_usec: 1500,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStats {
                current_bytes: 4096,
                limit_bytes: 8192,
                oom_kills: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let metrics = to_metrics(&stats);
        assert_eq!(metrics.cpu.usage_usec, 1500);
        assert_eq!(metrics.memory.usage, 4096);
        assert_eq!(metrics.memory.usage_limit, 8192);
        assert_eq!(metrics.memory_events.oom_kill, 2);
        assert!(metrics.pids.is_none());
        let unlimited = StatsContainerResponse {
            memory: MessageField::some(MemoryStats {
                current_bytes: 4096,
                limit_bytes: 0,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(to_metrics(&unlimited).memory.usage_limit, u64::MAX);
        let any = to_any(&stats).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }
}
