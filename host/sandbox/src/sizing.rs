//! The size of a container's microVM, from the spec's `linux.resources` and the configuration.
//!
//! - vCPUs: `ceil(cpu.quota / cpu.period)` when a quota is set (period 100000 µs when unset, as
//!   in cgroups), else the number of CPUs in `cpu.cpus`, else `vm.vcpus`.
//! - memory: `ceil(memory.limit / 1 MiB)` when a positive limit is set, else `vm.memory_mib`;
//!   plus `vm.memory_overhead_mib` for the guest kernel and agent; raised to
//!   `limits.min_memory_mib`.
//!
//! A spec asking for more than `limits.max_vcpus` or `limits.max_memory_mib` is refused rather
//! than silently given less. The same limits are applied inside the guest as cgroups by the agent.

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The cgroup default CPU period (µs), used when a quota comes without a period.
pub const DEFAULT_CPU_PERIOD: u64 = 100_000;
/// The highest CPU number accepted in a `cpu.cpus` list.
pub const MAX_CPU_INDEX: u32 = 4095;
/// The longest `cpu.cpus` string accepted.
pub const MAX_CPUSET_LEN: usize = 4096;

const MIB: u64 = 1024 * 1024;

/// Why a spec's resources cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    /// More vCPUs than `limits.max_vcpus`.
    #[error("the spec asks for {asked} vCPUs ({from}); limits.max_vcpus is {max}")]
    TooManyVcpus {
        asked: u64,
        from: &'static str,
        max: u32,
    },
    /// More memory than `limits.max_memory_mib`.
    #[error(
        "the spec asks for {asked_mib} MiB of memory plus {overhead_mib} MiB overhead; limits.max_memory_mib is {max_mib}"
    )]
    TooMuchMemory {
        asked_mib: u64,
        overhead_mib: u32,
        max_mib: u32,
    },
    /// `cpu.period` is 0.
    #[error("linux.resources.cpu.period is 0")]
    ZeroPeriod,
    /// `cpu.cpus` is not a CPU list like `0-3,6`.
    #[error("linux.resources.cpu.cpus {0:?} is not a CPU list (like 0-3,6)")]
    BadCpuList(String),
}

/// The size of one microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB, overhead included.
    pub memory_mib: u32,
}

/// Sizes the microVM for `resources` (see the module documentation).
pub fn vm_size(resources: Option<&LinuxResources>, config: &Config) -> Result<VmSize, SizingError> {
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let vcpus = match cpu {
        Some(cpu) if cpu.quota().is_some_and(|q| q > 0) => {
            let quota = cpu.quota().unwrap_or_default().unsigned_abs();
            let period = cpu.period().unwrap_or(DEFAULT_CPU_PERIOD);
            if period == 0 {
                return Err(SizingError::ZeroPeriod);
            }
            (quota.div_ceil(period), "cpu.quota / cpu.period")
        }
        Some(cpu) if cpu.cpus().as_deref().is_some_and(|c| !c.is_empty()) => {
            let list = cpu.cpus().as_deref().unwrap_or_default();
            (cpu_list_len(list)?, "cpu.cpus")
        }
        _ => (u64::from(config.vm.vcpus), "vm.vcpus"),
    };
    let max_vcpus = config.limits.max_vcpus;
    let vcpus = match u32::try_from(vcpus.0) {
        Ok(n) if n <= max_vcpus => n.max(1),
        _ => {
            return Err(SizingError::TooManyVcpus {
                asked: vcpus.0,
                from: vcpus.1,
                max: max_vcpus,
            })
        }
    };

    let limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|limit| *limit > 0);
    let asked_mib = match limit {
        Some(limit) => limit.unsigned_abs().div_ceil(MIB),
        None => u64::from(config.vm.memory_mib),
    };
    let overhead = config.vm.memory_overhead_mib;
    let total = asked_mib.saturating_add(u64::from(overhead));
    let memory_mib = match u32::try_from(total) {
        Ok(total) if total <= config.limits.max_memory_mib => {
            total.max(config.limits.min_memory_mib)
        }
        _ => {
            return Err(SizingError::TooMuchMemory {
                asked_mib,
                overhead_mib: overhead,
                max_mib: config.limits.max_memory_mib,
            })
        }
    };
    Ok(VmSize { vcpus, memory_mib })
}

/// The number of distinct CPUs in a list like `0-3,6` (bounded: [`MAX_CPUSET_LEN`] characters,
/// CPU numbers up to [`MAX_CPU_INDEX`]).
pub fn cpu_list_len(list: &str) -> Result<u64, SizingError> {
    let bad = || SizingError::BadCpuList(list.chars().take(64).collect());
    if list.len() > MAX_CPUSET_LEN {
        return Err(bad());
    }
    let mut seen = vec![false; MAX_CPU_INDEX as usize + 1];
    for part in list.split(',').map(str::trim) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (parse_cpu(a).ok_or_else(bad)?, parse_cpu(b).ok_or_else(bad)?),
            None => {
                let cpu = parse_cpu(part).ok_or_else(bad)?;
                (cpu, cpu)
            }
        };
        if first > last {
            return Err(bad());
        }
        for cpu in first..=last {
            if let Some(slot) = seen.get_mut(cpu as usize) {
                *slot = true;
            }
        }
    }
    Ok(seen.iter().filter(|&&s| s).count() as u64)
}

fn parse_cpu(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|cpu| *cpu <= MAX_CPU_INDEX)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{self, Discovery};

    fn config() -> Config {
        let discovery = Discovery {
            exe: "/usr/bin/husk".into(),
            path_var: None,
        };
        config::load(Path::new("/nonexistent/husk.toml"), false, &discovery).unwrap()
    }

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    fn size(json: &str) -> Result<VmSize, SizingError> {
        vm_size(Some(&resources(json)), &config())
    }

    #[test]
    fn no_resources_gives_the_defaults_plus_overhead() {
        let size = vm_size(None, &config()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 256 + 64
            }
        );
    }

    #[test]
    fn quota_rounds_up_to_whole_vcpus() {
        assert_eq!(
            size(r#"{"cpu": {"quota": 150000, "period": 100000}}"#)
                .unwrap()
                .vcpus,
            2
        );
        assert_eq!(size(r#"{"cpu": {"quota": 50000}}"#).unwrap().vcpus, 1);
        assert_eq!(
            size(r#"{"cpu": {"quota": -1, "cpus": "0-2"}}"#)
                .unwrap()
                .vcpus,
            3
        );
    }

    #[test]
    fn cpuset_counts_cpus() {
        assert_eq!(size(r#"{"cpu": {"cpus": "0-3,6"}}"#).unwrap().vcpus, 5);
        assert_eq!(cpu_list_len("1,1,0-1").unwrap(), 2);
    }

    #[test]
    fn bad_cpu_lists_are_rejected() {
        for list in ["a", "3-1", "1-", "", "0,,1", "5000", "-1", "1-2-3"] {
            assert!(
                matches!(cpu_list_len(list), Err(SizingError::BadCpuList(_))),
                "{list:?}"
            );
        }
        assert!(cpu_list_len(&"1,".repeat(3000)).is_err());
    }

    #[test]
    fn too_many_vcpus_is_refused() {
        let err = size(r#"{"cpu": {"quota": 6400000, "period": 100000}}"#).unwrap_err();
        assert_eq!(
            err,
            SizingError::TooManyVcpus {
                asked: 64,
                from: "cpu.quota / cpu.period",
                max: 16
            }
        );
        assert!(err.to_string().contains("limits.max_vcpus"));
    }

    #[test]
    fn zero_period_is_refused() {
        assert_eq!(
            size(r#"{"cpu": {"quota": 1000, "period": 0}}"#),
            Err(SizingError::ZeroPeriod)
        );
    }

    #[test]
    fn memory_limit_plus_overhead() {
        let limit = 512 * MIB + 1;
        let json = format!(r#"{{"memory": {{"limit": {limit}}}}}"#);
        assert_eq!(size(&json).unwrap().memory_mib, 513 + 64);
    }

    #[test]
    fn small_memory_limit_is_raised_to_the_minimum() {
        let json = format!(r#"{{"memory": {{"limit": {}}}}}"#, 8 * MIB);
        assert_eq!(size(&json).unwrap().memory_mib, 128);
    }

    #[test]
    fn unlimited_memory_gives_the_default() {
        assert_eq!(
            size(r#"{"memory": {"limit": -1}}"#).unwrap().memory_mib,
            320
        );
    }

    #[test]
    fn too_much_memory_is_refused() {
        let json = format!(r#"{{"memory": {{"limit": {}}}}}"#, i64::MAX);
        let err = size(&json).unwrap_err();
        assert!(
            matches!(err, SizingError::TooMuchMemory { max_mib: 16384, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("limits.max_memory_mib"));
    }
}
